"""ImageStore on real LocalBackends: imports (file, URL, OCI), dedupe, refcounts, gc,
export, and a container rootfs really mounted with overlayfs."""
from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import threading

import pytest

from agent.errors import Conflict, Forbidden, InvalidInput, NotFound, Unprocessable
from storage import Image, ImageStore, RootfsLayers, mounts, qemu_img
from storage.fake import FakeBackend
from storage.local import LocalBackend
from storage.sources import AddressPolicy
from storage.units import MiB
from testbed import ocibuild



@pytest.fixture
def store(db, tmp_path):
    pools = {"local": LocalBackend("local", path=str(tmp_path / "pool")),
             "other": LocalBackend("other", path=str(tmp_path / "pool2")),
             "fake": FakeBackend("fake")}
    s = ImageStore(db, pools, default_pool="local", cache_dir=str(tmp_path / "cache"))
    yield s
    pools["fake"].close()


def raw_image(path, fill=b"R", size=2 * MiB):
    with open(path, "wb") as f:
        f.write(fill * size)
    return str(path)


def leftovers(store):
    """What the store holds on disk: blobs in every pool and unpacked layers."""
    blobs = {p: [b.digest for b in be.list_blobs()] for p, be in store.pools.items()}
    layers = os.listdir(os.path.join(store.cache_dir, "layers", "sha256"))
    return blobs, sorted(layers), os.listdir(store.tmp_dir)


EMPTY = ({"local": [], "other": [], "fake": []}, [], [])


# ------------------------------------------------------------------ VM images

def test_import_raw_and_qcow2(store, tmp_path):
    raw = raw_image(tmp_path / "a.raw")
    seen = []
    img = store.import_file(raw, name="a", progress=seen.append)
    assert isinstance(img, Image)
    assert (img.kind, img.format, img.size, img.virtual_size, img.pool) == \
           ("vm", "raw", 2 * MiB, 2 * MiB, "local")
    assert img.id == hashlib.sha256(open(raw, "rb").read()).hexdigest()
    assert img.digest == "sha256:" + img.id and img.config == {} and img.layers == ()
    assert seen[-1] == 2 * MiB
    q = str(tmp_path / "b.qcow2")
    qemu_img.create(q, format="qcow2", size=64 * MiB)
    qi = store.import_file(q, name="b", format="qcow2")
    assert (qi.format, qi.virtual_size) == ("qcow2", 64 * MiB)
    assert [i.name for i in store.list()] == ["a", "b"]
    assert store.get("a") == img and store.get(img.id) == img and store.get(img.id[:12]) == img
    assert store.find("nope") is None
    with pytest.raises(NotFound):
        store.get("nope")


def test_same_content_twice_is_stored_once(store, tmp_path):
    raw = raw_image(tmp_path / "a.raw")
    a = store.import_file(raw, name="a")
    again = store.import_file(raw, name="a")
    alias = store.import_file(raw_image(tmp_path / "copy.raw"), name="alias")
    assert a.id == again.id == alias.id and alias.name == "alias"
    assert store.get("alias").id == a.id and len(store.list()) == 1
    assert store.pools["local"].list_blobs() == [store.pools["local"].stat_blob(a.digest)]
    with pytest.raises(Conflict, match="taken"):
        store.import_file(raw_image(tmp_path / "c.raw", b"C"), name="a")
    assert len(store.pools["local"].list_blobs()) == 1  # the refused content was not kept


def test_refused_disk_images_leave_nothing(store, tmp_path):
    base = raw_image(tmp_path / "base.raw")
    overlay = str(tmp_path / "overlay.qcow2")
    qemu_img.create(overlay, backing=base, backing_format="raw")
    with pytest.raises(InvalidInput, match="backing file"):
        store.import_file(overlay, name="o")
    vmdk = str(tmp_path / "d.vmdk")
    qemu_img.create(vmdk, format="vmdk", size=MiB)
    with pytest.raises(InvalidInput, match="not supported"):
        store.import_file(vmdk, name="v")
    with pytest.raises(InvalidInput, match="declared format"):
        store.import_file(base, name="r", format="qcow2")
    with pytest.raises(InvalidInput):
        store.import_file(str(tmp_path / "missing"), name="m")
    with pytest.raises(InvalidInput):
        store.import_file(base, name="bad name")
    assert store.list() == [] and leftovers(store) == EMPTY


