"""NBD exports of volumes, served by qemu-storage-daemon processes the agent starts.

Any volume with a host path (local qcow2/raw file) or an RBD image can be exported
read-write or read-only as ``nbd://host:port/name``; another host's QEMU (or qemu-img,
qemu-io) attaches it. One qemu-storage-daemon per export, listening on ``host`` (127.0.0.1
by default) on a free port. Exports are recorded in the state DB with the daemon's PID,
so ``reconcile()`` after an agent restart drops records of dead daemons and stops
daemons that are no longer wanted (only PIDs we recorded whose command line is still
our qemu-storage-daemon for that export).

Lifecycle: absent -> create() -> serving -> delete() -> absent.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from agent.errors import CommandFailed, Conflict, InvalidInput, NotFound, Unavailable
from agent.state import Database
from storage.backend import Volume

DAEMON = "qemu-storage-daemon"
READY_TIMEOUT = 15  # seconds for the daemon to listen
STOP_TIMEOUT = 5  # seconds between SIGTERM and SIGKILL
EXPORT_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")

SCHEMA_STEPS = [
    """CREATE TABLE nbd_exports (
        name TEXT PRIMARY KEY,
        pool TEXT NOT NULL,
        volume TEXT NOT NULL,
        host TEXT NOT NULL,
        port INTEGER NOT NULL,
        readonly INTEGER NOT NULL,
        pid INTEGER NOT NULL,
        created_at REAL NOT NULL
    )""",
]


@dataclass(frozen=True)
class Export:
    name: str
    pool: str
    volume: str
    host: str
    port: int
    readonly: bool
    pid: int
    uri: str  # nbd://host:port/name


class NbdExports:
    """The host's NBD exports. ``run_dir`` holds each daemon's log and pid file."""

    def __init__(self, db: Database, run_dir: str, *, host: str = "127.0.0.1"):
        self.db = db
        self.run_dir = Path(run_dir)
        self.host = host
        db.apply_schema("nbd", SCHEMA_STEPS)

    def create(self, name: str, volume: Volume, *, readonly: bool = False,
               port: int | None = None) -> Export:
        """Export ``volume`` as ``name``. Conflict if the name is taken; on failure the
        daemon is stopped and nothing is recorded."""
        if not name or len(name) > 64 or not set(name) <= EXPORT_NAME_CHARS:
            raise InvalidInput(f"bad export name {name!r}: use letters, digits, '.', '_', '-'")
        if self.find(name) is not None:
            raise Conflict(f"NBD export {name} already exists")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        blockdevs = _blockdevs(volume, readonly, self.run_dir / f"nbd-{name}.key")
        port = port or _free_port(self.host)
        log_path = self.run_dir / f"nbd-{name}.log"
        argv = [DAEMON, *blockdevs,
                "--nbd-server", f"addr.type=inet,addr.host={self.host},addr.port={port}",
                "--export", f"type=nbd,id=exp-{name},node-name=disk,name={name},"
                            f"writable={'off' if readonly else 'on'}"]
        try:
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True, close_fds=True)
        except FileNotFoundError:
            raise Unavailable(f"{DAEMON} is missing: apt-get install -y qemu-system-x86 "
                              "(and qemu-block-extra for RBD volumes)") from None
        try:
            _wait_listening(proc, self.host, port, log_path)
            with self.db.tx() as c:
                c.execute("INSERT INTO nbd_exports(name, pool, volume, host, port, readonly, pid,"
                          " created_at) VALUES(?,?,?,?,?,?,?,?)",
                          (name, volume.pool, volume.name, self.host, port, int(readonly),
                           proc.pid, time.time()))
        except BaseException:
            _stop(proc.pid, name)
            self._forget_files(name)
            raise
        return self.get(name)

    def get(self, name: str) -> Export:
        e = self.find(name)
        if e is None:
            raise NotFound(f"NBD export {name} not found")
        return e

    def find(self, name: str) -> Export | None:
        row = self.db.one("SELECT * FROM nbd_exports WHERE name=?", (name,))
        return _export(row) if row else None

    def list(self) -> list[Export]:
        return [_export(r) for r in self.db.query("SELECT * FROM nbd_exports ORDER BY name")]

    def delete(self, name: str) -> bool:
        """Stop the daemon and forget the export; False if there was none."""
        e = self.find(name)
        if e is None:
            return False
        _stop(e.pid, name)
        self.db.execute("DELETE FROM nbd_exports WHERE name=?", (name,))
        self._forget_files(name)
        return True

    def _forget_files(self, name: str) -> None:
        for suffix in (".key", ".log"):
            try:
                os.unlink(self.run_dir / f"nbd-{name}{suffix}")
            except FileNotFoundError:
                pass

    def reconcile(self, wanted: set[str] | None = None) -> dict:
        """After a restart: forget exports whose daemon is gone; stop (by recorded PID, after
        checking its command line) those not in ``wanted`` (None: keep every live one)."""
        removed, stopped = [], []
        for e in self.list():
            if not _is_ours(e.pid, e.name):
                self.db.execute("DELETE FROM nbd_exports WHERE name=?", (e.name,))
                self._forget_files(e.name)
                removed.append(e.name)
            elif wanted is not None and e.name not in wanted:
                self.delete(e.name)
                stopped.append(e.name)
        return {"removed": removed, "stopped": stopped}


def _export(row) -> Export:
    return Export(name=row["name"], pool=row["pool"], volume=row["volume"], host=row["host"],
                  port=row["port"], readonly=bool(row["readonly"]), pid=row["pid"],
                  uri=f"nbd://{row['host']}:{row['port']}/{row['name']}")


def _blockdevs(volume: Volume, readonly: bool, key_path: Path) -> list[str]:
    """--object/--blockdev arguments: a protocol node (file or rbd) and, for qcow2, a format
    node on top; the top node is named "disk". An RBD key goes in a 0600 file (not argv)."""
    ro = ",read-only=on" if readonly else ""
    args: list[str] = []
    if volume.path and volume.format in ("qcow2", "raw"):
        if not os.path.isfile(volume.path):
            raise NotFound(f"volume {volume.name}: {volume.path} does not exist")
        proto = f"driver=file,filename={_escape(volume.path)},node-name=proto{ro}"
    elif volume.uri.startswith("rbd:"):
        a = volume.attach
        proto = (f"driver=rbd,pool={_escape(a['pool'])},image={_escape(a['image'])},"
                 f"conf={_escape(a['conf'])},user={_escape(a['user'])},node-name=proto{ro}")
        if a.get("key"):
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(a["key"])
            args += ["--object", f"secret,id=rbdkey,file={_escape(str(key_path))},format=base64"]
            proto += ",key-secret=rbdkey"
    else:
        raise InvalidInput(f"volume {volume.name} ({volume.format}, {volume.uri or 'no uri'}) "
                           "cannot be exported over NBD: only file and RBD disk volumes")
    args += ["--blockdev", proto]
    if volume.format == "qcow2":
        args += ["--blockdev", f"driver=qcow2,file=proto,node-name=disk{ro}"]
    else:
        args += ["--blockdev", f"driver=raw,file=proto,node-name=disk{ro}"]
    return args


def _escape(value: str) -> str:
    """QEMU option values escape ',' by doubling it."""
    return str(value).replace(",", ",,")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_listening(proc: subprocess.Popen, host: str, port: int, log_path: Path) -> None:
    end = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise CommandFailed(f"{DAEMON} exited {proc.returncode}: "
                                f"{log_path.read_text(errors='replace').strip()[-800:]}",
                                argv=proc.args, returncode=proc.returncode)
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise CommandFailed(f"{DAEMON} did not listen on {host}:{port} within {READY_TIMEOUT}s: "
                        f"see {log_path}", argv=proc.args)


def _is_ours(pid: int, name: str) -> bool:
    """True if ``pid`` is a live qemu-storage-daemon serving export ``name`` (PIDs get reused)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return (bool(argv) and os.path.basename(argv[0]) == DAEMON.encode()
            and any(a.startswith(b"type=nbd,id=exp-" + name.encode() + b",") for a in argv))


def _stop(pid: int, name: str) -> None:
    """SIGTERM (then SIGKILL) the daemon of export ``name``, only if it still is ours."""
    if not _is_ours(pid, name):
        _reap(pid)
        return
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < end:
        _reap(pid)
        if not _is_ours(pid, name):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
