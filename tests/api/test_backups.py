"""Backups through /v1/backups on the fake driver in-process, with a real local pool: a VM backed
up, listed, downloaded, uploaded again and restored as a new VM whose disk holds what the first
one's did; every refusal (400/403/404/409/422) and every hostile artifact (not a tar, no manifest
first, unlisted, linked, oversized or corrupt members, a disk layer pointing at a host file)
leaves nothing behind: no backup, staging dir, partial file, row, image or instance. A failed
export leaves no partial artifact. `nodeagent backup ...` against a real server."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from unittest import mock

import pytest

from agent.errors import CommandFailed
from tests.api.conftest import inprocess_app
from tests.api.test_resize import _create, _wait

VM = {"kind": "vm", "image": "tiny-vm", "memory_mib": 192, "cpus": 1}
PATTERN = "write -P 0x3c 2M 128k"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("backups")
    app, client, root = inprocess_app(tmp)
    yield app, client, root
    root.stop()


def _err(r, status, code=None):
    assert r.status_code == status, (r.status_code, r.json)
    if code:
        assert r.json["error"]["code"] == code, r.json
    return r.json["error"]["message"]


def _disk(root, inst_id):
    return root.pools["default"].get_volume(f"i-{inst_id[:12]}-disk").path


def _leftovers(root):
    """Everything an unfinished backup, upload or restore could leave."""
    bdir = os.path.join(root.pools["default"].path, "backups")
    return {"rows": [tuple(r) for r in root.db.query("SELECT id, state FROM backups")],
            "staging": [n for n in os.listdir(root.store.tmp_dir) if n.startswith("backup-")],
            "partial": [n for n in os.listdir(bdir) if n.startswith(".") or not n.endswith(".json")
                        and n[:-4] + ".json" not in os.listdir(bdir)]}


CLEAN = {"rows": [], "staging": [], "partial": []}


def _backup(client, name):
    r = client.post(f"/v1/instances/{name}/backups", json={})
    assert r.status_code == 202, r.json
    op = _wait(client, r.json)
    assert op["status"] == "succeeded", op
    return op["result"]["backup"]


@pytest.fixture(scope="module")
def artifact(app):
    """A backup of a running VM whose disk holds PATTERN, and its bytes."""
    _, client, root = app
    inst = _create(client, **VM, name="bk-a", start=False)
    w = subprocess.run(["qemu-io", "-f", "qcow2", "-c", PATTERN, _disk(root, inst["id"])], capture_output=True)
    assert w.returncode == 0, w.stderr
    _wait(client, client.post("/v1/instances/bk-a/actions", json={"action": "start"}).json)
    b = _backup(client, "bk-a")
    data = client.get(f"/v1/backups/{b['id']}/content").data
    return inst, b, data


def test_a_vm_backup_is_listed_downloaded_and_restored_as_a_new_vm(app, artifact):
    _, client, root = app
    inst, b, data = artifact
    sub = root.events.subscribe(frozenset({"backup"}))
    assert (b["kind"], b["instance"], b["instance_id"], b["pool"]) == ("vm", "bk-a", inst["id"], "default")
    assert (b["instance_state"], b["consistency"], b["image"]) == ("running", "crash-consistent", inst["image"])
    assert root.driver.list_snapshots("bk-a") == [], "no snapshot of the copy is left"
    assert client.get(f"/v1/backups/{b['id']}").json == b
    assert [x["id"] for x in client.get("/v1/backups").json["backups"]] == [b["id"]]
    assert client.get("/v1/backups?pool=default").json["backups"] == [b]
    assert (len(data), hashlib.sha256(data).hexdigest()) == (b["size"], b["sha256"])
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        names = t.getnames()
        manifest = json.load(t.extractfile("manifest.json"))
    assert names[0] == "manifest.json" and sorted(names[1:]) == ["disk.qcow2", "image.qcow2"], names
    assert manifest["spec"]["memory_mib"] == 192 and "image_id" not in manifest["spec"]
    assert {m["role"] for m in manifest["members"]} == {"image", "disk"}

    r = client.post(f"/v1/backups/{b['id']}/restore", json={"name": "bk-b"})
    assert r.status_code == 202, r.json
    op = _wait(client, r.json)
    assert op["status"] == "succeeded", op
    new = op["result"]["instance"]
    assert (new["name"], new["state"], new["image"], new["memory_mib"]) == ("bk-b", "running", inst["image"], 192)
    assert new["id"] != inst["id"] and new["mac"] != inst["mac"]
    rd = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-U", "-c", PATTERN.replace("write", "read"),
                         _disk(root, new["id"])], capture_output=True, text=True)
    assert rd.returncode == 0 and "verification failed" not in rd.stdout, rd.stdout
    assert _err(client.post(f"/v1/backups/{b['id']}/restore", json={"name": "bk-b"}), 409)
    events = [sub.get(timeout=1)["data"] for _ in range(1)]
    assert events[0]["action"] == "restored" and events[0]["restored_as"] == "bk-b", events
    assert client.delete("/v1/instances/bk-b").status_code == 200
    assert _leftovers(root) == CLEAN


def test_upload_stores_a_checked_copy_and_delete_removes_it(app, artifact):
    _, client, root = app
    _, b, data = artifact
    r = client.post("/v1/backups", data=data)
    assert r.status_code == 201, r.json
    up = r.json
    assert up["id"] != b["id"] and (up["instance"], up["kind"], up["pool"]) == ("bk-a", "vm", "default")
    assert up["data_bytes"] == b["data_bytes"]
    assert {x["id"] for x in client.get("/v1/backups").json["backups"]} == {b["id"], up["id"]}
    assert client.delete(f"/v1/backups/{up['id']}").json == {"deleted": True}
    assert client.delete(f"/v1/backups/{up['id']}").json == {"deleted": False}
    _err(client.get(f"/v1/backups/{up['id']}"), 404)
    assert _leftovers(root) == CLEAN


def _tar(*members) -> bytes:
    """A tar of (name, bytes | None for a symlink to /etc/passwd) in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
                t.addfile(ti)
            else:
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _members(data: bytes) -> tuple[dict, dict]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        manifest = json.load(t.extractfile("manifest.json"))
        return manifest, {m["name"]: t.extractfile(m["name"]).read() for m in manifest["members"]}


