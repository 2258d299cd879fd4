"""A real, stateful, in-memory ``containers.Runtime``: no processes, no mounts, no host changes.

It keeps the same state machine, validation, errors, exit codes, IP leases and port
claims as ``RuncRuntime``, so the API and the contract suite can run on it.

The "process" of a fake container is simulated by a tiny, documented interpreter:

=========================  ===================================================
command                    behaviour on start() (and on exec())
=========================  ===================================================
``true``                   exits 0 at once
``false``                  exits 1 at once
``echo ARGS...``           writes ``ARGS\\n`` (space-joined) to stdout, exits 0
``hostname``               writes the container's hostname, exits 0
``id -u`` / ``id -g``      writes the uid / gid the process runs as (its spec's user)
``sh -c "exit N"``         exits N at once
``sh -c "echo ARGS"``      same as ``echo ARGS``
anything else              runs until stop()/kill() (exec: exits 0, no output)
=========================  ===================================================

stop() sends a simulated SIGTERM: the process exits 143 (128 + SIGTERM). kill(sig)
exits 128 + sig. stats() returns zero usage but reports the limits in ``"limits"``.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import shlex
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from agent.errors import Conflict, InvalidInput, NotFound
from containers import validate
from containers.bundle import resolve_process
from containers.bandwidth import Bandwidth
from containers.runtime import ContainerInfo, ContainerSpec, ExecResult, IdMap, Limits

if TYPE_CHECKING:
    from agent.state import Database
    from containers.network import Network

SIGTERM_EXIT = 128 + 15
DEFAULT_SUBNET = "10.88.0.0/24"
FAKE_IDMAP = IdMap(1000000, 65536)  # the default /etc/subuid allocation (containers.idmap)


def _interpret(command: list[str] | tuple[str, ...], hostname: str,
               user: str = "0:0") -> tuple[int | None, str]:
    """(exit code or None if it keeps running, stdout) of the fake interpreter above;
    ``user``: the process's uid[:gid]."""
    argv = list(command)
    if argv[:2] == ["sh", "-c"] and len(argv) >= 3:
        inner = shlex.split(argv[2])
        if len(inner) == 2 and inner[0] == "exit" and inner[1].isdigit():
            return int(inner[1]) & 0xFF, ""
        argv = inner or ["true"]
    prog = argv[0].rsplit("/", 1)[-1]
    if prog == "true":
        return 0, ""
    if prog == "false":
        return 1, ""
    if prog == "echo":
        return 0, " ".join(argv[1:]) + "\n"
    if prog == "hostname":
        return 0, hostname + "\n"
    if prog == "id" and argv[1:] in (["-u"], ["-g"]):
        uid, _, gid = user.partition(":")
        return 0, (uid if argv[1] == "-u" else gid or "0") + "\n"
    return None, ""


@dataclasses.dataclass
class _Box:
    spec: ContainerSpec
    state: str = "created"
    pid: int | None = None
    exit_code: int | None = None
    ip: str | None = None
    limits: Limits = Limits()
    log: list[str] = dataclasses.field(default_factory=list)
    snapshots: list[str] = dataclasses.field(default_factory=list)

    def info(self) -> ContainerInfo:
        return ContainerInfo(self.spec.name, self.state, self.pid, self.exit_code, self.ip,
                             self.spec.idmap if self.spec.userns else None)


