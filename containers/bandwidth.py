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
import subprocess
from dataclasses import dataclass

from agent.errors import CommandFailed, InvalidInput, Unavailable

IFB_PREFIX = "nbw"
MIN_RATE_KBIT = 64  # below this a single full-size packet takes ~0.2 s
MAX_RATE_KBIT = 100_000_000  # 100 Gbit/s
MIN_BURST_KBIT = 16  # two full-size Ethernet frames: a smaller bucket never passes one
MAX_BURST_KBIT = 4_000_000  # 500 MB: tbf's burst is a 32-bit byte count
BURST_SECONDS_MAX = 10  # a burst holds at most 10 s of traffic at the rate (tbf's buffer time fits)
DEFAULT_BURST_SECONDS = 0.05  # 50 ms of traffic at the rate ...
DEFAULT_BURST_MIN_KBIT = 128  # ... but at least 16 KB
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
            for rate in (self.ingress_kbit, self.egress_kbit):
                if rate is not None and b > rate * BURST_SECONDS_MAX:
                    raise InvalidInput(f"bandwidth.burst_kbit {b} holds more than {BURST_SECONDS_MAX} s "
                                       f"of traffic at {rate} kbit/s: give a smaller burst")
        return self

    def burst_for(self, rate_kbit: int) -> int:
        if self.burst_kbit is not None:
            return self.burst_kbit
        return max(int(rate_kbit * DEFAULT_BURST_SECONDS), DEFAULT_BURST_MIN_KBIT)

    def to_dict(self) -> dict:
        return {"ingress_kbit": self.ingress_kbit, "egress_kbit": self.egress_kbit,
                "burst_kbit": self.burst_kbit}

    @classmethod
    def from_dict(cls, d) -> Bandwidth:
        d = d or {}
        return cls(d.get("ingress_kbit"), d.get("egress_kbit"), d.get("burst_kbit"))


def ifb_name(port: str) -> str:
    return IFB_PREFIX + hashlib.sha1(port.encode()).hexdigest()[:10]


# -- privileged helpers ----------------------------------------------------------------
def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True)
    except FileNotFoundError:
        raise Unavailable(f"{argv[0]} is not installed: apt-get install iproute2 "
                          "(or run scripts/setup-host)") from None
    if check and proc.returncode != 0:
        raise CommandFailed(f"{' '.join(argv[:4])}: {proc.stderr.strip()}", argv=list(argv),
                            returncode=proc.returncode, stderr=proc.stderr)
    return proc


def _tbf(dev: str, rate_kbit: int, burst_kbit: int) -> None:
    _run("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_kbit}kbit",
         "burst", str(burst_kbit * 1000 // 8), "latency", TBF_LATENCY)


def port_exists(dev: str) -> bool:
    """True if the network device ``dev`` exists (netlink: no process spawned)."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=dev))


def apply(port: str, bw: Bandwidth) -> None:
    """Make ``port``'s limits ``bw`` (replacing any it had; an unlimited direction has no
    qdisc). On failure the port is left unlimited, never half-shaped."""
    bw.check()
    try:
        if bw.ingress_kbit is not None:
            _tbf(port, bw.ingress_kbit, bw.burst_for(bw.ingress_kbit))
        else:
            _run("tc", "qdisc", "del", "dev", port, "root", check=False)
        if bw.egress_kbit is not None:
            ifb = ifb_name(port)
            if not port_exists(ifb):
                _run("ip", "link", "add", ifb, "type", "ifb")
            _run("ip", "link", "set", "dev", ifb, "alias", port, "up")
            _tbf(ifb, bw.egress_kbit, bw.burst_for(bw.egress_kbit))
            _run("tc", "qdisc", "replace", "dev", port, "handle", "ffff:", "ingress")
            _run("tc", "filter", "replace", "dev", port, "parent", "ffff:", "protocol", "all",
                 "prio", "1", "handle", "800::800", "u32", "match", "u32", "0", "0",
                 "action", "mirred", "egress", "redirect", "dev", ifb)
        else:
            _clear_egress(port)
    except BaseException:
        clear(port)
        raise


def _clear_egress(port: str) -> None:
    _run("tc", "qdisc", "del", "dev", port, "handle", "ffff:", "ingress", check=False)
    ifb = ifb_name(port)
    if port_exists(ifb):
        _run("ip", "link", "del", ifb, check=False)


def clear(port: str) -> None:
    """Remove ``port``'s limits and its ifb (each step tolerates absence; the port may be gone)."""
    if port_exists(port):
        _run("tc", "qdisc", "del", "dev", port, "root", check=False)
        _clear_egress(port)
    elif port_exists(ifb_name(port)):
        _run("ip", "link", "del", ifb_name(port), check=False)


def sweep() -> list[str]:
    """Remove the ifb devices whose port is gone; their names."""
    out = _run("ip", "-o", "link", "show", "type", "ifb", check=False).stdout
    gone = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        name = parts[1].rstrip(":").split("@")[0]
        if not name.startswith(IFB_PREFIX):
            continue
        alias = line.split(" alias ", 1)[1].split()[0] if " alias " in line else None
        if alias is None or ifb_name(alias) != name or port_exists(alias):
            continue  # not one of ours, or its port is still there
        _run("ip", "link", "del", name, check=False)
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
