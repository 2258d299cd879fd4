"""Host maintenance (POST /v1/host/evacuate, /v1/host/restore) on two in-process agents with fake
drivers that reach each other over real HTTP (the harness of test_migration_controls): a draining
host refuses creates and incoming migrations (409), an evacuation moves VMs (running: live,
stopped: offline) and containers and reports each, one that fails stays and is listed with its
reason while the others move, restore accepts work again, the flag survives a restart."""
from __future__ import annotations

import uuid

import pytest

from agent.errors import CommandFailed
from tests.api.test_migration_controls import _ct_image, _free_port, _vm, _wait, peered_hosts


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    for src, dst in peered_hosts(tmp_path_factory.mktemp("evacuate")):
        img = src.client.post("/v1/images", json={"name": "tiny-ct", "format": "oci",
                                                  "source": {"type": "file", "path": str(_ct_image(src))}})
        assert _wait(src.client, img.json)["status"] == "succeeded"
        yield src, dst


@pytest.fixture
def src(hosts):
    s, d = hosts
    for h in (s, d):
        h.root.host.set_draining(False)
    yield s
    for h in (s, d):
        h.root.host.set_draining(False)


def _create(host, name=None):
    return host.client.post("/v1/instances", json={"name": name or f"n-{uuid.uuid4().hex[:8]}", "kind": "vm",
                                                   "image": "tiny-vm", "memory_mib": 64, "network": "none"})


@pytest.mark.parametrize("body, status, says", [
    ({"peers": ["nowhere"]}, 422, "not a configured peer"),
    ({"parallel": 0}, 422, "parallel"),
    ({"parallel": 2, "speed": 1}, 422, "speed"),
    ({"instances": ["no-such-instance"]}, 404, "no-such-instance"),
    ({"peers": []}, 422, "peers"),
])
def test_bad_evacuations_change_nothing(src, body, status, says):
    r = src.client.post("/v1/host/evacuate", json=body)
    assert r.status_code == status and says in r.json["error"]["message"], r.json
    assert src.client.get("/v1/host").json["draining"] is False
    assert not [o for o in src.client.get("/v1/operations").json["operations"] if o["kind"] == "evacuation"]


def test_evacuation_moves_every_instance_reports_each_and_keeps_the_one_that_fails(src, hosts, monkeypatch):
    dst = hosts[1]
    running = [_vm(src), _vm(src)]
    stopped = _vm(src, start=False)
    ct = _vm(src, kind="container")
    bad = _vm(src)
    migrate = src.root.driver.migrate

    def faulty(name, *a, **kw):  # the injected fault: this VM's migration fails
        if name == bad:
            raise CommandFailed(f"migration of VM {name!r} failed: injected fault")
        return migrate(name, *a, **kw)
    monkeypatch.setattr(src.root.driver, "migrate", faulty)

    r = src.client.post("/v1/host/evacuate", json={"parallel": 2})
    assert r.status_code == 202, r.json
    host = src.client.get("/v1/host").json
    assert host["draining"] is True and host["draining_since"], host
    refused = _create(src)
    assert refused.status_code == 409 and "draining" in refused.json["error"]["message"], refused.json
    op = _wait(src.client, r.json, timeout=60)
    assert op["status"] == "succeeded", op
    items = {i["name"]: i for i in op["result"]["instances"]}
    assert items == {i["name"]: i for i in op["progress"]["instances"]}
    assert set(items) == {*running, stopped, ct, bad}
    for name in (*running, stopped, ct):
        assert items[name]["status"] == "done" and items[name]["destination"] == "dst", items[name]
        assert src.client.get(f"/v1/instances/{name}").status_code == 404
    assert {items[n]["mode"] for n in running} == {"live"}
    assert items[stopped]["mode"] == "cold" and items[ct]["mode"] == "refresh"
    assert dst.client.get(f"/v1/instances/{running[0]}").json["state"] == "running"
    assert dst.client.get(f"/v1/instances/{stopped}").json["state"] == "stopped"
    assert dst.client.get(f"/v1/instances/{ct}").json["state"] == "running"
    assert items[bad]["status"] == "failed" and "injected fault" in items[bad]["error"], items[bad]
    assert src.client.get(f"/v1/instances/{bad}").json["state"] == "running"
    assert (op["result"]["moved"], op["result"]["stayed"]) == (4, 1)
    assert src.client.get("/v1/host").json["draining"] is True  # until restore

    r = src.client.post("/v1/host/restore")
    assert r.status_code == 200 and r.json == {"draining": False}, r.json
    assert src.client.get("/v1/host").json["draining"] is False
    made = _create(src)
    assert made.status_code == 202, made.json
    assert _wait(src.client, made.json)["status"] == "succeeded"


