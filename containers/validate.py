"""Checks shared by every runtime, so the fake and runc reject the same bad input the same way.

Each check raises ``agent.errors.InvalidInput`` with a message that says how to fix it.
"""
from __future__ import annotations

import ipaddress
import re

from agent.errors import InvalidInput
from containers.bandwidth import Bandwidth
from containers.bundle import resolve_process
from containers.runtime import ContainerSpec, Limits, NetworkSpec

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")  # usable as a cgroup/dir/veth seed
USER_RE = re.compile(r"^[a-zA-Z0-9_.-]+(:[a-zA-Z0-9_.-]+)?$")  # uid[:gid] or user[:group]
MIN_MEMORY_MIB = 6  # below this runc cannot even start its init process
MAX_CPUS = 1024
MIN_CPUS = 0.01  # the kernel's smallest CFS quota (1 ms) over cgroups.CFS_PERIOD_US (100 ms)
MAX_PIDS = 4_194_304  # the kernel's PID_MAX_LIMIT on 64-bit
IO_WEIGHT_RANGE = (10, 1000)  # cgroup v1 blkio.weight and v2 io.weight (bfq) overlap here
NETWORK_MODES = ("bridge", "none", "host")
PROTOCOLS = ("tcp", "udp")


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInput(f"container name {name!r} is invalid: use 1-63 letters, digits, "
                           "'_', '.', '-', starting with a letter or digit")


def check_limits(limits: Limits) -> None:
    if limits.cpus is not None and not (MIN_CPUS <= limits.cpus <= MAX_CPUS):
        raise InvalidInput(f"cpus={limits.cpus} is invalid: give a number in {MIN_CPUS}..{MAX_CPUS}"
                           " (e.g. 0.5 for half a core)")
    if limits.memory_mib is not None and (not isinstance(limits.memory_mib, int)
                                          or limits.memory_mib < MIN_MEMORY_MIB):
        raise InvalidInput(f"memory_mib={limits.memory_mib} is invalid: give an integer "
                           f">= {MIN_MEMORY_MIB}")
    if limits.pids_max is not None and (not isinstance(limits.pids_max, int)
                                        or not 1 <= limits.pids_max <= MAX_PIDS):
        raise InvalidInput(f"pids_max={limits.pids_max} is invalid: give an integer in 1..{MAX_PIDS}")
    lo, hi = IO_WEIGHT_RANGE
    if limits.io_weight is not None and (not isinstance(limits.io_weight, int)
                                         or not lo <= limits.io_weight <= hi):
        raise InvalidInput(f"io_weight={limits.io_weight} is invalid: give an integer "
                           f"in {lo}..{hi}")


def check_network(net: NetworkSpec) -> None:
    if net.mode not in NETWORK_MODES:
        raise InvalidInput(f"network mode {net.mode!r} is invalid: use one of "
                           f"{', '.join(NETWORK_MODES)}")
    if net.ports and net.mode != "bridge":
        raise InvalidInput(f"published ports need network mode 'bridge', not {net.mode!r}")
    seen = set()
    for p in net.ports:
        for what, port in (("host_port", p.host_port), ("container_port", p.container_port)):
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise InvalidInput(f"{what}={port!r} is invalid: give a port in 1..65535")
        if p.protocol not in PROTOCOLS:
            raise InvalidInput(f"port protocol {p.protocol!r} is invalid: use tcp or udp")
        try:
            ip = ipaddress.ip_address(p.host_ip)
        except ValueError:
            raise InvalidInput(f"host_ip {p.host_ip!r} is not an IP address") from None
        if ip.version != 4:
            raise InvalidInput(f"host_ip {p.host_ip}: only IPv4 ports are supported")
        key = (p.host_ip, p.host_port, p.protocol)
        if key in seen:
            raise InvalidInput(f"port {p.host_ip}:{p.host_port}/{p.protocol} is published twice")
        seen.add(key)


def check_spec(spec: ContainerSpec) -> None:
    """Everything about a spec that can be judged without touching the host."""
    check_name(spec.name)
    check_bandwidth(spec.network.mode, spec.bandwidth)
    args = resolve_process(spec)["args"]
    if not args or not all(isinstance(a, str) and "\0" not in a for a in args) or not args[0]:
        raise InvalidInput("command is empty: give the program and its arguments, "
                           "e.g. ['sleep', '60'] (or set the image's Cmd/Entrypoint)")
    if not isinstance(spec.env, dict) or not all(
            isinstance(k, str) and k and "=" not in k and "\0" not in k
            and isinstance(v, str) and "\0" not in v
            for k, v in spec.env.items()):
        raise InvalidInput("env must map non-empty names without '=' or NUL to string values "
                           "without NUL")
    if not spec.workdir.startswith("/"):
        raise InvalidInput(f"workdir {spec.workdir!r} must be an absolute path")
    if not USER_RE.fullmatch(spec.user or ""):
        raise InvalidInput(f"user {spec.user!r} is invalid: use uid[:gid] (e.g. '1000:1000')")
    if spec.hostname is not None and not re.match(r"^[a-zA-Z0-9][a-zA-Z0-9.-]{0,62}$",
                                                  spec.hostname):
        raise InvalidInput(f"hostname {spec.hostname!r} is invalid: use letters, digits, "
                           "'.', '-' (at most 63)")
    check_limits(spec.limits)
    check_network(spec.network)
    check_capabilities(spec.cap_add, spec.cap_drop)
    check_rootfs_quota(spec)
    check_volumes(spec)


