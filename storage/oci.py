"""Reading OCI images: an OCI image layout dir, or a tar archive of one, or a
``docker save`` archive (its manifest.json converted to an OCI manifest).

``open_source(path)`` returns a ``Source`` whose ``resolve(ref)`` walks
index -> (multi-arch index -> linux/amd64) -> manifest -> config and layers. Small
JSON documents are read into memory and verified against their digests here; layer
blobs are streamed by ``open_blob`` and verified by the backend's ``put_blob``.
Nothing is ever extracted from an archive to the host by this module.

Every file of every form (layout dir, layout tar, `docker save` dir or tar) is opened
by ``Source._open`` alone, and the rule is the same for all: a name is a relative path
without ``..``; it must be a *regular file* reached without following any symlink (in a
dir: each component opened with ``O_NOFOLLOW`` from the root, the file itself with
``O_PATH|O_NOFOLLOW`` and checked with fstat before it is reopened for reading, so a
fifo or device is never even opened; in a tar: the member itself, never a symlink,
hardlink or special member). Symlinks, hardlinks, fifos, devices and directories are
refused with InvalidInput. Every read is bounded: a document by ``MAX_DOCUMENT`` and
its descriptor's size, a blob by its descriptor's size (a file longer or shorter than
its descriptor is refused before anything is read; its digest is checked by the
backend's ``put_blob``), a `docker save` layer by the size the file had when opened.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass
from typing import BinaryIO

from agent.errors import InvalidInput, NotFound
from storage.validate import parse_digest

MAX_DOCUMENT = 4 * 1024 * 1024  # 4 MiB: indexes, manifests and configs are small JSON
MAX_ARCHIVE_MEMBERS = 100_000  # a layout or `docker save` tar holds a few files per blob
MAX_ARCHIVE_RATIO = 200  # a compressed archive's members may add up to this x its size
HASH_CHUNK = 1024 * 1024  # 1 MiB reads when hashing a `docker save` layer
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
PLATFORM = ("linux", "amd64")  # what this agent runs
REF_ANNOTATION = "org.opencontainers.image.ref.name"
MT_INDEX = ("application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json")
MT_MANIFEST = ("application/vnd.oci.image.manifest.v1+json",
               "application/vnd.docker.distribution.manifest.v2+json")
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = MT_LAYER_TAR + "+gzip"
LAYER_TYPES = {  # media type -> compression (None: plain tar)
    MT_LAYER_TAR: None, MT_LAYER_GZIP: "gzip", MT_LAYER_TAR + "+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": None,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": None,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
CONFIG_KEYS = ("Cmd", "Entrypoint", "Env", "WorkingDir", "User")


@dataclass(frozen=True)
class Descriptor:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class ResolvedImage:
    manifest: bytes  # the exact manifest bytes; the image id is their sha256
    manifest_digest: str
    config: Descriptor
    config_bytes: bytes
    layers: tuple[Descriptor, ...]  # bottom first
    runtime_config: dict  # the subset of config.config the agent uses


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def open_source(path: str) -> "Source":
    """An OCI layout dir or `docker save` dir, an OCI layout tar or `docker save` tar
    (plain, gzip, bzip2 or xz); InvalidInput otherwise. ``path`` itself may be a symlink
    (where it may point is the caller's allow-list to decide); nothing under it may."""
    try:
        fd = os.open(path, _OPEN_PATH & ~os.O_NOFOLLOW)
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such OCI layout dir or image archive") from None
    except OSError as e:
        raise InvalidInput(f"{path}: cannot open it ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            root = os.open(".", _OPEN_DIR, dir_fd=fd)
            return LayoutDir(path, root)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"{path}: is a {_file_kind(st.st_mode)}; give an OCI layout dir "
                               "or an image archive (a regular file)")
        f = os.fdopen(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC), "rb")
    finally:
        os.close(fd)
    try:
        magic = f.read(4)
        if magic.startswith(ZSTD_MAGIC):
            raise InvalidInput(f"{path}: a zstd-compressed archive; decompress it first "
                               "(zstd -d) or give it uncompressed or gzip-compressed")
        f.seek(0)
        tar = tarfile.open(fileobj=f, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        f.close()
        raise InvalidInput(f"{path}: not an OCI layout or `docker save` archive ({e})") from None
    except BaseException:
        f.close()
        raise
    limit = None
    if tar.fileobj is not f:  # compressed: bound what the members may expand to
        limit = max(st.st_size, 1) * MAX_ARCHIVE_RATIO
    try:
        return Archive(path, tar, f, limit)
    except BaseException:
        tar.close()
        f.close()
        raise


class Source:
    """An OCI image as files: ``_open`` is the one way in; the rest reads through it."""

    path: str

    def _open(self, name: str) -> tuple[BinaryIO, int] | None:
        """The regular file ``name`` (relative to the source's root) and its size, or
        None if there is none. Links, directories and special files: InvalidInput."""
        raise NotImplementedError

    def has_file(self, name: str) -> bool:
        got = self._open(name)
        if got is None:
            return False
        got[0].close()
        return True

    def open_file(self, name: str, size: int | None = None, what: str | None = None) -> BinaryIO:
        """A reader of exactly the file's size (of ``size``, which the file must have)."""
        f, n = self._need(name, what)
        if size is not None and n != size:
            f.close()
            raise InvalidInput(f"{self.path}: {what or name} is {n} bytes but its descriptor "
                               f"says {size}; the image is corrupt")
        return io.BufferedReader(_Bounded(f, n, f"{self.path}: {name}"), HASH_CHUNK)

    def read_file(self, name: str, limit: int = MAX_DOCUMENT, what: str | None = None) -> bytes:
        f, n = self._need(name, what)
        with f:
            if n > limit:
                raise InvalidInput(f"{self.path}: {what or name} is {n} bytes, over the "
                                   f"{limit} byte limit for JSON documents")
            data = f.read(n + 1)
        if len(data) != n:
            raise InvalidInput(f"{self.path}: {what or name} changed while it was read")
        return data

    def _need(self, name: str, what: str | None) -> tuple[BinaryIO, int]:
        got = self._open(name)
        if got is None:
            raise InvalidInput(f"{self.path}: {what or name} is missing from the image")
        return got

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- blobs ----------------------------------------------------------------
    def blob_name(self, digest: str) -> str:
        return f"blobs/sha256/{parse_digest(digest)}"

    def open_blob(self, d: Descriptor) -> BinaryIO:
        """A reader of exactly ``d.size`` bytes; the caller's put_blob checks the digest."""
        if d.digest in self._synthetic:
            return io.BytesIO(self._synthetic[d.digest])
        name = self._blob_files.get(d.digest) or self.blob_name(d.digest)
        return self.open_file(name, d.size, what=f"blob {d.digest}")

    def read_blob(self, d: Descriptor) -> bytes:
        if d.digest in self._synthetic:
            return self._synthetic[d.digest]
        what = f"{d.media_type or 'document'} {d.digest}"
        if d.size > MAX_DOCUMENT:
            raise InvalidInput(f"{self.path}: {what} is {d.size} bytes, over the "
                               f"{MAX_DOCUMENT} byte limit for JSON documents")
        name = self._blob_files.get(d.digest) or self.blob_name(d.digest)
        data = self.read_file(name, what=f"blob {d.digest}")
        if len(data) != d.size:
            raise InvalidInput(f"{self.path}: blob {d.digest} is {len(data)} bytes but its "
                               f"descriptor says {d.size}; the image is corrupt")
        if digest_of(data) != d.digest:
            raise InvalidInput(f"{self.path}: blob {d.digest} does not match its digest "
                               "(the image is corrupt)")
        return data

    # -- resolution ---------------------------------------------------------
    _synthetic: dict
    _blob_files: dict

    def resolve(self, ref: str | None = None, progress=None) -> ResolvedImage:
        """The image ``ref`` names (or the only one). ``progress(bytes)`` is called while
        `docker save` layers are hashed (it may raise to cancel)."""
        self._synthetic, self._blob_files = {}, {}
        if self.has_file("index.json"):
            top = self._pick(_load(self.read_file("index.json"), self.path, "index.json"), ref)
        elif self.has_file("manifest.json"):
            top = self._from_docker_save(ref, progress)
        else:
            raise InvalidInput(f"{self.path}: neither index.json (OCI layout) nor manifest.json "
                               "(`docker save`) found; give an OCI image layout or archive")
        if top.media_type in MT_INDEX:
            top = self._platform(_load(self.read_blob(top), self.path, top.digest), top.digest)
        if top.media_type not in MT_MANIFEST:
            raise InvalidInput(f"{self.path}: unsupported manifest media type {top.media_type!r}")
        manifest_bytes = self.read_blob(top)
        m = _load(manifest_bytes, self.path, "manifest")
        cfg = _descriptor(m.get("config"), self.path)
        layers = tuple(_descriptor(x, self.path) for x in m.get("layers") or ())
        for l in layers:
            if l.media_type not in LAYER_TYPES:
                raise InvalidInput(f"{self.path}: layer {l.digest} has unsupported media type "
                                   f"{l.media_type!r}")
        config_bytes = self.read_blob(cfg)
        c = _load(config_bytes, self.path, "config")
        if (c.get("os"), c.get("architecture")) not in (PLATFORM, (None, None)):
            raise InvalidInput(f"{self.path}: image is for {c.get('os')}/{c.get('architecture')}, "
                               f"this host runs {'/'.join(PLATFORM)}")
        rc = {k: v for k, v in (c.get("config") or {}).items() if k in CONFIG_KEYS and v}
        return ResolvedImage(manifest_bytes, top.digest, cfg, config_bytes, layers, rc)

    def _pick(self, index: dict, ref: str | None) -> Descriptor:
        entries = index.get("manifests") or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise InvalidInput(f"{self.path}: index.json: manifests is not a list of descriptors")
        if not entries:
            raise InvalidInput(f"{self.path}: index.json lists no manifests")
        names = [(e.get("annotations") or {}).get(REF_ANNOTATION) for e in entries]
        if ref is not None:
            tag = ref.rsplit(":", 1)[-1] if "/" in ref or ":" in ref else ref
            hits = [e for e, n in zip(entries, names) if n in (ref, tag)]
            if not hits:
                raise NotFound(f"{self.path}: no image tagged {ref!r}; tags: "
                               f"{', '.join(sorted(n for n in names if n)) or 'none'}")
            return _descriptor(hits[0], self.path)
        if len(entries) == 1:
            return _descriptor(entries[0], self.path)
        if not any(names) and all(e.get("platform") for e in entries):
            return self._platform(index, "index.json")  # untagged per-platform manifests
        raise InvalidInput(f"{self.path}: the layout holds several images; pick one with ref "
                           f"(tags: {', '.join(sorted(n or '?' for n in names))})")

    def _platform(self, index: dict, where: str) -> Descriptor:
        for e in index.get("manifests") or []:
            p = e.get("platform") or {}
            if (p.get("os"), p.get("architecture")) == PLATFORM:
                return _descriptor(e, self.path)
        found = sorted(f"{(e.get('platform') or {}).get('os')}/"
                       f"{(e.get('platform') or {}).get('architecture')}"
                       for e in index.get("manifests") or [])
        raise InvalidInput(f"{self.path}: {where} has no {'/'.join(PLATFORM)} image "
                           f"(it has {', '.join(found) or 'none'})")

    def _from_docker_save(self, ref: str | None, progress) -> Descriptor:
        try:
            entries = json.loads(self.read_file("manifest.json"))
        except ValueError:
            entries = None
        if (not isinstance(entries, list) or not entries
                or not all(isinstance(e, dict) for e in entries)):
            raise InvalidInput(f"{self.path}: manifest.json is not a `docker save` manifest")
        if ref is not None:
            hits = [e for e in entries for t in e.get("RepoTags") or ()
                    if t == ref or t.rsplit(":", 1)[-1] == ref or t.rsplit("/", 1)[-1] == ref]
            if not hits:
                tags = sorted(t for e in entries for t in e.get("RepoTags") or ())
                raise NotFound(f"{self.path}: no image tagged {ref!r}; tags: {', '.join(tags)}")
            entry = hits[0]
        elif len(entries) > 1:
            tags = sorted(t for e in entries for t in e.get("RepoTags") or ())
            raise InvalidInput(f"{self.path}: the archive holds several images; pick one with "
                               f"ref (tags: {', '.join(tags)})")
        else:
            entry = entries[0]
        cfg_name = _member_name(entry.get("Config"), self.path)
        cfg_bytes = self.read_file(cfg_name)
        cfg = Descriptor(digest_of(cfg_bytes), len(cfg_bytes), MT_CONFIG)
        self._synthetic[cfg.digest] = cfg_bytes
        layers, done = [], 0
        for name in entry.get("Layers") or ():
            name = _member_name(name, self.path)
            h, size = hashlib.sha256(), 0
            with self.open_file(name) as f:  # bounded by the size the file had when opened
                head = f.read(4)
                h.update(head)
                size += len(head)
                for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
                    h.update(chunk)
                    size += len(chunk)
                    if progress is not None:  # a cancel point in the operation
                        progress(done + size)
            done += size
            d = "sha256:" + h.hexdigest()
            self._blob_files[d] = name
            mt = (MT_LAYER_GZIP if head.startswith(GZIP_MAGIC) else
                  MT_LAYER_TAR + "+zstd" if head.startswith(ZSTD_MAGIC) else MT_LAYER_TAR)
            layers.append({"mediaType": mt, "digest": d, "size": size})
        manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST[0],
                    "config": {"mediaType": MT_CONFIG, "digest": cfg.digest, "size": cfg.size},
                    "layers": layers}
        data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        d = Descriptor(digest_of(data), len(data), MT_MANIFEST[0])
        self._synthetic[d.digest] = data
        return d


