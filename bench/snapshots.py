"""The `snapshot` metrics of bench/volumes.py (issue 17), in a module of their own so the
volumes bench can import ``snapshot_metrics`` (and this runs alone): JSON lines as described
in DESIGN.md section 7.

Two VMs booted from the test guest's boot.qcow2 through a real agent (libvirt, TCG, a local
pool), each root disk a 2 GiB qcow2 overlay with 1 GiB written into it (qemu-io, before the
VMs start, past the guest's own partitions), both running:

snapshot_vm_running_local: POST /v1/instances/{id}/snapshots of the running VM (an internal
qcow2 snapshot by one QMP transaction; validation, record, event), median of RUNS, against
`virsh snapshot-create-as --disk-only --atomic --no-metadata` (an external overlay) of the
other VM, interleaved in the same run.
snapshot_guest_pause: how long the guest was paused (ms) during our snapshot, summed from
libvirt's lifecycle events (SUSPENDED -> RESUMED, QEMU's STOP/RESUME) over every run, the
largest run; the peer's from the same events during its runs.
snapshot_io_stall: the QMP transaction alone (the window in which the guest's disk requests
wait for the drain and the snapshot tables; its vCPUs run on), median; no peer.

snapshot_frozen_local: then both VMs restart and, at their second boot, run a guest agent
(testbed.guest_agent: answers libvirt and really fsfreezes the guest's mounted root partition);
our snapshot is now filesystem-consistent (freeze, the QMP transaction, thaw), against
`virsh snapshot-create-as --disk-only --atomic --quiesce` of the twin (libvirt's own freeze
around its external snapshot), median of RUNS each, interleaved. snapshot_frozen_guest_pause:
the guest's pause (ms) during ours, and the peer's. snapshot_frozen_window: how long the
guest's filesystems stayed frozen (ms, from the agent's log: the freeze's answer -> the thaw's
answer, which includes libvirt's guest-sync round trip before the thaw), median; no peer.

snapshot_vm_running_rbd (with --rbd: a Ceph dev cluster is started unless one runs): the same
on a block (RBD) pool against `rbd snap create` of the twin's volume; snapshot_guest_pause_rbd.

Run as root: NODEAGENT_TEST_IMAGES=/var/cache/nodeagent-test-images-ud .venv/bin/python bench/snapshots.py [--rbd]
"""
from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo: testbed, tests

from jsonline import emitter  # noqa: E402
from testbed.guest_agent import QGA_FUNCTION  # noqa: E402

RUNS = 7
URI = "qemu:///system"
line = emitter("volumes")


class PauseClock:
    """Sums how long each domain was suspended, from libvirt's lifecycle events."""

    def __init__(self):
        import libvirt
        libvirt.virEventRegisterDefaultImpl()
        self.conn = libvirt.open(URI)
        self.paused: dict[str, float] = {}  # name -> ms paused in total
        self._since: dict[str, float] = {}
        self._stop = False
        self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event, None)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        import libvirt
        while not self._stop:
            libvirt.virEventRunDefaultImpl()

    def _event(self, _conn, dom, event, _detail, _opaque):
        import libvirt
        now = time.perf_counter()
        if event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED:
            self._since[dom.name()] = now
        elif event == libvirt.VIR_DOMAIN_EVENT_RESUMED and dom.name() in self._since:
            self.paused[dom.name()] = self.paused.get(dom.name(), 0.0) + (now - self._since.pop(dom.name())) * 1000

    def total(self, name: str) -> float:
        return self.paused.get(name, 0.0)

    @classmethod
    def checked(cls, vm: str) -> "PauseClock":
        """A clock seen to count a real suspend of ``vm`` (else a 0 would mean nothing)."""
        clock = cls()
        subprocess.run(["virsh", "-c", URI, "suspend", vm], check=True, capture_output=True)
        time.sleep(0.05)
        subprocess.run(["virsh", "-c", URI, "resume", vm], check=True, capture_output=True)
        deadline = time.monotonic() + 5
        while clock.total(vm) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert clock.total(vm) > 0, "libvirt's lifecycle events did not arrive: the pause clock is blind"
        return clock


