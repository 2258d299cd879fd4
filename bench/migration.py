"""Migration benchmark: JSON lines as described in DESIGN.md section 7.

Live migration of a running 256 MiB TCG guest (local qcow2 overlay disk, copied live)
between two simulated hosts (tests/multihost/harness.py: own netns, libvirtd and agent
each): total time (POST /v1/migrations until the operation succeeded, as a client sees
it) and downtime (QEMU's, from the destination's completed job stats), medians over
ROUNDS migrations each way; peer = bare `virsh migrate --live --p2p --copy-storage-inc`
of a guest of the same shape (same base image, memory and devices) between the same two
libvirtds, in the same run. The same for a guest on shared storage (the agents' block
pool on a Ceph the harness runs on a storage host, harness.Cluster(ceph=True)): memory
only; peer = bare `virsh migrate --live --p2p` of a guest of the same shape on an RBD
image of the same content (cephx secret defined on both libvirtds). Then the downtime of
a refresh migration of a container with 500 MiB in its rootfs; peer = a cold migration of
the same container (no bare tool moves a container between hosts). Needs root, libvirtd,
Ceph and the test guest (scripts/build-test-images). Run as:
/work/main/.venv/bin/python bench/migration.py
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
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.api.agentproc import Api  # noqa: E402
from tests.multihost import harness  # noqa: E402

ROUNDS = 3  # migrations per direction
MEMORY_MIB = 256
IMAGES = os.environ.get("NODEAGENT_TEST_IMAGES", "/var/cache/nodeagent-test-images")
OP_TIMEOUT_S = 300

PEER_XML = """<domain type='qemu'>
  <name>{name}</name><uuid>{uuid}</uuid>
  <memory unit='MiB'>{mem}</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <features><acpi/></features>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <serial type='pty'/>
  </devices>
</domain>"""


def line(metric, value, peer, peer_value):
    ratio = round(value / peer_value, 2) if peer_value else None
    print(json.dumps({"bench": "migration", "metric": metric, "unit": "ms", "value": round(value, 1),
                      "peer": peer, "peer_value": round(peer_value, 1) if peer_value is not None else None,
                      "ratio": ratio}), flush=True)


def agent_rounds(cluster, pool: str | None = None) -> tuple[list[float], list[float]]:
    """ROUNDS migrations each way of one guest (its disk on ``pool``, default: local)."""
    h1, h2 = cluster.hosts
    apis = {h.name: Api(h.agent_url, h.admin_token) for h in cluster.hosts}
    for a in apis.values():
        a.s.headers["Connection"] = "close"
    if apis["h1"].get("/v1/images/guest").status_code == 404:
        op = apis["h1"].wait(apis["h1"].post("/v1/images", json={
            "name": "guest", "source": {"type": "file", "path": f"{IMAGES}/rootfs.qcow2"}}).json(), OP_TIMEOUT_S)
        assert op["status"] == "succeeded", op
    name = f"bench-{uuid.uuid4().hex[:6]}"
    op = apis["h1"].wait(apis["h1"].post("/v1/instances", json={
        "name": name, "kind": "vm", "image": "guest", "cpus": 1, "memory_mib": MEMORY_MIB,
        "network": "none", **({"pool": pool} if pool else {})}).json(), OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    totals, downs = [], []
    here, there = "h1", "h2"
    for _ in range(2 * ROUNDS):
        t0 = time.perf_counter()
        op = apis[here].post("/v1/migrations", json={"instance": name, "destination": there}).json()
        op = apis[here].wait(op, OP_TIMEOUT_S)
        totals.append((time.perf_counter() - t0) * 1000)
        assert op["status"] == "succeeded", op
        if op["result"]["downtime_ms"] is not None:
            downs.append(op["result"]["downtime_ms"])
        here, there = there, here
    apis[here].delete(f"/v1/instances/{name}")
    return totals, downs


def bare_migrations(hosts, name: str, xmls: list[str], copy_flags: tuple[str, ...]):
    """`virsh migrate --live --p2p` of running ``name`` back and forth, ROUNDS each way
    (``xmls[i]``: the domain as host i sees it); (totals, downtimes) in ms."""
    hosts[0].run("virsh", "-c", "qemu:///system", "create", xmls[0], timeout=120)
    totals, downs = [], []
    here = 0
    try:
        for _ in range(2 * ROUNDS):
            there = 1 - here
            t0 = time.perf_counter()
            hosts[here].run("virsh", "-c", "qemu:///system", "migrate", "--live", "--p2p", *copy_flags,
                            "--xml", xmls[there], name, hosts[there].libvirt_uri, timeout=OP_TIMEOUT_S)
            totals.append((time.perf_counter() - t0) * 1000)
            info = hosts[there].run("virsh", "-c", "qemu:///system", "domjobinfo", name, "--completed",
                                    timeout=60).stdout
            m = re.search(r"Total downtime:\s+([0-9.]+)\s+ms", info)
            if m:
                downs.append(float(m.group(1)))
            here = there
    finally:
        hosts[here].run("virsh", "-c", "qemu:///system", "destroy", name, check=False, timeout=60)
    return totals, downs


PEER_RBD_XML = """<domain type='qemu'>
  <name>{name}</name><uuid>{uuid}</uuid>
  <memory unit='MiB'>{mem}</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <features><acpi/></features>
  <devices>
    <disk type='network' device='disk'><driver name='qemu' type='raw'/>
      <source protocol='rbd' name='{image}'><host name='{mon_host}' port='{mon_port}'/></source>
      <auth username='{user}'><secret type='ceph' uuid='{secret}'/></auth>
      <target dev='vda' bus='virtio'/></disk>
    <serial type='pty'/>
  </devices>
