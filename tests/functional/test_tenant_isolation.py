"""A real runc container as the attacker on the host bridge (root in its own netns, crafting
Ethernet frames with AF_PACKET): the host's loopback and addresses, spoofed sources and
gratuitous ARP are stopped by the nft tables of containers/firewall.py; each attack is
paired with the allowed case that must keep working."""
from __future__ import annotations

import ipaddress
import secrets
import socket
import subprocess
import threading
import urllib.request

import pytest

from containers import NetworkSpec, PortMap
from testbed.netattack import Sniffer, mac_of, send_arp, send_udp, wait_until
from testbed.runtimes import find_free_port, make_runc, make_spec

pytestmark = pytest.mark.real


@pytest.fixture
def rt(tmp_path):
    runtime, cleanup = make_runc(tmp_path)
    yield runtime
    cleanup()
    assert runtime.net.firewall.listing() == ""  # close() took both tables away


def run(rt, tmp_path, name, command=("sleep", "1000"), **net):
    rt.create(make_spec(rt, tmp_path, name, command, network=NetworkSpec(**net)))
    return rt.start(name)


def ns(rt, name) -> str:
    return rt.net.netns_name(name)


def tcp_ok(rt, name, ip, port) -> bool:
    """``name`` connects to ip:port and reads the server's "hi"."""
    res = rt.exec(name, ["nc", "-w", "2", ip, str(port)], timeout=10)
    return res.exit_code == 0 and res.stdout == "hi\n"


@pytest.fixture
def udp_on_loopback():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(2)
    yield s
    s.close()


def test_a_tenant_frame_to_the_hosts_loopback_is_dropped(rt, tmp_path, udp_on_loopback):
    info = run(rt, tmp_path, "a")
    port = udp_on_loopback.getsockname()[1]
    frame = dict(src_mac=mac_of(ns(rt, "a"), "eth0"), dst_mac=mac_of(None, rt.net.bridge),
                 src_ip=info.ip, dport=port)
    send_udp(ns(rt, "a"), dst_ip="127.0.0.1", payload="from-the-tenant", **frame)
    with pytest.raises(socket.timeout):
        udp_on_loopback.recvfrom(100)
    # allowed: the host's own clients reach a port published on 127.0.0.1
    web = find_free_port()
    run(rt, tmp_path, "web", ("httpd", "-f", "-p", "80", "-h", "/www"),
        ports=(PortMap(host_port=web, container_port=80),))

    def fetch():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{web}/index.html", timeout=2) as r:
                return r.read().decode()
        except OSError:
            return None
    assert wait_until(fetch) == "hello from busybox\n"


@pytest.fixture
def host_address():
    """A device of the host (one end of a veth pair, the kernel here has no dummy) with an
    address of its own, not on the bridge."""
    name = f"nadm{secrets.token_hex(3)}"
    addr = f"198.18.{secrets.randbelow(200) + 20}.{secrets.randbelow(200) + 20}"
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", f"{addr}/32", "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        yield addr
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


def listener(addr: str) -> socket.socket:
    """A TCP server on ``addr`` that answers "hi" and closes (so a client's nc ends)."""
    s = socket.socket()
    s.bind((addr, 0))
    s.listen()

    def serve():
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            with c:
                c.sendall(b"hi\n")
    threading.Thread(target=serve, daemon=True).start()
    return s


def test_the_hosts_addresses_refuse_tenants(rt, tmp_path, host_address):
    run(rt, tmp_path, "a")
    b = run(rt, tmp_path, "b", ("nc", "-ll", "-p", "7000", "-e", "echo", "hi"))
    with listener(rt.net.gateway) as gw, listener(host_address) as other:
        assert not tcp_ok(rt, "a", rt.net.gateway, gw.getsockname()[1])
        assert not tcp_ok(rt, "a", host_address, other.getsockname()[1])
        # allowed: the host reaches a tenant, and a tenant another one (no groups: open)
        assert wait_until(lambda: tcp_ok(rt, "a", b.ip, 7000))
        with socket.create_connection((b.ip, 7000), timeout=5) as c:
            assert c.recv(10) == b"hi\n"


