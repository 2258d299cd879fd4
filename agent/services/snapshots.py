"""Snapshots of instances: the one module that reads and writes the ``snapshots`` table
(component "snapshots" in the state DB).

Terms: a *snapshot* is a named, point-in-time copy of an instance's own data, kept with the
instance: a VM's writable disks (internal qcow2 snapshots, hypervisor.driver.SupportsSnapshots;
on a pool that snapshots its volumes itself, storage.backend.SnapshotsVolumes, an RBD snapshot
of its root volume) or a container's writes on its image (its overlay upper dir, containers.runtime.
SupportsRootfsSnapshots). The image under them is the instance's: its root volume holds the
image's reference in the store, so no image gc or image delete removes it while the instance
exists, and a rebuild onto another image is refused while snapshots exist.

Consistency (kept in the row, as the driver reported it): a running VM's snapshot is taken
without stopping the vCPUs, all disks at one instant, and is *filesystem-consistent* when the
guest's agent (QEMU guest agent protocol on its agent channel) froze its filesystems for that
instant, else *crash-consistent* (what a power cut would leave: no agent, or one that failed or
did not answer in time; hypervisor.driver.SupportsFilesystemFreeze); a running container is
frozen (cgroup freezer) for its copy; a stopped instance's is exact.

Lifecycle: absent -> create (row ``creating`` -> the data -> row ``ready``) -> restore any
number of times (only while the instance is stopped: 409 otherwise) -> delete. A row is
written before its data and marked ready after it: an agent killed in between leaves a
``creating`` row, never listed, whose data (if any) is removed at the next start (``sweep``).
Deleting an instance deletes its snapshots (their data goes with its disks or rootfs). A
stopped VM's snapshots move with its offline migration (inside its disk layer: outgoing here,
adopt there); other migrations refuse an instance with snapshots. Every change publishes a
``snapshot`` event {instance, instance_id, snapshot, action}.
"""
from __future__ import annotations

import logging
import time
import uuid

from agent import models
from agent.errors import AgentError, Conflict, NotFound, Unsupported
from agent.services.assembly import root_volume
from containers.runtime import SupportsRootfsSnapshots
from hypervisor.driver import FILESYSTEM_CONSISTENT, SupportsFilesystemFreeze, SupportsSnapshots
from storage.backend import SnapshotsVolumes

log = logging.getLogger(__name__)

SCHEMA_STEPS = [
    """
    CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        instance_id TEXT NOT NULL,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,              -- vm | container
        image_id TEXT NOT NULL,          -- the image under it (the instance's, at the time)
        instance_state TEXT NOT NULL,    -- what the instance was doing: running | paused | stopped
        state TEXT NOT NULL,             -- creating | ready
        created_at REAL NOT NULL,
        UNIQUE (instance_id, name)
    );
    """,
    # what the driver says it holds (hypervisor.driver's STOPPED, CRASH_CONSISTENT,
    # FILESYSTEM_CONSISTENT); NULL in rows of older agents: derived from kind and state
    "ALTER TABLE snapshots ADD COLUMN consistency TEXT;",
]
TAKES = ("running", "paused", "stopped", "created")  # instance states a snapshot may be taken in
RESTORES = ("stopped", "created")  # a restore rewrites the disks under the guest: never while it runs
MAX_PER_INSTANCE = 32  # each holds disk space (qcow2 clusters, a rootfs copy) and slows qcow2 metadata


def _volume_ops(pool, volume: str, driver):
    """A VM's snapshots as its pool's snapshots of its root volume (RBD: taken by librbd while
    QEMU writes; filesystem-consistent if ``driver``'s guest agent froze the guest for it, else
    crash-consistent; rolled back only with no client on the image). ``driver``: None unless
    the VM runs."""
    def take(name, snapshot):
        if not isinstance(driver, SupportsFilesystemFreeze):
            pool.snapshot_volume(volume, snapshot)
            return None
        with driver.frozen(name) as fs:
            pool.snapshot_volume(volume, snapshot)
        return FILESYSTEM_CONSISTENT if fs else None

    def revert(_name, snapshot):
        pool.rollback_volume(volume, snapshot)

    def drop(_name, snapshot):
        return pool.delete_volume_snapshot(volume, snapshot)
    return take, revert, drop


def _consistency(kind: str, state: str) -> str:
    """What a snapshot holds when its driver did not say (rows of older agents, containers)."""
    if state in RESTORES:
        return "stopped"
    return "crash-consistent" if kind == "vm" else "frozen"


