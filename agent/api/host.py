"""GET /v1/health, /v1/host, /v1/pools."""
from flask import Blueprint

from agent import models
from agent.api import path_id, render, route, services

bp = Blueprint("host", __name__)


@route(bp, "GET", "/v1/health", summary="Liveness (no auth)", responses={200: models.Health}, auth="none")
def health():
    return render({"status": "ok"})


@route(bp, "GET", "/v1/host", summary="Host facts: hypervisor, cpus, memory, pools, capacity, versions",
       responses={200: models.Host})
def get_host():
    return render(services().host.info())


@route(bp, "GET", "/v1/pools", summary="Storage pools and their usage", responses={200: models.PoolList})
def list_pools():
    return render({"pools": services().host.pools()})


@route(bp, "GET", "/v1/pools/{name}", summary="One storage pool", responses={200: models.Pool, 404: None})
def get_pool(name):
    return render(services().host.get_pool(path_id(name, "pool name")))
