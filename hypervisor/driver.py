"""The hypervisor seam: ``Driver`` runs VMs from volumes the storage layer made.

Terms: a *domain* is one VM known to the hypervisor by name. Lifecycle:
absent -> define() -> stopped -> start() -> running <-> paused; stop() -> stopped;
delete() -> absent (the driver never deletes volumes: the caller owns them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

STATES = ("stopped", "running", "paused", "crashed", "unknown")


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


@dataclass(frozen=True)
class VmInfo:
    name: str
    uuid: str
    state: str  # one of STATES
    cpus: int
    memory_mib: int


@runtime_checkable
class Driver(Protocol):
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
        """{cpu_time_ns, memory_bytes, disk: {rd_bytes, wr_bytes}, net: {rx_bytes, tx_bytes}}"""

    def console_log(self, name: str, tail: int | None = None) -> str: ...

    def attach_disk(self, name: str, disk: DiskSpec) -> None: ...

    def detach_disk(self, name: str, target: str) -> None: ...

    def snapshot(self, name: str, snapshot: str) -> None:
        """Only valid while stopped: a disk snapshot of every writable disk."""

    def disks(self, name: str) -> list[DiskSpec]:
        """The VM's disks (persistent definition), sorted by target."""

    def list_snapshots(self, name: str) -> list[str]:
        """Snapshot names present on every writable disk."""
