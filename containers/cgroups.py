"""Container cgroups on v1 (per-controller hierarchies) and v2 (unified): limits as OCI
resources for runc, live reads of usage, and removal of leftovers. A container's cgroups are
``<parent>/<name>`` under runc's cgroupfs driver and ``<parent>.slice/<parent>-<name>.scope``
under its systemd driver; the functions below take that pair (parent dir, leaf).

runc creates a container's cgroups from ``linux.resources`` at create time; this module
computes those resources, changes a live container's limits as ``runc update`` would
(set_limits, the privileged writes), reads stats straight from the cgroup files, and removes
the dirs runc leaves after a crash. Knobs the kernel lacks are
skipped (``unsupported()`` says which), never half-applied.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Mapping

from containers.runtime import Limits
from storage.units import MiB

CGROUP_ROOT = "/sys/fs/cgroup"
CFS_PERIOD_US = 100_000  # 100 ms, the kernel's default CFS period
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "freezer")


def is_v2(root: str = CGROUP_ROOT) -> bool:
    """True when ``root`` is the cgroup2 unified hierarchy (not hybrid v1)."""
    return os.path.exists(os.path.join(root, "cgroup.controllers"))


def cgroups_path(parent: str, name: str) -> str:
    """runc's cgroupsPath (cgroupfs driver) for a container."""
    return f"/{parent}/{name}"


# runc's systemd cgroup driver (``runc --systemd-cgroup``, hosts where systemd is PID 1):
# systemd makes each container a transient scope ``<parent>-<name>.scope`` in the slice
# ``<parent>.slice``; on disk that is <controller>/<expanded slice>/<scope>, as below.
def systemd_cgroups_path(parent: str, name: str) -> str:
    """runc's cgroupsPath for the systemd driver: ``slice:prefix:name``."""
    return f"{parent}.slice:{parent}:{name}"


def slice_dir(parent: str) -> str:
    """The slice's cgroup dir relative to a hierarchy's root: systemd nests a slice named
    with dashes in its prefixes ("a-b.slice" is a.slice/a-b.slice)."""
    parts = parent.split("-")
    return "/".join("-".join(parts[:i + 1]) + ".slice" for i in range(len(parts)))


def scope_unit(parent: str, name: str) -> str:
    """The container's scope unit (and its cgroup dir's name) under the systemd driver."""
    return f"{parent}-{name}.scope"


def scope_names(parent: str, root: str = CGROUP_ROOT) -> set[str]:
    """Names of containers with a scope under the systemd driver (any controller)."""
    head, tail = f"{parent}-", ".scope"
    return {d[len(head):-len(tail)] for d in list_names(slice_dir(parent), root)
            if d.startswith(head) and d.endswith(tail) and len(d) > len(head) + len(tail)}


def has_memsw(root: str = CGROUP_ROOT) -> bool:
    """Whether swap can be limited (v1: memory.memsw.* exists, needs swapaccount=1)."""
    if is_v2(root):
        return True  # memory.swap.max exists wherever swap exists; runc handles no-swap
    return os.path.exists(os.path.join(root, "memory", "memory.memsw.limit_in_bytes"))


def has_io_weight(root: str = CGROUP_ROOT) -> bool:
    """Whether a proportional io weight exists (v1 blkio.weight or blkio.bfq.weight; v2
    io.weight or io.bfq.weight under a parent with the io controller)."""
    if is_v2(root):
        try:
            with open(os.path.join(root, "cgroup.controllers")) as f:
                if "io" not in f.read().split():
                    return False
        except OSError:
            return False
        # the weight files appear in children only, and only with iocost or bfq: look at
        # children that have the io controller (io.stat) and see whether they have one
        try:
            kids = [e.path for e in os.scandir(root) if e.is_dir()][:50]
        except OSError:
            kids = []
        with_io = [k for k in kids if os.path.exists(os.path.join(k, "io.stat"))]
        if not with_io:
            return True  # nothing to judge by: let runc try
        return any(os.path.exists(os.path.join(k, f)) for k in with_io
                   for f in ("io.weight", "io.bfq.weight"))
    blkio = os.path.join(root, "blkio")
    return any(os.path.exists(os.path.join(blkio, f)) for f in ("blkio.weight",
                                                                  "blkio.bfq.weight"))


