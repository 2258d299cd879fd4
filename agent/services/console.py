"""Interactive consoles: one open console per instance, shared by every watcher: a VM's
serial console, or the terminal of a container created with a TTY.

Terms: a *channel* is the host's side of one console (a VM's console file descriptor from
hypervisor.driver.SupportsConsole, or a containers.runtime.Terminal from the runtime's
SupportsTerminal: conmon's attach socket); a *hub* holds one channel and one reader thread
that hands what the guest writes to every *watcher* attached to it; any watcher allowed to
type writes to the same channel, and may resize it (a container's terminal; a serial line has
no size). A watcher's queue holds at most
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


class _FdChannel:
    """A VM's console descriptor as a channel (the shape of containers.runtime.Terminal)."""

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def read(self) -> bytes:
        return os.read(self.fd, READ_BYTES)

    def write(self, data) -> int:
        return os.write(self.fd, data)

    def resize(self, cols: int, rows: int) -> None:
        """A serial line has no size: nothing to do."""

    def close(self) -> None:
        os.close(self.fd)


class _Hub:
    def __init__(self, name: str, chan, on_close):
        self.name, self.chan, self._on_close = name, chan, on_close
        self.fd = chan.fileno()
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
                    data = self.chan.read()
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
                    view = view[self.chan.write(view):]
                except BlockingIOError:
                    if not select.select([], [self.fd], [], WRITE_WAIT_SECONDS)[1]:
                        return False
                except OSError:
                    return False
        return True

    def resize(self, cols: int, rows: int) -> None:
        with self._write_lock:
            if not self.closed:
                self.chan.resize(cols, rows)

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
            self.chan.close()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)


class Consoles:
    """The console hubs (one per running instance with a watcher), keyed by kind and name."""

    def __init__(self, driver_fn, runtime_fn=lambda: None):
        self._driver_fn = driver_fn  # the VM driver, built on first use
        self._runtime_fn = runtime_fn  # the container runtime, built on first use
        self._hubs: dict[str, _Hub] = {}
        self._lock = threading.Lock()

    def attach(self, name: str, kind: str = "vm") -> Watcher:
        """A new watcher of VM ``name``'s serial console or of container ``name``'s terminal
        (opened on first attach). Conflict if it does not run (or a container has no TTY);
        Unsupported if the driver or runtime has no consoles."""
        if kind == "vm":
            from hypervisor.driver import SupportsConsole
            driver = self._driver_fn()
            if not isinstance(driver, SupportsConsole):
                raise Unsupported("this host's VM driver has no interactive consoles")

            def opener():
                return _FdChannel(driver.open_console(name))
        else:
            from containers.runtime import SupportsTerminal
            runtime = self._runtime_fn()
            if not isinstance(runtime, SupportsTerminal):
                raise Unsupported("this host's container runtime has no terminals to attach to")

            def opener():
                return runtime.open_terminal(name)
        key = f"{kind}/{name}"
        with self._lock:
            hub = self._hubs.get(key)
            w = hub.attach() if hub is not None else None
            if w is None:
                hub = self._hubs[key] = _Hub(key, opener(), self._forget)
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


def console_session(consoles: Consoles, vm_name: str, *, can_type: bool, who: str, request_id: str | None,
                    kind: str = "vm"):
    """The websocket session of one console watcher (agent.api.websocket runs it): binary
    messages both ways are the console's bytes; text messages from the server are JSON notices
    ({"type": "notice", "message"}); a client's text messages are JSON controls, as in exec
    sessions (agent.services.execs): ``{"type": "resize", "cols", "rows"}`` sizes a container's
    terminal (a serial line has none: ignored), any other is refused with a notice. Leaving
    (closing the websocket) detaches: the instance runs on. A watcher without ``can_type`` (a
    reader) sees the output and is told once that its typing is dropped (its resizes are ignored)."""
    import json

    from agent.services.execs import _bounded

    def notice(ws, message: str) -> None:
        ws.send(json.dumps({"type": "notice", "message": message}))

    def pump_input(ws, w: Watcher) -> None:
        told = False
        try:
            while (msg := ws.recv()) is not None:
                if isinstance(msg, str):
                    if not can_type:
                        continue  # a reader's resize: the terminal is the typists' (never told: harmless)
                    try:
                        ctl = json.loads(msg)
                        if ctl.get("type") != "resize":
                            raise ValueError("a console takes resize controls only")
                        w.hub.resize(_bounded(ctl.get("cols")), _bounded(ctl.get("rows")))
                    except (ValueError, AttributeError, TypeError, OSError):
                        notice(ws, f"control message refused: {msg[:80]!r}")
                    continue
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
            w = consoles.attach(vm_name, kind)
        except Exception as e:
            ws.close(1011, str(getattr(e, "message", e))[:100])
            return
        log.info("console session opened", extra={"instance": vm_name, "kind": kind, "caller": who,
                                                   "can_type": can_type, "request_id": request_id})
        threading.Thread(target=pump_input, args=(ws, w), daemon=True, name=f"console-in-{vm_name[:16]}").start()
        try:
            while (chunk := w.get()) is not None:
                if chunk is DROPPED:
                    notice(ws, "output lost: this client read more slowly than the guest wrote")
                else:
                    ws.send(chunk)
            if w.hub.closed and not ws.closed.is_set():
                ws.close(1000, "the console closed: the VM stopped" if kind == "vm" else
                         "the terminal closed: the container stopped")
        finally:
            consoles.detach(w)
            log.info("console session closed", extra={"instance": vm_name, "kind": kind, "caller": who,
                                                      "request_id": request_id})
    return run


def not_a_tty(name: str) -> Conflict:
    return Conflict(f"container {name!r} has no terminal: it was created without a TTY, so there is no "
                    "console to attach to; create it with \"tty\": true (`nodeagent instance create --tty`), "
                    "or use `nodeagent exec -it NAME -- sh` (POST /v1/instances/{id}/exec with interactive) "
                    "or the logs")
