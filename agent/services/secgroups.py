"""Security groups: the one module that reads and writes ``security_groups`` and
``security_group_members`` (component "secgroups" in the state DB).

Terms: a *group* is a named list of rules (agent.models.SecurityGroupRule); an instance is
a *member* of one or more groups (``["default"]`` unless its create said otherwise; the
group ``default`` is made, without rules, when first needed). What reaches a member and
what may leave it is the host's ``[network] default_policy`` plus its groups' rules,
enforced by the host network's nft tables (containers/firewall.py): every change here
re-renders the whole filter in one atomic batch, so a change is live when the call returns
(an instance's create or delete changes only its own elements: ``port_policy``).

The filter asks ``policy()`` (set as the network's policy source by the composition root)
on every rebuild: at the agent's start, at each instance's attach, on each change here.
Membership rows of instances that no longer have a record are ignored (and dropped when
seen): removal paths need not know about groups.
"""
from __future__ import annotations

import json
import time

from agent import models
from agent.errors import Conflict, NotFound, Unprocessable
from containers.firewall import Policy, PortPolicy, Rule

DEFAULT_GROUP = "default"
VM_LEASE_PREFIX = "vm:"  # containers.network's name for a VM's lease

SCHEMA_STEPS = [
    """
    CREATE TABLE security_groups (
        name TEXT PRIMARY KEY,
        description TEXT NOT NULL DEFAULT '',
        rules TEXT NOT NULL,            -- JSON list of SecurityGroupRule
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE security_group_members (
        instance_id TEXT NOT NULL,
        grp TEXT NOT NULL REFERENCES security_groups(name),
        PRIMARY KEY (instance_id, grp)
    );
    """,
]


