"""Safe unpacking of OCI image layers: THE security boundary between images and the host.

A layer (tar, gzip (decompressed in-process) or zstd (by the zstd tool)) is unpacked once per digest into
``<cache_dir>/layers/sha256/<hex>/``: first into a fresh temp dir beside it, then renamed
into place, so a layer dir either is complete or does not exist. Whiteouts become
overlayfs whiteouts: ``.wh.NAME`` -> a 0/0 character device NAME, ``.wh..wh..opq`` ->
``trusted.overlay.opaque=y`` on its directory.

Policy (each case refused with InvalidInput, the temp dir removed, nothing written
anywhere else; tests/unit/test_unpack.py crafts a tar for each):

- member names that are absolute or contain ``..`` components (after PAX ``path`` and
  GNU long-name headers are applied: the name checked is the one written);
- names longer than PATH_MAX (4096 bytes), components longer than NAME_MAX (255), or
  deeper than ``MAX_DEPTH`` directories (no container path is that long, and a deeper
  tree could not even be removed again by shutil.rmtree's recursion);
- symlinks whose target, resolved lexically from the link's directory, climbs above the
  layer root. Absolute targets are kept: they are *rooted at the layer* (what the
  container sees in its own root), never resolved on the host; ``/../..``-style
  absolute targets that would climb are refused as well;
- hardlinks whose target is absolute, climbs out, is missing, or is not a regular file
  or a symlink (a hardlink to a symlink links the symlink itself, never its target);
- device nodes, fifos, sparse members (GNU or PAX: no OCI tool writes them, and their
  maps are unbounded reads) and unknown member types;
- any write whose parent path goes through a symlink (extraction walks every path
  component with ``openat(O_NOFOLLOW|O_DIRECTORY)`` from the layer root, so no host
  symlink is ever followed). This also covers a member that replaces a directory by a
  symlink and later members writing "through" it in the same layer. Layers are unpacked
  each into its own tree, so a later layer writing under a path an earlier layer made a
  symlink writes a real directory in its own tree; overlayfs shows the upper directory
  over the lower symlink and never follows a lower symlink on the host;
- decompression bombs: more than ``max_bytes`` unpacked, or more than
  ``max_ratio`` x the compressed size (each member counts at least one 512-byte
  header, and the decompressed stream itself is capped, PAX and long-name headers
  included); inode bombs: more than ``max_entries`` members; any one PAX or long-name
  header over ``MAX_META`` bytes, or global PAX headers adding up to more than
  ``MAX_GLOBAL_PAX`` keys (they are held in memory);
- ownership, modes or times the host cannot represent (e.g. a PAX uid of 2**40).

Decided, not refused: setuid and setgid bits are STRIPPED from every non-directory,
so no image file can grant privilege (no setuid-root binary exists on the host's disk
whatever the image holds; inside containers, ``su``/``sudo``/``ping`` lose their setuid
bit: run the process as the user it needs). File capabilities (``security.capability``,
as GNU tar --xattrs and BuildKit write them) are KEPT on regular files, in the v2 form
(no root id: v3's root id names a user of the namespace the image was built in, meaningless
here), so ``ping``-style binaries work as a non-root USER. They grant nothing on the host:
the layer store is 0700 (no host user reaches the file), and in a container they are capped
by its bounding set; under a user namespace the kernel reads them through the id-mapped layer
mount as belonging to the container's root, so they are honoured in the container's namespace
only. Malformed capability data is refused. Other xattrs are not applied.
Directories keep ALL their mode bits, as Docker
and containerd do: the sticky bit (``/tmp`` is 1777) and setgid (a shared group dir)
grant no privilege by themselves (a directory's setgid only sets the group of new
files to the directory's group). Ownership and modes are applied with
``follow_symlinks=False``. Code reading an unpacked layer on the host must never follow
symlinks inside it.
"""
from __future__ import annotations

import errno
import gzip
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zlib