def test_forged_source_ip_or_mac_does_not_leave_the_port(rt, tmp_path):
    a, b = run(rt, tmp_path, "a"), run(rt, tmp_path, "b")
    own_mac, b_mac = mac_of(ns(rt, "a"), "eth0"), mac_of(ns(rt, "b"), "eth0")
    other_ip = str(ipaddress.ip_address(b.ip) + 50)
    cases = [("forged-ip", own_mac, other_ip, False), ("forged-mac", "02:11:22:33:44:55", a.ip, False),
             ("forged-gw", own_mac, rt.net.gateway, False), ("own", own_mac, a.ip, True)]
    for tag, src_mac, src_ip, delivered in cases:
        needle = f"needle-{tag}-{secrets.token_hex(4)}"
        sniff = Sniffer(ns(rt, "b"), "eth0", needle.encode())
        send_udp(ns(rt, "a"), src_mac=src_mac, dst_mac=b_mac, src_ip=src_ip, dst_ip=b.ip, dport=9,
                 payload=needle)
        assert sniff.seen() is delivered, tag


def test_gratuitous_arp_for_the_gateway_is_not_seen(rt, tmp_path):
    a = run(rt, tmp_path, "a")
    run(rt, tmp_path, "b")
    own_mac = mac_of(ns(rt, "a"), "eth0")
    mac_bytes = bytes.fromhex(own_mac.replace(":", ""))
    for claim, seen in ((rt.net.gateway, False), (a.ip, True)):
        needle = mac_bytes + socket.inet_aton(claim)  # ARP's sender hardware + protocol address
        in_b = Sniffer(ns(rt, "b"), "eth0", needle)
        on_host = Sniffer(None, rt.net.bridge, needle)
        send_arp(ns(rt, "a"), src_mac=own_mac, sender_ip=claim, target_ip=claim)
        assert (in_b.seen(), on_host.seen()) == (seen, seen), claim


def test_rules_follow_the_ports_and_go_with_them(rt, tmp_path):
    run(rt, tmp_path, "a")
    veth = rt.net.veth_name("a")
    assert f'"{veth}"' in rt.net.firewall.listing()  # its elements in the port sets
    rt.delete("a")
    assert veth not in rt.net.firewall.listing()
    assert "127.0.0.0/8" in rt.net.firewall.listing()  # host protection stays with the bridge


def test_groups_keep_another_groups_unicast_and_everyones_broadcast_out(rt, tmp_path):
    """With groups in force (as the agent sets them): a tenant of another group neither
    reaches a port of a group it is not in nor broadcasts to it; a member does reach it."""
    from containers.firewall import Policy
    members = {"srv": ("web",), "peer": ("web",), "out": ("other",)}
    rt.net.policy_source = lambda: Policy("same-group", {"web": (), "other": ()}, members)
    srv = run(rt, tmp_path, "srv", ("nc", "-ll", "-p", "7000", "-e", "echo", "hi"))
    run(rt, tmp_path, "peer")
    run(rt, tmp_path, "out")
    assert wait_until(lambda: tcp_ok(rt, "peer", srv.ip, 7000))
    assert not tcp_ok(rt, "out", srv.ip, 7000)
    bcast = str(ipaddress.ip_network(rt.net.subnet).broadcast_address)
    for sender, src_ip in (("out", rt.get("out").ip), ("peer", rt.get("peer").ip)):
        needle = f"bcast-{sender}-{secrets.token_hex(4)}"
        sniff = Sniffer(ns(rt, "srv"), "eth0", needle.encode())
        send_udp(ns(rt, sender), src_mac=mac_of(ns(rt, sender), "eth0"), dst_mac="ff:ff:ff:ff:ff:ff",
                 src_ip=src_ip, dst_ip=bcast, dport=9, payload=needle)
        assert not sniff.seen(), sender
