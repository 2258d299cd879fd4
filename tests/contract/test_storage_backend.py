"""The storage Backend contract, run on every kind in conftest.BACKEND_FACTORIES."""
from __future__ import annotations

import hashlib
import io
import os
import threading

import pytest

from agent.errors import Conflict, InvalidInput, NotFound, Unprocessable, Unsupported
from storage.backend import (AdoptsBlobs, Backend, BlobInfo, FetchesBlobs, FetchesObjects, SweepsTemp, Volume,
                             VolumeSpec)
from storage.units import MiB



def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _has_volumes(backend) -> bool:
    """True for volume-capable pools; for blob-only pools, check every volume call is
    Unsupported (the whole volume contract of such a pool) and return False."""
    if backend.supports_volumes:
        return True
    d = backend.put_blob(io.BytesIO(b"\0" * MiB)).digest
    for call in (lambda: backend.create_volume(VolumeSpec("v", MiB, "raw")),
                 lambda: backend.clone_volume(d, "v", format="raw"),
                 lambda: backend.resize_volume("v", 2 * MiB),
                 lambda: backend.get_volume("v"),
                 lambda: backend.list_volumes()):
        with pytest.raises(Unsupported):
            call()
    return False


# ---------------------------------------------------------------- blobs

def test_is_a_backend(backend):
    assert isinstance(backend, Backend)
    assert backend.name and backend.kind


def test_put_then_read_back(backend):
    data = os.urandom(3 * MiB + 17)
    seen = []
    info = backend.put_blob(io.BytesIO(data), progress=seen.append)
    assert info == BlobInfo(_digest(data), len(data))
    assert seen and seen[-1] == len(data)
    assert backend.stat_blob(info.digest) == info
    assert backend.find_blob(info.digest) == info
    with backend.open_blob(info.digest) as f:
        assert f.read() == data
    assert info in backend.list_blobs()


def test_ranged_read(backend):
    data = bytes(range(256)) * 100
    d = backend.put_blob(io.BytesIO(data)).digest
    with backend.open_blob(d, 1000, 300) as f:
        assert f.read() == data[1000:1300]
    with backend.open_blob(d, len(data) - 10) as f:
        assert f.read() == data[-10:]
    with backend.open_blob(d, 100, 10**9) as f:
        assert f.read() == data[100:]


def test_put_with_right_digest_and_twice_stores_once(backend):
    data = b"hello blob"
    a = backend.put_blob(io.BytesIO(data), digest=_digest(data), size=len(data))
    b = backend.put_blob(io.BytesIO(data))
    assert a == b
    assert [x.digest for x in backend.list_blobs()].count(a.digest) == 1


def test_digest_mismatch_keeps_nothing(backend):
    wrong = _digest(b"other")
    with pytest.raises(InvalidInput):
        backend.put_blob(io.BytesIO(b"content"), digest=wrong)
    assert backend.find_blob(wrong) is None
    assert backend.find_blob(_digest(b"content")) is None
    assert backend.list_blobs() == []


def test_malformed_digest_is_invalid(backend):
    with pytest.raises(InvalidInput):
        backend.find_blob("md5:abc")
    with pytest.raises(InvalidInput):
        backend.put_blob(io.BytesIO(b"x"), digest="sha256:../../etc")


def test_missing_blob(backend):
    d = _digest(b"never stored")
    with pytest.raises(NotFound):
        backend.stat_blob(d)
    with pytest.raises(NotFound):
        backend.open_blob(d)
    assert backend.find_blob(d) is None
    assert backend.delete_blob(d) is False


def test_delete_blob_is_idempotent(backend):
    d = backend.put_blob(io.BytesIO(b"gone soon")).digest
    assert backend.delete_blob(d) is True
    assert backend.delete_blob(d) is False
    assert backend.find_blob(d) is None


