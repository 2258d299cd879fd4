"""/v1/tokens: admins create, list, show and revoke bearer tokens (secrets are shown once)."""
import logging

from flask import Blueprint, g

from agent import models
from agent.api import parse, path_id, render, route, services
from agent.errors import Conflict

bp = Blueprint("tokens", __name__)
log = logging.getLogger(__name__)


@route(bp, "POST", "/v1/tokens", summary="Create a token (admin); the secret is in this answer only",
       body=models.TokenCreate, responses={201: models.TokenCreated, 409: None, 422: None}, auth="admin")
def create_token():
    req = parse(models.TokenCreate)
    tokens = services().tokens
    secret = tokens.create(req.name, req.role, ttl_s=req.ttl_s)
    info = tokens.get(req.name)
    log.info("token created", extra={"token": req.name, "role": req.role, "expires_at": info["expires_at"],
                                     "by": g.caller["name"]})
    return render({**info, "token": secret}, 201)


@route(bp, "GET", "/v1/tokens", summary="List tokens (admin); never their secrets",
       responses={200: models.TokenList}, auth="admin")
def list_tokens():
    return render({"tokens": services().tokens.list()})


@route(bp, "GET", "/v1/tokens/{name}", summary="One token (admin)", responses={200: models.TokenInfo, 404: None},
       auth="admin")
def get_token(name):
    return render(services().tokens.get(path_id(name, "token name")))


@route(bp, "DELETE", "/v1/tokens/{name}", summary="Revoke a token (admin); not the one this request uses",
       responses={200: models.Deleted, 404: None, 409: None}, auth="admin")
def revoke_token(name):
    tokens = services().tokens
    info = tokens.get(path_id(name, "token name"))  # 404 for an unknown name
    if g.caller.get("via") == "token" and g.caller.get("id") == info["id"]:
        raise Conflict(f"token {name!r} is the one this request uses: revoke it with another admin token "
                       "(or `nodeagent token revoke` on the host), so that no one locks themselves out")
    tokens.revoke(name)
    log.info("token revoked", extra={"token": name, "by": g.caller["name"]})
    return render({"deleted": True})
