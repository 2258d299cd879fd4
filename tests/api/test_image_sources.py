"""Hostile image sources against a real agent (issue 14): host files outside the import
dirs, URLs and registries that lead to the host's own services (SSRF), endless and
trickling bodies, a registry that accepts TCP and never answers, a full pool, and the
leftovers of a killed import.

The agent allows only 127.0.0.2 (where this test's hostile servers listen); its "admin
service" on 127.0.0.1 stands for what an attacker wants to reach. The small pool is a
16 MiB tmpfs this test mounts (and unmounts).
"""
from __future__ import annotations

import http.server
import os
import socket
import subprocess
import threading
import time

import pytest

from testbed.agentproc import AgentProcess, Api
from tests.api.conftest import assert_error

HOSTILE = "127.0.0.2"  # the one address the agent may fetch from
MAX_IMAGE = 32 << 20  # [images] max_image_bytes
SMALL_POOL = "16m"  # the tmpfs pool: smaller than MAX_IMAGE, so free space binds there
STALL = 3  # [images] stall_timeout, seconds


class _Servers:
    """The hostile HTTP server (on HOSTILE) and the "admin service" (on 127.0.0.1)."""

    def __init__(self):
        self.stop = threading.Event()
        self.sent = {}  # path -> bytes the hostile server wrote
        self.admin_hits = []
        outer = self

        class Admin(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.admin_hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "6")
                self.end_headers()
                self.wfile.write(b"secret")

            def log_message(self, *a):
                pass

        class Hostile(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # no Content-Length: the body ends when we close

            def do_GET(self):
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.1:{outer.admin_port}/secret")
                    self.end_headers()
                    return
                if self.path == "/huge-length":
                    self.send_response(200)
                    self.send_header("Content-Length", str(1 << 40))
                    self.end_headers()
                    return
                self.send_response(200)
                self.end_headers()
                sent, deadline = 0, time.monotonic() + 120  # bounded: every loop ends
                chunk = b"\0" * (1 << 20)
                try:
                    while not outer.stop.is_set() and time.monotonic() < deadline:
                        if self.path == "/endless":
                            self.wfile.write(chunk)
                            sent += len(chunk)
                        else:  # /trickle: one byte a second
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            sent += 1
                            outer.stop.wait(1)
                        outer.sent[self.path] = sent
                except OSError:  # the agent hung up
                    pass

            def log_message(self, *a):
                pass

        self.admin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Admin)
        self.admin_port = self.admin.server_address[1]
        self.hostile = http.server.ThreadingHTTPServer((HOSTILE, 0), Hostile)
        self.hostile.daemon_threads = True
        self.url = f"http://{HOSTILE}:{self.hostile.server_address[1]}"
        # a registry that accepts TCP connections and never answers
        self.silent = socket.socket()
        self.silent.bind((HOSTILE, 0))
        self.silent.listen(64)
        self.silent_registry = f"{HOSTILE}:{self.silent.getsockname()[1]}"
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True)
                        for s in (self.admin, self.hostile)]
        for t in self.threads:
            t.start()

    def close(self):
        self.stop.set()
        for s in (self.admin, self.hostile):
            s.shutdown()
            s.server_close()
        self.silent.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    small = root / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_POOL},mode=0755", "nodeagent-test-small",
                    str(small)], check=True)
    imports = root / "import"
    imports.mkdir()
    servers = _Servers()
    agent = AgentProcess(root / "agent", pool_kind="local", import_dirs=[imports],
                         allow_url_hosts=[f"{HOSTILE}/32"],
                         images_extra=f"max_image_bytes = {MAX_IMAGE}\nstall_timeout = {STALL}\ngc_interval = 0\n",
                         extra_config=f'[pools.small]\nkind = "local"\npath = "{small}"\n')
    agent.admin_token = agent.token("admin", "admin")
    agent.start()
    try:
        yield {"agent": agent, "api": Api(agent.url, agent.admin_token), "imports": imports, "small": small,
               "servers": servers, "root": root}
    finally:
        agent.stop()
        servers.close()
        subprocess.run(["umount", str(small)], check=True)


def _qcow2(path, size="16M"):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return str(path)


def _import(api, body, timeout=60):
    r = api.post("/v1/images", json=body)
    assert r.status_code == 202, r.text
    return api.wait(r.json(), timeout=timeout)


