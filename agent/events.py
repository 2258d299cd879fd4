"""An in-process event bus: publishers never block, each subscriber has a bounded queue.

Event types: ``lifecycle`` (instance state changes), ``operation`` (operation status),
``migration``. A subscriber that falls behind by SUBSCRIBER_QUEUE events loses the
oldest ones rather than slowing the agent down.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time

TYPES = ("lifecycle", "operation", "migration", "security_group")
SUBSCRIBER_QUEUE = 1000  # events buffered per slow subscriber before dropping


class Subscription:
    def __init__(self, bus: "EventBus", types: frozenset[str]):
        self.bus, self.types = bus, types
        self.queue: queue.Queue = queue.Queue(SUBSCRIBER_QUEUE)

    def get(self, timeout: float) -> dict | None:
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
    def __init__(self):
        self._subs: set[Subscription] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def subscribe(self, types=None) -> Subscription:
        sub = Subscription(self, frozenset(types or TYPES))
        with self._lock:
            self._subs.add(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.discard(sub)

    def publish(self, type: str, data: dict) -> None:
        event = {"id": next(self._ids), "type": type, "time": time.time(), "data": data}
        with self._lock:
            subs = [s for s in self._subs if type in s.types]
        for s in subs:
            while True:
                try:
                    s.queue.put_nowait(event)
                    break
                except queue.Full:
                    try:
                        s.queue.get_nowait()  # drop the oldest
                    except queue.Empty:
                        pass
