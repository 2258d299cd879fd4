"""Files in a container's root filesystem, reached from the host without leaving it.

Every path is resolved by the kernel with ``openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS |
RESOLVE_NO_XDEV)`` from the rootfs directory: ``..`` and symlinks (absolute or relative, in
any component) resolve as they would inside the container, never above its root, and no
mount point is crossed (a device or a /proc magic link the tenant planted leads nowhere).
A file is first opened with O_PATH and checked to be a regular file before it is opened for
reading (opening a device node or a fifo has effects of its own). A push writes a new file
beside its target (O_EXCL, never through an existing name) and renames it over the target,
so a symlink already at that name is replaced, not followed. Owners are the container's ids:
for a user-namespaced container they are mapped to and from the host range (``idmap``).

Directories: ``list_dir`` names a directory's entries (their own type, size, mode and owners:
a symlink is listed, not followed), ``make_dir`` creates one.

Privileged work: ``open_for_read``, ``write_file``, ``list_dir`` and ``make_dir``.
"""
from __future__ import annotations

import ctypes
import errno
import os
import secrets
import stat
from dataclasses import dataclass

from agent.errors import Conflict, InvalidInput, NotFound, Unprocessable

SYS_OPENAT2 = 437  # the same number on x86_64 and the generic syscall table (arm64)
RESOLVE_NO_XDEV, RESOLVE_NO_MAGICLINKS, RESOLVE_IN_ROOT = 0x01, 0x02, 0x10
RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
MAX_PATH = 4096
MAX_ENTRIES = 10_000  # entries one listing returns (``truncated`` beyond)
CHUNK = 1024 * 1024  # bytes per read and write: a file never sits in memory whole


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class FileInfo:
    size: int
    mode: int  # permission bits (0o7777)
    uid: int | None  # as the container sees them (None: not mapped into it)
    gid: int | None
    kind: str = "file"  # file | directory


def check_path(path: str) -> str:
    """A container path as the API takes it: absolute, no NUL, at most MAX_PATH bytes."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path or len(path.encode()) > MAX_PATH:
        raise InvalidInput(f"path {path[:80]!r} must be an absolute path in the container (at most "
                           f"{MAX_PATH} bytes, no NUL)")
    return path


def openat2(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    """``path`` opened below ``dirfd`` as if ``dirfd`` were the root (RESOLVE)."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, RESOLVE)
    fd = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(path)),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return fd


def _error(e: OSError, path: str, what: str):
    if e.errno == errno.ENOENT:
        return NotFound(f"{path[:200]!r} does not exist in the container ({what})")
    if e.errno == errno.ENOTDIR:
        return NotFound(f"a component of {path[:200]!r} is not a directory ({what})")
    if e.errno in (errno.EXDEV, errno.ELOOP):
        return Unprocessable(f"{path[:200]!r} leads out of the container's root filesystem (a mount "
                             f"point or a magic link on the way): refused ({what})")
    if e.errno == errno.EISDIR:
        return Conflict(f"{path[:200]!r} is a directory ({what})")
    if e.errno == errno.ENOSPC:
        return Conflict(f"no space left in the container's filesystem ({what})")
    return Conflict(f"{what} {path[:200]!r} failed: {e.strerror}")


def _container_id(host_id: int, idmap) -> int | None:
    return idmap.to_container(host_id) if idmap is not None else host_id


def open_for_read(rootfs: str, path: str, idmap=None) -> tuple[int, FileInfo]:
    """Privileged: a readable descriptor of regular file ``path`` in the container whose root
    is ``rootfs`` (the caller closes it), and its size, mode and owners; for a directory -1 and
    its FileInfo (kind "directory": list it with list_dir)."""
    check_path(path)
    root = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            pfd = openat2(root, path, os.O_PATH)
        except OSError as e:
            raise _error(e, path, "pull") from None
        try:
            st = os.fstat(pfd)
            if stat.S_ISDIR(st.st_mode):
                return -1, FileInfo(0, stat.S_IMODE(st.st_mode), _container_id(st.st_uid, idmap),
                                    _container_id(st.st_gid, idmap), "directory")
            if not stat.S_ISREG(st.st_mode):
                raise Unprocessable(f"{path[:200]!r} is not a regular file (a device, fifo or socket): refused")
            fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        finally:
            os.close(pfd)
    finally:
        os.close(root)
    return fd, FileInfo(st.st_size, stat.S_IMODE(st.st_mode), _container_id(st.st_uid, idmap),
                        _container_id(st.st_gid, idmap))


