"""Volumes: the one module that reads and writes the ``volumes`` table (component "volumes"
in the state DB).

Terms: a *volume* is a named, empty disk made on its own (POST /v1/volumes), outliving the
instances it is attached to; its bytes live in a pool as the backend volume
``v-<id12>`` (``BACKEND_PREFIX``), never the root disk of an instance. On a local pool it is a
sparse raw file holding an empty ext4 filesystem, so either kind of instance can use it: a VM
sees a disk (vdb..vdy) carrying that filesystem, a container gets the filesystem loop-mounted
on the host and bind-mounted at a path. On a block (Ceph RBD) pool it is an empty raw RBD
image, attached to VMs through QEMU's librbd (containers would need the kernel's rbd module).
Instances of both kinds may be given volumes at create (resolve_for_create, reserve_for_create).

Lifecycle: absent -> create() (row ``creating`` -> the pool's volume -> ``ready``) ->
attach()/detach() any number of times -> delete() (row ``deleting`` -> the pool's volume
removed -> no row). A crash between two steps is finished by recover() at the agent's start.
A volume a VM had writable is *guest-written* from then on: its bytes are the guest's, and
the host kernel never mounts a filesystem a guest could have crafted (containers refuse it,
and the agent no longer grows its filesystem).

An *attachment* (instance, target or path) is a volume's, kept in its row: it holds only
while that instance has a record, so removal paths of instances need not know about volumes
(a deleted instance's volumes are available again; VMs lose their disks with their domain,
containers their mounts with their dir). A read-only volume is mounted read-only on the host
for a container (a bind mount's "ro" alone its root could undo). A VM keeps its disks in its persistent libvirt
definition (across stop/start and agent restarts); a container in the runtime's spec.

An instance's volumes move with its migration (agent.migration): on the destination they
are made by incoming() (rows ``incoming``; a container's as fresh filesystems the source's
file trees are unpacked into, a VM's as empty raw files of the same size that the
hypervisor's storage copy or the stopped VM's byte stream fills; a VM's RBD volume is the
same shared image, adopted: never made, copied or deleted there) and become ``ready`` with
the instance (finish_incoming), or go with a migration that did not finish (drop_incoming,
and recover() at start); on the source they go once it runs there (forget_migrated: a shared
image only forgotten).

Every change publishes a ``volume`` event: {id, name, change: created|resized|deleted|
attached|detached|arrived|migrated, instance?}.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass

from agent import models
from agent.errors import AgentError, Conflict, NotFound, Unprocessable, Unsupported
from hypervisor.driver import SupportsDiskResize

log = logging.getLogger(__name__)

BACKEND_PREFIX = "v-"  # + the volume id's first 12 hex digits: its name in the pool
VM_TARGETS = tuple(f"vd{c}" for c in "bcdefghijklmnopqrstuvwxy")  # vda: root, vdz: NoCloud seed
EXT4_MAGIC_OFFSET = 1024 + 0x38  # the superblock's s_magic
EXT4_MAGIC = b"\x53\xef"
BUSY_STATES = ("creating", "incoming", "migrating", "deleting")  # of instances
LOCAL_KINDS = ("local", "fake")  # pools whose volumes are host files: a migration copies them

SCHEMA_STEPS = [
    """
    CREATE TABLE volumes (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        pool TEXT NOT NULL,
        backend_name TEXT NOT NULL,     -- its name in the pool: v-<id12>
        format TEXT NOT NULL,           -- raw
        size INTEGER NOT NULL,          -- bytes
        state TEXT NOT NULL,            -- creating | ready | deleting
        instance_id TEXT,               -- attached to (while that instance has a record)
        target TEXT,                    -- VMs: vdb..vdy
        path TEXT,                      -- containers: the mount point inside
        readonly INTEGER NOT NULL DEFAULT 0,
        guest_written INTEGER NOT NULL DEFAULT 0,  -- a VM had it writable: its bytes are the guest's
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
]


def has_ext4(path: str) -> bool:
    """True if the file ``path`` starts with an ext2/3/4 superblock."""
    try:
        with open(path, "rb") as f:
            f.seek(EXT4_MAGIC_OFFSET)
            return f.read(2) == EXT4_MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class ExportSource:
    id: str
    name: str
    volume: object  # storage.backend.Volume
    instance: object | None  # the records' Instance it is attached to


