"""After a restart the agent answers before its workloads are re-adopted: reads show the
last known state, health says ``adopting``, and a change waits for the re-adoption (503
with a retry hint if that takes too long); then everything works as before."""
from __future__ import annotations

import threading

import agent.services as services_mod
from agent.app import create_app

from .conftest import inprocess_app


def test_reads_answer_while_re_adopting_and_changes_wait(tmp_path, monkeypatch):
    app, client, root = inprocess_app(tmp_path)
    op = client.post("/v1/instances", json={"name": "v1", "kind": "vm", "image": "tiny-vm",
                                            "memory_mib": 64, "network": "none"}).json
    assert client.get(f"/v1/operations/{op['id']}/wait?timeout=30").json["status"] == "succeeded"
    token = root.tokens.create("again", "admin")
    root.stop()

    app2 = create_app(app.config["NODEAGENT"])
    root2 = app2.config["SERVICES"]
    gate, reached = threading.Event(), threading.Event()
    real = root2.instances.reconcile

    def slow_reconcile():
        reached.set()
        assert gate.wait(30)
        real()
    monkeypatch.setattr(root2.instances, "reconcile", slow_reconcile)
    monkeypatch.setattr(services_mod, "ADOPT_WAIT_S", 0.2)
    adopted = threading.Event()
    root2.start(readopt_in_background=True, on_adopted=adopted.set)
    c2 = app2.test_client()
    c2.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    try:
        assert reached.wait(30)
        assert c2.get("/v1/health").json == {"status": "ok", "adopting": True}
        (inst,) = c2.get("/v1/instances").json["instances"]
        assert (inst["name"], inst["state"]) == ("v1", "running")  # the last known state
        r = c2.post("/v1/instances/v1/actions", json={"action": "stop"})
        assert r.status_code == 503 and "re-adopting" in r.json["error"]["message"], r.json
        gate.set()
        assert adopted.wait(30)
        assert c2.get("/v1/health").json == {"status": "ok"}
        # the fake driver's domains lived in the old process: re-adoption found none
        assert c2.get("/v1/instances/v1").json["state"] == "lost"
        assert c2.delete("/v1/instances/v1").status_code == 200
    finally:
        gate.set()
        adopted.wait(30)
        root2.stop()