# the bench VMs' user-data: nothing at the first boot; from the second on, a guest agent that
# freezes the root partition (vda2, mounted for it), so the frozen lines need no third VM
QGA_FROM_BOOT2 = "#!/bin/sh\n" + QGA_FUNCTION + """
mkdir -p /mnt/b && mount -t ext4 /dev/vda2 /mnt/b || exit 9
n=$(cat /mnt/b/bench-boots 2>/dev/null || echo 0)
echo $((n + 1)) > /mnt/b/bench-boots
sync
if [ "$n" = 0 ]; then umount /mnt/b; exit 0; fi
qga ok /mnt/b &
"""


def _two_vms(api, image: dict, names, pool: str | None, write_argv, user_data: str | None = None) -> None:
    """Create ``names`` stopped from ``image`` (2 GiB root disks), write 1 GiB into each
    (``write_argv(name)``: past the guest's partitions), start them and wait for their init."""
    from tests.api.test_vm_boot import wait_console
    for name in names:
        op = api.wait(api.post("/v1/instances", json={
            "name": name, "kind": "vm", "image": image["id"], "cpus": 1, "memory_mib": 192, "disk_gib": 2,
            "network": "none", "start": False, **({"pool": pool} if pool else {}),
            **({"user_data": user_data} if user_data else {})}).json(), timeout=300)
        assert op["status"] == "succeeded", op
        subprocess.run(write_argv(name), check=True, capture_output=True)
        op = api.wait(api.post(f"/v1/instances/{name}/actions", json={"action": "start"}).json(), timeout=300)
        assert op["status"] == "succeeded", op
    for name in names:
        wait_console(api, name, boots=1, timeout=300)


def _timed(api, vm: str, clock: PauseClock, runs: int, take) -> tuple[list[float], float]:
    """Each run's ms of ``take(i)`` and the most ``vm`` was paused in one run."""
    times, worst = [], 0.0
    for i in range(runs):
        before = clock.total(vm)
        t = time.perf_counter()
        take(i)
        times.append((time.perf_counter() - t) * 1000)
        time.sleep(0.2)  # a late RESUMED event is counted
        worst = max(worst, clock.total(vm) - before)
    return times, worst


