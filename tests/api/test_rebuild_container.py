"""Rebuild of a container from another container image (agent/services/rebuild.py): the new
image's layers and process config (Entrypoint/Cmd/Env/User/WorkingDir, resolved as at create)
replace the old ones; name, id, volumes and limits stay; the image reference moves. On the
fake runtime (refusals change nothing) and on real runc."""
from __future__ import annotations

import os
import secrets
import shutil

import pytest

from tests.api.conftest import inprocess_app
from tests.api.test_services_inprocess import import_user_images

MiB = 1024 * 1024


def _wait(client, r):
    assert r.status_code == 202, r.json
    return client.get(f"/v1/operations/{r.json['id']}/wait?timeout=60").json


@pytest.fixture
def app(tmp_path):
    from tests.api.test_services_inprocess import _import
    from testbed.ocibuild import busybox_layers, write_layout
    app, client, root = inprocess_app(tmp_path)
    layout = write_layout(str(tmp_path / "busybox"), {"latest": busybox_layers()})
    _import(client, {"name": "busybox", "source": {"type": "file", "path": layout}, "format": "oci"})
    import_user_images(client, str(tmp_path))
    yield app, client, root
    root.stop()


def test_rebuild_a_container_from_another_image_on_the_fake(app):
    _, client, root = app
    images = {i["name"]: i["id"] for i in client.get("/v1/images").json["images"]}
    client.post("/v1/volumes", json={"name": "keep", "size_mib": 16})
    op = _wait(client, client.post("/v1/instances", json={
        "name": "rc", "kind": "container", "image": "busybox", "cpus": 0.5, "memory_mib": 64,
        "network": "none", "env": {"MINE": "1"}, "volumes": [{"volume": "keep", "path": "/data"}]}))
    assert op["status"] == "succeeded", op
    inst = op["result"]["instance"]
    before = root.runtime._box("rc").spec
    # an image whose user is unknown: the operation fails, nothing changed
    op = _wait(client, client.post("/v1/instances/rc/actions", json={"action": "rebuild", "image": "as-ghost"}))
    assert op["status"] == "failed" and "ghost" in op["error"]["message"], op
    assert root.runtime._box("rc").spec == before
    assert client.get("/v1/instances/rc").json["image"] == images["busybox"]
    assert client.get("/v1/instances/rc").json["state"] == "running"
    # another image: its layers and process, the create's env on top; the rest stays
    op = _wait(client, client.post("/v1/instances/rc/actions", json={"action": "rebuild", "image": "as-nginx"}))
    assert op["status"] == "succeeded", op
    after = op["result"]["instance"]
    assert (after["id"], after["state"], after["image"]) == (inst["id"], "running", images["as-nginx"])
    spec = root.runtime._box("rc").spec
    assert spec.user == "101:102" and spec.command == ("/bin/sh",) and spec.env["MINE"] == "1"
    assert spec.rootfs.lowerdirs != before.rootfs.lowerdirs and spec.rootfs.upperdir == before.rootfs.upperdir
    assert (spec.limits, spec.volumes, spec.network) == (before.limits, before.volumes, before.network)
    assert client.get("/v1/volumes/keep").json["attachment"]["instance_name"] == "rc"
    # the old image is free of it, the new one held
    assert client.delete("/v1/images/as-nginx").status_code == 409
    assert client.delete("/v1/images/busybox").status_code == 200
    op = _wait(client, client.post("/v1/instances/rc/actions", json={"action": "rebuild", "image": "entry"}))
    assert op["status"] == "succeeded", op
    spec = root.runtime._box("rc").spec
    assert spec.command == ("echo", "entry", "default") and spec.user == "0:0"
    assert client.delete("/v1/images/as-nginx").status_code == 200


