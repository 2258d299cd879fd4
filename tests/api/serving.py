"""Raw-socket clients for the serving tests: they hold connections the way slow or idle
clients do, and parse what comes back with h11 (pipelined answers included)."""
from __future__ import annotations

import socket
import time

import h11


def connect(port: int, source: str = "127.0.0.1", rcvbuf: int | None = None, timeout: float = 10) -> socket.socket:
    """A TCP connection to the agent from ``source`` (any 127.x.y.z address: a distinct client)."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.settimeout(timeout)
    return s


def request(method: str, path: str, token: str | None = None, headers: dict | None = None,
            body: bytes = b"") -> bytes:
    h = {"Host": "agent", **({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    if body and "Transfer-Encoding" not in h:
        h["Content-Length"] = str(len(body))
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n").encode() + body


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def recv_until(s: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    got = b""
    while marker not in got and len(got) < limit:
        data = s.recv(65536)
        if not data:
            break
        got += data
    return got


def closed_within(s: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``s`` (reading and dropping what it sent); None if it did not."""
    t0 = time.monotonic()
    s.settimeout(0.2)
    while time.monotonic() - t0 < seconds:
        try:
            if not s.recv(65536):
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0
    return None


def responses(s: socket.socket, methods: list[str]) -> list[tuple[int, dict, bytes]]:
    """Read one response per request sent (in order): (status, headers, body)."""
    c = h11.Connection(h11.CLIENT)
    out = []
    for m in methods:
        c.send(h11.Request(method=m, target="/", headers=[("Host", "agent")]))
        c.send(h11.EndOfMessage())
        status, headers, body = None, {}, b""
        while True:
            ev = c.next_event()
            if ev is h11.NEED_DATA:
                c.receive_data(s.recv(65536))
            elif isinstance(ev, h11.Response):
                status, headers = ev.status_code, {k.decode(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
            elif isinstance(ev, h11.ConnectionClosed):
                raise ConnectionError(f"closed after {len(out)} responses")
        out.append((status, headers, body))
        if c.our_state is h11.MUST_CLOSE or c.their_state is h11.MUST_CLOSE:
            break
        c.start_next_cycle()
    return out
