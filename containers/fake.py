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
``cat``                    (interactive exec only) copies stdin to stdout until EOF, exits 0
anything else              runs until stop()/kill() (exec: exits 0, no output; an
                           interactive exec runs until its stdin ends or it is killed)
=========================  ===================================================

Interactive execs (containers.runtime.SupportsInteractiveExec) run that interpreter on a
thread, behind real pipes or a real pty. Files (containers.runtime.SupportsFiles) live in
memory per container (a directory exists if it is FAKE_DIRS' or holds a file); a read
hands back a memfd.

stop() sends a simulated SIGTERM: the process exits 143 (128 + SIGTERM). kill(sig)
exits 128 + sig. stats() returns zero usage but reports the limits in ``"limits"``.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import os
import posixpath
import shlex
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from agent.errors import Conflict, InvalidInput, NotFound, Unprocessable
from containers import validate
from containers.bundle import resolve_process
from containers.bandwidth import Bandwidth
from containers.runtime import ContainerInfo, ContainerSpec, ExecOptions, ExecResult, IdMap, Limits, RootfsImage

if TYPE_CHECKING:
    from agent.state import Database
    from containers.network import Network

SIGTERM_EXIT = 128 + 15
DEFAULT_SUBNET = "10.88.0.0/24"
FAKE_IDMAP = IdMap(1000000, 65536)  # the default /etc/subuid allocation (containers.idmap)
FAKE_DIRS = frozenset({"/", "/bin", "/etc", "/root", "/tmp", "/var"})  # the directories every fake rootfs has


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
    # path -> (data, mode, uid, gid): SupportsFiles in memory
    files: dict[str, tuple[bytes, int, int, int]] = dataclasses.field(default_factory=dict)
    dirs: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)  # made ones: mode, uid, gid
    snapshots: list[str] = dataclasses.field(default_factory=list)
    # a TTY container's terminal while it runs: (host side, the process's side), a pty whose
    # own echo stands for the process (as the fake VM console)
    tty: tuple[int, int] | None = None

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
        if box.tty is not None:  # the terminal hangs up: attached readers get their end
            for fd in box.tty:
                os.close(fd)
            box.tty = None

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

    def volumes(self, name: str) -> tuple:
        with self._lock:
            return tuple(self._box(name).spec.volumes)

    def set_volumes(self, name: str, volumes) -> ContainerInfo:
        """containers.runtime.SupportsVolumes: only while not running or paused."""
        with self._lock:
            box = self._box(name)
            if box.state in ("running", "paused"):
                raise Conflict(f"container {name!r} is {box.state}: stop it first")
            spec = dataclasses.replace(box.spec, volumes=tuple(volumes))
            validate.check_volumes(spec)
            box.spec = spec
            return box.info()

    def add_volume_live(self, name: str, volume) -> ContainerInfo:
        """containers.runtime.SupportsLiveVolumes: only while running or paused."""
        with self._lock:
            box = self._box(name)
            if box.state not in ("running", "paused"):
                raise Conflict(f"container {name!r} is {box.state}: it takes the volume at its next start")
            if any(c in (".", "..") for c in volume.destination.split("/")):
                raise Unprocessable(f"mount path {volume.destination!r}: no '.' or '..' components")
            spec = dataclasses.replace(box.spec, volumes=tuple(box.spec.volumes) + (volume,))
            validate.check_volumes(spec)
            box.spec = spec
            return box.info()

    def remove_volume_live(self, name: str, destination: str) -> ContainerInfo:
        """containers.runtime.SupportsLiveVolumes."""
        with self._lock:
            box = self._box(name)
            if box.state not in ("running", "paused"):
                raise Conflict(f"container {name!r} is {box.state}: detach it as a stopped container's")
            if not any(v.destination == destination for v in box.spec.volumes):
                raise NotFound(f"container {name!r} has no volume at {destination!r}")
            box.spec = dataclasses.replace(box.spec, volumes=tuple(
                v for v in box.spec.volumes if v.destination != destination))
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
            if box.spec.tty:
                box.tty = os.openpty()  # the pair's one termios: cooked, echo on
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
            box = self._boxes.pop(name, None)
            if box is not None and box.state in ("running", "paused"):
                self._exit(box, SIGTERM_EXIT)
            return box is not None

    def open_terminal(self, name: str) -> "_FakeTerminal":
        """containers.runtime.SupportsTerminal: the host side of the container's pty."""
        with self._lock:
            box = self._box(name)
            if not box.spec.tty:
                raise Conflict(f"container {name!r} was created without a TTY: it has no terminal to attach to")
            if box.tty is None:
                raise Conflict(f"container {name!r} is {box.state}: its terminal opens when it runs")
            return _FakeTerminal(os.dup(box.tty[0]))

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

    def reset_rootfs(self, name: str, image: RootfsImage | None = None) -> None:
        with self._lock:
            box = self._box(name)
            if box.state in ("running", "paused"):
                raise Conflict(f"container {name!r} is {box.state}: stop it before rebuilding its rootfs")
            if image is not None:
                if not image.command:
                    raise InvalidInput("no command: give one or use an image with a Cmd or Entrypoint")
                box.spec = dataclasses.replace(
                    box.spec, rootfs=dataclasses.replace(box.spec.rootfs, lowerdirs=tuple(image.lowerdirs)),
                    command=tuple(image.command), env=dict(image.env), workdir=image.workdir, user=image.user,
                    image_config={})
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

    def exec_interactive(self, name: str, options: ExecOptions) -> "_FakeExec":
        """containers.runtime.SupportsInteractiveExec: the interpreter on a thread."""
        if not options.command or not all(isinstance(a, str) and "\0" not in a for a in options.command):
            raise InvalidInput("exec needs a command: a non-empty list of strings without NUL")
        with self._lock:
            box = self._box(name)
            if box.state != "running":
                raise Conflict(f"container {name!r} is {box.state}: exec needs it running")
            user = options.user or resolve_process(box.spec)["user"]
            return _FakeExec(list(options.command), box.spec.hostname or name, user, options)

    def open_file(self, name: str, path: str):
        """containers.runtime.SupportsFiles."""
        from containers.files import FileInfo, check_path
        check_path(path)
        with self._lock:
            box = self._box(name)
            if self._is_dir(box, _norm(path)):
                mode, uid, gid = box.dirs.get(_norm(path), (0o755, 0, 0))
                return -1, FileInfo(0, mode, uid, gid, "directory")
            if _norm(path) not in box.files:
                raise NotFound(f"{path[:200]!r} does not exist in the container (pull)")
            data, mode, uid, gid = box.files[_norm(path)]
        fd = os.memfd_create("fake-file", os.MFD_CLOEXEC)
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd, FileInfo(len(data), mode, uid, gid)

    def put_file(self, name: str, path: str, read, *, uid: int = 0, gid: int = 0, mode: int = 0o644) -> int:
        from containers.files import check_path
        check_path(path)
        p = _norm(path)
        parent = p.rsplit("/", 1)[0] or "/"
        if p in FAKE_DIRS or p == "/":
            raise Conflict(f"{path[:200]!r} is a directory (push)")
        if not 0 <= mode <= 0o7777:
            raise InvalidInput(f"mode {mode:o} must be permission bits (at most 7777 octal)")
        chunks = []
        while data := read(1 << 20):
            chunks.append(data)
        with self._lock:
            box = self._box(name)
            if not self._is_dir(box, parent):
                raise NotFound(f"{parent[:200]!r} does not exist in the container (push: the parent directory)")
            if p in box.dirs:
                raise Conflict(f"{path[:200]!r} is a directory (push)")
            body = b"".join(chunks)
            box.files[p] = (body, mode, uid, gid)
            return len(body)

    def list_dir(self, name: str, path: str) -> tuple[list[dict], bool]:
        from containers.files import check_path
        check_path(path)
        p = _norm(path)
        with self._lock:
            box = self._box(name)
            if not self._is_dir(box, p):
                raise NotFound(f"{path[:200]!r} is not a directory in the container (list)")
            prefix = p.rstrip("/") + "/"
            out = {}
            for d in set(FAKE_DIRS) | set(box.dirs):
                if d.startswith(prefix) and d != p and "/" not in d[len(prefix):]:
                    mode, uid, gid = box.dirs.get(d, (0o755, 0, 0))
                    out[d[len(prefix):]] = {"type": "directory", "size": 0, "mode": f"{mode:04o}", "uid": uid,
                                            "gid": gid}
            for f, (data, mode, uid, gid) in box.files.items():
                if f.startswith(prefix) and "/" not in f[len(prefix):]:
                    out[f[len(prefix):]] = {"type": "file", "size": len(data), "mode": f"{mode:04o}", "uid": uid,
                                            "gid": gid}
        return [{"name": n, **out[n]} for n in sorted(out)], False

    def make_dir(self, name: str, path: str, *, uid: int = 0, gid: int = 0, mode: int = 0o755) -> None:
        from containers.files import check_path
        check_path(path)
        p = _norm(path)
        if not 0 <= mode <= 0o7777:
            raise InvalidInput(f"mode {mode:o} must be permission bits (at most 7777 octal)")
        with self._lock:
            box = self._box(name)
            if not self._is_dir(box, p.rsplit("/", 1)[0] or "/"):
                raise NotFound(f"the parent of {path[:200]!r} does not exist in the container (mkdir)")
            if self._is_dir(box, p) or p in box.files:
                raise Conflict(f"{path[:200]!r} exists in the container")
            box.dirs[p] = (mode, uid, gid)

    @staticmethod
    def _is_dir(box: _Box, path: str) -> bool:
        return path in FAKE_DIRS or path in box.dirs

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

    def bulk_stats(self, names) -> dict[str, dict]:
        """containers.runtime.SupportsBulkStats: stats() of each of ``names`` it knows."""
        out = {}
        for name in names:
            try:
                out[name] = self.stats(name)
            except NotFound:
                continue
        return out

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


