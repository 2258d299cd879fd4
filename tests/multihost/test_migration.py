"""Migration through the agents: two simulated hosts, each with its own libvirtd and a
real agent (testbed/harness.py); POST /v1/migrations on the source moves a
running VM with its local disk copied; the destination adopts it; the source is clean.
Faults: the destination agent down, the link to the destination cut, the destination's
pool full (h2's pool is a small tmpfs in its mount namespace), cancel; and a stopped VM
moved offline; a VM's and a container's volumes move with them."""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from testbed.agentproc import Api
from testbed import harness
from testbed.capture import Capture
from tests.multihost.checks import OP_TIMEOUT_S, assert_runs, domains, migrate

pytestmark = pytest.mark.real

SLOW_MIGRATE_S = 4  # a pause the source takes before the copy, so a fault can be injected there
DEST_POOL_SIZE = "256M"  # h2's pool is a tmpfs this big: a disk the tests can really fill


@pytest.fixture(scope="module")
def cluster():
    with harness.running_cluster("nodeagent-mh", pool_sizes={"h2": DEST_POOL_SIZE}) as c:
        yield c


def create_vm(api, image, start=True, network="none") -> str:
    name = f"mig-{uuid.uuid4().hex[:6]}"
    op = api.wait(api.post("/v1/instances", json={"name": name, "kind": "vm", "image": image, "cpus": 1,
                                                  "memory_mib": 128, "network": network, "start": start}).json(),
                  timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op["error"]
    return name


def volumes(host) -> list[str]:
    pool = host.path(host.pool_dir)  # as the host sees it: h2's is a tmpfs in its mount namespace
    return sorted(p.name for p in pool.rglob("i-*")) if pool.exists() else []


def fill_pool(host) -> Path:
    """Fill the host's pool filesystem (a tmpfs) to the last byte; the filler file to remove."""
    pool = host.path(host.pool_dir)
    st = os.statvfs(pool)
    filler = pool / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize)
    assert os.statvfs(pool).f_bavail == 0
    return filler


def fails_out_of_space(api, op, host, *words) -> None:
    """Fill ``host``'s pool while migration ``op`` runs: it fails saying so, in these words."""
    filler = fill_pool(host)
    try:
        op = api.wait(op, timeout=OP_TIMEOUT_S)
    finally:
        filler.unlink()
    assert op["status"] == "failed" and op["error"]["code"] == "insufficient_resources", op
    for w in (f"destination '{host.name}' is out of space", *words):
        assert w in op["error"]["message"], op["error"]["message"]


def cancels(api, op) -> None:
    """Cancel migration ``op`` while it runs: it ends cancelled."""
    assert api.delete(f"/v1/operations/{op['id']}").status_code == 200
    op = api.wait(op, timeout=OP_TIMEOUT_S)
    assert op["status"] == "cancelled", op


def test_live_migration_moves_a_running_vm_and_back_with_the_cli(cluster, apis, image):
    h1, h2 = cluster.hosts
    group = f"mig-{uuid.uuid4().hex[:6]}"
    rules = [{"direction": "ingress", "protocol": "tcp", "port_min": 22}]
    assert apis["h1"].post("/v1/security-groups", json={"name": group, "rules": rules}).status_code == 201
    name = create_vm(apis["h1"], image, network="bridge")
    first = apis["h1"].get(f"/v1/instances/{name}").json()
    inst_id = first["id"]
    assert apis["h1"].put(f"/v1/instances/{name}/security-groups", json={"security_groups": [group]}).ok
    assert ipaddress.ip_address(first["ip"]) in ipaddress.ip_network(cluster.container_subnet(0))
    op = migrate(apis["h1"], name, "h2")
    assert op["status"] == "succeeded", op["error"]
    mig = apis["h1"].get(f"/v1/migrations/{op['id']}").json()
    assert mig["status"] == "succeeded" and mig["destination"] == "h2" and mig["instance"] == inst_id
    assert mig["bytes"]["processed"] > 0 and mig["total_ms"] > 0
    # its pause taken apart from QEMU's events: the RAM part and the fixed part make it up, and
    # QEMU's limit stayed below the max (300 ms) by the reserve (150 ms before any was measured)
    sw = mig["switchover"]
    assert sw is not None and sw["pause_ms"] > 0 and sw["ram_ms"] >= 0
    assert abs(sw["ram_ms"] + sw["fixed_ms"] - sw["pause_ms"]) < 1
    assert sw["reserve_ms"] > 0 and sw["downtime_limit_ms"] <= max(10, 300 - sw["reserve_ms"])
    # the destination owns it now and the guest keeps running there
    moved = apis["h2"].get(f"/v1/instances/{name}").json()
    assert moved["id"] == inst_id and moved["state"] == "running"
    # h2's network has another subnet: the VM holds an address of h2's (its seed's, for its next boot)
    assert ipaddress.ip_address(moved["ip"]) in ipaddress.ip_network(cluster.container_subnet(1))
    assert_runs(apis["h2"], name)
    assert name in domains(h2)
    # its security group came along (made on h2 with the same rules), its tap's rules are there
    assert apis["h2"].get(f"/v1/instances/{name}/security-groups").json() == {"security_groups": [group]}
    assert apis["h2"].get(f"/v1/security-groups/{group}").json()["rules"] == rules
    tables = h2.run("nft", "list", "ruleset").stdout
    assert f'"nt{inst_id[:12]}" . {moved["ip"]}' in tables and f'{moved["ip"]} : jump in_' in tables
    # the source is clean: no record, no domain, no volume, no instance dir
    assert apis["h1"].get(f"/v1/instances/{name}").status_code == 404
    assert name not in domains(h1)
    assert not [v for v in volumes(h1) if inst_id[:12] in v]
    assert not (h1.state_dir / "instances" / inst_id).exists()
    # and back, with the CLI on h2
    env = {**os.environ, "NODEAGENT_URL": h2.agent_url, "NODEAGENT_TOKEN": h2.admin_token,
           "PYTHONPATH": str(harness.REPO)}
    r = subprocess.run([sys.executable, "-m", "agent", "migrate", name, "--to", "h1"], cwd=harness.REPO,
                       env=env, capture_output=True, text=True, timeout=OP_TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    assert "now runs on h1" in r.stdout
    assert "RAM and devices" in r.stdout  # the CLI shows the pause taken apart
    assert_runs(apis["h1"], name)
    assert apis["h1"].get(f"/v1/instances/{name}").json()["ip"] == first["ip"], "h1 released it, then leased it again"
    assert apis["h2"].get(f"/v1/instances/{name}").status_code == 404
    assert name not in domains(h2)
    assert apis["h1"].get(f"/v1/instances/{name}/security-groups").json() == {"security_groups": [group]}
    assert apis["h1"].delete(f"/v1/instances/{name}").json() == {"deleted": True}
    for api in apis.values():
        assert api.delete(f"/v1/security-groups/{group}").status_code == 200


MARKER = b"NODEAGENT-CLEARTEXT-MARKER."
MARKED = 2 * 1024 * 1024  # marker bytes on the guest's own disk, above the image's data


def test_live_migration_crosses_the_wire_encrypted(cluster, apis, image, tmp_path):
    """The hosts migrate over TLS ([migration] tls): libvirtd to libvirtd, QEMU's memory
    stream and the disk copy; a marker on the guest's disk never shows on h1's link."""
    h1, h2 = cluster.hosts
    assert all(apis[h].get("/v1/host").json()["migration_tls"] is True for h in apis)
    name = create_vm(apis["h1"], image, start=False)
    inst_id = apis["h1"].get(f"/v1/instances/{name}").json()["id"]
    disk = f"volumes/i-{inst_id[:12]}-disk.qcow2"
    marker = tmp_path / "marker"
    marker.write_bytes((MARKER * (MARKED // len(MARKER) + 1))[:MARKED])
    h1.run("qemu-io", "-f", "qcow2", "-c", f"write -q -s {marker} 28M {MARKED}", str(h1.pool_dir / disk))
    op = apis["h1"].wait(apis["h1"].post(f"/v1/instances/{name}/actions", json={"action": "start"}).json(),
                         timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    with Capture(h1.uplink) as cap:
        op = migrate(apis["h1"], name, "h2")
    assert op["status"] == "succeeded", op["error"]
    assert cap.bytes > MARKED, f"the capture saw only {cap.bytes} bytes"
    assert not cap.seen(MARKER), "the guest's disk crossed the wire in cleartext"
    assert_runs(apis["h2"], name)
    h2.run("qemu-img", "convert", "-U", "-O", "raw", str(h2.pool_dir / disk), str(tmp_path / "moved.raw"))
    with open(tmp_path / "moved.raw", "rb") as f:  # and it did arrive
        f.seek(28 * 1024 * 1024)
        assert f.read(MARKED) == marker.read_bytes()
    assert apis["h2"].delete(f"/v1/instances/{name}").json() == {"deleted": True}


def test_only_configured_peers_may_send_work(cluster, apis):
    # h2's admin token is not named after a peer: the destination endpoints refuse it
    body = {"instance": {"id": uuid.uuid4().hex, "name": "intruder", "kind": "vm", "pool": "default",
                         "volumes": ["i-x-disk"]}, "spec": {},
            "image": {"id": "0" * 64, "name": "x", "format": "qcow2", "kind": "vm"}}
    r = apis["h2"].post("/v1/peer/migrations", json=body)
    assert r.status_code == 403 and "configured peers" in r.json()["error"]["message"]
    assert apis["h2"].get("/v1/instances/intruder").status_code == 404
    r = apis["h1"].post("/v1/migrations", json={"instance": "nosuch", "destination": "h2"})
    assert r.status_code == 404
    r = apis["h1"].get(f"/v1/peer/images/{'0' * 64}")
    assert r.status_code == 403


def test_unknown_destination_and_container_live_are_clear(apis, image):
    name = create_vm(apis["h1"], image)
    try:
        r = apis["h1"].post("/v1/migrations", json={"instance": name, "destination": "h9"})
        assert r.status_code == 422 and "not a configured peer" in r.json()["error"]["message"]
    finally:
        apis["h1"].delete(f"/v1/instances/{name}")


def _restart_source_slow(cluster):
    h1 = cluster.hosts[0]
    h1.stop_agent()
    h1.start_agent(env={"NODEAGENT_SLOW_PHASE": f"migration:migrate={SLOW_MIGRATE_S},"
                                                f"migration:sync={SLOW_MIGRATE_S},"
                                                f"migration:confirm={SLOW_MIGRATE_S},"
                                                f"migration:copy={SLOW_MIGRATE_S}"})


def _restart_source_normal(cluster):
    h1 = cluster.hosts[0]
    h1.stop_agent()
    h1.start_agent()


def _start_migration(api, name, mode="live", phase="migrate") -> dict:
    """Start a migration and return its operation once it reached ``phase`` (a slow one)."""
    r = api.post("/v1/migrations", json={"instance": name, "destination": "h2", "mode": mode})
    assert r.status_code == 202, r.text
    op = r.json()
    deadline = time.monotonic() + 60
    while api.get(f"/v1/operations/{op['id']}").json()["progress"].get("phase") != phase:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return op


def test_destination_agent_killed_then_retry(cluster, apis, image):
    h1, h2 = cluster.hosts
    name = create_vm(apis["h1"], image)
    _restart_source_slow(cluster)
    try:
        op = _start_migration(apis["h1"], name)
        h2.kill_agent()
        op = apis["h1"].wait(op, timeout=OP_TIMEOUT_S)
        assert op["status"] == "failed" and "keeps running here" in op["error"]["message"], op
        assert_runs(apis["h1"], name)
        h2.start_agent()  # its restart removes what it had prepared
        assert apis["h2"].get(f"/v1/instances/{name}").status_code == 404
        assert name not in domains(h2)
        assert not [v for v in volumes(h2) if name in v or "i-" in v and "disk" in v]
    finally:
        _restart_source_normal(cluster)
    op = migrate(apis["h1"], name, "h2")
    assert op["status"] == "succeeded", op["error"]
    assert_runs(apis["h2"], name)
    assert apis["h2"].delete(f"/v1/instances/{name}").json() == {"deleted": True}


def test_link_cut_then_retry(cluster, apis, image):
    h1, h2 = cluster.hosts
    name = create_vm(apis["h1"], image)
    _restart_source_slow(cluster)
    try:
        op = _start_migration(apis["h1"], name)
        harness.sh("ip", "-n", h2.netns, "link", "set", "eth0", "down")
        try:
            op = apis["h1"].wait(op, timeout=OP_TIMEOUT_S)
        finally:
            harness.sh("ip", "-n", h2.netns, "link", "set", "eth0", "up")
        assert op["status"] == "failed" and "keeps running here" in op["error"]["message"], op
        assert_runs(apis["h1"], name)
        assert name not in domains(h2)
    finally:
        _restart_source_normal(cluster)
    op = migrate(apis["h1"], name, "h2")  # the retry clears what the cut attempt left there
    assert op["status"] == "succeeded", op["error"]
    assert_runs(apis["h2"], name)
    assert [i["name"] for i in apis["h2"].get("/v1/instances").json()["instances"]].count(name) == 1
    assert apis["h2"].delete(f"/v1/instances/{name}").json() == {"deleted": True}
    assert not [v for v in volumes(h2) if "disk" in v]


@pytest.fixture(scope="module")
def busybox(apis, cluster):
    from testbed.ocibuild import busybox_layers, layer, write_layout
    owned = layer([("srv/", "dir", None, 0o755), ("srv/u", "file", b"u\n", 0o666, 101, 102)])  # a USER's file
    layout = write_layout(str(cluster.hosts[0].root / "busybox-layout"), {"latest": busybox_layers() + [owned]})
    op = apis["h1"].wait(apis["h1"].post("/v1/images", json={
        "name": "busybox", "format": "oci", "source": {"type": "file", "path": layout}}).json(),
        timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    return "busybox"


def create_container(api, image, **extra) -> str:
    name = f"ctr-{uuid.uuid4().hex[:6]}"
    op = api.wait(api.post("/v1/instances", json={
        "name": name, "kind": "container", "image": image, "cpus": 0.5, "memory_mib": 64,
        "network": "none", **extra,
        "command": ["/bin/sh", "-c", "echo started >> /log; trap 'exit 0' TERM; sleep 3600 & wait"]}).json(),
        timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    return name


def sh_in(api, name, script) -> str:
    r = api.post(f"/v1/instances/{name}/exec", json={"command": ["/bin/sh", "-c", script]}).json()
    assert r["exit_code"] == 0, r
    return r["stdout"]


@pytest.mark.parametrize("mode", ["cold", "refresh"])
def test_container_migration_keeps_its_files(cluster, apis, busybox, mode):
    h1, h2 = cluster.hosts
    name = create_container(apis["h1"], busybox, tty=(mode == "cold"))  # a TTY container keeps its terminal
    sh_in(apis["h1"], name, "echo data > /made; rm /etc/keep; mkdir -p /d; echo x > /d/f; echo more >> /srv/u")
    r = apis["h1"].post("/v1/migrations", json={"instance": name, "destination": "h2", "mode": "live"})
    assert r.status_code == 422 and "mode=refresh" in r.json()["error"]["message"]  # criu check fails here
    op = migrate(apis["h1"], name, "h2", mode=mode)
    assert op["status"] == "succeeded", op["error"]
    assert op["result"]["downtime_ms"] is not None
    inst = apis["h2"].get(f"/v1/instances/{name}").json()
    assert inst["state"] == "running"
    assert sh_in(apis["h2"], name, "cat /made /d/f").split() == ["data", "x"]
    # owners as the container saw them (a USER's file copied up, root's), though the hosts'
    # user namespace ranges differ (testbed.harness gives each its own)
    assert sh_in(apis["h2"], name, "cat /srv/u").split() == ["u", "more"]
    assert sh_in(apis["h2"], name, "ls -n /srv/u").split()[2:4] == ["101", "102"]
    assert sh_in(apis["h2"], name, "ls -n /made").split()[2:4] == ["0", "0"]
    etc = sh_in(apis["h2"], name, "ls /etc").split()
    assert "new" in etc and "keep" not in etc  # the deletion (an overlay whiteout) moved too
    assert sh_in(apis["h2"], name, "cat /log").split() == ["started", "started"]  # started again there
    assert inst["tty"] is (mode == "cold")
    if mode == "cold":
        assert_console_echoes(apis["h2"], name)
    assert apis["h1"].get(f"/v1/instances/{name}").status_code == 404
    assert not [v for v in volumes(h1) if inst["id"][:12] in v]
    assert apis["h2"].delete(f"/v1/instances/{name}").json() == {"deleted": True}


def assert_console_echoes(api, name) -> None:
    """A TTY container's console on ``api``'s host takes typing (its terminal echoes it)."""
    from websockets.sync.client import connect as ws_connect
    url = api.url.replace("http://", "ws://").replace("https://", "wss://") + f"/v1/instances/{name}/console"
    with ws_connect(url, additional_headers={"Authorization": api.s.headers["Authorization"]},
                    open_timeout=10) as c:
        c.send(b"typed-after-migration\r")
        got, deadline = b"", time.monotonic() + 20
        while b"typed-after-migration" not in got:
            msg = c.recv(max(0.01, deadline - time.monotonic()))
            got += msg if isinstance(msg, bytes) else b""


def test_a_containers_volume_moves_with_it(cluster, apis, busybox):
    """runc on both hosts: a volume mounted in a running container moves with a refresh
    migration (unmounted at the stop, its file tree sent into a fresh filesystem there): the
    container finds its files there, owned as it saw them; the source's volume is gone."""
    h1, h2 = cluster.hosts
    vol = apis["h1"].post("/v1/volumes", json={"name": f"mv-{uuid.uuid4().hex[:6]}", "size_mib": 32}).json()
    name = f"ctr-{uuid.uuid4().hex[:6]}"
    op = apis["h1"].wait(apis["h1"].post("/v1/instances", json={
        "name": name, "kind": "container", "image": busybox, "cpus": 0.5, "memory_mib": 64, "network": "none",
        "volumes": [{"volume": vol["name"], "path": "/vol"}],
        "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]}).json(), timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    sh_in(apis["h1"], name, "echo kept > /vol/f; mkdir /vol/d; echo deep > /vol/d/g")
    op = migrate(apis["h1"], name, "h2", mode="refresh")
    assert op["status"] == "succeeded", op["error"]
    assert sh_in(apis["h2"], name, "cat /vol/f /vol/d/g").split() == ["kept", "deep"]
    assert sh_in(apis["h2"], name, "ls -n /vol/f").split()[2:4] == ["0", "0"]
    sh_in(apis["h2"], name, "echo there >> /vol/f")  # writable there
    moved = apis["h2"].get(f"/v1/volumes/{vol['id']}").json()
    assert (moved["name"], moved["attachment"]["instance_name"]) == (vol["name"], name)
    assert apis["h1"].get(f"/v1/volumes/{vol['id']}").status_code == 404
    assert apis["h2"].delete(f"/v1/instances/{name}").json() == {"deleted": True}
    assert apis["h2"].delete(f"/v1/volumes/{vol['id']}").json() == {"deleted": True}


VOLUME_MARK_SECTOR = 20480  # 10 MiB into the volume: where the guest writes its marker
VOLUME_MARK_SCRIPT = f"""#!/bin/sh
echo nodeagent-vm-volume-mark | dd of=/dev/vdb bs=512 seek={VOLUME_MARK_SECTOR} conv=notrunc,fsync 2>/dev/null
"""


def test_a_vms_volume_moves_with_it_live(cluster, apis, guest_images):
    """A VM booted from the test guest with a local volume at vdb, its user-data writes a
    marker to /dev/vdb; live migration copies the volume with the root disk: on h2 the
    volume is attached to the VM (same id, name, target), its file (h2's own) holds the
    marker, the domain there uses that file; h1 keeps no volume."""
    h1, h2 = cluster.hosts
    api = apis["h1"]
    op = api.wait(api.post("/v1/images", json={"name": "guest-boot", "source": {
        "type": "file", "path": guest_images["boot"]}}).json(), timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    vol = api.post("/v1/volumes", json={"name": f"vmv-{uuid.uuid4().hex[:6]}", "size_mib": 32}).json()
    name = f"vmv-{uuid.uuid4().hex[:6]}"
    op = api.wait(api.post("/v1/instances", json={
        "name": name, "kind": "vm", "image": "guest-boot", "cpus": 1, "memory_mib": 192, "network": "none",
        "user_data": VOLUME_MARK_SCRIPT, "volumes": [{"volume": vol["name"]}]}).json(), timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op["error"]
    deadline = time.monotonic() + 180
    while "NODEAGENT-USERDATA-EXIT" not in (log := api.get(f"/v1/instances/{name}/logs").json()["logs"]):
        assert time.monotonic() < deadline, f"the guest's user-data did not finish:\n{log[-2000:]}"
        time.sleep(0.5)
    assert "NODEAGENT-USERDATA-EXIT 0" in log, log[-2000:]
    file = f"volumes/v-{vol['id'][:12]}.raw"
    op = migrate(api, name, "h2")
    assert op["status"] == "succeeded", op["error"]
    there = apis["h2"].get(f"/v1/volumes/{vol['id']}").json()
    assert (there["name"], there["size_bytes"], there["attachment"]["instance_name"],
            there["attachment"]["target"]) == (vol["name"], vol["size_bytes"], name, "vdb"), there
    assert [v["name"] for v in apis["h2"].get(f"/v1/instances/{name}/volumes").json()["volumes"]] == [vol["name"]]
    with open(h2.path(h2.pool_dir / file), "rb") as f:
        f.seek(VOLUME_MARK_SECTOR * 512)
        assert f.read(24) == b"nodeagent-vm-volume-mark", "the guest's write arrived"
    xml = h2.run("virsh", "-c", "qemu:///system", "dumpxml", name).stdout
    assert f"{h2.pool_dir / file}" in xml, "the domain there uses h2's copy"
    assert_runs(apis["h2"], name)
    assert api.get(f"/v1/volumes/{vol['id']}").status_code == 404
    assert not h1.path(h1.pool_dir / file).exists()
    assert apis["h2"].delete(f"/v1/instances/{name}").json() == {"deleted": True}
    assert apis["h2"].delete(f"/v1/volumes/{vol['id']}").json() == {"deleted": True}


def as_peer(source, dest) -> Api:
    """``dest``'s API with the token ``source`` uses as its peer (from its config)."""
    import tomllib
    token = tomllib.loads(source.agent_config.read_text())["peers"][dest.name]["token"]
    return Api(dest.agent_url, token)


def assert_clean(api, host, name):
    """Nothing of instance ``name`` on ``host``: no record, domain, container or volume."""
    assert api.get(f"/v1/instances/{name}").status_code == 404
    assert name not in domains(host)
    assert not [v for v in volumes(host) if v.endswith(("-disk.qcow2", "-rootfs"))], volumes(host)
    rows = api.get("/v1/instances").json()["instances"]
    assert not [i for i in rows if i["state"] == "incoming"]
    dirs = host.state_dir / "instances"  # no instance dir (seed, console log) without its record
    assert not {d.name for d in dirs.iterdir()} - {i["id"] for i in rows} if dirs.exists() else True


def test_destination_out_of_disk_then_retry(cluster, apis, image, busybox):
    h1, h2 = cluster.hosts
    name = create_vm(apis["h1"], image)
    ctr = create_container(apis["h1"], busybox)
    filler = fill_pool(h2)
    try:
        op = migrate(apis["h1"], ctr, "h2", mode="refresh")
        assert op["status"] == "failed" and op["error"]["code"] == "insufficient_resources", op
        for words in ("destination 'h2' is out of space", "pool 'default'", "MiB free", "another host"):
            assert words in op["error"]["message"], op["error"]["message"]
        assert apis["h1"].get(f"/v1/instances/{ctr}").json()["state"] == "running"
        assert_clean(apis["h2"], h2, ctr)
        op = migrate(apis["h1"], name, "h2")
        assert op["status"] == "failed", op
        err = op["error"]
        assert err["code"] == "insufficient_resources", err
        for words in ("destination 'h2' is out of space", "pool 'default'", "free space", "another host",
                      f"'{name}' stays here"):
            assert words in err["message"], err["message"]
        assert_runs(apis["h1"], name)
        assert_clean(apis["h2"], h2, name)
    finally:
        filler.unlink()
    op = migrate(apis["h1"], name, "h2")  # space freed: the retries go through
    assert op["status"] == "succeeded", op["error"]
    assert_runs(apis["h2"], name)
    assert apis["h2"].delete(f"/v1/instances/{name}").json() == {"deleted": True}
    op = migrate(apis["h1"], ctr, "h2", mode="refresh")
    assert op["status"] == "succeeded", op["error"]
    assert apis["h2"].get(f"/v1/instances/{ctr}").json()["state"] == "running"
    assert apis["h2"].delete(f"/v1/instances/{ctr}").json() == {"deleted": True}


def test_faults_in_the_copy_then_retry(cluster, apis, busybox, image):
    """In slow windows the source takes (container: stopped for its final sync; VM: just
    before the live copy; stopped VM: before its disk is sent): the destination's pool fills
    up, or the operation is cancelled. Each time the instance is here as it was and the
    destination is clean; then they all move."""
    h1, h2 = cluster.hosts
    name = create_container(apis["h1"], busybox)
    sh_in(apis["h1"], name, "dd if=/dev/zero of=/big bs=1M count=8 2>/dev/null")  # 8 MiB to copy
    vm, off = create_vm(apis["h1"], image, start=False), create_vm(apis["h1"], image, start=False)
    for n in (vm, off):  # 8 MiB of their own on their disks (above the image's), as a guest leaves it
        i = apis["h1"].get(f"/v1/instances/{n}").json()["id"]
        h1.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 24M 8M",
               str(h1.pool_dir / f"volumes/i-{i[:12]}-disk.qcow2"))
    op = apis["h1"].wait(apis["h1"].post(f"/v1/instances/{vm}/actions", json={"action": "start"}).json(),
                         timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    _restart_source_slow(cluster)
    try:
        op = _start_migration(apis["h1"], name, mode="cold", phase="sync")
        fails_out_of_space(apis["h1"], op, h2, "pool 'default'", "is full", "no space left",
                           f"container '{name}' keeps running here", "another host")
        assert apis["h1"].get(f"/v1/instances/{name}").json()["state"] == "running"
        assert sh_in(apis["h1"], name, "wc -c < /big").strip() == str(8 * 1024 * 1024)
        assert_clean(apis["h2"], h2, name)

        op = _start_migration(apis["h1"], name, mode="refresh", phase="sync")
        cancels(apis["h1"], op)
        assert apis["h1"].get(f"/v1/instances/{name}").json()["state"] == "running"
        assert sh_in(apis["h1"], name, "cat /log").split() == ["started"] * 3  # started again here, twice
        assert_clean(apis["h2"], h2, name)

        op = _start_migration(apis["h1"], vm)
        cancels(apis["h1"], op)
        assert_runs(apis["h1"], vm)
        assert_clean(apis["h2"], h2, vm)

        op = _start_migration(apis["h1"], vm)  # prepared; the pool fills up before the disk copy
        fails_out_of_space(apis["h1"], op, h2, "during the disk copy", f"'{vm}' keeps running here",
                           "another host")
        assert_runs(apis["h1"], vm)
        assert_clean(apis["h2"], h2, vm)

        op = _start_migration(apis["h1"], off, phase="copy")  # a stopped VM: its disk file is sent
        fails_out_of_space(apis["h1"], op, h2, "is full", f"VM '{off}' stays here, stopped")
        assert apis["h1"].get(f"/v1/instances/{off}").json()["state"] == "stopped"
        assert off in domains(h1)
        assert_clean(apis["h2"], h2, off)

        op = _start_migration(apis["h1"], off, phase="copy")
        cancels(apis["h1"], op)
        assert apis["h1"].get(f"/v1/instances/{off}").json()["state"] == "stopped"
        assert off in domains(h1)
        assert_clean(apis["h2"], h2, off)
    finally:
        _restart_source_normal(cluster)
    op = migrate(apis["h1"], name, "h2", mode="cold")
    assert op["status"] == "succeeded", op["error"]
    assert sh_in(apis["h2"], name, "wc -c < /big").strip() == str(8 * 1024 * 1024)
    ctr_id = apis["h2"].get(f"/v1/instances/{name}").json()["id"]
    again = as_peer(h1, h2).post(f"/v1/peer/migrations/{ctr_id}/finish", json={"start": True})
    assert again.status_code == 200 and again.json()["instance"]["state"] == "running", again.text
    assert sh_in(apis["h2"], name, "cat /log").split() == ["started"] * 4  # not started twice there
    assert apis["h2"].delete(f"/v1/instances/{name}").json() == {"deleted": True}
    assert_clean(apis["h2"], h2, name)
    op = migrate(apis["h1"], vm, "h2")
    assert op["status"] == "succeeded", op["error"]
    assert_runs(apis["h2"], vm)
    op = migrate(apis["h1"], off, "h2", mode="cold")
    assert op["status"] == "succeeded", op["error"]
    assert apis["h2"].get(f"/v1/instances/{off}").json()["state"] == "stopped"
    for n in (vm, off):
        assert apis["h2"].delete(f"/v1/instances/{n}").json() == {"deleted": True}


def test_stopped_vm_moves_offline_and_stays_stopped(cluster, apis, image):
    h1, h2 = cluster.hosts
    name = create_vm(apis["h1"], image)
    inst_id = apis["h1"].get(f"/v1/instances/{name}").json()["id"]
    op = apis["h1"].wait(apis["h1"].post(f"/v1/instances/{name}/actions",
                                         json={"action": "stop", "force": True}).json(), timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    disk = f"volumes/i-{inst_id[:12]}-disk.qcow2"
    # data of its own on its disk (above the image's), as a guest leaves it: it must arrive, with
    # a snapshot of it (inside the disk layer) taken before it was overwritten
    h1.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 30M 1M", str(h1.pool_dir / disk))
    assert apis["h1"].post(f"/v1/instances/{name}/snapshots", json={"name": "before"}).status_code == 201
    h1.run("qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 30M 1M", str(h1.pool_dir / disk))
    env = {**os.environ, "NODEAGENT_URL": h1.agent_url, "NODEAGENT_TOKEN": h1.admin_token,
           "PYTHONPATH": str(harness.REPO)}
    r = subprocess.run([sys.executable, "-m", "agent", "migrate", name, "--to", "h2"], cwd=harness.REPO,
                       env=env, capture_output=True, text=True, timeout=OP_TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    assert f"{name} now lives on h2, stopped" in r.stdout
    moved = apis["h2"].get(f"/v1/instances/{name}").json()
    assert moved["id"] == inst_id and moved["state"] == "stopped"
    assert name in domains(h2)
    h2.run("qemu-io", "-f", "qcow2", "-c", "read -P 0xa5 30M 1M", str(h2.pool_dir / disk))
    assert h2.run("qemu-img", "check", str(h2.pool_dir / disk), check=False).returncode == 0
    assert [s["name"] for s in apis["h2"].get(f"/v1/instances/{name}/snapshots").json()["snapshots"]] == ["before"]
    assert apis["h2"].post(f"/v1/instances/{name}/snapshots/before/restore").status_code == 200
    h2.run("qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 30M 1M", str(h2.pool_dir / disk))
    assert apis["h1"].get(f"/v1/instances/{name}").status_code == 404
    assert name not in domains(h1)
    assert not [v for v in volumes(h1) if inst_id[:12] in v]
    # finish is idempotent: a source whose answer got lost asks again and gets the record
    again = as_peer(h1, h2).post(f"/v1/peer/migrations/{inst_id}/finish", json={"define": True})
    assert again.status_code == 200 and again.json()["instance"]["state"] == "stopped", again.text
    assert domains(h2).count(name) == 1
    op = apis["h2"].wait(apis["h2"].post(f"/v1/instances/{name}/actions", json={"action": "start"}).json(),
                         timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    assert_runs(apis["h2"], name)
    assert apis["h2"].delete(f"/v1/instances/{name}").json() == {"deleted": True}


def test_destination_down_when_asked_to_confirm_the_vm_is_not_lost(cluster, apis, image):
    """The guest runs on the destination, whose agent is down when the source confirms
    (a slow phase there): (a) it is back within the source's retries: the migration
    succeeds; (b) it stays down: the operation fails saying where the VM runs, the
    destination adopts the VM when its agent starts, and the source's record can go."""
    h1, h2 = cluster.hosts
    a, b = create_vm(apis["h1"], image), create_vm(apis["h1"], image)
    _restart_source_slow(cluster)
    try:
        op = _start_migration(apis["h1"], a, phase="confirm")
        h2.kill_agent()
        h2.start_agent()  # adopts the guest it had prepared for; the source's retry is answered
        op = apis["h1"].wait(op, timeout=OP_TIMEOUT_S)
        assert op["status"] == "succeeded", op["error"]
        assert_runs(apis["h2"], a)
        assert apis["h1"].get(f"/v1/instances/{a}").status_code == 404

        b_id = apis["h1"].get(f"/v1/instances/{b}").json()["id"]
        op = _start_migration(apis["h1"], b, phase="confirm")
        h2.kill_agent()
        try:
            op = apis["h1"].wait(op, timeout=OP_TIMEOUT_S)
        finally:
            h2.start_agent()
        assert op["status"] == "failed", op
        for words in (f"VM '{b}' now runs on h2", "did not confirm", "adopts the VM", "delete the record here"):
            assert words in op["error"]["message"], op["error"]["message"]
        rec = apis["h1"].get(f"/v1/instances/{b}").json()
        assert rec["state"] == "error" and "runs there" in rec["error"]
        assert_runs(apis["h2"], b)  # adopted at start
        assert b not in domains(h1)
        assert apis["h1"].delete(f"/v1/instances/{b}").json() == {"deleted": True}
        assert not [v for v in volumes(h1) if b_id[:12] in v]
        assert_runs(apis["h2"], b)
    finally:
        _restart_source_normal(cluster)
    for name in (a, b):
        assert apis["h2"].delete(f"/v1/instances/{name}").json() == {"deleted": True}


def test_host_evacuation_moves_a_running_and_a_stopped_vm_then_restore(cluster, apis, image):
    """The real path of host maintenance: h1 drains to h2 (a running VM live, a stopped one
    offline), refuses creates meanwhile (409), and accepts them again after restore."""
    h1, h2 = cluster.hosts
    running, stopped = create_vm(apis["h1"], image), create_vm(apis["h1"], image, start=False)
    others = [i["name"] for i in apis["h1"].get("/v1/instances").json()["instances"] if i["name"] not in
              (running, stopped)]
    try:
        op = apis["h1"].post("/v1/host/evacuate", json={"instances": [running, stopped], "parallel": 2}).json()
        refused = apis["h1"].post("/v1/instances", json={"name": "drained", "kind": "vm", "image": image,
                                                         "memory_mib": 128, "network": "none"})
        assert refused.status_code == 409 and "draining" in refused.json()["error"]["message"]
        op = apis["h1"].wait(op, timeout=OP_TIMEOUT_S)
        assert op["status"] == "succeeded", op
        items = {i["name"]: i for i in op["result"]["instances"]}
        assert {n: (i["status"], i["mode"], i["destination"]) for n, i in items.items()} == {
            running: ("done", "live", "h2"), stopped: ("done", "cold", "h2")}, items
        assert_runs(apis["h2"], running)
        assert apis["h2"].get(f"/v1/instances/{stopped}").json()["state"] == "stopped"
        assert running not in domains(h1) and stopped not in domains(h1)
        assert not others or apis["h1"].get(f"/v1/instances/{others[0]}").status_code == 200  # not named: stays
    finally:
        assert apis["h1"].post("/v1/host/restore").json() == {"draining": False}
    for name in (running, stopped):
        assert apis["h2"].delete(f"/v1/instances/{name}").json() == {"deleted": True}


POSTCOPY_LINK_KBIT = 8000  # h1's uplink is shaped to this: the guest's data takes ~20 s to cross
POSTCOPY_FILL_MIB = 24  # non-zero memory the guest holds (a file in its initramfs root): post-copy sends it
# the marker: the guest prints the checksum of that memory now and every 2 s (the same on whichever
# host it runs, if its memory is whole)
POSTCOPY_FILL = f"""#!/bin/sh
dd if=/dev/urandom of=/fill bs=1M count={POSTCOPY_FILL_MIB} 2>/dev/null
echo "NODEAGENT-FILL $(md5sum </fill)"
(while true; do sleep 2; echo "NODEAGENT-FILL $(md5sum </fill)"; done) &
"""
POSTCOPY_RESUME_WINDOW_S = 5  # h1's [migration] postcopy_resume_window_s here: the link stays down past it


def _vm_state(host, name) -> str:
    """``virsh domstate --reason`` on ``host`` ("" if the domain is not there)."""
    r = host.run("virsh", "-c", "qemu:///system", "domstate", "--reason", name, check=False, timeout=30)
    return r.stdout.strip() if r.returncode == 0 else ""


def _fill_sums(api, name) -> list[str]:
    """The checksums of the guest's filled memory its console printed so far (on that host)."""
    logs = api.get(f"/v1/instances/{name}/logs").json().get("logs", "")
    return [line.split()[1] for line in logs.splitlines() if line.startswith("NODEAGENT-FILL ")
            and len(line.split()) >= 2]


def _set_resume_window(host, seconds: float) -> None:
    """Restart ``host``'s agent with [migration] postcopy_resume_window_s = ``seconds``."""
    text = host.agent_config.read_text()
    if "postcopy_resume_window_s" not in text:
        host.agent_config.write_text(text.replace("[migration]\n",
                                                  f"[migration]\npostcopy_resume_window_s = {seconds}\n"))
    host.stop_agent()
    host.start_agent()


def test_link_cut_during_postcopy_split_then_resumed_with_the_guests_memory_whole(cluster, apis, guest_images):
    """Post-copy failure and recovery (README "Post-copy failures"): a booted guest holding 24 MiB
    of data (its checksum printed every 2 s) moves over a shaped link; the link is cut once the
    guest runs on the destination in post-copy, most of its memory still here, and stays down
    past the source's resume window. The operation fails with postcopy_failed naming the
    resume; neither host calls the guest running, nothing is destroyed, and killed agents
    re-adopt their halves as error (never running, never destroyed). With the link back,
    POST /v1/migrations/{id}/resume finishes the copy from where it stopped: the migration ends
    as one does (the source's record gone, the destination's running) and the guest prints the
    same checksum there. Then a resume of it again is 409, of an unknown id 404."""
    h1, h2 = cluster.hosts
    _set_resume_window(h1, POSTCOPY_RESUME_WINDOW_S)
    if apis["h1"].get("/v1/images/guest-boot").status_code == 404:
        op = apis["h1"].wait(apis["h1"].post("/v1/images", json={
            "name": "guest-boot", "source": {"type": "file", "path": guest_images["boot"]}}).json(),
            timeout=OP_TIMEOUT_S)
        assert op["status"] == "succeeded", op
    name = f"mig-{uuid.uuid4().hex[:6]}"
    op = apis["h1"].wait(apis["h1"].post("/v1/instances", json={
        "name": name, "kind": "vm", "image": "guest-boot", "cpus": 1, "memory_mib": 128, "network": "none",
        "user_data": POSTCOPY_FILL}).json(), timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op["error"]
    inst_id = apis["h1"].get(f"/v1/instances/{name}").json()["id"]
    deadline = time.monotonic() + 120
    while "NODEAGENT-USERDATA-EXIT 0" not in apis["h1"].get(f"/v1/instances/{name}/logs").json().get("logs", ""):
        assert time.monotonic() < deadline, apis["h1"].get(f"/v1/instances/{name}/logs").json()
        time.sleep(0.5)
    before = _fill_sums(apis["h1"], name)[0]
    harness.sh("ip", "netns", "exec", h1.netns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
               "rate", f"{POSTCOPY_LINK_KBIT}kbit", "burst", "64kb", "latency", "100ms")
    try:
        r = apis["h1"].post("/v1/migrations", json={"instance": name, "destination": "h2", "postcopy": True,
                                                    "completion_timeout_s": 1, "timeout_action": "postcopy"})
        assert r.status_code == 202, r.text
        op = r.json()
        deadline = time.monotonic() + 120
        while apis["h1"].get(f"/v1/operations/{op['id']}").json()["progress"].get("phase") != "postcopy":
            assert time.monotonic() < deadline, apis["h1"].get(f"/v1/operations/{op['id']}").json()
            time.sleep(0.1)
        while not _vm_state(h2, name).startswith("running"):  # the switch reached it: the guest runs there
            assert time.monotonic() < deadline, _vm_state(h2, name)
            time.sleep(0.1)
        harness.sh("ip", "-n", h2.netns, "link", "set", "eth0", "down")
        try:
            assert apis["h1"].delete(f"/v1/operations/{op['id']}").status_code == 409  # past the point of no return
            op = apis["h1"].wait(op, timeout=OP_TIMEOUT_S)
            assert _vm_state(h2, name) == "running (post-copy)", "the destination has the whole guest already"
        finally:
            harness.sh("ip", "-n", h2.netns, "link", "set", "eth0", "up")
    finally:
        harness.sh("ip", "netns", "exec", h1.netns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
    assert op["status"] == "failed" and op["error"]["code"] == "postcopy_failed", op
    for words in ("during post-copy", "split between this host and the destination",
                  f"did not answer within {POSTCOPY_RESUME_WINDOW_S}s", f"/v1/migrations/{op['id']}/resume"):
        assert words in op["error"]["message"], op["error"]["message"]
    src = apis["h1"].get(f"/v1/instances/{name}").json()
    assert src["state"] == "error" and "split" in src["error"], src
    assert _vm_state(h1, name) == "paused (post-copy failed)", _vm_state(h1, name)
    assert apis["h2"].get(f"/v1/instances/{name}").json()["state"] == "incoming"  # not running: it stalls there
    # killed agents re-adopt their halves: error (incoming there until its QEMU saw the break), never destroyed
    for host in (h1, h2):
        host.kill_agent()
        host.start_agent()
    assert apis["h1"].get(f"/v1/instances/{name}").json()["state"] == "error"
    assert apis["h2"].get(f"/v1/instances/{name}").json()["state"] in ("incoming", "error")
    assert _vm_state(h1, name) == "paused (post-copy failed)" and _vm_state(h2, name).endswith("post-copy failed)") \
        or _vm_state(h2, name) == "running (post-copy)", (_vm_state(h1, name), _vm_state(h2, name))

    # the link is back: the resume finishes the copy from where it stopped -- or, where the
    # destination's QEMU cannot take it (this machine, TCG: README "Post-copy failures"), fails
    # saying why and leaves the guest split as it was, never half-resumed or destroyed
    r = apis["h1"].post(f"/v1/migrations/{op['id']}/resume")
    assert r.status_code == 202, r.text
    done = apis["h1"].wait(r.json(), timeout=OP_TIMEOUT_S)
    if done["status"] == "succeeded":
        assert done["result"]["postcopy"] is True and done["result"]["destination"] == "h2", done
        assert apis["h1"].get(f"/v1/instances/{name}").status_code == 404
        assert name not in domains(h1)
        dst = apis["h2"].get(f"/v1/instances/{name}").json()
        assert dst["id"] == inst_id and dst["state"] == "running" and dst["error"] is None, dst
        assert_runs(apis["h2"], name)
        seen = len(_fill_sums(apis["h2"], name))
        deadline = time.monotonic() + 60
        while len(_fill_sums(apis["h2"], name)) < seen + 2:  # the marker runs on there, over all of its memory
            assert time.monotonic() < deadline, apis["h2"].get(f"/v1/instances/{name}/logs").json()
            time.sleep(0.5)
        assert set(_fill_sums(apis["h2"], name)[seen:]) == {before}  # its memory came over whole
        assert apis["h1"].post(f"/v1/migrations/{op['id']}/resume").status_code == 409  # nothing split any more
    else:
        assert done["error"]["code"] == "postcopy_failed", done
        for words in ("split", f"/v1/migrations/{done['id']}/resume"):
            assert words in done["error"]["message"], done["error"]["message"]
        assert apis["h1"].get(f"/v1/instances/{name}").json()["state"] == "error"
        assert _vm_state(h1, name) == "paused (post-copy failed)", _vm_state(h1, name)
        assert _vm_state(h2, name).startswith("running (post-copy"), _vm_state(h2, name)
        assert apis["h1"].delete(f"/v1/instances/{name}").json() == {"deleted": True}  # the guest given up
    assert apis["h1"].post(f"/v1/migrations/{uuid.uuid4().hex}/resume").status_code == 404
    assert apis["h2"].delete(f"/v1/instances/{name}").json() == {"deleted": True}
    for host in (h1, h2):
        assert_clean(apis[host.name], host, name)


def test_destination_agent_killed_during_an_evacuation_nothing_is_lost(cluster, apis, image):
    """h2's agent is killed while h1 evacuates to it (a migration in the source's slow window
    before its copy): the evacuation still ends, listing each instance as stayed with the
    reason; the VMs are here as they were (running, stopped); h2, its agent back, holds
    nothing of them; restore accepts work again."""
    h1, h2 = cluster.hosts
    running, stopped = create_vm(apis["h1"], image), create_vm(apis["h1"], image, start=False)
    _restart_source_slow(cluster)
    try:
        op = apis["h1"].post("/v1/host/evacuate", json={"instances": [running, stopped], "peers": ["h2"],
                                                        "parallel": 1}).json()
        deadline = time.monotonic() + 60
        while True:  # one of them is migrating, in its slow window: the destination goes now
            items = apis["h1"].get(f"/v1/operations/{op['id']}").json()["progress"].get("instances") or []
            migs = [i["migration"] for i in items if i["status"] == "migrating" and i["migration"]]
            if migs and apis["h1"].get(f"/v1/operations/{migs[0]}").json()["progress"].get("phase") in \
                    ("migrate", "copy"):
                break
            assert time.monotonic() < deadline, items
            time.sleep(0.1)
        h2.kill_agent()
        try:
            op = apis["h1"].wait(op, timeout=OP_TIMEOUT_S)
        finally:
            h2.start_agent()  # its restart removes what it had prepared
        assert op["status"] == "succeeded", op
        items = {i["name"]: i for i in op["result"]["instances"]}
        assert (op["result"]["moved"], op["result"]["stayed"]) == (0, 2), op["result"]
        for name in (running, stopped):
            assert items[name]["status"] == "failed" and items[name]["error"], items[name]
        assert "keeps running here" in items[running]["error"], items[running]
        assert_runs(apis["h1"], running)
        assert apis["h1"].get(f"/v1/instances/{stopped}").json()["state"] == "stopped"
        assert running in domains(h1) and stopped in domains(h1)
        for name in (running, stopped):
            assert_clean(apis["h2"], h2, name)
    finally:
        assert apis["h1"].post("/v1/host/restore").json() == {"draining": False}
        _restart_source_normal(cluster)
    for name in (running, stopped):
        assert apis["h1"].delete(f"/v1/instances/{name}").json() == {"deleted": True}