def unsupported(limits: Limits, root: str = CGROUP_ROOT) -> list[str]:
    """Names of requested limits this kernel cannot enforce (they are skipped)."""
    out = []
    if limits.io_weight is not None and not has_io_weight(root):
        out.append("io_weight")
    return out


def oci_resources(limits: Limits, root: str = CGROUP_ROOT) -> dict:
    """The OCI ``linux.resources`` for ``limits`` (swap off: memory+swap = memory)."""
    res: dict = {"devices": [{"allow": False, "access": "rwm"}] + _default_devices()}
    if limits.cpus is not None:
        res["cpu"] = {"quota": int(limits.cpus * CFS_PERIOD_US), "period": CFS_PERIOD_US}
    if limits.memory_mib is not None:
        mem = limits.memory_mib * MiB
        res["memory"] = {"limit": mem}
        if has_memsw(root):
            res["memory"]["swap"] = mem  # OCI swap = memory + swap, on v1 and v2 alike
    if limits.pids_max is not None:
        res["pids"] = {"limit": limits.pids_max}
    if limits.io_weight is not None and has_io_weight(root):
        res["blockIO"] = {"weight": limits.io_weight}
    return res


def update_resources(limits: Limits, root: str = CGROUP_ROOT) -> dict:
    """The JSON ``runc update --resources -`` takes (no device rules)."""
    res = oci_resources(limits, root)
    res.pop("devices")
    if limits.cpus is None:
        res["cpu"] = {"quota": -1, "period": CFS_PERIOD_US}
    if limits.memory_mib is None:
        res["memory"] = {"limit": -1, **({"swap": -1} if has_memsw(root) else {})}
    if limits.pids_max is None:
        res["pids"] = {"limit": -1}
    return res


class MemoryBusy(OSError):
    """Raised by set_limits when the kernel refuses a memory limit below what the cgroup holds
    (EBUSY on v1, after it tried to reclaim); nothing was changed. ``usage``: bytes held."""

    def __init__(self, limit: int, usage: int):
        super().__init__(errno.EBUSY, f"unable to set memory limit to {limit} (current usage: {usage})")
        self.limit, self.usage = limit, usage


def set_limits(paths: Mapping[str, str], resources: Mapping, root: str = CGROUP_ROOT) -> None:
    """Privileged: write ``resources`` (update_resources' memory, cpu and pids; not blockIO) into
    a live container's cgroups, as `runc update` does with its cgroupfs driver, without spawning
    runc. ``paths``: runc's ``cgroup_paths`` of the container (controller -> dir; "" is the
    unified dir), each under ``root``.

    The order is runc's: v1 memory before cpu before pids; the memory+swap limit before the
    memory limit when growing, after it when shrinking (the kernel keeps memory <= memsw); a
    CFS period the kernel refuses before the quota is written again after it. Files already
    holding the value are not written. All or nothing: on a failure, what was written is put
    back (in reverse) and the error raised: MemoryBusy for a limit below the memory held,
    FileNotFoundError once the cgroup is gone (the container stopped), any other OSError.
    v2 (memory.max, memory.swap.max, cpu.max, pids.max) writes what runc's fs2 driver writes;
    there the kernel would reclaim and then OOM-kill instead of refusing, so a memory limit
    below what it cannot reclaim (memory.current less its page cache; tmpfs and anonymous
    pages stay, swap is off) is refused first, as MemoryBusy (runc 1.2's checkBeforeUpdate,
    counting the cache as reclaimable)."""
    writes = _v2_writes(paths, resources, root) if "" in paths and is_v2(root) else \
        _v1_writes(paths, resources, root)
    done: list[tuple[str, str]] = []
    try:
        deferred = None  # a CFS period refused before its quota is written (runc's retry)
        for path, old, new in writes:
            try:
                _write(path, new)
            except OSError as e:
                if e.errno == errno.EINVAL and path.endswith("cpu.cfs_period_us") and deferred is None:
                    deferred = (path, old, new)
                    continue
                if e.errno == errno.EBUSY and os.path.basename(path).startswith("memory."):
                    usage = path.replace("limit_in_bytes", "usage_in_bytes")
                    raise MemoryBusy(int(new), _int(usage)) from None
                raise
            done.append((path, old))
        if deferred is not None:
            _write(deferred[0], deferred[2])
            done.append((deferred[0], deferred[1]))
    except BaseException:
        for path, old in reversed(done):
            try:
                _write(path, old)
            except OSError:
                pass  # the first failure is what the caller reports
        raise


