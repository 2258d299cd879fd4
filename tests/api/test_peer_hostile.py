"""A hostile peer against a real agent: the test holds a configured peer's token and speaks
the peer protocol itself (no second host). A peer is another host, not a friend: its names,
paths, streams, images and answers get the same checks as any other input, and it touches
only the incoming instances it prepared."""
from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from testbed.agentproc import AgentProcess, Api
from tests.api.conftest import assert_error


class HostilePeer:
    """The peer's own HTTP side, as the agent under test reaches it (its [peers.evil] url):
    answers what a test puts in ``routes`` ({(method, path): (status, bytes)}) and records calls."""

    def __init__(self):
        self.routes: dict[tuple[str, str], tuple[int, bytes]] = {}
        self.calls: list[tuple[str, str]] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                peer.calls.append((self.command, self.path))
                if self.path == "/v1/health":
                    status, body = 200, b'{"status":"ok"}'
                else:
                    status, body = peer.routes.get((self.command, self.path), (404, b'{"error":{"code":'
                                                                                   b'"not_found","message":"no"}}'))
                    if callable(body):
                        body = body(self.path)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = do_PUT = _answer

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def evil_peer():
    p = HostilePeer()
    yield p
    p.close()


@pytest.fixture(scope="module")
def host(tmp_path_factory, evil_peer):
    """The agent under attack: peers "evil" (the test) and "other" configured, a local pool."""
    extra = f'[peers.evil]\nurl = "{evil_peer.url}"\n[peers.other]\nurl = "http://127.0.0.1:9"\n'
    proc = AgentProcess(tmp_path_factory.mktemp("victim-host"), pool_kind="local", extra_config=extra)
    proc.admin_token = proc.token("admin", "admin")
    proc.evil_token = proc.token("evil", "peer")
    proc.other_token = proc.token("other", "admin")  # an admin token named after a peer works too
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def admin(host):
    return Api(host.url, host.admin_token)


@pytest.fixture(scope="module")
def evil(host):
    return Api(host.url, host.evil_token)


@pytest.fixture(scope="module")
def other(host):
    return Api(host.url, host.other_token)


@pytest.fixture(scope="module")
def images(admin, tmp_path_factory):
    from testbed.ocibuild import busybox_layers, write_layout
    d = tmp_path_factory.mktemp("peer-images")
    layout = write_layout(str(d / "busybox"), {"latest": busybox_layers()})
    disk = d / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    out = {"disk_file": disk}
    for key, body in (("container", {"name": "busybox", "source": {"type": "file", "path": layout},
                                     "format": "oci"}),
                      ("vm", {"name": "tiny-vm", "source": {"type": "file", "path": str(disk)}})):
        op = admin.wait(admin.post("/v1/images", json=body).json())
        assert op["status"] == "succeeded", op
        out[key] = op["result"]["image"]
    return out


def prepare_body(images, kind="container", **instance):
    iid = instance.pop("id", uuid.uuid4().hex)
    name = instance.pop("name", f"in-{iid[:8]}")
    image = images[kind]
    inst = {"id": iid, "name": name, "kind": kind, "pool": "default",
            "volumes": [f"i-{iid[:12]}-{'rootfs' if kind == 'container' else 'disk'}"], **instance}
    spec = {"name": name, "kind": kind, "image": image["name"], "cpus": 1.0, "memory_mib": 64,
            "network": "none", "image_id": image["id"]}
    return {"instance": inst, "spec": spec, "data_bytes": 0,
            "image": {"id": image["id"], "name": image["name"], "format": image["format"], "kind": kind}}


def prepare(peer, images, kind="container", idmap=None, **instance) -> dict:
    body = prepare_body(images, kind, **instance)
    if idmap is not None:
        body["idmap"] = idmap
    r = peer.post("/v1/peer/migrations", json=body)
    assert r.status_code == 200, r.text
    return body["instance"]


def volume_path(host, inst) -> str:
    vol = inst["volumes"][0]
    return str(host.state_dir / "pool" / "volumes" / (vol if inst["kind"] == "container" else vol + ".qcow2"))


