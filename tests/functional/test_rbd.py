"""RbdBackend against the live dev Ceph (the `ceph` session fixture)."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from unittest import mock

import pytest

from agent.errors import (CommandFailed, Conflict, InsufficientResources, InvalidInput, NotFound, Unprocessable,
                          Unsupported)
import storage.rbd
from storage.backend import VolumeSpec
from storage.units import MiB

pytestmark = pytest.mark.real



@pytest.fixture
def backend(ceph):
    from storage.rbd import RbdBackend

    b = RbdBackend("blk", pool=ceph.rbd_pool, conf=ceph.conf, user=ceph.user,
                   keyring=ceph.keyring)
    yield b
    for v in b.list_volumes():
        b.delete_volume(v.name)
    for blob in b.list_blobs():
        b.delete_blob(blob.digest)
    b.close()


def rbd_ls(ceph) -> list[str]:
    return ceph.run("rbd", "ls", ceph.rbd_pool).stdout.split()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_blob_roundtrip_range_and_dedupe(backend):
    data = os.urandom(5 * MiB + 123)
    info = backend.put_blob(io.BytesIO(data))
    assert info.digest == digest_of(data) and info.size == len(data)
    assert backend.put_blob(io.BytesIO(data), digest=info.digest) == info
    assert backend.open_blob(info.digest).read() == data
    with backend.open_blob(info.digest, offset=4 * MiB - 10, length=100) as f:
        assert f.read() == data[4 * MiB - 10:4 * MiB + 90]
    assert backend.stat_blob(info.digest) == info
    assert info in backend.list_blobs()
    assert backend.delete_blob(info.digest) is True
    assert backend.delete_blob(info.digest) is False
    assert backend.find_blob(info.digest) is None
    with pytest.raises(NotFound):
        backend.open_blob(info.digest)


def test_blob_of_unknown_size_and_empty_blob(backend):
    class Stream(io.RawIOBase):  # no size, arbitrary read sizes
        def __init__(self, data):
            self._b = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            chunk = self._b.read(min(len(b), 777_777))
            b[:len(chunk)] = chunk
            return len(chunk)

    data = os.urandom(3 * MiB)
    info = backend.put_blob(io.BufferedReader(Stream(data)))
    assert backend.open_blob(info.digest).read() == data
    empty = backend.put_blob(io.BytesIO(b""))
    assert empty.size == 0 and backend.open_blob(empty.digest).read() == b""


def test_wrong_digest_keeps_nothing(backend, ceph):
    before = rbd_ls(ceph)
    with pytest.raises(InvalidInput, match="digest mismatch"):
        backend.put_blob(io.BytesIO(b"hello"), digest="sha256:" + "0" * 64)
    with pytest.raises(InvalidInput, match="size mismatch"):
        backend.put_blob(io.BytesIO(b"hello"), size=7)
    assert rbd_ls(ceph) == before


@pytest.fixture
def raw_image(tmp_path):
    p = tmp_path / "disk.raw"
    with open(p, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(MiB)
        f.write(b"BOOT" * 1024)
    return p


def test_raw_blob_clone_is_cow_and_attachable(backend, raw_image, ceph):
    with open(raw_image, "rb") as f:
        blob = backend.put_blob(f)
    vol = backend.clone_volume(blob.digest, "vm1-root", format="raw", size=32 * MiB)
    assert vol.format == "raw" and vol.size == 32 * MiB and vol.base == blob.digest
    assert vol.uri == f"rbd:{ceph.rbd_pool}/navol.vm1-root"
    a = vol.attach
    assert a["monitors"] == [ceph.mon] and a["user"] == "admin" and a["key"]
    assert a["name"] == f"{ceph.rbd_pool}/navol.vm1-root"
    info = ceph.run("rbd", "info", f"{ceph.rbd_pool}/navol.vm1-root").stdout
    assert f"parent: {ceph.rbd_pool}/nablob." in info
    # the clone reads the parent's data through QEMU's librbd
    out = subprocess.run(["qemu-io", "-f", "raw", "-c", f"read -P 0x42 {MiB} 1", "-c",
                          f"write -P 0x55 {2 * MiB} 4096",
                          f"rbd:{ceph.rbd_pool}/navol.vm1-root:conf={ceph.conf}"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, out
    assert backend.open_blob(blob.digest).read() == raw_image.read_bytes()  # parent untouched
    with pytest.raises(Conflict, match="vm1-root"):
        backend.delete_blob(blob.digest)
    with pytest.raises(Conflict):
        backend.clone_volume(blob.digest, "vm1-root", format="raw")
    assert backend.delete_volume("vm1-root") is True
    assert backend.delete_volume("vm1-root") is False
    assert backend.delete_blob(blob.digest) is True


def test_qcow2_blob_is_converted_once_then_cloned(backend, raw_image, tmp_path, ceph):
    q = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw_image), str(q)], check=True)
    with open(q, "rb") as f:
        blob = backend.put_blob(f)
    a = backend.clone_volume(blob.digest, "q-a", format="qcow2")
    b = backend.clone_volume(blob.digest, "q-b", format="qcow2")
    assert a.size == b.size == 16 * MiB
    names = rbd_ls(ceph)
    assert names.count("naraw." + blob.digest.split(":")[1]) == 1
    out = subprocess.run(["qemu-io", "-f", "raw", "-c", f"read -P 0x42 {MiB} 1",
                          f"rbd:{ceph.rbd_pool}/navol.q-b:conf={ceph.conf}"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "verification failed" not in out.stdout, out
    backend.delete_volume("q-a")
    backend.delete_volume("q-b")
    assert backend.delete_blob(blob.digest) is True
    assert not [n for n in rbd_ls(ceph) if blob.digest.split(":")[1] in n]


def test_create_resize_list_usage(backend, raw_image, tmp_path):
    empty = backend.create_volume(VolumeSpec("data1", 64 * MiB, "raw"))
    assert empty.size == 64 * MiB and empty.base is None
    q = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw_image), str(q)], check=True)
    filled = backend.create_volume(VolumeSpec("data2", 8 * MiB, "qcow2"), source=str(q))
    assert filled.size == 16 * MiB  # never smaller than the source
    with pytest.raises(Conflict):
        backend.create_volume(VolumeSpec("data1", MiB, "raw"))
    with pytest.raises(Unsupported):
        backend.create_volume(VolumeSpec("d", MiB, "dir"))
    with pytest.raises(InvalidInput):
        backend.create_volume(VolumeSpec("../x", MiB, "raw"))
    assert backend.resize_volume("data1", 128 * MiB).size == 128 * MiB
    with pytest.raises(Unprocessable, match="grow only"):
        backend.resize_volume("data1", MiB)
    assert {v.name for v in backend.list_volumes()} >= {"data1", "data2"}
    with pytest.raises(NotFound):
        backend.get_volume("nope")
    assert backend.find_volume("nope") is None
    u = backend.usage()
    assert u.capacity > 0 and 0 <= u.used <= u.capacity and u.available > 0


def test_bad_source_leaves_nothing(backend, raw_image, tmp_path, ceph):
    before = rbd_ls(ceph)
    bad = tmp_path / "bad.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(bad), "100T"], check=True,
                   capture_output=True)
    with pytest.raises(InsufficientResources, match="set-quota"):
        backend.create_volume(VolumeSpec("bad", MiB, "raw"), source=str(bad))
    # a conversion that dies after it created its target image (fault injected)
    real = storage.rbd._qemu_img

    def dies_after_writing(args, pool):
        out = real(args, pool)
        if args[0] == "convert":
            raise CommandFailed("qemu-img convert failed: injected")
        return out

    with mock.patch("storage.rbd._qemu_img", dies_after_writing):
        with pytest.raises(CommandFailed, match="injected"):
            backend.create_volume(VolumeSpec("bad", MiB, "raw"), source=str(raw_image))
    with pytest.raises(InvalidInput):
        backend.create_volume(VolumeSpec("bad", MiB, "raw"), source=str(tmp_path / "missing"))
    backed = tmp_path / "backed.qcow2"  # would read a host file through its backing chain
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", str(raw_image), "-F", "raw",
                    str(backed)], check=True, capture_output=True)
    with pytest.raises(Unprocessable, match="backing file"):
        backend.create_volume(VolumeSpec("bad", MiB, "raw"), source=str(backed))
    assert rbd_ls(ceph) == before


_KILLED_WRITER = """
import io, sys, threading
from storage.rbd import RbdBackend

