"""containers.firewall's rendering (no host tables touched: the real filter is exercised by
tests/functional/test_tenant_isolation*.py and test_security_groups_real.py)."""
from __future__ import annotations

from containers.firewall import Firewall, Policy, Port, PortPolicy, Rule, combo_name, set_name

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
    text = FW.render([A, VM], None)
    assert chain(text, "port") == [
        "iifname . ether saddr != @p_l2 drop",
        "ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 iifname . arp saddr ether . arp saddr ip "
        "@p_arp accept",
        "ether type ip iifname . ip saddr @p_ip accept",
        "ether type 0x8035 accept",  # QEMU's RARP announcement after a migration (its own MAC: checked first)
        "drop"]
    assert f'"{VM.ifname}" . {VM.mac} . {VM.ip}, "{VM.ifname}" . {VM.mac} . 0.0.0.0' in text
    assert f'"{VM.ifname}" . {VM.ip}' in text and f'"{A.ifname}" . {A.mac}' in text
    assert chain(text, "prerouting")[-2:] == ["iifname @p_ports jump port", 'iifname "nvab12*" drop']


WEB, DB = combo_name(("web",)), combo_name(("db",))


def test_policies_and_rules():
    groups = {"web": (Rule("ingress", "tcp", 80, 81, "10.0.0.0/8"), Rule("egress", "udp", 53)),
              "db": (Rule("ingress", "any", remote_group="web"),)}
    members = {"a": ("web",), "vm:x": ("db",)}
    same = FW.render([A, VM], Policy("same-group", groups, members))
    assert chain(same, f"in_{WEB}") == ["ct status dnat accept", f"ip saddr @{set_name('web')} accept",
                                        "ip saddr 10.0.0.0/8 meta l4proto tcp th dport 80-81 accept", "drop"]
    assert chain(same, f"eg_{WEB}") == ["meta l4proto udp th dport 53 return", "drop"]
    assert chain(same, f"eg_{DB}") == []  # no egress rule: everything may leave
    assert f"ip saddr @{set_name('web')} meta nfproto ipv4 accept" in chain(same, f"in_{DB}")
    assert "elements = { 10.0.0.2 }" in same  # web's members
    assert f"{A.ip} : jump in_{WEB}, {VM.ip} : jump in_{DB}" in same
    deny = FW.render([A, VM], Policy("deny", groups, members))
    assert chain(deny, f"in_{DB}") == ["ct status dnat accept",
                                       f"ip saddr @{set_name('web')} meta nfproto ipv4 accept", "drop"]
    allow = FW.render([A, VM], Policy("allow", groups, members))
    assert chain(allow, f"in_{DB}")[:2] == ["ct status dnat accept", "accept"]


def test_instances_the_policy_does_not_know_are_not_group_filtered():
    text = FW.render([A, VM], Policy("same-group", {}, {"a": ("web",)}))
    assert f"{A.ip} : jump in_{WEB}" in text and f"{VM.ip} : jump" not in text
    assert f'"{VM.ifname}" . {VM.ip}' in text  # anti-spoofing all the same


def test_a_port_change_is_a_batch_of_its_own_elements():
    """Create and delete touch one port's elements (and a new combination's chains), never the rest."""
    fw = Firewall(rtag="ab12", bridge="natstx", gateway="10.0.0.1")
    fw.synced, fw._policy, fw._bcast = True, (True, "same-group"), True
    fw._ports = {"a": (A, ("web",))}
    fw._chains, fw._sets = {WEB}, {set_name("web")}
    pp = PortPolicy("same-group", ("db",), {"db": (Rule("ingress", "any", remote_group="web"),)})
    add = fw.change_batch("vm:x", VM, pp, filtered=True).splitlines()
    assert not any(A.ip in ln or A.ifname in ln for ln in add)
    assert f"add chain inet nodeagent_ab12 in_{DB}" in add and f"add set inet nodeagent_ab12 {set_name('db')} " \
        '{ type ipv4_addr; comment "group db"; }' in add
    assert f"add element inet nodeagent_ab12 ingress_of {{ {VM.ip} : jump in_{DB} }}" in add
    assert add[-4:] == [f'add element bridge nodeagent_ab12 p_ports {{ "{VM.ifname}" }}',
                        f'add element bridge nodeagent_ab12 p_l2 {{ "{VM.ifname}" . {VM.mac} }}',
                        f'add element bridge nodeagent_ab12 p_arp {{ "{VM.ifname}" . {VM.mac} . {VM.ip}, '
                        f'"{VM.ifname}" . {VM.mac} . 0.0.0.0 }}',
                        f'add element bridge nodeagent_ab12 p_ip {{ "{VM.ifname}" . {VM.ip} }}']
    gone = fw.change_batch("a", None, None, filtered=True).splitlines()
    assert f"delete element inet nodeagent_ab12 {set_name('web')} {{ {A.ip} }}" in gone
    assert all(ln.startswith("delete element") for ln in gone[:7]) and len(gone) == 9
    assert gone[7:] == [f"delete chain inet nodeagent_ab12 eg_{WEB}", f"delete chain inet nodeagent_ab12 in_{WEB}"]
    assert fw.change_batch("a", A, PortPolicy("same-group", ("web",)), filtered=True) == ""  # as it is
    assert fw.change_batch("vm:x", VM, PortPolicy("deny", ("db",)), filtered=True) is None  # other default
    fw.synced = False
    assert fw.change_batch("vm:x", VM, pp, filtered=True) is None  # nothing known: a full render
