"""The instance records: the one module that reads and writes the ``instances`` table.

Terms: a *record* is what the agent knows of one instance (VM or container): its name,
image, pool, volumes, address, state and the request it was made from (its *spec*).
Records are handed out as frozen ``Instance`` values, never as rows or dicts; a change
goes through a verb here and returns the new record. Every other module (the instance
service, migration, host, metrics) asks this one: no other module runs SQL on
``instances`` (tests/unit/test_ownership.py checks it).

Lifecycle: absent -> insert() (state ``creating``, or ``incoming`` on a migration's
destination) -> update(state=...) any number of times -> delete(). Every one of these
publishes a ``lifecycle`` event (instance id, name, state): this is the only place that
does, so no state change goes unannounced. Every write also bumps ``generation``, which
keys caches of rendered lists.
"""
from __future__ import annotations

import itertools
import json
import math
import sqlite3
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from agent.errors import NotFound
from agent.state import Database

CLEANUP_KEY = "cleanup_pending"  # in a record's spec: its removal failed part-way; retried at start
COLUMNS = ("id", "name", "kind", "image", "spec", "state", "pool", "volumes", "ip", "mac", "node", "error",
           "created_at", "updated_at")
UPDATABLE = frozenset({"state", "ip", "error", "volumes", "image"})  # what update() may change (image: a rebuild)
# what update_spec() may change in the request kept as spec
SPEC_UPDATABLE = frozenset({"bandwidth", "cpus", "memory_mib", "autostart", "image_id",  # image_id: a rebuild
                            "postcopy_split"})  # a split VM: how to resume its broken post-copy (migration)

# Schema steps of component "instances"; only ever appended. The table was first made by the
# "agent" component's step 1 (agent/schema.py, before this module owned it): IF NOT EXISTS
# keeps state dirs made then as they are.
SCHEMA_STEPS = [
    """
    CREATE TABLE IF NOT EXISTS instances (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,             -- vm | container
        image TEXT NOT NULL,            -- image id
        spec TEXT NOT NULL,             -- JSON: the create request, its image_id, CLEANUP_KEY
        state TEXT NOT NULL,
        pool TEXT NOT NULL,
        volumes TEXT NOT NULL DEFAULT '[]',  -- JSON list of volume names in the pool
        ip TEXT,
        mac TEXT,
        node TEXT,                      -- hostname of the host that made the record
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
]


def _frozen(value: Any) -> Any:
    """A read-only deep view of decoded JSON: dicts become mapping proxies, lists tuples."""
    if isinstance(value, dict):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def _frozen_object(obj: dict) -> MappingProxyType:
    """json.loads object_hook: ``_frozen`` while parsing (the objects inside came through here
    already; only the lists among its values are left to freeze)."""
    return MappingProxyType({k: _frozen(v) if type(v) is list else v for k, v in obj.items()})


_FROZEN_JSON = json.JSONDecoder(object_hook=_frozen_object)  # stateless: shared by all threads


def _load_frozen(text: str) -> Any:
    """``_frozen(json.loads(text))`` in one pass (a list of 500 records renders ~25% faster)."""
    return _FROZEN_JSON.decode(text)


def _thawed(value: Any) -> Any:
    """The plain JSON form of a ``_frozen`` value (fresh dicts and lists)."""
    if isinstance(value, Mapping):
        return {k: _thawed(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


@dataclass(frozen=True)
class Instance:
    """One instance's record, as stored. ``spec`` is the create request (with the image's
    id as ``image_id``), read-only; ``spec_dict()`` gives a copy to change or send."""
    id: str
    name: str
    kind: str  # "vm" | "container"
    image: str  # image id
    state: str
    pool: str
    spec: Mapping[str, Any] = field(hash=False)
    volumes: tuple[str, ...] = ()
    ip: str | None = None
    mac: str | None = None
    node: str | None = None
    error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.spec, MappingProxyType):
            object.__setattr__(self, "spec", _frozen(_thawed(self.spec)))
        if type(self.volumes) is not tuple:
            object.__setattr__(self, "volumes", tuple(self.volumes))

    @property
    def cpus(self) -> float:
        return self.spec.get("cpus", 1)

    @property
    def memory_mib(self) -> int:
        return self.spec.get("memory_mib", 0)

    @property
    def max_cpus(self) -> int | None:
        """VMs: the most vCPUs a resize may give it (None for containers)."""
        if self.kind != "vm":
            return None
        return self.spec.get("max_cpus") or max(1, math.ceil(self.cpus))

    @property
    def max_memory_mib(self) -> int | None:
        """VMs: the most memory a resize may give it (None for containers)."""
        if self.kind != "vm":
            return None
        return self.spec.get("max_memory_mib") or self.memory_mib

    @property
    def autostart(self) -> bool:
        """Start it again after a host reboot if it was running (default: yes)."""
        return bool(self.spec.get("autostart", True))

    @property
    def cleanup_pending(self) -> bool:
        """Its removal failed part-way (state ``error``): the agent retries it at start."""
        return bool(self.spec.get(CLEANUP_KEY))

    def spec_dict(self) -> dict:
        """A fresh, plain copy of ``spec``."""
        return _thawed(self.spec)

    def to_dict(self) -> dict:
        """The API's form of the record (models.Instance): what GET /v1/instances shows."""
        return {"id": self.id, "name": self.name, "kind": self.kind, "image": self.image, "state": self.state,
                "pool": self.pool, "cpus": self.cpus, "memory_mib": self.memory_mib,
                "volumes": list(self.volumes), "ip": self.ip, "mac": self.mac, "node": self.node,
                "error": self.error, "bandwidth": _thawed(self.spec.get("bandwidth")),
                "max_cpus": self.max_cpus, "max_memory_mib": self.max_memory_mib, "autostart": self.autostart,
                "tty": bool(self.spec.get("tty")), "created_at": self.created_at, "updated_at": self.updated_at}


