"""The package, the unit and the role on a real systemd host.

systemd 252 boots as PID 1 in a system container (testbed.systemd_host: systemd-nspawn -b
--register=no --keep-unit over the Debian 12 root of scripts/build-systemd-image, sharing
this host's network). The role, through an nsenter connection, installs the agent's .deb
(built here by scripts/build-deb) and runs it under its systemd unit on a free 127.0.0.1
port. Then a container and a VM (libvirtd from the distribution, started by systemd; TCG)
are made through the API and the agent is restarted, stopped and upgraded to a newer .deb:
both keep running (same processes) and the agent re-adopts them each time. The container is
a systemd scope of its own (runc's systemd cgroup driver) throughout.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from testbed import systemd_host
from tests.functional.conftest import field, with_version
from testbed.agentproc import Api, free_port
from testbed.ocibuild import busybox_layers, write_layout

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLAYBOOK_TIMEOUT = 900
UPGRADE_VERSION_SUFFIX = "+test1"  # dpkg orders 0.1.0+test1 after 0.1.0

pytestmark = [pytest.mark.real, pytest.mark.slow]


def _need_tools():
    missing = [t for t in ("systemd-nspawn", "nsenter", "debootstrap", "dpkg-deb") if not shutil.which(t)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run scripts/setup-host ([dev] of scripts/packages.txt)")


def _explain(run) -> str:
    return f"rc={run.returncode}\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"


def _recap(run) -> dict[str, int]:
    m = re.search(r"^nspawn\s*:\s*(.+)$", run.stdout, re.M)
    assert m, _explain(run)
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


@pytest.fixture(scope="module")
def sd(tmp_path_factory, built_deb):
    """A booted systemd host, the .debs (v1 and a newer v2) and the role's variables."""
    _need_tools()
    base = tmp_path_factory.mktemp("systemd-host")
    v1 = built_deb
    version = field(v1, "Version")
    v2 = with_version(v1, version + UPGRADE_VERSION_SUFFIX, base)
    state = base / "state"  # the agent's state dir, bound from here: overlay mounts cannot nest in the root's
    state.mkdir(mode=0o711)
    from testbed.runtimes import test_network
    bridge, subnet = test_network()
    host = systemd_host.SystemdHost(systemd_host.image(), binds={str(state): "/var/lib/nodeagent"})
    port = free_port()
    ctx = SimpleNamespace(host=host, v1=v1, v2=v2, version=version, state=state, url=f"http://127.0.0.1:{port}",
                          extra={"nodeagent_listen": f"127.0.0.1:{port}", "nodeagent_deb": str(v1),
                                 "nodeagent_network": {"bridge": bridge, "subnet": subnet, "nat": False},
                                 "nodeagent_admin_token_name": "systemd-test"},
                          home=base / "ansible-home", api=None, instances=[])
    try:
        host.boot()
        yield ctx
    finally:
        if ctx.api is not None:
            for name in ctx.instances:  # their mounts and cgroups go with them
                try:
                    ctx.api.wait(ctx.api.delete(f"/v1/instances/{name}").json(), timeout=60)
                except Exception:  # noqa: BLE001 - the container's halt ends what is left
                    pass
        host.stop()
        # the host's network is the machine's: the agent inside left its bridge and NAT rule
        # here (its nft tables carry the fixed rtag of /var/lib/nodeagent: not dropped, as a
        # real agent on this machine would have the same)
        from testbed.runtimes import drop_test_network
        drop_test_network(bridge)
        shutil.rmtree(base, ignore_errors=True)


