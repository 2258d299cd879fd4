"""A tenant's attacks on the bridge, run as root inside an instance's network namespace:
hand-made Ethernet frames (AF_PACKET) and a sniffer, for the tenant-isolation tests."""
from __future__ import annotations

import json
import subprocess
import sys
import time

# Runs inside the netns (`ip netns exec`): argv[1] is a JSON job.
_FRAMES = r'''
import json, socket, struct, sys, time
job = json.loads(sys.argv[1])

def mac(m):
    return bytes.fromhex(m.replace(":", ""))

def ipv4(a):
    return socket.inet_aton(a)

def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

def udp_frame(j):
    data = j["payload"].encode()
    udp = struct.pack("!HHHH", j.get("sport", 40000), j["dport"], 8 + len(data), 0) + data
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                      ipv4(j["src_ip"]), ipv4(j["dst_ip"]))
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return mac(j["dst_mac"]) + mac(j["src_mac"]) + b"\x08\x00" + hdr + udp

def arp_frame(j):
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, j.get("op", 2), mac(j["src_mac"]),
                       ipv4(j["sender_ip"]), mac("ff:ff:ff:ff:ff:ff"), ipv4(j["target_ip"]))
    return mac("ff:ff:ff:ff:ff:ff") + mac(j["src_mac"]) + b"\x08\x06" + body

if job["do"] == "send":
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((job["ifname"], 0))
    frame = udp_frame(job) if job["kind"] == "udp" else arp_frame(job)
    for _ in range(job.get("count", 3)):
        s.send(frame)
        time.sleep(0.05)
elif job["do"] == "sniff":
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind((job["ifname"], 0))
    s.settimeout(0.2)
    want = bytes.fromhex(job["needle"])
    print("ready", flush=True)
    end = time.monotonic() + job["seconds"]
    while time.monotonic() < end:
        try:
            if want in s.recv(65535):
                print("seen", flush=True)
                break
        except socket.timeout:
            pass
'''


def netns_python(ns: str, job: dict, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _FRAMES, json.dumps(job)],
                          capture_output=True, text=True, timeout=timeout, check=True)


def send_udp(ns: str, *, ifname="eth0", src_mac: str, dst_mac: str, src_ip: str, dst_ip: str,
             dport: int, payload: str) -> None:
    """A hand-made UDP/IPv4 frame from inside ``ns`` (any addresses: forged ones too)."""
    netns_python(ns, {"do": "send", "kind": "udp", "ifname": ifname, "src_mac": src_mac,
                      "dst_mac": dst_mac, "src_ip": src_ip, "dst_ip": dst_ip, "dport": dport,
                      "payload": payload})


def send_arp(ns: str, *, ifname="eth0", src_mac: str, sender_ip: str, target_ip: str) -> None:
    """A broadcast ARP reply (gratuitous when sender_ip == target_ip) from inside ``ns``."""
    netns_python(ns, {"do": "send", "kind": "arp", "ifname": ifname, "src_mac": src_mac,
                      "sender_ip": sender_ip, "target_ip": target_ip})


class Sniffer:
    """Watches ``ifname`` in ``ns`` (None: the host) for a frame holding ``needle`` bytes."""

    def __init__(self, ns: str | None, ifname: str, needle: bytes, seconds: float = 3):
        job = json.dumps({"do": "sniff", "ifname": ifname, "needle": needle.hex(), "seconds": seconds})
        argv = [sys.executable, "-c", _FRAMES, job]
        if ns:
            argv = ["ip", "netns", "exec", ns, *argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def seen(self) -> bool:
        out, _ = self.proc.communicate(timeout=30)
        return "seen" in out


def mac_of(ns: str | None, ifname: str) -> str:
    argv = ["ip", "-j", "link", "show", ifname]
    if ns:
        argv = ["ip", "-n", ns, "-j", "link", "show", ifname]
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)[0]["address"]


def wait_until(pred, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    return pred()
