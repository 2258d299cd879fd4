"""The guest's pause at a live migration's switchover, taken apart from QEMU's own events.

Terms: the *pause* runs from the source QEMU's ``STOP`` to the destination QEMU's
``RESUME``. Its *RAM part* is the last memory pass plus the device state (the source's
MIGRATION ``device`` to ``completed``): the only part QEMU's ``downtime-limit`` bounds. The
*fixed part* is the rest: QEMU's drain and flush of every disk at the stop (the NBD mirror's
target included, so a flush on the destination too), libvirt ending the disk mirrors at
``pre-switchover`` and continuing, and on the destination libvirt's p2p Finish (NBD server
stop, the persistent definition, ``cont``). Each part is timed on one host's clock (the
source's parts by the source's QEMU, the destination's by the destination's), so hosts'
clock offsets do not enter it.

A ``Tracer`` listens on its own connections to both libvirtds (QMP events through libvirt's
``qemuMonitorEventRegister``: no monitor command, the domain is not tainted); it needs
libvirt's event loop, which ``ensure_event_loop`` starts once per process (a daemon thread).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import libvirt

EVENT_WAIT_S = 2.0  # after the job: how long the destination's RESUME may still be on its way
_loop_lock = threading.Lock()
_loop_started = False


def ensure_event_loop() -> None:
    """libvirt's default event loop, run by a daemon thread; connections opened afterwards
    deliver events. Idempotent."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run():
            while True:
                libvirt.virEventRunDefaultImpl()
        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


@dataclass(frozen=True)
class Switchover:
    """One migration's pause in ms (QEMU's clocks). ``fixed_ms`` = ``pause_ms`` - ``ram_ms``."""

    pause_ms: float
    ram_ms: float  # last memory pass + device state (what downtime-limit bounds)
    flush_ms: float  # the stop's drain and flush of every disk (until libvirt sees pre-switchover)
    mirror_ms: float  # libvirt ending the NBD disk mirrors and continuing (0 without them)
    finish_ms: float  # the destination: incoming completed to RESUME (libvirt's Finish, cont)

    @property
    def fixed_ms(self) -> float:
        return self.pause_ms - self.ram_ms

    def as_dict(self) -> dict:
        return {"pause_ms": round(self.pause_ms, 1), "ram_ms": round(self.ram_ms, 1),
                "fixed_ms": round(self.fixed_ms, 1), "flush_ms": round(self.flush_ms, 1),
                "mirror_ms": round(self.mirror_ms, 1), "finish_ms": round(self.finish_ms, 1)}


def parse(events: list[tuple[str, float, str, str]]) -> Switchover | None:
    """``events``: (side "src"|"dst", QEMU timestamp s, event, details JSON) of one migration.
    None when the events do not show one whole pre-copy switchover (post-copy, a failure)."""
    def at(side, pred, after=0.0):
        ts = [t for s, t, ev, d in events if s == side and t >= after and pred(ev, d)]
        return min(ts) if ts else None

    def status(st):
        return lambda ev, d: ev == "MIGRATION" and f'"{st}"' in d
    src_done = at("src", status("completed"))
    if src_done is None or at("src", status("postcopy-active")) is not None:
        return None
    stops = [t for s, t, ev, _ in events if s == "src" and ev == "STOP" and t <= src_done]
    if not stops:
        return None
    stop = max(stops)
    presw = at("src", status("pre-switchover"), stop)
    device = at("src", status("device"), stop)
    dst_done = at("dst", status("completed"))
    resume = at("dst", lambda ev, d: ev == "RESUME", dst_done or 0.0)
    if device is None or dst_done is None or resume is None:
        return None
    finish = resume - dst_done
    source = device - stop  # flush, then the mirrors' end (its pre-switchover wait)
    flush = (presw - stop) if presw is not None else source
    ram = src_done - device
    # the source's completion waits for the destination's load (the return path): the pause
    # is the source's part plus the destination's Finish, each on its own clock
    return Switchover(pause_ms=(source + ram + finish) * 1000, ram_ms=ram * 1000, flush_ms=flush * 1000,
                      mirror_ms=(source - flush) * 1000, finish_ms=finish * 1000)


class Tracer:
    """QMP events of domain ``name`` on the source (``src_uri``) and destination (``dest_uri``)
    libvirtds from ``start()`` until ``stop()``; ``result()`` parses them. Best effort: a
    libvirtd that refuses the registration leaves its side empty (result None)."""

    def __init__(self, src_uri: str, dest_uri: str, name: str):
        self.uris = {"src": src_uri, "dst": dest_uri}
        self.name = name
        self.events: list[tuple[str, float, str, str]] = []
        self._lock = threading.Lock()
        self._conns: list[tuple[libvirt.virConnect, int]] = []
        self._starter: threading.Thread | None = None
        self._stopped = False

    def start(self) -> None:
        """Register on both libvirtds from a thread of its own (a TLS connection to the
        destination takes a while; the switchover is seconds away)."""
        self._starter = threading.Thread(target=self._register, name="switchover-trace", daemon=True)
        self._starter.start()

    def _register(self) -> None:
        import libvirt_qemu
        try:
            ensure_event_loop()
        except libvirt.libvirtError:
            return
        for side, uri in self.uris.items():
            try:
                conn = libvirt.open(uri)
            except libvirt.libvirtError:
                continue
            try:
                cid = libvirt_qemu.qemuMonitorEventRegister(conn, None, None, self._on_event, side, 0)
            except libvirt.libvirtError:
                _close(conn)
                continue
            with self._lock:
                if self._stopped:  # stop() gave up waiting for us: undo at once
                    _deregister(conn, cid)
                    continue
                self._conns.append((conn, cid))

    def _on_event(self, _conn, dom, event, seconds, micros, details, side) -> None:
        if dom.name() == self.name and event in ("STOP", "RESUME", "MIGRATION"):
            with self._lock:
                self.events.append((side, seconds + micros / 1e6, event, details or ""))

    def stop(self, wait: bool = True) -> None:
        """Stop listening (never blocks on a libvirtd: at most 2 x EVENT_WAIT_S); ``wait``: first
        give the destination's RESUME EVENT_WAIT_S to arrive."""
        if self._starter is not None:
            self._starter.join(EVENT_WAIT_S)  # a destination that does not answer is not waited for
        deadline = time.monotonic() + (EVENT_WAIT_S if wait else 0)
        while time.monotonic() < deadline and not self._resumed():
            time.sleep(0.05)
        with self._lock:
            self._stopped = True
            conns, self._conns = self._conns, []
        # from a thread of its own: over a cut link (a failed post-copy) the destination's
        # libvirtd does not answer, and the migration's outcome must not wait for it
        threading.Thread(target=lambda: [_deregister(c, i) for c, i in conns], name="switchover-untrace",
                         daemon=True).start()

    def _resumed(self) -> bool:
        with self._lock:
            return any(s == "dst" and ev == "RESUME" for s, _, ev, _ in self.events)

    def result(self) -> Switchover | None:
        with self._lock:
            return parse(list(self.events))


def _deregister(conn: libvirt.virConnect, cid: int) -> None:
    import libvirt_qemu
    try:
        libvirt_qemu.qemuMonitorEventDeregister(conn, cid)
    except libvirt.libvirtError:
        pass
    _close(conn)


def _close(conn: libvirt.virConnect) -> None:
    try:
        conn.close()
    except libvirt.libvirtError:
        pass
