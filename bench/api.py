"""API benchmarks: JSON lines as described in DESIGN.md section 7.

(a) GET /v1/instances with 500 instances (fake driver/runtime kinds): p50/p99 latency and
    requests/s, measured by a separate load process (4 keep-alive connections); the peer
    is GET /v1/health on the same server (a trivial JSON endpoint: the server's floor).
(b) container create+start through the API (POST /v1/instances, until the operation
    succeeds) vs through the runtime layer directly (RuncRuntime.create + start), both
    with real runc when runc and conmon are installed (else the fake runtime; the line says which).
    Each create, on both sides, starts after SETTLE_S of quiet: moving a process into a cgroup
    v1 hierarchy waits for an RCU grace period (~10 ms here) unless another move happened within
    the last grace period, so in back-to-back pairs the side that follows the previous create
    sooner skipped that wait more often (perf sched: 24 of 40 runtime-layer creates paid it
    against 33 of 41 API creates). With the pause every create pays it, as a lone create does.

Run: .venv/bin/python bench/api.py
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jsonline import emitter
from testbed.agentproc import AgentProcess, Api

INSTANCES = 500
LOAD_SECONDS = 8
CONNECTIONS = 4
CREATES = 40
SETTLE_S = 0.1

LOAD = r'''
import http.client, json, sys, threading, time
host, port, path, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
seconds, conns = float(sys.argv[5]), int(sys.argv[6])
lat = []
def run():
    c = http.client.HTTPConnection(host, port)
    h = {"Authorization": "Bearer " + token}
    mine = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        c.request("GET", path, headers=h)
        r = c.getresponse(); r.read()
        assert r.status == 200, r.status
        mine.append(time.perf_counter() - t0)
    lat.extend(mine)
t0 = time.perf_counter()
ts = [threading.Thread(target=run) for _ in range(conns)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps({"n": len(lat), "elapsed": time.perf_counter() - t0, "lat": sorted(lat)}))
'''


line = emitter("api")


def load(agent, token, path):
    out = subprocess.run([sys.executable, "-c", LOAD, "127.0.0.1", str(agent.port), path, token,
                          str(LOAD_SECONDS), str(CONNECTIONS)], capture_output=True, text=True, check=True)
    d = json.loads(out.stdout)
    lat = d["lat"]
    return {"p50": lat[len(lat) // 2] * 1000, "p99": lat[int(len(lat) * 0.99)] * 1000, "rps": d["n"] / d["elapsed"]}


def import_busybox(api, tmp):
    from testbed.ocibuild import busybox_layers, write_layout
    layout = write_layout(str(Path(tmp) / "layout"), {"latest": busybox_layers()})
    op = api.wait(api.post("/v1/images", json={"name": "busybox", "format": "oci",
                                               "source": {"type": "file", "path": layout}}).json())
    assert op["status"] == "succeeded", op


def bench_list(tmp):
    agent = AgentProcess(Path(tmp) / "list", pool_kind="fake")
    token = agent.token("bench", "admin")
    agent.start()
    try:
        api = Api(agent.url, token)
        import_busybox(api, tmp)
        ops = [api.post("/v1/instances", json={"name": f"b{i}", "kind": "container", "image": "busybox",
                                               "memory_mib": 32, "network": "none"}).json()
               for i in range(INSTANCES)]  # network none: a /24 has fewer leases than 500
        for op in ops:
            done = api.wait(op, timeout=300)
            assert done["status"] == "succeeded", done
        assert len(api.get("/v1/instances").json()["instances"]) == INSTANCES
        ours = load(agent, token, "/v1/instances")
        floor = load(agent, token, "/v1/health")
    finally:
        agent.stop()
    peer = "GET /v1/health, same server"
    line("list_500_instances_p50", ours["p50"], peer, floor["p50"])
    line("list_500_instances_p99", ours["p99"], peer, floor["p99"])
    line("list_500_instances_rps", ours["rps"], peer, floor["rps"], unit="req/s")


def bench_create(tmp):
    """API and runtime-layer creates are interleaved, so machine noise hits both sides alike."""
    from containers.runtime import ContainerSpec, Limits, NetworkSpec, Rootfs
    from storage.unpack import layer_dir
    from testbed.runtimes import drop_test_network, make_runtime

    real = bool(shutil.which("runc") and shutil.which("conmon")) and os.geteuid() == 0
    kind = "runc" if real else "fake"
    bridge, subnet = f"nabench{secrets.token_hex(2)}", "198.19.250.0/24"
    agent = AgentProcess(Path(tmp) / "create", pool_kind="local", runtime=kind,
                         network=(bridge, subnet) if real else None)
    token = agent.token("bench", "admin")
    agent.start()
    rt, cleanup = make_runtime(kind, Path(tmp) / "rt")
    api_ms, rt_ms, op_ms = [], [], []
    try:
        api = Api(agent.url, token)
        import_busybox(api, tmp)
        # both sides run the same container: the spec the API makes for this body
        body = {"kind": "container", "image": "busybox", "network": "none", "memory_mib": 64, "cpus": 1,
                "command": ["/bin/busybox", "sleep", "600"]}

        def via_api(i):
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            op = api.wait(api.post("/v1/instances", json={**body, "name": f"c{i}"}).json())
            api_ms.append((time.perf_counter() - t0) * 1000)
            assert op["status"] == "succeeded", op
            op_ms.append((op["finished_at"] - op["started_at"]) * 1000)

        def via_runtime(i):
            base = Path(tmp) / "rt-rootfs" / f"r{i}"
            (base / "upper").mkdir(parents=True)
            (base / "work").mkdir(parents=True)
            spec = ContainerSpec(name=f"r{i}", rootfs=Rootfs(lowerdirs, str(base / "upper"),
                                                             str(base / "work")),
                                 command=("/bin/busybox", "sleep", "600"), env={"PATH": "/bin"},
                                 hostname=f"r{i}", limits=Limits(cpus=1, memory_mib=64),
                                 network=NetworkSpec(mode="none"), userns=True)  # as the API's
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            rt.create(spec)
            rt.start(spec.name)
            rt_ms.append((time.perf_counter() - t0) * 1000)

        via_api(CREATES)  # warm-up: the agent unpacks the layers on first use
        del api_ms[:], op_ms[:]
        layers = api.get("/v1/images/busybox").json()["layers"]  # the same rootfs layers, as unpacked
        lowerdirs = tuple(layer_dir(str(agent.state_dir / "cache"), d) for d in reversed(layers))
        for i in range(CREATES):  # alternate which side goes first: no side always gets a warm cache
            for step in ((via_api, via_runtime) if i % 2 == 0 else (via_runtime, via_api)):
                step(i)
        for i in range(CREATES):
            api.delete(f"/v1/instances/c{i}")
            rt.delete(f"r{i}")
        api.delete(f"/v1/instances/c{CREATES}")
    finally:
        cleanup()
        agent.stop()
        drop_test_network(bridge, agent.rtag)
    if os.environ.get("BENCH_DEBUG"):
        print(f"server-side operation run p50 {statistics.median(op_ms):.1f} ms", file=sys.stderr)
    line(f"container_create_start_p50_{kind}", statistics.median(api_ms),
         f"{kind} runtime create+start (no API)", statistics.median(rt_ms))


def main():
    tmp = tempfile.mkdtemp(prefix="bench-api-")
    os.chmod(tmp, 0o711)  # user-namespaced containers' roots traverse it to their rootfs
    try:
        if os.environ.get("BENCH_ONLY") != "create":
            bench_list(tmp)
        bench_create(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
