"""Flask app factory: the REST control API, one blueprint per resource.

``create_app(config)`` builds the app and its Services but starts nothing: the server
calls ``app.config["SERVICES"].start()`` in its worker after fork (tests may too).
"""
from __future__ import annotations

import logging
import time
import uuid

from flask import Flask, g, request
from werkzeug.exceptions import HTTPException

from agent import auth
from agent import log as agent_log
from agent.api import ROUTES, render
from agent.config import Config
from agent.errors import AgentError, public_error

log = logging.getLogger(__name__)
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
HTTP_CODES = {400: "invalid", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
              415: "unsupported_media_type"}


def _blueprints():
    from agent.api import docs, events, host, images, instances, metrics, migrations, operations, secgroups, tokens
    from agent.api import backups, exports, snapshots, volumes
    # pools are served by the host blueprint: host facts and pools are one resource module
    return [host.bp, images.bp, instances.bp, operations.bp, migrations.bp, events.bp, metrics.bp, docs.bp,
            secgroups.bp, tokens.bp, volumes.bp, snapshots.bp, exports.bp, backups.bp]


def create_app(config: Config, services=None) -> Flask:
    from agent.services import Services

    app = Flask("nodeagent")
    app.config["NODEAGENT"] = config
    app.config["MAX_CONTENT_LENGTH"] = config.api.max_body_bytes
    root = services or Services(config)
    app.config["SERVICES"] = root
    for bp in _blueprints():
        app.register_blueprint(bp)
    public = {r.endpoint for r in ROUTES if r.auth == "none"}
    route_auth = {r.endpoint: r.auth for r in ROUTES}

    @app.before_request
    def _authenticate():
        g.t0 = time.perf_counter()
        # the server made it from the client's X-Request-Id (or anew); a test client did not
        rid = request.environ.get("nodeagent.request_id") or agent_log.request_id_from(
            request.headers.get("X-Request-Id"))
        request.environ["nodeagent.request_id"] = g.request_id = rid
        g.log_context = agent_log.set_context(request_id=rid)
        if request.endpoint in public or request.endpoint is None:
            return None  # unknown URLs fall through to a 404
        g.caller = auth.authorize(root.tokens, _authorization(), request.method,
                                  route_auth.get(request.endpoint, "reader"),
                                  cert=request.environ.get("nodeagent.client_cert"),
                                  cert_roles=config.api.cert_roles)
        request.environ["nodeagent.caller"] = g.caller  # for the server's access log line
        if request.method not in READ_METHODS and not root.adopted.is_set():
            root.wait_adopted()  # after an agent restart: reads are served at once, changes once re-adopted
        return None

    def _authorization() -> str | None:
        """The Authorization header; for a websocket without one (a browser cannot set it) a
        token offered as the subprotocol ``bearer.<token>`` (as Kubernetes does), beside
        ``nodeagent.v1``: it stays out of URLs and so out of proxies' logs."""
        header = request.headers.get("Authorization")
        ws = request.environ.get("nodeagent.websocket")
        if header or ws is None:
            return header
        offered = next((p for p in ws.protocols if p.startswith("bearer.")), None)
        return f"Bearer {offered[len('bearer.'):]}" if offered else None

    @app.after_request
    def _observe(resp):
        rule = request.url_rule.rule if request.url_rule else "unmatched"
        root.metrics.observe(rule, request.method, resp.status_code,
                             time.perf_counter() - g.get("t0", time.perf_counter()))
        if g.get("request_id"):
            resp.headers["X-Request-Id"] = g.request_id
        return resp

    @app.teardown_request
    def _forget_request(_exc):
        token = g.pop("log_context", None)
        if token is not None:
            agent_log.reset_context(token)

    @app.errorhandler(AgentError)
    def _agent_error(e: AgentError):
        if e.http_status >= 500:
            log.warning("request failed", extra={"path": request.path, "code": e.code, "error": e.message})
        body = e.to_dict()
        if (g.get("caller") or {}).get("role") != "admin" and g.get("caller"):
            body = public_error(body)  # a reader: no host paths, argv or stderr
        return render({"error": body}, e.http_status)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        code = HTTP_CODES.get(e.code, "invalid" if e.code < 500 else "internal")
        message = {404: f"no such endpoint: {request.method} {request.path[:200]} (see /v1/openapi.json)",
                   405: f"method {request.method} is not allowed on {request.path[:200]}",
                   413: f"request body too large: at most {config.api.max_body_bytes} bytes"}.get(e.code, e.description)
        resp = render({"error": {"code": code, "message": message}}, e.code)
        if e.code == 405 and getattr(e, "valid_methods", None):
            resp.headers["Allow"] = ", ".join(e.valid_methods)
        return resp

    @app.errorhandler(Exception)
    def _internal(e: Exception):
        ref = uuid.uuid4().hex[:12]
        log.exception("unhandled error", extra={"path": request.path, "ref": ref})
        return render({"error": {"code": "internal",
                                 "message": f"internal error (ref {ref}); the agent log has the details"}}, 500)

    return app
