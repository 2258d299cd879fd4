"""Snapshots through /v1/instances/{id}/snapshots on the fake driver and runtime in-process:
take (running and stopped, VM and container), list, show, restore (409 while running), delete;
every validation path (400/404/409/422, a snapshot of another instance is not found), nothing
left behind when refused or when the driver fails; a half-made snapshot (agent killed between
its row and its data) is swept at the next start; deleting an instance deletes its
snapshots; the image under a snapshot cannot be deleted; an event per change."""
from __future__ import annotations

from unittest import mock

import pytest

from agent.errors import CommandFailed
from tests.api.conftest import inprocess_app
from tests.api.test_resize import _create, _wait

VM = {"kind": "vm", "image": "tiny-vm", "memory_mib": 192, "cpus": 1}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from testbed.ocibuild import busybox_layers, write_layout
    tmp = tmp_path_factory.mktemp("snapshots")
    app, client, root = inprocess_app(tmp)
    layout = write_layout(str(tmp / "busybox"), {"latest": busybox_layers()})
    op = client.post("/v1/images", json={"name": "busybox", "source": {"type": "file", "path": layout},
                                         "format": "oci"}).json
    assert _wait(client, op)["status"] == "succeeded"
    yield app, client, root
    root.stop()


def _act(client, name, action):
    op = _wait(client, client.post(f"/v1/instances/{name}/actions", json={"action": action}).json)
    assert op["status"] == "succeeded", op
    return op["result"]["instance"]


def _err(r, status):
    assert r.status_code == status, (r.status_code, r.json)
    return r.json["error"]["message"]


def _names(client, inst):
    r = client.get(f"/v1/instances/{inst}/snapshots")
    assert r.status_code == 200, r.json
    return [s["name"] for s in r.json["snapshots"]]


def _rows(root, inst_id=None):
    q = "SELECT name, state FROM snapshots" + (" WHERE instance_id=?" if inst_id else "")
    return [tuple(r) for r in root.db.query(q, (inst_id,) if inst_id else ())]


def test_a_vm_snapshot_lifecycle(app):
    _, client, root = app
    sub = root.events.subscribe(frozenset({"snapshot"}))
    inst = _create(client, **VM, name="sn-vm")
    r = client.post("/v1/instances/sn-vm/snapshots", json={"name": "before"})
    assert r.status_code == 201, r.json
    s = r.json
    assert (s["name"], s["instance"], s["instance_id"], s["kind"]) == ("before", "sn-vm", inst["id"], "vm")
    assert (s["instance_state"], s["consistency"], s["image"]) == ("running", "crash-consistent", inst["image"])
    assert root.driver.get("sn-vm").state == "running", "taken live: the VM was not stopped"
    assert root.driver.list_snapshots("sn-vm") == ["before"]
    assert client.get("/v1/instances/sn-vm/snapshots/before").json == s
    assert client.get(f"/v1/instances/{inst['id']}/snapshots/before").json == s, "by id too"
    msg = _err(client.post("/v1/instances/sn-vm/snapshots/before/restore"), 409)
    assert "stop it first" in msg
    _act(client, "sn-vm", "stop")
    r = client.post("/v1/instances/sn-vm/snapshots", json={"name": "stopped-1"})
    assert r.status_code == 201 and r.json["consistency"] == "stopped", r.json
    r = client.post("/v1/instances/sn-vm/snapshots/before/restore")
    assert r.status_code == 200 and r.json["name"] == "before", r.json
    assert "fake-guest: disks reverted to before" in root.driver.console_log("sn-vm")
    after = client.get("/v1/instances/sn-vm").json
    assert (after["id"], after["mac"], after["state"]) == (inst["id"], inst["mac"], "stopped"), "kept in place"
    assert _names(client, "sn-vm") == ["before", "stopped-1"]
    assert client.delete("/v1/instances/sn-vm/snapshots/stopped-1").json == {"deleted": True}
    assert _names(client, "sn-vm") == ["before"] and root.driver.list_snapshots("sn-vm") == ["before"]
    events = [sub.queue.get(timeout=5)["data"] for _ in range(4)]
    assert [(e["snapshot"], e["action"]) for e in events] == [
        ("before", "created"), ("stopped-1", "created"), ("before", "restored"), ("stopped-1", "deleted")]
    assert all(e["instance"] == "sn-vm" and e["instance_id"] == inst["id"] for e in events)
    root.events._unsubscribe(sub)


