"""The container seam: ``Runtime`` runs isolated, limited processes from a rootfs.

Terms: a *container* is ours by name; its rootfs is prepared by the storage layer
(overlayfs lower dirs + an upper dir) and mounted by the runtime. Lifecycle:
absent -> create() -> created -> start() -> running -> (exit | stop() | kill())
-> stopped -> start() again or delete() -> absent. delete() releases everything
the container had: mounts, cgroups, network devices, IP lease, ports.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from containers.bandwidth import Bandwidth

STATES = ("created", "running", "paused", "stopped", "unknown")


@dataclass(frozen=True)
class Limits:
    cpus: float | None = None  # CFS quota = cpus * period
    memory_mib: int | None = None  # swap off: memory+swap = memory
    pids_max: int | None = None
    io_weight: int | None = None  # 10..1000


@dataclass(frozen=True)
class PortMap:
    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = "127.0.0.1"


@dataclass(frozen=True)
class NetworkSpec:
    mode: str = "bridge"  # bridge | none | host
    ports: tuple[PortMap, ...] = ()


@dataclass(frozen=True)
class IdMap:
    """A user namespace's map: ids 0..size-1 inside are host_id.. on the host (uids and gids)."""
    host_id: int
    size: int

    def to_host(self, cid: int) -> int | None:
        """The host id of container id ``cid``; None if it is not mapped."""
        return self.host_id + cid if 0 <= cid < self.size else None

    def to_container(self, hid: int) -> int | None:
        """The container id of host id ``hid``; None if it is not in the range."""
        return hid - self.host_id if self.host_id <= hid < self.host_id + self.size else None


@dataclass(frozen=True)
class Rootfs:
    lowerdirs: tuple[str, ...]  # image layers, top first (overlayfs order)
    upperdir: str
    workdir: str
    # the container's writes are limited to this many bytes (ENOSPC beyond): upper and work
    # live on a filesystem of this size mounted at their parent dir; None: no limit
    quota_bytes: int | None = None


@dataclass(frozen=True)
class VolumeMount:
    """A volume in the container: ``source`` is a host file holding an ext4 filesystem (a
    local pool's volume), loop-mounted by the runtime on the host and bind-mounted at
    ``destination`` (an absolute path inside the container)."""
    source: str
    destination: str
    readonly: bool = False


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    rootfs: Rootfs
    command: tuple[str, ...]
    env: dict = field(default_factory=dict)
    workdir: str = "/"
    user: str = "0:0"
    hostname: str | None = None
    limits: Limits = Limits()
    network: NetworkSpec = NetworkSpec()
    # a user namespace: container root is an unprivileged host id (the runtime's host range,
    # recorded in ``idmap`` at create); False only for a privileged container (admin's choice)
    userns: bool = False
    bandwidth: Bandwidth = Bandwidth()  # rate limits of its bridge port (containers/bandwidth.py)
    # capabilities on top of / taken from the host's default set (containers/security.py); "ALL" allowed
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    idmap: IdMap | None = None
    # the image's OCI config (Cmd, Entrypoint, Env, WorkingDir, User); the spec's own
    # command/env/workdir/user win over it, Docker-style (Entrypoint + command)
    image_config: dict = field(default_factory=dict)
    volumes: tuple[VolumeMount, ...] = ()  # volumes mounted at create, kept across stop/start
    # its process runs on a terminal (OCI process.terminal): the monitor holds the terminal's
    # host side, its input comes from whoever attaches (SupportsTerminal), its output is logged
    tty: bool = False


@dataclass(frozen=True)
class ContainerInfo:
    name: str
    state: str  # one of STATES
    pid: int | None = None
    exit_code: int | None = None
    ip: str | None = None
    idmap: IdMap | None = None  # its user namespace's map; None: no user namespace (privileged)


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str
    truncated: bool = False  # stdout or stderr had more than the runtime keeps; the rest was read and dropped
    timed_out: bool = False  # killed at the timeout, with every process it started (exit_code 124)