def test_clone_refcount_delete_gc(store, tmp_path):
    img = store.import_file(raw_image(tmp_path / "a.raw"), name="a")
    vol = store.clone_disk("a", "vm0-disk", size=8 * MiB)
    assert vol.base == img.digest and vol.size == 8 * MiB and vol.format == "qcow2"
    assert qemu_img.info(vol.path)["backing-filename"] == store.pools["local"].blob_path(img.digest)
    assert store.references("a") == [("local", "vm0-disk")]
    with pytest.raises(Conflict) as e:
        store.delete("a")
    assert e.value.http_status == 409 and "vm0-disk" in e.value.message
    with pytest.raises(Conflict):
        store.clone_disk("a", "vm0-disk")
    assert store.gc() == {"blobs_removed": 0, "layers_removed": 0, "bytes_freed": 0,
                          "temp_files_removed": 0}
    assert store.release("local", "vm0-disk") is True
    assert store.release("local", "vm0-disk") is False
    assert store.delete("a") is True and store.delete("a") is False
    assert store.pools["local"].find_blob(img.digest) is not None  # freed by gc, not delete
    assert store.gc() == {"blobs_removed": 1, "layers_removed": 0, "bytes_freed": 2 * MiB,
                          "temp_files_removed": 0}
    assert leftovers(store) == EMPTY


def test_clone_into_another_pool_copies_the_base(store, tmp_path):
    img = store.import_file(raw_image(tmp_path / "a.raw"), name="a")
    vol = store.clone_disk("a", "d", pool="other")
    assert vol.pool == "other" and store.pools["other"].find_blob(img.digest)
    assert store.gc()["blobs_removed"] == 0
    store.release("other", "d")
    store.delete("a")
    assert store.gc()["blobs_removed"] == 2


# ------------------------------------------------------------------ URL imports

