"""Container networking with pyroute2 and iptables: one host bridge per network, a veth
pair per container into its own network namespace, IPv4 addresses leased from the
network's subnet (kept in the state DB), a default route via the bridge, NAT for egress
and published ports (DNAT), all in chains of our own.

Names (all derived, so leftovers can be found after a crash):
  netns      nact-<rtag>-<container>         (/run/netns)
  host veth  nv<rtag><8 hex of the name>      (<= 15 chars, the kernel's limit)
  VM tap     nt<12 hex of the instance id> (agent.services.assembly names it in the domain XML)
  MAC        a container's eth0: 02:<5 bytes of a hash of rtag and name> (locally administered)
  iptables   nat chains NODEAGENT-NAT (from POSTROUTING) and NODEAGENT-DNAT (from
             PREROUTING and OUTPUT); every rule carries ``-m comment nodeagent:<rtag>:<x>``
  nftables   tables ``bridge nodeagent_<rtag>`` and ``inet nodeagent_<rtag>``: the tenant
             filter (containers/firewall.py): a port's elements added or removed on each
             lease change, rebuilt whole at start and on a security-group change
<rtag> is 4 hex of the runtime's state dir, so two runtimes on one host never collide.
"""
from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import shlex
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable

from agent.errors import CommandFailed, Conflict, InsufficientResources, Unavailable
from agent.state import Database
from containers.firewall import Firewall, Policy, Port, PortPolicy, ensure_bridge_netfilter
from containers.runtime import PortMap

NETNS_DIR = "/run/netns"
SYS_NET = "/sys/class/net"  # the host veths' counters (statistics/rx_bytes, ...)
PROC_NET_DEV = "/proc/self/net/dev"  # every interface's counters in the agent's own network namespace
NAT_CHAIN = "NODEAGENT-NAT"
DNAT_CHAIN = "NODEAGENT-DNAT"
VM_LEASE_PREFIX = "vm:"  # leases of VMs on the same bridge: "vm:<instance id>" (not containers)
CONTAINER_IFNAME = "eth0"

SCHEMA_STEPS = [
    """CREATE TABLE containers_leases (
         network TEXT NOT NULL, ip TEXT NOT NULL, name TEXT NOT NULL,
         PRIMARY KEY (network, ip), UNIQUE (network, name));
       CREATE TABLE containers_ports (
         host_ip TEXT NOT NULL, host_port INTEGER NOT NULL, protocol TEXT NOT NULL,
         name TEXT NOT NULL, container_port INTEGER NOT NULL,
         PRIMARY KEY (host_ip, host_port, protocol));""",
    # the port a lease sends from (anti-spoofing): a container's veth or a VM's tap, its MAC
    """ALTER TABLE containers_leases ADD COLUMN mac TEXT;
       ALTER TABLE containers_leases ADD COLUMN ifname TEXT;""",
]


def short_hash(text: str, n: int) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


