"""The ``local`` backend: a pool that is one directory on this host.

Layout under ``path``::

    blobs/sha256/<hex>          immutable content, named by its digest (read-only files)
    blobs/sha256/.tmp-*         in-flight writes (same dir, so the final rename is atomic)
    volumes/<name>.qcow2|.raw   VM disks; clones are qcow2 overlays backed by a blob file
    volumes/<name>/upper,work   "dir" volumes (a container's overlayfs upper + work dir)
    volumes/.<name>.json        the volume record (format, size, base); it defines existence

A blob is written to a temp file while being hashed, fsynced, then renamed into place:
readers never see partial content, the same content stored twice is kept once, and a
digest mismatch keeps nothing. Clones are O(1): ``qemu-img create -b <blob> -F <fmt>``.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

from agent.errors import (AgentError, CommandFailed, Conflict, InsufficientResources,
                          InvalidInput, NotFound, Unprocessable)
from storage import qemu_img
from storage.backend import DISK_FORMATS, BlobInfo, Progress, Usage, Volume, VolumeSpec
from storage.validate import check_volume_spec, parse_digest

if TYPE_CHECKING:
    from agent.state import Database
    from containers.network import Network

POOL_DIR_MODE = 0o711  # traversable, not listable
COPY_CHUNK = 8 * 1024 * 1024  # 8 MiB: big enough that syscalls and hashing calls amortise
TMP_PREFIX = ".tmp-"
RECORD_TMP_SUFFIX = ".json.tmp"  # a volume record being written
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
QCOW2_MAGIC = b"QFI\xfb"


class LocalBackend:
    kind = "local"
    supports_volumes = True

    @classmethod
    def from_config(cls, settings: Mapping[str, Any], *, state_dir: str, db: Database,
                    network: Network | None) -> LocalBackend:
        """agent.registry's uniform construction from ``[pools.<name>]``: ``name`` and the pool's
        options; the files go under the ``path`` option, else under ``state_dir``. Pools keep no
        rows and touch no host network: ``db`` and ``network`` are ignored."""
        return cls(**{**settings, "path": settings.get("path", state_dir)})

    def __init__(self, name: str, path: str, **ignored):
        if not path or not os.path.isabs(path):
            raise InvalidInput(f"pool {name}: path must be an absolute directory, got {path!r}")
        self.name = name
        self.path = path
        self.blob_dir = os.path.join(path, "blobs", "sha256")
        self.volume_dir = os.path.join(path, "volumes")
        os.makedirs(self.blob_dir, exist_ok=True)
        os.makedirs(self.volume_dir, exist_ok=True)
        for d in (self.volume_dir, os.path.dirname(self.blob_dir)):  # tenants' disks: not listed by other users;
            os.chmod(d, POOL_DIR_MODE)  # QEMU (another user) opens them by path
        self._lock = threading.Lock()
        self._writing: set[str] = set()  # temp files our writes are using (sweep_temp skips them)

    # ------------------------------------------------------------------ blobs
    def _blob_file(self, digest: str) -> str:
        return os.path.join(self.blob_dir, parse_digest(digest))

    def put_blob(self, src: BinaryIO, *, digest: str | None = None, size: int | None = None,
                 progress: Progress | None = None) -> BlobInfo:
        if digest is not None:
            existing = self.find_blob(digest)
            if existing is not None and (size is None or size == existing.size):
                return existing  # content-addressed: already stored and verified once
        try:
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=self.blob_dir)
        except OSError as e:
            raise self._os_error(e, "store a blob") from None
        self._writing.add(tmp)
        try:
            with os.fdopen(fd, "wb", buffering=0) as out:
                actual, done = copy_and_hash(src, out, progress)
                os.fsync(out.fileno())
            if digest is not None and actual != digest:
                raise InvalidInput(f"content digest {actual} does not match the expected "
                                   f"{digest}: the source is corrupt or the digest is wrong")
            if size is not None and size != done:
                raise InvalidInput(f"content is {done} bytes, expected {size}")
            final = self._blob_file(actual)
            os.chmod(tmp, 0o444)
            if os.path.exists(final):
                os.unlink(tmp)
            else:
                os.rename(tmp, final)
                _fsync_dir(self.blob_dir)
            return BlobInfo(actual, done)
        except OSError as e:
            _unlink(tmp)
            raise self._os_error(e, "store a blob") from None
        except BaseException:
            _unlink(tmp)
            raise
        finally:
            self._writing.discard(tmp)

    def open_blob(self, digest: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        if offset < 0 or (length is not None and length < 0):
            raise InvalidInput("offset and length must be >= 0")
        try:
            f = open(self._blob_file(digest), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found in pool {self.name}") from None
        if offset:
            f.seek(offset)
        if length is None:
            return f
        return io.BufferedReader(_Range(f, length))

    def adopt_blob(self, path: str, digest: str) -> BlobInfo | None:
        """Move the host file ``path``, which the caller has verified holds ``digest`` (e.g.
        S3Backend.fetch_blob did), into the pool by a rename: no copy, no second hash.
        Return None (and leave ``path`` alone) when it is on another filesystem: the caller
        copies it with put_blob then. An addition to the Backend seam for image caching."""
        final = self._blob_file(digest)
        existing = self.find_blob(digest)
        if existing is not None:
            return existing
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # durable before it gets its content-addressed name
        finally:
            os.close(fd)
        try:
            os.chmod(path, 0o444)
            os.rename(path, final)
        except OSError as e:
            if e.errno == errno.EXDEV:
                return None
            raise
        _fsync_dir(self.blob_dir)
        return BlobInfo(digest, os.stat(final).st_size)

    def stat_blob(self, digest: str) -> BlobInfo:
        info = self.find_blob(digest)
        if info is None:
            raise NotFound(f"blob {digest} not found in pool {self.name}")
        return info

    def find_blob(self, digest: str) -> BlobInfo | None:
        try:
            return BlobInfo(digest, os.stat(self._blob_file(digest)).st_size)
        except FileNotFoundError:
            return None

    def delete_blob(self, digest: str) -> bool:
        try:
            os.unlink(self._blob_file(digest))
            return True
        except FileNotFoundError:
            return False

    def list_blobs(self) -> list[BlobInfo]:
        out = []
        with os.scandir(self.blob_dir) as it:
            for e in it:
                if not e.name.startswith("."):
                    out.append(BlobInfo("sha256:" + e.name, e.stat().st_size))
        return sorted(out, key=lambda b: b.digest)

    def blob_path(self, digest: str) -> str | None:
        p = self._blob_file(digest)
        return p if os.path.exists(p) else None

    # ------------------------------------------------------------------ volumes
    def _record(self, name: str) -> str:
        return os.path.join(self.volume_dir, f".{name}.json")

    def _data(self, name: str, fmt: str) -> str:
        return os.path.join(self.volume_dir, name if fmt == "dir" else f"{name}.{fmt}")

    def _volume(self, name: str, fmt: str, size: int, base: str | None) -> Volume:
        p = self._data(name, fmt)
        return Volume(name, self.name, fmt, size, base=base, path=p, uri="file://" + p)

    def _reserve(self, name: str) -> None:
        """Claim ``name`` (O_EXCL on its record); Conflict if taken."""
        try:
            os.close(os.open(self._record(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise Conflict(f"volume {name!r} already exists in pool {self.name}; "
                           "delete it or pick another name") from None
        except OSError as e:
            raise self._os_error(e, f"create volume {name!r}") from None

    def _commit(self, vol: Volume) -> Volume:
        rec = {"format": vol.format, "size": vol.size, "base": vol.base}
        tmp = self._record(vol.name) + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(rec, f)
            os.rename(tmp, self._record(vol.name))
        except BaseException:
            _unlink(tmp)
            raise
        return vol

    def _os_error(self, e: OSError, what: str) -> AgentError | OSError:
        """InsufficientResources for a full filesystem, naming the pool and the fix."""
        if e.errno in NO_SPACE:
            return self._full(what)
        return e

    def _full(self, what: str) -> InsufficientResources:
        st = os.statvfs(self.path)
        return InsufficientResources(
            f"pool {self.name} is full ({st.f_bavail * st.f_frsize} bytes free in {self.path}): "
            f"cannot {what}; free space (delete unused images and instances, then "
            "`nodeagent image gc`) or use another pool", pool=self.name)

    def _space_errors(self, e: BaseException, what: str) -> BaseException:
        """Map a full filesystem, seen as OSError or as qemu-img's stderr, to _full."""
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return self._full(what)
        if isinstance(e, CommandFailed) and "No space left on device" in (
                e.details.get("stderr") or e.message):
            return self._full(what)
        return e

    def sweep_temp(self, before: float) -> tuple[int, int]:
        """Remove blob temp files and volume record temps a killed agent left (see
        storage.backend.SweepsTemp)."""
        n = freed = 0
        for d, match in ((self.blob_dir, lambda x: x.startswith(TMP_PREFIX)),
                         (self.volume_dir, lambda x: x.startswith(".") and x.endswith(RECORD_TMP_SUFFIX))):
            with os.scandir(d) as it:
                for e in it:
                    if not match(e.name) or e.path in self._writing:
                        continue
                    try:
                        st = e.stat(follow_symlinks=False)
                        if st.st_mtime >= before:
                            continue
                        os.unlink(e.path)
                    except FileNotFoundError:
                        continue
                    n, freed = n + 1, freed + st.st_size
        return n, freed

    def _abort(self, name: str, fmt: str) -> None:
        p = self._data(name, fmt)
        if fmt == "dir":
            shutil.rmtree(p, ignore_errors=True)
        else:
            _unlink(p)
        _unlink(self._record(name))

    def create_volume(self, spec: VolumeSpec, source: str | None = None) -> Volume:
        check_volume_spec(spec)
        if source is not None and spec.format == "dir":
            raise InvalidInput("a dir volume cannot be filled from a source image")
        self._reserve(spec.name)
        p = self._data(spec.name, spec.format)
        try:
            size = spec.size
            if spec.format == "dir":
                os.mkdir(p, 0o700)
                os.mkdir(os.path.join(p, "upper"), 0o755)
                os.mkdir(os.path.join(p, "work"), 0o700)
            elif source is not None:
                src = qemu_img.info(source)
                if src["format"] not in DISK_FORMATS or src.get("backing-filename"):
                    raise InvalidInput(f"{source}: a {src['format']} image"
                                       f"{' with a backing file' if src.get('backing-filename') else ''}"
                                       " cannot fill a volume; give a standalone qcow2 or raw image")
                qemu_img.convert(source, p, src_format=src["format"], dst_format=spec.format)
                size = max(spec.size, src["virtual-size"])
                if size > src["virtual-size"]:
                    qemu_img.resize(p, size, format=spec.format)
            elif spec.format == "raw":
                with open(p, "xb") as f:
                    f.truncate(spec.size)
            else:
                qemu_img.create(p, format=spec.format, size=spec.size)
            return self._commit(self._volume(spec.name, spec.format, size, None))
        except BaseException as e:
            self._abort(spec.name, spec.format)
            mapped = self._space_errors(e, f"create volume {spec.name!r}")
            if mapped is not e:
                raise mapped from None
            raise

    def clone_volume(self, digest: str, name: str, *, format: str,
                     size: int | None = None) -> Volume:
        if format not in DISK_FORMATS:
            raise InvalidInput(f"cannot clone an image of format {format!r}; use qcow2 or raw")
        check_volume_spec(VolumeSpec(name, size or 0, "qcow2"))
        base = self._blob_file(digest)
        if not os.path.exists(base):
            raise NotFound(f"blob {digest} not found in pool {self.name}")
        base_size = disk_virtual_size(base, format)
        size = max(size or 0, base_size)
        self._reserve(name)
        try:
            qemu_img.create(self._data(name, "qcow2"), format="qcow2", backing=base,
                            backing_format=format, size=size)
            return self._commit(self._volume(name, "qcow2", size, digest))
        except BaseException as e:
            self._abort(name, "qcow2")
            mapped = self._space_errors(e, f"create volume {name!r}")
            if mapped is not e:
                raise mapped from None
            raise

    def delete_volume(self, name: str) -> bool:
        vol = self.find_volume(name)
        if vol is not None:
            self._abort(name, vol.format)
            return True
        if not name or "/" in name or name.startswith(".") or not os.path.exists(self._record(name)):
            return False
        for fmt in ("qcow2", "raw", "dir"):  # an unreadable record: a crash mid-create
            self._abort(name, fmt)
        return True

    def resize_volume(self, name: str, size: int) -> Volume:
        with self._lock:
            vol = self.get_volume(name)
            if size < vol.size:
                raise Unprocessable(f"volume {name!r} is {vol.size} bytes; shrinking to {size} "
                                    "is not supported (grow only)")
            if size == vol.size:
                return vol
            try:
                if vol.format == "raw":  # a plain grow: no image lock, so also while QEMU has it open
                    os.truncate(vol.path, size)
                elif vol.format != "dir":
                    qemu_img.resize(vol.path, size, format=vol.format)
                return self._commit(self._volume(name, vol.format, size, vol.base))
            except BaseException as e:
                mapped = self._space_errors(e, f"resize volume {name!r}")
                if mapped is not e:
                    raise mapped from None
                raise

    def get_volume(self, name: str) -> Volume:
        vol = self.find_volume(name)
        if vol is None:
            raise NotFound(f"volume {name!r} not found in pool {self.name}")
        return vol

    def find_volume(self, name: str) -> Volume | None:
        if not name or "/" in name or name.startswith("."):
            return None
        try:
            with open(self._record(name)) as f:
                rec = json.load(f)
        except (FileNotFoundError, ValueError):  # absent, or being created right now
            return None
        return self._volume(name, rec["format"], rec["size"], rec.get("base"))

    def list_volumes(self) -> list[Volume]:
        names = sorted(e[1:-5] for e in os.listdir(self.volume_dir)
                       if e.startswith(".") and e.endswith(".json"))
        return [v for v in map(self.find_volume, names) if v is not None]

    def usage(self) -> Usage:
        st = os.statvfs(self.path)
        cap = st.f_blocks * st.f_frsize
        avail = st.f_bavail * st.f_frsize
        return Usage(cap, cap - st.f_bfree * st.f_frsize, avail)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------- helpers

