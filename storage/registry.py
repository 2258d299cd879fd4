"""Pull container images from an OCI/Docker registry (the distribution API v2) into an OCI
image layout; the caller then imports the layout with ``storage.ImageStore.import_oci``.

A registry is an untrusted remote end, like a URL (storage.sources):

- Every request and every redirect hop (a blob's 307 to a CDN, the token realm a 401
  names) goes through ``sources.open_url``: the host is resolved once, each address is
  checked against the AddressPolicy, and the connection goes to the checked address (no
  second DNS lookup, no rebinding). Nothing else here resolves or connects.
- Every byte is verified: a manifest pinned by digest against that digest, a platform
  manifest against its index entry, the config and each layer blob against their sha256
  and size while they stream in. Only sha256 digests are accepted.
- Sizes are capped: indexes, manifests, configs and token answers at MAX_DOCUMENT; all
  blobs together at the caller's ``Cap`` (``[images] max_image_bytes`` and free space).
- One Watchdog: a cancel ends the pull within a second, ``stall_timeout`` seconds
  without progress end it as stalled (sockets are shut down; partial files removed).
- Auth: anonymous bearer tokens only (the registry's 401 ``WWW-Authenticate: Bearer
  realm=...`` -> GET the realm -> retry with the token). The agent holds no registry
  credentials; the token goes to the registry's own host and port only, never along a
  redirect elsewhere.
- Plain http only with ``tls_verify=False``: then https without certificate checks is
  tried first and plain http if that fails (what skopeo's --src-tls-verify=false did);
  with ``tls_verify=True`` no request or redirect leaves verified https.

A multi-arch index resolves to linux/amd64, so the layout holds one single-platform
image; manifests are stored byte for byte (the image id is their digest).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

from agent.errors import Forbidden, InvalidInput, NotFound, Unavailable, Unprocessable
from storage.sources import (AddressPolicy, Cap, Watchdog, content_length, open_url,
                             read_chunks)
from storage.validate import parse_digest

DEFAULT_REGISTRY = "registry-1.docker.io"  # where a reference without a registry host goes
DOCKER_HUB_NAMES = ("docker.io", "index.docker.io")  # names people use for it
TARGET_OS, TARGET_ARCH = "linux", "amd64"
MAX_DOCUMENT = 4 * 1024 * 1024  # 4 MiB: a manifest, index, config or token answer (storage.oci's)
MAX_LAYERS = 1000  # more layers than any real image has (overlayfs stacks at most ~500)
DEFAULT_MAX_BYTES = 256 * 1024**3  # the blobs' cap when the caller gives none ([images] default)
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)
ACCEPT = ", ".join(INDEX_TYPES + MANIFEST_TYPES)
REF_ANNOTATION = "org.opencontainers.image.ref.name"
# name[:tag][@sha256:<64 hex>] with an optional registry host[:port]/ prefix
REFERENCE_RE = re.compile(
    r"^(?P<name>[a-z0-9]+(?:[._-][a-z0-9]+)*(?:[:][0-9]+)?(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")
_CHALLENGE_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"([^"]*)"|([^\s,]*))')


def parse_reference(reference: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of ``reference``; InvalidInput if it is not one."""
    ref = reference.removeprefix("docker://")
    m = REFERENCE_RE.match(ref)
    if not m:
        raise InvalidInput(f"image reference {reference!r} is invalid: use "
                           "[host[:port]/]name[:tag][@sha256:<digest>], e.g. "
                           "127.0.0.1:5000/busybox:latest")
    return m["name"], m["tag"], m["digest"]


def registry_host(name: str) -> tuple[str, int]:
    """The registry (host, port) of a reference's name, by Docker's rule: the first path
    component is a registry when it has a "." or ":" or is "localhost"."""
    netloc, _ = _split_name(name)
    host, _, port = netloc.rpartition(":") if ":" in netloc else (netloc, "", "")
    return host, int(port) if port else 443


