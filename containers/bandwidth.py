"""Per-instance network rate limits with tc, on the host side of an instance's port (a
container's host veth, a VM's tap). Terms: *ingress* is traffic to the instance, *egress*
traffic from it (the instance's view, as the API's ``ingress_kbit``/``egress_kbit``).

- ingress: a ``tbf`` qdisc at the root of the port (the host transmits to the instance there);
- egress: what the instance sends arrives on the port's ingress; a match-all ``u32`` filter
  redirects it (``mirred``) to an ``ifb`` device of the port's own, whose root ``tbf``
  shapes it.

Why this shape: tbf queues (TCP slows down smoothly) where a policer drops; and it needs
only tbf, ifb, u32 and mirred, which every distribution kernel has, while libvirt's
``<bandwidth>`` needs sch_sfq (its inbound leaf) and act_police (its outbound policer),
which some kernels lack (this development machine's: ``virsh create`` of a domain with
``<bandwidth>`` fails there). One mechanism for VMs and containers. Everything sits on
host devices: an instance never holds CAP_NET_ADMIN over them.

ifb names: ``nbw`` + 10 hex of the port's name; the ifb's alias is the port's name, so an
ifb whose port is gone (a VM stopped, a veth deleted) is found and removed by ``sweep``.
All of it is privileged (``tc``, ``ip``), in the functions of this module only.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
from dataclasses import dataclass

from agent.errors import CommandFailed, InvalidInput, Unavailable

IFB_PREFIX = "nbw"
MIN_RATE_KBIT = 64  # below this a single full-size packet takes ~0.2 s
MAX_RATE_KBIT = 100_000_000  # 100 Gbit/s
MIN_BURST_KBIT = 16  # two full-size Ethernet frames: a smaller bucket never passes one
MAX_BURST_KBIT = 4_000_000  # 500 MB: tbf's burst is a 32-bit byte count
BURST_SECONDS_MAX = 10  # a bucket holds at most 10 s of traffic at its rate (tbf's 32-bit buffer time fits)
DEFAULT_BURST_SECONDS = 0.05  # 50 ms of traffic at the rate ...
DEFAULT_BURST_MIN_KBIT = 128  # ... but at least 16 KB
DEV_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # a device name as the kernel takes it, nothing tc -batch could split
TBF_LATENCY = "50ms"  # how long a packet may wait in the bucket's queue before it is dropped


@dataclass(frozen=True)
class Bandwidth:
    """Rates in kbit/s (1000 bits); None: unlimited in that direction. ``burst_kbit``:
    the bucket (how much may pass at line rate after a quiet spell); None: 50 ms of
    traffic at the rate, at least 128 kbit."""
    ingress_kbit: int | None = None
    egress_kbit: int | None = None
    burst_kbit: int | None = None

    @property
    def limited(self) -> bool:
        return self.ingress_kbit is not None or self.egress_kbit is not None

    def check(self) -> Bandwidth:
        """Self if within bounds; InvalidInput naming the field otherwise."""
        for field in ("ingress_kbit", "egress_kbit"):
            v = getattr(self, field)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)
                                  or not MIN_RATE_KBIT <= v <= MAX_RATE_KBIT):
                raise InvalidInput(f"bandwidth.{field} must be {MIN_RATE_KBIT}..{MAX_RATE_KBIT} "
                                   "kbit/s (or null: unlimited)")
        b = self.burst_kbit
        if b is not None:
            if not isinstance(b, int) or isinstance(b, bool) or not MIN_BURST_KBIT <= b <= MAX_BURST_KBIT:
                raise InvalidInput(f"bandwidth.burst_kbit must be {MIN_BURST_KBIT}..{MAX_BURST_KBIT} kbit")
            if not self.limited:
                raise InvalidInput("bandwidth.burst_kbit goes with ingress_kbit or egress_kbit")
        return self

    def burst_for(self, rate_kbit: int) -> int:
        """The bucket tc gets for ``rate_kbit``: the burst asked for, cut to BURST_SECONDS_MAX
        of traffic at the rate (tbf keeps the bucket as a 32-bit time and silently wraps a
        larger one); by default 50 ms at the rate, at least 128 kbit."""
        if self.burst_kbit is not None:
            return max(min(self.burst_kbit, rate_kbit * BURST_SECONDS_MAX), MIN_BURST_KBIT)
        return max(int(rate_kbit * DEFAULT_BURST_SECONDS), DEFAULT_BURST_MIN_KBIT)

    def to_dict(self) -> dict:
        return {"ingress_kbit": self.ingress_kbit, "egress_kbit": self.egress_kbit,
                "burst_kbit": self.burst_kbit}

    @classmethod
    def from_dict(cls, d) -> Bandwidth:
        d = d or {}
        return cls(d.get("ingress_kbit"), d.get("egress_kbit"), d.get("burst_kbit"))


def _dev(name: str) -> str:
    """``name`` if it is a plain device name (it goes into tc's batch input), else InvalidInput."""
    if not isinstance(name, str) or not DEV_RE.fullmatch(name):
        raise InvalidInput(f"network device name {str(name)[:40]!r} is not a plain interface name")
    return name


def ifb_name(port: str) -> str:
    return IFB_PREFIX + hashlib.sha1(port.encode()).hexdigest()[:10]


# -- privileged helpers ----------------------------------------------------------------
def _run(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, input=input)
    except FileNotFoundError:
        raise Unavailable(f"{argv[0]} is not installed: apt-get install iproute2 "
                          "(or run scripts/setup-host)") from None
    if check and proc.returncode != 0:
        what = " ".join(argv[:4]) if input is None else f"tc -batch: {input.strip()}"
        raise CommandFailed(f"{what}: {proc.stderr.strip()}", argv=list(argv),
                            returncode=proc.returncode, stderr=proc.stderr)
    return proc


def _tc(commands: list[str], *, check: bool = True) -> None:
    """Run tc ``commands`` in one process (``tc -batch``); without ``check`` every command
    runs whatever the others did (deletes of what may be absent)."""
    if commands:
        _run("tc", *(() if check else ("-force",)), "-batch", "-", check=check, input="\n".join(commands) + "\n")


def _tbf(dev: str, rate_kbit: int, burst_kbit: int) -> str:
    return (f"qdisc replace dev {dev} root tbf rate {rate_kbit}kbit burst {burst_kbit * 1000 // 8} "
            f"latency {TBF_LATENCY}")


def port_exists(dev: str) -> bool:
    """True if the network device ``dev`` exists (netlink: no process spawned)."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=dev))


def _ensure_ifb(ifb: str, port: str) -> None:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        if not ipr.link_lookup(ifname=ifb):
            ipr.link("add", ifname=ifb, kind="ifb")
        ipr.link("set", index=ipr.link_lookup(ifname=ifb)[0], ifalias=port, state="up")


def _delete_link(dev: str) -> bool:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=dev)
        if idx:
            ipr.link("del", index=idx[0])
    return bool(idx)


def apply(port: str, bw: Bandwidth) -> None:
    """Make ``port``'s limits ``bw`` (replacing any it had; an unlimited direction has no
    qdisc). On failure the port is left unlimited, never half-shaped."""
    bw.check()
    _dev(port)
    strict, loose = [], []
    try:
        if bw.ingress_kbit is not None:
            strict.append(_tbf(port, bw.ingress_kbit, bw.burst_for(bw.ingress_kbit)))
        else:
            loose.append(f"qdisc del dev {port} root")
        ifb = ifb_name(port)
        if bw.egress_kbit is not None:
            _ensure_ifb(ifb, port)
            strict += [_tbf(ifb, bw.egress_kbit, bw.burst_for(bw.egress_kbit)),
                       f"qdisc replace dev {port} handle ffff: ingress",
                       f"filter replace dev {port} parent ffff: protocol all prio 1 handle 800::800 u32 "
                       f"match u32 0 0 action mirred egress redirect dev {ifb}"]
        else:
            loose.append(f"qdisc del dev {port} handle ffff: ingress")
        _tc(loose, check=False)
        if bw.egress_kbit is None:
            _delete_link(ifb)
        _tc(strict)
    except BaseException:
        clear(port)
        raise


def clear(port: str) -> None:
    """Remove ``port``'s limits and its ifb (each step tolerates absence; the port may be gone)."""
    _dev(port)
    if port_exists(port):
        _tc([f"qdisc del dev {port} root", f"qdisc del dev {port} handle ffff: ingress"], check=False)
    _delete_link(ifb_name(port))


