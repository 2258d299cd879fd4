"""/v1/operations: get, list, wait, cancel."""
from flask import Blueprint, request

from agent import models
from agent.api import caller_is_admin, path_id, query_number, render, route, services
from agent.errors import InvalidInput, public_error
from agent.operations import MAX_WAIT

bp = Blueprint("operations", __name__)
STATUSES = ["pending", "running", "succeeded", "failed", "cancelled"]


@route(bp, "GET", "/v1/operations", summary="Recent operations, newest first",
       responses={200: models.OperationList, 400: None},
       query=[{"name": "status", "schema": {"type": "string", "enum": STATUSES}, "description": "filter"}])
def list_operations():
    status = request.args.get("status")
    if status is not None and status not in STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(STATUSES)}")
    return render({"operations": [_shown(op) for op in services().operations.list(status)]})


@route(bp, "GET", "/v1/operations/{id}", summary="One operation", responses={200: models.Operation, 404: None})
def get_operation(id):
    return render(_shown(services().operations.get(path_id(id))))


def _shown(op: dict) -> dict:
    """The operation as the caller may see it: a reader's error is redacted."""
    if op.get("error") and not caller_is_admin():
        op = {**op, "error": public_error(op["error"], op["id"])}
    return op


@route(bp, "GET", "/v1/operations/{id}/wait", summary="Block until the operation ends or timeout seconds pass",
       responses={200: models.Operation, 400: None, 404: None},
       query=[{"name": "timeout", "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT},
               "description": "seconds (default 30)"}], long=True)
def wait_operation(id):
    timeout = query_number("timeout", 30.0, lo=0, hi=MAX_WAIT)
    # the server sets "nodeagent.gone" when the client leaves: the wait ends then, not at its timeout
    return render(_shown(services().operations.wait(path_id(id), timeout,
                                                    gone=request.environ.get("nodeagent.gone"))))


@route(bp, "DELETE", "/v1/operations/{id}", summary="Cancel a pending or running operation",
       responses={200: models.Operation, 404: None, 409: None})
def cancel_operation(id):
    return render(_shown(services().operations.cancel(path_id(id))))
