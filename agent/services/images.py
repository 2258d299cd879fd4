"""Image import (file | url | registry | s3), list, get, delete: thin wrapper over storage.ImageStore."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time

from agent.errors import NotFound, Unprocessable
from agent import models
from storage.registry import pull_to_layout
from storage.sources import check_import_path, tree_bytes

log = logging.getLogger(__name__)


def image_dict(image) -> dict:
    d = dataclasses.asdict(image)
    d["layers"] = list(d.get("layers") or ())
    d["config"] = dict(d.get("config") or {})
    return d


class ImageService:
    def __init__(self, root):
        self.root = root
        self._pulls_live: set[str] = set()  # pull dirs imports are using now
        self._gc_lock = threading.Lock()  # one gc at a time (periodic or asked for)
        self._gc_stop = threading.Event()
        self._gc_thread: threading.Thread | None = None
        self.started_at = time.time()

    def list(self) -> list[dict]:
        return [image_dict(i) for i in self.root.store.list()]

    def get(self, ref: str) -> dict:
        return image_dict(self.root.store.get(ref))

    def delete(self, ref: str) -> bool:
        img = self.root.store.get(ref)  # NotFound first: a DELETE of an unknown image is a 404
        with self.root.exports.lock:  # no export of it is made meanwhile
            self.root.exports.check_unused("image", img.id, img.id[:12])
            return self.root.store.delete(ref)

    def create(self, req: models.ImageImport) -> dict:
        """Validate what can be checked now (pool, source path), then import in an operation."""
        src = req.source
        pools = self.root.config.pools
        if src.type == "s3":
            if src.pool not in pools:
                raise NotFound(f"source.pool {src.pool!r} not found; configured pools: {', '.join(sorted(pools))}")
            if pools[src.pool].kind != "object":
                raise Unprocessable(f"source.pool {src.pool!r} is a {pools[src.pool].kind} pool; "
                                    "an s3 source names an object pool")
        by_digest = src.type == "s3" and src.digest is not None
        pool = req.pool or (src.pool if by_digest else self.root.config.default_pool)
        if pool not in pools:
            raise NotFound(f"pool {pool!r} not found; configured pools: {', '.join(sorted(pools))}")
        total = None
        path = None
        if src.type == "file":
            if not os.path.isabs(src.path):
                raise Unprocessable(f"source.path {src.path!r} must be an absolute path on the agent's host")
            # the real path (symlinks resolved) is what gets imported: it was checked
            path = check_import_path(src.path, self.root.config.import_dirs)
            if not os.path.exists(path):
                raise NotFound(f"source.path {src.path} does not exist on the agent's host")
            total = os.path.getsize(path) if os.path.isfile(path) else None
        store = self.root.store
        cfg = self.root.config.images

        def work(op):
            progress = lambda done: op.bytes(done, total)  # noqa: E731
            if src.type == "file":
                op.phase("import", bytes_total=total)
                if os.path.isdir(path) or (req.format == "oci"):
                    image = store.import_oci(path, name=req.name, pool=pool, progress=progress)
                else:
                    image = store.import_file(path, name=req.name, pool=pool, format=req.format,
                                              progress=progress)
            elif src.type == "url":
                op.phase("download")
                image = store.import_url(src.url, name=req.name, pool=pool, format=req.format,
                                         sha256=src.sha256, progress=progress, cancel=op.cancelled)
            elif src.type == "s3" and src.key is not None:
                op.phase("download")
                image = store.import_object(src.pool, src.key, name=req.name, pool=pool, format=req.format,
                                            sha256=src.sha256, progress=progress, cancel=op.cancelled)
            elif src.type == "s3":
                op.phase("import")
                image = store.import_digest(src.pool, src.digest, name=req.name, format=req.format,
                                            progress=progress)
                if pool != src.pool:
                    op.phase("copy")
                    image = store.copy_to_pool(image.id, pool)
            else:  # registry
                op.phase("pull")
                tmp = tempfile.mkdtemp(prefix="pull-", dir=self._tmp_dir())
                self._pulls_live.add(os.path.basename(tmp))
                try:
                    pull_to_layout(src.reference, os.path.join(tmp, "layout"), tls_verify=src.tls_verify,
                                   policy=self.root.address_policy, cancel=op.cancelled,
                                   stall_timeout=cfg.stall_timeout,
                                   cap=store.source_cap(pool, tmp))
                    op.phase("import")
                    image = store.import_oci(os.path.join(tmp, "layout"), name=req.name, pool=pool,
                                             progress=progress)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                    self._pulls_live.discard(os.path.basename(tmp))
            return {"image": image_dict(image)}

        return self.root.operations.submit("image.import", req.name, work)

    def _tmp_dir(self) -> str:
        d = self.root.config.state_path / "cache" / "pulls"
        d.mkdir(parents=True, exist_ok=True)
        return str(d)

    # -- garbage collection --
    def gc(self) -> dict:
        """Free what no image uses (store.gc) and every temp area's leftovers: the pulls
        cache (pull dirs no import is using that predate this agent or are over an hour
        old), the store's temp files, each pool's temp files. Returns what was freed."""
        with self._gc_lock:
            out = self.root.store.gc()
            now, pulls = time.time(), self.root.config.state_path / "cache" / "pulls"
            removed = 0
            if pulls.is_dir():
                for e in os.scandir(pulls):
                    if e.name in self._pulls_live:
                        continue
                    try:
                        mtime = e.stat(follow_symlinks=False).st_mtime
                    except FileNotFoundError:
                        continue
                    if mtime < self.started_at or now - mtime > STALE_PULL_SECONDS:
                        out["bytes_freed"] += tree_bytes(e.path)
                        shutil.rmtree(e.path, ignore_errors=True)
                        removed += 1
            out["temp_files_removed"] = out.get("temp_files_removed", 0) + removed
            return out

    def start_gc(self) -> dict:
        """POST /v1/images/gc: gc in an operation; its result says what was freed."""
        return self.root.operations.submit("image.gc", None, lambda op: (op.phase("gc"), self.gc())[1])

    def start_periodic_gc(self) -> None:
        """Run gc now (a killed agent's temp files go at once) and every [images] gc_interval
        seconds (0: only this first run), in a thread, until stop_periodic_gc()."""
        if self._gc_thread is not None:
            return
        self._gc_stop.clear()
        self._gc_thread = threading.Thread(target=self._gc_loop, name="image-gc", daemon=True)
        self._gc_thread.start()

    def stop_periodic_gc(self) -> None:
        self._gc_stop.set()
        self._gc_thread = None

    def _gc_loop(self) -> None:
        interval = self.root.config.images.gc_interval
        while True:
            try:
                freed = self.gc()
                log.info("image store garbage-collected", extra=freed)
            except Exception as e:  # a broken pool must not end the loop
                log.warning("image gc failed", extra={"error": str(e)})
            if not interval or self._gc_stop.wait(interval):
                return



STALE_PULL_SECONDS = 3600  # a pull dir no import of this agent uses and older than this is lost

