"""Failures in the middle of an instance's life: a component down during create or delete
never leaves a record stuck in `creating`; what cannot be removed is in state `error`,
deletable and retried. In-process app (Flask test client) on the fake drivers, with one
fault injected per test (mock.patch of one driver method)."""
from __future__ import annotations

from unittest import mock

import pytest

from agent.errors import Unavailable
from hypervisor.fake import FakeDriver
from tests.api.conftest import inprocess_app

DOWN = Unavailable("libvirtd is not running: start it with `libvirtd -d`")


@pytest.fixture
def app(tmp_path):
    app, client, root = inprocess_app(tmp_path, peers={"far": {"url": "http://127.0.0.1:9"}})
    yield app, client, root
    root.stop()


def _wait(client, op):
    return client.get(f"/v1/operations/{op['id']}/wait?timeout=30").json


def _leftovers(root, inst_id):
    vol = f"i-{inst_id[:12]}-disk"
    files = [p for p in root.config.state_path.parent.rglob(f"*{vol}*")]
    return files, (root.config.state_path / "instances" / inst_id).exists()


def _create_vm(client, name):
    r = client.post("/v1/instances", json={"name": name, "kind": "vm", "image": "tiny-vm",
                                           "memory_mib": 64, "network": "none"})
    assert r.status_code == 202, r.json
    return r.json


def test_create_with_the_hypervisor_down_ends_in_error_then_delete_retries(app):
    _, client, root = app
    with mock.patch.object(FakeDriver, "define", side_effect=DOWN), \
            mock.patch.object(FakeDriver, "delete", side_effect=DOWN):
        op = _wait(client, _create_vm(client, "down1"))
        assert op["status"] == "failed" and op["error"]["code"] == "unavailable", op
        assert "cleanup incomplete" in op["error"]["message"]
        inst = client.get("/v1/instances/down1").json
        assert inst["state"] == "error" and "DELETE it again" in inst["error"], inst  # never stuck in creating
        files, instance_dir = _leftovers(root, op["target"])
        assert files and instance_dir  # kept: the VM may still use them
        r = client.delete("/v1/instances/down1")  # still down: a clear 503, still error
        assert r.status_code == 503 and r.json["error"]["code"] == "unavailable", r.json
        assert client.get("/v1/instances/down1").json["state"] == "error"
        r = client.post("/v1/instances/down1/actions", json={"action": "start"})
        assert r.status_code == 409, r.json
    assert client.delete("/v1/instances/down1").json == {"deleted": True}  # the hypervisor is back
    assert _leftovers(root, op["target"]) == ([], False)
    assert client.get("/v1/instances/down1").status_code == 404


def test_a_fault_after_the_domain_was_defined_removes_the_domain_too(app):
    _, client, root = app
    real_define = FakeDriver.define

    def define_then_drop(self, spec):
        real_define(self, spec)  # libvirt defined it, then the connection dropped
        raise DOWN

    with mock.patch.object(FakeDriver, "define", define_then_drop):
        op = _wait(client, _create_vm(client, "mid1"))
    assert op["status"] == "failed" and op["error"]["code"] == "unavailable", op
    assert client.get("/v1/instances/mid1").status_code == 404
    assert root.driver.find("mid1") is None
    assert _leftovers(root, op["target"]) == ([], False)


def test_the_agent_retries_a_pending_removal_at_start(app, tmp_path):
    flask_app, client, root = app
    with mock.patch.object(FakeDriver, "define", side_effect=DOWN), \
            mock.patch.object(FakeDriver, "delete", side_effect=DOWN):
        op = _wait(client, _create_vm(client, "retry1"))
    assert client.get("/v1/instances/retry1").json["state"] == "error"
    root.stop()
    root.started = False
    assert root.instances.recover() == 1  # what an agent start runs
    assert client.get("/v1/instances/retry1").status_code == 404
    assert _leftovers(root, op["target"]) == ([], False)


def test_a_delete_that_fails_midway_is_error_not_a_half_record(app):
    _, client, root = app
    op = _wait(client, _create_vm(client, "del1"))
    assert op["status"] == "succeeded", op
    with mock.patch.object(type(root.store), "release", side_effect=Unavailable("pool down")):
        r = client.delete("/v1/instances/del1")
    assert r.status_code == 503, r.json
    inst = client.get("/v1/instances/del1").json
    assert inst["state"] == "error" and "pool down" in inst["error"], inst
    assert root.driver.find("del1") is None  # the steps that could run did
    assert client.delete("/v1/instances/del1").json == {"deleted": True}
    assert _leftovers(root, op["target"]) == ([], False)
