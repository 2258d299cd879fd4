"""An asyncio HTTP/1.1 server (h11) for the WSGI app, where no client holds a thread it does
not use.

Terms: the *loop* does all socket I/O (TLS included) for every connection. A *short* request
runs the app in the request pool (``api.threads`` threads) once its head and its whole body
(at most ``max_body_bytes``) are in, and the loop writes its answer. A *long* request (a
route declared ``long``: event streams, long polls, peer transfers) runs on a thread of its
own, bounded per client and in all; its body is pulled from the loop as the app reads it
and its response goes to the loop chunk by chunk through a small bounded queue, so a client
that stops reading stalls only its own stream. The app learns that a long request's client
left (or that the server stops) from ``environ["nodeagent.gone"]``, a threading.Event.

Deadlines and limits (``ApiConfig``): a request's head must arrive within header_timeout of
its first byte (of the connect, for a connection's first request and its TLS handshake); a
connection idles at most keepalive_timeout between requests; a whole body must arrive within
body_timeout, and a streamed one may stall no longer than that; a client that reads nothing
for write_timeout is dropped. A connection beyond max_connections, or beyond
max_connections_per_client from one address, is closed at once: it never waits in front of
the others. A head over MAX_HEAD_BYTES gets 431, a body over max_body_bytes 413.

Every request gets a request id (a client's valid ``X-Request-Id``, else a new one), handed
to the app as ``environ["nodeagent.request_id"]`` and returned as ``X-Request-Id`` on every
answer, the server's own errors included; when it ends, one access log line (logger
``agent.access``, INFO) gives its method, path (query values redacted but for
LOGGED_QUERY_KEYS), status, duration, bytes sent, client address, caller (token or
certificate name and role, as the app authenticated it) and request id. With client
certificates (``api.client_ca``) the certificate's subject CN and SAN DNS names are handed
to the app as ``environ["nodeagent.client_cert"]``.

Websockets (RFC 6455) are long requests too: a GET to a long route with ``Upgrade: websocket``
finds a ``WebSocket`` in ``environ["nodeagent.websocket"]``; the app authenticates and checks
the request as any other and, to accept, sets ``ws.session`` (a function of the WebSocket) and
answers 101 (agent.api.websocket does both); any other answer is sent as a plain HTTP answer
(a 401, 403, 404 ...). After the 101 the loop frames messages (wsproto): ``session(ws)`` runs
on the request's thread and calls ``ws.recv()`` / ``ws.send()``; its messages go out through
the same bounded queue as a stream's chunks (a client that stops reading stalls its own
session, and is dropped after write_timeout), and what the client sends waits in a bounded
inbox (WS_INBOX messages of at most WS_MAX_MESSAGE bytes; while it is full the loop reads no
more from that client). Client pings are answered; a client silent for ws_ping_interval gets
a ping and, silent as long again, is dropped. When the session returns the loop sends its
close code (1011 if it raised) and ends the connection; a session counts against the
stream caps like any long request.

Lifecycle: ``HttpServer(app, api, long_endpoints)``; ``await serve(sock, stop)`` until
``stop`` is set; then it takes no connection, closes idle ones, ends long requests (their
``gone`` is set), lets short ones finish for up to GRACE_SECONDS and returns.
"""
from __future__ import annotations

import asyncio
import email.utils
import io
import json
import logging
import queue
import socket
import ssl
import sys
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future
from urllib.parse import unquote_to_bytes

import h11
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage
from wsproto.utilities import ProtocolError as WsProtocolError
from wsproto.utilities import generate_accept_token

from agent import log as agent_log
from agent.config import ApiConfig

log = logging.getLogger(__name__)
access_log = logging.getLogger("agent.access")

READ_CHUNK = 64 * 1024  # bytes asked of a socket per read
MAX_HEAD_BYTES = 64 * 1024  # request line and headers; larger gets 431
BODY_PULL_BYTES = 1024 * 1024  # most bytes of a streamed body handed to the app per trip to the loop
STREAM_QUEUE = 8  # response chunks a long request may have queued for the loop before it waits
GRACE_SECONDS = 10  # after stop, how long requests in flight may take to finish
REFUSED_LOG_INTERVAL = 10  # seconds between warnings about refused connections
# unsent bytes the kernel holds per connection (in flight is not limited): without it a client
# that never reads has the agent render answers until 4 MiB of socket buffer are full
NOTSENT_LOWAT = 128 * 1024
LOGGED_PATH_CHARS = 512  # a longer path is cut in the access log
_ACCESS_LINE = 0  # the access line's CODE_LINE (it has no caller worth naming)
WS_INBOX = 16  # client messages a websocket session may leave unread before the loop stops reading
WS_MAX_MESSAGE = 1024 * 1024  # bytes of one client message (terminal input, a control message); more: close 1009
WS_CLOSE_WAIT = 2.0  # seconds to wait for the client's answer to our close frame
LOGGED_QUERY_KEYS = frozenset({"timeout", "tail", "type", "status", "limit"})  # values shown; others redacted


