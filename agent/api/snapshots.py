"""/v1/instances/{id}/snapshots: take (201), list, show, restore (in place, stopped only), delete."""
from flask import Blueprint

from agent import models
from agent.api import parse, path_id, render, route, services

bp = Blueprint("snapshots", __name__)
SNAP = {"snapshot": models.SnapshotName}


def _snap(value: str) -> str:
    return models.check(models.SnapshotName, value, "snapshot name")


@route(bp, "POST", "/v1/instances/{id}/snapshots",
       summary="Take a snapshot {name} of a running (no pause; filesystem-consistent with a guest agent, "
               "else crash-consistent) or stopped instance",
       body=models.SnapshotCreate, responses={201: models.Snapshot, 404: None, 409: None, 422: None})
def create_snapshot(id):
    return render(services().snapshots.create(path_id(id), parse(models.SnapshotCreate)), 201)


@route(bp, "GET", "/v1/instances/{id}/snapshots", summary="An instance's snapshots",
       responses={200: models.SnapshotList, 404: None})
def list_snapshots(id):
    return render({"snapshots": services().snapshots.list(path_id(id))})


@route(bp, "GET", "/v1/instances/{id}/snapshots/{snapshot}", summary="One snapshot of an instance",
       responses={200: models.Snapshot, 400: None, 404: None}, path_types=SNAP)
def get_snapshot(id, snapshot):
    return render(services().snapshots.get(path_id(id), _snap(snapshot)))


@route(bp, "POST", "/v1/instances/{id}/snapshots/{snapshot}/restore",
       summary="Revert the instance in place to a snapshot (409 unless it is stopped)",
       responses={200: models.Snapshot, 400: None, 404: None, 409: None, 422: None}, path_types=SNAP)
def restore_snapshot(id, snapshot):
    return render(services().snapshots.restore(path_id(id), _snap(snapshot)))


@route(bp, "DELETE", "/v1/instances/{id}/snapshots/{snapshot}", summary="Delete a snapshot",
       responses={200: models.Deleted, 400: None, 404: None, 409: None}, path_types=SNAP)
def delete_snapshot(id, snapshot):
    return render({"deleted": services().snapshots.delete(path_id(id), _snap(snapshot))})
