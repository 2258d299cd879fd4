"""The hypervisor seam: ``Driver`` runs VMs from volumes the storage layer made.

Terms: a *domain* is one VM known to the hypervisor by name. Lifecycle:
absent -> define() -> stopped -> start() -> running <-> paused; stop() -> stopped;
delete() -> absent (the driver never deletes volumes: the caller owns them).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from containers.bandwidth import Bandwidth  # one vocabulary for VM taps and container veths

STATES = ("stopped", "running", "paused", "crashed", "unknown")
# what a snapshot of a VM holds (SupportsSnapshots.create_snapshot says which it took)
STOPPED = "stopped"  # a stopped VM's disks: exact
CRASH_CONSISTENT = "crash-consistent"  # a running VM's disks at one instant, as a power cut leaves them
FILESYSTEM_CONSISTENT = "filesystem-consistent"  # the same, its guest agent having frozen its filesystems


@dataclass(frozen=True)
class DiskSpec:
    target: str  # vda, vdb, ... (sda for the cloud-init seed cdrom)
    source: str  # file path | "<rbdpool>/<image>" | nbd://host:port/name
    type: str = "file"  # file | rbd | nbd
    format: str = "qcow2"  # qcow2 | raw
    device: str = "disk"  # disk | cdrom
    readonly: bool = False
    attach: dict = field(default_factory=dict)  # rbd: monitors, user, key or secret_uuid, config


@dataclass(frozen=True)
class NicSpec:
    bridge: str
    mac: str
    target: str | None = None  # the tap's name (filter rules are keyed by it); None: libvirt's vnetN


@dataclass(frozen=True)
class VmSpec:
    name: str
    uuid: str
    cpus: int
    memory_mib: int
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    console_log: str | None = None  # serial console is written here
    kernel: str | None = None  # direct kernel boot (test guests)
    initrd: str | None = None
    cmdline: str | None = None
    machine: str = "q35"  # q35 | pc
    bandwidth: Bandwidth = Bandwidth()  # rate limits of every bridged NIC's tap (containers/bandwidth.py)
    # the most a live resize may give it (SupportsResize); None: what it starts with
    max_cpus: int | None = None
    max_memory_mib: int | None = None

    @property
    def cpus_max(self) -> int:
        return self.max_cpus or self.cpus

    @property
    def memory_max(self) -> int:
        return self.max_memory_mib or self.memory_mib


@dataclass(frozen=True)
class VmInfo:
    name: str
    uuid: str
    state: str  # one of STATES
    cpus: int  # vCPUs it has now (its definition's while stopped)
    memory_mib: int  # memory it may use now (the balloon's target)
    max_cpus: int | None = None  # the most a live resize may give it; None: cpus
    max_memory_mib: int | None = None
    # why it is in that state, where it matters: "postcopy" (a post-copy migration runs: the
    # guest's memory is split between two hosts), "postcopy-failed" (that migration broke: the
    # guest is paused, or stalls on its missing pages, and must not be called running)
    reason: str | None = None


@runtime_checkable
class Driver(Protocol):
    # True when the VMs' NICs sit on the host bridge: the agent then leases their addresses
    # from the host's network (the one the containers use); the fake's VMs touch no network
    uses_host_network: bool

    def define(self, spec: VmSpec) -> VmInfo:
        """Conflict if the name exists; on failure no domain is left defined."""

    def start(self, name: str) -> VmInfo: ...

    def stop(self, name: str, *, force: bool = False, timeout: float = 60) -> VmInfo:
        """Graceful (ACPI) unless ``force``; destroy after ``timeout`` seconds."""

    def reboot(self, name: str) -> VmInfo: ...

    def pause(self, name: str) -> VmInfo: ...

    def resume(self, name: str) -> VmInfo: ...

    def delete(self, name: str) -> bool:
        """Destroy if running and undefine; return False if it was already gone."""

    def get(self, name: str) -> VmInfo:
        """Raises NotFound."""

    def find(self, name: str) -> VmInfo | None: ...

    def list(self) -> list[VmInfo]: ...

    def stats(self, name: str) -> dict:
        """{cpu_time_ns, memory_bytes, disk: {rd_bytes, wr_bytes}, net: {rx_bytes, tx_bytes,
        rx_packets, tx_packets}}: counters since the VM started"""

    def console_log(self, name: str, tail: int | None = None) -> str: ...

    def attach_disk(self, name: str, disk: DiskSpec) -> None: ...

    def detach_disk(self, name: str, target: str) -> None: ...

    def snapshot(self, name: str, snapshot: str) -> None:
        """Only valid while stopped: a disk snapshot of every writable disk."""

    def disks(self, name: str) -> list[DiskSpec]:
        """The VM's disks (persistent definition), sorted by target."""

    def list_snapshots(self, name: str) -> list[str]:
        """Snapshot names present on every writable disk."""


