"""/v1/security-groups and an instance's groups: the API contract (fake drivers; the real
filter is tested in tests/functional/test_security_groups_real.py)."""
from __future__ import annotations

import secrets

import pytest

from tests.api.conftest import assert_error

WEB = [{"direction": "ingress", "protocol": "tcp", "port_min": 80, "port_max": 81, "remote_cidr": "10.0.0.0/8"},
       {"direction": "egress", "protocol": "udp", "port_min": 53}]


def name(prefix="sg"):
    return f"{prefix}-{secrets.token_hex(3)}"


def test_create_show_replace_delete(admin):
    n = name()
    r = admin.post("/v1/security-groups", json={"name": n, "rules": WEB})
    assert r.status_code == 201, r.text
    assert r.json()["rules"][0]["port_min"] == 80 and r.json()["instances"] == []
    assert n in [g["name"] for g in admin.get("/v1/security-groups").json()["security_groups"]]
    assert_error(admin.post("/v1/security-groups", json={"name": n, "rules": []}), 409)
    r = admin.put(f"/v1/security-groups/{n}", json={"rules": [{"direction": "ingress", "protocol": "icmp"}]})
    assert r.status_code == 200 and r.json()["rules"] == [{"direction": "ingress", "protocol": "icmp"}]
    assert admin.delete(f"/v1/security-groups/{n}").json() == {"deleted": True}
    assert_error(admin.get(f"/v1/security-groups/{n}"), 404)


@pytest.mark.parametrize("rule, problem", [
    ({"direction": "ingress", "protocol": "icmp", "port_min": 1}, "tcp or udp"),
    ({"direction": "ingress", "protocol": "tcp", "port_max": 80}, "needs port_min"),
    ({"direction": "ingress", "remote_cidr": "10.0.0.0/8", "remote_group": "x"}, "not both"),
    ({"direction": "ingress", "remote_cidr": "300.0.0.0/8"}, "remote_cidr"),
    ({"direction": "sideways"}, "direction"),
    ({"direction": "ingress", "protocol": "tcp", "port_min": 0}, "port_min"),
])
def test_bad_rules_are_422_and_leave_nothing(admin, rule, problem):
    n = name()
    r = admin.post("/v1/security-groups", json={"name": n, "rules": [rule]})
    assert problem in assert_error(r, 422)["message"]
    assert_error(admin.get(f"/v1/security-groups/{n}"), 404)


def test_a_rule_naming_a_missing_group_is_404_and_leaves_nothing(admin):
    """Like an instance naming a missing group: the body is valid, what it names is not there."""
    n = name()
    r = admin.post("/v1/security-groups", json={"name": n, "rules": [{"direction": "ingress",
                                                                       "remote_group": "no-such-group"}]})
    assert "'no-such-group'" in assert_error(r, 404)["message"]
    assert_error(admin.get(f"/v1/security-groups/{n}"), 404)


def test_writes_are_admin_only(reader, admin):
    assert_error(reader.post("/v1/security-groups", json={"name": name(), "rules": []}), 403)
    assert reader.get("/v1/security-groups").status_code == 200


def test_an_instance_joins_groups_at_create_and_changes_them_live(admin, images):
    g1, g2 = name(), name()
    for g in (g1, g2):
        assert admin.post("/v1/security-groups", json={"name": g, "rules": []}).status_code == 201
    inst = name("c")
    body = {"name": inst, "kind": "container", "image": "busybox", "command": ["sleep", "1"],
            "security_groups": [g1]}
    op = admin.wait(admin.post("/v1/instances", json=body).json())
    assert op["status"] == "succeeded", op
    assert admin.get(f"/v1/instances/{inst}/security-groups").json() == {"security_groups": [g1]}
    assert admin.get(f"/v1/security-groups/{g1}").json()["instances"] == [inst]
    assert_error(admin.delete(f"/v1/security-groups/{g1}"), 409)
    r = admin.put(f"/v1/instances/{inst}/security-groups", json={"security_groups": [g2]})
    assert r.status_code == 200 and r.json() == {"security_groups": [g2]}
    assert admin.get(f"/v1/security-groups/{g1}").json()["instances"] == []
    assert_error(admin.put(f"/v1/instances/{inst}/security-groups", json={"security_groups": ["nope-x"]}), 404)
    assert admin.delete(f"/v1/instances/{inst}").status_code == 200
    assert admin.delete(f"/v1/security-groups/{g2}").json() == {"deleted": True}  # no member left


def test_unknown_group_at_create_is_404_and_leaves_no_instance(admin, images):
    inst = name("c")
    r = admin.post("/v1/instances", json={"name": inst, "kind": "container", "image": "busybox",
                                         "command": ["sleep", "1"], "security_groups": ["no-such-grp"]})
    assert_error(r, 404)
    assert_error(admin.get(f"/v1/instances/{inst}"), 404)


def test_without_groups_an_instance_is_in_default(admin, images):
    inst = name("c")
    op = admin.wait(admin.post("/v1/instances", json={"name": inst, "kind": "container", "image": "busybox",
                                                      "command": ["sleep", "1"]}).json())
    assert op["status"] == "succeeded", op
    assert admin.get(f"/v1/instances/{inst}/security-groups").json() == {"security_groups": ["default"]}
    assert inst in admin.get("/v1/security-groups/default").json()["instances"]
    admin.delete(f"/v1/instances/{inst}")


def test_changes_are_events(tmp_path):
    from tests.api.conftest import inprocess_app
    _, client, root = inprocess_app(tmp_path)
    try:
        with root.events.subscribe(["security_group"]) as sub:
            assert client.post("/v1/security-groups", json={"name": "ev", "rules": []}).status_code == 201
            assert client.put("/v1/security-groups/ev", json={"rules": [{"direction": "egress"}]}).status_code == 200
            assert client.delete("/v1/security-groups/ev").status_code == 200
            seen = [sub.get(5) for _ in range(3)]
        assert [(e["type"], e["data"]["name"], e["data"]["change"]) for e in seen] == \
            [("security_group", "ev", c) for c in ("created", "updated", "deleted")]
    finally:
        root.stop()


def test_groups_are_for_bridged_instances(admin, images):
    inst = name("c")
    body = {"name": inst, "kind": "container", "image": "busybox", "command": ["sleep", "1"], "network": "none"}
    r = admin.post("/v1/instances", json={**body, "security_groups": ["default"]})
    assert "filter the bridge" in assert_error(r, 422)["message"]
    assert admin.wait(admin.post("/v1/instances", json=body).json())["status"] == "succeeded"
    r = admin.put(f"/v1/instances/{inst}/security-groups", json={"security_groups": ["default"]})
    assert "filter the bridge" in assert_error(r, 422)["message"]
    admin.delete(f"/v1/instances/{inst}")
