"""The source's side of a migration: it owns the instance and orchestrates (see agent.migration):
prepare there, copy (live VM, stopped VM's disk, container rootfs), finish there (retried), forget here."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections import OrderedDict

from agent import models
from agent.errors import (AgentError, Cancelled, CommandFailed, Conflict, InsufficientResources, InvalidInput,
                          NotFound, PostCopyFailed, Unavailable, Unprocessable, Unsupported)
from agent.migration.common import (INCOMING, LOCAL_POOL_KINDS, drop_unused_secrets, other_group_model,
                                    problems)
from agent.migration import transport
from agent.migration.peer import PeerClient, Peers
from agent.migration.transfer import NO_SPACE, allocated_bytes, rootfs_paths
from agent.services.records import Instance
from hypervisor.driver import SupportsCpuCheck, SupportsMigration, SupportsPostcopyResume

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0  # how often the source checks the destination agent during the copy
HEALTH_FAILURES = 3  # consecutive failed checks before the source aborts the migration
FINISH_ATTEMPTS = 5  # confirming is retried: the guest already runs there
FINISH_RETRY_S = 2
CRIU_CHECK_TIMEOUT_S = 30
INSTANCE_FIELDS = ("id", "name", "kind", "pool", "volumes", "mac", "ip")  # what the destination's record keeps
RECENT_MIGRATIONS = 256  # ended migrations whose last figures GET still shows (until a restart)
RESUME_POLL_S = 2.0  # how often a broken post-copy's source asks whether the destination answers again
SPLIT_KEY = "postcopy_split"  # in a split VM's spec: {peer, uri, migration}, what a resume needs


def criu_works() -> tuple[bool, str]:
    """Whether ``criu check`` passes here (container live migration needs it), and why not."""
    if not shutil.which("criu"):
        return False, "criu is not installed"
    try:
        r = subprocess.run(["criu", "check"], capture_output=True, text=True, timeout=CRIU_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, "`criu check` timed out"
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        return False, f"`criu check` fails: {lines[-1] if lines else 'exit ' + str(r.returncode)}"
    return True, ""


def live_options(req: models.MigrationCreate, policy, postcopy_unavailable: str | None) -> dict:
    """The controls of a live VM migration: the request's, the rest from the host's policy
    (``policy``: [migration] of the config). Unprocessable, before anything moves, for what
    cannot run: post-copy asked for where the kernel lacks userfaultfd (``postcopy_unavailable``
    says why), a timeout action without a timeout. Post-copy the caller did not ask for is
    the policy's only where it can run; the policy's own bounds switch to it unless the caller
    set the switch itself (timeout_action=postcopy)."""
    asked = req.controls()
    wants_postcopy = req.postcopy is True or req.timeout_action == "postcopy"
    if wants_postcopy and postcopy_unavailable:
        raise Unprocessable(f"post-copy was requested but {postcopy_unavailable}")
    live = req.mode == "live"
    postcopy = live and (wants_postcopy if req.postcopy is not None or wants_postcopy
                         else policy.postcopy and not postcopy_unavailable)
    timeout = asked.get("completion_timeout_s", policy.completion_timeout_s)
    action = asked.get("timeout_action", policy.timeout_action)
    if "timeout_action" in asked and timeout is None:
        raise Unprocessable(f"timeout_action={action} needs completion_timeout_s (this host's policy sets no "
                            "completion timeout)")
    if action == "postcopy" and not postcopy:
        action = "abort"  # the policy's post-copy action, where post-copy is off (asked, or impossible)
    by_policy = postcopy and req.timeout_action != "postcopy"
    return {"postcopy_required": wants_postcopy,
            "max_downtime_ms": asked.get("max_downtime_ms", policy.max_downtime_ms),
            "bandwidth_mib_s": asked.get("bandwidth_mib_s", policy.bandwidth_mib_s),
            "auto_converge": asked.get("auto_converge", policy.auto_converge),
            "completion_timeout_s": timeout, "timeout_action": action, "postcopy": postcopy,
            "postcopy_after_stalled": policy.postcopy_after_stalled if by_policy else None,
            "postcopy_after_s": policy.postcopy_after_s if by_policy else None,
            "postcopy_after_iterations": policy.postcopy_after_iterations if by_policy else None}


def _check_destination(peer: PeerClient, driver, inst: Instance) -> None:
    """Before anything moves: Conflict when the destination says it is draining (host
    maintenance); Unprocessable when it runs KVM and its CPU lacks what the running guest's
    CPU needs (libvirt's CPU map, here: SupportsCpuCheck). A peer that does not answer (or an
    older one) is left to the migration, which reports it; the destination checks both again
    at prepare (draining; its own compareCPU)."""
    try:
        facts = peer.host()
    except AgentError:
        return
    if facts.draining:
        raise Conflict(f"destination {peer.name!r} is draining (host maintenance): it takes no instances; "
                       f"migrate to another peer, or end its maintenance (`nodeagent host restore` there)")
    if inst.kind != "vm" or inst.state not in ("running", "paused") or not isinstance(driver, SupportsCpuCheck):
        return
    guest = driver.guest_cpu(inst.name)
    why = other_group_model(guest, facts.cpu_model, facts.cpu_group)
    if why:
        raise Unprocessable(f"destination {peer.name!r} cannot take VM {inst.name!r}: {why}; nothing moved")
    if not facts.host_cpu:
        return  # TCG there: QEMU emulates the CPU (its prepare checks it knows a named model)
    try:
        why = driver.cpu_missing(guest, facts.host_cpu) if guest else None
    except InvalidInput as e:  # a model this host's libvirt does not know: the destination's prepare checks
        log.info("destination CPU not checked here", extra={"peer": peer.name, "instance": inst.name,
                                                            "error": e.message})
        return
    if why:
        raise Unprocessable(f"destination {peer.name!r} cannot run VM {inst.name!r}'s CPU: {why}; nothing moved: "
                            "migrate it to a host with a CPU at least as capable")


def incoming_request(inst: Instance, image, *, data_bytes: int, disk_size: int | None = None,
                     shared_volumes: dict[str, str] | None = None, idmap=None,
                     security_groups: list[dict] | None = None,
                     guest_cpu: str | None = None, attached_volumes: list[dict] | None = None,
                     snapshots: list[dict] | None = None) -> models.IncomingMigration:
    """What the destination is asked to prepare (``POST /v1/peer/migrations``) for ``inst``:
    checked here with the model the destination parses it with. ``idmap``: a container's user
    namespace map here (containers.IdMap), None without one. ``security_groups``: the
    definitions of the instance's groups (they travel with it)."""
    fields = {"disk_size": disk_size, "shared_volumes": shared_volumes, "security_groups": security_groups,
              "guest_cpu": guest_cpu, "attached_volumes": attached_volumes or None, "snapshots": snapshots or None,
              "idmap": {"host_id": idmap.host_id, "size": idmap.size} if idmap else None}
    return _request(models.IncomingMigration, {
        "instance": {k: v for k, v in inst.to_dict().items() if k in INSTANCE_FIELDS},
        "spec": inst.spec_dict(), "data_bytes": data_bytes, "image_bytes": image.size,
        "image": {"id": image.id, "name": image.name, "format": image.format, "kind": image.kind},
        **{k: v for k, v in fields.items() if v is not None}}, f"instance {inst.name!r}")


