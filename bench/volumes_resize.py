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

resize_vm_vcpus_live: a running VM (boot.qcow2 on libvirt, TCG) gets a vCPU hot-plugged
through the API (PATCH cpus n -> n+1: libvirt's setVcpusFlags, live and in the definition),
against `virsh setvcpus --live --config` n+1 -> n+2 of the same VM, alternated; max_cpus
leaves room for every plug (QEMU refuses to unplug a vCPU of the test guest, "device unplug
request for not supported device type": there is no way back to alternate with).
resize_vm_memory_live: the same for memory through the virtio balloon (PATCH memory_mib
192 <-> 160 under max_memory_mib 256: setMemoryFlags) against `virsh setmem --live --config`;
each round is ours down, the peer up, the peer down, ours up.
Both sides are timed until libvirt returned (the balloon target is set; the test guest has
no virtio_balloon driver, so its memory does not move: a guest with one gives its pages back
afterwards, on either side alike).

Run as root: .venv/bin/python bench/volumes_resize.py [--containers | --vms]
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
VM_RUNS = 8  # rounds: a vCPU plugged by each side; memory: ours down, the peer up and down, ours up
IMAGES = os.environ.get("NODEAGENT_TEST_IMAGES", "/var/cache/nodeagent-test-images")
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


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def vm_resize_metrics(rounds: int = VM_RUNS) -> None:
    from testbed import libvirt_daemon, runtimes
    from testbed.agentproc import AgentProcess, Api
    subprocess.run([str(Path(__file__).resolve().parent.parent / "scripts" / "build-test-images"), IMAGES],
                   check=True, stdout=subprocess.DEVNULL)
    daemons = libvirt_daemon.ensure()
    tmp = Path(tempfile.mkdtemp(prefix="nodeagent-bench-vmresize-", dir="/var/tmp"))
    tmp.chmod(0o755)
    net = runtimes.test_network()
    agent = AgentProcess(tmp / "a", pool_kind="local", import_dirs=[IMAGES], network=net)
    agent.config.write_text(agent.config.read_text().replace(
        '[hypervisor]\ndriver = "fake"\n', f'[hypervisor]\ndriver = "libvirt"\nuri = "{daemons.uri}"\n'
                                           'virt_type = "qemu"\n'))
    token = agent.token("bench", "admin")
    agent.start()
    api = Api(agent.url, token)
    name = f"bvres-{secrets.token_hex(3)}"
    virsh = ["virsh", "-q", "-c", daemons.uri]

    def patch(**body):
        r = api.patch(f"/v1/instances/{name}", json=body)
        assert r.status_code == 200, r.text

    def run(*args):
        subprocess.run([*virsh, *args, "--live", "--config"], check=True, stdout=subprocess.DEVNULL)
    try:
        op = api.wait(api.post("/v1/images", json={"name": "boot", "source": {
            "type": "file", "path": f"{IMAGES}/boot.qcow2"}}).json())
        assert op["status"] == "succeeded", op
        op = api.wait(api.post("/v1/instances", json={
            "name": name, "kind": "vm", "image": "boot", "cpus": 1, "memory_mib": 192,
            "max_cpus": 1 + 2 * rounds, "max_memory_mib": 256, "network": "none"}).json(), timeout=120)
        assert op["status"] == "succeeded", op
        time.sleep(3)  # the guest's kernel up
        ours, peer, mem, peer_mem = [], [], [], []
        for i in range(rounds):
            ours.append(_timed(lambda: patch(cpus=2 + 2 * i)))
            peer.append(_timed(lambda: run("setvcpus", name, str(3 + 2 * i))))
            mem.append(_timed(lambda: patch(memory_mib=160)))
            peer_mem.append(_timed(lambda: run("setmem", name, f"{192 << 10}")))
            peer_mem.append(_timed(lambda: run("setmem", name, f"{160 << 10}")))
            mem.append(_timed(lambda: patch(memory_mib=192)))
        line("resize_vm_vcpus_live", statistics.median(ours), "virsh setvcpus --live --config",
             statistics.median(peer))
        line("resize_vm_memory_live", statistics.median(mem), "virsh setmem --live --config",
             statistics.median(peer_mem))
    finally:
        api.delete(f"/v1/instances/{name}")
        agent.stop()
        runtimes.drop_test_network(net[0], agent.rtag)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("run as root: runc containers and libvirt need it")
    if "--vms" not in sys.argv[1:]:
        resize_metrics()
    if "--containers" not in sys.argv[1:]:
        vm_resize_metrics()
