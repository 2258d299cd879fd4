"""Flask app factory: the REST control API (blueprints are registered here)."""
from __future__ import annotations

from flask import Flask, jsonify

from agent.config import Config
from agent.errors import AgentError


def create_app(config: Config) -> Flask:
    app = Flask("nodeagent")
    app.config["NODEAGENT"] = config
    app.config["MAX_CONTENT_LENGTH"] = config.api.max_body_bytes

    @app.get("/v1/health")
    def health():
        return jsonify({"status": "ok"})

    @app.errorhandler(AgentError)
    def agent_error(e: AgentError):
        return jsonify({"error": e.to_dict()}), e.http_status

    return app