def test_concurrent_puts_of_the_same_content(backend):
    data = os.urandom(2 * MiB)
    results, errors = [], []

    def put():
        try:
            results.append(backend.put_blob(io.BytesIO(data)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=put) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert [b.digest for b in backend.list_blobs()] == [_digest(data)]
    with backend.open_blob(_digest(data)) as f:
        assert f.read() == data


def test_put_from_a_non_seekable_stream(backend):
    r, w = os.pipe()
    data = os.urandom(MiB)
    with os.fdopen(w, "wb") as wf:
        t = threading.Thread(target=lambda: (wf.write(data), wf.close()))
        t.start()
        with os.fdopen(r, "rb") as rf:
            info = backend.put_blob(rf, digest=_digest(data))
        t.join()
    assert info.size == MiB


def test_usage(backend):
    u = backend.usage()
    assert u.capacity > 0 and 0 <= u.used <= u.capacity and u.available >= 0


# ---------------------------------------------------------------- volumes

def _raw_image_blob(backend, size=MiB):
    return backend.put_blob(io.BytesIO(b"\0" * size)).digest


def test_create_get_list_delete_volume(backend):
    if not _has_volumes(backend):
        return
    v = backend.create_volume(VolumeSpec("disk0", 4 * MiB, "qcow2"))
    assert isinstance(v, Volume)
    assert (v.name, v.pool, v.format, v.size) == ("disk0", backend.name, "qcow2", 4 * MiB)
    assert v.uri
    assert backend.get_volume("disk0") == v
    assert backend.find_volume("disk0") == v
    assert [x.name for x in backend.list_volumes()] == ["disk0"]
    assert backend.delete_volume("disk0") is True
    assert backend.delete_volume("disk0") is False
    assert backend.find_volume("disk0") is None
    with pytest.raises(NotFound):
        backend.get_volume("disk0")


def test_volume_name_clash_is_conflict(backend):
    if not _has_volumes(backend):
        return
    backend.create_volume(VolumeSpec("twice", MiB, "raw"))
    with pytest.raises(Conflict):
        backend.create_volume(VolumeSpec("twice", MiB, "raw"))
    d = _raw_image_blob(backend)
    with pytest.raises(Conflict):
        backend.clone_volume(d, "twice", format="raw")


def test_bad_volume_spec_is_invalid_and_leaves_nothing(backend):
    if not _has_volumes(backend):
        return
    for spec in (VolumeSpec("x", MiB, "vmdk"), VolumeSpec("../escape", MiB, "raw"),
                 VolumeSpec("", MiB, "raw")):
        with pytest.raises(InvalidInput):
            backend.create_volume(spec)
    assert backend.list_volumes() == []


def test_dir_volume_is_a_real_directory(backend):
    if not _has_volumes(backend):
        return
    if backend.kind == "block":  # a directory cannot live on a remote block device here
        with pytest.raises(Unsupported):
            backend.create_volume(VolumeSpec("ctr0", 0, "dir"))
        assert backend.find_volume("ctr0") is None
        return
    v = backend.create_volume(VolumeSpec("ctr0", 0, "dir"))
    assert v.format == "dir"
    if v.path is not None:
        assert os.path.isdir(os.path.join(v.path, "upper"))
        assert os.path.isdir(os.path.join(v.path, "work"))
        with open(os.path.join(v.path, "upper", "f"), "w") as f:
            f.write("x")
    assert backend.delete_volume("ctr0")
    if v.path is not None:
        assert not os.path.exists(v.path)


def test_clone_records_base_and_grows(backend):
    if not _has_volumes(backend):
        return
    d = _raw_image_blob(backend)
    v = backend.clone_volume(d, "vm0", format="raw", size=8 * MiB)
    assert v.base == d and v.size == 8 * MiB
    assert backend.get_volume("vm0").base == d
    w = backend.clone_volume(d, "vm1", format="raw")
    assert w.size == MiB


def test_clone_of_missing_blob_is_not_found(backend):
    if not _has_volumes(backend):
        return
    with pytest.raises(NotFound):
        backend.clone_volume(_digest(b"nope"), "vm0", format="qcow2")
    assert backend.find_volume("vm0") is None


def test_resize_grows_only(backend):
    if not _has_volumes(backend):
        return
    backend.create_volume(VolumeSpec("grow", 2 * MiB, "qcow2"))
    assert backend.resize_volume("grow", 6 * MiB).size == 6 * MiB
    assert backend.get_volume("grow").size == 6 * MiB
    with pytest.raises(Unprocessable):
        backend.resize_volume("grow", MiB)
    with pytest.raises(NotFound):
        backend.resize_volume("missing", MiB)


# ---------------------------------------------------------------- optional capabilities
# storage.backend's optional Protocols: which kinds claim which (a fake claims what its
# real kind claims only where the image store's behaviour would differ; it does not here),
# and that a backend claiming one really does it.

CAPABILITIES = {"local": {AdoptsBlobs, SweepsTemp}, "object": {FetchesBlobs, FetchesObjects},
                "block": {SweepsTemp}, "fake": set()}


def _claiming(capability) -> list[str]:
    """The backend kinds that claim ``capability``: its contract runs on each of them."""
    return sorted(kind for kind, caps in CAPABILITIES.items() if capability in caps)


def test_claims_its_optional_capabilities(backend):
    claimed = {p for p in (AdoptsBlobs, FetchesBlobs, FetchesObjects, SweepsTemp) if isinstance(backend, p)}
    assert claimed == CAPABILITIES[backend.kind]


@pytest.mark.parametrize("backend", _claiming(FetchesBlobs), indirect=True)
def test_fetch_blob(backend, tmp_path):
    assert isinstance(backend, FetchesBlobs)
    data = os.urandom(5 * MiB + 3)
    info = backend.put_blob(io.BytesIO(data))
    seen = []
    dest = tmp_path / "fetched"
    assert backend.fetch_blob(info.digest, str(dest), progress=seen.append) == info
    assert dest.read_bytes() == data and seen[-1] == len(data)
    with pytest.raises(NotFound):
        backend.fetch_blob(_digest(b"missing"), str(tmp_path / "missing"))
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("backend", _claiming(FetchesObjects), indirect=True)
def test_fetch_object(backend, tmp_path):
    assert isinstance(backend, FetchesObjects)
    data = os.urandom(2 * MiB + 5)
    backend.client.put_object(Bucket=backend.bucket, Key="uploaded/by-another-tool", Body=data)  # S3 only
    dest = tmp_path / "obj"
    assert backend.fetch_object("uploaded/by-another-tool", str(dest),
                                sha256=hashlib.sha256(data).hexdigest()) == len(data)
    assert dest.read_bytes() == data
    with pytest.raises(InvalidInput):
        backend.fetch_object("uploaded/by-another-tool", str(tmp_path / "bad"), sha256="0" * 64)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(NotFound):
        backend.fetch_object("no/such/key", str(tmp_path / "none"))


@pytest.mark.parametrize("backend", _claiming(AdoptsBlobs), indirect=True)
def test_adopt_blob(backend, tmp_path):
    assert isinstance(backend, AdoptsBlobs)
    data = os.urandom(MiB + 9)
    src = tmp_path / "verified"
    src.write_bytes(data)
    info = backend.adopt_blob(str(src), _digest(data))
    if info is None:  # another filesystem: left alone for the caller to put_blob
        assert src.read_bytes() == data
        return
    assert info == BlobInfo(_digest(data), len(data))
    with backend.open_blob(info.digest) as f:
        assert f.read() == data
    again = tmp_path / "again"
    again.write_bytes(data)
    assert backend.adopt_blob(str(again), info.digest) == info  # already present: stored once
