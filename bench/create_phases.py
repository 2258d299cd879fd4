"""Where one container create+start spends its time, on an empty host and with --n bridged
containers running (issue #20): the runtime layer (RuncRuntime, bridge networking as the
agent's density bench makes them), each phase timed by wrapping the functions that do it,
medians of --runs samples per phase. Inside `runc create` (conmon's child, through the
view wrapper) the phases come from a timestamping wrapper around the runtime path conmon
runs. One JSON line per phase (ours: at --n, peer: on the empty host).

It runs in a mount namespace of its own, as bench/create_density.py. Run as root:
    .venv/bin/python bench/create_phases.py --n 300
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's agent, not the venv's install
from jsonline import emitter  # noqa: E402

line = emitter("create_phases")
SETTLE_S = 0.1
USERNS = True  # as the agent makes them (privileged: false); --privileged: without

_acc: dict[str, float] = collections.defaultdict(float)
_acc_lock = threading.Lock()


def timed(owner, attr: str, label: str | None = None, key=None) -> None:
    """Wrap ``owner.attr`` so its wall time adds to ``_acc[label]`` (``key(args)``: a suffix)."""
    fn = getattr(owner, attr)
    label = label or attr

    def wrapper(*args, **kw):
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            k = label + (key(args) if key else "")
            with _acc_lock:
                _acc[k] += (time.perf_counter() - t) * 1000
    setattr(owner, attr, wrapper)


def timed_cm(owner, attr: str, label: str) -> None:
    """A context manager's entry time (``__enter__``)."""
    fn = getattr(owner, attr)

    @contextlib.contextmanager
    def wrapper(*args, **kw):
        t = time.perf_counter()
        with fn(*args, **kw) as v:
            with _acc_lock:
                _acc[label] += (time.perf_counter() - t) * 1000
            yield v
    setattr(owner, attr, wrapper)


def free_block() -> str:
    used = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    for base in range(8, 96, 8):
        if not any(f" 198.19.{n}." in used for n in range(base, base + 8)):
            return f"198.19.{base}.0/21"
    raise RuntimeError("no free /21")


TRACE_WRAPPER = """#!/bin/sh
# timestamps around the runtime conmon runs (create only: `runc create` through the view wrapper)
t0=$(date +%s%N)
{inner} "$@"
rc=$?
t1=$(date +%s%N)
case " $* " in *" create "*) echo "$t0 $t1" >> {log};; esac
exit $rc
"""


def instrument(rt) -> None:
    instrument_classes(type(rt), type(rt.net), type(rt.db))


def instrument_classes(R, N, D) -> None:
    from pyroute2 import netns as pnetns

    from containers import network as cnet
    from storage import mounts
    for a in ("_prepare", "_mount_rootfs", "_write_config", "_ensure_prepared", "_sync_bundle_limits",
              "_spawn_conmon", "_status", "_info", "_shape", "_row", "_release_init"):
        timed(R, a)
    timed(R, "_runc", "runc_", key=lambda args: args[1])
    timed_cm(R, "_private_view", "view_enter")
    for a in ("attach", "lease", "claim_ports", "_port_changed", "detach"):
        timed(N, a, "net." + a)
    timed(pnetns, "create", "net.netns_create")
    timed(D, "execute", "db.execute")
    timed(D, "one", "db.one")
    timed(mounts, "mount_overlay", "mount_overlay")
    timed(mounts, "mount_overlay_idmapped", "mount_overlay_idmapped")
    timed(cnet, "bind_netns", "net.bind_netns")


def hook_agent(out: str) -> None:
    """In the agent (through sitecustomize, --api): time the runtime's phases; each start
    appends them as one JSON line to ``out`` (creates one at a time only)."""
    import json

    from agent.state import Database
    from containers.network import Network
    from containers.runc import RuncRuntime
    instrument_classes(RuncRuntime, Network, Database)
    create, start = RuncRuntime.create, RuncRuntime.start

    def create_w(self, spec):
        _acc.clear()
        t = time.perf_counter()
        try:
            return create(self, spec)
        finally:
            _acc["rt.create"] = (time.perf_counter() - t) * 1000

    def start_w(self, name):
        t = time.perf_counter()
        try:
            return start(self, name)
        finally:
            _acc["rt.start"] = (time.perf_counter() - t) * 1000
            with open(out, "a") as f:
                f.write(json.dumps(dict(_acc)) + "\n")
    RuncRuntime.create, RuncRuntime.start = create_w, start_w


HOOK = """import os
if os.environ.get("CREATE_PHASES_OUT"):
    import sys
    sys.path.insert(0, {bench!r})
    import create_phases
    create_phases.hook_agent(os.environ["CREATE_PHASES_OUT"])
"""


def create_start(rt, spec) -> tuple[float, float]:
    from containers import NetworkSpec  # noqa: F401
    t = time.perf_counter()
    rt.create(spec)
    tc = time.perf_counter()
    info = rt.start(spec.name)
    te = time.perf_counter()
    assert info.state == "running", info
    return (tc - t) * 1000, (te - tc) * 1000


