"""CPU model per host group ([hypervisor] cpu_model, cpu_group; README "CPU model"), on two
in-process agents with fake drivers reaching each other over real HTTP: VMs are defined with
their host's named model and keep it when they move; a destination whose group runs another
model is refused with 422 before anything moves (by the source, from the destination's
facts; by the destination itself at prepare when the source could not ask)."""
from __future__ import annotations

import pytest

from agent.errors import Unavailable
from tests.api.test_migration_controls import _migrate, _vm, _wait, peered_hosts


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    yield from peered_hosts(tmp_path_factory.mktemp("migcpu"))


def _group(host, model: str, group: str | None) -> None:
    host.root.config.hypervisor.cpu_model, host.root.config.hypervisor.cpu_group = model, group
    host.root.driver.cpu_model = model


def test_the_host_reports_its_model_and_group(hosts):
    src, _ = hosts
    _group(src, "qemu64", "rack-a")
    body = src.client.get("/v1/host").json
    assert (body["cpu_model"], body["cpu_group"]) == ("qemu64", "rack-a")


def test_within_a_group_the_named_model_moves_with_the_guest(hosts):
    src, dst = hosts
    _group(src, "qemu64", "rack-a")
    _group(dst, "qemu64", "rack-a")
    name = _vm(src)
    assert ">qemu64</model>" in src.root.driver.guest_cpu(name)
    op = _wait(src.client, _migrate(src, name).json)
    assert op["status"] == "succeeded", op
    assert ">qemu64</model>" in dst.root.driver.guest_cpu(name)
    assert dst.client.delete(f"/v1/instances/{name}").json == {"deleted": True}


def test_a_group_of_another_model_is_refused_before_anything_moves(hosts, monkeypatch):
    src, dst = hosts
    _group(src, "qemu64", "rack-a")
    _group(dst, "Haswell-noTSX", "rack-b")
    name = _vm(src)
    r = _migrate(src, name)
    if r.status_code == 202:  # the check ran in the operation
        op = _wait(src.client, r.json)
        assert op["status"] == "failed" and op["error"]["code"] == "unprocessable", op
        message = op["error"]["message"]
    else:
        assert r.status_code == 422, r.json
        message = r.json["error"]["message"]
    for words in ("'Haswell-noTSX'", "host group 'rack-b'", "'qemu64'", "nothing moved"):
        assert words in message, message
    assert src.client.get(f"/v1/instances/{name}").json["state"] == "running"
    assert dst.client.get(f"/v1/instances/{name}").status_code == 404
    # the source could not read the destination's facts (fault injected): its prepare refuses
    from agent.migration.peer import PeerClient

    def no_facts(self):
        raise Unavailable("no answer")
    monkeypatch.setattr(PeerClient, "host", no_facts)
    op = _wait(src.client, _migrate(src, name).json)
    assert op["status"] == "failed" and op["error"]["code"] == "unprocessable", op
    assert "host group 'rack-b'" in op["error"]["message"] and "does not take" in op["error"]["message"], op
    assert src.client.get(f"/v1/instances/{name}").json["state"] == "running"
    assert dst.client.get(f"/v1/instances/{name}").status_code == 404
    assert not [r for r in dst.root.records.list() if r.name == name]
    monkeypatch.undo()
    _group(dst, "host-model", None)  # a host without a named model takes it (its check: can it run it)
    op = _wait(src.client, _migrate(src, name).json)
    assert op["status"] == "succeeded", op
    assert dst.client.delete(f"/v1/instances/{name}").json == {"deleted": True}


def test_a_model_this_hosts_qemu_cannot_run_is_refused_at_prepare(hosts):
    src, dst = hosts
    _group(src, "Pentium-Imaginary", None)
    _group(dst, "host-model", None)
    name = _vm(src)
    op = _wait(src.client, _migrate(src, name).json)
    assert op["status"] == "failed" and op["error"]["code"] == "unprocessable", op
    assert "cannot emulate CPU model 'Pentium-Imaginary'" in op["error"]["message"], op
    assert src.client.get(f"/v1/instances/{name}").json["state"] == "running"
    assert src.client.delete(f"/v1/instances/{name}").json == {"deleted": True}