def test_a_container_snapshot_lifecycle(app):
    _, client, root = app
    _create(client, kind="container", image="busybox", name="sn-ct", cpus=0.5, memory_mib=64,
            network="none", command=["sleep", "600"])
    r = client.post("/v1/instances/sn-ct/snapshots", json={"name": "c1"})
    assert r.status_code == 201 and r.json["consistency"] == "frozen", r.json
    assert root.runtime.rootfs_snapshots("sn-ct") == ["c1"]
    assert "stop it first" in _err(client.post("/v1/instances/sn-ct/snapshots/c1/restore"), 409)
    _act(client, "sn-ct", "stop")
    assert client.post("/v1/instances/sn-ct/snapshots/c1/restore").status_code == 200
    assert client.delete("/v1/instances/sn-ct/snapshots/c1").json == {"deleted": True}
    assert root.runtime.rootfs_snapshots("sn-ct") == []


def test_bad_input_is_refused_and_leaves_nothing(app):
    _, client, root = app
    inst = _create(client, **VM, name="sn-bad")
    other = _create(client, **VM, name="sn-other")
    assert client.post("/v1/instances/sn-other/snapshots", json={"name": "theirs"}).status_code == 201
    for body in ({}, {"name": ""}, {"name": "-x"}, {"name": "a/b"}, {"name": "a,b"}, {"name": "a.b"},
                 {"name": "x" * 64}, {"name": 5}, {"name": "ok", "extra": 1}):
        _err(client.post("/v1/instances/sn-bad/snapshots", json=body), 422)
    _err(client.post("/v1/instances/nope/snapshots", json={"name": "x"}), 404)
    assert client.post("/v1/instances/sn-bad/snapshots", json={"name": "one"}).status_code == 201
    assert "already has" in _err(client.post("/v1/instances/sn-bad/snapshots", json={"name": "one"}), 409)
    with mock.patch("agent.services.snapshots.MAX_PER_INSTANCE", 1):
        assert "delete one first" in _err(client.post("/v1/instances/sn-bad/snapshots", json={"name": "two"}), 409)
    # another instance's snapshot is not found through this one: show, restore, delete
    _act(client, "sn-bad", "stop")
    _err(client.get("/v1/instances/sn-bad/snapshots/theirs"), 404)
    _err(client.post("/v1/instances/sn-bad/snapshots/theirs/restore"), 404)
    _err(client.delete("/v1/instances/sn-bad/snapshots/theirs"), 404)
    _err(client.get("/v1/instances/sn-bad/snapshots/a.b"), 400)
    assert _names(client, "sn-other") == ["theirs"] and _names(client, "sn-bad") == ["one"]
    assert root.driver.list_snapshots("sn-other") == ["theirs"]
    # a driver that fails: 5xx/4xx, and neither row nor data is left
    with mock.patch.object(type(root.driver), "create_snapshot",
                           side_effect=CommandFailed("qemu-img snapshot failed: disk full", argv=["qemu-img"])):
        r = client.post("/v1/instances/sn-bad/snapshots", json={"name": "fails"})
    assert r.status_code >= 400
    assert ("fails", "creating") not in _rows(root, inst["id"]) and "fails" not in _names(client, "sn-bad")
    assert root.driver.list_snapshots("sn-bad") == ["one"]
    assert other["id"] != inst["id"]


def test_a_reader_cannot_take_restore_or_delete(app):
    _, client, root = app
    _create(client, **VM, name="sn-read")
    reader = app[0].test_client()
    reader.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {root.tokens.create('rd', 'reader')}"
    assert reader.post("/v1/instances/sn-read/snapshots", json={"name": "r"}).status_code == 403
    assert reader.get("/v1/instances/sn-read/snapshots").status_code == 200
    assert reader.post("/v1/instances/sn-read/snapshots/r/restore").status_code == 403
    assert reader.delete("/v1/instances/sn-read/snapshots/r").status_code == 403


def test_a_half_made_snapshot_is_swept_at_start(app):
    """An agent killed after the row was written (and maybe the data) but before it was marked
    ready: the row is never listed, and the next start removes the data and the row."""
    _, client, root = app
    inst = _create(client, **VM, name="sn-crash")
    # the state a kill -9 leaves between the data and the row's "ready": made as the service does
    root.db.execute("INSERT INTO snapshots (id, instance_id, name, kind, image_id, instance_state, state, "
                    "created_at) VALUES ('x1', ?, 'half', 'vm', ?, 'running', 'creating', 0)",
                    (inst["id"], inst["image"]))
    root.driver.create_snapshot("sn-crash", "half")
    assert _rows(root, inst["id"]) == [("half", "creating")], "the row a killed agent leaves"
    assert root.driver.list_snapshots("sn-crash") == ["half"], "and its data"
    assert _names(client, "sn-crash") == [], "never listed"
    _err(client.get("/v1/instances/sn-crash/snapshots/half"), 404)
    thawed = []
    with mock.patch.object(type(root.driver), "thaw", autospec=True,
                           side_effect=lambda _self, name: thawed.append(name) or True):
        assert root.snapshots.sweep() == 1
    assert _rows(root, inst["id"]) == [] and root.driver.list_snapshots("sn-crash") == []
    assert thawed == ["sn-crash"], "its guest agent may have frozen it for the snapshot: asked to thaw"


