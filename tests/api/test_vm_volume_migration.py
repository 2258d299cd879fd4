"""A VM's volumes move with its migration (live: the hypervisor's storage copy into raw files
the destination made; stopped: the raw bytes streamed), on two in-process agents with fake
drivers and real local pools that reach each other over real HTTP: the volume arrives with
its id, name and target, in the destination's own pool and path; refusals (a name taken there,
a pool it lacks) and failures leave the VM running here with its volumes and nothing there;
a peer's volume fields and streams are checked like any other input."""
from __future__ import annotations

import os
import uuid
from unittest import mock

import pytest

from tests.api.test_migration_controls import _migrate, _vm, _wait, peered_hosts

MiB = 1024 * 1024
MARKER = b"nodeagent-volume-marker"
MARKER_AT = 5 * MiB + 123  # past the ext4 metadata, not on a chunk boundary


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    yield from peered_hosts(tmp_path_factory.mktemp("vmvolmig"))


@pytest.fixture
def src(hosts):
    s, d = hosts
    for h in (s, d):
        h.root.driver.userfaultfd, h.root.driver.converges, h.root.driver.postcopy_link_cut = True, True, False
    return s


def _volume(host, name=None, size_mib=16, **body) -> dict:
    r = host.client.post("/v1/volumes", json={"name": name or f"v-{uuid.uuid4().hex[:6]}", "size_mib": size_mib,
                                              **body})
    assert r.status_code == 201, r.json
    return r.json


def _attach(host, vm: str, vol: dict, **body) -> dict:
    r = host.client.post(f"/v1/instances/{vm}/volumes", json={"volume": vol["name"], **body})
    assert r.status_code == 200, r.json
    return r.json


def _file(host, vol: dict) -> str:
    return host.root.pools[vol["pool"]].get_volume("v-" + vol["id"][:12]).path


def _home(host) -> str:
    return str(host.root.config.state_path.parent) + "/"


