"""Moving bytes between hosts: the filesystem and stream helpers both sides use (what a copy
writes, a peer's rootfs tar unpacked safely, a disk layer checked, an upper dir pruned)."""
from __future__ import annotations

import errno
import os
import shutil

from agent.errors import InsufficientResources
from storage.units import MiB

IMAGE_CHUNK = 1024 * 1024
NO_SPACE = "No space left on device"  # strerror(ENOSPC), as tar, QEMU and libvirt report it
ROOTFS_MAX_BYTES = 1024**4  # 1 TiB: what one rootfs stream may unpack to (the API caps the stream the same)
NOBODY = 65534  # the overflow id: what a container sees for an id its map lacks


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


def write_raw(path: str, stream, size: int) -> int:
    """Fill the raw file ``path`` (``size`` bytes, made here) with exactly ``size`` bytes read
    from ``stream`` (a VM's volume as another host holds it: guest data, never opened by the
    host as anything but bytes); runs of zeros stay holes. Whatever it held before is
    dropped. Unprocessable for a stream longer or shorter than ``size`` (read to its end);
    InsufficientResources when the pool fills up. The bytes read."""
    from agent.errors import Unprocessable
    src = _Counted(stream)
    try:
        with open(path, "r+b") as f:
            f.truncate(0)  # a retried stream: no stale block survives under a hole
            f.truncate(size)
            done = 0
            while chunk := src.read(IMAGE_CHUNK):
                if done + len(chunk) > size:
                    src.drain()
                    raise Unprocessable(f"the volume stream is longer than the volume's {size} bytes: refused")
                if chunk.count(0) == len(chunk):
                    f.seek(len(chunk), os.SEEK_CUR)
                else:
                    f.write(chunk)
                done += len(chunk)
            if done != size:
                raise Unprocessable(f"the volume stream ended after {done} of the volume's {size} bytes: refused")
            os.fsync(f.fileno())
    except OSError as e:
        src.drain()
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientResources(f"{NO_SPACE} after {src.n // MiB} MiB of the volume") from None
        raise
    return src.n


def shift_owners(source, here):
    """The owner map of an upper dir sent from a host where the container's user namespace map
    was ``source`` to one where it is ``here`` (containers.IdMap; None: no user namespace, host
    ids are container ids): host id there -> container id -> host id here. An id outside
    ``source``'s range (unmapped there: the container saw it as nobody) or beyond ``here``'s
    becomes nobody (65534) of ``here``: a peer's stream never makes a file of a host user
    outside the container's range. None between two privileged containers (nothing to map)."""
    if source is None and here is None:
        return None

    def shift(hid: int) -> int:
        cid = source.to_container(hid) if source is not None else hid
        if cid is None:
            cid = NOBODY
        if here is None:
            return cid
        return here.to_host(cid) if here.to_host(cid) is not None else here.to_host(NOBODY)
    return shift


def untar_into(dest: str, stream, *, owners=None) -> int:
    """Unpack a peer's tar stream of a container's upper dir into ``dest`` with the hardened
    extractor (storage/upper.py: nothing an earlier stream left there is followed; owners,
    modes, whiteouts and overlay xattrs kept; ``owners``: a map of owner ids, see shift_owners);
    bytes read. A refused or failed stream is drained, then raised: InvalidInput, or
    InsufficientResources when the pool fills up."""
    from storage.upper import unpack_upper
    counted = _Counted(stream)
    try:
        unpack_upper(counted, dest, max_bytes=ROOTFS_MAX_BYTES, label="the rootfs stream", owners=owners)
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
