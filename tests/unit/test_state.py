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
