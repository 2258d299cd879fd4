"""The agent's own tables (component "agent" in the state DB); steps are only ever appended.

The ``instances`` table was made here by step 1 until agent/services/records.py took it
over (component "instances", CREATE TABLE IF NOT EXISTS): state dirs made before keep theirs."""
from __future__ import annotations

from agent.state import Database

SCHEMA_STEPS = [
    """
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,            -- public half of the token, used for lookup
        name TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL CHECK (role IN ('admin', 'reader')),
        secret_hash TEXT NOT NULL,      -- sha256 hex of the secret half
        created_at REAL NOT NULL,
        last_used_at REAL
    );
    CREATE TABLE operations (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        target TEXT,
        status TEXT NOT NULL,
        progress TEXT NOT NULL DEFAULT '{}',
        result TEXT,
        error TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    );
    CREATE INDEX operations_status ON operations(status);
    """,
    # tokens may have role peer (another host's: the peer routes only); SQLite cannot change
    # a CHECK in place, so the table is copied
    """
    CREATE TABLE tokens_new (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL CHECK (role IN ('admin', 'reader', 'peer')),
        secret_hash TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_used_at REAL
    );
    INSERT INTO tokens_new(id, name, role, secret_hash, created_at, last_used_at)
        SELECT id, name, role, secret_hash, created_at, last_used_at FROM tokens;
    DROP TABLE tokens;
    ALTER TABLE tokens_new RENAME TO tokens;
    """,
    # tokens may expire (NULL: never); an operation keeps the id of the request that made it
    """
    ALTER TABLE tokens ADD COLUMN expires_at REAL;
    ALTER TABLE operations ADD COLUMN request_id TEXT;
    """,
    # finished operations are pruned by age and by count (agent/operations.py prune)
    """
    CREATE INDEX operations_finished ON operations(finished_at);
    """,
]


def apply(db: Database) -> int:
    """Create or bring up to date the agent's own tables; the version reached."""
    return db.apply_schema("agent", SCHEMA_STEPS)
