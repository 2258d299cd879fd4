"""API plumbing shared by the blueprints: the route table, body parsing, rendering.

Each resource module declares its routes with ``@route(bp, METHOD, PATH, ...)``; the
declaration is both the Flask URL rule and the OpenAPI operation (agent/openapi.py),
so the spec cannot drift from what is served. Views stay thin: parse -> one service
call -> render. Nothing under agent/api/ imports libvirt, runc or boto3.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Response, current_app, request
from pydantic import BaseModel, ValidationError

from agent.errors import InvalidInput, Unprocessable

# ids and names in paths: no '/', no '..', no control or shell characters
PATH_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


@dataclass
class Route:
    method: str
    path: str  # OpenAPI style: /v1/instances/{id}
    summary: str
    tag: str
    body: type[BaseModel] | None
    responses: dict[int, Any]  # status -> model | None | "text/event-stream" | "text/plain"
    query: list[dict] = field(default_factory=list)  # {name, schema, description}
    auth: str = "reader"  # none | reader | admin (admin: every non-GET route)
    endpoint: str = ""
    path_types: dict[str, Any] = field(default_factory=dict)  # a path parameter's constrained type (models)
    long: bool = False  # may last minutes (event stream, long poll, peer transfer): off the request pool


ROUTES: list[Route] = []


def route(bp: Blueprint, method: str, path: str, *, summary: str, responses: dict,
          body: type[BaseModel] | None = None, query: list[dict] | None = None, auth: str | None = None,
          path_types: dict[str, Any] | None = None, long: bool = False):
    """Declare a view: its Flask rule and its OpenAPI operation in one place. ``path_types``:
    a path parameter's type from agent.models when it is narrower than PATH_ID_RE (the view
    checks it with models.check). A ``long`` view runs on a thread of its own and may stream
    its request body and its response (see agent/httpserver.py); the others share the
    request pool and get their body whole."""
    def deco(fn):
        endpoint = f"{bp.name}.{fn.__name__}"
        ROUTES.append(Route(method, path, summary, bp.name, body, responses, query or [],
                            auth or ("reader" if method == "GET" else "admin"), endpoint,
                            path_types or {}, long))
        rule = re.sub(r"\{(\w+)\}", r"<\1>", path)
        bp.add_url_rule(rule, endpoint=fn.__name__, view_func=fn, methods=[method])
        return fn
    return deco


def services():
    return current_app.config["SERVICES"]


def path_id(value: str, what: str = "id") -> str:
    if not PATH_ID_RE.match(value) or ".." in value:
        raise InvalidInput(f"{what} {value[:80]!r} is malformed: use letters, digits, '-', '_', '.', ':' "
                           "(at most 128, no '..')")
    return value


def parse(model: type[BaseModel]) -> BaseModel:
    """The JSON body as ``model``: 400 if it is not JSON, 422 naming each bad field otherwise."""
    raw = request.get_data(cache=False)
    try:
        data = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("request body is not valid JSON: send a JSON object "
                           "with Content-Type: application/json") from None
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = [{"field": ".".join(str(p) for p in err["loc"]) or "(body)", "problem": err["msg"]}
                    for err in e.errors(include_url=False, include_input=False)]
        msg = "; ".join(f"{p['field']}: {p['problem']}" for p in problems[:10])
        raise Unprocessable(f"invalid request: {msg}", fields=problems) from None


def query_number(name: str, default, *, lo, hi, cast=float):
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise InvalidInput(f"query parameter {name} must be a number between {lo} and {hi}") from None
    if value != value or not lo <= value <= hi:  # NaN or out of range
        raise InvalidInput(f"query parameter {name} must be between {lo} and {hi}")
    return value


def render(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), status=status, mimetype="application/json")
