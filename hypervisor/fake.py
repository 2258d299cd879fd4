"""``FakeDriver``: a real, stateful, in-memory hypervisor for tests and the API's dev mode.

It follows the same state machine and raises the same errors as ``LibvirtDriver``
(both pass tests/contract/test_driver.py): stopped -> start() -> running <-> paused;
stop() -> stopped; delete() -> absent. Verbs whose target state is already reached
are no-ops; impossible transitions (pause a stopped VM) raise Conflict. Nothing runs:
a "boot" appends deterministic lines to the console log and cpu time advances by a
fixed step per stats() call while running.
"""
from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.errors import Cancelled, CommandFailed, Conflict, InvalidInput, NotFound, PostCopyFailed
from hypervisor.driver import (CRASH_CONSISTENT, STOPPED, TIMEOUT_ACTIONS, DiskSpec, MigrationOptions,
                               MigrationProgress, MigrationResult, VmInfo, VmSpec)
from containers.bandwidth import Bandwidth
from hypervisor.validate import check_disk_file, check_resize, check_snapshot_name, check_spec
from storage.units import MiB

if TYPE_CHECKING:
    from agent.state import Database
    from containers.network import Network

FAKE_HOST_MEMORY_MIB = 64 * 1024  # what the fake pretends the host has
FAKE_CPU_STEP_NS = 10_000_000  # cpu time a running fake VM "uses" between two stats() calls
FAKE_MIGRATION_BYTES_PER_MIB = MiB  # a fake migration "sends" the guest's memory once
FAKE_PRECOPY_ROUNDS = 50  # a fake guest that never converges: rounds of pre-copy before it gives up
FAKE_ROUND_S = 0.01  # one such round (the cancel point between rounds)

# uri -> FakeDriver: the fakes of one process that migrate() can reach (filled only by
# FakeDriver(uri=...), never at import time)
_FAKE_HOSTS: "weakref.WeakValueDictionary[str, FakeDriver]" = weakref.WeakValueDictionary()


@dataclass
class _Vm:
    spec: VmSpec
    state: str = "stopped"
    disks: dict[str, DiskSpec] = field(default_factory=dict)  # target -> disk
    console: list[str] = field(default_factory=list)
    snapshots: dict[str, list[str]] = field(default_factory=dict)  # snapshot -> disk targets
    boots: int = 0
    cpu_time_ns: int = 0
    ttys: list[int] = field(default_factory=list)  # the guest's ends of open consoles (they echo)
    reason: str | None = None  # VmInfo.reason: "postcopy-failed" after a broken post-copy
    cpu_model: str = "host-model"  # as defined (its host's cpu_model then); it moves with the guest

    def hang_up(self) -> None:
        """Powered off: open consoles read their end."""
        for fd in self.ttys:
            os.close(fd)
        self.ttys.clear()

    def info(self) -> VmInfo:
        return VmInfo(name=self.spec.name, uuid=self.spec.uuid, state=self.state,
                      cpus=self.spec.cpus, memory_mib=self.spec.memory_mib,
                      max_cpus=self.spec.cpus_max, max_memory_mib=self.spec.memory_max, reason=self.reason)


FAKE_CPU_MODELS = ("qemu64", "kvm64", "Haswell-noTSX", "Skylake-Client")  # named models a fake host runs