def _entry(name, role, data):
    return {"name": name, "role": role, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_hostile_uploads_are_refused_and_leave_nothing(app, artifact, tmp_path):
    _, client, root = app
    _, _, data = artifact
    manifest, files = _members(data)
    before = client.get("/v1/backups").json
    mj = json.dumps(manifest).encode()
    flipped = bytearray(data)
    flipped[len(flipped) - 4000] ^= 1  # inside the last member
    cases = {
        "not a tar": b"x" * 5000,
        "empty": b"",
        "manifest not first": _tar(*((n, files[n]) for n in files), ("manifest.json", mj)),
        "a member changed": bytes(flipped),
        "truncated": data[:len(data) // 2],
        "a member missing": _tar(("manifest.json", mj), ("image.qcow2", files["image.qcow2"])),
        "an unlisted member": _tar(("manifest.json", mj), *files.items(), ("../../etc/cron.d/x", b"* * * * * x")),
        "a symlink member": _tar(("manifest.json", json.dumps({**manifest, "members": manifest["members"] + [
            _entry("link", "disk", b"")]}).encode()), *files.items(), ("link", None)),
        "a path as a member name": _tar(("manifest.json", json.dumps({**manifest, "members": [
            _entry("../x", "image", b"a")]}).encode()), ("../x", b"a")),
        "a manifest of another format": _tar(("manifest.json", json.dumps({**manifest, "version": 99}).encode()),
                                             *files.items()),
        "a manifest that is no JSON": _tar(("manifest.json", b"{"), *files.items()),
    }
    for why, body in cases.items():
        r = client.post("/v1/backups", data=body)
        assert r.status_code == 422, (why, r.status_code, r.json)
        assert r.json["error"]["code"] == "unprocessable", (why, r.json)
        assert client.get("/v1/backups").json == before, why
        assert _leftovers(root) == CLEAN, why


def test_a_disk_layer_pointing_at_a_host_file_is_refused_before_anything_is_made(app, artifact, tmp_path):
    _, client, root = app
    _, _, data = artifact
    manifest, files = _members(data)
    evil = tmp_path / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow", "-u",
                    str(evil), "16M"], check=True)
    disk = evil.read_bytes()
    members = [m if m["role"] != "disk" else _entry("disk.qcow2", "disk", disk) for m in manifest["members"]]
    body = _tar(("manifest.json", json.dumps({**manifest, "members": members}).encode()),
                ("image.qcow2", files["image.qcow2"]), ("disk.qcow2", disk))
    up = client.post("/v1/backups", data=body)
    assert up.status_code == 201, up.json  # well-formed and checksummed: it is stored, then refused at restore
    instances = client.get("/v1/instances").json
    images = client.get("/v1/images").json
    op = _wait(client, client.post(f"/v1/backups/{up.json['id']}/restore", json={"name": "bk-evil"}).json)
    assert op["status"] == "failed" and op["error"]["code"] == "unprocessable", op
    assert "backing file" in op["error"]["message"], op["error"]
    assert client.get("/v1/instances").json == instances and client.get("/v1/images").json == images
    assert _leftovers(root) == CLEAN
    client.delete(f"/v1/backups/{up.json['id']}")


