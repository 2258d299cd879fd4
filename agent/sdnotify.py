"""systemd's readiness protocol (sd_notify(3)) without a library: a datagram to the unix
socket named by $NOTIFY_SOCKET. Under a ``Type=notify`` unit the agent says ``READY=1`` once
its API socket listens and its crash recovery ran, and ``STOPPING=1`` when it begins to stop.
Without $NOTIFY_SOCKET (no systemd, or another unit type) every call does nothing.

The variable is taken out of the agent's environment at start (``take_socket``): runc reads
NOTIFY_SOCKET too, and a ``runc start`` that inherited it would wait for the container to
send READY=1 itself."""
from __future__ import annotations

import os
import socket


def take_socket(environ: dict | None = None) -> str | None:
    """Remove NOTIFY_SOCKET from ``environ`` (default: the process's) and return it when it
    names a usable socket ("/path" or "@abstract")."""
    env = os.environ if environ is None else environ
    path = env.pop("NOTIFY_SOCKET", "")
    return path if path and path[0] in "/@" else None


def notify(path: str | None, state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to the socket ``path``; False when there is none or
    sending failed (the agent runs on regardless: readiness is advisory)."""
    if not path:
        return False
    addr = "\0" + path[1:] if path[0] == "@" else path  # "@": the abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError:
        return False
    return True
