"""/v1/volumes: create, list, get, grow (PATCH), delete; an instance's volumes: attach, detach."""
from flask import Blueprint

from agent import models
from agent.api import parse, path_id, render, route, services

bp = Blueprint("volumes", __name__)
VOLUME = {"volume": models.VolumeRef}


@route(bp, "POST", "/v1/volumes", summary="Create an empty volume {name, size_gib|size_mib, pool?}",
       body=models.VolumeCreate, responses={201: models.Volume, 404: None, 409: None, 422: None})
def create_volume():
    return render(services().volumes.create(parse(models.VolumeCreate)), 201)


@route(bp, "GET", "/v1/volumes", summary="List volumes", responses={200: models.VolumeList})
def list_volumes():
    return render({"volumes": services().volumes.list()})


@route(bp, "GET", "/v1/volumes/{id}", summary="One volume (by id or name), with its attachment",
       responses={200: models.Volume, 404: None})
def get_volume(id):
    return render(services().volumes.get(path_id(id)))


@route(bp, "PATCH", "/v1/volumes/{id}", summary="Grow a volume (online for a running VM); never shrinks",
       body=models.VolumeUpdate, responses={200: models.Volume, 404: None, 409: None, 422: None})
def resize_volume(id):
    return render(services().volumes.resize(path_id(id), parse(models.VolumeUpdate)))


@route(bp, "DELETE", "/v1/volumes/{id}", summary="Delete a volume (409 while attached)",
       responses={200: models.Deleted, 404: None, 409: None})
def delete_volume(id):
    return render({"deleted": services().volumes.delete(path_id(id))})


@route(bp, "GET", "/v1/instances/{id}/volumes", summary="The volumes attached to an instance",
       responses={200: models.InstanceVolumes, 404: None})
def instance_volumes(id):
    inst = services().instances.get(path_id(id))
    return render({"volumes": services().volumes.of_instance(inst.id)})


@route(bp, "POST", "/v1/instances/{id}/volumes",
       summary="Attach a volume: to a VM (running: hot-plug) or a container at a path (running: mounted live)",
       body=models.VolumeAttach, responses={200: models.Volume, 404: None, 409: None, 422: None})
def attach_volume(id):
    iid = path_id(id)
    return render(services().volumes.attach(iid, parse(models.VolumeAttach)))


@route(bp, "DELETE", "/v1/instances/{id}/volumes/{volume}",
       summary="Detach a volume (a running VM: hot-unplug; a running container: unmounted live, 409 while it "
               "still holds the volume elsewhere)",
       responses={200: models.Volume, 404: None, 409: None}, path_types=VOLUME)
def detach_volume(id, volume):
    iid = path_id(id)
    return render(services().volumes.detach(iid, models.check(models.VolumeRef, volume, "volume")))