class VolumeService:
    def __init__(self, root):
        self.root = root
        self.db = root.db
        self.db.apply_schema("volumes", SCHEMA_STEPS)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def _lock(self, vol_id: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(vol_id, threading.Lock())

    lock = _lock  # agent.services.exports holds it while it exports the volume

    def export_source(self, ref: str) -> ExportSource:
        """What an NBD export of volume ``ref`` serves: its id, name, the pool's Volume and
        the instance it is attached to (None). NotFound for an unknown volume."""
        row = self._get_row(ref)
        return ExportSource(row["id"], row["name"], self._volume(row), self._attached_to(row))

    # -- reads --
    def _row(self, ref: str):
        return self.db.one("SELECT * FROM volumes WHERE (id=? OR name=?) AND state != 'creating'", (ref, ref))

    def _attached_to(self, row):
        """The record of the instance ``row`` is attached to; None if it is not (or that
        instance is gone)."""
        if row["instance_id"] is None:
            return None
        return self.root.records.find_id(row["instance_id"])

    def _render(self, row) -> dict:
        inst = self._attached_to(row)
        att = None
        if inst is not None:
            att = {"instance": inst.id, "instance_name": inst.name, "target": row["target"],
                   "path": row["path"], "readonly": bool(row["readonly"])}
        return {"id": row["id"], "name": row["name"], "pool": row["pool"], "size_bytes": row["size"],
                "format": row["format"], "state": "attached" if att else "available", "attachment": att,
                "created_at": row["created_at"], "updated_at": row["updated_at"]}

    def list(self) -> list[dict]:
        return [self._render(r) for r in self.db.query(
            "SELECT * FROM volumes WHERE state = 'ready' ORDER BY created_at")]

    def get(self, ref: str) -> dict:
        return self._render(self._get_row(ref))

    def _get_row(self, ref: str):
        row = self._row(ref)
        if row is None or row["state"] != "ready":
            raise NotFound(f"volume {ref!r} not found")
        return row

    def of_instance(self, inst_id: str) -> list[dict]:
        """The volumes attached to instance ``inst_id``, by target or path."""
        rows = self.db.query("SELECT * FROM volumes WHERE instance_id=? AND state='ready' "
                             "ORDER BY target, path", (inst_id,))
        return [self._render(r) for r in rows]

    def attached_to_vm(self, inst_id: str) -> list[tuple[dict, object]]:
        """The volumes attached to VM ``inst_id`` as a backup reads them: ({id, name, size_bytes,
        format, target, readonly}, the pool's Volume), by target."""
        rows = self.db.query("SELECT * FROM volumes WHERE instance_id=? AND state='ready' AND target IS NOT NULL "
                             "ORDER BY target", (inst_id,))
        return [({"id": r["id"], "name": r["name"], "size_bytes": r["size"], "format": r["format"],
                  "target": r["target"], "readonly": bool(r["readonly"])}, self._volume(r)) for r in rows]

    def name_free(self, name: str) -> bool:
        return self.db.one("SELECT 1 FROM volumes WHERE name=?", (name,)) is None

    def mark_guest_written(self, vol_id: str) -> None:
        """Its bytes are a guest's (a VM's disk restored from a backup): no container mounts it."""
        self.db.execute("UPDATE volumes SET guest_written=1 WHERE id=?", (vol_id,))

    def find_row_state(self, vol_id: str) -> tuple[str, str | None] | None:
        """(state, attached instance id) of volume ``vol_id``; None if it has no row."""
        row = self.db.one("SELECT state, instance_id FROM volumes WHERE id=?", (vol_id,))
        return None if row is None else (row["state"], row["instance_id"])

    def _backend(self, pool: str):
        try:
            return self.root.pools[pool]
        except KeyError:
            raise NotFound(f"pool {pool!r} not found; configured pools: "
                           f"{', '.join(sorted(self.root.config.pools))}") from None

    def _volume(self, row):
        """The pool's Volume of ``row``."""
        return self._backend(row["pool"]).get_volume(row["backend_name"])

    @staticmethod
    def _check_room(backend, pool: str, size: int) -> None:
        """Volumes are thin (sparse files, RBD images): one may be as large as its pool, never
        larger (a tenant's writes would fill the pool before the volume). Conflict (409): the
        request is fine, this pool is too small for it."""
        cap = backend.usage().capacity
        if cap and size > cap:
            raise Conflict(f"{size // (1024 * 1024)} MiB is more than pool {pool!r} holds "
                           f"({cap // (1024 * 1024)} MiB): pick a smaller size or another pool")

    # -- create, resize, delete --
    def create(self, req: models.VolumeCreate, *, vol_id: str | None = None) -> dict:
        """Make an empty volume (local: with an ext4 filesystem). Conflict if the name is
        taken; NotFound for an unknown pool; Unprocessable for a pool that holds no volumes.
        ``vol_id``: its id, chosen by a caller that records it first (a backup's restore).
        On failure nothing is left."""
        from storage.backend import VolumeSpec
        pool = req.pool or self.root.config.default_pool
        backend = self._backend(pool)
        if not backend.supports_volumes:
            raise Unprocessable(f"pool {pool!r} is a {backend.kind} pool: it holds images only; make "
                                "volumes on a local or block pool")
        self._check_room(backend, pool, req.size_bytes)
        vol_id = vol_id or uuid.uuid4().hex
        bname = BACKEND_PREFIX + vol_id[:12]
        now = time.time()
        with self.db.tx() as c:
            if c.execute("SELECT 1 FROM volumes WHERE name=?", (req.name,)).fetchone():
                raise Conflict(f"a volume named {req.name!r} exists: pick another name or delete it")
            c.execute("INSERT INTO volumes(id, name, pool, backend_name, format, size, state, created_at, "
                      "updated_at) VALUES(?,?,?,?,?,?,?,?,?)",
                      (vol_id, req.name, pool, bname, "raw", req.size_bytes, "creating", now, now))
        try:
            vol = backend.create_volume(VolumeSpec(bname, req.size_bytes, "raw"))
            if vol.path:  # a host file: give it a filesystem a container can mount
                from storage import mounts
                mounts.format_ext4(vol.path)
        except BaseException:
            try:
                backend.delete_volume(bname)
            finally:
                self.db.execute("DELETE FROM volumes WHERE id=?", (vol_id,))
            raise
        self.db.execute("UPDATE volumes SET state='ready', size=?, updated_at=? WHERE id=?",
                        (vol.size, time.time(), vol_id))
        self._event(vol_id, req.name, "created", size_bytes=vol.size)
        return self.get(vol_id)

    def resize(self, ref: str, req: models.VolumeUpdate) -> dict:
        """Grow the volume (Unprocessable to shrink). Attached to a running VM: the guest is
        told at once (block_resize). A local volume's ext4 filesystem grows with it when the
        agent holds it (mounted for a container: online; attached nowhere or to a stopped
        instance: offline); inside a running VM, growing it is the guest's."""
        row = self._get_row(ref)
        inst = self._attached_to(row)
        if inst is not None:
            self._check_instance(inst)
        # the instance's lock before the volume's, as attach and detach take them
        with self.root.instances.lock(inst.id) if inst is not None else threading.Lock(), self._lock(row["id"]):
            row = self._get_row(row["id"])
            if row["instance_id"] != (inst.id if inst is not None else row["instance_id"]) or \
                    (inst is None and self._attached_to(row) is not None):
                raise Conflict(f"volume {row['name']!r} was attached or detached meanwhile: retry")
            size = req.size_bytes
            if size < row["size"]:
                raise Unprocessable(f"volume {row['name']!r} is {row['size']} bytes: it can only grow "
                                    f"(asked for {size})")
            if size == row["size"]:
                return self._render(row)
            self.root.exports.check_unused("volume", row["id"], row["name"])  # clients see a fixed size
            self._check_room(self._backend(row["pool"]), row["pool"], size)
            if inst is not None and inst.kind == "vm" and not isinstance(self.root.driver, SupportsDiskResize):
                info = self.root.driver.find(inst.name)
                if info is not None and info.state in ("running", "paused"):
                    raise Unsupported(f"the {self.root.config.hypervisor.driver} driver cannot grow a running "
                                      "VM's disk: stop the VM, grow the volume, start it")
            vol = self._backend(row["pool"]).resize_volume(row["backend_name"], size)
            self.db.execute("UPDATE volumes SET size=?, updated_at=? WHERE id=?",
                            (vol.size, time.time(), row["id"]))
            self._grow_in_use(row, inst, vol)
        self._event(row["id"], row["name"], "resized", size_bytes=vol.size)
        return self.get(row["id"])

    def _grow_in_use(self, row, inst, vol) -> None:
        from storage import mounts
        running_vm = False
        if inst is not None and inst.kind == "vm":
            info = self.root.driver.find(inst.name)
            running_vm = info is not None and info.state in ("running", "paused")
            if running_vm:  # checked: SupportsDiskResize
                self.root.driver.resize_disk(inst.name, row["target"], vol.size)
        if vol.path and not running_vm and not row["guest_written"] and has_ext4(vol.path):
            how = mounts.grow_fs_image(vol.path)  # mounted: online (or at its next mount)
            if how == "unmounted":
                mounts.grow_fs_offline(vol.path)
            elif how == "deferred":
                log.info("the kernel refused to grow a mounted volume's filesystem online: it grows at the "
                         "container's next start", extra={"volume": row["name"]})

    def delete(self, ref: str) -> bool:
        """Conflict while attached; the pool's volume goes first, then the row."""
        row = self._get_row(ref)
        with self._lock(row["id"]):
            row = self._get_row(row["id"])
            inst = self._attached_to(row)
            if inst is not None:
                raise Conflict(f"volume {row['name']!r} is attached to instance {inst.name!r}: detach it "
                               f"first (DELETE /v1/instances/{inst.name}/volumes/{row['name']})")
            self.root.exports.check_unused("volume", row["id"], row["name"])
            self.db.execute("UPDATE volumes SET state='deleting', instance_id=NULL, updated_at=? WHERE id=?",
                            (time.time(), row["id"]))
            self._backend(row["pool"]).delete_volume(row["backend_name"])
            self.db.execute("DELETE FROM volumes WHERE id=?", (row["id"],))
        self._event(row["id"], row["name"], "deleted")
        return True

    # -- attach, detach --
    def _check_instance(self, inst) -> None:
        if inst.state in BUSY_STATES or inst.state == "error":
            raise Conflict(f"instance {inst.name!r} is {inst.state}: attach or detach once that is over")
        if self.root.migrations.source.busy(inst.id):
            raise Conflict(f"instance {inst.name!r} is being migrated: attach or detach once that is over")

    def _check_for_container(self, row) -> str:
        """The host file a container mounts; Unprocessable for a volume that has none."""
        vol = self._volume(row)
        if not vol.path:
            backend = self._backend(row["pool"])
            raise Unprocessable(f"volume {row['name']!r} is on {backend.kind} pool {row['pool']!r}: a container "
                                "mounts a volume's filesystem from a host file, and this host maps no RBD "
                                "images (no kernel rbd module); use a volume on a local pool")
        if row["guest_written"]:
            raise Unprocessable(f"volume {row['name']!r} was attached writable to a VM: its filesystem is the "
                                "guest's, and the host does not mount filesystems a guest could have crafted; "
                                "give the container a volume no VM has written")
        if not has_ext4(vol.path):
            raise Unprocessable(f"volume {row['name']!r} holds no ext4 filesystem: containers mount ext4 "
                                "volumes only")
        return vol.path

    def resolve_for_create(self, specs: list[models.VolumeMountSpec], kind: str = "container") -> list:
        """A create's volumes, checked before anything is made: each exists and is available
        (and, for a container, mountable). Conflict (as an attach of an attached volume, or to a
        taken target or path) if a volume, target or path is given twice. Returns their rows."""
        for key in ("volume", "target", "path"):
            given = [getattr(s, key) for s in specs if getattr(s, key) is not None]
            twice = next((g for i, g in enumerate(given) if g in given[:i]), None)
            if twice is not None:
                raise Conflict(f"volumes: {key} {twice!r} is given twice: each volume is attached once, "
                               f"at a {key} of its own")
        rows = []
        for spec in specs:
            row = self._get_row(spec.volume)
            inst = self._attached_to(row)
            if inst is not None:
                raise Conflict(f"volume {row['name']!r} is attached to instance {inst.name!r}: detach it first")
            if kind == "container":
                self._check_for_container(row)
            rows.append(row)
        return rows

    def reserve_for_create(self, inst_id: str, specs: list[models.VolumeMountSpec], rows: list,
                           kind: str = "container") -> list:
        """Attach ``rows`` (resolve_for_create's) to the new record ``inst_id``; Conflict if
        one was taken meanwhile (none is kept then). Returns what the instance is made with:
        the runtime's VolumeMounts (containers) or the driver's DiskSpecs (VMs, at their
        targets: given, else the first free)."""
        from containers.runtime import VolumeMount
        from hypervisor.disks import disk_for_volume
        given = {s.target for s in specs if s.target}
        free = (t for t in VM_TARGETS if t not in given)
        out, done = [], []
        try:
            for spec, row in zip(specs, rows):
                self.root.exports.check_attachable(row["id"], row["name"])
                if kind == "vm":
                    target = spec.target or next(free)
                    made = disk_for_volume(self._volume(row), target, readonly=spec.readonly)
                    self._reserve(row, inst_id, target=target, path=None, readonly=spec.readonly)
                    if not spec.readonly:
                        self.db.execute("UPDATE volumes SET guest_written=1 WHERE id=?", (row["id"],))
                else:
                    made = VolumeMount(source=self._volume(row).path, destination=spec.path,
                                       readonly=spec.readonly)
                    self._reserve(row, inst_id, target=None, path=spec.path, readonly=spec.readonly)
                done.append(row["id"])
                out.append(made)
        except BaseException:
            for vid in done:
                self._release(vid, inst_id)
            raise
        for spec, row in zip(specs, rows):
            self._event(row["id"], row["name"], "attached", instance=inst_id)
        return out

    def _reserve(self, row, inst_id: str, *, target, path, readonly: bool) -> None:
        """Mark ``row`` attached to ``inst_id`` unless it is attached to an instance that
        still has a record; Conflict then."""
        with self.db.tx() as c:
            cur = c.execute("SELECT instance_id, state FROM volumes WHERE id=?", (row["id"],)).fetchone()
            if cur is None or cur["state"] != "ready":
                raise NotFound(f"volume {row['name']!r} not found")
            holder = cur["instance_id"]
            if holder is not None and holder != inst_id and self.root.records.find_id(holder) is not None:
                owner = self.root.records.find_id(holder)
                raise Conflict(f"volume {row['name']!r} is attached to instance {owner.name!r}: detach it first")
            if holder == inst_id:
                raise Conflict(f"volume {row['name']!r} is attached to this instance already")
            c.execute("UPDATE volumes SET instance_id=?, target=?, path=?, readonly=?, updated_at=? WHERE id=?",
                      (inst_id, target, path, int(readonly), time.time(), row["id"]))

    def _release(self, vol_id: str, inst_id: str) -> None:
        self.db.execute("UPDATE volumes SET instance_id=NULL, target=NULL, path=NULL, readonly=0, updated_at=? "
                        "WHERE id=? AND instance_id=?", (time.time(), vol_id, inst_id))

    def attach(self, inst_ref: str, req: models.VolumeAttach) -> dict:
        """Attach a volume to a VM (running: hot-plugged; stopped: in its definition) or to a
        container (running or paused: mounted at ``req.path`` now, where the runtime can; stopped:
        from its next start). Conflict if the volume is attached (here or elsewhere) or the
        target is taken; Unprocessable for a path through a symlink in the container.
        On failure the volume stays available and the instance unchanged."""
        inst = self.root.instances.get(inst_ref)
        row = self._get_row(req.volume)
        self._check_instance(inst)
        if inst.kind == "vm":
            if req.path is not None:
                raise Unprocessable("path is for containers: a VM's volume gets a disk target (vdb..vdy)")
        else:
            if req.target is not None:
                raise Unprocessable("target is for VMs: a container's volume is mounted at a path")
            if req.path is None:
                raise Unprocessable("a container's volume needs a path to be mounted at (e.g. /data)")
            self._check_for_container(row)
        with self.root.instances.lock(inst.id), self._lock(row["id"]):
            inst = self.root.instances.get(inst.id)
            self._check_instance(inst)
            row = self._get_row(row["id"])
            self.root.exports.check_attachable(row["id"], row["name"])
            if inst.kind == "vm":
                self._attach_vm(inst, row, req)
            else:
                self._attach_container(inst, row, req)
        self._event(row["id"], row["name"], "attached", instance=inst.id)
        return self.get(row["id"])

    def _attach_vm(self, inst, row, req) -> None:
        from hypervisor.disks import disk_for_volume
        driver = self.root.driver
        taken = {d.target for d in driver.disks(inst.name)}
        taken |= {r["target"] for r in self.db.query(
            "SELECT target FROM volumes WHERE instance_id=? AND target IS NOT NULL", (inst.id,))}
        if req.target is not None and req.target in taken:
            raise Conflict(f"VM {inst.name!r} has a disk {req.target} already: pick another target or none")
        target = req.target or next((t for t in VM_TARGETS if t not in taken), None)
        if target is None:
            raise Conflict(f"VM {inst.name!r} has no free disk target left (vdb..vdy): detach a volume first")
        disk = disk_for_volume(self._volume(row), target, readonly=req.readonly)
        self._reserve(row, inst.id, target=target, path=None, readonly=req.readonly)
        if not req.readonly:  # before the guest can write: a crash from here on leaves it marked
            self.db.execute("UPDATE volumes SET guest_written=1 WHERE id=?", (row["id"],))
        try:
            driver.attach_disk(inst.name, disk)
        except BaseException:
            self._release(row["id"], inst.id)
            raise

    def _container_mounts(self, inst_id: str, *, without: str | None = None, extra=None) -> tuple:
        from containers.runtime import VolumeMount
        rows = self.db.query("SELECT * FROM volumes WHERE instance_id=? AND state='ready' AND path IS NOT NULL "
                             "ORDER BY updated_at", (inst_id,))
        out = [VolumeMount(source=self._volume(r).path, destination=r["path"], readonly=bool(r["readonly"]))
               for r in rows if r["id"] != without]
        return tuple(out + ([extra] if extra is not None else []))

    def _container_runtime(self, inst, what: str):
        """The runtime and whether the container runs (or is paused): then its volume is
        mounted or unmounted live (SupportsLiveVolumes), else Conflict."""
        from containers.runtime import SupportsLiveVolumes, SupportsVolumes
        rt = self.root.runtime
        if not isinstance(rt, SupportsVolumes):
            raise Unsupported(f"the {self.root.config.containers.runtime} runtime cannot {what} volumes of an "
                              "existing container: give them at create (volumes: [{volume, path}])")
        info = rt.find(inst.name)
        live = info is not None and info.state in ("running", "paused")
        if live and not isinstance(rt, SupportsLiveVolumes):
            raise Conflict(f"container {inst.name!r} is {info.state}: stop it first, then {what} the volume "
                           f"(the {self.root.config.containers.runtime} runtime changes volumes while stopped)")
        return rt, live

    def _attach_container(self, inst, row, req) -> None:
        from containers.runtime import VolumeMount
        rt, live = self._container_runtime(inst, "attach")
        taken = {r["path"] for r in self.db.query(
            "SELECT path FROM volumes WHERE instance_id=? AND path IS NOT NULL", (inst.id,))}
        if req.path in taken:
            raise Conflict(f"container {inst.name!r} has a volume at {req.path!r} already")
        mount = VolumeMount(source=self._volume(row).path, destination=req.path, readonly=req.readonly)
        mounts = self._container_mounts(inst.id, extra=mount)
        self._reserve(row, inst.id, target=None, path=req.path, readonly=req.readonly)
        try:
            if live:  # only the new one is mounted: the others stay as they are
                rt.add_volume_live(inst.name, mount)
            else:
                rt.set_volumes(inst.name, mounts)
        except BaseException:
            self._release(row["id"], inst.id)
            raise

    def detach(self, inst_ref: str, vol_ref: str) -> dict:
        """Detach a volume: from a VM (running: hot-unplugged, the guest releases it first) or
        a container (running: unmounted live; Conflict, kept attached, while the container
        still holds its filesystem elsewhere). NotFound if it is not attached there."""
        inst = self.root.instances.get(inst_ref)
        row = self._get_row(vol_ref)
        if row["instance_id"] != inst.id:
            raise NotFound(f"volume {row['name']!r} is not attached to instance {inst.name!r}")
        self._check_instance(inst)
        with self.root.instances.lock(inst.id), self._lock(row["id"]):
            row = self._get_row(row["id"])
            if row["instance_id"] != inst.id:
                raise NotFound(f"volume {row['name']!r} is not attached to instance {inst.name!r}")
            if inst.kind == "vm":
                try:
                    self.root.driver.detach_disk(inst.name, row["target"])
                except NotFound:
                    pass  # its disk is gone already (a crash between the two steps)
            else:
                rt, live = self._container_runtime(inst, "detach")
                if live:  # Conflict (kept attached) while the container holds it elsewhere
                    rt.remove_volume_live(inst.name, row["path"])
                else:
                    rt.set_volumes(inst.name, self._container_mounts(inst.id, without=row["id"]))
            self._release(row["id"], inst.id)
        self._event(row["id"], row["name"], "detached", instance=inst.id)
        return self.get(row["id"])

    # -- migration: an instance's volumes move with it --
    def outgoing(self, inst_id: str) -> list[tuple[dict, str]]:
        """The volumes attached to instance ``inst_id`` as a migration sends them: (the
        peer's IncomingVolume fields, the host file). Unprocessable naming those that cannot
        move: those without a host file (a block pool's: see below), and for a container
        those without an ext4 filesystem or written by a VM. A VM's volume goes with its
        target, pool and whether the guest wrote it (its bytes are copied as they are)."""
        inst = self.root.records.find_id(inst_id)
        vm = inst is not None and inst.kind == "vm"
        out, bad = [], []
        for row in self.db.query("SELECT * FROM volumes WHERE instance_id=? AND state='ready' "
                                 "ORDER BY target, path", (inst_id,)):
            vol = self._volume(row)
            shared = vm and not vol.path and (vol.uri or "").startswith("rbd:")
            if (not vol.path and not shared) or \
                    (not vm and (row["guest_written"] or not has_ext4(vol.path) or not row["path"])):
                bad.append(row["name"])
                continue
            fields = {"id": row["id"], "name": row["name"], "size_bytes": row["size"],
                      "readonly": bool(row["readonly"])}
            if vm:
                fields.update(target=row["target"], pool=row["pool"], guest_written=bool(row["guest_written"]))
                if shared:
                    fields.update(shared_uri=vol.uri)
            else:
                fields.update(path=row["path"])
            out.append((fields, vol.path or None))
        if bad and vm:
            raise Unprocessable(f"volume(s) {', '.join(bad)} of VM {inst.name!r} cannot move with it: only volumes "
                                "of a local pool (raw files) or of a block (RBD) pool do; detach them first "
                                "(DELETE /v1/instances/{id}/volumes/{volume})")
        if bad:
            raise Unprocessable(f"volume(s) {', '.join(bad)} cannot move with the container: only ext4 volumes of "
                                "a local pool do (a block pool's or a VM-written one does not); detach them first")
        return out

    def incoming(self, inst_id: str, pool: str, vols: list[models.IncomingVolume], kind: str = "container") -> None:
        """Make the volumes of incoming instance ``inst_id`` here, in this host's pools and
        paths (a peer names a pool, never a path), rows in state ``incoming`` attached to it:
        a container's as fresh ext4 files of their sizes in ``pool`` (the source's file trees
        are unpacked into them, never its filesystem images) at their paths; a VM's as empty
        raw files of their sizes in the pool of the name the source gives (its storage copy
        or byte stream fills them) at their targets. Conflict if an id or name is taken here;
        Unprocessable for a pool this host lacks or that holds no volume files. On failure
        none is left."""
        from storage.backend import VolumeSpec
        from storage import mounts
        made: list[tuple[str, str, object]] = []
        try:
            for v in vols:
                vpool = v.pool if kind == "vm" else pool
                if vpool not in self.root.config.pools:
                    raise Unprocessable(f"pool {vpool!r} of volume {v.name!r} is not configured here: the incoming "
                                        f"{kind}'s volume needs a pool of that name (add [pools.{vpool}] "
                                        "here, or move the volume to a pool both hosts have)")
                backend = self._backend(vpool)
                if v.shared_uri is not None:
                    self._adopt_incoming(inst_id, vpool, backend, v)
                    made.append((v.id, "", None))
                    continue
                if not backend.supports_volumes or backend.kind not in LOCAL_KINDS:
                    raise Unprocessable(f"pool {vpool!r} here is a {backend.kind} pool: the incoming {kind}'s "
                                        f"volume {v.name!r} is a file and needs a local pool")
                bname = BACKEND_PREFIX + v.id[:12]
                self._insert_incoming(inst_id, kind, vpool, bname, v, v.size_bytes)
                made.append((v.id, bname, backend))
                self._check_room(backend, vpool, v.size_bytes)
                vol = backend.create_volume(VolumeSpec(bname, v.size_bytes, "raw"))
                if vol.size != v.size_bytes:  # a storage copy needs the very size
                    raise Unprocessable(f"pool {vpool!r} cannot make volume {v.name!r} of exactly "
                                        f"{v.size_bytes} bytes (it made {vol.size})")
                if kind == "container":
                    mounts.format_ext4(vol.path)
        except BaseException:
            for vol_id, bname, backend in made:
                try:
                    if backend is not None:  # an adopted shared image is the source's: never deleted
                        backend.delete_volume(bname)
                finally:
                    self.db.execute("DELETE FROM volumes WHERE id=?", (vol_id,))
            raise

    def _adopt_incoming(self, inst_id: str, pool: str, backend, v: models.IncomingVolume) -> None:
        """A VM's volume on shared storage: this host's pool ``pool`` must see the very image
        the source names (nothing is made or copied); its row here, state ``incoming``."""
        if backend.kind in LOCAL_KINDS:
            raise Unprocessable(f"pool {pool!r} here is a {backend.kind} pool, not shared storage: volume "
                                f"{v.name!r} is an RBD image there; [pools.{pool}] must name the same Ceph pool on "
                                "both hosts")
        bname = BACKEND_PREFIX + v.id[:12]
        vol = backend.find_volume(bname)
        if vol is None or vol.uri != v.shared_uri:
            raise Unprocessable(f"volume {v.name!r} is {v.shared_uri} on the source but pool {pool!r} here "
                                f"{'has no such image' if vol is None else 'holds ' + str(vol.uri)}: "
                                f"[pools.{pool}] must name the same Ceph pool on both hosts")
        self._insert_incoming(inst_id, "vm", pool, bname, v, vol.size)

    def _insert_incoming(self, inst_id: str, kind: str, pool: str, bname: str, v: models.IncomingVolume,
                         size: int) -> None:
        """The row of an incoming ``kind``'s volume ``v`` (state ``incoming``, attached to
        ``inst_id``); Conflict if its id, name or backend name is taken here."""
        now = time.time()
        with self.db.tx() as c:
            taken = c.execute("SELECT name FROM volumes WHERE id=? OR name=? OR backend_name=?",
                              (v.id, v.name, bname)).fetchone()
            if taken is not None:
                raise Conflict(f"a volume {taken['name']!r} exists here: the incoming {kind}'s volume "
                               f"{v.name!r} cannot take its name or id; delete or rename it first")
            c.execute("INSERT INTO volumes(id, name, pool, backend_name, format, size, state, instance_id, "
                      "target, path, readonly, guest_written, created_at, updated_at) "
                      "VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                      (v.id, v.name, pool, bname, "raw", size, "incoming", inst_id, v.target,
                       v.path, int(v.readonly), int(v.guest_written and kind == "vm"), now, now))

    def incoming_disks(self, inst_id: str) -> dict[str, str]:
        """The incoming VM's volumes: target -> this host's file (where the copy lands), or
        the shared image's ``rbd:`` uri."""
        rows = self.db.query("SELECT * FROM volumes WHERE instance_id=? AND state='incoming' AND target IS NOT NULL",
                             (inst_id,))
        return {r["target"]: self._volume(r).path or self._volume(r).uri for r in rows}

    def has_incoming_shared(self, inst_id: str) -> bool:
        """Whether the incoming instance adopted a shared (RBD) volume here."""
        return any(not self._local(r) for r in self.db.query(
            "SELECT * FROM volumes WHERE instance_id=? AND state='incoming'", (inst_id,)))

    def incoming_shared(self, inst_id: str) -> tuple:
        """The driver's DiskSpecs of the incoming VM's shared (RBD) volumes, as this host
        attaches them (the caller readies their cephx secrets)."""
        return tuple(d for d in self.incoming_disk_specs(inst_id) if d.type == "rbd")

    def incoming_disk_specs(self, inst_id: str) -> tuple:
        """The driver's DiskSpecs of the incoming VM's volumes (a stopped VM defined here)."""
        from hypervisor.disks import disk_for_volume
        rows = self.db.query("SELECT * FROM volumes WHERE instance_id=? AND state='incoming' AND target IS NOT NULL "
                             "ORDER BY target", (inst_id,))
        return tuple(disk_for_volume(self._volume(r), r["target"], readonly=bool(r["readonly"])) for r in rows)

    def incoming_file(self, inst_id: str, vol_id: str) -> tuple[str, int]:
        """The host file ("" for an adopted shared image) and size of incoming volume
        ``vol_id`` of ``inst_id``; NotFound otherwise."""
        row = self.db.one("SELECT * FROM volumes WHERE id=? AND instance_id=? AND state='incoming'",
                          (vol_id, inst_id))
        if row is None:
            raise NotFound(f"instance {inst_id} brings no volume {vol_id}")
        return self._volume(row).path, row["size"]

    def incoming_mounts(self, inst_id: str) -> tuple:
        """The runtime's VolumeMounts of the incoming container's volumes."""
        from containers.runtime import VolumeMount
        rows = self.db.query("SELECT * FROM volumes WHERE instance_id=? AND state='incoming' ORDER BY path",
                             (inst_id,))
        return tuple(VolumeMount(source=self._volume(r).path, destination=r["path"], readonly=bool(r["readonly"]))
                     for r in rows)

    def finish_incoming(self, inst_id: str) -> int:
        """The instance runs (or, a stopped VM, is defined) here: its volumes are ours (state
        ``ready``, attached to it)."""
        rows = self.db.query("SELECT * FROM volumes WHERE instance_id=? AND state='incoming'", (inst_id,))
        self.db.execute("UPDATE volumes SET state='ready', updated_at=? WHERE instance_id=? AND state='incoming'",
                        (time.time(), inst_id))
        for r in rows:
            self._event(r["id"], r["name"], "arrived", instance=inst_id)
        return len(rows)

    def drop_incoming(self, inst_id: str) -> int:
        """Remove the volumes an incoming instance brought (a migration that did not finish)."""
        n = 0
        for r in self.db.query("SELECT * FROM volumes WHERE instance_id=? AND state='incoming'", (inst_id,)):
            try:
                if self._local(r):  # a shared (RBD) image was adopted, not made: the source's guest uses it
                    self._backend(r["pool"]).delete_volume(r["backend_name"])
            except AgentError as e:  # kept: recover() tries again
                log.warning("cannot remove an incoming volume", extra={"volume": r["name"], "error": e.message})
                continue
            self.db.execute("DELETE FROM volumes WHERE id=?", (r["id"],))
            n += 1
        return n

    def _local(self, row) -> bool:
        """Whether ``row``'s volume is host-local (a migration copies it; else shared storage)."""
        return self._backend(row["pool"]).kind in LOCAL_KINDS

    def forget_migrated(self, inst_id: str) -> int:
        """The instance runs on another host now, with its volumes: remove them here."""
        n = 0
        for r in self.db.query("SELECT * FROM volumes WHERE instance_id=? AND state='ready'", (inst_id,)):
            with self._lock(r["id"]):
                if self._local(r):  # a shared (RBD) image is the destination's now: only forgotten
                    self.db.execute("UPDATE volumes SET state='deleting', updated_at=? WHERE id=?",
                                    (time.time(), r["id"]))
                    self._backend(r["pool"]).delete_volume(r["backend_name"])
                self.db.execute("DELETE FROM volumes WHERE id=?", (r["id"],))
            self._event(r["id"], r["name"], "migrated", instance=inst_id)
            n += 1
        return n

    # -- recovery --
    def recover(self) -> int:
        """At the agent's start: finish creates and deletes a crash cut (their pool volume is
        removed), drop attachments of instances that are gone, and those of VMs whose
        definition lacks the disk (a crash between reserving and attaching). Returns how many
        rows changed."""
        n = 0
        for row in self.db.query("SELECT * FROM volumes WHERE state='incoming'"):
            inst = self._attached_to(row)
            if inst is None or inst.state != "incoming":  # its migration ended without it
                n += self.drop_incoming(row["instance_id"])
        for row in self.db.query("SELECT * FROM volumes WHERE state IN ('creating', 'deleting')"):
            try:
                self._backend(row["pool"]).delete_volume(row["backend_name"])
            except Exception as e:  # noqa: BLE001 - logged; retried at the next start
                log.warning("cannot remove a volume a crash left behind", extra={"volume": row["name"],
                                                                                  "error": str(e)})
                continue
            self.db.execute("DELETE FROM volumes WHERE id=?", (row["id"],))
            n += 1
        for row in self.db.query("SELECT * FROM volumes WHERE instance_id IS NOT NULL"):
            inst = self._attached_to(row)
            stale = inst is None
            if inst is not None and inst.state not in BUSY_STATES:
                try:
                    stale = not self._in_use_by(inst, row)
                except NotFound:
                    stale = False  # the instance's own reconcile says it is lost
                except Exception as e:  # noqa: BLE001 - the driver is down: keep the row
                    log.warning("cannot check an instance's volumes", extra={"instance": inst.name,
                                                                             "error": str(e)})
            if stale:
                self._release(row["id"], row["instance_id"])
                n += 1
        return n

    def _in_use_by(self, inst, row) -> bool:
        """True if the instance's driver has the volume as the row says (a VM's disk at its
        target; a container's mount at its path)."""
        from containers.runtime import SupportsVolumes
        if inst.kind == "vm":
            return row["target"] in {d.target for d in self.root.driver.disks(inst.name)}
        rt = self.root.runtime
        if not isinstance(rt, SupportsVolumes):
            return True  # given at create: the runtime keeps them with the container
        return row["path"] in {m.destination for m in rt.volumes(inst.name)}

    def _event(self, vol_id: str, name: str, change: str, **extra) -> None:
        self.root.events.publish("volume", {"id": vol_id, "name": name, "change": change, **extra})

