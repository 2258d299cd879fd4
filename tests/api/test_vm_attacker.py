"""A VM guest as the attacker: root of its own kernel on the host bridge, booted the API's way
(boot.qcow2) with a user-data script that tries each attack and prints its outcome on the
serial console (``NODEAGENT-T <name> ok|fail``). Against it: the host's loopback services
through the gateway (CVE-2020-8558: its own route to 127.0.0.0/8 via the gateway, with
route_localnet), the agent's API, the host's own addresses, a forged source IP and MAC and a
gratuitous ARP for an address not its own (a listener the test runs on the bridge must see
none of them, nor the host's ARP table), another instance's port its security group does not
allow, and IPv6 link-local to the host and to a neighbour. The allowed paths (the gateway's
ping, the allowed port, the neighbour through its real address) work in the same run.

One VM (192 MiB, TCG) and one runc container (the peer with the security group) per run.
"""
from __future__ import annotations

import http.server
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from testbed import runtimes
from testbed.agentproc import AgentProcess, Api
from testbed.netattack import Sniffer, wait_until
from testbed.ocibuild import busybox_layers, write_layout

pytestmark = pytest.mark.real
OP_TIMEOUT_S = 120
SCRIPT_TIMEOUT_S = 240  # boot (about 3 s under TCG) + the attacks' timeouts; generous for a loaded CI
SECRET = "nodeagent-host-secret"