class FakeRuntime:
    """In-memory runtime. Thread-safe. Lifecycle and errors as in ``containers.runtime``."""

    uses_host_network = False  # its addresses are its own: no host bridge, no host filter

    def __init__(self, *, subnet: str = DEFAULT_SUBNET, idmap: IdMap = FAKE_IDMAP):
        self.idmap = idmap  # the host range user-namespaced containers map to (as RuncRuntime's)
        self._boxes: dict[str, _Box] = {}
        self._lock = threading.RLock()
        self._net = ipaddress.ip_network(subnet)
        self._pids = itertools.count(1000)

    @classmethod
    def from_config(cls, settings: Mapping[str, Any], *, state_dir: str, db: Database,
                    network: Network | None) -> FakeRuntime:
        """agent.registry's uniform construction. The fake keeps everything in memory and
        leases from its own default subnet: it ignores the settings, state dir, database
        and network."""
        return cls()

    # -- helpers ----------------------------------------------------------------------
    def _box(self, name: str) -> _Box:
        box = self._boxes.get(name)
        if box is None:
            raise NotFound(f"container {name!r} does not exist")
        return box

    def _lease_ip(self) -> str:
        taken = {b.ip for b in self._boxes.values()}
        hosts = self._net.hosts()
        next(hosts)  # .1 is the bridge (gateway) address
        for ip in hosts:
            if str(ip) not in taken:
                return str(ip)
        raise Conflict(f"subnet {self._net} has no free address: delete a container "
                       "or configure a larger subnet")

    def _exit(self, box: _Box, code: int) -> None:
        box.state, box.pid, box.exit_code = "stopped", None, code

    # -- the Runtime interface ------------------------------------------------------------
    def create(self, spec: ContainerSpec) -> ContainerInfo:
        validate.check_spec(spec)
        if spec.userns:
            spec = dataclasses.replace(spec, idmap=self.idmap)
        with self._lock:
            if spec.name in self._boxes:
                raise Conflict(f"container {spec.name!r} already exists: pick another name "
                               "or delete it first")
            claimed = {(p.host_ip, p.host_port, p.protocol)
                       for b in self._boxes.values() for p in b.spec.network.ports}
            for p in spec.network.ports:
                if (p.host_ip, p.host_port, p.protocol) in claimed or \
                        ("0.0.0.0", p.host_port, p.protocol) in claimed:
                    raise Conflict(f"port {p.host_ip}:{p.host_port}/{p.protocol} is already "
                                   "published by another container: choose another host_port")
            ip = self._lease_ip() if spec.network.mode == "bridge" else None
            box = _Box(spec=spec, ip=ip, limits=spec.limits)
            self._boxes[spec.name] = box
            return box.info()

    def start(self, name: str) -> ContainerInfo:
        """Idempotent on a running container."""
        with self._lock:
            box = self._box(name)
            if box.state == "running":
                return box.info()
            if box.state == "paused":
                raise Conflict(f"container {name!r} is paused: resume it instead")
            box.exit_code = None
            box.state, box.pid = "running", next(self._pids)
            proc = resolve_process(box.spec)
            code, out = _interpret(proc["args"], box.spec.hostname or name, proc["user"])
            if out:
                box.log.append(out)
            if code is not None:
                self._exit(box, code)
            return box.info()

    def stop(self, name: str, *, timeout: float = 10) -> ContainerInfo:
        """Idempotent on a stopped or created container."""
        with self._lock:
            box = self._box(name)
            if box.state in ("running", "paused"):
                self._exit(box, SIGTERM_EXIT)
            return box.info()

    def kill(self, name: str, signal: int = 9) -> ContainerInfo:
        with self._lock:
            box = self._box(name)
            if not isinstance(signal, int) or not 1 <= signal <= 64:
                raise InvalidInput(f"signal {signal!r} is invalid: give 1..64 (9 = SIGKILL)")
            if box.state not in ("running", "paused"):
                raise Conflict(f"container {name!r} is {box.state}, not running: "
                               "nothing to signal")
            self._exit(box, 128 + signal)
            return box.info()

    def restart(self, name: str, *, timeout: float = 10) -> ContainerInfo:
        self.stop(name, timeout=timeout)
        return self.start(name)

    def pause(self, name: str) -> ContainerInfo:
        with self._lock:
            box = self._box(name)
            if box.state != "running":
                raise Conflict(f"container {name!r} is {box.state}: only a running one pauses")
            box.state = "paused"
            return box.info()

    def resume(self, name: str) -> ContainerInfo:
        with self._lock:
            box = self._box(name)
            if box.state != "paused":
                raise Conflict(f"container {name!r} is {box.state}, not paused")
            box.state = "running"
            return box.info()

    def delete(self, name: str) -> bool:
        with self._lock:
            return self._boxes.pop(name, None) is not None

    # SupportsRootfsSnapshots: the fake has no files; it keeps the names and the rules
    def snapshot_rootfs(self, name: str, snapshot: str) -> None:
        validate.check_snapshot_name(snapshot)
        with self._lock:
            box = self._box(name)
            if snapshot in box.snapshots:
                raise Conflict(f"container {name!r} already has a snapshot {snapshot!r}")
            box.snapshots.append(snapshot)

    def revert_rootfs(self, name: str, snapshot: str) -> None:
        with self._lock:
            box = self._box(name)
            if box.state in ("running", "paused"):
                raise Conflict(f"container {name!r} is {box.state}: stop it before restoring a snapshot")
            if snapshot not in box.snapshots:
                raise NotFound(f"container {name!r} has no snapshot {snapshot!r}")

    def delete_rootfs_snapshot(self, name: str, snapshot: str) -> bool:
        with self._lock:
            box = self._box(name)
            if snapshot not in box.snapshots:
                return False
            box.snapshots.remove(snapshot)
            return True

    def reset_rootfs(self, name: str) -> None:
        with self._lock:
            box = self._box(name)
            if box.state in ("running", "paused"):
                raise Conflict(f"container {name!r} is {box.state}: stop it before rebuilding its rootfs")
            box.log.append("fake: rootfs reset to its image\n")

    def rootfs_snapshots(self, name: str) -> list[str]:
        with self._lock:
            return sorted(self._box(name).snapshots)

    def reconcile(self) -> dict:
        """containers.runtime.SupportsReconcile: the fake keeps nothing outside its records
        (no mounts, cgroups or devices), so nothing is ever left to release."""
        return {"released": [], "veths_removed": []}

    def exec(self, name: str, command: list[str], *, timeout: float = 60) -> ExecResult:
        if not command or not all(isinstance(a, str) for a in command):
            raise InvalidInput("exec needs a command: a non-empty list of strings")
        with self._lock:
            box = self._box(name)
            if box.state != "running":
                raise Conflict(f"container {name!r} is {box.state}: exec needs it running")
            code, out = _interpret(command, box.spec.hostname or name, resolve_process(box.spec)["user"])
            return ExecResult(0 if code is None else code, out, "")

    def logs(self, name: str, tail: int | None = None) -> str:
        with self._lock:
            text = "".join(self._box(name).log)
        if tail is not None:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-tail:]) if tail > 0 else ""
        return text

    def stats(self, name: str) -> dict:
        with self._lock:
            box = self._box(name)
            running = box.state in ("running", "paused")
            return {"cpu_ns": 0, "memory_bytes": 0, "pids": 1 if running else 0, "oom_kills": 0,
                    "unsupported": [],
                    "io": {"read_bytes": 0, "write_bytes": 0},
                    "net": {"rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0, "tx_packets": 0},
                    "limits": dataclasses.asdict(box.limits)}

    def set_bandwidth(self, name: str, bandwidth: Bandwidth) -> None:
        """containers.runtime.SupportsBandwidth: kept in the container's spec (nothing to shape)."""
        with self._lock:
            box = self._box(name)
            validate.check_bandwidth(box.spec.network.mode, bandwidth)
            box.spec = dataclasses.replace(box.spec, bandwidth=bandwidth)

    def bandwidth(self, name: str) -> Bandwidth:
        """What set_bandwidth (or create) gave ``name`` (the fake's record of it, for tests)."""
        with self._lock:
            return self._box(name).spec.bandwidth

    def update_limits(self, name: str, limits: Limits) -> None:
        validate.check_limits(limits)
        with self._lock:
            self._box(name).limits = limits

    def get(self, name: str) -> ContainerInfo:
        with self._lock:
            return self._box(name).info()

    def find(self, name: str) -> ContainerInfo | None:
        with self._lock:
            box = self._boxes.get(name)
            return box.info() if box else None

    def list(self) -> list[ContainerInfo]:
        with self._lock:
            return [b.info() for b in sorted(self._boxes.values(), key=lambda b: b.spec.name)]