def check_capabilities(add, drop) -> None:
    """cap_add/cap_drop name capabilities (CAP_...) or "ALL", each at most once."""
    from containers.security import ALL_CAPABILITIES
    for what, caps in (("cap_add", add), ("cap_drop", drop)):
        if not isinstance(caps, tuple) or len(set(caps)) != len(caps):
            raise InvalidInput(f"{what} must list each capability once")
        bad = [c for c in caps if c != "ALL" and c not in ALL_CAPABILITIES]
        if bad:
            raise InvalidInput(f"{what}: {', '.join(map(repr, bad[:3]))} is not a capability: use names "
                               "like CAP_NET_ADMIN (or ALL)")


def check_bandwidth(mode: str, bw: Bandwidth) -> None:
    """Rates and burst within bounds, and a port to apply them to (network ``bridge``)."""
    if not isinstance(bw, Bandwidth):
        raise InvalidInput("bandwidth must be a Bandwidth")
    bw.check()
    if bw.limited and mode != "bridge":
        raise InvalidInput(f"bandwidth limits apply to a container's bridge port: network "
                           f"{mode!r} has none")


MIN_ROOTFS_BYTES = 64 * 1024 * 1024  # 64 MiB: ext4's metadata and journal leave room for writes
MAX_ROOTFS_BYTES = 64 * 1024**4  # 64 TiB (the API's disk_gib is at most 65536)


def check_rootfs_quota(spec: ContainerSpec) -> None:
    """A size limit needs upper and work side by side (their parent becomes the filesystem)."""
    q = spec.rootfs.quota_bytes
    if q is None:
        return
    if not isinstance(q, int) or not MIN_ROOTFS_BYTES <= q <= MAX_ROOTFS_BYTES:
        raise InvalidInput(f"rootfs size limit {q!r} is invalid: give {MIN_ROOTFS_BYTES} bytes (64 MiB) "
                           f"to {MAX_ROOTFS_BYTES} bytes")
    import os
    up, wk = spec.rootfs.upperdir, spec.rootfs.workdir
    if os.path.dirname(up) != os.path.dirname(wk) or os.path.dirname(up) in ("", "/"):
        raise InvalidInput("a rootfs size limit needs the upper and work dirs in one dir of their own "
                           f"(got {up} and {wk})")


# where a volume may not be mounted: the runtime's own mounts and the root itself
VOLUME_FORBIDDEN = ("/", "/proc", "/sys", "/dev", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf")


def check_volume_path(path: str) -> None:
    """A volume's mount point inside a container: absolute, normalised (no '.', '..', '//'),
    no control characters, not the root nor under /proc, /sys or /dev."""
    if not isinstance(path, str) or not path.startswith("/") or len(path) > 4096 \
            or any(c < " " or c == "\x7f" for c in path):
        raise InvalidInput(f"volume path {str(path)[:80]!r} must be an absolute path without control characters")
    parts = path.split("/")[1:]
    if path != "/" and (any(p in ("", ".", "..") for p in parts)):
        raise InvalidInput(f"volume path {path[:80]!r} must be normalised: no '.', '..', '//' or trailing '/'")
    if path in VOLUME_FORBIDDEN or any(path.startswith(p + "/") for p in ("/proc", "/sys", "/dev")):
        raise InvalidInput(f"volume path {path[:80]!r} is the runtime's: mount volumes elsewhere (e.g. /data)")


def check_volumes(spec: ContainerSpec) -> None:
    seen = set()
    for v in spec.volumes:
        check_volume_path(v.destination)
        if v.destination in seen:
            raise InvalidInput(f"two volumes are mounted at {v.destination!r}")
        seen.add(v.destination)
        if not isinstance(v.source, str) or not v.source.startswith("/"):
            raise InvalidInput(f"volume source {str(v.source)[:80]!r} must be a host file path")


SNAPSHOT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")  # a file name: no '/', '.', leading '-'


def check_snapshot_name(snapshot: str) -> None:
    """InvalidInput unless ``snapshot`` is 1-63 letters, digits, '-', '_' (a file name in the
    container's state dir)."""
    if not isinstance(snapshot, str) or not SNAPSHOT_NAME_RE.fullmatch(snapshot):
        raise InvalidInput(f"bad snapshot name {str(snapshot)[:80]!r}: 1-63 letters, digits, '-', '_', "
                           "starting with a letter or digit")
