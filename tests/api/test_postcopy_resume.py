"""Post-copy recovery (README "Post-copy failures"), on two in-process agents with fake drivers
that reach each other over real HTTP: a broken post-copy is resumed by the migration itself
when the destination answers again ([migration] postcopy_resume_window_s / _attempts), else
the guest stays split (record error) and POST /v1/migrations/{id}/resume (CLI `nodeagent
migrate resume ID`) finishes it later, after either agent's restart too; a resumed copy ends
as a migration does (source record gone, destination's running). Bad input: 404 for an
unknown id, 409 for a migration that left nothing split, 403 for a reader."""
from __future__ import annotations

import json
import time
import uuid

import pytest

from agent.migration import source as source_mod
from tests.api.test_migration_controls import _migrate, _vm, _wait, peered_hosts


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    yield from peered_hosts(tmp_path_factory.mktemp("pcresume"))


@pytest.fixture
def src(hosts, monkeypatch):
    monkeypatch.setattr(source_mod, "RESUME_POLL_S", 0.05)
    s, d = hosts
    for h in (s, d):
        drv = h.root.driver
        drv.userfaultfd, drv.converges, drv.postcopy_s, drv.postcopy_link_cut = True, True, 0.0, False
    s.root.config.migration.postcopy_resume_window_s = 30
    s.root.config.migration.postcopy_resume_attempts = 3
    return s


def _cut_during_postcopy(src, name, **controls) -> dict:
    src.root.driver.converges, src.root.driver.postcopy_link_cut = False, True
    r = _migrate(src, name, postcopy=True, **controls)
    assert r.status_code == 202, r.json
    return r.json


def _moved(src, dst, name) -> None:
    """The migration ended as one does: the source forgot the instance, the destination runs it whole."""
    assert src.client.get(f"/v1/instances/{name}").status_code == 404
    assert src.root.driver.find(name) is None
    inst = dst.client.get(f"/v1/instances/{name}").json
    assert inst["state"] == "running" and inst["error"] is None, inst
    info = dst.root.driver.get(name)
    assert (info.state, info.reason) == ("running", None)


