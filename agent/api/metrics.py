"""GET /metrics: Prometheus text format (reader or admin token)."""
from flask import Blueprint, Response

from agent.api import route, services

bp = Blueprint("metrics", __name__)


@route(bp, "GET", "/metrics", summary="Prometheus metrics (any valid token)", responses={200: "text/plain"})
def get_metrics():
    body, content_type = services().metrics.render()
    return Response(body, mimetype=None, content_type=content_type)