def finish_request(**fields) -> models.IncomingFinish:
    """What the destination is asked to finish with (``POST /v1/peer/migrations/{id}/finish``)."""
    return _request(models.IncomingFinish, fields, "the finish request")


def _request(model, fields: dict, what: str):
    """``fields`` as a ``model`` (parsed as the peer parses the JSON it gets); Unprocessable if
    they are not one (the destination would refuse them the same way)."""
    from pydantic import ValidationError
    try:
        return model.model_validate_json(json.dumps(fields))
    except ValidationError as e:
        raise Unprocessable(f"{what} cannot be sent to a peer: {problems(e)}") from None


class MigrationSource:
    """Sending instances to peers: the migrations this host runs, and their live figures."""

    def __init__(self, root, peers: Peers):
        self.root, self.peers = root, peers
        self._live: dict[str, dict] = {}  # running migration (= operation) id -> what it is, live figures
        self._recent: OrderedDict[str, dict] = OrderedDict()  # the last figures of ended ones, newest last
        self._busy: set[str] = set()  # instance ids being migrated away
        self._sending: dict[str, str] = {}  # instance id being migrated away -> destination peer
        self._lock = threading.Lock()

    @property
    def config(self):
        return self.root.config

    def busy(self, inst_id: str) -> bool:
        """True while the instance is being migrated away (its spec was sent: leave it be)."""
        with self._lock:
            return inst_id in self._busy

    def _groups(self, inst: Instance) -> list[dict] | None:
        """The definitions of a bridged instance's security groups (None: no bridge)."""
        if inst.spec_dict().get("network", "bridge") != "bridge":
            return None
        return self.root.secgroups.definitions(self.root.secgroups.of_instance(inst.id))

    def _guest_cpu(self, name: str) -> str | None:
        """The running guest's CPU for the destination's check (SupportsCpuCheck); None where
        no check applies (TCG) or the driver cannot say."""
        driver = self.root.driver
        return driver.guest_cpu(name) if isinstance(driver, SupportsCpuCheck) else None

    def _carries_snapshots(self, inst: Instance) -> bool:
        """Whether the migration of ``inst`` carries its snapshots: a stopped VM's offline move
        does (internal snapshots inside the disk layer it streams)."""
        return inst.kind == "vm" and inst.state == "stopped" and self.root.pools[inst.pool].kind == "local"

    def sending_to(self, peer: str) -> list[str]:
        """The ids of the instances this host is migrating to ``peer`` right now."""
        with self._lock:
            return [i for i, dest in self._sending.items() if dest == peer]

    def create(self, req: models.MigrationCreate) -> dict:
        inst = self.root.instances.get(req.instance)
        if self.root.snapshots.count(inst.id) and not self._carries_snapshots(inst):
            raise Unprocessable(f"instance {inst.name!r} has snapshots, which only a stopped VM's offline move "
                                "carries (inside its disk, on a local pool): " + (
                                    "stop the VM first, or delete them" if inst.kind == "vm" else
                                    "a container's snapshots (copies of its rootfs) do not move: delete them first"))
        peer = self.peers.get(req.destination)
        attached = self.root.volumes.of_instance(inst.id)
        if attached:
            from containers.runtime import SupportsVolumes
            if inst.kind == "container" and not isinstance(self.root.runtime, SupportsVolumes):
                raise Unsupported(f"the {self.config.containers.runtime} runtime cannot move container volumes")
            self.root.volumes.outgoing(inst.id)  # Unprocessable naming those that cannot move
            for v in attached:
                self.root.exports.check_unused("volume", v["id"], v["name"])
        if inst.state in ("creating", INCOMING):
            raise Conflict(f"instance {inst.name!r} is {inst.state}: wait for its operation")
        if inst.kind == "vm" and inst.state == "stopped":
            kind = self.root.pools[inst.pool].kind
            if kind != "local":
                raise Unsupported(f"VM {inst.name!r} is stopped and its disk is on pool {inst.pool!r} "
                                  f"({kind}): an offline move copies local disks only; start it and migrate "
                                  "it live")
        elif inst.kind == "vm":
            if not isinstance(self.root.driver, SupportsMigration):
                raise Unsupported(f"the {self.config.hypervisor.driver} driver cannot migrate VMs")
            if inst.state not in ("running", "paused"):
                raise Unprocessable(f"VM {inst.name!r} is {inst.state}: migration moves running, paused "
                                    "and stopped VMs; start or stop it first")
        else:
            if req.mode == "live":
                ok, why = criu_works()
                raise Unsupported("live migration of containers needs CRIU and "
                                  f"{why or 'CRIU restore is not wired up'} "
                                  "on this host: use mode=refresh (sync while running, stop, final sync, start "
                                  "there; about a second of downtime) or mode=cold")
        if inst.kind == "vm" and req.mode == "refresh":
            raise Unprocessable("mode=refresh is for containers: migrate VMs with mode=live or mode=cold")
        controls = req.controls()
        if controls and inst.kind != "vm":
            raise Unprocessable(f"{', '.join(controls)} control live VM migrations; container {inst.name!r} "
                                "moves with mode=refresh or mode=cold: leave them out")
        if controls and inst.state == "stopped":
            raise Unprocessable(f"VM {inst.name!r} is stopped: it moves offline (its disk is copied), so "
                                f"{', '.join(controls)} do not apply: leave them out, or start it first")
        options = None
        if inst.kind == "vm" and inst.state != "stopped":
            options = live_options(req, self.config.migration, self.root.driver.postcopy_unavailable())
            postcopy_required = options.pop("postcopy_required")
        _check_destination(peer, self.root.driver, inst)

        def work(op):
            if inst.kind == "vm" and self.root.driver.get(inst.name).state == "stopped":
                return self._move_stopped_vm(op, inst.id, peer)
            if inst.kind == "vm":
                return self._migrate_vm(op, inst.id, peer, req.mode, options, postcopy_required)
            return self._migrate_container(op, inst.id, peer, req.mode)
        return self._submit(inst, peer, {"mode": req.mode, "options": options}, work, "is already being migrated")

    def _submit(self, inst, peer: PeerClient, about: dict, work, busy: str) -> dict:
        """Submit migration operation ``work(op)`` of ``inst`` to ``peer``, run under the
        instance's lock, the instance marked busy (Conflict ``busy`` if it is already) until
        it ends; ``about``: what GET shows of it besides instance, name and destination."""
        with self._lock:
            if inst.id in self._busy:
                raise Conflict(f"instance {inst.name!r} {busy}")
            self._busy.add(inst.id)
            self._sending[inst.id] = peer.name
        about = {"instance": inst.id, "name": inst.name, "destination": peer.name, **about}

        def run(op):
            self._track(op.id, about)
            try:
                with self.root.instances.lock(inst.id):
                    return work(op)
            finally:
                with self._lock:
                    self._busy.discard(inst.id)
                    self._sending.pop(inst.id, None)

        try:
            op = self.root.operations.submit("migration", inst.id, run,
                                             on_final=lambda final: self._ended(final["id"], about))
        except BaseException:
            with self._lock:
                self._busy.discard(inst.id)
                self._sending.pop(inst.id, None)
            raise
        with self._lock:  # GET shows what it is while it waits for a worker, unless it ended already
            if op["id"] not in self._recent:
                self._live.setdefault(op["id"], dict(about))
        return op

    def _track(self, op_id: str, about: dict) -> dict:
        """The live entry of migration ``op_id``: made with ``about`` by whichever comes first,
        its worker or ``create`` after submitting it; both fill the same dict."""
        with self._lock:
            return self._live.setdefault(op_id, dict(about))

    def _ended(self, op_id: str, about: dict) -> None:
        """The operation ended (its on_final hook): its entry leaves ``_live``; its last figures
        are kept among the RECENT_MIGRATIONS most recent for GET."""
        with self._lock:
            self._recent[op_id] = self._live.pop(op_id, None) or dict(about)
            while len(self._recent) > RECENT_MIGRATIONS:
                self._recent.popitem(last=False)

    def get(self, mig_id: str) -> dict:
        try:
            op = self.root.operations.get(mig_id)
        except NotFound:
            op = None
        if op is None or op["kind"] != "migration":
            raise NotFound(f"migration {mig_id} not found")
        with self._lock:
            live = dict(self._live.get(mig_id) or self._recent.get(mig_id) or {})
        res = op["result"] or {}
        prog = op["progress"] or {}
        return {"id": op["id"], "operation": op["id"], "instance": op["target"],
                "name": live.get("name") or res.get("name"),
                "destination": live.get("destination") or res.get("destination"),
                "mode": live.get("mode") or res.get("mode"), "status": op["status"],
                "phase": prog.get("phase"),
                "bytes": {"processed": res.get("bytes", live.get("processed")),
                          "total": live.get("total"), "remaining": live.get("remaining")},
                "dirty_rate": live.get("dirty_rate"), "iterations": live.get("iterations"),
                "throttle_pct": live.get("throttle_pct"),
                "postcopy": res.get("postcopy", live.get("postcopy")), "options": live.get("options"),
                "downtime_ms": res.get("downtime_ms"), "total_ms": res.get("total_ms"),
                "switchover": res.get("switchover"), "error": op["error"]}

    def resume(self, mig_id: str) -> dict:
        """Resume the broken post-copy of migration ``mig_id`` (any migration of the split VM
        that failed: the first attempt or a resume of it) from where it stopped: 202 + a new
        migration operation that ends as the migration would have (the destination adopts the
        guest, this host forgets it). NotFound for an unknown id; Conflict unless the VM is
        the paused half of a broken post-copy here (README "Post-copy failures")."""
        try:
            failed = self.root.operations.get(mig_id)
        except NotFound:
            failed = None
        if failed is None or failed["kind"] != "migration":
            raise NotFound(f"migration {mig_id} not found")
        if failed["status"] != "failed":
            raise Conflict(f"migration {mig_id} is {failed['status']}: only a post-copy migration that failed "
                           "(the guest split between the hosts, paused) can be resumed")
        inst = self.root.records.find_id(failed["target"] or "")
        split = dict(inst.spec.get(SPLIT_KEY) or {}) if inst is not None else {}
        if inst is None or inst.kind != "vm" or not split:
            raise Conflict(f"migration {mig_id} left no guest split in post-copy here: nothing to resume "
                           "(it failed before post-copy, or the instance moved or was deleted since)")
        driver = self.root.driver
        if not isinstance(driver, SupportsPostcopyResume):
            raise Unsupported(f"the {self.config.hypervisor.driver} driver cannot resume a post-copy migration")
        if not driver.postcopy_split(inst.name):
            raise Conflict(f"VM {inst.name!r} is not paused in a broken post-copy here (its state: "
                           f"{driver.get(inst.name).state}): nothing to resume")
        peer = self.peers.get(split.get("peer", ""))
        return self._submit(inst, peer, {"mode": "live", "options": None, "resumes": mig_id},
                            lambda op: self._resume_vm(op, inst.id, peer, split),
                            "is already being migrated (or resumed)")

    def _resume_vm(self, op, inst_id: str, peer: PeerClient, split: dict) -> dict:
        """The work of ``resume``: past the point of no return from the start (the copy may only
        end); the guest stays split (record error, PostCopyFailed) if it breaks again or the
        destination does not answer."""
        from hypervisor.driver import MigrationOptions
        op.point_of_no_return()
        inst = self.root.instances.get(inst_id)
        name = inst.name
        op.phase("resume")
        if not peer.alive():
            raise Unavailable(f"peer {peer.name!r} ({peer.url}) does not answer: VM {name!r} stays split, paused "
                              "here; resume it again once the link is back")
        pool = self.root.pools[inst.pool]
        shared = pool.kind not in LOCAL_POOL_KINDS
        volumes = self.root.volumes.outgoing(inst_id)
        to = transport.route(split["uri"], self.root.config.migration, peer.name)
        copied = not shared or any(path and not v["readonly"] for v, path in volumes)
        options = MigrationOptions(live=True, copy_storage="incremental" if copied else "none", tls=to.tls,
                                   postcopy=True)
        live = self._track(op.id, {})
        live["postcopy"] = True
        progress = self._vm_progress(op, live)
        try:
            result = self.root.driver.resume_postcopy(name, to.uri, options, progress=progress)
        except Conflict:
            raise
        except AgentError as e:
            self._split(inst_id, peer.name, op.id)
            raise PostCopyFailed(f"{e.message}; resume it again with POST /v1/migrations/{op.id}/resume "
                                 f"(`nodeagent migrate resume {op.id}`) once the link is back", **e.details) from None
        return self._vm_moved(op, inst_id, peer, name, "live", result, shared, volumes)

    def _migrate_vm(self, op, inst_id: str, peer: PeerClient, mode: str, controls: dict,
                    postcopy_required: bool = False) -> dict:
        """Live (or, mode=cold, suspended) migration of a running VM with ``controls``
        (live_options); a destination that cannot run post-copy fails it when the caller asked
        for post-copy (``postcopy_required``), else the policy goes without. Until post-copy
        starts, any failure leaves it running here and the destination removes what it
        prepared; once it starts, the operation can no longer be cancelled, and a failure leaves
        the guest split between the hosts (PostCopyFailed: this host's record goes to state
        error, the destination keeps its half; README)."""
        from hypervisor.driver import MigrationOptions
        inst = self.root.instances.get(inst_id)
        name = inst.name
        if self.root.snapshots.count(inst_id):  # started since the request: its snapshots would stay here
            raise Unprocessable(f"VM {name!r} has snapshots, which a live migration does not carry: stop it "
                                "(its offline move carries them) or delete them")
        image = self.root.store.get(inst.image)
        pool = self.root.pools[inst.pool]
        vol = pool.get_volume(inst.volumes[0])
        volumes = self.root.volumes.outgoing(inst_id)
        op.phase("prepare")
        if not peer.alive():
            raise Unavailable(f"peer {peer.name!r} ({peer.url}) does not answer: the instance stays here")
        shared = pool.kind not in LOCAL_POOL_KINDS
        data = (allocated_bytes(vol.path) if pool.kind == "local" else 0) + \
            sum(allocated_bytes(path) for _, path in volumes)
        prepared = peer.prepare(incoming_request(
            inst, image, data_bytes=data, disk_size=vol.size,
            shared_volumes={v: pool.get_volume(v).uri for v in inst.volumes} if shared else None,
            security_groups=self._groups(inst), guest_cpu=self._guest_cpu(name),
            attached_volumes=[v for v, _ in volumes]))
        live = self._track(op.id, {})
        down = {"failures": 0, "last": time.monotonic()}
        # what a resume of this copy needs if it breaks in post-copy, kept with the record
        # (a restarted agent resumes it too): the peer, its migration URI, this migration
        split = {"peer": peer.name, "uri": prepared.migration_uri, "migration": op.id}
        progress = self._vm_progress(op, live, on_postcopy=lambda: self.root.records.update_spec(
            inst_id, **{SPLIT_KEY: split}))

        def cancelled() -> bool:
            if op.cancelled.is_set():
                return True
            if time.monotonic() - down["last"] >= HEALTH_INTERVAL_S:
                down["last"] = time.monotonic()
                down["failures"] = 0 if peer.alive() else down["failures"] + 1
            return down["failures"] >= HEALTH_FAILURES

        try:
            self._check_volume_sources(peer, name, prepared, volumes)
            to = transport.route(prepared.migration_uri, self.root.config.migration, peer.name)
            if controls["postcopy"] and prepared.postcopy is False:
                if postcopy_required:
                    raise Unprocessable(f"post-copy was requested but destination {peer.name!r} cannot run it (its "
                                        "QEMU may not use userfaultfd: README \"Migration controls\"); nothing "
                                        f"moved: {name!r} keeps running here")
                controls = {**controls, "postcopy": False, "postcopy_after_stalled": None, "postcopy_after_s": None,
                            "postcopy_after_iterations": None,
                            "timeout_action": "abort" if controls["timeout_action"] == "postcopy"
                            else controls["timeout_action"]}
                live["options"] = controls
        except BaseException as e:
            self._abort_remote(peer, inst_id, e)
            raise
        copied = not shared or any(path and not v["readonly"] for v, path in volumes)  # local disks it copies
        options = MigrationOptions(
            live=(mode == "live"), copy_storage="incremental" if copied else "none", tls=to.tls,
            disk_sources=dict(prepared.disk_sources),
            disk_attach={k: v.model_dump(exclude_none=True) for k, v in (prepared.disk_attach or {}).items()},
            console_log=prepared.console_log, **controls)
        try:
            if any(path and v["readonly"] for v, path in volumes):  # the hypervisor copies writable disks only
                op.phase("volumes")
                for v, path in volumes:
                    if path and v["readonly"]:
                        peer.push_volume_file(inst_id, v["id"], path)
            op.phase("migrate")
            if not peer.alive():
                raise Unavailable(f"peer {peer.name!r} ({peer.url}) stopped answering before the copy: "
                                  f"{name!r} keeps running here; retry when it is back")
            try:
                result = self.root.driver.migrate(name, to.uri, options,
                                                  progress=progress, cancelled=cancelled)
            except Cancelled:
                if op.cancelled.is_set():
                    raise
                raise Unavailable(f"peer {peer.name!r} stopped answering during the migration: it was "
                                  f"aborted and {name!r} keeps running here") from None
            except PostCopyFailed as e:
                result = self._resume_in_window(op, inst_id, peer, name, to, options, progress, e)
            except CommandFailed as e:
                if NO_SPACE not in e.message:
                    raise
                raise InsufficientResources(
                    f"destination {peer.name!r} is out of space: its pool {inst.pool!r} filled up during "
                    f"the disk copy ({NO_SPACE}); {name!r} keeps running here: free space on {peer.name} "
                    "or migrate it to another host", stderr=e.message[-2000:]) from None
        except BaseException as e:
            if not live.get("postcopy"):  # after post-copy began the destination holds the guest
                self._abort_remote(peer, inst_id, e)
            raise
        return self._vm_moved(op, inst_id, peer, name, mode, result, shared, volumes)

    def _vm_moved(self, op, inst_id: str, peer: PeerClient, name: str, mode: str, result, shared: bool,
                  volumes) -> dict:
        """The guest runs on ``peer`` now (its copy ended, or its broken post-copy was resumed):
        the destination adopts the record, this host forgets the instance; the operation's result."""
        op.point_of_no_return()
        # the guest runs there now; only the records are left to move
        op.phase("confirm")
        moved = self._finish_remote(peer, inst_id, name)
        op.phase("cleanup")
        self.root.volumes.forget_migrated(inst_id)
        self._forget_local(inst_id, shared=shared)
        if not shared and any(v.get("shared_uri") for v, _ in volumes):
            drop_unused_secrets(self.root, inst_id)  # libvirt undefined the domain, not its volumes' secret
        log.info("instance migrated", extra={"instance": name, "destination": peer.name,
                                             "downtime_ms": result.downtime_ms, "total_ms": result.total_ms})
        return {"instance": moved, "name": name, "destination": peer.name, "mode": mode,
                "downtime_ms": result.downtime_ms, "total_ms": round(result.total_ms, 1),
                "bytes": result.data_bytes, "postcopy": result.postcopy, "switchover": result.switchover}

    def _vm_progress(self, op, live: dict, on_postcopy=None):
        """The progress callback of a live VM copy: figures into ``live`` (GET) and the
        operation; at the first post-copy sample the operation passes its point of no return
        (the guest runs there now: a cancel gets 409) and ``on_postcopy()`` runs."""
        def progress(p):
            live.update(processed=p.data_processed, total=p.data_total, remaining=p.data_remaining,
                        dirty_rate=p.dirty_rate, iterations=p.memory_iteration, throttle_pct=p.throttle_pct)
            if p.phase == "postcopy" and not live.get("postcopy"):
                op.point_of_no_return()
                live["postcopy"] = True
                if on_postcopy is not None:
                    on_postcopy()
            op.report(phase=p.phase, remaining_bytes=p.data_remaining, dirty_rate=p.dirty_rate,
                      iterations=p.memory_iteration, throttle_pct=p.throttle_pct)
            op.bytes(p.data_processed, p.data_total or None)
        return progress

    def _split(self, inst_id: str, peer: str, migration: str) -> None:
        """Record that the guest is split (its post-copy to ``peer`` broke): state error, and
        how to resume it. The error names the migration to resume."""
        self.root.records.update(inst_id, state="error", error=(
            f"post-copy migration to {peer} failed: the guest's memory is split between this host and {peer}; "
            f"it is paused here and stalls there: resume it (POST /v1/migrations/{migration}/resume, "
            f"`nodeagent migrate resume {migration}`) once the link is back, or delete it on both hosts "
            "(README \"Post-copy failures\")"))

    def _resume_in_window(self, op, inst_id: str, peer: PeerClient, name: str, to, options, progress,
                          failed: PostCopyFailed):
        """The post-copy broke (``failed``): the guest is split. Resume it as soon as the
        destination answers again, within [migration] postcopy_resume_window_s and at most
        postcopy_resume_attempts times; the MigrationResult of the resume that finished it.
        Else (or when the agent stops) the record goes to state error and PostCopyFailed
        says how to resume it later; nothing is destroyed on either host."""
        cfg = self.config.migration
        driver = self.root.driver
        deadline = time.monotonic() + cfg.postcopy_resume_window_s
        tried = 0
        last: AgentError = failed
        if cfg.postcopy_resume_attempts and isinstance(driver, SupportsPostcopyResume):
            op.phase("postcopy-paused")
            log.warning("post-copy migration broke: resuming it once the destination answers",
                        extra={"instance": name, "destination": peer.name, "error": failed.message,
                               "window_s": cfg.postcopy_resume_window_s})
            while tried < cfg.postcopy_resume_attempts and time.monotonic() < deadline \
                    and not op.cancelled.is_set():  # set when the agent stops: it is left paused
                if not peer.alive():
                    op.cancelled.wait(RESUME_POLL_S)
                    continue
                tried += 1
                op.phase("resume")
                try:
                    return driver.resume_postcopy(name, to.uri, options, progress=progress)
                except AgentError as e:  # still split (or not resumable at all: Conflict)
                    last = e
                    log.warning("resuming the broken post-copy failed", extra={
                        "instance": name, "destination": peer.name, "attempt": tried, "error": e.message})
                    if isinstance(e, Conflict):
                        break
                    op.phase("postcopy-paused")
                    op.cancelled.wait(RESUME_POLL_S)
        self._split(inst_id, peer.name, op.id)
        how = (f"resumed {tried} time(s) within {cfg.postcopy_resume_window_s:g}s without success: {last.message}; "
               if tried else f"the destination did not answer within {cfg.postcopy_resume_window_s:g}s; "
               if cfg.postcopy_resume_attempts else "")
        raise PostCopyFailed(f"{failed.message}; {how}resume it with POST /v1/migrations/{op.id}/resume "
                             f"(`nodeagent migrate resume {op.id}`) once the link is back",
                             **failed.details) from None

    def _move_stopped_vm(self, op, inst_id: str, peer: PeerClient) -> dict:
        """Offline: the destination prepares (overlay on the same base, seed, row), takes the
        disk's own layer as a file, and defines the domain stopped; then it goes from here.
        On failure the VM stays here (stopped, untouched) and the destination removes what it made."""
        inst = self.root.instances.get(inst_id)
        name = inst.name
        image = self.root.store.get(inst.image)
        vol = self.root.pools[inst.pool].get_volume(inst.volumes[0])
        volumes = self.root.volumes.outgoing(inst_id)
        t0 = time.monotonic()
        op.phase("prepare")
        if not peer.alive():
            raise Unavailable(f"peer {peer.name!r} ({peer.url}) does not answer: the instance stays here")
        data = allocated_bytes(vol.path) + sum(allocated_bytes(path) for _, path in volumes)
        prepared = peer.prepare(incoming_request(inst, image, data_bytes=data, disk_size=vol.size,
                                                 security_groups=self._groups(inst),
                                                 attached_volumes=[v for v, _ in volumes],
                                                 snapshots=self.root.snapshots.outgoing(inst_id)))
        try:
            self._check_volume_sources(peer, name, prepared, volumes)
            total = os.path.getsize(vol.path) + sum(v["size_bytes"] for v, path in volumes if path)
            op.phase("copy", bytes_total=total)
            sent = peer.push_disk(inst_id, vol.path, progress=op.bytes)
            for v, path in volumes:
                if not path:
                    continue  # a shared (RBD) image: the destination adopted it
                sent += peer.push_volume_file(inst_id, v["id"], path, progress=lambda n, done=sent: op.bytes(done + n))
            op.phase("define")
            moved = self._confirm(peer, inst_id, finish_request(define=True))
        except BaseException as e:
            self._abort_remote(peer, inst_id, e)
            if isinstance(e, InsufficientResources):
                raise InsufficientResources(f"{e.message}; VM {name!r} stays here, stopped: free space on "
                                            f"{peer.name} or migrate it to another host") from None
            raise
        op.point_of_no_return()
        op.phase("cleanup")
        self.root.driver.delete(name)
        self.root.volumes.forget_migrated(inst_id)
        self._forget_local(inst_id)
        if any(v.get("shared_uri") for v, _ in volumes):
            drop_unused_secrets(self.root, inst_id)
        log.info("stopped VM moved", extra={"instance": name, "destination": peer.name, "bytes": sent})
        return {"instance": moved, "name": name, "destination": peer.name, "mode": "cold",
                "downtime_ms": None, "total_ms": round((time.monotonic() - t0) * 1000, 1), "bytes": sent}

    def _migrate_container(self, op, inst_id: str, peer: PeerClient, mode: str) -> dict:
        """cold: stop, copy the upper dir, start there. refresh: copy the upper dir while it
        runs, stop, copy what changed since (and prune what went), start there. Volumes
        attached to it move too, once it is stopped: each is unmounted from the container,
        mounted read-only here and its file tree sent into a fresh filesystem there; here they
        go only once it runs there. On failure the container runs here again with its
        volumes and the destination removes what it made."""
        inst = self.root.instances.get(inst_id)
        name = inst.name
        image = self.root.store.get(inst.image)
        vol = self.root.pools[inst.pool].get_volume(inst.volumes[0])
        upper = os.path.join(vol.path, "upper")
        volumes = self.root.volumes.outgoing(inst_id)
        op.phase("prepare")
        if not peer.alive():
            raise Unavailable(f"peer {peer.name!r} ({peer.url}) does not answer: the instance stays here")
        info = self.root.runtime.get(name)
        data = allocated_bytes(upper) + sum(allocated_bytes(path) for _, path in volumes)
        peer.prepare(incoming_request(inst, image, data_bytes=data, idmap=info.idmap,
                                      security_groups=self._groups(inst),
                                      attached_volumes=[v for v, _ in volumes]))
        was_running = info.state == "running"
        stopped_at = None
        mounted = None
        sent = 0
        try:
            since = None
            if mode == "refresh" and was_running:
                op.phase("presync")
                since = time.time() - 1  # mtime/ctime granularity: resend the last second
                sent += peer.push_rootfs(inst_id, upper)
            op.phase("stop")
            if was_running:
                stopped_at = time.monotonic()
                self.root.runtime.stop(name, timeout=10)
            op.phase("sync")
            sent += peer.push_rootfs(inst_id, upper, newer=since)
            keep = rootfs_paths(upper) if since is not None else None
            if volumes:
                op.phase("volumes")
                mounted = self.root.runtime.volumes(name)
                self.root.runtime.set_volumes(name, ())  # unmounted: its filesystems are quiet and whole
                for v, path in volumes:
                    sent += self._push_volume(peer, inst_id, v["id"], path)
            op.phase("confirm")
            moved = self._confirm(peer, inst_id, finish_request(start=was_running, keep=keep))
        except BaseException as e:
            self._abort_remote(peer, inst_id, e)
            if mounted is not None:
                self.root.runtime.set_volumes(name, mounted)
            if stopped_at is not None:
                self.root.runtime.start(name)
            if isinstance(e, InsufficientResources):
                raise InsufficientResources(f"{e.message}; container {name!r} keeps running here: free space "
                                            f"on {peer.name} or migrate it to another host") from None
            raise
        op.point_of_no_return()  # it runs there now
        downtime = (time.monotonic() - stopped_at) * 1000 if stopped_at is not None else None
        op.phase("cleanup")
        self.root.runtime.delete(name)
        self.root.volumes.forget_migrated(inst_id)
        self._forget_local(inst_id)
        return {"instance": moved, "name": name, "destination": peer.name, "mode": mode,
                "downtime_ms": round(downtime, 1) if downtime is not None else None,
                "total_ms": None, "bytes": sent}

    def _push_volume(self, peer: PeerClient, inst_id: str, vol_id: str, path: str) -> int:
        """Send the file tree of the (unmounted) volume file ``path``, mounted read-only here."""
        from storage import mounts
        point = self.config.state_path / "instances" / inst_id / f"volume-out-{vol_id[:12]}"
        point.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not mounts.is_mounted(str(point)):
            mounts.mount_fs_image(path, str(point), readonly=True)
        try:
            return peer.push_volume(inst_id, vol_id, str(point))
        finally:
            mounts.unmount(str(point))
            point.rmdir()

    @staticmethod
    def _check_volume_sources(peer: PeerClient, name: str, prepared: models.IncomingPrepared, volumes) -> None:
        """The destination answered a file of its own for every volume (the domain there must
        use its copies, never reach for this host's paths); CommandFailed if not."""
        missing = [v["name"] for v, _ in volumes
                   if not (prepared.disk_sources.get(v["target"]) == v["shared_uri"] if v.get("shared_uri")
                           else prepared.disk_sources.get(v["target"], "").startswith("/"))]
        if missing:
            raise CommandFailed(f"peer {peer.name!r} prepared no file of its own for volume(s) {', '.join(missing)} "
                                f"of VM {name!r}: nothing moved; it stays here")

    def _abort_remote(self, peer: PeerClient, inst_id: str, cause: BaseException) -> None:
        try:
            peer.abort(inst_id)
        except AgentError as e:
            log.warning("destination could not clean up after a failed migration; it will on restart "
                        "or when the migration is retried",
                        extra={"peer": peer.name, "instance": inst_id, "error": e.message,
                               "cause": str(cause)})

    def _confirm(self, peer: PeerClient, inst_id: str, req: models.IncomingFinish) -> dict:
        """Finish on the destination, retried while it is unreachable (finish is idempotent
        there: an answer lost on the way is asked for again); the last error if it stays so."""
        for attempt in range(FINISH_ATTEMPTS):
            try:
                return peer.finish(inst_id, req)
            except Unavailable:
                if attempt == FINISH_ATTEMPTS - 1:
                    raise
                time.sleep(FINISH_RETRY_S)

    def _finish_remote(self, peer: PeerClient, inst_id: str, name: str) -> dict:
        last = None
        for _ in range(FINISH_ATTEMPTS):
            try:
                return peer.finish(inst_id, finish_request(resume=True))
            except (Unavailable, CommandFailed) as e:
                last = e
                time.sleep(FINISH_RETRY_S)
        self.root.records.update(inst_id, state="error",
                                 error=f"migrated to {peer.name}, which did not confirm: it runs there; "
                                       "delete this record")
        raise CommandFailed(f"VM {name!r} now runs on {peer.name}, but its agent did not confirm ({last}): "
                            f"{peer.name} adopts the VM when its agent is back (it does at start); this host's "
                            f"record is in state error: check {name!r} on {peer.name}, then delete the record "
                            "here (that removes only this host's record and disk)")

    def _forget_local(self, inst_id: str, shared: bool = False) -> None:
        """The instance left: its record, volumes and files go (the domain already went).
        ``shared``: its volumes stay (the destination owns them); only our references go."""
        inst = self.root.instances.get(inst_id)
        if inst.kind == "vm" and self.root.driver.find(inst.name) is not None:
            raise CommandFailed(f"VM {inst.name!r} is still defined here after its migration")
        for vol in inst.volumes:
            if shared:
                self.root.store.forget_volume(inst.pool, vol)
            else:
                self.root.store.release(inst.pool, vol)
        if shared:
            drop_unused_secrets(self.root, inst_id)  # libvirt undefined the domain, not its secret
        if inst.kind == "vm":
            self.root.instances.release_address(inst_id)
        self.root.snapshots.forget_instance(inst_id)  # their data left with the disk
        shutil.rmtree(self.config.state_path / "instances" / inst_id, ignore_errors=True)
        self.root.records.delete(inst_id, state="migrated")