class SecurityGroups:
    def __init__(self, root):
        self.root = root
        self.db = root.db
        self.db.apply_schema("secgroups", SCHEMA_STEPS)

    # -- reads --
    def _rows(self, name: str | None = None):
        if name is None:
            return self.db.query("SELECT * FROM security_groups ORDER BY name")
        return self.db.query("SELECT * FROM security_groups WHERE name=?", (name,))

    def _members(self) -> dict[str, list[str]]:
        """instance id -> its groups, for instances that still have a record."""
        live = {i.id for i in self.root.records.list()}
        out: dict[str, list[str]] = {}
        for r in self.db.query("SELECT instance_id, grp FROM security_group_members ORDER BY rowid"):
            if r["instance_id"] in live:
                out.setdefault(r["instance_id"], []).append(r["grp"])
        return out

    def list(self) -> list[dict]:
        names = {i.id: i.name for i in self.root.records.list()}
        users: dict[str, list[str]] = {}
        for inst_id, groups in self._members().items():
            for g in groups:
                users.setdefault(g, []).append(names[inst_id])
        return [{"name": r["name"], "description": r["description"], "rules": json.loads(r["rules"]),
                 "instances": sorted(users.get(r["name"], [])), "created_at": r["created_at"],
                 "updated_at": r["updated_at"]} for r in self._rows()]

    def get(self, name: str) -> dict:
        for g in self.list():
            if g["name"] == name:
                return g
        raise NotFound(f"security group {name!r} not found")

    def of_instance(self, inst_id: str) -> list[str]:
        return self._members().get(inst_id) or [DEFAULT_GROUP]

    def definitions(self, names: list[str]) -> list[dict]:
        """name, description and rules of each group (what a migration carries)."""
        out = []
        for n in names:
            rows = self._rows(n)
            if rows:
                out.append({"name": n, "description": rows[0]["description"],
                            "rules": json.loads(rows[0]["rules"])})
        return out

    # -- writes --
    def _check_remote_groups(self, name: str, rules: list[models.SecurityGroupRule]) -> None:
        for r in rules:
            if r.remote_group and r.remote_group != name and not self._rows(r.remote_group):
                raise NotFound(f"security group {r.remote_group!r} (a rule's remote_group) not found: "
                               "create it first (POST /v1/security-groups)")

    def create(self, req: models.SecurityGroupCreate) -> dict:
        self._check_remote_groups(req.name, req.rules)
        now = time.time()
        with self.db.tx() as c:
            if c.execute("SELECT 1 FROM security_groups WHERE name=?", (req.name,)).fetchone():
                raise Conflict(f"security group {req.name!r} exists: PUT its rules or pick another name")
            c.execute("INSERT INTO security_groups VALUES(?,?,?,?,?)",
                      (req.name, req.description, _rules_json(req.rules), now, now))
        self._changed(req.name, "created")
        return self.get(req.name)

    def replace_rules(self, name: str, req: models.SecurityGroupRules) -> dict:
        """Replace the group's rules; live on every member when this returns."""
        self._check_remote_groups(name, req.rules)
        with self.db.tx() as c:
            n = c.execute("UPDATE security_groups SET rules=?, updated_at=? WHERE name=?",
                          (_rules_json(req.rules), time.time(), name)).rowcount
        if not n:
            raise NotFound(f"security group {name!r} not found")
        self._changed(name, "updated")
        return self.get(name)

    def delete(self, name: str) -> bool:
        """Conflict while an instance is in it or another group's rule names it."""
        group = self.get(name)
        if group["instances"]:
            raise Conflict(f"security group {name!r} is used by {', '.join(group['instances'])}: "
                           "move them to other groups first")
        users = [g["name"] for g in self.list() if g["name"] != name
                 and any(r.get("remote_group") == name for r in g["rules"])]
        if users:
            raise Conflict(f"security group {name!r} is named by rules of {', '.join(users)}: change those first")
        with self.db.tx() as c:
            c.execute("DELETE FROM security_group_members WHERE grp=?", (name,))  # rows of gone instances
            c.execute("DELETE FROM security_groups WHERE name=?", (name,))
        self._changed(name, "deleted")
        return True

    def check(self, names: list[str] | None) -> list[str]:
        """The groups an instance asks for (None: ["default"], made if missing); NotFound if one
        does not exist."""
        names = list(names or [DEFAULT_GROUP])
        if DEFAULT_GROUP in names:
            self.ensure_default()
        missing = [n for n in names if not self._rows(n)]
        if missing:
            raise NotFound(f"security group {missing[0]!r} not found: create it first "
                           "(POST /v1/security-groups)")
        return names

    def ensure_default(self) -> None:
        now = time.time()
        self.db.execute("INSERT OR IGNORE INTO security_groups VALUES(?,?,?,?,?)",
                        (DEFAULT_GROUP, "made by the agent: instances created without groups", "[]", now, now))

    def join(self, inst_id: str, names: list[str], *, apply: bool = True) -> None:
        """Make ``names`` the instance's groups (checked with ``check`` first)."""
        with self.db.tx() as c:
            c.execute("DELETE FROM security_group_members WHERE instance_id=?", (inst_id,))
            c.executemany("INSERT INTO security_group_members VALUES(?,?)", [(inst_id, n) for n in names])
        if apply:
            self.apply()

    def set_instance_groups(self, ref: str, req: models.InstanceSecurityGroups) -> dict:
        inst = self.root.instances.get(ref)
        network = inst.spec_dict().get("network", "bridge")
        if network != "bridge":
            raise Unprocessable(f"instance {inst.name!r} has network {network!r}: security groups filter the bridge")
        names = self.check(req.security_groups)
        self.join(inst.id, names)
        self.root.events.publish("security_group", {"instance": inst.id, "name": inst.name,
                                                    "security_groups": names, "change": "instance"})
        return {"security_groups": names}

    def adopt(self, groups: list[models.SecurityGroupCreate] | None) -> list[str]:
        """A migration's groups: make the missing ones; Conflict naming the first group that
        exists here with other rules. Returns their names."""
        groups = groups or []
        for g in groups:
            rows = self._rows(g.name)
            if rows and json.loads(rows[0]["rules"]) != json.loads(_rules_json(g.rules)):
                raise Conflict(f"security group {g.name!r} is defined differently on this host: make the "
                               "two hosts' definitions the same (PUT /v1/security-groups/{name}) and retry")
        for g in groups:
            if not self._rows(g.name):
                now = time.time()
                self.db.execute("INSERT OR IGNORE INTO security_groups VALUES(?,?,?,?,?)",
                                (g.name, g.description, _rules_json(g.rules), now, now))
        return [g.name for g in groups]

    # -- the filter --
    def policy(self) -> Policy:
        """What containers/firewall.py renders: every instance with a record is a member of its
        groups (an instance without rows: ``default``)."""
        groups = {r["name"]: tuple(Rule(**x) for x in json.loads(r["rules"])) for r in self._rows()}
        members = self._members()
        by_lease = {}
        for inst in self.root.records.list():
            key = VM_LEASE_PREFIX + inst.id if inst.kind == "vm" else inst.name
            by_lease[key] = tuple(members.get(inst.id) or (DEFAULT_GROUP,))
        return Policy(default=self.root.config.network.default_policy, groups=groups, members=by_lease)

    def port_policy(self, lease: str) -> PortPolicy | None:
        """The part of ``policy()`` the port of lease ``lease`` needs (a create or a delete
        changes only that port's elements): None if no record owns the lease (not filtered)."""
        records = self.root.records
        if lease.startswith(VM_LEASE_PREFIX):
            inst = records.find_id(lease[len(VM_LEASE_PREFIX):])
            if inst is None or inst.kind != "vm":
                return None
        else:
            inst = records.find_name(lease)
            if inst is None or inst.kind == "vm":
                return None
        groups = tuple(r["grp"] for r in self.db.query(
            "SELECT grp FROM security_group_members WHERE instance_id=? ORDER BY rowid", (inst.id,)))
        groups = groups or (DEFAULT_GROUP,)
        rules = {}
        for g in dict.fromkeys(groups):
            rows = self._rows(g)
            if rows:
                rules[g] = tuple(Rule(**x) for x in json.loads(rows[0]["rules"]))
        return PortPolicy(default=self.root.config.network.default_policy, groups=groups, rules=rules)

    def apply(self) -> None:
        """Re-render the host network's filter if the host network is in use here."""
        net = self.root.network_if_used()
        if net is not None:
            net.apply_firewall()

    def _changed(self, name: str, change: str) -> None:
        self.apply()
        self.root.events.publish("security_group", {"name": name, "change": change})


def _rules_json(rules) -> str:
    return json.dumps([r.model_dump(exclude_none=True) for r in rules], sort_keys=True)