class _Gone(Exception):
    """The connection closed (or the server stops): stop producing for it."""


class DaemonPool(Executor):
    """A fixed pool of daemon threads. Unlike ThreadPoolExecutor (whose threads are joined at
    exit) a request stuck in a driver call cannot keep the process alive past its grace period."""

    def __init__(self, threads: int, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(threads):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        f: Future = Future()
        self._jobs.put((f, fn, args, kwargs))
        return f

    def _work(self) -> None:
        while True:
            f, fn, args, kwargs = self._jobs.get()
            if not f.set_running_or_notify_cancel():
                continue
            try:
                f.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the awaiting connection
                f.set_exception(e)


class WebSocketClosed(_Gone):
    """The websocket is closed (by the client, a timeout or the server stopping): stop sending."""


class WebSocket:
    """A websocket as its session's thread sees it. The app accepts the upgrade by setting
    ``session`` (and ``subprotocol``, one of ``protocols``, if the client offered any) and
    answering 101; ``session(ws)`` then runs on the request's thread. ``recv`` returns the
    client's next message (str for a text message, bytes for a binary one) or None once the
    connection is closed; ``send`` raises WebSocketClosed then; ``close`` sets the code the
    server sends when the session returns."""

    def __init__(self, key: str, protocols: list[str]):
        self.key, self.protocols = key, protocols
        self.session = None
        self.subprotocol: str | None = None
        self.close_code, self.close_reason = 1000, ""
        self.closed = threading.Event()  # the connection is closed (client, timeout, server stop)
        self._inbox: queue.Queue = queue.Queue()
        self._out: _Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._room: asyncio.Event | None = None

    # -- the session's thread --
    def recv(self, timeout: float | None = None) -> str | bytes | None:
        """The next message; None once closed; TimeoutError after ``timeout`` seconds."""
        if self.closed.is_set() and self._inbox.empty():
            return None
        try:
            msg = self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no websocket message") from None
        if msg is None:
            self._inbox.put(None)  # every later recv sees the end too
            return None
        if self._room is not None and not self._room.is_set():
            try:
                self._loop.call_soon_threadsafe(self._room.set)
            except RuntimeError:
                pass
        return msg

    def send(self, data: str | bytes) -> None:
        if self._out is None or self.closed.is_set():
            raise WebSocketClosed()
        try:
            self._out.put(("ws", data))
        except _Gone:
            raise WebSocketClosed() from None

    def close(self, code: int = 1000, reason: str = "") -> None:
        """The close code and reason (at most 120 bytes) sent when the session returns."""
        self.close_code, self.close_reason = code, reason.encode()[:120].decode(errors="ignore")

    def abort(self) -> None:
        """From any thread: drop the connection now; a ``send`` blocked on a client that does
        not read raises WebSocketClosed."""
        self._end()
        if self._out is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._out.close)
            except RuntimeError:  # the loop is gone
                pass

    # -- the loop --
    def _deliver(self, msg) -> bool:
        """Hand a client message to the session; False if the inbox is now full."""
        self._inbox.put(msg)
        if self._inbox.qsize() >= WS_INBOX:
            self._room.clear()
            return False
        return True

    def _end(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self._inbox.put(None)


def websocket_request(req: h11.Request) -> WebSocket | None:
    """A WebSocket for a GET asking to upgrade (RFC 6455 4.2.1); None for any other request."""
    if req.method != b"GET":
        return None
    h = {}
    for name, value in req.headers:
        h[name] = h[name] + b"," + value if name in h else value
    if (h.get(b"upgrade", b"").lower() != b"websocket"
            or b"upgrade" not in [t.strip() for t in h.get(b"connection", b"").lower().split(b",")]
            or h.get(b"sec-websocket-version") != b"13" or not h.get(b"sec-websocket-key")):
        return None
    protocols = [p.strip().decode("latin-1") for p in h.get(b"sec-websocket-protocol", b"").split(b",") if p.strip()]
    return WebSocket(h[b"sec-websocket-key"].decode("latin-1"), protocols)


class _Channel:
    """A long request's response items ("head", "data", "end"), from its thread to the loop;
    at most STREAM_QUEUE wait, then the thread blocks until the loop has written some."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop, self._items = loop, deque()
        self._cond = threading.Condition()
        self._ready = asyncio.Event()
        self.closed = False

    def put(self, item) -> None:
        """From the thread; raises _Gone once the connection is closed."""
        with self._cond:
            while len(self._items) >= STREAM_QUEUE and not self.closed:
                self._cond.wait()
            if self.closed:
                raise _Gone()
            self._items.append(item)
            wake = len(self._items) == 1
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the loop is gone
                raise _Gone() from None

    async def get(self):
        while True:
            with self._cond:
                if self._items:
                    item = self._items.popleft()
                    self._cond.notify()
                    return item
                if self.closed:
                    raise _Gone()
                self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        """From the loop: the thread's next put raises _Gone, and so does get once empty."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self._ready.set()


class _BodyReader(io.RawIOBase):
    """wsgi.input of a long request: each read pulls the next piece of the body from the loop
    (nothing is read from the socket before the app asks, so an unauthenticated sender is
    answered without its body being read). A stall past body_timeout raises 408."""

    def __init__(self, conn: "_Connection"):
        self._conn, self._buf, self._eof = conn, b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        from werkzeug.exceptions import ClientDisconnected, RequestTimeout
        if not self._buf and not self._eof:
            fut = asyncio.run_coroutine_threadsafe(self._conn.pull_body(max(len(b), BODY_PULL_BYTES)),
                                                   self._conn.loop)
            try:
                self._buf = fut.result(self._conn.api.body_timeout + 5)
            except TimeoutError:
                raise RequestTimeout(f"the request body stalled for more than {self._conn.api.body_timeout:g} s "
                                     "(api.body_timeout)") from None
            except h11.RemoteProtocolError as e:
                raise ClientDisconnected(f"malformed request body: {e}") from None
            except Exception:  # _Gone, a reset, the loop stopped
                raise ClientDisconnected("the client closed the connection during the request body") from None
            self._eof = not self._buf
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        return n


class HttpServer:
    def __init__(self, app, api: ApiConfig, long_endpoints: frozenset[str], ssl_context=None):
        self.app, self.api, self.ssl = app, api, ssl_context
        self.long_endpoints = long_endpoints
        self._adapter = app.url_map.bind("localhost")
        self.pool = DaemonPool(api.threads, "api")
        self.conns: set[_Connection] = set()
        self._per_client: dict[str, int] = {}
        self._streams_lock = threading.Lock()
        self._streams: dict[str, int] = {}  # long requests (their threads) per client address
        self.stopping = False
        self._refused, self._refused_logged = 0, 0.0
        self._date, self._date_at = b"", 0

    # -- lifecycle --
    async def serve(self, sock: socket.socket, stop: asyncio.Event) -> None:
        self.loop = asyncio.get_running_loop()
        self.server_name, self.server_port = sock.getsockname()[:2]
        accept = self.loop.create_task(self._accept(sock))
        await stop.wait()
        self.stopping = True
        accept.cancel()
        sock.close()
        for c in list(self.conns):
            c.stop()
        tasks = [c.task for c in self.conns if c.task]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=GRACE_SECONDS)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1)

    async def _accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                sock, addr = await self.loop.sock_accept(lsock)
            except OSError as e:  # EMFILE and friends: let the open connections go on
                log.warning("accept failed", extra={"error": str(e)})
                await asyncio.sleep(0.1)
                continue
            client = addr[0]
            if (len(self.conns) >= self.api.max_connections
                    or self._per_client.get(client, 0) >= self.api.max_connections_per_client):
                self._refuse(sock, client)
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
            except OSError:
                pass  # not Linux: the caps still bound what one client takes
            conn = _Connection(self, sock, client, addr[1])
            self.conns.add(conn)
            self._per_client[client] = self._per_client.get(client, 0) + 1
            conn.task = self.loop.create_task(conn.run())

    def _refuse(self, sock: socket.socket, client: str) -> None:
        """Over a cap: closed at once (a plain-HTTP client first gets a 503 if its buffer takes it)."""
        if self.ssl is None:
            try:
                sock.setblocking(False)
                sock.send(_error_bytes(503, "unavailable", "too many connections open (api.max_connections, "
                                                           "api.max_connections_per_client): close some and retry"))
            except OSError:
                pass
        sock.close()
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= REFUSED_LOG_INTERVAL:
            log.warning("connections refused: over the connection caps",
                        extra={"client": client, "refused": self._refused, "open": len(self.conns),
                               "max_connections": self.api.max_connections,
                               "max_connections_per_client": self.api.max_connections_per_client})
            self._refused, self._refused_logged = 0, now

    def forget(self, conn: "_Connection") -> None:
        self.conns.discard(conn)
        n = self._per_client.get(conn.client, 1) - 1
        if n:
            self._per_client[conn.client] = n
        else:
            self._per_client.pop(conn.client, None)

    # -- long requests: counted from their thread's start to its end --
    def take_stream(self, client: str) -> str | None:
        """None if a long request may start (and counts it); else why not."""
        with self._streams_lock:
            if sum(self._streams.values()) >= self.api.max_streams:
                return f"too many long requests (streams, waits) open: at most {self.api.max_streams} (api.max_streams)"
            if self._streams.get(client, 0) >= self.api.max_streams_per_client:
                return (f"too many long requests (streams, waits) open from {client}: at most "
                        f"{self.api.max_streams_per_client} (api.max_streams_per_client); close some and retry")
            self._streams[client] = self._streams.get(client, 0) + 1
            return None

    def _release_stream(self, client: str) -> None:
        with self._streams_lock:
            n = self._streams.get(client, 1) - 1
            if n:
                self._streams[client] = n
            else:
                self._streams.pop(client, None)

    # -- the app, on pool and stream threads --
    def endpoint(self, path: str, method: str) -> str | None:
        try:
            return self._adapter.match(path, method)[0]
        except Exception:  # 404, 405, redirects: the app answers them as short requests
            return None

    def call_short(self, environ: dict):
        """Run the app for a short request; (status, headers, body bytes)."""
        box = []
        result = self.app(environ, lambda status, headers, exc_info=None: box.extend((status, headers)))
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close:
                close()
        return box[0], box[1], body

    def run_long(self, environ: dict, out: _Channel, client: str) -> None:
        """A long request's thread: the app's response goes to ``out`` chunk by chunk."""
        box = []
        try:
            result = self.app(environ, lambda status, headers, exc_info=None: box.extend((status, headers)))
            ws = environ.get("nodeagent.websocket")
            if ws is not None and ws.session is not None and box[0].startswith("101"):
                close = getattr(result, "close", None)
                if close:
                    close()
                self._run_session(ws, out, environ)
                return
            try:
                started = False
                for chunk in result:
                    if chunk:
                        if not started:
                            out.put(("head", box))
                            started = True
                        out.put(("data", chunk))
                if not started:
                    out.put(("head", box))
                out.put(("end", None))
            finally:
                close = getattr(result, "close", None)
                if close:
                    close()
        except _Gone:
            pass
        except Exception:
            log.exception("streamed response failed", extra={"path": environ.get("PATH_INFO")})
            try:
                out.put(("fail", None))
            except _Gone:
                pass
        finally:
            self._release_stream(client)

    def _run_session(self, ws: WebSocket, out: _Channel, environ: dict) -> None:
        """A websocket session, on its request's thread, after the app accepted it."""
        ws._out = out
        out.put(("upgrade", None))
        try:
            ws.session(ws)
        except _Gone:
            raise
        except Exception:
            log.exception("websocket session failed", extra={"path": environ.get("PATH_INFO")})
            ws.close(1011, "internal error: the agent log has the details")
        out.put(("wsend", (ws.close_code, ws.close_reason)))

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._date_at:
            self._date, self._date_at = email.utils.formatdate(now, usegmt=True).encode(), now
        return self._date