def _under(paths: Mapping[str, str], key: str, root: str) -> str:
    """runc's dir of controller ``key``, refused unless it lies under ``root``."""
    d = paths[key]
    if not d.startswith(root.rstrip("/") + "/") or "/../" in d + "/":
        raise ValueError(f"cgroup dir {d!r} is not under {root}")
    return d


def _changes(files: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(path, value now, new value) of the files whose value differs; FileNotFoundError for a
    cgroup that is gone."""
    out = []
    for path, new in files:
        old = (_read(path) or "").strip()
        if not old and not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, "cgroup file is gone", path)
        if old != new and not (new == "-1" and old.isdigit() and int(old) >= UNLIMITED_V1):
            out.append((path, old, new))
    return out


UNLIMITED_V1 = 1 << 62  # v1 memory files read an unlimited limit back as ~2^63 (page-aligned)


def _v1_writes(paths: Mapping[str, str], res: Mapping, root: str) -> list[tuple[str, str, str]]:
    files: list[tuple[str, str]] = []
    mem = res.get("memory")
    if mem and mem.get("limit"):
        d = _under(paths, "memory", root)
        limit = os.path.join(d, "memory.limit_in_bytes")
        memsw = os.path.join(d, "memory.memsw.limit_in_bytes")
        swap = mem.get("swap")
        if swap and os.path.exists(memsw):
            grow = swap == -1 or _int(limit) < swap  # runc's setMemoryAndSwap
            pair = [(memsw, str(swap)), (limit, str(mem["limit"]))]
            files += pair if grow else pair[::-1]
        else:
            files.append((limit, str(mem["limit"])))
    cpu = res.get("cpu")
    if cpu and (cpu.get("quota") or cpu.get("period")):
        d = _under(paths, "cpu", root)
        if cpu.get("period"):
            files.append((os.path.join(d, "cpu.cfs_period_us"), str(cpu["period"])))
        if cpu.get("quota"):
            files.append((os.path.join(d, "cpu.cfs_quota_us"), str(cpu["quota"])))
    pids = res.get("pids")
    if pids and pids.get("limit"):
        files.append((os.path.join(_under(paths, "pids", root), "pids.max"),
                      "max" if pids["limit"] < 0 else str(pids["limit"])))
    return _changes(files)


def _v2_writes(paths: Mapping[str, str], res: Mapping, root: str) -> list[tuple[str, str, str]]:
    d = _under(paths, "", root)
    files: list[tuple[str, str]] = []

    def num(v: int) -> str:
        return "max" if v < 0 else str(v)
    mem = res.get("memory")
    if mem and mem.get("limit"):
        swap = mem.get("swap")
        if swap and os.path.exists(os.path.join(d, "memory.swap.max")):
            # OCI's swap is memory+swap; v2's memory.swap.max is the swap alone (runc's conversion)
            v2 = "max" if swap < 0 else "0" if swap == mem["limit"] else str(swap - mem["limit"])
            files.append((os.path.join(d, "memory.swap.max"), v2))
        files.append((os.path.join(d, "memory.max"), num(mem["limit"])))
        held = _unreclaimable_v2(d)
        if 0 < mem["limit"] < held:
            raise MemoryBusy(mem["limit"], held)
    cpu = res.get("cpu")
    if cpu and (cpu.get("quota") or cpu.get("period")):
        value = num(cpu.get("quota") or -1) + (f" {cpu['period']}" if cpu.get("period") else "")
        files.append((os.path.join(d, "cpu.max"), value))
    pids = res.get("pids")
    if pids and pids.get("limit"):
        files.append((os.path.join(d, "pids.max"), num(pids["limit"])))
    return _changes(files)


def _unreclaimable_v2(d: str) -> int:
    """Bytes of a v2 cgroup's memory the kernel cannot reclaim without swap: memory.current
    less its page cache (memory.stat ``file``), tmpfs/shm (``shmem``, part of it) kept."""
    st = _kv(_read(os.path.join(d, "memory.stat")))
    return max(0, _int(os.path.join(d, "memory.current")) - st.get("file", 0) + st.get("shmem", 0))


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)  # as runc opens them
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _default_devices() -> list[dict]:
    """The device nodes every container may use (runc's and Docker's default allow list)."""
    nodes = [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2), (136, None)]
    return [{"allow": True, "type": "c", "major": ma, **({"minor": mi} if mi is not None
                                                          else {}), "access": "rwm"}
            for ma, mi in nodes]


READ_CHUNK = 65536  # bytes per read(2) of a cgroup file; most fit in one


def _read(path: str) -> str | None:
    """A cgroup (or proc) file's text, None if it cannot be read. Raw os.open/os.read: a
    /metrics scrape reads five per container, and a buffered text file costs twice as much."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, READ_CHUNK):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def _int(path: str) -> int:
    text = _read(path)
    try:
        return int(text.split()[0]) if text else 0
    except ValueError:
        return 0


def read_stats(parent: str, name: str, root: str = CGROUP_ROOT) -> dict:
    """{cpu_ns, memory_bytes, pids, oom_kills, io: {read_bytes, write_bytes}} from the
    container's cgroups (zeros when the cgroup is gone)."""
    rel = os.path.join(parent, name)
    if is_v2(root):
        d = os.path.join(root, rel)
        cpu_us = _kv(_read(os.path.join(d, "cpu.stat"))).get("usage_usec", 0)
        rd = wr = 0
        for line in (_read(os.path.join(d, "io.stat")) or "").splitlines():
            kv = dict(p.split("=", 1) for p in line.split()[1:] if "=" in p)
            rd += int(kv.get("rbytes", 0))
            wr += int(kv.get("wbytes", 0))
        return {"cpu_ns": cpu_us * 1000, "memory_bytes": _int(os.path.join(d, "memory.current")),
                "pids": _int(os.path.join(d, "pids.current")),
                "oom_kills": _kv(_read(os.path.join(d, "memory.events"))).get("oom_kill", 0),
                "io": {"read_bytes": rd, "write_bytes": wr}}
    rd = wr = 0
    blk = os.path.join(root, "blkio", rel, "blkio.throttle.io_service_bytes_recursive")
    for line in (_read(blk) or "").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "Read":
            rd += int(parts[2])
        elif len(parts) == 3 and parts[1] == "Write":
            wr += int(parts[2])
    mem = os.path.join(root, "memory", rel)
    return {"cpu_ns": _int(os.path.join(root, "cpuacct", rel, "cpuacct.usage")),
            "memory_bytes": _int(os.path.join(mem, "memory.usage_in_bytes")),
            "pids": _int(os.path.join(root, "pids", rel, "pids.current")),
            "oom_kills": _kv(_read(os.path.join(mem, "memory.oom_control"))).get("oom_kill", 0),
            "io": {"read_bytes": rd, "write_bytes": wr}}


def _kv(text: str | None) -> dict:
    out = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def cgroup_dirs(parent: str, name: str, root: str = CGROUP_ROOT) -> list[str]:
    """Every existing cgroup dir of the container (for leak checks and removal)."""
    rel = os.path.join(parent, name)
    if is_v2(root):
        cands = [os.path.join(root, rel)]
    else:
        cands = [os.path.join(root, c, rel) for c in V1_CONTROLLERS]
        cands.append(os.path.join(root, "unified", rel))
        cands.append(os.path.join(root, "systemd", rel))
    return [c for c in cands if os.path.isdir(c)]


def remove(parent: str, name: str, root: str = CGROUP_ROOT) -> bool:
    """Remove the container's (empty) cgroup dirs, children first; True if any existed."""
    found = False
    for d in cgroup_dirs(parent, name, root):
        found = True
        for sub, dirs, _ in sorted(os.walk(d, topdown=False), key=lambda t: -len(t[0])):
            try:
                os.rmdir(sub)
            except FileNotFoundError:
                pass
    return found


def list_names(parent: str, root: str = CGROUP_ROOT) -> set[str]:
    """Names of containers with a cgroup dir under ``parent`` (any controller)."""
    bases = [os.path.join(root, parent)] if is_v2(root) else \
        [os.path.join(root, c, parent) for c in V1_CONTROLLERS]
    names: set[str] = set()
    for b in bases:
        try:
            names.update(e.name for e in os.scandir(b) if e.is_dir())
        except OSError:
            pass
    return names


def remove_parent(parent: str, root: str = CGROUP_ROOT) -> None:
    """Remove the (empty) parent cgroup dirs of our containers; busy ones stay."""
    bases = [os.path.join(root, parent)] if is_v2(root) else \
        [os.path.join(root, c, parent) for c in (*V1_CONTROLLERS, "unified", "systemd")]
    for b in bases:
        try:
            os.rmdir(b)
        except OSError:
            pass