def test_refusals(app, artifact):
    _, client, root = app
    _, b, _ = artifact
    _err(client.post("/v1/instances/nosuch/backups", json={}), 404)
    _err(client.post("/v1/instances/bk-a/backups", json={"pool": "nosuch"}), 404)
    _err(client.post("/v1/instances/bk-a/backups", json={"pool": "a/b"}), 422)
    _err(client.post("/v1/instances/bk-a/backups", json={"file": "/etc/passwd"}), 422)  # no host paths
    _err(client.get("/v1/backups/not-an-id"), 400)
    _err(client.get("/v1/backups/" + "0" * 32), 404)
    _err(client.get("/v1/backups/" + "0" * 32 + "/content"), 404)
    _err(client.post("/v1/backups/" + "0" * 32 + "/restore", json={"name": "x"}), 404)
    _err(client.post(f"/v1/backups/{b['id']}/restore", json={"name": "bk-a"}), 409)
    _err(client.post(f"/v1/backups/{b['id']}/restore", json={"name": "Bad_Name"}), 422)
    _err(client.post(f"/v1/backups/{b['id']}/restore", json={"name": "ok", "pool": "nosuch"}), 404)
    _err(client.get("/v1/backups?pool=nosuch"), 404)
    reader = app[0].test_client()
    reader.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {root.tokens.create('rd', 'reader')}"
    assert reader.get("/v1/backups").status_code == 200
    _err(reader.get(f"/v1/backups/{b['id']}/content"), 403)
    _err(reader.post("/v1/instances/bk-a/backups", json={}), 403)
    _err(reader.post("/v1/backups", data=b"x"), 403)
    _err(reader.post(f"/v1/backups/{b['id']}/restore", json={"name": "rd"}), 403)
    _err(reader.delete(f"/v1/backups/{b['id']}"), 403)
    assert _leftovers(root) == CLEAN


def test_a_failed_export_leaves_no_partial_backup(app, artifact):
    _, client, root = app
    before = client.get("/v1/backups").json
    with mock.patch.object(type(root.driver), "export_disk", side_effect=CommandFailed("qemu-img convert failed")):
        op = _wait(client, client.post("/v1/instances/bk-a/backups", json={}).json)
    assert op["status"] == "failed" and "convert failed" in op["error"]["message"], op
    assert client.get("/v1/backups").json == before
    assert _leftovers(root) == CLEAN