def _split_name(name: str) -> tuple[str, str]:
    """(registry host[:port], repository) of a reference's name; Docker Hub's official
    images live under library/."""
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        netloc, repo = first, rest
    else:
        netloc, repo = DEFAULT_REGISTRY, name
    if netloc in DOCKER_HUB_NAMES:
        netloc = DEFAULT_REGISTRY
    if netloc == DEFAULT_REGISTRY and "/" not in repo:
        repo = f"library/{repo}"
    return netloc, repo


@dataclass(frozen=True)
class _Blob:
    digest: str
    size: int
    media_type: str


def pull_to_layout(reference: str, dest_dir: str, *, tls_verify: bool = True,
                   policy: AddressPolicy | None = None, cancel: threading.Event | None = None,
                   stall_timeout: float = 60, cap: Cap | None = None) -> str:
    """Copy ``reference`` (tag or digest) from its registry into the OCI layout ``dest_dir``
    and return the layout's tag for it (what ``import_oci(..., ref=)`` takes).

    Every address the pull reaches must pass ``policy`` (default: the strict
    AddressPolicy()): Forbidden otherwise, before any connection to it. The blobs together
    may be at most ``cap`` (Unprocessable / InsufficientResources past it). A cancel
    raises Cancelled within a second; ``stall_timeout`` seconds without progress raise
    Unavailable. NotFound when the registry has no such image; InvalidInput when what it
    sends does not match its digests. ``dest_dir`` may hold other images; a failed pull
    leaves it as it was (a new dir is removed again, no partial file stays)."""
    name, tag, digest = parse_reference(reference)
    netloc, repo = _split_name(name)
    host, port = registry_host(name)
    policy = policy or AddressPolicy()
    policy.resolve(host, port, f"registry of {reference}")  # refuse early, say why
    cap = cap or Cap(DEFAULT_MAX_BYTES)
    layout_tag = tag or (digest.split(":", 1)[1][:12] if digest else "latest")
    created = not os.path.exists(dest_dir)
    os.makedirs(os.path.join(dest_dir, "blobs", "sha256"), exist_ok=True)
    layout = _Layout(dest_dir)
    try:
        with Watchdog(f"pull of {reference}", cancel=cancel, stall_timeout=stall_timeout) as wd:
            reg = _Registry(netloc, repo, reference, policy=policy, wd=wd, tls_verify=tls_verify,
                            stall_timeout=stall_timeout)
            reg.ping()
            data, mt = reg.manifest(digest or tag or "latest", digest)
            if mt in INDEX_TYPES:
                entry = _pick_platform(_load(data, f"index of {reference}"), reference)
                data, mt = reg.manifest(entry.digest, entry.digest, entry.size)
                if mt not in MANIFEST_TYPES:
                    raise InvalidInput(f"{reference}: the {TARGET_OS}/{TARGET_ARCH} entry of its "
                                       f"index is a {mt}, not an image manifest")
            config, layers = _parse_manifest(_load(data, f"manifest of {reference}"), reference)
            total = config.size + sum(b.size for b in layers)
            if total > cap.limit:
                raise cap.error(f"image {reference}", total)
            if config.size > MAX_DOCUMENT:
                raise Unprocessable(f"{reference}: its config is {config.size} bytes, over the "
                                    f"{MAX_DOCUMENT} byte limit for JSON documents")
            for b in (config, *layers):
                reg.blob(b, layout, cap)
            layout.add_manifest(data, mt, layout_tag)
    except BaseException:
        layout.discard()
        if created:
            shutil.rmtree(dest_dir, ignore_errors=True)
        raise
    return layout_tag