def _norm(path: str) -> str:
    return posixpath.normpath("/" + path.lstrip("/")).replace("//", "/")


class _FakeTerminal:
    """containers.runtime.Terminal on a descriptor of a pty's host side."""

    def __init__(self, fd: int):
        os.set_blocking(fd, False)
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def read(self) -> bytes:
        try:
            return os.read(self.fd, 65536)
        except BlockingIOError:
            raise
        except OSError:  # EIO: the process's side closed (the container stopped)
            return b""

    def write(self, data: bytes) -> int:
        return os.write(self.fd, data)

    def resize(self, cols: int, rows: int) -> None:
        import fcntl
        import struct
        import termios
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close(self) -> None:
        os.close(self.fd)


class _FakeExec:
    """containers.runtime.ExecProcess of the fake interpreter: its output written, ``cat``
    copying its input, anything that keeps running waiting for its input to end."""

    pty: int | None
    stdin: int | None
    stdout: int | None
    stderr: int | None

    def __init__(self, command: list[str], hostname: str, user: str, o: ExecOptions):
        self.code: int | None = None
        self._peer: int | None
        self._err_w: int | None = None
        self._done = threading.Event()
        if o.tty:
            self.pty, self._peer = os.openpty()  # the pair's termios: cooked, echo on (a shell's terminal)
            self.stdin = self.stdout = self.stderr = None
            self._in, self._out = self._peer, self._peer
            self.resize(o.cols, o.rows)
        else:
            self.pty = self._peer = None
            in_r, self.stdin = os.pipe2(os.O_CLOEXEC)
            self.stdout, out_w = os.pipe2(os.O_CLOEXEC)
            self.stderr, err_w = os.pipe2(os.O_CLOEXEC)
            self._in, self._out, self._err_w = in_r, out_w, err_w
        threading.Thread(target=self._run, args=(command, hostname, user), daemon=True).start()

    def _run(self, command, hostname, user) -> None:
        argv = list(command)
        if argv[:2] == ["sh", "-c"] or argv[:2] == ["/bin/sh", "-c"]:
            argv = shlex.split(argv[2]) if len(argv) > 2 else ["true"]
        code, out = _interpret(["sh", "-c", shlex.join(argv)] if argv else ["true"], hostname, user)
        try:
            if out:
                os.write(self._out, out.encode())
            if code is None:  # cat copies; anything else waits for its input to end
                copy = argv and argv[0].rsplit("/", 1)[-1] == "cat"
                while data := os.read(self._in, 65536):
                    if self.pty is not None and b"\x04" in data:
                        break
                    if copy:
                        os.write(self._out, data)
                code = 0
        except OSError:
            code = 137 if self.code is None else self.code
        finally:
            self.code = code if self.code is None else self.code
            self._close_process_side()
            self._done.set()

    def _close_process_side(self) -> None:
        for attr in ("_peer", "_in", "_out", "_err_w"):
            fd = getattr(self, attr, None)
            if fd is not None:
                setattr(self, attr, None)
                try:
                    os.close(fd)
                except OSError:
                    pass

    def resize(self, cols: int, rows: int) -> None:
        import fcntl
        import struct
        import termios
        if self.pty is not None:
            fcntl.ioctl(self.pty, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def signal(self, sig: int) -> None:
        self.code = 128 + sig
        self.close_stdin()

    def close_stdin(self) -> None:
        if self.stdin is not None:
            os.close(self.stdin)
            self.stdin = None

    def wait(self, timeout: float | None = None) -> int | None:
        return self.code if self._done.wait(timeout) else None

    def kill(self) -> None:
        self.signal(9)
        if self.pty is not None and not self._done.is_set():
            os.write(self.pty, b"\x04")

    def release(self) -> None:
        if not self._done.is_set():
            self.kill()
            self._done.wait(5)
        for attr in ("pty", "stdout", "stderr"):
            fd = getattr(self, attr)
            if fd is not None:
                setattr(self, attr, None)
                os.close(fd)
        self.close_stdin()

