"""NBD exports through the API: volumes and VM images served to NBD clients (another host's
QEMU, qemu-img) by qemu-storage-daemon. storage.nbd.NbdExports owns the ``nbd_exports`` table
and the daemons; this module decides what may be exported and when.

Terms: an *export* hands out a disk: a volume (read-write or read-only) or a VM image's disk
file (read-only), named by the export's name, served on ``[nbd] host`` only (127.0.0.1 by
default) over TLS (``[nbd] tls``: a per-export PSK by default). Every route is admin-only;
the PSK is in the answer to the create and nowhere else (never listed, never in an event).

Rules, checked under the lock of the volume's instance (if attached), the volume's lock and
this service's lock, in that order:
- a volume attached to a running (or paused) instance is exported read-only only, and only a
  raw one (read while the guest or container writes it: a crash-consistent view); read-write
  is 409, as is a read-only export of a qcow2 disk in use;
- a source with a read-write export has no other export, and a read-write export needs a
  source nobody else exports: 409 otherwise;
- while a volume has a read-write export its instance does not start (409,
  check_startable) and it is not attached (409, check_attachable);
- a volume or image with an export is not deleted (409, check_unused).

Lifecycle: absent -> create() (the daemon listens, the record is written) -> delete().
Exports outlive the agent (their daemons run in sessions of their own): recover() at start
adopts live daemons, starts again those a host reboot ended (same name, port where free, and
PSK), moves any that listen off the configured address back onto it, and drops exports whose
source is gone. Each create, delete and re-start is an ``export`` event {name, change:
created|deleted|restarted, volume?, image?, readonly}.
"""
from __future__ import annotations

import logging
import threading
from contextlib import ExitStack

from agent import models
from agent.errors import AgentError, Conflict, NotFound, Unprocessable

log = logging.getLogger(__name__)

RUNNING = ("running", "paused")
BUSY_STATES = ("creating", "incoming", "migrating", "deleting", "error")
VOLUME, IMAGE = "volume", "image"  # the kinds of source, recorded as "<kind>:<id>"