from agent.errors import InvalidInput, Unavailable
from storage.validate import parse_digest

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
TAR_HEADER = 512  # bytes every tar member costs at least (counted against the bomb caps)
READ_BUFFER = 1024 * 1024  # 1 MiB: file data is copied in chunks of this size
TAR_BUFFER = 64 * 1024  # tarfile's stream buffer: it re-slices the buffer on every header
                        # read, so 1 MiB made unpacking ~1.6x slower than 64 KiB (measured)
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
CAP_XATTR = "security.capability"
CAP_PAX = "SCHILY.xattr." + CAP_XATTR  # GNU tar's (and BuildKit's) PAX key for it
VFS_CAP_REVISION_MASK = 0xFF000000
VFS_CAP_REVISION_2, VFS_CAP_REVISION_3 = 0x02000000, 0x03000000
VFS_CAP_FLAGS_EFFECTIVE = 0x000001
VFS_CAP_V2_SIZE, VFS_CAP_V3_SIZE = 20, 24  # magic + 2 x (permitted, inheritable) [+ rootid]
DEFAULT_MAX_BYTES = 8 * 1024**3
DEFAULT_MAX_RATIO = 200
DEFAULT_MAX_ENTRIES = 1_000_000  # members per layer (inode bomb); a big distro layer has ~50k
PATH_MAX = 4096  # Linux: longer paths are unusable inside the container anyway
NAME_MAX = 255  # Linux: longest path component
MAX_DEPTH = 256  # directory levels; shutil.rmtree recurses once per level (limit ~1000)
MAX_META = 1024 * 1024  # 1 MiB: one PAX / GNU long-name header (read into memory)
MAX_GLOBAL_PAX = 1000  # keys all global PAX headers of a layer may set (kept in memory)
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def layer_dir(cache_dir: str, digest: str) -> str:
    return os.path.join(cache_dir, "layers", "sha256", parse_digest(digest))


def unpack_layer_once(src: str, digest: str, cache_dir: str, *,
                      max_bytes: int = DEFAULT_MAX_BYTES,
                      max_ratio: int = DEFAULT_MAX_RATIO,
                      max_entries: int = DEFAULT_MAX_ENTRIES) -> str:
    """Return the unpacked dir of layer ``digest`` (whose verified blob is the file ``src``),
    unpacking it first if needed. On failure nothing is left."""
    final = layer_dir(cache_dir, digest)
    if os.path.isdir(final):
        return final
    parent = os.path.dirname(final)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{parse_digest(digest)[:12]}-", dir=parent)
    try:
        unpack_layer(src, tmp, max_bytes=max_bytes, max_ratio=max_ratio,
                     max_entries=max_entries)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError as e:  # someone else finished first: theirs is as good as ours
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def unpack_layer(src: str, dest: str, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_ratio: int = DEFAULT_MAX_RATIO,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> dict:
    """Unpack the layer file ``src`` into the existing empty dir ``dest``.

    Returns {"files", "bytes", "stripped_setid", "entries", "file_caps"}. On InvalidInput ``dest`` holds a partial
    tree the caller removes (``unpack_layer_once`` does); nothing outside it is touched.
    """
    compressed = os.stat(src).st_size
    cap = min(max_bytes, max(compressed, TAR_HEADER) * max_ratio)
    with open(src, "rb") as f:
        magic = f.read(4)
    proc = None
    if magic.startswith(GZIP_MAGIC):  # in-process zlib: ~4x faster than a `gzip -d` child
        stream = gzip.GzipFile(src, "rb")
    elif magic.startswith(ZSTD_MAGIC):
        proc = _decompressor(["zstd", "-dcq"], src)
        stream = proc.stdout
    else:
        stream = open(src, "rb")
    root = os.open(dest, _OPEN_DIR)
    try:
        x = _Extractor(root, cap, src, max_entries)
        # every decompressed byte counts, headers included: twice the member cap leaves
        # room for tar's padding and PAX headers, and bounds floods of them
        capped = _CappedReader(stream, 2 * cap + 64 * TAR_HEADER, src)
        try:
            with tarfile.open(fileobj=capped, mode="r|", bufsize=TAR_BUFFER,
                              tarinfo=_LayerTarInfo) as tar:
                while (member := tar.next()) is not None:
                    x.add(tar, member)
                    tar.members.clear()  # stream mode keeps every member otherwise
        except tarfile.TarError as e:
            raise InvalidInput(f"layer {src}: not a valid tar stream ({e})") from None
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise InvalidInput(f"layer {src}: truncated or corrupt stream ({e})") from None
        finally:
            x.close()
        try:  # read to the end: a gzip CRC error or trailing garbage shows up only there
            while stream.read(READ_BUFFER):
                pass
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise InvalidInput(f"layer {src}: corrupt compressed stream ({e})") from None
        if proc is not None:
            rc = proc.wait()
            if rc != 0:
                err = proc.stderr.read().decode(errors="replace").strip()
                raise InvalidInput(f"layer {src}: decompression failed ({err or rc})")
    finally:
        os.close(root)
        stream.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stderr.close()
    return {"files": x.files, "bytes": x.total, "stripped_setid": x.stripped,
            "entries": x.entries, "file_caps": x.file_caps}


def _decompressor(argv: list[str], src: str) -> subprocess.Popen:
    try:
        return subprocess.Popen([*argv, src], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                bufsize=READ_BUFFER)
    except FileNotFoundError:
        raise Unavailable(f"{argv[0]} is not installed: apt-get install -y {argv[0]} "
                          "(or run scripts/setup-host)") from None


class _CappedReader:
    """The decompressed layer stream, refusing to yield more than ``cap`` bytes."""

    def __init__(self, stream, cap: int, src: str):
        self._stream, self._left, self._src = stream, cap, src
        self.name = src  # tarfile names its TarFile after it: _LayerTarInfo's errors say it

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n if n >= 0 else READ_BUFFER)
        self._left -= len(data)
        if self._left < 0:
            raise InvalidInput(f"layer {self._src}: the decompressed stream is over its cap "
                               "(a decompression bomb?); raise images.max_layer_bytes or "
                               "images.max_layer_ratio if the image is legitimate")
        return data


