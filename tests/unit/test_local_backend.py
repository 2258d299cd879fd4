"""LocalBackend specifics beyond the contract: on-disk layout, atomicity, real overlays."""
import hashlib
import io
import os
import subprocess

import pytest

from agent.errors import InvalidInput
from storage import qemu_img
from storage.backend import VolumeSpec
from storage.local import LocalBackend
from storage.units import MiB



@pytest.fixture
def pool(tmp_path):
    return LocalBackend("p", path=str(tmp_path / "pool"))


class Boom(io.RawIOBase):
    """A source that fails half-way, like a dropped connection."""

    def __init__(self):
        self.sent = 0

    def readable(self):
        return True

    def readinto(self, b):
        if self.sent > 2 * MiB:
            raise OSError("connection reset")
        b[:len(b)] = b"x" * len(b)
        self.sent += len(b)
        return len(b)


def test_blob_layout_readonly_and_no_temp_left(pool):
    data = os.urandom(MiB)
    info = pool.put_blob(io.BytesIO(data))
    path = pool.blob_path(info.digest)
    assert path == os.path.join(pool.path, "blobs", "sha256", hashlib.sha256(data).hexdigest())
    assert os.stat(path).st_mode & 0o222 == 0
    with pytest.raises(InvalidInput):
        pool.put_blob(io.BytesIO(b"abc"), digest="sha256:" + "0" * 64)
    with pytest.raises(OSError):
        pool.put_blob(Boom())
    assert os.listdir(pool.blob_dir) == [os.path.basename(path)]


def test_clone_is_a_qcow2_overlay_that_leaves_the_base_alone(pool, tmp_path):
    src = str(tmp_path / "base.qcow2")
    qemu_img.create(src, format="qcow2", size=16 * MiB)
    with open(src, "rb") as f:
        info = pool.put_blob(f)
    v = pool.clone_volume(info.digest, "vm0", format="qcow2", size=32 * MiB)
    assert v.uri == "file://" + v.path and v.path.endswith("vm0.qcow2")
    i = qemu_img.info(v.path)
    assert i["backing-filename"] == pool.blob_path(info.digest)
    assert i["virtual-size"] == 32 * MiB
    subprocess.run(["qemu-io", "-c", "write -P 0x55 0 1M", v.path], check=True,
                   capture_output=True)
    with open(pool.blob_path(info.digest), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == info.digest.split(":")[1]
    assert pool.delete_volume("vm0") and not os.path.exists(v.path)


def test_create_from_source_converts(pool, tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(b"Z" * MiB)
    v = pool.create_volume(VolumeSpec("d", 2 * MiB, "qcow2"), source=str(src))
    assert qemu_img.info(v.path)["format"] == "qcow2" and v.size == 2 * MiB
    bad = tmp_path / "overlay.qcow2"
    qemu_img.create(str(bad), backing=str(src), backing_format="raw")
    with pytest.raises(InvalidInput, match="backing file"):
        pool.create_volume(VolumeSpec("e", MiB, "qcow2"), source=str(bad))
    assert pool.find_volume("e") is None
    assert sorted(os.listdir(pool.volume_dir)) == [".d.json", "d.qcow2"]


def test_state_survives_a_new_instance(pool):
    pool.create_volume(VolumeSpec("keep", MiB, "raw"))
    again = LocalBackend("p", path=pool.path)
    assert again.get_volume("keep").size == MiB


def test_a_crash_mid_create_can_be_deleted(pool):
    open(os.path.join(pool.volume_dir, ".half.json"), "w").close()  # reserved, never committed
    open(os.path.join(pool.volume_dir, "half.qcow2"), "w").close()
    assert pool.find_volume("half") is None
    assert pool.delete_volume("half") is True
    assert os.listdir(pool.volume_dir) == []
    assert pool.create_volume(VolumeSpec("half", MiB, "raw")).size == MiB
