"""Interactive exec sessions, in Incus's shape: ``POST /v1/instances/{id}/exec`` with
``interactive`` checks the request and reserves a *session* (one use, by the same caller,
within SESSION_TTL seconds); a websocket on ``GET /v1/instances/{id}/exec/{session}`` starts
the process and carries its terminal or its streams until it exits.

The websocket's messages (README "Consoles and interactive exec"): the client sends binary
messages (stdin bytes) and text messages (JSON controls: ``{"type": "resize", "cols",
"rows"}``, ``{"type": "signal", "signal": N}``, ``{"type": "eof"}`` to close stdin); the
server sends binary messages whose first byte is the channel (1 stdout or the terminal, 2
stderr) and, last, the text message ``{"type": "exit", "exit_code": N}``, then closes with
1000. A client that leaves kills the process and everything it started.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import select
import threading
import time

from agent.errors import NotFound

log = logging.getLogger(__name__)

SESSION_TTL = 30  # seconds a reserved session waits for its websocket
MAX_PENDING = 256  # reserved sessions at a time (the oldest expire first)
READ_BYTES = 64 * 1024
DRAIN_SECONDS = 1.0  # after the process exits: how long its output may take to reach the client
DRAIN_READS = 64  # after the process exits: reads of what is left (64 x 64 KiB), then the session ends
STDOUT, STDERR = 1, 2


class ExecSessions:
    """Reserved sessions: id -> (instance id, options, caller name, expiry)."""

    def __init__(self):
        self._pending: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def reserve(self, instance_id: str, options, caller: str) -> str:
        sid = secrets.token_hex(16)
        now = time.monotonic()
        with self._lock:
            for k in [k for k, v in self._pending.items() if v[3] < now]:
                del self._pending[k]
            while len(self._pending) >= MAX_PENDING:
                del self._pending[next(iter(self._pending))]
            self._pending[sid] = (instance_id, options, caller, now + SESSION_TTL)
        return sid

    def take(self, sid: str, instance_id: str, caller: str):
        """The options of a reserved session (it is used up); NotFound if it is unknown, expired,
        of another instance or reserved by another caller."""
        with self._lock:
            v = self._pending.get(sid)
            if v is None or v[0] != instance_id or v[2] != caller or v[3] < time.monotonic():
                raise NotFound(f"exec session {sid[:40]!r} not found: it is used once, by the caller who "
                               f"made it, within {SESSION_TTL} s of POST /v1/instances/{{id}}/exec")
            del self._pending[sid]
        return v[1]


def exec_session(runtime, name: str, options, *, who: str, request_id: str | None):
    """The websocket session running ``options`` (containers.runtime.ExecOptions) in container
    ``name`` (agent.api.websocket runs it)."""

    def pump(ws, fd: int, channel: int, stop_fd: int) -> None:
        """Output to the client until its end or, once the process exited (``stop_fd`` is
        readable), until nothing more is there (at most DRAIN_READS more reads: a background
        process holding the terminal does not keep the session)."""
        prefix = bytes([channel])
        stopping, budget = False, DRAIN_READS
        try:
            while True:
                r, _, _ = select.select([fd] if stopping else [fd, stop_fd], [], [], 0 if stopping else None)
                if stop_fd in r:
                    stopping = True
                if fd not in r:
                    if stopping:
                        return
                    continue
                if stopping:
                    budget -= 1
                    if budget < 0:
                        return
                try:
                    data = os.read(fd, READ_BYTES)
                except OSError:  # EIO: the terminal's last user left
                    return
                if not data:
                    return
                ws.send(prefix + data)
        except Exception:  # the client left (the process is killed)
            return

    def feed(ws, proc, left: threading.Event, io: threading.Lock, released: list) -> None:
        """Client messages to the process; returns when the client leaves (then ``left`` is set).
        Its writes and its closing of stdin hold ``io`` and stop once ``released[0]``: the
        process's descriptors are closed only after that, so input never goes to a closed
        (or reused) descriptor."""
        try:
            while (msg := ws.recv()) is not None:
                if isinstance(msg, bytes):
                    with io:
                        fd = None if released[0] else (proc.pty if proc.pty is not None else proc.stdin)
                        if fd is not None:
                            try:
                                os.write(fd, msg)
                            except OSError:
                                pass  # the process closed its input
                    continue
                try:
                    ctl = json.loads(msg)
                    kind = ctl.get("type")
                    if kind == "resize":
                        proc.resize(_bounded(ctl.get("cols")), _bounded(ctl.get("rows")))
                    elif kind == "signal" and isinstance(ctl.get("signal"), int) and 0 < ctl["signal"] < 65:
                        proc.signal(ctl["signal"])
                    elif kind == "eof":
                        with io:
                            if not released[0]:
                                proc.close_stdin()
                except (ValueError, AttributeError, TypeError, OSError):
                    ws.send(json.dumps({"type": "notice", "message": f"control message refused: {msg[:80]!r}"}))
        except Exception:
            pass
        left.set()

    def run(ws) -> None:
        try:
            proc = runtime.exec_interactive(name, options)
        except Exception as e:
            ws.close(1011, str(getattr(e, "message", e))[:100])
            return
        log.info("exec session started", extra={"container": name, "caller": who, "tty": options.tty,
                                                "command": options.command[0][:200], "request_id": request_id})
        stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
        ended = threading.Event()  # the process exited, or the client left
        box: dict = {}

        def waiter():
            box["code"] = proc.wait()
            ended.set()

        outs = [(proc.pty, STDOUT)] if proc.pty is not None else [(proc.stdout, STDOUT), (proc.stderr, STDERR)]
        pumps = [threading.Thread(target=pump, args=(ws, fd, ch, stop_r), daemon=True) for fd, ch in outs]
        for t in pumps:
            t.start()
        threading.Thread(target=waiter, daemon=True).start()
        io, released = threading.Lock(), [False]
        threading.Thread(target=feed, args=(ws, proc, ended, io, released), daemon=True).start()
        code = None
        try:
            ended.wait()
            code = box.get("code")
            if code is None:  # the client left: end what it started
                proc.kill()
                code = proc.wait()
                return
            os.write(stop_w, b"x")
            for t in pumps:
                t.join(DRAIN_SECONDS)
            ws.send(json.dumps({"type": "exit", "exit_code": code}))
            ws.close(1000, f"exit {code}")
        finally:
            os.write(stop_w, b"x")
            for t in pumps:
                t.join(DRAIN_SECONDS)
            if any(t.is_alive() for t in pumps):  # stuck sending to a client that does not read
                ws.abort()
                for t in pumps:
                    t.join(DRAIN_SECONDS)
            if any(t.is_alive() for t in pumps):
                # never close a descriptor a pump may still read: its number could be reused
                log.warning("exec session left a pump running; its descriptors stay open",
                            extra={"container": name, "request_id": request_id})
                proc.kill()
            else:
                with io:  # no input is being written, and none will be
                    released[0] = True
                proc.release()
                os.close(stop_r)
                os.close(stop_w)
            log.info("exec session ended", extra={"container": name, "caller": who, "exit_code": code,
                                                  "request_id": request_id})
    return run


def _bounded(v) -> int:
    if not isinstance(v, int) or not 1 <= v <= 1000:
        raise ValueError("cols and rows are integers from 1 to 1000")
    return v
