"""GET /v1/health, /v1/host, /v1/pools; host maintenance (POST /v1/host/evacuate, /v1/host/restore)
and what peers see of this host (GET /v1/peer/host)."""
from flask import Blueprint, g

from agent import models
from agent.api import parse, path_id, render, route, services

bp = Blueprint("host", __name__)


@route(bp, "GET", "/v1/health", summary="Liveness (no auth)", responses={200: models.Health}, auth="none")
def health():
    if not services().adopted.is_set():  # after a restart, until its workloads are re-adopted
        return render({"status": "ok", "adopting": True})
    return render({"status": "ok"})


@route(bp, "GET", "/v1/host", summary="Host facts: hypervisor, cpus, memory, pools, capacity, versions",
       responses={200: models.Host})
def get_host():
    return render(services().host.info())


@route(bp, "POST", "/v1/host/evacuate", summary="Drain the host: refuse new work, move every instance to peers "
       "(202 + operation listing each instance's status)", body=models.EvacuateRequest,
       responses={202: models.Operation, 404: None, 409: None, 422: None})
def evacuate_host():
    return render(services().migrations.evacuate(parse(models.EvacuateRequest)), 202)


@route(bp, "POST", "/v1/host/restore", summary="End host maintenance: accept creates and incoming migrations again",
       responses={200: models.Draining, 409: None})
def restore_host():
    return render(services().migrations.restore())


@route(bp, "GET", "/v1/peer/host", summary="Peers only: whether this host takes instances, its free capacity",
       responses={200: models.PeerHost, 403: None}, auth="peer")
def peer_host():
    services().migrations.require_peer(g.caller)
    return render(services().host.peer_facts())


@route(bp, "GET", "/v1/pools", summary="Storage pools and their usage", responses={200: models.PoolList})
def list_pools():
    return render({"pools": services().host.pools()})


@route(bp, "GET", "/v1/pools/{name}", summary="One storage pool", responses={200: models.Pool, 404: None})
def get_pool(name):
    return render(services().host.get_pool(path_id(name, "pool name")))
