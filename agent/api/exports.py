"""/v1/exports: NBD exports of volumes and VM images: create (the PSK once), list, show, delete.
Every route is admin-only: an export hands out a disk."""
from flask import Blueprint

from agent import models
from agent.api import parse, render, route, services

bp = Blueprint("exports", __name__)
NAME = {"name": models.ExportName}


def _name(value: str) -> str:
    return models.check(models.ExportName, value, "export name")


@route(bp, "POST", "/v1/exports",
       summary="Export a volume {volume, readonly?} or a VM image {image, readonly: true} over NBD (TLS); "
               "the answer holds the PSK, shown only here",
       body=models.ExportCreate, responses={201: models.ExportCreated, 404: None, 409: None, 422: None})
def create_export():
    return render(services().exports.create(parse(models.ExportCreate)), 201)


@route(bp, "GET", "/v1/exports", summary="List NBD exports (no keys)", responses={200: models.ExportList},
       auth="admin")
def list_exports():
    return render({"exports": services().exports.list()})


@route(bp, "GET", "/v1/exports/{name}", summary="One NBD export (no key)",
       responses={200: models.Export, 400: None, 404: None}, auth="admin", path_types=NAME)
def get_export(name):
    return render(services().exports.get(_name(name)))


@route(bp, "DELETE", "/v1/exports/{name}", summary="Stop an NBD export (its clients are cut off)",
       responses={200: models.Deleted, 400: None, 404: None}, path_types=NAME)
def delete_export(name):
    return render({"deleted": services().exports.delete(_name(name))})