def _error_body(status: int, code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()


def _error_bytes(status: int, code: str, message: str, request_id: str | None = None) -> bytes:
    """A whole raw response, for when h11 can no longer frame one (before or after a bad head)."""
    body = _error_body(status, code, message)
    reason = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
              431: "Request Header Fields Too Large", 503: "Service Unavailable"}.get(status, "Error")
    rid = f"X-Request-Id: {request_id}\r\n" if request_id else ""
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{rid}Connection: close\r\n\r\n").encode() + body


def logged_path(environ: dict) -> str:
    """The path for the access log: cut at LOGGED_PATH_CHARS, query values redacted unless
    their key is in LOGGED_QUERY_KEYS (a query may carry what should not be logged)."""
    path = environ.get("PATH_INFO", "")[:LOGGED_PATH_CHARS]
    query = environ.get("QUERY_STRING", "")
    if not query:
        return path
    parts = []
    for item in query.split("&")[:20]:
        key, eq, _ = item.partition("=")
        parts.append(item[:64] if key in LOGGED_QUERY_KEYS else f"{key[:64]}{eq and '=<redacted>'}")
    return f"{path}?{'&'.join(parts)}"


def _peer_identity(tls) -> dict | None:
    """The verified client certificate's subject CN and SAN DNS names (None without one)."""
    try:
        cert = tls.peer_cert() if tls is not None else None
    except (ValueError, ssl.SSLError):
        cert = None
    if not cert:
        return None
    cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), None)
    dns = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
    return {"cn": cn, "dns": dns}