class FakeDriver:
    """In-memory ``hypervisor.Driver``. Thread-safe; state lives as long as the object."""

    uses_host_network = False  # its VMs have no NICs anywhere: the agent leases them no address

    def __init__(self, *, host_memory_mib: int = FAKE_HOST_MEMORY_MIB, uri: str | None = None,
                 cpu_model: str = "host-model", **_ignored):
        self.host_memory_mib = host_memory_mib
        self.cpu_model = cpu_model  # "host-model" or a named model its VMs are defined with
        self._vms: dict[str, _Vm] = {}
        self._lock = threading.Lock()
        self.uri = uri
        # the host's faculties and the guests' behaviour, set by tests: a host without
        # userfaultfd refuses post-copy; a busy guest (converges=False) never finishes pre-copy
        self.userfaultfd = True
        self.converges = True
        self.postcopy_s = 0.0  # how long a fake post-copy takes (the guest already runs there)
        self.postcopy_link_cut = False  # the link breaks during post-copy (PostCopyFailed)
        self.resume_calls = 0  # resume_postcopy() calls (the automatic retries count here)
        # CPU model (SupportsCpuCheck): the <cpu> its running guests report (None: as under TCG,
        # no check), and why this host cannot run a guest's CPU (None: it can)
        self.guest_cpu_xml: str | None = None
        self.host_cpu_xml: str | None = None  # what it tells peers of its CPU (None: as under TCG)
        self.cpu_refused: str | None = None
        self.migrations: list[dict] = []  # every migrate() call: name, destination, options, outcome
        if uri:  # reachable by migrate() of other fakes in this process
            _FAKE_HOSTS[uri] = self

    @classmethod
    def from_config(cls, settings: Mapping[str, Any], *, state_dir: str, db: Database,
                    network: Network | None) -> FakeDriver:
        """agent.registry's uniform construction. The fake keeps everything in memory: it
        ignores the state dir, database, network and the settings but ``uri``: a fake:// one
        makes it reachable by other fakes' migrate() in this process."""
        uri = settings.get("uri")
        return cls(uri=uri if isinstance(uri, str) and uri.startswith("fake://") else None,
                   cpu_model=settings.get("cpu_model") or "host-model")

    # -- helpers --
    def _get(self, name: str) -> _Vm:
        vm = self._vms.get(name)
        if vm is None:
            raise NotFound(f"VM {name!r} not found", vm=name)
        return vm

    def _boot(self, vm: _Vm) -> None:
        vm.boots += 1
        vm.state = "running"
        vm.console.append(f"fake-bios: booting {vm.spec.name} ({vm.boots})")
        for target in sorted(vm.disks):
            vm.console.append(f"fake-guest: disk {target}")
        vm.console.append("NODEAGENT-GUEST-BOOTED")
        vm.console.append("NODEAGENT-READY")

    # -- lifecycle --
    def define(self, spec: VmSpec) -> VmInfo:
        """Conflict if the name or uuid exists; on failure nothing is recorded."""
        check_spec(spec, host_memory_mib=self.host_memory_mib)
        for disk in spec.disks:
            check_disk_file(disk)
        with self._lock:
            if spec.name in self._vms:
                raise Conflict(f"VM {spec.name!r} already exists: pick another name or delete it",
                               vm=spec.name)
            if any(v.spec.uuid == spec.uuid for v in self._vms.values()):
                raise Conflict(f"a VM with uuid {spec.uuid} already exists", uuid=spec.uuid)
            vm = _Vm(spec=spec, disks={d.target: d for d in spec.disks}, cpu_model=self.cpu_model)
            self._vms[spec.name] = vm
            return vm.info()

    def start(self, name: str) -> VmInfo:
        with self._lock:
            vm = self._get(name)
            if vm.state == "paused":
                raise Conflict(f"VM {name!r} is paused: resume it instead", vm=name)
            if vm.state != "running":
                self._boot(vm)
            return vm.info()

    def resize(self, name: str, *, cpus: int | None = None, memory_mib: int | None = None) -> VmInfo:
        """hypervisor.driver.SupportsResize: kept in the VM's spec (running or not), within the
        maximum it was defined with."""
        with self._lock:
            vm = self._get(name)
            check_resize(name, cpus=cpus, memory_mib=memory_mib, max_cpus=vm.spec.cpus_max,
                         max_memory_mib=vm.spec.memory_max,
                         live_cpus=vm.spec.cpus if vm.state in ("running", "paused") else None)
            vm.spec = replace(vm.spec, max_cpus=vm.spec.cpus_max, max_memory_mib=vm.spec.memory_max,
                              cpus=vm.spec.cpus if cpus is None else cpus,
                              memory_mib=vm.spec.memory_mib if memory_mib is None else memory_mib)
            return vm.info()

    def nic_taps(self, name: str) -> dict[str, str]:
        """hypervisor.driver.ReportsNicTaps: as libvirt names them (a NIC's ``target``, else
        ``vnet<index>``); the fake's taps exist nowhere on the host."""
        with self._lock:
            vm = self._get(name)
            if vm.state not in ("running", "paused"):
                return {}
            return {nic.mac.lower(): nic.target or f"vnet{i}" for i, nic in enumerate(vm.spec.nics)}

    def set_bandwidth(self, name: str, bandwidth: Bandwidth) -> None:
        """hypervisor.driver.SupportsBandwidth: kept in the VM's spec (its VMs have no taps)."""
        bandwidth.check()
        with self._lock:
            vm = self._get(name)
            vm.spec = replace(vm.spec, bandwidth=bandwidth)

    def bandwidth(self, name: str) -> Bandwidth:
        with self._lock:
            return self._get(name).spec.bandwidth

    def stop(self, name: str, *, force: bool = False, timeout: float = 60) -> VmInfo:
        with self._lock:
            vm = self._get(name)
            if vm.state != "stopped":
                vm.console.append("fake-guest: power off" if not force else "fake-bios: destroyed")
                vm.state = "stopped"
                vm.hang_up()
            return vm.info()

    def reboot(self, name: str) -> VmInfo:
        with self._lock:
            vm = self._get(name)
            if vm.state != "running":
                raise Conflict(f"VM {name!r} is {vm.state}: only a running VM can reboot", vm=name)
            vm.console.append("fake-guest: reboot")
            self._boot(vm)
            return vm.info()

    def pause(self, name: str) -> VmInfo:
        with self._lock:
            vm = self._get(name)
            if vm.state == "stopped":
                raise Conflict(f"VM {name!r} is stopped: start it first", vm=name)
            vm.state = "paused"
            return vm.info()

    def resume(self, name: str) -> VmInfo:
        with self._lock:
            vm = self._get(name)
            if vm.state == "stopped":
                raise Conflict(f"VM {name!r} is stopped: start it instead", vm=name)
            vm.state = "running"
            return vm.info()

    def delete(self, name: str) -> bool:
        """Forget the VM (its disks' files are the caller's); False if it was already gone."""
        with self._lock:
            vm = self._vms.pop(name, None)
            if vm is not None:
                vm.hang_up()
            return vm is not None

    def open_console(self, name: str) -> int:
        """hypervisor.driver.SupportsConsole: a pty whose guest end echoes what is typed (the
        tty's own echo, as a guest's shell prompt would) until the VM stops."""
        with self._lock:
            vm = self._get(name)
            if vm.state != "running":
                raise Conflict(f"VM {name!r} is {vm.state}: its console opens when it runs", vm=name)
            master, guest = os.openpty()  # the pair's one termios: cooked, echo on
            os.set_blocking(master, False)
            vm.ttys.append(guest)
            return master

    # -- queries --
    def get(self, name: str) -> VmInfo:
        with self._lock:
            return self._get(name).info()

    def find(self, name: str) -> VmInfo | None:
        with self._lock:
            vm = self._vms.get(name)
            return vm.info() if vm else None

    def list(self) -> list[VmInfo]:
        with self._lock:
            return [self._vms[n].info() for n in sorted(self._vms)]

    def disks(self, name: str) -> list[DiskSpec]:
        """The VM's current disks, by target."""
        with self._lock:
            vm = self._get(name)
            return [vm.disks[t] for t in sorted(vm.disks)]

    def stats(self, name: str) -> dict:
        with self._lock:
            return self._stats(self._get(name))

    def bulk_stats(self) -> dict[str, dict]:
        """hypervisor.driver.SupportsBulkStats: every VM's stats() under one hold of the lock
        (each running VM's cpu time advances by one step, as a stats() call of it would)."""
        with self._lock:
            return {name: self._stats(vm) for name, vm in self._vms.items()}

    @staticmethod
    def _stats(vm: _Vm) -> dict:
        if vm.state == "running":
            vm.cpu_time_ns += FAKE_CPU_STEP_NS
        up = vm.state != "stopped"
        return {
            "state": vm.state,
            "cpu_time_ns": vm.cpu_time_ns,
            "memory_bytes": vm.spec.memory_mib * MiB if up else 0,
            "disk": {"rd_bytes": 0, "wr_bytes": 0},
            "net": {"rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0, "tx_packets": 0},
        }

    def console_log(self, name: str, tail: int | None = None) -> str:
        with self._lock:
            lines = self._get(name).console
            if tail is not None:
                lines = lines[-tail:] if tail > 0 else []
            return "".join(line + "\n" for line in lines)

    # -- disks --
    def attach_disk(self, name: str, disk: DiskSpec) -> None:
        """Attach now (if running) and in the persistent definition."""
        check_disk_file(disk)
        with self._lock:
            vm = self._get(name)
            if disk.target in vm.disks:
                raise Conflict(f"VM {name!r} already has a disk {disk.target}: pick another target",
                               vm=name, target=disk.target)
            vm.disks[disk.target] = disk
            if vm.state != "stopped":
                vm.console.append(f"fake-guest: disk {disk.target} attached")

    def detach_disk(self, name: str, target: str) -> None:
        with self._lock:
            vm = self._get(name)
            if target not in vm.disks:
                raise NotFound(f"VM {name!r} has no disk {target}", vm=name, target=target)
            del vm.disks[target]
            if vm.state != "stopped":
                vm.console.append(f"fake-guest: disk {target} detached")

    def resize_disk(self, name: str, target: str, size: int) -> None:
        """hypervisor.driver.SupportsDiskResize: the guest is told (a console line)."""
        with self._lock:
            vm = self._get(name)
            if vm.state == "stopped" or target not in vm.disks:
                raise NotFound(f"VM {name!r} has no disk {target} in use", vm=name, target=target)
            vm.console.append(f"fake-guest: disk {target} resized to {size} bytes")

    def snapshot(self, name: str, snapshot: str) -> None:
        """Only valid while stopped: records a snapshot of every writable disk."""
        if not snapshot or "/" in snapshot or snapshot.startswith("-"):
            raise InvalidInput(f"bad snapshot name {snapshot!r}: use letters, digits, '-', '_'")
        with self._lock:
            vm = self._get(name)
            if vm.state != "stopped":
                raise Conflict(f"VM {name!r} is {vm.state}: stop it before taking a snapshot",
                               vm=name)
            if snapshot in vm.snapshots:
                raise Conflict(f"VM {name!r} already has a snapshot {snapshot!r}", vm=name)
            vm.snapshots[snapshot] = [t for t, d in sorted(vm.disks.items()) if not d.readonly]

    def list_snapshots(self, name: str) -> list[str]:
        with self._lock:
            return sorted(self._get(name).snapshots)

    # SupportsSnapshots: running, paused or stopped (as the libvirt driver's internal snapshots)
    def create_snapshot(self, name: str, snapshot: str) -> str:
        check_snapshot_name(snapshot)
        with self._lock:
            vm = self._get(name)
            if snapshot in vm.snapshots:
                raise Conflict(f"VM {name!r} already has a snapshot {snapshot!r}", vm=name)
            vm.snapshots[snapshot] = [t for t, d in sorted(vm.disks.items()) if not d.readonly]
            return STOPPED if vm.state == "stopped" else CRASH_CONSISTENT  # a fake guest runs no agent

    @contextmanager
    def frozen(self, name: str) -> Iterator[bool]:
        """SupportsFilesystemFreeze: a fake guest has no guest agent, so nothing is frozen."""
        with self._lock:
            self._get(name)
        yield False

    def thaw(self, name: str) -> bool:
        with self._lock:
            self._get(name)
        return False

    def revert_snapshot(self, name: str, snapshot: str) -> None:
        with self._lock:
            vm = self._get(name)
            if vm.state != "stopped":
                raise Conflict(f"VM {name!r} is {vm.state}: stop it before restoring a snapshot", vm=name)
            if snapshot not in vm.snapshots:
                raise NotFound(f"VM {name!r} has no snapshot {snapshot!r}", vm=name)
            vm.console.append(f"fake-guest: disks reverted to {snapshot}")

    def delete_snapshot(self, name: str, snapshot: str) -> bool:
        with self._lock:
            return self._get(name).snapshots.pop(snapshot, None) is not None


    # SupportsDiskExport: the disk file as it is (a fake guest writes nothing)
    def export_disk(self, name: str, target: str, dest: str, *, snapshot: str, backing: str | None = None,
                    backing_format: str | None = None, held=None) -> None:
        import subprocess
        check_snapshot_name(snapshot)
        with self._lock:
            vm = self._get(name)
            disk = vm.disks.get(target)
            if disk is None or disk.readonly:
                raise NotFound(f"VM {name!r} has no writable disk {target}", vm=name)
            if snapshot in vm.snapshots:
                raise Conflict(f"VM {name!r} already has a snapshot {snapshot!r}", vm=name)
        args = ["qemu-img", "convert", "-U", "-f", disk.format or "qcow2", "-O", "qcow2"]
        if backing:
            args += ["-B", backing, "-F", backing_format or "qcow2"]
        if held is not None:
            held()
        r = subprocess.run([*args, disk.source, dest], capture_output=True, text=True)
        if r.returncode != 0:
            if os.path.exists(dest):
                os.unlink(dest)
            raise CommandFailed(f"qemu-img convert of {name!r} disk {target} failed: {r.stderr.strip()}",
                                argv=args, returncode=r.returncode, stderr=r.stderr)

    # -- CPU model (SupportsCpuCheck) --
    def guest_cpu(self, name: str) -> str | None:
        with self._lock:
            model = self._get(name).cpu_model
        if self.guest_cpu_xml is None and model != "host-model":  # a named model, as libvirt reports it
            return f'<cpu mode="custom" match="exact" check="partial"><model fallback="forbid">{model}</model></cpu>'
        return self.guest_cpu_xml

    def cpu_unsupported(self, cpu_xml: str) -> str | None:
        import xml.etree.ElementTree as ET
        model = ET.fromstring(cpu_xml).findtext("model")
        if self.cpu_refused is None and model and model not in FAKE_CPU_MODELS:
            return f"its QEMU cannot emulate CPU model {model!r} (TCG)"
        return self.cpu_refused

    def host_cpu(self) -> str | None:
        return self.host_cpu_xml

    def cpu_missing(self, guest_cpu: str, host_cpu: str) -> str | None:
        """What the fake host that reports ``host_cpu`` refuses (its cpu_refused)."""
        return next((h.cpu_refused for h in list(_FAKE_HOSTS.values()) if h.host_cpu_xml == host_cpu), None)

    # -- migration (SupportsMigration) --
    def postcopy_unavailable(self) -> str | None:
        return None if self.userfaultfd else "the kernel has no userfaultfd (the fake host was made without it)"

    def migrate(self, name: str, dest_uri: str, options: MigrationOptions, *, progress=None,
                cancelled=None) -> MigrationResult:
        """Move a running or paused VM to the FakeDriver registered as ``dest_uri``. The
        destination's disks must exist (check_disk_file) when storage is copied. On failure
        the VM stays here, untouched. The call and its outcome are kept in ``migrations``.

        A guest that converges moves in one pre-copy round. One that does not (``converges``
        False) follows the options as libvirt does: post-copy when allowed and due (the
        policy's bound or timeout_action=postcopy), paused by timeout_action=pause, aborted by
        the completion timeout (abort) or cancel; after FAKE_PRECOPY_ROUNDS it fails."""
        record = {"name": name, "destination": dest_uri, "options": options, "outcome": None}
        self.migrations.append(record)
        try:
            result = self._migrate(name, dest_uri, options, progress, cancelled)
        except Exception as e:
            record["outcome"] = type(e).__name__
            raise
        record["outcome"] = "postcopy" if result.postcopy else "precopy"
        return result

    def _migrate(self, name, dest_uri, options, progress, cancelled) -> MigrationResult:
        if options.copy_storage not in ("none", "incremental", "full") \
                or options.timeout_action not in TIMEOUT_ACTIONS:
            raise InvalidInput("copy_storage must be none|incremental|full and timeout_action "
                               + "|".join(TIMEOUT_ACTIONS))
        if options.timeout_action == "postcopy" and not options.postcopy:
            raise InvalidInput("timeout_action=postcopy needs post-copy allowed (postcopy=True)")
        if options.postcopy and (not options.live or self.postcopy_unavailable()):
            raise InvalidInput(f"post-copy cannot run: {self.postcopy_unavailable() or 'it needs a live migration'}")
        dest = _FAKE_HOSTS.get(dest_uri)
        if dest is None or dest is self:
            raise CommandFailed(f"migration of VM {name!r} to {dest_uri} failed: no such fake host; "
                                "it keeps running here")
        with self._lock:
            vm = self._get(name)
            if vm.state not in ("running", "paused"):
                raise InvalidInput(f"VM {name!r} is not running: live migration needs a running VM "
                                   "(start it, or migrate it cold)")
            disks = {t: replace(d, source=options.disk_sources.get(t, d.source))
                     for t, d in vm.disks.items()}
        sent = vm.spec.memory_mib * FAKE_MIGRATION_BYTES_PER_MIB
        phase = self._precopy(name, options, sent, progress, cancelled)
        try:
            for d in disks.values():
                if options.copy_storage != "none" or d.readonly:
                    check_disk_file(d)
        except (NotFound, InvalidInput) as e:
            raise CommandFailed(f"migration of VM {name!r} to {dest_uri} failed: {e.message}; "
                                "it keeps running here") from None
        spec = replace(vm.spec, disks=tuple(disks[t] for t in sorted(disks)),
                       console_log=options.console_log or vm.spec.console_log)
        if phase == "postcopy" and self.postcopy_link_cut:
            return self._split(name, vm, spec, disks, dest, dest_uri)
        with dest._lock:
            if name in dest._vms or any(v.spec.uuid == spec.uuid for v in dest._vms.values()):
                raise CommandFailed(f"migration of VM {name!r} to {dest_uri} failed: the destination "
                                    "already has a domain of that name or uuid; it keeps running here")
            state = "running" if phase == "postcopy" else vm.state
            moved = _Vm(spec=spec, state=state, disks=disks, console=list(vm.console),
                        snapshots=dict(vm.snapshots), boots=vm.boots, cpu_time_ns=vm.cpu_time_ns,
                        cpu_model=vm.cpu_model)
            moved.console.append(f"fake-hypervisor: migrated in from {self.uri}")
            dest._vms[name] = moved
        with self._lock:
            self._vms.pop(name, None)
        return MigrationResult(total_ms=1.0, downtime_ms=0.0, data_bytes=sent,
                               paused_by_timeout=phase == "paused", postcopy=phase == "postcopy")

    def _split(self, name, vm: _Vm, spec: VmSpec, disks, dest: FakeDriver, dest_uri: str):
        """The link broke during post-copy, as libvirt leaves it: paused here, stalled there
        (running, reason postcopy-failed), both halves kept."""
        with dest._lock:
            dest._vms[name] = _Vm(spec=spec, state="running", disks=disks, console=list(vm.console),
                                  boots=vm.boots, cpu_time_ns=vm.cpu_time_ns, reason="postcopy-failed",
                                  cpu_model=vm.cpu_model)
        with self._lock:
            vm.state, vm.reason = "paused", "postcopy-failed"
        raise PostCopyFailed(f"migration of VM {name!r} to {dest_uri} failed during post-copy: the link broke; "
                             "the guest's memory is split between this host and the destination, so it is "
                             "paused here and stalls there; both halves are kept")

    def _precopy(self, name, o: MigrationOptions, sent: int, progress, cancelled) -> str:
        """The rounds of pre-copy: "precopy" when it converged, "paused" when the timeout
        paused the guest (it then converges), "postcopy" once it switched; raises Cancelled or
        CommandFailed (timeout, never converged) with the VM left running here."""
        import time
        t0 = time.monotonic()
        for rnd in range(1, FAKE_PRECOPY_ROUNDS + 1):
            left = sent // (rnd + 1) if self.converges else sent // 2  # a busy guest's dirty set stays
            if progress:
                progress(MigrationProgress(elapsed_ms=int((time.monotonic() - t0) * 1000), data_total=sent,
                                           data_processed=sent * rnd, data_remaining=left,
                                           dirty_rate=0 if self.converges else 25600, memory_iteration=rnd))
            if cancelled is not None and cancelled():
                raise Cancelled(f"migration of VM {name!r} cancelled; it keeps running here")
            if self.converges:
                return "precopy"
            elapsed = time.monotonic() - t0
            timed_out = o.completion_timeout_s is not None and elapsed > o.completion_timeout_s
            due = o.postcopy and ((timed_out and o.timeout_action == "postcopy")
                                  or (o.postcopy_after_s is not None and elapsed >= o.postcopy_after_s)
                                  or (o.postcopy_after_iterations and rnd >= o.postcopy_after_iterations)
                                  # passes from the third that did not shrink the dirty set (_Convergence)
                                  or (o.postcopy_after_stalled and rnd - 2 >= o.postcopy_after_stalled))
            if due:
                if progress:
                    progress(MigrationProgress(elapsed_ms=int(elapsed * 1000), data_total=sent,
                                               data_processed=sent * rnd, data_remaining=left, dirty_rate=25600,
                                               memory_iteration=rnd, phase="postcopy"))
                time.sleep(self.postcopy_s)  # cancelled is no longer consulted: the guest runs there
                return "postcopy"
            if timed_out and o.timeout_action == "pause":
                return "paused"
            if timed_out and o.timeout_action == "abort":
                raise CommandFailed(f"migration of VM {name!r} did not converge within "
                                    f"{o.completion_timeout_s}s and was aborted; it keeps running here")
            time.sleep(FAKE_ROUND_S)
        raise CommandFailed(f"migration of VM {name!r} did not converge after {FAKE_PRECOPY_ROUNDS} rounds "
                            "(the fake guest dirties memory faster than it is copied); it keeps running here")

    def abort_migration(self, name: str) -> bool:
        """A fake migration is instantaneous: there is never a job to abort."""
        with self._lock:
            self._get(name)
        return False

    # -- post-copy recovery (SupportsPostcopyResume) --
    def postcopy_split(self, name: str) -> bool:
        with self._lock:
            vm = self._get(name)
            return vm.state == "paused" and vm.reason == "postcopy-failed"

    def resume_postcopy(self, name: str, dest_uri: str, options: MigrationOptions, *,
                        progress=None) -> MigrationResult:
        """Finish the broken post-copy of split VM ``name``: while ``postcopy_link_cut`` is
        still set the copy breaks again (PostCopyFailed, both halves kept); else the
        destination's half runs whole and the VM is gone here."""
        self.resume_calls += 1
        if not self.postcopy_split(name):
            raise Conflict(f"VM {name!r} is not the paused half of a broken post-copy here: nothing to resume")
        dest = _FAKE_HOSTS.get(dest_uri)
        moved = dest._vms.get(name) if dest is not None and dest is not self else None
        if moved is None or moved.reason != "postcopy-failed":
            raise CommandFailed(f"the destination at {dest_uri} has no half of VM {name!r}: the post-copy "
                                "cannot be resumed")
        with self._lock:
            vm = self._get(name)
        sent = vm.spec.memory_mib * FAKE_MIGRATION_BYTES_PER_MIB
        if progress:
            progress(MigrationProgress(elapsed_ms=0, data_total=sent, data_processed=sent // 2,
                                       data_remaining=sent // 2, dirty_rate=0, memory_iteration=1, phase="postcopy"))
        if self.postcopy_link_cut:
            raise PostCopyFailed(f"resuming the post-copy migration of VM {name!r} to {dest_uri} failed: the link "
                                 "is still down; the guest is still split; both halves are kept")
        with dest._lock:
            moved.reason = None
            moved.console.append(f"fake-hypervisor: post-copy from {self.uri} resumed and finished")
        with self._lock:
            self._vms.pop(name, None)
        return MigrationResult(total_ms=1.0, downtime_ms=None, data_bytes=sent, postcopy=True)
