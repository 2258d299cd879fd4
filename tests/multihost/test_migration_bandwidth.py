"""A VM's bandwidth limits move with it: live-migrated between two simulated hosts, its new
tap on the destination is shaped as before, the source keeps no ifb, and the destination
changes them live (PATCH)."""
from __future__ import annotations

import uuid

import pytest

from testbed import harness
from tests.multihost.checks import OP_TIMEOUT_S, assert_runs, migrate

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def cluster():
    with harness.running_cluster("nodeagent-mh") as c:
        yield c


def tap_of(host, name) -> str:
    out = host.run("virsh", "-c", "qemu:///system", "domiflist", name, timeout=30).stdout
    (tap,) = [line.split()[0] for line in out.splitlines()[2:] if line.strip()]
    return tap


def shaped(host, dev) -> str:
    """The tbf rate on ``dev`` in ``host``'s network namespace ("" if none)."""
    out = host.run("tc", "qdisc", "show", "dev", dev, "root", timeout=30).stdout
    return out.split(" rate ")[1].split()[0] if " tbf " in out else ""


def ifbs(host) -> list[str]:
    out = host.run("ip", "-o", "link", "show", "type", "ifb", timeout=30).stdout
    return [line.split(":")[1].strip() for line in out.splitlines() if ": nbw" in line]


def test_live_migration_keeps_the_limits(cluster, apis, image):
    h1, h2 = cluster.hosts
    name = f"mbw-{uuid.uuid4().hex[:6]}"
    op = apis["h1"].wait(apis["h1"].post("/v1/instances", json={
        "name": name, "kind": "vm", "image": image, "memory_mib": 128, "network": "bridge",
        "bandwidth": {"ingress_kbit": 8000, "egress_kbit": 4000}}).json(), timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op["error"]
    tap = tap_of(h1, name)
    assert shaped(h1, tap) == "8Mbit" and ifbs(h1)
    op = migrate(apis["h1"], name, "h2")
    assert op["status"] == "succeeded", op["error"]
    assert_runs(apis["h2"], name)
    moved = apis["h2"].get(f"/v1/instances/{name}").json()
    assert moved["bandwidth"] == {"ingress_kbit": 8000, "egress_kbit": 4000, "burst_kbit": None}
    tap2 = tap_of(h2, name)
    assert shaped(h2, tap2) == "8Mbit" and ifbs(h2), "the destination shapes the new tap"
    assert ifbs(h1) == [], "the source's ifb left with the tap"
    r = apis["h2"].patch(f"/v1/instances/{name}", json={"bandwidth": {"ingress_kbit": 2000}})
    assert r.status_code == 200, r.text
    assert shaped(h2, tap2) == "2Mbit" and ifbs(h2) == []
    assert apis["h2"].delete(f"/v1/instances/{name}").json() == {"deleted": True}