# -- live migration (optional capability) --

# what to do when a migration has not converged in time: abort it (the guest keeps running
# here), pause the guest (the copy then converges; the destination resumes it), or switch to
# post-copy (the guest runs there at once and pulls the pages it still lacks)
TIMEOUT_ACTIONS = ("abort", "pause", "postcopy")
MIGRATION_PHASES = ("precopy", "postcopy")  # where a live migration is: see MigrationProgress.phase


@dataclass(frozen=True)
class MigrationOptions:
    """How to move one running VM. ``disk_sources`` maps a disk target to its path on the
    destination (the destination prepared it: same size and format; for a qcow2 overlay,
    with the same base image under it); ``console_log`` is the destination's log path.
    ``copy_storage``: "none" (shared storage: memory only), "incremental" (copy the top
    overlay only: the destination has the base) or "full" (copy whole disks)."""

    live: bool = True
    copy_storage: str = "none"  # none | incremental | full
    disk_sources: dict = field(default_factory=dict)  # target -> destination path (rbd: "rbd:pool/image")
    disk_attach: dict = field(default_factory=dict)  # target -> the destination's RBD attach facts
    # (monitors, config, user, secret_uuid: a secret the destination defined for the same key)
    console_log: str | None = None
    max_downtime_ms: int | None = 300  # the target; libvirt's default is 300 ms too
    auto_converge: bool = True  # throttle the vCPUs when the guest dirties memory faster than we copy
    bandwidth_mib_s: int | None = None  # None: unlimited
    completion_timeout_s: float | None = None  # None: wait for convergence forever (cancel still works)
    timeout_action: str = "abort"  # abort | pause (suspend the guest so the copy converges) | postcopy
    tls: bool = False  # QEMU's migration stream and disk copy (NBD) over TLS with the hosts' certificates
    # post-copy allowed (the destination needs userfaultfd). Once it starts, the guest runs on the
    # destination and its memory is split between the hosts until the copy ends: the job can no
    # longer be aborted, and a broken link leaves the guest paused (see SupportsMigration).
    postcopy: bool = False
    # the policy's switch to post-copy (only with ``postcopy``): once pre-copy stops converging
    # (this many memory passes in a row that did not shrink the dirty set: neither the link nor
    # auto-converge's throttle keeps up), or as a backstop after this many seconds of pre-copy
    # or this many memory passes, whichever comes first; None: that rule is off (all None: never
    # on its own; timeout_action="postcopy" still switches)
    postcopy_after_stalled: int | None = None
    postcopy_after_s: float | None = None
    postcopy_after_iterations: int | None = None


@dataclass(frozen=True)
class MigrationProgress:
    """One sample of a running migration (libvirt jobStats)."""

    elapsed_ms: int
    data_total: int
    data_processed: int
    data_remaining: int
    dirty_rate: int  # pages per second the guest dirties
    memory_iteration: int
    phase: str = "precopy"  # one of MIGRATION_PHASES: "postcopy" once the guest runs on the destination
    throttle_pct: int = 0  # auto-converge's vCPU throttle (0: none)


