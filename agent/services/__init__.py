"""The composition root: builds the image store, pools, driver, runtime, the host network
and the metrics from config.

Nothing here starts threads at import; ``Services.start()`` (called in the server's
worker after fork, or by tests) starts the operation pool and runs crash recovery.
The VM driver and container runtime are built on first use, so an agent on a host
without libvirtd still serves containers (and says how to fix the VM side). Every
driver, runtime and pool is built by the same call, agent.registry.build; the host's
bridge network is built once and shared by the container runtime and VMs' addresses.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from agent import registry
from agent.auth import Tokens
from agent.config import Config
from agent.errors import AgentError, InvalidInput, Unavailable
from agent.events import EventBus
from agent.metrics import Metrics
from agent.operations import Operations
from agent.state import Database

if TYPE_CHECKING:
    from agent.migration import MigrationService
    from agent.services.assembly import Assembly
    from agent.services.host import HostService
    from agent.services.images import ImageService
    from agent.services.instances import InstanceService
    from agent.services.records import InstanceRecords
    from agent.services.secgroups import SecurityGroups
    from agent.services.volumes import VolumeService
    from agent.services.exports import ExportService
    from agent.services.snapshots import SnapshotService
    from agent.services.backups import BackupService
    from containers.network import Network
    from containers.runtime import Runtime
    from hypervisor.driver import Driver
    from storage import ImageStore
    from storage.backend import Backend
    from storage.sources import AddressPolicy

log = logging.getLogger(__name__)
ADOPT_WAIT_S = 30  # a change asked for while the agent re-adopts its workloads waits at most this long
STATE_DIR_MODE = 0o711  # nobody else lists it; QEMU (another user) reaches its disks and seeds by path


class Services:
    config: Config
    db: Database
    events: EventBus
    tokens: Tokens
    operations: Operations
    records: InstanceRecords
    images: ImageService
    instances: InstanceService
    host: HostService
    migrations: MigrationService
    secgroups: SecurityGroups
    volumes: VolumeService
    exports: ExportService
    snapshots: SnapshotService
    backups: BackupService
    metrics: Metrics
    started: bool

    def __init__(self, config: Config, db: Database | None = None):
        from agent.migration import MigrationService
        from agent.services.host import HostService
        from agent.services.images import ImageService
        from agent.services.instances import InstanceService
        from agent.services.records import InstanceRecords
        from agent.services.secgroups import SecurityGroups
        from agent.services.volumes import VolumeService

        self.config = config
        config.state_path.mkdir(parents=True, exist_ok=True)
        config.state_path.chmod(STATE_DIR_MODE)
        if config.images.import_dirs is None:  # the default import dir: root-only, like the state dir
            (config.state_path / "import").mkdir(mode=0o700, exist_ok=True)
        self.db = db or Database(config.db_path)
        self.events = EventBus(self.db, replay=config.api.event_replay)
        self.tokens = Tokens(self.db)
        oc = config.operations
        self.operations = Operations(self.db, self.events, workers=config.workers, retention=oc.retention,
                                     max_finished=oc.max_finished, prune_interval=oc.prune_interval)
        self.records = InstanceRecords(self.db, self.events)  # the only reader/writer of `instances`
        self._lock = threading.RLock()  # reentrant: the runtime is built with the network
        self._pools: dict[str, Backend] | None = None
        self._store: ImageStore | None = None
        self._driver: Driver | None = None
        self._runtime: Runtime | None = None
        self._network: Network | None = None
        self._assembly: Assembly | None = None
        self.images = ImageService(self)
        self.instances = InstanceService(self)
        self.host = HostService(self)
        self.migrations = MigrationService(self)
        self.secgroups = SecurityGroups(self)  # the only reader/writer of security_group*
        self.volumes = VolumeService(self)  # the only reader/writer of volumes
        from agent.services.exports import ExportService
        self.exports = ExportService(self)  # NBD exports (storage.nbd owns their table)
        self.metrics = Metrics(self)
        from agent.services.snapshots import SnapshotService
        self.snapshots = SnapshotService(self)  # the only reader/writer of `snapshots`
        from agent.services.backups import BackupService
        self.backups = BackupService(self)  # the only reader/writer of `backups`
        from agent.services.boot import BootState
        self.boot = BootState(self.db, config.boot_id_path)  # the only reader/writer of host_boot
        from agent.services.console import Consoles
        # VM serial consoles and TTY containers' terminals, shared by their watchers
        self.consoles = Consoles(lambda: self.driver, lambda: self.runtime)
        from agent.services.execs import ExecSessions
        self.execs = ExecSessions()  # interactive exec sessions waiting for their websocket
        self.started = False
        # set once the workloads are re-adopted (start): until then only reads are served
        self.adopted = threading.Event()

    # -- components, built lazily --
    @property
    def pools(self) -> dict[str, Backend]:
        with self._lock:
            if self._pools is None:
                self._pools = {
                    name: registry.build("backend", pc.kind, {**pc.options(), "name": name},
                                         state_dir=str(self.config.pool_dir(name)), db=self.db, network=None)
                    for name, pc in self.config.pools.items()}
            return self._pools

    @property
    def store(self) -> ImageStore:
        pools = self.pools
        with self._lock:
            if self._store is None:
                from storage import ImageStore
                self._store = ImageStore(
                    self.db, pools, default_pool=self.config.default_pool,
                    cache_dir=str(self.config.state_path / "cache"),
                    max_layer_bytes=self.config.images.max_layer_bytes,
                    max_layer_ratio=self.config.images.max_layer_ratio,
                    max_layer_entries=self.config.images.max_layer_entries,
                    address_policy=self.address_policy,
                    max_image_bytes=self.config.images.max_image_bytes,
                    stall_timeout=self.config.images.stall_timeout)
            return self._store

    @property
    def address_policy(self) -> AddressPolicy:
        """What image sources (URLs, registries) may reach: [images] allow_url_hosts."""
        from storage.sources import AddressPolicy
        return AddressPolicy(self.config.images.allow_url_hosts)

    @property
    def network(self) -> Network:
        """The host's bridge network (``[network]``): ONE lease table and bridge for the
        containers' and the VMs' addresses. Built without touching the host (the bridge is
        made on first use)."""
        with self._lock:
            if self._network is None:
                from containers.network import Network, short_hash
                net = self.config.network
                # the tag the runtime's names carry (veths, netns, rule comments): one per state dir
                rtag = short_hash(os.path.abspath(self.config.state_path / "containers"), 4)
                self._network = Network(self.db, bridge=net.bridge, subnet=net.subnet, nat=net.nat, rtag=rtag)
                self._network.policy_source = self.secgroups.policy
                self._network.port_policy_source = self.secgroups.port_policy
            return self._network

    def network_if_used(self) -> Network | None:
        """The host network if its filter is to be kept here: a runtime or driver that puts
        instances on the host bridge (the fakes do not: no host tables for them)."""
        try:
            bridged = registry.load("runtime", self.config.containers.runtime).uses_host_network
        except (InvalidInput, ImportError):
            bridged = True
        return self.network if bridged or self.vm_network is not None else None

    @property
    def driver(self) -> Driver:
        with self._lock:
            if self._driver is None:
                hc = self.config.hypervisor
                try:
                    self._driver = registry.build("driver", hc.driver, hc.model_dump(),
                                                  state_dir=str(self.config.state_path / "vms"),
                                                  db=self.db, network=self.network)
                except AgentError:
                    raise
                except Exception as e:
                    raise Unavailable(f"VM driver {hc.driver!r} could not start: {e}; start libvirt's daemons "
                                      "as root: `virtlogd -d && libvirtd -d` (`nodeagent serve` does it by itself "
                                      "without systemd), or `systemctl start libvirtd`") from None
            return self._driver

    @property
    def vm_network(self) -> Network | None:
        """Where VMs' addresses are leased: the host network when the driver puts VMs' NICs
        on the host bridge (``Driver.uses_host_network``), else None (the fake's VMs touch
        no host network). Read from the driver's class: no hypervisor is needed for it."""
        try:
            bridged = registry.load("driver", self.config.hypervisor.driver).uses_host_network
        except (InvalidInput, ImportError):  # the driver property says what is wrong where VMs are used
            bridged = True
        return self.network if bridged else None

    @property
    def assembly(self) -> Assembly:
        """What instances are made of (agent.services.assembly) on this host's store and network."""
        if self._assembly is None:  # built outside self._lock: store and vm_network take it
            from agent.services.assembly import Assembly
            self._assembly = Assembly(self.store, self.vm_network, bridge=self.config.network.bridge,
                                      instances_dir=self.config.state_path / "instances")
        return self._assembly

    @property
    def runtime(self) -> Runtime:
        with self._lock:
            if self._runtime is None:
                cc = self.config.containers
                try:
                    self._runtime = registry.build("runtime", cc.runtime, cc.model_dump(),
                                                   state_dir=str(self.config.state_path / "containers"),
                                                   db=self.db, network=self.network)
                except AgentError:
                    raise
                except Exception as e:
                    raise Unavailable(f"container runtime {cc.runtime!r} could not start: {e}; "
                                      "install runc and conmon (scripts/setup-host)") from None
            return self._runtime

    # -- lifecycle --
    def start(self, *, readopt_in_background: bool = False, on_adopted=None) -> None:
        """Start the worker pool, clean up after a crash, re-adopt running workloads.

        With ``readopt_in_background`` (the server, once its socket listens), only the
        operations a crash cut are failed here and the rest runs in a thread: the API answers
        reads at once (records show their last known state until re-adopted) and every
        request that changes something waits for ``adopted`` (at most ADOPT_WAIT_S, then
        503). ``on_adopted`` is called when re-adoption has finished."""
        if self.started:
            return
        self.started = True
        self._phases = {}
        self._t = time.monotonic()
        failed = self.operations.recover()
        self._phase("operations")
        if not readopt_in_background:
            self._readopt(len(failed), on_adopted)
            return
        threading.Thread(target=self._readopt, args=(len(failed), on_adopted), name="readopt", daemon=True).start()

    def _phase(self, name: str) -> None:
        now = time.monotonic()
        self._phases[name] = int((now - self._t) * 1000)
        self._t = now

    def _readopt(self, recovered: int, on_adopted) -> None:
        """The re-adoption part of ``start``: everything that reads or changes workloads."""
        try:
            self.instances.recover()
            self.snapshots.sweep()  # after recover: the rows of instances it removed go too
            self._sweep_backups()
            self.migrations.recover()
            self.secgroups.ensure_default()
            self._phase("recover")
            self._rebuild_filter()
            self._phase("filter")
            to_start = self.boot.check(self.records)  # before reconcile turns what a reboot stopped to stopped
            self.instances.reconcile()
            self._phase("reconcile")
            self._recover_volumes()
            self._recover_exports()
            self._phase("volumes")
            if not self.started:
                return  # stopped meanwhile: take no work
            self.operations.start()
            self.instances.autostart(to_start)
            self.images.start_periodic_gc()  # its first run sweeps what a killed agent left
            self._phase("autostart")
            log.info("agent services started", extra={"recovered_operations": recovered, "phases_ms": self._phases})
        except Exception:
            if threading.current_thread().name != "readopt":
                self.started = False
                raise
            # as a failed start before serving: the process ends and its supervisor restarts it
            log.exception("re-adopting the workloads failed: the agent exits")
            logging.shutdown()
            os._exit(1)
        if self.started:
            self.adopted.set()
        if on_adopted is not None:
            on_adopted()

    def wait_adopted(self) -> None:
        """Return once the workloads are re-adopted; Unavailable if that takes over ADOPT_WAIT_S."""
        if not self.adopted.wait(ADOPT_WAIT_S):
            raise Unavailable("the agent is re-adopting its instances after a restart: retry in a few seconds")

    def _rebuild_filter(self) -> None:
        """The tenant filter from the state DB (after an agent restart or a host reboot)."""
        try:
            self.secgroups.apply()
        except AgentError as e:
            log.warning("cannot rebuild the tenant network filter", extra={"error": e.message})

    def _sweep_backups(self) -> None:
        """Remove what backups and uploads a killed agent left unfinished."""
        try:
            self.backups.sweep()
        except AgentError as e:
            log.warning("cannot sweep unfinished backups", extra={"error": e.message})

    def _recover_volumes(self) -> None:
        """Finish volume creates and deletes a crash cut; drop attachments that did not hold."""
        try:
            self.volumes.recover()
        except AgentError as e:
            log.warning("cannot recover volumes", extra={"error": e.message})

    def _recover_exports(self) -> None:
        """Adopt the NBD exports whose daemons outlived the agent; serve again those that did not."""
        try:
            out = self.exports.recover()
        except AgentError as e:
            log.warning("cannot recover NBD exports", extra={"error": e.message})
            return
        if any(out.values()):
            log.info("NBD exports recovered", extra=out)

    def stop(self) -> None:
        """Stop taking work; VMs and containers keep running."""
        self.images.stop_periodic_gc()
        self.operations.shutdown(wait=False)
        self.started = False