class _LayerTarInfo(tarfile.TarInfo):
    """tarfile's header parsing with the memory it may use bounded: PAX and GNU long-name
    headers are read whole into memory, and sparse maps entry by entry."""

    def _proc_member(self, tar):
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
                         tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE) \
                and self.size > MAX_META:
            raise InvalidInput(f"layer {tar.name}: a tar metadata header of {self.size} "
                               f"bytes (over {MAX_META}); refusing it")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _sparse(tar.name, self.name)
        m = super()._proc_member(tar)
        if len(tar.pax_headers) > MAX_GLOBAL_PAX:
            raise InvalidInput(f"layer {tar.name}: global PAX headers set over "
                               f"{MAX_GLOBAL_PAX} keys; refusing them")
        return m

    def _proc_gnusparse_10(self, next, pax_headers, tar):  # reads an unbounded map
        raise _sparse(tar.name, next.name)


def _sparse(src: str, name: str) -> InvalidInput:
    return InvalidInput(f"layer {src}: {name!r} is a sparse member; sparse files are not "
                        "allowed in image layers (no OCI tool writes them)")


def _clean_name(name: str, what: str, src: str) -> list[str]:
    """Split a member path into safe components; refuse absolute paths, '..' and names
    longer or deeper than a container could use."""
    if name.startswith("/"):
        raise InvalidInput(f"layer {src}: {what} {name!r} is an absolute path; layers hold "
                           "relative paths only")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidInput(f"layer {src}: {what} {name!r} contains '..'; refusing a path that "
                           "could leave the layer")
    if "\0" in name or len(os.fsencode(name)) > PATH_MAX or len(parts) > MAX_DEPTH or \
            any(len(os.fsencode(p)) > NAME_MAX for p in parts):
        raise InvalidInput(f"layer {src}: {what} {name[:80]!r}... is longer than {PATH_MAX} "
                           f"bytes, deeper than {MAX_DEPTH} levels, has a component over "
                           f"{NAME_MAX} bytes, or a NUL; refusing it")
    return parts


