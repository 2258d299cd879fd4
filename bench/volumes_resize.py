"""The `resize` metrics of bench/volumes.py (issue 17), in a module of their own so the
volumes bench can import ``resize_metrics`` (and this runs alone): JSON lines as described
in DESIGN.md section 7.

resize_container_live: a live memory + CPU resize of a running busybox container through
the API (PATCH /v1/instances/{id} on a real agent with runc: validation, the cgroup files
written by the agent as `runc update` writes them (containers.cgroups.set_limits), runc's
state.json, the record written, the event), median of RUNS, against `runc update --memory
--cpu-quota` of the same container run by hand, interleaved in the same run. Both sides
alternate between two sizes, so every call really changes the cgroups.
resize_container_runtime: the same through the runtime layer alone (RuncRuntime.update_limits
in this process on the agent's state: the cgroup files, runc's state.json, the limits kept in
the state DB; the bundle is rendered at the next start), against the same peer.

What the live figure spends: the HTTP round trip itself (a GET /v1/health costs ~1.8 ms from
this client), the runtime layer's ~1.4 ms (half of it the atomic rewrite of runc's ~34 KiB
state.json) and the agent's own work (the record, its event). The peer is the start of a Go
binary (~8 ms here) for a few writes to cgroupfs.

Run as root: .venv/bin/python bench/volumes_resize.py
"""
from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo: testbed, tests

from jsonline import emitter  # noqa: E402

RUNS = 30
SIZES = ((1.0, 96), (0.5, 128))  # (cpus, memory_mib) alternated
CFS_PERIOD_US = 100_000

line = emitter("volumes")


def _runc_update(runc_root: str, name: str, cpus: float, mem: int) -> float:
    """The peer: `runc update` of the container's memory and CPU quota; its time in ms."""
    t = time.perf_counter()
    subprocess.run(["runc", "--root", runc_root, "update", "--memory", str(mem << 20), "--memory-swap",
                    str(mem << 20), "--cpu-quota", str(int(cpus * CFS_PERIOD_US)), "--cpu-period",
                    str(CFS_PERIOD_US), name], check=True, capture_output=True)
    return (time.perf_counter() - t) * 1000


def resize_metrics(runs: int = RUNS) -> None:
    from testbed.agentproc import AgentProcess, Api
    from tests.api.test_crash import _import_busybox

    tmp = Path(tempfile.mkdtemp(prefix="nodeagent-bench-resize-", dir="/tmp"))
    tmp.chmod(0o711)  # user-namespaced containers reach their rootfs by path
    agent = AgentProcess(tmp / "a", pool_kind="local", runtime="runc")
    agent.admin_token = agent.token("admin", "admin")
    agent.start()
    api = Api(agent.url, agent.admin_token)
    name = f"bres-{secrets.token_hex(3)}"
    runc_root = str(tmp / "a" / "containers" / "runc")
    try:
        _import_busybox(api, tmp)
        op = api.wait(api.post("/v1/instances", json={"name": name, "kind": "container", "image": "busybox",
                                                      "memory_mib": 128, "network": "none",
                                                      "command": ["/bin/sh", "-c", "sleep 100000"]}).json())
        assert op["status"] == "succeeded", op
        ours, peer = [], []
        for i in range(runs):
            cpus, mem = SIZES[i % 2]
            t = time.perf_counter()
            r = api.patch(f"/v1/instances/{name}", json={"cpus": cpus, "memory_mib": mem})
            ours.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.text
            peer.append(_runc_update(runc_root, name, *SIZES[(i + 1) % 2]))
        line("resize_container_live", statistics.median(ours), "runc update", statistics.median(peer))
        from agent.state import Database
        from containers.runc import RuncRuntime
        from containers.runtime import Limits
        rt = RuncRuntime(str(tmp / "a" / "containers"), Database(tmp / "a" / "state.db"))
        ours, peer = [], []
        for i in range(runs):
            cpus, mem = SIZES[i % 2]
            t = time.perf_counter()
            rt.update_limits(name, Limits(cpus=cpus, memory_mib=mem))
            ours.append((time.perf_counter() - t) * 1000)
            peer.append(_runc_update(runc_root, name, *SIZES[(i + 1) % 2]))
        line("resize_container_runtime", statistics.median(ours), "runc update", statistics.median(peer))
    finally:
        api.delete(f"/v1/instances/{name}")
        agent.stop()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("run as root: runc containers need it")
    resize_metrics()