def test_rebuild_a_runc_container_from_another_image(open_tmp):
    """A real container on image A (Cmd sleep) with a volume, rebuilt from image B (another
    layer, Entrypoint + Cmd, Env, User nginx): B's process runs as nginx with B's env and
    files, A's writes are gone, the volume's are not, and the limits are the same."""
    for tool in ("runc", "conmon"):
        assert shutil.which(tool), f"{tool} is not installed: run scripts/setup-host"
    from testbed.agentproc import AgentProcess, Api
    from testbed.ocibuild import busybox_layers, layer, users_layer, write_layout
    from tests.api.test_services_inprocess import GROUP, PASSWD
    agent = AgentProcess(open_tmp / "r", pool_kind="local", runtime="runc")
    agent.admin_token = agent.token("admin", "admin")
    agent.start()
    api = Api(agent.url, agent.admin_token)
    name = f"rb-{secrets.token_hex(3)}"  # runc cgroups are host-wide: unique per run
    try:
        for img, layers, config in (
                ("img-a", busybox_layers(), {"cmd": ["/bin/sh", "-c", "sleep 600"]}),
                ("img-b", busybox_layers() + [users_layer(PASSWD, GROUP),
                                              layer([("etc/", "dir", None), ("etc/marker", "file", b"b\n")])],
                 {"entrypoint": ["/bin/sh", "-c"], "cmd": ["exec sleep 700"], "env": ["PATH=/bin", "IMG=b"],
                  "user": "nginx"})):
            layout = write_layout(str(open_tmp / img), {"latest": layers}, **config)
            op = api.wait(api.post("/v1/images", json={"name": img, "format": "oci",
                                                       "source": {"type": "file", "path": layout}}).json())
            assert op["status"] == "succeeded", op
        assert api.post("/v1/volumes", json={"name": "rbkeep", "size_mib": 16}).status_code == 201
        op = api.wait(api.post("/v1/instances", json={
            "name": name, "kind": "container", "image": "img-a", "cpus": 0.5, "memory_mib": 64,
            "network": "none", "volumes": [{"volume": "rbkeep", "path": "/data"}]}).json())
        assert op["status"] == "succeeded", op
        inst = op["result"]["instance"]

        def sh(cmd: str) -> dict:
            r = api.post(f"/v1/instances/{name}/exec", json={"command": ["/bin/sh", "-c", cmd]}).json()
            assert "exit_code" in r, r
            return r

        assert sh("echo a > /written-on-a && echo v > /data/v && cat /proc/1/cmdline")["stdout"] in (
            "/bin/sh\x00-c\x00sleep 600\x00", "sleep\x00600\x00")  # busybox sh may exec its last command
        op = api.wait(api.post(f"/v1/instances/{name}/actions", json={"action": "rebuild", "image": "img-b",
                                                                      "force": True}).json())
        assert op["status"] == "succeeded", op
        after = op["result"]["instance"]
        assert (after["id"], after["state"]) == (inst["id"], "running")
        shown = api.get(f"/v1/instances/{name}").json()
        assert (shown["image"], shown["cpus"], shown["memory_mib"]) == (
            api.get("/v1/images/img-b").json()["id"], 0.5, 64)
        ex = sh("cat /proc/1/cmdline; echo; grep ^Uid /proc/1/status; tr '\\0' '\\n' < /proc/1/environ | "
                "grep ^IMG=; cat /etc/marker /data/v; ls /written-on-a 2>&1; true")
        out = ex["stdout"]
        assert out.startswith(("sleep\x00700\x00\n", "/bin/sh\x00-c\x00exec sleep 700\x00\n")), ex
        assert "Uid:\t101\t" in out and "IMG=b\n" in out and "b\nv\n" in out, ex
        assert "/written-on-a: No such file" in out, ex
        assert api.delete("/v1/images/img-a").status_code == 200, "img-a is no longer held"
        assert api.delete("/v1/images/img-b").status_code == 409
    finally:
        api.delete(f"/v1/instances/{name}")
        agent.stop()
        assert not os.path.exists(f"/sys/fs/cgroup/pids/nodeagent/{name}")