def test_cli_backup_verbs(agent, admin, images, tmp_path):
    env = {"NODEAGENT_URL": agent.url, "NODEAGENT_TOKEN": agent.admin_token}

    def cli(*args, check=True):
        return agent.cli(*args, env=env, check=check)

    made = []
    try:
        cli("instance", "create", "clibk", "--kind", "vm", "--image", "tiny-vm", "--memory", "128")
        b = json.loads(cli("backup", "create", "clibk", "--json").stdout)["result"]["backup"]
        made.append(b["id"])
        assert b["instance"] == "clibk" and b["consistency"] == "crash-consistent", b
        assert b["id"] in [x["id"] for x in json.loads(cli("backup", "list", "--json").stdout)["backups"]]
        assert "clibk" in cli("backup", "list").stdout
        assert json.loads(cli("backup", "show", b["id"], "--json").stdout)["sha256"] == b["sha256"]
        out = tmp_path / "b.tar"
        r = cli("backup", "download", b["id"], str(out))
        assert f"sha256 {b['sha256']}" in r.stderr and hashlib.sha256(out.read_bytes()).hexdigest() == b["sha256"]
        up = json.loads(cli("backup", "upload", str(out), "--json").stdout)
        made.append(up["id"])
        assert up["instance"] == "clibk" and up["id"] != b["id"]
        bad = bytearray(out.read_bytes())
        bad[len(bad) // 2] ^= 0xFF
        out.write_bytes(bytes(bad))
        r = cli("backup", "upload", str(out), check=False)
        assert r.returncode == 1 and "checksum" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert cli("backup", "restore", up["id"], "clibk2", "--no-start").stdout.startswith("clibk2 ")
        assert admin.get("/v1/instances/clibk2").json()["state"] == "stopped"
        r = cli("backup", "restore", up["id"], "clibk2", check=False)
        assert r.returncode == 1 and "exists" in r.stderr
        assert cli("backup", "delete", up["id"]).stdout.strip() == f"deleted backup {up['id']}"
        assert up["id"] not in cli("backup", "list", "--json").stdout
    finally:
        for name in ("clibk", "clibk2"):
            admin.delete(f"/v1/instances/{name}")
        for i in made:
            admin.delete(f"/v1/backups/{i}")


# -- attached volumes --

def _volume(client, name, size_mib=32):
    r = client.post("/v1/volumes", json={"name": name, "size_mib": size_mib})
    assert r.status_code == 201, r.json
    return r.json


def _vol_path(root, ref):
    return root.volumes.export_source(ref).volume.path


def _volumes_clean(client, root, before):
    """No volume but those in ``before`` (names), and no pool file of another."""
    names = {v["name"] for v in client.get("/v1/volumes").json["volumes"]}
    assert names == before, names
    rows = [tuple(r) for r in root.db.query("SELECT name, state FROM volumes")]
    assert {r[0] for r in rows} == before, rows


def test_a_vm_with_a_volume_is_backed_up_and_restored_with_fresh_volumes(app):
    _, client, root = app
    vol = _volume(client, "bkv")
    _create(client, **VM, name="bk-v", volumes=[{"volume": "bkv", "target": "vdc"}])
    w = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", _vol_path(root, "bkv")],
                       capture_output=True)
    assert w.returncode == 0, w.stderr
    b = _backup(client, "bk-v")
    assert client.get("/v1/instances/bk-v").json["state"] == "running", "resumed after its volumes' copy"
    manifest, files = _members(client.get(f"/v1/backups/{b['id']}/content").data)
    (m,) = [m for m in manifest["members"] if m["role"] == "volume"]
    assert m["name"] == "volume-0.qcow2" and m["volume"] == {"name": "bkv", "size_bytes": vol["size_bytes"],
                                                             "format": "raw", "target": "vdc", "readonly": False}

    def restored(name):
        op = _wait(client, client.post(f"/v1/backups/{b['id']}/restore", json={"name": name}).json)
        assert op["status"] == "succeeded", op
        (v,) = [v for v in client.get("/v1/volumes").json["volumes"]
                if (v["attachment"] or {}).get("instance_name") == name]
        assert v["id"] != vol["id"] and v["size_bytes"] == vol["size_bytes"] and v["attachment"]["target"] == "vdc"
        rd = subprocess.run(["qemu-io", "-r", "-U", "-f", "raw", "-c", "read -P 0x5a 1M 64k",
                             _vol_path(root, v["id"])], capture_output=True, text=True)
        assert rd.returncode == 0 and "verification failed" not in rd.stdout, rd.stdout
        return v

    v2 = restored("bk-v2")
    assert v2["name"] == "bk-v2-bkv", "the backed-up name is taken here: <instance>-<name>"
    assert client.delete("/v1/instances/bk-v").status_code == 200
    assert client.delete("/v1/volumes/bkv").status_code == 200
    v3 = restored("bk-v3")
    assert v3["name"] == "bkv", "the backed-up name is free again"
    for inst, v in (("bk-v2", v2), ("bk-v3", v3)):
        assert client.delete(f"/v1/instances/{inst}").status_code == 200
        assert client.delete(f"/v1/volumes/{v['id']}").status_code == 200
    client.delete(f"/v1/backups/{b['id']}")
    _volumes_clean(client, root, set())
    assert _leftovers(root) == CLEAN


