"""Volumes through the API on the fake driver and runtime and a real local pool: create, list,
show, grow, delete; attach to and detach from VMs and containers; every refusal leaves nothing
behind (no row, no pool file, no attachment)."""
from __future__ import annotations

import os

import pytest

from tests.api.conftest import inprocess_app
from tests.api.test_services_inprocess import _import
from testbed.ocibuild import busybox_layers, write_layout

MiB = 1024 * 1024


@pytest.fixture
def app(tmp_path):
    app, client, root = inprocess_app(
        tmp_path, peers={"host2": {"url": "http://127.0.0.1:9", "token": "x"}})
    layout = write_layout(str(tmp_path / "busybox"), {"latest": busybox_layers()})
    _import(client, {"name": "busybox", "source": {"type": "file", "path": layout}, "format": "oci"})
    yield app, client, root
    root.stop()


def _err(r, status, word=None):
    assert r.status_code == status, (r.status_code, r.json)
    msg = r.json["error"]["message"]
    if word:
        assert word in msg, msg
    return msg


def _wait(client, op):
    op = client.get(f"/v1/operations/{op['id']}/wait?timeout=30").json
    assert op["status"] == "succeeded", op
    return op["result"]


def _instance(client, **body):
    r = client.post("/v1/instances", json=body)
    assert r.status_code == 202, r.json
    return _wait(client, r.json)["instance"]


def _volume(client, name, **size):
    r = client.post("/v1/volumes", json={"name": name, **(size or {"size_mib": 32})})
    assert r.status_code == 201, r.json
    return r.json


def test_create_show_list_grow_delete_and_their_events(app):
    _, client, root = app
    with root.events.subscribe({"volume"}) as sub:
        v = _volume(client, "data1", size_mib=64)
        assert v["name"] == "data1" and v["size_bytes"] == 64 * MiB and v["pool"] == "default"
        assert v["state"] == "available" and v["attachment"] is None and v["format"] == "raw"
        assert client.get(f"/v1/volumes/{v['id']}").json == client.get("/v1/volumes/data1").json
        assert [x["name"] for x in client.get("/v1/volumes").json["volumes"]] == ["data1"]
        path = root.pools["default"].get_volume("v-" + v["id"][:12]).path
        from agent.services.volumes import has_ext4
        assert has_ext4(path), "a local volume carries an ext4 filesystem"
        r = client.patch("/v1/volumes/data1", json={"size_gib": 1})
        assert r.status_code == 200 and r.json["size_bytes"] == 1024 * MiB, r.json
        assert os.path.getsize(path) == 1024 * MiB
        _err(client.patch("/v1/volumes/data1", json={"size_mib": 64}), 422, "only grow")
        assert client.patch("/v1/volumes/data1", json={"size_gib": 1}).status_code == 200  # same size
        assert client.delete("/v1/volumes/data1").json == {"deleted": True}
        assert not os.path.exists(path)
        _err(client.get("/v1/volumes/data1"), 404)
        _err(client.delete("/v1/volumes/data1"), 404)
        changes = []
        while (e := sub.get(1)) is not None:
            changes.append((e["data"]["name"], e["data"]["change"]))
        assert changes == [("data1", "created"), ("data1", "resized"), ("data1", "deleted")]


BAD_CREATES = [
    ({"name": "x"}, 422, "exactly one"),
    ({"name": "x", "size_mib": 64, "size_gib": 1}, 422, "exactly one"),
    ({"name": "x", "size_mib": 1}, 422, "size_mib"),
    ({"name": "x", "size_gib": 10 ** 9}, 422, "size_gib"),
    ({"name": "X_Y", "size_mib": 64}, 422, "name"),
    ({"name": "../../etc", "size_mib": 64}, 422, "name"),
    ({"name": "x", "size_mib": 64, "pool": "nope"}, 404, "pool"),
    ({"name": "x", "size_mib": 64, "format": "qcow2"}, 422, "format"),
    ({"name": "x", "size_mib": "64"}, 422, "size_mib"),
    ({"name": "x", "size_gib": 65536}, 409, "more than pool"),
    ({"name": "0123456789abcdef0123456789abcdef", "size_mib": 64}, 422, "volume id"),
]


def test_bad_creates_are_refused_and_leave_nothing(app):
    _, client, root = app
    before = os.listdir(root.pools["default"].volume_dir)
    for body, status, word in BAD_CREATES:
        _err(client.post("/v1/volumes", json=body), status, word)
        assert client.get("/v1/volumes").json == {"volumes": []}
        assert os.listdir(root.pools["default"].volume_dir) == before


