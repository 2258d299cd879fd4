"""containers.firewall's per-port changes on the host's real nft: after any sequence of
creates, deletes and moves applied as element batches, the tables hold exactly what a full
render of the same state holds (the anti-spoofing and group filter a reviewer re-checks
through real instances in test_tenant_isolation*.py and test_security_groups_real.py)."""
from __future__ import annotations

import json
import secrets
import shutil
import subprocess

import pytest

from containers.firewall import Firewall, Policy, Port, PortPolicy, Rule

pytestmark = pytest.mark.real

GROUPS = {"web": (Rule("ingress", "tcp", 80, None, "10.0.0.0/8"), Rule("egress", "udp", 53)),
          "db": (Rule("ingress", "any", remote_group="web"),), "default": ()}


def _port(i: int, tag: str) -> Port:
    return Port(f"c{i}", f"nv{tag}{i:08x}", f"02:00:00:00:{i // 256:02x}:{i % 256:02x}",
                f"10.77.{i // 250}.{i % 250 + 2}")


def _contents(fw: Firewall) -> dict:
    """Every set's elements and every chain's rules of both tables, names normalised."""
    out: dict = {}
    for family in ("bridge", "inet"):
        text = subprocess.run(["nft", "-j", "list", "table", family, fw.table], capture_output=True,
                              text=True, check=True).stdout
        for item in json.loads(text)["nftables"]:
            kind, body = next(iter(item.items()))
            if kind in ("set", "map"):
                out[(family, kind, body["name"])] = sorted(json.dumps(e, sort_keys=True) for e in body.get("elem", []))
            elif kind == "rule":
                out.setdefault((family, "chain", body["chain"]), []).append(json.dumps(body["expr"], sort_keys=True))
            elif kind == "chain":
                out.setdefault((family, "chain", body["name"]), [])
    return out


@pytest.fixture
def firewalls():
    assert shutil.which("nft"), "nft is not installed: run scripts/setup-host"
    made = []

    def make():
        fw = Firewall(rtag=secrets.token_hex(2), bridge="nobr" + secrets.token_hex(3), gateway="10.77.0.1")
        made.append(fw)
        return fw
    yield make
    for fw in made:
        fw.remove()


def test_element_changes_end_where_a_full_render_does(firewalls):
    inc, full = firewalls(), firewalls()
    full.port_prefixes, full.bridge = inc.port_prefixes, inc.bridge
    tag = inc.rtag
    members = {f"c{i}": (("web",), ("db",), ("web", "db"), ("default",))[i % 4] for i in range(12)}
    ports = {f"c{i}": _port(i, tag) for i in range(12)}
    ports["c11"] = Port("vm:x", "nt0123456789ab", "52:54:00:00:00:99", "10.77.0.99")  # a VM's tap
    members["vm:x"] = ("db",)
    inc.apply([ports[f"c{i}"] for i in range(3)], Policy("same-group", GROUPS, members))

    def pp(owner):
        return PortPolicy("same-group", members[owner], {g: GROUPS[g] for g in members[owner]}) \
            if owner in members else None
    for i in range(3, 12):  # creates
        p = ports[f"c{i}"]
        assert inc.put(p.owner, p, pp(p.owner), filtered=True)
    for owner in ("c1", "c4"):  # deletes
        assert inc.put(owner, None, None, filtered=True)
    moved = Port("vm:x", "nt0123456789ac", "52:54:00:00:00:99", "10.77.0.99")  # a new tap name
    assert inc.put("vm:x", moved, pp("vm:x"), filtered=True)
    stranger = Port("s", f"nv{tag}00000040", "02:00:00:00:00:40", "10.77.0.42")
    assert inc.put("s", stranger, None, filtered=True)  # no record: anti-spoofing only
    now = [p for p in ports.values() if p.owner not in ("c1", "c4", "vm:x")] + [moved, stranger]
    full.apply(now, Policy("same-group", GROUPS, members))
    assert _contents(inc) == _contents(full)
    for owner in [o for o in members if o not in ("c1", "c4")]:  # the rest goes: so do their chains
        assert inc.put(owner, None, None, filtered=True)
    assert inc.put("s", None, None, filtered=True)
    full.apply([], Policy("same-group", GROUPS, members))
    got, want = _contents(inc), _contents(full)
    fwd = ("inet", "chain", "forward")
    assert got[fwd][:-1] == want[fwd] and "pkttype" in got[fwd][-1]  # the broadcast drop stays (stricter)
    assert {k: v for k, v in got.items() if k in want and k != fwd} == {k: v for k, v in want.items() if k != fwd}
    assert all(k[1] == "set" and k[2].startswith("g_") and not got[k] for k in set(got) - set(want))  # empty groups


def test_a_change_the_elements_cannot_carry_asks_for_a_full_render(firewalls):
    fw = firewalls()
    p = _port(1, fw.rtag)
    assert not fw.put(p.owner, p, None, filtered=False)  # nothing applied in this process yet
    fw.apply([], Policy("same-group", GROUPS, {}))
    # the first filtered port brings the broadcast drop: a full render
    assert not fw.put(p.owner, p, PortPolicy("same-group", ("web",), GROUPS), filtered=True)
    fw.apply([p], Policy("same-group", GROUPS, {p.owner: ("web",)}))
    subprocess.run(["nft", "delete", "table", "bridge", fw.table], check=True)  # behind our back
    q = _port(2, fw.rtag)
    with pytest.raises(Exception):
        fw.put(q.owner, q, PortPolicy("same-group", ("web",), GROUPS), filtered=True)
    assert not fw.synced  # the caller rebuilds in full
