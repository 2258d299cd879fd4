"""Interactive consoles: one open serial console per VM, shared by every watcher.

Terms: a *hub* holds one VM's console file descriptor (hypervisor.driver.SupportsConsole)
and one reader thread that hands what the guest writes to every *watcher* attached to it;
any watcher allowed to type writes to the same descriptor. A watcher's queue holds at most
WATCHER_QUEUE chunks: a watcher that reads slower than the guest writes loses its oldest
chunks (and is told so) instead of stalling the others. New watchers first get the last
REPLAY_BYTES the hub saw. Lifecycle: the first ``attach`` opens the console, the last
``detach`` closes it; when the VM stops (the console hangs up) every watcher gets its end.
"""
from __future__ import annotations

import logging
import os
import select
import threading
from collections import deque

from agent.errors import Conflict, Unsupported

log = logging.getLogger(__name__)

READ_BYTES = 64 * 1024  # bytes read from a console per wake-up
WATCHER_QUEUE = 256  # chunks a watcher may leave unread before it loses the oldest
REPLAY_BYTES = 16 * 1024  # the console's recent output a new watcher starts with
WRITE_WAIT_SECONDS = 2.0  # how long input waits for a guest that does not read; then it is dropped
DROPPED = object()  # in a watcher's stream: chunks were lost here (it read too slowly)


