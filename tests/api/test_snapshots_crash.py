"""kill -9 of a real agent (runc) in the middle of a container snapshot: the copy of a 256 MiB
upper dir is under way, the container frozen for it. The restarted agent lists no snapshot,
leaves no copy behind, and the container runs (thawed) again; a snapshot of the same name
can be taken then."""
from __future__ import annotations

import secrets
import shutil
import threading
import time

import pytest

pytestmark = pytest.mark.real


def test_kill9_during_a_container_snapshot(open_tmp):
    for tool in ("runc", "conmon"):
        assert shutil.which(tool), f"{tool} is not installed: run scripts/setup-host"
    from testbed.agentproc import AgentProcess, Api
    from tests.api.test_crash import _import_busybox
    agent = AgentProcess(open_tmp / "k", pool_kind="local", runtime="runc")
    agent.admin_token = agent.token("admin", "admin")
    agent.start()
    api = Api(agent.url, agent.admin_token)
    name = f"snk-{secrets.token_hex(3)}"
    snaps = open_tmp / "k" / "containers" / "containers" / name / "snapshots"
    try:
        _import_busybox(api, open_tmp)
        op = api.wait(api.post("/v1/instances", json={"name": name, "kind": "container", "image": "busybox",
                                                      "memory_mib": 64, "network": "none",
                                                      "command": ["/bin/sh", "-c", "sleep 100000"]}).json())
        assert op["status"] == "succeeded", op
        ex = api.post(f"/v1/instances/{name}/exec", json={"command": [
            "/bin/busybox", "dd", "if=/dev/urandom", "of=/big", "bs=1M", "count=256"], "timeout": 120}).json()
        assert ex["exit_code"] == 0, ex
        def take():
            try:
                api.post(f"/v1/instances/{name}/snapshots", json={"name": "half"})
            except OSError:  # requests' ConnectionError: the agent was killed under it
                pass

        threading.Thread(target=take, daemon=True).start()
        deadline = time.monotonic() + 30
        while not (snaps / ".tmp-half").exists():
            assert time.monotonic() < deadline, "the copy never started"
            time.sleep(0.01)
        agent.kill9()
        assert not (snaps / "half").exists(), "killed before the copy completed"
        agent.start()
        assert api.get(f"/v1/instances/{name}/snapshots").json() == {"snapshots": []}
        assert api.get(f"/v1/instances/{name}/snapshots/half").status_code == 404
        assert not (snaps.exists() and list(snaps.iterdir())), "no copy left"
        assert api.get(f"/v1/instances/{name}").json()["state"] == "running", "thawed"
        ex = api.post(f"/v1/instances/{name}/exec", json={"command": ["/bin/sh", "-c", "echo up"]}).json()
        assert (ex["exit_code"], ex["stdout"]) == (0, "up\n"), ex
        r = api.post(f"/v1/instances/{name}/snapshots", json={"name": "half"})
        assert r.status_code == 201, r.text
    finally:
        if agent.proc is None or agent.proc.poll() is not None:
            agent.start()
        Api(agent.url, agent.admin_token).delete(f"/v1/instances/{name}")
        assert agent.stop() == 0