def test_deleting_an_instance_deletes_its_snapshots_and_the_image_stays_referenced(app):
    _, client, root = app
    inst = _create(client, **VM, name="sn-del")
    assert client.post("/v1/instances/sn-del/snapshots", json={"name": "keep"}).status_code == 201
    _err(client.delete("/v1/images/tiny-vm"), 409)
    r = client.post("/v1/images/gc")
    assert r.status_code == 202, r.json
    assert _wait(client, r.json)["status"] == "succeeded"
    assert client.get("/v1/images/tiny-vm").status_code == 200, "gc left the image under the snapshot"
    assert client.delete("/v1/instances/sn-del").json == {"deleted": True}
    assert _rows(root, inst["id"]) == []


# -- rebuild (agent/services/rebuild.py) --

def _rebuild(client, name, **kw):
    r = client.post(f"/v1/instances/{name}/actions", json={"action": "rebuild", **kw})
    return r


def test_rebuild_a_vm_from_its_own_and_another_image(app):
    import os
    import subprocess
    from pathlib import Path
    _, client, root = app
    disk = Path(root.config.images.import_dirs[0]) / "other.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "32M"], check=True)
    op = _wait(client, client.post("/v1/images", json={"name": "other-vm", "source": {
        "type": "file", "path": str(disk)}}).json)
    assert op["status"] == "succeeded", op
    other = op["result"]["image"]
    inst = _create(client, **VM, name="rb-vm")
    vol = root.store.pools[inst["pool"]].get_volume(inst["volumes"][0])
    with open(vol.path, "ab") as f:  # the VM "wrote" to its disk
        f.write(b"x" * 65536)
    grown = os.path.getsize(vol.path)
    r = _rebuild(client, "rb-vm")
    assert r.status_code == 202, r.json
    op = _wait(client, r.json)
    assert op["status"] == "succeeded", op
    after = op["result"]["instance"]
    assert (after["id"], after["mac"], after["state"], after["image"]) == (inst["id"], inst["mac"], "running",
                                                                          inst["image"])
    assert os.path.getsize(vol.path) < grown, "a fresh overlay"
    _act(client, "rb-vm", "stop")
    op = _wait(client, _rebuild(client, "rb-vm", image="other-vm").json)
    assert op["status"] == "succeeded", op
    after = op["result"]["instance"]
    assert (after["id"], after["state"], after["image"]) == (inst["id"], "stopped", other["id"]), "stays stopped"
    assert client.get("/v1/instances/rb-vm").json["image"] == other["id"]
    # the old image is free now, the new one is held
    assert client.delete("/v1/images/other-vm").status_code == 409


def test_rebuild_refusals_change_nothing(app):
    _, client, root = app
    inst = _create(client, **VM, name="rb-bad")
    _err(_rebuild(client, "rb-bad", image="nosuch"), 404)
    assert "cannot rebuild a vm" in _err(_rebuild(client, "rb-bad", image="busybox"), 422)
    assert "rebuild only" in _err(client.post("/v1/instances/rb-bad/actions",
                                              json={"action": "start", "image": "tiny-vm"}), 422)
    assert client.post("/v1/instances/rb-bad/snapshots", json={"name": "s"}).status_code == 201
    assert "delete them" in _err(_rebuild(client, "rb-bad"), 409)
    now = client.get("/v1/instances/rb-bad").json
    assert (now["state"], now["image"]) == ("running", inst["image"])
    ct = _create(client, kind="container", image="busybox", name="rb-ctbad", cpus=0.5, memory_mib=64,
                 network="none", command=["sleep", "600"])
    assert "cannot rebuild a container" in _err(_rebuild(client, "rb-ctbad", image="tiny-vm"), 422)
    assert client.get("/v1/instances/rb-ctbad").json["state"] == ct["state"] == "running"


def test_rebuild_a_container(app):
    _, client, root = app
    inst = _create(client, kind="container", image="busybox", name="rb-ct", cpus=0.5, memory_mib=64,
                   network="none", command=["sleep", "600"])
    op = _wait(client, _rebuild(client, "rb-ct").json)
    assert op["status"] == "succeeded", op
    assert (op["result"]["instance"]["id"], op["result"]["instance"]["state"]) == (inst["id"], "running")
    assert "fake: rootfs reset to its image\n" in root.runtime.logs("rb-ct")


def test_an_instance_with_snapshots_is_not_migrated(app):
    _, client, _ = app
    _create(client, **VM, name="sn-mig")
    assert client.post("/v1/instances/sn-mig/snapshots", json={"name": "s"}).status_code == 201
    r = client.post("/v1/migrations", json={"instance": "sn-mig", "destination": "peer1", "mode": "live"})
    assert "has snapshots" in _err(r, 422)
    assert client.get("/v1/instances/sn-mig").json["state"] == "running"
