"""Make sure libvirtd + virtlogd serve qemu:///system for the test session (no systemd here).

If a libvirtd already answers, it is used and left alone. Otherwise ``virtlogd -d`` and
``libvirtd -d`` are started, their PIDs recorded from their pid files, and only those
PIDs are stopped at the end.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

URI = "qemu:///system"
PACKAGES = "libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils"
LIBVIRTD_PIDFILE = "/run/libvirtd.pid"
VIRTLOGD_PIDFILE = "/run/virtlogd.pid"
VIRTLOGD_SOCKET = "/run/libvirt/virtlogd-sock"
START_TIMEOUT_S = 30


@dataclass
class Daemons:
    uri: str = URI
    started: list[int] = field(default_factory=list)  # PIDs we own, stopped in this order

    def stop(self) -> None:
        for pid in self.started:
            terminate(pid)
        self.started.clear()


def missing_binaries() -> list[str]:
    return [b for b in ("libvirtd", "virtlogd", "qemu-system-x86_64", "qemu-img")
            if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]


def serving(uri: str = URI) -> bool:
    import libvirt
    libvirt.registerErrorHandler(lambda *_: None, None)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    conn.close()
    return True


def _pid_alive(pidfile: str) -> int | None:
    try:
        pid = int(open(pidfile).read().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _wait(cond, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {START_TIMEOUT_S}s")
        time.sleep(0.05)


def terminate(pid: int | None, timeout: float = 10) -> None:
    """End process ``pid`` (one we started): SIGTERM, then SIGKILL after ``timeout`` s."""
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def ensure() -> Daemons:
    """Return the daemons serving qemu:///system, starting them if none is."""
    missing = missing_binaries()
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}: apt-get install -y {PACKAGES} "
                           "(or run scripts/setup-host)")
    daemons = Daemons()
    if serving():
        return daemons
    if _pid_alive(VIRTLOGD_PIDFILE) is None:
        subprocess.run(["virtlogd", "-d"], check=True)
        _wait(lambda: _pid_alive(VIRTLOGD_PIDFILE) and os.path.exists(VIRTLOGD_SOCKET), "virtlogd")
        daemons.started.append(_pid_alive(VIRTLOGD_PIDFILE))
    if _pid_alive(LIBVIRTD_PIDFILE) is None:
        subprocess.run(["libvirtd", "-d"], check=True)
        _wait(lambda: _pid_alive(LIBVIRTD_PIDFILE) is not None, "libvirtd")
        daemons.started.insert(0, _pid_alive(LIBVIRTD_PIDFILE))  # stop libvirtd before virtlogd
    _wait(serving, "libvirtd on qemu:///system")
    return daemons