def test_a_draining_destination_refuses_incoming(src, hosts):
    dst = hosts[1]
    name = _vm(src)
    dst.root.host.set_draining(True)
    r = src.client.post("/v1/migrations", json={"instance": name, "destination": "dst"})
    assert r.status_code == 409 and "draining" in r.json["error"]["message"], r.json
    # an evacuation finds no peer: the instance stays, and says why
    op = _wait(src.client, src.client.post("/v1/host/evacuate", json={"instances": [name]}).json)
    item = op["result"]["instances"][0]
    assert item["status"] == "failed" and "draining" in item["error"], item
    # the destination's own check, behind the source's (a peer that skipped it, or a race)
    from agent import models
    from agent.errors import Conflict
    inst = src.root.instances.get(name)
    req = models.IncomingMigration.model_validate({
        "instance": {k: v for k, v in inst.to_dict().items() if k in ("id", "name", "kind", "pool", "volumes", "mac")},
        "spec": inst.spec_dict(), "data_bytes": 0, "image_bytes": 0,
        "image": {"id": inst.image, "name": "tiny-vm", "format": "qcow2", "kind": "vm"}})
    with pytest.raises(Conflict, match="draining"):
        dst.root.migrations.prepare_incoming({"name": "src", "role": "peer"}, req)
    assert dst.client.get(f"/v1/instances/{name}").status_code == 404
    assert dst.client.post("/v1/host/restore").json == {"draining": False}
    op = _wait(src.client, src.client.post("/v1/migrations", json={"instance": name, "destination": "dst"}).json)
    assert op["status"] == "succeeded", op


def test_peer_host_is_for_peers_only(src, hosts):
    from agent.migration.peer import PeerClient
    dst = hosts[1]
    facts = src.root.migrations.peer("dst").host()
    assert facts.draining is False and facts.capacity["memory_available_bytes"] > 0
    reader = src.root.tokens.create(f"r-{uuid.uuid4().hex[:6]}", "reader")
    with pytest.raises(Exception, match="refused"):
        PeerClient("src", src.url, reader).host()
    assert dst.client.get("/v1/peer/host").status_code == 403  # an admin that is not a configured peer


def test_the_draining_flag_survives_a_restart(src):
    from agent.services import Services
    r = src.client.post("/v1/host/evacuate", json={"instances": [_vm(src, start=False)]})
    assert r.status_code == 202, r.json
    assert _wait(src.client, r.json)["status"] == "succeeded"
    again = Services(src.root.config)  # what a restarted agent reads from the same state dir
    assert again.host.draining() is True
    assert again.host.info()["draining"] is True


