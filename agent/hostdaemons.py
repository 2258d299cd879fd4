"""The host daemons VMs need, on hosts without systemd: ``nodeagent serve`` starts virtlogd
and libvirtd when the configured VM driver is libvirt on ``qemu:///system`` and they do not
answer, so the README's first command makes VMs work on a bare host.

They are host daemons, not the agent's children: started detached (``-d``, their own
session), their PIDs recorded in ``<state_dir>/host-daemons.json`` and logged, and left
running when the agent stops. Under systemd nothing is started here: the unit wants
``libvirtd.service`` and systemd starts it (socket activation included).

Privileged work: ``start_daemon`` (runs ``virtlogd -d`` / ``libvirtd -d``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.errors import Unavailable

log = logging.getLogger(__name__)

SYSTEM_URI = "qemu:///system"
START_TIMEOUT_S = 30.0  # libvirtd probes QEMU's capabilities on its first start: seconds


@dataclass(frozen=True)
class Daemon:
    name: str      # the binary: virtlogd | libvirtd
    socket: str    # the unix socket that answers once it serves
    pidfile: str   # where `NAME -d` (as root) writes its PID


# In start order: libvirtd hands QEMU's console to virtlogd, so virtlogd comes first.
DAEMONS = (
    Daemon("virtlogd", "/run/libvirt/virtlogd-sock", "/run/virtlogd.pid"),
    Daemon("libvirtd", "/run/libvirt/libvirt-sock", "/run/libvirtd.pid"),
)

FIX = ("start them as root: `virtlogd -d && libvirtd -d` (`nodeagent serve` does it by itself on a host "
       "without systemd), or under systemd `systemctl start libvirtd`; they come with "
       "`apt-get install libvirt-daemon-system`")


def socket_answers(path: str) -> bool:
    """True when a unix stream socket at ``path`` accepts a connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def systemd_booted(run_dir: str = "/run/systemd/system") -> bool:
    """True when systemd is the init system (sd_booted(3)'s test)."""
    return os.path.isdir(run_dir)


def wanted(driver: str, uri: str, *, systemd: bool) -> bool:
    """Whether ``serve`` looks after libvirt's daemons: the libvirt driver on the system
    URI of this host, and no systemd to do it."""
    return driver == "libvirt" and uri == SYSTEM_URI and not systemd


def read_pid(pidfile: str) -> int | None:
    try:
        pid = int(open(pidfile).read().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def start_daemon(d: Daemon, *, timeout: float = START_TIMEOUT_S) -> int | None:
    """Run ``d.name -d`` (it daemonizes into its own session) and wait until its socket
    answers; return its PID from its pidfile. Raises Unavailable naming the fix."""
    binary = shutil.which(d.name) or (f"/usr/sbin/{d.name}" if os.path.exists(f"/usr/sbin/{d.name}") else None)
    if binary is None:
        raise Unavailable(f"{d.name} is not installed: apt-get install libvirt-daemon-system", component=d.name)
    r = subprocess.run([binary, "-d"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       start_new_session=True, timeout=timeout)
    if r.returncode != 0:
        raise Unavailable(f"`{d.name} -d` failed (rc {r.returncode}): {r.stderr.strip()[-500:]}; "
                          f"run it by hand to see why", component=d.name)
    deadline = time.monotonic() + timeout
    while not socket_answers(d.socket):
        if time.monotonic() > deadline:
            raise Unavailable(f"{d.name} started but {d.socket} does not answer after {timeout:.0f} s; "
                              f"see its log (/var/log/libvirt/) and {FIX}", component=d.name)
        time.sleep(0.05)
    return read_pid(d.pidfile)


def ensure(state_dir: str, *, answers: Callable[[str], bool] = socket_answers,
           start: Callable[[Daemon], int | None] = start_daemon) -> dict[str, int | None]:
    """Start each of DAEMONS whose socket does not answer; return {name: pid} of those
    started (empty when all were up), also written to ``<state_dir>/host-daemons.json``.
    ``answers`` and ``start`` are the presence check and the starter (tests pass fakes)."""
    started: dict[str, int | None] = {}
    for d in DAEMONS:
        if answers(d.socket):
            continue
        log.info("starting host daemon", extra={"daemon": d.name})
        started[d.name] = pid = start(d)
        log.info("host daemon started; it keeps running when the agent stops",
                 extra={"daemon": d.name, "pid": pid})
    if started:
        os.makedirs(state_dir, exist_ok=True)
        record = os.path.join(state_dir, "host-daemons.json")
        with open(record + ".tmp", "w") as f:
            json.dump({"started": started, "time": int(time.time())}, f)
        os.replace(record + ".tmp", record)
    return started
