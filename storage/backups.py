"""Backups: one artifact per backup of an instance, and where artifacts are kept.

Terms: an *artifact* is a plain tar stream: ``manifest.json`` first (format and version, the
instance's create request as ``spec``, its kind, the image's identity, and every further
member's name, role, size and sha256), then the members in the manifest's order: the image's
own export (``image``: a VM's disk file, a container image's OCI layout tar), so a backup is
self-contained, and the instance's data (``disk``: a VM's root disk as a qcow2 layer over that
image; ``rootfs``: a tar of a container's writes), then one ``volume`` member per attached volume
(a VM's: its data as a standalone qcow2; a container's: a tar of its file tree; the manifest
entry's ``volume`` names it, its size and where it was attached). Members are written to files first (the
manifest carries their digests), then streamed out as one tar without a further copy.

A *backup store* keeps artifacts of one pool under ``backups/``: ``<id>.tar`` and, written
last, ``<id>.json`` (its metadata: what GET /v1/backups shows). Only a backup with its marker
exists: an artifact being written is invisible (S3: a multipart upload is not an object until
completed; local: ``.<id>.tar.part`` renamed when complete), and ``discard`` removes what an
interrupted write left. Another host with the same bucket sees the same backups.

Reading (``unpack``) is the boundary: the artifact may come from anyone (an upload, a bucket
others write). It is parsed as a stream, member by member: regular files only, names from a
fixed pattern and listed in the manifest, each exactly its declared size and sha256, written
into one fresh directory; nothing is created elsewhere until the caller has the verified set.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Callable
from typing import BinaryIO, Protocol, runtime_checkable

from agent.errors import InsufficientResources, InvalidInput, NotFound, Unprocessable

FORMAT = "nodeagent-backup"
VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20  # a spec with user_data and a few members: far below this
MAX_MEMBERS = 32  # the image, the disk or rootfs, and up to 24 volumes (vdb..vdy)
MEMBER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ROLES = ("image", "disk", "rootfs", "volume")
BACKUP_ID = re.compile(r"^[0-9a-f]{32}$")
PREFIX = "backups/"
CHUNK = 1 << 20
BLOCK = tarfile.BLOCKSIZE

Progress = Callable[[int], None]


# ---------------------------------------------------------------------- writing

def member_entry(name: str, role: str, path: str, **extra) -> dict:
    """The manifest's entry of member file ``path``: its size and sha256 (one read)."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK * 4):
            h.update(chunk)
            n += len(chunk)
    return {"name": name, "role": role, "size": n, "sha256": h.hexdigest(), **extra}


def _header(name: str, size: int, mtime: float) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.type = size, int(mtime), 0o600, tarfile.REGTYPE
    return ti.tobuf(format=tarfile.PAX_FORMAT)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % BLOCK)


class ArtifactStream(io.RawIOBase):
    """The artifact as a readable stream: the manifest (``manifest`` dict), then each file of
    ``files`` ({member name: host path}) in the manifest's order, as one tar. A member that
    changed size since the manifest was made ends the stream with InvalidInput."""

    def __init__(self, manifest: dict, files: dict[str, str]):
        self._parts = self._gen(manifest, files)
        self._buf = memoryview(b"")

    def _gen(self, manifest: dict, files: dict[str, str]):
        data = json.dumps(manifest, sort_keys=True).encode()
        now = manifest.get("created_at", time.time())
        yield _header(MANIFEST, len(data), now) + data + _pad(len(data))
        for m in manifest["members"]:
            yield _header(m["name"], m["size"], now)
            left = m["size"]
            with open(files[m["name"]], "rb") as f:
                while left:
                    chunk = f.read(min(CHUNK * 4, left))
                    if not chunk:
                        raise InvalidInput(f"backup member {m['name']} shrank while it was written")
                    left -= len(chunk)
                    yield chunk
            yield _pad(m["size"])
        yield b"\0" * (2 * BLOCK)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            try:
                self._buf = memoryview(next(self._parts))
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


