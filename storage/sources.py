"""Where images come from: the trust boundary for image sources.

An image source is untrusted input (an admin token is not root on the host): a host path
may name any file, a URL any address, and a remote end may send forever or nothing at
all. This module holds the checks every import path shares:

- ``check_import_path``: a host path must resolve (symlinks followed) to a place under
  one of the configured import directories.
- ``AddressPolicy``: which addresses a URL or registry may reach. Loopback, link-local
  (cloud metadata services), unspecified, multicast, reserved and this host's own
  addresses are refused unless a configured network (``[images] allow_url_hosts``)
  holds them. The check is made on the address actually connected to (``connect``
  resolves, checks and connects to the checked address: no DNS rebinding), on every
  redirect hop.
- ``Watchdog``: a transfer that waits on the outside is aborted within a second of a
  cancel, and after ``stall_timeout`` seconds without progress, by a callback that
  unblocks it (shut a socket down, kill a subprocess by PID).
- ``open_url``: one request through all of the above, redirects followed hop by hop;
  the registry client (storage.registry) makes all its requests with it.
- ``download``: an http(s) GET to an open file under all of the above, with a byte cap.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Callable, Iterable
from urllib.parse import urljoin, urlsplit

from agent.errors import (AgentError, Cancelled, Forbidden, InsufficientResources, InvalidInput,
                          Unavailable, Unprocessable)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10  # seconds to open a TCP connection to a source
READ_CHUNK = 1024 * 1024  # 1 MiB: the most one read returns
MAX_REDIRECTS = 5  # as curl's default is 50, browsers' about 20: images need one or two
STALL_BYTES = 64 * 1024  # "progress" is at least this much more in a stall window
WATCH_INTERVAL = 0.2  # seconds between watchdog looks: a cancel takes effect well within 1 s

# Refused unless allowed: where a request from this host reaches the host itself, its
# link (metadata services on 169.254.169.254), or no single peer.
REFUSED_NETWORKS = {
    "loopback": ("127.0.0.0/8", "::1/128"),
    "unspecified": ("0.0.0.0/8", "::/128"),  # 0.x.y.z connects to this host on Linux
    "link-local": ("169.254.0.0/16", "fe80::/10"),
    "multicast": ("224.0.0.0/4", "ff00::/8"),
    "reserved": ("240.0.0.0/4",),  # includes the broadcast address 255.255.255.255
}
_REFUSED = [(kind, ipaddress.ip_network(n)) for kind, nets in REFUSED_NETWORKS.items()
            for n in nets]


# ---------------------------------------------------------------------- host paths

def check_import_path(path: str, import_dirs: Iterable[str]) -> str:
    """The real path of ``path`` (symlinks resolved) if it lies under one of
    ``import_dirs``; Forbidden otherwise, saying where to put the file."""
    dirs = [os.path.realpath(d) for d in import_dirs]
    if not os.path.isabs(path):
        raise InvalidInput(f"source.path {path!r} must be an absolute path on the agent's host")
    real = os.path.realpath(path)
    for d in dirs:
        if real == d or real.startswith(d.rstrip("/") + "/"):
            return real
    shown = ", ".join(dirs) or "none configured"
    via = f" (it resolves to {real})" if real != os.path.normpath(path) else ""
    raise Forbidden(f"source.path {path}{via} is outside the import directories ({shown}): "
                    "copy or move the image into one of them, or add its directory to "
                    "[images] import_dirs in the agent's config")


# ---------------------------------------------------------------------- addresses

class AddressPolicy:
    """Which remote addresses an image source may reach (see the module docstring)."""

    def __init__(self, allow: Iterable[str] = (), *,
                 own_addresses: Callable[[], set[str]] | None = None):
        self.allow = [ipaddress.ip_network(a, strict=False) for a in allow]
        self._own = own_addresses or host_addresses

    def refusal(self, address: str, own: set[str] | None = None) -> str | None:
        """Why ``address`` is refused ("a loopback address"), or None if it may be used."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in n for n in self.allow):
            return None
        for kind, net in _REFUSED:
            if ip.version == net.version and ip in net:
                return f"a {kind} address"
        if str(ip) in (self._own() if own is None else own):
            return "an address of this host"
        return None

    def _refused(self, what: str, host: str, address: str, why: str) -> Forbidden:
        shown = address if address == host else f"{host} ({address})"
        return Forbidden(f"{what}: {shown} is {why}; image sources may not reach the agent's "
                         "own host or internal addresses. An operator can allow a network with "
                         f"[images] allow_url_hosts = [\"{address}/32\"] in the agent's config")

    def resolve(self, host: str, port: int, what: str) -> list[tuple]:
        """getaddrinfo results for ``host`` that the policy allows; Forbidden if it
        resolves only to refused addresses, Unavailable if it does not resolve."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise Unavailable(f"{what}: cannot resolve {host}: {e.strerror}; check the name "
                              "and the host's DNS") from None
        own = self._own()
        ok, refused = [], None
        for info in infos:
            why = self.refusal(info[4][0], own)
            if why is None:
                ok.append(info)
            elif refused is None:
                refused = self._refused(what, host, info[4][0], why)
        if not ok:
            raise refused
        return ok

    def connect(self, host: str, port: int, what: str, timeout: float,
                check: Callable[[], None] | None = None) -> socket.socket:
        """A TCP connection to an allowed address of ``host``: resolved, checked, and
        connected to that very address. ``check`` is called every WATCH_INTERVAL while a
        connect waits (a blackholed address) and may raise to abort it (a cancel)."""
        last: OSError | None = None
        for family, kind, proto, _, addr in self.resolve(host, port, what):
            s = socket.socket(family, kind, proto)
            try:
                _connect(s, addr, timeout, check)
                return s
            except OSError as e:
                s.close()
                last = e
            except BaseException:
                s.close()
                raise
        raise Unavailable(f"{what}: cannot connect to {host}:{port}: "
                          f"{getattr(last, 'strerror', None) or last}; check the URL and the network")


def _connect(s: socket.socket, addr, timeout: float, check: Callable[[], None] | None) -> None:
    """``s.connect(addr)`` within ``timeout`` seconds, calling ``check`` as it waits."""
    deadline = time.monotonic() + timeout
    s.setblocking(False)
    err = s.connect_ex(addr)
    while err in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
        if check is not None:
            check()
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "connection timed out")
        if select.select([], [s], [], min(left, WATCH_INTERVAL))[1]:
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            break
    if err:
        raise OSError(err, os.strerror(err))
    s.setblocking(True)


def host_addresses() -> set[str]:
    """Every address of this host's interfaces (netlink), and what its name resolves to."""
    out: set[str] = set()
    try:
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            for a in ipr.get_addr():
                for key in ("IFA_ADDRESS", "IFA_LOCAL"):
                    if a.get(key):
                        out.add(str(ipaddress.ip_address(a.get(key).split("%", 1)[0])))
    except Exception as e:  # no netlink: the named networks above still hold
        log.warning("cannot list this host's addresses", extra={"error": str(e)})
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            out.add(info[4][0])
    except OSError:
        pass
    return out