def tar_of(*members) -> bytes:
    """members: TarInfo fields as dicts (name, type, linkname, data, mode, uid, gid, devmajor,
    devminor, pax)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for m in members:
            ti = tarfile.TarInfo(m["name"])
            ti.type = m.get("type", tarfile.REGTYPE)
            ti.linkname = m.get("linkname", "")
            ti.mode = m.get("mode", 0o755 if ti.type == tarfile.DIRTYPE else 0o644)
            ti.uid, ti.gid = m.get("uid", 0), m.get("gid", 0)
            ti.devmajor, ti.devminor = m.get("devmajor", 0), m.get("devminor", 0)
            ti.pax_headers = m.get("pax", {})
            data = m.get("data", b"")
            ti.size = len(data) if ti.type == tarfile.REGTYPE else 0
            t.addfile(ti, io.BytesIO(data) if ti.type == tarfile.REGTYPE else None)
    return buf.getvalue()


def put_rootfs(peer, inst_id, data: bytes):
    return peer.put(f"/v1/peer/migrations/{inst_id}/rootfs", data=data,
                    headers={"Content-Type": "application/x-tar"})


# -- case 1: rootfs streams stay inside the upper dir ---------------------------------------

def test_a_later_rootfs_stream_never_follows_a_link_an_earlier_one_left(host, evil, images, tmp_path):
    victim = tmp_path / "host-dir"
    victim.mkdir()
    inst = prepare(evil, images)
    upper = os.path.join(volume_path(host, inst), "upper")
    r = put_rootfs(evil, inst["id"], tar_of({"name": "esc", "type": tarfile.SYMTYPE, "linkname": str(victim)}))
    assert r.status_code == 200, r.text  # an absolute symlink is legitimate in a rootfs
    assert os.readlink(os.path.join(upper, "esc")) == str(victim)
    err = assert_error(put_rootfs(evil, inst["id"], tar_of({"name": "esc/file", "data": b"owned"})), 400)
    assert "symlink" in err["message"]
    assert os.listdir(victim) == []  # nothing written on the host through the link
    # a later stream REPLACES the link (a refresh where the container made a dir there)
    r = put_rootfs(evil, inst["id"], tar_of({"name": "esc", "type": tarfile.DIRTYPE},
                                            {"name": "esc/file", "data": b"mine"}))
    assert r.status_code == 200, r.text
    assert os.path.isdir(os.path.join(upper, "esc")) and not os.path.islink(os.path.join(upper, "esc"))
    assert open(os.path.join(upper, "esc", "file"), "rb").read() == b"mine" and os.listdir(victim) == []
    assert evil.delete(f"/v1/peer/migrations/{inst['id']}").json() == {"deleted": True}
    assert not os.path.exists(upper)


@pytest.mark.parametrize("member", [
    {"name": "../escaped", "data": b"x"},
    {"name": "/tmp/escaped-absolute", "data": b"x"},
    {"name": "./a/../../escaped", "data": b"x"},
    {"name": "disk", "type": tarfile.BLKTYPE, "devmajor": 8, "devminor": 0},
    {"name": "null", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3},
    {"name": "shadow", "type": tarfile.LNKTYPE, "linkname": "/etc/hostname"},
    {"name": "shadow", "type": tarfile.LNKTYPE, "linkname": "../../../../../../etc/hostname"},
    {"name": "up", "type": tarfile.SYMTYPE, "linkname": "../../../../../../../etc"},
], ids=["dotdot", "absolute", "dotdot-inside", "block-device", "char-device", "hardlink-absolute",
        "hardlink-out", "symlink-out"])
def test_rootfs_stream_members_that_leave_the_upper_dir_or_are_devices_are_refused(host, evil, images, member):
    inst = prepare(evil, images)
    vol = volume_path(host, inst)
    err = assert_error(put_rootfs(evil, inst["id"], tar_of(member)), 400)
    assert err["message"]
    left = set(os.listdir(os.path.join(vol, "upper")))
    assert left <= {"disk", "null", "shadow", "up"} - {member["name"]}, left
    assert not os.path.exists(os.path.join(vol, "escaped")) and not os.path.exists("/tmp/escaped-absolute")
    assert not os.path.exists(os.path.join(os.path.dirname(vol), "escaped"))
    assert evil.delete(f"/v1/peer/migrations/{inst['id']}").json() == {"deleted": True}


def test_rootfs_stream_keeps_what_an_upper_dir_legitimately_holds(host, evil, images):
    # the source's user namespace map is this host's (one /etc/subuid allocation): owners as sent
    inst = prepare(evil, images, idmap={"host_id": 1000000, "size": 65536})
    upper = os.path.join(volume_path(host, inst), "upper")
    first = tar_of({"name": "./etc", "type": tarfile.DIRTYPE, "pax": {"SCHILY.xattr.trusted.overlay.opaque": "y"}},
                   {"name": "./etc/hello", "type": tarfile.CHRTYPE, "mode": 0},  # a whiteout
                   {"name": "./bin", "type": tarfile.DIRTYPE},
                   {"name": "./bin/su", "data": b"#!", "mode": 0o4755, "uid": 1001234, "gid": 1005678},
                   {"name": "./bin/sh", "type": tarfile.SYMTYPE, "linkname": "/bin/busybox"},
                   {"name": "./bin/su2", "type": tarfile.LNKTYPE, "linkname": "./bin/su"},
                   {"name": "./run.fifo", "type": tarfile.FIFOTYPE, "mode": 0o600},
                   {"name": "./gone", "data": b"old"})
    assert put_rootfs(evil, inst["id"], first).status_code == 200
    st = os.lstat(os.path.join(upper, "etc", "hello"))
    assert (st.st_mode & 0o170000, st.st_rdev) == (0o020000, 0)  # char 0/0
    assert os.getxattr(os.path.join(upper, "etc"), "trusted.overlay.opaque") == b"y"
    st = os.lstat(os.path.join(upper, "bin", "su"))
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777, st.st_nlink) == (1001234, 1005678, 0o4755, 2)
    assert os.readlink(os.path.join(upper, "bin", "sh")) == "/bin/busybox"
    assert os.path.exists(os.path.join(upper, "run.fifo"))
    # the refresh's second stream replaces entries: a file by a link, a link by a dir
    second = tar_of({"name": "./gone", "type": tarfile.SYMTYPE, "linkname": "/etc/passwd"},
                    {"name": "./bin/sh", "type": tarfile.DIRTYPE},
                    {"name": "./bin/sh/x", "data": b"x"})
    assert put_rootfs(evil, inst["id"], second).status_code == 200
    assert os.readlink(os.path.join(upper, "gone")) == "/etc/passwd"
    assert open(os.path.join(upper, "bin", "sh", "x"), "rb").read() == b"x"
    assert evil.delete(f"/v1/peer/migrations/{inst['id']}").json() == {"deleted": True}


# -- case 2: every peer-supplied field is validated; a peer touches only what it sent --------

BAD_FIELDS = {
    "name-traversal": ("instance", "name", "../../../../../../tmp/peer-victim"),
    "name-upper": ("instance", "name", "Web"),
    "volume-traversal": ("instance", "volumes", ["../../../../tmp/peer-victim"]),
    "volume-dotfile": ("instance", "volumes", [".hidden"]),
    "pool-traversal": ("instance", "pool", "../pool"),
    "mac-injection": ("instance", "mac", "52:54:00:00:00:01'; reboot"),
    "ip-not-an-address": ("instance", "ip", "999.1.1.1"),
    "id-not-hex": ("instance", "id", "../../../../etc/x"),
    "spec-other-name": ("spec", "name", "someone-else"),
    "spec-extra-field": ("spec", "hypervisor_args", ["-S"]),
    "spec-privileged": ("spec", "privileged", True),  # a peer cannot make a container host root here
    "idmap-of-host-root": (None, "idmap", {"host_id": 0, "size": 65536}),
    "image-name-traversal": ("image", "name", "../x"),
    "image-format": ("image", "format", "vmdk"),
    "data-bytes-negative": (None, "data_bytes", -1),
    "image-bytes-huge": (None, "image_bytes", 2**62),
    "shared-volume-traversal": (None, "shared_volumes", {"../../x": "rbd:p/x"}),
}


@pytest.mark.parametrize("where,field,value", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_prepare_refuses_fields_that_would_reach_a_path_cgroup_or_name(host, admin, evil, images,
                                                                         where, field, value):
    body = prepare_body(images)
    (body[where] if where else body)[field] = value
    if where == "instance" and field == "name":
        body["spec"]["name"] = value
    err = assert_error(evil.post("/v1/peer/migrations", json=body), 422)
    assert field in err["message"]
    names = {i["name"] for i in admin.get("/v1/instances").json()["instances"]}
    assert body["instance"]["name"] not in names
    assert not os.path.exists(host.state_dir / "instances" / str(body["instance"]["id"]))
    assert not os.path.exists("/tmp/peer-victim")


@pytest.mark.parametrize("method,suffix", [("DELETE", ""), ("POST", "/finish"), ("PUT", "/rootfs"),
                                           ("PUT", "/disk")])
def test_peer_paths_take_only_instance_ids(evil, method, suffix):
    r = getattr(evil, method.lower())(f"/v1/peer/migrations/local-instance.name{suffix}", json={})
    assert_error(r, 400)


def test_a_peer_cannot_touch_a_local_instance(host, admin, evil, images):
    op = admin.wait(admin.post("/v1/instances", json={"name": "local1", "kind": "container", "image": "busybox",
                                                      "network": "none"}).json())
    assert op["status"] == "succeeded", op
    local = op["result"]["instance"]
    vol_dir = host.state_dir / "pool" / "volumes" / local["volumes"][0]
    assert vol_dir.is_dir()
    # its id, its name or its volume: refused, and nothing of it goes
    assert_error(evil.post("/v1/peer/migrations", json=prepare_body(images, id=local["id"])), 409)
    assert_error(evil.post("/v1/peer/migrations", json=prepare_body(images, name="local1")), 409)
    assert_error(evil.post("/v1/peer/migrations", json=prepare_body(images, volumes=local["volumes"])), 409)
    assert_error(evil.post(f"/v1/peer/migrations/{local['id']}/finish", json={}), 404)
    assert_error(put_rootfs(evil, local["id"], tar_of({"name": "planted", "data": b"x"})), 404)
    assert_error(evil.delete(f"/v1/peer/migrations/{local['id']}"), 409)
    assert vol_dir.is_dir() and not (vol_dir / "upper" / "planted").exists()
    assert admin.get("/v1/instances/local1").json()["state"] == "running"
    assert admin.delete("/v1/instances/local1").status_code == 200


def test_a_peer_cannot_touch_another_peers_incoming_instance(host, admin, evil, other, images):
    inst = prepare(evil, images, name="from-evil")
    assert_error(other.delete(f"/v1/peer/migrations/{inst['id']}"), 409)
    assert_error(other.post(f"/v1/peer/migrations/{inst['id']}/finish", json={}), 404)
    assert_error(put_rootfs(other, inst["id"], tar_of({"name": "planted", "data": b"x"})), 404)
    # the same name from another peer does not clear evil's (as a retry from evil would)
    assert_error(other.post("/v1/peer/migrations", json=prepare_body(images, name="from-evil")), 409)
    assert admin.get(f"/v1/instances/{inst['id']}").json()["state"] == "incoming"
    assert not os.path.exists(os.path.join(volume_path(host, inst), "upper", "planted"))
    assert evil.delete(f"/v1/peer/migrations/{inst['id']}").json() == {"deleted": True}


# -- case 2: the disk stream (a stopped VM's qcow2 layer) -----------------------------------

def put_disk(peer, inst_id, path):
    with open(path, "rb") as f:
        return peer.put(f"/v1/peer/migrations/{inst_id}/disk", data=f.read(),
                        headers={"Content-Type": "application/octet-stream"})


def qemu_info(path) -> dict:
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", path], check=True,
                                     capture_output=True, text=True).stdout)


def test_disk_layers_with_external_files_are_refused(host, admin, evil, images, tmp_path):
    inst = prepare(evil, images, kind="vm")
    vol = volume_path(host, inst)
    before = qemu_info(vol)
    victim = tmp_path / "host-file"
    with_data_file = tmp_path / "data-file.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={victim}", str(with_data_file),
                    "1M"], check=True)
    victim.write_bytes(b"host secret\n")
    err = assert_error(put_disk(evil, inst["id"], with_data_file), 400)
    assert "data file" in err["message"]
    foreign = tmp_path / "foreign-backing.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/hostname", "-F", "raw",
                    str(foreign), "64M"], check=True)
    err = assert_error(put_disk(evil, inst["id"], foreign), 400)
    assert "backing file" in err["message"]
    assert qemu_info(vol) == before and victim.read_bytes() == b"host secret\n"
    # the source's own layer (backed by ITS copy of the same image) is taken, rebased onto ours
    layer = tmp_path / "layer.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b",
                    f"/var/lib/nodeagent/pool/blobs/sha256/{images['vm']['id']}", "-F", "qcow2", str(layer), "64M"],
                   check=True)
    assert put_disk(evil, inst["id"], layer).status_code == 200
    assert qemu_info(vol)["backing-filename"] == before["backing-filename"]
    assert evil.delete(f"/v1/peer/migrations/{inst['id']}").json() == {"deleted": True}


# -- images a source sends, images a peer asks for ------------------------------------------

def test_an_image_from_a_source_must_be_the_one_asked_for(host, admin, evil, evil_peer, images):
    disk = images["disk_file"].read_bytes()  # tiny-vm's bytes, which this host holds already
    want = "ab" * 32
    evil_peer.routes[("GET", f"/v1/peer/images/{want}")] = (200, disk)
    body = prepare_body(images, kind="vm")
    body["image"] = {"id": want, "name": "stolen", "format": "qcow2", "kind": "vm"}
    body["spec"]["image_id"] = want
    body["image_bytes"] = len(disk)
    err = assert_error(evil.post("/v1/peer/migrations", json=body), 422)
    assert "not the image asked for" in err["message"]
    assert admin.get(f"/v1/images/{images['vm']['id']}").status_code == 200  # not deleted as "corrupt"
    assert "stolen" not in {i["name"] for i in admin.get("/v1/images").json()["images"]}
    # far more than it declared: refused while downloading (a few MiB of slack for archive headers)
    big = "cd" * 32
    evil_peer.routes[("GET", f"/v1/peer/images/{big}")] = (200, b"\0" * (24 * 1024 * 1024))
    body = prepare_body(images, kind="vm")
    body["image"] = {"id": big, "name": "big", "format": "qcow2", "kind": "vm"}
    body["spec"]["image_id"] = big
    body["image_bytes"] = 1000
    err = assert_error(evil.post("/v1/peer/migrations", json=body), 422)
    assert "more than" in err["message"]
    assert not [f for f in os.listdir(host.state_dir / "cache") if f.startswith(".migration-image-")]


def test_a_peer_may_fetch_only_the_image_of_an_instance_sent_to_it(evil, images):
    assert_error(evil.get(f"/v1/peer/images/{images['vm']['id']}"), 404)
    assert_error(evil.get("/v1/peer/images/tiny-vm"), 400)


# -- the source side: a destination's answer is untrusted too --------------------------------

def test_a_destinations_migration_uri_that_would_run_a_command_is_refused(admin, evil_peer, images):
    op = admin.wait(admin.post("/v1/instances", json={"name": "srcvm", "kind": "vm", "image": "tiny-vm",
                                                      "network": "none"}).json())
    assert op["status"] == "succeeded", op
    inst = op["result"]["instance"]
    evil_peer.routes[("POST", "/v1/peer/migrations")] = (200, json.dumps({
        "disk_sources": {"vda": "/x.qcow2"},
        "migration_uri": "qemu+ext:///system?command=/tmp/peer-pwn"}).encode())
    evil_peer.routes[("DELETE", f"/v1/peer/migrations/{inst['id']}")] = (200, b'{"deleted":true}')
    r = admin.post("/v1/migrations", json={"instance": "srcvm", "destination": "evil", "mode": "live"})
    assert r.status_code == 202, r.text
    done = admin.wait(r.json())
    assert done["status"] == "failed"
    assert "malformed answer" in done["error"]["message"] and "migration_uri" in done["error"]["message"]
    assert ("DELETE", f"/v1/peer/migrations/{inst['id']}") in evil_peer.calls  # told to clean up
    assert admin.get("/v1/instances/srcvm").json()["state"] == "running"
    assert admin.delete("/v1/instances/srcvm").status_code == 200


def test_a_non_peer_is_refused_before_its_body_is_looked_at(admin):
    assert_error(admin.post("/v1/peer/migrations", json={"spec": {}}), 403)
    assert_error(admin.post(f"/v1/peer/migrations/{uuid.uuid4().hex}/finish", json={"keep": 1}), 403)


def test_a_peer_token_reaches_the_peer_routes_and_nothing_else(host, evil):
    """A peer host that is taken over gets no more of this host than migrations give."""
    for method, path, body in (("GET", "/v1/instances", None), ("GET", "/v1/host", None),
                               ("GET", "/v1/operations", None), ("GET", "/v1/events?timeout=1", None),
                               ("POST", "/v1/instances", {"name": "x", "kind": "container", "image": "busybox"}),
                               ("POST", "/v1/images", {"name": "x", "source": {"type": "url",
                                                                               "url": "http://127.0.0.1:9/x"}}),
                               ("DELETE", "/v1/images/busybox", None), ("GET", "/metrics", None)):
        r = getattr(evil, method.lower())(path, json=body)
        assert_error(r, 403)
        assert "peer routes" in r.json()["error"]["message"]
    # the peer routes themselves answer it (a bad body is a 422, not a 403)
    assert evil.post("/v1/peer/migrations", json={"spec": {}}).status_code == 422
    # a peer role named after no configured peer is refused there too
    stranger = Api(host.url, host.token("stranger", "peer"))
    assert_error(stranger.post("/v1/peer/migrations", json={"spec": {}}), 403)
    assert_error(stranger.get("/v1/instances"), 403)


@pytest.mark.parametrize("idmap, sent, landed", [
    (None, (0, 0), (1000000, 1000000)),  # a source without a user namespace: its ids are the container's
    (None, (99999, 70000), (1065534, 1065534)),  # beyond the range: nobody
    ({"host_id": 2000000, "size": 65536}, (2000101, 2000102), (1000101, 1000102)),  # another host's map
    ({"host_id": 2000000, "size": 65536}, (0, 1000000), (1065534, 1065534)),  # not the source's: nobody
    ({"host_id": 1000000, "size": 65536}, (0, 4242), (1065534, 1065534)),  # host root / users: never
])
def test_rootfs_stream_owners_land_in_this_hosts_range(host, evil, images, idmap, sent, landed):
    """The owners a peer's stream names are container ids shifted into this host's range:
    whatever it sends, no file of the upper dir belongs to a host user outside the range."""
    inst = prepare(evil, images, idmap=idmap)
    upper = os.path.join(volume_path(host, inst), "upper")
    assert put_rootfs(evil, inst["id"], tar_of({"name": "./f", "data": b"x", "uid": sent[0],
                                                 "gid": sent[1]})).status_code == 200
    st = os.lstat(os.path.join(upper, "f"))
    assert (st.st_uid, st.st_gid) == landed
    assert evil.delete(f"/v1/peer/migrations/{inst['id']}").json() == {"deleted": True}


def test_an_incoming_instance_brings_its_security_groups_and_a_conflicting_one_is_refused(host, evil, admin,
                                                                                           images):
    rules = [{"direction": "ingress", "protocol": "tcp", "port_min": 22}]
    body = prepare_body(images)
    body["spec"]["network"] = "bridge"
    body["security_groups"] = [{"name": "moved-web", "rules": rules}]
    r = evil.post("/v1/peer/migrations", json=body)
    assert r.status_code == 200, r.text
    inst = body["instance"]
    assert admin.get("/v1/security-groups/moved-web").json()["rules"] == rules
    assert admin.get(f"/v1/instances/{inst['id']}/security-groups").json() == {"security_groups": ["moved-web"]}
    assert evil.delete(f"/v1/peer/migrations/{inst['id']}").json() == {"deleted": True}
    # the same name defined otherwise here: refused before anything is made
    other = prepare_body(images)
    other["spec"]["network"] = "bridge"
    other["security_groups"] = [{"name": "moved-web", "rules": []}]
    err = assert_error(evil.post("/v1/peer/migrations", json=other), 409)
    assert "moved-web" in err["message"] and "defined differently" in err["message"]
    assert_error(admin.get(f"/v1/instances/{other['instance']['id']}"), 404)
    assert admin.get("/v1/security-groups/moved-web").json()["rules"] == rules  # untouched
    admin.delete("/v1/security-groups/moved-web")
