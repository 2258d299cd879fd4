"""containers.firewall's rendering (no host tables touched: the real filter is exercised by
tests/functional/test_tenant_isolation*.py and test_security_groups_real.py)."""
from __future__ import annotations

from containers.firewall import Firewall, Policy, Port, Rule, set_name

FW = Firewall(rtag="ab12", bridge="natstx", gateway="10.0.0.1")
A = Port("a", "nvab1200000001", "02:00:00:00:00:01", "10.0.0.2")
VM = Port("vm:x", "nt0123456789ab", "52:54:00:00:00:02", "10.0.0.3")


def chain(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith(f"chain {name} "))
    end = next(i for i in range(start, len(lines)) if lines[i].strip() == "}")
    return [ln.strip() for ln in lines[start + 1:end]]


def test_the_batch_replaces_both_tables_atomically():
    text = FW.render([], None)
    assert text.splitlines()[:4] == ["table bridge nodeagent_ab12 {}", "delete table bridge nodeagent_ab12",
                                     "table inet nodeagent_ab12 {}", "delete table inet nodeagent_ab12"]
    assert 'iifname "natstx" ip daddr 127.0.0.0/8 drop' in text
    assert chain(text, "input") == [
        'iifname "natstx" ct state established,related accept',
        'iifname "natstx" ip daddr 10.0.0.1 icmp type echo-request limit rate 50/second burst 100 packets accept',
        'iifname "natstx" drop']  # the host answers replies and (bounded) pings of the gateway, nothing else
    assert 'iifname "nvab12*" drop' in text  # a veth of ours without rules sends nothing


def test_each_port_may_send_only_as_itself():
    rules = chain(FW.render([A, VM], None), f"p_{VM.ifname}")
    assert rules[0] == f"ether saddr != {VM.mac} drop"
    assert f"arp saddr ether {VM.mac} arp saddr ip {{ {VM.ip}, 0.0.0.0 }} accept" in rules[1]
    # and QEMU's RARP announcement after a migration (from its own MAC: checked first)
    assert rules[2:] == [f"ether type ip ip saddr {VM.ip} accept", "ether type 0x8035 accept", "drop"]


def test_policies_and_rules():
    groups = {"web": (Rule("ingress", "tcp", 80, 81, "10.0.0.0/8"), Rule("egress", "udp", 53)),
              "db": (Rule("ingress", "any", remote_group="web"),)}
    members = {"a": ("web",), "vm:x": ("db",)}
    same = FW.render([A, VM], Policy("same-group", groups, members))
    assert chain(same, f"in_{A.ifname}") == ["ct status dnat accept", f"ip saddr @{set_name('web')} accept",
                                             "ip saddr 10.0.0.0/8 meta l4proto tcp th dport 80-81 accept", "drop"]
    assert chain(same, f"eg_{A.ifname}") == ["meta l4proto udp th dport 53 return", "drop"]
    assert chain(same, f"eg_{VM.ifname}") == []  # no egress rule: everything may leave
    assert f"ip saddr @{set_name('web')} meta nfproto ipv4 accept" in chain(same, f"in_{VM.ifname}")
    assert "elements = { 10.0.0.2 }" in same  # web's members
    deny = FW.render([A, VM], Policy("deny", groups, members))
    assert chain(deny, f"in_{VM.ifname}") == ["ct status dnat accept",
                                              f"ip saddr @{set_name('web')} meta nfproto ipv4 accept", "drop"]
    allow = FW.render([A, VM], Policy("allow", groups, members))
    assert chain(allow, f"in_{VM.ifname}")[:2] == ["ct status dnat accept", "accept"]


def test_instances_the_policy_does_not_know_are_not_group_filtered():
    text = FW.render([A, VM], Policy("same-group", {}, {"a": ("web",)}))
    assert f"chain in_{A.ifname}" in text and f"chain in_{VM.ifname}" not in text
    assert f"chain p_{VM.ifname}" in text  # anti-spoofing all the same
