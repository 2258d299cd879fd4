"""storage.sources: import paths, the address policy, the watchdog, and downloads."""
from __future__ import annotations

import http.server
import io
import os
import socket
import threading
import time

import pytest

from agent import config
from agent.errors import Cancelled, Forbidden, InsufficientResources, Unavailable, Unprocessable
from storage.local import LocalBackend
from storage.sources import AddressPolicy, Cap, Watchdog, check_import_path, download


def test_import_paths_resolve_symlinks_and_dots(tmp_path):
    imports = tmp_path / "import"
    imports.mkdir()
    (imports / "ok.qcow2").write_bytes(b"x")
    assert check_import_path(str(imports / "ok.qcow2"), [str(imports)]) == str(imports / "ok.qcow2")
    (imports / "evil").symlink_to("/etc/shadow")
    (imports / "evildir").symlink_to("/etc")
    for bad in (str(imports / "evil"), str(imports / "evildir" / "shadow"), f"{imports}/../../etc/passwd",
                "/etc/shadow", str(tmp_path / "import-sibling" / "x")):
        with pytest.raises(Forbidden, match="import_dirs"):
            check_import_path(bad, [str(imports)])
    with pytest.raises(Forbidden, match="none configured"):
        check_import_path(str(imports / "ok.qcow2"), [])


@pytest.mark.parametrize("address, why", [
    ("127.0.0.1", "loopback"), ("127.9.9.9", "loopback"), ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"), ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"),
    ("::", "unspecified"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("255.255.255.255", "reserved"),
    ("192.0.2.77", "this host"),
])
def test_refused_addresses(address, why):
    policy = AddressPolicy(own_addresses=lambda: {"192.0.2.77"})
    assert why in policy.refusal(address)
    plain = address.removeprefix("::ffff:")  # an IPv4-mapped address is its IPv4 address
    assert AddressPolicy([plain + ("/128" if ":" in plain else "/32")],
                         own_addresses=lambda: {"192.0.2.77"}).refusal(address) is None


def test_public_and_private_addresses_pass():
    policy = AddressPolicy(own_addresses=set)
    for address in ("198.51.100.7", "10.1.2.3", "2001:db8::1"):
        assert policy.refusal(address) is None


def test_host_addresses_include_loopback_and_interfaces():
    from storage.sources import host_addresses
    own = host_addresses()
    assert "127.0.0.1" in own and len(own) >= 2


def test_config_defaults_and_validation(tmp_path):
    cfg = config.parse({"state_dir": str(tmp_path)})
    assert cfg.import_dirs == [str(tmp_path / "import")] and cfg.images.allow_url_hosts == []
    cfg = config.parse({"images": {"import_dirs": ["/srv/images"], "allow_url_hosts": ["10.0.0.0/8", "127.0.0.1"]}})
    assert cfg.import_dirs == ["/srv/images"]
    from agent.errors import InvalidInput
    with pytest.raises(InvalidInput, match="absolute"):
        config.parse({"images": {"import_dirs": ["rel"]}})
    with pytest.raises(InvalidInput, match="CIDR"):
        config.parse({"images": {"allow_url_hosts": ["not-a-net"]}})


def test_watchdog_cancel_and_stall_unblock_a_blocked_call():
    a, b = socket.socketpair()
    try:
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        t0 = time.monotonic()
        with pytest.raises(Cancelled):
            with Watchdog("read", cancel=cancel, stall_timeout=60) as wd:
                wd.abort_with(lambda: a.shutdown(socket.SHUT_RDWR))
                a.recv(1)  # blocks until the watchdog shuts the socket down
                wd.check()
        assert time.monotonic() - t0 < 10  # not the 60 s stall timeout: the cancel unblocked it
    finally:
        a.close()
        b.close()
    a, b = socket.socketpair()
    try:
        with pytest.raises(Unavailable, match="stalled"):
            with Watchdog("read", cancel=None, stall_timeout=0.5) as wd:
                wd.abort_with(lambda: a.shutdown(socket.SHUT_RDWR))
                a.recv(1)
                wd.check()
    finally:
        a.close()
        b.close()


@pytest.fixture
def server():
    """127.0.0.1 HTTP server: /data (1 MiB), /hop (302 to /data), /loop (302 to itself)."""
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path in ("/hop", "/loop"):
                self.send_response(302)
                self.send_header("Location", "/data" if self.path == "/hop" else "/loop")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 20))
            self.end_headers()
            self.wfile.write(b"d" * (1 << 20))

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_download_follows_redirects_within_the_policy_and_caps(server):
    local = AddressPolicy(["127.0.0.1/32"])
    out = io.BytesIO()
    digest, n = download(f"{server}/hop", out, policy=local, cap=Cap(2 << 20), stall_timeout=10)
    assert n == 1 << 20 and len(out.getvalue()) == n
    with pytest.raises(Forbidden, match="loopback"):
        download(f"{server}/data", io.BytesIO(), policy=AddressPolicy(), cap=Cap(2 << 20), stall_timeout=10)
    with pytest.raises(Unprocessable, match="max_image_bytes"):
        download(f"{server}/data", io.BytesIO(), policy=local, cap=Cap(1000), stall_timeout=10)
    with pytest.raises(InsufficientResources, match="pool p has only 1000 bytes free"):
        download(f"{server}/data", io.BytesIO(), policy=local, cap=Cap(2 << 20, [(1000, "pool p")]),
                 stall_timeout=10)
    with pytest.raises(Exception, match="redirects"):
        download(f"{server}/loop", io.BytesIO(), policy=local, cap=Cap(2 << 20), stall_timeout=10)


def test_local_pool_sweeps_only_old_unused_temp_files(tmp_path):
    pool = LocalBackend("p", str(tmp_path / "pool"))
    old = os.path.join(pool.blob_dir, ".tmp-old")
    rec = os.path.join(pool.volume_dir, ".v.json.tmp")
    young = os.path.join(pool.blob_dir, ".tmp-young")
    for p in (old, rec, young):
        with open(p, "wb") as f:
            f.write(b"x" * 10)
    start = time.time()
    os.utime(old, (start - 100, start - 100))
    os.utime(rec, (start - 100, start - 100))
    assert pool.sweep_temp(start - 50) == (2, 20)
    assert not os.path.exists(old) and not os.path.exists(rec) and os.path.exists(young)


def test_a_transfer_that_cannot_be_unblocked_still_ends_on_cancel_and_on_stall(tmp_path):
    """An S3 GET that hangs inside the client library: the import ends at once anyway."""
    from storage import sources

    hang = threading.Event()
    try:
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        t = time.monotonic()
        with pytest.raises(Cancelled):
            sources.watched("object x", hang.wait, cancel=cancel, stall_timeout=60, probe=lambda: 0)
        assert time.monotonic() - t < 1.5
        t = time.monotonic()
        with pytest.raises(Unavailable, match="stalled"):
            sources.watched("object x", hang.wait, cancel=None, stall_timeout=0.5, probe=lambda: 0)
        assert time.monotonic() - t < 2
    finally:
        hang.set()
    assert sources.watched("object x", lambda: 42, cancel=None, stall_timeout=5, probe=lambda: 0) == 42
    with pytest.raises(ValueError):
        sources.watched("object x", lambda: int("x"), cancel=None, stall_timeout=5, probe=lambda: 0)