class SnapshotService:
    def __init__(self, root):
        self.root = root
        self.db = root.db
        self.db.apply_schema("snapshots", SCHEMA_STEPS)

    # -- reads --
    def _row(self, inst_id: str, name: str):
        return self.db.one("SELECT * FROM snapshots WHERE instance_id=? AND name=? AND state='ready'",
                           (inst_id, name))

    @staticmethod
    def _dict(r, inst) -> dict:
        return {"id": r["id"], "name": r["name"], "instance": inst.name, "instance_id": inst.id,
                "kind": r["kind"], "image": r["image_id"], "instance_state": r["instance_state"],
                "consistency": r["consistency"] or _consistency(r["kind"], r["instance_state"]),
                "created_at": r["created_at"]}

    def list(self, ref: str) -> list[dict]:
        inst = self.root.instances.get(ref)
        return [self._dict(r, inst) for r in self.db.query(
            "SELECT * FROM snapshots WHERE instance_id=? AND state='ready' ORDER BY created_at, name", (inst.id,))]

    def get(self, ref: str, name: str) -> dict:
        """NotFound unless the instance ``ref`` has snapshot ``name`` (another instance's is not found)."""
        inst = self.root.instances.get(ref)
        r = self._row(inst.id, name)
        if r is None:
            raise NotFound(f"instance {inst.name!r} has no snapshot {name!r}")
        return self._dict(r, inst)

    def count(self, inst_id: str) -> int:
        return self.db.one("SELECT COUNT(*) AS n FROM snapshots WHERE instance_id=?", (inst_id,))["n"]

    # -- the driver or runtime of an instance --
    def _backend(self, inst):
        """(take, revert, drop) for ``inst``: its pool's own snapshots where the pool has them
        (RBD), else its driver's or runtime's."""
        if inst.kind == "vm":
            pool = self.root.pools.get(inst.pool)
            if isinstance(pool, SnapshotsVolumes):
                # only a running guest's agent can freeze it
                return _volume_ops(pool, root_volume(inst.kind, inst.id),
                                   self.root.driver if inst.state == "running" else None)
            d = self.root.driver
            if not isinstance(d, SupportsSnapshots):
                raise Unsupported(f"the {self.root.config.hypervisor.driver} driver takes no VM snapshots")
            return d.create_snapshot, d.revert_snapshot, d.delete_snapshot
        rt = self.root.runtime
        if not isinstance(rt, SupportsRootfsSnapshots):
            raise Unsupported(f"the {self.root.config.containers.runtime} runtime takes no rootfs snapshots")
        return rt.snapshot_rootfs, rt.revert_rootfs, rt.delete_rootfs_snapshot

    def _check(self, inst, allowed: tuple[str, ...], verb: str) -> None:
        if inst.state not in allowed:
            hint = "stop it first" if inst.state in ("running", "paused") else "wait until it is running or stopped"
            raise Conflict(f"instance {inst.name!r} is {inst.state}: cannot {verb} a snapshot ({hint})")

    def _event(self, inst, name: str, action: str) -> None:
        self.root.events.publish("snapshot", {"instance": inst.name, "instance_id": inst.id,
                                              "snapshot": name, "action": action})

    # -- verbs --
    def create(self, ref: str, req: models.SnapshotCreate) -> dict:
        """Take snapshot ``req.name`` of a running, paused or stopped instance. Conflict if the
        instance has one of that name or is busy (creating, deleting, migrating); on failure
        neither data nor row is left."""
        inst = self.root.instances.get(ref)
        self._check(inst, TAKES, "take")
        take, _, drop = self._backend(inst)
        with self.root.instances.lock(inst.id):
            inst = self.root.instances.get(inst.id)
            self._check(inst, TAKES, "take")
            if self.count(inst.id) >= MAX_PER_INSTANCE:
                raise Conflict(f"instance {inst.name!r} has {MAX_PER_INSTANCE} snapshots, the most it may "
                               "keep: delete one first")
            snap_id = uuid.uuid4().hex
            try:
                self.db.execute("INSERT INTO snapshots (id, instance_id, name, kind, image_id, instance_state, "
                                "state, created_at) VALUES (?, ?, ?, ?, ?, ?, 'creating', ?)",
                                (snap_id, inst.id, req.name, inst.kind, inst.image, inst.state, time.time()))
            except Exception as e:  # sqlite3.IntegrityError: the (instance, name) pair is taken
                if "UNIQUE" in str(e):
                    raise Conflict(f"instance {inst.name!r} already has a snapshot {req.name!r}") from None
                raise
            try:
                got = take(inst.name, req.name)
            except BaseException as e:
                if not (isinstance(e, Conflict) and "already has" in e.message):  # never another's data
                    self._undo(drop, inst, req.name)
                self.db.execute("DELETE FROM snapshots WHERE id=?", (snap_id,))
                raise
            consistency = got if isinstance(got, str) else _consistency(inst.kind, inst.state)
            self.db.execute("UPDATE snapshots SET state='ready', consistency=? WHERE id=?", (consistency, snap_id))
        self._event(inst, req.name, "created")
        return self.get(inst.id, req.name)

    @staticmethod
    def _undo(drop, inst, name: str) -> None:
        try:
            drop(inst.name, name)
        except Exception as e:  # noqa: BLE001 - logged: the row goes, the sweep cannot find it again
            log.warning("a failed snapshot left data behind", extra={"instance": inst.name, "snapshot": name,
                                                                     "error": str(e)})

    def restore(self, ref: str, name: str) -> dict:
        """Revert the instance in place to snapshot ``name`` (which stays): only while it is
        stopped (Conflict: stop it first). Its name, id, address, MAC and security groups are
        unchanged; its next start boots from the snapshot's data."""
        inst = self.root.instances.get(ref)
        self.get(inst.id, name)
        _, revert, _ = self._backend(inst)
        with self.root.instances.lock(inst.id):
            inst = self.root.instances.get(inst.id)
            self._check(inst, RESTORES, "restore")
            snap = self.get(inst.id, name)
            revert(inst.name, name)
        self._event(inst, name, "restored")
        return snap

    def delete(self, ref: str, name: str) -> bool:
        inst = self.root.instances.get(ref)
        self.get(inst.id, name)
        _, _, drop = self._backend(inst)
        with self.root.instances.lock(inst.id):
            if self._row(inst.id, name) is None:
                return False
            drop(inst.name, name)
            self.db.execute("DELETE FROM snapshots WHERE instance_id=? AND name=?", (inst.id, name))
        self._event(inst, name, "deleted")
        return True

    # -- migration: a stopped VM's snapshots move with it, inside its disk layer --
    def outgoing(self, inst_id: str) -> list[dict]:
        """The instance's snapshots as a migration sends them (IncomingSnapshot fields)."""
        return [{"name": r["name"], "instance_state": r["instance_state"], "created_at": r["created_at"]}
                for r in self.db.query("SELECT * FROM snapshots WHERE instance_id=? AND state='ready' "
                                       "ORDER BY created_at, name", (inst_id,))]

    def adopt(self, inst, snaps: list[dict]) -> int:
        """Record the snapshots a migrated instance ``inst`` (its record here) brought in its
        data (the caller checked they are there), on its image here."""
        for snap in snaps:
            self.db.execute("INSERT INTO snapshots (id, instance_id, name, kind, image_id, instance_state, "
                            "state, created_at) VALUES (?, ?, ?, ?, ?, ?, 'ready', ?)",
                            (uuid.uuid4().hex, inst.id, snap["name"], inst.kind, inst.image,
                             snap["instance_state"], snap["created_at"]))
            self._event(inst, snap["name"], "arrived")
        return len(snaps)

    def forget_instance(self, inst_id: str) -> int:
        """Drop the rows of a removed instance (their data went with its disks or rootfs)."""
        return self.db.execute("DELETE FROM snapshots WHERE instance_id=?", (inst_id,)).rowcount

    def _thaw(self, inst, row) -> None:
        """A container frozen for a copy when the agent was killed stays frozen: thaw it if it
        was running when the snapshot began. A VM's snapshot never pauses it, but its guest
        agent may have frozen its filesystems (a Linux guest stays frozen until told): ask it
        to thaw (bounded; harmless if nothing is frozen)."""
        from containers.runtime import SupportsPause
        if inst.kind == "vm":
            d = self.root.driver
            if row["instance_state"] == "running" and isinstance(d, SupportsFilesystemFreeze) and d.thaw(inst.name):
                log.info("asked the guest agent of a VM a killed agent may have left frozen to thaw",
                         extra={"instance": inst.name})
            return
        rt = self.root.runtime if inst.kind == "container" else None
        if row["instance_state"] == "running" and isinstance(rt, SupportsPause) \
                and rt.get(inst.name).state == "paused":
            rt.resume(inst.name)
            log.info("thawed a container a killed agent left frozen for a snapshot", extra={"instance": inst.name})

    def sweep(self) -> int:
        """At start: drop rows of instances that are gone, and snapshots a killed agent left
        half-made (rows still ``creating``: their data, if any, is removed first). One whose
        data cannot be removed yet (its driver is down) stays for the next start."""
        n = 0
        for r in self.db.query("SELECT * FROM snapshots ORDER BY created_at"):
            inst = self.root.records.find_id(r["instance_id"])
            if inst is None:
                self.db.execute("DELETE FROM snapshots WHERE id=?", (r["id"],))
                n += 1
                continue
            if r["state"] != "creating":
                continue
            try:
                _, _, drop = self._backend(inst)
                drop(inst.name, r["name"])
                self._thaw(inst, r)
            except NotFound:
                pass  # the workload is gone: nothing of the snapshot is left
            except AgentError as e:
                log.warning("cannot remove a half-made snapshot yet", extra={"instance": inst.name,
                                                                             "snapshot": r["name"], "error": e.message})
                continue
            self.db.execute("DELETE FROM snapshots WHERE id=?", (r["id"],))
            log.info("removed a snapshot a killed agent left half-made", extra={"instance": inst.name,
                                                                                "snapshot": r["name"]})
            n += 1
        return n
