"""agent/services/records.py on a real SQLite database: the instance records, their
verbs, the lifecycle events they announce and the API form they render to."""
from __future__ import annotations

import dataclasses
import json
import threading

import pytest

from agent.errors import NotFound
from agent.events import EventBus
from agent.services.records import CLEANUP_KEY, Instance, InstanceRecords, InstanceRef

SPEC = {"name": "web", "kind": "container", "image": "busybox", "cpus": 0.5, "memory_mib": 64,
        "env": {"A": "1"}, "command": ["sleep", "60"], "ports": [], "image_id": "f" * 64}


def _inst(n: int = 1, **kw) -> Instance:
    base = dict(id=f"{n:032x}", name=f"web{n}", kind="container", image="f" * 64, state="creating",
                pool="default", spec={**SPEC, "name": f"web{n}"}, volumes=(f"i-{n:012x}-rootfs",),
                node="host1", created_at=1000.0 + n, updated_at=1000.0 + n)
    return Instance(**{**base, **kw})


@pytest.fixture
def bus():
    return EventBus()


@pytest.fixture
def events(bus):
    sub = bus.subscribe(["lifecycle"])
    yield lambda: [e["data"] for e in iter(lambda: sub.get(0), None)]
    sub.close()


@pytest.fixture
def records(db, bus):
    return InstanceRecords(db, bus)


def test_insert_then_find_by_id_name_or_either(records, events):
    inst = _inst()
    assert records.insert(inst) is True
    assert records.find_id(inst.id) == inst
    assert records.find_name("web1") == inst
    assert records.find(inst.id) == inst and records.find("web1") == inst
    assert records.find_id("web1") is None and records.find_name(inst.id) is None
    assert records.find("nope") is None
    assert events() == [{"instance": inst.id, "name": "web1", "state": "creating"}]


def test_a_taken_name_or_id_is_refused_and_nothing_is_written(records, events):
    assert records.insert(_inst(1))
    events()
    assert records.insert(_inst(2, name="web1")) is False
    assert records.insert(_inst(1, name="other")) is False
    assert [i.name for i in records.list()] == ["web1"]
    assert events() == []