class _Extractor:
    def __init__(self, root: int, cap: int, src: str, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.root, self.cap, self.src, self.max_entries = root, cap, src, max_entries
        self.total = self.files = self.stripped = self.entries = self.file_caps = 0
        self._last: tuple[tuple, int] | None = None  # (parent parts, fd): members come grouped
        self.owners = os.geteuid() == 0  # only root can give files their image owners

    def close(self) -> None:
        self._forget()

    def _forget(self) -> None:
        """Drop the cached parent fd (whenever a directory is removed or replaced)."""
        if self._last is not None:
            os.close(self._last[1])
            self._last = None

    def _bad(self, msg: str) -> InvalidInput:
        return InvalidInput(f"layer {self.src}: {msg}")

    def _count(self, n: int, name: str) -> None:
        self.total += n
        if self.total > self.cap:
            raise self._bad(f"unpacks to more than {self.cap} bytes at {name!r} (size or "
                            "ratio cap; a decompression bomb?); raise images.max_layer_bytes "
                            "or images.max_layer_ratio if the image is legitimate")

    def _parent(self, parts: list[str], name: str) -> int:
        """An fd of the directory holding ``parts[-1]``, made if missing, never via a symlink.

        The caller closes it. The last parent is cached (as its own fd), and forgotten
        whenever any directory is removed, so a cached fd never outlives its path."""
        key = tuple(parts[:-1])
        if self._last is not None and self._last[0] == key:
            return os.dup(self._last[1])
        fd = os.dup(self.root)
        try:
            for comp in parts[:-1]:
                try:
                    nfd = os.open(comp, _OPEN_DIR, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    nfd = os.open(comp, _OPEN_DIR, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise self._bad(f"{name!r} would be written through the symlink or "
                                        f"file {comp!r}; refusing to follow links") from None
                    raise
                os.close(fd)
                fd = nfd
            self._forget()
            self._last = (key, os.dup(fd))
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _remove(self, pfd: int, leaf: str, keep_dir: bool = False) -> None:
        try:
            st = os.stat(leaf, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if not keep_dir:
                self._forget()
                shutil.rmtree(leaf, dir_fd=pfd)
        else:
            os.unlink(leaf, dir_fd=pfd)

    def add(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        """Unpack one member (policy: the module's docstring)."""
        self.entries += 1
        if self.entries > self.max_entries:
            raise self._bad(f"more than {self.max_entries} members (an inode bomb?); raise "
                            "images.max_layer_entries if the image is legitimate")
        parts = _clean_name(m.name, "member", self.src)
        self._count(max(m.size, 0) + TAR_HEADER, m.name)
        if m.sparse is not None:
            raise _sparse(self.src, m.name)
        try:
            self._add(tar, m, parts)
        except (OverflowError, ValueError) as e:
            raise self._bad(f"{m.name!r}: owner, mode or time out of range ({e})") from None
        except OSError as e:
            if e.errno not in (errno.ENAMETOOLONG, errno.EINVAL, errno.ERANGE,
                               errno.EOVERFLOW):
                raise
            raise self._bad(f"{m.name!r}: {e.strerror}") from None

    def _add(self, tar: tarfile.TarFile, m: tarfile.TarInfo, parts: list[str]) -> None:
        if not parts:
            return  # the layer root itself ("./"): its dir already exists
        leaf = parts[-1]
        if leaf.startswith(WHITEOUT):
            return self._whiteout(parts, m.name)
        if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
            raise self._bad(f"{m.name!r} is a {_kind(m)}; device nodes, fifos and other "
                            "special files are not allowed in image layers")
        if m.issym():
            self._check_symlink(parts, m.linkname, m.name)
        pfd = self._parent(parts, m.name)
        try:
            mode = m.mode & 0o7777
            if not m.isdir() and mode & (stat.S_ISUID | stat.S_ISGID):
                mode &= ~(stat.S_ISUID | stat.S_ISGID)
                self.stripped += 1
            if m.isdir():
                self._remove(pfd, leaf, keep_dir=True)
                try:
                    os.mkdir(leaf, 0o700, dir_fd=pfd)
                except FileExistsError:
                    pass
                os.chmod(leaf, mode, dir_fd=pfd, follow_symlinks=False)
                if self.owners:
                    os.chown(leaf, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
                return
            self._remove(pfd, leaf)
            if m.isreg():
                self._write(tar, m, pfd, leaf, mode, file_caps(m, self.src))
            elif m.issym():
                os.symlink(m.linkname, leaf, dir_fd=pfd)
                if self.owners:
                    os.chown(leaf, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            else:
                self._hardlink(pfd, leaf, m)
                return
            os.utime(leaf, (m.mtime, m.mtime), dir_fd=pfd, follow_symlinks=False)
            self.files += 1
        finally:
            os.close(pfd)

    def _write(self, tar, m, pfd: int, leaf: str, mode: int, caps: bytes | None = None) -> None:
        fd = os.open(leaf, _CREATE_FILE, 0o600, dir_fd=pfd)
        try:
            src = tar.extractfile(m)
            left = m.size
            while left > 0:
                data = src.read(min(left, READ_BUFFER))
                if not data:
                    raise self._bad(f"{m.name!r} is truncated")
                left -= len(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            if self.owners:
                os.fchown(fd, m.uid, m.gid)
            os.fchmod(fd, mode)
            if caps is not None and self.owners:  # after fchown, which clears them
                os.setxattr(fd, CAP_XATTR, caps)
                self.file_caps += 1
        finally:
            os.close(fd)

    def _hardlink(self, pfd: int, leaf: str, m: tarfile.TarInfo) -> None:
        tparts = _clean_name(m.linkname, "hardlink target", self.src)
        if not tparts:
            raise self._bad(f"hardlink {m.name!r} points at the layer root")
        tfd = self._parent(tparts, m.linkname)
        try:
            try:
                st = os.stat(tparts[-1], dir_fd=tfd, follow_symlinks=False)
            except FileNotFoundError:
                raise self._bad(f"hardlink {m.name!r} -> {m.linkname!r}: the target is not "
                                "in the layer (hardlinks must point at earlier members)") from None
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                raise self._bad(f"hardlink {m.name!r} -> {m.linkname!r} points at a "
                                f"{'directory' if stat.S_ISDIR(st.st_mode) else 'special file'};"
                                " hardlinks must point at regular files or symlinks")
            os.link(tparts[-1], leaf, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)

    def _check_symlink(self, parts: list[str], target: str, name: str) -> None:
        if not target:
            raise self._bad(f"symlink {name!r} has an empty target")
        if "\0" in target or len(os.fsencode(target)) >= PATH_MAX:
            raise self._bad(f"symlink {name!r}: its target is over {PATH_MAX - 1} bytes "
                            "or holds a NUL")
        depth = 0 if target.startswith("/") else len(parts) - 1
        for comp in target.split("/"):
            if comp in ("", "."):
                continue
            depth += -1 if comp == ".." else 1
            if depth < 0:
                raise self._bad(f"symlink {name!r} -> {target!r} points out of the layer root")

    def _whiteout(self, parts: list[str], name: str) -> None:
        leaf = parts[-1]
        pfd = self._parent(parts, name)
        try:
            if leaf == OPAQUE:
                os.setxattr(pfd, OPAQUE_XATTR, b"y")
            elif leaf.startswith(WHITEOUT + WHITEOUT):
                return  # aufs bookkeeping (.wh..wh.plnk etc.): meaningless for overlayfs
            else:
                hidden = leaf[len(WHITEOUT):]
                if hidden in ("", ".", ".."):
                    raise self._bad(f"whiteout {name!r} names no file")
                self._remove(pfd, hidden)
                os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=pfd)
        finally:
            os.close(pfd)


def file_caps(m: tarfile.TarInfo, src: str) -> bytes | None:
    """The member's ``security.capability`` as v2 vfs_cap_data (the root id of a v3 one
    dropped), None if it has none. InvalidInput if it is not v2 or v3 capability data."""
    text = m.pax_headers.get(CAP_PAX)
    if text is None:
        return None
    raw = text.encode("utf-8", "surrogateescape")
    magic = int.from_bytes(raw[:4], "little") if len(raw) >= 4 else 0
    rev = magic & VFS_CAP_REVISION_MASK
    if not ((rev == VFS_CAP_REVISION_2 and len(raw) == VFS_CAP_V2_SIZE)
            or (rev == VFS_CAP_REVISION_3 and len(raw) == VFS_CAP_V3_SIZE)) \
            or magic & ~(VFS_CAP_REVISION_MASK | VFS_CAP_FLAGS_EFFECTIVE):
        raise InvalidInput(f"{src}: {m.name!r} has a {CAP_XATTR} xattr that is not v2 or v3 capability "
                           f"data ({len(raw)} bytes)")
    flags = magic & VFS_CAP_FLAGS_EFFECTIVE
    return (VFS_CAP_REVISION_2 | flags).to_bytes(4, "little") + raw[4:VFS_CAP_V2_SIZE]


def _kind(m: tarfile.TarInfo) -> str:
    return {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
            tarfile.FIFOTYPE: "fifo"}.get(m.type, f"member of tar type {m.type!r}")
