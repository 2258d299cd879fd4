"""Tenant network filtering with nftables: host protection, anti-spoofing, security groups.

Terms: a *port* is one instance's device on the host bridge (a container's host-side veth
or a VM's tap), with the one MAC and IPv4 address the instance may send from; a *policy* is
the security-group state the agent hands down (groups, their rules, which instance is in
which group, the host's default). The rules do not grow with the ports: every port is a few
elements of named sets and maps (its ifname, MAC and IP; its address in its groups' sets
and in the verdict maps that send it to the chains of its combination of groups). So the
whole filter (start, recovery, a rule or membership change) is rendered from the ports and
the policy and replaced in ONE `nft -f -` batch, and a create or delete adds or removes one
port's elements in one small batch (``Firewall.put``), whatever the number of instances;
either is atomic (the kernel applies a batch in one transaction, no packet sees a
half-made filter).

Two tables of our own, both named ``nodeagent_<rtag>`` (rtag: the runtime's tag, so two
runtimes or test runs on one host never collide):

- ``table bridge``: anti-spoofing per port, keyed by the port's ifname (so its elements exist
  before a VM's tap does): only the port's MAC as Ethernet source, ARP only with that MAC
  and IP (or 0.0.0.0, a probe) as sender, IPv4 only from its address, nothing else (IPv6,
  VLAN tags, other ethertypes); sets ``p_ports`` (ifname), ``p_l2`` (ifname . mac),
  ``p_arp`` (ifname . mac . ip), ``p_ip`` (ifname . ip). A container veth of ours without
  elements (``nv<rtag>*``) sends nothing (a VM's tap, ``nt<id12>``, exists only after its
  lease made its elements).
- ``table inet``: host protection and security groups. Packets from the bridge to
  127.0.0.0/8 (or from it: martians that route_localnet would let through) are dropped
  before NAT sees them (prerouting, raw priority); the host's own addresses accept nothing
  from the bridge but replies to the host's own connections (input); published ports are
  DNAT to an instance, so they are forwarded, never delivered to the host. The security
  groups filter forwarded traffic, keyed by the (anti-spoofed) instance addresses (verdict
  maps ``egress_of`` and ``ingress_of``): an egress chain per combination of groups (their
  egress rules; none: everything may leave), then an ingress chain (published ports, the
  default policy, its groups' ingress rules; else drop); a set ``g_<hash>`` per group holds
  its members' addresses;
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


@dataclass(frozen=True)
class PortPolicy:
    """The part of a Policy one port needs (an incremental change): the default, the port
    owner's groups in order, and the rules of those groups."""
    default: str
    groups: tuple[str, ...]
    rules: Mapping[str, tuple[Rule, ...]] = field(default_factory=dict)


def combo_name(groups: tuple[str, ...]) -> str:
    """The suffix of the chains shared by every instance in exactly ``groups`` (in order)."""
    return hashlib.sha1("\0".join(groups).encode()).hexdigest()[:16]


