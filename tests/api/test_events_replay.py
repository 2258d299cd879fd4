"""Event ids survive a restart; a client reconnecting with Last-Event-ID gets what it missed,
or a gap event saying what is no longer kept; a subscriber that falls behind is told too."""
from __future__ import annotations

import json

from agent.events import SUBSCRIBER_QUEUE, EventBus
from tests.api.conftest import inprocess_app


def _stream(client, last_id=None, types="operation,lifecycle"):
    """The events a short stream (0.3 s) sends: list of (id or None, type, data)."""
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    r = client.get(f"/v1/events?type={types}&timeout=0.3", headers=headers)
    assert r.status_code == 200, r.text
    out = []
    for frame in r.get_data(as_text=True).split("\n\n"):
        fields = dict(line.split(": ", 1) for line in frame.splitlines() if not line.startswith(":"))
        if "data" in fields:
            ev = json.loads(fields["data"])
            assert fields.get("id") == (str(ev["id"]) if ev["id"] is not None else None)
            out.append((ev["id"], ev["type"], ev["data"]))
    return out


def _create(client, name):
    op = client.post("/v1/instances", json={"name": name, "kind": "vm", "image": "tiny-vm", "memory_mib": 64,
                                            "network": "none"}).json
    op = client.get(f"/v1/operations/{op['id']}/wait?timeout=30").json
    assert op["status"] == "succeeded", op


def test_a_reconnecting_client_gets_what_it_missed_across_a_restart(tmp_path):
    app, client, root = inprocess_app(tmp_path)
    try:
        before = root.events.last_id
        _create(client, "a")
        seen = [e for e in _stream(client, before)]
        assert seen and [e[0] for e in seen] == sorted(e[0] for e in seen) and seen[0][0] > before
        assert any(t == "lifecycle" and d.get("name") == "a" for _, t, d in seen), seen
        mark = seen[-1][0]
        _create(client, "b")  # while the client is away
        missed = _stream(client, mark)
        assert missed and missed[0][0] > mark and all(i is not None for i, _, _ in missed)
        assert any(d.get("name") == "b" for _, t, d in missed if t == "lifecycle")
        assert not any(d.get("name") == "a" for _, t, d in missed if t == "lifecycle")
        assert _stream(client, missed[-1][0]) == []  # up to date: nothing replayed
        ops_only = _stream(client, mark, types="operation")
        assert ops_only and {t for _, t, _ in ops_only} == {"operation"}
        last = root.events.last_id
    finally:
        root.stop()
    app, client, root = _restart(tmp_path)
    try:
        assert root.events.last_id >= last  # ids keep counting up after a restart
        _create(client, "c")
        after = _stream(client, last)
        assert after and all(i > last for i, _, _ in after)
        assert any(d.get("name") == "c" for _, t, d in after if t == "lifecycle")
    finally:
        root.stop()


def _restart(tmp_path):
    """The same agent (state dir, pool) started again in-process."""
    from agent import config as agent_config
    from agent.app import create_app
    cfg = agent_config.parse({"state_dir": str(tmp_path / "state"), "workers": 2,
                              "hypervisor": {"driver": "fake"}, "containers": {"runtime": "fake"},
                              "pools": {"default": {"kind": "local", "path": str(tmp_path / "pool")}}})
    app = create_app(cfg)
    root = app.config["SERVICES"]
    root.start()
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {root.tokens.create('admin-again', 'admin')}"
    return app, client, root


def test_what_is_no_longer_kept_is_told_as_a_gap(tmp_path):
    app, client, root = inprocess_app(tmp_path, api={"event_replay": 3})
    try:
        first = root.events.last_id
        for i in range(12):
            root.events.publish("operation", {"n": i})
        got = _stream(client, first, types="operation")
        gap, kept = got[0], [e for e in got[1:] if "n" in e[2]]  # the agent's own events may come between
        assert gap[0] is None and gap[1] == "gap" and gap[2]["first"] == first + 1, gap
        assert 1 <= len(kept) <= 12 and [d["n"] for _, _, d in kept][-1] == 11
        assert gap[2]["last"] < kept[0][0]  # what was lost, not what is still kept
        future = _stream(client, root.events.last_id + 1000)
        assert future[0][1] == "gap" and "history" in future[0][2]["reason"]
        assert client.get("/v1/events?timeout=0.1", headers={"Last-Event-ID": "x1"}).status_code == 400
    finally:
        root.stop()


def test_a_subscriber_that_falls_behind_gets_a_gap_event():
    bus = EventBus()
    with bus.subscribe(["operation"]) as sub:
        for i in range(SUBSCRIBER_QUEUE + 5):
            bus.publish("operation", {"n": i})
        gap = sub.get(0.1)
        assert gap["type"] == "gap" and gap["id"] is None and (gap["data"]["first"], gap["data"]["last"]) == (1, 5)
        assert sub.get(0.1)["id"] == 6  # then the oldest one still held
