"""The event bus: publishers never block on subscribers, each subscriber has a bounded
queue, and the last ``replay`` events are kept in the state DB (table ``events``, owned
here) so a client that reconnects with ``Last-Event-ID`` gets what it missed, across
agent restarts too: ids keep counting up from the DB's last one.

Event types: ``lifecycle`` (instance state changes), ``operation`` (operation status),
``migration``. A subscriber that falls behind by SUBSCRIBER_QUEUE events loses the oldest
ones rather than slowing the agent down; it is told so by a ``gap`` event (as is a client
asking to replay from before the oldest event kept).
"""
from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time

from agent.state import Database

log = logging.getLogger(__name__)
TYPES = ("lifecycle", "operation", "migration", "security_group", "volume", "snapshot", "export", "backup")
GAP = "gap"  # not a type one subscribes to: told to every subscriber that missed events
SUBSCRIBER_QUEUE = 1000  # events buffered per slow subscriber before dropping
DEFAULT_REPLAY = 10_000  # events kept for replay
PRUNE_EVERY = 500  # events published between two prunes of the kept ones

SCHEMA_STEPS = [
    """CREATE TABLE events (
         id INTEGER PRIMARY KEY, type TEXT NOT NULL, time REAL NOT NULL, data TEXT NOT NULL);""",
]


def gap_event(first: int, last: int | None, why: str) -> dict:
    """The events from ``first`` to ``last`` (None: an unknown number) were missed."""
    return {"id": None, "type": GAP, "time": time.time(), "data": {"first": first, "last": last, "reason": why}}


class Subscription:
    def __init__(self, bus: "EventBus", types: frozenset[str]):
        self.bus, self.types = bus, types
        self.queue: queue.Queue = queue.Queue(SUBSCRIBER_QUEUE)
        self._dropped: tuple[int, int] | None = None  # first and last id dropped since the last get
        self.floor = 0  # the last event published before it subscribed: later ones come to its queue
        self._lock = threading.Lock()

    def put(self, event: dict) -> None:
        """Never blocks: a full queue loses its oldest event (remembered for a gap event)."""
        while True:
            try:
                self.queue.put_nowait(event)
                return
            except queue.Full:
                try:
                    lost = self.queue.get_nowait()
                except queue.Empty:
                    continue
                with self._lock:
                    first = self._dropped[0] if self._dropped else lost["id"]
                    self._dropped = (first, lost["id"])

    def get(self, timeout: float) -> dict | None:
        with self._lock:
            dropped, self._dropped = self._dropped, None
        if dropped:
            return gap_event(dropped[0], dropped[1], "this stream fell behind by more than "
                                                      f"{SUBSCRIBER_QUEUE} events; read faster")
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.bus._unsubscribe(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EventBus:
    def __init__(self, db: Database | None = None, *, replay: int = DEFAULT_REPLAY):
        """``db``: keep the last ``replay`` events there (None: nothing kept, ids start at 1)."""
        self._subs: set[Subscription] = set()
        self._lock = threading.Lock()
        self._db = db if replay else None
        self._replay = replay
        last = 0
        if db is not None:
            db.apply_schema("events", SCHEMA_STEPS)
            last = db.one("SELECT COALESCE(MAX(id), 0) AS n FROM events")["n"]
            # bounded from the start: a replay lowered (or set to 0) since the last run applies now;
            # the last event stays (ids keep counting up from it across restarts)
            db.execute("DELETE FROM events WHERE id <= ?", (last - max(replay, 1),))
        self._last = last
        self._since_prune = 0
        self._prune_every = min(PRUNE_EVERY, max(1, replay // 10))  # at most 10% more kept than asked

    @property
    def last_id(self) -> int:
        return self._last

    def subscribe(self, types=None) -> Subscription:
        sub = Subscription(self, frozenset(types or TYPES))
        with self._lock:
            self._subs.add(sub)
            sub.floor = self._last
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.discard(sub)

    def publish(self, type: str, data: dict) -> None:
        with self._lock:  # ids, the kept order and the subscribers' order agree
            self._last += 1
            event = {"id": self._last, "type": type, "time": time.time(), "data": data}
            self._keep(event)
            subs = [s for s in self._subs if type in s.types]
        for s in subs:
            s.put(event)

    def _keep(self, event: dict) -> None:
        if self._db is None:
            return
        try:
            self._db.execute("INSERT INTO events(id, type, time, data) VALUES (?, ?, ?, ?)",
                             (event["id"], event["type"], event["time"], json.dumps(event["data"])))
            self._since_prune += 1
            if self._since_prune >= self._prune_every:
                self._since_prune = 0
                self._db.execute("DELETE FROM events WHERE id <= ?", (event["id"] - self._replay,))
        except sqlite3.Error as e:  # the live event still goes out; only its replay is lost
            log.warning("event not kept for replay", extra={"event_id": event["id"], "error": str(e)})

    def replay(self, after: int, upto: int, types=None) -> list[dict]:
        """The kept events of ``types`` with ids ``after`` < id <= ``upto`` (a subscription's
        floor), oldest first, headed by a gap event if some of them are no longer kept (or
        ``after`` is from a history this agent does not have)."""
        types = frozenset(types or TYPES)
        if after > upto:
            return [gap_event(1, upto or None, f"event {after} is not from this agent's history (it is at "
                                               f"{upto}): its state dir was replaced; resync")]
        if after == upto:
            return []
        if self._db is None:
            return [gap_event(after + 1, upto, "this agent keeps no events for replay (api.event_replay = 0)")]
        out: list[dict] = []
        oldest = self._db.one("SELECT MIN(id) AS n FROM events")["n"]
        if oldest is None or oldest > after + 1:
            missed = min(upto, oldest - 1) if oldest is not None else upto
            out.append(gap_event(after + 1, missed, f"events {after + 1}..{missed} are no longer kept "
                                                    f"(the agent keeps the last {self._replay}); resync"))
        marks = ",".join("?" * len(types))
        rows = self._db.query(f"SELECT id, type, time, data FROM events WHERE id > ? AND id <= ? AND type IN "
                              f"({marks}) ORDER BY id", (after, upto, *sorted(types)))
        out += [{"id": r["id"], "type": r["type"], "time": r["time"], "data": json.loads(r["data"])} for r in rows]
        return out
