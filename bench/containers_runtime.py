"""Container benchmarks: JSON lines as described in DESIGN.md section 7.

(a) create+start to running of a busybox container with bridge networking (p50, p95 over
    RUNS), against raw `runc run -d` of a prepared bundle without networking;
(b) N_MANY containers running: the agent's (this process's) RSS growth and the host's
    per-container overhead (conmon RSS, container cgroup memory);
(c) userns_create: create+start of a user-namespaced container (the default: id-mapped
    layers) against a privileged one (no user namespace), interleaved in the same run;
    userns_first_use: the one-time cost per agent process and map (the user namespace the
    id-mapped mounts take); there is no per-layer cost (no shifted copy);
(d) rootfs_limit_create: create+start with a rootfs size limit (a sparse ext4 made and
    loop-mounted per container) against one without, interleaved.
`--isolation-only` runs (c) and (d) alone.
Run as root: .venv/bin/python bench/containers_runtime.py (a script named containers.py would
shadow the containers package: its directory is first on sys.path)
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

from agent.state import Database
from containers import ContainerSpec, NetworkSpec, Rootfs
from containers.runc import RuncRuntime
from jsonline import emitter
from testbed.runtimes import build_busybox_rootfs
from storage.units import MiB

RUNS = 50
N_MANY = 100
BRIDGE, SUBNET = "nabench0", "198.19.250.0/24"  # test-only range, never routed off-host


line = emitter("containers")


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def rss_kib(pid="self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1])
    return 0


def spec(work, lower, name, quota_bytes=None, **kw):
    base = os.path.join(work, "vol", name)
    up, wk = os.path.join(base, "upper"), os.path.join(base, "work")
    os.makedirs(up)
    os.makedirs(wk)
    return ContainerSpec(name=name, rootfs=Rootfs((lower,), up, wk, quota_bytes), command=("sleep", "1000"),
                         network=NetworkSpec(), **kw)


def bench_rootfs_limit(rt, work, lower, runs):
    """create+start medians with a 10 GiB rootfs limit vs none, interleaved (both user-namespaced)."""
    times = {True: [], False: []}
    for i in range(runs):
        for limited in (True, False):
            s = spec(work, lower, f"q{int(limited)}-{i}", quota_bytes=10 * 1024**3 if limited else None,
                     userns=True)
            t = time.perf_counter()
            rt.create(s)
            info = rt.start(s.name)
            times[limited].append((time.perf_counter() - t) * 1000)
            assert info.state == "running", info
            rt.delete(s.name)
    line("rootfs_limit_create", statistics.median(times[True]), "create without a size limit",
         statistics.median(times[False]))


def bench_userns(rt, work, lower, runs):
    """create+start medians of user-namespaced vs privileged containers, interleaved."""
    from storage import mounts
    t = time.perf_counter()
    os.close(mounts.open_userns(rt.idmap.host_id, rt.idmap.size))
    first = (time.perf_counter() - t) * 1000
    times = {True: [], False: []}
    for i in range(runs):
        for userns in (True, False):
            s = spec(work, lower, f"u{int(userns)}-{i}", userns=userns)
            t = time.perf_counter()
            rt.create(s)
            info = rt.start(s.name)
            times[userns].append((time.perf_counter() - t) * 1000)
            assert info.state == "running", info
            rt.delete(s.name)
    line("userns_create", statistics.median(times[True]), "create without a user namespace",
         statistics.median(times[False]))
    line("userns_first_use", first)


def bench_runc_raw(work, lower, runs):
    root = os.path.join(work, "rawroot")
    b = os.path.join(work, "rawbundle")
    os.makedirs(b)
    shutil.copytree(lower, os.path.join(b, "rootfs"), symlinks=True)
    subprocess.run(["runc", "spec"], cwd=b, check=True)
    with open(os.path.join(b, "config.json")) as f:
        cfg = json.load(f)
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = ["sleep", "1000"]
    with open(os.path.join(b, "config.json"), "w") as f:
        json.dump(cfg, f)
    times = []
    for i in range(runs):
        cid = f"raw{i}"
        t = time.perf_counter()
        subprocess.run(["runc", "--root", root, "run", "-d", "--bundle", b, cid], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append((time.perf_counter() - t) * 1000)
        subprocess.run(["runc", "--root", root, "delete", "--force", cid], check=True)
    return times


def main():
    import sys
    work = tempfile.mkdtemp(prefix="nodeagent-bench-")
    os.chmod(work, 0o711)  # user-namespaced containers' roots traverse it to their rootfs
    lower = build_busybox_rootfs(os.path.join(work, "lower"))
    db = Database(os.path.join(work, "state.db"))
    rt = RuncRuntime(os.path.join(work, "state"), db, bridge=BRIDGE, subnet=SUBNET,
                     cgroup_parent="nodeagent-bench")
    try:
        # warm-up: imports, bridge and chains exist
        rt.create(spec(work, lower, "warm"))
        rt.start("warm")
        rt.delete("warm")
        bench_userns(rt, work, lower, RUNS)
        bench_rootfs_limit(rt, work, lower, RUNS // 2)
        if "--isolation-only" in sys.argv:
            return
        ours = []
        for i in range(RUNS):
            s = spec(work, lower, f"b{i}")
            t = time.perf_counter()
            rt.create(s)
            info = rt.start(s.name)
            ours.append((time.perf_counter() - t) * 1000)
            assert info.state == "running", info
            rt.delete(s.name)
        raw = bench_runc_raw(work, lower, RUNS)
        line("create_start_p50", statistics.median(ours), "runc run -d",
             statistics.median(raw))
        line("create_start_p95", pct(ours, 95), "runc run -d", pct(raw, 95))

        before = rss_kib()
        for i in range(N_MANY):
            s = spec(work, lower, f"m{i}")
            rt.create(s)
            rt.start(s.name)
        running = [c for c in rt.list() if c.state == "running"]
        after = rss_kib()
        conmons = []
        for c in running:
            try:
                with open(os.path.join(rt._dir(c.name), "conmon.pid")) as f:
                    conmons.append(rss_kib(int(f.read().strip())))
            except (OSError, ValueError):
                pass
        mem = [rt.stats(c.name)["memory_bytes"] for c in running]
        line(f"agent_rss_growth_{N_MANY}_running", (after - before) / 1024, unit="MB")
        line("conmon_rss_per_container", statistics.median(conmons) / 1024, unit="MB")
        line("container_cgroup_memory_per_container", statistics.median(mem) / MiB, unit="MB")
        line("running_containers", len(running), unit="count")
    finally:
        for c in rt.list():
            rt.delete(c.name)
        rt.reconcile()
        rt.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
