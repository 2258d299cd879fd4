"""Agent configuration: one TOML file with validated, embedded defaults.

Lookup order for the file: ``--config`` flag, then ``$NODEAGENT_CONFIG``, then
``/etc/nodeagent/agent.toml``. A missing default file means "embedded defaults";
a missing file that was named explicitly is an error. ``$NODEAGENT_STATE_DIR`` and
``$NODEAGENT_LISTEN`` override those two keys after the file is read.
"""
from __future__ import annotations

import os
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
    # how peers' libvirtds reach this host's for incoming migrations; None: qemu+tcp://<api.listen host>/system
    migration_uri: str | None = None

    @field_validator("virt_type")
    @classmethod
    def _virt(cls, v: str) -> str:
        if v not in ("auto", "kvm", "qemu"):
            raise ValueError("virt_type must be auto, kvm or qemu")
        return v


class ContainersConfig(_Strict):
    runtime: str = "runc"
    cgroup_parent: str | None = None  # None: the runtime's default ("nodeagent"); one per agent on a shared cgroupfs
    # bytes of stdout and of stderr an exec answer carries (the rest is read and dropped: truncated)
    exec_output_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)


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


class Config(_Strict):
    state_dir: str = DEFAULT_STATE_DIR
    log_level: str = "info"
    log_format: str = "json"  # json | text
    workers: int = Field(8, ge=1, le=128)  # operation worker pool size
    default_pool: str | None = None  # None: "default" if defined, else the first pool
    api: ApiConfig = ApiConfig()
    pools: dict[str, PoolConfig] = Field(default_factory=lambda: {"default": PoolConfig(kind="local")})
    images: ImagesConfig = ImagesConfig()
    hypervisor: HypervisorConfig = HypervisorConfig()
    containers: ContainersConfig = ContainersConfig()
    network: NetworkConfig = NetworkConfig()
    peers: dict[str, PeerConfig] = Field(default_factory=dict)

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("log_level must be debug, info, warning or error")
        return v.lower()

    @model_validator(mode="after")
    def _default_pool_exists(self):
        if not self.pools:
            raise ValueError("at least one pool must be configured")
        if self.default_pool is None:
            self.default_pool = "default" if "default" in self.pools else next(iter(self.pools))
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
