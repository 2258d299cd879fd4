"""End to end: registry -> OCI layout -> ImageStore -> rootfs -> RuncRuntime."""
from __future__ import annotations

import time

import pytest

from containers import ContainerSpec, NetworkSpec, Rootfs
from storage import ImageStore
from storage.local import LocalBackend
from storage.registry import pull_to_layout
from storage.sources import AddressPolicy
from testbed.runtimes import make_runc

pytestmark = pytest.mark.real


def test_pull_import_prepare_run_delete(busybox_ref, tmp_path, db):
    layout = str(tmp_path / "layout")
    tag = pull_to_layout(busybox_ref, layout, tls_verify=False,
                         policy=AddressPolicy(["127.0.0.1/32"]))  # the test registry is on loopback
    store = ImageStore(db, {"local": LocalBackend("local", path=str(tmp_path / "pool"))},
                       default_pool="local", cache_dir=str(tmp_path / "cache"))
    image = store.import_oci(layout, name="busybox", ref=tag)
    assert image.kind == "container" and image.config["Cmd"] == ["sh"]
    layers = store.prepare_rootfs(image.id, "ctr-vol")
    rt, cleanup = make_runc(tmp_path)
    try:
        spec = ContainerSpec(name="e2e", rootfs=Rootfs(tuple(layers.lowerdirs), layers.upperdir,
                                                       layers.workdir),
                             command=("sh", "-c", "echo $IMAGE > /made; cat /made /www/index.html"),
                             image_config=image.config, network=NetworkSpec())
        rt.create(spec)
        rt.start("e2e")
        deadline = time.monotonic() + 10
        while rt.get("e2e").state != "stopped" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rt.get("e2e").exit_code == 0
        assert rt.logs("e2e") == "busybox-test\nhello from busybox\n"
        assert rt.delete("e2e")
    finally:
        cleanup()
    # the write went to the container's own upper dir, never into the shared layers
    import os
    assert open(os.path.join(layers.upperdir, "made")).read() == "busybox-test\n"
    assert not any(os.path.exists(os.path.join(d, "made")) for d in layers.lowerdirs)
    assert store.release("local", "ctr-vol")
    assert store.delete(image.id)



def test_the_agent_runs_an_image_as_its_user_with_its_entrypoint(tmp_path):
    """Through the agent (in-process app, real runc): USER nginx of the image's /etc/passwd
    is the uid the container runs as; a given command follows the image's Entrypoint and
    the request's env overrides the image's Env by key."""
    import secrets

    from agent import config as agent_config
    from agent.app import create_app
    from testbed.runtimes import test_network
    from testbed.ocibuild import busybox_layers, users_layer, write_layout

    bridge, subnet = test_network()
    cfg = agent_config.parse({
        "state_dir": str(tmp_path / "state"), "workers": 2, "hypervisor": {"driver": "fake"},
        "containers": {"runtime": "runc", "cgroup_parent": f"nodeagent-test-{secrets.token_hex(3)}"},
        "network": {"bridge": bridge, "subnet": subnet},
        "images": {"import_dirs": [str(tmp_path)]},
        "pools": {"default": {"kind": "local", "path": str(tmp_path / "pool")}}})
    app = create_app(cfg)
    root = app.config["SERVICES"]
    root.start()
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {root.tokens.create('admin', 'admin')}"

    def wait(r):
        assert r.status_code == 202, r.json
        return client.get(f"/v1/operations/{r.json['id']}/wait?timeout=60").json

    layers = busybox_layers() + [users_layer("root:x:0:0::/root:/bin/sh\nnginx:x:101:102::/:/bin/sh\n",
                                             "root:x:0:\nnginx:x:102:\n")]
    images = {"as-nginx": {"user": "nginx"},
              "entry": {"entrypoint": ["/bin/sh", "-c", 'echo "$0 $* $GREETING" > /args; exec "$@"', "entry"],
                        "cmd": ["false"], "env": ("PATH=/bin", "GREETING=image")}}
    try:
        for name, config in images.items():
            layout = write_layout(str(tmp_path / name), {"latest": layers}, **config)
            op = wait(client.post("/v1/images", json={"name": name, "format": "oci",
                                                      "source": {"type": "file", "path": layout}}))
            assert op["status"] == "succeeded", op
        for name, image, body in (("web", "as-nginx", {"command": ["/bin/busybox", "sleep", "1000"]}),
                                  ("ep", "entry", {"command": ["/bin/busybox", "sleep", "1000"],
                                                   "env": {"GREETING": "api"}})):
            op = wait(client.post("/v1/instances", json={"name": name, "kind": "container", "image": image,
                                                         "network": "none", **body}))
            assert op["status"] == "succeeded", op
        assert client.post("/v1/instances/web/exec", json={"command": ["id", "-u"]}).json["stdout"] == "101\n"
        assert client.post("/v1/instances/web/exec", json={"command": ["id", "-g"]}).json["stdout"] == "102\n"
        out = client.post("/v1/instances/ep/exec", json={"command": ["/bin/busybox", "cat", "/args"]}).json
        assert out["stdout"] == "entry /bin/busybox sleep 1000 api\n", out
    finally:
        for name in ("web", "ep"):
            client.delete(f"/v1/instances/{name}")
        root.runtime.close()
        root.stop()