def _mark(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(MARKER_AT)
        f.write(MARKER)


def _marked(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(MARKER_AT)
        return f.read(len(MARKER)) == MARKER


def _nothing_there(dst, name: str, vol: dict) -> None:
    assert dst.client.get(f"/v1/instances/{name}").status_code == 404
    assert dst.client.get(f"/v1/volumes/{vol['id']}").status_code == 404
    assert not dst.root.volumes.db.query("SELECT * FROM volumes WHERE id=?", (vol["id"],))
    assert dst.root.pools["default"].find_volume("v-" + vol["id"][:12]) is None


def _kept_here(src, name: str, vol: dict, target="vdb") -> None:
    assert src.client.get(f"/v1/instances/{name}").json["state"] == "running"
    att = src.client.get(f"/v1/volumes/{vol['id']}").json["attachment"]
    assert att["instance_name"] == name and att["target"] == target, att
    assert target in [d.target for d in src.root.driver.disks(name)]


def test_a_running_vms_volumes_move_live_to_the_destinations_own_files(src, hosts):
    dst = hosts[1]
    name = _vm(src)
    vol, ro = _volume(src), _volume(src, size_mib=8)
    _attach(src, name, vol)
    _attach(src, name, ro, target="vdx", readonly=True)
    _mark(_file(src, ro))  # a read-only volume is streamed (the hypervisor copies writable disks only)
    here = {v["id"]: _file(src, v) for v in (vol, ro)}
    op = _wait(src.client, _migrate(src, name).json)
    assert op["status"] == "succeeded", op
    o = src.root.driver.migrations[-1]["options"]
    assert o.copy_storage == "incremental"
    for v, target in ((vol, "vdb"), (ro, "vdx")):
        there = dst.client.get(f"/v1/volumes/{v['id']}").json
        assert (there["name"], there["size_bytes"], there["attachment"]["instance_name"],
                there["attachment"]["target"]) == (v["name"], v["size_bytes"], name, target), there
        path = _file(dst, v)
        assert o.disk_sources[target] == path and path.startswith(_home(dst))
        assert {d.target: d.source for d in dst.root.driver.disks(name)}[target] == path
        assert src.client.get(f"/v1/volumes/{v['id']}").status_code == 404
        assert not os.path.exists(here[v["id"]])
    assert _marked(_file(dst, ro))
    assert [x["name"] for x in dst.client.get(f"/v1/instances/{name}/volumes").json["volumes"]] == \
        [vol["name"], ro["name"]]
    # it is theirs there: detached, deleted
    assert dst.client.delete(f"/v1/instances/{name}/volumes/{vol['name']}").status_code == 200
    assert dst.client.delete(f"/v1/volumes/{vol['id']}").json == {"deleted": True}


def test_a_stopped_vms_volume_moves_offline_byte_for_byte_and_sparse(src, hosts):
    dst = hosts[1]
    name = _vm(src, start=False)
    vol = _volume(src, size_mib=32)
    _attach(src, name, vol)
    _mark(_file(src, vol))
    op = _wait(src.client, _migrate(src, name, mode="cold").json)
    assert op["status"] == "succeeded", op
    assert op["result"]["bytes"] >= 32 * MiB
    there = dst.client.get(f"/v1/volumes/{vol['id']}").json
    assert there["attachment"]["instance_name"] == name and there["attachment"]["target"] == "vdb"
    path = _file(dst, vol)
    assert _marked(path) and os.path.getsize(path) == 32 * MiB
    assert os.stat(path).st_blocks * 512 < 8 * MiB  # the zeros stayed holes
    assert {d.target: d.source for d in dst.root.driver.disks(name)}["vdb"] == path
    assert dst.client.get(f"/v1/instances/{name}").json["state"] == "stopped"
    assert src.client.get(f"/v1/volumes/{vol['id']}").status_code == 404


def test_a_volume_name_taken_on_the_destination_is_409_and_nothing_moves(src, hosts):
    dst = hosts[1]
    name = _vm(src)
    vol = _volume(src)
    _attach(src, name, vol)
    taken = _volume(dst, name=vol["name"])
    op = _wait(src.client, _migrate(src, name).json)
    assert op["status"] == "failed" and op["error"]["code"] == "conflict", op
    assert vol["name"] in op["error"]["message"] and "delete or rename" in op["error"]["message"]
    _kept_here(src, name, vol)
    assert dst.client.get(f"/v1/instances/{name}").status_code == 404
    assert dst.client.get(f"/v1/volumes/{taken['id']}").json["state"] == "available"  # theirs: untouched
    assert dst.root.pools["default"].find_volume("v-" + vol["id"][:12]) is None
    assert dst.client.delete(f"/v1/volumes/{taken['id']}").json == {"deleted": True}


def test_a_pool_the_destination_lacks_is_422_and_nothing_moves(src, hosts, tmp_path):
    from agent import config as agent_config
    from storage.local import LocalBackend
    dst = hosts[1]
    extra = agent_config.parse({"state_dir": str(tmp_path / "s"), "pools": {
        "extra": {"kind": "local", "path": str(tmp_path / "extra")}}}).pools["extra"]
    src.root.config.pools["extra"] = extra
    src.root.pools["extra"] = LocalBackend("extra", path=str(tmp_path / "extra"))
    try:
        name = _vm(src)
        vol = _volume(src, pool="extra")
        _attach(src, name, vol)
        op = _wait(src.client, _migrate(src, name).json)
        assert op["status"] == "failed" and op["error"]["code"] == "unprocessable", op
        assert "pool 'extra'" in op["error"]["message"] and "not configured here" in op["error"]["message"]
        _kept_here(src, name, vol)
        _nothing_there(dst, name, vol)
        assert src.client.delete(f"/v1/instances/{name}").json == {"deleted": True}
        assert src.client.delete(f"/v1/volumes/{vol['id']}").json == {"deleted": True}
    finally:
        src.root.pools.pop("extra")
        src.root.config.pools.pop("extra")


def test_a_failed_copy_leaves_the_vm_running_here_with_its_volume_and_nothing_there(src, hosts):
    from agent.errors import CommandFailed
    dst = hosts[1]
    name = _vm(src)
    vol = _volume(src)
    _attach(src, name, vol)
    made = {}

    def fail(vm, uri, options, **kw):
        made.update(options.disk_sources)  # the destination made the files
        assert os.path.exists(options.disk_sources["vdb"])
        raise CommandFailed("migration failed: injected")
    with mock.patch.object(type(src.root.driver), "migrate", side_effect=fail, autospec=False):
        op = _wait(src.client, _migrate(src, name).json)
    assert op["status"] == "failed" and "injected" in op["error"]["message"], op
    _kept_here(src, name, vol)
    _nothing_there(dst, name, vol)
    assert not os.path.exists(made["vdb"])
    assert os.path.exists(_file(src, vol))
    op = _wait(src.client, _migrate(src, name).json)  # and it moves once the fault is gone
    assert op["status"] == "succeeded", op
    assert dst.client.get(f"/v1/volumes/{vol['id']}").json["attachment"]["instance_name"] == name


# -- a hostile peer: the destination checks every volume field and stream --

def _as_peer(src, dst):
    """``dst``'s API with the token ``src`` calls it with as its peer."""
    c = dst.app.test_client()
    c.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {src.root.config.peers['dst'].token}"
    return c


def _prepare_body(src, inst_name, **vol):
    img = src.client.get("/v1/images/tiny-vm").json
    v = {"id": uuid.uuid4().hex, "name": f"h-{uuid.uuid4().hex[:6]}", "size_bytes": 8 * MiB, "target": "vdb",
         "pool": "default", **vol}
    v = {k: x for k, x in v.items() if x is not None}
    inst_id = uuid.uuid4().hex
    return {"instance": {"id": inst_id, "name": inst_name, "kind": "vm", "pool": "default",
                         "volumes": [f"vm-{inst_id[:12]}-disk"]},
            "spec": {"name": inst_name, "kind": "vm", "image": "tiny-vm", "memory_mib": 64, "network": "none"},
            "image": {"id": img["id"], "name": "tiny-vm", "format": img["format"], "kind": "vm"},
            "attached_volumes": [v]}


@pytest.mark.parametrize("vol, says", [
    ({"target": "vda"}, "target"),
    ({"target": "vdz"}, "target"),
    ({"target": None, "path": "/data"}, "target and only that"),
    ({"path": "/data"}, "target and only that"),
    ({"pool": None}, "names its pool"),
    ({"pool": "../etc"}, "pool"),
    ({"id": "../../x"}, "id"),
    ({"size_bytes": 1}, "size_bytes"),
    ({"name": "a/b"}, "name"),
    ({"shared_uri": "rbd:pool/navol.v-0123456789ab"}, "not shared storage"),  # its pool here is local
    ({"shared_uri": "/etc/passwd"}, "shared_uri"),
])
def test_a_peers_bad_volume_fields_are_422_and_leave_nothing(src, hosts, vol, says):
    dst = hosts[1]
    name = f"h-{uuid.uuid4().hex[:6]}"
    body = _prepare_body(src, name, **vol)
    r = _as_peer(src, dst).post("/v1/peer/migrations", json=body)
    assert r.status_code == 422 and says in r.json["error"]["message"], r.json
    assert dst.client.get(f"/v1/instances/{name}").status_code == 404


def test_a_peers_volume_stream_must_be_exactly_its_size(src, hosts):
    dst = hosts[1]
    peer = _as_peer(src, dst)
    name = f"h-{uuid.uuid4().hex[:6]}"
    body = _prepare_body(src, name)
    r = peer.post("/v1/peer/migrations", json=body)
    assert r.status_code == 200, r.json
    inst_id, vid = body["instance"]["id"], body["attached_volumes"][0]["id"]
    path = r.json["disk_sources"]["vdb"]
    assert path.startswith(_home(dst))  # its own file, not one the peer named
    url = f"/v1/peer/migrations/{inst_id}/volumes/{vid}"
    for data, says in ((b"x" * (8 * MiB + 1), "longer"), (b"x" * 100, "ended after")):
        r = peer.put(url, data=data, content_type="application/octet-stream")
        assert r.status_code == 422 and says in r.json["error"]["message"], r.json
        assert os.path.getsize(path) == 8 * MiB
    r = peer.put(f"/v1/peer/migrations/{inst_id}/volumes/{uuid.uuid4().hex}", data=b"x",
                 content_type="application/octet-stream")
    assert r.status_code == 404, r.json
    assert peer.delete(f"/v1/peer/migrations/{inst_id}").json == {"deleted": True}
    assert not os.path.exists(path)
    assert not dst.root.volumes.db.query("SELECT * FROM volumes WHERE id=?", (vid,))


# -- snapshots: a stopped VM's (internal snapshots of its disk layer) move with its offline move --

def _disk(host, name: str) -> str:
    from agent.services.assembly import root_volume
    inst = host.client.get(f"/v1/instances/{name}").json
    return host.root.pools[inst["pool"]].get_volume(root_volume("vm", inst["id"])).path


def _qemu_snapshots(path: str) -> list[str]:
    import subprocess
    out = subprocess.run(["qemu-img", "snapshot", "-U", "-l", path], capture_output=True, text=True).stdout
    return [ln.split()[1] for ln in out.splitlines()[2:] if len(ln.split()) > 1]


def test_a_stopped_vms_snapshots_move_with_it_and_a_running_ones_are_refused(src, hosts):
    import subprocess
    dst = hosts[1]
    running = _vm(src)
    assert src.client.post(f"/v1/instances/{running}/snapshots", json={"name": "s1"}).status_code == 201
    r = _migrate(src, running)
    assert r.status_code == 422 and "stop the VM first" in r.json["error"]["message"], r.json
    name = _vm(src, start=False)
    snap = src.client.post(f"/v1/instances/{name}/snapshots", json={"name": "s1"}).json
    # the fake driver keeps its snapshots in memory: put the real one in the disk layer, as libvirt's does
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", _disk(src, name)], check=True)
    op = _wait(src.client, _migrate(src, name, mode="cold").json)
    assert op["status"] == "succeeded", op
    (there,) = dst.client.get(f"/v1/instances/{name}/snapshots").json["snapshots"]
    assert (there["name"], there["instance_state"], there["created_at"]) == \
        ("s1", snap["instance_state"], snap["created_at"])
    assert _qemu_snapshots(_disk(dst, name)) == ["s1"]
    assert not src.root.snapshots.db.query("SELECT * FROM snapshots WHERE instance_id=?", (there["instance_id"],))


def test_a_peers_snapshot_its_disk_lacks_is_refused_and_the_vm_stays(src, hosts):
    dst = hosts[1]
    name = _vm(src, start=False)
    assert src.client.post(f"/v1/instances/{name}/snapshots", json={"name": "gone"}).status_code == 201
    op = _wait(src.client, _migrate(src, name, mode="cold").json)  # the fake's snapshot is not in the disk
    assert op["status"] == "failed" and "without its snapshot(s) gone" in op["error"]["message"], op
    assert src.client.get(f"/v1/instances/{name}").json["state"] == "stopped"
    assert [s["name"] for s in src.client.get(f"/v1/instances/{name}/snapshots").json["snapshots"]] == ["gone"]
    assert dst.client.get(f"/v1/instances/{name}").status_code == 404
    assert name not in [d.name for d in dst.root.driver.list()]