def _wait_phase(api, op_id, phase, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        op = api.get(f"/v1/operations/{op_id}").json()
        if op["status"] == "running" and op["progress"]["phase"] == phase:
            return op
        time.sleep(0.05)
    raise AssertionError(f"operation never reached phase {phase}: {op}")


def _tmp_files(agent):
    return sorted(p.name for p in (agent.state_dir / "cache" / "tmp").iterdir())


def _names(api):
    return {i["name"] for i in api.get("/v1/images").json()["images"]}


# ------------------------------------------------------------------ case 7: host files

def test_host_files_outside_the_import_dirs_are_refused(env):
    api, imports = env["api"], env["imports"]
    err = assert_error(api.post("/v1/images", json={"name": "shadow", "format": "raw",
                                                    "source": {"type": "file", "path": "/etc/shadow"}}),
                       403, "forbidden")
    assert "import directories" in err["message"] and str(imports) in err["message"]
    link = imports / "innocent.raw"  # a symlink inside the import dir to a host file
    link.symlink_to("/etc/shadow")
    err = assert_error(api.post("/v1/images", json={"name": "shadow", "format": "raw",
                                                    "source": {"type": "file", "path": str(link)}}),
                       403, "forbidden")
    assert "resolves to /etc/shadow" in err["message"]
    dots = f"{imports}/../../../../../etc/shadow"
    assert_error(api.post("/v1/images", json={"name": "shadow", "format": "raw",
                                              "source": {"type": "file", "path": dots}}), 403, "forbidden")
    assert "shadow" not in _names(api)
    op = _import(api, {"name": "inside", "source": {"type": "file", "path": _qcow2(imports / "ok.qcow2")}})
    assert op["status"] == "succeeded", op


# ------------------------------------------------------------------ case 7: SSRF

def test_urls_to_the_hosts_own_services_are_refused(env):
    api, srv, agent = env["api"], env["servers"], env["agent"]
    for url in (f"http://127.0.0.1:{srv.admin_port}/secret",       # loopback
                f"http://localhost:{srv.admin_port}/secret",        # a name for it
                f"http://[::ffff:127.0.0.1]:{srv.admin_port}/secret",  # IPv4-mapped
                f"http://0.0.0.0:{srv.admin_port}/secret",          # unspecified: the host itself
                f"http://127.0.0.1:{agent.port}/v1/health",         # the agent itself
                "http://169.254.169.254/latest/meta-data/",         # link-local metadata service
                f"{srv.url}/redirect"):                              # an allowed host redirecting there
        op = _import(api, {"name": "ssrf", "source": {"type": "url", "url": url}})
        assert op["status"] == "failed" and op["error"]["code"] == "forbidden", (url, op)
        assert "allow_url_hosts" in op["error"]["message"], op
    assert srv.admin_hits == []  # nothing ever reached the admin service
    assert "ssrf" not in _names(api) and _tmp_files(agent) == []


def test_registry_on_the_hosts_loopback_is_refused(env):
    op = _import(env["api"], {"name": "reg", "source": {"type": "registry", "tls_verify": False,
                                                        "reference": f"127.0.0.1:{env['servers'].admin_port}/x:y"}})
    assert op["status"] == "failed" and op["error"]["code"] == "forbidden", op
    assert env["servers"].admin_hits == []


# ------------------------------------------------------------------ case 5: size caps

def test_endless_body_stops_at_the_configured_max(env):
    api, srv, agent = env["api"], env["servers"], env["agent"]
    op = _import(api, {"name": "endless", "source": {"type": "url", "url": f"{srv.url}/endless"}})
    assert op["status"] == "failed" and op["error"]["code"] == "unprocessable", op
    assert "max_image_bytes" in op["error"]["message"]
    assert _tmp_files(agent) == [] and "endless" not in _names(api)
    op = _import(api, {"name": "endless", "source": {"type": "url", "url": f"{srv.url}/huge-length"}})
    assert op["status"] == "failed" and op["error"]["code"] == "unprocessable", op


def test_endless_body_into_a_small_pool_is_507_naming_the_pool(env):
    api, srv, agent = env["api"], env["servers"], env["agent"]
    op = _import(api, {"name": "endless", "pool": "small", "source": {"type": "url", "url": f"{srv.url}/endless"}})
    assert op["status"] == "failed" and op["error"]["code"] == "insufficient_resources", op
    assert "pool small" in op["error"]["message"] and "free space" in op["error"]["message"]
    # writing stopped at once: the server could not push much past the pool's 16 MiB (socket buffers)
    assert srv.sent["/endless"] < MAX_IMAGE + (64 << 20)
    assert _tmp_files(agent) == []


# ------------------------------------------------------------------ case 6: hung sources

def _cancel_within_a_second(api, op_id):
    t0 = time.monotonic()
    r = api.delete(f"/v1/operations/{op_id}")
    assert r.status_code == 200, r.text
    op = api.wait(r.json(), timeout=10)
    assert op["status"] == "cancelled", op
    assert time.monotonic() - t0 < 10  # long before the stall timeout (within a second on a quiet host: bench)
    return op


def test_trickling_url_cancels_at_once_and_stalls_out(env):
    api, srv, agent = env["api"], env["servers"], env["agent"]
    op = api.post("/v1/images", json={"name": "trickle", "source": {"type": "url", "url": f"{srv.url}/trickle"}}).json()
    _wait_phase(api, op["id"], "download")
    time.sleep(1.5)  # a byte or two arrived: the download is under way
    _cancel_within_a_second(api, op["id"])
    assert _tmp_files(agent) == []
    # left alone, it fails after stall_timeout seconds of (almost) nothing
    t0 = time.monotonic()
    op = _import(api, {"name": "trickle", "source": {"type": "url", "url": f"{srv.url}/trickle?2"}})
    assert op["status"] == "failed" and "stalled" in op["error"]["message"], op
    assert "stall_timeout" in op["error"]["message"] and time.monotonic() - t0 < 60
    assert _tmp_files(agent) == [] and "trickle" not in _names(api)


def _pending(listener) -> bool:
    """Whether a connection waits on ``listener`` (the silent registry never accepts)."""
    import select
    return bool(select.select([listener], [], [], 0)[0])


def _all_hung_up(listener) -> bool:
    """Accept every connection waiting on ``listener``: True if the agent closed each one
    (it reads to EOF, or was reset) instead of leaving it hanging."""
    while _pending(listener):
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            try:
                while conn.recv(65536):
                    pass
            except ConnectionResetError:
                pass
            except socket.timeout:
                return False
    return True


def test_hung_registry_cancels_at_once_and_hangs_up(env):
    api, srv = env["api"], env["servers"]
    body = {"name": "hung", "source": {"type": "registry", "reference": f"{srv.silent_registry}/x:y",
                                       "tls_verify": False}}
    op = api.post("/v1/images", json=body).json()
    _wait_phase(api, op["id"], "pull")
    deadline = time.monotonic() + 10
    while not _pending(srv.silent) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _pending(srv.silent), api.get(f"/v1/operations/{op['id']}").json()["error"]
    _cancel_within_a_second(api, op["id"])
    assert _all_hung_up(srv.silent)  # the pull's connection was shut down, not left hanging
    op = _import(api, body)  # left alone: the stall timeout ends it
    assert op["status"] == "failed" and "stalled" in op["error"]["message"], op
    assert _all_hung_up(srv.silent)
    assert list((env["agent"].state_dir / "cache" / "pulls").iterdir()) == []


# ------------------------------------------------------------------ case 12: a full pool

def test_full_pool_is_507_naming_the_pool_and_leaves_nothing(env):
    api, small, imports = env["api"], env["small"], env["imports"]
    op = _import(api, {"name": "small-vm", "pool": "small", "source": {"type": "file",
                                                                       "path": _qcow2(imports / "small.qcow2")}})
    assert op["status"] == "succeeded", op
    filler = small / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the tmpfs to the last block
        for block in (1 << 20, 4096):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError:
                pass
    try:
        before = sorted(os.listdir(small / "volumes")) + sorted(os.listdir(small / "blobs" / "sha256"))
        raw = imports / "fill.raw"
        raw.write_bytes(b"\1" * (1 << 20))
        op = _import(api, {"name": "nospace", "pool": "small", "format": "raw",
                           "source": {"type": "file", "path": str(raw)}})
        assert op["status"] == "failed" and op["error"]["code"] == "insufficient_resources", op
        assert "pool small" in op["error"]["message"] and "another pool" in op["error"]["message"]
        r = api.post("/v1/instances", json={"name": "full", "kind": "vm", "image": "small-vm", "pool": "small",
                                            "memory_mib": 64, "network": "none"})
        assert r.status_code == 202, r.text
        op = api.wait(r.json())
        assert op["status"] == "failed" and op["error"]["code"] == "insufficient_resources", op
        assert "pool small" in op["error"]["message"]
        after = sorted(os.listdir(small / "volumes")) + sorted(os.listdir(small / "blobs" / "sha256"))
        assert after == before  # no volume, record, .json.tmp or blob temp left
        assert api.get("/v1/instances/full").status_code == 404
    finally:
        filler.unlink()
    op = api.wait(api.post("/v1/instances", json={"name": "full", "kind": "vm", "image": "small-vm",
                                                  "pool": "small", "memory_mib": 64, "network": "none"}).json())
    assert op["status"] == "succeeded", op  # with space again, the same request works
    assert api.delete("/v1/instances/full").status_code in (200, 202)


# ------------------------------------------------------------------ case 10: gc

def test_gc_on_demand_frees_deleted_images(env):
    api, imports, agent = env["api"], env["imports"], env["agent"]
    raw = imports / "gc.raw"
    raw.write_bytes(b"G" * (3 << 20))
    op = _import(api, {"name": "gc-me", "format": "raw", "source": {"type": "file", "path": str(raw)}})
    assert op["status"] == "succeeded", op
    blob = agent.state_dir / "pool" / "blobs" / "sha256" / op["result"]["image"]["id"]
    assert blob.exists()
    assert api.delete("/v1/images/gc-me").json() == {"deleted": True}
    r = api.post("/v1/images/gc", json={})
    assert r.status_code == 202, r.text
    op = api.wait(r.json())
    assert op["status"] == "succeeded" and op["kind"] == "image.gc", op
    assert op["result"]["blobs_removed"] >= 1 and op["result"]["bytes_freed"] >= 3 << 20, op
    assert not blob.exists()
    assert "/v1/images/gc" in api.get("/v1/openapi.json").json()["paths"]
    out = agent.cli("image", "gc", env={"NODEAGENT_URL": agent.url, "NODEAGENT_TOKEN": agent.admin_token})
    assert out.stdout.startswith("freed ")


def test_kill9_mid_import_leaves_no_temp_files_after_restart(tmp_path):
    """A killed import's pool temp blob and URL temp file are swept when the agent starts."""
    imports = tmp_path / "import"
    imports.mkdir()
    servers = _Servers()
    agent = AgentProcess(tmp_path / "a", pool_kind="local", import_dirs=[imports],
                         allow_url_hosts=[f"{HOSTILE}/32"], images_extra="stall_timeout = 600\n",
                         env={"NODEAGENT_SLOW_PHASE": "image.import:bytes=60"})
    agent.admin_token = agent.token("admin", "admin")
    agent.start()
    api = Api(agent.url, agent.admin_token)
    pool_tmp = lambda: [p.name for p in (agent.state_dir / "pool" / "blobs" / "sha256").iterdir()  # noqa: E731
                        if p.name.startswith(".tmp-")]
    try:
        raw = imports / "big.raw"
        raw.write_bytes(b"K" * (16 << 20))
        op = api.post("/v1/images", json={"name": "killed", "format": "raw",
                                          "source": {"type": "file", "path": str(raw)}}).json()
        url = api.post("/v1/images", json={"name": "killed-url", "source": {
            "type": "url", "url": f"{servers.url}/trickle"}}).json()
        deadline = time.monotonic() + 30
        while not (pool_tmp() and _tmp_files(agent)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pool_tmp() and _tmp_files(agent), "the imports never got under way"
        agent.kill9()
        agent.env.pop("NODEAGENT_SLOW_PHASE")
        agent.start()
        for o in (op, url):
            assert api.get(f"/v1/operations/{o['id']}").json()["error"]["code"] == "agent_restarted"
        deadline = time.monotonic() + 30  # the first gc runs in the background at start
        while (pool_tmp() or _tmp_files(agent)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pool_tmp() == [] and _tmp_files(agent) == []
    finally:
        assert agent.stop() == 0
        servers.close()
