"""/v1/backups and /v1/instances/{id}/backups: back an instance up into a pool (202 op), list,
show, delete, download (streamed), upload (streamed body), restore as a new instance (202 op).
Files are the client's: no host path is ever taken from a request."""
from flask import Blueprint, Response, request

from agent import models
from agent.api import parse, path_id, render, route, services

bp = Blueprint("backups", __name__)
BACKUP = {"id": models.BackupId}
POOL_QUERY = {"name": "pool", "required": False,
              "schema": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": models.POOL_NAME_PATTERN},
              "description": "a pool that keeps backups"}
MAX_UPLOAD_BYTES = 1 << 50  # no cap here: the staging dir's and the pool's space are the limits


def _id(value: str) -> str:
    return models.check(models.BackupId, value, "backup id")


def _pool() -> str | None:
    pool = request.args.get("pool")
    return None if pool is None else models.check(models.PoolName, pool, "pool")


@route(bp, "POST", "/v1/instances/{id}/backups",
       summary="Back an instance up {pool?} into an object or local pool: its disk (a running VM: "
               "crash-consistent; on an RBD pool, from an RBD snapshot), its attached volumes (read at the "
               "same instant: a running VM with volumes is paused for their snapshot or copy) and its image, "
               "as one checksummed artifact",
       body=models.BackupCreate, responses={202: models.Operation, 404: None, 409: None, 422: None})
def create_backup(id):
    return render(services().backups.create(path_id(id), parse(models.BackupCreate)), 202)


@route(bp, "GET", "/v1/backups", summary="Backups in every pool that keeps them (another host's, in a shared "
       "bucket, too)", responses={200: models.BackupList, 400: None, 404: None}, query=[POOL_QUERY])
def list_backups():
    return render({"backups": services().backups.list(_pool())})


@route(bp, "GET", "/v1/backups/{id}", summary="One backup",
       responses={200: models.Backup, 400: None, 404: None}, path_types=BACKUP)
def get_backup(id):
    return render(services().backups.get(_id(id)))


@route(bp, "DELETE", "/v1/backups/{id}", summary="Delete a backup",
       responses={200: models.Deleted, 400: None}, path_types=BACKUP)
def delete_backup(id):
    return render({"deleted": services().backups.delete(_id(id))})


@route(bp, "GET", "/v1/backups/{id}/content", summary="Download a backup's artifact (a tar, streamed; "
       "X-Nodeagent-Sha256 is its sha256)", responses={200: "application/octet-stream", 400: None, 404: None},
       path_types=BACKUP, auth="admin", long=True)
def backup_content(id):
    f, size, meta = services().backups.open(_id(id))

    def body():
        with f:
            while chunk := f.read(1 << 20):
                yield chunk

    headers = {"Content-Length": str(size), "X-Nodeagent-Sha256": meta.get("sha256") or "",
               "Content-Disposition": f'attachment; filename="backup-{meta["id"]}.tar"'}
    return Response(body(), mimetype="application/x-tar", headers=headers, direct_passthrough=True)


@route(bp, "POST", "/v1/backups", summary="Upload a backup's artifact (the body, streamed) into a pool: every "
       "checksum is checked first (422 and nothing kept if one fails)",
       body="application/octet-stream", responses={201: models.Backup, 400: None, 404: None, 422: None},
       query=[POOL_QUERY], long=True)
def upload_backup():
    request.max_content_length = MAX_UPLOAD_BYTES
    return render(services().backups.upload(request.stream, _pool()), 201)


@route(bp, "POST", "/v1/backups/{id}/restore",
       summary="Restore a backup as a new instance {name, pool?, start?} (its own id and address) with "
               "fresh volumes attached where the backed-up ones were (named as they were if free here, else "
               "<name>-<volume>); every checksum and every volume member is checked before anything is made",
       body=models.BackupRestore, responses={202: models.Operation, 400: None, 404: None, 409: None, 422: None},
       path_types=BACKUP)
def restore_backup(id):
    return render(services().backups.restore(_id(id), parse(models.BackupRestore)), 202)
