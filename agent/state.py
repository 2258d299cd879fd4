"""The agent's state: one SQLite database, its schema built by per-component schema steps.

Each component (storage, containers, agent, ...) owns its tables and passes its own
ordered list of SQL steps to ``Database.apply_schema``; the version reached is kept per
component in ``schema_versions``, so components evolve independently. Steps only
ever get appended.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

BUSY_TIMEOUT_MS = 30_000  # writers wait for each other instead of failing
DB_MODE = 0o600  # instance specs hold env and user_data: root's only (SQLite gives -wal/-shm the same)

# One writer at a time per database file in this process, queued on a lock: SQLite's own
# busy handler polls with sleeps of up to 100 ms, so under a create storm (20 operation
# threads writing) writers slept while the database was free. Other processes (the CLI)
# still meet SQLite's busy handler.
_WRITE_LOCKS: dict[str, threading.Lock] = {}
_WRITE_LOCKS_LOCK = threading.Lock()


def _write_lock(path: str) -> threading.Lock:
    key = path if path == ":memory:" else os.path.realpath(path)
    with _WRITE_LOCKS_LOCK:
        return _WRITE_LOCKS.setdefault(key, threading.Lock())


class Database:
    """A thread-safe handle: one connection per thread, WAL mode, foreign keys on."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC, DB_MODE))
            for suffix in ("", "-wal", "-shm"):  # state dirs made before: tightened too
                if os.path.exists(self.path + suffix):
                    os.chmod(self.path + suffix, DB_MODE)
        self._local = threading.local()
        self._lock = threading.Lock()  # serialises apply_schema only
        # ":memory:" is a database per connection: nothing to queue for
        self._writer = _write_lock(self.path) if self.path != ":memory:" else None
        with self.tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_versions ("
                      "component TEXT PRIMARY KEY, version INTEGER NOT NULL)")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._local.conn = conn
        return conn

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE): committed on success, rolled back on error."""
        conn = self._conn()
        if conn.in_transaction:  # nested: join the outer transaction
            yield conn
            return
        if self._writer is not None and not self._writer.acquire(timeout=BUSY_TIMEOUT_MS / 1000):
            raise sqlite3.OperationalError("database is locked")  # as SQLite says past its busy timeout
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            if self._writer is not None:
                self._writer.release()

    def query(self, sql: str, params=()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, params).fetchall()

    def one(self, sql: str, params=()) -> sqlite3.Row | None:
        return self._conn().execute(sql, params).fetchone()

    def execute(self, sql: str, params=()) -> sqlite3.Cursor:
        """One statement in its own transaction."""
        with self.tx() as c:
            return c.execute(sql, params)

    def apply_schema(self, component: str, steps: list[str]) -> int:
        """Apply the schema steps of ``component`` not applied yet; return the version reached
        (the number of steps, kept in ``schema_versions``)."""
        with self._lock, self.tx() as c:
            row = c.execute("SELECT version FROM schema_versions WHERE component=?",
                            (component,)).fetchone()
            done = row["version"] if row else 0
            if done > len(steps):
                raise RuntimeError(f"state {self.path}: {component} schema v{done} is newer "
                                   f"than this agent (v{len(steps)}): upgrade the agent")
            for sql in steps[done:]:
                for stmt in _statements(sql):
                    c.execute(stmt)
            c.execute("INSERT INTO schema_versions(component, version) VALUES(?, ?) "
                      "ON CONFLICT(component) DO UPDATE SET version=excluded.version",
                      (component, len(steps)))
        return len(steps)

    def version(self, component: str) -> int:
        row = self.one("SELECT version FROM schema_versions WHERE component=?", (component,))
        return row["version"] if row else 0

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _statements(script: str) -> list[str]:
    """Split a schema step into statements (sqlite3 executes one at a time in a tx)."""
    out, buf = [], ""
    for piece in script.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip(" \n\t;"):
                out.append(buf.strip())
            buf = ""
    return out
