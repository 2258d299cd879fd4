"""Tenant network filtering with nftables: host protection, anti-spoofing, security groups.

Terms: a *port* is one instance's device on the host bridge (a container's host-side veth
or a VM's tap), with the one MAC and IPv4 address the instance may send from; a *policy* is
the security-group state the agent hands down (groups, their rules, which instance is in
which group, the host's default). The whole filter of one network is rendered from the
ports and the policy and replaced in ONE `nft -f -` batch (atomic: the kernel swaps the
tables in one transaction, no packet sees a half-made rule set), so applying is idempotent
and the same call serves create, delete, a live rule change and the rebuild at start.

Two tables of our own, both named ``nodeagent_<rtag>`` (rtag: the runtime's tag, so two
runtimes or test runs on one host never collide):

- ``table bridge``: anti-spoofing per port, keyed by the port's ifname (so rules exist before
  a VM's tap does): only the port's MAC as Ethernet source, ARP only with that MAC and IP
  (or 0.0.0.0, a probe) as sender, IPv4 only from its address, nothing else (IPv6, VLAN
  tags, other ethertypes). A container veth of ours without rules (``nv<rtag>*``) sends
  nothing (a VM's tap, ``nt<id12>``, exists only after its lease made its rules).
- ``table inet``: host protection and security groups. Packets from the bridge to
  127.0.0.0/8 (or from it: martians that route_localnet would let through) are dropped
  before NAT sees them (prerouting, raw priority); the host's own addresses accept nothing
  from the bridge but replies to the host's own connections (input); published ports are
  DNAT to an instance, so they are forwarded, never delivered to the host. The security
  groups filter forwarded traffic, keyed by the (anti-spoofed) instance addresses: an
  egress chain per instance (its groups' egress rules; none: everything may leave), then an
  ingress chain (published ports, the default policy, its groups' ingress rules; else drop);
  IPv4 broadcast and multicast between tenants is dropped (unless the policy is ``allow``).
  Between two instances on the bridge this needs bridged IPv4 to pass the inet hooks
  (``net.bridge.bridge-nf-call-iptables=1``, br_netfilter), as Docker and Kubernetes require:
  ``ensure_bridge_netfilter`` sets it. The host itself (its own sockets) may reach every
  instance: the output path is not filtered.

Privileged work: ``nft`` (one batch per call, through libnftables) and
``ensure_bridge_netfilter``.
"""
from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import os
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Mapping

from agent.errors import CommandFailed, Unavailable

POLICIES = ("same-group", "deny", "allow")  # see Policy.default
PROTOCOLS = ("tcp", "udp", "icmp", "any")
BRIDGE_PRIORITY = -300  # before anything else on the bridge sees a frame
RARP_ETHERTYPE = 0x8035  # reverse ARP: what QEMU's self-announce sends after a migration
PING_RATE = "50/second burst 100 packets"  # echo requests the gateway answers from all tenants


class _Libnftables:
    """libnftables, the library behind `nft` (Debian's python3-nftables is the same ctypes
    wrapper; the agent's virtualenv does not see system site-packages), with one context
    kept per process: a batch then costs about 2 ms instead of about 25 ms for exec'ing nft,
    which builds a fresh context every time."""

    def __init__(self):
        lib = ctypes.CDLL("libnftables.so.1")
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, fn).restype = ctypes.c_char_p
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.lib, self.lock, self.pid = lib, threading.Lock(), os.getpid()
        self.ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)

    def run(self, script: str) -> tuple[int, str, str]:
        """(returncode, output, error) of ``script``, as `nft -f -` would give them."""
        with self.lock:
            rc = self.lib.nft_run_cmd_from_buffer(self.ctx, script.encode())
            out = self.lib.nft_ctx_get_output_buffer(self.ctx) or b""
            err = self.lib.nft_ctx_get_error_buffer(self.ctx) or b""
        return rc, out.decode(errors="replace"), err.decode(errors="replace")


_lib: _Libnftables | bool | None = None  # False: no library here, exec nft
_lib_lock = threading.Lock()


def _nft_run(script: str) -> tuple[int, str, str]:
    """Through libnftables when it loads, else `nft -f -` (the same batch semantics)."""
    global _lib
    with _lib_lock:
        # a context (its netlink socket) per process
        if _lib is None or (isinstance(_lib, _Libnftables) and _lib.pid != os.getpid()):
            try:
                _lib = _Libnftables()
            except OSError:
                _lib = False  # not installed as a library: exec nft
    if isinstance(_lib, _Libnftables):
        return _lib.run(script)
    try:
        proc = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
    except FileNotFoundError:
        raise Unavailable("nft is not installed: install Debian's nftables (scripts/setup-host)") from None
    return proc.returncode, proc.stdout, proc.stderr


