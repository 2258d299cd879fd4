"""Instances (VMs and containers): create, actions, exec/logs/stats, delete, recovery.

Every change to one instance happens under that instance's lock; there is no global
lock around slow work, so creates of different instances run in parallel up to the
operation pool size. A create that fails (or is cancelled, or is cut by a crash)
removes everything it made: domain or container, volumes, seed, and the record itself.
The records are read and written through ``root.records`` (agent/services/records.py),
which announces every change as a lifecycle event.

Removal is best-effort per step and never leaves a record stuck: a step that fails (a
component is down) turns the instance into state ``error`` with what is left named in its
``error``; DELETE retries it, and so does the agent at start. A delete first marks the
record ``deleting``, so a crash in the middle is finished at the next start; so is a
create a crash cut (state ``creating``).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
import uuid

from agent import models
from agent.errors import redact as redact_text
from agent.errors import AgentError, Conflict, NotFound, Unavailable, Unprocessable, Unsupported
from agent.services.assembly import mac_for, root_volume
from agent.services.records import Instance
from containers.runtime import ContainerInfo, SupportsPause, SupportsReconcile
from containers.runtime import SupportsBulkStats as SupportsBulkContainerStats
from hypervisor.driver import SupportsBulkStats as SupportsBulkVmStats
from hypervisor.driver import VmInfo

log = logging.getLogger(__name__)


def _counters(section) -> dict:
    return {k: int(v) for k, v in (section or {}).items() if isinstance(v, (int, float))}


def _vm_stats(s: dict) -> dict:
    """The API's stats of a VM from the driver's (hypervisor.Driver.stats)."""
    return {"cpu_ns": s.get("cpu_time_ns"), "memory_bytes": s.get("memory_bytes"),
            "io": _counters(s.get("disk")), "net": _counters(s.get("net"))}


def _container_stats(s: dict) -> dict:
    """The API's stats of a container from the runtime's (containers.Runtime.stats)."""
    return {"cpu_ns": s.get("cpu_ns"), "memory_bytes": s.get("memory_bytes"), "pids": s.get("pids"),
            "oom_kills": s.get("oom_kills"), "io": _counters(s.get("io")), "net": _counters(s.get("net"))}
# why a VM gets 422 for exec and files (README "Consoles, interactive exec and files")
NO_GUEST_AGENT = ("a VM's commands and files would go through the QEMU guest agent, and no VM here has one: the "
                  "agent gives its domains no guest agent channel (virtio-serial org.qemu.guest_agent.0) and the "
                  "test guest runs no qemu-ga. Use the VM's console (GET /v1/instances/{id}/console, `nodeagent "
                  "console NAME`) or its user_data")
STARTS = ("start", "restart")  # actions refused while a volume of the instance has a read-write NBD export


def _msg(e: Exception) -> str:
    return e.message if isinstance(e, AgentError) else (str(e) or type(e).__name__)


def _missing_ok(fn, path, exc_info) -> None:
    """shutil.rmtree onerror: a file already gone is fine, anything else is a failure."""
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]




class InstanceService:
    def __init__(self, root):
        self.root = root
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()  # guards the dict only, never held during work
        self._list_cache: tuple[tuple[int, bool], bytes] | None = None
        # redact -> id -> (the record's generation, its JSON): see _fragments
        self._fragment_cache: dict[bool, dict[str, tuple[int, bytes]]] = {False: {}, True: {}}
        self._fragments_lock = threading.Lock()

    @property
    def records(self):
        """The instance records (agent/services/records.py): the only way to the table."""
        return self.root.records

    def lock(self, inst_id: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(inst_id, threading.Lock())

    # -- reads --
    def list(self) -> list[Instance]:
        return self.records.list()

    def list_json(self, *, redact: bool = False) -> bytes:
        """``{"instances": [...]}`` rendered once per change: the control plane polls this a lot.
        With ``redact`` (a reader token) errors carry no host paths."""
        gen = self.records.generation
        cached = self._list_cache
        if cached is not None and cached[0] == (gen, redact):
            return cached[1]
        with self._fragments_lock:  # one render at a time: the others then find it cached
            cached = self._list_cache
            if cached is not None and cached[0] == (gen, redact):
                return cached[1]
            body = b'{"instances":[' + b",".join(self._fragments(redact)) + b"]}"
            self._list_cache = ((gen, redact), body)
            return body

    def _fragments(self, redact: bool) -> list[bytes]:
        """Each record's JSON in list order, re-rendered only for the records written since
        the last render (a write with 1000 instances costs one row, not 1000: issue #20)."""
        frags = self._fragment_cache[redact]
        order = self.records.ids()
        seen = {i: self.records.row_generation(i) for i in order}  # read before the rows: a
        stale = [i for i in order if frags.get(i, (-1,))[0] != seen[i]]  # later write re-renders
        for inst in self.records.list_ids(stale):
            row = inst.to_dict()
            if redact:
                row["error"] = redact_text(row["error"])
            frags[inst.id] = (seen[inst.id], json.dumps(row, separators=(",", ":")).encode())
        for gone in frags.keys() - seen.keys():
            del frags[gone]
        return [frags[i][1] for i in order if i in frags]

    def get(self, ref: str) -> Instance:
        """The record of the instance whose id or name is ``ref``; NotFound if none."""
        inst = self.records.find(ref)
        if inst is None:
            raise NotFound(f"instance {ref!r} not found")
        return inst

    def counts(self) -> list[tuple[str, str, int]]:
        return self.records.counts()

    def running(self) -> list:
        """services.records.InstanceRef of every running instance (for stats_of_many)."""
        return self.records.refs(("running",))

    # -- create --
    def create(self, req: models.InstanceCreate) -> dict:
        """Validate and reserve the name now (409 at once), build in an operation (202)."""
        image, pool = self.check_create(req)
        inst_id, extra = self.reserve(req, image, pool)

        def work(op):
            return self.build(op, inst_id, req, image, pool, extra)

        try:
            return self.root.operations.submit("instance.create", inst_id, work)
        except BaseException:
            self.records.delete(inst_id)
            raise

    def check_create(self, req: models.InstanceCreate):
        """What a create request needs here (the host accepts work, the pool, an image of its
        kind); (the image, the pool)."""
        cfg = self.root.config
        self.root.host.refuse_if_draining(f"new instance {req.name!r}")
        pool = req.pool or cfg.default_pool
        if pool not in cfg.pools:
            raise NotFound(f"pool {pool!r} not found; configured pools: {', '.join(sorted(cfg.pools))}")
        image = self.root.store.get(req.image)
        if image.kind != req.kind:
            raise Unprocessable(f"image {req.image!r} is a {image.kind} image: it cannot make a {req.kind}")
        if req.kind == "container" and req.user_data:
            raise Unprocessable("user_data is for VMs: containers take env and command")
        if req.kind == "vm" and (req.ports or req.command):
            raise Unprocessable("ports and command are for containers: VMs take user_data")
        return image, pool

    def reserve(self, req: models.InstanceCreate, image, pool: str) -> tuple[str, tuple]:
        """Record the instance ``creating`` (Conflict if the name is taken; a crash from here on
        is undone by recover()) and reserve its volumes; (its id, the volumes' mounts)."""
        groups = self.root.secgroups.check(req.security_groups) if req.network == "bridge" else []
        vol_rows = self.root.volumes.resolve_for_create(req.volumes, req.kind) if req.volumes else []
        inst_id = uuid.uuid4().hex
        volumes = [root_volume(req.kind, inst_id)]
        spec = req.model_dump()
        spec.pop("volumes", None)  # attachments are the volumes table's (agent/services/volumes.py)
        spec["image_id"] = image.id
        if req.kind == "vm":  # the maxima are fixed at create: kept explicitly, a resize never moves them
            spec["max_cpus"] = req.max_cpus or max(1, math.ceil(req.cpus))
            spec["max_memory_mib"] = req.max_memory_mib or req.memory_mib
        now = time.time()
        if not self.records.insert(Instance(
                id=inst_id, name=req.name, kind=req.kind, image=image.id, state="creating", pool=pool, spec=spec,
                volumes=tuple(volumes), mac=mac_for(inst_id) if req.kind == "vm" else None,
                node=self.root.host.hostname(), created_at=now, updated_at=now)):
            raise Conflict(f"an instance named {req.name!r} exists: pick another name or delete it")
        if groups:  # before the operation: its attach renders the filter with them
            self.root.secgroups.join(inst_id, groups, apply=False)
        try:  # the volumes are this record's from now on (free again when it is gone)
            extra = self.root.volumes.reserve_for_create(inst_id, req.volumes, vol_rows, req.kind) if vol_rows else ()
        except BaseException:
            self.records.delete(inst_id)
            raise
        return inst_id, extra

    def build(self, op, inst_id: str, req: models.InstanceCreate, image, pool: str, extra=(), fill=None) -> dict:
        """Make the instance ``reserve`` recorded (in operation ``op``); ``fill`` puts data into its
        fresh disk or rootfs before it is defined (agent.services.assembly). On failure everything
        is removed, its record too."""
        with self.lock(inst_id):
            try:
                if req.kind == "vm":
                    info, ip = self.root.assembly.create_vm(self.root.driver, inst_id, req, image.id, pool,
                                                            phase=op.phase, volumes=extra, fill=fill)
                    state = info.state
                else:
                    info = self.root.assembly.create_container(self.root.runtime, req, image, pool, inst_id,
                                                               phase=op.phase, volumes=extra, fill=fill)
                    state, ip = info.state, info.ip
            except BaseException as e:
                try:
                    self.destroy(inst_id)
                except Exception as cleanup:  # the record is in state error now; report the cause
                    log.warning("a failed create could not remove everything it made",
                                extra={"instance": req.name, "error": str(cleanup)})
                    if isinstance(e, AgentError):
                        e.message += f" (cleanup incomplete, instance left in state error: {_msg(cleanup)})"
                        e.args = (e.message,)
                raise
            return {"instance": self.records.update(inst_id, state=state, ip=ip).to_dict()}

    def instance_dir(self, inst_id: str):
        """The instance's own dir (agent.services.assembly)."""
        return self.root.assembly.instance_dir(inst_id)

    def release_address(self, inst_id: str) -> bool:
        """Give the VM's address lease back; False if it held none (or there is no host network)."""
        return self.root.assembly.release_address(inst_id)

    def destroy(self, inst_id: str) -> bool:
        """Remove the workload, its volumes, its files and its record; each step tolerates absence.
        Best-effort: if a step fails, the ones that do not depend on it still run, the record
        stays in state ``error`` naming what is left (marked for the retry at start) and the
        first failure is raised. Volumes and files are kept while the workload may still use
        them (it could not be removed). False if the record was already gone. The caller
        holds the instance's lock (or owns the record, as a create or a recovery does)."""
        inst = self.records.find_id(inst_id)
        if inst is None:
            return False
        failures: list[tuple[str, Exception]] = []

        def step(what: str, fn) -> bool:
            try:
                fn()
                return True
            except Exception as e:  # noqa: BLE001 - collected, reported below
                failures.append((what, e))
                return False

        if inst.kind == "vm":
            gone = step(f"VM {inst.name!r}", lambda: self.root.driver.delete(inst.name))
            if gone:
                step("its address lease", lambda: self.release_address(inst_id))
        else:
            gone = step(f"container {inst.name!r}", lambda: self.root.runtime.delete(inst.name))
        if gone:
            for vol in inst.volumes:
                step(f"volume {vol!r} in pool {inst.pool!r}", lambda vol=vol: self._release_volume(inst, vol))
            step("its files", lambda: shutil.rmtree(self.root.config.state_path / "instances" / inst_id,
                                                    onerror=_missing_ok))
        if failures:
            left = "; ".join(f"{what}: {_msg(e)}" for what, e in failures)
            self.records.mark_cleanup(inst_id)
            self.records.update(inst_id, state="error",
                         error=f"not fully removed ({left}); fix that, then DELETE it again "
                               "(the agent also retries at start)")
            first = failures[0][1]
            if isinstance(first, AgentError):
                raise first
            raise Unavailable(f"instance {inst.name!r} could not be fully removed: {left}") from first
        self.records.delete(inst_id)
        self.root.snapshots.forget_instance(inst_id)  # their data went with the disks/rootfs
        return True

    def _release_volume(self, inst: Instance, vol: str) -> None:
        try:
            self.root.store.release(inst.pool, vol)
        except Unavailable:
            if self._volume_recorded(inst, vol):
                raise
            # never made (a create that failed to reach the pool, e.g. a wrong Ceph key):
            # the store holds no reference, so there is nothing to remove there

    @staticmethod
    def _being_removed(inst: Instance) -> bool:
        """Deleting, or in state error with its removal pending: no longer a workload to adopt."""
        return inst.state == "deleting" or inst.state == "error" and inst.cleanup_pending

    def _volume_recorded(self, inst: Instance, volume: str) -> bool:
        """True if the image store recorded ``volume`` (made, or being made) for ``inst``."""
        try:
            return (inst.pool, volume) in self.root.store.references(inst.image)
        except NotFound:
            return False

    def delete(self, ref: str) -> bool:
        """Mark the record ``deleting`` (a crash from here on is finished at the next start),
        then remove everything; a step that fails leaves it in state ``error`` (retry)."""
        inst = self.get(ref)
        if inst.state == "creating":
            raise Conflict(f"instance {inst.name!r} is being created: cancel or wait for its operation")
        with self.lock(inst.id):
            now = self.records.find_id(inst.id)
            if now is None:
                return False
            if now.state == "creating":  # a create took the lock first
                raise Conflict(f"instance {inst.name!r} is being created: cancel or wait for its operation")
            self.records.update(inst.id, state="deleting")
            return self.destroy(inst.id)

    # -- actions --
    def action(self, ref: str, req: models.InstanceAction) -> dict:
        inst = self.get(ref)
        if inst.state == "creating":
            raise Conflict(f"instance {inst.name!r} is being created: wait for its operation")
        if self._being_removed(inst):
            raise Conflict(f"instance {inst.name!r} is being removed ({inst.state}): DELETE it "
                           "(again) to finish")
        if inst.kind == "container" and req.action in ("pause", "resume") \
                and not isinstance(self.root.runtime, SupportsPause):
            raise Unsupported(f"the {self.root.config.containers.runtime} runtime cannot {req.action} containers")
        inst_id, name = inst.id, inst.name
        if req.action == "rebuild":  # agent/services/rebuild.py: checked before the operation
            from agent.services import rebuild
            rebuild.check(self.root, inst, req)
        if req.action in STARTS:
            self.root.exports.check_startable(inst)

        def work(op):
            with self.lock(inst_id):
                op.phase(req.action)
                if req.action in STARTS:  # again under the lock: exports take it too
                    self.root.exports.check_startable(inst)
                if req.action == "rebuild":
                    now = self.get(inst_id)  # checked again under the lock: a snapshot may have come
                    info = rebuild.rebuild(self.root, now, rebuild.check(self.root, now, req), req, op.phase)
                elif inst.kind == "vm":
                    info = self._vm_action(name, req)
                    if req.action in ("start", "restart"):
                        self.sync_port(inst)  # a vnetN tap has a new name each start
                else:
                    info = self._container_action(name, req)
                return {"instance": self.records.update(
                    inst_id, state=info.state, **_ip(info)).to_dict()}

        return self.root.operations.submit(f"instance.{req.action}", inst_id, work)

    def _vm_action(self, name, req):
        d = self.root.driver
        if req.action == "start":
            return d.start(name)
        if req.action == "stop":
            return d.stop(name, force=req.force, timeout=req.timeout)
        if req.action == "kill":
            return d.stop(name, force=True, timeout=req.timeout)
        if req.action == "restart":
            return d.reboot(name)
        return d.pause(name) if req.action == "pause" else d.resume(name)

    def _container_action(self, name, req):
        rt = self.root.runtime
        if req.action == "start":
            return rt.start(name)
        if req.action == "stop":
            return rt.kill(name, 9) if req.force else rt.stop(name, timeout=req.timeout)
        if req.action == "kill":
            return rt.kill(name, 9)
        if req.action == "restart":
            if rt.get(name).state == "running":
                rt.stop(name, timeout=req.timeout)
            return rt.start(name)
        return rt.pause(name) if req.action == "pause" else rt.resume(name)  # checked: SupportsPause

    # -- partial update (PATCH) --
    def update(self, ref: str, req: models.InstanceUpdate) -> dict:
        """Change what ``req`` gives (models.InstanceUpdate names what may change), live where
        the instance runs, and keep it in the record's spec (re-applied at every start, after
        an agent restart, and carried by a migration). Validated before anything changes; the
        record changes only once the driver applied it. Returns the instance."""
        inst = self.get(ref)
        given = req.model_fields_set
        self._check_changeable(inst)
        with self.lock(inst.id):
            inst = self.records.find_id(inst.id) or self.get(ref)
            self._check_changeable(inst)
            changes = {}
            size = self._check_resize(inst, req.cpus if "cpus" in given else None,
                                      req.memory_mib if "memory_mib" in given else None)
            if "bandwidth" in given:
                bw = req.bandwidth.limits() if req.bandwidth is not None else None
                if bw is not None and bw.limited and inst.spec.get("network", "bridge") != "bridge":
                    raise Unprocessable(f"instance {inst.name!r} has network {inst.spec.get('network')!r}: "
                                        "bandwidth limits apply to the bridge port")
                self._apply_bandwidth(inst, bw)
                changes["bandwidth"] = bw.to_dict() if bw is not None and bw.limited else None
            if size:
                try:
                    self._resize(inst, **size)
                except BaseException:
                    if "bandwidth" in given:  # nothing half-changed: the limits the record keeps
                        self._undo(lambda: self._apply_bandwidth(inst, _bandwidth_of(inst)), inst)
                    raise
                changes.update(size)
            if "autostart" in given:
                changes["autostart"] = req.autostart
            return self.records.update_spec(inst.id, **changes).to_dict()

    # -- resize --
    def _check_resize(self, inst: Instance, cpus: float | None, memory_mib: int | None) -> dict:
        """The spec changes of a resize to ``cpus``/``memory_mib`` (None: unchanged), checked
        against the kind's limits, the VM's maximum or the host's capacity (422 naming it);
        {} if nothing is asked. Changes nothing."""
        from containers import validate as ct_limits
        from hypervisor import validate as vm_limits
        if cpus is None and memory_mib is None:
            return {}
        if inst.kind == "vm":
            if cpus is not None and (cpus != int(cpus) or cpus < 1):
                raise Unprocessable(f"cpus of a VM are whole vCPUs, at least 1: got {cpus}")
            if memory_mib is not None and memory_mib < vm_limits.MIN_MEMORY_MIB:
                raise Unprocessable(f"memory_mib of a VM must be at least {vm_limits.MIN_MEMORY_MIB}")
            cpus = int(cpus) if cpus is not None else None
            vm_limits.check_resize(inst.name, cpus=cpus, memory_mib=memory_mib,
                                   max_cpus=inst.max_cpus, max_memory_mib=inst.max_memory_mib,
                                   live_cpus=int(inst.spec["cpus"]) if inst.state in ("running", "paused")
                                   else None)
        else:
            host_cpus, host_mib = self.root.host.capacity()
            if cpus is not None and not ct_limits.MIN_CPUS <= cpus <= min(ct_limits.MAX_CPUS, host_cpus):
                raise Unprocessable(f"cpus of a container must be {ct_limits.MIN_CPUS}..{host_cpus} "
                                    f"(this host has {host_cpus} cpus): got {cpus}", host_cpus=host_cpus)
            if memory_mib is not None and memory_mib < ct_limits.MIN_MEMORY_MIB:
                raise Unprocessable(f"memory_mib of a container must be at least {ct_limits.MIN_MEMORY_MIB}")
            if memory_mib is not None and memory_mib > host_mib:
                raise Unprocessable(f"instance {inst.name!r} asks for {memory_mib} MiB but this host has "
                                    f"{host_mib} MiB: ask for less", host_memory_mib=host_mib)
        return {k: v for k, v in (("cpus", cpus), ("memory_mib", memory_mib)) if v is not None}

    def _resize(self, inst: Instance, cpus: float | None = None, memory_mib: int | None = None) -> None:
        """Hand a checked resize to the instance's driver: live if it runs, else kept for its
        next start. If the driver fails, what it changed is undone and the error raised."""
        from containers.runtime import Limits
        from hypervisor.driver import SupportsResize
        if inst.kind == "vm":
            if not isinstance(self.root.driver, SupportsResize):
                raise Unsupported(f"the {self.root.config.hypervisor.driver} VM driver cannot resize VMs")
            self.root.driver.resize(inst.name, cpus=cpus, memory_mib=memory_mib)
            return
        pids = inst.spec.get("pids_max")
        old = Limits(cpus=inst.cpus, memory_mib=inst.memory_mib, pids_max=pids)
        new = Limits(cpus=inst.cpus if cpus is None else cpus,
                     memory_mib=inst.memory_mib if memory_mib is None else memory_mib, pids_max=pids)
        try:
            self.root.runtime.update_limits(inst.name, new)
        except BaseException:  # runc may have set some controllers before one refused
            self._undo(lambda: self.root.runtime.update_limits(inst.name, old), inst)
            raise

    @staticmethod
    def _undo(fn, inst: Instance) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - logged; the first failure is what the caller reports
            log.warning("cannot undo a partial change", extra={"instance": inst.name, "error": str(e)})

    def _check_changeable(self, inst: Instance) -> None:
        if inst.state in ("creating", "incoming", "migrating") or self._being_removed(inst):
            raise Conflict(f"instance {inst.name!r} is {inst.state}: change it once that is over")
        if self.root.migrations.source.busy(inst.id):
            raise Conflict(f"instance {inst.name!r} is being migrated: change it once that is over")

    def _apply_bandwidth(self, inst: Instance, bw) -> None:
        """Hand ``bw`` (None: unlimited) to the instance's driver (it keeps and applies it)."""
        from containers.bandwidth import Bandwidth
        from containers.runtime import SupportsBandwidth as RuntimeBandwidth
        from hypervisor.driver import SupportsBandwidth as DriverBandwidth
        bw = bw or Bandwidth()
        if inst.kind == "vm":
            target, kind = self.root.driver, DriverBandwidth
        else:
            target, kind = self.root.runtime, RuntimeBandwidth
        if not isinstance(target, kind):
            raise Unsupported(f"this host's {inst.kind} driver cannot limit bandwidth")
        target.set_bandwidth(inst.name, bw)

    def sync_port(self, inst: Instance) -> None:
        """Key a running VM's filter rules to the tap it runs on now (Assembly.sync_vm_port:
        a VM defined before the filter existed has libvirt's vnetN). Logged, never raised:
        the VM keeps running either way."""
        try:
            if self.root.assembly.sync_vm_port(self.root.driver, inst.id, inst.name):
                log.info("the VM's filter rules follow its tap", extra={"instance": inst.name})
        except Exception as e:  # noqa: BLE001 - logged; the instance keeps running
            log.warning("cannot key the VM's filter rules to its tap", extra={"instance": inst.name,
                                                                               "error": str(e)})

    def reapply_bandwidth(self, inst: Instance) -> None:
        """Hand the record's limits to the driver again (after a restart or a migration: the
        driver applies them to the ports that exist now)."""
        from containers.bandwidth import Bandwidth
        if inst.spec.get("bandwidth"):
            self._apply_bandwidth(inst, Bandwidth.from_dict(inst.spec["bandwidth"]))

    # -- consoles, interactive exec --
    def console(self, ref: str, caller: dict, request_id: str | None = None):
        """The websocket session (agent.services.console) of a watcher of ``ref``'s console: a
        VM's serial console or a container's terminal; admins type, readers watch. Conflict for
        an instance that does not run, and for a container created without a TTY."""
        from agent.services.console import console_session, not_a_tty
        inst = self.get(ref)
        if inst.kind == "container" and not inst.spec.get("tty"):
            raise not_a_tty(inst.name)
        if inst.state != "running":
            raise Conflict(f"instance {inst.name!r} is {inst.state}: its console opens when it runs")
        who = f"{caller.get('via', 'token')} {caller.get('name')!r} ({caller.get('role')})"
        return console_session(self.root.consoles, inst.name, can_type=caller.get("role") == "admin", who=who,
                               request_id=request_id, kind=inst.kind)

    def exec_interactive(self, inst, req: models.ExecRequest, caller: dict) -> dict:
        """Reserve an interactive exec session (agent.services.execs) for ``caller``."""
        from containers.runtime import ExecOptions, SupportsInteractiveExec
        if not isinstance(self.root.runtime, SupportsInteractiveExec):
            raise Unsupported("this host's container runtime has no interactive exec")
        if inst.state != "running":
            raise Conflict(f"container {inst.name!r} is {inst.state}: exec needs it running")
        opts = ExecOptions(command=tuple(req.command), tty=req.tty, env=tuple(sorted(req.env.items())),
                           cwd=req.cwd, user=req.user, cols=req.cols, rows=req.rows)
        from agent.services.execs import SESSION_TTL
        sid = self.root.execs.reserve(inst.id, opts, _identity(caller))
        return {"session": sid, "websocket": f"/v1/instances/{inst.id}/exec/{sid}", "expires_in": SESSION_TTL}

    def exec_attach(self, ref: str, session: str, caller: dict, request_id: str | None = None):
        """The websocket session of a reserved interactive exec (NotFound if none)."""
        from agent.services.execs import exec_session
        inst = self.get(ref)
        opts = self.root.execs.take(session, inst.id, _identity(caller))
        who = f"{caller.get('via', 'token')} {caller.get('name')!r} ({caller.get('role')})"
        return exec_session(self.root.runtime, inst.name, opts, who=who, request_id=request_id)

    # -- files (containers) --
    def _files_runtime(self, ref: str):
        from containers.runtime import SupportsFiles
        inst = self.get(ref)
        if inst.kind != "container":
            raise Unprocessable(f"file push and pull work on containers only: {NO_GUEST_AGENT}")
        if inst.state in ("creating", "incoming", "deleting"):
            raise Conflict(f"instance {inst.name!r} is {inst.state}: its files are not there yet")
        if not isinstance(self.root.runtime, SupportsFiles):
            raise Unsupported("this host's container runtime cannot reach containers' files")
        return inst, self.root.runtime

    def file_open(self, ref: str, path: str) -> FileBody | dict:
        """Regular file ``path`` of container ``ref``, to stream out (a FileBody the server
        closes); for a directory its listing {path, type, mode, uid, gid, entries, truncated}."""
        inst, rt = self._files_runtime(ref)
        fd, info = rt.open_file(inst.name, path)
        if info.kind == "directory":
            entries, truncated = rt.list_dir(inst.name, path)
            return {"path": path, "type": "directory", "mode": f"{info.mode:04o}", "uid": info.uid, "gid": info.gid,
                    "entries": entries, "truncated": truncated}
        return FileBody(fd, info)

    def make_dir(self, ref: str, path: str, *, uid: int, gid: int, mode: int) -> dict:
        inst, rt = self._files_runtime(ref)
        rt.make_dir(inst.name, path, uid=uid, gid=gid, mode=mode)
        log.info("directory made", extra={"instance": inst.name, "path": path[:200]})
        return {"path": path, "type": "directory", "uid": uid, "gid": gid, "mode": f"{mode:04o}"}

    def file_put(self, ref: str, path: str, read, *, uid: int, gid: int, mode: int) -> dict:
        inst, rt = self._files_runtime(ref)
        n = rt.put_file(inst.name, path, read, uid=uid, gid=gid, mode=mode)
        log.info("file pushed", extra={"instance": inst.name, "path": path[:200], "bytes": n})
        return {"path": path, "type": "file", "bytes": n, "uid": uid, "gid": gid, "mode": f"{mode:04o}"}

    # -- exec, logs, stats --
    def exec(self, ref: str, req: models.ExecRequest, caller: dict | None = None) -> dict:
        inst = self.get(ref)
        if inst.kind != "container":
            raise Unprocessable(f"exec works on containers only: {NO_GUEST_AGENT}")
        if req.interactive:
            return self.exec_interactive(inst, req, caller or {"name": "-", "via": "-"})
        res = self.root.runtime.exec(inst.name, list(req.command), timeout=req.timeout)
        return {"exit_code": res.exit_code, "stdout": res.stdout, "stderr": res.stderr,
                "truncated": res.truncated, "timed_out": res.timed_out}

    def logs(self, ref: str, tail: int | None) -> str:
        inst = self.get(ref)
        if inst.state == "creating":
            return ""
        if inst.kind == "vm":
            return self.root.driver.console_log(inst.name, tail=tail)
        return self.root.runtime.logs(inst.name, tail=tail)

    def stats(self, ref: str) -> dict:
        return self.stats_of(self.get(ref))

    def stats_of(self, inst) -> dict:
        """``stats`` of a record already in hand."""
        if inst.state == "creating":
            raise Conflict(f"instance {inst.name!r} is being created: no stats yet")
        if inst.kind == "vm":
            return _vm_stats(self.root.driver.stats(inst.name))
        return _container_stats(self.root.runtime.stats(inst.name))

    def stats_of_many(self, insts) -> dict[str, dict]:
        """stats_of() of each of ``insts`` (records or InstanceRefs in hand: a /metrics scrape), by
        instance id:
        the VMs' from one call where the driver has hypervisor.driver.SupportsBulkStats, the
        containers' read together where the runtime has containers.runtime.SupportsBulkStats,
        else one at a time. One that has none now (being created, gone meanwhile, its driver
        down) is left out, logged at debug."""
        vms = [i for i in insts if i.kind == "vm" and i.state != "creating"]
        cts = [i for i in insts if i.kind != "vm" and i.state != "creating"]
        driver, runtime = self.root.driver, self.root.runtime
        out: dict[str, dict] = {}
        if vms and isinstance(driver, SupportsBulkVmStats):
            out.update(self._from_bulk(vms, driver.bulk_stats, _vm_stats))
        if cts and isinstance(runtime, SupportsBulkContainerStats):
            out.update(self._from_bulk(cts, lambda: runtime.bulk_stats([i.name for i in cts]), _container_stats))
        for i in (*([] if isinstance(driver, SupportsBulkVmStats) else vms),
                  *([] if isinstance(runtime, SupportsBulkContainerStats) else cts)):
            try:
                out[i.id] = self.stats_of(i)
            except Exception as e:  # noqa: BLE001 - one instance's stats never fail the others'
                log.debug("no stats for instance", extra={"instance": i.name, "error": str(e)})
        return out

    @staticmethod
    def _from_bulk(group, read, shape) -> dict[str, dict]:
        """{id: shape(stats)} of the records in ``group`` that ``read()`` (name -> stats) has."""
        try:
            got = read()
        except Exception as e:  # noqa: BLE001 - e.g. libvirtd down: these have none this time
            log.debug("no bulk stats", extra={"kind": group[0].kind, "error": str(e)})
            return {}
        return {i.id: shape(got[i.name]) for i in group if i.name in got}

    # -- recovery --
    def recover(self) -> int:
        """Finish what a crash cut: remove instances left half-made (state 'creating') or
        half-deleted ('deleting'), and retry removals that failed before (state 'error',
        marked). One that still cannot be removed stays in state 'error'."""
        n = 0
        for inst in self.records.list(states=("creating", "deleting", "error")):
            if inst.state == "error" and not inst.cleanup_pending:
                continue  # an error of another kind (e.g. a migration's): the operator decides
            try:
                self.destroy(inst.id)
                n += 1
                log.info("removed an instance a crash or a failure left behind",
                         extra={"instance": inst.name, "state": inst.state})
            except Exception as e:  # noqa: BLE001 - destroy marked it error, with what is left
                log.warning("cannot remove an instance left behind yet", extra={"instance": inst.name,
                                                                                  "error": str(e)})
        return n

    def autostart(self, inst_ids: list[str]) -> int:
        """Start each of ``inst_ids`` (after a host reboot: agent.services.boot) that is stopped
        now, each in an operation; how many were started. One that cannot start is logged and
        left as it is (its operation says why). The pending list is cleared once, at the end
        (an agent killed before that hands them out again at its next start: a start of a
        running instance is skipped here, so nothing starts twice)."""
        n = 0
        for inst_id in inst_ids:
            inst = self.records.find_id(inst_id)
            try:
                if inst is not None and inst.state in ("stopped", "created") and inst.autostart:
                    self.action(inst_id, models.InstanceAction(action="start"))
                    n += 1
                    log.info("starting an instance after a host reboot", extra={"instance": inst.name})
            except Exception as e:  # noqa: BLE001 - logged; the others still start
                log.warning("cannot start an instance after a host reboot",
                            extra={"instance": inst.name if inst else inst_id, "error": str(e)})
        self.root.boot.done(*inst_ids)
        return n

    def reconcile(self) -> None:
        """Re-adopt running workloads: align each record's state with what the driver/runtime reports."""
        rows = self.list()
        for kind, lister in (("vm", lambda: self.root.driver.list()),
                             ("container", lambda: self.root.runtime.list())):
            mine = [i for i in rows if i.kind == kind and not self._being_removed(i)]
            if not mine:
                continue
            try:
                if kind == "container" and isinstance(self.root.runtime, SupportsReconcile):
                    self.root.runtime.reconcile()  # the runtime drops leftovers of containers it has no record of
                seen = {x.name: x for x in lister()}
            except Exception as e:
                log.warning("cannot reconcile instances", extra={"kind": kind, "error": str(e)})
                continue
            for inst in mine:
                info = seen.get(inst.name)
                if info is not None and kind == "vm" and info.state in ("running", "paused"):
                    self.sync_port(inst)
                if info is not None and inst.spec.get("bandwidth"):
                    try:
                        self.reapply_bandwidth(inst)
                    except Exception as e:  # noqa: BLE001 - logged; the instance keeps running
                        log.warning("cannot re-apply bandwidth limits", extra={"instance": inst.name,
                                                                               "error": str(e)})
                if info is None:
                    if inst.state != "lost":
                        self.records.update(inst.id, state="lost",
                                            error=f"the {kind} was not found on this host after the agent restarted")
                elif isinstance(info, VmInfo) and info.reason == "postcopy-failed":
                    if inst.state != "error":  # paused or stalled, its memory split: not running
                        self.records.update(inst.id, state="error", error=POSTCOPY_FAILED)
                elif isinstance(info, VmInfo) and info.reason == "postcopy" and inst.state in ("incoming", "error"):
                    pass  # a destination's half still pulling its pages (or stalled on a break it has
                    # not seen yet): not running until its migration ends (agent.migration.destination)
                elif info.state != inst.state or inst.state == "lost":
                    self.records.update(inst.id, state=info.state, error=None,
                                        **_ip(info))


def _bandwidth_of(inst: Instance):
    """The Bandwidth the record keeps (None: unlimited)."""
    from containers.bandwidth import Bandwidth
    bw = inst.spec.get("bandwidth")
    return Bandwidth.from_dict(bw) if bw else None


POSTCOPY_FAILED = ("a post-copy migration of this VM failed: its memory is split between this host and the other "
                   "one, so it is paused (or stalls) on both; resume it on its source host (POST "
                   "/v1/migrations/{id}/resume there: README \"Post-copy failures\") or delete it on both")


def _ip(info) -> dict:
    """The record's ``ip`` update for what a driver reported: a container's leased address;
    VMs' addresses are the agent's own (assembly), never reported back."""
    return {"ip": info.ip} if isinstance(info, ContainerInfo) and info.ip else {}


def _identity(caller: dict) -> str:
    """Who a session is bound to: a token and a certificate of the same name are not one caller."""
    return f"{caller.get('via', 'token')}:{caller.get('name')}"


class FileBody:
    """A pulled file as a WSGI body: at most ``info.size`` bytes (what the Content-Length said,
    even if the file grows meanwhile), in FILE_CHUNK pieces; ``close`` (the server calls it,
    HEAD included) closes the descriptor."""

    FILE_CHUNK = 1024 * 1024

    def __init__(self, fd: int, info):
        self.fd, self.info, self._left = fd, info, info.size

    def __iter__(self):
        import os
        while self._left > 0:
            data = os.read(self.fd, min(self.FILE_CHUNK, self._left))
            if not data:
                return
            self._left -= len(data)
            yield data

    def close(self) -> None:
        import os
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

