"""Host evacuation: 4 VMs (running, the test guest's rootfs disk, 128 MiB) and 4 running
containers drained from one simulated host to the other with POST /v1/host/evacuate
(parallel 2), against the sum of the same 8 instances' single migrations (one at a time,
the other way) in the same run, on two simulated hosts (testbed/harness.py: each its own
libvirtd and agent).

    .venv/bin/python bench/evacuate.py        # one JSON line: evacuate_8_instances_total
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from jsonline import emitter
from testbed import harness
from testbed.agentproc import Api

IMAGES = os.environ.get("NODEAGENT_TEST_IMAGES", "/var/cache/nodeagent-test-images")
OP_TIMEOUT_S = 600
VMS = CONTAINERS = 4
PARALLEL = 2

line = emitter("evacuate", digits=1)


def _ok(api: Api, op: dict) -> dict:
    op = api.wait(op, OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    return op


def main() -> None:
    from testbed.ocibuild import busybox_layers, write_layout
    work = Path(tempfile.mkdtemp(prefix="nodeagent-benchevac-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    try:
        with harness.Cluster(work / "sim") as cluster:
            cluster.start_agents()
            apis = {h.name: Api(h.agent_url, h.admin_token) for h in cluster.hosts}
            for a in apis.values():
                a.s.headers["Connection"] = "close"
            h1 = apis["h1"]
            _ok(h1, h1.post("/v1/images", json={"name": "guest", "source": {
                "type": "file", "path": f"{IMAGES}/rootfs.qcow2"}}).json())
            layout = write_layout(str(cluster.hosts[0].root / "busybox"), {"latest": busybox_layers()})
            _ok(h1, h1.post("/v1/images", json={"name": "busybox", "format": "oci", "source": {
                "type": "file", "path": layout}}).json())
            names = []
            for i in range(VMS + CONTAINERS):
                name = f"evac-{uuid.uuid4().hex[:6]}"
                body = {"name": name, "kind": "vm", "image": "guest", "cpus": 1, "memory_mib": 128, "network": "none"}
                if i >= VMS:
                    body.update(kind="container", image="busybox",
                                command=["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"])
                _ok(h1, h1.post("/v1/instances", json=body).json())
                names.append(name)
            singles = 0.0
            for i, name in enumerate(names):  # one at a time, h1 -> h2
                mode = "live" if i < VMS else "refresh"
                t0 = time.monotonic()
                _ok(h1, h1.post("/v1/migrations", json={"instance": name, "destination": "h2", "mode": mode}).json())
                singles += time.monotonic() - t0
            h2 = apis["h2"]
            t0 = time.monotonic()
            op = _ok(h2, h2.post("/v1/host/evacuate", json={"parallel": PARALLEL}).json())
            total = time.monotonic() - t0
            items = op["result"]["instances"]
            assert len(items) == len(names) and all(i["status"] == "done" for i in items), items
            assert h2.post("/v1/host/restore").json() == {"draining": False}
            line("evacuate_8_instances_total", total * 1000,
                 f"sum of the same 8 single migrations (4 VMs live, 4 containers refresh; evacuation parallel "
                 f"{PARALLEL})", singles * 1000)
            for name in names:
                h1.delete(f"/v1/instances/{name}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