class Watcher:
    """One attached client: ``get`` the console's output (bytes, DROPPED, or None at its end)."""

    def __init__(self, hub: "_Hub", replay: bytes):
        self.hub = hub
        self._q: deque = deque([replay] if replay else [])
        self._cond = threading.Condition()
        self._ended = False

    def put(self, chunk) -> None:
        with self._cond:
            if len(self._q) >= WATCHER_QUEUE:
                self._q.popleft()
                if self._q and self._q[0] is not DROPPED:
                    self._q.appendleft(DROPPED)
            self._q.append(chunk)
            self._cond.notify()

    def end(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify()

    def get(self, timeout: float | None = None):
        """The next chunk; None at the end; TimeoutError after ``timeout`` seconds."""
        with self._cond:
            if not self._q and not self._ended and not self._cond.wait_for(
                    lambda: self._q or self._ended, timeout):
                raise TimeoutError()
            return self._q.popleft() if self._q else None

    def write(self, data: bytes) -> bool:
        """Type into the console; False if the guest did not take it within WRITE_WAIT_SECONDS."""
        return self.hub.write(data)


class _Hub:
    def __init__(self, name: str, fd: int, on_close):
        self.name, self.fd, self._on_close = name, fd, on_close
        self.watchers: list[Watcher] = []
        self._recent = bytearray()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.closed = False
        self.closing = False  # its last watcher left: the next attach opens a new hub
        threading.Thread(target=self._read, name=f"console-{name[:20]}", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                r, _, _ = select.select([self.fd, self._wake_r], [], [])
                if self._wake_r in r:
                    return
                try:
                    data = os.read(self.fd, READ_BYTES)
                except BlockingIOError:
                    continue
                except OSError:  # EIO: the other end hung up (the VM stopped)
                    return
                if not data:
                    return
                with self._lock:
                    self._recent += data
                    del self._recent[:-REPLAY_BYTES]
                    for w in self.watchers:
                        w.put(data)
        finally:
            self._shut()

    def write(self, data: bytes) -> bool:
        view = memoryview(data)
        with self._write_lock:
            while view:
                if self.closed:
                    return False
                try:
                    view = view[os.write(self.fd, view):]
                except BlockingIOError:
                    if not select.select([], [self.fd], [], WRITE_WAIT_SECONDS)[1]:
                        return False
                except OSError:
                    return False
        return True

    def attach(self) -> Watcher | None:
        """None if the hub is closing (its last watcher left)."""
        with self._lock:
            if self.closing or self.closed:
                return None
            w = Watcher(self, bytes(self._recent))
            self.watchers.append(w)
            return w

    def detach(self, w: Watcher) -> bool:
        """True if it was the last watcher (the hub is then closed)."""
        with self._lock:
            if w in self.watchers:
                self.watchers.remove(w)
            last = not self.watchers
            self.closing = self.closing or last
        if last:
            with self._write_lock:  # _shut closes the pipe under it, after setting closed
                if not self.closed:
                    os.write(self._wake_w, b"x")
        return last

    def _shut(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            watchers, self.watchers = self.watchers, []
        self._on_close(self)
        for w in watchers:
            w.end()
        with self._write_lock:
            for fd in (self.fd, self._wake_r, self._wake_w):
                os.close(fd)


class Consoles:
    """The VMs' console hubs (one per running VM with a watcher)."""

    def __init__(self, driver_fn):
        self._driver_fn = driver_fn  # the VM driver, built on first use
        self._hubs: dict[str, _Hub] = {}
        self._lock = threading.Lock()

    def attach(self, vm_name: str) -> Watcher:
        """A new watcher of VM ``vm_name``'s serial console (opened on first attach). Conflict
        if the VM does not run; Unsupported if the driver has no consoles."""
        from hypervisor.driver import SupportsConsole
        driver = self._driver_fn()
        if not isinstance(driver, SupportsConsole):
            raise Unsupported("this host's VM driver has no interactive consoles")
        with self._lock:
            hub = self._hubs.get(vm_name)
            w = hub.attach() if hub is not None else None
            if w is None:
                hub = self._hubs[vm_name] = _Hub(vm_name, driver.open_console(vm_name), self._forget)
                w = hub.attach()
            return w

    def detach(self, w: Watcher) -> None:
        w.hub.detach(w)

    def _forget(self, hub: _Hub) -> None:
        with self._lock:
            if self._hubs.get(hub.name) is hub:
                del self._hubs[hub.name]

    def open_count(self) -> int:
        with self._lock:
            return len(self._hubs)


def console_session(consoles: Consoles, vm_name: str, *, can_type: bool, who: str, request_id: str | None):
    """The websocket session of one console watcher (agent.api.websocket runs it): binary
    messages both ways are the console's bytes; text messages from the server are JSON notices
    ({"type": "notice", "message"}); a client's text messages are JSON controls (``resize`` is
    accepted and ignored: a serial line has no size). A watcher without ``can_type`` (a reader)
    sees the output and is told once that its input is dropped."""
    import json

    def notice(ws, message: str) -> None:
        ws.send(json.dumps({"type": "notice", "message": message}))

    def pump_input(ws, w: Watcher) -> None:
        told = False
        try:
            while (msg := ws.recv()) is not None:
                if isinstance(msg, str):
                    continue  # controls: nothing applies to a serial line
                if not can_type:
                    if not told:
                        notice(ws, f"read-only: {who} may watch this console, not type into it "
                                   "(an admin token types)")
                        told = True
                elif not w.write(msg):
                    notice(ws, "input dropped: the guest did not read its console within "
                               f"{WRITE_WAIT_SECONDS:g} s")
        except Exception:  # the socket closed under a notice: the session ends anyway
            pass
        finally:
            w.end()

    def run(ws) -> None:
        try:
            w = consoles.attach(vm_name)
        except Exception as e:
            ws.close(1011, str(getattr(e, "message", e))[:100])
            return
        log.info("console session opened", extra={"vm": vm_name, "caller": who, "can_type": can_type,
                                                   "request_id": request_id})
        threading.Thread(target=pump_input, args=(ws, w), daemon=True, name=f"console-in-{vm_name[:16]}").start()
        try:
            while (chunk := w.get()) is not None:
                if chunk is DROPPED:
                    notice(ws, "output lost: this client read more slowly than the guest wrote")
                else:
                    ws.send(chunk)
            if w.hub.closed and not ws.closed.is_set():
                ws.close(1000, "the console closed: the VM stopped")
        finally:
            consoles.detach(w)
            log.info("console session closed", extra={"vm": vm_name, "caller": who, "request_id": request_id})
    return run


def not_a_tty(name: str) -> Conflict:
    return Conflict(f"container {name!r} has no terminal: containers run without a TTY (no container "
                    "is created with one yet), so there is no console to attach to; use "
                    "`nodeagent exec -it NAME -- sh` (POST /v1/instances/{id}/exec with interactive) "
                    "or the logs")
