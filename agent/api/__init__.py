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

from flask import Blueprint, Response, current_app, g, request
from pydantic import BaseModel, ValidationError

from agent import models
from agent.errors import InvalidInput, Unprocessable

# ids and names in paths: no '/', no '..', no control or shell characters (the pattern the
# models use for names that must be reachable by URL: models.REF_PATTERN)
PATH_ID_RE = re.compile(models.REF_PATTERN)
# Bodies are parsed by recursive code (the json decoder, pydantic): a body nested 100k deep
# would end in RecursionError (a 500 and a log flood). No API body nests deeper than ~6.
MAX_JSON_DEPTH = 32
# a whole string (possessive: no backtracking), a bracket, or the quote of an unterminated string
_JSON_TOKEN = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"|[\[\]{}]|"', re.S)
# what a failed pattern means, for the 422 message (pydantic would quote the regex)
PATTERN_PROBLEMS = {
    models.NO_NUL: "must not contain NUL characters",
    models.ONE_LINE: "must be one line without control characters",
    models.ENV_KEY_PATTERN: "an env name must be non-empty, without '=', NUL or control characters",
    models.REF_PATTERN: "use 1-128 letters, digits, '_', '.', ':', '-', starting with a letter or "
                        "digit, no '..'",
    models.IPV4_PATTERN: "not an IPv4 address (e.g. 127.0.0.1)",
    models.NAME_PATTERN: "use 1-63 lower-case letters, digits and '-' (a hostname label)",
    models.POOL_NAME_PATTERN: "use letters and digits, joined by single '_', '.' or '-'",
    models.INSTANCE_ID_PATTERN: "an instance id: 32 lower-case hex digits",
    models.SHA256_PATTERN: "a sha256: 64 lower-case hex digits",
    models.DIGEST_PATTERN: "a digest: 'sha256:' and 64 lower-case hex digits",
    models.MAC_PATTERN: "a MAC address: six lower-case hex pairs joined by ':'",
    models.CIDR4_PATTERN: "not an IPv4 network (e.g. 10.0.0.0/8) or address",
    models.SNAPSHOT_NAME_PATTERN: "use 1-63 letters, digits, '-' and '_', starting with a letter or digit",
}


@dataclass
class Route:
    method: str
    path: str  # OpenAPI style: /v1/instances/{id}
    summary: str
    tag: str
    body: type[BaseModel] | str | None  # a model (JSON), or the media type of a streamed body
    responses: dict[int, Any]  # status -> model | None | "text/event-stream" | "text/plain"
    query: list[dict] = field(default_factory=list)  # {name, schema, description}
    auth: str = "reader"  # none | reader | admin (every non-GET route) | peer (peer hosts and admins)
    endpoint: str = ""
    path_types: dict[str, Any] = field(default_factory=dict)  # a path parameter's constrained type (models)
    long: bool = False  # may last minutes (event stream, long poll, peer transfer): off the request pool


ROUTES: list[Route] = []


def route(bp: Blueprint, method: str, path: str, *, summary: str, responses: dict,
          body: type[BaseModel] | str | None = None, query: list[dict] | None = None, auth: str | None = None,
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


WS_PROTOCOL = "nodeagent.v1"  # the subprotocol our websockets speak (README "Consoles, exec and files")


def websocket(session) -> Response:
    """Accept this request's websocket upgrade: ``session(ws)`` (agent.httpserver.WebSocket)
    runs on the request's thread once the 101 is out; it must capture what it needs (the
    request context is over by then). 400 for a request that is not a websocket upgrade."""
    ws = request.environ.get("nodeagent.websocket")
    if ws is None:
        raise InvalidInput(f"{request.path[:200]} is a websocket: connect with GET, 'Connection: Upgrade', "
                           "'Upgrade: websocket' and 'Sec-WebSocket-Version: 13' (e.g. `nodeagent console`)")
    ws.session = session
    if WS_PROTOCOL in ws.protocols:
        ws.subprotocol = WS_PROTOCOL
    return Response(status=101)


def services():
    return current_app.config["SERVICES"]


def caller_is_admin() -> bool:
    """Admins see errors in full; readers see them without host paths, argv or stderr
    (agent.errors.public_error)."""
    return (g.get("caller") or {}).get("role") == "admin"


def path_id(value: str, what: str = "id") -> str:
    if len(value) > models.MAX_REF or not PATH_ID_RE.fullmatch(value) or ".." in value:
        raise InvalidInput(f"{what} {value[:80]!r} is malformed: use letters, digits, '-', '_', '.', ':' "
                           "(at most 128, no '..')")
    return value


def json_too_deep(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if arrays and objects nest deeper than ``limit`` in ``raw`` (brackets inside
    strings do not count). One linear pass, no recursion; malformed JSON is the decoder's
    to refuse."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth = 0
    for m in _JSON_TOKEN.finditer(raw):
        tok = m.group()
        if tok in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif tok in (b"]", b"}"):
            depth -= 1
        elif tok == b'"':
            return False  # an unterminated string: not JSON, the decoder says so
    return False


def parse(model: type[BaseModel]) -> BaseModel:
    """The JSON body as ``model``: 400 if it is not JSON (or nests deeper than
    MAX_JSON_DEPTH), 422 naming each bad field otherwise."""
    raw = request.get_data(cache=False)
    if json_too_deep(raw):
        raise InvalidInput(f"request body nests deeper than {MAX_JSON_DEPTH} levels: "
                           "no API body needs that")
    try:
        data = json.loads(raw or b"null", object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except _Ambiguous as e:
        raise InvalidInput(f"request body refused: {e}") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidInput("request body is not valid JSON: send a JSON object "
                           "with Content-Type: application/json") from None
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = [{"field": ".".join(_printable(str(p)) for p in err["loc"]) or "(body)",
                     "problem": _problem(err)}
                    for err in e.errors(include_url=False, include_input=False)]
        msg = "; ".join(f"{p['field']}: {p['problem']}" for p in problems[:10])
        raise Unprocessable(f"invalid request: {msg}", fields=problems) from None


class _Ambiguous(Exception):
    pass


def _unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are unique: parsers disagree on which of two equal keys wins
    (a proxy may check one value and the agent act on the other), so neither does."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Ambiguous(f"key {_printable(dup)!r} appears twice in one object")
    return out


def _no_constant(name: str):
    raise _Ambiguous(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _printable(text: str) -> str:
    """``text`` with control characters escaped (a field name may be a client's dict key)."""
    return text if text.isprintable() else ascii(text)[1:-1]


def _problem(err: dict) -> str:
    if err["type"] == "string_pattern_mismatch":
        hint = PATTERN_PROBLEMS.get((err.get("ctx") or {}).get("pattern"))
        if hint:
            return hint
    msg = err["msg"]
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


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
    """``data`` (plain JSON values, or an answer model) as a JSON response."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    return Response(json.dumps(data, separators=(",", ":")), status=status, mimetype="application/json")