def test_a_taken_name_is_409_and_a_failed_pool_write_leaves_nothing(app):
    _, client, root = app
    _volume(client, "taken")
    before = sorted(os.listdir(root.pools["default"].volume_dir))
    _err(client.post("/v1/volumes", json={"name": "taken", "size_mib": 8}), 409, "exists")
    from unittest import mock

    from agent.errors import CommandFailed
    with mock.patch("storage.mounts.format_ext4", side_effect=CommandFailed("mkfs.ext4 failed: injected")):
        _err(client.post("/v1/volumes", json={"name": "broken", "size_mib": 8}), 500)
    assert sorted(os.listdir(root.pools["default"].volume_dir)) == before
    assert [v["name"] for v in client.get("/v1/volumes").json["volumes"]] == ["taken"]


def test_vm_attach_detach_resize_and_the_refusals(app):
    _, client, root = app
    vm = _instance(client, name="vm1", kind="vm", image="tiny-vm", memory_mib=128)
    other = _instance(client, name="vm2", kind="vm", image="tiny-vm", memory_mib=128, start=False)
    v = _volume(client, "disk1")
    _volume(client, "disk2")
    r = client.post("/v1/instances/vm1/volumes", json={"volume": "disk1"})
    assert r.status_code == 200, r.json
    att = r.json["attachment"]
    assert r.json["state"] == "attached" and att["instance"] == vm["id"] and att["target"] == "vdb"
    assert "vdb" in [d.target for d in root.driver.disks("vm1")]
    assert "fake-guest: disk vdb attached" in client.get("/v1/instances/vm1/logs").json["logs"]
    assert [x["name"] for x in client.get("/v1/instances/vm1/volumes").json["volumes"]] == ["disk1"]
    # refusals: nothing changes
    _err(client.post("/v1/instances/vm1/volumes", json={"volume": "disk1"}), 409, "already")
    _err(client.post("/v1/instances/vm2/volumes", json={"volume": "disk1"}), 409, "vm1")
    _err(client.post("/v1/instances/vm1/volumes", json={"volume": "disk2", "target": "vdb"}), 409, "vdb")
    _err(client.post("/v1/instances/vm1/volumes", json={"volume": "disk2", "target": "vda"}), 422, "target")
    _err(client.post("/v1/instances/vm1/volumes", json={"volume": "disk2", "target": "vdz"}), 422, "target")
    _err(client.post("/v1/instances/vm1/volumes", json={"volume": "disk2", "path": "/data"}), 422, "containers")
    _err(client.post("/v1/instances/vm1/volumes", json={"volume": "nope"}), 404, "nope")
    _err(client.post("/v1/instances/nope/volumes", json={"volume": "disk2"}), 404)
    _err(client.delete("/v1/volumes/disk1"), 409, "detach it first")
    _err(client.delete("/v1/instances/vm2/volumes/disk1"), 404, "not attached")
    _err(client.delete("/v1/instances/vm1/volumes/disk2"), 404, "not attached")
    assert client.get("/v1/volumes/disk2").json["state"] == "available"
    assert [d.target for d in root.driver.disks("vm1")].count("vdb") == 1
    # grow while running: the guest is told
    r = client.patch("/v1/volumes/disk1", json={"size_mib": 48})
    assert r.status_code == 200 and r.json["size_bytes"] == 48 * MiB
    assert f"fake-guest: disk vdb resized to {48 * MiB} bytes" in client.get("/v1/instances/vm1/logs").json["logs"]
    # the next free target; a stopped VM gets it in its definition
    assert client.post("/v1/instances/vm1/volumes", json={"volume": "disk2"}).json["attachment"]["target"] == "vdc"
    r = client.delete("/v1/instances/vm1/volumes/disk2")
    assert r.status_code == 200 and r.json["state"] == "available"
    r = client.post("/v1/instances/vm2/volumes", json={"volume": "disk2", "target": "vdx", "readonly": True})
    assert r.status_code == 200 and r.json["attachment"] == {
        "instance": other["id"], "instance_name": "vm2", "target": "vdx", "path": None, "readonly": True}
    assert any(d.target == "vdx" and d.readonly for d in root.driver.disks("vm2"))
    # detach; the VM no longer has the disk
    r = client.delete("/v1/instances/vm1/volumes/disk1")
    assert r.status_code == 200 and r.json["state"] == "available" and r.json["attachment"] is None
    assert "vdb" not in [d.target for d in root.driver.disks("vm1")]
    assert "fake-guest: disk vdb detached" in client.get("/v1/instances/vm1/logs").json["logs"]
    # a volume a VM had writable is the guest's: the host mounts it into no container
    _err(client.post("/v1/instances", json={"name": "c9", "kind": "container", "image": "busybox",
                                            "command": ["sleep", "1"], "volumes": [{"volume": "disk1", "path": "/d"}]}),
         422, "guest")
    # deleting the instance frees its volumes (the volume itself stays)
    assert client.delete("/v1/instances/vm2").json == {"deleted": True}
    assert client.get("/v1/volumes/disk2").json["state"] == "available"
    assert client.delete(f"/v1/volumes/{v['id']}").json == {"deleted": True}