def _restore_fails(client, root, manifest, members, why):
    """Upload an artifact of ``members`` ({name: bytes}), restore it: 422, nothing left."""
    body = _tar(("manifest.json", json.dumps(manifest).encode()), *members.items())
    up = client.post("/v1/backups", data=body)
    assert up.status_code == 201, (why, up.json)
    instances, volumes = client.get("/v1/instances").json, client.get("/v1/volumes").json
    op = _wait(client, client.post(f"/v1/backups/{up.json['id']}/restore", json={"name": "bk-evil"}).json)
    assert op["status"] == "failed" and op["error"]["code"] == "unprocessable", (why, op)
    assert client.get("/v1/instances").json == instances, why
    assert client.get("/v1/volumes").json == volumes, why
    assert [tuple(r) for r in root.db.query("SELECT name FROM volumes")] == \
        [(v["name"],) for v in volumes["volumes"]], why
    client.delete(f"/v1/backups/{up.json['id']}")
    assert _leftovers(root) == CLEAN, why
    return op["error"]["message"]


def _tree(*entries) -> bytes:
    """A tar of TarInfo-making (name, type, data|linkname) entries, as a volume's file tree."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, data in entries:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            if kind == tarfile.REGTYPE:
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
                continue
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                ti.linkname = data
            if kind == tarfile.BLKTYPE:
                ti.devmajor, ti.devminor = 8, 0
            t.addfile(ti)
    return buf.getvalue()


def test_hostile_volume_members_are_refused_and_leave_nothing(app, artifact, tmp_path):
    _, client, root = app
    _, _, data = artifact
    manifest, files = _members(data)
    evil = tmp_path / "vol-evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow", "-u",
                    str(evil), "16M"], check=True)
    big = tmp_path / "vol-big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(big), "64M"], check=True)
    vm_cases = {
        "a volume with a backing file": (evil.read_bytes(), {"target": "vdb"}, "backing file"),
        "a volume larger than it says": (big.read_bytes(), {"target": "vdb"}, "more than"),
        "a volume at the root disk's target": (big.read_bytes(), {"target": "vda"}, "attachment"),
    }
    for why, (blob, where, word) in vm_cases.items():
        entry = {**_entry("volume-0.qcow2", "volume", blob),
                 "volume": {"name": "evil", "size_bytes": 32 << 20, "readonly": False, **where}}
        msg = _restore_fails(client, root, {**manifest, "members": manifest["members"] + [entry]},
                             {**files, "volume-0.qcow2": blob}, why)
        assert word in msg, (why, msg)


def test_hostile_container_volume_trees_are_refused_and_leave_nothing(app, ctr_artifact):
    _, client, root = app
    manifest, files = ctr_artifact
    cases = {
        "a path out": _tree(("./../../../../tmp/bk-out", tarfile.REGTYPE, b"x")),
        "an absolute path": _tree(("/tmp/bk-out", tarfile.REGTYPE, b"x")),
        "a device": _tree(("./disk", tarfile.BLKTYPE, "")),
        "a hardlink out": _tree(("./pw", tarfile.LNKTYPE, "../../../../etc/passwd")),
    }
    for why, blob in cases.items():
        entry = {**_entry("volume-0.tar", "volume", blob),
                 "volume": {"name": "evil", "size_bytes": 32 << 20, "readonly": False, "path": "/data"}}
        msg = _restore_fails(client, root, {**manifest, "members": [m for m in manifest["members"]
                                                                       if m["role"] != "volume"] + [entry]},
                             {**{k: v for k, v in files.items() if not k.startswith("volume-")}, "volume-0.tar": blob},
                             why)
        assert "volume 'evil' is refused" in msg, (why, msg)
        assert not os.path.exists("/tmp/bk-out"), why


@pytest.fixture(scope="module")
def ctr_artifact(app, tmp_path_factory):
    """A backup of a (fake) container with a volume at /data holding a file; (manifest, members)."""
    from testbed.ocibuild import busybox_layers, write_layout
    from tests.api.test_services_inprocess import _import
    from storage import mounts
    _, client, root = app
    layout = write_layout(os.path.join(root.config.images.import_dirs[0], "busybox"), {"latest": busybox_layers()})
    _import(client, {"name": "busybox", "source": {"type": "file", "path": layout}, "format": "oci"})
    _volume(client, "bkcv")
    point = tmp_path_factory.mktemp("mnt")
    mounts.mount_fs_image(_vol_path(root, "bkcv"), str(point))
    try:
        os.makedirs(point / "sub")
        (point / "sub" / "mark").write_text("kept")
        shift = root.runtime.idmap.host_id if root.runtime.idmap else 0  # owned by the container's 1234:99
        os.chown(point / "sub" / "mark", 1234 + shift, 99 + shift)
    finally:
        mounts.unmount(str(point))
    _create(client, kind="container", image="busybox", memory_mib=64, name="bk-c", network="none",
            volumes=[{"volume": "bkcv", "path": "/data", "readonly": True}])
    b = _backup(client, "bk-c")
    data = client.get(f"/v1/backups/{b['id']}/content").data
    client.delete(f"/v1/backups/{b['id']}")
    return _members(data)


def test_a_container_with_a_volume_is_restored_with_its_file_tree(app, ctr_artifact):
    from storage import mounts
    _, client, root = app
    manifest, files = ctr_artifact
    (m,) = [m for m in manifest["members"] if m["role"] == "volume"]
    assert m["volume"] == {"name": "bkcv", "size_bytes": 32 << 20, "path": "/data", "readonly": True}, m
    with tarfile.open(fileobj=io.BytesIO(files[m["name"]])) as t:
        assert "./sub/mark" in t.getnames()
    up = client.post("/v1/backups", data=_tar(("manifest.json", json.dumps(manifest).encode()), *files.items()))
    assert up.status_code == 201, up.json
    op = _wait(client, client.post(f"/v1/backups/{up.json['id']}/restore", json={"name": "bk-c2"}).json)
    assert op["status"] == "succeeded", op
    (v,) = [v for v in client.get("/v1/volumes").json["volumes"]
            if (v["attachment"] or {}).get("instance_name") == "bk-c2"]
    assert v["name"] == "bk-c2-bkcv" and (v["attachment"]["path"], v["attachment"]["readonly"]) == ("/data", True)
    point = os.path.join(root.store.tmp_dir, "check-mnt")
    os.mkdir(point)
    mounts.mount_fs_image(_vol_path(root, v["id"]), point, readonly=True)
    try:
        st = os.stat(os.path.join(point, "sub", "mark"))
        assert open(os.path.join(point, "sub", "mark")).read() == "kept"
        shift = root.runtime.idmap.host_id if root.runtime.idmap else 0
        assert (st.st_uid, st.st_gid) == (1234 + shift, 99 + shift)
    finally:
        mounts.unmount(point)
        os.rmdir(point)
    assert client.delete("/v1/instances/bk-c2").status_code == 200
    assert client.delete(f"/v1/volumes/{v['id']}").status_code == 200
    client.delete(f"/v1/backups/{up.json['id']}")
    assert _leftovers(root) == CLEAN


def test_a_container_volume_a_vm_wrote_is_refused_before_anything_is_made(app, ctr_artifact):
    _, client, root = app
    vol = client.get("/v1/volumes/bkcv").json
    root.volumes.mark_guest_written(vol["id"])  # as if a VM had had it writable
    before = client.get("/v1/backups").json
    msg = _err(client.post("/v1/instances/bk-c/backups", json={}), 422, "unprocessable")
    assert "bkcv" in msg and "cannot be backed up" in msg, msg
    assert client.get("/v1/backups").json == before
    assert _leftovers(root) == CLEAN
