"""The services in seconds: an in-process app (Flask test client) on the fake driver and
runtime and a real local pool. What a container runs follows its image's OCI config as
Docker does (USER, Entrypoint + command, Env); a VM is assembled from its disk, seed,
address and spec (agent.services.assembly) and handed to the driver."""
from __future__ import annotations

import os
import uuid
from unittest import mock

import pytest

from agent.services.assembly import ROOT_TARGET, SEED_TARGET, mac_for
from hypervisor.fake import FakeDriver
from testbed.ocibuild import busybox_layers, users_layer, write_layout
from tests.api.conftest import inprocess_app

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnginx:x:101:102:nginx:/var/cache/nginx:/bin/sh\n"
GROUP = "root:x:0:\nnginx:x:102:\n"


def _wait(client, op):
    return client.get(f"/v1/operations/{op['id']}/wait?timeout=30").json


def _import(client, body):
    r = client.post("/v1/images", json=body)
    assert r.status_code == 202, r.json
    op = _wait(client, r.json)
    assert op["status"] == "succeeded", op
    return op["result"]["image"]


def import_user_images(client, dest):
    """Container images "as-nginx" (USER nginx, in its /etc/passwd), "as-ghost" (USER ghost,
    not there) and "entry" (Entrypoint ["echo", "entry"], Cmd ["default"])."""
    layers = busybox_layers() + [users_layer(PASSWD, GROUP)]
    for name, config in (("as-nginx", {"user": "nginx"}), ("as-ghost", {"user": "ghost"}),
                         ("entry", {"entrypoint": ["echo", "entry"], "cmd": ["default"]})):
        layout = write_layout(os.path.join(dest, name), {"latest": layers}, **config)
        _import(client, {"name": name, "source": {"type": "file", "path": layout}, "format": "oci"})


@pytest.fixture
def app(tmp_path):
    app, client, root = inprocess_app(tmp_path)
    import_user_images(client, str(tmp_path))
    yield app, client, root
    root.stop()


def _create(client, **body):
    r = client.post("/v1/instances", json=body)
    assert r.status_code == 202, r.json
    return _wait(client, r.json)


def _exec(client, name, command):
    r = client.post(f"/v1/instances/{name}/exec", json={"command": command})
    assert r.status_code == 200, r.json
    return r.json


def test_an_image_user_runs_as_its_uid(app):
    _, client, _ = app
    op = _create(client, name="web", kind="container", image="as-nginx", command=["sleep", "1000"])
    assert op["status"] == "succeeded", op
    assert _exec(client, "web", ["id", "-u"])["stdout"] == "101\n"
    assert _exec(client, "web", ["id", "-g"])["stdout"] == "102\n"  # the user's group from passwd


def test_an_image_user_missing_from_its_passwd_is_refused_and_leaves_nothing(app):
    _, client, root = app
    op = _create(client, name="ghost", kind="container", image="as-ghost", command=["sleep", "1000"])
    assert op["status"] == "failed" and op["error"]["code"] == "unprocessable", op
    assert "'ghost' is not in the image's /etc/passwd" in op["error"]["message"]
    assert client.get("/v1/instances/ghost").status_code == 404
    assert root.runtime.find("ghost") is None
    assert not list(root.config.state_path.parent.rglob(f"*i-{op['target'][:12]}-rootfs*"))


def test_entrypoint_runs_with_the_given_command(app):
    _, client, _ = app
    assert _create(client, name="e1", kind="container", image="entry", command=["hi"])["status"] == "succeeded"
    assert _create(client, name="e2", kind="container", image="entry")["status"] == "succeeded"
    assert client.get("/v1/instances/e1/logs").json["logs"] == "entry hi\n"  # the command replaced Cmd
    assert client.get("/v1/instances/e2/logs").json["logs"] == "entry default\n"


def _define_recorded(client, **body):
    """Create a VM; (operation, the VmSpec the driver was handed)."""
    handed = []
    real_define = FakeDriver.define

    def define(self, spec):
        handed.append(spec)
        return real_define(self, spec)

    with mock.patch.object(FakeDriver, "define", define):
        op = _create(client, **body)
    assert op["status"] == "succeeded", op
    spec, = handed
    return op, spec


def test_a_vm_is_assembled_from_its_disk_seed_and_spec(app):
    _, client, root = app
    op, spec = _define_recorded(client, name="vm1", kind="vm", image="tiny-vm", cpus=2, memory_mib=64,
                                network="none", disk_gib=1, user_data="#cloud-config\n")
    inst_id = op["target"]
    assert (spec.uuid, spec.cpus, spec.memory_mib, spec.nics) == (str(uuid.UUID(inst_id)), 2, 64, ())
    disks = {d.target: d for d in spec.disks}
    assert set(disks) == {ROOT_TARGET, SEED_TARGET}
    vol = root.pools["default"].get_volume(f"i-{inst_id[:12]}-disk")
    assert disks[ROOT_TARGET].source == vol.path and vol.size == 1024**3
    seed = root.config.state_path / "instances" / inst_id / "seed.iso"
    assert disks[SEED_TARGET].source == str(seed) and disks[SEED_TARGET].readonly
    assert os.stat(seed).st_mode & 0o777 == 0o600
    assert spec.console_log == str(seed.parent / "console.log")
    assert client.delete("/v1/instances/vm1").json == {"deleted": True}
    assert not seed.parent.exists() and root.pools["default"].find_volume(vol.name) is None


def test_a_bridged_vm_gets_its_nic_on_the_host_bridge(app):
    _, client, root = app
    op, spec = _define_recorded(client, name="vm2", kind="vm", image="tiny-vm", memory_mib=64)  # bridge
    nic, = spec.nics
    assert (nic.bridge, nic.mac) == (root.config.network.bridge, mac_for(op["target"]))
    assert client.get("/v1/instances/vm2").json["mac"] == nic.mac
