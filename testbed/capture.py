"""A packet capture on one link (an AF_PACKET raw socket, as tcpdump takes it), for tests
that check what crosses the wire between simulated hosts: e.g. that a marker the guest
holds in its disk or memory never appears in cleartext during a migration."""
from __future__ import annotations

import socket
import threading

ETH_P_ALL = 0x0003
MAX_BYTES = 1024 * 1024 * 1024  # 1 GiB: a capture never grows past this


class Capture:
    """``with Capture("nasim1a2-h1") as cap: ...``; then ``cap.seen(b"marker")`` and ``cap.bytes``."""

    def __init__(self, link: str):
        self.link = link
        self.frames: list[bytes] = []
        self.bytes = 0
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.bind((link, 0))
        self._sock.settimeout(0.2)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024 * 1024)
        self._thread = threading.Thread(target=self._run, name=f"capture-{link}", daemon=True)

    def __enter__(self) -> "Capture":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set() and self.bytes < MAX_BYTES:
            try:
                frame = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.frames.append(frame)
            self.bytes += len(frame)

    def seen(self, marker: bytes) -> bool:
        """True if any captured frame carries ``marker`` (a marker repeated over a whole
        frame's payload is found whatever the segment boundaries)."""
        return any(marker in f for f in self.frames)
