"""A real, stateful in-memory storage backend (kind "fake") for tests and the API.

Blobs live in a dict, verified by sha256 like the real backends; volumes are records,
except format "dir" volumes, which get a real temp directory (with ``upper/`` and
``work/`` inside) so a container runtime can use them. ``close()`` removes the temp
directories. Passes the same contract suite as ``storage.local.LocalBackend``.
``FakeBackend(name, supports_volumes=False)`` behaves like a blob-only (object) pool:
every volume call raises Unsupported.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

from agent.errors import Conflict, InvalidInput, NotFound, Unprocessable, Unsupported
from storage.backend import DISK_FORMATS, BlobInfo, Progress, Usage, Volume, VolumeSpec, iter_chunks
from storage.validate import check_volume_spec, parse_digest

if TYPE_CHECKING:
    from agent.state import Database
    from containers.network import Network

FAKE_CAPACITY = 1 << 40  # 1 TiB: a nominal size so usage() has something to report


class FakeBackend:
    kind = "fake"
    supports_volumes = True

    @classmethod
    def from_config(cls, settings: Mapping[str, Any], *, state_dir: str, db: Database,
                    network: Network | None) -> FakeBackend:
        """agent.registry's uniform construction from ``[pools.<name>]``: ``name`` and the pool's
        options (``supports_volumes``); in memory: ``state_dir`` is ignored too. Pools keep no rows
        and touch no host network: ``db`` and ``network`` are ignored."""
        return cls(**settings)

    def __init__(self, name: str, *, supports_volumes: bool = True, **ignored):
        self.name = name
        self.supports_volumes = bool(supports_volumes)
        self._blobs: dict[str, bytes] = {}
        self._volumes: dict[str, Volume] = {}
        self._dirs: dict[str, str] = {}
        self._lock = threading.Lock()
        # its dir volumes live in the host's temp dir: gone with the backend (or the process)
        # even where a test never deletes them or closes the pool
        weakref.finalize(self, _remove_dirs, self._dirs)

    # -- blobs --
    def put_blob(self, src: BinaryIO, *, digest: str | None = None, size: int | None = None,
                 progress: Progress | None = None) -> BlobInfo:
        if digest is not None:
            parse_digest(digest)
        h, buf, done = hashlib.sha256(), io.BytesIO(), 0
        for chunk in iter_chunks(src):
            h.update(chunk)
            buf.write(chunk)
            done += len(chunk)
            if progress:
                progress(done)
        actual = "sha256:" + h.hexdigest()
        if digest is not None and actual != digest:
            raise InvalidInput(f"content digest {actual} does not match the expected {digest}: "
                               "the source is corrupt or the digest is wrong")
        if size is not None and size != done:
            raise InvalidInput(f"content is {done} bytes, expected {size}")
        with self._lock:
            self._blobs.setdefault(actual, buf.getvalue())
        return BlobInfo(actual, done)

    def open_blob(self, digest: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        data = self._get(digest)
        if offset < 0 or (length is not None and length < 0):
            raise InvalidInput("offset and length must be >= 0")
        end = len(data) if length is None else min(len(data), offset + length)
        return io.BytesIO(data[offset:end])

    def stat_blob(self, digest: str) -> BlobInfo:
        return BlobInfo(digest, len(self._get(digest)))

    def find_blob(self, digest: str) -> BlobInfo | None:
        parse_digest(digest)
        data = self._blobs.get(digest)
        return None if data is None else BlobInfo(digest, len(data))

    def delete_blob(self, digest: str) -> bool:
        parse_digest(digest)
        with self._lock:
            return self._blobs.pop(digest, None) is not None

    def list_blobs(self) -> list[BlobInfo]:
        return [BlobInfo(d, len(b)) for d, b in sorted(self._blobs.items())]

    def blob_path(self, digest: str) -> str | None:
        return None

    def _get(self, digest: str) -> bytes:
        parse_digest(digest)
        try:
            return self._blobs[digest]
        except KeyError:
            raise NotFound(f"blob {digest} not found in pool {self.name}") from None

    # -- volumes --
    def _volumes_only(self) -> None:
        if not self.supports_volumes:
            raise Unsupported(f"pool {self.name} holds blobs only; put volumes on a local or "
                              "block pool")
    def create_volume(self, spec: VolumeSpec, source: str | None = None) -> Volume:
        self._volumes_only()
        check_volume_spec(spec)
        if source is not None and not os.path.isfile(source):
            raise InvalidInput(f"volume source {source!r} is not a file")
        with self._lock:
            if spec.name in self._volumes:
                raise Conflict(f"volume {spec.name!r} already exists in pool {self.name}")
            path = None
            if spec.format == "dir":
                path = tempfile.mkdtemp(prefix=f"fakevol-{spec.name}-")
                for sub in ("upper", "work"):
                    os.mkdir(f"{path}/{sub}")
                self._dirs[spec.name] = path
            vol = Volume(spec.name, self.name, spec.format, spec.size, path=path,
                         uri=f"fake://{self.name}/{spec.name}")
            self._volumes[spec.name] = vol
            return vol

    def clone_volume(self, digest: str, name: str, *, format: str,
                     size: int | None = None) -> Volume:
        self._volumes_only()
        data = self._get(digest)
        if format not in DISK_FORMATS:
            raise InvalidInput(f"cannot clone an image of format {format!r}; use qcow2 or raw")
        base_size = len(data)
        with self._lock:
            if name in self._volumes:
                raise Conflict(f"volume {name!r} already exists in pool {self.name}")
            vol = Volume(name, self.name, "qcow2", max(size or 0, base_size), base=digest,
                         uri=f"fake://{self.name}/{name}")
            self._volumes[name] = vol
            return vol

    def delete_volume(self, name: str) -> bool:
        self._volumes_only()
        with self._lock:
            vol = self._volumes.pop(name, None)
            path = self._dirs.pop(name, None)
        if path:
            shutil.rmtree(path, ignore_errors=True)
        return vol is not None

    def resize_volume(self, name: str, size: int) -> Volume:
        self._volumes_only()
        with self._lock:
            vol = self.get_volume(name)
            if size < vol.size:
                raise Unprocessable(f"volume {name!r} is {vol.size} bytes; shrinking to {size} "
                                    "is not supported (grow only)")
            vol = Volume(vol.name, vol.pool, vol.format, size, vol.base, vol.path, vol.uri,
                         vol.attach)
            self._volumes[name] = vol
            return vol

    def get_volume(self, name: str) -> Volume:
        self._volumes_only()
        vol = self._volumes.get(name)
        if vol is None:
            raise NotFound(f"volume {name!r} not found in pool {self.name}")
        return vol

    def find_volume(self, name: str) -> Volume | None:
        self._volumes_only()
        return self._volumes.get(name)

    def list_volumes(self) -> list[Volume]:
        self._volumes_only()
        return [self._volumes[n] for n in sorted(self._volumes)]

    def usage(self) -> Usage:
        used = sum(len(b) for b in self._blobs.values())
        return Usage(FAKE_CAPACITY, used, FAKE_CAPACITY - used)

    def close(self) -> None:
        _remove_dirs(self._dirs)


def _remove_dirs(dirs: dict[str, str]) -> None:
    for name in list(dirs):
        shutil.rmtree(dirs.pop(name), ignore_errors=True)