def _playbook(sd, **extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible" / "ansible.cfg"), ANSIBLE_HOME=str(sd.home),
               ANSIBLE_LOCAL_TEMP=str(sd.home / "tmp"), ANSIBLE_CONNECTION_PLUGINS=str(systemd_host.CONNECTION_PLUGINS),
               ANSIBLE_NOCOLOR="1", PATH=f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    variables = {**sd.extra, "ansible_nsenter_pid": sd.host.leader, **extra}
    return subprocess.run([str(BIN / "ansible-playbook"), "-i", "nspawn,", "-c", "nsenter", "ansible/site.yml",
                           "-e", json.dumps(variables)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=PLAYBOOK_TIMEOUT)


def _show(sd, *props: str) -> dict[str, str]:
    out = sd.host.run("systemctl", "show", "nodeagent", *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _installed(sd, package: str) -> str | None:
    r = sd.host.run("dpkg-query", "-W", "-f=${db:Status-Abbrev} ${Version}", package, check=False)
    return r.stdout.split()[1] if r.returncode == 0 and r.stdout.startswith("ii") else None


def _process(sd, name: str) -> tuple[int, str]:
    """The container's init: (PID in the system container, its start time)."""
    pid = int((sd.state / "containers" / "containers" / name / "container.pid").read_text())
    stat = sd.host.run("cat", f"/proc/{pid}/stat").stdout
    return pid, stat.rsplit(")", 1)[1].split()[19]


def _adopted(sd, name: str) -> None:
    """The agent (re)started by systemd answers at once (Type=notify) and runs the container."""
    assert _show(sd, "ActiveState")["ActiveState"] == "active"
    r = sd.api.get(f"/v1/instances/{name}")
    assert r.status_code == 200 and r.json()["state"] == "running", r.text
    r = sd.api.post(f"/v1/instances/{name}/exec", json={"command": ["/bin/busybox", "cat", "/alive"]})
    assert r.status_code == 200 and r.json()["stdout"].strip() == "yes", r.text


def _in_its_scope(sd, name: str) -> None:
    """runc's systemd cgroup driver: the container is a scope of its own in nodeagent.slice,
    active in systemd, and its usage is read from there."""
    cgroup = sd.host.run("cat", f"/proc/{_process(sd, name)[0]}/cgroup").stdout
    assert f"/nodeagent.slice/nodeagent-{name}.scope" in cgroup and "nodeagent.service" not in cgroup, cgroup
    assert sd.host.run("systemctl", "is-active", f"nodeagent-{name}.scope", check=False).stdout.strip() == "active"
    r = sd.api.get(f"/v1/instances/{name}/stats")
    assert r.status_code == 200 and r.json()["memory_bytes"] > 0 and r.json()["pids"] >= 1, r.text


def test_the_role_installs_the_package_and_runs_the_unit(sd):
    run = _playbook(sd)
    assert run.returncode == 0, _explain(run)
    assert _recap(run)["failed"] == 0
    assert _installed(sd, "nodeagent") == sd.version
    # the host got [runtime] only: no Ceph server, registry, compiler or libvirt headers
    for dev in ("ceph-mon", "radosgw", "docker-registry", "gcc", "libvirt-dev", "python3-dev", "criu"):
        assert _installed(sd, dev) is None, f"{dev} was installed"
    # the venv sees Debian's python3-libvirt: nothing was compiled
    sd.host.run("/opt/nodeagent/venv/bin/python", "-c", "import libvirt; "
                "assert libvirt.__file__.startswith('/usr/lib/python3/dist-packages'), libvirt.__file__")
    props = _show(sd, "Type", "KillMode", "ActiveState", "NotifyAccess", "StandardOutput", "DropInPaths")
    assert props["Type"] == "notify" and props["KillMode"] == "process" and props["ActiveState"] == "active", props
    assert props["StandardOutput"] == "journal" and "ansible.conf" in props["DropInPaths"], props
    assert "nodeagent serving" in sd.host.run("journalctl", "-u", "nodeagent", "--no-pager", "-o", "cat").stdout
    sd.api = Api(sd.url, sd.host.run("cat", "/etc/nodeagent/admin.token").stdout.strip())
    assert sd.api.get("/v1/pools").status_code == 200


def test_a_second_run_changes_nothing(sd):
    pid = _show(sd, "MainPID")["MainPID"]
    run = _playbook(sd)
    assert run.returncode == 0, _explain(run)
    assert _recap(run)["changed"] == 0, _explain(run)
    assert _show(sd, "MainPID")["MainPID"] == pid


def _qemu(sd) -> tuple[int, str]:
    """The one QEMU of this fresh system container: (PID, start time)."""
    pids = sd.host.run("pgrep", "-f", "qemu-system", check=False).stdout.split()
    assert len(pids) == 1, pids
    stat = sd.host.run("cat", f"/proc/{pids[0]}/stat").stdout
    return int(pids[0]), stat.rsplit(")", 1)[1].split()[19]


def _vm_adopted(sd, name: str) -> None:
    r = sd.api.get(f"/v1/instances/{name}")
    assert r.status_code == 200 and r.json()["state"] == "running", r.text


def _make_vm(sd, guest_images, name: str) -> None:
    shutil.copyfile(guest_images["boot"], sd.state / "import" / "boot.qcow2")
    op = sd.api.wait(sd.api.post("/v1/images", json={
        "name": "boot", "format": "qcow2",
        "source": {"type": "file", "path": "/var/lib/nodeagent/import/boot.qcow2"}}).json())
    assert op["status"] == "succeeded", op
    sd.instances.append(name)
    r = sd.api.post("/v1/instances", json={"name": name, "kind": "vm", "image": "boot", "memory_mib": 128,
                                           "network": "none"})
    assert r.status_code == 202, r.text
    op = sd.api.wait(r.json(), timeout=300)
    assert op["status"] == "succeeded", json.dumps(op.get("error"))
    # QEMU runs in libvirt's machine scope, not under the agent
    cgroup = sd.host.run("cat", f"/proc/{_qemu(sd)[0]}/cgroup").stdout
    assert "machine.slice" in cgroup and "nodeagent.service" not in cgroup, cgroup


def test_restart_stop_and_upgrade_keep_the_container_and_the_vm_running(sd, guest_images):
    assert sd.api is not None, "the role's run failed"
    layout = write_layout(str(sd.state / "import" / "busybox"), {"latest": busybox_layers()})
    op = sd.api.wait(sd.api.post("/v1/images", json={
        "name": "busybox", "format": "oci",
        "source": {"type": "file", "path": "/var/lib/nodeagent/import/" + Path(layout).name}}).json())
    assert op["status"] == "succeeded", op
    name = "sd-" + os.urandom(3).hex()
    sd.instances.append(name)
    r = sd.api.post("/v1/instances", json={"name": name, "kind": "container", "image": "busybox",
                                           "network": "none", "memory_mib": 64,
                                           "command": ["/bin/sh", "-c", "echo yes > /alive; exec sleep 3600"]})
    assert r.status_code == 202, r.text
    op = sd.api.wait(r.json(), timeout=120)
    assert op["status"] == "succeeded", json.dumps(op.get("error"))
    _adopted(sd, name)
    first = _process(sd, name)
    # the monitor runs in a scope of its own, outside the agent's service cgroup
    conmon = int((sd.state / "containers" / "containers" / name / "conmon.pid").read_text())
    cgroup = sd.host.run("cat", f"/proc/{conmon}/cgroup").stdout
    assert re.search(rf"nodeagent-conmon-{name}-[0-9a-f]+\.scope", cgroup), cgroup
    assert "nodeagent.service" not in cgroup, cgroup
    _in_its_scope(sd, name)
    vm = "sdvm-" + os.urandom(3).hex()
    _make_vm(sd, guest_images, vm)
    qemu = _qemu(sd)

    sd.host.run("systemctl", "restart", "nodeagent")
    _adopted(sd, name)
    _vm_adopted(sd, vm)
    assert _process(sd, name) == first and _qemu(sd) == qemu
    _in_its_scope(sd, name)

    sd.host.run("systemctl", "stop", "nodeagent")
    assert _show(sd, "ActiveState")["ActiveState"] == "inactive"
    assert sd.host.run("kill", "-0", str(first[0]), check=False).returncode == 0, "the container died with the agent"
    sd.host.run("systemctl", "start", "nodeagent")
    _adopted(sd, name)
    _vm_adopted(sd, vm)
    assert _process(sd, name) == first and _qemu(sd) == qemu

    run = _playbook(sd, nodeagent_deb=str(sd.v2))  # an upgrade: apt installs the newer package
    assert run.returncode == 0, _explain(run)
    assert _installed(sd, "nodeagent") == sd.version + UPGRADE_VERSION_SUFFIX
    _adopted(sd, name)
    _vm_adopted(sd, vm)
    assert _process(sd, name) == first and _qemu(sd) == qemu
    _in_its_scope(sd, name)
    # stopped and started again through the API: a fresh runc create, in a scope again
    for action in ("stop", "start"):
        op = sd.api.wait(sd.api.post(f"/v1/instances/{name}/actions", json={"action": action, "force": True}).json(),
                                 timeout=120)
        assert op["status"] == "succeeded", json.dumps(op.get("error"))
    _adopted(sd, name)
    _in_its_scope(sd, name)


def test_the_role_readies_libvirtd_for_migration(sd, tmp_path):
    """nodeagent_libvirt_migration: libvirtd gets a host UUID from the machine id and listens
    for TLS with a certificate from the role's CA (a client with the host's certificate
    connects), the agent's migration_uri names it, guests keep running, a second run
    changes nothing."""
    assert sd.api is not None, "the role's run failed"
    extra = {"nodeagent_libvirt_migration": True, "nodeagent_libvirt_ca_dir": str(tmp_path / "pki"),
             "nodeagent_deb": str(sd.v2)}
    qemu_before = _qemu(sd) if sd.host.run("pgrep", "-f", "qemu-system", check=False).stdout.strip() else None
    run = _playbook(sd, **extra)
    assert run.returncode == 0, _explain(run)
    assert (tmp_path / "pki" / "ca.key").exists() and (tmp_path / "pki" / "nspawn.crt").exists()
    out = sd.host.run("virsh", "-c", "qemu+tls://127.0.0.1/system", "hostname", check=False)
    assert out.returncode == 0, out.stderr
    machine_id = sd.host.run("cat", "/etc/machine-id").stdout.strip()
    import uuid
    expected = str(uuid.uuid5(uuid.UUID("361E6D51-FAEC-444A-9079-341386DA8E2E"), machine_id))  # Ansible's to_uuid
    caps = sd.host.run("virsh", "-c", "qemu:///system", "capabilities").stdout
    assert f"<uuid>{expected}</uuid>" in caps
    toml = sd.host.run("cat", "/etc/nodeagent/agent.toml").stdout
    assert 'migration_uri = "qemu+tls://127.0.0.1/system"' in toml
    if qemu_before is not None:
        assert _qemu(sd) == qemu_before  # restarting libvirtd left the guest running
    run = _playbook(sd, **extra)
    assert run.returncode == 0, _explain(run)
    assert _recap(run)["changed"] == 0, _explain(run)
