"""Tenant network filtering cost: JSON lines as described in DESIGN.md section 7.

(a) throughput: iperf3 (TCP, one stream) between two instances' network namespaces on the
    agent's bridge with anti-spoofing and security groups on (the server's group admits the
    client's group on the iperf3 port), against the same pair, bridge and veths with our nft
    tables removed (the peer: a bare bridge with no rules), alternated in the same run, medians;
(b) connect_rate: TCP connects/s (connect + reset, one client: no TIME_WAIT piles up to
    exhaust the ports of later rounds) over the same two paths;
(c) create_20_rules: a container's create (runc, bridge: lease, veth, netns, the filter
    rendered and applied in one nft batch) in a group of 20 rules, against one in a group
    with none.
Both sides cross the same kernel path but for our tables (br_netfilter on: bridged IPv4
passes the inet hooks either way). Run as root: PYTHONPATH=. .venv/bin/python bench/network.py
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from agent.state import Database
from containers import ContainerSpec, NetworkSpec, Rootfs
from containers.firewall import Policy, Rule
from containers.runc import RuncRuntime
from jsonline import emitter
from testbed.runtimes import busybox_lower

ROUNDS = 7  # alternated filtered/bare rounds per metric
IPERF_SECONDS = 3
CONNECT_SECONDS = 3
CREATES = 20
PORT = 5201
SUBNET = "198.19.251.0/24"  # a test-only range, never routed off-host

line = emitter("network")

CONNECTS = r'''
import socket, struct, sys, time
ip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    s = socket.create_connection((ip, port), timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST: no TIME_WAIT
    s.close()
    n += 1
print(n / seconds)
'''
ACCEPTS = r'''
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(512)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
'''


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def iperf(client_ns: str, server_ns: str, server_ip: str) -> float:
    """Gbit/s received, one TCP stream."""
    srv = subprocess.Popen(in_ns(server_ns, "iperf3", "-s", "-1", "-p", str(PORT)),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            r = subprocess.run(in_ns(client_ns, "iperf3", "-c", server_ip, "-p", str(PORT), "-t",
                                     str(IPERF_SECONDS), "-J"), capture_output=True, text=True)
            out = json.loads(r.stdout or "{}")
            if r.returncode == 0 and "error" not in out:
                return out["end"]["sum_received"]["bits_per_second"] / 1e9
            time.sleep(0.1)  # the server is not listening yet
        raise RuntimeError(f"iperf3 failed: {r.stdout[-500:]} {r.stderr[-500:]}")
    finally:
        srv.kill()
        srv.wait()


def connect_rate(client_ns: str, server_ns: str, server_ip: str) -> float:
    srv = subprocess.Popen(in_ns(server_ns, sys.executable, "-c", ACCEPTS, str(PORT + 1)),
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        r = subprocess.run(in_ns(client_ns, sys.executable, "-c", CONNECTS, server_ip, str(PORT + 1),
                                 str(CONNECT_SECONDS)), capture_output=True, text=True, check=True)
        return float(r.stdout)
    finally:
        srv.kill()
        srv.wait()


def main() -> None:
    for tool in ("iperf3", "nft", "runc", "conmon"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed: run scripts/setup-host")
    work = tempfile.mkdtemp(prefix="nodeagent-bench-net-")
    db = Database(os.path.join(work, "state.db"))
    rt = RuncRuntime(os.path.join(work, "rt"), db, bridge=f"nabench{secrets.token_hex(2)}", subnet=SUBNET,
                     cgroup_parent=f"nodeagent-bench-{secrets.token_hex(3)}")
    twenty = tuple(Rule("ingress", "tcp", 10000 + i, None, f"10.{i}.0.0/16") for i in range(19)) + \
        (Rule("ingress", "tcp", PORT, PORT + 1, remote_group="cli"),)
    groups = {"srv": (Rule("ingress", "tcp", PORT, PORT + 1, remote_group="cli"),), "cli": (),
              "twenty": twenty, "none": ()}
    members: dict[str, tuple[str, ...]] = {"srv": ("srv",), "cli": ("cli",)}
    rt.net.policy_source = lambda: Policy("same-group", groups, dict(members))
    lower = busybox_lower()
    try:
        # (a), (b): the two ends are attached network namespaces (the path a container's traffic takes)
        _, srv_ip = rt.net.attach("srv")
        rt.net.attach("cli")
        fa, fb = rt.net.netns_name("cli"), rt.net.netns_name("srv")
        tput = {"on": [], "bare": []}
        rate = {"on": [], "bare": []}
        for _ in range(ROUNDS):
            for mode in ("on", "bare"):
                if mode == "on":
                    rt.net.apply_firewall()
                else:
                    rt.net.firewall.remove()  # the same bridge, veths and namespaces, no rules
                tput[mode].append(iperf(fa, fb, srv_ip))
                rate[mode].append(connect_rate(fa, fb, srv_ip))
        rt.net.apply_firewall()
        line("throughput_filtered", statistics.median(tput["on"]), "bare bridge, no rules",
             statistics.median(tput["bare"]), unit="Gbit/s")
        line("connect_rate_filtered", statistics.median(rate["on"]), "bare bridge, no rules",
             statistics.median(rate["bare"]), unit="connects/s")
        # (c) a container create, in a group of 20 rules vs a group with none (alternated)
        times = {"twenty": [], "none": []}
        for i in range(CREATES):
            for group in ("twenty", "none"):
                name = f"{group}-{i}"
                members[name] = (group,)
                up, wk = os.path.join(work, "up", name), os.path.join(work, "wk", name)
                os.makedirs(up)
                os.makedirs(wk)
                spec = ContainerSpec(name=name, rootfs=Rootfs((lower,), up, wk), command=("sleep", "1000"),
                                     network=NetworkSpec())
                t0 = time.perf_counter()
                rt.create(spec)
                times[group].append((time.perf_counter() - t0) * 1000)
                rt.delete(name)
                del members[name]
        line("create_20_rules", statistics.median(times["twenty"]), "create in a group with no rules",
             statistics.median(times["none"]))
    finally:
        for name in ("srv", "cli"):
            rt.net.detach(name)
        for info in rt.list():
            rt.delete(info.name)
        rt.close()
        db.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
