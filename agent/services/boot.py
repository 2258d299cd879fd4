"""Desired state across a host reboot: tell a reboot from an agent restart, and start again
what was running when the host went down.

Terms: the *boot id* is the kernel's id of the current boot (``boot_id_path``, normally
/proc/sys/kernel/random/boot_id: a new random UUID at every boot). The agent remembers the
last one it saw in the state DB (table ``host_boot``, owned by this module). At start:

- same id: the agent alone restarted; running workloads are re-adopted, nothing is started;
- no id remembered: a fresh state dir (or one from before this module); the id is remembered;
- another id: the host rebooted. The instances with ``autostart`` (default true) whose record
  said running or paused when the host went down are started again; stopped ones stay
  stopped (an operator's stop is respected), and so do those with ``autostart`` false.

The choice of what to start is written in the same transaction as the new boot id (a
*pending* list), before the records are reconciled (which turns them to stopped): an agent
killed between the two still starts them at its next start. The list is cleared once each
start was handed to an operation.
"""
from __future__ import annotations

import json
import logging

from agent.state import Database

log = logging.getLogger(__name__)

SCHEMA_STEPS = [
    """
    CREATE TABLE host_boot (
        id INTEGER PRIMARY KEY CHECK (id = 1),  -- one row
        boot_id TEXT NOT NULL,
        pending TEXT NOT NULL DEFAULT '[]'     -- JSON: ids of instances to start after this boot
    );
    """,
]
WAS_UP = ("running", "paused")  # record states that count as "was running" when the host went down
MAX_BOOT_ID = 128  # a boot id is a 36-character UUID; anything longer is not one


def read_boot_id(path: str) -> str | None:
    """The kernel's boot id at ``path``; None if it cannot be read (then no reboot is assumed)."""
    try:
        with open(path) as f:
            text = f.read(MAX_BOOT_ID + 1).strip()
    except OSError as e:
        log.warning("cannot read the boot id: reboots are not told from agent restarts",
                    extra={"path": path, "error": str(e)})
        return None
    return text if text and len(text) <= MAX_BOOT_ID else None


class BootState:
    """The ``host_boot`` table: the last boot id seen and the starts a reboot left pending."""

    def __init__(self, db: Database, boot_id_path: str):
        self.db = db
        self.path = boot_id_path
        db.apply_schema("boot", SCHEMA_STEPS)

    def check(self, records) -> list[str]:
        """Call at start, before the records are reconciled: the ids of the instances to start
        (those left pending by an earlier start, plus, after a reboot, those with autostart
        that were running). Remembers the current boot id."""
        now = read_boot_id(self.path)
        with self.db.tx() as c:
            row = c.execute("SELECT boot_id, pending FROM host_boot WHERE id=1").fetchone()
            pending = json.loads(row["pending"]) if row else []
            if now is None:
                return pending
            if row is not None and row["boot_id"] != now:
                up = [i.id for i in records.list(states=WAS_UP) if i.autostart]
                pending += [i for i in up if i not in pending]
                log.info("the host rebooted: starting the instances that were running (autostart)",
                         extra={"instances": len(up)})
            c.execute("INSERT INTO host_boot(id, boot_id, pending) VALUES(1, ?, ?) ON CONFLICT(id) DO UPDATE "
                      "SET boot_id=excluded.boot_id, pending=excluded.pending", (now, json.dumps(pending)))
        return pending

    def done(self, *inst_ids: str) -> None:
        """``inst_ids``' starts were handed to operations (or they are gone): no longer pending.
        One write for many: the list is rewritten whole (O(pending) each)."""
        gone = set(inst_ids)
        with self.db.tx() as c:
            row = c.execute("SELECT pending FROM host_boot WHERE id=1").fetchone()
            if row is None:
                return
            pending = [i for i in json.loads(row["pending"]) if i not in gone]
            c.execute("UPDATE host_boot SET pending=? WHERE id=1", (json.dumps(pending),))
