"""Moving bytes between hosts: the filesystem and stream helpers both sides use (what a copy
writes, a peer's rootfs tar unpacked safely, a disk layer checked, an upper dir pruned)."""
from __future__ import annotations

import errno
import os
import shutil

from agent.errors import InsufficientResources, InvalidInput
from storage.units import MiB

IMAGE_CHUNK = 1024 * 1024
NO_SPACE = "No space left on device"  # strerror(ENOSPC), as tar, QEMU and libvirt report it
ROOTFS_MAX_BYTES = 1024**4  # 1 TiB: what one rootfs stream may unpack to (the API caps the stream the same)


def allocated_bytes(path: str | None) -> int:
    """Bytes a file, or a directory tree, really occupies: what copying it writes."""
    if not path or not os.path.exists(path):
        return 0
    if not os.path.isdir(path):
        return os.stat(path).st_blocks * 512
    n = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                n += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass  # removed while we walk (a running container)
    return n


class _Counted:
    """A read()-able stream that counts what was read from it."""

    def __init__(self, stream):
        self.stream, self.n = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.n += len(data)
        return data

    def drain(self) -> None:
        """Read to the end: the sender gets our answer, not a reset."""
        while self.read(IMAGE_CHUNK):
            pass


def untar_into(dest: str, stream) -> int:
    """Unpack a peer's tar stream of a container's upper dir into ``dest`` with the hardened
    extractor (storage/upper.py: nothing an earlier stream left there is followed; owners,
    modes, whiteouts and overlay xattrs kept); bytes read. A refused or failed stream is
    drained, then raised: InvalidInput, or InsufficientResources when the pool fills up."""
    from storage.upper import unpack_upper
    counted = _Counted(stream)
    try:
        unpack_upper(counted, dest, max_bytes=ROOTFS_MAX_BYTES, label="the rootfs stream")
    except OSError as e:
        counted.drain()
        if e.errno == errno.ENOSPC:
            raise InsufficientResources(f"{dest}: {NO_SPACE.lower()} after {counted.n // MiB} MiB of the "
                                        "rootfs") from None
        raise
    except BaseException:
        counted.drain()
        raise
    counted.drain()  # the tar's end-of-archive padding
    return counted.n


def check_disk_layer(info: dict, image, base: str | None) -> None:
    """InvalidInput unless ``info`` (qemu-img info of a peer's disk file, which opens neither a
    backing nor a data file) is a plain qcow2 layer: no external data file, no encryption, and
    no backing reference but the source's copy of ``image`` (``.../<image id>``), which the
    caller replaces with this pool's ``base``."""
    if info.get("format") != "qcow2":
        raise InvalidInput(f"the disk sent is {info.get('format')!r}, not a qcow2 layer")
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file") or data.get("data-file-raw"):
        raise InvalidInput(f"the disk sent uses an external data file ({data.get('data-file')!r}): refused "
                           "(it would write to a file of this host)")
    if data.get("encrypt") or info.get("encrypted"):
        raise InvalidInput("the disk sent is encrypted: refused")
    backing = info.get("backing-filename")
    if backing is not None:
        fmt = info.get("backing-filename-format")
        if base is None or not backing.startswith("/") or os.path.basename(backing) != image.id \
                or fmt not in (None, image.format):
            raise InvalidInput(f"the disk sent has the backing file {backing[:200]!r} ({fmt}): only the "
                               f"source's copy of image {image.id[:12]} ({image.format}) may be its base")


def rootfs_paths(upper: str) -> list[str]:
    """Every path under ``upper``, relative ("./a/b"), as tar names them."""
    out = []
    for dirpath, dirnames, filenames in os.walk(upper):
        rel = os.path.relpath(dirpath, upper)
        for n in dirnames + filenames:
            out.append(os.path.normpath(os.path.join(rel, n)))
    return out


def prune_rootfs(upper: str, keep: set[str]) -> int:
    """Remove what is under ``upper`` but not in ``keep`` (deleted on the source after the
    first sync); the number removed."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(upper, topdown=True):
        rel = os.path.relpath(dirpath, upper)
        for name in list(dirnames):
            p = os.path.normpath(os.path.join(rel, name))
            if p not in keep:
                shutil.rmtree(os.path.join(dirpath, name), ignore_errors=True)
                dirnames.remove(name)
                n += 1
        for name in filenames:
            if os.path.normpath(os.path.join(rel, name)) not in keep:
                os.unlink(os.path.join(dirpath, name))
                n += 1
    return n
