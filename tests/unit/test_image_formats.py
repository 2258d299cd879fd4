"""ImageStore.import_file tells archives from disks by content: a tar (plain or
compressed) is never stored as a raw VM disk, with or without ``format``."""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import subprocess

import pytest

from agent.errors import InvalidInput
from storage import ImageStore, qemu_img
from storage.images import sniff_file
from storage.local import LocalBackend
from storage.units import MiB
from testbed import ocibuild



@pytest.fixture
def store(db, tmp_path):
    return ImageStore(db, {"local": LocalBackend("local", path=str(tmp_path / "pool"))},
                      default_pool="local", cache_dir=str(tmp_path / "cache"))


def nothing_stored(store):
    return (store.list() == [] and list(store.pools["local"].list_blobs()) == []
            and os.listdir(os.path.join(store.cache_dir, "layers", "sha256")) == [])


def compress(raw: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(raw)
    if how == "bzip2":
        return bz2.compress(raw)
    if how == "xz":
        return lzma.compress(raw)
    if how == "zstd":
        return subprocess.run(["zstd", "-qc"], input=raw, capture_output=True,
                              check=True).stdout
    return raw


def layer_tar(tmp_path, how=None) -> str:
    """A bare (hostile) layer tar: not an image archive, and certainly not a disk."""
    raw = ocibuild.layer([("../../escape", "file", b"x")], compress=False)
    p = tmp_path / f"layer.tar.{how or 'plain'}"
    p.write_bytes(compress(raw, how))
    return str(p)


@pytest.mark.parametrize("how", [None, "gzip", "bzip2", "xz", "zstd"])
def test_sniff_tells_tars_from_disks(tmp_path, how):
    assert "tar archive" in sniff_file(layer_tar(tmp_path, how))
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * MiB)
    assert sniff_file(str(raw)) is None
    q = str(tmp_path / "disk.qcow2")
    qemu_img.create(q, size=MiB)
    assert sniff_file(q) is None
    gz = tmp_path / "disk.raw.gz"
    gz.write_bytes(gzip.compress(b"R" * MiB))
    assert sniff_file(str(gz)) == "gzip-compressed data"


@pytest.mark.parametrize("how", [None, "gzip", "zstd"])
def test_a_tar_without_format_is_not_a_raw_disk(store, tmp_path, how):
    with pytest.raises(InvalidInput) as e:
        store.import_file(layer_tar(tmp_path, how), name="x")
    assert "index.json" in str(e.value) or "zstd" in str(e.value)
    assert nothing_stored(store)


def test_a_tar_declared_raw_or_qcow2_is_refused(store, tmp_path):
    for fmt in ("raw", "qcow2"):
        with pytest.raises(InvalidInput, match="not a disk image; import it with format oci"):
            store.import_file(layer_tar(tmp_path, "gzip"), name="x", format=fmt)
    assert nothing_stored(store)


def test_a_compressed_bomb_is_not_a_raw_disk(store, tmp_path):
    bomb = tmp_path / "bomb.gz"
    with gzip.open(bomb, "wb", 9) as g:
        for _ in range(64):
            g.write(bytes(MiB))
    with pytest.raises(InvalidInput, match="gzip-compressed data, not a tar archive"):
        store.import_file(str(bomb), name="bomb")
    assert nothing_stored(store)


def test_image_archives_without_format_import_as_containers(store, tmp_path):
    layers = ocibuild.busybox_layers()
    layout = ocibuild.write_layout(str(tmp_path / "layout"), {"latest": layers})
    oci_tar = ocibuild.tar_dir(layout, str(tmp_path / "oci.tar"))
    save = ocibuild.write_docker_save(str(tmp_path / "save.tar"), layers)
    gz = tmp_path / "save.tar.gz"
    gz.write_bytes(gzip.compress(open(save, "rb").read()))
    for i, p in enumerate((oci_tar, save, str(gz))):
        img = store.import_file(p, name=f"c{i}")
        assert (img.kind, img.format, len(img.layers)) == ("container", "oci", 2)


def test_disks_still_import_and_oci_format_on_a_disk_is_refused(store, tmp_path):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"R" * MiB)
    assert store.import_file(str(raw), name="r").format == "raw"
    with pytest.raises(InvalidInput, match="not a tar archive"):
        store.import_file(str(raw), name="o", format="oci")


def test_fifo_and_device_paths_are_refused_without_blocking(store, tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for p in (str(tmp_path / "fifo"), "/dev/zero"):
        with pytest.raises(InvalidInput, match="not a regular file"):
            store.import_file(p, name="f")
    assert nothing_stored(store)


def test_import_digest_reads_pool_images_through_the_same_source(db, tmp_path):
    """A shared (remote-style) pool: another store records an OCI image by its manifest
    digest (read through _PoolSource); a tar blob named as a disk is refused."""
    from agent.state import Database
    from storage.fake import FakeBackend

    shared = FakeBackend("shared")
    try:
        a = ImageStore(db, {"local": LocalBackend("local", path=str(tmp_path / "pa")),
                            "shared": shared}, default_pool="local",
                       cache_dir=str(tmp_path / "ca"))
        layout = ocibuild.write_layout(str(tmp_path / "layout"),
                                       {"latest": ocibuild.busybox_layers()})
        ct = a.import_oci(layout, name="bb", pool="shared")
        db_b = Database(tmp_path / "b.db")
        b = ImageStore(db_b, {"local": LocalBackend("local", path=str(tmp_path / "pb")),
                              "shared": shared}, default_pool="local",
                       cache_dir=str(tmp_path / "cb"))
        got = b.import_digest("shared", ct.digest, name="bb")
        assert (got.kind, got.layers) == ("container", ct.layers)
        tar = shared.put_blob(io.BytesIO(open(layer_tar(tmp_path), "rb").read()))
        with pytest.raises(InvalidInput, match="tar archive, not a disk image"):
            b.import_digest("shared", tar.digest, name="t")
        db_b.close()
    finally:
        shared.close()