# ---------------------------------------------------------------------- reading

class _Hashing(io.RawIOBase):
    """Reads ``src``, hashing and counting every byte; refuses more than ``limit`` bytes."""

    def __init__(self, src: BinaryIO, limit: int):
        self.src, self.limit = src, limit
        self.h, self.n = hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.src.read(len(b))
        if not data:
            return 0
        self.n += len(data)
        if self.n > self.limit:
            raise Unprocessable(f"the backup is larger than {self.limit} bytes, the most this agent takes")
        self.h.update(data)
        b[:len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.readinto(bytearray(CHUNK)):
            pass


def check_manifest(doc) -> dict:
    """Unprocessable unless ``doc`` is a manifest this agent reads: format, version, kind, and a
    member list with unique names of the fixed pattern, known roles, sizes and sha256s."""
    def bad(why: str):
        return Unprocessable(f"not a backup this agent can restore: {why}")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"{MANIFEST} is not a {FORMAT} manifest")
    if doc.get("version") != VERSION:
        raise bad(f"format version {str(doc.get('version'))[:20]!r}, this agent reads version {VERSION}")
    if doc.get("kind") not in ("vm", "container"):
        raise bad("kind must be vm or container")
    if not isinstance(doc.get("spec"), dict) or not isinstance(doc.get("image"), dict):
        raise bad("spec and image must be objects")
    members = doc.get("members")
    if not isinstance(members, list) or not 0 < len(members) <= MAX_MEMBERS:
        raise bad(f"members must list 1 to {MAX_MEMBERS} files")
    seen = set()
    for m in members:
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not MEMBER_NAME.fullmatch(m["name"]) \
                or m["name"] == MANIFEST or m["name"] in seen:
            raise bad(f"member {str(m)[:80]!r}: a unique name of 1-64 lower-case letters, digits, '.', '_', '-'")
        if m.get("role") not in ROLES or not isinstance(m.get("size"), int) or m["size"] < 0 \
                or not isinstance(m.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", m["sha256"]):
            raise bad(f"member {m['name']}: needs a role ({', '.join(ROLES)}), a size and a sha256")
        seen.add(m["name"])
    return doc


def unpack(src: BinaryIO, dest_dir: str, *, limit: int, sha256: str | None = None) -> dict:
    """Read an artifact from ``src`` into the existing empty dir ``dest_dir`` (one file per
    member, named as in the manifest) and return its manifest. Every member is checked as it
    streams (Unprocessable, 422: a tar whose first member is not a manifest, an unlisted,
    repeated or non-regular member, a size or sha256 that differs from the manifest, a missing
    member, more than ``limit`` bytes in all, or an artifact whose sha256 is not ``sha256``).
    On failure the caller removes ``dest_dir``; nothing is written outside it."""
    hs = _Hashing(src, limit)
    try:
        tar = tarfile.open(fileobj=io.BufferedReader(hs, CHUNK), mode="r|")
    except tarfile.TarError as e:
        raise Unprocessable(f"not a backup: not a tar stream ({e})") from None
    manifest = None
    want: dict[str, dict] = {}
    try:
        for ti in tar:
            if manifest is None:
                if ti.name != MANIFEST or not ti.isreg() or ti.size > MAX_MANIFEST_BYTES:
                    raise Unprocessable(f"not a backup: its first member must be {MANIFEST} (at most "
                                        f"{MAX_MANIFEST_BYTES} bytes), not {ti.name[:80]!r}")
                try:
                    manifest = check_manifest(json.loads(tar.extractfile(ti).read()))
                except ValueError:
                    raise Unprocessable(f"not a backup: {MANIFEST} is not JSON") from None
                want = {m["name"]: m for m in manifest["members"]}
                continue
            m = want.pop(ti.name, None)
            if m is None or not ti.isreg():
                raise Unprocessable(f"backup member {ti.name[:80]!r} is not a regular file the manifest lists "
                                    "(or it came twice)")
            if ti.size != m["size"]:
                raise Unprocessable(f"backup member {m['name']} is {ti.size} bytes, the manifest says {m['size']}")
            _extract(tar.extractfile(ti), os.path.join(dest_dir, m["name"]), m)
        if manifest is None:
            raise Unprocessable(f"not a backup: the tar holds no {MANIFEST}")
        if want:
            raise Unprocessable(f"the backup lacks member(s) {', '.join(sorted(want))} its manifest lists")
        hs.drain()
    except tarfile.TarError as e:
        raise Unprocessable(f"the backup is not a valid tar stream ({e}): it is truncated or corrupt") from None
    if sha256 and hs.h.hexdigest() != sha256:
        raise Unprocessable(f"the backup's checksum fails: its content is sha256:{hs.h.hexdigest()}, "
                            f"its record says sha256:{sha256}")
    return manifest


def _extract(f, path: str, m: dict) -> None:
    h = hashlib.sha256()
    try:
        with open(path, "xb") as out:
            while chunk := f.read(CHUNK * 4):
                h.update(chunk)
                out.write(chunk)
    except OSError as e:
        if e.errno in (28, 122):  # ENOSPC, EDQUOT
            raise InsufficientResources(f"no space left to unpack backup member {m['name']} "
                                        f"({m['size']} bytes)") from None
        raise
    if h.hexdigest() != m["sha256"]:
        raise Unprocessable(f"backup member {m['name']}: checksum fails (sha256:{h.hexdigest()}, "
                            f"the manifest says sha256:{m['sha256']})")


def check_id(backup_id: str) -> str:
    if not isinstance(backup_id, str) or not BACKUP_ID.fullmatch(backup_id):
        raise InvalidInput(f"backup id {str(backup_id)[:80]!r} is malformed: 32 lower-case hex digits")
    return backup_id


# ---------------------------------------------------------------------- stores

@runtime_checkable
class BackupStore(Protocol):
    """Where one pool keeps artifacts. Lifecycle of one: absent -> write() (invisible while
    written) -> listed -> delete(); discard() removes what an interrupted write() left."""

    pool: str

    def write(self, backup_id: str, src: BinaryIO, meta: dict, *, progress: Progress | None = None) -> dict:
        """Store the artifact read from ``src``, then its marker ``meta`` + size + sha256 (what
        is returned). On failure nothing is visible (the caller then calls discard)."""

    def find(self, backup_id: str) -> dict | None: ...

    def list(self) -> list[dict]: ...

    def open(self, backup_id: str) -> tuple[BinaryIO, int]:
        """The artifact as a stream and its size; NotFound."""

    def delete(self, backup_id: str) -> bool: ...

    def discard(self, backup_id: str) -> bool:
        """Remove an unfinished artifact of ``backup_id`` (never one with its marker); True if
        something was removed."""


def _meta(raw: bytes, backup_id: str) -> dict | None:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and doc.get("id") == backup_id else None


def _listed(store: BackupStore, names: list[str]) -> list[dict]:
    """The backups whose ``<id>.json`` marker is among ``names``, as ``store.find`` reads them."""
    found = (store.find(n[:-5]) for n in names if n.endswith(".json") and BACKUP_ID.fullmatch(n[:-5]))
    return [m for m in found if m is not None]


class LocalBackupStore:
    """Artifacts as files under a local pool's ``backups/`` (0700: root only)."""

    def __init__(self, pool: str, path: str):
        self.pool = pool
        self.dir = os.path.join(path, "backups")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def _p(self, backup_id: str, suffix: str) -> str:
        return os.path.join(self.dir, check_id(backup_id) + suffix)

    def write(self, backup_id, src, meta, *, progress=None):
        part = os.path.join(self.dir, f".{check_id(backup_id)}.tar.part")
        h, n = hashlib.sha256(), 0
        try:
            with open(part, "xb", buffering=0) as out:
                buf = memoryview(bytearray(CHUNK * 4))
                while k := src.readinto(buf):
                    h.update(buf[:k])
                    out.write(buf[:k])
                    n += k
                    if progress:
                        progress(n)
                os.fsync(out.fileno())
        except OSError as e:
            if e.errno in (28, 122):
                raise InsufficientResources(f"pool {self.pool} is full: the backup did not fit", pool=self.pool) \
                    from None
            raise
        os.rename(part, self._p(backup_id, ".tar"))
        meta = {**meta, "size": n, "sha256": h.hexdigest(), "pool": self.pool}
        tmp = os.path.join(self.dir, f".{backup_id}.json.part")
        with open(tmp, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self._p(backup_id, ".json"))
        return meta

    def find(self, backup_id):
        try:
            with open(self._p(backup_id, ".json"), "rb") as f:
                return _meta(f.read(MAX_MANIFEST_BYTES), backup_id)
        except FileNotFoundError:
            return None

    def list(self):
        return _listed(self, sorted(os.listdir(self.dir)))

    def open(self, backup_id):
        if self.find(backup_id) is None:
            raise NotFound(f"pool {self.pool} holds no backup {backup_id}")
        f = open(self._p(backup_id, ".tar"), "rb")
        return f, os.fstat(f.fileno()).st_size

    def delete(self, backup_id):
        found = False
        for suffix in (".json", ".tar"):  # the marker first: a half-deleted backup is not listed
            try:
                os.unlink(self._p(backup_id, suffix))
                found = True
            except FileNotFoundError:
                pass
        return found

    def discard(self, backup_id):
        done = False
        names = [f".{check_id(backup_id)}.tar.part", f".{backup_id}.json.part"]
        if self.find(backup_id) is None:
            names.append(f"{backup_id}.tar")
        for name in names:
            try:
                os.unlink(os.path.join(self.dir, name))
                done = True
            except FileNotFoundError:
                pass
        return done


class ObjectBackupStore:
    """Artifacts as objects of an object pool's bucket (storage.s3.S3Backend): ``backups/<id>.tar``
    (a multipart upload, visible only once complete) and then ``backups/<id>.json``."""

    def __init__(self, pool: str, backend):
        self.pool = pool
        self.s3 = backend

    def write(self, backup_id, src, meta, *, progress=None):
        key = PREFIX + check_id(backup_id)
        sha, n = self.s3.put_object(key + ".tar", src, progress=progress)
        meta = {**meta, "size": n, "sha256": sha, "pool": self.pool}
        self.s3.put_bytes(key + ".json", json.dumps(meta).encode())
        return meta

    def find(self, backup_id):
        raw = self.s3.get_bytes(PREFIX + check_id(backup_id) + ".json", MAX_MANIFEST_BYTES)
        return None if raw is None else _meta(raw, backup_id)

    def list(self):
        return _listed(self, [key[len(PREFIX):] for key in self.s3.list_keys(PREFIX)])

    def open(self, backup_id):
        if self.find(backup_id) is None:
            raise NotFound(f"pool {self.pool} holds no backup {backup_id}")
        return self.s3.open_object(PREFIX + backup_id + ".tar")

    def delete(self, backup_id):
        key = PREFIX + check_id(backup_id)
        found = self.find(backup_id) is not None
        self.s3.delete_key(key + ".json")
        self.s3.delete_key(key + ".tar")
        return found

    def discard(self, backup_id):
        key = PREFIX + check_id(backup_id) + ".tar"
        n = self.s3.abort_uploads(key)
        if self.find(backup_id) is None and self.s3.delete_key(key):
            n += 1
        return bool(n)


def store_for(pool: str, backend) -> BackupStore | None:
    """The backup store of a pool: an object pool's bucket, a local pool's directory; None for a
    pool that keeps no backups (block pools)."""
    if getattr(backend, "kind", None) == "object":
        return ObjectBackupStore(pool, backend)
    if getattr(backend, "kind", None) == "local" and getattr(backend, "path", None):
        return LocalBackupStore(pool, backend.path)
    return None
