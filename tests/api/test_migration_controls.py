"""Live-migration controls (POST /v1/migrations: max_downtime_ms, bandwidth_mib_s,
completion_timeout_s + timeout_action, auto_converge, postcopy) and the default policy, on two
in-process agents with fake drivers that reach each other over real HTTP (werkzeug servers on
127.0.0.1): bad controls are 422 before anything moves; good ones reach the driver; a busy
guest switches to post-copy, after which a cancel is 409."""
from __future__ import annotations

import socket
import threading
import uuid

import pytest

from tests.api.conftest import inprocess_app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Host:
    def __init__(self, tmp_path, name: str, port: int, peer: str, peer_port: int, uri: str):
        from werkzeug.serving import make_server
        (tmp_path / name).mkdir()
        self.app, self.client, self.root = inprocess_app(
            tmp_path / name, hypervisor={"driver": "fake", "uri": uri, "migration_uri": uri},
            peers={peer: {"url": f"http://127.0.0.1:{peer_port}"}})
        self.url = f"http://127.0.0.1:{port}"
        self.server = make_server("127.0.0.1", port, self.app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.root.stop()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    yield from peered_hosts(tmp_path_factory.mktemp("migctl"))


def peered_hosts(tmp):
    """(source, destination): each the other's configured peer, with peer tokens both ways."""
    tag = uuid.uuid4().hex[:6]
    p1, p2 = _free_port(), _free_port()
    src = _Host(tmp, "src", p1, "dst", p2, f"fake://{tag}-src")
    dst = _Host(tmp, "dst", p2, "src", p1, f"fake://{tag}-dst")
    src.root.config.peers["dst"].token = dst.root.tokens.create("src", "peer")
    dst.root.config.peers["src"].token = src.root.tokens.create("dst", "peer")
    yield src, dst
    src.stop()
    dst.stop()


@pytest.fixture
def src(hosts):
    s, d = hosts
    for h in (s, d):
        d = h.root.driver
        d.userfaultfd, d.converges, d.postcopy_s, d.postcopy_link_cut = True, True, 0.0, False
    return s


def _wait(client, op, timeout=30):
    return client.get(f"/v1/operations/{op['id']}/wait?timeout={timeout}").json


def _vm(host, kind="vm", start=True) -> str:
    name = f"{kind[0]}-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "kind": kind, "image": "tiny-vm", "memory_mib": 64, "network": "none", "start": start}
    if kind == "container":
        body.update(image="tiny-ct", command=["/bin/sh", "-c", "sleep 600"])
    r = host.client.post("/v1/instances", json=body)
    assert r.status_code == 202, r.json
    assert _wait(host.client, r.json)["status"] == "succeeded"
    return name


def _migrate(host, name, **controls):
    return host.client.post("/v1/migrations", json={"instance": name, "destination": "dst", **controls})


def _nothing_moved(host, name, ops_before):
    assert host.client.get(f"/v1/instances/{name}").json["state"] == "running"
    ops = host.client.get("/v1/operations").json["operations"]
    assert [o for o in ops if o["kind"] == "migration"] == [o for o in ops_before if o["kind"] == "migration"]


@pytest.mark.parametrize("controls, says", [
    ({"speed": 5}, "speed"),
    ({"completion_timeout_s": 0}, "completion_timeout_s"),
    ({"completion_timeout_s": -3}, "completion_timeout_s"),
    ({"max_downtime_ms": 0}, "max_downtime_ms"),
    ({"bandwidth_mib_s": 0}, "bandwidth_mib_s"),
    ({"timeout_action": "explode", "completion_timeout_s": 5}, "timeout_action"),
    ({"postcopy": "yes"}, "postcopy"),
    ({"auto_converge": 1}, "auto_converge"),
    ({"timeout_action": "postcopy", "completion_timeout_s": 5, "postcopy": False}, "postcopy=false"),
    ({"postcopy": True, "mode": "cold"}, "mode=live"),
    ({"timeout_action": "pause"}, "needs completion_timeout_s"),
])
def test_bad_controls_are_422_before_anything_moves(src, controls, says):
    name = _vm(src)
    before = src.client.get("/v1/operations").json["operations"]
    r = _migrate(src, name, **controls)
    assert r.status_code == 422, r.json
    assert says in r.json["error"]["message"], r.json
    _nothing_moved(src, name, before)
    assert not [m for m in src.root.driver.migrations if m["name"] == name]


def test_postcopy_where_the_kernel_lacks_userfaultfd_is_422_and_the_policy_falls_back(src, hosts):
    name = _vm(src)
    src.root.driver.userfaultfd = False
    before = src.client.get("/v1/operations").json["operations"]
    for controls in ({"postcopy": True}, {"timeout_action": "postcopy", "completion_timeout_s": 5}):
        r = _migrate(src, name, **controls)
        assert r.status_code == 422 and "userfaultfd" in r.json["error"]["message"], r.json
    _nothing_moved(src, name, before)
    op = _wait(src.client, _migrate(src, name).json)  # not asked for: the policy goes without it
    assert op["status"] == "succeeded", op
    assert src.root.driver.migrations[-1]["options"].postcopy is False
    assert hosts[1].client.get(f"/v1/instances/{name}").json["state"] == "running"


def test_vm_only_controls_on_a_container_or_a_stopped_vm_are_422(src):
    ct = _vm(src, start=False)  # a stopped VM moves offline
    r = _migrate(src, ct, max_downtime_ms=100)
    assert r.status_code == 422 and "offline" in r.json["error"]["message"], r.json
    img = src.client.post("/v1/images", json={"name": "tiny-ct", "format": "oci",
                                              "source": {"type": "file", "path": str(_ct_image(src))}})
    assert _wait(src.client, img.json)["status"] == "succeeded"
    c = _vm(src, kind="container")
    r = _migrate(src, c, max_downtime_ms=100, bandwidth_mib_s=10, mode="refresh")
    assert r.status_code == 422 and "container" in r.json["error"]["message"], r.json


def _ct_image(host) -> str:
    from testbed.ocibuild import busybox_layers, write_layout
    path = host.root.config.state_path.parent / "busybox"
    return path if path.exists() else write_layout(str(path), {"latest": busybox_layers()})


def test_controls_reach_the_driver_and_the_migration_shows_them(src, hosts):
    name = _vm(src)
    r = _migrate(src, name, max_downtime_ms=120, bandwidth_mib_s=64, completion_timeout_s=30,
                 timeout_action="pause", auto_converge=False, postcopy=False)
    assert r.status_code == 202, r.json
    op = _wait(src.client, r.json)
    assert op["status"] == "succeeded", op
    o = src.root.driver.migrations[-1]["options"]
    assert (o.max_downtime_ms, o.bandwidth_mib_s, o.completion_timeout_s, o.timeout_action, o.auto_converge,
            o.postcopy, o.postcopy_after_s) == (120, 64, 30, "pause", False, False, None)
    mig = src.client.get(f"/v1/migrations/{op['id']}").json
    assert mig["options"]["max_downtime_ms"] == 120 and mig["options"]["postcopy"] is False, mig
    assert mig["postcopy"] is False and mig["iterations"] == 1
    assert hosts[1].client.get(f"/v1/instances/{name}").json["state"] == "running"


def test_the_default_policy_finishes_a_busy_guest_in_postcopy_which_cannot_be_cancelled(src, hosts):
    """A guest that never converges: pre-copy, auto-converge, then (the policy: memory passes
    that did not shrink the dirty set) post-copy; the operation says so, and from there a cancel is 409."""
    name = _vm(src)
    src.root.driver.converges = False
    src.root.driver.postcopy_s = 1.5  # post-copy takes a while: the cancel lands in it
    op = _migrate(src, name).json
    deadline = threading.Event()
    seen = None
    for _ in range(200):
        seen = src.client.get(f"/v1/operations/{op['id']}").json
        if seen["progress"].get("phase") == "postcopy" or seen["status"] != "running" and seen["status"] != "pending":
            break
        deadline.wait(0.02)
    assert seen["progress"]["phase"] == "postcopy", seen
    assert seen["progress"]["iterations"] >= 2 + src.root.config.migration.postcopy_after_stalled
    assert seen["progress"]["dirty_rate"] > 0 and "remaining_bytes" in seen["progress"]
    r = src.client.delete(f"/v1/operations/{op['id']}")
    assert r.status_code == 409 and "postcopy" in r.json["error"]["message"], r.json
    done = _wait(src.client, op)
    assert done["status"] == "succeeded" and done["result"]["postcopy"] is True, done
    o = src.root.driver.migrations[-1]["options"]
    assert o.postcopy and o.auto_converge and o.postcopy_after_stalled == 3 and o.postcopy_after_s == 60
    assert src.client.get(f"/v1/migrations/{op['id']}").json["postcopy"] is True
    assert hosts[1].client.get(f"/v1/instances/{name}").json["state"] == "running"
    assert src.client.get(f"/v1/instances/{name}").status_code == 404


def test_a_busy_guest_with_postcopy_off_is_aborted_at_the_timeout_and_stays(src, hosts):
    name = _vm(src)
    src.root.driver.converges = False
    op = _wait(src.client, _migrate(src, name, postcopy=False, completion_timeout_s=0.05).json)
    assert op["status"] == "failed" and "did not converge" in op["error"]["message"], op
    assert src.client.get(f"/v1/instances/{name}").json["state"] == "running"
    assert hosts[1].client.get(f"/v1/instances/{name}").status_code == 404


def test_a_link_cut_during_postcopy_leaves_both_halves_and_says_so(src, hosts):
    """Post-copy failure semantics: the guest is split, so nothing is destroyed or rolled back;
    the operation fails with postcopy_failed, the source's record is in state error (not
    running), the destination keeps its half, and neither agent's restart calls it running."""
    dst = hosts[1]
    name = _vm(src)
    src.root.driver.converges, src.root.driver.postcopy_link_cut = False, True
    op = _wait(src.client, _migrate(src, name, postcopy=True).json)
    assert op["status"] == "failed" and op["error"]["code"] == "postcopy_failed", op
    inst = src.client.get(f"/v1/instances/{name}").json
    assert inst["state"] == "error" and "split" in inst["error"], inst
    assert src.root.driver.get(name).state == "paused"
    half = dst.root.driver.get(name)
    assert half.reason == "postcopy-failed"  # not destroyed: it holds the guest's newest state
    incoming = [r for r in dst.root.records.list() if r.name == name]
    assert incoming and incoming[0].state == "incoming"
    # a restart before the destination's QEMU saw the break (still "post-copy"):
    dst.root.driver._vms[name].reason = "postcopy"
    dst.root.migrations.recover()
    assert dst.client.get(f"/v1/instances/{name}").json["state"] == "incoming"  # not running, not removed
    assert dst.root.driver.find(name) is not None
    dst.root.driver._vms[name].reason = "postcopy-failed"
    src.root.instances.reconcile()  # as after a restart of either agent
    dst.root.migrations.recover()
    assert src.client.get(f"/v1/instances/{name}").json["state"] == "error"
    assert dst.client.get(f"/v1/instances/{name}").json["state"] == "error"
    assert dst.root.driver.find(name) is not None


def test_a_destination_that_cannot_run_postcopy(src, hosts):
    """Asked for: the migration fails (422) with nothing moved and nothing left there; the
    policy's own post-copy is dropped instead."""
    dst = hosts[1]
    dst.root.driver.userfaultfd = False
    name = _vm(src)
    op = _wait(src.client, _migrate(src, name, postcopy=True).json)
    assert op["status"] == "failed" and op["error"]["code"] == "unprocessable", op
    assert "destination 'dst' cannot run it" in op["error"]["message"]
    assert src.client.get(f"/v1/instances/{name}").json["state"] == "running"
    assert not [r for r in dst.root.records.list() if r.name == name]
    op = _wait(src.client, _migrate(src, name).json)
    assert op["status"] == "succeeded", op
    assert src.root.driver.migrations[-1]["options"].postcopy is False
    assert src.client.get(f"/v1/migrations/{op['id']}").json["options"]["postcopy"] is False


def test_the_cli_sends_the_controls(src, hosts, monkeypatch):
    import json

    from click.testing import CliRunner

    from agent.cli import main
    monkeypatch.setenv("NODEAGENT_URL", src.url)
    monkeypatch.setenv("NODEAGENT_TOKEN", src.client.environ_base["HTTP_AUTHORIZATION"].split()[1])
    name = _vm(src)
    bad = CliRunner().invoke(main, ["migrate", name, "--to", "dst", "--timeout", "0"])
    assert bad.exit_code == 1 and "completion_timeout_s" in bad.output, bad.output
    ok = CliRunner().invoke(main, ["migrate", name, "--to", "dst", "--max-downtime-ms", "150", "--bandwidth", "10",
                                   "--timeout", "5", "--timeout-action", "postcopy", "--postcopy",
                                   "--no-auto-converge", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["status"] == "succeeded"
    o = src.root.driver.migrations[-1]["options"]
    assert (o.max_downtime_ms, o.bandwidth_mib_s, o.completion_timeout_s, o.timeout_action, o.postcopy,
            o.auto_converge) == (150, 10, 5, "postcopy", True, False)
