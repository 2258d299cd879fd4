"""A runc container backed up while it runs (frozen for the copy of its writes, thawed after)
into a local pool and restored as a new container on the same agent: a file written before
the backup is there, a file of the image it deleted stays deleted (the overlay whiteout came
along), the owners are the container's; its volume comes back as a fresh one (named
``<instance>-<volume>``: the original's name is taken) holding the file tree written into it;
the original runs on."""
from __future__ import annotations

import secrets
import shutil

import pytest

pytestmark = pytest.mark.real


def test_a_running_container_is_backed_up_and_restored(open_tmp):
    for tool in ("runc", "conmon"):
        assert shutil.which(tool), f"{tool} is not installed: run scripts/setup-host"
    from testbed.agentproc import AgentProcess, Api
    from tests.api.test_crash import _import_busybox
    agent = AgentProcess(open_tmp / "b", pool_kind="local", runtime="runc")
    agent.admin_token = agent.token("admin", "admin")
    agent.start()
    api = Api(agent.url, agent.admin_token)
    src, dst = f"bks-{secrets.token_hex(3)}", f"bkd-{secrets.token_hex(3)}"
    vol = f"bkv-{secrets.token_hex(3)}"
    mark = secrets.token_hex(8)
    try:
        _import_busybox(api, open_tmp)
        assert api.post("/v1/volumes", json={"name": vol, "size_mib": 16}).status_code == 201
        op = api.wait(api.post("/v1/instances", json={"name": src, "kind": "container", "image": "busybox",
                                                      "memory_mib": 64, "network": "none",
                                                      "volumes": [{"volume": vol, "path": "/vol"}],
                                                      "command": ["/bin/sh", "-c", "sleep 100000"]}).json())
        assert op["status"] == "succeeded", op
        ex = api.post(f"/v1/instances/{src}/exec", json={"command": [
            "/bin/sh", "-c", f"mkdir -p /data && echo {mark} > /data/mark && chown 1234:99 /data/mark "
                             f"&& rm /etc/keep && mkdir /vol/d && echo v{mark} > /vol/d/f "
                             "&& chown 77:88 /vol/d/f"]}).json()
        assert ex["exit_code"] == 0, ex
        op = api.wait(api.post(f"/v1/instances/{src}/backups", json={}).json())
        assert op["status"] == "succeeded", op
        b = op["result"]["backup"]
        assert (b["kind"], b["instance_state"], b["consistency"]) == ("container", "running", "frozen"), b
        assert api.get(f"/v1/instances/{src}").json()["state"] == "running", "thawed"
        op = api.wait(api.post(f"/v1/backups/{b['id']}/restore", json={"name": dst}).json())
        assert op["status"] == "succeeded", op
        assert op["result"]["instance"]["state"] == "running"
        ex = api.post(f"/v1/instances/{dst}/exec", json={"command": [
            "/bin/sh", "-c", "cat /data/mark; stat -c '%u:%g' /data/mark; cat /etc/keep 2>&1; hostname; "
                             "cat /vol/d/f; stat -c '%u:%g' /vol/d/f"]}).json()
        out = ex["stdout"].splitlines()
        assert out[:2] == [mark, "1234:99"], ex
        assert "No such file" in out[2], ex
        assert out[3] == dst, ex
        assert out[4:6] == [f"v{mark}", "77:88"], ex
        (v,) = [v for v in api.get("/v1/volumes").json()["volumes"] if v["name"] != vol]
        assert (v["name"], v["attachment"]["instance_name"], v["attachment"]["path"]) == (f"{dst}-{vol}", dst, "/vol")
        ex = api.post(f"/v1/instances/{src}/exec", json={"command": ["/bin/sh", "-c", "cat /data/mark"]}).json()
        assert ex["stdout"].strip() == mark, "the original runs on"
    finally:
        for name in (src, dst):
            api.delete(f"/v1/instances/{name}")
        for v in api.get("/v1/volumes").json()["volumes"]:
            api.delete(f"/v1/volumes/{v['id']}")
        assert agent.stop() == 0
