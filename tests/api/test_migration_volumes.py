"""A container's volumes move with its cold or refresh migration (two in-process agents with the
fake driver and runtime, real local pools and real ext4 volume files, reaching each other over
real HTTP: the harness of test_migration_controls): the destination gets the volume records
(same id and name, attached at the same path) and their files' contents in fresh filesystems;
the source's go only once the move finished. A refused move changes nothing; a VM's volumes are
still refused (422, saying so)."""
from __future__ import annotations

import os
import tempfile
import uuid

import pytest

from storage import mounts
from tests.api.test_migration_controls import _ct_image, _migrate, _wait, peered_hosts

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    for src, dst in peered_hosts(tmp_path_factory.mktemp("migvol")):
        img = src.client.post("/v1/images", json={"name": "tiny-ct", "format": "oci",
                                                  "source": {"type": "file", "path": str(_ct_image(src))}})
        assert _wait(src.client, img.json)["status"] == "succeeded"
        yield src, dst


def _volume_file(host, vol: dict) -> str:
    return host.root.pools[vol["pool"]].get_volume("v-" + vol["id"][:12]).path


def _in_volume(path: str, fn):
    point = tempfile.mkdtemp(prefix="nodeagent-migvol-")
    mounts.mount_fs_image(path, point)
    try:
        return fn(point)
    finally:
        mounts.unmount(point)
        os.rmdir(point)


def _container(host, name, volumes):
    r = host.client.post("/v1/instances", json={"name": name, "kind": "container", "image": "tiny-ct",
                                                "memory_mib": 64, "network": "none", "volumes": volumes,
                                                "command": ["/bin/sh", "-c", "sleep 600"]})
    assert r.status_code == 202, r.json
    assert _wait(host.client, r.json)["status"] == "succeeded"


def test_a_containers_volumes_move_with_it(hosts):
    src, dst = hosts
    name = f"mv-{uuid.uuid4().hex[:6]}"
    vols = {}
    for v in ("mva", "mvb"):
        r = src.client.post("/v1/volumes", json={"name": f"{v}-{name[3:]}", "size_mib": 24})
        assert r.status_code == 201, r.json
        vols[v] = r.json

    def fill(point):
        os.makedirs(os.path.join(point, "sub"))
        with open(os.path.join(point, "sub", "data"), "wb") as f:
            f.write(b"z" * 300_000)
        owner = src.root.runtime.idmap.host_id + 5  # the container's uid 5, as the source maps it
        os.chown(os.path.join(point, "sub", "data"), owner, owner)
    _in_volume(_volume_file(src, vols["mva"]), fill)
    src_files = {k: _volume_file(src, v) for k, v in vols.items()}
    _container(src, name, [{"volume": vols["mva"]["name"], "path": "/data"},
                           {"volume": vols["mvb"]["name"], "path": "/logs", "readonly": True}])
    with dst.root.events.subscribe({"volume"}) as sub:
        op = _wait(src.client, _migrate(src, name, mode="refresh").json, timeout=60)
        assert op["status"] == "succeeded", op
        assert {(e := sub.get(5))["data"]["change"] for _ in range(2)} == {"arrived"}, e
    moved = dst.client.get(f"/v1/instances/{name}").json
    assert moved["state"] == "running"
    here = {v["name"]: v for v in dst.client.get(f"/v1/instances/{name}/volumes").json["volumes"]}
    a, b = here[vols["mva"]["name"]], here[vols["mvb"]["name"]]
    assert (a["id"], a["size_bytes"], a["attachment"]["path"], a["attachment"]["readonly"]) == (
        vols["mva"]["id"], 24 * MiB, "/data", False)
    assert (b["id"], b["attachment"]["path"], b["attachment"]["readonly"]) == (vols["mvb"]["id"], "/logs", True)
    assert sorted(m.destination for m in dst.root.runtime.volumes(name)) == ["/data", "/logs"]

    def read(point):
        st = os.stat(os.path.join(point, "sub", "data"))
        with open(os.path.join(point, "sub", "data"), "rb") as f:
            return f.read(), st.st_uid
    data, uid = _in_volume(_volume_file(dst, a), read)
    assert data == b"z" * 300_000
    assert uid == dst.root.runtime.idmap.host_id + 5, "owners shifted to the destination's map"
    # the source's volumes went with it
    for v in vols.values():
        assert src.client.get(f"/v1/volumes/{v['id']}").status_code == 404
    assert not any(os.path.exists(p) for p in src_files.values())
    # the destination owns them now: detach and delete work there
    assert dst.client.delete(f"/v1/instances/{name}").status_code == 200
    for v in vols.values():
        assert dst.client.delete(f"/v1/volumes/{v['id']}").json == {"deleted": True}


def test_a_refused_move_changes_nothing(hosts):
    src, dst = hosts
    name = f"mr-{uuid.uuid4().hex[:6]}"
    vname = f"mrv-{name[3:]}"
    assert src.client.post("/v1/volumes", json={"name": vname, "size_mib": 16}).status_code == 201
    assert dst.client.post("/v1/volumes", json={"name": vname, "size_mib": 16}).status_code == 201  # taken there
    _container(src, name, [{"volume": vname, "path": "/data"}])
    op = _wait(src.client, _migrate(src, name, mode="cold").json, timeout=60)
    assert op["status"] == "failed" and vname in op["error"]["message"], op
    assert src.client.get(f"/v1/instances/{name}").json["state"] == "running"
    assert src.client.get(f"/v1/volumes/{vname}").json["attachment"]["instance_name"] == name
    assert [m.destination for m in src.root.runtime.volumes(name)] == ["/data"], "mounted again"
    assert dst.client.get(f"/v1/instances/{name}").status_code == 404
    assert [v["name"] for v in dst.client.get("/v1/volumes").json["volumes"]] == [vname], "nothing left there"
    # an exported volume does not move (a VM's volumes move: tests/api/test_vm_volume_migration.py)
    r = src.client.post("/v1/exports", json={"volume": vname, "readonly": True, "name": f"x-{name}"})
    assert r.status_code == 201, r.json
    r = _migrate(src, name, mode="cold")
    assert r.status_code == 409 and "exported" in r.json["error"]["message"], r.json
    assert src.client.delete(f"/v1/exports/x-{name}").status_code == 200
    src.client.delete(f"/v1/instances/{name}")
    dst.client.delete(f"/v1/volumes/{vname}")