@dataclass(frozen=True)
class MigrationResult:
    total_ms: float  # wall time of the migration job
    downtime_ms: float | None  # guest paused time at the switchover, as QEMU measured it
    data_bytes: int  # bytes sent (memory + disks)
    paused_by_timeout: bool = False  # the completion timeout suspended the guest to converge
    postcopy: bool = False  # it switched to post-copy (the guest ran on the destination before the end)
    # the pre-copy switchover's pause taken apart (ms: pause, ram, fixed, flush, mirror, finish, and the
    # reserve and QEMU downtime-limit used; hypervisor/switchover.py); None where not measured
    switchover: dict | None = None


@runtime_checkable
class SupportsMigration(Protocol):
    """Drivers that move running VMs to another host of the same kind. Peer-to-peer: the
    source's hypervisor talks to the destination's (``dest_uri``); the destination needs no
    separate "incoming" call because it adopts the domain itself. On any failure the VM keeps
    running here and nothing is left on the destination's hypervisor (the disks the caller
    prepared there are the caller's to remove) -- until post-copy starts (``progress`` then
    reports phase "postcopy"): from there the guest runs on the destination, the job cannot be
    aborted (``cancelled`` is no longer consulted), and a failure raises ``PostCopyFailed``:
    the guest is paused with its memory split between both hosts, both halves are kept (never
    destroyed by the driver) for an operator to recover or delete."""

    def migrate(self, name: str, dest_uri: str, options: MigrationOptions, *,
                progress=None, cancelled=None) -> MigrationResult:
        """Move running VM ``name``; ``progress(MigrationProgress)`` is called while it runs;
        ``cancelled()`` returning True aborts the job (raises Cancelled). On success the VM is
        defined and running (or paused if it was) on the destination and undefined here."""

    def abort_migration(self, name: str) -> bool:
        """Abort the running migration job of ``name``; False if none ran (or it is in
        post-copy, which cannot be aborted)."""

    def postcopy_unavailable(self) -> str | None:
        """None when this host can run post-copy (the kernel has userfaultfd); else why not."""


@runtime_checkable
class SupportsPostcopyResume(Protocol):
    """Drivers that can finish a post-copy migration that broke (``PostCopyFailed``) once
    the link is back. Terms: a VM is *split* while its domain here is the paused source half
    of a broken post-copy (the destination runs its CPUs and holds the pages already sent;
    the rest are only here). Lifecycle: split -> resume_postcopy() -> gone here, running on
    the destination; or split again if the copy breaks again (both halves kept)."""

    def postcopy_split(self, name: str) -> bool:
        """Whether VM ``name`` here is the source half of a broken post-copy (resumable);
        NotFound if there is no such VM."""

    def resume_postcopy(self, name: str, dest_uri: str, options: MigrationOptions, *,
                        progress=None) -> MigrationResult:
        """Restart the broken post-copy of split VM ``name`` to ``dest_uri`` (the URI of the
        first attempt) from where it stopped; ``options`` as in ``migrate`` (only ``tls`` and
        ``copy_storage`` matter: the same as the first attempt). First makes the destination's
        end resumable too (a half that has not seen the break yet is paused there). On success
        the VM runs on the destination and is undefined here. Raises Conflict if ``name`` is
        not split, PostCopyFailed if the copy breaks again (still split: both halves kept)."""


@runtime_checkable
class SupportsIncomingDisks(Protocol):
    """Drivers whose VMs attach disks that need host-side setup before a migrating domain
    arrives (RBD: the cephx key as a libvirt secret, the client ceph.conf). The destination
    calls ``prepare_incoming_disks`` before the source migrates, and ``delete_unused_secrets``
    when an incoming domain did not arrive (or left again)."""

    def prepare_incoming_disks(self, disks: tuple[DiskSpec, ...]) -> tuple[DiskSpec, ...]:
        """The disks as this host attaches them (``attach`` with secret_uuid and config,
        never the key); what is already attachable is returned unchanged."""

    def delete_unused_secrets(self) -> None:
        """Drop the secrets no domain refers to; a failure is logged, not raised."""


