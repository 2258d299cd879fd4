"""Finished operations are pruned past [operations] retention and beyond max_finished, at start
and periodically; a pruned id is 404 like one never made; an unfinished one stays."""
from __future__ import annotations

import threading
import time

from testbed.netattack import wait_until
from tests.api.conftest import inprocess_app


def _not_found(r) -> None:
    assert r.status_code == 404 and r.json["error"]["code"] == "not_found", (r.status_code, r.text)


def test_pruned_operations_are_404_and_the_agent_prunes_by_itself(tmp_path):
    app, client, root = inprocess_app(tmp_path, operations={"retention": 60, "max_finished": 100,
                                                            "prune_interval": 1})
    gate = threading.Event()
    try:
        imported = client.get("/v1/operations?status=succeeded").json["operations"]
        assert imported and imported[0]["kind"] == "image.import"
        running = root.operations.submit("demo", None, lambda op: (op.phase("busy"), gate.wait(30)) and {})
        # a finished operation from long ago, as a previous run of the agent left it
        root.db.execute("INSERT INTO operations(id, kind, status, created_at, finished_at) "
                        "VALUES('0' || hex(randomblob(15)), 'demo', 'failed', 1, 2)")
        assert wait_until(lambda: not any(o["finished_at"] == 2 for o in
                                          client.get("/v1/operations").json["operations"]), 30)
        assert client.get(f"/v1/operations/{imported[0]['id']}").status_code == 200  # within retention
        root.operations.prune(time.time() + 3600)  # an hour on: past the 60 s retention
        for path in (f"/v1/operations/{imported[0]['id']}", f"/v1/operations/{imported[0]['id']}/wait?timeout=1",
                     f"/v1/migrations/{imported[0]['id']}"):
            _not_found(client.get(path))
        _not_found(client.delete(f"/v1/operations/{imported[0]['id']}"))
        assert client.get(f"/v1/operations/{running['id']}").json["status"] in ("pending", "running")
        assert [o["id"] for o in client.get("/v1/operations").json["operations"]] == [running["id"]]
        gate.set()
        assert client.get(f"/v1/operations/{running['id']}/wait?timeout=30").json["status"] == "succeeded"
    finally:
        gate.set()
        root.stop()