# -- privileged helpers (iptables, sysctl) -------------------------------------------
def iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["iptables", "-w", "5", *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise Unavailable("iptables is not installed: run scripts/setup-host") from None
    if check and proc.returncode != 0:
        raise CommandFailed(f"iptables {' '.join(args)}: {proc.stderr.strip()}", argv=argv,
                            returncode=proc.returncode, stderr=proc.stderr)
    return proc


def ensure_rule(table: str, chain: str, *rule: str) -> None:
    if iptables("-t", table, "-C", chain, *rule, check=False).returncode != 0:
        iptables("-t", table, "-A", chain, *rule)


def ensure_chain(table: str, chain: str, *parents: tuple[str, ...]) -> None:
    """Create ``chain`` and jump to it from each (parent, extra-match...) tuple."""
    if iptables("-t", table, "-nL", chain, check=False).returncode != 0:
        iptables("-t", table, "-N", chain)
    for parent, *match in parents:
        ensure_rule(table, parent, *match, "-j", chain)


def rules_with_comment(table: str, chain: str, prefix: str, *,
                       exact: bool = False) -> list[list[str]]:
    """The rules of ``chain`` whose comment starts with (or, exact, equals) ``prefix``,
    as argv lists after ``-A CHAIN``."""
    out = iptables("-t", table, "-S", chain, check=False).stdout
    rules = []
    for line in out.splitlines():
        argv = shlex.split(line)
        if argv[:1] != ["-A"] or "--comment" not in argv:
            continue
        c = argv[argv.index("--comment") + 1]
        if (c == prefix) if exact else c.startswith(prefix):
            rules.append(argv[2:])
    return rules


def delete_rules(table: str, chain: str, prefix: str, *, exact: bool = False) -> int:
    n = 0
    for rule in rules_with_comment(table, chain, prefix, exact=exact):
        iptables("-t", table, "-D", chain, *rule, check=False)
        n += 1
    return n


def write_sysctl(key: str, value: str) -> None:
    with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
        f.write(value)


def bind_netns(source: str, target: str) -> None:
    """Bind-mount a netns file (``/proc/PID/ns/net``) at ``target`` (like `ip netns attach`)."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_RDONLY, 0o444)
    os.close(fd)
    MS_BIND = 4096
    if libc.mount(source.encode(), target.encode(), None, MS_BIND, None) != 0:
        err = ctypes.get_errno()
        os.unlink(target)
        raise CommandFailed(f"bind {source} at {target}: {os.strerror(err)}",
                            argv=["mount", "--bind", source, target], returncode=err)


def check_bindable(host_ip: str, port: int, protocol: str) -> bool:
    """True if nothing on the host holds ``host_ip:port`` (the bind test)."""
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((host_ip, port))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise Conflict(f"host_ip {host_ip} is not an address of this host: publish on "
                               "127.0.0.1 or one of the host's addresses") from None
            return False
    return True


BRIDGE_MAX_PORTS = 1024  # the kernel's BR_MAX_PORTS: a Linux bridge refuses more (EXFULL)


def bridge_full(bridge: str) -> InsufficientResources:
    """The error when ``bridge`` has no free port: containers' veths and VMs' taps share it."""
    return InsufficientResources(f"bridge {bridge!r} has no free port: a Linux bridge holds at most "
                                 f"{BRIDGE_MAX_PORTS} ports (this host's containers' veths and VMs' taps "
                                 "together); delete instances or create this one with network none",
                                 bridge=bridge)


class Network:
    """A bridge network and its containers' attachments. Not thread-safe on its own:
    the runtime serialises calls."""

    def __init__(self, db: Database, *, bridge: str, subnet: str, nat: bool, rtag: str):
        self.db, self.bridge, self.nat, self.rtag = db, bridge, nat, rtag
        self.subnet = ipaddress.ip_network(subnet)
        self.gateway = str(next(self.subnet.hosts()))
        self._bridge_ready = False  # ensure_bridge() ran in this process
        self._bridge_lock = threading.Lock()
        self.firewall = Firewall(rtag=rtag, bridge=bridge, gateway=self.gateway)
        # the security groups (agent/services/secgroups.py sets it): None, no group filtering
        self.policy_source: Callable[[], Policy | None] | None = None
        # one port owner's part of it (a lease change touches only that port's elements)
        self.port_policy_source: Callable[[str], PortPolicy | None] | None = None
        self._fw_mutex = threading.Lock()  # a rebuild or one port's change at a time
        # apply_firewall() callers at the same time share one rebuild (see there)
        self._fw_cond = threading.Condition()
        self._fw_asked = 0  # rebuilds asked for so far, numbered 1, 2, ...
        self._fw_done = 0  # every ask up to this number is covered by an applied rebuild
        self._fw_busy = False  # a rebuild is running (at most one)
        # where the search for a free address starts: every host address below it was taken
        # when this object last looked (a release through it lowers it; one through another
        # process does not, so its address is found again once this search wraps around)
        self._free_from = 0
        # the subnet's host addresses as (first, how many), as subnet.hosts() walks them
        n = self.subnet.num_addresses
        self._hosts = (int(self.subnet.network_address) + 1, n - 2) if n > 2 else \
            (int(self.subnet.network_address), n)
        db.apply_schema("containers_net", SCHEMA_STEPS)

    # -- names ------------------------------------------------------------------------
    def netns_name(self, name: str) -> str:
        return f"nact-{self.rtag}-{name}"

    def netns_path(self, name: str) -> str:
        return os.path.join(NETNS_DIR, self.netns_name(name))

    def veth_name(self, name: str) -> str:
        return f"nv{self.rtag}{short_hash(name, 8)}"

    def container_mac(self, name: str) -> str:
        h = short_hash(f"{self.rtag}:{name}", 10)
        return "02:" + ":".join(h[i:i + 2] for i in range(0, 10, 2))

    def comment(self, name: str) -> str:
        return f"nodeagent:{self.rtag}:{name}"

    # -- the bridge -------------------------------------------------------------------
    def ensure_bridge(self) -> None:
        """Create and address the bridge and the NAT rules if missing (idempotent)."""
        with self._bridge_lock:
            self._ensure_bridge()

    def ready_bridge(self) -> None:
        """ensure_bridge once per process, and again if the bridge went missing since: a
        netlink lookup otherwise (not the iptables checks of ensure_bridge)."""
        from pyroute2 import IPRoute
        if self._bridge_ready:
            with IPRoute() as ipr:
                if ipr.link_lookup(ifname=self.bridge):
                    return
        self.ensure_bridge()

    def _ensure_bridge(self) -> None:
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.bridge)
            if not idx:
                ipr.link("add", ifname=self.bridge, kind="bridge")
                idx = ipr.link_lookup(ifname=self.bridge)
            idx = idx[0]
            have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx, family=2)}
            if self.gateway not in have:
                ipr.addr("add", index=idx, address=self.gateway,
                         prefixlen=self.subnet.prefixlen)
            ipr.link("set", index=idx, state="up")
        # published ports on 127.0.0.1: let DNATed loopback packets route to the bridge
        # (containers/firewall.py drops what tenants send to 127.0.0.0/8 before NAT sees it)
        write_sysctl(f"net.ipv4.conf.{self.bridge}.route_localnet", "1")
        ensure_bridge_netfilter()
        self.apply_firewall()
        ensure_chain("nat", NAT_CHAIN, ("POSTROUTING",))
        ensure_chain("nat", DNAT_CHAIN, ("PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL"),
                     ("OUTPUT", "-m", "addrtype", "--dst-type", "LOCAL"))
        net_comment = f"nodeagent:{self.rtag}:net:{self.bridge}"
        # host -> 127.0.0.1:port -> container: the reply must come back to the host
        ensure_rule("nat", NAT_CHAIN, "-s", "127.0.0.0/8", "-o", self.bridge,
                    "-m", "comment", "--comment", net_comment, "-j", "MASQUERADE")
        if self.nat:
            write_sysctl("net.ipv4.ip_forward", "1")
            ensure_rule("nat", NAT_CHAIN, "-s", str(self.subnet), "!", "-o", self.bridge,
                        "-m", "comment", "--comment", net_comment, "-j", "MASQUERADE")
        self._bridge_ready = True

    def delete_bridge(self) -> bool:
        """Remove the bridge and this network's rules (only when no container is left)."""
        from pyroute2 import IPRoute
        self._bridge_ready = False
        delete_rules("nat", NAT_CHAIN, f"nodeagent:{self.rtag}:net:{self.bridge}", exact=True)
        self.firewall.remove()
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.bridge)
            if idx:
                ipr.link("del", index=idx[0])
                return True
        return False

    # -- leases and ports ----------------------------------------------------------------
    def lease(self, name: str, want: str | None = None, *, mac: str | None = None,
              ifname: str | None = None) -> str:
        """``name``'s address (kept across calls): ``want`` if it is in the subnet and free
        (a VM arriving from another host keeps its address), else the first free one. With
        ``mac`` and ``ifname`` (the port it sends from), its anti-spoofing rules are in place
        when this returns (before the device exists)."""
        ip = self._lease(name, want, mac, ifname)
        if ip is None:  # it was in place as asked
            held = self.find_lease(name)
            assert held is not None
            return held
        if mac is not None and ifname is not None:  # a port: its rules
            self._port_changed(name, Port(name, ifname, mac, ip))
        return ip

    def _lease(self, name, want, mac, ifname) -> str | None:
        """The new or changed lease's ip; None if it was there already as asked."""
        with self.db.tx() as c:
            row = c.execute("SELECT ip, mac, ifname FROM containers_leases WHERE network=? AND name=?",
                            (self.bridge, name)).fetchone()
            if row:
                if mac is None or (row["mac"], row["ifname"]) == (mac, ifname):
                    return None
                c.execute("UPDATE containers_leases SET mac=?, ifname=? WHERE network=? AND name=?",
                          (mac, ifname, self.bridge, name))
                return row["ip"]
            wanted = [ipaddress.ip_address(want)] if want and ipaddress.ip_address(want) in self.subnet else []
            for ip in wanted:
                if str(ip) != self.gateway and not self._taken(c, str(ip)):
                    return self._insert_lease(c, str(ip), name, mac, ifname)
            # the lowest free address from _free_from on, each probe one primary-key lookup (not
            # a read of every lease per create: 2 ms more at 1000 containers); then the ones below
            first, size = self._hosts
            start = min(self._free_from, size)
            for i in (*range(start, size), *range(0, start)):
                s = str(ipaddress.ip_address(first + i))
                if s != self.gateway and not self._taken(c, s):
                    self._free_from = i + 1
                    return self._insert_lease(c, s, name, mac, ifname)
        raise InsufficientResources(f"network {self.bridge} ({self.subnet}) has no free "
                                    "address: delete a container or use a larger subnet")

    def _host_index(self, ip: str) -> int:
        """``ip``'s place in the order the free-address search walks (see _lease)."""
        return max(0, int(ipaddress.ip_address(ip)) - self._hosts[0])

    def _taken(self, c, ip: str) -> bool:
        return c.execute("SELECT 1 FROM containers_leases WHERE network=? AND ip=?", (self.bridge, ip)).fetchone() \
            is not None

    def _insert_lease(self, c, ip: str, name, mac, ifname) -> str:
        c.execute("INSERT INTO containers_leases(network, ip, name, mac, ifname) VALUES(?,?,?,?,?)",
                  (self.bridge, ip, name, mac, ifname))
        return ip

    def move_port(self, name: str, *, mac: str, ifname: str) -> bool:
        """Key ``name``'s lease to the port it sends from now (a VM's tap, whose name the
        hypervisor may pick at each start) and apply the filter; False if it holds no lease
        or is keyed so already."""
        with self.db.tx() as c:
            n = c.execute("UPDATE containers_leases SET mac=?, ifname=? WHERE network=? AND name=? "
                          "AND (mac IS NOT ? OR ifname IS NOT ?)",
                          (mac, ifname, self.bridge, name, mac, ifname)).rowcount
            row = c.execute("SELECT ip FROM containers_leases WHERE network=? AND name=?",
                            (self.bridge, name)).fetchone()
        if n:
            self._port_changed(name, Port(name, ifname, mac, row["ip"]))
        return n > 0

    def find_lease(self, name: str) -> str | None:
        row = self.db.one("SELECT ip FROM containers_leases WHERE network=? AND name=?",
                          (self.bridge, name))
        return row["ip"] if row else None

    def release(self, name: str) -> bool:
        with self.db.tx() as c:
            port = c.execute("SELECT 1 FROM containers_leases WHERE network=? AND name=? AND mac IS NOT NULL",
                             (self.bridge, name)).fetchone()
            row = c.execute("SELECT ip FROM containers_leases WHERE network=? AND name=?",
                            (self.bridge, name)).fetchone()
            n = c.execute("DELETE FROM containers_leases WHERE network=? AND name=?",
                          (self.bridge, name)).rowcount
            if row:  # the search for a free address starts at or below it again
                self._free_from = min(self._free_from, self._host_index(row["ip"]))
            n += c.execute("DELETE FROM containers_ports WHERE name=?", (name,)).rowcount
        if port:  # its rules go with it
            self._port_changed(name, None)
        return n > 0

    # -- the filter --
    def ports(self) -> list[Port]:
        """Every lease with a known port (containers' and VMs')."""
        return [Port(r["name"], r["ifname"], r["mac"], r["ip"]) for r in self.db.query(
            "SELECT name, ip, mac, ifname FROM containers_leases WHERE network=? AND mac IS NOT NULL "
            "AND ifname IS NOT NULL ORDER BY ip", (self.bridge,))]

    def _port_changed(self, owner: str, port: Port | None) -> None:
        """Make ``owner``'s port (None: gone) filtered as the lease table says, in one small
        batch when the filter allows (containers/firewall.py Firewall.put), else by a full
        rebuild. Returns once the rules are in place (a new port's before its device joins
        the bridge)."""
        filtered = self.policy_source is not None
        if not filtered or self.port_policy_source is not None:
            with self._fw_mutex:  # a rebuild reads the leases under it: never a stale one after this
                if self.firewall.synced:
                    pp = self.port_policy_source(owner) if (filtered and port is not None
                                                            and self.port_policy_source is not None) else None
                    try:
                        if self.firewall.put(owner, port, pp, filtered=filtered):
                            return
                    except CommandFailed:
                        pass  # e.g. the tables went behind our back: rebuild them
        self.apply_firewall()

    def apply_firewall(self) -> None:
        """Render and apply this network's whole filter (containers/firewall.py) from the
        leases and the security groups: one atomic nft batch; idempotent.

        A rebuild reads everything, so callers at the same time share one: a caller returns
        once a rebuild that read the state after its call began has been applied. Under a
        storm of N creates the whole filter is rebuilt about twice per batch of callers
        instead of N times. If that rebuild fails, each caller it covered retries on its own
        (and gets its own error)."""
        with self._fw_cond:
            self._fw_asked += 1
            mine = self._fw_asked
            while self._fw_busy and self._fw_done < mine:
                self._fw_cond.wait()
            if self._fw_done >= mine:
                return  # a rebuild that started after this call was applied
            self._fw_busy = True
            covers = self._fw_asked  # the rebuild below reads the state after each of these calls
        try:
            with self._fw_mutex:
                policy = self.policy_source() if self.policy_source is not None else None
                self.firewall.apply(self.ports(), policy)
        except BaseException:
            with self._fw_cond:
                self._fw_busy = False
                self._fw_cond.notify_all()
            raise
        with self._fw_cond:
            self._fw_done, self._fw_busy = max(self._fw_done, covers), False
            self._fw_cond.notify_all()

    def claim_ports(self, name: str, ports: tuple[PortMap, ...]) -> None:
        """Record the ports for ``name``; Conflict if ours or anybody's already."""
        with self.db.tx() as c:
            for p in ports:
                row = c.execute(
                    "SELECT name FROM containers_ports WHERE host_port=? AND protocol=? AND "
                    "(host_ip=? OR host_ip='0.0.0.0' OR ?='0.0.0.0')",
                    (p.host_port, p.protocol, p.host_ip, p.host_ip)).fetchone()
                if row and row["name"] == name:
                    continue  # already ours (attach again after a restart)
                if row:
                    raise Conflict(f"port {p.host_ip}:{p.host_port}/{p.protocol} is already "
                                   f"published by container {row['name']!r}: choose another "
                                   "host_port")
                if not check_bindable(p.host_ip, p.host_port, p.protocol):
                    raise Conflict(f"port {p.host_ip}:{p.host_port}/{p.protocol} is in use on "
                                   "this host: choose another host_port")
                c.execute("INSERT INTO containers_ports VALUES(?,?,?,?,?)",
                          (p.host_ip, p.host_port, p.protocol, name, p.container_port))

    # -- attach / detach ------------------------------------------------------------------
    def reserve(self, name: str, ports: tuple[PortMap, ...] = ()) -> str:
        """Claim the ports and lease an address without any device (for a container whose
        netns only exists once it runs: attach(pid=...) then). Returns the ip."""
        try:
            self.claim_ports(name, ports)
            return self.lease(name, mac=self.container_mac(name), ifname=self.veth_name(name))
        except BaseException:
            self.release(name)
            raise

    def attach(self, name: str, ports: tuple[PortMap, ...] = (), *,
               pid: int | None = None) -> tuple[str, str]:
        """Lease an address, make the netns + veth, publish ports. Returns (netns path, ip).
        With ``pid``, the netns is that process's (bind-mounted to the usual name), e.g. one
        runc made inside a user namespace; devices and rules of an earlier run are replaced.
        On failure everything made here is undone."""
        from pyroute2 import IPRoute, NetlinkError, NetNS, netns
        if not self._bridge_ready:
            self.ensure_bridge()
        if pid is not None:
            self.detach(name, keep_lease=True)
        try:
            self.claim_ports(name, ports)
            nsname, host_if = self.netns_name(name), self.veth_name(name)
            ip = self.lease(name, mac=self.container_mac(name), ifname=host_if)
            peer = "nq" + host_if[2:]
            if pid is None:
                netns.create(nsname)
            else:
                bind_netns(f"/proc/{pid}/ns/net", self.netns_path(name))
            with IPRoute() as ipr:
                ipr.link("add", ifname=host_if, kind="veth",
                         peer={"ifname": peer, "net_ns_fd": nsname,
                               "address": self.container_mac(name)})
                hidx = ipr.link_lookup(ifname=host_if)[0]
                bidx = ipr.link_lookup(ifname=self.bridge)
                if not bidx:  # removed behind our back: make it (and its rules) again
                    self.ensure_bridge()
                    bidx = ipr.link_lookup(ifname=self.bridge)
                bidx = bidx[0]
                try:
                    ipr.link("set", index=hidx, master=bidx, state="up")
                except NetlinkError as e:
                    if e.code == errno.EXFULL:
                        raise bridge_full(self.bridge) from None
                    raise
            with NetNS(nsname) as ns:
                i = ns.link_lookup(ifname=peer)[0]
                ns.link("set", index=i, ifname=CONTAINER_IFNAME)
                ns.addr("add", index=i, address=ip, prefixlen=self.subnet.prefixlen)
                ns.link("set", index=i, state="up")
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                ns.route("add", dst="default", gateway=self.gateway)
            for p in ports:
                self._publish(name, ip, p)
            return self.netns_path(name), ip
        except BaseException:
            self.detach(name)
            raise

    def _publish(self, name: str, ip: str, p: PortMap) -> None:
        dst = [] if p.host_ip == "0.0.0.0" else ["-d", p.host_ip]
        iptables("-t", "nat", "-A", DNAT_CHAIN, *dst, "-p", p.protocol,
                 "--dport", str(p.host_port), "-m", "comment", "--comment", self.comment(name),
                 "-j", "DNAT", "--to-destination", f"{ip}:{p.container_port}")

    def detach(self, name: str, *, keep_lease: bool = False) -> bool:
        """Remove port rules, veth, netns and (unless ``keep_lease``) the lease and port
        claims of ``name``; False if none existed."""
        from pyroute2 import IPRoute, netns
        found = delete_rules("nat", DNAT_CHAIN, self.comment(name), exact=True) > 0
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.veth_name(name))
            if idx:
                ipr.link("del", index=idx[0])
                found = True
        if os.path.exists(self.netns_path(name)):
            netns.remove(self.netns_name(name))
            found = True
        if keep_lease:
            return found
        return self.release(name) or found

    def counters(self, name: str) -> dict:
        """rx/tx bytes and packets as the container sees them (the host veth's reversed)."""
        # sysfs, not a netlink socket per call: a /metrics scrape reads this for every container
        d = os.path.join(SYS_NET, self.veth_name(name), "statistics")
        st = {}
        for key in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets"):
            try:
                with open(os.path.join(d, key)) as f:
                    st[key] = int(f.read())
            except (OSError, ValueError):  # no veth (not running): nothing counted
                return {"rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0, "tx_packets": 0}
        return {"rx_bytes": st["tx_bytes"], "tx_bytes": st["rx_bytes"],
                "rx_packets": st["tx_packets"], "tx_packets": st["rx_packets"]}

    def counters_of(self, names: Iterable[str]) -> dict[str, dict]:
        """counters() of each of ``names`` from one read of /proc/self/net/dev (the agent's
        network namespace: every host veth in one file, not four sysfs reads per container); a
        name without a veth (not running) gets zeros."""
        try:
            with open(PROC_NET_DEV, "rb") as dev:
                text = dev.read().decode(errors="replace")
        except OSError:
            text = ""
        links: dict[str, list[str]] = {}
        for ln in text.splitlines()[2:]:  # two header lines
            ifname, sep, rest = ln.partition(":")
            fields = rest.split()
            if sep and len(fields) >= 10:
                links[ifname.strip()] = fields
        out = {}
        for name in names:
            f = links.get(self.veth_name(name))
            # the host veth's receive is the container's transmit
            out[name] = {"rx_bytes": int(f[8]), "tx_bytes": int(f[0]), "rx_packets": int(f[9]),
                         "tx_packets": int(f[1])} if f else {"rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0,
                                                              "tx_packets": 0}
        return out

    # -- leftovers --------------------------------------------------------------------------
    def leftover_names(self) -> set[str]:
        """Container names with a netns, lease or port rule of ours (for reconcile)."""
        names: set[str] = set()
        prefix = f"nact-{self.rtag}-"
        try:
            names.update(n[len(prefix):] for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
        except FileNotFoundError:
            pass
        names.update(r["name"] for r in self.db.query(
            "SELECT name FROM containers_leases WHERE network=?", (self.bridge,))
            if not r["name"].startswith(VM_LEASE_PREFIX))  # the agent's VMs lease here too
        names.update(r["name"] for r in self.db.query("SELECT name FROM containers_ports"))
        for rule in rules_with_comment("nat", DNAT_CHAIN, f"nodeagent:{self.rtag}:"):
            c = rule[rule.index("--comment") + 1].split(":", 2)[2]
            if not c.startswith("net:"):
                names.add(c)
        return names

    def leftover_veths(self, live: set[str]) -> list[str]:
        """Our host veths (``nv<rtag>*``) of no container in ``live``. The names come from
        libc's if_nameindex (pyroute2's dump decodes every attribute of every link: seconds
        at agent start with a thousand containers); not from sysfs, which shows the links of
        the network namespace it was mounted in, not necessarily the agent's."""
        want = {self.veth_name(n) for n in live}
        return sorted(n for _, n in socket.if_nameindex() if n.startswith(f"nv{self.rtag}") and n not in want)

    def delete_veth(self, ifname: str) -> None:
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if idx:
                ipr.link("del", index=idx[0])