@runtime_checkable
class SupportsConsole(Protocol):
    """Drivers that give the host's side of a running VM's serial console."""

    def open_console(self, name: str) -> int:
        """A new non-blocking, raw file descriptor of VM ``name``'s serial console: what the
        guest writes can be read from it, what is written reaches the guest. The caller
        closes it. Conflict if the VM is not running, NotFound if there is none."""


@runtime_checkable
class SupportsCpuCheck(Protocol):
    """Drivers that can tell whether this host's CPU runs a guest's CPU model (live migration
    between hosts of different CPUs). Both are None where no check applies (TCG: QEMU emulates
    the CPU, so any host runs it)."""

    def guest_cpu(self, name: str) -> str | None:
        """The running guest's CPU as ``<cpu>`` XML (host-model expanded to its model and
        features), None under TCG."""
        ...

    def cpu_unsupported(self, cpu_xml: str) -> str | None:
        """Why this host cannot run a guest CPU ``cpu_xml`` (None: it can, or no check applies
        here). InvalidInput for XML that is not a CPU."""
        ...

    def host_cpu(self) -> str | None:
        """This host's CPU (<cpu> of its capabilities) for a peer's check; None under TCG."""
        ...

    def cpu_missing(self, guest_cpu: str, host_cpu: str) -> str | None:
        """Why another host whose CPU is ``host_cpu`` cannot run ``guest_cpu`` (None: it can)."""
        ...


@runtime_checkable
class ReportsVirtType(Protocol):
    """Drivers that know how their VMs are accelerated: ``virt_type`` is "kvm" or "qemu"
    (TCG), probed on first read where configured "auto"."""

    @property
    def virt_type(self) -> str: ...


@runtime_checkable
class SupportsResize(Protocol):
    """Drivers that change a VM's vCPUs and memory in place, up to the maximum it was defined
    with (VmSpec.max_cpus, max_memory_mib): vCPUs are hot-plugged, memory goes through the
    virtio balloon. A running (or paused) VM changes live and in its definition, a stopped one
    in its definition only (its next start has it)."""

    def resize(self, name: str, *, cpus: int | None = None, memory_mib: int | None = None) -> VmInfo:
        """Set what is given. Unprocessable (naming the maximum) past the VM's maximum,
        InvalidInput below the minimum; nothing changes then. NotFound for an unknown VM.
        If the second change fails after the first was made, the first is undone."""


@runtime_checkable
class ReportsNicTaps(Protocol):
    """Drivers whose running VMs' bridged NICs have host-side taps they can name (the tenant
    filter is keyed by the tap: a VM defined without ``NicSpec.target`` gets whatever name the
    hypervisor picks at each start, libvirt's ``vnetN``)."""

    def nic_taps(self, name: str) -> dict[str, str]:
        """The running VM's bridged NICs as MAC (lower case) -> tap name, read from its live
        definition; {} while it is not running. NotFound for an unknown VM."""


@runtime_checkable
class SupportsSnapshots(Protocol):
    """Drivers that take named snapshots of a VM's writable disks (the read-only seed is left
    out) while it runs, is paused or is stopped, revert it to one and delete one. Terms: a
    *snapshot* lives with the disks themselves (an internal qcow2 snapshot), so removing the
    disks removes it. One of a running VM is taken over every disk at one instant without
    stopping the vCPUs: filesystem-consistent when the guest's agent froze its filesystems for
    that instant (SupportsFilesystemFreeze), else crash-consistent (what a power cut would
    leave); a guest whose agent is absent, silent or wrong never fails or stalls the snapshot."""

    def create_snapshot(self, name: str, snapshot: str) -> str:
        """Conflict if ``snapshot`` exists on one of the disks; Unprocessable for a disk the
        driver cannot snapshot. On failure no disk keeps a part of it. Returns what it holds:
        STOPPED, CRASH_CONSISTENT or FILESYSTEM_CONSISTENT."""

    def revert_snapshot(self, name: str, snapshot: str) -> None:
        """Only valid while stopped (Conflict otherwise): every writable disk back to
        ``snapshot`` (which stays). NotFound if a disk lacks it; nothing changes then."""

    def delete_snapshot(self, name: str, snapshot: str) -> bool:
        """Remove ``snapshot`` from every disk (running or not); False if no disk had it."""