@runtime_checkable
class Runtime(Protocol):
    idmap: IdMap  # the host range user-namespaced containers map to (one per host)
    uses_host_network: bool  # its containers sit on the host bridge (the agent keeps its filter)

    def create(self, spec: ContainerSpec) -> ContainerInfo:
        """Conflict on a name clash; on failure nothing (mount, cgroup, veth, lease) is left."""

    def start(self, name: str) -> ContainerInfo: ...

    def stop(self, name: str, *, timeout: float = 10) -> ContainerInfo:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""

    def kill(self, name: str, signal: int = 9) -> ContainerInfo: ...

    def restart(self, name: str, *, timeout: float = 10) -> ContainerInfo:
        """stop(timeout) then start(); the IP lease and ports are kept."""

    def delete(self, name: str) -> bool:
        """Stop if running and release everything; False if it was already gone."""

    def exec(self, name: str, command: list[str], *, timeout: float = 60) -> ExecResult:
        """Run ``command`` in the running container; at most the runtime's output limit of each
        stream is kept. At ``timeout`` the command and every process it started are killed."""
        ...

    def logs(self, name: str, tail: int | None = None) -> str: ...

    def stats(self, name: str) -> dict:
        """{cpu_ns, memory_bytes, pids, oom_kills, io: {read_bytes, write_bytes}, net: {rx_bytes,
        tx_bytes, rx_packets, tx_packets}}: counters since the container started"""

    def update_limits(self, name: str, limits: Limits) -> None: ...

    def get(self, name: str) -> ContainerInfo:
        """Raises NotFound."""

    def find(self, name: str) -> ContainerInfo | None: ...

    def list(self) -> list[ContainerInfo]: ...


@dataclass(frozen=True)
class ExecOptions:
    """An interactive process in a running container. ``user``: "UID" or "UID:GID" (numeric,
    as the container's namespace sees them; default the container's own user)."""
    command: tuple[str, ...]
    tty: bool = False
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    user: str | None = None
    cols: int = 80
    rows: int = 24


class ExecProcess(Protocol):
    """A running interactive exec. With a TTY ``pty`` is the terminal's host side (read: its
    output, write: its input) and the three pipes are None; without, ``stdin`` is writable and
    ``stdout``/``stderr`` readable raw file descriptors and ``pty`` is None. The caller closes
    nothing but calls ``release`` once, after ``wait``."""
    pty: int | None
    stdin: int | None
    stdout: int | None
    stderr: int | None

    def resize(self, cols: int, rows: int) -> None: ...

    def signal(self, sig: int) -> None:
        """Signal the exec'd process (only it: a TTY's ^C goes through the terminal)."""

    def close_stdin(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit code (128+N after signal N); None if still running after ``timeout``."""

    def kill(self) -> None:
        """SIGKILL it and every process it started in the container."""

    def release(self) -> None:
        """Close its descriptors and remove its files (kills it first if it still runs)."""


@runtime_checkable
class SupportsInteractiveExec(Protocol):
    """Runtimes that run an interactive process (a TTY, or stdin/stdout/stderr streams) in a
    running container."""

    def exec_interactive(self, name: str, options: ExecOptions) -> ExecProcess:
        """Start it; Conflict if the container does not run, InvalidInput for a bad option.
        On failure nothing is left running."""


class Terminal(Protocol):
    """The host's side of a TTY container's terminal, attached for one reader (the agent's
    console hub). ``fileno`` is readable when output (or the end) is there. Never blocks."""

    def fileno(self) -> int: ...

    def read(self) -> bytes:
        """The terminal's next output; b"" at its end (the container stopped, or its monitor
        went away); BlockingIOError if nothing is there yet."""

    def write(self, data: bytes) -> int:
        """Type ``data`` (a prefix of it: the bytes taken); BlockingIOError while the terminal
        takes nothing (poll ``fileno`` for writing)."""

    def resize(self, cols: int, rows: int) -> None: ...

    def close(self) -> None:
        """Detach: the container and its terminal run on."""


@runtime_checkable
class SupportsTerminal(Protocol):
    """Runtimes that run a container's process on a terminal (ContainerSpec.tty) and attach
    to it while it runs, as often as wanted, from this or a later agent process."""

    def open_terminal(self, name: str) -> Terminal:
        """Attach to the terminal of running container ``name``. Conflict if it does not run
        or was created without a TTY; NotFound for an unknown container."""


@runtime_checkable
class SupportsFiles(Protocol):
    """Runtimes whose containers' files the host reaches (containers/files.py: paths resolve
    inside the container's root, never out of it; owners are the container's ids)."""

    def open_file(self, name: str, path: str):
        """(a readable file descriptor the caller closes, containers.files.FileInfo) of regular
        file ``path``; for a directory (-1, its FileInfo with kind "directory"); NotFound,
        Unprocessable (a device, a fifo, a way out)."""

    def list_dir(self, name: str, path: str) -> tuple[list[dict], bool]:
        """Directory ``path``'s entries ({name, type, size, mode, uid, gid}) and whether more
        than containers.files.MAX_ENTRIES were left out."""

    def make_dir(self, name: str, path: str, *, uid: int = 0, gid: int = 0, mode: int = 0o755) -> None:
        """Create directory ``path`` (its parent must exist; Conflict if the name is taken)."""

    def put_file(self, name: str, path: str, read, *, uid: int = 0, gid: int = 0, mode: int = 0o644) -> int:
        """Write what ``read(n)`` gives (until b"") as ``path``, replacing a file or symlink
        there; the bytes written. On failure nothing new is left."""


@runtime_checkable
class SupportsPause(Protocol):
    """Runtimes that can freeze a container's processes (the cgroup freezer) and thaw them."""

    def pause(self, name: str) -> ContainerInfo:
        """Freeze a running container (Conflict otherwise)."""

    def resume(self, name: str) -> ContainerInfo:
        """Thaw a paused container (Conflict otherwise)."""