class Firewall:
    """The nft tables of one bridge network.

    Every port's anti-spoofing data and security-group membership live in sets and maps
    (elements), the rules are fixed (the bridge table) or shared by every instance in the
    same groups (one egress and one ingress chain per combination of groups): so ``apply``
    renders everything (start, recovery, a policy change) and ``put`` adds or removes ONE
    port's elements in one small atomic batch, whatever the number of instances.
    ``apply`` records what it rendered; ``put`` works from that record and declines (False)
    whatever it cannot do as elements only, and the caller then applies in full."""

    def __init__(self, *, rtag: str, bridge: str, gateway: str):
        self.table = f"nodeagent_{rtag}"
        self.rtag, self.bridge, self.gateway = rtag, bridge, gateway
        self.port_prefixes = (f"nv{rtag}",)  # container veths (VM taps are named by id alone)
        self.synced = False  # the tables are as the record below says (an apply ran here)
        self._ports: dict[str, tuple[Port, tuple[str, ...] | None]] = {}  # owner -> port, groups
        self._chains: set[str] = set()  # combination chains present
        self._sets: set[str] = set()  # group sets present
        self._policy: tuple[bool, str] = (False, "")  # (groups filtered, default) rendered
        self._bcast = False  # the broadcast drop is rendered

    # -- render --
    def render(self, ports: list[Port], policy: Policy | None) -> str:
        """The batch that replaces both tables with the filter for ``ports`` and ``policy``
        (None: host protection and anti-spoofing only)."""
        return self._plan(ports, policy)[0]

    def _plan(self, ports: list[Port], policy: Policy | None):
        t = self.table
        ports = list({p.ifname: p for p in ports}.values())  # one port per device
        out = [f"table bridge {t} {{}}", f"delete table bridge {t}",
               f"table inet {t} {{}}", f"delete table inet {t}"]
        out += self._bridge_table(ports)
        inet, state = self._inet_table(ports, policy)
        out += inet
        return "\n".join(out) + "\n", state

    @staticmethod
    def _bridge_elements(p: Port) -> dict[str, list[str]]:
        i = _q(p.ifname)
        return {"p_ports": [i], "p_l2": [f"{i} . {p.mac}"],
                "p_arp": [f"{i} . {p.mac} . {p.ip}", f"{i} . {p.mac} . 0.0.0.0"],
                "p_ip": [f"{i} . {p.ip}"]}

    def _bridge_table(self, ports: list[Port]) -> list[str]:
        elems: dict[str, list[str]] = {"p_ports": [], "p_l2": [], "p_arp": [], "p_ip": []}
        for p in ports:
            for k, v in self._bridge_elements(p).items():
                elems[k] += v
        types = {"p_ports": "ifname", "p_l2": "ifname . ether_addr",
                 "p_arp": "ifname . ether_addr . ipv4_addr", "p_ip": "ifname . ipv4_addr"}
        lines = [f"table bridge {self.table} {{"]
        for name, typ in types.items():
            lines.append(f"  set {name} {{ type {typ};{_elements(elems[name])} }}")
        # a port may send only as itself: its MAC as Ethernet source, ARP only with that MAC
        # and its IP (or 0.0.0.0, a probe) as sender, IPv4 only from its address, nothing else
        lines += ["  chain port {",
                  "    iifname . ether saddr != @p_l2 drop",
                  "    ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 "
                  "iifname . arp saddr ether . arp saddr ip @p_arp accept",
                  "    ether type ip iifname . ip saddr @p_ip accept",
                  # RARP from its own MAC (checked above): QEMU's announcement of a guest
                  # that just migrated here, so the L2 network learns its new port
                  f"    ether type {RARP_ETHERTYPE:#06x} accept",
                  "    drop", "  }"]
        lines += [f"  chain prerouting {{ type filter hook prerouting priority {BRIDGE_PRIORITY}; policy accept;",
                  "    iifname @p_ports jump port"]
        lines += [f"    iifname {_q(prefix + '*')} drop" for prefix in self.port_prefixes]
        lines += ["  }", "}"]
        return lines

    def _inet_table(self, ports: list[Port], policy: Policy | None):
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
        known = {p.owner: (p, tuple(policy.members[p.owner]) if policy is not None and p.owner in policy.members
                           else None) for p in ports}
        chains: set[str] = set()
        sets: set[str] = set()
        if policy is not None:
            g_lines, chains, sets = self._groups(filtered, policy)
            lines += g_lines
        lines += ["  chain forward { type filter hook forward priority filter; policy accept;",
                  f"    iifname {br} ct state established,related accept",
                  f"    oifname {br} ct state established,related accept",
                  f"    oifname {br} ct state invalid drop"]
        bcast = policy is not None and bool(filtered) and policy.default != "allow"
        if policy is not None:
            lines += [f"    iifname {br} ip saddr vmap @egress_of",
                      f"    oifname {br} ip daddr vmap @ingress_of"]
            if bcast:  # no group's rule can admit a broadcast: none between tenants
                lines.append(f"    iifname {br} oifname {br} meta pkttype {{ broadcast, multicast }} drop")
        lines += ["  }", "}"]
        state = (known, chains, sets, (policy is not None, policy.default if policy is not None else ""), bcast)
        return lines, state

    def _groups(self, ports: list[Port], policy: Policy):
        members: dict[str, list[str]] = {}
        for p in ports:
            for g in policy.members[p.owner]:
                members.setdefault(g, []).append(p.ip)
        used = set(members)
        for group_rules in policy.groups.values():
            used.update(r.remote_group for r in group_rules if r.remote_group)
        lines = []
        for g in sorted(used):
            lines.append(f"  set {set_name(g)} {{ type ipv4_addr; comment {_q('group ' + g)};"
                         f"{_elements(members.get(g, []))} }}")
        combos = {tuple(policy.members[p.owner]) for p in ports}
        for groups in sorted(combos):
            lines += [f"  {ln}" for ln in self._combo_chains(groups, policy.default, policy.groups)]
        eg = [f"{p.ip} : jump eg_{combo_name(tuple(policy.members[p.owner]))}" for p in ports]
        ing = [f"{p.ip} : jump in_{combo_name(tuple(policy.members[p.owner]))}" for p in ports]
        lines += [f"  map egress_of {{ type ipv4_addr : verdict;{_elements(eg)} }}",
                  f"  map ingress_of {{ type ipv4_addr : verdict;{_elements(ing)} }}"]
        return lines, {combo_name(c) for c in combos}, {set_name(g) for g in used}

    @staticmethod
    def _combo_chains(groups: tuple[str, ...], default: str,
                      group_rules: Mapping[str, tuple[Rule, ...]]) -> list[str]:
        """The egress and ingress chains of every instance in exactly ``groups``: egress, its
        groups' egress rules (none: everything may leave); ingress, published ports, the
        default policy, its groups' ingress rules; else drop."""
        c = combo_name(groups)
        rules = [r for g in groups for r in group_rules.get(g, ())]
        egress = [r for r in rules if r.direction == "egress"]
        lines = [f"chain eg_{c} {{"]
        lines += [f"  {_match(r, 'daddr')} return" for r in egress]
        if egress:
            lines.append("  drop")
        lines += ["}", f"chain in_{c} {{", "  ct status dnat accept"]
        if default == "allow":
            lines.append("  accept")
        elif default == "same-group":
            lines += [f"  ip saddr @{set_name(g)} accept" for g in groups]
        lines += [f"  {_match(r, 'saddr')} accept" for r in rules if r.direction == "ingress"]
        lines += ["  drop", "}"]
        return lines

    # -- apply / change / remove --
    def apply(self, ports: list[Port], policy: Policy | None) -> None:
        """Replace this network's tables (one atomic batch)."""
        text, (known, chains, sets, pol, bcast) = self._plan(ports, policy)
        self.synced = False
        nft(text)
        self._ports, self._chains, self._sets, self._policy, self._bcast = known, chains, sets, pol, bcast
        self.synced = True

    def change_batch(self, owner: str, port: Port | None, pp: PortPolicy | None, *,
                     filtered: bool) -> str | None:
        """The batch that makes ``owner``'s elements those of ``port`` (None: removed) in
        ``pp``'s groups (None: not group-filtered); "" if nothing changes, None if the
        change is more than elements and chains (the caller applies in full). ``filtered``:
        the network's groups are filtered (it has a policy source)."""
        if not self.synced or self._policy[0] != filtered:
            return None
        groups = pp.groups if (pp is not None and port is not None) else None
        if port is not None and filtered and pp is not None and pp.default != self._policy[1]:
            return None  # the default changed: every chain is different
        if groups is not None and not self._bcast and pp is not None and pp.default != "allow":
            return None  # the first filtered port: the broadcast drop comes with a full render
        old = self._ports.get(owner)
        if old == ((port, groups) if port is not None else None):
            return ""
        t, out = self.table, []
        if old is not None:
            o, og = old
            for name, elems in self._bridge_elements(o).items():
                out.append(f"delete element bridge {t} {name} {{ {', '.join(elems)} }}")
            if og is not None:
                out += [f"delete element inet {t} egress_of {{ {o.ip} }}",
                        f"delete element inet {t} ingress_of {{ {o.ip} }}"]
                out += [f"delete element inet {t} {set_name(g)} {{ {o.ip} }}" for g in dict.fromkeys(og)]
                if self._last_of_combo(owner, og, groups):  # its chains go with the last member
                    c = combo_name(og)
                    out += [f"delete chain inet {t} eg_{c}", f"delete chain inet {t} in_{c}"]
        if port is not None:
            if groups is not None:
                assert pp is not None
                c = combo_name(groups)
                wanted = set(groups) | {r.remote_group for g in groups for r in pp.rules.get(g, ())
                                        if r.remote_group}
                for g in sorted(wanted):
                    if set_name(g) not in self._sets:
                        out.append(f"add set inet {t} {set_name(g)} {{ type ipv4_addr; "
                                   f"comment {_q('group ' + g)}; }}")
                if c not in self._chains:
                    chain = None
                    for ln in self._combo_chains(groups, pp.default, pp.rules):
                        if ln.startswith("chain "):
                            chain = ln.split()[1]
                            out.append(f"add chain inet {t} {chain}")
                        elif ln != "}":
                            out.append(f"add rule inet {t} {chain} {ln.strip()}")
                out += [f"add element inet {t} {set_name(g)} {{ {port.ip} }}" for g in dict.fromkeys(groups)]
                out += [f"add element inet {t} egress_of {{ {port.ip} : jump eg_{c} }}",
                        f"add element inet {t} ingress_of {{ {port.ip} : jump in_{c} }}"]
            for name, elems in self._bridge_elements(port).items():
                out.append(f"add element bridge {t} {name} {{ {', '.join(elems)} }}")
        return "\n".join(out) + "\n"

    def _last_of_combo(self, owner: str, groups: tuple[str, ...], new: tuple[str, ...] | None) -> bool:
        """No port but ``owner``'s (which moves to ``new``) is in exactly ``groups``."""
        return new != groups and not any(g == groups for o, (_, g) in self._ports.items() if o != owner)

    def put(self, owner: str, port: Port | None, pp: PortPolicy | None, *, filtered: bool) -> bool:
        """Make ``owner``'s elements those of ``port`` (None: remove them) in one atomic
        batch; False if that takes a full ``apply``. On an nft error the record is no longer
        trusted (the next change applies in full) and CommandFailed propagates."""
        batch = self.change_batch(owner, port, pp, filtered=filtered)
        if batch is None:
            return False
        if not batch:
            return True
        self.synced = False
        nft(batch)
        groups = pp.groups if (pp is not None and port is not None) else None
        old = self._ports.get(owner)
        if old is not None and old[1] is not None and self._last_of_combo(owner, old[1], groups):
            self._chains.discard(combo_name(old[1]))
        if port is None:
            self._ports.pop(owner, None)
        else:
            self._ports[owner] = (port, groups)
            if groups is not None and pp is not None:
                self._chains.add(combo_name(groups))
                self._sets.update(set_name(g) for g in groups)
                self._sets.update(set_name(r.remote_group) for g in groups for r in pp.rules.get(g, ())
                                  if r.remote_group)
        self.synced = True
        return True

    def remove(self) -> bool:
        """Delete both tables; False if there were none."""
        t = self.table
        self.synced = False
        existed = bool(self.listing())
        nft(f"table bridge {t} {{}}\ndelete table bridge {t}\n"
            f"table inet {t} {{}}\ndelete table inet {t}\n")
        return existed

    def listing(self) -> str:
        """Both tables as `nft list` prints them ("" if none)."""
        return nft_list("bridge", self.table) + nft_list("inet", self.table)


def _elements(elems: list[str]) -> str:
    """A set's or map's ``elements = { ... };`` clause ("" if none: nft refuses an empty one)."""
    return f" elements = {{ {', '.join(elems)} }};" if elems else ""


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
