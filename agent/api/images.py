"""/v1/images: import (202 + operation), list, get, delete, gc."""
from flask import Blueprint, Response

from agent import models
from agent.api import parse, path_id, render, route, services

bp = Blueprint("images", __name__)


@route(bp, "POST", "/v1/images", summary="Import an image from a file, URL or registry",
       body=models.ImageImport, responses={202: models.Operation, 404: None, 409: None, 422: None})
def import_image():
    return render(services().images.create(parse(models.ImageImport)), 202)


@route(bp, "GET", "/v1/images", summary="List images", responses={200: models.ImageList})
def list_images():
    return render({"images": services().images.list()})


@route(bp, "GET", "/v1/images/{id}", summary="One image (by id, unique id prefix, or name)",
       responses={200: models.Image, 404: None})
def get_image(id):
    return render(services().images.get(path_id(id)))


@route(bp, "DELETE", "/v1/images/{id}", summary="Delete an image (409 while an instance uses it)",
       responses={200: models.Deleted, 404: None, 409: None})
def delete_image(id):
    return render({"deleted": services().images.delete(path_id(id))})


def _gc_options():
    """OPTIONS /v1/images/gc: the path also matches /v1/images/{id} (GET, DELETE of an
    image named "gc"), but as a resource of its own it takes POST only."""
    return Response(status=200, headers={"Allow": "OPTIONS, POST"})


# registered before the POST rule, whose automatic OPTIONS would list GET and DELETE too
bp.add_url_rule("/v1/images/gc", endpoint="gc_options", view_func=_gc_options, methods=["OPTIONS"])


@route(bp, "POST", "/v1/images/gc", summary="Garbage-collect images: free blobs, layers and temp "
       "files no image or running import uses (-> 202 operation; its result says what was freed)",
       responses={202: models.Operation})
def gc_images():
    return render(services().images.start_gc(), 202)
