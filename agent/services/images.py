"""Image import (file | url | registry | s3), list, get, delete: thin wrapper over storage.ImageStore."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile

from agent.errors import NotFound, Unprocessable
from agent import models
from storage.registry import pull_to_layout

log = logging.getLogger(__name__)


def image_dict(image) -> dict:
    d = dataclasses.asdict(image)
    d["layers"] = list(d.get("layers") or ())
    d["config"] = dict(d.get("config") or {})
    return d


class ImageService:
    def __init__(self, root):
        self.root = root

    def list(self) -> list[dict]:
        return [image_dict(i) for i in self.root.store.list()]

    def get(self, ref: str) -> dict:
        return image_dict(self.root.store.get(ref))

    def delete(self, ref: str) -> bool:
        self.root.store.get(ref)  # NotFound first: a DELETE of an unknown image is a 404
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
        if src.type == "file":
            if not os.path.isabs(src.path):
                raise Unprocessable(f"source.path {src.path!r} must be an absolute path on the agent's host")
            if not os.path.exists(src.path):
                raise NotFound(f"source.path {src.path} does not exist on the agent's host")
            total = os.path.getsize(src.path) if os.path.isfile(src.path) else None
        store = self.root.store

        def work(op):
            progress = lambda done: op.bytes(done, total)  # noqa: E731
            if src.type == "file":
                op.phase("import", bytes_total=total)
                if os.path.isdir(src.path) or (req.format == "oci"):
                    image = store.import_oci(src.path, name=req.name, pool=pool, progress=progress)
                else:
                    image = store.import_file(src.path, name=req.name, pool=pool, format=req.format,
                                              progress=progress)
            elif src.type == "url":
                op.phase("download")
                image = store.import_url(src.url, name=req.name, pool=pool, format=req.format,
                                         sha256=src.sha256, progress=progress)
            elif src.type == "s3" and src.key is not None:
                op.phase("download")
                image = store.import_object(src.pool, src.key, name=req.name, pool=pool, format=req.format,
                                            sha256=src.sha256, progress=progress)
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
                try:
                    pull_to_layout(src.reference, os.path.join(tmp, "layout"), tls_verify=src.tls_verify)
                    op.phase("import")
                    image = store.import_oci(os.path.join(tmp, "layout"), name=req.name, pool=pool,
                                             progress=progress)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            return {"image": image_dict(image)}

        return self.root.operations.submit("image.import", req.name, work)

    def _tmp_dir(self) -> str:
        d = self.root.config.state_path / "cache" / "pulls"
        d.mkdir(parents=True, exist_ok=True)
        return str(d)

    def recover(self) -> None:
        """After a crash during an import: drop unreferenced blobs and pull leftovers."""
        shutil.rmtree(self.root.config.state_path / "cache" / "pulls", ignore_errors=True)
        try:
            freed = self.root.store.gc()
            log.info("image store garbage-collected after restart", extra=freed)
        except Exception as e:  # a broken pool must not keep the agent down
            log.warning("image gc after restart failed", extra={"error": str(e)})
