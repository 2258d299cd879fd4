import threading

import pytest

from agent.state import Database

STEPS = [
    "CREATE TABLE things (id TEXT PRIMARY KEY, n INTEGER NOT NULL);",
    "ALTER TABLE things ADD COLUMN note TEXT; CREATE INDEX things_n ON things(n);",
]


def test_schema_steps_apply_once_and_resume(tmp_path):
    path = tmp_path / "s.db"
    db = Database(path)
    assert db.apply_schema("demo", STEPS[:1]) == 1
    db.execute("INSERT INTO things(id, n) VALUES('a', 1)")
    db.close()
    db = Database(path)
    assert db.apply_schema("demo", STEPS) == 2
    assert db.apply_schema("demo", STEPS) == 2  # idempotent
    db.execute("UPDATE things SET note='x' WHERE id='a'")
    assert dict(db.one("SELECT * FROM things")) == {"id": "a", "n": 1, "note": "x"}
    assert db.version("demo") == 2 and db.version("other") == 0


def test_newer_schema_refuses(db):
    db.apply_schema("demo", STEPS)
    with pytest.raises(RuntimeError, match="upgrade the agent"):
        db.apply_schema("demo", STEPS[:1])


def test_failed_transaction_rolls_back(db):
    db.apply_schema("demo", STEPS)
    with pytest.raises(ZeroDivisionError):
        with db.tx() as c:
            c.execute("INSERT INTO things(id, n) VALUES('b', 2)")
            1 / 0
    assert db.query("SELECT * FROM things") == []


def test_concurrent_writers_all_land(db):
    db.apply_schema("demo", STEPS)

    def write(i):
        for j in range(20):
            db.execute("INSERT INTO things(id, n) VALUES(?, ?)", (f"{i}-{j}", j))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert db.one("SELECT count(*) AS c FROM things")["c"] == 160


def test_writers_of_one_file_queue_in_process_and_time_out_as_sqlite(tmp_path, monkeypatch):
    """Two handles on one file (two components) share the in-process writer queue: a writer
    waits for the transaction in progress, nested transactions join theirs, and a writer
    still waiting after the busy timeout fails with SQLite's own error."""
    import sqlite3

    import agent.state as state
    a, b = Database(tmp_path / "s.db"), Database(str(tmp_path / "." / "s.db"))
    a.apply_schema("demo", STEPS)
    holding, release, order = threading.Event(), threading.Event(), []

    def first():
        with a.tx() as c:
            with a.tx():  # nested: joins, does not wait for itself
                c.execute("INSERT INTO things(id, n) VALUES('a', 1)")
            holding.set()
            release.wait(10)
            order.append("a")

    t = threading.Thread(target=first)
    t.start()
    assert holding.wait(10)
    monkeypatch.setattr(state, "BUSY_TIMEOUT_MS", 50)
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        b.execute("INSERT INTO things(id, n) VALUES('b', 2)")
    monkeypatch.setattr(state, "BUSY_TIMEOUT_MS", 10_000)
    w = threading.Thread(target=lambda: (b.execute("INSERT INTO things(id, n) VALUES('b', 2)"), order.append("b")))
    w.start()
    release.set()
    t.join(10)
    w.join(10)
    assert order == ["a", "b"]
    assert [r["id"] for r in b.query("SELECT id FROM things ORDER BY id")] == ["a", "b"]