def sweep() -> list[str]:
    """Remove the ifb devices whose port is gone; their names. The host's link names come
    from libc's if_nameindex (a pyroute2 dump decodes every attribute of every link: slow
    with a thousand veths; sysfs may show another network namespace's links), the aliases of
    our ifbs from netlink, one link each."""
    import socket

    from pyroute2 import IPRoute
    links = {name: idx for idx, name in socket.if_nameindex()}
    gone: list[str] = []
    candidates = sorted(n for n in links if n.startswith(IFB_PREFIX))
    if not candidates:
        return gone
    with IPRoute() as ipr:
        for name in candidates:
            try:
                alias = ipr.get_links(links[name])[0].get_attr("IFLA_IFALIAS")
            except Exception:  # noqa: BLE001 - gone meanwhile
                continue
            if not alias or ifb_name(alias) != name or alias in links:
                continue  # not one of ours, or its port is still there
            ipr.link("del", index=links[name])
            gone.append(name)
    return gone


def read(port: str) -> dict:
    """What ``port`` is limited to now: {"ingress_kbit", "egress_kbit"} (None: unlimited),
    read back from the kernel (for stats and tests)."""
    def rate(dev: str) -> int | None:
        text = _run("tc", "qdisc", "show", "dev", dev, "root", check=False).stdout
        for line in text.splitlines():
            parts = line.split()
            if len(parts) > 1 and parts[1] == "tbf" and "rate" in parts:
                return _kbit(parts[parts.index("rate") + 1])
        return None
    ifb = ifb_name(port)
    redirected = ifb in _run("tc", "filter", "show", "dev", port, "parent", "ffff:", check=False).stdout
    return {"ingress_kbit": rate(port) if port_exists(port) else None,
            "egress_kbit": rate(ifb) if redirected and port_exists(ifb) else None}


def _kbit(text: str) -> int:
    """tc's printed rate ("8Mbit", "640Kbit", "1Gbit", "999bit") in kbit/s."""
    units = {"Gbit": 1_000_000, "Mbit": 1000, "Kbit": 1, "kbit": 1, "bit": 0.001}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return round(float(text[:-len(suffix)]) * factor)
    return round(float(text) / 1000)
