"""agent.operations: the worker pool, persistence, wait, cancel and crash recovery."""
import threading
import time

import pytest

from agent.errors import Conflict, NotFound
from agent.events import EventBus
from agent.operations import Operations


@pytest.fixture
def ops(db):
    o = Operations(db, EventBus(), workers=2)
    o.start()
    yield o
    o.shutdown(wait=True)


def test_success_with_progress_and_result(ops):
    def work(op):
        op.phase("copy", bytes_total=10)
        op.bytes(10)
        return {"answer": 42}
    op = ops.wait(ops.submit("demo", "t1", work)["id"], 10)
    assert op["status"] == "succeeded" and op["result"] == {"answer": 42}
    assert op["progress"] == {"phase": "copy", "bytes_done": 10, "bytes_total": 10}
    assert op["started_at"] and op["finished_at"] >= op["started_at"]


def test_the_log_says_where_an_operations_time_went(ops, caplog):
    """One line per finished operation: its wall time per phase, and how long it queued."""
    def work(op):
        op.phase("rootfs")
        op.phase("start")
        time.sleep(0.05)
    with caplog.at_level("INFO", logger="agent.operations"):
        op = ops.wait(ops.submit("demo", "t1", work)["id"], 10)
    rec = next(r for r in caplog.records if r.getMessage() == "operation finished")
    assert rec.operation == op["id"] and rec.status == "succeeded"
    assert set(rec.phases_ms) == {"queued", "-", "rootfs", "start"}
    assert rec.phases_ms["start"] >= 50 > rec.phases_ms["rootfs"]


def test_failure_keeps_the_agent_error_and_hides_bugs(ops):
    def agent_error(op):
        raise NotFound("image x not found")

    def bug(op):
        raise ZeroDivisionError("secret internals")
    a = ops.wait(ops.submit("demo", None, agent_error)["id"], 10)
    assert a["status"] == "failed" and a["error"]["code"] == "not_found"
    b = ops.wait(ops.submit("demo", None, bug)["id"], 10)
    assert b["status"] == "failed" and b["error"]["code"] == "internal"
    assert "secret" not in str(b)


def test_cancel_running_is_cooperative_and_cleans_up(ops):
    entered, cleaned = threading.Event(), threading.Event()

    def work(op):
        op.phase("one")
        entered.set()
        try:
            while True:
                op.phase("loop")
                op.cancelled.wait(0.05)
        finally:
            cleaned.set()
    op = ops.submit("demo", None, work)
    assert entered.wait(10)
    assert ops.cancel(op["id"])["id"] == op["id"]
    done = ops.wait(op["id"], 10)
    assert done["status"] == "cancelled" and cleaned.is_set()
    with pytest.raises(Conflict):
        ops.cancel(op["id"])


def test_past_its_point_of_no_return_an_operation_is_not_cancelled(ops):
    committed, go = threading.Event(), threading.Event()

    def work(op):
        op.phase("undoable")
        op.point_of_no_return()  # e.g. a migrated guest runs on the destination now
        committed.set()
        go.wait(10)
        op.phase("cleanup")  # no longer a cancel point
        return {"done": True}
    op = ops.submit("demo", None, work)
    assert committed.wait(10)
    with pytest.raises(Conflict, match="point of no return"):
        ops.cancel(op["id"])
    go.set()
    done = ops.wait(op["id"], 10)
    assert done["status"] == "succeeded" and done["result"] == {"done": True}


def test_wait_times_out_and_returns_current_state(ops):
    gate = threading.Event()
    op = ops.submit("demo", None, lambda o: gate.wait(10) and {})
    assert ops.wait(op["id"], 0.2)["status"] in ("pending", "running")
    gate.set()
    assert ops.wait(op["id"], 10)["status"] == "succeeded"