def write_file(rootfs: str, path: str, read, *, uid: int = 0, gid: int = 0, mode: int = 0o644,
               idmap=None) -> int:
    """Privileged: the bytes ``read(n)`` gives (until b"") as regular file ``path`` in the
    container, owned by container ids ``uid``/``gid`` with ``mode``, replacing what is there
    (a file or a symlink; not a directory). The parent directory must exist. Returns the
    bytes written; on failure nothing new is left."""
    pfd, leaf, host_uid, host_gid = _new_entry(rootfs, path, "file", "push", uid, gid, mode, idmap)
    tmp = f".nodeagent-push-{secrets.token_hex(8)}"
    written = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
        try:
            while data := read(CHUNK):
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                written += len(data)
            os.fchown(fd, host_uid, host_gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.rename(tmp, leaf, src_dir_fd=pfd, dst_dir_fd=pfd)
    except OSError as e:
        _unlink(pfd, tmp)
        raise _error(e, path, "push") from None
    except BaseException:
        _unlink(pfd, tmp)
        raise
    finally:
        os.close(pfd)
    return written


_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"))


def list_dir(rootfs: str, path: str, idmap=None) -> tuple[list[dict], bool]:
    """Privileged: the entries of directory ``path`` ({name, type, size, mode, uid, gid}, sorted
    by name, at most MAX_ENTRIES) and whether there were more."""
    check_path(path)
    root = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = openat2(root, path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise _error(e, path, "list") from None
    finally:
        os.close(root)
    out: list[dict] = []
    truncated = False
    try:
        with os.scandir(fd) as it:
            for entry in it:
                if len(out) >= MAX_ENTRIES:
                    truncated = True
                    break
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # gone meanwhile
                kind = next((k for test, k in _KINDS if test(st.st_mode)), "other")
                out.append({"name": entry.name, "type": kind, "size": st.st_size if kind == "file" else 0,
                            "mode": f"{stat.S_IMODE(st.st_mode):04o}", "uid": _container_id(st.st_uid, idmap),
                            "gid": _container_id(st.st_gid, idmap)})
    finally:
        os.close(fd)
    return sorted(out, key=lambda e: e["name"]), truncated


def _new_entry(rootfs: str, path: str, what: str, verb: str, uid: int, gid: int, mode: int,
               idmap) -> tuple[int, str, int, int]:
    """For a new entry at ``path``: its parent directory opened (O_PATH, resolved inside the
    root), its name, and its owner's host ids; InvalidInput for a bad name, mode or owner."""
    check_path(path)
    parent, _, leaf = path.rstrip("/").rpartition("/")
    if leaf in ("", ".", ".."):
        raise InvalidInput(f"path {path[:80]!r} must name a {what}")
    if not 0 <= mode <= 0o7777:
        raise InvalidInput(f"mode {mode:o} must be permission bits (at most 7777 octal)")
    host_uid, host_gid = (idmap.to_host(uid), idmap.to_host(gid)) if idmap is not None else (uid, gid)
    if host_uid is None or host_gid is None:
        raise InvalidInput(f"owner {uid}:{gid} is not mapped in this container (ids 0..{idmap.size - 1})")
    root = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            return openat2(root, parent or "/", os.O_PATH | os.O_DIRECTORY), leaf, host_uid, host_gid
        except OSError as e:
            raise _error(e, parent or "/", f"{verb}: the parent directory") from None
    finally:
        os.close(root)


def make_dir(rootfs: str, path: str, *, uid: int = 0, gid: int = 0, mode: int = 0o755, idmap=None) -> None:
    """Privileged: create directory ``path`` (its parent must exist; Conflict if the name is
    taken) owned by container ids ``uid``/``gid`` with ``mode``."""
    pfd, leaf, host_uid, host_gid = _new_entry(rootfs, path, "directory to create", "mkdir", uid, gid, mode, idmap)
    try:
        try:
            os.mkdir(leaf, 0o700, dir_fd=pfd)
        except FileExistsError:
            raise Conflict(f"{path[:200]!r} exists in the container") from None
        except OSError as e:
            raise _error(e, path, "mkdir") from None
        fd = os.open(leaf, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            os.fchown(fd, host_uid, host_gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    finally:
        os.close(pfd)


def _unlink(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass
