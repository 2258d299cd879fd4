"""Volume benchmarks: JSON lines as described in DESIGN.md section 7.

attach: through the agent's API, POST /v1/instances/{vm}/volumes of a local volume to a running
    VM until the guest's kernel shows the new disk, against `virsh attach-disk --persistent`
    (live + config, as the agent attaches) of a raw file of the same size to the same guest;
    p50 over RUNS (each side detached again between runs).
volume_grow_online: PATCH /v1/volumes/{id} of the attached volume until the guest sees the new
    size, against `virsh blockresize` of the peer's disk.
The guest (scripts/build-test-images' boot.qcow2, TCG here) runs a user-data script that prints
its virtio disks and their sizes whenever they change (every 20 ms, shell builtins only), so
both sides are timed to the same console line, read from the same file.
Needs root, libvirtd (started here if none runs) and the test guest. Run as:
.venv/bin/python bench/volumes.py
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time

from jsonline import emitter
from testbed import libvirt_daemon
from testbed.agentproc import AgentProcess, Api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.environ.get("NODEAGENT_TEST_IMAGES", "/var/cache/nodeagent-test-images")
RUNS = 7  # per side; the first of each is dropped (caches)
MiB = 1024 * 1024
MARK = "NODEAGENT-BENCH"
TIMEOUT_S = 120
WATCH = f"""#!/bin/sh
( last=""; while true; do now=""
  for d in /sys/block/vd*; do read s < "$d/size"; now="$now ${{d##*/}}=$s"; done
  [ "$now" != "$last" ] && echo "{MARK}$now" && last="$now"; sleep 0.02; done ) &
exit 0
"""

line = emitter("volumes", digits=1)


def marks(path: str) -> int:
    try:
        with open(path, errors="replace") as f:
            return sum(1 for ln in f if ln.startswith(MARK))
    except FileNotFoundError:
        return 0


def wait_change(path: str, before: int, t0: float) -> float:
    """Seconds from ``t0`` until the guest printed a new disk line."""
    while marks(path) <= before:
        if time.monotonic() - t0 > TIMEOUT_S:
            raise RuntimeError(f"the guest showed no disk change within {TIMEOUT_S}s ({path})")
        time.sleep(0.005)
    return time.monotonic() - t0


def main() -> None:
    subprocess.run([os.path.join(ROOT, "scripts", "build-test-images"), IMAGES], check=True,
                   stdout=subprocess.DEVNULL)
    daemons = libvirt_daemon.ensure()
    work = tempfile.mkdtemp(prefix="nodeagent-bench-volumes-", dir="/var/tmp")
    os.chmod(work, 0o755)
    agent = AgentProcess(f"{work}/agent", pool_kind="local", import_dirs=[IMAGES])
    agent.config.write_text(agent.config.read_text().replace(
        '[hypervisor]\ndriver = "fake"\n', f'[hypervisor]\ndriver = "libvirt"\nuri = "{daemons.uri}"\n'))
    token = agent.token("bench", "admin")
    agent.start()
    api = Api(agent.url, token)
    vm = "bench-volvm"
    virsh = ["virsh", "-q", "-c", daemons.uri]
    try:
        op = api.wait(api.post("/v1/images", json={"name": "boot", "source": {
            "type": "file", "path": f"{IMAGES}/boot.qcow2"}}).json())
        assert op["status"] == "succeeded", op
        op = api.wait(api.post("/v1/instances", json={"name": vm, "kind": "vm", "image": "boot", "memory_mib": 192,
                                                      "network": "none", "user_data": WATCH}).json(), timeout=120)
        assert op["status"] == "succeeded", op
        log = f"{work}/agent/instances/{op['result']['instance']['id']}/console.log"
        t0 = time.monotonic()
        while marks(log) == 0:
            if time.monotonic() - t0 > TIMEOUT_S:
                raise RuntimeError("the guest's watcher did not start")
            time.sleep(0.1)
        r = api.post("/v1/volumes", json={"name": "benchvol", "size_mib": 64})
        assert r.status_code == 201, r.text
        peer_disk = f"{work}/peer.raw"
        with open(peer_disk, "wb") as f:
            f.truncate(64 * MiB)
        attach, peer_attach, grow, peer_grow = [], [], [], []
        for i in range(RUNS + 1):
            size = (64 + 8 * (i + 1)) * MiB
            # ours: attach, grow, detach
            n = marks(log)
            t0 = time.monotonic()
            r = api.post(f"/v1/instances/{vm}/volumes", json={"volume": "benchvol", "target": "vdb"})
            assert r.status_code == 200, r.text
            a = wait_change(log, n, t0)
            n = marks(log)
            t0 = time.monotonic()
            r = api.patch("/v1/volumes/benchvol", json={"size_mib": size // MiB})
            assert r.status_code == 200, r.text
            g = wait_change(log, n, t0)
            n = marks(log)
            assert api.delete(f"/v1/instances/{vm}/volumes/benchvol").status_code == 200
            wait_change(log, n, time.monotonic())
            # the peer: virsh attach-disk (live + persistent), blockresize, detach-disk
            n = marks(log)
            t0 = time.monotonic()
            subprocess.run([*virsh, "attach-disk", vm, peer_disk, "vdc", "--driver", "qemu", "--subdriver", "raw",
                            "--targetbus", "virtio", "--persistent"], check=True, stdout=subprocess.DEVNULL)
            pa = wait_change(log, n, t0)
            n = marks(log)
            t0 = time.monotonic()
            subprocess.run([*virsh, "blockresize", vm, "vdc", f"{size}B"], check=True, stdout=subprocess.DEVNULL)
            pg = wait_change(log, n, t0)
            n = marks(log)
            subprocess.run([*virsh, "detach-disk", vm, "vdc", "--persistent"], check=True, stdout=subprocess.DEVNULL)
            wait_change(log, n, time.monotonic())
            if i:
                attach.append(a * 1000)
                grow.append(g * 1000)
                peer_attach.append(pa * 1000)
                peer_grow.append(pg * 1000)
    finally:
        api.delete(f"/v1/instances/{vm}")
        api.delete("/v1/volumes/benchvol")
        agent.stop()
        shutil.rmtree(work, ignore_errors=True)
    line("attach_hotplug_to_guest_p50", statistics.median(attach),
         "virsh attach-disk --persistent (raw file)", statistics.median(peer_attach))
    line("volume_grow_online_to_guest_p50", statistics.median(grow),
         "virsh blockresize", statistics.median(peer_grow))


if __name__ == "__main__":
    main()