def test_the_cli_evacuates_and_restores(src, hosts, monkeypatch):
    import json

    from click.testing import CliRunner

    from agent.cli import main
    monkeypatch.setenv("NODEAGENT_URL", src.url)
    monkeypatch.setenv("NODEAGENT_TOKEN", src.client.environ_base["HTTP_AUTHORIZATION"].split()[1])
    name = _vm(src)
    bad = CliRunner().invoke(main, ["host", "evacuate", "--peer", "nowhere"])
    assert bad.exit_code == 1 and "not a configured peer" in bad.output, bad.output
    ok = CliRunner().invoke(main, ["host", "evacuate", "--peer", "dst", "--parallel", "1", "--instance", name,
                                   "--json"])
    assert ok.exit_code == 0, ok.output
    op = json.loads(ok.output)
    assert op["result"]["instances"][0]["status"] == "done", op
    shown = CliRunner().invoke(main, ["host", "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)["draining"] is True, shown.output
    back = CliRunner().invoke(main, ["host", "restore"])
    assert back.exit_code == 0 and "restored" in back.output, back.output
    assert src.client.get("/v1/host").json["draining"] is False


GUEST_CPU = "<cpu mode='custom' match='exact'><model fallback='forbid'>EPYC-Milan</model><vendor>AMD</vendor></cpu>"
DEST_CPU = "<cpu><arch>x86_64</arch><model>Haswell</model><vendor>Intel</vendor></cpu>"


def test_a_destination_whose_cpu_cannot_run_the_guest_is_refused_before_anything_moves(src, hosts):
    """KVM hosts (faked: this machine runs TCG): the source reads the destination's host CPU
    (GET /v1/peer/host) and refuses with 422 at once; a destination that did not say (or a
    race) refuses at prepare, so the migration fails before anything moves. Under TCG (no
    guest CPU model) nothing is checked."""
    dst = hosts[1]
    name = _vm(src)
    s, d = src.root.driver, dst.root.driver
    try:
        s.guest_cpu_xml, d.host_cpu_xml, d.cpu_refused = GUEST_CPU, DEST_CPU, "the host CPU lacks avx2"
        r = src.client.post("/v1/migrations", json={"instance": name, "destination": "dst"})
        assert r.status_code == 422 and "cannot run VM" in r.json["error"]["message"], r.json
        assert "lacks avx2" in r.json["error"]["message"]
        d.host_cpu_xml = None  # the destination's own compareCPU at prepare
        op = _wait(src.client, src.client.post("/v1/migrations", json={"instance": name, "destination": "dst"}).json)
        assert op["status"] == "failed" and op["error"]["code"] == "unprocessable", op
        assert "cannot run VM" in op["error"]["message"] and "nothing moved" in op["error"]["message"]
        assert src.client.get(f"/v1/instances/{name}").json["state"] == "running"
        assert dst.client.get(f"/v1/instances/{name}").status_code == 404
        assert not [m for m in s.migrations if m["name"] == name]
        s.guest_cpu_xml = None  # TCG: QEMU emulates the CPU, no check
        op = _wait(src.client, src.client.post("/v1/migrations", json={"instance": name, "destination": "dst"}).json)
        assert op["status"] == "succeeded", op
    finally:
        s.guest_cpu_xml = d.host_cpu_xml = d.cpu_refused = None


def test_an_unreachable_peer_is_passed_over_and_named(src, hosts):
    """A peer that is down (its agent killed) takes nothing: the instance stays, the reason names it."""
    from agent.config import PeerConfig
    src.root.config.peers["gone"] = PeerConfig(url=f"http://127.0.0.1:{_free_port()}", token="na_x")
    try:
        name = _vm(src)
        op = _wait(src.client, src.client.post("/v1/host/evacuate", json={"peers": ["gone"]}).json)
        items = {i["name"]: i for i in op["result"]["instances"]}
        assert items[name]["status"] == "failed" and "gone" in items[name]["error"], items[name]
        assert "unreachable" in items[name]["error"] or "did not answer" in items[name]["error"]
        assert src.client.get(f"/v1/instances/{name}").json["state"] == "running"
        assert op["result"]["moved"] == 0
    finally:
        del src.root.config.peers["gone"]


def test_each_instance_goes_to_the_peer_with_the_most_free_memory():
    from types import SimpleNamespace

    from agent.errors import Unprocessable
    from agent.migration.evacuation import Evacuation
    ev = Evacuation(None, None, None)
    room = {"a": {"memory_available_bytes": 1000 << 20, "instances": 0},
            "b": {"memory_available_bytes": 700 << 20, "instances": 0}}

    def inst(mib):
        return SimpleNamespace(spec_dict=lambda: {"memory_mib": mib})
    assert [ev._choose(inst(256), room, {}) for _ in range(4)] == ["a", "a", "b", "a"]
    with pytest.raises(Unprocessable, match="peer 'c' is down.*peer 'b' has 444 MiB memory free, it needs 512 MiB"):
        ev._choose(inst(512), room, {"c": "peer 'c' is down"})


def test_a_cancelled_evacuation_leaves_the_rest_here_and_restore_waits_for_it(src, hosts, monkeypatch):
    import threading

    from hypervisor import fake
    monkeypatch.setattr(fake, "FAKE_ROUND_S", 0.2)  # a guest that never converges: 10 s of pre-copy
    s = src.root.driver
    names = [_vm(src), _vm(src)]
    s.converges, s.userfaultfd = False, False  # no post-copy: the migration stays cancellable
    try:
        op = src.client.post("/v1/host/evacuate", json={"instances": names, "parallel": 1}).json
        seen, tick = None, threading.Event()
        for _ in range(300):
            seen = src.client.get(f"/v1/operations/{op['id']}").json
            if any(i["status"] == "migrating" for i in seen["progress"].get("instances") or []):
                break
            tick.wait(0.02)
        assert [i["status"] for i in seen["progress"]["instances"]] == ["migrating", "pending"], seen
        r = src.client.post("/v1/host/restore")
        assert r.status_code == 409 and "evacuation is running" in r.json["error"]["message"], r.json
        assert src.client.delete(f"/v1/operations/{op['id']}").status_code == 200
        done = _wait(src.client, op)
        assert done["status"] == "cancelled", done
        items = done["progress"]["instances"]
        assert items[0]["status"] == "failed" and "cancel" in items[0]["error"], items
        assert items[1]["status"] == "pending", items
        for name in names:
            assert src.client.get(f"/v1/instances/{name}").json["state"] == "running"
        assert src.client.get("/v1/host").json["draining"] is True
        assert src.client.post("/v1/host/restore").status_code == 200
    finally:
        s.converges, s.userfaultfd = True, True
