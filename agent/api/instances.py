"""/v1/instances: create (202), list, get, update (PATCH), delete, actions (202), exec, logs, stats."""
from flask import Blueprint, Response, g, request

from agent import models
from agent.errors import Forbidden, InvalidInput, redact
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


@route(bp, "PATCH", "/v1/instances/{id}",
       summary="Change an instance in place, live: bandwidth, resize (cpus, memory_mib), autostart",
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
       summary="Websocket: a VM's serial console or a TTY container's terminal, shared by its watchers "
               "(admins type and resize, readers watch; 409 for a container created without tty)",
       responses={101: None, 400: None, 404: None, 409: None}, long=True)
def instance_console(id):
    return websocket(services().instances.console(path_id(id), g.caller, request.environ.get("nodeagent.request_id")))


FILE_PATH = {"name": "path", "required": True,
             "schema": {"type": "string", "minLength": 1, "maxLength": 4096, "pattern": "^/[^\\x00]*$"},
             "description": "absolute path in the container (symlinks resolve inside it)"}
MAX_ID = 2**32 - 2  # the largest uid/gid a user namespace maps
MAX_PUSH_BYTES = 1 << 50  # no cap of our own: the container's disk (and its quota) is the limit


def _file_path() -> str:
    path = request.args.get("path")
    if not path:
        raise InvalidInput("query parameter path is required: an absolute path in the container")
    return path


def _header_int(name: str, default: int, base: int = 10, hi: int = MAX_ID) -> int:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        value = int(raw, base)
    except ValueError:
        value = -1
    if not 0 <= value <= hi or not raw.isdigit():
        raise InvalidInput(f"header {name}: {raw[:40]!r} is not " + ("octal permission bits (e.g. 0644)"
                                                                       if base == 8 else f"an id from 0 to {hi}"))
    return value


@route(bp, "GET", "/v1/instances/{id}/files", summary="Pull a container's file (streamed; owner and mode "
       "in X-Nodeagent-Uid, -Gid, -Mode; X-Nodeagent-Type: file), or list a directory (JSON; X-Nodeagent-Type: "
       "directory)", responses={200: "application/octet-stream", 400: None, 404: None, 409: None, 422: None},
       query=[FILE_PATH], auth="admin", long=True)
def instance_file_get(id):
    body = services().instances.file_open(path_id(id), _file_path())
    if isinstance(body, dict):
        resp = render(body)
        resp.headers.update({"X-Nodeagent-Type": "directory", "X-Nodeagent-Mode": body["mode"],
                             "X-Nodeagent-Uid": _id_header(body["uid"]), "X-Nodeagent-Gid": _id_header(body["gid"])})
        return resp
    info = body.info
    headers = {"Content-Length": str(info.size), "X-Nodeagent-Type": "file", "X-Nodeagent-Mode": f"{info.mode:04o}",
               "X-Nodeagent-Uid": _id_header(info.uid), "X-Nodeagent-Gid": _id_header(info.gid)}
    return Response(body, mimetype="application/octet-stream", headers=headers, direct_passthrough=True)


def _id_header(v: int | None) -> str:
    return "" if v is None else str(v)  # empty: an owner not mapped into the container


@route(bp, "PUT", "/v1/instances/{id}/files", summary="Push a file into a container (the body, streamed), or "
       "with X-Nodeagent-Type: directory make a directory; owner and mode from X-Nodeagent-Uid, -Gid, -Mode "
       "(default 0, 0, 0644 or 0755)", responses={200: dict, 400: None, 404: None, 409: None, 422: None},
       query=[FILE_PATH], long=True)
def instance_file_put(id):
    request.max_content_length = MAX_PUSH_BYTES  # streamed to the container's disk, never held here
    iid, path = path_id(id), _file_path()
    kind = request.headers.get("X-Nodeagent-Type", "file")
    if kind not in ("file", "directory"):
        raise InvalidInput(f"header X-Nodeagent-Type: {kind[:40]!r} is not file or directory")
    uid, gid = _header_int("X-Nodeagent-Uid", 0), _header_int("X-Nodeagent-Gid", 0)
    mode = _header_int("X-Nodeagent-Mode", 0o755 if kind == "directory" else 0o644, base=8, hi=0o7777)
    if kind == "directory":
        return render(services().instances.make_dir(iid, path, uid=uid, gid=gid, mode=mode))
    return render(services().instances.file_put(iid, path, request.stream.read, uid=uid, gid=gid, mode=mode))


@route(bp, "GET", "/v1/instances/{id}/logs", summary="Container stdout/stderr or VM serial console",
       responses={200: models.Logs, 404: None}, query=[TAIL])
def instance_logs(id):
    tail = query_number("tail", None, lo=1, hi=100000, cast=int)
    return render({"logs": services().instances.logs(path_id(id), tail)})


@route(bp, "GET", "/v1/instances/{id}/stats", summary="cpu, memory, pids, io, net",
       responses={200: models.Stats, 404: None, 409: None})
def instance_stats(id):
    return render(services().instances.stats(path_id(id)))
