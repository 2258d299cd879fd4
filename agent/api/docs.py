"""GET /v1/openapi.json (reader token) and /v1/docs (a local page; its assets come from this agent)."""
import functools
import json
import threading
from pathlib import Path

from flask import Blueprint, Response

from agent.api import route
from agent.errors import NotFound

bp = Blueprint("docs", __name__)
STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {"docs.js": "text/javascript", "docs.css": "text/css"}


@route(bp, "GET", "/v1/openapi.json", summary="This API's OpenAPI 3 spec", responses={200: dict})
def openapi_json():
    return Response(spec_json(), mimetype="application/json")


_spec_lock = threading.Lock()


@functools.cache
def _built() -> bytes:
    from agent import openapi
    return json.dumps(openapi.build(), separators=(",", ":")).encode()


def spec_json() -> bytes:
    """The spec as JSON, built at its first request (by the first caller; the others wait
    for it) and kept as bytes: not at start (the agent answers sooner) and not as objects
    (its schemas cost the agent 10-25 MB of memory for a page few clients ask for)."""
    with _spec_lock:
        return _built()


@route(bp, "GET", "/v1/docs", summary="API docs page (no auth; it asks for a token to load the spec)",
       responses={200: "text/html"}, auth="none")
def docs_page():
    return Response((STATIC / "docs.html").read_text(), mimetype="text/html")


@route(bp, "GET", "/v1/docs/{asset}", summary="Docs page assets", responses={200: "text/plain", 404: None},
       auth="none")
def docs_asset(asset):
    if asset not in ASSETS:
        raise NotFound(f"no docs asset {asset!r}")
    return Response((STATIC / asset).read_text(), mimetype=ASSETS[asset])