def _send_now(sock: socket.socket, chunks: list) -> list:
    """Send what the non-blocking ``sock`` takes now (one sendmsg per try, no copies); the
    chunks, or parts of them, left unsent."""
    views = [memoryview(c) for c in chunks if c]
    while views:
        try:
            sent = sock.sendmsg(views)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break  # the loop's write meets the same error and ends the connection
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views:
            views[0] = views[0][sent:]
            break  # a short send: the socket is full, the loop waits for room
    return views


class _Connection:
    """One client connection, served by one task on the loop."""

    def __init__(self, server: HttpServer, sock: socket.socket, client: str, port: int):
        self.server, self.api, self.loop = server, server.api, server.loop
        self.sock, self.client, self.port = sock, client, port
        self.task: asyncio.Task | None = None
        self.state = "idle"  # idle (between requests) | busy | long
        self.gone = threading.Event()  # the current long request's client left, or the server stops
        self.closed = False
        self.writer: asyncio.StreamWriter | None = None
        self.tls: _Tls | None = None
        self.client_cert: dict | None = None  # the verified client certificate's names
        self.ws: WebSocket | None = None  # the websocket this connection carries, once accepted

    def stop(self) -> None:
        """The server stops: an idle connection closes now, a long request ends (a websocket's
        session ends and its client hears 1001), a short one finishes."""
        self.gone.set()
        if self.ws is not None:
            self.ws.close(1001, "the agent is stopping")
            self.ws._end()
        if self.state == "idle" and self.task:
            self.task.cancel()

    async def run(self) -> None:
        try:
            reader = asyncio.StreamReader(limit=2 * READ_CHUNK)
            proto = asyncio.StreamReaderProtocol(reader)
            transport, _ = await self.loop.connect_accepted_socket(lambda: proto, self.sock)
            self.reader, self.writer = reader, asyncio.StreamWriter(transport, proto, reader, self.loop)
            if self.server.ssl is not None:
                self.tls = _Tls(self, self.server.ssl)
                await self.tls.handshake(self.loop.time() + self.api.header_timeout)
                self.client_cert = _peer_identity(self.tls)
            await self._serve()
        except (OSError, EOFError, TimeoutError, ssl.SSLError, _Gone, asyncio.CancelledError):
            pass  # the client left, timed out or was cut: nothing to answer
        except Exception:
            log.exception("connection failed", extra={"client": self.client})
        finally:
            self.closed = True
            self.gone.set()
            self._close()
            self.server.forget(self)

    def _close(self) -> None:
        if self.writer is None:
            self.sock.close()
            return
        if self.tls is not None:
            self.tls.close_notify()
        transport = self.writer.transport
        if transport.get_write_buffer_size():
            transport.close()  # flushes what the client still reads, but no longer than write_timeout
            self.loop.call_later(self.api.write_timeout, transport.abort)
        else:
            transport.close()

    def _write(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.write(data)
        else:
            self.writer.write(data)

    async def _read(self, deadline: float, size: int = READ_CHUNK) -> bytes:
        """Up to ``size`` bytes of the request stream (b"" at its end); TimeoutError at ``deadline``."""
        async with asyncio.timeout_at(deadline):
            if self.tls is not None:
                return await self.tls.read()
            return await self.reader.read(size)

    async def _event(self, conn: h11.Connection, deadline: float):
        while True:
            ev = conn.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            conn.receive_data(await self._read(deadline))

    async def _drain(self) -> None:
        async with asyncio.timeout(self.api.write_timeout):
            await self.writer.drain()

    async def _serve(self) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        first = True
        while not self.server.stopping:
            self.state = "idle"
            if not conn.trailing_data[0]:  # else a pipelined request is already here
                wait = self.api.header_timeout if first else self.api.keepalive_timeout
                data = await self._read(self.loop.time() + wait)
                if not data:
                    return
                conn.receive_data(data)
            try:
                req = await self._event(conn, self.loop.time() + self.api.header_timeout)
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint
                message = ("request head too large: at most 64 KiB" if status == 431
                           else f"malformed request: {e}")
                rid = agent_log.new_request_id()
                self._write(_error_bytes(status, "too_large" if status == 431 else "invalid", message, rid))
                await self._drain()
                self._access({"REQUEST_METHOD": "-", "REMOTE_ADDR": self.client, "nodeagent.request_id": rid,
                              "nodeagent.status": status}, self.loop.time())
                return
            if isinstance(req, h11.ConnectionClosed):
                return
            self.state = "busy"
            t0 = self.loop.time()
            environ = self._environ(req)
            endpoint = self.server.endpoint(environ["PATH_INFO"], environ["REQUEST_METHOD"])
            try:
                if endpoint in self.server.long_endpoints:
                    self.state = "long"
                    await self._long(conn, req, environ)
                else:
                    await self._short(conn, req, environ)
            finally:  # also when the client left mid-answer
                self._access(environ, t0)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
            first = False

    def _environ(self, req: h11.Request) -> dict:
        path, _, query = req.target.partition(b"?")
        env = {
            "REQUEST_METHOD": req.method.decode("ascii"),
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": query.decode("latin-1"),
            "SERVER_NAME": self.server.server_name,
            "SERVER_PORT": str(self.server.server_port),
            "SERVER_PROTOCOL": "HTTP/" + req.http_version.decode("ascii"),
            "REMOTE_ADDR": self.client,
            "REMOTE_PORT": str(self.port),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https" if self.server.ssl else "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,  # wsgi.input ends with the body (chunked bodies included)
            "nodeagent.client_cert": self.client_cert,
        }
        request_id = None
        for name, value in req.headers:  # h11 gives lower-case names
            if name == b"content-type":
                env["CONTENT_TYPE"] = value.decode("latin-1")
            elif name == b"content-length":
                env["CONTENT_LENGTH"] = value.decode("latin-1")
            elif name == b"transfer-encoding":
                continue  # the server decodes the chunks: the app reads a plain body
            elif name == b"x-request-id":
                request_id = value.decode("latin-1")
                continue
            elif b"_" not in name:  # X_Token would pose as X-Token: dropped, as gunicorn does
                key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
                env[key] = env[key] + "," + value.decode("latin-1") if key in env else value.decode("latin-1")
        env["nodeagent.request_id"] = env["HTTP_X_REQUEST_ID"] = agent_log.request_id_from(request_id)
        return env

    def _access(self, environ: dict, t0: float) -> None:
        """The access log line of a request that ended (status 0: cut before an answer)."""
        if not self.api.access_log:
            return
        if not access_log.isEnabledFor(logging.INFO):
            return
        caller = environ.get("nodeagent.caller") or {}
        # the record is made here, not by access_log.info(): that walks the stack for the
        # caller's file and line on the loop, a fifth of the line's cost, to find this line
        record = access_log.makeRecord(access_log.name, logging.INFO, __file__, _ACCESS_LINE, "request", (), None,
                                       "_access", {
            "method": environ.get("REQUEST_METHOD", "-"), "path": logged_path(environ),
            "status": environ.get("nodeagent.status", 0),
            "duration_ms": round((self.loop.time() - t0) * 1000, 1), "bytes": environ.get("nodeagent.sent", 0),
            "client": environ.get("REMOTE_ADDR", self.client), "caller": caller.get("name"),
            "role": caller.get("role"), "auth": caller.get("via"),
            "request_id": environ.get("nodeagent.request_id")})
        access_log.handle(record)

    # -- short requests: whole body in, app in the pool, whole answer out --
    async def _short(self, conn: h11.Connection, req: h11.Request, environ: dict) -> None:
        body = await self._body(conn, environ)
        if body is None:
            environ["nodeagent.status"] = 408
            return
        environ["wsgi.input"] = io.BytesIO(body)
        if body:
            environ["CONTENT_LENGTH"] = str(len(body))  # a chunked body's length, now known
        direct = self.tls is None and not self.writer.transport.get_write_buffer_size()
        rest = await self.loop.run_in_executor(self.server.pool, self._answer, conn, req, environ, direct)
        for chunk in rest:
            self._write(chunk)
        await self._drain()

    def _answer(self, conn: h11.Connection, req: h11.Request, environ: dict, direct: bool) -> list:
        """On a pool thread (the connection's task waits for it, so ``conn`` is ours): the app's
        answer as the bytes to send. With ``direct`` (plain TCP, nothing queued on the transport)
        as much as the socket takes now is sent from here, so the kernel's copy of a large answer
        runs beside the loop instead of on it; the rest is returned for the loop to write."""
        try:
            status, headers, data = self.server.call_short(environ)
        except Exception:
            log.exception("request failed", extra={"path": environ["PATH_INFO"]})
            status, headers = "500 Internal Server Error", [("Content-Type", "application/json")]
            data = _error_body(500, "internal", "internal error: the agent log has the details")
        if not any(k.lower() == "content-length" for k, _ in headers):
            headers = [*headers, ("Content-Length", str(len(data)))]
        chunks = [self._head(conn, status, headers, environ)]
        environ["nodeagent.status"] = int(status[:3])
        if data and req.method != b"HEAD":
            chunks += conn.send_with_data_passthrough(h11.Data(data=data))
            environ["nodeagent.sent"] = len(data)
        chunks.append(conn.send(h11.EndOfMessage()))
        return _send_now(self.sock, chunks) if direct else chunks

    async def _body(self, conn: h11.Connection, environ: dict) -> bytes | None:
        """The whole body, read by the loop within body_timeout; past max_body_bytes reading
        stops (the app answers 413). None: the client was too slow (408 sent)."""
        limit = self.api.max_body_bytes
        declared = environ.get("CONTENT_LENGTH")
        if declared and declared.isdigit() and int(declared) > limit:
            return b""  # the app refuses it (413) from the header alone; the body stays unread
        if conn.they_are_waiting_for_100_continue:
            self._write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        parts, n = [], 0
        deadline = self.loop.time() + self.api.body_timeout
        while True:
            try:
                ev = await self._event(conn, deadline)
            except TimeoutError:
                self._write(_error_bytes(408, "invalid", f"the request body took longer than "
                                                               f"{self.api.body_timeout:g} s (api.body_timeout)",
                                         environ.get("nodeagent.request_id")))
                await self._drain()
                return None
            if isinstance(ev, h11.Data):
                parts.append(ev.data)
                n += len(ev.data)
                if n > limit:  # the app refuses it (413) from the length; the rest stays unread
                    environ["CONTENT_LENGTH"] = str(n)
                    return b""
            elif isinstance(ev, h11.EndOfMessage):
                return b"".join(parts)
            else:
                raise _Gone()

    def _head(self, conn: h11.Connection, status: str, headers: list, environ: dict) -> bytes:
        h = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        h.append((b"date", self.server.date()))
        rid = environ.get("nodeagent.request_id")
        if rid and not any(k.lower() == b"x-request-id" for k, _ in h):  # the app sets it; not a crash's 500
            h.append((b"x-request-id", rid.encode("latin-1")))
        if self.server.stopping or conn.their_state is not h11.DONE:
            h.append((b"connection", b"close"))  # an unread body (or a stop) ends the connection
        return conn.send(h11.Response(status_code=int(status[:3]), headers=h, reason=status[4:].encode("latin-1")))

    # -- long requests: a thread of their own, the body pulled, the answer pushed --
    async def _long(self, conn: h11.Connection, req: h11.Request, environ: dict) -> None:
        why = self.server.take_stream(self.client)
        if why is not None:
            environ["nodeagent.status"] = 503
            self._refuse_long(conn, why, environ)
            await self._drain()
            return
        has_body = any(n == b"transfer-encoding" or (n == b"content-length" and v != b"0") for n, v in req.headers)
        if not has_body:
            conn.next_event()  # the EndOfMessage of an empty body
        self._conn = conn
        environ["wsgi.input"] = _BodyReader(self) if has_body else io.BytesIO(b"")
        environ["nodeagent.gone"] = self.gone
        ws = environ["nodeagent.websocket"] = websocket_request(req)
        if ws is not None:  # werkzeug routes an upgrade only to rules marked websocket: ours are plain
            environ.pop("HTTP_UPGRADE", None)
        out = _Channel(self.loop)
        threading.Thread(target=self.server.run_long, args=(environ, out, self.client), daemon=True,
                         name=f"api-long-{environ['PATH_INFO'][:40]}").start()
        # a websocket's client is watched by the session's reader once it is accepted
        watch = None if has_body or ws is not None else self.loop.create_task(self._watch(conn, out))
        try:
            while True:
                kind, value = await out.get()
                if kind == "head":
                    environ["nodeagent.status"] = int(value[0][:3])
                    self._write(self._head(conn, value[0], value[1], environ))
                elif kind == "data":
                    if req.method != b"HEAD":
                        self._write(conn.send(h11.Data(data=value)))
                        environ["nodeagent.sent"] = environ.get("nodeagent.sent", 0) + len(value)
                        await self._drain()
                elif kind == "end":
                    self._write(conn.send(h11.EndOfMessage()))
                    await self._drain()
                    return
                elif kind == "upgrade":
                    environ["nodeagent.status"] = 101
                    await self._websocket(conn, ws, out, environ)
                    return
                else:
                    raise _Gone()  # the app failed mid-response: cut it, the client sees a short stream
        finally:
            if watch is not None:  # stopped and gone before the next read: one reader at a time
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
            out.close()
            if ws is not None:
                ws._end()
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE or self.server.stopping:
                self.gone.set()
            else:
                self.gone = threading.Event()  # the next long request on this connection gets its own

    # -- websockets: after the 101 the connection carries frames until the session ends --
    async def _websocket(self, conn: h11.Connection, ws: WebSocket, out: _Channel, environ: dict) -> None:
        headers = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
                   (b"sec-websocket-accept", generate_accept_token(ws.key.encode("latin-1"))),
                   (b"date", self.server.date())]
        if ws.subprotocol:
            headers.append((b"sec-websocket-protocol", ws.subprotocol.encode("latin-1")))
        if environ.get("nodeagent.request_id"):
            headers.append((b"x-request-id", environ["nodeagent.request_id"].encode("latin-1")))
        self._write(conn.send(h11.InformationalResponse(status_code=101, headers=headers)))
        await self._drain()
        wsc = WsConnection(ConnectionType.SERVER, trailing_data=conn.trailing_data[0])
        self.ws = ws
        ws._loop, ws._room = self.loop, asyncio.Event()
        ws._room.set()
        reader = self.loop.create_task(self._ws_read(wsc, ws, out))
        try:
            while True:
                kind, value = await out.get()
                if kind == "ws":
                    msg = TextMessage(data=value) if isinstance(value, str) else BytesMessage(data=value)
                    self._write(wsc.send(msg))
                    environ["nodeagent.sent"] = environ.get("nodeagent.sent", 0) + len(value)
                    await self._drain()
                elif kind == "wsend":
                    if wsc.state is ConnectionState.OPEN:
                        self._write(wsc.send(CloseConnection(code=value[0], reason=value[1] or None)))
                        await self._drain()
                        await asyncio.wait([reader], timeout=WS_CLOSE_WAIT)  # the client's close answer
                    return
                else:
                    raise _Gone()
        finally:
            ws._end()
            self.ws = None
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _ws_read(self, wsc: WsConnection, ws: WebSocket, out: _Channel) -> None:
        """Client frames into the session's inbox (pausing while it is full), pings answered,
        a silent client pinged and then dropped, a close answered."""
        parts, size, pinged = [], 0, False
        interval = self.api.ws_ping_interval
        try:
            while True:
                await ws._room.wait()
                try:
                    data = await self._read(self.loop.time() + interval)
                except TimeoutError:
                    if pinged or wsc.state is not ConnectionState.OPEN:
                        return  # silent through a ping interval and its answer's: gone
                    self._write(wsc.send(Ping(payload=b"nodeagent")))
                    pinged = True
                    continue
                if not data:
                    return
                pinged = False
                wsc.receive_data(data)
                for ev in wsc.events():
                    if isinstance(ev, Message):
                        parts.append(ev.data)
                        size += len(ev.data)
                        if size > WS_MAX_MESSAGE:
                            self._write(wsc.send(CloseConnection(
                                code=1009, reason=f"message too large: at most {WS_MAX_MESSAGE} bytes")))
                            return
                        if ev.message_finished:
                            ws._deliver("".join(parts) if isinstance(ev, TextMessage) else b"".join(parts))
                            parts, size = [], 0
                    elif isinstance(ev, Ping):
                        self._write(wsc.send(ev.response()))
                    elif isinstance(ev, CloseConnection):
                        if wsc.state is ConnectionState.REMOTE_CLOSING:
                            self._write(wsc.send(ev.response()))
                        return
        except WsProtocolError as e:
            if wsc.state is ConnectionState.OPEN:
                self._write(wsc.send(CloseConnection(code=1002, reason=str(e)[:100])))
        except (OSError, ssl.SSLError):
            pass
        finally:
            ws._end()
            out.close()

    async def _watch(self, conn: h11.Connection, out: _Channel) -> None:
        """While a long request without a body runs: notice its client leaving, so that its
        thread ends (and gives back its slot) at once, not at its next write. What the client
        pipelines meanwhile is kept for the next cycle, up to MAX_HEAD_BYTES."""
        try:
            while len(conn.trailing_data[0]) <= MAX_HEAD_BYTES:
                data = await (self.tls.read() if self.tls is not None else self.reader.read(READ_CHUNK))
                if not data:
                    break
                conn.receive_data(data)
            else:
                return  # the client is there and waits: read no more until its turn
        except (OSError, ssl.SSLError):
            pass
        self.gone.set()
        out.close()

    def _refuse_long(self, conn: h11.Connection, why: str, environ: dict) -> None:
        body = _error_body(503, "unavailable", why)
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Retry-After", "5")]
        self._write(self._head(conn, "503 Service Unavailable", headers, environ) + conn.send(h11.Data(data=body))
                          + conn.send(h11.EndOfMessage()))

    async def pull_body(self, want: int) -> bytes:
        """On the loop, for a long request's thread: the next piece of its body (b"" at its end)."""
        if self.closed:
            raise _Gone()
        conn = self._conn
        if conn.their_state is h11.DONE:  # the whole body is in (h11 says NEED_DATA, not the end, again)
            return b""
        if conn.they_are_waiting_for_100_continue:
            self._write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        parts, n = [], 0
        deadline = self.loop.time() + self.api.body_timeout
        while n < want:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                if n:
                    break  # hand over what is here
                conn.receive_data(await self._read(deadline, max(READ_CHUNK, want - n)))
            elif isinstance(ev, h11.Data):
                parts.append(ev.data)
                n += len(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:
                raise _Gone()
        return b"".join(parts)


class _Tls:
    """TLS over a connection's plain transport, through memory BIOs: unlike asyncio's own TLS
    transport this sends the alert of a failed handshake (a client without a certificate
    hears "certificate required" instead of a bare close), and the handshake has the
    connection's header deadline."""

    def __init__(self, conn: _Connection, context: ssl.SSLContext):
        self._conn = conn
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=True)

    def _flush(self) -> None:
        if self._out.pending:
            self._conn.writer.write(self._out.read())

    async def _more(self) -> None:
        self._flush()
        data = await self._conn.reader.read(READ_CHUNK)
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    async def handshake(self, deadline: float) -> None:
        async with asyncio.timeout_at(deadline):
            while True:
                try:
                    self._obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self._more()
                except ssl.SSLError:
                    self._flush()  # the alert tells the client why
                    raise
        self._flush()

    async def read(self) -> bytes:
        while True:
            try:
                data = self._obj.read(READ_CHUNK)
                self._flush()
                return data
            except ssl.SSLWantReadError:
                await self._more()
            except ssl.SSLZeroReturnError:
                return b""

    def write(self, data: bytes) -> None:
        self._obj.write(data)
        self._flush()

    def peer_cert(self) -> dict | None:
        """The client's certificate, verified against api.client_ca (None if it sent none)."""
        return self._obj.getpeercert()

    def close_notify(self) -> None:
        try:
            self._obj.unwrap()
        except (ssl.SSLError, OSError):
            pass
        try:
            self._flush()
        except Exception:  # the transport is already gone
            pass
