"""``ImageStore``: content-addressed VM and container images over the storage pools.

Terms: an *image* is named by its id, the sha256 of its disk blob (VM images) or of
its OCI manifest (container images); it lives in one pool. A *reference* says a volume
(``pool``/``volume``) was made from an image; an image with references cannot be
deleted (Conflict). Lifecycle: import_* -> present -> delete() -> (blobs stay until)
gc().

Decisions:
- Dedupe: importing content that is already present returns the existing image and
  stores nothing new, whatever pool is asked for. A second *name* for the same content
  is kept as an alias: get/find by either name works, the returned Image carries the
  name asked for (imports return the name given); list() shows each image once under
  its first name. A name already used by *other* content is a Conflict.
- delete() removes the catalog entry and all its names; blobs and unpacked layers are
  freed by gc(), which only ever removes blobs this store put (the catalog records
  them), never foreign blobs in a shared pool.
- Container layers are unpacked at import time (a malicious layer refuses the whole
  image at import, not at first run); prepare_rootfs re-unpacks a layer if the cache
  was wiped.
- A failed import leaves nothing: blobs it added that no image uses are deleted, and so
  are layer dirs it unpacked.
- Object pools (S3) hold images but no volumes. clone_disk/prepare_rootfs of an image
  living there put the volume in the default pool (or the pool asked for); the disk blob
  is fetched once (verified) into that pool, recorded in storage_blobs, and reused by
  every later clone there. gc drops such cached copies once nothing references them:
  the image's own pool (and its copies, copy_to_pool) stay the source of truth.
- Sharing through an object pool: host A calls copy_to_pool(ref, "s3") (or imports into
  it); host B calls import_digest("s3", digest, name=...) and records the image without
  uploading anything. A store records as its own (storage_blobs) only blobs it put, so
  B's gc never removes A's objects.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable

from agent.errors import (AgentError, Conflict, InsufficientResources, InvalidInput, NotFound, Unprocessable,
                          Unsupported)
from agent.state import Database
from storage import oci, qemu_img, sources
from storage.backend import (DISK_FORMATS, AdoptsBlobs, Backend, BlobInfo, FetchesBlobs, FetchesObjects, SweepsTemp,
                             Volume, VolumeSpec)
from storage.unpack import DEFAULT_MAX_ENTRIES, layer_dir, unpack_layer_once
from storage.validate import parse_digest
from storage.units import GiB, MiB

URL_CHUNK = 1024 * 1024  # 1 MiB reads from an HTTP response
STALE_TMP_SECONDS = 3600  # gc leaves younger temp dirs alone: an import may be using them
ID_PREFIX_MIN = 12

SCHEMA_STEPS = [
    """
    CREATE TABLE storage_images (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL, format TEXT NOT NULL,
        size INTEGER NOT NULL, virtual_size INTEGER, pool TEXT NOT NULL,
        created_at REAL NOT NULL, config TEXT NOT NULL, layers TEXT NOT NULL,
        blobs TEXT NOT NULL);
    CREATE TABLE storage_image_names (
        name TEXT PRIMARY KEY,
        image_id TEXT NOT NULL REFERENCES storage_images(id) ON DELETE CASCADE);
    CREATE TABLE storage_references (
        pool TEXT NOT NULL, volume TEXT NOT NULL,
        image_id TEXT NOT NULL REFERENCES storage_images(id),
        created_at REAL NOT NULL, PRIMARY KEY (pool, volume));
    CREATE TABLE storage_blobs (
        pool TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (pool, digest));
    """,
    """
    CREATE TABLE storage_image_copies (
        image_id TEXT NOT NULL REFERENCES storage_images(id) ON DELETE CASCADE,
        pool TEXT NOT NULL, PRIMARY KEY (image_id, pool));
    """,
]


@dataclass(frozen=True)
class Image:
    id: str
    name: str
    kind: str  # vm | container
    format: str  # qcow2 | raw | oci
    digest: str
    size: int
    virtual_size: int | None
    pool: str
    created_at: float
    config: dict
    layers: tuple = ()


@dataclass(frozen=True)
class RootfsLayers:
    lowerdirs: tuple  # top first (overlayfs order)
    upperdir: str
    workdir: str
    volume: Volume


Progress = Callable[[int], None]


class ImageStore:
    def __init__(self, db: Database, pools: dict[str, Backend], *, default_pool: str,
                 cache_dir: str, max_layer_bytes: int = 8 * GiB, max_layer_ratio: int = 200,
                 max_layer_entries: int = DEFAULT_MAX_ENTRIES,
                 address_policy: sources.AddressPolicy | None = None,
                 max_image_bytes: int = 256 * GiB, stall_timeout: float = 60):
        if default_pool not in pools:
            raise InvalidInput(f"default pool {default_pool!r} is not configured; pools: "
                               f"{', '.join(sorted(pools)) or 'none'}")
        self.db, self.pools, self.default_pool = db, pools, default_pool
        self.cache_dir = cache_dir
        self.max_layer_bytes, self.max_layer_ratio = max_layer_bytes, max_layer_ratio
        self.max_layer_entries = max_layer_entries
        # image sources (storage.sources): strict unless the caller allows networks
        self.address_policy = address_policy or sources.AddressPolicy()
        self.max_image_bytes, self.stall_timeout = max_image_bytes, stall_timeout
        self.tmp_dir = os.path.join(cache_dir, "tmp")
        os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
        layers = os.path.join(cache_dir, "layers")
        os.makedirs(os.path.join(layers, "sha256"), mode=0o700, exist_ok=True)
        os.chmod(layers, 0o700)  # host users never reach unpacked image files
        db.apply_schema("storage", SCHEMA_STEPS)
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, str], int] = {}  # (pool, digest) -> imports using it
        self._fetching: dict[tuple[str, str], threading.Lock] = {}  # one fetch per blob+pool
        self._tmp_live: set[str] = set()  # names in tmp_dir that imports are using now
        self.started_at = time.time()  # temp files older than this are a killed agent's

    # ------------------------------------------------------------------ lookup
    def get(self, ref: str) -> Image:
        img = self.find(ref)
        if img is None:
            raise NotFound(f"image {ref!r} not found; `GET /v1/images` lists them")
        return img

    def find(self, ref: str) -> Image | None:
        ref = (ref or "").strip()
        if not ref:
            return None
        row = self.db.one("SELECT i.* FROM storage_image_names n JOIN storage_images i "
                          "ON i.id = n.image_id WHERE n.name = ?", (ref,))
        if row is not None:
            return dataclasses.replace(_image(row), name=ref)
        hexpart = ref[7:] if ref.startswith("sha256:") else ref
        if len(hexpart) >= ID_PREFIX_MIN and all(c in "0123456789abcdef" for c in hexpart):
            rows = self.db.query("SELECT * FROM storage_images WHERE id LIKE ? LIMIT 2",
                                 (hexpart + "%",))
            if len(rows) > 1:
                raise InvalidInput(f"image id prefix {ref!r} is ambiguous; give more characters")
            if rows:
                return _image(rows[0])
        return None

    def list(self) -> list[Image]:
        return [_image(r) for r in
                self.db.query("SELECT * FROM storage_images ORDER BY created_at, id")]

    def _backend(self, pool: str | None) -> tuple[str, Backend]:
        pool = pool or self.default_pool
        try:
            return pool, self.pools[pool]
        except KeyError:
            raise NotFound(f"pool {pool!r} not found; pools: {', '.join(sorted(self.pools))}") from None

    # ------------------------------------------------------------------ imports
    def import_file(self, path: str, *, name: str, pool: str | None = None,
                    format: str | None = None, progress: Progress | None = None) -> Image:
        """Import a host file: a qcow2 or raw disk image, or a container image archive (an
        OCI layout tar or a `docker save` tar, plain or compressed).

        The kind comes from the content (``sniff_file``), never from ``format`` alone: a
        tar archive (or compressed data) is never a VM disk, so it is imported with
        import_oci when ``format`` is None or "oci" and refused when ``format`` says
        qcow2/raw; anything else is a disk, whose format qemu-img reads and ``format``, if
        given, must match. A qcow2 with a backing file or an external data file, or any
        other format, is refused (InvalidInput)."""
        _check_name(name)
        pool, backend = self._backend(pool)
        kind = sniff_file(path)
        if kind is not None:
            if format in DISK_FORMATS:
                raise InvalidInput(f"{path}: declared format {format!r} but the file is a {kind}, "
                                   "not a disk image; import it with format oci if it is a "
                                   "container image (a VM disk is never an archive)")
            if "tar" not in kind:
                raise InvalidInput(f"{path}: {kind}, not a tar archive nor a disk image; "
                                   "decompress it first (disk images are imported uncompressed)")
            return self.import_oci(path, name=name, pool=pool, progress=progress)
        if format == "oci":
            raise InvalidInput(f"{path}: declared format 'oci' but the file is not a tar "
                               "archive; give an OCI layout (dir or tar) or a `docker save` tar")
        info = _check_disk(qemu_img.info(path), path, format)
        with self._import() as added:
            with _open_regular(path) as f:
                blob = self._put(pool, backend, f, added, progress=progress)
            stored = backend.blob_path(blob.digest)
            if stored and info["format"] == "qcow2":  # the file may have changed under us
                info = _check_disk(qemu_img.info(stored, format="qcow2"), path, "qcow2")
                qemu_img.check(stored, format="qcow2")
            if stored and sniff_file(stored) is not None:  # it became an archive meanwhile
                raise InvalidInput(f"{path}: the file changed while it was imported")
            img = Image(blob.digest[7:], name, "vm", info["format"], blob.digest, blob.size,
                        info["virtual-size"], pool, time.time(), {}, ())
            return self._record(img, [blob.digest])

    def import_url(self, url: str, *, name: str, pool: str | None = None,
                   format: str | None = None, sha256: str | None = None,
                   progress: Progress | None = None,
                   cancel: threading.Event | None = None) -> Image:
        """Download an http(s) disk image (streamed to a temp file, hashed on the way) and
        import it; ``sha256`` (hex) is checked before anything is stored. The download
        obeys the store's source policy (storage.sources): addresses checked on every hop,
        at most max_image_bytes and the free space of the pool and of the temp dir, aborted
        on ``cancel`` (Cancelled) or after stall_timeout seconds without progress."""
        _check_name(name)
        pool, backend = self._backend(pool)
        if not url.startswith(("http://", "https://")):
            raise InvalidInput(f"URL {url!r} must be http:// or https://")
        if sha256 is not None:
            sha256 = sha256.lower().removeprefix("sha256:")
            if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
                raise InvalidInput(f"sha256 {sha256!r} must be 64 hex digits")
        cap = self.source_cap(pool)
        with self._tmp_file("url-") as tmp:
            with open(tmp, "wb") as out:
                digest, _ = sources.download(url, out, policy=self.address_policy, cap=cap,
                                             stall_timeout=self.stall_timeout, cancel=cancel,
                                             progress=progress)
            if sha256 is not None and digest != sha256:
                raise InvalidInput(f"{url}: content sha256 {digest} does not match the "
                                   f"expected {sha256}; nothing was stored")
            return self.import_file(tmp, name=name, pool=pool, format=format)

    def source_cap(self, pool: str | None = None, tmp_dir: str | None = None) -> sources.Cap:
        """What a download into ``pool`` (via ``tmp_dir``, default the store's temp dir)
        may write: max_image_bytes and the free space of both."""
        pool, backend = self._backend(pool)
        tmp_dir = tmp_dir or self.tmp_dir
        return sources.Cap(self.max_image_bytes, [
            (_available(backend), f"pool {pool}"),
            (_fs_available(tmp_dir), f"the agent's temp dir {tmp_dir}")])

    def import_object(self, source_pool: str, key: str, *, name: str, pool: str | None = None,
                      format: str | None = None, sha256: str | None = None,
                      progress: Progress | None = None, cancel: threading.Event | None = None) -> Image:
        """Import the object ``key`` of an object pool (an image some other tool uploaded
        to the bucket): fetched to a temp file (``sha256`` hex, if given, checked before
        anything is stored), then imported into ``pool`` as a disk image, or as a container
        image when ``format`` is "oci" (an OCI or `docker save` archive). The fetch ends
        on ``cancel`` or after stall_timeout seconds without progress, like a URL's."""
        _check_name(name)
        self._backend(pool)
        _, src = self._backend(source_pool)
        if not isinstance(src, FetchesObjects):
            raise InvalidInput(f"pool {source_pool!r} is a {src.kind} pool: an object key names "
                               "an object of an object (S3) pool")
        if sha256 is not None:
            sha256 = parse_digest("sha256:" + sha256.lower().removeprefix("sha256:"))
        with self._tmp_file("object-") as tmp:
            sources.watched(f"object {key!r} of pool {source_pool}",
                            lambda: src.fetch_object(key, tmp, sha256=sha256, progress=progress),
                            cancel=cancel, stall_timeout=self.stall_timeout,
                            probe=lambda: _size_or_zero(tmp))
            if format == "oci":
                return self.import_oci(tmp, name=name, pool=pool)
            return self.import_file(tmp, name=name, pool=pool, format=format)

    def import_oci(self, path: str, *, name: str, ref: str | None = None,
                   pool: str | None = None, progress: Progress | None = None) -> Image:
        """Import a container image from an OCI layout dir/archive or a `docker save`
        archive; every blob is verified and every layer unpacked (safely) once."""
        _check_name(name)
        pool, backend = self._backend(pool)
        with oci.open_source(path) as src:
            return self._import_oci(src, name, ref, pool, backend, progress)

    def _import_oci(self, src: oci.Source, name: str, ref: str | None, pool: str,
                    backend: Backend, progress: Progress | None) -> Image:
        r = src.resolve(ref, progress)
        image_id = r.manifest_digest[7:]
        existing = self.find(image_id)
        if existing is not None:
            return self._alias(existing, name)
        with self._import() as added:
            blobs, done = [], 0
            for d in (oci.Descriptor(r.manifest_digest, len(r.manifest), ""), r.config,
                      *r.layers):
                step = None if progress is None else (lambda n, base=done: progress(base + n))
                with src.open_blob(d) as f:
                    b = self._put(pool, backend, f, added, digest=d.digest, size=d.size,
                                  progress=step)
                done += b.size
                blobs.append(b)
            for l in r.layers:
                self._unpack(pool, backend, l.digest, added)
            img = Image(image_id, name, "container", "oci", r.manifest_digest,
                        sum(b.size for b in blobs), None, pool, time.time(),
                        r.runtime_config, tuple(l.digest for l in r.layers))
            return self._record(img, [b.digest for b in blobs])

    def import_digest(self, pool: str, digest: str, *, name: str, format: str | None = None,
                      progress: Progress | None = None) -> Image:
        """Record an image whose blobs are already in ``pool`` (an object pool another host
        shares, typically), by the digest of its disk blob or of its OCI manifest. Nothing
        is uploaded and this store does not take ownership of those blobs (its gc never
        removes them). The content is checked as by import_file/import_oci: a disk blob is
        fetched (verified) and inspected with qemu-img; an OCI image's layers are unpacked.
        """
        _check_name(name)
        pool, backend = self._backend(pool)
        parse_digest(digest)
        existing = self.find(digest)
        if existing is not None:
            return self._alias(existing, name)
        try:
            info = backend.stat_blob(digest)
        except NotFound:
            raise NotFound(f"pool {pool} holds no blob {digest}: put the image there first "
                           "(import it into that pool, or copy_to_pool on the host that has it)"
                           ) from None
        if format not in (None, "oci", *DISK_FORMATS):
            raise InvalidInput(f"format {format!r} must be qcow2, raw or oci")
        if format == "oci" or (format is None and _looks_like_manifest(backend, digest, info.size)):
            with _PoolSource(pool, backend, digest) as src:
                return self._import_oci(src, name, None, pool, backend, progress)
        with self._import() as added, self._tmp_file("digest-") as tmp:
            self._fetch(pool, backend, digest, tmp, progress)
            kind = sniff_file(tmp)
            if kind is not None:  # never a disk; a container image is named by its manifest
                raise InvalidInput(f"pool {pool} blob {digest} is a {kind}, not a disk image; "
                                   "import a container image by its manifest digest")
            fmt = _check_disk(qemu_img.info(tmp), f"pool {pool} blob {digest}", format)
            if fmt["format"] == "qcow2":
                qemu_img.check(tmp, format="qcow2")
            img = Image(digest[7:], name, "vm", fmt["format"], digest, info.size,
                        fmt["virtual-size"], pool, time.time(), {}, ())
            cache = self.pools[self.default_pool]
            if self.default_pool != pool and isinstance(cache, AdoptsBlobs):
                # fetched anyway: keep it as the first clone's cached base (gc may drop it)
                self._put_file(self.default_pool, cache, tmp, added, digest, info.size)
            return self._record(img, [digest])

    def copy_to_pool(self, ref: str, pool: str, *, progress: Progress | None = None) -> Image:
        """Copy every blob of an image into another pool (an object pool, so other hosts can
        import_digest it) and keep them there as long as the image exists: a *copy*, which
        gc keeps, unlike the cached base copies clone_disk makes. Idempotent."""
        img = self.get(ref)
        pool, backend = self._backend(pool)
        if pool == img.pool:
            return img
        row = self.db.one("SELECT blobs FROM storage_images WHERE id = ?", (img.id,))
        with self._import() as added:
            done = 0
            for digest in json.loads(row["blobs"]):
                src_pool, src = self._holder(img, digest)
                step = None if progress is None else (lambda n, base=done: progress(base + n))
                with src.open_blob(digest) as f:
                    b = self._put(pool, backend, f, added, digest=digest, progress=step)
                done += b.size
            self.db.execute("INSERT OR IGNORE INTO storage_image_copies(image_id, pool) "
                            "VALUES (?, ?)", (img.id, pool))
        return img

    def copies(self, ref: str) -> list[str]:
        """Pools holding a kept copy of the image (copy_to_pool), besides its own pool."""
        img = self.get(ref)
        return [r["pool"] for r in self.db.query(
            "SELECT pool FROM storage_image_copies WHERE image_id = ? ORDER BY pool", (img.id,))]

    def cached_in(self, ref: str) -> list[str]:
        """Pools where this store put the image's disk blob (its own pool, copies, caches)."""
        img = self.get(ref)
        return [r["pool"] for r in self.db.query(
            "SELECT pool FROM storage_blobs WHERE digest = ? ORDER BY pool", (img.digest,))]

    def _holder(self, img: Image, digest: str) -> tuple[str, Backend]:
        """A pool holding ``digest`` of ``img``: its own pool or a copy, host-local first."""
        names = [img.pool] + [r["pool"] for r in self.db.query(
            "SELECT pool FROM storage_image_copies WHERE image_id = ? ORDER BY pool", (img.id,))]
        names = [n for n in names if n in self.pools]
        names.sort(key=lambda n: self.pools[n].kind == "object")
        for n in names:
            if n == img.pool or self.pools[n].find_blob(digest) is not None:
                return n, self.pools[n]
        raise NotFound(f"image {img.id[:12]}: no configured pool holds blob {digest}")

    def _tmp_file(self, prefix: str) -> "_TmpFile":
        return _TmpFile(self.tmp_dir, prefix, self._tmp_live)

    def _fetch(self, pool: str, backend: Backend, digest: str, dest: str,
               progress: Progress | None = None) -> None:
        """Download a whole blob to the host file ``dest``, verified: fetch_blob (parallel
        ranged GETs) where the backend has it, else a stream copy checked against the
        digest. Errors name the pool and the fix."""
        try:
            if isinstance(backend, FetchesBlobs):  # the blob is stored (fsynced) next: its writeback starts early
                backend.fetch_blob(digest, dest, progress=progress, writeback=True)
                return
            h, done = hashlib.sha256(), 0
            with backend.open_blob(digest) as f, open(dest, "wb") as out:
                while chunk := f.read(URL_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done)
            if "sha256:" + h.hexdigest() != digest:
                raise InvalidInput(f"pool {pool}: blob {digest} is corrupt (content is "
                                   f"sha256:{h.hexdigest()}): delete the image and import it again")
        except NotFound:
            raise NotFound(f"pool {pool} no longer holds blob {digest} (deleted behind this "
                           "host's back?): import the image into that pool again, or delete "
                           "the image here") from None

    # ---------------------------------------------------------- import plumbing
    def _import(self) -> "_Import":
        return _Import(self)

    def _pin(self, added: "_Import", pool: str, digest: str) -> None:
        """Keep gc() off a blob an import is about to record."""
        with self._lock:
            self._inflight[(pool, digest)] = self._inflight.get((pool, digest), 0) + 1
        added.pins.append((pool, digest))

    def _unpin(self, pins: list) -> None:
        with self._lock:
            for key in pins:
                self._inflight[key] -= 1
                if not self._inflight[key]:
                    del self._inflight[key]

    def _put(self, pool, backend, f, added, **kw):
        if kw.get("digest"):
            self._pin(added, pool, kw["digest"])
            found = backend.find_blob(kw["digest"])
            if found is not None:  # already stored (another image shares it): nothing to copy
                if kw.get("progress"):
                    kw["progress"](found.size)
                return found
        blob = backend.put_blob(f, **kw)
        if not kw.get("digest"):
            self._pin(added, pool, blob.digest)
        self._note_put(pool, blob, added)
        return blob

    def _put_file(self, pool, backend, path: str, added, digest: str, size: int) -> BlobInfo:
        """Put a host file already verified to hold ``digest`` into the pool: moved in where
        the backend can (LocalBackend.adopt_blob), else copied with put_blob."""
        blob = backend.adopt_blob(path, digest) if isinstance(backend, AdoptsBlobs) else None
        if blob is None:
            with open(path, "rb") as f:
                return self._put(pool, backend, f, added, digest=digest, size=size)
        self._pin(added, pool, digest)
        self._note_put(pool, blob, added)
        return blob

    def _note_put(self, pool, blob, added) -> None:
        with self.db.tx() as c:
            new = c.execute("INSERT OR IGNORE INTO storage_blobs(pool, digest) VALUES (?, ?)",
                            (pool, blob.digest)).rowcount
        if new and not self._blob_used(pool, blob.digest):
            added.added.append(("blob", pool, blob.digest))

    def _unpack(self, pool, backend, digest, added=None) -> str:
        d = layer_dir(self.cache_dir, digest)
        if os.path.isdir(d):
            return d
        path = backend.blob_path(digest)
        if path is None:  # a remote pool: fetch the layer (verified) to a temp file first
            with self._tmp_file("layer-") as tmp:
                self._fetch(pool, backend, digest, tmp)
                d = unpack_layer_once(tmp, digest, self.cache_dir,
                                      max_bytes=self.max_layer_bytes,
                                      max_ratio=self.max_layer_ratio)
        else:
            d = unpack_layer_once(path, digest, self.cache_dir, max_bytes=self.max_layer_bytes,
                                  max_ratio=self.max_layer_ratio,
                                  max_entries=self.max_layer_entries)
        if added is not None:
            added.added.append(("layer", pool, digest))
        return d

    def _blob_used(self, pool: str, digest: str) -> bool:
        needle = f'%"{digest}"%'
        return self.db.one("SELECT 1 FROM storage_images WHERE pool = ? AND blobs LIKE ?",
                           (pool, needle)) is not None

    def _layer_used(self, digest: str) -> bool:
        return self.db.one("SELECT 1 FROM storage_images WHERE layers LIKE ?",
                           (f'%"{digest}"%',)) is not None

    def _undo(self, added) -> None:
        """Remove what a failed import added and nothing else uses."""
        for kind, pool, digest in reversed(added):
            with self._lock:
                shared = self._inflight.get((pool, digest), 0) > 1  # another import wants it
            if shared:
                continue
            if kind == "blob" and not self._blob_used(pool, digest):
                self.pools[pool].delete_blob(digest)
                self.db.execute("DELETE FROM storage_blobs WHERE pool = ? AND digest = ?",
                                (pool, digest))
            elif kind == "layer" and not self._layer_used(digest):
                shutil.rmtree(layer_dir(self.cache_dir, digest), ignore_errors=True)

    def _record(self, img: Image, blobs: list[str]) -> Image:
        with self.db.tx() as c:
            row = c.execute("SELECT * FROM storage_images WHERE id = ?", (img.id,)).fetchone()
            if row is None:
                owner = c.execute("SELECT image_id FROM storage_image_names WHERE name = ?",
                                  (img.name,)).fetchone()
                if owner is not None:
                    raise Conflict(f"image name {img.name!r} is taken by image "
                                   f"{owner['image_id'][:12]}; pick another name or delete it")
                c.execute("INSERT INTO storage_images VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                          (img.id, img.name, img.kind, img.format, img.size, img.virtual_size,
                           img.pool, img.created_at, json.dumps(img.config),
                           json.dumps(list(img.layers)), json.dumps(sorted(set(blobs)))))
                c.execute("INSERT INTO storage_image_names(name, image_id) VALUES (?, ?)",
                          (img.name, img.id))
                return img
        return self._alias(_image(row), img.name)

    def _alias(self, img: Image, name: str) -> Image:
        with self.db.tx() as c:
            owner = c.execute("SELECT image_id FROM storage_image_names WHERE name = ?",
                              (name,)).fetchone()
            if owner is not None and owner["image_id"] != img.id:
                raise Conflict(f"image name {name!r} is taken by image "
                               f"{owner['image_id'][:12]}; pick another name or delete it")
            c.execute("INSERT OR IGNORE INTO storage_image_names(name, image_id) VALUES (?, ?)",
                      (name, img.id))
        return dataclasses.replace(img, name=name)

    # ------------------------------------------------------------------ delete/export
    def delete(self, ref: str) -> bool:
        """Forget an image and all its names; Conflict while a volume references it.
        Return False if it was already gone. Space comes back at the next gc()."""
        img = self.find(ref)
        if img is None:
            return False
        with self.db.tx() as c:
            refs = c.execute("SELECT pool, volume FROM storage_references WHERE image_id = ?",
                             (img.id,)).fetchall()
            if refs:
                used = ", ".join(f"{r['pool']}/{r['volume']}" for r in refs[:5])
                raise Conflict(f"image {img.id[:12]} is in use by {len(refs)} volume(s) "
                               f"({used}); delete the instances using it first")
            c.execute("DELETE FROM storage_image_names WHERE image_id = ?", (img.id,))
            c.execute("DELETE FROM storage_image_copies WHERE image_id = ?", (img.id,))
            c.execute("DELETE FROM storage_images WHERE id = ?", (img.id,))
        return True

    def export(self, ref: str, dest_path: str) -> None:
        """Write a VM image as its disk file (qcow2/raw), a container image as an OCI
        layout tar archive. Written to a temp file beside ``dest_path``, then renamed."""
        img = self.get(ref)
        backend = self.pools[img.pool]
        dest_dir = os.path.dirname(os.path.abspath(dest_path))
        if not os.path.isdir(dest_dir):
            raise InvalidInput(f"{dest_dir}: no such directory to export into")
        fd, tmp = tempfile.mkstemp(prefix=".export-", dir=dest_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                if img.kind == "vm":
                    with backend.open_blob(img.digest) as f:
                        shutil.copyfileobj(f, out, URL_CHUNK)
                else:
                    self._export_oci(img, backend, out)
                os.fsync(out.fileno())
            os.rename(tmp, dest_path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _export_oci(self, img: Image, backend, out) -> None:
        row = self.db.one("SELECT blobs FROM storage_images WHERE id = ?", (img.id,))
        index = {"schemaVersion": 2, "mediaType": oci.MT_INDEX[0], "manifests": [{
            "mediaType": oci.MT_MANIFEST[0], "digest": img.digest,
            "size": backend.stat_blob(img.digest).size,
            "annotations": {oci.REF_ANNOTATION: img.name}}]}
        with tarfile.open(fileobj=out, mode="w|") as tar:
            for name, data in (("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
                               ("index.json", json.dumps(index).encode())):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime = len(data), int(img.created_at)
                tar.addfile(ti, _BytesReader(data))
            for digest in json.loads(row["blobs"]):
                ti = tarfile.TarInfo(f"blobs/sha256/{digest[7:]}")
                ti.size, ti.mtime = backend.stat_blob(digest).size, int(img.created_at)
                with backend.open_blob(digest) as f:
                    tar.addfile(ti, f)

    # ------------------------------------------------------------------ use
    def clone_disk(self, ref: str, volume_name: str, *, pool: str | None = None,
                   size: int | None = None) -> Volume:
        """A copy-on-write disk for an instance; records a reference. On failure nothing
        is left (neither volume nor reference)."""
        img = self.get(ref)
        if img.kind != "vm":
            raise Unprocessable(f"image {img.id[:12]} is a container image; use prepare_rootfs")
        pool, backend = self._backend(pool or self._volume_pool(img))
        if not backend.supports_volumes:
            raise Unsupported(f"pool {pool!r} ({backend.kind}) holds blobs only; put instance "
                              "disks on a local or block pool")
        with self._import() as added:
            if backend.find_blob(img.digest) is None:  # cross-pool: cache the base blob here
                self._cache(img, pool, backend, added)
            else:
                self._pin(added, pool, img.digest)  # keep gc off it until the reference exists
            self._reserve(pool, volume_name, img.id)
            try:
                return backend.clone_volume(img.digest, volume_name, format=img.format,
                                            size=size)
            except BaseException:
                self._unreserve(pool, volume_name)
                raise

    def _volume_pool(self, img: Image) -> str:
        """Where a volume made from ``img`` goes by default: the image's pool when it can hold
        volumes, else (an object pool) the default pool."""
        home = self.pools.get(img.pool)
        return img.pool if home is not None and home.supports_volumes else self.default_pool

    def _cache(self, img: Image, pool: str, backend: Backend, added: "_Import") -> None:
        """Put the disk blob of ``img`` into ``pool`` (once, even with concurrent clones):
        from a host-local holder by streaming, from a remote one (S3) by fetching it to a
        temp file on this host first. Recorded in storage_blobs; undone with ``added``."""
        key = (pool, img.digest)
        with self._lock:
            lock = self._fetching.setdefault(key, threading.Lock())
        with lock:
            self._pin(added, pool, img.digest)
            if backend.find_blob(img.digest) is not None:  # a concurrent clone cached it
                return
            src_pool, src = self._holder(img, img.digest)
            try:
                if src.blob_path(img.digest) is not None or not isinstance(src, FetchesBlobs):
                    with src.open_blob(img.digest) as f:
                        self._put(pool, backend, f, added, digest=img.digest, size=img.size)
                else:
                    with self._tmp_file("cache-") as tmp:
                        self._fetch(src_pool, src, img.digest, tmp)
                        self._put_file(pool, backend, tmp, added, img.digest, img.size)
            except AgentError as e:
                raise type(e)(f"cannot copy image {img.id[:12]} from pool {src_pool} into "
                              f"pool {pool}: {e.message}", **e.details) from None
            self._add_blob(img.id, img.digest)

    def prepare_rootfs(self, ref: str, name: str, *, pool: str | None = None) -> RootfsLayers:
        """The layers (unpacked, top first) and a fresh "dir" volume holding upper+work for
        a container's overlayfs rootfs; records a reference. Mount with
        storage.mounts.mount_overlay. On failure nothing is left."""
        img = self.get(ref)
        if img.kind != "container":
            raise Unprocessable(f"image {img.id[:12]} is a VM image; use clone_disk")
        if not img.layers:
            raise Unprocessable(f"image {img.id[:12]} has no layers to make a rootfs from")
        pool, backend = self._backend(pool or self._volume_pool(img))
        if not backend.supports_volumes:
            raise Unsupported(f"pool {pool!r} ({backend.kind}) holds blobs only; put container "
                              "rootfs volumes on a local pool")
        lowers = tuple(self._unpack(img.pool, self.pools[img.pool], d)
                       for d in reversed(img.layers))
        self._reserve(pool, name, img.id)
        try:
            vol = backend.create_volume(VolumeSpec(name, 0, "dir"))
            if vol.path is None:
                backend.delete_volume(name)
                raise Unsupported(f"pool {pool!r} ({backend.kind}) cannot give a host "
                                  "directory for a container rootfs; use a local pool")
        except BaseException:
            self._unreserve(pool, name)
            raise
        return RootfsLayers(lowers, os.path.join(vol.path, "upper"),
                            os.path.join(vol.path, "work"), vol)

    def rebase_rootfs(self, ref: str, pool: str, volume_name: str) -> tuple[str, tuple[str, ...]]:
        """Point the container rootfs volume ``volume_name`` (made by prepare_rootfs) at image
        ``ref`` instead: its layers are unpacked and the volume's reference moves to it (the
        old image is free of it; its upper dir is the runtime's to empty). Returns (the image
        id it referenced before, the new layer dirs top first). NotFound if the volume has no
        reference in ``pool``; Unprocessable for an image that is not a container image. Undo
        with another rebase_rootfs to the old id."""
        img = self.get(ref)
        if img.kind != "container":
            raise Unprocessable(f"image {img.id[:12]} is a VM image: a container's rootfs is made of "
                                "a container image's layers")
        if not img.layers:
            raise Unprocessable(f"image {img.id[:12]} has no layers to make a rootfs from")
        row = self.db.one("SELECT image_id FROM storage_references WHERE pool = ? AND volume = ?",
                          (pool, volume_name))
        if row is None:
            raise NotFound(f"pool {pool!r} holds no rootfs volume {volume_name!r} made from an image")
        lowers = tuple(self._unpack(img.pool, self.pools[img.pool], d) for d in reversed(img.layers))
        self.db.execute("UPDATE storage_references SET image_id = ? WHERE pool = ? AND volume = ?",
                        (img.id, pool, volume_name))
        return row["image_id"], lowers

    def release(self, pool: str, volume_name: str) -> bool:
        """Delete the volume and its reference; False if neither existed."""
        _, backend = self._backend(pool)
        gone = backend.delete_volume(volume_name)
        n = self.db.execute("DELETE FROM storage_references WHERE pool = ? AND volume = ?",
                            (pool, volume_name)).rowcount
        return bool(gone or n)

    def receive_disk_layer(self, pool: str, volume_name: str, stream, *, image_ref: str) -> int:
        """Replace volume ``volume_name`` (a qcow2 overlay on image ``image_ref``, in a pool that
        gives file paths) with the qcow2 layer read from ``stream`` (another host's copy of that
        disk), pointed at this pool's copy of the image; the bytes read. The layer is checked
        before anything opens it (check_disk_layer): no data file, no encryption, no backing
        file but the sender's copy of the image. InsufficientResources (pool=...) when the pool
        fills up; the volume is untouched on any failure, and a failed stream is read to its end."""
        img = self.get(image_ref)
        _, backend = self._backend(pool)
        vol = backend.get_volume(volume_name)
        base = backend.blob_path(vol.base) if vol.base else None
        if not vol.path or (vol.base and not base):
            raise Unsupported(f"pool {pool!r} gives no file path for disks: an offline move needs a "
                              "local pool")
        tmp = os.path.join(os.path.dirname(vol.path), f".incoming-{volume_name}")
        n = 0
        try:
            with open(tmp, "wb") as f:
                try:
                    while chunk := stream.read(URL_CHUNK):
                        n += len(chunk)
                        f.write(chunk)
                    os.fsync(f.fileno())
                except OSError:
                    while stream.read(URL_CHUNK):  # the sender gets our answer, not a reset
                        pass
                    raise
            check_disk_layer(qemu_img.info(tmp, format="qcow2"), img, base)
            if base:  # unsafe: the sender's backing name is replaced, never opened
                qemu_img.rebase(tmp, base, backing_format=img.format, unsafe=True)
            qemu_img.check(tmp, format="qcow2")  # only now: check opens the backing file
            os.chmod(tmp, 0o644)
            os.replace(tmp, vol.path)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientResources(f"{os.strerror(errno.ENOSPC).lower()} after {n // MiB} MiB of "
                                            "the disk", pool=pool) from None
            raise
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return n

    def adopt_volume(self, ref: str, pool: str, volume_name: str) -> Volume:
        """Record a reference to an existing volume made from image ``ref`` by another host
        on shared storage (a block pool several hosts use): a migration's destination takes
        it over, and release() later deletes it. NotFound if this pool does not hold it;
        Conflict if it is referenced here already or was cloned from another image."""
        img = self.get(ref)
        _, backend = self._backend(pool)
        vol = backend.find_volume(volume_name)
        if vol is None:
            raise NotFound(f"pool {pool!r} holds no volume {volume_name!r}: for shared storage, "
                           f"[pools.{pool}] must name the same Ceph pool on both hosts")
        if vol.base not in (None, img.digest):
            raise Conflict(f"volume {volume_name!r} in pool {pool!r} was cloned from {vol.base}, "
                           f"not from image {img.id[:12]}")
        self._reserve(pool, volume_name, img.id)
        return vol

    def forget_volume(self, pool: str, volume_name: str) -> bool:
        """Drop the reference to a volume another host owns now (shared storage), keeping
        the volume itself; False if there was none."""
        self._backend(pool)
        return bool(self.db.execute("DELETE FROM storage_references WHERE pool = ? AND volume = ?",
                                    (pool, volume_name)).rowcount)

    def references(self, ref: str) -> list[tuple[str, str]]:
        """(pool, volume) pairs made from the image."""
        img = self.get(ref)
        return [(r["pool"], r["volume"]) for r in self.db.query(
            "SELECT pool, volume FROM storage_references WHERE image_id = ? ORDER BY 1, 2",
            (img.id,))]

    def _reserve(self, pool: str, volume: str, image_id: str) -> None:
        try:
            self.db.execute("INSERT INTO storage_references(pool, volume, image_id, created_at) "
                            "VALUES (?, ?, ?, ?)", (pool, volume, image_id, time.time()))
        except Exception as e:  # sqlite3.IntegrityError: the name is taken
            if "UNIQUE" in str(e) or "PRIMARY" in str(e):
                raise Conflict(f"volume {volume!r} already exists in pool {pool}") from None
            raise

    def _unreserve(self, pool: str, volume: str) -> None:
        self.db.execute("DELETE FROM storage_references WHERE pool = ? AND volume = ?",
                        (pool, volume))

    def _add_blob(self, image_id: str, digest: str) -> None:
        with self.db.tx() as c:
            row = c.execute("SELECT blobs FROM storage_images WHERE id = ?", (image_id,)).fetchone()
            blobs = sorted(set(json.loads(row["blobs"])) | {digest})
            c.execute("UPDATE storage_images SET blobs = ? WHERE id = ?",
                      (json.dumps(blobs), image_id))

    # ------------------------------------------------------------------ gc
    def gc(self) -> dict:
        """Remove blobs this store put that no image uses, unpacked layers no image uses,
        and temp files no import of this store is using that are older than the store
        (a killed agent's) or than STALE_TMP_SECONDS: in the tmp dir, the layer cache
        and every pool that SweepsTemp. Safe to run while imports are under way."""
        out = {"blobs_removed": 0, "layers_removed": 0, "bytes_freed": 0}
        used_blobs, used_layers = set(), set()
        for r in self.db.query("SELECT pool, blobs, layers FROM storage_images"):
            used_blobs.update((r["pool"], d) for d in json.loads(r["blobs"]))
            used_layers.update(d[7:] for d in json.loads(r["layers"]))
        for r in self.db.query("SELECT c.pool, i.blobs FROM storage_image_copies c "
                               "JOIN storage_images i ON i.id = c.image_id"):
            used_blobs.update((r["pool"], d) for d in json.loads(r["blobs"]))
        # a cross-pool clone copies the base blob: it is used in the volume's pool too
        for r in self.db.query("SELECT DISTINCT r.pool, i.id FROM storage_references r "
                               "JOIN storage_images i ON i.id = r.image_id"):
            if r["id"] and len(r["id"]) == 64:
                used_blobs.add((r["pool"], "sha256:" + r["id"]))
        for r in self.db.query("SELECT pool, digest FROM storage_blobs"):
            key = (r["pool"], r["digest"])
            with self._lock:
                if key in used_blobs or key in self._inflight or r["pool"] not in self.pools:
                    continue
            backend = self.pools[r["pool"]]
            info = backend.find_blob(r["digest"])
            if info is not None and backend.delete_blob(r["digest"]):
                out["blobs_removed"] += 1
                out["bytes_freed"] += info.size
            self.db.execute("DELETE FROM storage_blobs WHERE pool = ? AND digest = ?", key)
        layers = os.path.join(self.cache_dir, "layers", "sha256")
        now = time.time()
        inflight = {d[7:] for _, d in list(self._inflight)}

        def stale(e: os.DirEntry) -> bool:  # a temp a killed agent (or a lost import) left
            try:
                mtime = e.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:  # its import just finished
                return False
            return mtime < self.started_at or now - mtime > STALE_TMP_SECONDS

        for e in os.scandir(layers):
            tmp = e.name.startswith(".") and stale(e)
            if (not e.name.startswith(".") and e.name not in used_layers
                    and e.name not in inflight) or tmp:
                out["bytes_freed"] += sources.tree_bytes(e.path)
                shutil.rmtree(e.path, ignore_errors=True)
                out["layers_removed"] += 0 if tmp else 1
        out["temp_files_removed"] = 0
        for e in os.scandir(self.tmp_dir):
            if e.name not in self._tmp_live and stale(e):
                size = sources.tree_bytes(e.path) if e.is_dir(follow_symlinks=False) else \
                    e.stat(follow_symlinks=False).st_size
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path, ignore_errors=True)
                else:
                    os.unlink(e.path)
                out["bytes_freed"] += size
                out["temp_files_removed"] += 1
        for name, backend in self.pools.items():
            if isinstance(backend, SweepsTemp):
                try:
                    n, freed = backend.sweep_temp(self.started_at)
                except AgentError as e:  # an unreachable pool: the next gc tries again
                    out.setdefault("errors", []).append(f"pool {name}: {e.message}")
                    continue
                out["temp_files_removed"] += n
                out["bytes_freed"] += freed
        return out


# ---------------------------------------------------------------------- helpers

class _Import:
    """One import (or cross-pool copy): what it added, undone if it fails, and the blobs
    it pins against a concurrent gc()."""

    def __init__(self, store: ImageStore):
        self.store = store
        self.added: list[tuple[str, str, str]] = []  # (blob|layer, pool, digest)
        self.pins: list[tuple[str, str]] = []

    def __enter__(self) -> "_Import":
        return self

    def __exit__(self, et, e, tb) -> bool:
        try:
            if et is not None:
                self.store._undo(self.added)
        finally:
            self.store._unpin(self.pins)
        return False


def _image(row) -> Image:
    return Image(row["id"], row["name"], row["kind"], row["format"], "sha256:" + row["id"],
                 row["size"], row["virtual_size"], row["pool"], row["created_at"],
                 json.loads(row["config"]), tuple(json.loads(row["layers"])))


def _size_or_zero(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512  # what is written so far (ranges land in place)
    except FileNotFoundError:
        return 0


def _check_name(name: str) -> None:
    if not name or len(name) > 255 or any(c.isspace() or ord(c) < 32 for c in name):
        raise InvalidInput(f"image name {name!r} must be 1-255 printable characters, no spaces")
    if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        raise InvalidInput("an image name cannot look like an image id (64 hex digits)")


SNIFF_BYTES = 64 * 1024  # compressed bytes read to find out what a file holds
_COMPRESSIONS = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"),
                 (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))


def sniff_file(path: str) -> str | None:
    """What the regular file ``path`` holds when it is not a disk image: "tar archive",
    "gzip-compressed tar archive" (bzip2, xz, zstd alike), or "gzip-compressed data"
    (not a tar); None when it is neither (a disk image, or garbage qemu-img judges).
    A file that is not regular (fifo, device, directory): InvalidInput, never opened
    for reading."""
    with _open_regular(path) as f:
        head = f.read(SNIFF_BYTES)
    for magic, comp in _COMPRESSIONS:
        if head.startswith(magic):
            block = _decompress_head(comp, head)
            return f"{comp}-compressed " + ("tar archive" if _is_tar(block) else "data")
    return "tar archive" if _is_tar(head[:tarfile.BLOCKSIZE]) else None


def _is_tar(block: bytes) -> bool:
    """Whether ``block`` is a valid tar header (checksum included)."""
    if len(block) < tarfile.BLOCKSIZE:
        return False
    try:
        tarfile.TarInfo.frombuf(block[:tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _decompress_head(comp: str, head: bytes) -> bytes:
    """The first tar block's worth of the decompressed ``head`` (b"" if unreadable)."""
    import bz2
    import lzma
    import subprocess
    import zlib

    n = tarfile.BLOCKSIZE
    try:
        if comp == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, n)
        if comp == "bzip2":
            return bz2.BZ2Decompressor().decompress(head, n)
        if comp == "xz":
            return lzma.LZMADecompressor().decompress(head, n)
        r = subprocess.run(["zstd", "-dcq"], input=head, capture_output=True, timeout=30)
        return r.stdout[:n]  # a cut-off frame still yields its first blocks
    except (zlib.error, OSError, EOFError, lzma.LZMAError, subprocess.SubprocessError):
        return b""


def _open_regular(path: str):
    """``path`` opened for reading if it is a regular file (a fifo or device is refused
    without blocking or reading: opened O_PATH, checked, then reopened)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file; give the path of a disk image or an "
                           "image archive") from None
    except OSError as e:
        raise InvalidInput(f"{path}: cannot open it ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"{path}: not a regular file (a directory, fifo or device); "
                               "give a disk image or an image archive")
        return os.fdopen(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC), "rb")
    finally:
        os.close(fd)


def _check_disk(info: dict, path: str, format: str | None) -> dict:
    fmt = info.get("format")
    if fmt not in DISK_FORMATS:
        raise InvalidInput(f"{path}: format {fmt!r} is not supported; convert it to qcow2 or "
                           "raw (qemu-img convert -O qcow2 ...)")
    if not info.get("virtual-size"):
        raise InvalidInput(f"{path}: the image is empty (virtual size 0)")
    if format is not None and format != fmt:
        raise InvalidInput(f"{path}: declared format {format!r} but the file is {fmt!r}")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise InvalidInput(f"{path}: the image has a backing file "
                           f"({info.get('backing-filename')!r}); refusing it (it could read host "
                           "files): flatten it first with qemu-img convert")
    data = ((info.get("format-specific") or {}).get("data") or {})
    if data.get("data-file"):
        raise InvalidInput(f"{path}: the image uses an external data file "
                           f"({data['data-file']!r}); refusing it: flatten it with qemu-img convert")
    return info


def _available(backend: Backend) -> int | None:
    """Free bytes of a pool, None where it cannot say."""
    try:
        return backend.usage().available
    except Exception:
        return None


def _fs_available(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize




def _looks_like_manifest(backend: Backend, digest: str, size: int) -> bool:
    """True if the blob is a small JSON OCI/Docker image manifest or index (not a disk)."""
    if size > oci.MAX_DOCUMENT or size < 2:
        return False
    with backend.open_blob(digest, 0, 1) as f:
        if f.read(1) != b"{":
            return False
    with backend.open_blob(digest) as f:
        data = f.read(oci.MAX_DOCUMENT + 1)
    try:
        m = json.loads(data)
    except ValueError:
        return False
    return isinstance(m, dict) and m.get("schemaVersion") == 2 and \
        ("layers" in m or "manifests" in m)


class _PoolSource(oci.Source):
    """An OCI image whose blobs sit in a pool, seen as a one-image OCI layout (its
    index.json is made up, pointing at the manifest)."""

    def __init__(self, pool: str, backend: Backend, manifest_digest: str):
        self.path = f"pool {pool}"
        self._backend, self._manifest = backend, manifest_digest
        self._synthetic, self._blob_files = {}, {}

    def _open(self, name: str):
        if name == "index.json":
            data = self._index()
            return io.BytesIO(data), len(data)
        if name == "oci-layout":
            return io.BytesIO(b"{}"), 2
        if not name.startswith("blobs/sha256/"):
            return None
        digest = "sha256:" + name.rsplit("/", 1)[1]
        info = self._backend.find_blob(digest)
        if info is None:
            return None
        return self._backend.open_blob(digest), info.size

    def _index(self) -> bytes:
        with self._backend.open_blob(self._manifest) as f:
            data = f.read(oci.MAX_DOCUMENT + 1)
        try:
            mt = json.loads(data).get("mediaType") or oci.MT_MANIFEST[0]
        except (ValueError, AttributeError):
            raise InvalidInput(f"{self.path}: blob {self._manifest} is not an image manifest "
                               "(give format qcow2/raw for a disk image)") from None
        return json.dumps({"schemaVersion": 2, "manifests": [
            {"mediaType": mt, "digest": self._manifest, "size": len(data)}]}).encode()


class _TmpFile:
    """A temp file path under the store's tmp dir, removed on exit; listed in ``live``
    meanwhile (gc leaves it alone)."""

    def __init__(self, tmp_dir: str, prefix: str, live: set):
        fd, self.path = tempfile.mkstemp(prefix=prefix, dir=tmp_dir)
        os.close(fd)
        self._live = live
        live.add(os.path.basename(self.path))

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc) -> bool:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._live.discard(os.path.basename(self.path))
        return False


class _BytesReader:
    def __init__(self, data: bytes):
        self._data, self._pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        chunk = self._data[self._pos:end]
        self._pos += len(chunk)
        return chunk


def check_disk_layer(info: dict, image: Image, base: str | None) -> None:
    """InvalidInput unless ``info`` (qemu-img info of another host's disk file, which opens neither
    a backing nor a data file) is a plain qcow2 layer: no external data file, no encryption, and
    no backing reference but the sender's copy of ``image`` (``.../<image id>``), which the
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