def test_the_link_back_within_the_window_resumes_it_by_itself(src, hosts):
    dst = hosts[1]
    name = _vm(src)
    calls = src.root.driver.resume_calls
    op = _cut_during_postcopy(src, name)
    deadline = time.monotonic() + 30
    while src.client.get(f"/v1/operations/{op['id']}").json["progress"].get("phase") not in ("postcopy-paused",
                                                                                              "resume"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    src.root.driver.postcopy_link_cut = False  # the link is back
    op = _wait(src.client, op)
    assert op["status"] == "succeeded", op
    assert op["result"]["postcopy"] is True and op["result"]["destination"] == "dst"
    assert src.root.driver.resume_calls > calls
    _moved(src, dst, name)
    assert dst.client.delete(f"/v1/instances/{name}").json == {"deleted": True}


def test_resume_after_the_window_and_restarts_then_bad_input(src, hosts, monkeypatch):
    """The retries run out (the link stays down): the guest stays split and says how to resume
    it; agents' restarts keep that; a resume while the link is still down fails the same way;
    once it is back, the API resume moves it. Then 404 / 409 / 403 for what is not resumable."""
    dst = hosts[1]
    src.root.config.migration.postcopy_resume_attempts = 2
    name = _vm(src)
    calls = src.root.driver.resume_calls
    first = _wait(src.client, _cut_during_postcopy(src, name))
    assert first["status"] == "failed" and first["error"]["code"] == "postcopy_failed", first
    assert src.root.driver.resume_calls == calls + 2
    for words in ("resumed 2 time(s)", f"/v1/migrations/{first['id']}/resume", f"migrate resume {first['id']}"):
        assert words in first["error"]["message"], first["error"]["message"]
    inst = src.client.get(f"/v1/instances/{name}").json
    assert inst["state"] == "error" and f"/v1/migrations/{first['id']}/resume" in inst["error"], inst
    assert src.client.get(f"/v1/migrations/{first['id']}").json["status"] == "failed"

    # the destination's agent restarts before its QEMU saw the break (still "post-copy"): kept incoming
    dst.root.driver._vms[name].reason = "postcopy"
    dst.root.migrations.recover()
    dst.root.instances.reconcile()
    assert dst.client.get(f"/v1/instances/{name}").json["state"] == "incoming"
    dst.root.driver._vms[name].reason = "postcopy-failed"
    # both agents restart (what they do at start): neither calls it running nor destroys a half
    src.root.instances.reconcile()
    dst.root.migrations.recover()
    dst.root.instances.reconcile()
    assert src.client.get(f"/v1/instances/{name}").json["state"] == "error"
    assert dst.client.get(f"/v1/instances/{name}").json["state"] == "error"
    assert src.root.driver.postcopy_split(name) and dst.root.driver.find(name) is not None

    # the link is still down: the resume fails, still split, and names itself for the next try
    r = src.client.post(f"/v1/migrations/{first['id']}/resume")
    assert r.status_code == 202, r.json
    again = _wait(src.client, r.json)
    assert again["status"] == "failed" and again["error"]["code"] == "postcopy_failed", again
    assert f"/v1/migrations/{again['id']}/resume" in again["error"]["message"]
    assert src.client.get(f"/v1/instances/{name}").json["state"] == "error"

    # a reader may not; the link back: the resume (of the first id still) moves it, by the CLI
    reader = src.root.tokens.create(f"r-{uuid.uuid4().hex[:6]}", "reader")
    r = src.client.post(f"/v1/migrations/{first['id']}/resume", headers={"Authorization": f"Bearer {reader}"})
    assert r.status_code == 403, r.json
    src.root.driver.postcopy_link_cut = False
    from click.testing import CliRunner

    from agent.cli import main
    monkeypatch.setenv("NODEAGENT_URL", src.url)
    monkeypatch.setenv("NODEAGENT_TOKEN", src.client.environ_base["HTTP_AUTHORIZATION"].split()[1])
    out = CliRunner().invoke(main, ["migrate", "resume", first["id"], "--json"])
    assert out.exit_code == 0, out.output
    done = json.loads(out.output)
    assert done["status"] == "succeeded" and done["result"]["postcopy"] is True, done
    assert src.client.get(f"/v1/migrations/{done['id']}").json["status"] == "succeeded"
    _moved(src, dst, name)

    # nothing is split any more: 409; an unknown id: 404; a migration that never split: 409
    r = src.client.post(f"/v1/migrations/{first['id']}/resume")
    assert r.status_code == 409, r.json
    assert src.client.post(f"/v1/migrations/{uuid.uuid4().hex}/resume").status_code == 404
    assert src.client.post("/v1/migrations/../resume").status_code in (400, 404)
    assert dst.client.delete(f"/v1/instances/{name}").json == {"deleted": True}
    other = _vm(src)
    src.root.driver.converges = True
    ok = _wait(src.client, _migrate(src, other).json)
    assert ok["status"] == "succeeded", ok
    r = src.client.post(f"/v1/migrations/{ok['id']}/resume")
    assert r.status_code == 409 and "succeeded" in r.json["error"]["message"], r.json
    assert dst.client.delete(f"/v1/instances/{other}").json == {"deleted": True}


def test_a_migration_that_failed_before_postcopy_is_not_resumable(src, hosts):
    name = _vm(src)
    src.root.driver.converges = False  # never converges, post-copy not allowed: the timeout aborts it
    op = _wait(src.client, _migrate(src, name, postcopy=False, completion_timeout_s=0.05,
                                    timeout_action="abort").json)
    assert op["status"] == "failed", op
    r = src.client.post(f"/v1/migrations/{op['id']}/resume")
    assert r.status_code == 409 and "nothing to resume" in r.json["error"]["message"], r.json
    assert src.client.get(f"/v1/instances/{name}").json["state"] == "running"
    assert src.client.delete(f"/v1/instances/{name}").json == {"deleted": True}


def test_zero_attempts_leaves_it_split_at_once(src, hosts):
    """[migration] postcopy_resume_attempts = 0: no automatic resume (the operator decides)."""
    dst = hosts[1]
    src.root.config.migration.postcopy_resume_attempts = 0
    name = _vm(src)
    calls = src.root.driver.resume_calls
    op = _wait(src.client, _cut_during_postcopy(src, name))
    assert op["status"] == "failed" and op["error"]["code"] == "postcopy_failed", op
    assert src.root.driver.resume_calls == calls
    for h in (src, dst):
        assert h.client.delete(f"/v1/instances/{name}").json == {"deleted": True}
