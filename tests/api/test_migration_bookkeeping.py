"""The source's live figures of a migration (what GET /v1/migrations/{id} shows while it runs):
its worker and ``create`` fill the same entry whoever comes first, and it leaves when the
operation ends (in process, fake drivers)."""
from __future__ import annotations

import threading
import time
from unittest import mock

from agent.migration.source import RECENT_MIGRATIONS, MigrationSource
from tests.api.test_lifecycle_failures import _create_vm, _wait, app  # noqa: F401 - the fixture


def _pruned(src, timeout: float = 10) -> bool:
    """Whether the live entries empty (on_final runs just after a waiter sees the end)."""
    deadline = time.monotonic() + timeout
    while src._live and time.monotonic() < deadline:
        time.sleep(0.01)
    return src._live == {}


def test_figures_the_worker_writes_before_create_returns_are_kept_and_pruned_at_the_end(app):  # noqa: F811
    _, client, root = app
    src = root.migrations.source
    assert _wait(client, _create_vm(client, "mover"))["status"] == "succeeded"
    written, go_on = threading.Event(), threading.Event()

    def migrate(self, op, inst_id, peer, mode, *_controls):
        self._track(op.id, {}).update(total=1000, remaining=10, dirty_rate=5)
        written.set()
        assert go_on.wait(30)
        return {"name": "mover", "destination": peer.name, "mode": mode, "bytes": 990}

    submit = root.operations.submit

    def submit_then_let_the_worker_run_first(*args, **kw):
        op = submit(*args, **kw)
        assert written.wait(30)  # the worker made its entry before create fills it
        return op

    with mock.patch.object(MigrationSource, "_migrate_vm", migrate), \
            mock.patch.object(root.operations, "submit", submit_then_let_the_worker_run_first):
        r = client.post("/v1/migrations", json={"instance": "mover", "destination": "far", "mode": "live"})
        assert r.status_code == 202, r.json
        mig = r.json["id"]
        running = client.get(f"/v1/migrations/{mig}").json
        assert running["destination"] == "far" and running["mode"] == "live" and running["name"] == "mover"
        assert running["bytes"]["total"] == 1000 and running["dirty_rate"] == 5
        assert list(src._live) == [mig]
        go_on.set()
        assert _wait(client, r.json)["status"] == "succeeded"
    assert _pruned(src), "an ended migration leaves the live entries"
    done = client.get(f"/v1/migrations/{mig}").json
    assert done["status"] == "succeeded" and done["destination"] == "far" and done["bytes"]["total"] == 1000


def test_a_failed_migration_is_pruned_and_ended_ones_are_bounded(app):  # noqa: F811
    _, client, root = app
    src = root.migrations.source
    assert _wait(client, _create_vm(client, "mover"))["status"] == "succeeded"
    with mock.patch.object(MigrationSource, "_migrate_vm", side_effect=RuntimeError("boom")):
        r = client.post("/v1/migrations", json={"instance": "mover", "destination": "far", "mode": "live"})
        assert _wait(client, r.json)["status"] == "failed"
    assert _pruned(src)
    failed = client.get(f"/v1/migrations/{r.json['id']}").json
    assert failed["status"] == "failed" and failed["destination"] == "far" and failed["name"] == "mover"
    for i in range(RECENT_MIGRATIONS + 5):
        src._ended(f"op{i}", {"name": "x"})
    assert len(src._recent) == RECENT_MIGRATIONS and r.json["id"] not in src._recent