# ---------------------------------------------------------------------- watchdog

class Watchdog:
    """Aborts a transfer on cancel or when it stalls. Use as a context manager around the
    transfer; call ``alive(total_bytes)`` as bytes arrive (or give ``probe``, polled for
    a byte count), and ``abort_with(fn)`` to say how to unblock it (shut a socket down,
    kill a subprocess). On exit, an aborted transfer raises Cancelled or Unavailable (a
    stall), whatever the unblocked call raised; ``check()`` raises them inside the loop."""

    def __init__(self, what: str, *, cancel: threading.Event | None, stall_timeout: float,
                 probe: Callable[[], int] | None = None):
        self.what, self.cancel, self.stall_timeout, self.probe = what, cancel, stall_timeout, probe
        self.reason: str | None = None  # "cancelled" | "stalled"
        self._aborts: list[Callable[[], None]] = []
        self._mark, self._mark_at = 0, time.monotonic()
        self._done = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def abort_with(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self.reason is None:
                self._aborts.append(fn)
                return
        fn()  # already aborted: unblock this one at once too

    def alive(self, done: int) -> None:
        self._done = done

    def __enter__(self) -> "Watchdog":
        self._thread = threading.Thread(target=self._watch, name="source-watchdog", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL):
            if self.probe is not None:
                try:
                    self._done = self.probe()
                except OSError:
                    pass
            now = time.monotonic()
            if self._done - self._mark >= STALL_BYTES:
                self._mark, self._mark_at = self._done, now
            if self.cancel is not None and self.cancel.is_set():
                self._abort("cancelled")
            elif now - self._mark_at > self.stall_timeout:
                self._abort("stalled")
            if self.reason:
                return

    def _abort(self, reason: str) -> None:
        with self._lock:
            self.reason = reason
            aborts, self._aborts = self._aborts, []
        for fn in aborts:
            try:
                fn()
            except Exception as e:  # already closed or exited: nothing to unblock
                log.debug("watchdog abort", extra={"error": str(e)})

    def error(self) -> AgentError | None:
        if self.reason == "cancelled":
            return Cancelled("operation cancelled by request")
        if self.reason == "stalled":
            return Unavailable(f"{self.what}: the source stalled (under {STALL_BYTES // 1024} KiB "
                               f"in {self.stall_timeout:g} s): check it and retry, or raise "
                               "[images] stall_timeout for a slow link")
        return None

    def check(self) -> None:
        err = self.error()
        if err is not None:
            raise err

    def __exit__(self, et, e, tb) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        err = self.error()
        if err is not None and not isinstance(e, Cancelled):
            raise err from None
        return False


def watched(what: str, fn: Callable[[], Any], *, cancel: threading.Event | None, stall_timeout: float,
            probe: Callable[[], int]) -> Any:
    """Run a blocking transfer ``fn`` that cannot be unblocked from outside (a client
    library's read) on a thread of its own, under a Watchdog polling ``probe`` for bytes:
    on cancel or a stall the caller gets Cancelled/Unavailable at once, and the abandoned
    transfer ends at its own client's read timeout (its partial file is a temp file, swept
    by gc)."""
    done = threading.Event()
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e
        finally:
            done.set()

    with Watchdog(what, cancel=cancel, stall_timeout=stall_timeout, probe=probe) as wd:
        wd.abort_with(done.set)
        threading.Thread(target=run, name="source-transfer", daemon=True).start()
        done.wait()
        wd.check()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def tree_bytes(path: str) -> int:
    """Bytes under ``path`` (files only, links not followed; vanishing files skipped): what a
    pull has written so far, or what removing a dir frees."""
    total = 0
    for root, _, files in os.walk(path):
        for n in files:
            try:
                total += os.lstat(os.path.join(root, n)).st_size
            except OSError:
                pass
    return total


# ---------------------------------------------------------------------- downloads

class TLSFailed(Unavailable):
    """Raised when the TLS handshake with a source fails (no TLS there, or a certificate
    that does not verify)."""


class Cap:
    """The most bytes a download may write: ``max_bytes`` (configured: Unprocessable past
    it) and the free space where it goes (``space``: [(bytes free, what)], the smallest
    binding: InsufficientResources naming it)."""

    def __init__(self, max_bytes: int, space: list[tuple[int, str]] = ()):
        self.max_bytes = max_bytes
        self.space = sorted((s for s in space if s[0] is not None), key=lambda s: s[0])

    @property
    def limit(self) -> int:
        return min([self.max_bytes] + [s for s, _ in self.space])

    def error(self, what: str, size: int | None) -> AgentError:
        got = f"is {size} bytes" if size is not None else f"is over {self.limit} bytes"
        if self.space and self.space[0][0] < self.max_bytes:
            free, where = self.space[0]
            return InsufficientResources(
                f"{what} {got} but {where} has only {free} bytes free: free space there "
                "(delete unused images, `nodeagent image gc`) or import into another pool")
        return Unprocessable(f"{what} {got}, over the agent's limit of {self.max_bytes} bytes "
                             "([images] max_image_bytes)")


def download(url: str, out, *, policy: AddressPolicy, cap: Cap, stall_timeout: float,
             cancel: threading.Event | None = None,
             progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """GET the http(s) ``url`` into the open binary file ``out``; return (sha256 hex,
    bytes). Every hop (up to MAX_REDIRECTS) is checked against ``policy``; writing stops
    before ``cap`` is passed; a cancel or a stall aborts it (see Watchdog)."""
    h, done = hashlib.sha256(), 0
    with Watchdog(f"GET {url}", cancel=cancel, stall_timeout=stall_timeout) as wd:
        with open_url(url, policy=policy, wd=wd, read_timeout=stall_timeout) as (final, r):
            what = f"GET {final}" + (" (redirected)" if final != url else "")
            if r.status != 200:
                raise InvalidInput(f"{what} returned HTTP {r.status}; check the URL")
            length = content_length(r)
            if length is not None and length > cap.limit:
                raise cap.error(f"the image at {final}", length)
            for chunk in read_chunks(r, wd, what):
                if done + len(chunk) > cap.limit:
                    raise cap.error(f"the image at {final}", length)
                h.update(chunk)
                _write_all(out, chunk)
                done += len(chunk)
                wd.alive(done)
                if progress:
                    progress(done)
            if length is not None and done != length:
                raise Unavailable(f"{what}: got {done} of {length} bytes; retry")
            return h.hexdigest(), done


@contextlib.contextmanager
def open_url(url: str, *, policy: AddressPolicy, wd: Watchdog, read_timeout: float,
             method: str = "GET", headers: dict[str, str] | None = None,
             schemes: tuple[str, ...] = ("http", "https"), tls_verify: bool = True):
    """Send ``method`` to ``url`` and follow redirects (up to MAX_REDIRECTS, each hop's
    address checked against ``policy`` and connected to as checked, its scheme one of
    ``schemes``); yield (final url, urllib3 response) of the first answer that is not a
    redirect, whatever its status, its body unread. ``headers`` go to the first origin
    only: an Authorization never follows a redirect to another host or port. The
    response's socket is shut down by ``wd`` on a cancel or a stall; on exit it is closed."""
    import urllib3

    first = _origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInput(f"URL {url!r} must be http:// or https:// with a host")
        if parts.scheme not in schemes:
            raise Forbidden(f"{method} {url}: a {parts.scheme}:// URL where only "
                            f"{'/'.join(schemes)} may be used (no downgrade from https)")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise InvalidInput(f"URL {url!r} has an invalid port") from None
        pool = _pool(parts.scheme, parts.hostname, port, policy, wd, read_timeout, tls_verify)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        send = {"Accept-Encoding": "identity", "User-Agent": "nodeagent"}
        if _origin(url) == first:
            send.update(headers or {})
        try:
            r = pool.urlopen(method, path, redirect=False, retries=False, preload_content=False,
                             assert_same_host=False, headers=send)
        except urllib3.exceptions.HTTPError as e:
            _close_pool(pool)
            wd.check()
            if isinstance(e, urllib3.exceptions.SSLError) or isinstance(
                    getattr(e, "reason", None), urllib3.exceptions.SSLError):
                raise TLSFailed(f"{method} {url}: TLS failed: {e}") from None
            raise Unavailable(f"{method} {url} failed: {e}; check the URL and the network") from None
        except BaseException:  # refused by the policy, unreachable
            _close_pool(pool)
            raise
        try:
            if r.status in (301, 302, 303, 307, 308) and r.headers.get("Location"):
                url = urljoin(url, r.headers["Location"])
                continue
            yield url, r
            return
        finally:
            r.release_conn()
            _close_pool(pool)
    raise InvalidInput(f"{url}: more than {MAX_REDIRECTS} redirects; give the final URL")


def _origin(url: str) -> tuple:
    p = urlsplit(url)
    try:
        return p.scheme, (p.hostname or "").lower(), p.port
    except ValueError:
        return p.scheme, (p.hostname or "").lower(), None


def content_length(r) -> int | None:
    """A response's Content-Length, None if absent or not a number."""
    length = r.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def read_chunks(r, wd: Watchdog, what: str):
    """The body of the urllib3 response ``r`` in chunks of at most READ_CHUNK bytes;
    Cancelled/Unavailable when ``wd`` aborted it (a shut-down socket reads as a clean end),
    Unavailable when the connection breaks."""
    import urllib3

    done = 0
    while True:
        try:
            chunk = r.read1(READ_CHUNK)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            wd.check()
            raise Unavailable(f"{what}: the transfer broke off after {done} bytes: {e}; "
                              "retry") from None
        wd.check()
        if not chunk:
            return
        done += len(chunk)
        yield chunk


def _write_all(out, chunk: bytes) -> None:
    try:
        out.write(chunk)
    except OSError as e:
        if e.errno in (28, 122):  # ENOSPC, EDQUOT
            raise InsufficientResources(
                f"no space left for the download in {getattr(out, 'name', 'the temp dir')}: "
                "free space on the agent's state dir filesystem") from None
        raise


def _pool(scheme: str, host: str, port: int, policy: AddressPolicy, wd: Watchdog,
          read_timeout: float, tls_verify: bool = True):
    """A one-connection urllib3 pool whose connections go through ``policy.connect`` and
    whose sockets the watchdog can shut down."""
    import urllib3
    from urllib3.connection import HTTPConnection, HTTPSConnection

    base = HTTPSConnection if scheme == "https" else HTTPConnection
    ctls: list[socket.socket] = []

    class Guarded(base):
        def _new_conn(self) -> socket.socket:
            sock = policy.connect(self._dns_host, self.port, f"GET {scheme}://{host}:{port}",
                                  CONNECT_TIMEOUT, check=wd.check)
            sock.settimeout(read_timeout)
            # TLS wraps (and detaches) ``sock``, and http.client closes it when the
            # response takes the connection over: the watchdog shuts the connection down
            # through a dup of it, closed by close_pool
            ctl = sock.dup()
            ctls.append(ctl)

            def shut() -> None:
                try:
                    ctl.shutdown(socket.SHUT_RDWR)
                except OSError:  # closed already
                    pass
            wd.abort_with(shut)
            return sock

    cls = urllib3.HTTPSConnectionPool if scheme == "https" else urllib3.HTTPConnectionPool
    timeout = urllib3.Timeout(connect=CONNECT_TIMEOUT, read=read_timeout + 1)
    extra = {} if scheme == "http" or tls_verify else {"cert_reqs": "CERT_NONE",
                                                       "assert_hostname": False}
    pool = cls(host, port, maxsize=1, timeout=timeout, retries=False, **extra)
    pool.ConnectionCls = Guarded
    pool.nodeagent_ctls = ctls
    return pool


def _close_pool(pool) -> None:
    """Close ``pool`` (from _pool) and the watchdog's handles on its connections."""
    pool.close()
    for ctl in pool.nodeagent_ctls:
        ctl.close()
