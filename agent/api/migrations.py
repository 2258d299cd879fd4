"""/v1/migrations: move an instance to a configured peer (202 + operation), follow it; and
the destination half peers call (prepare, finish, abort, image transfer; peers only)."""
from flask import Blueprint, Response, g, request

from agent import models
from agent.api import caller_is_admin, parse, path_id, render, route, services
from agent.errors import public_error

bp = Blueprint("migrations", __name__)
ROOTFS_STREAM_LIMIT = 1024**4  # 1 TiB: a container upper dir streamed by a peer
INCOMING_ID = {"id": models.InstanceId}  # a peer names an instance by the id its source gave it


def incoming_id(value: str) -> str:
    return models.check(models.InstanceId, value, "instance id")


@route(bp, "POST", "/v1/migrations", summary="Move an instance to a configured peer (202 + operation)",
       body=models.MigrationCreate, responses={202: models.Operation, 404: None, 409: None, 422: None})
def create_migration():
    return render(services().migrations.create(parse(models.MigrationCreate)), 202)


@route(bp, "GET", "/v1/migrations/{id}", summary="One migration: phase, bytes, downtime_ms, error",
       responses={200: models.Migration, 404: None})
def get_migration(id):
    mig = services().migrations.get(path_id(id))
    if mig.get("error") and not caller_is_admin():  # a reader: no host paths, argv or stderr
        mig = {**mig, "error": public_error(mig["error"], mig["operation"])}
    return render(mig)


@route(bp, "POST", "/v1/migrations/{id}/resume",
       summary="Resume a post-copy migration whose link broke (the guest split, paused) from where it stopped "
               "(202 + a new migration operation)",
       responses={202: models.Operation, 404: None, 409: None})
def resume_migration(id):
    return render(services().migrations.resume(path_id(id)), 202)


@route(bp, "POST", "/v1/peer/migrations", summary="Peers only: prepare to receive an instance",
       body=models.IncomingMigration, responses={200: models.IncomingPrepared, 403: None, 409: None, 422: None},
       auth="peer")
def prepare_incoming():
    services().migrations.require_peer(g.caller)  # first: a stranger learns nothing from validation
    return render(services().migrations.prepare_incoming(g.caller, parse(models.IncomingMigration)))


@route(bp, "POST", "/v1/peer/migrations/{id}/finish", summary="Peers only: the guest runs here; adopt it",
       body=models.IncomingFinish, path_types=INCOMING_ID,
       responses={200: models.InstanceResult, 403: None, 404: None, 409: None}, auth="peer")
def finish_incoming(id):
    services().migrations.require_peer(g.caller)
    req = parse(models.IncomingFinish)
    return render(services().migrations.finish_incoming(g.caller, incoming_id(id), resume=req.resume,
                                                        start=req.start, keep=req.keep, define=req.define))


@route(bp, "PUT", "/v1/peer/migrations/{id}/rootfs", summary="Peers only: a tar stream of a container's upper dir",
       path_types=INCOMING_ID,
       responses={200: models.Received, 400: None, 403: None, 404: None, 409: None, 422: None, 507: None},
       long=True, auth="peer")
def receive_rootfs(id):
    request.max_content_length = ROOTFS_STREAM_LIMIT  # the API's small-body cap is for JSON
    return render(services().migrations.receive_rootfs(g.caller, incoming_id(id), request.stream))


@route(bp, "PUT", "/v1/peer/migrations/{id}/volumes/{volume}",
       summary="Peers only: a migrating container's volume (a tar of its file tree) or VM's (its raw bytes)",
       path_types={**INCOMING_ID, "volume": models.InstanceId},
       responses={200: models.Received, 400: None, 403: None, 404: None, 409: None, 422: None, 507: None},
       long=True, auth="peer")
def receive_volume(id, volume):
    request.max_content_length = ROOTFS_STREAM_LIMIT  # the API's small-body cap is for JSON
    vol = models.check(models.InstanceId, volume, "volume id")
    return render(services().migrations.receive_volume(g.caller, incoming_id(id), vol, request.stream))


@route(bp, "PUT", "/v1/peer/migrations/{id}/disk", summary="Peers only: a stopped VM's disk layer (qcow2)",
       path_types=INCOMING_ID,
       responses={200: models.Received, 400: None, 403: None, 404: None, 409: None, 422: None, 507: None},
       long=True, auth="peer")
def receive_disk(id):
    request.max_content_length = ROOTFS_STREAM_LIMIT  # the API's small-body cap is for JSON
    return render(services().migrations.receive_disk(g.caller, incoming_id(id), request.stream))


@route(bp, "DELETE", "/v1/peer/migrations/{id}", summary="Peers only: remove a prepared incoming instance",
       path_types=INCOMING_ID, responses={200: models.Deleted, 400: None, 403: None, 409: None}, auth="peer")
def abort_incoming(id):
    return render({"deleted": services().migrations.abort_incoming(g.caller, incoming_id(id))})


@route(bp, "GET", "/v1/peer/images/{id}", summary="Peers only: an image's bytes (disk file or OCI tar)",
       path_types={"id": models.ImageId},
       responses={200: "application/octet-stream", 400: None, 403: None, 404: None}, auth="peer", long=True)
def export_image(id):
    image_id = models.check(models.ImageId, id, "image id")
    chunks, size = services().migrations.export_image(g.caller, image_id)
    return Response(chunks, mimetype="application/octet-stream", headers={"Content-Length": str(size)})
