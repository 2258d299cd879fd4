"""Migration benchmark: JSON lines as described in DESIGN.md section 7.

Live migration of a running 256 MiB TCG guest (local qcow2 overlay disk, copied live)
between two simulated hosts (tests/multihost/harness.py: own netns, libvirtd and agent
each): total time (POST /v1/migrations until the operation succeeded, as a client sees
it) and downtime (QEMU's, from the destination's completed job stats), medians over
ROUNDS migrations each way; peer = bare `virsh migrate --live --p2p --copy-storage-inc`
of the same guest (the agent's own domain XML, renamed onto copies of its disks) between the
same two libvirtds, in the same run. Then the downtime of a refresh migration of a container with
500 MiB in its rootfs; peer = a cold migration of the same container (no bare tool moves
a container between hosts). Needs root, libvirtd and the test guest
(scripts/build-test-images). Run as: /work/main/.venv/bin/python bench/migration.py
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hypervisor.domain_xml import NODEAGENT_NS, QEMU_NS  # noqa: E402
from hypervisor.seed import make_seed  # noqa: E402
from tests.api.agentproc import Api  # noqa: E402
from tests.multihost import harness  # noqa: E402

ROUNDS = 3  # migrations per direction
MEMORY_MIB = 256
IMAGES = os.environ.get("NODEAGENT_TEST_IMAGES", "/var/cache/nodeagent-test-images")
OP_TIMEOUT_S = 300

def line(metric, value, peer, peer_value):
    ratio = round(value / peer_value, 2) if peer_value else None
    print(json.dumps({"bench": "migration", "metric": metric, "unit": "ms", "value": round(value, 1),
                      "peer": peer, "peer_value": round(peer_value, 1) if peer_value is not None else None,
                      "ratio": ratio}), flush=True)


class AgentVm:
    """The benchmarked guest, created and moved through the agents' API."""

    def __init__(self, cluster):
        self.hosts = {h.name: h for h in cluster.hosts}
        self.apis = {h.name: Api(h.agent_url, h.admin_token) for h in cluster.hosts}
        for a in self.apis.values():
            a.s.headers["Connection"] = "close"
        op = self.apis["h1"].wait(self.apis["h1"].post("/v1/images", json={
            "name": "guest", "source": {"type": "file", "path": f"{IMAGES}/rootfs.qcow2"}}).json(), OP_TIMEOUT_S)
        assert op["status"] == "succeeded", op
        self.name = f"bench-{uuid.uuid4().hex[:6]}"
        op = self.apis["h1"].wait(self.apis["h1"].post("/v1/instances", json={
            "name": self.name, "kind": "vm", "image": "guest", "cpus": 1, "memory_mib": MEMORY_MIB,
            "network": "none"}).json(), OP_TIMEOUT_S)
        assert op["status"] == "succeeded", op
        self.here = "h1"

    def domain_xml(self) -> str:
        return self.hosts[self.here].run("virsh", "-c", "qemu:///system", "dumpxml", "--migratable",
                                         self.name, timeout=60).stdout

    def migrate(self) -> tuple[float, float | None]:
        """Move it to the other host: (total ms as a client sees it, downtime ms)."""
        there = "h2" if self.here == "h1" else "h1"
        t0 = time.perf_counter()
        op = self.apis[self.here].post("/v1/migrations", json={"instance": self.name, "destination": there}).json()
        op = self.apis[self.here].wait(op, OP_TIMEOUT_S)
        total = (time.perf_counter() - t0) * 1000
        assert op["status"] == "succeeded", op
        self.here = there
        return total, op["result"]["downtime_ms"]

    def delete(self) -> None:
        self.apis[self.here].delete(f"/v1/instances/{self.name}")


def peer_xml(agent_xml: str, name: str, uid: str, disk: str, seed: str, work: Path) -> str:
    """The agent's own domain of the benchmarked guest, renamed onto the peer's files: both
    sides migrate the very same devices (seed disk, serial log, QMP socket included)."""
    for prefix, uri in (("qemu", QEMU_NS), ("nodeagent", NODEAGENT_NS)):
        ET.register_namespace(prefix, uri)
    dom = ET.fromstring(agent_xml)
    dom.find("name").text, dom.find("uuid").text = name, uid
    for d in dom.findall("devices/disk"):
        d.find("source").set("file", seed if d.find("readonly") is not None else disk)
    for log in dom.iter("log"):
        log.set("file", str(work / f"{name}.log"))
    for arg in dom.iter(f"{{{QEMU_NS}}}arg"):
        arg.set("value", re.sub(r"[^=/,]+\.qmp,", f"{name}.qmp,", arg.get("value")))
    return ET.tostring(dom, encoding="unicode")


