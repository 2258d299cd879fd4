"""The destination's side of a migration: the handlers a configured peer calls (prepare, take a
rootfs or a disk, finish, abort, fetch an image), and the cleanup after a restart."""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable

from agent import models
from agent.errors import Conflict, InsufficientResources, NotFound, Unprocessable, Unsupported
from agent.migration.common import INCOMING, LOCAL_POOL_KINDS, drop_unused_secrets, other_group_model
from agent.migration import transport
from agent.migration.peer import Peers
from agent.migration.transfer import IMAGE_CHUNK, prune_rootfs, shift_owners, untar_into, write_raw
from agent.services.instances import POSTCOPY_FAILED
from agent.services.records import Instance
from hypervisor.driver import SupportsCpuCheck, SupportsIncomingDisks, SupportsMigration
from storage.units import MiB

log = logging.getLogger(__name__)

ADOPTED_STATES = ("running", "paused", "stopped", "created")  # after finish: a repeated one gets the record
SPACE_HEADROOM = 64 * 1024 * 1024  # 64 MiB a local pool keeps free after taking an instance (qcow2
# metadata, what the guest writes during the copy): a destination below it refuses at prepare
IMAGE_DOWNLOAD_SLACK = 16 * MiB  # an OCI archive's tar headers and index over the image's declared size
IMAGE_DOWNLOAD_MAX = 1024**4  # what a source that declares no image size may send
LAYERS_FILE = "rootfs-layers.json"  # where a prepared container's layers are
SOURCE_FILE = "migration-source"  # the peer that prepared the instance (only it may go on)
SHARED_FILE = "shared-volumes.json"  # the adopted shared volumes (never deleted on abort)
SNAPSHOTS_FILE = "incoming-snapshots.json"  # the snapshots a stopped VM's disk layer brings


