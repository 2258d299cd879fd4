"""Crash recovery: kill -9 a real `nodeagent serve` mid-operation, restart it, check the state.

A slow phase is injected with NODEAGENT_SLOW_PHASE (agent/operations.py) so the kill lands
inside the operation; half-done operations must be failed ("agent restarted"), their
leftovers removed, finished work kept, and running containers re-adopted.
"""
import secrets
import shutil
import time

import pytest

from testbed.agentproc import AgentProcess, Api
from testbed.runtimes import drop_test_network
from testbed.ocibuild import busybox_layers, write_layout

SLOW = "image.import:bytes=60,instance.create:create=60,instance.start:start=60"


def _wait_phase(api, op_id, phase, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        op = api.get(f"/v1/operations/{op_id}").json()
        if op["status"] == "running" and op["progress"]["phase"] == phase:
            return op
        time.sleep(0.05)
    raise AssertionError(f"operation never reached phase {phase}: {op}")


def _restart(agent):
    agent.kill9()
    agent.env.pop("NODEAGENT_SLOW_PHASE", None)
    agent.start()
    return Api(agent.url, agent.admin_token)


def _import_busybox(api, tmp_path, name="busybox"):
    layout = write_layout(str(tmp_path / f"layout-{name}"), {"latest": busybox_layers()})
    op = api.wait(api.post("/v1/images", json={"name": name, "format": "oci",
                                               "source": {"type": "file", "path": layout}}).json())
    assert op["status"] == "succeeded", op
    return op["result"]["image"]


def test_kill9_during_image_import_and_instance_create(tmp_path):
    agent = AgentProcess(tmp_path / "a", pool_kind="local")
    agent.admin_token = agent.token("admin", "admin")
    agent.start()
    api = Api(agent.url, agent.admin_token)
    try:
        # finished work before the crash: an image (then a graceful restart with a slow phase injected)
        img = _import_busybox(api, tmp_path)
        assert agent.stop() == 0
        agent.env["NODEAGENT_SLOW_PHASE"] = SLOW
        agent.start()
        # an import killed mid-copy
        disk = tmp_path / "disk.raw"
        disk.write_bytes(b"\0" * (8 << 20))
        imp = api.post("/v1/images", json={"name": "halfdisk", "format": "raw",
                                           "source": {"type": "file", "path": str(disk)}}).json()
        _wait_phase(api, imp["id"], "import")
        # a create killed after its rootfs volume exists
        cr = api.post("/v1/instances", json={"name": "half", "kind": "container", "image": "busybox"}).json()
        _wait_phase(api, cr["id"], "create")
        volume = f"i-{cr['target'][:12]}-rootfs"
        assert list(agent.state_dir.rglob(f"*{volume}*")), "the rootfs volume exists before the crash"
        # cancel: cooperative, the create cleans up after itself
        cx = api.post("/v1/instances", json={"name": "cancelme", "kind": "container", "image": "busybox"}).json()
        _wait_phase(api, cx["id"], "create")
        assert api.get(f"/v1/operations/{cx['id']}/wait", params={"timeout": 0.2}).json()["status"] == "running"
        r = api.delete(f"/v1/operations/{cx['id']}")
        assert r.status_code == 200, r.text
        done = api.wait(r.json(), timeout=30)
        assert done["status"] == "cancelled" and done["error"]["code"] == "cancelled", done
        assert api.get("/v1/instances/cancelme").status_code == 404
        assert not list(agent.state_dir.rglob(f"*i-{cx['target'][:12]}-rootfs*"))
        assert api.delete(f"/v1/operations/{cx['id']}").status_code == 409  # already final

        api = _restart(agent)

        for op_id in (imp["id"], cr["id"]):
            op = api.get(f"/v1/operations/{op_id}").json()
            assert op["status"] == "failed" and op["error"]["code"] == "agent_restarted", op
        assert api.get("/v1/instances").json()["instances"] == []
        assert not list(agent.state_dir.rglob(f"*{volume}*")), "half-made volume left behind"
        names = {i["name"] for i in api.get("/v1/images").json()["images"]}
        assert names == {"busybox"}  # the finished import is kept, the half one is gone
        assert api.get(f"/v1/images/{img['id']}").status_code == 200
        # the same work succeeds now: nothing half-made is in the way
        op = api.wait(api.post("/v1/images", json={"name": "halfdisk", "format": "raw",
                                                   "source": {"type": "file", "path": str(disk)}}).json())
        assert op["status"] == "succeeded", op
        op = api.wait(api.post("/v1/instances", json={"name": "half", "kind": "container",
                                                      "image": "busybox"}).json())
        assert op["status"] == "succeeded", op
    finally:
        assert agent.stop() == 0


@pytest.mark.real
def test_kill9_during_real_runc_container_start(open_tmp):
    tmp_path = open_tmp  # containers run in user namespaces: their state dir must be traversable
    for tool in ("runc", "conmon"):
        assert shutil.which(tool), f"{tool} is not installed: run scripts/setup-host"
    from testbed.runtimes import test_network
    bridge, subnet = test_network()
    agent = AgentProcess(tmp_path / "r", pool_kind="local", env={"NODEAGENT_SLOW_PHASE": "instance.start:start=60"},
                         runtime="runc", network=(bridge, subnet))
    agent.admin_token = agent.token("admin", "admin")
    agent.start()
    api = Api(agent.url, agent.admin_token)
    suffix = secrets.token_hex(3)  # runc cgroups are host-wide: names unique per run
    keeper, starter = f"keeper-{suffix}", f"starter-{suffix}"
    try:
        _import_busybox(api, tmp_path)
        body = {"kind": "container", "image": "busybox", "network": "none", "memory_mib": 64,
                "command": ["/bin/sh", "-c", "sleep 600"]}
        # "keeper" runs before the crash and must be re-adopted; "starter" is mid-start when killed
        for name, start in ((keeper, True), (starter, False)):
            r = api.post("/v1/instances", json={**body, "name": name, "start": start})
            assert r.status_code == 202, r.text
            op = api.wait(r.json(), timeout=120)
            assert op["status"] == "succeeded", op
        assert api.get(f"/v1/instances/{keeper}").json()["state"] == "running"
        pid_before = api.post(f"/v1/instances/{keeper}/exec", json={"command": ["cat", "/proc/1/stat"]}).json()
        st = api.post(f"/v1/instances/{starter}/actions", json={"action": "start"}).json()
        _wait_phase(api, st["id"], "start")

        api = _restart(agent)

        op = api.get(f"/v1/operations/{st['id']}").json()
        assert op["status"] == "failed" and op["error"]["code"] == "agent_restarted"
        kept = api.get(f"/v1/instances/{keeper}").json()
        assert kept["state"] == "running", kept  # re-adopted, not restarted
        same = api.post(f"/v1/instances/{keeper}/exec", json={"command": ["cat", "/proc/1/stat"]}).json()
        assert same["stdout"] == pid_before["stdout"] or same["stdout"].split()[0] == pid_before["stdout"].split()[0]
        assert api.get(f"/v1/instances/{starter}").json()["state"] in ("created", "stopped")
        done = api.wait(api.post(f"/v1/instances/{starter}/actions", json={"action": "start"}).json(), timeout=60)
        assert done["status"] == "succeeded" and done["result"]["instance"]["state"] == "running", done
        # a graceful stop (SIGTERM) leaves containers running; the next agent re-adopts them
        assert agent.stop() == 0
        agent.start()
        assert {i["name"]: i["state"] for i in api.get("/v1/instances").json()["instances"]} == \
            {keeper: "running", starter: "running"}
        for name in (keeper, starter):
            assert api.delete(f"/v1/instances/{name}").status_code == 200
    finally:  # even after a failure: an agent (restarted if it is down) deletes both containers
        if agent.proc is None or agent.proc.poll() is not None:
            agent.env.pop("NODEAGENT_SLOW_PHASE", None)
            agent.start()
        for name in (keeper, starter):
            try:
                Api(agent.url, agent.admin_token).delete(f"/v1/instances/{name}")
            except Exception:  # noqa: BLE001 - the test's own failure is the one to report
                pass
        assert agent.stop() == 0
        drop_test_network(bridge, agent.rtag)
