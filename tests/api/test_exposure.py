"""What other users of the host and reader tokens can learn: a VM's seed (its user_data) is
root's only; an error a reader sees has no host paths, argv or stderr (admins see it all)."""
from __future__ import annotations

import stat
from unittest import mock

from agent.errors import CommandFailed
from hypervisor.fake import FakeDriver
from tests.api.test_lifecycle_failures import _create_vm, _wait, app  # noqa: F401 - the fixture

SECRET_PATH = "/var/lib/nodeagent/pools/default/i-secret-disk"
FAILURE = CommandFailed(f"qemu-img info {SECRET_PATH} failed: Could not open '{SECRET_PATH}': denied",
                        argv=["qemu-img", "info", "-U", SECRET_PATH], returncode=1,
                        stderr=f"qemu-img: Could not open '{SECRET_PATH}'")


def test_the_seed_and_the_instance_dirs_are_root_only(app):  # noqa: F811
    _, client, root = app
    op = _wait(client, client.post("/v1/instances", json={
        "name": "seeded", "kind": "vm", "image": "tiny-vm", "memory_mib": 64, "network": "none",
        "user_data": "#cloud-config\npassword: hunter2\n"}).json)
    assert op["status"] == "succeeded", op
    d = root.config.state_path / "instances" / op["target"]
    assert stat.S_IMODE((d / "seed.iso").stat().st_mode) == 0o600
    for path in (d, d.parent, root.config.state_path,  # QEMU (another user) traverses them; nobody else lists them
                 root.config.state_path.parent / "pool" / "volumes", root.config.state_path.parent / "pool" / "blobs"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o711, path
    # the records hold env and user_data
    assert stat.S_IMODE(root.config.db_path.stat().st_mode) == 0o600
    for suffix in ("-wal", "-shm"):
        p = root.config.db_path.with_name(root.config.db_path.name + suffix)
        assert not p.exists() or stat.S_IMODE(p.stat().st_mode) == 0o600, p


def _reader(app):  # noqa: F811
    flask_app, _, root = app
    reader = flask_app.test_client()
    reader.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {root.tokens.create('watcher', 'reader')}"
    return reader


def test_a_reader_sees_operation_errors_without_paths_argv_or_stderr(app):  # noqa: F811
    _, client, root = app
    reader = _reader(app)
    with mock.patch.object(FakeDriver, "define", side_effect=FAILURE):
        op = _wait(client, _create_vm(client, "leaky"))
    full = client.get(f"/v1/operations/{op['id']}").json["error"]
    assert SECRET_PATH in full["message"] and full["details"]["argv"][-1] == SECRET_PATH  # admins: all of it
    for r in (reader.get(f"/v1/operations/{op['id']}"), reader.get(f"/v1/operations/{op['id']}/wait?timeout=1")):
        assert r.status_code == 200
        err = r.json["error"]
        assert set(err) == {"code", "message"} and err["code"] == "command_failed", err
        assert "/var/lib" not in err["message"] and "<path>" in err["message"], err
        assert op["id"] in err["message"]  # the reference to the full error
    listed = [o for o in reader.get("/v1/operations").json["operations"] if o["id"] == op["id"]]
    assert listed and "/var/lib" not in str(listed[0]["error"]) and "details" not in listed[0]["error"]


def test_a_reader_sees_instance_errors_and_request_errors_without_paths(app):  # noqa: F811
    _, client, root = app
    reader = _reader(app)
    inst = client.get("/v1/instances").json  # prime the admin's cached list
    with mock.patch.object(FakeDriver, "define", side_effect=FAILURE), \
            mock.patch.object(FakeDriver, "delete", side_effect=FAILURE):
        _wait(client, _create_vm(client, "leaky2"))
        assert SECRET_PATH in client.get("/v1/instances/leaky2").json["error"]
        assert SECRET_PATH in client.get("/v1/instances").data.decode()
        for body in (reader.get("/v1/instances/leaky2").json, reader.get("/v1/instances").json):
            assert "/var/lib" not in str(body) and "<path>" in str(body), body
        with mock.patch.object(FakeDriver, "console_log", side_effect=FAILURE):
            r = reader.get("/v1/instances/leaky2/logs")
            assert r.status_code == 500 and set(r.json["error"]) == {"code", "message"}, r.json
            assert "/var/lib" not in r.json["error"]["message"]
            assert SECRET_PATH in client.get("/v1/instances/leaky2/logs").json["error"]["message"]
    assert inst is not None
    assert client.delete("/v1/instances/leaky2").status_code == 200


def test_a_reader_sees_migration_errors_without_paths(app):  # noqa: F811
    from agent.migration.source import MigrationSource
    _, client, root = app
    reader = _reader(app)
    assert _wait(client, _create_vm(client, "mover"))["status"] == "succeeded"
    with mock.patch.object(MigrationSource, "_migrate_vm", side_effect=FAILURE):
        r = client.post("/v1/migrations", json={"instance": "mover", "destination": "far", "mode": "live"})
        assert r.status_code == 202, r.json
        assert _wait(client, r.json)["status"] == "failed"
    mig = r.json["id"]
    assert SECRET_PATH in client.get(f"/v1/migrations/{mig}").json["error"]["message"]
    err = reader.get(f"/v1/migrations/{mig}").json["error"]
    assert set(err) == {"code", "message"} and "/var/lib" not in err["message"], err


def test_a_head_of_the_event_stream_leaves_no_subscription(app):  # noqa: F811
    _, _, root = app
    reader = _reader(app)
    for _ in range(3):
        assert reader.head("/v1/events").status_code == 200
    assert not root.events._subs
