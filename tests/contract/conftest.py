"""Backend factories for the storage contract suite (test_storage_backend.py): ONE dict,
kind -> factory, covering every registered backend kind (local, block = Ceph RBD,
object = S3 on radosgw) and the fake.

A factory takes pytest's ``tmp_path`` and returns a fresh, empty Backend; a factory that
needs a real component fails (not skips) with what the machine lacks. Blob-only backends
(``supports_volumes`` False: object pools, and "fake-blobs", the fast fake of one) run
the blob half; the volume half checks Unsupported. The driver and runtime suites
parametrize their own fixtures (test_driver.py, test_driver_migration.py, test_runtime.py).
"""
from __future__ import annotations

import pytest


def _fake(tmp_path):
    from storage.fake import FakeBackend
    return FakeBackend("fake0")


def _fake_blobs(tmp_path):  # a blob-only pool without Ceph: the object kind's half of the contract, fast
    from storage.fake import FakeBackend
    return FakeBackend("fakeblobs", supports_volumes=False)


def _local(tmp_path):
    from storage.local import LocalBackend
    return LocalBackend("local0", path=str(tmp_path / "pool"))


def _block(tmp_path):
    """An RBD pool of its own on the session's live Ceph (fresh and empty per test)."""
    from testbed.ceph_cluster import block_backend
    return block_backend(tmp_path)


def _object(tmp_path):
    """A bucket of its own on the session's live radosgw (fresh and empty per test)."""
    from testbed.ceph_cluster import object_backend
    return object_backend(tmp_path)


BACKEND_FACTORIES = {
    "block": _block,
    "object": _object,
    "local": _local,
    "fake": _fake,
    "fake-blobs": _fake_blobs,
}


@pytest.fixture(params=sorted(BACKEND_FACTORIES))
def backend(request, tmp_path):
    if request.param in ("block", "object"):
        request.getfixturevalue("ceph")  # the live cluster the factory uses
    b = BACKEND_FACTORIES[request.param](tmp_path)
    yield b
    b.close()