@runtime_checkable
class SupportsFilesystemFreeze(Protocol):
    """Drivers that can ask a running VM's guest agent (the QEMU guest agent protocol on the
    VM's agent channel) to freeze its filesystems for a moment, so that a copy taken of its
    disks in that moment is filesystem-consistent (the pool's snapshot of an RBD disk, say).
    The guest is the tenant's: what its agent answers is untrusted, each request is bounded
    by a timeout, and a VM with no agent connected is not asked at all (no wait)."""

    def frozen(self, name: str) -> AbstractContextManager[bool]:
        """``with driver.frozen(name) as fs:`` runs its block with VM ``name``'s filesystems
        frozen if ``fs`` is True; False: not frozen (not running, no agent connected, or the
        agent failed or did not answer in time), the block runs anyway. On leaving, a thaw is
        always asked of an agent that was asked to freeze, also when the block raised."""

    def thaw(self, name: str) -> bool:
        """Ask running VM ``name``'s connected agent to thaw its filesystems (bounded as above):
        what a restarted caller does when it was killed inside ``frozen``. False if there was
        no agent to ask or it did not confirm."""


@runtime_checkable
class SupportsDiskExport(Protocol):
    """Drivers that copy one of a VM's disks out, at one instant, while it runs, is paused or is
    stopped (backups). A running VM's copy is crash-consistent and taken without stopping its
    vCPUs: an internal snapshot named ``snapshot`` is taken, read and removed (a killed agent
    leaves it: delete_snapshot(name, snapshot) removes it)."""

    def export_disk(self, name: str, target: str, dest: str, *, snapshot: str, backing: str | None = None,
                    backing_format: str | None = None, held: Callable[[], None] | None = None) -> None:
        """Write disk ``target`` of VM ``name`` to the new qcow2 file ``dest``: with ``backing``
        (the disk's own base, a host path), only what differs from it, as a layer naming it;
        else the whole disk. ``held`` is called once the copy's content is fixed (a running or
        paused VM's snapshot taken; a stopped VM's: at once) and before it is read: a caller
        that paused the VM copies its other disks there, at the same instant, and resumes it.
        Only disk ``target`` is snapshotted (the VM's other disks may be raw or RBD). NotFound
        for an unknown VM or disk; Unprocessable for a disk the driver cannot copy (not a qcow2
        file). On failure ``dest`` and the snapshot are removed."""


@runtime_checkable
class SupportsBandwidth(Protocol):
    """Drivers that rate-limit a VM's bridged NICs (on the host's side of each tap)."""

    def set_bandwidth(self, name: str, bandwidth: Bandwidth) -> None:
        """Keep ``bandwidth`` with the VM (every later start, and a migration, carries it) and
        apply it now if it runs. InvalidInput out of bounds; NotFound for an unknown VM."""

    def bandwidth(self, name: str) -> Bandwidth:
        """The limits the VM keeps (unlimited: ``Bandwidth()``); NotFound for an unknown VM."""


@runtime_checkable
class SupportsDiskResize(Protocol):
    """Drivers that tell a running VM one of its disks grew (QEMU's block_resize): the guest
    sees the new size at once, without a reboot."""

    def resize_disk(self, name: str, target: str, size: int) -> None:
        """Grow disk ``target`` of VM ``name`` to ``size`` bytes as the guest sees it (the
        volume under it is grown first by its pool). Only while the VM runs or is paused;
        NotFound for an unknown VM or disk."""


@runtime_checkable
class SupportsBulkStats(Protocol):
    """Drivers that read every VM's counters in one call to the hypervisor (a /metrics scrape
    with many VMs: libvirt's getAllDomainStats, one RPC, instead of a few per VM)."""

    def bulk_stats(self) -> dict[str, dict]:
        """Every VM of this driver by name -> what ``stats(name)`` returns for it (same keys,
        same units; zeros while stopped). Domains that are not the driver's are left out. A
        figure the hypervisor cannot give at once (a running job holds the VM's monitor: a
        migration) is left out of its section instead of waited for."""