class MigrationDestination:
    """Receiving instances from peers. ``sending_to(peer)``: the instances this host is sending
    to that peer (the only images it exports to it)."""

    def __init__(self, root, peers: Peers, sending_to: Callable[[str], list[str]]):
        self.root, self.peers, self.sending_to = root, peers, sending_to

    @property
    def config(self):
        return self.root.config

    def prepare_incoming(self, caller: dict, req: models.IncomingMigration) -> models.IncomingPrepared:
        """Make what the VM needs here (image, volume, seed, row in state ``incoming``).
        On failure nothing is left."""
        source = self.peers.require(caller)
        inst = req.instance
        self.root.host.refuse_if_draining(f"incoming {inst.kind} {inst.name!r} from {source}")
        if req.guest_cpu and inst.kind == "vm":
            self._check_cpu(inst.name, req.guest_cpu)
        self._clear_stale(source, inst.id, inst.name)
        cfg = self.config
        if req.shared_volumes and inst.pool not in cfg.pools:
            raise Unprocessable(f"pool {inst.pool!r} is not configured here: shared storage needs "
                                f"[pools.{inst.pool}] naming the same Ceph pool on both hosts")
        pool = inst.pool if inst.pool in cfg.pools else cfg.default_pool
        self._check_volumes_free(pool, inst.volumes, shared=bool(req.shared_volumes))
        self._check_space(pool, req)
        image = self._ensure_image(source, req.image, req.image_bytes)
        groups = self.root.secgroups.adopt(req.security_groups)  # Conflict before anything is made
        now = time.time()
        spec = dict(req.spec.model_dump(), image_id=image.id)
        if not self.root.records.insert(Instance(
                id=inst.id, name=inst.name, kind=inst.kind, image=image.id, state=INCOMING, pool=pool, spec=spec,
                volumes=tuple(inst.volumes), mac=inst.mac, node=self.root.host.hostname(),
                created_at=now, updated_at=now)):
            raise Conflict(f"an instance named {inst.name!r} exists here: delete it or rename before "
                           "migrating")
        try:
            if groups:  # before its address is leased: the filter is rendered with them
                self.root.secgroups.join(inst.id, groups, apply=False)
            (self.root.instances.instance_dir(inst.id) / SOURCE_FILE).write_text(source)
            if req.snapshots:  # recorded at the define, once the disk that holds them is here
                (self.root.instances.instance_dir(inst.id) / SNAPSHOTS_FILE).write_text(
                    json.dumps([snap.model_dump() for snap in req.snapshots]))
            if req.attached_volumes:  # first: a taken name or a missing pool refuses before the disk is made
                self.root.volumes.incoming(inst.id, pool, req.attached_volumes, kind=inst.kind)
            if inst.kind == "container":
                return self._prepare_container(inst, image, pool, req.idmap)
            if req.shared_volumes:
                prepared = self._prepare_shared_vm(inst, spec, image, pool, req.shared_volumes)
            else:
                prepared = self._prepare_vm(inst, spec, image, pool, req.disk_size)
            # the volumes' files here: the source's domain XML is pointed at them, never at its own paths
            prepared.disk_sources.update(self.root.volumes.incoming_disks(inst.id))
            shared = self._shared_volume_attach(inst.id)
            if shared:
                prepared.disk_attach = {**(prepared.disk_attach or {}), **shared}
            return prepared
        except BaseException:
            self._destroy_incoming(inst.id)
            raise

    def _check_cpu(self, name: str, guest_cpu: str) -> None:
        """Unprocessable, before anything is made, when this host's CPU cannot run the guest's
        CPU model (libvirt's compareCPU; skipped under TCG: the driver answers None)."""
        driver = self.root.driver
        hc = self.config.hypervisor
        why = other_group_model(guest_cpu, hc.cpu_model, hc.cpu_group)
        if why:
            raise Unprocessable(f"{self.root.host.hostname()} does not take VM {name!r}: {why}; nothing moved")
        why = driver.cpu_unsupported(guest_cpu) if isinstance(driver, SupportsCpuCheck) else None
        if why:
            raise Unprocessable(f"{self.root.host.hostname()} cannot run VM {name!r}'s CPU: {why}; nothing moved: "
                                "migrate it to a host with a CPU at least as new, or restart it with a baseline "
                                "CPU model both hosts share")

    def _check_volumes_free(self, pool: str, volumes, shared: bool) -> None:
        """Conflict if an instance here has a volume of these names (a peer names the volumes it
        sends; a failed prepare removes them), or, unless shared, the pool holds one already."""
        backend = self.root.pools[pool]
        for other in self.root.records.list():
            taken = set(other.volumes) & set(volumes)
            if taken:
                raise Conflict(f"volume {sorted(taken)[0]!r} belongs to instance {other.name!r} here: "
                               "an incoming instance brings volumes of its own")
        for vol in volumes if not shared else ():
            if backend.find_volume(vol) is not None:
                raise Conflict(f"pool {pool!r} holds a volume {vol!r} already: an incoming instance "
                               "brings volumes of its own")

    def _check_space(self, pool: str, req: models.IncomingMigration) -> None:
        """InsufficientResources unless local pool ``pool`` can take the instance's data (its
        written disk or rootfs, and its image if missing here) and keep SPACE_HEADROOM free.
        Shared pools (block, object) take no copy and report their own full errors."""
        backend = self.root.pools[pool]
        if backend.kind != "local":
            return
        need = req.data_bytes or 0
        if req.image_bytes and self.root.store.find(req.image.id) is None:
            need += req.image_bytes * (2 if req.image.kind == "container" else 1)  # layers: blobs + unpacked
        free = backend.usage().available
        if free < need + SPACE_HEADROOM:
            raise InsufficientResources(
                f"pool {pool!r} on {self.root.host.hostname()} ({self.config.api.listen}) has "
                f"{free / MiB:.1f} MiB free; {req.instance.kind} {req.instance.name!r} needs {need / MiB:.1f} MiB "
                f"plus {SPACE_HEADROOM // MiB} MiB headroom: free space in that pool (or grow it), or migrate "
                "to another host")

    def _prepare_vm(self, inst, spec, image, pool, disk_size) -> models.IncomingPrepared:
        from agent.services.assembly import ROOT_TARGET, SEED_TARGET
        vol, seed = self.root.assembly.vm_disks(inst.id, inst.name, image.id, pool, inst.volumes[0],
                                                size=disk_size, user_data=spec.get("user_data"),
                                                ip=self._incoming_address(inst, spec))
        if not vol.path:
            raise Unsupported(f"pool {pool!r} gives no file path for disks; live migration with copied "
                              "storage needs a local pool")
        d = self.root.instances.instance_dir(inst.id)
        return models.IncomingPrepared(disk_sources={ROOT_TARGET: vol.path, SEED_TARGET: seed},
                                       console_log=str(d / "console.log"), migration_uri=self.migration_uri(),
                                       postcopy=self._postcopy_possible())

    def _incoming_address(self, inst, spec) -> str | None:
        """A bridged VM's address here: the one it had there if this host's network has it
        free, else a new one (its seed says so, for its next boot); recorded on its row."""
        if spec.get("network") != "bridge":
            return None
        ip = self.root.assembly.vm_address(inst.id, inst.ip)
        if ip:
            self.root.records.update(inst.id, ip=ip)
        return ip

    def _prepare_shared_vm(self, inst, spec, image, pool, shared: dict) -> models.IncomingPrepared:
        """Shared storage: adopt the volumes the source uses (the same RBD images: nothing is
        copied or cloned), write the seed, define the cephx secret; answer the same images."""
        from hypervisor.disks import disk_for_volume
        from agent.services.assembly import ROOT_TARGET, SEED_TARGET
        d = self.root.instances.instance_dir(inst.id)
        (d / SHARED_FILE).write_text(json.dumps(list(inst.volumes)))  # first: cleanup never deletes them
        backend = self.root.pools[pool]
        if backend.kind in LOCAL_POOL_KINDS or set(shared) != set(inst.volumes):
            raise Unprocessable(f"pool {pool!r} here is a {backend.kind} pool, not shared storage: "
                                f"[pools.{pool}] must name the same Ceph pool on both hosts")
        vol = self.root.store.adopt_volume(image.id, pool, inst.volumes[0])
        if vol.uri != shared[inst.volumes[0]]:
            raise Unprocessable(f"volume {vol.name} is {vol.uri} here but {shared[inst.volumes[0]]} on the "
                                f"source: [pools.{pool}] must name the same Ceph pool on both hosts")
        seed = self.root.assembly.vm_seed(inst.id, inst.name, user_data=spec.get("user_data"),
                                          ip=self._incoming_address(inst, spec))
        root = disk_for_volume(vol, ROOT_TARGET)
        if isinstance(self.root.driver, SupportsIncomingDisks):
            (root,) = self.root.driver.prepare_incoming_disks((root,))
        attach = {k: v for k, v in root.attach.items() if k in ("monitors", "config", "user", "secret_uuid")}
        return models.IncomingPrepared(disk_sources={ROOT_TARGET: vol.uri, SEED_TARGET: seed},
                                       disk_attach={ROOT_TARGET: models.RbdAttach.model_validate(attach, strict=False)},
                                       console_log=str(d / "console.log"), migration_uri=self.migration_uri(),
                                       postcopy=self._postcopy_possible())

    def _shared_volume_attach(self, inst_id: str) -> dict:
        """The incoming VM's adopted RBD volumes as this host attaches them (their cephx key a
        libvirt secret here): target -> RbdAttach, for the source's rewrite of its domain XML."""
        disks = self.root.volumes.incoming_shared(inst_id)
        if not disks:
            return {}
        if isinstance(self.root.driver, SupportsIncomingDisks):
            disks = self.root.driver.prepare_incoming_disks(disks)
        return {d.target: models.RbdAttach.model_validate(
                    {k: v for k, v in d.attach.items() if k in ("monitors", "config", "user", "secret_uuid")},
                    strict=False) for d in disks}

    def _destroy_incoming(self, inst_id: str) -> bool:
        """Remove a prepared incoming instance; adopted shared volumes are only forgotten
        (the source's guest still uses them), never deleted."""
        shared_file = self.config.state_path / "instances" / inst_id / SHARED_FILE
        try:
            shared = json.loads(shared_file.read_text())
        except (FileNotFoundError, ValueError):
            shared = None
        if shared is not None:
            inst = self.root.records.find_id(inst_id)
            if inst is not None:
                for vol in shared:
                    self.root.store.forget_volume(inst.pool, vol)
                self.root.records.update(inst_id, volumes=())
        shared_volumes = self.root.volumes.has_incoming_shared(inst_id)
        self.root.volumes.drop_incoming(inst_id)
        gone = self.root.instances.destroy(inst_id)
        if shared is not None or shared_volumes:
            drop_unused_secrets(self.root, inst_id)
        return gone

    def _prepare_container(self, inst, image, pool, idmap) -> models.IncomingPrepared:
        layers = self.root.store.prepare_rootfs(image.id, inst.volumes[0], pool=pool)
        d = self.root.instances.instance_dir(inst.id)
        (d / LAYERS_FILE).write_text(json.dumps({"lowerdirs": list(layers.lowerdirs),
                                                 "upperdir": layers.upperdir, "workdir": layers.workdir,
                                                 "source_idmap": idmap.model_dump() if idmap else None}))
        return models.IncomingPrepared(disk_sources={}, migration_uri="")

    def receive_rootfs(self, caller: dict, inst_id: str, stream) -> models.Received:
        """Unpack a tar stream of the container's upper dir (overlay whiteouts and xattrs
        kept) over what earlier syncs sent."""
        inst = self._incoming(inst_id, self.peers.require(caller))
        if inst.kind != "container":
            raise Unprocessable("only containers take a rootfs stream")
        layers = json.loads((self.config.state_path / "instances" / inst_id / LAYERS_FILE).read_text())
        from containers.runtime import IdMap
        src = layers.get("source_idmap")
        here = None if inst.spec_dict().get("privileged") else self.root.runtime.idmap
        try:
            return models.Received(bytes=untar_into(layers["upperdir"], stream,
                                                   owners=shift_owners(IdMap(**src) if src else None, here)))
        except InsufficientResources as e:
            raise InsufficientResources(f"pool {inst.pool!r} on {self.root.host.hostname()} "
                                        f"({self.config.api.listen}) is full: {e.message}") from None

    def receive_volume(self, caller: dict, inst_id: str, vol_id: str, stream) -> models.Received:
        """A container's volume: unpack a tar stream of its file tree into the fresh
        filesystem made for it at prepare (mounted here for the copy: the host mounts
        filesystems it made, never a peer's image; owners shifted as the rootfs's). A VM's
        volume (a stopped VM moved offline, or a read-only one the live copy skips): its raw
        bytes, exactly its size, written into the file made for it (never mounted here)."""
        from containers.runtime import IdMap
        from storage import mounts
        inst = self._incoming(inst_id, self.peers.require(caller))
        if inst.kind == "vm":
            path, size = self.root.volumes.incoming_file(inst_id, vol_id)
            if not path:
                raise Unprocessable(f"volume {vol_id[:12]} of {inst.name!r} is shared storage here (adopted): it "
                                    "takes no stream")
            try:
                return models.Received(bytes=write_raw(path, stream, size))
            except InsufficientResources as e:
                raise InsufficientResources(f"volume {vol_id[:12]} of {inst.name!r} does not fit here: "
                                            f"{e.message}") from None
        path, _ = self.root.volumes.incoming_file(inst_id, vol_id)
        d = self.root.instances.instance_dir(inst.id)
        layers = json.loads((d / LAYERS_FILE).read_text())
        src = layers.get("source_idmap")
        here = None if inst.spec_dict().get("privileged") else self.root.runtime.idmap
        point = d / f"volume-{vol_id[:12]}"
        point.mkdir(mode=0o700, exist_ok=True)
        if mounts.is_mounted(str(point)):
            raise Conflict(f"volume {vol_id[:12]} of {inst.name!r} is being received already")
        try:
            mounts.mount_fs_image(path, str(point))
            try:
                n = untar_into(str(point), stream, owners=shift_owners(IdMap(**src) if src else None, here))
            finally:
                mounts.unmount(str(point))
        except InsufficientResources as e:
            raise InsufficientResources(f"volume {vol_id[:12]} of {inst.name!r} is full here: {e.message}") from None
        finally:
            point.rmdir()
        return models.Received(bytes=n)

    def receive_disk(self, caller: dict, inst_id: str, stream) -> models.Received:
        """A stopped VM's root disk (its qcow2 layer, as the source holds it) replaces the
        prepared overlay, pointed at this pool's copy of the same base image (the store checks
        and writes it: ImageStore.receive_disk_layer)."""
        inst = self._incoming(inst_id, self.peers.require(caller))
        if inst.kind != "vm":
            raise Unprocessable("only VMs take a disk stream")
        try:
            return models.Received(bytes=self.root.store.receive_disk_layer(inst.pool, inst.volumes[0], stream,
                                                                            image_ref=inst.image))
        except InsufficientResources as e:
            raise InsufficientResources(f"pool {inst.pool!r} on {self.root.host.hostname()} "
                                        f"({self.config.api.listen}) is full: {e.message}") from None

    def _incoming_snapshots(self, inst: Instance, disk: str) -> list[dict]:
        """The snapshots the source declared for the stopped VM; Unprocessable unless the disk
        layer it sent holds each of them (a peer's word is checked against its data)."""
        from storage import qemu_img
        try:
            snaps = json.loads((self.root.instances.instance_dir(inst.id) / SNAPSHOTS_FILE).read_text())
        except FileNotFoundError:
            return []
        held = {s.get("name") for s in qemu_img.info(disk, format="qcow2").get("snapshots") or ()}
        missing = [s["name"] for s in snaps if s["name"] not in held]
        if missing:
            raise Unprocessable(f"VM {inst.name!r}'s disk arrived without its snapshot(s) {', '.join(missing)}: "
                                "refused; nothing was defined")
        return snaps

    def _define_stopped_vm(self, inst: Instance) -> dict:
        spec = {k: v for k, v in inst.spec_dict().items() if k != "image_id"}
        req = models.InstanceCreate.model_validate(spec)
        vol = self.root.pools[inst.pool].get_volume(inst.volumes[0])
        snaps = self._incoming_snapshots(inst, vol.path)
        seed = str(self.root.instances.instance_dir(inst.id) / "seed.iso")
        try:
            info = self.root.driver.define(self.root.assembly.vm_spec(
                inst.id, req, vol, seed, volumes=self.root.volumes.incoming_disk_specs(inst.id)))
        except BaseException:
            self.root.driver.delete(inst.name)
            raise
        self.root.volumes.finish_incoming(inst.id)
        self.root.snapshots.adopt(inst, snaps)
        return {"instance": self.root.records.update(inst.id, state=info.state, error=None).to_dict()}

    def _finish_container(self, inst: Instance, start: bool, keep) -> dict:
        from storage.images import RootfsLayers
        layers = json.loads((self.config.state_path / "instances" / inst.id / LAYERS_FILE).read_text())
        if keep is not None:
            prune_rootfs(layers["upperdir"], set(keep))
        spec = {k: v for k, v in inst.spec_dict().items() if k != "image_id"}
        req = models.InstanceCreate.model_validate(spec)
        image = self.root.store.get(inst.image)
        rl = RootfsLayers(tuple(layers["lowerdirs"]), layers["upperdir"], layers["workdir"], None)
        rt = self.root.runtime
        try:
            info = rt.create(self.root.assembly.container_spec(req, image, rl,
                                                               volumes=self.root.volumes.incoming_mounts(inst.id)))
            if start:
                info = rt.start(inst.name)
        except BaseException:
            rt.delete(inst.name)
            raise
        self.root.volumes.finish_incoming(inst.id)
        return {"instance": self.root.records.update(inst.id, state=info.state, ip=info.ip, error=None).to_dict()}

    def _postcopy_possible(self) -> bool:
        """Whether an incoming VM may arrive by post-copy (this host's QEMU needs userfaultfd)."""
        return isinstance(self.root.driver, SupportsMigration) and self.root.driver.postcopy_unavailable() is None

    def migration_uri(self) -> str:
        hc = self.config.hypervisor
        if hc.migration_uri:
            return hc.migration_uri
        host = self.config.api.listen.rpartition(":")[0]
        return f"{transport.scheme(self.config.migration)}://{host}/system"

    def _ensure_image(self, source: str, want: models.IncomingImage, declared: int | None):
        """This host's copy of image ``want``, pulled from ``source`` if missing: at most the
        size it declared, checked to BE that image (its digest) before anything is imported,
        then imported like any other image (backing and data files refused, layers unpacked
        safely)."""
        from storage import oci
        store = self.root.store
        img = store.find(want.id)
        if img is not None:
            return img
        peer = self.peers.get(source)
        cache = self.config.state_path / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".migration-image-", dir=cache)
        os.close(fd)
        limit = declared + max(declared // 100, IMAGE_DOWNLOAD_SLACK) if declared else IMAGE_DOWNLOAD_MAX
        try:
            got = peer.download_image(want.id, tmp, limit)
            if want.kind == "container":
                with oci.open_source(tmp) as src:
                    got = src.resolve(None).manifest_digest.removeprefix("sha256:")
            if got != want.id:
                raise Unprocessable(f"image {want.id[:12]} from {source} arrived as {got[:12]}: not the "
                                    "image asked for (corrupted in transfer?); nothing was imported")
            name = want.name if store.find(want.name) is None else f"{want.name}-{want.id[:12]}"
            if want.kind == "vm":
                img = store.import_file(tmp, name=name, format=want.format)
            else:
                img = store.import_oci(tmp, name=name)
        finally:
            os.unlink(tmp)
        return img

    def _clear_stale(self, source: str, inst_id: str, name: str) -> None:
        """A failed earlier attempt from ``source`` may have left an ``incoming`` row: remove it
        (never another peer's)."""
        found = (self.root.records.find_id(inst_id), self.root.records.find_name(name))
        for r in {i.id: i for i in found if i is not None}.values():
            if r.state == INCOMING and self._source_of(r.id) == source:
                with self.root.instances.lock(r.id):
                    self._destroy_incoming(r.id)

    def _source_of(self, inst_id: str) -> str | None:
        """The peer that prepared instance ``inst_id`` here; None for one made here."""
        try:
            return (self.config.state_path / "instances" / inst_id / SOURCE_FILE).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _from(self, inst_id: str, source: str) -> Instance:
        """The instance record ``inst_id`` (by id only) if ``source`` prepared it here; else
        NotFound: a peer sees and touches only what it sent."""
        inst = self.root.records.find_id(inst_id)
        if inst is None or inst.id != inst_id or self._source_of(inst_id) != source:
            raise NotFound(f"no instance {inst_id} came from {source!r} here")
        return inst

    def _incoming(self, inst_id: str, source: str) -> Instance:
        inst = self._from(inst_id, source)
        if inst.state != INCOMING:
            raise Conflict(f"instance {inst.name!r} is {inst.state}, not an incoming migration")
        return inst

    def finish_incoming(self, caller: dict, inst_id: str, resume: bool = True, start: bool = True,
                        keep=None, define: bool = False) -> dict:
        """VM: the guest runs here (``define``: a stopped VM, its disk sent: define it here,
        stopped); container: create (and start) it on the synced rootfs. The record becomes
        the instance's record. Idempotent: an instance this agent adopted already (an earlier
        finish whose answer was lost, or, for a running VM, a restart) is answered as is."""
        source = self.peers.require(caller)
        inst = self._from(inst_id, source)
        if inst.state in ADOPTED_STATES:
            return {"instance": inst.to_dict()}
        if not self._healed(inst):
            inst = self._incoming(inst_id, source)
        with self.root.instances.lock(inst_id):
            if inst.kind == "container":
                return self._finish_container(inst, start, keep)
            if define:
                return self._define_stopped_vm(inst)
            info = self.root.driver.get(inst.name)
            if info.state == "paused" and resume:
                info = self.root.driver.resume(inst.name)
            if info.state not in ("running", "paused"):
                raise Conflict(f"VM {inst.name!r} is {info.state} here: the migration did not complete")
            self._own_shared(inst_id)
            self.root.volumes.finish_incoming(inst_id)
            self.root.instances.reapply_bandwidth(inst)  # its taps here are new
            self.root.instances.sync_port(inst)  # and so are libvirt's names of them (vnetN)
            return {"instance": self.root.records.update(inst_id, state=info.state, error=None).to_dict()}

    def _healed(self, inst: Instance) -> bool:
        """Whether ``inst`` is the half of a VM split by a broken post-copy (state error since
        this agent's restart) whose copy was resumed and ended: it runs here whole now."""
        if inst.kind != "vm" or inst.state != "error":
            return False
        info = self.root.driver.find(inst.name)
        return info is not None and info.state == "running" and info.reason is None

    def _own_shared(self, inst_id: str) -> None:
        """The guest runs here: adopted shared volumes are ours like any other now."""
        (self.config.state_path / "instances" / inst_id / SHARED_FILE).unlink(missing_ok=True)

    def abort_incoming(self, caller: dict, inst_id: str) -> bool:
        """Remove what ``prepare_incoming`` made; False if there was nothing."""
        source = self.peers.require(caller)
        r = self.root.records.find_id(inst_id)
        if r is None:
            return False
        if self._source_of(inst_id) != source:
            raise Conflict(f"instance {inst_id} here did not come from {source!r}: only an incoming migration "
                           "is aborted, by the peer that sent it")
        if r.state != INCOMING:
            raise Conflict(f"instance {inst_id} is {r.state} here: only an incoming migration is aborted")
        with self.root.instances.lock(inst_id):
            return self._destroy_incoming(inst_id)

    def export_image(self, caller: dict, image_id: str):
        """(a generator of the image's bytes, size) for a peer that lacks it: only the image of
        an instance this host is migrating to that peer right now."""
        peer = self.peers.require(caller)
        if not any(self.root.instances.get(i).image == image_id for i in self.sending_to(peer)):
            raise NotFound(f"image {image_id[:12]} is not the image of an instance this host is migrating "
                           f"to {peer!r}")
        img = self.root.store.get(image_id)
        cache = self.config.state_path / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        tmp = str(cache / f".migration-export-{uuid.uuid4().hex}")
        self.root.store.export(img.id, tmp)
        size = os.path.getsize(tmp)
        f = open(tmp, "rb")
        os.unlink(tmp)  # the open file keeps the data until the stream ends

        def chunks():
            with f:
                while chunk := f.read(IMAGE_CHUNK):
                    yield chunk
        return chunks(), size

    def recover(self) -> int:
        """After a restart: an incoming VM that runs here is adopted (the source saw its
        migration succeed); any other incoming leftover is removed."""
        n = 0
        for r in self.root.records.list(states=(INCOMING,)):
            try:
                info = self.root.driver.find(r.name)
                if info is not None and info.reason == "postcopy-failed":
                    # it holds the newest half of a guest split by a broken post-copy: keep it
                    self.root.records.update(r.id, state="error", error=POSTCOPY_FAILED)
                elif info is not None and info.reason == "postcopy":
                    # still pulling its pages from the source (or stalled on a break its QEMU has
                    # not seen yet): neither adopted as running nor removed; the source's confirm
                    # adopts it, a later restart records what it became
                    log.warning("incoming VM still in post-copy: kept as incoming", extra={"instance": r.name})
                elif info is not None and info.state == "running":
                    self._own_shared(r.id)
                    self.root.volumes.finish_incoming(r.id)
                    self.root.records.update(r.id, state="running", error=None)
                else:
                    self._destroy_incoming(r.id)
                n += 1
            except Exception as e:  # keep the record: an operator must look
                log.warning("cannot clean up an incoming migration", extra={"instance": r.name,
                                                                           "error": str(e)})
        return n