def test_container_volumes_at_create_and_while_stopped(app):
    _, client, root = app
    _volume(client, "cdata")
    _volume(client, "clogs")
    # refused creates leave no instance and keep the volumes available
    for vols, status, word in (([{"volume": "nope", "path": "/data"}], 404, "nope"),
                               ([{"volume": "cdata", "path": "/proc/x"}], 422, "runtime"),
                               ([{"volume": "cdata", "path": "/a/../b"}], 422, "normalised"),
                               ([{"volume": "cdata", "path": "data"}], 422, "path"),
                               ([{"volume": "cdata", "path": "/d"}, {"volume": "cdata", "path": "/e"}], 409,
                                "twice"),
                               ([{"volume": "cdata", "path": "/d"}, {"volume": "clogs", "path": "/d"}], 409,
                                "twice")):
        _err(client.post("/v1/instances", json={"name": "c1", "kind": "container", "image": "busybox",
                                                "command": ["sleep", "60"], "volumes": vols}), status, word)
        assert client.get("/v1/instances").json == {"instances": []}
    _err(client.post("/v1/instances", json={"name": "v1", "kind": "vm", "image": "tiny-vm",
                                            "volumes": [{"volume": "cdata", "path": "/d"}]}), 422, "containers")
    c = _instance(client, name="c1", kind="container", image="busybox", command=["sleep", "60"],
                  volumes=[{"volume": "cdata", "path": "/data"}])
    att = client.get("/v1/volumes/cdata").json["attachment"]
    assert att == {"instance": c["id"], "instance_name": "c1", "target": None, "path": "/data", "readonly": False}
    spec = root.runtime._box("c1").spec
    assert [(m.destination, m.readonly) for m in spec.volumes] == [("/data", False)]
    assert os.path.isfile(spec.volumes[0].source)
    # another container cannot take it; a running one takes no new volume
    _err(client.post("/v1/instances", json={"name": "c2", "kind": "container", "image": "busybox",
                                            "command": ["sleep", "60"],
                                            "volumes": [{"volume": "cdata", "path": "/data"}]}), 409, "c1")
    assert [i["name"] for i in client.get("/v1/instances").json["instances"]] == ["c1"]
    _err(client.post("/v1/instances/c1/volumes", json={"volume": "clogs"}), 422, "path")
    _err(client.post("/v1/instances/c1/volumes", json={"volume": "clogs", "path": "/l", "target": "vdb"}),
         422, "target is for VMs")
    _err(client.post("/v1/instances/c1/volumes", json={"volume": "clogs", "path": "/data"}), 409, "/data")
    assert client.get("/v1/volumes/clogs").json["state"] == "available"
    # running (or paused): attached and detached live (SupportsLiveVolumes)
    for action in ("pause", None):
        if action:
            _wait(client, client.post("/v1/instances/c1/actions", json={"action": action}).json)
        r = client.post("/v1/instances/c1/volumes", json={"volume": "clogs", "path": "/logs"})
        assert r.status_code == 200 and r.json["attachment"]["path"] == "/logs", r.json
        assert [m.destination for m in root.runtime._box("c1").spec.volumes] == ["/data", "/logs"]
        assert client.delete("/v1/instances/c1/volumes/clogs").status_code == 200
        assert [m.destination for m in root.runtime._box("c1").spec.volumes] == ["/data"]
        assert client.get("/v1/volumes/clogs").json["state"] == "available"
        if action:
            _wait(client, client.post("/v1/instances/c1/actions", json={"action": "resume"}).json)
    # the runtime refuses the path: the volume stays available
    _err(client.post("/v1/instances/c1/volumes", json={"volume": "clogs", "path": "/a/./b"}), 422)
    assert client.get("/v1/volumes/clogs").json["state"] == "available"
    # stopped: attach and detach change its spec for the next start
    _wait(client, client.post("/v1/instances/c1/actions", json={"action": "stop"}).json)
    _err(client.post("/v1/instances/c1/volumes", json={"volume": "clogs", "path": "/data"}), 409, "/data")
    r = client.post("/v1/instances/c1/volumes", json={"volume": "clogs", "path": "/logs", "readonly": True})
    assert r.status_code == 200, r.json
    assert sorted(m.destination for m in root.runtime._box("c1").spec.volumes) == ["/data", "/logs"]
    assert client.delete("/v1/instances/c1/volumes/cdata").status_code == 200
    assert [m.destination for m in root.runtime._box("c1").spec.volumes] == ["/logs"]
    assert client.get("/v1/volumes/cdata").json["state"] == "available"
    assert client.delete("/v1/instances/c1").json == {"deleted": True}
    assert client.get("/v1/volumes/clogs").json["state"] == "available"