@pytest.fixture
def http_dir(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    t.join()


def test_import_url(store, http_dir):
    root, base = http_dir
    raw = raw_image(root / "disk.raw", b"U", 3 * MiB)
    good = hashlib.sha256(open(raw, "rb").read()).hexdigest()
    with pytest.raises(Forbidden, match="loopback.*allow_url_hosts"):  # the SSRF guard's default
        store.import_url(f"{base}/disk.raw", name="u")
    store.address_policy = AddressPolicy(["127.0.0.1/32"])  # this test's own server
    seen = []
    img = store.import_url(f"{base}/disk.raw", name="u", sha256=good, progress=seen.append)
    assert img.id == good and img.format == "raw" and seen[-1] == 3 * MiB
    with pytest.raises(InvalidInput, match="does not match"):
        store.import_url(f"{base}/disk.raw", name="u2", sha256="0" * 64)
    with pytest.raises(InvalidInput, match="404"):
        store.import_url(f"{base}/missing.raw", name="u3")
    with pytest.raises(InvalidInput):
        store.import_url("file:///etc/passwd", name="u4")
    assert [i.name for i in store.list()] == ["u"] and os.listdir(store.tmp_dir) == []
    assert len(store.pools["local"].list_blobs()) == 1


# ------------------------------------------------------------------ OCI images

def test_import_oci_layout_and_rootfs_overlay(store, tmp_path):
    layout = ocibuild.write_layout(str(tmp_path / "layout"),
                                   {"latest": ocibuild.busybox_layers()})
    seen = []
    img = store.import_oci(layout, name="busybox", progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == img.size
    assert (img.kind, img.format, img.virtual_size) == ("container", "oci", None)
    assert img.config == {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"}
    assert len(img.layers) == 2
    rootfs = store.prepare_rootfs("busybox", "ctr0")
    assert isinstance(rootfs, RootfsLayers) and len(rootfs.lowerdirs) == 2
    assert rootfs.lowerdirs[0].endswith(img.layers[1][7:])  # top first
    target = tmp_path / "merged"
    target.mkdir()
    mounts.mount_overlay(rootfs.lowerdirs, rootfs.upperdir, rootfs.workdir, str(target))
    try:
        assert not (target / "etc" / "hello").exists()  # whiteout hides the lower file
        assert (target / "etc" / "keep").read_text() == "keep\n"
        assert (target / "etc" / "new").read_text() == "new\n"
        assert sorted(os.listdir(target / "var")) == ["fresh"]  # opaque dir
        assert os.readlink(target / "bin" / "sh") == "/bin/busybox"
        out = subprocess.run([str(target / "bin" / "busybox"), "cat", str(target / "etc/keep")],
                             capture_output=True, check=True).stdout
        assert out == b"keep\n"
        (target / "etc" / "written").write_text("x")
        assert os.path.exists(os.path.join(rootfs.upperdir, "etc", "written"))
    finally:
        mounts.unmount(str(target))
    with pytest.raises(Conflict):
        store.delete("busybox")
    assert store.release("local", "ctr0")
    assert store.delete(img.id)
    freed = store.gc()
    assert (freed["blobs_removed"], freed["layers_removed"]) == (4, 2)
    assert freed["bytes_freed"] > img.size
    assert leftovers(store) == EMPTY


def test_oci_archive_docker_save_multiarch_and_refs(store, tmp_path):
    layers = ocibuild.busybox_layers()
    layout = ocibuild.write_layout(str(tmp_path / "l"), {"latest": layers})
    a = store.import_oci(ocibuild.tar_dir(layout, str(tmp_path / "l.tar")), name="from-tar")
    assert a.id == store.import_oci(layout, name="from-dir").id  # same manifest, stored once
    d = store.import_oci(ocibuild.write_docker_save(str(tmp_path / "s.tar"), layers), name="ds")
    assert d.kind == "container" and len(d.layers) == 2 and d.config["Cmd"] == ["/bin/sh"]
    multi = ocibuild.write_layout(str(tmp_path / "m"), {"latest": layers}, multiarch=True)
    m = store.import_oci(multi, name="multi")
    assert m.id == a.id  # the index resolved to the same linux/amd64 manifest
    two = ocibuild.write_layout(str(tmp_path / "two"), {"v1": layers[:1], "v2": layers})
    with pytest.raises(InvalidInput, match="several images"):
        store.import_oci(two, name="x")
    with pytest.raises(NotFound, match="v3"):
        store.import_oci(two, name="x", ref="v3")
    v1 = store.import_oci(two, name="v1", ref="v1")
    assert len(v1.layers) == 1
    rootfs = store.prepare_rootfs("ds", "c1")
    assert len(rootfs.lowerdirs) == 2
    store.release("local", "c1")


def test_corrupt_or_malicious_oci_leaves_nothing(store, tmp_path):
    layers = ocibuild.busybox_layers()
    evil = ocibuild.layer([("../../escape", "file", b"x")])
    layout = ocibuild.write_layout(str(tmp_path / "evil"), {"latest": [layers[0], evil]})
    with pytest.raises(InvalidInput, match=r"'\.\.'"):
        store.import_oci(layout, name="evil")
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()
    assert store.list() == [] and leftovers(store) == EMPTY
    bad = ocibuild.write_layout(str(tmp_path / "bad"), {"latest": layers})
    victim = os.path.join(bad, "blobs", "sha256", ocibuild.sha(layers[1])[7:])
    with open(victim, "r+b") as f:
        f.seek(100)
        f.write(b"corrupt")
    with pytest.raises(InvalidInput, match="does not match"):
        store.import_oci(bad, name="bad")
    assert store.list() == [] and leftovers(store) == EMPTY
    with pytest.raises(InvalidInput):
        store.import_oci(str(tmp_path / "nothing-here"), name="n")


def test_rootfs_misuse(store, tmp_path):
    vm = store.import_file(raw_image(tmp_path / "a.raw"), name="vm")
    with pytest.raises(Unprocessable):
        store.prepare_rootfs(vm.id, "c")
    layout = ocibuild.write_layout(str(tmp_path / "l"), {"latest": ocibuild.busybox_layers()})
    store.import_oci(layout, name="bb")
    with pytest.raises(Unprocessable):
        store.clone_disk("bb", "d")
    store.prepare_rootfs("bb", "c")
    with pytest.raises(Conflict):
        store.prepare_rootfs("bb", "c")
    assert store.references("bb") == [("local", "c")]


def test_export_roundtrip(store, tmp_path):
    raw = raw_image(tmp_path / "a.raw")
    store.import_file(raw, name="a")
    store.export("a", str(tmp_path / "out.raw"))
    assert open(tmp_path / "out.raw", "rb").read() == open(raw, "rb").read()
    layout = ocibuild.write_layout(str(tmp_path / "l"), {"latest": ocibuild.busybox_layers()})
    img = store.import_oci(layout, name="bb")
    store.export("bb", str(tmp_path / "bb.tar"))
    assert store.delete("bb") and store.gc()["layers_removed"] == 2
    again = store.import_oci(str(tmp_path / "bb.tar"), name="bb2")
    assert again.id == img.id and again.layers == img.layers
    with pytest.raises(InvalidInput):
        store.export("a", str(tmp_path / "no" / "dir" / "x"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".export-")]


def test_store_survives_restart(db, store, tmp_path):
    store.import_file(raw_image(tmp_path / "a.raw"), name="a")
    again = ImageStore(db, store.pools, default_pool="local", cache_dir=store.cache_dir)
    assert [i.name for i in again.list()] == ["a"]
    with pytest.raises(InvalidInput):
        ImageStore(db, store.pools, default_pool="missing", cache_dir=store.cache_dir)


def test_corrupt_and_empty_disk_images(store, tmp_path):
    q = str(tmp_path / "c.qcow2")
    qemu_img.create(q, format="qcow2", size=64 * MiB)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 1M", q], check=True, capture_output=True)
    with open(q, "r+b") as f:  # point the L1 table past the end of the file
        f.seek(40)
        f.write((1 << 40).to_bytes(8, "big"))
    with pytest.raises(InvalidInput):
        store.import_file(q, name="corrupt")
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    with pytest.raises(InvalidInput, match="empty"):
        store.import_file(str(empty), name="empty")
    assert store.list() == [] and leftovers(store) == EMPTY


def test_store_over_remote_style_pools(store, tmp_path):
    """Pools without host paths for blobs (fake here; rbd/s3 later) take the same imports."""
    raw = raw_image(tmp_path / "a.raw")
    vm = store.import_file(raw, name="a", pool="fake")
    assert vm.pool == "fake" and store.pools["fake"].find_blob(vm.digest)
    assert store.clone_disk("a", "d").base == vm.digest
    layout = ocibuild.write_layout(str(tmp_path / "l"), {"latest": ocibuild.busybox_layers()})
    img = store.import_oci(layout, name="bb", pool="fake")
    rootfs = store.prepare_rootfs("bb", "c")
    assert os.path.isdir(rootfs.upperdir) and os.path.isfile(
        os.path.join(rootfs.lowerdirs[-1], "bin", "busybox"))
    assert os.listdir(store.tmp_dir) == []
    store.release("fake", "c")
    store.release("fake", "d")
    store.export("bb", str(tmp_path / "bb.tar"))
    assert store.delete(img.id) and store.delete(vm.id)
    store.gc()
    assert leftovers(store) == EMPTY


@pytest.mark.real
def test_layouts_written_by_skopeo(store, tmp_path):
    """Real-world producers: skopeo turns our `docker save` archive into an OCI layout dir
    and an OCI archive; both import and give a working rootfs."""
    if shutil.which("skopeo") is None:
        pytest.fail("skopeo is missing: apt-get install -y skopeo (or run scripts/setup-host)")
    ds = ocibuild.write_docker_save(str(tmp_path / "s.tar"), ocibuild.busybox_layers())
    subprocess.run(["skopeo", "copy", "-q", f"docker-archive:{ds}", f"oci:{tmp_path}/lay:v1"],
                   check=True)
    subprocess.run(["skopeo", "copy", "-q", f"docker-archive:{ds}",
                    f"oci-archive:{tmp_path}/o.tar:v2"], check=True)
    a = store.import_oci(str(tmp_path / "lay"), name="sk-dir", ref="v1")
    b = store.import_oci(str(tmp_path / "o.tar"), name="sk-archive")
    assert a.id == b.id and len(a.layers) == 2 and a.config["Cmd"] == ["/bin/sh"]
    rootfs = store.prepare_rootfs("sk-dir", "c")
    top = rootfs.lowerdirs[0]
    assert os.stat(os.path.join(top, "etc", "hello")).st_rdev == os.makedev(0, 0)
    store.release("local", "c")


def test_concurrent_imports_share_layers(store, tmp_path):
    """A good and a malicious image sharing a base layer, imported at the same time: the
    refused one takes nothing the good one needs."""
    layers = ocibuild.busybox_layers()
    good = ocibuild.write_layout(str(tmp_path / "g"), {"latest": layers})
    evil = ocibuild.write_layout(str(tmp_path / "e"), {"latest": [
        layers[0], ocibuild.layer([("x", "sym", "../../..")])]})
    results = {}

    def run(name, path):
        try:
            results[name] = store.import_oci(path, name=name)
        except Exception as e:
            results[name] = e

    threads = [threading.Thread(target=run, args=(n, p)) for n, p in
               (("g1", good), ("e1", evil), ("g2", good), ("e2", evil))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results["e1"], InvalidInput) and isinstance(results["e2"], InvalidInput)
    assert results["g1"].id == results["g2"].id
    rootfs = store.prepare_rootfs("g1", "c")
    assert os.path.isfile(os.path.join(rootfs.lowerdirs[-1], "bin", "busybox"))
    for d in store.get("g2").layers:
        assert store.pools["local"].find_blob(d) is not None


def test_gc_removes_stale_temp_files_only(store):
    layers = os.path.join(store.cache_dir, "layers", "sha256")
    stale_dir = os.path.join(layers, ".tmp-crashed")
    fresh_dir = os.path.join(layers, ".tmp-in-progress")
    for d in (stale_dir, fresh_dir):
        os.makedirs(os.path.join(d, "usr"))
    stale_file = os.path.join(store.tmp_dir, "url-crashed")
    with open(stale_file, "wb") as f:
        f.write(b"x" * 100)
    old = 1_000_000_000
    os.utime(stale_dir, (old, old))
    os.utime(stale_file, (old, old))
    out = store.gc()
    assert out["bytes_freed"] == 100 and out["layers_removed"] == 0
    assert not os.path.exists(stale_dir) and not os.path.exists(stale_file)
    assert os.path.isdir(fresh_dir)