def nft(script: str) -> str:
    """Run ``script`` as one atomic batch (as `nft -f -` does): all of it applies or none of
    it. CommandFailed with nft's message if the kernel or the parser refuses it."""
    rc, out, err = _nft_run(script)
    if rc != 0:
        raise CommandFailed(f"nft -f -: {err.strip()[:2000]}", argv=["nft", "-f", "-"], returncode=rc,
                            stderr=err)
    return out


def nft_list(family: str, table: str) -> str:
    """`nft list table FAMILY TABLE`, or "" if there is no such table."""
    rc, out, _ = _nft_run(f"list table {family} {table}\n")
    return out if rc == 0 else ""


def ensure_bridge_netfilter() -> None:
    """Make bridged IPv4 traverse the inet hooks (security groups between instances on one
    bridge). Unavailable with the fix if the kernel cannot."""
    path = "/proc/sys/net/bridge/bridge-nf-call-iptables"
    if not os.path.exists(path):
        subprocess.run(["modprobe", "br_netfilter"], capture_output=True)
    try:
        with open(path) as f:
            if f.read().strip() == "1":
                return
        with open(path, "w") as f:
            f.write("1")
    except OSError as e:
        raise Unavailable(f"cannot enable bridge netfilter ({path}: {e.strerror}): load the "
                          "br_netfilter module (`modprobe br_netfilter`)") from None


@dataclass(frozen=True)
class Port:
    """One instance's device on the bridge. ``owner``: its lease name (a container's name,
    ``vm:<id>`` for a VM), the key the policy's ``members`` use."""
    owner: str
    ifname: str
    mac: str
    ip: str


@dataclass(frozen=True)
class Rule:
    """One security-group rule: traffic in ``direction`` (ingress: to the instance; egress:
    from it) of ``protocol`` to ports ``port_min``..``port_max`` (tcp/udp; None: all) with the
    other end in ``remote_cidr`` or a member of ``remote_group`` (neither: anywhere)."""
    direction: str
    protocol: str = "any"
    port_min: int | None = None
    port_max: int | None = None
    remote_cidr: str | None = None
    remote_group: str | None = None


@dataclass(frozen=True)
class Policy:
    """The security groups as the agent keeps them. ``default`` (the host's [network]
    default_policy) says what reaches an instance that no rule allows: ``same-group``, traffic
    from members of a group it is in; ``deny``, nothing; ``allow``, everything (groups then
    only restrict egress). ``members``: lease name -> its groups; an instance missing there
    is not filtered (a runtime used without the agent)."""
    default: str = "same-group"
    groups: Mapping[str, tuple[Rule, ...]] = field(default_factory=dict)
    members: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def _q(text: str) -> str:
    """A quoted nft string (names here are ours: ifnames and group names, no quotes)."""
    assert '"' not in text and "\\" not in text and "\n" not in text
    return f'"{text}"'


def set_name(group: str) -> str:
    return "g_" + hashlib.sha1(group.encode()).hexdigest()[:12]


