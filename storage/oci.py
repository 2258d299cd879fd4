"""Reading OCI images: an OCI image layout dir, or a tar archive of one, or a
``docker save`` archive (its manifest.json converted to an OCI manifest).

``open_source(path)`` returns a ``Source`` whose ``resolve(ref)`` walks
index -> (multi-arch index -> linux/amd64) -> manifest -> config and layers. Small
JSON documents are read into memory and verified against their digests here; layer
blobs are streamed by ``open_blob`` and verified by the backend's ``put_blob``.
Nothing is ever extracted from an archive to the host by this module.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import BinaryIO

from agent.errors import InvalidInput, NotFound
from storage.validate import parse_digest

MAX_DOCUMENT = 4 * 1024 * 1024  # 4 MiB: indexes, manifests and configs are small JSON
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
    """An OCI layout dir, an OCI layout tar, or a ``docker save`` tar; InvalidInput otherwise."""
    if os.path.isdir(path):
        return LayoutDir(path)
    if not os.path.isfile(path):
        raise InvalidInput(f"{path}: no such OCI layout dir or image archive")
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise InvalidInput(f"{path}: not an OCI layout or `docker save` archive ({e})") from None
    return Archive(path, tar)


class Source:
    path: str

    def read_file(self, name: str, limit: int = MAX_DOCUMENT) -> bytes:
        raise NotImplementedError

    def has_file(self, name: str) -> bool:
        raise NotImplementedError

    def open_file(self, name: str) -> BinaryIO:
        raise NotImplementedError

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
        if d.digest in self._synthetic:
            return io.BytesIO(self._synthetic[d.digest])
        name = self._blob_files.get(d.digest) or self.blob_name(d.digest)
        if not self.has_file(name):
            raise InvalidInput(f"{self.path}: blob {d.digest} is missing from the image")
        return self.open_file(name)

    def read_blob(self, d: Descriptor) -> bytes:
        if d.digest in self._synthetic:
            return self._synthetic[d.digest]
        if d.size > MAX_DOCUMENT:
            raise InvalidInput(f"{self.path}: {d.media_type} {d.digest} is {d.size} bytes, "
                               f"over the {MAX_DOCUMENT} byte limit for JSON documents")
        name = self._blob_files.get(d.digest) or self.blob_name(d.digest)
        if not self.has_file(name):
            raise InvalidInput(f"{self.path}: blob {d.digest} is missing from the image")
        data = self.read_file(name)
        if digest_of(data) != d.digest:
            raise InvalidInput(f"{self.path}: blob {d.digest} does not match its digest "
                               "(the image is corrupt)")
        return data

    # -- resolution ---------------------------------------------------------
    _synthetic: dict
    _blob_files: dict

    def resolve(self, ref: str | None = None) -> ResolvedImage:
        self._synthetic, self._blob_files = {}, {}
        if self.has_file("index.json"):
            top = self._pick(_load(self.read_file("index.json"), self.path, "index.json"), ref)
        elif self.has_file("manifest.json"):
            top = self._from_docker_save(ref)
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

    def _from_docker_save(self, ref: str | None) -> Descriptor:
        entries = json.loads(self.read_file("manifest.json"))
        if not isinstance(entries, list) or not entries:
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
        layers = []
        for name in entry.get("Layers") or ():
            name = _member_name(name, self.path)
            h, size = hashlib.sha256(), 0
            with self.open_file(name) as f:
                head = f.read(4)
                h.update(head)
                size += len(head)
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
                    size += len(chunk)
            d = "sha256:" + h.hexdigest()
            self._blob_files[d] = name
            layers.append({"mediaType": MT_LAYER_GZIP if head[:2] == b"\x1f\x8b" else MT_LAYER_TAR,
                           "digest": d, "size": size})
        manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST[0],
                    "config": {"mediaType": MT_CONFIG, "digest": cfg.digest, "size": cfg.size},
                    "layers": layers}
        data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        d = Descriptor(digest_of(data), len(data), MT_MANIFEST[0])
        self._synthetic[d.digest] = data
        return d


class LayoutDir(Source):
    def __init__(self, path: str):
        self.path = path
        self._synthetic, self._blob_files = {}, {}

    def _full(self, name: str) -> str:
        return os.path.join(self.path, name)

    def has_file(self, name: str) -> bool:
        p = self._full(name)
        return os.path.isfile(p) and not os.path.islink(p)

    def open_file(self, name: str) -> BinaryIO:
        return open(self._full(name), "rb")

    def read_file(self, name: str, limit: int = MAX_DOCUMENT) -> bytes:
        with self.open_file(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise InvalidInput(f"{self.path}: {name} is over {limit} bytes")
        return data


class Archive(Source):
    def __init__(self, path: str, tar: tarfile.TarFile):
        self.path, self.tar = path, tar
        self._synthetic, self._blob_files = {}, {}
        self.members = {}
        for m in tar.getmembers():
            if m.isreg():
                self.members[os.path.normpath(m.name).lstrip("/")] = m

    def has_file(self, name: str) -> bool:
        return os.path.normpath(name) in self.members

    def open_file(self, name: str) -> BinaryIO:
        return self.tar.extractfile(self.members[os.path.normpath(name)])

    def read_file(self, name: str, limit: int = MAX_DOCUMENT) -> bytes:
        m = self.members.get(os.path.normpath(name))
        if m is None:
            raise InvalidInput(f"{self.path}: {name} is missing from the archive")
        if m.size > limit:
            raise InvalidInput(f"{self.path}: {name} is over {limit} bytes")
        return self.tar.extractfile(m).read()

    def close(self) -> None:
        self.tar.close()


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