def copy_and_hash(src: BinaryIO, out, progress: Progress | None = None) -> tuple[str, int]:
    """Copy ``src`` to the unbuffered ``out`` while hashing: one read, one write per byte."""
    h = hashlib.sha256()
    buf = bytearray(COPY_CHUNK)
    view = memoryview(buf)
    done = 0
    readinto = getattr(src, "readinto", None)
    while True:
        if readinto is not None:
            n = readinto(buf)
            if not n:
                break
            chunk = view[:n]
        else:
            data = src.read(COPY_CHUNK)
            if not data:
                break
            chunk, n = data, len(data)
        h.update(chunk)
        written = 0
        while written < n:
            written += out.write(chunk[written:])
        done += n
        if progress:
            progress(done)
    return "sha256:" + h.hexdigest(), done


def disk_virtual_size(path: str, fmt: str) -> int:
    """Virtual size of a verified raw/qcow2 blob without running qemu-img (the clone hot path)."""
    if fmt == "raw":
        return os.stat(path).st_size
    with open(path, "rb") as f:
        head = f.read(32)
    if len(head) < 32 or head[:4] != QCOW2_MAGIC:
        raise InvalidInput(f"{path} is not a qcow2 image")
    return struct.unpack(">Q", head[24:32])[0]


class _Range(io.RawIOBase):
    """At most ``length`` bytes of an already positioned file."""

    def __init__(self, f, length: int):
        self._f, self._left = f, length

    def readable(self):
        return True

    def readinto(self, b):
        if self._left <= 0:
            return 0
        n = self._f.readinto(memoryview(b)[:min(len(b), self._left)])
        self._left -= n or 0
        return n

    def close(self):
        self._f.close()
        super().close()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
