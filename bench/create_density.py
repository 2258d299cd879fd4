"""Create cost vs the containers already mounted on the host (issue #20), at the runtime layer:
create+start p50 of a busybox `sleep` (network none) on an empty host, then with --n
containers running, each start in a private mount view (RuncRuntime.private_views, the
default) vs in the agent's own mount namespace (views off), interleaved in the same run.
Also `runc run -d` by hand with the --n containers' mounts on the host (what runc pays per
mount, without the agent).

It runs in a mount namespace of its own (it re-executes itself under `unshare -m
--propagation private`): the host's mount table never holds its containers' mounts, and
everything goes when it ends. Run as root:
    .venv/bin/python bench/create_density.py --n 300
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's agent, not the venv's install
from jsonline import emitter  # noqa: E402

line = emitter("create_density")
RUNS = 9


def spec(work, lower, name, network="none"):
    from containers import ContainerSpec, NetworkSpec, Rootfs
    base = os.path.join(work, "vol", name)
    up, wk = os.path.join(base, "upper"), os.path.join(base, "work")
    os.makedirs(up)
    os.makedirs(wk)
    return ContainerSpec(name=name, rootfs=Rootfs((lower,), up, wk), command=("sleep", "100000"),
                         network=NetworkSpec(mode=network))


def create_start(rt, work, lower, name) -> float:
    s = spec(work, lower, name)
    t = time.perf_counter()
    rt.create(s)
    info = rt.start(name)
    ms = (time.perf_counter() - t) * 1000
    assert info.state == "running", info
    return ms


def runc_run(work, lower, runs) -> list[float]:
    """`runc run -d` of an overlay rootfs by hand (runc's own cost in this mount table)."""
    from storage import mounts
    work = tempfile.mkdtemp(dir=work)
    b, root = os.path.join(work, "rawbundle"), os.path.join(work, "rawroot")
    os.makedirs(os.path.join(b, "rootfs"))
    for d in ("up", "wk"):
        os.makedirs(os.path.join(work, "raw" + d))
    mounts.mount_overlay([lower], os.path.join(work, "rawup"), os.path.join(work, "rawwk"), os.path.join(b, "rootfs"))
    subprocess.run(["runc", "spec"], cwd=b, check=True)
    with open(os.path.join(b, "config.json")) as f:
        cfg = json.load(f)
    cfg["process"].update(terminal=False, args=["sleep", "1000"])
    with open(os.path.join(b, "config.json"), "w") as f:
        json.dump(cfg, f)
    times = []
    for i in range(runs):
        t = time.perf_counter()
        subprocess.run(["runc", "--root", root, "run", "-d", "--bundle", b, f"raw{i}"], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append((time.perf_counter() - t) * 1000)
        subprocess.run(["runc", "--root", root, "delete", "--force", f"raw{i}"], check=True)
    mounts.unmount(os.path.join(b, "rootfs"))
    return times


def main(n: int) -> None:
    from agent.state import Database
    from containers.runc import RuncRuntime
    from testbed.runtimes import busybox_lower, drop_test_network, test_network
    work = tempfile.mkdtemp(prefix="bench-create-density-")
    os.chmod(work, 0o711)
    lower = busybox_lower()
    bridge, subnet = test_network("nacd")
    db = Database(os.path.join(work, "state.db"))
    rt = RuncRuntime(os.path.join(work, "state"), db, bridge=bridge, subnet=subnet,
                     cgroup_parent=f"nodeagent-cd-{os.getpid()}")
    names = []
    try:
        empty_raw = runc_run(work, lower, RUNS)
        empty = []
        for i in range(RUNS):
            empty.append(create_start(rt, work, lower, f"e{i}"))
            rt.delete(f"e{i}")
        for i in range(n):
            create_start(rt, work, lower, f"c{i}")
            names.append(f"c{i}")
        times = {True: [], False: []}
        wrapper = rt.view_runc
        for i in range(RUNS):
            for views in (True, False):
                # views off: conmon runs runc itself (its `runc create` in the agent's namespace)
                rt.private_views, rt.view_runc = views, wrapper if views else rt.runc
                name = f"v{int(views)}-{i}"
                times[views].append(create_start(rt, work, lower, name))
                rt.delete(name)
        rt.private_views, rt.view_runc = True, wrapper
        with open("/proc/self/mountinfo") as f:
            table = f.read()
        line(f"mounts_at_{n}", table.count("\n"), unit="mounts")
        line(f"mountinfo_kib_at_{n}", len(table) / 1024, unit="KiB")
        line(f"create_start_p50_at_{n}", statistics.median(times[True]), "on the empty host",
             statistics.median(empty))
        line(f"create_start_p50_at_{n}_views_off", statistics.median(times[False]), "on the empty host",
             statistics.median(empty))
        line(f"create_start_p50_at_{n}_views_on_vs_off", statistics.median(times[True]),
             "views off (the agent's namespace)", statistics.median(times[False]))
        line(f"runc_run_p50_at_{n}", statistics.median(runc_run(work, lower, RUNS)), "on the empty host",
             statistics.median(empty_raw))
    finally:
        for name in names:
            rt.delete(name)
        rt.close()
        db.close()
        drop_test_network(bridge, rt.rtag)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="containers running while create is measured")
    a = ap.parse_args()
    if os.environ.get("_CREATE_DENSITY_NS") != "1":
        env = dict(os.environ, _CREATE_DENSITY_NS="1")
        sys.exit(subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, *sys.argv],
                                env=env).returncode)
    main(a.n)
