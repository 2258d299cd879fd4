"""Serve the API: one process, an asyncio HTTP/1.1 server (agent/httpserver.py) in front of
the Flask app; never Flask's dev server.

The app and its services are built here, where the operation pool starts and crash
recovery runs. SIGTERM (or SIGINT) stops taking work (``services.stop()``), takes no new
connection, ends event streams and lets requests in flight finish for up to
httpserver.GRACE_SECONDS; VMs and containers keep running (they are not children of the
agent), and the next start re-adopts them.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl

from agent import sdnotify
from agent.config import Config
from agent.errors import InvalidInput, Unavailable

log = logging.getLogger(__name__)
LISTEN_BACKLOG = 1024  # connections the kernel queues before the loop accepts them
FD_RESERVE = 1024  # descriptors kept for the agent's own work (state DB, images, runtimes) beside connections
MALLOC_ARENAS = 1  # Python threads hold the GIL anyway: a shared arena costs no measurable speed
M_ARENA_MAX = -8  # glibc's mallopt() parameter number (malloc.h)


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas before any thread starts (glibc fixes the cap when a thread
    first contends: `agent serve` calls this first). By default glibc gives
    threads that contend for the heap arenas of their own, up to 8 per core, and each keeps
    its freed memory: under a create storm (20 operation threads, the HTTP pool) the agent's
    RSS tripled (bench/scale.py, 200-250 containers: 425 MB by default, 151 MB with 2 arenas,
    125 MB with 1) for no speed it could measure. $MALLOC_ARENA_MAX, when set, wins. False where this is not glibc."""
    import ctypes
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        return ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas) == 1
    except (OSError, AttributeError):  # another libc: no mallopt
        return False


def trim_malloc() -> None:
    """Give the heap's free pages back to the kernel (glibc's malloc_trim): a storm's
    transient allocations otherwise stay in the agent's RSS (bench/scale.py: about 10 MB
    with 1000 containers). Called once the workloads are re-adopted and whenever the last
    operation in flight ends; a few ms. Nothing where this is not glibc."""
    import ctypes
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fit_connections(api):
    """Raise the soft open-files limit as far as the hard one allows and keep
    ``api.max_connections`` below it by FD_RESERVE: clients holding every descriptor would
    otherwise make the agent's own file opens fail (EMFILE), not just new connections."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = api.max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < want:
        fit = max(16, soft - FD_RESERVE)
        log.warning("open-files limit too low for api.max_connections: connections capped",
                    extra={"nofile": soft, "max_connections": api.max_connections, "capped_to": fit})
        api = api.model_copy(update={"max_connections": fit,
                                     "max_connections_per_client": min(api.max_connections_per_client, fit)})
    return api


def listen(address: str) -> socket.socket:
    """A listening socket on HOST:PORT (an IPv6 host may be bracketed)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise InvalidInput(f"api.listen {address!r}: cannot resolve {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise Unavailable(f"cannot listen on {address}: {e.strerror}: stop what uses it or change api.listen") from None
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def ssl_context(api) -> ssl.SSLContext | None:
    """TLS from api.tls_cert/tls_key; with api.client_ca, clients must present a cert signed by it."""
    if not api.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(api.tls_cert, api.tls_key)
        if api.client_ca:
            ctx.load_verify_locations(api.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise InvalidInput(f"api TLS files (tls_cert {api.tls_cert}, tls_key {api.tls_key}, client_ca "
                           f"{api.client_ca}) cannot be loaded: {e}") from None
    return ctx


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _child_forgets_stop_handlers() -> None:
    """In a child forked from the agent without exec (pyroute2 forks to enter a netns, then
    stops it with SIGTERM): the stop signals get their defaults back and stop writing to the
    event loop's wakeup fd, which the child shares with the agent; else a SIGTERM sent to the
    child reaches the agent's loop as if the agent had got it, and the agent stops."""
    signal.set_wakeup_fd(-1)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


class AgentServer:
    def __init__(self, config: Config, app_factory):
        self._config = config
        self._factory = app_factory

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT."""
        from agent.api import ROUTES
        from agent.httpserver import HttpServer

        notify_socket = sdnotify.take_socket()  # before any child (runc) could inherit it
        api = fit_connections(self._config.api)
        tls = ssl_context(api)
        sock = listen(api.listen)
        app = self._factory(self._config)
        services = app.config["SERVICES"]
        # the socket listens: the API answers reads while the workloads are re-adopted
        def adopted():
            sdnotify.notify(notify_socket, f"READY=1\nMAINPID={os.getpid()}")
            trim_malloc()
        services.operations.on_idle = trim_malloc
        services.start(readopt_in_background=True, on_adopted=adopted)
        server = HttpServer(app, api, frozenset(r.endpoint for r in ROUTES if r.long), tls)

        async def main():
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            os.register_at_fork(after_in_child=_child_forgets_stop_handlers)
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, stop.set)
            log.info("nodeagent serving", extra={"listen": api.listen, "tls": bool(api.tls_cert)})
            task = loop.create_task(server.serve(sock, stop))
            await stop.wait()
            sdnotify.notify(notify_socket, "STOPPING=1")
            log.info("nodeagent stopping: workloads keep running")
            services.stop()  # cancels queued work; running work stops at its next phase boundary
            await task

        asyncio.run(main())
        log.info("nodeagent stopped")
