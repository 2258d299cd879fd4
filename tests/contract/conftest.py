"""Backend factories for the storage contract suite: ONE dict, kind -> factory.

A factory takes pytest's ``tmp_path`` and returns a fresh, empty Backend. Other
helpers add their kinds here ("block", "object"); a factory that needs a real
component must fail (not skip) with what the machine lacks. Blob-only backends
(``supports_volumes`` False) run the blob half; the volume half checks Unsupported.
"""
from __future__ import annotations

import pytest


def _fake(tmp_path):
    from storage.fake import FakeBackend
    return FakeBackend("fake0")


def _fake_blobs(tmp_path):  # stands in for blob-only (object) pools until they land
    from storage.fake import FakeBackend
    return FakeBackend("fakeblobs", supports_volumes=False)


def _local(tmp_path):
    from storage.local import LocalBackend
    return LocalBackend("local0", path=str(tmp_path / "pool"))


BACKEND_FACTORIES = {
    "local": _local,
    "fake": _fake,
    "fake-blobs": _fake_blobs,
}


@pytest.fixture(params=sorted(BACKEND_FACTORIES))
def backend(request, tmp_path):
    b = BACKEND_FACTORIES[request.param](tmp_path)
    yield b
    b.close()
