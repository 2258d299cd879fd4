"""Agent configuration: one TOML file with validated, embedded defaults.

Lookup order for the file: ``--config`` flag, then ``$NODEAGENT_CONFIG``, then
``/etc/nodeagent/agent.toml``. A missing default file means "embedded defaults";
a missing file that was named explicitly is an error. ``$NODEAGENT_STATE_DIR`` and
``$NODEAGENT_LISTEN`` override those two keys after the file is read.
"""
from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import InvalidInput

DEFAULT_PATH = "/etc/nodeagent/agent.toml"
DEFAULT_STATE_DIR = "/var/lib/nodeagent"
DEFAULT_PORT = 8470  # unassigned by IANA; the agent's well-known port


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApiConfig(_Strict):
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    threads: int = Field(16, ge=1, le=256)
    tls_cert: str | None = None
    tls_key: str | None = None
    client_ca: str | None = None  # when set, clients must present a cert signed by it
    # a client certificate's identity (its subject CN or a DNS name of its SAN) -> role, used
    # when a request carries no bearer token: {"cp.example" = "admin", "host2" = "peer"}
    cert_roles: dict[str, str] = Field(default_factory=dict)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)  # 1 MiB: API bodies are small JSON
    # what one client may hold (see agent/httpserver.py): nothing it holds is a request thread
    header_timeout: float = Field(10.0, gt=0, le=300)  # seconds for a request's head (and a TLS handshake)
    body_timeout: float = Field(30.0, gt=0, le=3600)  # seconds for a JSON body; a streamed body's longest stall
    keepalive_timeout: float = Field(30.0, gt=0, le=3600)  # seconds an open connection may idle between requests
    write_timeout: float = Field(30.0, gt=0, le=3600)  # seconds a client may leave its response unread
    max_connections: int = Field(4096, ge=1, le=16384)  # open connections in all; more are closed at once
    max_connections_per_client: int = Field(256, ge=1, le=16384)  # from one address
    max_streams: int = Field(1024, ge=1, le=4096)  # long requests (event streams, waits, peer transfers) in all
    max_streams_per_client: int = Field(128, ge=1, le=4096)  # from one address; more get 503
    # a websocket (console, exec) silent this long gets a ping; silent as long again, it is dropped
    ws_ping_interval: float = Field(30.0, gt=0, le=3600)
    event_replay: int = Field(10_000, ge=0, le=1_000_000)  # events kept (state DB) for Last-Event-ID replay
    access_log: bool = True  # one INFO line per request (logger agent.access); about 60 us of the loop each

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"listen must be HOST:PORT, got {v!r}")
        return v

    @model_validator(mode="after")
    def _tls_pair(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.cert_roles and not self.client_ca:
            raise ValueError("cert_roles needs client_ca (and tls_cert, tls_key): without it no client "
                             "certificate is asked for")
        if self.client_ca and not self.tls_cert:
            raise ValueError("client_ca needs tls_cert and tls_key: client certificates come with TLS")
        for ident, role in self.cert_roles.items():
            if role not in ("admin", "reader", "peer"):
                raise ValueError(f"cert_roles[{ident!r}] = {role!r}: a role is admin, reader or peer")
            if not ident or len(ident) > 253 or not ident.isprintable():
                raise ValueError(f"cert_roles key {ident[:80]!r}: a certificate's CN or DNS name")
        return self


class PoolConfig(BaseModel):
    """A storage pool. ``kind`` picks the backend; other keys are the backend's options."""

    model_config = ConfigDict(extra="allow")
    kind: str = "local"

    def options(self) -> dict:
        return dict(self.model_extra or {})


class ImagesConfig(_Strict):
    """Image imports. Sources are untrusted: ``source.path`` must lie (after resolving
    symlinks) under one of ``import_dirs`` (default ``<state_dir>/import``); URLs and
    registries may not reach loopback, link-local, unspecified, multicast or this host's
    own addresses unless a network in ``allow_url_hosts`` (CIDRs) holds the address."""

    max_layer_bytes: int = Field(8 * 1024**3, ge=1024)  # unpacked size cap per layer (bomb guard)
    max_layer_ratio: int = Field(200, ge=1)  # unpacked/compressed cap per layer
    max_layer_entries: int = Field(1_000_000, ge=1)  # members per layer (inode bomb guard)
    import_dirs: list[str] | None = None  # None: [<state_dir>/import]
    allow_url_hosts: list[str] = Field(default_factory=list)  # CIDRs URLs/registries may reach anyway
    max_image_bytes: int = Field(256 * 1024**3, ge=1024)  # 256 GiB: a URL download's cap
    stall_timeout: float = Field(60, gt=0, le=3600)  # seconds without progress that fail a download
    gc_interval: float = Field(3600, ge=0)  # seconds between image gc runs; 0: only on demand

    @field_validator("import_dirs")
    @classmethod
    def _abs_dirs(cls, v):
        for d in v or ():
            if not os.path.isabs(d):
                raise ValueError(f"import_dirs entries must be absolute paths, got {d!r}")
        return v

    @field_validator("allow_url_hosts")
    @classmethod
    def _cidrs(cls, v):
        import ipaddress
        for c in v:
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError:
                raise ValueError(f"allow_url_hosts entries must be CIDRs like 10.1.0.0/16 or "
                                 f"addresses, got {c!r}") from None
        return v


class HypervisorConfig(_Strict):
    driver: str = "libvirt"
    uri: str = "qemu:///system"
    virt_type: str = "auto"  # auto | kvm | qemu (TCG)
    # how peers' libvirtds reach this host's for incoming migrations; None: qemu+tls://<api.listen host>/system
    # (qemu+tcp:// with [migration] tls off)
    migration_uri: str | None = None
    # the guests' CPU (README "CPU model"): "host-model" (under KVM libvirt expands the host's
    # CPU to a migratable model; under TCG QEMU's default) or a named model every host of a
    # group runs (e.g. "Haswell-noTSX" under KVM, "qemu64" under TCG): hosts of one cpu_group
    # set the same cpu_model, so their VMs move between them freely; a guest of another model
    # is refused before anything moves
    cpu_model: str = Field("host-model", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    cpu_group: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

    @field_validator("virt_type")
    @classmethod
    def _virt(cls, v: str) -> str:
        if v not in ("auto", "kvm", "qemu"):
            raise ValueError("virt_type must be auto, kvm or qemu")
        return v


LIBVIRT_PKI = "/etc/pki"  # libvirt's default client files: CA/cacert.pem, libvirt/clientcert.pem, ...


class MigrationConfig(_Strict):
    """Transport security of VM migration between peers (README "Migration transport
    security"). With ``tls`` on, this host's libvirtd connects to a peer's over TLS
    (``qemu+tls``, each side checks the other's certificate) and QEMU's migration stream
    and the disk copy (NBD) are TLS too; a peer that answers anything but qemu+tls is
    refused. ``tls`` unset: on when this host's client files exist. ``pki_path``: a
    directory with cacert.pem, clientcert.pem and clientkey.pem (libvirt's ``pkipath``);
    unset: libvirt's defaults /etc/pki/CA/cacert.pem, /etc/pki/libvirt/clientcert.pem,
    /etc/pki/libvirt/private/clientkey.pem."""

    tls: bool | None = None
    pki_path: str | None = None
    # The default policy of live VM migrations (README "Migration controls"); a request's own
    # controls override each. Pre-copy first; auto-converge throttles a guest that dirties memory
    # faster than it is copied; where post-copy is allowed (and the kernel has userfaultfd) a copy
    # that stopped converging (postcopy_after_stalled memory passes in a row that did not shrink
    # the dirty set) switches to post-copy, so a busy guest always finishes, while one that
    # converges ends in pre-copy, its downtime within max_downtime_ms. postcopy_after_s and
    # postcopy_after_iterations are backstops (a dirty set that keeps shrinking, slowly).
    max_downtime_ms: int = Field(300, ge=1, le=60_000)  # libvirt's default too
    bandwidth_mib_s: int | None = Field(None, ge=1)  # None: unlimited
    auto_converge: bool = True
    postcopy: bool = True
    postcopy_after_stalled: int | None = Field(3, ge=1)  # None: the convergence rule is off
    postcopy_after_s: float | None = Field(60.0, gt=0)  # None: the time bound is off
    postcopy_after_iterations: int | None = Field(None, ge=1)  # None: the pass-count bound is off
    completion_timeout_s: float | None = Field(None, gt=0)  # None: no timeout (cancel still works)
    timeout_action: str = "abort"  # abort | pause | postcopy
    # A post-copy whose link broke (the guest split between the hosts, README "Post-copy
    # failures") is resumed by the migration itself when the destination answers again within
    # this window, at most this many resume attempts; then the guest stays paused, split, in
    # state error, until POST /v1/migrations/{id}/resume. 0 attempts: never on its own.
    postcopy_resume_window_s: float = Field(60.0, ge=0, le=86_400)
    postcopy_resume_attempts: int = Field(3, ge=0, le=100)

    @field_validator("timeout_action")
    @classmethod
    def _action(cls, v: str) -> str:
        if v not in ("abort", "pause", "postcopy"):
            raise ValueError(f"timeout_action must be abort, pause or postcopy, got {v!r}")
        return v

    @field_validator("pki_path")
    @classmethod
    def _abs(cls, v):
        if v is not None and not re.fullmatch(r"/[A-Za-z0-9._/-]*", v):  # it goes into a libvirt URI
            raise ValueError(f"pki_path must be an absolute directory path, got {v!r}")
        return v

    def client_files(self) -> list[str]:
        """The files libvirt presents to a peer as this host's client identity."""
        if self.pki_path:
            return [os.path.join(self.pki_path, n) for n in ("cacert.pem", "clientcert.pem", "clientkey.pem")]
        return [f"{LIBVIRT_PKI}/CA/cacert.pem", f"{LIBVIRT_PKI}/libvirt/clientcert.pem",
                f"{LIBVIRT_PKI}/libvirt/private/clientkey.pem"]

    @property
    def tls_enabled(self) -> bool:
        if self.tls is not None:
            return self.tls
        return all(os.path.isfile(f) for f in self.client_files())


class ContainersConfig(_Strict):
    runtime: str = "runc"
    cgroup_parent: str | None = None  # None: the runtime's default ("nodeagent"); one per agent on a shared cgroupfs
    # runc's cgroup manager: auto (systemd where systemd is PID 1: each container a scope
    # <cgroup_parent>-<name>.scope in <cgroup_parent>.slice), systemd, or cgroupfs
    cgroup_driver: Literal["auto", "systemd", "cgroupfs"] = "auto"
    # bytes of stdout and of stderr an exec answer carries (the rest is read and dropped: truncated)
    exec_output_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    # "HOST_ID:SIZE": the host ids user-namespaced containers map to (container root = HOST_ID);
    # None: the `nodeagent` entry of /etc/subuid and /etc/subgid, allocated if missing
    idmap: str | None = Field(None, pattern=r"^[0-9]{1,10}:[0-9]{1,10}$")
    # "default" (Docker's default-deny allow-list, containers/seccomp_default.json), "unconfined"
    # (no filter), or an absolute path to a profile in Docker's or OCI's format
    seccomp_profile: str = "default"
    no_new_privileges: bool = False  # Docker's default; true: setuid/file caps never raise privileges

    @field_validator("seccomp_profile")
    @classmethod
    def _profile(cls, v: str) -> str:
        if v not in ("default", "unconfined") and not os.path.isabs(v):
            raise ValueError('seccomp_profile must be "default", "unconfined" or an absolute path '
                             f"to a profile file, got {v!r}")
        if v != "unconfined":
            from containers import seccomp
            try:
                seccomp.profile_for(v)  # a missing or malformed file is refused at start
            except InvalidInput as e:
                raise ValueError(e.message) from None
        return v


class NetworkConfig(_Strict):
    bridge: str = "nabr0"
    subnet: str = "10.88.0.0/24"
    nat: bool = True
    # what reaches an instance that no security-group rule allows (containers/firewall.py):
    # same-group (from members of a group it is in), deny (nothing), allow (everything)
    default_policy: Literal["same-group", "deny", "allow"] = "same-group"


class PeerConfig(_Strict):
    url: str
    token: str | None = None
    # TLS towards the peer: a CA bundle to verify its certificate, and our client certificate
    # when it requires one (its [api] client_ca; its [api.cert_roles] may map us to "peer")
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


class MetricsConfig(_Strict):
    # seconds between pool usage readings for /metrics (an object pool's usage lists its bucket)
    pool_usage_interval: float = Field(60, ge=1, le=86400)


class OperationsConfig(_Strict):
    """Finished operations kept for GET /v1/operations (agent/operations.py): those older than
    ``retention`` seconds and those beyond the ``max_finished`` newest are removed at start and
    every ``prune_interval`` seconds; unfinished ones never are."""

    retention: float = Field(7 * 86400, ge=60, le=10 * 365 * 86400)  # seconds after an operation finished
    max_finished: int = Field(10_000, ge=100, le=10_000_000)  # finished operations kept at most (newest)
    prune_interval: float = Field(600, ge=1, le=86400)  # seconds between two prunes


class NbdConfig(_Strict):
    """NBD exports (POST /v1/exports; README "NBD exports"): each is a qemu-storage-daemon
    listening on ``host`` only (an address of this host; 127.0.0.1 by default: reachable from
    this host alone), over TLS: ``psk`` (a random key per export, handed out once at create),
    ``x509`` (the certificates in ``x509_dir``: ca-cert.pem, server-cert.pem, server-key.pem;
    a client needs one of that CA) or ``none`` (plain NBD: only on a loopback address)."""

    host: str = "127.0.0.1"
    tls: Literal["psk", "x509", "none"] = "psk"
    x509_dir: str | None = None

    @field_validator("host")
    @classmethod
    def _ip(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"nbd.host must be an IP address of this host, got {v!r}") from None
        return v

    @model_validator(mode="after")
    def _transport(self):
        if self.tls == "x509" and not (self.x509_dir and os.path.isabs(self.x509_dir)):
            raise ValueError("nbd.tls = \"x509\" needs nbd.x509_dir (an absolute directory with ca-cert.pem, "
                             "server-cert.pem, server-key.pem)")
        if self.tls == "none" and not ipaddress.ip_address(self.host).is_loopback:
            raise ValueError(f"nbd.tls = \"none\" only on a loopback address (nbd.host is {self.host}): "
                             "use psk or x509")
        return self


LOG_TARGETS = ("auto", "stderr", "journal", "file")


class Config(_Strict):
    state_dir: str = DEFAULT_STATE_DIR
    log_level: str = "info"
    log_format: str = "json"  # json | text
    # auto: journald under systemd ($JOURNAL_STREAM set and its socket present), else log_file if
    # set, else stderr
    log_target: str = "auto"
    log_file: str | None = None  # the daemon's log file (absolute path)
    # rotate log_file past this size, keeping log_backups old files; 0: never rotate here (an external
    # logrotate moves the file and the agent reopens it: WatchedFileHandler)
    log_max_bytes: int = Field(64 * 1024 * 1024, ge=0)
    log_backups: int = Field(5, ge=0, le=100)
    workers: int = Field(8, ge=1, le=128)  # operation worker pool size
    # where the kernel's id of this boot is read: a new id at start means the host rebooted
    # (instances with autostart that were running are started again); tests point it at a file
    boot_id_path: str = "/proc/sys/kernel/random/boot_id"
    default_pool: str | None = None  # None: "default" if defined, else the first pool
    api: ApiConfig = ApiConfig()
    pools: dict[str, PoolConfig] = Field(default_factory=lambda: {"default": PoolConfig(kind="local")})
    images: ImagesConfig = ImagesConfig()
    hypervisor: HypervisorConfig = HypervisorConfig()
    migration: MigrationConfig = MigrationConfig()
    containers: ContainersConfig = ContainersConfig()
    network: NetworkConfig = NetworkConfig()
    peers: dict[str, PeerConfig] = Field(default_factory=dict)
    metrics: MetricsConfig = MetricsConfig()
    operations: OperationsConfig = OperationsConfig()
    nbd: NbdConfig = NbdConfig()

    @field_validator("log_target")
    @classmethod
    def _target(cls, v: str) -> str:
        if v not in LOG_TARGETS:
            raise ValueError(f"log_target must be one of {', '.join(LOG_TARGETS)}")
        return v

    @field_validator("log_file")
    @classmethod
    def _log_file(cls, v):
        if v is not None and not os.path.isabs(v):
            raise ValueError(f"log_file must be an absolute path, got {v!r}")
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("log_level must be debug, info, warning or error")
        return v.lower()

    @model_validator(mode="after")
    def _migration_transport(self):
        uri = self.hypervisor.migration_uri or ""
        if self.migration.tls and uri and not uri.startswith("qemu+tls://") and uri.startswith("qemu+"):
            raise ValueError(f"hypervisor.migration_uri {uri!r} is not qemu+tls:// but [migration] tls is on: "
                             "peers would refuse it (use qemu+tls://HOST/system)")
        return self

    @model_validator(mode="after")
    def _default_pool_exists(self):
        if not self.pools:
            raise ValueError("at least one pool must be configured")
        if self.default_pool is None:
            self.default_pool = "default" if "default" in self.pools else next(iter(self.pools))
        if self.log_target == "file" and not self.log_file:
            raise ValueError("log_target \"file\" needs log_file (an absolute path)")
        if self.default_pool not in self.pools:
            raise ValueError(f"default_pool {self.default_pool!r} is not one of the pools "
                             f"{sorted(self.pools)}")
        return self

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def db_path(self) -> Path:
        return self.state_path / "state.db"

    @property
    def import_dirs(self) -> list[str]:
        """Host directories ``source.path`` imports may read from."""
        if self.images.import_dirs is not None:
            return list(self.images.import_dirs)
        return [str(self.state_path / "import")]

    def pool_dir(self, name: str) -> Path:
        """Where a local pool keeps its files unless its config names a ``path``."""
        return self.state_path / "pools" / name


def load(path: str | None = None, env: dict | None = None) -> Config:
    """Read, validate and return the configuration; raise InvalidInput naming the bad key."""
    env = os.environ if env is None else env
    explicit = path or env.get("NODEAGENT_CONFIG")
    file = Path(explicit or DEFAULT_PATH)
    data: dict = {}
    if file.exists():
        try:
            data = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as e:
            raise InvalidInput(f"{file}: not valid TOML: {e}") from None
    elif explicit:
        raise InvalidInput(f"config file {file} does not exist")
    if env.get("NODEAGENT_STATE_DIR"):
        data["state_dir"] = env["NODEAGENT_STATE_DIR"]
    if env.get("NODEAGENT_LISTEN"):
        data.setdefault("api", {})["listen"] = env["NODEAGENT_LISTEN"]
    return parse(data, source=str(file))


def parse(data: dict, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors())
        raise InvalidInput(f"{source}: {problems}") from None
