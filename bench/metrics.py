"""/metrics scrape cost (issue #20): JSON lines as described in DESIGN.md section 7, peers
measured in the same run.

(a) metrics_scrape_vms_<N>: GET /metrics of an agent on libvirt (TCG) with --vms running VMs
    (the test guest's boot.qcow2, network none, booted to its marker), median of RUNS, vs
    `virsh domstats` of the same domains (one call: libvirt's own bulk read, a process start
    included);
(b) vm_bulk_stats_<N>: what a scrape asks the driver now, LibvirtDriver.bulk_stats() (one
    getAllDomainStats), vs what it asked before, LibvirtDriver.stats() of each VM (a few RPCs
    each), in this process, of the same domains;
(c) metrics_scrape_fake_<M>: GET /metrics of an agent on the fake driver with --fake running
    VMs (the agent's own per-scrape cost: records, rendering), vs GET /v1/health on the same
    server.

Needs root, libvirtd (started here if none runs; stopped by PID after) and the test guest
(scripts/build-test-images). The machine is shared: run it under the heavy lock,
    flock /tmp/nodeagent-heavy.lock .venv/bin/python bench/metrics.py --vms 10
Everything it makes (agent state dirs, domains, disks) is removed at the end.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's agent, not the venv's install
from jsonline import emitter  # noqa: E402
from testbed.agentproc import AgentProcess, Api  # noqa: E402

RUNS = 20
VM_MEMORY_MIB = 96  # the least that boots boot.qcow2 here (bench/scale.py)
VM_INFLIGHT = 3  # VMs booting at once on the 2 cores
VM_BOOT_TIMEOUT_S = 300
VM_MARKER = "NODEAGENT-GUEST-BOOTED"
VM_IMAGES = os.environ.get("NODEAGENT_TEST_IMAGES", "/var/cache/nodeagent-test-images")

line = emitter("metrics")


def timed(fn, runs=RUNS) -> float:
    """Median ms of ``runs`` calls of fn (after one unmeasured call)."""
    fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(out)


def scrape(api: Api) -> None:
    r = api.get("/metrics")
    assert r.status_code == 200, r.text


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-metrics-", dir="/var/tmp"))
        os.chmod(self.tmp, 0o755)  # QEMU (libvirt-qemu) reaches the disks under it
        self.names = [f"bm{secrets.token_hex(2)}-{i}" for i in range(args.vms)]  # domains are host-wide
        self.daemons = None
        self.agents: list[AgentProcess] = []

    def agent(self, name: str, uri: str | None = None) -> tuple[AgentProcess, Api]:
        a = AgentProcess(self.tmp / name, pool_kind="local", import_dirs=[self.tmp, VM_IMAGES])
        if uri:
            a.config.write_text(a.config.read_text().replace(
                '[hypervisor]\ndriver = "fake"\n', f'[hypervisor]\ndriver = "libvirt"\nuri = "{uri}"\n'
                'virt_type = "qemu"\n'))
        token = a.token("bench", "admin")
        self.agents.append(a)
        a.start()
        return a, Api(a.url, token)

    def import_boot(self, api: Api) -> None:
        op = api.wait(api.post("/v1/images", json={"name": "boot", "source": {
            "type": "file", "path": f"{VM_IMAGES}/boot.qcow2"}}).json(), timeout=300)
        assert op["status"] == "succeeded", op

    def vms(self) -> None:
        from testbed import libvirt_daemon
        self.daemons = libvirt_daemon.ensure()
        uri = self.daemons.uri
        agent, api = self.agent("vms", uri)
        self.import_boot(api)

        def boot(name):
            a = Api(agent.url, api.s.headers["Authorization"].split()[1])
            r = a.post("/v1/instances", json={"name": name, "kind": "vm", "image": "boot", "cpus": 1,
                                              "memory_mib": VM_MEMORY_MIB, "network": "none"})
            assert r.status_code == 202, r.text
            op = a.wait(r.json(), timeout=600)
            assert op["status"] == "succeeded", op
            t0 = time.monotonic()
            while VM_MARKER not in a.get(f"/v1/instances/{name}/logs").json().get("logs", ""):
                if time.monotonic() - t0 > VM_BOOT_TIMEOUT_S:
                    raise RuntimeError(f"{VM_MARKER} not on {name}'s console after {VM_BOOT_TIMEOUT_S}s")
                time.sleep(1)
        with cf.ThreadPoolExecutor(VM_INFLIGHT) as ex:
            for f in [ex.submit(boot, n) for n in self.names]:
                f.result()
        n = len(self.names)
        text = api.get("/metrics").text
        assert all(f'nodeagent_instance_cpu_seconds_total{{kind="vm",name="{v}"}}' in text for v in self.names), \
            "a VM's series is missing"
        virsh = ["virsh", "-c", uri, "domstats", *self.names]
        assert subprocess.run(virsh, capture_output=True).returncode == 0
        ours = timed(lambda: scrape(api))
        peer = timed(lambda: subprocess.run(virsh, capture_output=True, check=True))
        line(f"metrics_scrape_vms_{n}", ours, f"virsh domstats of the {n} domains (one call)", peer)

        from hypervisor.libvirt_driver import LibvirtDriver
        drv = LibvirtDriver(uri=uri, virt_type="qemu", state_dir=str(self.tmp / "drv"))
        got = drv.bulk_stats()
        assert set(self.names) <= set(got), "bulk_stats misses a VM"
        bulk = timed(drv.bulk_stats)
        each = timed(lambda: [drv.stats(v) for v in self.names])
        line(f"vm_bulk_stats_{n}", bulk, f"LibvirtDriver.stats() of each of the {n} VMs (the scrape before)", each)
        drv.close()

    def fake(self) -> None:
        m = self.args.fake
        agent, api = self.agent("fake")
        op = api.wait(api.post("/v1/images", json={"name": "boot", "source": {
            "type": "file", "path": f"{VM_IMAGES}/boot.qcow2"}}).json(), timeout=300)
        assert op["status"] == "succeeded", op

        def create(i):
            a = Api(agent.url, api.s.headers["Authorization"].split()[1])
            op = a.wait(a.post("/v1/instances", json={"name": f"f{i}", "kind": "vm", "image": "boot", "cpus": 1,
                                                      "memory_mib": 64}).json(), timeout=120)
            assert op["status"] == "succeeded", op
        with cf.ThreadPoolExecutor(8) as ex:
            for f in [ex.submit(create, i) for i in range(m)]:
                f.result()
        ours = timed(lambda: scrape(api))
        peer = timed(lambda: api.get("/v1/health"))
        line(f"metrics_scrape_fake_{m}", ours, "GET /v1/health, same server", peer)

    def run(self) -> None:
        if self.args.vms:
            self.vms()
        if self.args.fake:
            self.fake()

    def cleanup(self) -> None:
        for a in self.agents:
            try:
                if a.proc and a.proc.poll() is None:
                    api = Api(a.url, a.token("cleanup", "admin"))
                    for i in api.get("/v1/instances").json()["instances"]:
                        api.delete(f"/v1/instances/{i['id']}", timeout=120)
            finally:
                a.stop()
        if self.daemons is not None:
            for name in self.names:  # what a failed run left: destroy and undefine ours only
                for verb in ("destroy", "undefine"):
                    subprocess.run(["virsh", "-c", self.daemons.uri, verb, name], capture_output=True)
            self.daemons.stop()  # only what ensure() started (none if libvirtd ran)
        shutil.rmtree(self.tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=10, help="running VMs on libvirt (0: skip)")
    ap.add_argument("--fake", type=int, default=200, help="running VMs on the fake driver (0: skip)")
    args = ap.parse_args()
    b = Bench(args)
    try:
        b.run()
    finally:
        b.cleanup()


if __name__ == "__main__":
    main()