class _Secret(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = SECRET.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def http_server(addr: str) -> http.server.HTTPServer:
    """A host service on ``addr`` (127.0.0.1 or an address the test made) that answers SECRET."""
    srv = http.server.HTTPServer((addr, 0), _Secret)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def host_address():
    """An address of the host not on the bridge (one end of a veth pair: no dummy module here)."""
    name = f"nadm{secrets.token_hex(3)}"
    _, net = runtimes.test_network()
    addr = str(ipaddress.ip_network(net)[1])
    sh("ip", "link", "add", name, "type", "veth", "peer", "name", name + "p")
    try:
        sh("ip", "addr", "add", f"{addr}/32", "dev", name)
        sh("ip", "link", "set", name, "up")
        yield addr
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


@pytest.fixture
def vm_agent():
    """A real agent: libvirt (TCG) VMs and runc containers on a test bridge, default policy
    same-group; its dir under /var/tmp (0755: QEMU and user-namespaced containers reach it)."""
    for tool in ("runc", "conmon", "nft", "virsh"):
        assert shutil.which(tool), f"{tool} is not installed: run scripts/setup-host"
    base = Path(tempfile.mkdtemp(prefix="nodeagent-vmatt-", dir="/var/tmp"))
    base.chmod(0o755)
    bridge, subnet = runtimes.test_network("navma")
    images = os.environ.get("NODEAGENT_TEST_IMAGES", "/var/cache/nodeagent-test-images")
    a = AgentProcess(base / "state", pool_kind="local", import_dirs=[base, images],
                     extra_config=f'[network]\nbridge = "{bridge}"\nsubnet = "{subnet}"\nnat = false\n'
                                  'default_policy = "same-group"\n')
    a.bridge, a.subnet, a.base = bridge, subnet, base
    yield a
    try:
        if a.proc is not None and a.proc.poll() is None:
            api = Api(a.url, a.admin_token)
            for inst in api.get("/v1/instances").json()["instances"]:
                api.delete(f"/v1/instances/{inst['id']}", timeout=120)
        a.stop()
    finally:
        runtimes.drop_test_network(bridge, a.rtag)
        if getattr(a, "cgroup_parent", None):
            runtimes.drop_cgroup_parent(a.cgroup_parent)
        shutil.rmtree(base, ignore_errors=True)


def configure(a: AgentProcess, libvirtd: str) -> None:
    a.cgroup_parent = runtimes.test_cgroup_parent()
    runc = f'runtime = "runc"\ncgroup_parent = "{a.cgroup_parent}"'
    a.config.write_text(a.config.read_text()
                        .replace('[hypervisor]\ndriver = "fake"\n',
                                 f'[hypervisor]\ndriver = "libvirt"\nuri = "{libvirtd}"\nvirt_type = "qemu"\n')
                        .replace('runtime = "fake"', runc))
    a.admin_token = a.token("admin", "admin")
    a.start()


@pytest.fixture
def listener_ns(vm_agent):
    """A network namespace of the test on the bridge (not an instance: no filter of its own),
    eth0 with the subnet's .250; yields (netns, ip, its link-local address). Made after the
    bridge exists (the peer container's create makes it)."""
    agent, state = vm_agent, {}

    def make():
        ns, host_if = f"navmat-{secrets.token_hex(3)}", f"nx{secrets.token_hex(4)}"
        ip = str(ipaddress.ip_network(agent.subnet)[250])
        sh("ip", "netns", "add", ns)
        state["ns"] = ns
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", host_if, "master", agent.bridge, "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # it knows the gateway's MAC (the entry an ARP poisoner would overwrite)
        gw = str(ipaddress.ip_network(agent.subnet)[1])
        sh("ip", "netns", "exec", ns, "busybox", "ping", "-c", "1", "-W", "5", gw)
        return ns, ip, link_local(ns, "eth0")
    yield make
    if "ns" in state:
        subprocess.run(["ip", "netns", "del", state["ns"]], capture_output=True)


def link_local(ns: str | None, ifname: str) -> str:
    """``ifname``'s fe80:: address (after DAD), waited for."""
    argv = ["ip", "-6", "-j", "addr", "show", "dev", ifname, "scope", "link"]
    if ns:
        argv = ["ip", "-n", ns, *argv[1:]]

    def get():
        for link in json.loads(subprocess.run(argv, capture_output=True, text=True).stdout or "[]"):
            for a in link.get("addr_info", []):
                if a.get("local", "").startswith("fe80") and not a.get("tentative"):
                    return a["local"]
        return None
    addr = wait_until(get, timeout=15)
    assert addr, f"{ifname} has no IPv6 link-local address (is IPv6 disabled on this host?)"
    return addr


def attack_script(*, gw: str, peer: str, neighbour: str, neighbour_v6: str, host_v6: str, spoof_ip: str,
                  spoof_mac: str, lo_port: int, agent_port: int, gw_port: int, other: str, other_port: int) -> str:
    """The guest's user-data: every attempt prints NODEAGENT-T <name> ok|fail."""
    return f"""#!/bin/sh
t() {{ n=$1; shift; if "$@" >/dev/null 2>&1; then echo "NODEAGENT-T $n ok"; else echo "NODEAGENT-T $n fail"; fi; }}
# HTTP by nc: busybox's static wget crashes in this guest
get() {{ printf 'GET %s HTTP/1.0\\r\\n\\r\\n' "$3" | nc -w 3 "$1" "$2" | grep -q "$4"; }}
hi() {{ nc -w 3 "$1" "$2" </dev/null | grep -q hi; }}
t gw_ping ping -c 1 -W 3 {gw}
t neighbour_ping ping -c 1 -W 3 {neighbour}
t peer_allowed_port hi {peer} 7001
# the attacks that only wait for their timeout run side by side
t peer_denied_port hi {peer} 7000 &
t gw_service get {gw} {gw_port} / {SECRET} &
t other_host_address get {other} {other_port} / {SECRET} &
t agent_api_on_gw get {gw} {agent_port} /v1/health HTTP/1 &
# IPv6 link-local: the host's bridge and a neighbour
t v6_host ping -6 -c 2 -W 2 -I eth0 {host_v6} &
t v6_neighbour ping -6 -c 2 -W 2 -I eth0 {neighbour_v6} &
wait
# a forged source address (the neighbour's ARP entry is cached by now), a gratuitous ARP for it
ip addr add {spoof_ip}/32 dev eth0
t spoof_ip_ping ping -c 2 -W 1 -I {spoof_ip} {neighbour}
t spoof_arp arping -c 2 -U -I eth0 -s {spoof_ip} {spoof_ip}
ip addr del {spoof_ip}/32 dev eth0
# ARP poisoning: the gateway's address is at my MAC (bound to an address not its own)
sysctl -qw net.ipv4.ip_nonlocal_bind=1
t poison_gw arping -c 3 -U -I eth0 -s {gw} {gw}
# a forged MAC
mac=$(cat /sys/class/net/eth0/address)
if ip link set dev eth0 address {spoof_mac}; then echo NODEAGENT-T mac_changed ok; else
  ip link set eth0 down; ip link set eth0 address {spoof_mac}; ip link set eth0 up
  echo NODEAGENT-T mac_changed down; fi
t spoof_mac_ping ping -c 2 -W 1 {neighbour}
t spoof_mac_arping arping -c 2 -I eth0 {neighbour}
ip link set dev eth0 address $mac || {{ ip link set eth0 down; ip link set eth0 address $mac; ip link set eth0 up; }}
ip route replace default via {gw} dev eth0
# the host's loopback through the gateway (CVE-2020-8558): own routes to 127.0.0.0/8 via it
sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.eth0.route_localnet=1
ip route del local 127.0.0.0/8 dev lo table local 2>/dev/null  # (the guest's lo is down: none)
ip route add 127.0.0.0/8 via {gw} dev eth0
ip route get 127.0.0.1 | head -n1 | sed 's/^/NODEAGENT-LO-ROUTE /'
t loopback_service get 127.0.0.1 {lo_port} / {SECRET} &
t agent_api_loopback get 127.0.0.1 {agent_port} /v1/health HTTP/1 &
wait
# the allowed paths still work after all this
t gw_ping_after ping -c 1 -W 3 {gw}
t peer_allowed_after hi {peer} 7001
"""


def results(console: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^NODEAGENT-T (\S+) (\S+)$", console, re.M))


def test_a_vm_guest_cannot_reach_the_host_spoof_or_pass_security_groups(libvirtd, guest_images, vm_agent,
                                                                         listener_ns, host_address):
    agent = vm_agent
    configure(agent, libvirtd)
    api = Api(agent.url, agent.admin_token)
    layout = write_layout(str(agent.base / "layout"), {"latest": busybox_layers()})
    for name, source, fmt in (("busybox", layout, "oci"), ("guest", guest_images["boot"], None)):
        body = {"name": name, "source": {"type": "file", "path": source}, **({"format": fmt} if fmt else {})}
        op = api.wait(api.post("/v1/images", json=body).json(), timeout=OP_TIMEOUT_S)
        assert op["status"] == "succeeded", op
    guest_image = op["result"]["image"]["id"]

    # the peer: a container in its own group, which lets in tcp/7001 from anywhere, not 7000
    sfx = secrets.token_hex(3)
    rule = {"direction": "ingress", "protocol": "tcp", "port_min": 7001}
    assert api.post("/v1/security-groups", json={"name": f"web-{sfx}", "rules": [rule]}).status_code == 201
    serve = "busybox nc -ll -p 7000 -e echo hi & busybox nc -ll -p 7001 -e echo hi"
    op = api.wait(api.post("/v1/instances", json={
        "name": f"peer-{sfx}", "kind": "container", "image": "busybox", "memory_mib": 64,
        "command": ["busybox", "sh", "-c", serve], "security_groups": [f"web-{sfx}"]}).json(), timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    peer = op["result"]["instance"]["ip"]

    ns, neighbour, neighbour_v6 = listener_ns()
    gw = str(ipaddress.ip_network(agent.subnet)[1])
    host_v6 = link_local(None, agent.bridge)
    spoof_ip = str(ipaddress.ip_network(agent.subnet)[251])
    spoof_mac = "52:54:00:" + ":".join(secrets.token_hex(3)[i:i + 2] for i in (0, 2, 4))
    # the listener: anything from the forged address or MAC on the bridge
    sniffers = {what: Sniffer(ns, "eth0", needle, seconds=SCRIPT_TIMEOUT_S) for what, needle in (
        ("spoofed ip", ipaddress.ip_address(spoof_ip).packed),
        ("spoofed mac", bytes.fromhex(spoof_mac.replace(":", ""))))}
    lo_srv, gw_srv, other_srv = http_server("127.0.0.1"), http_server(gw), http_server(host_address)
    vm = f"att-{sfx}"
    try:
        script = attack_script(gw=gw, peer=peer, neighbour=neighbour, neighbour_v6=neighbour_v6, host_v6=host_v6,
                               spoof_ip=spoof_ip, spoof_mac=spoof_mac, lo_port=lo_srv.server_port,
                               agent_port=agent.port, gw_port=gw_srv.server_port, other=host_address,
                               other_port=other_srv.server_port)
        op = api.wait(api.post("/v1/instances", json={
            "name": vm, "kind": "vm", "image": guest_image, "cpus": 1, "memory_mib": 192, "network": "bridge",
            "user_data": script}).json(), timeout=OP_TIMEOUT_S)
        assert op["status"] == "succeeded", op

        deadline = time.monotonic() + SCRIPT_TIMEOUT_S
        while "NODEAGENT-USERDATA-EXIT" not in (console := api.get(f"/v1/instances/{vm}/logs").json()["logs"]):
            assert time.monotonic() < deadline, f"the guest's script did not finish:\n{console[-3000:]}"
            time.sleep(0.5)
        console = console.replace("\r", "")
        got = results(console)
        # the allowed paths
        want = {"gw_ping": "ok", "neighbour_ping": "ok", "peer_allowed_port": "ok",
                "gw_ping_after": "ok", "peer_allowed_after": "ok",
                # the attacks
                "peer_denied_port": "fail", "gw_service": "fail", "other_host_address": "fail",
                "agent_api_on_gw": "fail", "v6_host": "fail", "v6_neighbour": "fail",
                "loopback_service": "fail", "agent_api_loopback": "fail",
                "spoof_ip_ping": "fail", "spoof_mac_ping": "fail", "spoof_mac_arping": "fail"}
        assert {k: got.get(k) for k in want} == want, console[-4000:]
        assert f"via {gw} dev eth0" in console, "the guest did route 127.0.0.1 to the gateway"
        assert got.get("mac_changed") in ("ok", "down"), "the guest did forge its MAC"
        # nothing forged reached the bridge's other end, nor the host's ARP table
        for what, s in sniffers.items():
            s.proc.terminate()
            assert not s.seen(), f"the listener saw a frame with the {what}"
        gw_mac = json.loads(sh("ip", "-j", "link", "show", agent.bridge))[0]["address"]
        assert gw_mac in sh("ip", "-n", ns, "neigh", "show", gw).lower(), "the neighbour's entry of the gateway stands"
        neigh = sh("ip", "neigh", "show", "dev", agent.bridge)
        assert spoof_ip not in neigh and spoof_mac not in neigh.lower(), neigh
    finally:
        for s in sniffers.values():
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()
        for srv in (lo_srv, gw_srv, other_srv):
            srv.shutdown()
            srv.server_close()


def live_taps(libvirtd: str, name: str) -> list[str]:
    """The running domain's tap names (`virsh domiflist`)."""
    out = subprocess.run(["virsh", "-c", libvirtd, "domiflist", name], capture_output=True, text=True,
                         check=True).stdout
    return [ln.split()[0] for ln in out.splitlines()[2:] if ln.split()]


def test_a_vm_made_before_the_filter_is_filtered_on_its_vnet_tap_after_an_agent_restart(libvirtd, guest_images,
                                                                                      vm_agent):
    """Re-adoption keys the anti-spoofing and security-group rules to the tap a VM runs on
    (from its live definition), whatever libvirt named it; a start through the API, which
    gives a vnetN tap a new name, moves them again."""
    import sqlite3
    agent = vm_agent
    configure(agent, libvirtd)
    api = Api(agent.url, agent.admin_token)
    op = api.wait(api.post("/v1/images", json={"name": "guest", "source": {"type": "file",
                                                                          "path": guest_images["boot"]}}).json(),
                  timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    name = f"old-{secrets.token_hex(3)}"
    op = api.wait(api.post("/v1/instances", json={"name": name, "kind": "vm", "image": op["result"]["image"]["id"],
                                                  "cpus": 1, "memory_mib": 192, "network": "bridge"}).json(),
                  timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    inst = op["result"]["instance"]
    own_tap = "nt" + inst["id"][:12]
    assert live_taps(libvirtd, name) == [own_tap]

    # make it a VM of before the filter: its NIC without <target dev> (libvirt names the tap
    # vnetN at each start), its lease without MAC or port; the host's tables gone (a reboot)
    agent.stop()
    xml = subprocess.run(["virsh", "-c", libvirtd, "dumpxml", "--inactive", name], capture_output=True, text=True,
                         check=True).stdout
    old = re.sub(r"<target dev='nt[0-9a-f]+'/>\s*", "", xml)
    assert old != xml
    path = agent.base / "old.xml"
    path.write_text(old)
    sh("virsh", "-c", libvirtd, "define", str(path))
    sh("virsh", "-c", libvirtd, "destroy", name)
    sh("virsh", "-c", libvirtd, "start", name)
    (vnet,) = live_taps(libvirtd, name)
    assert vnet.startswith("vnet"), vnet
    with sqlite3.connect(agent.state_dir / "state.db") as c:
        c.execute("UPDATE containers_leases SET mac=NULL, ifname=NULL WHERE name=?", ("vm:" + inst["id"],))

    def bridge_table() -> str:
        return subprocess.run(["nft", "list", "table", "bridge", f"nodeagent_{agent.rtag}"], capture_output=True,
                              text=True).stdout
    agent.start()
    listing = bridge_table()
    assert f'"{vnet}" . {inst["mac"]} . {inst["ip"]}' in listing, listing  # the tap may send as the VM
    assert f'"{vnet}" . {inst["ip"]}' in listing and f'"{own_tap}"' not in listing, listing

    # a stop and a start through the API: a new tap (libvirt may hand out the same name)
    for action in ("stop", "start"):
        op = api.wait(api.post(f"/v1/instances/{name}/actions", json={"action": action, "force": True}).json(),
                      timeout=OP_TIMEOUT_S)
        assert op["status"] == "succeeded", op
    (vnet2,) = live_taps(libvirtd, name)
    listing = bridge_table()
    assert f'"{vnet2}" . ' in listing and (vnet2 == vnet or f'"{vnet}"' not in listing), listing
