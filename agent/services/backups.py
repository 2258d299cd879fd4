"""Backups of instances: export one as a self-contained artifact into a pool, list, download,
upload, delete, and restore one as a new instance (here or on any host that reaches the pool).

Terms: a *backup* is an artifact (storage.backups: manifest + the image's own export + the
instance's data) kept by a pool that keeps backups: an object pool (S3 bucket: every host using
the bucket sees it, which is how a host's instances outlive the host) or a local pool (a
directory). The pool's listing is the truth; the ``backups`` table (component "backups") holds
only writes in progress, so that a killed agent's leftovers are found again (``sweep``).

What is in one: a VM's root disk as a qcow2 layer over its image (hypervisor.driver.
SupportsDiskExport: a running VM's copy is crash-consistent, taken from an internal snapshot
without stopping its vCPUs; a stopped VM's is exact; a VM on an RBD pool: the whole disk as a
standalone qcow2 read from an RBD snapshot, storage.backend.CopiesVolumeData) or a container's writes (a tar of its
overlay upper dir, made as a migration sends it, the container frozen for the copy; restored
with the migration's hardened extractor, storage/upper.py, owners mapped to this host's user
namespace range), the image itself, and each attached volume: a VM's (local or RBD pool) as a
standalone qcow2 of its data, read at the same instant as the root disk (a running VM is paused
while its local volumes are copied and its RBD disks snapshotted: its root disk's snapshot is
taken in that pause, and it resumes before anything else is read); a container's as a tar of
its file tree, made as a volume migration sends it (from its host mount, the container frozen;
a volume mounted nowhere is mounted read-only for the copy).

Lifecycle: create (row ``creating`` -> members in a staging dir -> artifact streamed to the
pool, invisible until complete -> marker -> row gone) -> listed -> restore any number of times
-> delete. Restore reads the whole artifact into a staging dir, checking every member's size and
sha256 and the artifact's own sha256, BEFORE it creates anything (422 and nothing left on a
mismatch, and a volume member that is not a plain standalone qcow2 or whose attachment is not
one this host takes); then it imports the image if this host lacks it, makes each volume afresh
(a new id; the backed-up name if it is free here, else ``<instance>-<name>``, else that with
``-2``, ``-3``...; a VM's filled by ``qemu-img convert`` of its member, a container's ext4
mounted here and its tree unpacked by the hardened extractor, owners mapped as the rootfs's) and
creates the instance through the instance service's own path (agent.services.instances:
reserve + build) with those volumes attached where they were, its disk filled from the backup
before it is defined: a new id, MAC and address, the backed-up request otherwise. A restore's
volumes are recorded (row ``restoring``) before each is made: a failed restore removes them, a
killed agent's next start removes those no instance holds.
Every change publishes a ``backup`` event {id, pool, instance, instance_id, action}.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from types import SimpleNamespace

from agent import models
from agent.errors import AgentError, CommandFailed, Conflict, InvalidInput, NotFound, Unprocessable, Unsupported
from agent.services.assembly import ROOT_TARGET, root_volume
from hypervisor.driver import SupportsDiskExport
from storage import backups as artifacts
from storage.backend import CopiesVolumeData, SnapshotsVolumes

log = logging.getLogger(__name__)

SCHEMA_STEPS = [
    """
    CREATE TABLE backups (
        id TEXT PRIMARY KEY,
        pool TEXT NOT NULL,
        instance_id TEXT,               -- the instance backed up (NULL for an upload)
        state TEXT NOT NULL,            -- creating | uploading
        snapshot TEXT,                  -- the temporary VM snapshot the copy reads, if any
        created_at REAL NOT NULL
    );
    """,
    """
    -- paused: the VM was paused for its volumes' copy (resumed by sweep after a crash)
    ALTER TABLE backups ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
    -- volumes: a restore's (state restoring), the ids of the volumes it made (JSON)
    ALTER TABLE backups ADD COLUMN volumes TEXT;
    """,
]
TAKES = ("running", "paused", "stopped", "created")  # instance states a backup may be taken in
MAX_BACKUP_BYTES = 4 << 40  # 4 TiB: an upload beyond this is refused; the pool's space limits first
STAGING_PREFIX = "backup-"
# a container's writes as a migration sends them (agent/migration/peer.py push_rootfs)
ROOTFS_TAR = ["tar", "-c", "--xattrs", "--xattrs-include=trusted.*", "--numeric-owner"]
SPEC_DROPPED = ("image_id", "cleanup_pending", "volumes", "name", "image", "pool")


def _consistency(kind: str, state: str) -> str:
    if state in ("stopped", "created"):
        return "stopped"
    return "crash-consistent" if kind == "vm" else "frozen"


class BackupService:
    def __init__(self, root):
        self.root = root
        self.db = root.db
        self.db.apply_schema("backups", SCHEMA_STEPS)

    # -- pools --
    def stores(self) -> dict[str, artifacts.BackupStore]:
        out = {}
        for name, backend in self.root.pools.items():
            s = artifacts.store_for(name, backend)
            if s is not None:
                out[name] = s
        return out

    def _store(self, pool: str | None) -> artifacts.BackupStore:
        stores = self.stores()
        if pool is None:
            pool = next((n for n, s in stores.items() if isinstance(s, artifacts.ObjectBackupStore)),
                        self.root.config.default_pool)
        if pool not in self.root.pools:
            raise NotFound(f"pool {pool!r} not found; pools: {', '.join(sorted(self.root.pools))}")
        if pool not in stores:
            raise Unprocessable(f"pool {pool!r} keeps no backups: use an object (S3) or a local pool "
                                f"({', '.join(sorted(stores)) or 'none configured'})")
        return stores[pool]

    def _staging(self) -> str:
        return tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root.store.tmp_dir)

    def _event(self, meta: dict, action: str, **extra) -> None:
        self.root.events.publish("backup", {"id": meta["id"], "pool": meta.get("pool"),
                                            "instance": meta.get("instance"),
                                            "instance_id": meta.get("instance_id"), "action": action, **extra})

    # -- reads --
    def list(self, pool: str | None = None) -> list[dict]:
        stores = [self._store(pool)] if pool else self.stores().values()
        out = [_public(m) for s in stores for m in s.list()]
        return sorted(out, key=lambda m: (m.get("created_at") or 0, m["id"]))

    def _find(self, backup_id: str) -> tuple[artifacts.BackupStore, dict]:
        artifacts.check_id(backup_id)
        for s in self.stores().values():
            m = s.find(backup_id)
            if m is not None:
                return s, m
        raise NotFound(f"backup {backup_id} not found in any pool; `GET /v1/backups` lists them")

    def get(self, backup_id: str) -> dict:
        return _public(self._find(backup_id)[1])

    def open(self, backup_id: str):
        """(stream, size, metadata) of the artifact, for a download."""
        store, meta = self._find(backup_id)
        f, size = store.open(backup_id)
        return f, size, _public(meta)

    def delete(self, backup_id: str) -> bool:
        try:
            store, meta = self._find(backup_id)
        except NotFound:
            return False
        gone = store.delete(backup_id)
        self._event(meta, "deleted")
        return gone

    # -- create --
    def create(self, ref: str, req: models.BackupCreate) -> dict:
        """Back ``ref`` up into ``req.pool`` in an operation (202). Conflict unless the instance
        is running, paused or stopped; Unsupported where its driver or pool cannot copy it."""
        inst = self.root.instances.get(ref)
        if inst.state not in TAKES:
            raise Conflict(f"instance {inst.name!r} is {inst.state}: wait until it is running or stopped")
        store = self._store(req.pool)
        if inst.kind == "vm":
            if not isinstance(self.root.driver, SupportsDiskExport):
                raise Unsupported(f"the {self.root.config.hypervisor.driver} driver cannot copy VM disks")
            backend = self.root.pools[inst.pool]
            vol = backend.find_volume(root_volume("vm", inst.id))
            if vol is None or not vol.path and not (isinstance(backend, CopiesVolumeData)
                                                    and isinstance(backend, SnapshotsVolumes)):
                raise Unsupported(f"instance {inst.name!r}: its disk in pool {inst.pool!r} is neither a host "
                                  "file nor a volume the pool snapshots and copies out: backups cover VMs on "
                                  "local and RBD pools")
        else:
            vol = self.root.pools[inst.pool].find_volume(inst.volumes[0]) if inst.volumes else None
            if vol is None or not vol.path:
                raise Unsupported(f"instance {inst.name!r}: its rootfs in pool {inst.pool!r} is not a host "
                                  "directory: backups cover containers on local pools")
        self._backed_volumes(inst)  # Unsupported/Unprocessable for one a backup cannot read
        backup_id = uuid.uuid4().hex
        snap = f"backup-{backup_id[:12]}" if inst.kind == "vm" else None  # libvirt's or the pools' snapshot
        self.db.execute("INSERT INTO backups (id, pool, instance_id, state, snapshot, created_at) "
                        "VALUES (?, ?, ?, 'creating', ?, ?)", (backup_id, store.pool, inst.id, snap, time.time()))

        def work(op):
            try:
                meta = self._export(op, backup_id, store, inst.id, snap)
            except BaseException:
                self._discard(backup_id)
                raise
            self.db.execute("DELETE FROM backups WHERE id=?", (backup_id,))
            self._event(meta, "created")
            return {"backup": meta}

        try:
            return self.root.operations.submit("backup.create", inst.id, work)
        except BaseException:
            self.db.execute("DELETE FROM backups WHERE id=?", (backup_id,))
            raise

    def _export(self, op, backup_id: str, store, inst_id: str, snap: str | None) -> dict:
        staging = self._staging()
        try:
            inst = self.root.records.find_id(inst_id)
            if inst is None:
                raise NotFound(f"instance {inst_id} is gone")
            img = self.root.store.get(inst.image)
            op.phase("image")
            image_file = os.path.join(staging, "image." + ("tar" if img.kind == "container" else img.format))
            self.root.store.export(img.id, image_file)
            op.phase("disk" if img.kind == "vm" else "rootfs")
            extra: dict = {}
            with self.root.instances.lock(inst_id):  # no start, stop or delete under the copy
                inst = self.root.records.find_id(inst_id)
                if inst is None or inst.state not in TAKES:
                    raise Conflict(f"instance {inst_id} changed while its backup began: retry")
                state = inst.state
                if inst.kind == "vm":
                    data, vols = self._copy_vm(inst, img, snap, staging, backup_id)
                else:
                    data, idmap, vols = self._copy_container(inst, staging)
                    extra["idmap"] = idmap
            op.phase("checksum")
            members = [artifacts.member_entry(os.path.basename(image_file), "image", image_file), data(),
                       *(v() for v in vols)]
            spec = {k: v for k, v in inst.spec_dict().items() if k not in SPEC_DROPPED}
            now = time.time()
            manifest = {"format": artifacts.FORMAT, "version": artifacts.VERSION, "id": backup_id,
                        "kind": inst.kind, "created_at": now, "host": self.root.host.hostname(),
                        "instance": {"id": inst.id, "name": inst.name, "state": state},
                        "consistency": _consistency(inst.kind, state), "spec": spec,
                        "image": {"id": img.id, "name": img.name, "kind": img.kind, "format": img.format,
                                  "digest": img.digest, "size": img.size},
                        "members": members, **extra}
            total = sum(m["size"] for m in members)
            op.phase("upload", bytes_total=total)
            files = {m["name"]: os.path.join(staging, m["name"]) for m in members}
            meta = {"id": backup_id, "kind": inst.kind, "instance": inst.name, "instance_id": inst.id,
                    "instance_state": state, "consistency": manifest["consistency"], "image": img.id,
                    "image_name": img.name, "host": manifest["host"], "created_at": now, "data_bytes": total}
            return _public(store.write(backup_id, artifacts.ArtifactStream(manifest, files), meta,
                                       progress=lambda n: op.bytes(min(n, total))))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _backed_volumes(self, inst) -> list[tuple]:
        """The instance's attached volumes as a backup copies them: (what the manifest keeps of
        each, the pool's Volume, its pool). Unsupported for a VM volume whose pool neither gives
        host files nor copies data out of a snapshot (CopiesVolumeData); Unprocessable for a
        container volume a migration could not move either."""
        if inst.kind == "vm":
            out = []
            for v, vol in self.root.volumes.attached_to_vm(inst.id):
                backend = self.root.pools[vol.pool]
                if not vol.path and not (isinstance(backend, CopiesVolumeData)
                                         and isinstance(backend, SnapshotsVolumes)):
                    raise Unsupported(f"instance {inst.name!r}: volume {v['name']!r} is in pool {vol.pool!r}, "
                                      "whose volumes a backup cannot read (no host file, no snapshots); detach it")
                out.append(({k: v[k] for k in ("name", "size_bytes", "format", "target", "readonly")}, vol, backend))
            return out
        try:
            vols = self.root.volumes.outgoing(inst.id)
        except Unprocessable as e:
            raise Unprocessable(f"instance {inst.name!r} cannot be backed up: {e.message}") from None
        return [({k: v[k] for k in ("name", "size_bytes", "path", "readonly")}, path, None) for v, path in vols]

    def _copy_vm(self, inst, img, snap: str, staging: str, backup_id: str):
        """The VM's root disk (a host file: a qcow2 layer over its image, SupportsDiskExport; an
        RBD volume: the whole disk as a standalone qcow2, read from an RBD snapshot) and each
        attached volume (a standalone qcow2 of its data: a host file copied, an RBD volume read
        from a snapshot), all at one instant: a running VM with volumes is paused (its I/O
        drained) while its root disk's snapshot is taken, its RBD volumes are snapshotted and
        its local volumes copied; it resumes before anything else is read (a killed agent's
        sweep resumes it and removes the snapshots). (A function giving the disk's manifest
        entry, those of the volumes.)"""
        from storage import qemu_img
        pool = self.root.pools[inst.pool]
        vol = pool.get_volume(root_volume("vm", inst.id))
        base = pool.blob_path(vol.base) if vol.base and vol.path else None
        path = os.path.join(staging, "disk.qcow2")
        vols = self._backed_volumes(inst)
        drv = self.root.driver
        paused = bool(vols) and drv.get(inst.name).state == "running"
        entries, later, snaps = [], [], []

        def resume() -> None:
            nonlocal paused
            if paused:
                drv.resume(inst.name)
                paused = False
                self.db.execute("UPDATE backups SET paused=0 WHERE id=?", (backup_id,))

        def held() -> None:  # the root disk's content is fixed: the volumes at the same instant
            try:
                for i, (v, vvol, backend) in enumerate(vols):
                    name = f"volume-{i}.qcow2"
                    dest = os.path.join(staging, name)
                    if vvol.path:
                        qemu_img.run(["convert", "-q", "-U", "-f", v["format"], "-O", "qcow2", vvol.path, dest])
                    else:
                        backend.snapshot_volume(vvol.name, snap)
                        snaps.append((backend, vvol.name))
                        later.append((backend, vvol.name, dest))
                    entries.append(lambda name=name, dest=dest, v=v: artifacts.member_entry(
                        name, "volume", dest, volume=v))
            finally:
                resume()

        if paused:
            self.db.execute("UPDATE backups SET paused=1 WHERE id=?", (backup_id,))
            drv.pause(inst.name)
        try:
            if vol.path:
                drv.export_disk(inst.name, ROOT_TARGET, path, snapshot=snap, backing=base,
                                backing_format=img.format if base else None, held=held)
            else:  # checked at create: CopiesVolumeData and SnapshotsVolumes
                pool.snapshot_volume(vol.name, snap)
                snaps.append((pool, vol.name))
                held()
                pool.export_volume_snapshot(vol.name, snap, path)
            for backend, name, dest in later:
                backend.export_volume_snapshot(name, snap, dest)
        finally:
            resume()
            for backend, name in snaps:
                backend.delete_volume_snapshot(name, snap)

        def disk() -> dict:
            return artifacts.member_entry("disk.qcow2", "disk", path, target=ROOT_TARGET, layer=base is not None)
        return disk, entries

    def _copy_container(self, inst, staging: str):
        """The container's writes (its overlay upper dir) as a tar, made as a migration sends it
        (numeric owners, overlayfs's xattrs and whiteouts kept), and the file tree of each
        attached volume as a tar (from where the runtime mounted it; one mounted nowhere is
        mounted read-only for the copy), while a running container is frozen (SupportsPause;
        thawed whatever happens); (a function giving its manifest entry, the container's user
        namespace map, functions giving the volumes' entries)."""
        from containers.runtime import SupportsPause
        rt = self.root.runtime
        upper = os.path.join(self.root.pools[inst.pool].get_volume(inst.volumes[0]).path, "upper")
        info = rt.get(inst.name)
        path = os.path.join(staging, "rootfs.tar")
        vols = self._backed_volumes(inst)
        entries = []
        frozen = info.state == "running" and isinstance(rt, SupportsPause)
        if frozen:
            rt.pause(inst.name)
        try:
            _tar(upper, path, f"{inst.name!r}'s rootfs")
            for i, (v, src, _) in enumerate(vols):
                name = f"volume-{i}.tar"
                dest = os.path.join(staging, name)
                _tar_volume(src, dest, os.path.join(staging, f"mnt-{i}"), f"volume {v['name']!r}")
                entries.append(lambda name=name, dest=dest, v=v: artifacts.member_entry(name, "volume", dest, volume=v))
        finally:
            if frozen:
                rt.resume(inst.name)
        idmap = {"host_id": info.idmap.host_id, "size": info.idmap.size} if info.idmap is not None else None
        return (lambda: artifacts.member_entry("rootfs.tar", "rootfs", path)), idmap, entries

    def _pool_disks(self, inst) -> list[tuple]:
        """(pool, volume name) of each disk of VM ``inst`` its pool snapshots (RBD)."""
        out = []
        root = self.root.pools.get(inst.pool)
        if isinstance(root, SnapshotsVolumes) and inst.volumes:
            vol = root.find_volume(inst.volumes[0])
            if vol is not None and not vol.path:
                out.append((root, vol.name))
        for _, vol in self.root.volumes.attached_to_vm(inst.id):
            backend = self.root.pools.get(vol.pool)
            if isinstance(backend, SnapshotsVolumes) and not vol.path:
                out.append((backend, vol.name))
        return out

    def _discard(self, backup_id: str) -> None:
        """Remove what an unfinished backup or upload left (its partial artifact, its VM snapshot)
        and its row; what cannot be removed yet stays for the next start."""
        row = self.db.one("SELECT * FROM backups WHERE id=?", (backup_id,))
        if row is None:
            return
        try:
            store = self.stores().get(row["pool"])
            if store is not None and row["state"] != "restoring":
                store.discard(backup_id)
            inst = self.root.records.find_id(row["instance_id"]) if row["instance_id"] else None
            if row["snapshot"] and inst is not None and inst.kind == "vm":
                self.root.driver.delete_snapshot(inst.name, row["snapshot"])
                for backend, name in self._pool_disks(inst):
                    backend.delete_volume_snapshot(name, row["snapshot"])
            if row["paused"] and inst is not None and inst.kind == "vm" and \
                    self.root.driver.get(inst.name).state == "paused":  # paused for its volumes' copy
                self.root.driver.resume(inst.name)
            if row["state"] == "restoring":
                self._drop_restored(row)
        except NotFound:
            pass
        except AgentError as e:
            log.warning("cannot remove an unfinished backup yet", extra={"backup": backup_id, "error": e.message})
            return
        self.db.execute("DELETE FROM backups WHERE id=?", (backup_id,))

    # -- upload --
    def upload(self, src, pool: str | None) -> dict:
        """Store the artifact read from ``src`` (a client's file) in ``pool`` as a new backup:
        read whole and checked first (Unprocessable: not a backup, or a checksum fails), then
        written to the pool as a fresh artifact. On failure nothing is left."""
        store = self._store(pool)
        backup_id = uuid.uuid4().hex
        self.db.execute("INSERT INTO backups (id, pool, instance_id, state, snapshot, created_at) "
                        "VALUES (?, ?, NULL, 'uploading', NULL, ?)", (backup_id, store.pool, time.time()))
        staging = self._staging()
        try:
            manifest = artifacts.unpack(src, staging, limit=MAX_BACKUP_BYTES)
            files = {m["name"]: os.path.join(staging, m["name"]) for m in manifest["members"]}
            manifest = {**manifest, "id": backup_id}
            inst = manifest.get("instance") if isinstance(manifest.get("instance"), dict) else {}
            img = manifest["image"]
            meta = {"id": backup_id, "kind": manifest["kind"], "instance": _s(inst.get("name")),
                    "instance_id": _s(inst.get("id")), "instance_state": _s(inst.get("state")),
                    "consistency": _s(manifest.get("consistency")), "image": _s(img.get("id")),
                    "image_name": _s(img.get("name")), "host": _s(manifest.get("host")),
                    "created_at": manifest.get("created_at") if isinstance(manifest.get("created_at"), (int, float))
                    else time.time(), "uploaded_at": time.time(),
                    "data_bytes": sum(m["size"] for m in manifest["members"])}
            meta = _public(store.write(backup_id, artifacts.ArtifactStream(manifest, files), meta))
        except BaseException:
            self._discard(backup_id)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.db.execute("DELETE FROM backups WHERE id=?", (backup_id,))
        self._event(meta, "uploaded")
        return meta

    # -- restore --
    def restore(self, backup_id: str, req: models.BackupRestore) -> dict:
        """Create instance ``req.name`` from a backup in an operation (202): 404 for an unknown
        backup, 409 for a name in use now; in the operation, 422 for an artifact that fails its
        checks (before anything is made)."""
        store, meta = self._find(backup_id)
        if self.root.records.find_name(req.name) is not None:
            raise Conflict(f"an instance named {req.name!r} exists: pick another name or delete it")
        if req.pool is not None and req.pool not in self.root.config.pools:
            raise NotFound(f"pool {req.pool!r} not found; pools: {', '.join(sorted(self.root.config.pools))}")
        self.root.host.refuse_if_draining(f"new instance {req.name!r}")

        def work(op):
            staging = self._staging()
            try:
                return self._restore(op, store, meta, req, staging)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

        return self.root.operations.submit("backup.restore", None, work)

    def _restore(self, op, store, meta: dict, req: models.BackupRestore, staging: str) -> dict:
        op.phase("download", bytes_total=meta.get("size"))
        f, _ = store.open(meta["id"])
        with f:
            manifest = artifacts.unpack(f, staging, limit=MAX_BACKUP_BYTES, sha256=meta.get("sha256"))
        files = {m["role"]: os.path.join(staging, m["name"]) for m in manifest["members"] if m["role"] != "volume"}
        vmembers = [m for m in manifest["members"] if m["role"] == "volume"]
        data = "disk" if manifest["kind"] == "vm" else "rootfs"
        if set(files) != {"image", data} or len(manifest["members"]) != 2 + len(vmembers):
            raise Unprocessable(f"a {manifest['kind']} backup holds an image and a {data} member (and volumes), "
                                f"not {', '.join(sorted(m['role'] for m in manifest['members']))}")
        vols = self._check_volumes(manifest["kind"], vmembers, staging)
        spec = {k: v for k, v in manifest["spec"].items() if k not in SPEC_DROPPED and k != "security_groups"}
        known = {g["name"] for g in self.root.secgroups.list()}  # another host's groups may not exist here
        groups = [g for g in manifest["spec"].get("security_groups") or [] if isinstance(g, str) and g in known]
        want = manifest["image"]
        if not isinstance(want.get("id"), str) or not re.fullmatch(r"[0-9a-f]{64}", want["id"]) \
                or want.get("format") not in ("qcow2", "raw", "oci"):
            raise Unprocessable("the backup's image needs an id (64 hex digits) and a format")
        body = {**spec, "name": req.name, "kind": manifest["kind"], "image": want["id"], "start": req.start}
        if req.pool:
            body["pool"] = req.pool
        if groups:
            body["security_groups"] = groups
        try:
            create = models.InstanceCreate.model_validate(body)
        except Exception as e:  # pydantic.ValidationError: the backed-up request is not one this agent takes
            raise Unprocessable(f"the backup's instance spec is not valid here: {str(e)[:400]}") from None
        layer = True
        if data == "disk":  # before anything is made: the layer names no file but the image
            layer = self._check_layer(files["disk"], SimpleNamespace(id=want["id"], format=want["format"]))
        owners = self._owners(manifest, create) if data == "rootfs" else None
        op.phase("image")
        img, imported = self._image(want, files["image"])
        restore_id = uuid.uuid4().hex
        self.db.execute("INSERT INTO backups (id, pool, instance_id, state, snapshot, created_at, volumes) "
                        "VALUES (?, ?, NULL, 'restoring', NULL, ?, '[]')", (restore_id, store.pool, time.time()))
        try:
            if vols:
                op.phase("volumes")
                mounts = self._make_volumes(restore_id, vols, req.name, req.pool or self.root.config.default_pool,
                                            manifest["kind"], owners, staging, op.phase)
                create = create.model_copy(update={"volumes": mounts})
            image, pool = self.root.instances.check_create(create)
            inst_id, extra = self.root.instances.reserve(create, image, pool)
        except BaseException:
            self._discard(restore_id)
            if imported:  # nothing refers to it yet
                self.root.store.delete(img.id)
            raise

        def fill(target) -> None:
            if data == "disk":  # target: the new VM's root volume
                self._fill_disk(pool, target, files["disk"], layer, image, files["image"])
                return
            from agent.migration.transfer import untar_into  # target: the new container's layers
            try:
                with open(files["rootfs"], "rb") as tar:
                    untar_into(target.upperdir, tar, owners=owners)
            except InvalidInput as e:
                raise Unprocessable(f"the backup's rootfs is refused: {e.message}") from None

        try:
            result = self.root.instances.build(op, inst_id, create, image, pool, extra, fill=fill)
        except BaseException:
            self._discard(restore_id)  # its volumes, free again once the instance is gone
            raise
        self.db.execute("DELETE FROM backups WHERE id=?", (restore_id,))
        self._event({**_public(meta)}, "restored", restored_as=result["instance"]["name"],
                    restored_id=result["instance"]["id"])
        return {**result, "backup": _public(meta)}

    def _check_volumes(self, kind: str, members: list[dict], staging: str) -> list[dict]:
        """The backup's volumes as a restore makes them, checked before anything is made:
        [{name, size_bytes, mount: VolumeMountSpec fields, file}]. Unprocessable for an
        attachment this host would not take (a target or path malformed or given twice, a size
        out of bounds) and for a VM volume that is not a plain standalone qcow2 (a backing or
        data file, encryption) or larger than its volume."""
        from storage import qemu_img
        from storage.images import check_disk_layer
        out = []
        for m in members:
            v = m.get("volume")
            if not isinstance(v, dict):
                raise Unprocessable(f"backup member {m['name']}: a volume member needs its volume's description")
            size = v.get("size_bytes")
            if type(size) is not int or not models.MIN_VOLUME_MIB << 20 <= size <= models.MAX_VOLUME_MIB << 20:
                raise Unprocessable(f"backup member {m['name']}: volume size_bytes must be an integer from "
                                    f"{models.MIN_VOLUME_MIB} MiB to {models.MAX_VOLUME_MIB} MiB")
            where = {"target": v.get("target")} if kind == "vm" else {"path": v.get("path")}
            try:
                spec = models.VolumeMountSpec.model_validate(
                    {"volume": "restored", "readonly": v.get("readonly", False), **where})
            except Exception as e:  # pydantic.ValidationError
                raise Unprocessable(f"backup member {m['name']}: its attachment is not valid here: "
                                    f"{str(e)[:300]}") from None
            if (spec.target if kind == "vm" else spec.path) is None:
                raise Unprocessable(f"backup member {m['name']}: a {kind} volume needs its "
                                    f"{'target' if kind == 'vm' else 'path'}")
            file = os.path.join(staging, m["name"])
            if kind == "vm":
                try:
                    info = qemu_img.info(file, format="qcow2")
                    check_disk_layer(info, SimpleNamespace(id="-", format="qcow2"), None)
                    qemu_img.check(file, format="qcow2")  # only now: no backing file it could open
                except InvalidInput as e:
                    raise Unprocessable(f"the backup's volume {m['name']} is refused: {e.message}") from None
                if not isinstance(info.get("virtual-size"), int) or info["virtual-size"] > size:
                    raise Unprocessable(f"the backup's volume {m['name']} holds {info.get('virtual-size')} bytes, "
                                        f"more than its volume's {size}")
            name = v.get("name")
            if not isinstance(name, str) or not re.fullmatch(models.NAME_PATTERN, name) \
                    or re.fullmatch(r"[0-9a-f]{32}", name):  # a name POST /v1/volumes would refuse
                name = f"vol{len(out)}"
            out.append({"name": name, "size_bytes": size, "mount": spec, "file": file})
        for key in ("target", "path"):
            given = [getattr(v["mount"], key) for v in out if getattr(v["mount"], key) is not None]
            if len(set(given)) != len(given):
                raise Unprocessable(f"the backup's volumes give a {key} twice")
        return out

    def _volume_name(self, old: str, inst_name: str) -> str:
        """The backed-up name if free here, else ``<instance>-<name>``, else that with -2, -3..."""
        vols = self.root.volumes
        if vols.name_free(old):
            return old
        stem = f"{inst_name}-{old}"[:63].rstrip("-")
        n = 1
        while True:
            name = stem if n == 1 else f"{stem[:63 - len(str(n)) - 1].rstrip('-')}-{n}"
            if vols.name_free(name) and not (len(name) == 32 and all(c in "0123456789abcdef" for c in name)):
                return name
            n += 1

    def _make_volumes(self, restore_id: str, vols: list[dict], inst_name: str, pool: str, kind: str, owners,
                      staging: str, phase) -> list:
        """Make the restore's volumes afresh and fill them (each id recorded in row ``restore_id``
        before it is made); the VolumeMountSpecs the instance is created with. On failure the
        caller discards the row, which removes them."""
        from storage import mounts
        made: list[str] = []
        out = []
        for i, v in enumerate(vols):
            vol_id = uuid.uuid4().hex
            made.append(vol_id)
            self.db.execute("UPDATE backups SET volumes=? WHERE id=?", (json.dumps(made), restore_id))
            size_mib = -(-v["size_bytes"] // (1 << 20))
            req = models.VolumeCreate(name=self._volume_name(v["name"], inst_name), size_mib=size_mib, pool=pool)
            self.root.volumes.create(req, vol_id=vol_id)
            phase("volume-data")
            made_vol = self.root.volumes.export_source(vol_id).volume
            path = made_vol.path
            backend = self.root.pools[pool]
            if kind == "vm" and not path and isinstance(backend, CopiesVolumeData):
                self.root.volumes.mark_guest_written(vol_id)
                backend.write_volume(made_vol.name, v["file"], src_format="qcow2")
            elif not path:
                raise Unsupported(f"pool {pool!r} gives volumes no host file: restore the backup onto a local "
                                  "pool")
            elif kind == "vm":
                from storage import qemu_img
                self.root.volumes.mark_guest_written(vol_id)
                qemu_img.run(["convert", "-q", "-n", "-f", "qcow2", "-O", "raw", v["file"], path])
            else:
                from agent.migration.transfer import untar_into
                point = os.path.join(staging, f"mnt-{i}")
                os.mkdir(point, 0o700)
                mounts.mount_fs_image(path, point)
                try:
                    with open(v["file"], "rb") as tar:
                        untar_into(point, tar, owners=owners)
                except InvalidInput as e:
                    raise Unprocessable(f"the backup's volume {v['name']!r} is refused: {e.message}") from None
                finally:
                    mounts.unmount(point)
                    os.rmdir(point)
            out.append(v["mount"].model_copy(update={"volume": vol_id}))
        return out

    def _drop_restored(self, row) -> None:
        """Remove the volumes an unfinished restore made, but those an instance holds (its
        restore finished before the agent was killed)."""
        from storage import mounts
        for vol_id in json.loads(row["volumes"] or "[]"):
            found = self.root.volumes.find_row_state(vol_id)
            if found is None:
                continue
            state, holder = found
            if holder is not None and self.root.records.find_id(holder) is not None:
                continue
            if state != "ready":
                continue  # a create a crash cut: the volume service's recover() removes it
            path = self.root.volumes.export_source(vol_id).volume.path
            if path:
                mounts.release_fs_image(path)  # a container volume being filled when the agent died
            self.root.volumes.delete(vol_id)

    def _image(self, want: dict, path: str):
        """The backup's image on this host: (the one it has, False), else (imported from the
        backup's copy, True), which must be that image (Unprocessable otherwise, the import
        undone; an image this host had already keeps it)."""
        store = self.root.store
        found = store.find(want["id"])
        if found is not None and found.id == want["id"]:
            return found, False
        name = want.get("name") if isinstance(want.get("name"), str) else None
        if not name or store.find(name) is not None:
            name = f"restored-{want['id'][:12]}"
        had = {i.id for i in store.list()}
        try:
            img = store.import_file(path, name=name)
        except InvalidInput as e:
            raise Unprocessable(f"the backup's image cannot be imported: {e.message}") from None
        if img.id != want["id"] or img.kind != want.get("kind", img.kind):
            if img.id not in had:
                store.delete(img.id)
            raise Unprocessable(f"the backup's image is {img.kind} {img.id[:12]}, its manifest says "
                                f"{want.get('kind')} {want['id'][:12]}")
        return img, True

    def _owners(self, manifest: dict, create: models.InstanceCreate):
        """The owner map of the backed-up upper dir's ids to this host's (as a migration's:
        agent.migration.transfer.shift_owners): from the map the container had there to the one
        it gets here (none for a privileged container)."""
        from agent.migration.transfer import shift_owners
        from containers.runtime import IdMap
        src = manifest.get("idmap")
        source = None
        if src is not None:
            if not (isinstance(src, dict) and set(src) == {"host_id", "size"}
                    and all(type(v) is int and 0 <= v < 2**32 for v in src.values())):
                raise Unprocessable("the backup's idmap is not {host_id, size} (ids below 2^32)")
            source = IdMap(src["host_id"], src["size"])
        here = None if getattr(create, "privileged", False) else self.root.runtime.idmap
        return shift_owners(source, here)

    @staticmethod
    def _check_layer(path: str, img) -> bool:
        """Unprocessable unless the disk member is a plain qcow2, standalone (a whole disk, as an
        RBD-backed VM's is copied) or a layer over ``img`` (no data file, no encryption, no other
        backing file): checked before anything is created. True for a layer."""
        from storage import qemu_img
        from storage.images import check_disk_layer
        try:
            info = qemu_img.info(path, format="qcow2")
            check_disk_layer(info, img, base="(this pool's copy)")  # only its presence matters here
        except InvalidInput as e:
            raise Unprocessable(f"the backup's disk is refused: {e.message}") from None
        return info.get("backing-filename") is not None

    def _fill_disk(self, pool: str, target: str, path: str, layer: bool, image, image_file: str) -> None:
        """Put the backed-up root disk ``path`` (checked: _check_layer) into the new VM's root
        volume ``target``: a layer onto a host file's overlay as a migration's (pointed at this
        pool's copy of the image); a whole disk written over it; into an RBD volume (a clone of
        the image) the whole disk, a layer read over the backup's own copy of the image."""
        from storage import qemu_img
        backend = self.root.pools[pool]
        vol = backend.get_volume(target)
        if vol.path and layer:
            with open(path, "rb") as f:
                self.root.store.receive_disk_layer(pool, target, f, image_ref=image.id)
        elif vol.path:
            qemu_img.run(["convert", "-q", "-n", "-f", "qcow2", "-O", vol.format, path, vol.path])
        elif isinstance(backend, CopiesVolumeData):
            if layer:  # unsafe: only the header's name changes, to the backup's copy (checked: its digest)
                qemu_img.rebase(path, image_file, backing_format=image.format, unsafe=True)
            backend.write_volume(target, path, src_format="qcow2")
        else:
            raise Unsupported(f"pool {pool!r} takes no disk data from a backup: restore onto a local or RBD pool")

    # -- recovery --
    def sweep(self) -> int:
        """At start: remove what backups and uploads a killed agent left unfinished (partial
        artifacts, multipart uploads, temporary VM snapshots, staging dirs)."""
        n = 0
        for r in self.db.query("SELECT id FROM backups ORDER BY created_at"):
            self._discard(r["id"])
            n += 1
        try:
            tmp = self.root.store.tmp_dir
            for name in os.listdir(tmp):
                if name.startswith(STAGING_PREFIX):
                    shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
        except (OSError, AgentError) as e:
            log.warning("cannot sweep backup staging dirs", extra={"error": str(e)})
        return n


def _tar(tree: str, dest: str, what: str) -> None:
    r = subprocess.run([*ROOTFS_TAR, "-f", dest, "-C", tree, "."], capture_output=True, text=True)
    if r.returncode != 0:
        raise CommandFailed(f"tar of {what} failed: {r.stderr.strip()[-500:]}",
                            argv=ROOTFS_TAR, returncode=r.returncode, stderr=r.stderr)


def _tar_volume(image: str, dest: str, point: str, what: str) -> None:
    """Tar the file tree of the ext4 volume file ``image``: from where it is mounted, else
    mounted read-only at ``point`` for the copy (the host mounts only filesystems it made)."""
    from storage import mounts
    where = mounts.fs_image_mounts(image)
    if where:
        _tar(where[0], dest, what)
        return
    os.mkdir(point, 0o700)
    mounts.mount_fs_image(image, point, readonly=True)
    try:
        _tar(point, dest, what)
    finally:
        mounts.unmount(point)
        os.rmdir(point)


def _s(v) -> str | None:
    return v[:256] if isinstance(v, str) else None


PUBLIC_KEYS = ("id", "pool", "kind", "instance", "instance_id", "instance_state", "consistency", "image",
               "image_name", "host", "created_at", "uploaded_at", "size", "sha256", "data_bytes")


def _public(meta: dict) -> dict:
    """A marker as the API shows it: known keys only (a marker in a shared bucket is input)."""
    return {k: meta.get(k) for k in PUBLIC_KEYS if k in meta}