def snapshot_metrics(runs: int = RUNS) -> None:
    from hypervisor import qmp
    from testbed.agentproc import Api
    from tests.api.test_vm_boot import import_boot_image, start_agent, stop_agent, virsh

    images = os.environ.get("NODEAGENT_TEST_IMAGES", "/var/cache/nodeagent-test-images")
    tmp = Path(tempfile.mkdtemp(prefix="nodeagent-bench-snap-", dir="/var/tmp"))
    tmp.chmod(0o755)  # QEMU (libvirt-qemu) reaches the peer's overlays here
    bridge = (f"nabsnap{secrets.token_hex(2)}", f"198.19.{secrets.randbelow(50) + 150}.0/24")
    agent = start_agent(tmp / "a", URI, bridge)
    api = Api(agent.url, agent.token_value)
    ours_vm, peer_vm = f"bsnap-{secrets.token_hex(3)}", f"bsnapp-{secrets.token_hex(3)}"
    try:
        image = import_boot_image(api, f"{images}/boot.qcow2")
        _two_vms(api, image, (ours_vm, peer_vm), None,
                 lambda name: ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1G 1G", _disk(virsh, name)],
                 user_data=QGA_FROM_BOOT2)
        clock = PauseClock.checked(peer_vm)
        ours, worst_pause, peer, peer_pause = [], 0.0, [], 0.0
        for i in range(runs):  # interleaved: one of ours, one of the peer's
            t, w = _timed(api, ours_vm, clock, 1, lambda _: _api_snapshot(api, ours_vm, f"s{i}"))
            ours, worst_pause = ours + t, max(worst_pause, w)
            t, w = _timed(api, peer_vm, clock, 1, lambda _: subprocess.run(
                ["virsh", "-c", URI, "snapshot-create-as", "--domain", peer_vm, "--name", f"p{i}", "--disk-only",
                 "--atomic", "--no-metadata", "--diskspec", f"vda,file={tmp}/p{i}.qcow2",
                 "--diskspec", "vdz,snapshot=no"], check=True, capture_output=True))
            peer, peer_pause = peer + t, max(peer_pause, w)
        line("snapshot_vm_running_local", statistics.median(ours),
             "virsh snapshot-create-as --disk-only --atomic", statistics.median(peer))
        line("snapshot_guest_pause", worst_pause, "virsh snapshot-create-as --disk-only --atomic", peer_pause)
        assert api.get(f"/v1/instances/{ours_vm}").json()["state"] == "running"
        # the QMP transaction alone: the disk I/O stall window
        sock = f"/var/lib/libvirt/qemu/nodeagent-{ours_vm}.qmp"
        node = next(b["inserted"]["node-name"] for b in qmp.execute(sock, "query-block")
                    if "virtio-disk0" in (b.get("qdev") or ""))
        stall = []
        for i in range(runs):
            t = time.perf_counter()
            qmp.execute(sock, "transaction", {"actions": [{"type": "blockdev-snapshot-internal-sync",
                                                           "data": {"device": node, "name": f"q{i}"}}]})
            stall.append((time.perf_counter() - t) * 1000)
            qmp.execute(sock, "blockdev-snapshot-delete-internal-sync", {"device": node, "name": f"q{i}"})
        line("snapshot_io_stall", statistics.median(stall))
        _frozen_metrics(api, agent, clock, ours_vm, peer_vm, tmp, runs)
    finally:
        for name in (ours_vm, peer_vm):
            api.delete(f"/v1/instances/{name}")
        stop_agent(agent, bridge)
        subprocess.run(["ip", "link", "del", bridge[0]], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _api_snapshot(api, vm: str, name: str, consistency: str = "crash-consistent") -> None:
    r = api.post(f"/v1/instances/{vm}/snapshots", json={"name": name})
    assert r.status_code == 201 and r.json()["consistency"] == consistency, r.text


def _agent_connected(vm: str, timeout: float = 120) -> None:
    import xml.etree.ElementTree as ET

    from tests.api.test_vm_boot import virsh
    deadline = time.monotonic() + timeout
    while True:
        if any(t.get("name") == "org.qemu.guest_agent.0" and t.get("state") == "connected"
               for t in ET.fromstring(virsh(URI, "dumpxml", vm)).findall("devices/channel/target")):
            return
        assert time.monotonic() < deadline, f"{vm}'s guest agent never connected"
        time.sleep(0.2)


def _frozen_metrics(api, agent, clock: PauseClock, ours_vm: str, peer_vm: str, tmp: Path, runs: int) -> None:
    """The second boot of both VMs runs a guest agent (QGA_FROM_BOOT2): ours through the API
    (filesystem-consistent) against `virsh snapshot-create-as --quiesce` of the twin."""

    from tests.api.test_vm_boot import wait_console
    for name in (ours_vm, peer_vm):
        op = api.wait(api.post(f"/v1/instances/{name}/actions", json={"action": "restart", "force": True}).json(),
                      timeout=300)
        assert op["status"] == "succeeded", op
    for name in (ours_vm, peer_vm):
        wait_console(api, name, boots=2, timeout=300)
        _agent_connected(name)
    log_from = agent.log.stat().st_size
    ours, worst_pause, peer, peer_pause = [], 0.0, [], 0.0
    for i in range(runs):
        t, w = _timed(api, ours_vm, clock, 1,
                      lambda _: _api_snapshot(api, ours_vm, f"f{i}", "filesystem-consistent"))
        ours, worst_pause = ours + t, max(worst_pause, w)
        t, w = _timed(api, peer_vm, clock, 1, lambda _: subprocess.run(
            ["virsh", "-c", URI, "snapshot-create-as", "--domain", peer_vm, "--name", f"fp{i}", "--disk-only",
             "--atomic", "--quiesce", "--no-metadata", "--diskspec", f"vda,file={tmp}/fp{i}.qcow2",
             "--diskspec", "vdz,snapshot=no"], check=True, capture_output=True))
        peer, peer_pause = peer + t, max(peer_pause, w)
    line("snapshot_frozen_local", statistics.median(ours),
         "virsh snapshot-create-as --disk-only --atomic --quiesce", statistics.median(peer))
    line("snapshot_frozen_guest_pause", worst_pause, "virsh snapshot-create-as --disk-only --atomic --quiesce",
         peer_pause)
    with open(agent.log, "rb") as f:
        f.seek(log_from)
        text = f.read().decode(errors="replace")
    windows = [float(w) for w in _field(text, "frozen_ms")]
    assert len(windows) == runs, f"the agent logged {len(windows)} freeze windows for {runs} snapshots"
    line("snapshot_frozen_window", statistics.median(windows))


def _field(text: str, key: str) -> list[str]:
    """Values of ``key=...`` in the agent's text log lines."""
    import re
    return re.findall(rf"\b{key}=([0-9.]+)", text)


def rbd_snapshot_metrics(runs: int = RUNS) -> None:
    """snapshot_vm_running_rbd: the same on a block (Ceph RBD) pool (an RBD snapshot of the
    root volume through the API) against `rbd snap create` of the twin VM's volume; the
    guest's pause during ours as snapshot_guest_pause_rbd."""
    from testbed import ceph_cluster
    from testbed.agentproc import Api
    from tests.api.test_vm_boot import import_boot_image, start_agent, stop_agent

    images = os.environ.get("NODEAGENT_TEST_IMAGES", "/var/cache/nodeagent-test-images")
    reused = ceph_cluster.existing()
    env = reused or ceph_cluster.start()
    cpool = "bsnap" + secrets.token_hex(3)
    env.run("ceph", "osd", "pool", "create", cpool, "8", "8")
    env.run("ceph", "osd", "pool", "application", "enable", cpool, "rbd")
    tmp = Path(tempfile.mkdtemp(prefix="nodeagent-bench-snaprbd-", dir="/var/tmp"))
    tmp.chmod(0o755)
    bridge = (f"nabsnap{secrets.token_hex(2)}", f"198.19.{secrets.randbelow(50) + 150}.0/24")
    block = (f'[pools.blk]\nkind = "block"\npool = "{cpool}"\nconf = "{env.conf}"\n'
             f'user = "{env.user}"\nkeyring = "{env.keyring}"\n')
    agent = start_agent(tmp / "a", URI, bridge, extra=block)
    api = Api(agent.url, agent.token_value)
    ours_vm, peer_vm = f"bsnapr-{secrets.token_hex(3)}", f"bsnaprp-{secrets.token_hex(3)}"

    def volume(name: str) -> str:
        return f"{cpool}/navol.{api.get(f'/v1/instances/{name}').json()['volumes'][0]}"

    try:
        image = import_boot_image(api, f"{images}/boot.qcow2")
        _two_vms(api, image, (ours_vm, peer_vm), "blk", lambda name: [
            "qemu-io", "-f", "raw", "-c", "write -P 0x5a 1G 1G",
            f"rbd:{volume(name)}:id={env.user}:conf={env.conf}:keyring={env.keyring}"])
        clock = PauseClock.checked(peer_vm)
        peer_vol = volume(peer_vm)
        ours, worst_pause, peer = [], 0.0, []
        for i in range(runs):
            t, w = _timed(api, ours_vm, clock, 1, lambda _: _api_snapshot(api, ours_vm, f"s{i}"))
            ours, worst_pause = ours + t, max(worst_pause, w)
            t, _ = _timed(api, peer_vm, clock, 1, lambda _: env.run("rbd", "snap", "create", f"{peer_vol}@p{i}"))
            peer += t
        line("snapshot_vm_running_rbd", statistics.median(ours), "rbd snap create", statistics.median(peer))
        line("snapshot_guest_pause_rbd", worst_pause)
    finally:
        for name in (ours_vm, peer_vm):
            api.delete(f"/v1/instances/{name}")
        stop_agent(agent, bridge)
        subprocess.run(["ip", "link", "del", bridge[0]], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        env.run("ceph", "osd", "pool", "delete", cpool, cpool, "--yes-i-really-really-mean-it", check=False)
        if reused is None:
            ceph_cluster.stop(env)


def _disk(virsh, name: str) -> str:
    import xml.etree.ElementTree as ET
    root = ET.fromstring(virsh(URI, "dumpxml", name))
    vda = next(d for d in root.findall("devices/disk") if d.find("target").get("dev") == "vda")
    return vda.find("source").get("file")


if __name__ == "__main__":
    snapshot_metrics()
    if "--rbd" in sys.argv:
        rbd_snapshot_metrics()