class ExportService:
    def __init__(self, root):
        self.root = root
        self._nbd = None
        self.lock = threading.RLock()

    @property
    def nbd(self):
        """The host's NbdExports (built on first use: it creates its table)."""
        with self.lock:
            if self._nbd is None:
                from storage.nbd import NbdExports
                nc = self.root.config.nbd
                run_dir = self.root.config.state_path / "nbd"
                run_dir.mkdir(mode=0o700, exist_ok=True)
                self._nbd = NbdExports(self.root.db, str(run_dir), host=nc.host, tls=nc.tls,
                                       x509_dir=nc.x509_dir)
            return self._nbd

    # -- reads --
    def list(self) -> list[dict]:
        return [self._render(e) for e in self.nbd.list()]

    def get(self, name: str) -> dict:
        return self._render(self.nbd.get(name))

    @staticmethod
    def _render(e) -> dict:
        kind, _, ref = e.source.partition(":")
        return {"name": e.name, "uri": e.uri, "host": e.host, "port": e.port, "readonly": e.readonly,
                "tls": e.tls, "volume": ref if kind == VOLUME else None, "image": ref if kind == IMAGE else None,
                "format": "raw", "created_at": e.created_at}

    def _of(self, kind: str, ref_id: str) -> list:
        return [e for e in self.nbd.list() if e.source == f"{kind}:{ref_id}"]

    # -- create, delete --
    def create(self, req: models.ExportCreate) -> dict:
        """Export a volume or a VM image (see the module's rules). Conflict if the name is
        taken or the rules forbid it; Unprocessable for what cannot be exported (a
        container image, an image with no host file). On failure nothing is left."""
        if req.image is not None:
            return self._create_image(req)
        src = self.root.volumes.export_source(req.volume)
        name = req.name or src.name
        with ExitStack() as locks:
            if src.instance is not None:
                locks.enter_context(self.root.instances.lock(src.instance.id))
            locks.enter_context(self.root.volumes.lock(src.id))
            locks.enter_context(self.lock)
            src = self.root.volumes.export_source(src.id)  # again, under the locks
            if src.instance is not None:
                self._check_in_use(src, req.readonly)
            self._check_shared(VOLUME, src.id, src.name, req.readonly)
            e = self.nbd.create(name, src.volume, readonly=req.readonly, source=f"{VOLUME}:{src.id}")
        return self._created(e)

    def _create_image(self, req: models.ExportCreate) -> dict:
        from storage.backend import Volume
        img = self.root.store.get(req.image)
        if img.kind != "vm":
            raise Unprocessable(f"image {img.id[:12]} is a container image: only VM images (a disk file) and "
                                "volumes are exported over NBD")
        backend = self.root.pools.get(img.pool)
        path = backend.blob_path(img.digest) if backend is not None else None
        if path is None:
            raise Unprocessable(f"image {img.id[:12]} is kept in pool {img.pool!r}, which has no host file to "
                                "serve: NBD exports serve images held in a local pool")
        name = req.name or f"image-{img.id[:12]}"
        vol = Volume(name=f"image-{img.id[:12]}", pool=img.pool, format=img.format,
                     size=img.virtual_size or img.size, path=path)
        with self.lock:
            if self.root.store.find(img.id) is None:
                raise NotFound(f"image {req.image!r} not found")
            self._check_shared(IMAGE, img.id, img.id[:12], True)
            e = self.nbd.create(name, vol, readonly=True, source=f"{IMAGE}:{img.id}")
        return self._created(e)

    def _created(self, e) -> dict:
        out = self._render(e)
        out["psk"] = {"identity": e.name, "key": self.nbd.psk(e.name)} if e.tls == "psk" else None
        self._event(e, "created")
        return out

    def _check_in_use(self, src, readonly: bool) -> None:
        inst = self.root.instances.get(src.instance.id)
        if inst.state in BUSY_STATES:
            raise Conflict(f"volume {src.name!r} is attached to instance {inst.name!r}, which is {inst.state}: "
                           "export it once that is over")
        if not self._running(inst):
            return
        if not readonly:
            raise Conflict(f"volume {src.name!r} is attached to {inst.kind} {inst.name!r}, which is running: a "
                           "second writer would corrupt it; export it read-only, or stop the instance first")
        if src.volume.format != "raw":
            raise Conflict(f"volume {src.name!r} ({src.volume.format}) is in use by running {inst.kind} "
                           f"{inst.name!r}: only a raw disk can be read while it is written; stop the instance")

    def _check_shared(self, kind: str, ref_id: str, label: str, readonly: bool) -> None:
        others = self._of(kind, ref_id)
        writer = next((e for e in others if not e.readonly), None)
        if writer is not None:
            raise Conflict(f"{kind} {label!r} has a read-write export {writer.name!r}: it is exported to no one "
                           "else while it is; delete that export first")
        if others and not readonly:
            raise Conflict(f"{kind} {label!r} is exported already ({', '.join(e.name for e in others)}): a "
                           "read-write export needs it alone; export it read-only or delete those")

    def _running(self, inst) -> bool:
        comp = self.root.driver if inst.kind == "vm" else self.root.runtime
        info = comp.find(inst.name)
        return info is not None and info.state in RUNNING

    def delete(self, name: str) -> bool:
        """Stop the export's daemon and forget it; NotFound if there is none."""
        with self.lock:
            e = self.nbd.get(name)
            self.nbd.delete(name)
        self._event(e, "deleted")
        return True

    # -- the other services ask --
    def check_unused(self, kind: str, ref_id: str, label: str) -> None:
        """Conflict if volume or image ``ref_id`` has an export (call under its lock)."""
        with self.lock:
            names = [e.name for e in self._of(kind, ref_id)]
        if names:
            raise Conflict(f"{kind} {label!r} is exported over NBD ({', '.join(names)}): delete the export first "
                           "(DELETE /v1/exports/NAME)")

    def check_attachable(self, vol_id: str, label: str) -> None:
        """Conflict if the volume has a read-write export: an instance would be its second
        writer (or, read-only, would read a filesystem changing under it)."""
        with self.lock:
            writer = next((e for e in self._of(VOLUME, vol_id) if not e.readonly), None)
        if writer is not None:
            raise Conflict(f"volume {label!r} has a read-write NBD export {writer.name!r}: an instance would be "
                           "its second writer; delete the export first")

    def check_startable(self, inst) -> None:
        """Conflict if a volume attached to ``inst`` has a read-write export."""
        for v in self.root.volumes.of_instance(inst.id):
            with self.lock:
                writer = next((e for e in self._of(VOLUME, v["id"]) if not e.readonly), None)
            if writer is not None:
                raise Conflict(f"volume {v['name']!r} of {inst.name!r} has a read-write NBD export "
                               f"{writer.name!r}: the instance would be its second writer; delete the export "
                               "first")

    # -- recovery --
    def recover(self) -> dict:
        """At the agent's start: adopt exports whose daemon runs on the configured address,
        start again those that do not (a host reboot, a changed [nbd] host), and drop those
        whose volume or image is gone. One that cannot be served is logged and kept."""
        out: dict = {"adopted": [], "restarted": [], "dropped": []}
        for e in self.nbd.list():
            try:
                vol = self._source_volume(e)
                if vol is None:
                    self.nbd.delete(e.name)
                    out["dropped"].append(e.name)
                    self._event(e, "deleted")
                    continue
                e2, started = self.nbd.revive(e.name, vol)
            except AgentError as err:
                log.warning("cannot serve an NBD export again", extra={"export": e.name, "error": err.message})
                continue
            out["restarted" if started else "adopted"].append(e.name)
            if started:
                self._event(e2, "restarted")
        return out

    def _source_volume(self, e):
        """The storage Volume export ``e`` serves, or None if its source is gone."""
        from storage.backend import Volume
        kind, _, ref = e.source.partition(":")
        if kind == VOLUME:
            try:
                return self.root.volumes.export_source(ref).volume
            except NotFound:
                return None
        if kind == IMAGE:
            img = self.root.store.find(ref)
            backend = self.root.pools.get(img.pool) if img is not None else None
            path = backend.blob_path(img.digest) if backend is not None else None
            if path is None:
                return None
            return Volume(name=e.volume, pool=img.pool, format=img.format, size=img.virtual_size or img.size,
                          path=path)
        return None  # made outside the API: not this service's to keep

    def _event(self, e, change: str) -> None:
        kind, _, ref = e.source.partition(":")
        self.root.events.publish("export", {"name": e.name, "change": change, "readonly": e.readonly,
                                            "uri": e.uri, **({kind: ref} if ref else {})})
