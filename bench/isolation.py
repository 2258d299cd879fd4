"""Isolation benchmarks (seccomp, capabilities, bandwidth limits): JSON lines as described
in DESIGN.md section 7, each against its peer measured in the same run.

(a) seccomp_create_start_p50: create+start to running of a busybox container (network
    none) under the default-deny profile (Docker's, converted per container) vs the same
    runtime with no filter (``unconfined``), interleaved;
(b) bandwidth_limited_throughput: kbit/s one container sends another over the bridge with
    an 8 Mbit/s egress limit vs the same pair unlimited (shaping holds it near the limit);
(c) bandwidth_set_live_p50: a live change of a running container's limits (tc on its
    veth and ifb), no peer.
Run as root: .venv/bin/python bench/isolation.py
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from containers import NetworkSpec
from containers.bandwidth import Bandwidth
from containers.security import Security
from jsonline import emitter
from testbed.runtimes import make_runc, make_spec

RUNS = 15
LIMIT_KBIT = 8000
WINDOW = 2
line = emitter("isolation")


def create_start_ms(rt, tmp, name) -> float:
    spec = make_spec(rt, tmp, name, ("sleep", "1000"))
    t0 = time.perf_counter()
    rt.create(spec)
    rt.start(name)
    ms = (time.perf_counter() - t0) * 1000
    rt.delete(name)
    return ms


def transfer_kbit(rt, sender, receiver, port=5001) -> float:
    ip = rt.get(receiver).ip
    got = {}

    def receive():
        got["r"] = rt.exec(receiver, ["sh", "-c", f"sleep {WINDOW + 2} | busybox timeout {WINDOW + 1} "
                                                  f"nc -l -p {port} | wc -c"], timeout=30)
    t = threading.Thread(target=receive)
    t.start()
    rt.exec(sender, ["sh", "-c", f"sleep 0.5; busybox timeout {WINDOW} sh -c 'cat /dev/zero | nc {ip} {port}'; true"],
            timeout=30)
    t.join(30)
    return int(got["r"].stdout.strip() or 0) * 8 / 1000 / WINDOW


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="nodeagent-bench-isolation-"))
    filtered, cleanup1 = make_runc(tmp / "a")
    unconfined, cleanup2 = make_runc(tmp / "b", security=Security(profile=None))
    try:
        ours, peer = [], []
        for i in range(RUNS):  # interleaved, alternating which goes first
            pair = [(ours, filtered, f"sc{i}"), (peer, unconfined, f"un{i}")]
            for out, rt, name in (pair if i % 2 == 0 else pair[::-1]):
                out.append(create_start_ms(rt, tmp, name))
        line("seccomp_create_start_p50", statistics.median(ours), "same runtime, seccomp unconfined",
             statistics.median(peer))
        for name in ("limited", "free"):
            filtered.create(make_spec(filtered, tmp, name, ("sleep", "1000"), network=NetworkSpec(mode="bridge")))
            filtered.start(name)
        filtered.set_bandwidth("limited", Bandwidth(egress_kbit=LIMIT_KBIT))
        held = statistics.median(transfer_kbit(filtered, "limited", "free") for _ in range(3))
        free = statistics.median(transfer_kbit(filtered, "free", "limited") for _ in range(3))
        line("bandwidth_limited_throughput", held, "the same pair, unlimited", free, unit="kbit/s")
        sets = []
        for i in range(RUNS):
            bw = Bandwidth(ingress_kbit=LIMIT_KBIT + i * 64, egress_kbit=LIMIT_KBIT)
            t0 = time.perf_counter()
            filtered.set_bandwidth("limited", bw)
            sets.append((time.perf_counter() - t0) * 1000)
        line("bandwidth_set_live_p50", statistics.median(sets))
    finally:
        cleanup1()
        cleanup2()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
