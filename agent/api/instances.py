"""/v1/instances: create (202), list, get, update (PATCH), delete, actions (202), exec, logs, stats."""
from flask import Blueprint, Response, g, request

from agent import models
from agent.errors import Forbidden, redact
from agent.api import caller_is_admin, parse, path_id, query_number, render, route, services, websocket

bp = Blueprint("instances", __name__)

TAIL = {"name": "tail", "schema": {"type": "integer", "minimum": 1, "maximum": 100000},
        "description": "only the last N lines"}


@route(bp, "POST", "/v1/instances", summary="Create a VM or container (202 + operation)",
       body=models.InstanceCreate, responses={202: models.Operation, 403: None, 404: None, 409: None, 422: None})
def create_instance():
    req = parse(models.InstanceCreate)
    if req.privileged and not caller_is_admin():
        raise Forbidden("privileged containers (container root = host root) need an admin token")
    return render(services().instances.create(req), 202)


@route(bp, "GET", "/v1/instances", summary="List instances", responses={200: models.InstanceList})
def list_instances():
    return Response(services().instances.list_json(redact=not caller_is_admin()), mimetype="application/json")


@route(bp, "GET", "/v1/instances/{id}", summary="One instance (by id or name)",
       responses={200: models.Instance, 404: None})
def get_instance(id):
    inst = services().instances.get(path_id(id)).to_dict()
    return render(inst if caller_is_admin() else {**inst, "error": redact(inst["error"])})


@route(bp, "PATCH", "/v1/instances/{id}", summary="Change an instance in place (now: bandwidth), live",
       body=models.InstanceUpdate, responses={200: models.Instance, 404: None, 409: None, 422: None})
def update_instance(id):
    return render(services().instances.update(path_id(id), parse(models.InstanceUpdate)))


@route(bp, "DELETE", "/v1/instances/{id}", summary="Delete an instance and release its volumes",
       responses={200: models.Deleted, 404: None, 409: None})
def delete_instance(id):
    return render({"deleted": services().instances.delete(path_id(id))})


@route(bp, "POST", "/v1/instances/{id}/actions", summary="start|stop|restart|pause|resume|kill (202)",
       body=models.InstanceAction, responses={202: models.Operation, 404: None, 409: None, 422: None})
def instance_action(id):
    iid = path_id(id)
    return render(services().instances.action(iid, parse(models.InstanceAction)), 202)


@route(bp, "POST", "/v1/instances/{id}/exec",
       summary="Run a command in a container: buffered (200), or interactive (201: a websocket session)",
       body=models.ExecRequest, responses={200: models.ExecResult, 201: models.ExecSession, 404: None, 409: None,
                                           422: None})
def instance_exec(id):
    iid = path_id(id)
    req = parse(models.ExecRequest)
    res = services().instances.exec(iid, req, g.caller)
    return render(res, 201 if req.interactive else 200)


@route(bp, "GET", "/v1/instances/{id}/exec/{session}",
       summary="Websocket: an interactive exec reserved by POST .../exec (its terminal or its streams)",
       responses={101: None, 400: None, 404: None}, auth="admin", long=True)
def instance_exec_session(id, session):
    return websocket(services().instances.exec_attach(path_id(id), path_id(session, "session"), g.caller,
                                                      request.environ.get("nodeagent.request_id")))


@route(bp, "GET", "/v1/instances/{id}/console",
       summary="Websocket: a VM's serial console, shared by its watchers (admins type, readers watch)",
       responses={101: None, 400: None, 404: None, 409: None}, long=True)
def instance_console(id):
    return websocket(services().instances.console(path_id(id), g.caller, request.environ.get("nodeagent.request_id")))


@route(bp, "GET", "/v1/instances/{id}/logs", summary="Container stdout/stderr or VM serial console",
       responses={200: models.Logs, 404: None}, query=[TAIL])
def instance_logs(id):
    tail = query_number("tail", None, lo=1, hi=100000, cast=int)
    return render({"logs": services().instances.logs(path_id(id), tail)})


@route(bp, "GET", "/v1/instances/{id}/stats", summary="cpu, memory, pids, io, net",
       responses={200: models.Stats, 404: None, 409: None})
def instance_stats(id):
    return render(services().instances.stats(path_id(id)))