class Endless(io.RawIOBase):  # 8 MiB, then nothing ever again: the writer hangs mid-blob
    sent = 0
    def readable(self):
        return True
    def readinto(self, b):
        if self.sent >= 8 << 20:
            threading.Event().wait()
        n = min(len(b), 4 << 20)
        b[:n] = bytes(n)
        self.sent += n
        return n

conf, user, keyring, pool, tag = sys.argv[1:6]
RbdBackend("blk", pool=pool, conf=conf, user=user, keyring=keyring or None,
           host_tag=tag).put_blob(Endless())
"""


def test_sweep_removes_this_hosts_temps_of_a_killed_agent_only(ceph, tmp_path):
    """A writer killed mid-blob leaves natmp.<tag>.*: the next agent's sweep (same host tag)
    removes it, but not another host's temp, an untagged one, nor a write in flight."""
    import threading
    import time
    from storage.rbd import RbdBackend, TMP_PREFIX

    tag = "t" + os.urandom(4).hex()
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, ceph.conf, ceph.user,
                              ceph.keyring or "", ceph.rbd_pool, tag],
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        deadline = time.monotonic() + 60
        while not any(n.startswith(f"{TMP_PREFIX}{tag}.") for n in rbd_ls(ceph)):
            assert child.poll() is None and time.monotonic() < deadline, "the writer never started"
            time.sleep(0.2)
        time.sleep(1)  # a few MiB written
    finally:
        child.kill()
        child.wait()
    leftover = [n for n in rbd_ls(ceph) if n.startswith(f"{TMP_PREFIX}{tag}.")]
    assert len(leftover) == 1
    others = [f"{TMP_PREFIX}otherhost.{os.urandom(8).hex()}", f"{TMP_PREFIX}{os.urandom(16).hex()}"]
    for n in others:
        ceph.run("rbd", "create", "--size", "1M", f"{ceph.rbd_pool}/{n}")
    time.sleep(1.1)  # the timestamps have one-second resolution
    started = time.time()  # "the agent restarts"
    b = RbdBackend("blk", pool=ceph.rbd_pool, conf=ceph.conf, user=ceph.user,
                   keyring=ceph.keyring, host_tag=tag)
    gate, data = threading.Event(), os.urandom(3 * MiB)

    class Held(io.RawIOBase):  # an import of this agent, in flight during the sweep
        pos = 0

        def readable(self):
            return True

        def readinto(self, buf):
            if self.pos == MiB:
                gate.wait(60)
            n = min(len(buf), MiB, len(data) - self.pos)
            buf[:n] = data[self.pos:self.pos + n]
            self.pos += n
            return n

    box = {}
    writer = threading.Thread(target=lambda: box.update(info=b.put_blob(Held())))
    writer.start()
    try:
        while len([n for n in rbd_ls(ceph) if n.startswith(f"{TMP_PREFIX}{tag}.")]) < 2:
            time.sleep(0.1)
        removed, freed = b.sweep_temp(started)
        assert removed == 1 and freed >= 8 * MiB
        names = rbd_ls(ceph)
        assert leftover[0] not in names and all(n in names for n in others)
        assert b.sweep_temp(time.time() + 60) == (0, 0)  # the one in flight is spared
    finally:
        gate.set()
        writer.join()
    assert box["info"].digest == digest_of(data)
    assert b.open_blob(box["info"].digest).read() == data
    b.delete_blob(box["info"].digest)
    for n in others:
        ceph.run("rbd", "rm", f"{ceph.rbd_pool}/{n}")
    assert not [n for n in rbd_ls(ceph) if n.startswith(TMP_PREFIX)]
    b.close()


def test_pools_from_config_tag_their_temps_by_host_and_state_dir(tmp_path):
    from storage.rbd import RbdBackend, default_host_tag
    a = RbdBackend.from_config({"name": "p", "pool": "x"}, state_dir=str(tmp_path / "a"),
                               db=None, network=None)
    b = RbdBackend.from_config({"name": "p", "pool": "x"}, state_dir=str(tmp_path / "b"),
                               db=None, network=None)
    assert a.tmp_prefix == f"natmp.{default_host_tag(str(tmp_path / 'a'))}."
    assert a.tmp_prefix != b.tmp_prefix  # two agents on one machine sweep only their own