class _Registry:
    """One repository of one registry, spoken to through sources.open_url."""

    def __init__(self, netloc: str, repo: str, reference: str, *, policy: AddressPolicy,
                 wd: Watchdog, tls_verify: bool, stall_timeout: float):
        self.netloc, self.repo, self.reference = netloc, repo, reference
        self.policy, self.wd, self.tls_verify = policy, wd, tls_verify
        self.stall_timeout = stall_timeout
        self.base = f"https://{netloc}"
        self.token: str | None = None
        self.done = 0  # blob bytes so far (the watchdog's progress)

    @property
    def schemes(self) -> tuple[str, ...]:
        return ("https",) if self.tls_verify else ("http", "https")

    @contextlib.contextmanager
    def _open(self, url: str, headers: dict[str, str] | None = None):
        with open_url(url, policy=self.policy, wd=self.wd, read_timeout=self.stall_timeout,
                      headers=headers, schemes=self.schemes, tls_verify=self.tls_verify) as opened:
            yield opened

    def ping(self) -> None:
        """GET /v2/: decides http or https (see the module docstring) and takes the auth
        challenge, if any."""
        from storage.sources import TLSFailed

        for scheme in ("https",) if self.tls_verify else ("https", "http"):
            try:
                with self._open(f"{scheme}://{self.netloc}/v2/") as (_, r):
                    status, challenge = r.status, r.headers.get("WWW-Authenticate", "")
                break
            except TLSFailed as e:
                if self.tls_verify:
                    raise Unavailable(f"TLS to the registry of {self.reference} failed: {e} (for "
                                      "a plain-HTTP test registry pass tls_verify=False)") from None
                if self.wd.reason or scheme == "http":
                    raise
            except (Forbidden, Unprocessable, InvalidInput):
                raise
            except Unavailable:
                if self.wd.reason or scheme == "http" or self.tls_verify:
                    raise
        self.base = f"{scheme}://{self.netloc}"
        if status == 401:
            self._authenticate(challenge)
        elif status != 200:
            raise Unavailable(f"{self.netloc} does not answer as a registry (GET /v2/ returned "
                              f"HTTP {status}); check the reference {self.reference}")

    def _authenticate(self, challenge: str) -> None:
        """Fetch an anonymous pull token from the realm the 401 challenge names."""
        kind, _, rest = challenge.strip().partition(" ")
        if kind.lower() != "bearer":
            raise Forbidden(f"the registry of {self.reference} asks for credentials "
                            f"({kind or 'no'} auth); this agent pulls anonymously only: make "
                            "the image public or mirror it to a registry that serves it so")
        params = {m[1].lower(): m[2] if m[2] is not None else m[3]
                  for m in _CHALLENGE_PARAM.finditer(rest)}
        realm = params.get("realm") or ""
        if urlsplit(realm).scheme not in ("http", "https") or not urlsplit(realm).hostname:
            raise InvalidInput(f"the registry of {self.reference} names a token realm "
                               f"{realm!r} that is not an http(s) URL")
        query = {"scope": f"repository:{self.repo}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        with self._open(url) as (final, r):
            if r.status != 200:
                raise Forbidden(f"the token service of the registry of {self.reference} "
                                f"({final}) refused an anonymous pull token: HTTP {r.status}")
            body = _read_document(r, self.wd, f"token answer of {final}")
        try:
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token or not (token.isascii() and token.isprintable()):
            raise InvalidInput(f"the token service of the registry of {self.reference} sent no "
                               "usable token")
        self.token = token

    @contextlib.contextmanager
    def _get(self, path: str, accept: str | None = None):
        """GET base+path, with the token; a 401 takes one (new) token and one retry."""
        for attempt in (1, 2):
            headers = {"Accept": accept} if accept else {}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            challenge = None
            with self._open(self.base + path, headers) as (url, r):
                if r.status == 401 and attempt == 1:
                    challenge = r.headers.get("WWW-Authenticate", "")
                else:
                    if r.status == 401:
                        raise Forbidden(f"the registry refused {self.reference} to an anonymous "
                                        "pull (a private image?): this agent holds no registry "
                                        "credentials; make it public or mirror it")
                    yield url, r
                    return
            self._authenticate(challenge)

    def manifest(self, ref: str, digest: str | None, size: int | None = None) -> tuple[bytes, str]:
        """(bytes, media type) of the manifest or index ``ref`` (a tag or digest), checked
        against ``digest`` and ``size`` when given."""
        what = f"manifest {ref} of {self.reference}"
        with self._get(f"/v2/{self.repo}/manifests/{ref}", ACCEPT) as (url, r):
            if r.status == 404:
                raise NotFound(f"image {self.reference} is not in its registry: check the name "
                               "and the tag")
            if r.status != 200:
                raise Unavailable(f"the registry answered HTTP {r.status} for {what}; retry later")
            ctype = (r.headers.get("Content-Type") or "").split(";")[0].strip()
            data = _read_document(r, self.wd, what)
        if digest is not None and _sha256(data) != digest:
            raise InvalidInput(f"{what}: the registry sent a manifest whose digest is "
                               f"{_sha256(data)}, not {digest}; nothing was imported")
        if size is not None and len(data) != size:
            raise InvalidInput(f"{what} is {len(data)} bytes, its index says {size}")
        doc = _load(data, what)
        mt = doc.get("mediaType") if isinstance(doc.get("mediaType"), str) else ctype
        if doc.get("schemaVersion") == 1 or "prettyjws" in mt:
            raise InvalidInput(f"{what} is a Docker schema 1 manifest (deprecated, unsupported): "
                               "push the image again with a current client")
        if mt not in INDEX_TYPES + MANIFEST_TYPES:  # no mediaType field: what OCI allows
            mt = MT_OCI_INDEX if "manifests" in doc else MT_OCI_MANIFEST if "layers" in doc else mt
        if mt not in INDEX_TYPES + MANIFEST_TYPES:
            raise InvalidInput(f"{what} has unsupported media type {mt!r}")
        return data, mt

    def blob(self, b: _Blob, layout: "_Layout", cap: Cap) -> None:
        """Stream blob ``b`` into the layout, verifying size and sha256 on the way."""
        what = f"blob {b.digest} of {self.reference}"
        if layout.has_new(b.digest):
            return  # the same blob twice in one image
        with self._get(f"/v2/{self.repo}/blobs/{b.digest}") as (url, r):
            if r.status == 404:
                raise NotFound(f"{what}: the registry lacks a blob its manifest lists; the image "
                               "is broken there")
            if r.status != 200:
                raise Unavailable(f"the registry answered HTTP {r.status} for {what}; retry later")
            length = content_length(r)
            if length is not None and length != b.size:
                raise InvalidInput(f"{what}: the registry sends {length} bytes, the manifest "
                                   f"says {b.size}; nothing was imported")
            h, got = hashlib.sha256(), 0
            with layout.new_blob(b.digest) as out:
                for chunk in read_chunks(r, self.wd, f"GET {url}"):
                    got += len(chunk)
                    if got > b.size:
                        raise InvalidInput(f"{what}: the registry sent more than the "
                                           f"{b.size} bytes the manifest says")
                    if self.done + len(chunk) > cap.limit:
                        raise cap.error(f"image {self.reference}", None)
                    h.update(chunk)
                    out.write(chunk)
                    self.done += len(chunk)
                    self.wd.alive(self.done)
                if got != b.size:
                    raise Unavailable(f"{what}: got {got} of {b.size} bytes; retry")
                if "sha256:" + h.hexdigest() != b.digest:
                    raise InvalidInput(f"{what}: the content does not match its digest "
                                       f"(sha256:{h.hexdigest()}); nothing was imported")


class _Layout:
    """The OCI layout being written: new blobs land in temp files and are renamed into
    place once verified; index.json is replaced last. ``discard`` removes every file this
    pull made."""

    def __init__(self, path: str):
        self.path = path
        self.blobs = os.path.join(path, "blobs", "sha256")
        self.made: list[str] = []  # files this pull created (removed by discard)
        self.written: set[str] = set()

    def has_new(self, digest: str) -> bool:
        return digest in self.written

    @contextlib.contextmanager
    def new_blob(self, digest: str):
        final = os.path.join(self.blobs, parse_digest(digest))
        fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=self.blobs)
        self.made.append(tmp)
        with os.fdopen(fd, "wb") as out:
            yield out
        if not os.path.exists(final):
            self.made.append(final)
        os.replace(tmp, final)
        self.written.add(digest)

    def add_manifest(self, data: bytes, media_type: str, tag: str) -> None:
        digest = _sha256(data)
        with self.new_blob(digest) as out:
            out.write(data)
        index_path = os.path.join(self.path, "index.json")
        index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": []}
        if os.path.exists(index_path):
            with open(index_path) as f:
                index = json.load(f)
        index["manifests"] = [m for m in index.get("manifests", [])
                              if (m.get("annotations") or {}).get(REF_ANNOTATION) != tag]
        index["manifests"].append({"mediaType": media_type, "digest": digest, "size": len(data),
                                   "annotations": {REF_ANNOTATION: tag}})
        for name, doc in (("oci-layout", {"imageLayoutVersion": "1.0.0"}), ("index.json", index)):
            fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=self.path)
            self.made.append(tmp)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, os.path.join(self.path, name))

    def discard(self) -> None:
        for p in self.made:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def _read_document(r, wd: Watchdog, what: str) -> bytes:
    """A JSON document's body, at most MAX_DOCUMENT bytes (Unprocessable past it)."""
    length = content_length(r)
    if length is not None and length > MAX_DOCUMENT:
        raise Unprocessable(f"{what} is {length} bytes, over the {MAX_DOCUMENT} byte limit for "
                            "manifests and other JSON documents")
    parts, got = [], 0
    for chunk in read_chunks(r, wd, what):
        got += len(chunk)
        if got > MAX_DOCUMENT:
            raise Unprocessable(f"{what} is over the {MAX_DOCUMENT} byte limit for manifests "
                                "and other JSON documents")
        parts.append(chunk)
    return b"".join(parts)


