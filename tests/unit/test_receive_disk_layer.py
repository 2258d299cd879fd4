"""ImageStore.receive_disk_layer with real qcow2 files: another host's qcow2 layer of a disk
replaces a prepared overlay, rebased onto this pool's copy of the same image; a layer naming
another backing file, or not a qcow2 layer, is refused and leaves the volume as it was; a full
pool is InsufficientResources."""
from __future__ import annotations

import errno
import io
import os
import subprocess
from unittest import mock

import pytest

from agent.errors import InsufficientResources, InvalidInput
from agent.state import Database
from storage import ImageStore, qemu_img
from storage.local import LocalBackend
from storage.units import MiB


def _store(root) -> ImageStore:
    os.makedirs(root, exist_ok=True)
    pools = {"local": LocalBackend("local", path=str(root / "pool"))}
    return ImageStore(Database(str(root / "state.db")), pools, default_pool="local", cache_dir=str(root / "cache"))


def _qemu_io(path: str, cmd: str) -> str:
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, path], capture_output=True, text=True, check=True)
    return r.stdout


@pytest.fixture
def hosts(tmp_path):
    """(source store, destination store, image id): both hold the same qcow2 image."""
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    _qemu_io(str(base), "write -P 0x11 0 1M")
    src, dst = _store(tmp_path / "src"), _store(tmp_path / "dst")
    img = src.import_file(str(base), name="base")
    assert dst.import_file(str(base), name="base").id == img.id
    return src, dst, img.id


def test_a_layer_is_written_and_rebased_onto_this_pools_image(hosts):
    src, dst, image_id = hosts
    sent = src.clone_disk(image_id, "vm-disk")
    _qemu_io(sent.path, "write -P 0x5a 4M 2M")  # what the guest wrote there
    prepared = dst.clone_disk(image_id, "vm-disk")
    with open(sent.path, "rb") as f:
        n = dst.receive_disk_layer("local", "vm-disk", f, image_ref=image_id)
    assert n == os.path.getsize(sent.path)
    info = qemu_img.info(prepared.path, format="qcow2")
    assert info["backing-filename"] == dst.pools["local"].blob_path(prepared.base)
    assert "verification failed" not in _qemu_io(prepared.path, "read -P 0x5a 4M 2M")
    assert "verification failed" not in _qemu_io(prepared.path, "read -P 0x11 0 1M")  # from the base
    assert [e for e in os.listdir(os.path.dirname(prepared.path)) if e.startswith(".incoming-")] == []


def test_a_layer_with_another_backing_file_or_no_qcow2_is_refused_and_the_volume_kept(hosts, tmp_path):
    _, dst, image_id = hosts
    prepared = dst.clone_disk(image_id, "vm-disk")
    before = open(prepared.path, "rb").read()
    secret = tmp_path / "etc-shadow"
    secret.write_bytes(b"x" * MiB)
    evil = tmp_path / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(evil)],
                   check=True)
    with open(evil, "rb") as f, pytest.raises(InvalidInput, match="backing file"):
        dst.receive_disk_layer("local", "vm-disk", f, image_ref=image_id)
    with pytest.raises(InvalidInput, match="qcow2"):
        dst.receive_disk_layer("local", "vm-disk", io.BytesIO(b"\0" * MiB), image_ref=image_id)
    assert open(prepared.path, "rb").read() == before
    assert [e for e in os.listdir(os.path.dirname(prepared.path)) if e.startswith(".incoming-")] == []


def test_a_full_pool_is_insufficient_resources_and_the_stream_is_read_to_its_end(hosts):
    _, dst, image_id = hosts
    prepared = dst.clone_disk(image_id, "vm-disk")
    stream = io.BytesIO(b"q" * (3 * MiB))
    with mock.patch("storage.images.os.fsync", side_effect=OSError(errno.ENOSPC, "No space left on device")), \
            pytest.raises(InsufficientResources, match="no space left on device after 3 MiB of the disk") as e:
        dst.receive_disk_layer("local", "vm-disk", stream, image_ref=image_id)
    assert e.value.http_status == 507
    assert stream.read() == b""
    assert qemu_img.info(prepared.path, format="qcow2")["format"] == "qcow2"