@dataclass(frozen=True)
class InstanceRef:
    """Who an instance is and its state, without the rest of its record (no JSON column
    decoded): what a /metrics scrape needs of every instance."""
    id: str
    name: str
    kind: str
    state: str


def _record(r: sqlite3.Row) -> Instance:
    return Instance(id=r["id"], name=r["name"], kind=r["kind"], image=r["image"], state=r["state"],
                    pool=r["pool"], spec=_load_frozen(r["spec"]), volumes=tuple(json.loads(r["volumes"])),
                    ip=r["ip"], mac=r["mac"], node=r["node"], error=r["error"],
                    created_at=r["created_at"], updated_at=r["updated_at"])


class InstanceRecords:
    """The ``instances`` table. Thread-safe (each verb is one statement or transaction).
    ``events`` is the agent's EventBus (anything with ``publish(type, data)``)."""

    def __init__(self, db: Database, events):
        self.db = db
        self.events = events
        db.apply_schema("instances", SCHEMA_STEPS)
        self._generations = itertools.count(1)  # next() is atomic: no lost bumps between threads
        self.generation = 0  # bumped after every write; keys the rendered-list cache
        self.row_generations: dict[str, int] = {}  # id -> the generation of its last write (since start)

    # -- reads --
    def find(self, ref: str) -> Instance | None:
        """The record whose id or name is ``ref``; None if there is none."""
        r = self.db.one("SELECT * FROM instances WHERE id=? OR name=?", (ref, ref))
        return _record(r) if r is not None else None

    def find_id(self, inst_id: str) -> Instance | None:
        """The record of id ``inst_id`` (never matched by name); None if there is none."""
        r = self.db.one("SELECT * FROM instances WHERE id=?", (inst_id,))
        return _record(r) if r is not None else None

    def find_name(self, name: str) -> Instance | None:
        """The record named ``name`` (never matched by id); None if there is none."""
        r = self.db.one("SELECT * FROM instances WHERE name=?", (name,))
        return _record(r) if r is not None else None

    def list(self, states: Iterable[str] | None = None) -> list[Instance]:
        """All records, oldest first; with ``states``, only those in one of them."""
        if states is None:
            rows = self.db.query("SELECT * FROM instances ORDER BY created_at")
        else:
            states = tuple(states)
            marks = ",".join("?" * len(states))
            rows = self.db.query(f"SELECT * FROM instances WHERE state IN ({marks}) ORDER BY created_at", states)
        return [_record(r) for r in rows]

    def refs(self, states: Iterable[str]) -> list[InstanceRef]:
        """InstanceRef of each record in one of ``states``, oldest first."""
        states = tuple(states)
        return [InstanceRef(r["id"], r["name"], r["kind"], r["state"]) for r in self.db.query(
            f"SELECT id, name, kind, state FROM instances WHERE state IN ({','.join('?' * len(states))}) "
            "ORDER BY created_at", states)]

    def ids(self) -> list[str]:
        """Every record's id, oldest first (the order of ``list``)."""
        return [r["id"] for r in self.db.query("SELECT id FROM instances ORDER BY created_at")]

    def list_ids(self, ids: Iterable[str]) -> list[Instance]:
        """The records of ``ids`` that exist, in no particular order."""
        ids, found = list(ids), []
        for i in range(0, len(ids), 500):  # SQLite's bound-parameter limit is 999 on old builds
            chunk = ids[i:i + 500]
            found += [_record(r) for r in self.db.query(
                f"SELECT * FROM instances WHERE id IN ({','.join('?' * len(chunk))})", tuple(chunk))]
        return found

    def row_generation(self, inst_id: str) -> int:
        """The generation of the last write of ``inst_id`` since this process started (0: none)."""
        return self.row_generations.get(inst_id, 0)

    def counts(self) -> list[tuple[str, str, int]]:
        """(kind, state, how many) for every kind and state that has records."""
        return [(r["kind"], r["state"], r["n"]) for r in self.db.query(
            "SELECT kind, state, count(*) AS n FROM instances GROUP BY kind, state")]

    def count(self) -> int:
        """How many records there are."""
        return self.db.one("SELECT count(*) AS n FROM instances")["n"]

    # -- writes --
    def insert(self, inst: Instance) -> bool:
        """Add ``inst`` (the name is reserved from now on); False, and nothing written, if
        an instance of that name or id exists already."""
        values = {**{k: getattr(inst, k) for k in COLUMNS},
                  "spec": json.dumps(_thawed(inst.spec)), "volumes": json.dumps(list(inst.volumes))}
        try:
            self.db.execute(f"INSERT INTO instances({', '.join(COLUMNS)}) VALUES({','.join('?' * len(COLUMNS))})",
                            tuple(values[k] for k in COLUMNS))
        except sqlite3.IntegrityError:
            return False
        self._changed(inst.id, inst.name, inst.state)
        return True

    def update(self, inst_id: str, **fields) -> Instance:
        """Set ``fields`` (of UPDATABLE: state, ip, error, volumes, image) and ``updated_at``; the
        new record. Announced as a lifecycle event with the record's state, changed or not.
        Raises NotFound if the record is gone (the caller holds the instance's lock)."""
        bad = set(fields) - UPDATABLE
        if bad:
            raise ValueError(f"instance records cannot update {sorted(bad)}")
        if "volumes" in fields:
            fields["volumes"] = json.dumps(list(fields["volumes"]))
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE instances SET {sets} WHERE id=?", (*fields.values(), inst_id))
        inst = self.find_id(inst_id)
        if inst is None:
            raise NotFound(f"instance {inst_id!r} not found")
        self._changed(inst.id, inst.name, inst.state)
        return inst

    def update_spec(self, inst_id: str, **fields) -> Instance:
        """Set ``fields`` (of SPEC_UPDATABLE) in the record's spec, the request it is kept
        to (a restart, a re-apply at start and a migration read them there); the new record.
        Announced as a lifecycle event naming what ``changed``. NotFound if it is gone."""
        bad = set(fields) - SPEC_UPDATABLE
        if bad:
            raise ValueError(f"instance specs cannot update {sorted(bad)}")
        with self.db.tx() as c:
            r = c.execute("SELECT spec FROM instances WHERE id=?", (inst_id,)).fetchone()
            if r is None:
                raise NotFound(f"instance {inst_id!r} not found")
            spec = json.loads(r["spec"])
            spec.update(fields)
            c.execute("UPDATE instances SET spec=?, updated_at=? WHERE id=?",
                      (json.dumps(spec), time.time(), inst_id))
        inst = self.find_id(inst_id)
        if inst is None:
            raise NotFound(f"instance {inst_id!r} not found")
        self._changed(inst.id, inst.name, inst.state, changed=sorted(fields))
        return inst

    def mark_cleanup(self, inst_id: str) -> bool:
        """Note in the record's spec that its removal is pending (retried at start). Not a
        state change: no event. False if it was marked already (or the record is gone)."""
        with self.db.tx() as c:
            r = c.execute("SELECT spec FROM instances WHERE id=?", (inst_id,)).fetchone()
            if r is None:
                return False
            spec = json.loads(r["spec"])
            if spec.get(CLEANUP_KEY):
                return False
            spec[CLEANUP_KEY] = True
            c.execute("UPDATE instances SET spec=? WHERE id=?", (json.dumps(spec), inst_id))
        self.generation = self.row_generations[inst_id] = next(self._generations)
        return True

    def delete(self, inst_id: str, *, state: str = "deleted") -> bool:
        """Remove the record, announced as a lifecycle event in ``state`` (``deleted``, or
        ``migrated`` when it left for another host). False if it was already gone."""
        inst = self.find_id(inst_id)
        if inst is None:
            return False
        if self.db.execute("DELETE FROM instances WHERE id=?", (inst_id,)).rowcount == 0:
            return False
        self._changed(inst.id, inst.name, state)
        self.row_generations.pop(inst_id, None)
        return True

    def _changed(self, inst_id: str, name: str, state: str, changed: list[str] | None = None) -> None:
        """After every write of a record's visible fields: the one place lifecycle events come
        from (``changed``: the spec fields an update changed, e.g. ["bandwidth"])."""
        self.generation = self.row_generations[inst_id] = next(self._generations)
        data = {"instance": inst_id, "name": name, "state": state}
        if changed:
            data["changed"] = changed
        self.events.publish("lifecycle", data)

