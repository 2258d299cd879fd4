"""Safe unpacking of a container's overlay *upper dir* streamed by a migration peer.

The same boundary as image layers (storage/unpack.py, whose extractor this reuses): every
path component is walked with ``openat(O_NOFOLLOW|O_DIRECTORY)`` from the upper dir, so
nothing an earlier stream left there (a symlink ``esc -> /host/dir``) is ever followed;
an entry is replaced, never traversed. Member names that are absolute or hold ``..``,
symlinks that climb out lexically, hardlinks to anything outside the tree, and decompression
bombs (more than ``max_bytes``) are refused with InvalidInput.

What differs from an image layer, because an upper dir is a live container's own writes:

- whiteouts arrive as overlayfs stores them, 0/0 character devices (``.wh.*`` names are
  plain files here); every other device node is refused; fifos are kept (harmless on the
  host: the tenant can make them);
- of the xattrs, only overlayfs's own markers (OVERLAY_XATTRS: opaque dirs, xattr
  whiteouts) are applied; anything else (security.capability, other trusted.*) is dropped;
- modes are kept as sent, setuid/setgid included: root in the container can set them on
  its own files anyway, and the upper dir sits in a 0700 volume no host user reaches;
- ownership is kept numerically (``tar --numeric-owner`` on the source).

Streams come one after another (a refresh migration sends the whole dir, then what changed):
a later member replaces what an earlier stream left under its name.
"""
from __future__ import annotations

import os
import stat
import tarfile

from agent.errors import InvalidInput
from storage.unpack import TAR_BUFFER, TAR_HEADER, _clean_name, _Extractor, _OPEN_DIR

XATTR_PREFIX = "SCHILY.xattr."  # how GNU tar --xattrs names them in PAX headers
OVERLAY_XATTRS = ("trusted.overlay.opaque", "trusted.overlay.whiteout", "trusted.overlay.whiteouts")


def unpack_upper(stream, dest: str, *, max_bytes: int, label: str = "rootfs stream",
                 owners=None) -> dict:
    """Unpack the uncompressed tar ``stream`` (anything with ``read``) over the existing dir
    ``dest``. ``owners``: None, or a function giving the owner id here of each uid and gid sent
    (a user namespace map that differs between the hosts). Returns {"files", "bytes"}.
    InvalidInput for a member the policy refuses (what came before it stays: the caller
    removes the whole instance); OSError (ENOSPC) as raised."""
    root = os.open(dest, _OPEN_DIR)
    x = _UpperExtractor(root, max_bytes, label)
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=TAR_BUFFER) as tar:
            for member in tar:
                if owners is not None:
                    member.uid, member.gid = owners(member.uid), owners(member.gid)
                x.add(tar, member)
    except tarfile.TarError as e:
        raise InvalidInput(f"{label}: not a valid tar stream ({e})") from None
    except EOFError as e:
        raise InvalidInput(f"{label}: truncated stream ({e})") from None
    finally:
        x.close()
        os.close(root)
    return {"files": x.files, "bytes": x.total}


class _UpperExtractor(_Extractor):
    def _bad(self, msg: str) -> InvalidInput:
        return InvalidInput(f"{self.src}: {msg}")

    def add(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = _clean_name(m.name, "member", self.src)
        self._count(max(m.size, 0) + TAR_HEADER, m.name)
        if not parts:
            return  # the upper dir itself ("./"): exists, and its metadata is ours
        whiteout = m.ischr() and (m.devmajor, m.devminor) == (0, 0)
        if not (m.isreg() or m.isdir() or m.issym() or m.islnk() or m.isfifo() or whiteout):
            raise self._bad(f"{m.name!r} is a {_kind(m)}; an upper dir holds no device nodes but "
                            "overlay whiteouts (0/0 character devices)")
        if m.issym():
            self._check_symlink(parts, m.linkname, m.name)
        leaf, mode = parts[-1], m.mode & 0o7777
        pfd = self._parent(parts, m.name)
        try:
            if m.isdir():
                self._remove(pfd, leaf, keep_dir=True)
                try:
                    os.mkdir(leaf, 0o700, dir_fd=pfd)
                except FileExistsError:
                    pass
                fd = os.open(leaf, _OPEN_DIR, dir_fd=pfd)
                try:
                    self._own(fd, m, mode)
                    self._xattrs(fd, m)
                finally:
                    os.close(fd)
                return
            self._remove(pfd, leaf)
            if m.isreg():
                self._write(tar, m, pfd, leaf, mode)  # fchmod after fchown: set-id bits kept
                fd = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                try:
                    self._xattrs(fd, m)
                finally:
                    os.close(fd)
            elif m.issym():
                os.symlink(m.linkname, leaf, dir_fd=pfd)
                if self.owners:
                    os.chown(leaf, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            elif m.islnk():
                self._hardlink(pfd, leaf, m)
                return
            else:  # a whiteout or a fifo: made with no permissions, then given them
                os.mknod(leaf, (stat.S_IFIFO if m.isfifo() else stat.S_IFCHR) | 0o000, os.makedev(0, 0),
                         dir_fd=pfd)
                if self.owners:
                    os.chown(leaf, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
                os.chmod(leaf, mode, dir_fd=pfd, follow_symlinks=False)
            os.utime(leaf, (m.mtime, m.mtime), dir_fd=pfd, follow_symlinks=False)
            self.files += 1
        finally:
            os.close(pfd)

    def _own(self, fd: int, m: tarfile.TarInfo, mode: int) -> None:
        if self.owners:
            os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, mode)

    def _xattrs(self, fd: int, m: tarfile.TarInfo) -> None:
        for key, value in m.pax_headers.items():
            name = key[len(XATTR_PREFIX):] if key.startswith(XATTR_PREFIX) else None
            if name in OVERLAY_XATTRS:
                os.setxattr(fd, name, value.encode("utf-8", "surrogateescape"))


def _kind(m: tarfile.TarInfo) -> str:
    return {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
            tarfile.FIFOTYPE: "fifo"}.get(m.type, f"member of tar type {m.type!r}")
