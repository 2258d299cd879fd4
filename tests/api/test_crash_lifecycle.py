"""A real agent whose component is down, or which is killed -9 in the middle of a delete:
no record is ever stuck; what was left is finished when the agent (re)starts."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time

import pytest

from testbed import libvirt_daemon
from testbed.agentproc import AgentProcess, Api
from testbed.runtimes import drop_test_network
from tests.api.test_crash import _import_busybox

pytestmark = pytest.mark.real


def _wait_for(pred, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_vm_create_with_libvirtd_down_is_error_then_cleaned_when_it_is_back(tmp_path):
    missing = libvirt_daemon.missing_binaries()
    assert not missing, f"missing {missing}: apt-get install -y {libvirt_daemon.PACKAGES}"
    down_uri = f"qemu+unix:///system?socket={tmp_path}/no-libvirtd-here.sock"  # libvirtd down before
    agent = AgentProcess(tmp_path / "a", pool_kind="local")
    agent.config.write_text(agent.config.read_text().replace(
        'driver = "fake"', f'driver = "libvirt"\nuri = "{down_uri}"\nvirt_type = "qemu"', 1))
    agent.admin_token = agent.token("admin", "admin")
    agent.start()
    api = Api(agent.url, agent.admin_token)
    daemons = None
    try:
        disk = tmp_path / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
        op = api.wait(api.post("/v1/images",
                               json={"name": "tiny", "source": {"type": "file", "path": str(disk)}}).json())
        assert op["status"] == "succeeded", op
        name = f"down-{secrets.token_hex(3)}"
        op = api.wait(api.post("/v1/instances", json={"name": name, "kind": "vm", "image": "tiny", "memory_mib": 64,
                                                      "network": "none"}).json())
        assert op["status"] == "failed" and op["error"]["code"] == "unavailable", op
        inst = api.get(f"/v1/instances/{name}").json()
        assert inst["state"] == "error", inst  # was: creating forever, DELETE 409 and cancel 409
        assert api.delete(f"/v1/operations/{op['id']}").status_code == 409  # final, nothing to cancel
        r = api.delete(f"/v1/instances/{name}")
        assert r.status_code == 503 and "libvirtd" in r.json()["error"]["message"], r.text
        assert list(agent.state_dir.rglob(f"*i-{inst['id'][:12]}-disk*"))
        # libvirtd is back (the agent restarts on the right URI): the removal is finished at start
        daemons = libvirt_daemon.ensure()
        assert agent.stop() == 0
        agent.config.write_text(agent.config.read_text().replace(down_uri, libvirt_daemon.URI))
        agent.start()
        assert api.get(f"/v1/instances/{name}").status_code == 404
        assert not list(agent.state_dir.rglob(f"*i-{inst['id'][:12]}-disk*"))
        assert not (agent.state_dir / "instances" / inst["id"]).exists()
    finally:
        agent.stop()
        if daemons is not None:
            daemons.stop()


RUNC_GATE = """#!/bin/sh
# runc, except that `runc delete` waits for $GATE (the test kills the agent meanwhile)
case " $* " in
  *" delete "*)
    echo $$ > "{d}/delete.pid"
    i=0
    while [ ! -e "{d}/gate" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done ;;
esac
exec {runc} "$@"
"""


def test_kill9_during_a_container_delete_is_finished_at_start(open_tmp):
    tmp_path = open_tmp  # containers run in user namespaces: their state dir must be traversable
    for tool in ("runc", "conmon"):
        assert shutil.which(tool), f"{tool} is not installed: run scripts/setup-host"
    from testbed.runtimes import test_network
    bridge, subnet = test_network()
    wrap = tmp_path / "bin"
    wrap.mkdir()
    (wrap / "runc").write_text(RUNC_GATE.format(d=tmp_path, runc=shutil.which("runc")))
    (wrap / "runc").chmod(0o755)
    agent = AgentProcess(tmp_path / "r", pool_kind="local", env={"PATH": f"{wrap}:{os.environ['PATH']}"},
                         runtime="runc", network=(bridge, subnet))
    agent.admin_token = agent.token("admin", "admin")
    agent.start()
    api = Api(agent.url, agent.admin_token)
    name = f"gone-{secrets.token_hex(3)}"
    try:
        _import_busybox(api, tmp_path)
        op = api.wait(api.post("/v1/instances", json={"name": name, "kind": "container", "image": "busybox",
                                                      "memory_mib": 64,
                                                      "command": ["/bin/sh", "-c", "sleep 600"]}).json(),
                      timeout=120)
        assert op["status"] == "succeeded", op["error"]
        rtag_netns = [n for n in os.listdir("/run/netns") if n.endswith(f"-{name}")]
        assert rtag_netns, "the container has its netns"
        deleting = subprocess.Popen(["curl", "-s", "-X", "DELETE", "-H", f"Authorization: Bearer {agent.admin_token}",
                                     f"{agent.url}/v1/instances/{name}"], stdout=subprocess.DEVNULL)
        pid_file = tmp_path / "delete.pid"
        pid = int(_wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), what="runc delete"))
        agent.kill9()  # mid-delete: the container is killed, runc delete has not run
        os.kill(pid, signal.SIGKILL)  # the gated runc the dead agent started (ours)
        deleting.wait(30)
        (tmp_path / "gate").touch()
        agent.start()
        r = api.get(f"/v1/instances/{name}")
        assert r.status_code == 404, r.text  # was: a 'stopped' record holding its netns
        assert not [n for n in os.listdir("/run/netns") if n.endswith(f"-{name}")]
        state = agent.state_dir / "containers"
        assert not (state / "containers" / name).exists() and not (state / "sock" / name).exists()
        assert not (state / "runc" / name).exists()
    finally:
        (tmp_path / "gate").touch()
        if agent.proc is None or agent.proc.poll() is not None:
            agent.start()
        Api(agent.url, agent.admin_token).delete(f"/v1/instances/{name}")
        assert agent.stop() == 0
        drop_test_network(bridge, agent.rtag)