def test_exactly_one_of_concurrent_inserts_of_a_name_wins(records):
    wins = []

    def insert(n):
        wins.append(records.insert(_inst(n, name="same")))
    threads = [threading.Thread(target=insert, args=(n,)) for n in range(1, 9)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(wins) == [False] * 7 + [True]
    assert records.count() == 1


def test_records_are_frozen_and_their_spec_read_only(records):
    records.insert(_inst())
    inst = records.find("web1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        inst.state = "running"
    with pytest.raises(TypeError):
        inst.spec["cpus"] = 4
    with pytest.raises(TypeError):
        inst.spec["env"]["A"] = "2"
    assert isinstance(inst.volumes, tuple) and isinstance(inst.spec["command"], tuple)
    copy = inst.spec_dict()
    assert copy == SPEC | {"name": "web1"} and isinstance(copy["command"], list)
    copy["env"]["A"] = "2"
    assert records.find("web1").spec["env"]["A"] == "1"


def test_update_returns_the_new_record_and_announces_it(records, events):
    inst = _inst()
    records.insert(inst)
    events()
    new = records.update(inst.id, state="running", ip="10.88.0.5")
    assert (new.state, new.ip, new.error) == ("running", "10.88.0.5", None)
    assert new.updated_at > inst.updated_at and new.created_at == inst.created_at
    assert records.find_id(inst.id) == new
    records.update(inst.id, ip="10.88.0.6")  # no state change: still announced, as before
    records.update(inst.id, volumes=())
    assert records.find_id(inst.id).volumes == ()
    assert events() == [{"instance": inst.id, "name": "web1", "state": "running"}] * 3


def test_update_refuses_fixed_fields_and_missing_records(records):
    inst = _inst()
    records.insert(inst)
    with pytest.raises(ValueError, match="name"):
        records.update(inst.id, name="renamed")
    with pytest.raises(NotFound):
        records.update("0" * 32, state="running")
    assert records.find_id(inst.id) == inst


def test_update_spec_changes_only_what_it_may_and_says_what_changed(records, events):
    inst = _inst()
    records.insert(inst)
    events()
    bw = {"ingress_kbit": 8000, "egress_kbit": None, "burst_kbit": None}
    new = records.update_spec(inst.id, bandwidth=bw)
    assert new.spec["bandwidth"]["ingress_kbit"] == 8000 and new.to_dict()["bandwidth"] == bw
    assert {k: v for k, v in new.spec_dict().items() if k != "bandwidth"} == inst.spec_dict()
    assert events() == [{"instance": inst.id, "name": "web1", "state": "creating", "changed": ["bandwidth"]}]
    assert records.update_spec(inst.id, bandwidth=None).to_dict()["bandwidth"] is None
    with pytest.raises(ValueError, match="image"):
        records.update_spec(inst.id, image="other")
    with pytest.raises(NotFound):
        records.update_spec("0" * 32, bandwidth=None)


def test_mark_cleanup_is_noted_in_the_spec_once_without_an_event(records, events):
    inst = _inst()
    records.insert(inst)
    events()
    assert not inst.cleanup_pending
    assert records.mark_cleanup(inst.id) is True
    assert records.mark_cleanup(inst.id) is False
    assert records.mark_cleanup("0" * 32) is False
    marked = records.find_id(inst.id)
    assert marked.cleanup_pending and marked.spec[CLEANUP_KEY] is True
    assert events() == []


def test_delete_announces_the_final_state_and_says_whether_it_removed(records, events):
    a, b = _inst(1), _inst(2)
    records.insert(a)
    records.insert(b)
    events()
    assert records.delete(a.id) is True
    assert records.delete(a.id) is False
    assert records.delete(b.id, state="migrated") is True
    assert records.list() == []
    assert events() == [{"instance": a.id, "name": "web1", "state": "deleted"},
                        {"instance": b.id, "name": "web2", "state": "migrated"}]


def test_list_filters_by_state_oldest_first_and_counts_group(records):
    records.insert(_inst(3, state="running"))
    records.insert(_inst(1, state="incoming"))
    records.insert(_inst(2, state="running", kind="vm", mac="52:54:00:00:00:02"))
    assert [i.name for i in records.list()] == ["web1", "web2", "web3"]
    assert [i.name for i in records.list(states=("running",))] == ["web2", "web3"]
    assert [i.name for i in records.list(states=("incoming", "error"))] == ["web1"]
    assert records.list(states=()) == []
    # refs: who and in which state, no JSON column decoded (a /metrics scrape's list)
    assert records.refs(("running",)) == [InstanceRef(f"{2:032x}", "web2", "vm", "running"),
                                          InstanceRef(f"{3:032x}", "web3", "container", "running")]
    assert records.refs(()) == []
    assert sorted(records.counts()) == [("container", "incoming", 1), ("container", "running", 1),
                                        ("vm", "running", 1)]
    assert records.count() == 3


def test_every_write_bumps_the_generation(records):
    inst = _inst()
    seen = [records.generation]
    records.insert(inst)
    seen.append(records.generation)
    records.update(inst.id, state="running")
    seen.append(records.generation)
    records.mark_cleanup(inst.id)
    seen.append(records.generation)
    records.delete(inst.id)
    seen.append(records.generation)
    assert seen == sorted(set(seen))  # strictly increasing


def test_the_api_form_is_what_the_row_rendered_to_before(records, db):
    inst = _inst(kind="vm", mac="52:54:00:00:00:01", spec={**SPEC, "kind": "vm", "cpus": 2, "memory_mib": 512})
    records.insert(inst)
    records.update(inst.id, state="running", ip="10.88.0.9", error=None)
    r = db.one("SELECT * FROM instances WHERE id=?", (inst.id,))
    spec = json.loads(r["spec"])
    before = {"id": r["id"], "name": r["name"], "kind": r["kind"], "image": r["image"], "state": r["state"],
              "pool": r["pool"], "cpus": spec.get("cpus", 1), "memory_mib": spec.get("memory_mib", 0),
              "volumes": json.loads(r["volumes"]), "ip": r["ip"], "mac": r["mac"], "node": r["node"],
              "error": r["error"], "bandwidth": spec.get("bandwidth"),
              # a VM's maxima default to what it was made with; autostart to true (legacy specs)
              "max_cpus": 2, "max_memory_mib": 512, "autostart": True, "tty": False,  # no terminal by default
              "created_at": r["created_at"], "updated_at": r["updated_at"]}
    got = records.find_id(inst.id).to_dict()
    assert json.dumps(got) == json.dumps(before)  # same keys, same order, same values
    bare = _inst(2, spec={"name": "web2"})  # defaults for a spec without cpus/memory
    assert (bare.to_dict()["cpus"], bare.to_dict()["memory_mib"]) == (1, 0)


def test_a_state_dir_whose_agent_schema_made_the_table_keeps_it(db, bus):
    db.execute("""CREATE TABLE instances (
        id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, image TEXT NOT NULL,
        spec TEXT NOT NULL, state TEXT NOT NULL, pool TEXT NOT NULL, volumes TEXT NOT NULL DEFAULT '[]',
        ip TEXT, mac TEXT, node TEXT, error TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL)""")
    db.execute("INSERT INTO instances(id, name, kind, image, spec, state, pool, created_at, updated_at) "
               "VALUES('a', 'old', 'container', 'img', '{}', 'running', 'default', 1, 2)")
    records = InstanceRecords(db, bus)
    assert db.version("instances") == 1
    old = records.find("old")
    assert (old.state, old.volumes, old.cpus) == ("running", (), 1)
    assert records.insert(_inst())
    assert records.count() == 2