def test_a_crash_mid_create_is_finished_at_start(app, tmp_path):
    _, client, root = app
    _volume(client, "keep")
    backend = root.pools["default"]
    from storage.backend import VolumeSpec
    backend.create_volume(VolumeSpec("v-000000000000", MiB, "raw"))
    root.db.execute("INSERT INTO volumes(id, name, pool, backend_name, format, size, state, created_at, updated_at) "
                    "VALUES(?,?,?,?,?,?,?,?,?)", ("0" * 32, "halfmade", "default", "v-000000000000", "raw", MiB,
                                                  "creating", 0.0, 0.0))
    assert [v["name"] for v in client.get("/v1/volumes").json["volumes"]] == ["keep"]
    assert root.volumes.recover() == 1
    assert backend.find_volume("v-000000000000") is None
    assert root.db.one("SELECT 1 FROM volumes WHERE name='halfmade'") is None
    assert [v["name"] for v in client.get("/v1/volumes").json["volumes"]] == ["keep"]


def test_recovery_drops_attachments_that_did_not_hold(app):
    """A crash between reserving a volume for a VM and attaching its disk: at the next start the
    attachment is dropped (the VM's definition lacks the disk); a real one is kept."""
    _, client, root = app
    vm = _instance(client, name="rvm", kind="vm", image="tiny-vm", memory_mib=128)
    _volume(client, "held")
    _volume(client, "cut")
    assert client.post("/v1/instances/rvm/volumes", json={"volume": "held"}).status_code == 200
    root.db.execute("UPDATE volumes SET instance_id=?, target='vdq' WHERE name='cut'", (vm["id"],))
    assert client.get("/v1/volumes/cut").json["state"] == "attached"
    assert root.volumes.recover() == 1
    assert client.get("/v1/volumes/cut").json["state"] == "available"
    assert client.get("/v1/volumes/held").json["attachment"]["target"] == "vdb"
    # the same for a container: reserved, but the runtime's spec never got it
    c = _instance(client, name="rc", kind="container", image="busybox", command=["sleep", "60"],
                  volumes=[{"volume": "cut", "path": "/kept"}])
    _volume(client, "cut2")
    root.db.execute("UPDATE volumes SET instance_id=?, path='/lost' WHERE name='cut2'", (c["id"],))
    assert root.volumes.recover() == 1
    assert client.get("/v1/volumes/cut2").json["state"] == "available"
    assert client.get("/v1/volumes/cut").json["attachment"]["path"] == "/kept"


def test_cli_volume_verbs(agent, images):
    import json
    env = {"NODEAGENT_URL": agent.url, "NODEAGENT_TOKEN": agent.admin_token}
    out = agent.cli("volume", "create", "clivol", "--size", "16M", env=env).stdout
    assert out.startswith("clivol ") and "16 MiB" in out and "available" in out, out
    agent.cli("instance", "create", "clivm", "--kind", "vm", "--image", images["vm"]["id"], "--memory", "128",
              "--volume", "clivol:vdc:ro", env=env)
    att = json.loads(agent.cli("volume", "show", "clivol", "--json", env=env).stdout)["attachment"]
    assert (att["instance_name"], att["target"], att["readonly"]) == ("clivm", "vdc", True)
    assert "available" in agent.cli("volume", "detach", "clivol", "clivm", env=env).stdout
    agent.cli("instance", "rm", "clivm", env=env)
    assert "clivol" in agent.cli("volume", "list", env=env).stdout
    assert json.loads(agent.cli("volume", "resize", "clivol", "--size", "1G", "--json", env=env).stdout
                      )["size_bytes"] == 1024 * MiB
    assert json.loads(agent.cli("volume", "show", "clivol", "--json", env=env).stdout)["state"] == "available"
    bad = agent.cli("volume", "create", "x", "--size", "lots", env=env, check=False)
    assert bad.returncode != 0 and "10G or 512M" in bad.stderr and "Traceback" not in bad.stderr
    bad = agent.cli("volume", "resize", "clivol", "--size", "16M", env=env, check=False)
    assert bad.returncode != 0 and "only grow" in bad.stderr
    assert agent.cli("volume", "delete", "clivol", env=env).stdout.strip() == "deleted clivol"
    assert json.loads(agent.cli("volume", "list", "--json", env=env).stdout) == {"volumes": []}