def sample(rt, work, lower, name, tracelog) -> dict[str, float]:
    from containers import ContainerSpec, NetworkSpec, Rootfs
    base = os.path.join(work, "vol", name)
    up, wk = os.path.join(base, "upper"), os.path.join(base, "work")
    os.makedirs(up)
    os.makedirs(wk)
    spec = ContainerSpec(name=name, rootfs=Rootfs((lower,), up, wk), command=("sleep", "100000"),
                         network=NetworkSpec(mode="bridge"), userns=USERNS)
    time.sleep(SETTLE_S)
    _acc.clear()
    open(tracelog, "w").close()
    c, s = create_start(rt, spec)
    out = dict(_acc)
    out["create"], out["start"], out["total"] = c, s, c + s
    with open(tracelog) as f:
        ts = f.read().split()
    if len(ts) == 2:
        out["conmon_runc_create"] = (int(ts[1]) - int(ts[0])) / 1e6
        out["conmon_outside_runc_create"] = out.get("_spawn_conmon", 0) - out["conmon_runc_create"]
    return out


def main(n: int, runs: int) -> None:
    from agent.state import Database
    from containers.runc import RuncRuntime
    from create_density import spec
    from testbed.runtimes import busybox_lower, drop_cgroup_parent, drop_test_network
    work = tempfile.mkdtemp(prefix="bench-create-phases-")
    os.chmod(work, 0o711)
    lower = busybox_lower()
    bridge = f"nacp{os.getpid() % 100000}"
    db = Database(os.path.join(work, "state.db"))
    cgparent = f"nodeagent-cp-{os.getpid()}"
    rt = RuncRuntime(os.path.join(work, "state"), db, bridge=bridge, subnet=free_block(), nat=False,
                     cgroup_parent=cgparent)
    tracelog = os.path.join(work, "trace.log")
    tw = os.path.join(work, "runc-trace")
    with open(tw, "w") as f:
        f.write(TRACE_WRAPPER.format(inner=rt.view_runc, log=tracelog))
    os.chmod(tw, 0o700)
    rt.view_runc = tw
    instrument(rt)
    names = []
    try:
        empty = []
        for i in range(runs):
            empty.append(sample(rt, work, lower, f"e{i}", tracelog))
            rt.delete(f"e{i}")
        t0 = time.perf_counter()
        for i in range(n):
            rt.create(spec(work, lower, f"c{i}", network="bridge"))
            rt.start(f"c{i}")
            names.append(f"c{i}")
        print(f"{n} made in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        at = []
        for i in range(runs):
            at.append(sample(rt, work, lower, f"a{i}", tracelog))
            rt.delete(f"a{i}")
        keys = sorted({k for d in empty + at for k in d}, key=lambda k: -statistics.median(
            [d.get(k, 0) for d in at]))
        for k in keys:
            line(f"phase_{k}_at_{n}", statistics.median([d.get(k, 0) for d in at]), "on the empty host",
                 statistics.median([d.get(k, 0) for d in empty]))
    finally:
        for name in names:
            try:
                rt.delete(name)
            except Exception as e:  # noqa: BLE001
                print(f"delete {name}: {e}", file=sys.stderr)
        rt.close()
        db.close()
        drop_test_network(bridge, rt.rtag)
        drop_cgroup_parent(cgparent)
        shutil.rmtree(work, ignore_errors=True)


def op_phases(log_path: Path, offset: int) -> list[dict[str, float]]:
    """The phases of each instance.create the agent logged past ``offset`` ("operation finished")."""
    import json
    import re
    with open(log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    out = []
    for ln in text.splitlines():
        if "operation finished" in ln and "kind=instance.create" in ln:
            m = re.search(r'phases_ms=("(?:[^"\\]|\\.)*"|\S+)', ln)
            raw = m.group(1)
            out.append(json.loads(json.loads(raw) if raw.startswith('"') else raw))
    return out


def api_main(n: int, runs: int) -> None:
    """Through the API (an agent of bench/scale.py's making, the runtime's phases hooked):
    quiet creates on the empty host and with --n bridged containers running."""
    import scale
    b = scale.Bench(argparse.Namespace(n=n, running_vms=0, storm=0, vms=0, vm_network="none", phases=True))
    scale.QUIET = runs
    try:
        b.start()
        b.import_busybox()
        b.create("warm")
        b.delete("warm")
        b.quiet = b.quiet_creates("e")
        t0 = time.perf_counter()
        scale.storm(lambda i: b.create(f"d{i}"), n)
        print(f"{n} made in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        b.quiet_creates("q")
        b.phase_lines("q", n)
    finally:
        b.cleanup()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="containers running while create is measured")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--api", action="store_true", help="through the API (an agent on runc) instead")
    ap.add_argument("--privileged", action="store_true", help="runtime layer: no user namespace")
    a = ap.parse_args()
    USERNS = not a.privileged
    if a.api:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        api_main(a.n, a.runs)
        sys.exit(0)
    if os.environ.get("_CREATE_DENSITY_NS") != "1":
        env = dict(os.environ, _CREATE_DENSITY_NS="1")
        sys.exit(subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, *sys.argv],
                                env=env).returncode)
    main(a.n, a.runs)