class LayoutDir(Source):
    """A dir: an OCI image layout or an unpacked `docker save`. Holds an fd of its root;
    every file is reached from it component by component, never through a symlink."""

    def __init__(self, path: str, root: int):
        self.path, self.root = path, root
        self._synthetic, self._blob_files = {}, {}

    def _open(self, name: str) -> tuple[BinaryIO, int] | None:
        parts = _parts(name, self.path)
        fd = os.dup(self.root)
        try:
            for comp in parts[:-1]:
                try:
                    nfd = os.open(comp, _OPEN_DIR, dir_fd=fd)
                except FileNotFoundError:
                    return None
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise InvalidInput(f"{self.path}: {name}: {comp!r} is a symlink or not "
                                           "a directory; links are never followed in images"
                                           ) from None
                    raise
                os.close(fd)
                fd = nfd
            try:
                pfd = os.open(parts[-1], _OPEN_PATH, dir_fd=fd)
            except FileNotFoundError:
                return None
        finally:
            os.close(fd)
        try:
            st = os.fstat(pfd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidInput(f"{self.path}: {name} is a {_file_kind(st.st_mode)}; image "
                                   "files must be regular files (no links, fifos or devices)")
            rfd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(pfd)
        return os.fdopen(rfd, "rb", buffering=0), st.st_size

    def close(self) -> None:
        if self.root >= 0:
            os.close(self.root)
            self.root = -1


class Archive(Source):
    """A tar (plain or compressed) holding an OCI layout or a `docker save`. Only its
    regular members are read, by their exact (normalised) names."""

    def __init__(self, path: str, tar: tarfile.TarFile, file: BinaryIO, limit: int | None):
        self.path, self.tar, self._file = path, tar, file
        self._synthetic, self._blob_files = {}, {}
        self.members: dict[str, tarfile.TarInfo] = {}
        total = 0
        try:
            while (m := tar.next()) is not None:
                total += max(m.size, 0)
                if limit is not None and total > limit:
                    raise InvalidInput(f"{path}: the archive's members add up to more than "
                                       f"{MAX_ARCHIVE_RATIO}x its compressed size (a "
                                       "decompression bomb?); decompress it and import that")
                if len(self.members) >= MAX_ARCHIVE_MEMBERS:
                    raise InvalidInput(f"{path}: more than {MAX_ARCHIVE_MEMBERS} members; not "
                                       "an OCI layout or `docker save` archive")
                self.members[os.path.normpath(m.name).lstrip("/")] = m
        except (tarfile.TarError, EOFError, OSError) as e:
            raise InvalidInput(f"{path}: not a valid tar archive ({e})") from None

    def _open(self, name: str) -> tuple[BinaryIO, int] | None:
        m = self.members.get("/".join(_parts(name, self.path)))
        if m is None:
            return None
        if not m.isreg():
            kind = ("symlink" if m.issym() else "hardlink" if m.islnk() else
                    "directory" if m.isdir() else "special file")
            raise InvalidInput(f"{self.path}: {name} is a {kind} in the archive; image files "
                               "must be regular files (no links, fifos or devices)")
        return self.tar.extractfile(m), m.size

    def close(self) -> None:
        self.tar.close()
        self._file.close()


class _Bounded(io.RawIOBase):
    """Exactly ``size`` bytes of ``f``: no more is read; fewer (the file shrank) is an error."""

    def __init__(self, f: BinaryIO, size: int, what: str):
        self._f, self._left, self._what = f, size, what

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        want = min(len(b), self._left)
        if want <= 0:
            return 0
        view = memoryview(b)[:want]
        readinto = getattr(self._f, "readinto", None)
        if readinto is not None:
            n = readinto(view)
        else:
            data = self._f.read(want)
            n = len(data)
            view[:n] = data
        if not n:
            raise InvalidInput(f"{self._what}: ended {self._left} bytes early (it changed while "
                               "it was read, or the archive is truncated)")
        self._left -= n
        return n

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def _parts(name: str, path: str) -> list[str]:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or name.startswith("/") or ".." in parts:
        raise InvalidInput(f"{path}: bad file name {name!r} (absolute, empty or with '..')")
    return parts


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISLNK, "symlink"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def _load(data: bytes, path: str, what: str) -> dict:
    try:
        doc = json.loads(data)
    except ValueError:
        raise InvalidInput(f"{path}: {what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"{path}: {what} is not a JSON object")
    return doc


def _descriptor(d, path: str) -> Descriptor:
    if not isinstance(d, dict) or not isinstance(d.get("size"), int):
        raise InvalidInput(f"{path}: malformed descriptor {d!r}")
    parse_digest(d.get("digest", ""))
    return Descriptor(d["digest"], d["size"], d.get("mediaType", ""))


def _member_name(name, path: str) -> str:
    if not isinstance(name, str) or name.startswith("/") or ".." in name.split("/"):
        raise InvalidInput(f"{path}: manifest.json names a bad file {name!r}")
    return name