def test_a_failed_attach_or_grow_changes_nothing(app):
    """The driver fails (one fault injected): the volume stays available (attach) or keeps its
    size (a driver that cannot grow a running VM's disk is refused before the pool grows)."""
    from unittest import mock

    from agent.errors import Unavailable
    _, client, root = app
    _instance(client, name="fvm", kind="vm", image="tiny-vm", memory_mib=128)
    _volume(client, "fv")
    with mock.patch.object(root.driver, "attach_disk", side_effect=Unavailable("libvirtd went away")):
        _err(client.post("/v1/instances/fvm/volumes", json={"volume": "fv"}), 503, "libvirtd")
    v = client.get("/v1/volumes/fv").json
    assert v["state"] == "available" and v["attachment"] is None
    assert [d.target for d in root.driver.disks("fvm")] == ["vda", "vdz"]
    assert client.post("/v1/instances/fvm/volumes", json={"volume": "fv"}).status_code == 200
    with mock.patch("agent.services.volumes.SupportsDiskResize", type("NoResize", (), {})):  # a driver without it
        _err(client.patch("/v1/volumes/fv", json={"size_mib": 64}), 422, "cannot grow a running")
    assert client.get("/v1/volumes/fv").json["size_bytes"] == 32 * MiB
    path = root.pools["default"].get_volume("v-" + v["id"][:12]).path
    assert os.path.getsize(path) == 32 * MiB


def test_vm_created_with_volumes(app):
    """A VM's create may name volumes: they are disks of its first definition (targets given,
    else the first free); a taken one refuses the create (409), which leaves nothing."""
    _, client, root = app
    for n in ("a1", "a2", "a3"):
        _volume(client, n)
    vm = _instance(client, name="cvm", kind="vm", image="tiny-vm", memory_mib=128,
                   volumes=[{"volume": "a1", "target": "vdc"}, {"volume": "a2", "readonly": True}])
    disks = {d.target: d for d in root.driver.disks("cvm")}
    assert set(disks) == {"vda", "vdb", "vdc", "vdz"} and disks["vdb"].readonly and not disks["vdc"].readonly
    assert client.get("/v1/volumes/a1").json["attachment"]["target"] == "vdc"
    assert client.get("/v1/volumes/a2").json["attachment"] == {
        "instance": vm["id"], "instance_name": "cvm", "target": "vdb", "path": None, "readonly": True}
    for vols, status, word in (([{"volume": "a1"}], 409, "cvm"),
                               ([{"volume": "a3", "target": "vda"}], 422, "target"),
                               ([{"volume": "a3", "target": "vdb"}, {"volume": "a1", "target": "vdb"}], 409, "twice"),
                               ([{"volume": "a3"}, {"volume": "a3"}], 409, "twice")):
        _err(client.post("/v1/instances", json={"name": "cvm2", "kind": "vm", "image": "tiny-vm",
                                                "volumes": vols}), status, word)
        assert client.get("/v1/instances/cvm2").status_code == 404
        assert client.get("/v1/volumes/a3").json["state"] == "available"
    # a2 was read-only: a container may still mount it once the VM is gone; a1 was the guest's
    assert client.delete("/v1/instances/cvm").json == {"deleted": True}
    _instance(client, name="cc", kind="container", image="busybox", command=["sleep", "1"],
              volumes=[{"volume": "a2", "path": "/d"}])
    _err(client.post("/v1/instances", json={"name": "cc2", "kind": "container", "image": "busybox",
                                            "command": ["sleep", "1"], "volumes": [{"volume": "a1", "path": "/d"}]}),
         422, "guest")