def test_pool_is_bounded_and_pending_ops_can_be_cancelled(ops):
    gate = threading.Event()
    busy = [ops.submit("demo", None, lambda o: gate.wait(10) and {}) for _ in range(2)]
    queued = ops.submit("demo", None, lambda o: {"ran": True})
    assert ops.get(queued["id"])["status"] == "pending"
    ops.cancel(queued["id"])
    gate.set()
    assert ops.wait(queued["id"], 10)["status"] == "cancelled"
    assert all(ops.wait(b["id"], 10)["status"] == "succeeded" for b in busy)


def test_recover_marks_leftovers_failed(db):
    ops = Operations(db, EventBus())
    db.execute("INSERT INTO operations(id, kind, status, created_at) VALUES('x', 'demo', 'running', 0)")
    assert [o["id"] for o in ops.recover()] == ["x"]
    op = ops.get("x")
    assert op["status"] == "failed" and op["error"]["code"] == "agent_restarted"


def _finished(db, op_id, finished_at, status="succeeded"):
    db.execute("INSERT INTO operations(id, kind, status, created_at, finished_at) VALUES(?, 'demo', ?, ?, ?)",
               (op_id, status, finished_at - 1, finished_at))


def test_prune_keeps_unfinished_and_recent_operations_within_the_cap(db):
    now = time.time()
    ops = Operations(db, EventBus(), retention=3600, max_finished=3)
    _finished(db, "expired", now - 7200)
    _finished(db, "expired-failed", now - 7200, "failed")
    for i in range(4):  # within retention, but one more than the cap: the oldest goes
        _finished(db, f"kept{i}", now - 1000 + i, "cancelled" if i == 3 else "succeeded")
    db.execute("INSERT INTO operations(id, kind, status, created_at) VALUES('old-pending', 'demo', 'pending', 0)")
    assert ops.prune(now) == 3
    assert {o["id"] for o in ops.list()} == {"old-pending", "kept1", "kept2", "kept3"}
    with pytest.raises(NotFound):
        ops.get("expired")
    for i in range(5):  # just finished: over the cap, yet kept for their waiters (PRUNE_GRACE)
        _finished(db, f"fresh{i}", now - i)
    assert ops.prune(now) == 3  # kept1..3 make room; the fresh ones stay
    assert {o["id"] for o in ops.list()} == {"old-pending", *(f"fresh{i}" for i in range(5))}


def test_a_running_operation_is_never_pruned(db):
    ops = Operations(db, EventBus(), workers=2, retention=60, max_finished=100)
    ops.start()
    try:
        gate = threading.Event()
        running = ops.submit("demo", None, lambda o: (o.phase("busy"), gate.wait(10)) and {})
        done = ops.wait(ops.submit("demo", None, lambda o: {})["id"], 10)
        assert ops.prune(time.time() + 10 * 86400) == 1  # ten days on: only the finished one goes
        assert ops.get(running["id"])["status"] in ("pending", "running")
        with pytest.raises(NotFound):
            ops.get(done["id"])
        gate.set()
        assert ops.wait(running["id"], 10)["status"] == "succeeded"
    finally:
        ops.shutdown(wait=True)


def test_start_prunes_what_a_previous_run_left(db):
    ops = Operations(db, EventBus(), workers=1)
    _finished(db, "last-month", time.time() - 30 * 86400)
    ops.start()
    try:
        with pytest.raises(NotFound):
            ops.get("last-month")
    finally:
        ops.shutdown(wait=True)


def test_the_events_table_is_bounded_at_start_too(db):
    bus = EventBus(db, replay=1000)
    for i in range(50):
        bus.publish("operation", {"n": i})
    assert db.one("SELECT count(*) AS n FROM events")["n"] == 50
    bus = EventBus(db, replay=10)  # the replay lowered between two runs
    assert db.one("SELECT count(*) AS n FROM events")["n"] == 10 and bus.last_id == 50
    bus = EventBus(db, replay=0)  # none kept: only the last id stays, so ids keep counting up
    assert db.one("SELECT count(*) AS n FROM events")["n"] == 1 and bus.last_id == 50
