"""storage.registry.pull_to_layout against a real docker-registry on 127.0.0.1."""
from __future__ import annotations

import json
import os

import pytest

from agent.errors import Cancelled, Forbidden, InvalidInput, NotFound, Unavailable
from storage.registry import parse_reference, pull_to_layout
from storage.sources import AddressPolicy
from testbed.registry_server import push_busybox

pytestmark = pytest.mark.real
LOCAL = AddressPolicy(["127.0.0.1/32"])  # the test registry listens on loopback


def layout_manifest(layout: str, tag: str) -> dict:
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    desc = next(m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    with open(os.path.join(layout, "blobs", *desc["digest"].split(":"))) as f:
        return json.load(f)


def config_of(layout: str, manifest: dict) -> dict:
    with open(os.path.join(layout, "blobs", *manifest["config"]["digest"].split(":"))) as f:
        return json.load(f)


def test_pull_by_tag(busybox_ref, tmp_path):
    dest = str(tmp_path / "layout")
    tag = pull_to_layout(busybox_ref, dest, tls_verify=False, policy=LOCAL)
    assert tag == "test"
    m = layout_manifest(dest, tag)
    assert config_of(dest, m)["config"]["Cmd"] == ["sh"]
    assert len(m["layers"]) == 1


def test_pull_by_digest(oci_registry, busybox_ref, tmp_path):
    m = layout_manifest_from_pull(busybox_ref, tmp_path / "a")
    with open(tmp_path / "a" / "index.json") as f:
        digest = json.load(f)["manifests"][0]["digest"]
    name = busybox_ref.rsplit(":", 1)[0]
    tag = pull_to_layout(f"{name}@{digest}", str(tmp_path / "b"), tls_verify=False, policy=LOCAL)
    assert tag == digest.split(":")[1][:12]
    assert layout_manifest(str(tmp_path / "b"), tag) == m  # the digest pinned the content


def layout_manifest_from_pull(ref, dest):
    tag = pull_to_layout(ref, str(dest), tls_verify=False, policy=LOCAL)
    return layout_manifest(str(dest), tag)


def test_multiarch_index_resolves_to_amd64(oci_registry, tmp_path):
    ref = push_busybox(oci_registry, str(tmp_path), repo="multi", tag="v1", multiarch=True)
    dest = str(tmp_path / "layout")
    tag = pull_to_layout(ref, dest, tls_verify=False, policy=LOCAL)
    m = layout_manifest(dest, tag)
    assert m["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert config_of(dest, m)["architecture"] == "amd64"


def test_unknown_image_is_not_found_and_leaves_nothing(oci_registry, tmp_path):
    dest = tmp_path / "layout"
    with pytest.raises(NotFound, match="not in its registry"):
        pull_to_layout(f"{oci_registry.address}/nope:missing", str(dest), tls_verify=False, policy=LOCAL)
    assert not dest.exists()


def test_unreachable_registry_and_bad_reference(tmp_path):
    from testbed.runtimes import find_free_port
    with pytest.raises(Unavailable):
        pull_to_layout(f"127.0.0.1:{find_free_port()}/x:y", str(tmp_path / "l"),
                       tls_verify=False, policy=LOCAL)
    for bad in ("UPPER/case", "a b", "x@sha256:123", ""):
        with pytest.raises(InvalidInput):
            parse_reference(bad)
    assert parse_reference("127.0.0.1:5000/busybox:test") == ("127.0.0.1:5000/busybox",
                                                             "test", None)


def unpack_layout(layout: str, tag: str, dest: str) -> tuple[list[str], dict]:
    """Layers unpacked by hand (the store's path is in test_image_to_container.py), so a
    pull problem and a store problem fail different tests; (lowerdirs top first,
    image config)."""
    import tarfile
    m = layout_manifest(layout, tag)
    dirs = []
    for i, layer in enumerate(m["layers"]):
        d = os.path.join(dest, f"layer{i}")
        os.makedirs(d)
        with tarfile.open(os.path.join(layout, "blobs", *layer["digest"].split(":"))) as t:
            t.extractall(d)  # our own test image (testbed/registry_server.py)
        dirs.append(d)
    return dirs[::-1], config_of(layout, m)["config"]


def test_pull_then_run_a_container(busybox_ref, tmp_path):
    from containers import ContainerSpec, NetworkSpec, Rootfs
    from testbed.runtimes import make_runc
    layout = str(tmp_path / "layout")
    tag = pull_to_layout(busybox_ref, layout, tls_verify=False, policy=LOCAL)
    lowers, image_config = unpack_layout(layout, tag, str(tmp_path / "layers"))
    rt, cleanup = make_runc(tmp_path)
    try:
        spec = ContainerSpec(name="pulled", rootfs=Rootfs(tuple(lowers), str(tmp_path / "up"),
                                                          str(tmp_path / "work")),
                             command=("sh", "-c", "echo $IMAGE; cat /www/index.html"),
                             image_config=image_config, network=NetworkSpec())
        rt.create(spec)
        rt.start("pulled")
        import time
        deadline = time.monotonic() + 10
        while rt.get("pulled").state != "stopped" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rt.get("pulled").exit_code == 0
        assert rt.logs("pulled") == "busybox-test\nhello from busybox\n"
    finally:
        cleanup()


def test_loopback_registry_is_refused_unless_allowed(busybox_ref, tmp_path):
    with pytest.raises(Forbidden, match="loopback.*allow_url_hosts"):
        pull_to_layout(busybox_ref, str(tmp_path / "l"), tls_verify=False)
    with pytest.raises(Forbidden, match="loopback"):
        pull_to_layout("localhost:5000/x:y", str(tmp_path / "l"), tls_verify=False)
    assert not (tmp_path / "l").exists()


def _silent_registry():
    """A registry that accepts TCP connections and never answers."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def test_hung_registry_stalls_out_and_cancels_within_a_second(tmp_path):
    import threading
    import time
    srv = _silent_registry()
    ref = f"127.0.0.1:{srv.getsockname()[1]}/x:y"
    try:
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="stalled.*stall_timeout"):
            pull_to_layout(ref, str(tmp_path / "a"), tls_verify=False, policy=LOCAL,
                           stall_timeout=2)
        assert time.monotonic() - t0 < 30
        cancel = threading.Event()
        threading.Timer(1.0, cancel.set).start()
        t0 = time.monotonic()
        with pytest.raises(Cancelled):
            pull_to_layout(ref, str(tmp_path / "b"), tls_verify=False, policy=LOCAL,
                           cancel=cancel, stall_timeout=600)
        assert time.monotonic() - t0 < 10  # the cancel at 1 s ended it, long before the 600 s stall timeout
        assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    finally:
        srv.close()


# ---------------------------------------------------------------- hostile registries
# A registry is a remote end like any URL: these ones (http.server on 127.0.0.2, the one
# address the policy allows) redirect, demand tokens, stall, lie and send too much. The
# "internal service" they aim at is a listening socket on 127.0.0.1 that records whether
# anything ever connected to it.

HOSTILE = "127.0.0.2"
BLOBSTORE = "127.0.0.3"  # a second allowed host (a CDN that blobs redirect to)
HOSTILE_POLICY = AddressPolicy([f"{HOSTILE}/32", f"{BLOBSTORE}/32"])
TOKEN = "t0ken-for-pull"


class Target:
    """A TCP listener on 127.0.0.1 that never accepts: ``connected()`` says whether any
    connection reached it (it would wait in the backlog)."""

    def __init__(self):
        import socket
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def connected(self) -> bool:
        import select
        return bool(select.select([self.sock], [], [], 0.2)[0])

    def close(self):
        self.sock.close()


class FakeRegistry:
    """A distribution-API registry serving one busybox image as ``busybox:test``, with
    faults switched on by attributes: ``bearer`` (demand a token from ``realm``, default
    its own /token; "basic" demands Basic auth), ``redirect`` ({"blob"|"manifest": URL}),
    ``stall_blob`` (send half the layer, then nothing), ``huge_manifest`` ("length" | "endless"),
    ``wrong_manifest`` / ``wrong_layer`` (other bytes than the digests say)."""

    def __init__(self, host=HOSTILE):
        import http.server
        import socket
        import threading

        from testbed import ocibuild
        from testbed.registry_server import IMAGE_CONFIG, busybox_layer

        layer = busybox_layer()
        self.manifest, self.blobs = ocibuild.image_blobs([layer], cmd=IMAGE_CONFIG["cmd"],
                                                         env=IMAGE_CONFIG["env"])
        self.digest = ocibuild.sha(self.manifest)
        self.layer_digest = ocibuild.sha(layer)
        self.bearer = self.realm = self.stall_blob = self.huge_manifest = None
        self.wrong_manifest = self.wrong_layer = False
        self.redirect = {}
        self.hits = []  # (path, Authorization header)
        self.sent = 0
        self.stop = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def handle(self):
                # the client tries TLS first (tls_verify=False): hang up on a ClientHello
                if self.connection.recv(1, socket.MSG_PEEK) == b"\x16":
                    return
                super().handle()

            def send(self, status, body=b"", headers=()):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                auth = self.headers.get("Authorization")
                outer.hits.append((self.path, auth))
                if self.path.startswith("/token"):
                    from urllib.parse import parse_qs, urlsplit
                    q = parse_qs(urlsplit(self.path).query)
                    ok = q.get("scope") == ["repository:busybox:pull"] and q.get("service") == ["fake"]
                    return self.send(200 if ok else 400, json.dumps({"token": TOKEN}).encode())
                if self.path.startswith("/store/"):  # the blob store: no auth there
                    return self.send(200, outer.blobs[self.path[len("/store/"):]])
                if outer.bearer == "basic" and auth is None:
                    return self.send(401, headers=[("WWW-Authenticate", 'Basic realm="x"')])
                if outer.bearer and auth != f"Bearer {TOKEN}":
                    realm = outer.realm or f"http://{outer.address}/token"
                    return self.send(401, headers=[("WWW-Authenticate",
                                                    f'Bearer realm="{realm}",service="fake"')])
                if self.path == "/v2/":
                    return self.send(200, b"{}")
                if self.path.startswith("/v2/busybox/manifests/"):
                    if "manifest" in outer.redirect:
                        return self.send(307, headers=[("Location", outer.redirect["manifest"])])
                    if outer.huge_manifest == "length":
                        return self.send_big(5 << 20, length=True)
                    if outer.huge_manifest == "endless":
                        return self.send_big(1 << 30, length=False)
                    body = outer.manifest
                    if outer.wrong_manifest:
                        body = body.replace(b'"schemaVersion":2', b'"schemaVersion": 2', 1)
                        body = body if body != outer.manifest else body + b" "
                    return self.send(200, body, [("Content-Type", json.loads(outer.manifest)["mediaType"])])
                if self.path.startswith("/v2/busybox/blobs/"):
                    digest = self.path.rsplit("/", 1)[1]
                    if digest not in outer.blobs:
                        return self.send(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
                    if "blob" in outer.redirect and digest == outer.layer_digest:
                        return self.send(307, headers=[("Location", outer.redirect["blob"] + digest)])
                    body = outer.blobs[digest]
                    if digest == outer.layer_digest and outer.wrong_layer:
                        body = bytes([body[0] ^ 1]) + body[1:]
                    if digest == outer.layer_digest and outer.stall_blob:
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body[:len(body) // 2])
                        self.wfile.flush()
                        outer.stop.wait(60)  # then nothing (bounded: the fixture ends it)
                        return
                    return self.send(200, body)
                self.send(404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}')

            def send_big(self, size, length):
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                if length:
                    self.send_header("Content-Length", str(size))
                self.end_headers()
                chunk = b" " * (1 << 20)
                try:
                    while outer.sent < size and not outer.stop.is_set():
                        self.wfile.write(chunk)
                        outer.sent += len(chunk)
                except OSError:  # the client hung up
                    pass

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.address = f"{host}:{self.server.server_address[1]}"
        self.ref = f"{self.address}/busybox:test"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    servers = []

    def make(host=HOSTILE):
        servers.append(FakeRegistry(host))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


@pytest.fixture
def target():
    t = Target()
    yield t
    t.close()


def _pull(ref, dest, **kw):
    kw.setdefault("policy", HOSTILE_POLICY)
    return pull_to_layout(ref, str(dest), tls_verify=False, **kw)


def test_bearer_token_flow_and_a_blob_redirect_within_the_policy(fake, tmp_path):
    reg, store = fake(), fake(BLOBSTORE)
    reg.bearer = True
    reg.redirect["blob"] = f"http://{store.address}/store/"
    tag = _pull(reg.ref, tmp_path / "layout")
    m = layout_manifest(str(tmp_path / "layout"), tag)
    assert config_of(str(tmp_path / "layout"), m)["config"]["Cmd"] == ["sh"]
    assert any(p.startswith("/token?") for p, _ in reg.hits)  # the anonymous token was fetched
    for path, auth in reg.hits:
        if path.startswith("/v2/busybox/"):  # every repository request but the first carries it
            assert auth in (None, f"Bearer {TOKEN}")
    assert store.hits == [(f"/store/{reg.layer_digest}", None)]  # the token stayed home


@pytest.mark.parametrize("what", ["blob", "manifest"])
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_redirect_to_a_refused_address_is_not_followed(fake, target, tmp_path, what, host):
    reg = fake()
    reg.redirect[what] = f"http://{host}:{target.port}/internal/"
    with pytest.raises(Forbidden, match="loopback.*allow_url_hosts"):
        _pull(reg.ref, tmp_path / "layout")
    assert not target.connected()  # no request, not even a TCP handshake, reached it
    assert not (tmp_path / "layout").exists()


def test_token_realm_at_a_refused_address_is_not_fetched(fake, target, tmp_path):
    reg = fake()
    reg.bearer, reg.realm = True, f"http://127.0.0.1:{target.port}/token"
    with pytest.raises(Forbidden, match="loopback"):
        _pull(reg.ref, tmp_path / "layout")
    assert not target.connected()
    assert not (tmp_path / "layout").exists()


def test_credentials_are_never_sent_and_basic_auth_is_refused(fake, tmp_path):
    reg = fake()
    reg.bearer = "basic"
    with pytest.raises(Forbidden, match="anonymously"):
        _pull(reg.ref, tmp_path / "layout")
    assert all(auth is None for _, auth in reg.hits)


def test_stall_mid_blob_times_out_and_cancel_ends_it_leaving_no_temp_files(fake, tmp_path):
    import threading
    import time
    reg = fake()
    reg.stall_blob = True
    with pytest.raises(Unavailable, match="stalled.*stall_timeout"):
        _pull(reg.ref, tmp_path / "new", stall_timeout=2)
    assert not (tmp_path / "new").exists()
    # into a layout that holds an image already: it stays as it was
    old = tmp_path / "old"
    _pull(fake().ref, old)
    before = sorted(str(p.relative_to(old)) for p in old.rglob("*"))
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        _pull(reg.ref.replace(":test", ":other"), old, cancel=cancel, stall_timeout=600)
    assert time.monotonic() - t0 < 10  # the cancel at 1 s ended it, long before the 600 s stall timeout
    assert sorted(str(p.relative_to(old)) for p in old.rglob("*")) == before


@pytest.mark.parametrize("how", ["length", "endless"])
def test_oversized_manifest_is_refused(fake, tmp_path, how):
    from agent.errors import Unprocessable
    reg = fake()
    reg.huge_manifest = how
    with pytest.raises(Unprocessable, match="4194304 byte limit"):
        _pull(reg.ref, tmp_path / "layout")
    assert not (tmp_path / "layout").exists()
    assert reg.sent < 64 << 20  # reading stopped at the limit (plus socket buffers)


def test_content_that_does_not_match_its_digests_is_refused(fake, tmp_path):
    reg = fake()
    reg.wrong_manifest = True  # the manifest pinned by digest comes back different
    with pytest.raises(InvalidInput, match="digest"):
        _pull(f"{reg.address}/busybox@{reg.digest}", tmp_path / "a")
    reg.wrong_manifest, reg.wrong_layer = False, True
    with pytest.raises(InvalidInput, match="does not match its digest"):
        _pull(reg.ref, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_wrong_digest_at_a_real_registry_is_not_found(oci_registry, busybox_ref, tmp_path):
    name = busybox_ref.rsplit(":", 1)[0]
    with pytest.raises(NotFound):
        pull_to_layout(f"{name}@sha256:{'0' * 64}", str(tmp_path / "l"), tls_verify=False,
                       policy=LOCAL)
    assert not (tmp_path / "l").exists()


def test_tls_verify_refuses_a_plain_http_registry(fake, tmp_path):
    reg = fake()
    with pytest.raises(Unavailable, match="tls_verify=False"):
        pull_to_layout(reg.ref, str(tmp_path / "l"), policy=HOSTILE_POLICY)
    assert reg.hits == []  # nothing went over plain http


def test_cancel_ends_a_pull_still_waiting_to_connect(tmp_path):
    """A registry whose SYNs go unanswered (here: a listener with a full backlog) keeps
    connect() waiting: a cancel still ends the pull within a second."""
    import socket
    import threading
    import time
    lst = socket.socket()
    lst.bind((HOSTILE, 0))
    lst.listen(0)
    fillers = []
    for _ in range(4):  # fill the accept queue: further SYNs are dropped
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(lst.getsockname())
        fillers.append(c)
    time.sleep(0.2)
    try:
        cancel = threading.Event()
        threading.Timer(1.0, cancel.set).start()
        t0 = time.monotonic()
        with pytest.raises(Cancelled):
            _pull(f"{HOSTILE}:{lst.getsockname()[1]}/x:y", tmp_path / "l", cancel=cancel)
        assert time.monotonic() - t0 < 15  # well before the 60 s stall timeout: the cancel ended it
        assert not (tmp_path / "l").exists()
    finally:
        for c in fillers:
            c.close()
        lst.close()