</domain>"""
SECRET_XML = """<secret ephemeral='no' private='yes'><uuid>{uuid}</uuid>
  <usage type='ceph'><name>bench-peer {uuid}</name></usage></secret>"""


def peer_shared_rounds(cluster, work: Path) -> tuple[list[float], list[float]]:
    """Bare `virsh migrate --live --p2p` (memory only) of a guest on an RBD image of the
    same content as the agent's, with a cephx secret defined on both libvirtds."""
    ceph, hosts = cluster.ceph, cluster.hosts
    name = f"bench-rbd-{uuid.uuid4().hex[:6]}"
    image = f"{ceph.rbd_pool}/{name}"
    raw = work / f"{name}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", f"{IMAGES}/rootfs.qcow2", str(raw)], check=True)
    ceph.run("rbd", "import", str(raw), image)
    raw.unlink()
    key = ceph.run("ceph", "auth", "get-key", f"client.{ceph.user}").stdout.strip()
    sid = str(uuid.uuid4())
    (work / "secret.xml").write_text(SECRET_XML.format(uuid=sid))
    mon_host, _, mon_port = ceph.mon.rpartition(":")
    x = work / f"{name}.xml"
    x.write_text(PEER_RBD_XML.format(name=name, uuid=str(uuid.uuid4()), mem=MEMORY_MIB, image=image,
                                     mon_host=mon_host, mon_port=mon_port, user=ceph.user, secret=sid))
    for p in work.iterdir():
        os.chmod(p, 0o644)
    try:
        for h in hosts:
            h.run("virsh", "-c", "qemu:///system", "secret-define", str(work / "secret.xml"), timeout=30)
            h.run("virsh", "-c", "qemu:///system", "secret-set-value", sid, key, timeout=30)
        return bare_migrations(hosts, name, [str(x), str(x)], ())
    finally:
        for h in hosts:
            h.run("virsh", "-c", "qemu:///system", "secret-undefine", sid, check=False, timeout=30)
        ceph.run("rbd", "rm", image, check=False)


def peer_rounds(cluster, work: Path) -> tuple[list[float], list[float]]:
    hosts = cluster.hosts
    name = f"bench-peer-{uuid.uuid4().hex[:6]}"
    disks = []
    for h in hosts:  # one overlay per host, on its own copy of the base (as the agent's pools have)
        base = work / f"{h.name}-base.qcow2"
        shutil.copyfile(f"{IMAGES}/rootfs.qcow2", base)
        disk = work / f"{h.name}-{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(disk)],
                       check=True)
        disks.append(str(disk))
    for p in work.iterdir():
        os.chmod(p, 0o666)
    uid = str(uuid.uuid4())
    xmls = []
    for d in disks:
        x = work / f"{Path(d).stem}.xml"
        x.write_text(PEER_XML.format(name=name, uuid=uid, mem=MEMORY_MIB, disk=d))
        xmls.append(str(x))
    return bare_migrations(hosts, name, xmls, ("--copy-storage-inc",))


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
        with harness.Cluster(work / "sim", ceph=True) as cluster:
            cluster.start_agents()
            a_total, a_down = agent_rounds(cluster)
            peer_dir = work / "peer"
            peer_dir.mkdir()
            os.chmod(peer_dir, 0o755)
            p_total, p_down = peer_rounds(cluster, peer_dir)
            s_total, s_down = agent_rounds(cluster, pool=harness.SHARED_POOL)
            ps_total, ps_down = peer_shared_rounds(cluster, peer_dir)
            c_refresh, c_cold = container_rounds(cluster, peer_dir)
        med = statistics.median
        line("vm_live_local_disk_total_p50", med(a_total), "virsh migrate --live --p2p --copy-storage-inc",
             med(p_total))
        line("vm_live_local_disk_downtime_p50", med(a_down) if a_down else float("nan"),
             "virsh migrate --live --p2p --copy-storage-inc", med(p_down) if p_down else None)
        line("vm_live_shared_rbd_total_p50", med(s_total), "virsh migrate --live --p2p", med(ps_total))
        line("vm_live_shared_rbd_downtime_p50", med(s_down) if s_down else float("nan"),
             "virsh migrate --live --p2p", med(ps_down) if ps_down else None)
        line("container_refresh_500mib_downtime", c_refresh,
             "nodeagent cold container migration (stop, full copy, start)", c_cold)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
