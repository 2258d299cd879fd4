"""The composition root: builds the image store, pools, driver and runtime from config.

Nothing here starts threads at import; ``Services.start()`` (called in the server's
worker after fork, or by tests) starts the operation pool and runs crash recovery.
The VM driver and container runtime are built on first use, so an agent on a host
without libvirtd still serves containers (and says how to fix the VM side).
"""
from __future__ import annotations

import logging
import threading

from agent import registry
from agent.auth import Tokens
from agent.config import Config
from agent.errors import AgentError, Unavailable
from agent.events import EventBus
from agent.operations import Operations
from agent.state import Database

log = logging.getLogger(__name__)
STATE_DIR_MODE = 0o711  # nobody else lists it; QEMU (another user) reaches its disks and seeds by path


class Services:
    def __init__(self, config: Config, db: Database | None = None):
        from agent.services.host import HostService
        from agent.services.images import ImageService
        from agent.services.instances import InstanceService
        from agent.services.records import InstanceRecords
        from agent.migration import MigrationService

        self.config = config
        config.state_path.mkdir(parents=True, exist_ok=True)
        config.state_path.chmod(STATE_DIR_MODE)
        if config.images.import_dirs is None:  # the default import dir: root-only, like the state dir
            (config.state_path / "import").mkdir(mode=0o700, exist_ok=True)
        self.db = db or Database(config.db_path)
        self.events = EventBus()
        self.tokens = Tokens(self.db)
        self.operations = Operations(self.db, self.events, workers=config.workers)
        self.records = InstanceRecords(self.db, self.events)  # the only reader/writer of `instances`
        self._lock = threading.Lock()
        self._pools = None
        self._store = None
        self._driver = None
        self._runtime = None
        self._vm_network = None
        self._assembly = None
        self.images = ImageService(self)
        self.instances = InstanceService(self)
        self.host = HostService(self)
        self.migrations = MigrationService(self)
        self.started = False

    # -- components, built lazily --
    @property
    def pools(self) -> dict:
        with self._lock:
            if self._pools is None:
                pools = {}
                for name, pc in self.config.pools.items():
                    opts = pc.options()
                    if pc.kind == "local":
                        opts.setdefault("path", str(self.config.pool_dir(name)))
                    pools[name] = registry.load("backend", pc.kind)(name, **opts)
                self._pools = pools
            return self._pools

    @property
    def store(self):
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
    def address_policy(self):
        """What image sources (URLs, registries) may reach: [images] allow_url_hosts."""
        from storage.sources import AddressPolicy
        return AddressPolicy(self.config.images.allow_url_hosts)

    @property
    def driver(self):
        with self._lock:
            if self._driver is None:
                hc = self.config.hypervisor
                cls = registry.load("driver", hc.driver)
                try:
                    if hc.driver == "fake":
                        self._driver = cls()
                    else:
                        self._driver = cls(uri=hc.uri, virt_type=hc.virt_type,
                                           state_dir=str(self.config.state_path / "vms"))
                except AgentError:
                    raise
                except Exception as e:
                    raise Unavailable(f"VM driver {hc.driver!r} could not start: {e}; "
                                      "start libvirtd (`libvirtd -d`) or run scripts/setup-host") from None
            return self._driver

    @property
    def vm_network(self):
        """Addresses for VMs on the host bridge, leased from the same pool as containers'
        (``[network]``); None with the fake driver (its VMs touch no host network)."""
        with self._lock:
            if self._vm_network is None and self.config.hypervisor.driver != "fake":
                from containers.network import Network, short_hash
                net = self.config.network
                self._vm_network = Network(self.db, bridge=net.bridge, subnet=net.subnet, nat=net.nat,
                                           rtag=short_hash(str(self.config.state_path / "containers"), 4))
            return self._vm_network

    @property
    def assembly(self):
        """What instances are made of (agent.services.assembly) on this host's store and network."""
        if self._assembly is None:  # built outside self._lock: store and vm_network take it
            from agent.services.assembly import Assembly
            self._assembly = Assembly(self.store, self.vm_network, bridge=self.config.network.bridge,
                                      instances_dir=self.config.state_path / "instances")
        return self._assembly

    @property
    def runtime(self):
        with self._lock:
            if self._runtime is None:
                cc, net = self.config.containers, self.config.network
                cls = registry.load("runtime", cc.runtime)
                try:
                    if cc.runtime == "fake":
                        self._runtime = cls()
                    else:
                        extra = {"cgroup_parent": cc.cgroup_parent} if cc.cgroup_parent else {}
                        self._runtime = cls(str(self.config.state_path / "containers"), self.db,
                                            bridge=net.bridge, subnet=net.subnet, nat=net.nat,
                                            exec_output_bytes=cc.exec_output_bytes, **extra)
                except AgentError:
                    raise
                except Exception as e:
                    raise Unavailable(f"container runtime {cc.runtime!r} could not start: {e}; "
                                      "install runc and conmon (scripts/setup-host)") from None
            return self._runtime

    # -- lifecycle --
    def start(self) -> None:
        """Start the worker pool, clean up after a crash, re-adopt running workloads."""
        if self.started:
            return
        failed = self.operations.recover()
        self.instances.recover()
        self.migrations.recover()
        self.instances.reconcile()
        self.operations.start()
        self.images.start_periodic_gc()  # its first run sweeps what a killed agent left
        self.started = True
        log.info("agent services started", extra={"recovered_operations": len(failed)})

    def stop(self) -> None:
        """Stop taking work; VMs and containers keep running."""
        self.images.stop_periodic_gc()
        self.operations.shutdown(wait=False)
        self.started = False
