"""/v1/migrations: declared per the contract; this agent build does not migrate yet (422)."""
from flask import Blueprint

from agent import models
from agent.api import parse, path_id, route, services
from agent.errors import NotFound, Unsupported

bp = Blueprint("migrations", __name__)


@route(bp, "POST", "/v1/migrations", summary="Move an instance to another host (not yet supported: 422)",
       body=models.MigrationCreate, responses={202: models.Operation, 404: None, 422: None})
def create_migration():
    req = parse(models.MigrationCreate)
    services().instances.get(req.instance)  # an unknown instance is a 404 first
    raise Unsupported("migration is not yet supported by this agent build: "
                      "stop the instance and re-create it on the destination")


@route(bp, "GET", "/v1/migrations/{id}", summary="One migration", responses={404: None})
def get_migration(id):
    raise NotFound(f"migration {path_id(id)} not found")