def _load(data: bytes, what: str) -> dict:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise InvalidInput(f"{what} is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"{what} is not a JSON object")
    return doc


def _descriptor(d, what: str) -> _Blob:
    if not isinstance(d, dict) or not isinstance(d.get("size"), int) or d["size"] < 0:
        raise InvalidInput(f"{what}: a descriptor without a valid size: {str(d)[:200]}")
    try:
        parse_digest(d.get("digest"))
    except (InvalidInput, TypeError):
        raise InvalidInput(f"{what}: descriptor digest {str(d.get('digest'))[:100]!r} is not "
                           "sha256:<64 hex> (the only algorithm this agent takes)") from None
    mt = d.get("mediaType")
    return _Blob(d["digest"], d["size"], mt if isinstance(mt, str) else "")


def _pick_platform(index: dict, reference: str) -> _Blob:
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise InvalidInput(f"the index of {reference} has no manifests list")
    found = []
    for e in entries:
        p = (e.get("platform") if isinstance(e, dict) else None) or {}
        if (p.get("os"), p.get("architecture")) == (TARGET_OS, TARGET_ARCH):
            return _descriptor(e, f"index of {reference}")
        found.append(f"{p.get('os')}/{p.get('architecture')}")
    raise InvalidInput(f"{reference} has no {TARGET_OS}/{TARGET_ARCH} image (it has "
                       f"{', '.join(sorted(found)) or 'none'})")


def _parse_manifest(m: dict, reference: str) -> tuple[_Blob, list[_Blob]]:
    what = f"manifest of {reference}"
    layers = m.get("layers")
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise InvalidInput(f"{what}: layers must be a list of at most {MAX_LAYERS} descriptors")
    return _descriptor(m.get("config"), what), [_descriptor(x, what) for x in layers]


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()

