"""NBD exports of volumes, served by qemu-storage-daemon processes the agent starts.

Any volume with a host path (local qcow2/raw file) or an RBD image can be exported
read-write or read-only as ``nbd://host:port/name``; another host's QEMU (or qemu-img,
qemu-io) attaches it. One qemu-storage-daemon per export, listening on ``host`` (127.0.0.1
by default) on a free port. Exports are recorded in the state DB with the daemon's PID,
so ``reconcile()`` after an agent restart drops records of dead daemons and stops
daemons that are no longer wanted (only PIDs we recorded whose command line is still
our qemu-storage-daemon for that export).

Transport security (README "Migration transport security"): an export is served over TLS
and only to a client holding its credentials. ``tls="psk"`` (the default): a random key
per export in ``<run_dir>/nbd-<name>.tls/keys.psk`` (0600, identity = the export name),
handed to the one consumer (``Export.psk_dir``); ``tls="x509"``: the host's QEMU
certificate directory (ca-cert.pem, server-cert.pem, server-key.pem; the migration CA),
``verify-peer=on``: only a client with a certificate of that CA; ``tls="none"`` only on a
loopback address. ``client_options()`` gives qemu-img/qemu-io what a client needs.

Lifecycle: absent -> create() -> serving -> delete() -> absent.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
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
TLS_MODES = ("psk", "x509", "none")
PSK_BYTES = 32  # 256-bit key per export
TLS_ID = "nbdtls"  # the tls-creds object's id on both ends

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
    "ALTER TABLE nbd_exports ADD COLUMN tls TEXT NOT NULL DEFAULT 'none'",  # exports made before TLS
    # what the caller exported ("volume:<id>", "image:<id>"); '' for exports made without one
    "ALTER TABLE nbd_exports ADD COLUMN source TEXT NOT NULL DEFAULT ''",
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
    tls: str = "none"  # psk | x509 | none
    psk_dir: str | None = None  # tls="psk": the directory with keys.psk a client needs (0700, root)
    x509_dir: str | None = None  # tls="x509": the certificate directory the server uses
    source: str = ""  # the caller's name for what is exported (e.g. "volume:<id>")
    created_at: float = 0.0


class NbdExports:
    """The host's NBD exports. ``run_dir`` holds each daemon's log and pid file."""

    def __init__(self, db: Database, run_dir: str, *, host: str = "127.0.0.1", tls: str = "psk",
                 x509_dir: str | None = None):
        if tls not in TLS_MODES:
            raise InvalidInput(f"NBD tls must be one of {', '.join(TLS_MODES)}, got {tls!r}")
        if tls == "x509" and not x509_dir:
            raise InvalidInput("NBD tls=x509 needs x509_dir (the host's QEMU certificate directory)")
        if tls == "none" and not ipaddress.ip_address(host).is_loopback:
            raise InvalidInput(f"an NBD export on {host} must use TLS (psk or x509): plain NBD only on loopback")
        self.db = db
        self.run_dir = Path(run_dir)
        self.host = host
        self.tls = tls
        self.x509_dir = x509_dir
        db.apply_schema("nbd", SCHEMA_STEPS)

    def create(self, name: str, volume: Volume, *, readonly: bool = False,
               port: int | None = None, source: str = "") -> Export:
        """Export ``volume`` as ``name``. Conflict if the name is taken; on failure the
        daemon is stopped and nothing (no record, no key) is left. A read-only export of a
        raw volume shares it (``force-share``): it may be read while another process (a
        running VM's QEMU) writes it, as a crash-consistent view; a qcow2 one may not."""
        if not name or len(name) > 64 or not set(name) <= EXPORT_NAME_CHARS:
            raise InvalidInput(f"bad export name {name!r}: use letters, digits, '.', '_', '-'")
        if self.find(name) is not None:
            raise Conflict(f"NBD export {name} already exists")
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pid, port = self._spawn(name, volume, readonly, port, new_key=True)
        try:
            with self.db.tx() as c:
                c.execute("INSERT INTO nbd_exports(name, pool, volume, host, port, readonly, pid,"
                          " created_at, tls, source) VALUES(?,?,?,?,?,?,?,?,?,?)",
                          (name, volume.pool, volume.name, self.host, port, int(readonly),
                           pid, time.time(), self.tls, source))
        except BaseException:
            _stop(pid, name)
            self._forget_files(name)
            raise
        return self.get(name)

    def _spawn(self, name: str, volume: Volume, readonly: bool, port: int | None, *,
               new_key: bool) -> tuple[int, int]:
        """Start the daemon serving ``volume`` as ``name`` on ``port`` (None: a free one) and
        wait until it listens; (pid, port). ``new_key``: a fresh PSK, else the export's
        existing one (kept by revive(): its clients hold it). On failure the daemon is
        stopped and, with ``new_key``, its files removed."""
        blockdevs = _blockdevs(volume, readonly, self.run_dir / f"nbd-{name}.key")
        port = port or _free_port(self.host)
        log_path = self.run_dir / f"nbd-{name}.log"
        tls_args, tls_opt = self._server_tls(name, new_key=new_key)
        argv = [DAEMON, *blockdevs, *tls_args,
                "--nbd-server", f"addr.type=inet,addr.host={self.host},addr.port={port}{tls_opt}",
                "--export", f"type=nbd,id=exp-{name},node-name=disk,name={name},"
                            f"writable={'off' if readonly else 'on'}"]
        try:
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True, close_fds=True)
        except FileNotFoundError:
            if new_key:
                self._forget_files(name)
            raise Unavailable(f"{DAEMON} is missing: apt-get install -y qemu-system-x86 "
                              "(and qemu-block-extra for RBD volumes)") from None
        try:
            _wait_listening(proc, self.host, port, log_path)
        except BaseException:
            _stop(proc.pid, name)
            if new_key:
                self._forget_files(name)
            raise
        return proc.pid, port

    def revive(self, name: str, volume: Volume) -> tuple[Export, bool]:
        """After an agent restart or a host reboot: the export ``name`` served again as
        recorded, with the key its clients hold. A live daemon of ours on the configured
        address is kept (adopted); one on another address is stopped and the export made
        again on the configured one (its recorded port if it is free there). (export,
        True if a daemon was started). NotFound if there is no such export; on failure
        the record stays (the next start tries again)."""
        e = self.get(name)
        live = _is_ours(e.pid, name)
        if live and e.host == self.host and e.tls == self.tls:
            return e, False
        if live:
            _stop(e.pid, name)
        if e.tls != self.tls or (e.tls == "psk" and not (self._psk_dir(name) / "keys.psk").is_file()):
            new_key = True  # the transport changed (or the key is lost): clients need new credentials
        else:
            new_key = False
        port = e.port if _port_free(self.host, e.port) else None
        pid, port = self._spawn(name, volume, e.readonly, port, new_key=new_key)
        self.db.execute("UPDATE nbd_exports SET pid=?, port=?, host=?, tls=? WHERE name=?",
                        (pid, port, self.host, self.tls, name))
        return self.get(name), True

    def psk(self, name: str) -> str | None:
        """The export's pre-shared key (hex), for its one consumer; None if it has none."""
        try:
            line = (self._psk_dir(name) / "keys.psk").read_text().strip()
        except FileNotFoundError:
            return None
        return line.partition(":")[2] or None

    def _psk_dir(self, name: str) -> Path:
        return self.run_dir / f"nbd-{name}.tls"

    def _server_tls(self, name: str, *, new_key: bool = True) -> tuple[list[str], str]:
        """The daemon's tls-creds object and the --nbd-server option naming it."""
        if self.tls == "none":
            return [], ""
        if self.tls == "x509":
            return (["--object", f"tls-creds-x509,id={TLS_ID},dir={_escape(self.x509_dir)},endpoint=server,"
                                 "verify-peer=on"], f",tls-creds={TLS_ID}")
        d = self._psk_dir(name)
        if new_key:
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(mode=0o700)
            fd = os.open(d / "keys.psk", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{name}:{secrets.token_hex(PSK_BYTES)}\n")
        return (["--object", f"tls-creds-psk,id={TLS_ID},dir={_escape(str(d))},endpoint=server"],
                f",tls-creds={TLS_ID}")

    def get(self, name: str) -> Export:
        e = self.find(name)
        if e is None:
            raise NotFound(f"NBD export {name} not found")
        return e

    def find(self, name: str) -> Export | None:
        row = self.db.one("SELECT * FROM nbd_exports WHERE name=?", (name,))
        return self._export(row) if row else None

    def list(self) -> list[Export]:
        return [self._export(r) for r in self.db.query("SELECT * FROM nbd_exports ORDER BY name")]

    def _export(self, row) -> Export:
        return Export(name=row["name"], pool=row["pool"], volume=row["volume"], host=row["host"],
                      port=row["port"], readonly=bool(row["readonly"]), pid=row["pid"],
                      uri=f"nbd://{row['host']}:{row['port']}/{row['name']}", tls=row["tls"],
                      psk_dir=str(self._psk_dir(row["name"])) if row["tls"] == "psk" else None,
                      x509_dir=self.x509_dir if row["tls"] == "x509" else None, source=row["source"],
                      created_at=row["created_at"])

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
        shutil.rmtree(self._psk_dir(name), ignore_errors=True)

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


def client_options(e: Export, fmt: str = "raw", *, psk_dir: str | None = None,
                   x509_dir: str | None = None) -> list[str]:
    """qemu-img / qemu-io arguments that open export ``e`` as a client with its TLS
    credentials: ``--object`` (if TLS) then ``--image-opts`` and the image options. A
    PSK client needs the export's key directory (``psk_dir``, default the export's own);
    an x509 client a directory with ca-cert.pem, client-cert.pem and client-key.pem."""
    opts = (f"driver={fmt},file.driver=nbd,file.server.type=inet,file.server.host={e.host},"
            f"file.server.port={e.port},file.export={e.name}")
    if e.tls == "none":
        return ["--image-opts", opts]
    if e.tls == "psk":
        obj = f"tls-creds-psk,id={TLS_ID},dir={_escape(psk_dir or e.psk_dir)},endpoint=client,username={e.name}"
    else:
        obj = f"tls-creds-x509,id={TLS_ID},dir={_escape(x509_dir or e.x509_dir)},endpoint=client"
    return ["--object", obj, "--image-opts", f"{opts},file.tls-creds={TLS_ID}"]


def _blockdevs(volume: Volume, readonly: bool, key_path: Path) -> list[str]:
    """--object/--blockdev arguments: a protocol node (file or rbd) and, for qcow2, a format
    node on top; the top node is named "disk". An RBD key goes in a 0600 file (not argv)."""
    ro = ",read-only=on" if readonly else ""
    if readonly and volume.format == "raw":  # readable while a writer holds it (see create())
        ro += ",force-share=on"
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


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


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