class PeerVm:
    """The same guest run by bare libvirt: `virsh create`, `virsh migrate --live --p2p
    --copy-storage-inc` between the same two libvirtds."""

    def __init__(self, cluster, work: Path, agent_xml: str):
        self.hosts = cluster.hosts
        self.name = f"bench-peer-{uuid.uuid4().hex[:6]}"
        uid = str(uuid.uuid4())
        seed = make_seed(str(work / "seed.iso"), instance_id=uid, hostname=self.name)
        self.xmls = []
        for h in self.hosts:  # one overlay per host, on its own copy of the base (as the agent's pools have)
            base = work / f"{h.name}-base.qcow2"
            shutil.copyfile(f"{IMAGES}/rootfs.qcow2", base)
            disk = work / f"{h.name}-{self.name}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(disk)],
                           check=True)
            x = work / f"{h.name}-{self.name}.xml"
            x.write_text(peer_xml(agent_xml, self.name, uid, str(disk), seed, work))
            self.xmls.append(str(x))
        for p in work.iterdir():
            os.chmod(p, 0o666)
        self.hosts[0].run("virsh", "-c", "qemu:///system", "create", self.xmls[0], timeout=120)
        self.here = 0

    def migrate(self) -> tuple[float, float | None]:
        there = 1 - self.here
        t0 = time.perf_counter()
        self.hosts[self.here].run("virsh", "-c", "qemu:///system", "migrate", "--live", "--p2p",
                                  "--copy-storage-inc", "--xml", self.xmls[there], self.name,
                                  self.hosts[there].libvirt_uri, timeout=OP_TIMEOUT_S)
        total = (time.perf_counter() - t0) * 1000
        self.here = there
        info = self.hosts[there].run("virsh", "-c", "qemu:///system", "domjobinfo", self.name, "--completed",
                                     timeout=60).stdout
        m = re.search(r"Total downtime:\s+([0-9.]+)\s+ms", info)
        return total, float(m.group(1)) if m else None

    def delete(self) -> None:
        self.hosts[self.here].run("virsh", "-c", "qemu:///system", "destroy", self.name, check=False, timeout=60)


def vm_rounds(cluster, work: Path) -> dict:
    """ROUNDS migrations each way of the agent's guest and of the peer's, interleaved (which
    side goes first alternates), so a slow moment of the machine hits both."""
    ours = AgentVm(cluster)
    peer = PeerVm(cluster, work, ours.domain_xml())
    times = {"ours": ([], []), "peer": ([], [])}
    try:
        for r in range(2 * ROUNDS):
            for side, vm in (("ours", ours), ("peer", peer))[::1 if r % 2 == 0 else -1]:
                total, down = vm.migrate()
                times[side][0].append(total)
                if down is not None:
                    times[side][1].append(down)
    finally:
        peer.delete()
        ours.delete()
    return times


CONTAINER_ROOTFS_MIB = 500


def container_rounds(cluster, work: Path) -> tuple[float, float]:
    """Downtime of a refresh migration of a container whose upper dir holds 500 MiB, and of
    a cold one (stop, full copy, start) of the same container back, in the same run."""
    from tests.functional.ocibuild import busybox_layers, write_layout
    apis = {h.name: Api(h.agent_url, h.admin_token) for h in cluster.hosts}
    for a in apis.values():
        a.s.headers["Connection"] = "close"
    layout = write_layout(str(work / "busybox"), {"latest": busybox_layers()})
    op = apis["h1"].wait(apis["h1"].post("/v1/images", json={
        "name": "busybox", "format": "oci", "source": {"type": "file", "path": layout}}).json(), OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    name = f"bench-ctr-{uuid.uuid4().hex[:6]}"
    op = apis["h1"].wait(apis["h1"].post("/v1/instances", json={
        "name": name, "kind": "container", "image": "busybox", "cpus": 1, "memory_mib": 128,
        "network": "none", "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]}).json(), OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    r = apis["h1"].post(f"/v1/instances/{name}/exec", json={"command": [
        "/bin/sh", "-c", f"dd if=/dev/urandom of=/data bs=1M count={CONTAINER_ROOTFS_MIB} 2>/dev/null"],
        "timeout": 300}, timeout=320).json()
    assert r["exit_code"] == 0, r
    downs = {}
    for mode, here, there in (("refresh", "h1", "h2"), ("cold", "h2", "h1")):
        op = apis[here].post("/v1/migrations", json={"instance": name, "destination": there, "mode": mode}).json()
        op = apis[here].wait(op, OP_TIMEOUT_S)
        assert op["status"] == "succeeded", op
        downs[mode] = op["result"]["downtime_ms"]
    apis["h1"].delete(f"/v1/instances/{name}")
    return downs["refresh"], downs["cold"]


def main() -> None:
    if not os.path.exists(f"{IMAGES}/rootfs.qcow2"):
        subprocess.run([os.path.join(ROOT, "scripts", "build-test-images"), IMAGES], check=True)
    work = Path(tempfile.mkdtemp(prefix="nodeagent-benchmig-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    try:
        with harness.Cluster(work / "sim") as cluster:
            cluster.start_agents()
            peer_dir = work / "peer"
            peer_dir.mkdir()
            os.chmod(peer_dir, 0o755)
            vm = vm_rounds(cluster, peer_dir)
            c_refresh, c_cold = container_rounds(cluster, peer_dir)
        (a_total, a_down), (p_total, p_down) = vm["ours"], vm["peer"]
        med = statistics.median
        line("vm_live_local_disk_total_p50", med(a_total), "virsh migrate --live --p2p --copy-storage-inc",
             med(p_total))
        line("vm_live_local_disk_downtime_p50", med(a_down) if a_down else float("nan"),
             "virsh migrate --live --p2p --copy-storage-inc", med(p_down) if p_down else None)
        line("container_refresh_500mib_downtime", c_refresh,
             "nodeagent cold container migration (stop, full copy, start)", c_cold)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