@runtime_checkable
class SupportsRootfsSnapshots(Protocol):
    """Runtimes that keep named copies of a container's own writes (the overlay's upper dir,
    on the host or in its size-limited ext4 image) and put one back. A running container is
    frozen (the cgroup freezer) while its copy is taken, so the copy is one instant of its
    files; the image's layers are not copied (they never change). Snapshots live in the
    container's state and go with delete()."""

    def snapshot_rootfs(self, name: str, snapshot: str) -> None:
        """Conflict if it exists; on failure nothing of it is left; a running container runs
        on (thawed) whatever happens."""

    def revert_rootfs(self, name: str, snapshot: str) -> None:
        """Only valid while stopped (Conflict otherwise): the rootfs's writes become the
        snapshot's (which stays). NotFound if there is no such snapshot."""

    def delete_rootfs_snapshot(self, name: str, snapshot: str) -> bool:
        """False if there was no such snapshot."""

    def rootfs_snapshots(self, name: str) -> list[str]: ...


@dataclass(frozen=True)
class RootfsImage:
    """Another image for a container's rootfs (a rebuild from it): its layers (top first)
    and the process resolved from its config as at create (containers.bundle.
    apply_image_config: the whole argv, merged env, workdir, numeric uid:gid)."""
    lowerdirs: tuple[str, ...]
    command: tuple[str, ...]
    env: dict
    workdir: str
    user: str


@runtime_checkable
class SupportsRootfsReset(Protocol):
    """Runtimes that drop a stopped container's writes, its rootfs back to its image's
    layers (a rebuild); name, address, volumes, limits (and, from its own image, process)
    stay."""

    def reset_rootfs(self, name: str, image: RootfsImage | None = None) -> None:
        """Only valid while stopped (Conflict otherwise); NotFound for an unknown container.
        With ``image``: its layers and process replace the old ones (InvalidInput, with
        nothing changed, if a layer is missing or its command is not in its layers)."""


@runtime_checkable
class SupportsReconcile(Protocol):
    """Runtimes whose host-side state (mounts, cgroups, veths, leases, dirs) can outlive a
    container when the agent is killed mid-create or mid-delete. ``reconcile`` releases the
    leftovers of containers that have no record and keeps recorded ones as they are; meant
    for agent start-up, before serving requests. Returns ``{"released": [names],
    "veths_removed": [names]}``."""

    def reconcile(self) -> dict: ...


@runtime_checkable
class SupportsBulkStats(Protocol):
    """Runtimes that read many containers' counters together, cheaper than one stats() each
    (a /metrics scrape of a host with a thousand containers)."""

    def bulk_stats(self, names: Iterable[str]) -> dict[str, dict]:
        """stats() of each of ``names`` the runtime knows (same keys, same units), by name; the
        others are left out."""


@runtime_checkable
class SupportsBandwidth(Protocol):
    """Runtimes that rate-limit a container's network port (network mode ``bridge``)."""

    def set_bandwidth(self, name: str, bandwidth: Bandwidth) -> None:
        """Keep ``bandwidth`` for the container (every later start applies it) and apply it
        now if its port exists. InvalidInput out of bounds or for a container without a
        bridge port; NotFound for an unknown one."""


@runtime_checkable
class SupportsVolumes(Protocol):
    """Runtimes that change an existing container's volumes while it is stopped."""

    def set_volumes(self, name: str, volumes: tuple[VolumeMount, ...]) -> ContainerInfo:
        """Make ``volumes`` the container's (mounted from its next start on). Conflict while it
        runs or is paused; InvalidInput for a bad mount; NotFound for an unknown container."""

    def volumes(self, name: str) -> tuple[VolumeMount, ...]:
        """The container's volumes; NotFound for an unknown container."""


@runtime_checkable
class SupportsLiveVolumes(Protocol):
    """Runtimes that mount and unmount a volume in a running (or paused) container."""

    def add_volume_live(self, name: str, volume: VolumeMount) -> ContainerInfo:
        """Mount ``volume`` in the running or paused container now and keep it for its next
        starts. InvalidInput for a path through a symlink or a non-dir (nothing left mounted);
        Conflict if the container is not running or paused; NotFound for an unknown one."""

    def remove_volume_live(self, name: str, destination: str) -> ContainerInfo:
        """Unmount the volume at ``destination`` from the running or paused container and drop
        it from its next starts. Conflict (the volume kept as it was) if the container still
        holds its filesystem elsewhere (a tenant's bind mount) or does not run."""