class Firewall:
    """The nft tables of one bridge network. Stateless: ``apply`` renders everything."""

    def __init__(self, *, rtag: str, bridge: str, gateway: str):
        self.table = f"nodeagent_{rtag}"
        self.rtag, self.bridge, self.gateway = rtag, bridge, gateway
        self.port_prefixes = (f"nv{rtag}",)  # container veths (VM taps are named by id alone)

    # -- render --
    def render(self, ports: list[Port], policy: Policy | None) -> str:
        """The batch that replaces both tables with the filter for ``ports`` and ``policy``
        (None: host protection and anti-spoofing only)."""
        t = self.table
        out = [f"table bridge {t} {{}}", f"delete table bridge {t}",
               f"table inet {t} {{}}", f"delete table inet {t}"]
        out += self._bridge_table(ports)
        out += self._inet_table(ports, policy)
        return "\n".join(out) + "\n"

    def _bridge_table(self, ports: list[Port]) -> list[str]:
        lines = [f"table bridge {self.table} {{"]
        for p in ports:
            lines += [f"  chain p_{p.ifname} {{",
                      f"    ether saddr != {p.mac} drop",
                      f"    ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 "
                      f"arp saddr ether {p.mac} arp saddr ip {{ {p.ip}, 0.0.0.0 }} accept",
                      f"    ether type ip ip saddr {p.ip} accept",
                      # RARP from its own MAC (checked above): QEMU's announcement of a guest
                      # that just migrated here, so the L2 network learns its new port
                      f"    ether type {RARP_ETHERTYPE:#06x} accept",
                      "    drop", "  }"]
        lines += [f"  chain prerouting {{ type filter hook prerouting priority {BRIDGE_PRIORITY}; policy accept;"]
        if ports:
            vmap = ", ".join(f"{_q(p.ifname)} : jump p_{p.ifname}" for p in ports)
            lines.append(f"    iifname vmap {{ {vmap} }}")
        lines += [f"    iifname {_q(prefix + '*')} drop" for prefix in self.port_prefixes]
        lines += ["  }", "}"]
        return lines

    def _inet_table(self, ports: list[Port], policy: Policy | None) -> list[str]:
        br = _q(self.bridge)
        lines = [f"table inet {self.table} {{",
                 "  chain prerouting { type filter hook prerouting priority raw; policy accept;",
                 f"    iifname {br} ip daddr 127.0.0.0/8 drop",
                 f"    iifname {br} ip saddr 127.0.0.0/8 drop",
                 "  }",
                 "  chain input { type filter hook input priority filter; policy accept;",
                 f"    iifname {br} ct state established,related accept",
                 # a ping of the gateway (a guest's first network check), bounded for all tenants together
                 f"    iifname {br} ip daddr {self.gateway} icmp type echo-request limit rate {PING_RATE} accept",
                 f"    iifname {br} drop",
                 "  }"]
        filtered = [p for p in ports if p.owner in policy.members] if policy is not None else []
        if policy is not None and filtered:
            lines += self._groups(filtered, policy)
        lines += ["  chain forward { type filter hook forward priority filter; policy accept;",
                  f"    iifname {br} ct state established,related accept",
                  f"    oifname {br} ct state established,related accept",
                  f"    oifname {br} ct state invalid drop"]
        if policy is not None and filtered:
            eg = ", ".join(f"{p.ip} : jump eg_{p.ifname}" for p in filtered)
            ing = ", ".join(f"{p.ip} : jump in_{p.ifname}" for p in filtered)
            lines += [f"    iifname {br} ip saddr vmap {{ {eg} }}",
                      f"    oifname {br} ip daddr vmap {{ {ing} }}"]
            if policy.default != "allow":  # no group's rule can admit a broadcast: none between tenants
                lines.append(f"    iifname {br} oifname {br} meta pkttype {{ broadcast, multicast }} drop")
        lines += ["  }", "}"]
        return lines

    def _groups(self, ports: list[Port], policy: Policy) -> list[str]:
        members: dict[str, list[str]] = {}
        for p in ports:
            for g in policy.members[p.owner]:
                members.setdefault(g, []).append(p.ip)
        used = set(members)
        for group_rules in policy.groups.values():
            used.update(r.remote_group for r in group_rules if r.remote_group)
        lines = []
        for g in sorted(used):
            ips = members.get(g, [])
            elems = f" elements = {{ {', '.join(ips)} }};" if ips else ""
            lines.append(f"  set {set_name(g)} {{ type ipv4_addr; comment {_q('group ' + g)};{elems} }}")
        for p in ports:
            groups = policy.members[p.owner]
            rules = [r for g in groups for r in policy.groups.get(g, ())]
            egress = [r for r in rules if r.direction == "egress"]
            lines.append(f"  chain eg_{p.ifname} {{")
            lines += [f"    {_match(r, 'daddr')} return" for r in egress]
            if egress:
                lines.append("    drop")
            lines += ["  }", f"  chain in_{p.ifname} {{", "    ct status dnat accept"]
            if policy.default == "allow":
                lines.append("    accept")
            elif policy.default == "same-group":
                lines += [f"    ip saddr @{set_name(g)} accept" for g in groups]
            lines += [f"    {_match(r, 'saddr')} accept" for r in rules if r.direction == "ingress"]
            lines += ["    drop", "  }"]
        return lines

    # -- apply / remove --
    def apply(self, ports: list[Port], policy: Policy | None) -> None:
        """Replace this network's tables (one atomic batch)."""
        nft(self.render(ports, policy))

    def remove(self) -> bool:
        """Delete both tables; False if there were none."""
        t = self.table
        existed = bool(self.listing())
        nft(f"table bridge {t} {{}}\ndelete table bridge {t}\n"
            f"table inet {t} {{}}\ndelete table inet {t}\n")
        return existed

    def listing(self) -> str:
        """Both tables as `nft list` prints them ("" if none)."""
        return nft_list("bridge", self.table) + nft_list("inet", self.table)


def _match(r: Rule, addr: str) -> str:
    """The nft match of a rule; ``addr`` is the remote end's field (saddr for ingress)."""
    parts = []
    if r.remote_cidr:
        parts.append(f"ip {addr} {ipaddress.ip_network(r.remote_cidr, strict=False)}")
    elif r.remote_group:
        parts.append(f"ip {addr} @{set_name(r.remote_group)}")
    if r.protocol in ("tcp", "udp"):
        parts.append(f"meta l4proto {r.protocol}")
        if r.port_min is not None:
            hi = r.port_max if r.port_max is not None else r.port_min
            parts.append(f"th dport {r.port_min}" if hi == r.port_min else f"th dport {r.port_min}-{hi}")
    elif r.protocol == "icmp":
        parts.append("meta l4proto icmp")
    else:
        parts.append("meta nfproto ipv4")
    return " ".join(parts)
