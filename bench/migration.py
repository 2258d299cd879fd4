"""Migration benchmark: JSON lines as described in DESIGN.md section 7.

Live migration of a running 256 MiB TCG guest between two simulated hosts
(testbed/harness.py: own netns, libvirtd and agent each, and a Ceph on a storage
namespace, Cluster(ceph=True)): total time (POST /v1/migrations until the operation
succeeded, as a client sees it) and downtime (QEMU's, from the destination's completed job
stats), medians over ROUNDS migrations each way, for a guest on a local pool (its qcow2
overlay copied live; peer = bare `virsh migrate --live --p2p --tls --copy-storage-inc`) and on
the shared block pool (memory only; peer = bare `virsh migrate --live --p2p --tls`). Both
sides go over TLS, as the hosts are configured (README "Migration transport security");
``vm_live_local_disk_tls_cost_*`` compares `virsh migrate --tls` with the same without it. The peer migrates
the same guest (the agent's own domain XML, renamed onto copies of its disks or an RBD image
of the same content with its own cephx secret on both libvirtds) between the same two
libvirtds, interleaved with ours. Then the downtime of a refresh migration of a container
with 500 MiB in its rootfs; peer = a cold migration of the same container (no bare tool
moves a container between hosts). ``vm_live_busy_{postcopy,autoconverge}_*``: a 512 MiB
guest booted from the bootable test disk whose user-data rewrites 128 MiB of its RAM in a
loop, ours (post-copy switched on at the first pass; auto-converge, paused to finish after
60 s) against `virsh migrate` with the matching flags (`--postcopy --postcopy-after-precopy`;
`--auto-converge --timeout 60 --timeout-suspend`); ``vm_live_moderate_*``: the same guest with
no controls (our default policy) against plain `virsh migrate` (bounded by --timeout 120
--timeout-suspend, reported). ``vm_live_ping_loss``: packets lost by a 10 ms ping of an idle
booted guest during its migration, from an observer on an L2 segment joining both hosts'
VM bridges (both agents on one subnet; see L2Fabric), against the same guest moved by
`virsh migrate`. Needs root, libvirtd, Ceph and the test guest (scripts/build-test-images).
Run as: .venv/bin/python bench/migration.py (only the busy, moderate and ping rounds, without
Ceph: .venv/bin/python bench/migration.py busy; only the ping rounds: ... migration.py ping;
only the moderate guest, 3 rounds each way: ... migration.py moderate [ROUNDS])
"""
from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

from hypervisor.domain_xml import NODEAGENT_NS, QEMU_NS
from hypervisor.seed import make_seed
from jsonline import emitter
from testbed import harness
from testbed.agentproc import Api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROUNDS = 3  # migrations per direction
MEMORY_MIB = 256
IMAGES = os.environ.get("NODEAGENT_TEST_IMAGES", "/var/cache/nodeagent-test-images")
OP_TIMEOUT_S = 300
TRACE_S = 0.25  # progress sampling of a traced migration (the busy guests': on stderr)

line = emitter("migration", digits=1)


class AgentVm:
    """The benchmarked guest, created and moved through the agents' API (``image``: a file
    of the test guest's; ``user_data``: its boot script)."""

    def __init__(self, cluster, pool: str | None = None, image: str = "rootfs.qcow2",
                 memory_mib: int = MEMORY_MIB, user_data: str | None = None, network: str = "none"):
        self.hosts = {h.name: h for h in cluster.hosts}
        self.apis = {h.name: Api(h.agent_url, h.admin_token) for h in cluster.hosts}
        for a in self.apis.values():
            a.s.headers["Connection"] = "close"
        image_name = "guest-" + image.split(".")[0]
        if self.apis["h1"].get(f"/v1/images/{image_name}").status_code == 404:
            op = self.apis["h1"].wait(self.apis["h1"].post("/v1/images", json={
                "name": image_name, "source": {"type": "file", "path": f"{IMAGES}/{image}"}}).json(),
                OP_TIMEOUT_S)
            assert op["status"] == "succeeded", op
        self.name = f"bench-{uuid.uuid4().hex[:6]}"
        op = self.apis["h1"].wait(self.apis["h1"].post("/v1/instances", json={
            "name": self.name, "kind": "vm", "image": image_name, "cpus": 1, "memory_mib": memory_mib,
            "network": network, **({"pool": pool} if pool else {}),
            **({"user_data": user_data} if user_data else {})}).json(), OP_TIMEOUT_S)
        assert op["status"] == "succeeded", op
        self.here = "h1"
        self.controls: dict = {}  # the live-migration controls of the next migrate()
        self.trace: list | None = None  # a list: the last migration's progress samples go there
        self.last: dict = {}  # the last migration's result

    def console(self) -> str:
        return self.apis[self.here].get(f"/v1/instances/{self.name}/logs").json().get("logs", "")

    def domain_xml(self) -> str:
        return self.hosts[self.here].run("virsh", "-c", "qemu:///system", "dumpxml", "--migratable",
                                         self.name, timeout=60).stdout

    def migrate(self) -> tuple[float, float | None]:
        """Move it to the other host: (total ms as a client sees it, downtime ms)."""
        there = "h2" if self.here == "h1" else "h1"
        t0 = time.perf_counter()
        op = self.apis[self.here].post("/v1/migrations", json={"instance": self.name, "destination": there,
                                                                **self.controls}).json()
        if self.trace is not None:  # the copy's progress, sampled as a client sees it
            self.trace.clear()
            while op["status"] in ("pending", "running"):
                time.sleep(TRACE_S)
                op = self.apis[self.here].get(f"/v1/operations/{op['id']}").json()
                p = op.get("progress") or {}
                if p.get("iterations") is not None:
                    self.trace.append((round(time.perf_counter() - t0, 2), p.get("phase"), p.get("iterations"),
                                       (p.get("remaining_bytes") or 0) >> 20, p.get("dirty_rate"),
                                       p.get("throttle_pct")))
        op = self.apis[self.here].wait(op, OP_TIMEOUT_S)
        total = (time.perf_counter() - t0) * 1000
        assert op["status"] == "succeeded", op
        self.here, self.last = there, op["result"]
        return total, op["result"]["downtime_ms"]

    def delete(self) -> None:
        self.apis[self.here].delete(f"/v1/instances/{self.name}")


def peer_xml(agent_xml: str, name: str, uid: str, disk: str, seed: str, work: Path,
             secret: str | None = None, mac: str | None = None) -> str:
    """The agent's own domain of the benchmarked guest, renamed onto the peer's files (``disk``:
    a file, or for an RBD disk ``pool/image`` with the peer's cephx ``secret``): both sides
    migrate the very same devices (seed disk, serial log, QMP socket included)."""
    for prefix, uri in (("qemu", QEMU_NS), ("nodeagent", NODEAGENT_NS)):
        ET.register_namespace(prefix, uri)
    dom = ET.fromstring(agent_xml)
    dom.find("name").text, dom.find("uuid").text = name, uid
    for d in dom.findall("devices/disk"):
        if d.find("readonly") is not None:
            d.find("source").set("file", seed)
        elif d.get("type") == "network":
            d.find("source").set("name", disk)
            d.find("auth/secret").set("uuid", secret)
        else:
            d.find("source").set("file", disk)
    for log in dom.iter("log"):
        log.set("file", str(work / f"{name}.log"))
    for nic in dom.findall("devices/interface"):  # a NIC of its own: its MAC, a tap libvirt names
        nic.find("mac").set("address", mac or "52:54:00:00:00:fe")
        if nic.find("target") is not None:
            nic.remove(nic.find("target"))
    for arg in dom.iter(f"{{{QEMU_NS}}}arg"):
        arg.set("value", re.sub(r"[^=/,]+\.qmp,", f"{name}.qmp,", arg.get("value")))
    return ET.tostring(dom, encoding="unicode")


class PeerVm:
    """The same guest run by bare libvirt: `virsh create` on h1, then `virsh migrate --live
    --p2p --tls [copy_flags]` between the same two libvirtds (``xmls[i]``: the domain as host i
    sees it); ``cleanup`` undoes what was made for it."""

    def __init__(self, hosts, name: str, xmls: list[str], copy_flags: tuple[str, ...], cleanup=None,
                 tls: bool = True):
        self.hosts, self.name, self.xmls, self.copy_flags, self.cleanup = hosts, name, xmls, copy_flags, cleanup
        self.tls = tls  # False: QEMU's stream in cleartext (the libvirtds still talk TLS)
        self.hosts[0].run("virsh", "-c", "qemu:///system", "create", self.xmls[0], timeout=120)
        self.here = 0
        self.log: Path | None = None  # its serial console log

    def console(self) -> str:
        try:
            return self.log.read_text(errors="replace") if self.log else ""
        except FileNotFoundError:
            return ""

    def migrate(self) -> tuple[float, float | None]:
        there = 1 - self.here
        t0 = time.perf_counter()
        self.hosts[self.here].run("virsh", "-c", "qemu:///system", "migrate", "--live", "--p2p",
                                  *(("--tls",) if self.tls else ()), *self.copy_flags,
                                  "--xml", self.xmls[there], self.name, self.hosts[there].libvirt_uri,
                                  timeout=OP_TIMEOUT_S)
        total = (time.perf_counter() - t0) * 1000
        self.here = there
        # a guest --timeout-suspend paused arrives paused: it runs on, as the agent's does
        self.hosts[there].run("virsh", "-c", "qemu:///system", "resume", self.name, check=False, timeout=60)
        info = self.hosts[there].run("virsh", "-c", "qemu:///system", "domjobinfo", self.name, "--completed",
                                     timeout=60).stdout
        m = re.search(r"Total downtime:\s+([0-9.]+)\s+ms", info)
        return total, float(m.group(1)) if m else None

    def delete(self) -> None:
        self.hosts[self.here].run("virsh", "-c", "qemu:///system", "destroy", self.name, check=False, timeout=60)
        if self.cleanup:
            self.cleanup()


def local_peer(cluster, work: Path, agent_xml: str, tls: bool = True, image: str = "rootfs.qcow2",
               user_data: str | None = None, address: str | None = None, gateway: str | None = None) -> PeerVm:
    """On each host a qcow2 overlay on its own copy of the base (as the agents' pools have);
    ``address`` ("ip/prefix"): its NIC's, in its seed (a MAC of its own)."""
    from hypervisor.seed import network_config
    name, uid = f"bench-peer-{uuid.uuid4().hex[:6]}", str(uuid.uuid4())
    mac = "52:54:00:%02x:%02x:%02x" % tuple(uuid.uuid4().bytes[:3])
    seed = make_seed(str(work / "seed.iso"), instance_id=uid, hostname=name, user_data=user_data,
                     network_config=network_config(mac, address, gateway) if address else None)
    xmls = []
    for h in cluster.hosts:
        base = work / f"{h.name}-base.qcow2"
        shutil.copyfile(f"{IMAGES}/{image}", base)
        disk = work / f"{h.name}-{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(disk)],
                       check=True)
        x = work / f"{h.name}-{name}.xml"
        x.write_text(peer_xml(agent_xml, name, uid, str(disk), seed, work, mac=mac))
        xmls.append(str(x))
    for p in work.iterdir():
        os.chmod(p, 0o666)
    vm = PeerVm(cluster.hosts, name, xmls, ("--copy-storage-inc",), tls=tls)
    vm.log = work / f"{name}.log"
    return vm


SECRET_XML = """<secret ephemeral='no' private='yes'><uuid>{uuid}</uuid>
  <usage type='ceph'><name>bench-peer {uuid}</name></usage></secret>"""


def shared_peer(cluster, work: Path, agent_xml: str) -> PeerVm:
    """One RBD image of the same content as the agent's, its cephx key in a secret of the
    peer's own on both libvirtds."""
    ceph, hosts = cluster.ceph, cluster.hosts
    name, uid, sid = f"bench-rbd-{uuid.uuid4().hex[:6]}", str(uuid.uuid4()), str(uuid.uuid4())
    image = f"{ceph.rbd_pool}/{name}"
    raw = work / f"{name}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", f"{IMAGES}/rootfs.qcow2", str(raw)], check=True)
    ceph.run("rbd", "import", str(raw), image)
    raw.unlink()
    key = ceph.run("ceph", "auth", "get-key", f"client.{ceph.user}").stdout.strip()
    (work / "secret.xml").write_text(SECRET_XML.format(uuid=sid))
    seed = make_seed(str(work / "seed.iso"), instance_id=uid, hostname=name)
    x = work / f"{name}.xml"
    x.write_text(peer_xml(agent_xml, name, uid, image, seed, work, secret=sid))
    for p in work.iterdir():
        os.chmod(p, 0o644)

    def cleanup():
        for h in hosts:
            h.run("virsh", "-c", "qemu:///system", "secret-undefine", sid, check=False, timeout=30)
        ceph.run("rbd", "rm", image, check=False)
    try:
        for h in hosts:
            h.run("virsh", "-c", "qemu:///system", "secret-define", str(work / "secret.xml"), timeout=30)
            h.run("virsh", "-c", "qemu:///system", "secret-set-value", sid, key, timeout=30)
        return PeerVm(hosts, name, [str(x), str(x)], (), cleanup)
    except BaseException:
        cleanup()
        raise


def vm_rounds(cluster, work: Path, pool: str | None = None, plain: bool = False) -> dict:
    """ROUNDS migrations each way of the agent's guest (its disk on ``pool``, default local)
    and of the peer's, interleaved (which side goes first alternates), so a slow moment of
    the machine hits all; ``plain``: also the peer's guest without --tls (what TLS costs)."""
    ours = AgentVm(cluster, pool)
    sides = {"ours": ours}
    try:
        sides["peer"] = (shared_peer if pool else local_peer)(cluster, work, ours.domain_xml())
        if plain:
            (work / "plain").mkdir()
            os.chmod(work / "plain", 0o755)
            sides["plain"] = local_peer(cluster, work / "plain", ours.domain_xml(), tls=False)
        times = {side: ([], []) for side in sides}
        for r in range(2 * ROUNDS):
            for side, vm in list(sides.items())[::1 if r % 2 == 0 else -1]:
                total, down = vm.migrate()
                times[side][0].append(total)
                if down is not None:
                    times[side][1].append(down)
    finally:
        for vm in reversed(sides.values()):
            vm.delete()
    return times


# A busy guest (issue 21): 512 MiB, booted from the bootable test disk, its user-data
# rewriting BUSY_SET_MIB of its RAM in a loop (a file in the initramfs, copied over and over)
BUSY_MEMORY_MIB = 512
BUSY_SET_MIB = 128
BUSY_LIMIT_S = 60  # auto-converge rounds: the copy is paused to finish after this (both sides)
BUSY_SCRIPT = f"""#!/bin/sh
dd if=/dev/urandom of=/src bs=1M count={BUSY_SET_MIB} 2>/dev/null
i=0
while :; do cp /src /dst; i=$((i+1)); echo "DIRTY $i"; done
"""
PLAIN_LIMIT_S = 120  # plain `virsh migrate` of the moderate guest: suspended to finish after this
BUSY_VARIANTS = {  # metric -> (our request's controls, the peer's virsh flags)
    "postcopy": ({"postcopy": True, "completion_timeout_s": 1, "timeout_action": "postcopy"},
                 ("--postcopy", "--postcopy-after-precopy")),
    "autoconverge": ({"postcopy": False, "auto_converge": True, "completion_timeout_s": BUSY_LIMIT_S,
                      "timeout_action": "pause"},
                     ("--auto-converge", "--timeout", str(BUSY_LIMIT_S), "--timeout-suspend")),
    # the same guest with no controls at all: our default policy ([migration]: pre-copy,
    # auto-converge, post-copy once pre-copy stops converging) against plain virsh (only a timeout,
    # so it ends)
    "moderate": ({}, ("--timeout", str(PLAIN_LIMIT_S), "--timeout-suspend")),
}


def _wait_dirtying(vm, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while "DIRTY 2" not in vm.console():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the busy guest {vm.name} does not dirty memory: {vm.console()[-500:]}")
        time.sleep(1)


# The parts of the guest's pause (issue 21), from QEMU's own event timestamps on both hosts
# (`virsh qemu-monitor-event`: QMP's STOP, MIGRATION status, BLOCK_JOB_*, RESUME), in order:
SWITCHOVER_PARTS = (
    "stop_to_preswitchover",  # source STOP -> MIGRATION pre-switchover (libvirt's pause-before-switchover)
    "mirror_end",             # -> the last BLOCK_JOB_COMPLETED: libvirt ends the NBD disk mirrors (final flush)
    "to_continue",            # -> MIGRATION device: libvirt's cleanup of the mirror, then migrate-continue
    "ram_and_devices",        # -> source MIGRATION completed: the RAM remainder and the device state
    "stream_tail",            # -> destination MIGRATION completed: the stream's end loaded there
    "finish_and_resume",      # -> destination RESUME: p2p Finish round trip, NBD server stop, `cont`
    "libvirt_resumed_event",  # -> libvirt's "Resumed Migrated" event on the destination
)


def switchover_parts(qmp: list, lifecycle_resume: float | None) -> dict | None:
    """``qmp``: (t, host index, event, details) of one domain on all hosts (None for post-copy).
    The source is the host whose MIGRATION completed follows a STOP; parts in ms (None: no such event), plus
    ``qemu_pause`` (source STOP to destination RESUME) and ``libvirt_pause`` (to the event)."""
    done = [(t, h) for t, h, ev, d in qmp if ev == "MIGRATION" and '"completed"' in d]
    stops = [(t, h) for t, h, ev, _ in qmp if ev == "STOP"]
    if not done or not stops or any(ev == "MIGRATION" and "postcopy-active" in d for _, _, ev, d in qmp):
        return None  # post-copy: the destination resumes before the copy ends (its pause: the events')
    src = next((h for t, h in done if any(sh == h and st <= t for st, sh in stops)), None)
    if src is None:
        return None
    src_done = min(t for t, h in done if h == src)
    stop = max(t for t, h in stops if h == src and t <= src_done)

    def first(host_is_src: bool, pred, after: float):
        ts = [t for t, h, ev, d in qmp if (h == src) == host_is_src and t >= after and pred(ev, d)]
        return min(ts) if ts else None
    presw = first(True, lambda ev, d: ev == "MIGRATION" and "pre-switchover" in d, stop)
    device = first(True, lambda ev, d: ev == "MIGRATION" and '"device"' in d, stop)
    jobs = [t for t, h, ev, _ in qmp if h == src and stop <= t <= (device or src_done)
            and ev in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")]
    mirror = max(jobs) if jobs else None
    dst_done = first(False, lambda ev, d: ev == "MIGRATION" and '"completed"' in d, stop)
    resume = first(False, lambda ev, d: ev == "RESUME", stop)
    marks = [stop, presw, mirror, device, src_done, dst_done, resume, lifecycle_resume]
    parts = {}
    for i, part in enumerate(SWITCHOVER_PARTS):
        a, b = marks[i], marks[i + 1]
        parts[part] = (b - a) * 1000 if a is not None and b is not None else None
    parts["qemu_pause"] = (resume - stop) * 1000 if resume else None
    parts["libvirt_pause"] = (lifecycle_resume - stop) * 1000 if lifecycle_resume else None
    return parts


class PauseClock:
    """The guest's pause during a migration as libvirt's lifecycle events show it, the same
    for ours and the peer's: from the source's "Suspended" (Migrated, Post-copy) to the
    destination's "Resumed" (Migrated, Post-copy) or "Started" (Migrated), both seen by a
    `virsh event --timestamp` client on each host (one machine, one clock). It does not
    depend on what the job stats report (libvirt gives no downtime for some post-copy jobs).
    ``parts``: the last migration's switchover_parts() from QEMU's events on both hosts."""

    EVENT = re.compile(r"^(\S+ \S+?)(?:[+-]\d{4})?: event 'lifecycle' for domain '?([^':]+)'?: (\w+) (\S+)")
    QMP = re.compile(r"event (\S+) at (\d+)\.(\d+) for domain '?([^':]+)'?: (.*)$")

    def __init__(self, hosts):
        self.hosts = hosts
        self.parts: dict | None = None

    def measure(self, name: str, action):
        """Run ``action`` (a migration of domain ``name``); returns (its result, pause ms or None)."""
        import datetime
        procs = [h.popen("virsh", "-c", "qemu:///system", "event", "--all", "--loop", "--timestamp",
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for h in self.hosts]
        qmps = [h.popen("virsh", "-c", "qemu:///system", "qemu-monitor-event", "--loop",
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for h in self.hosts]
        time.sleep(0.5)  # registered
        try:
            result = action()
            time.sleep(1)
        finally:
            for p in procs + qmps:
                p.terminate()
        stops, starts = [], []
        for p in procs:
            for ev in p.communicate(timeout=30)[0].splitlines():
                m = self.EVENT.match(ev.strip())
                if not m or m.group(2) != name:
                    continue
                t = datetime.datetime.fromisoformat(m.group(1)).timestamp()
                if m.group(3) == "Suspended" and m.group(4) in ("Migrated", "Post-copy"):
                    stops.append(t)
                elif (m.group(3), m.group(4)) in (("Resumed", "Migrated"), ("Resumed", "Post-copy"),
                                                  ("Started", "Migrated")):
                    starts.append(t)
        qmp = []
        for i, p in enumerate(qmps):
            for ev in p.communicate(timeout=30)[0].splitlines():
                m = self.QMP.search(ev.strip())
                if m and m.group(4) == name:
                    qmp.append((int(m.group(2)) + int(m.group(3)) / 1e6, i, m.group(1), m.group(5)))
        if os.environ.get("MIGBENCH_QMP"):  # every event, for a closer look
            with open(os.environ["MIGBENCH_QMP"], "a") as f:
                f.write(f"== {name}\n")
                f.writelines(f"{t:.6f} h{i + 1} {ev} {d}\n" for t, i, ev, d in sorted(qmp))
        after = [t for t in starts if stops and t >= min(stops)]
        self.parts = switchover_parts(qmp, max(after) if after else None)
        if not stops or not after:
            return result, None
        return result, (max(after) - min(stops)) * 1000


def parts_note(parts: dict | None) -> str:
    """One migration's switchover parts for the stderr log."""
    if not parts:
        return "no QMP events"
    return " ".join(f"{k}={'-' if v is None else round(v)}" for k, v in parts.items())


def parts_lines(metric: str, parts: dict, peer: str) -> None:
    """``{metric}_pause_{part}_p50`` for each part of the pause, ours against the peer's."""
    med = statistics.median
    for part in (*SWITCHOVER_PARTS, "qemu_pause", "libvirt_pause"):
        vals = {side: [p[part] for p in parts.get(side, []) if p and p.get(part) is not None]
                for side in ("ours", "peer")}
        if vals["ours"]:
            line(f"{metric}_pause_{part}_p50", med(vals["ours"]), peer,
                 med(vals["peer"]) if vals["peer"] else None)


def busy_rounds(cluster, work: Path, variants=tuple(BUSY_VARIANTS), rounds: int = 1) -> dict:
    """``rounds`` migrations each way per variant of BUSY_VARIANTS, ours and the peer's
    interleaved: {variant: {"ours": ([totals], [downtimes]), "peer": (...)}}, plus whether
    ours switched to post-copy (each round also on stderr)."""
    import sys
    ours = AgentVm(cluster, image="boot.qcow2", memory_mib=BUSY_MEMORY_MIB, user_data=BUSY_SCRIPT)
    sides = {"ours": ours}
    out: dict = {}
    try:
        peer = local_peer(cluster, work, ours.domain_xml(), image="boot.qcow2", user_data=BUSY_SCRIPT)
        sides["peer"] = peer
        for vm in sides.values():
            _wait_dirtying(vm)
        ours.trace = []
        clock = PauseClock(cluster.hosts)
        for variant in variants:
            controls, flags = BUSY_VARIANTS[variant]
            ours.controls, peer.copy_flags = controls, ("--copy-storage-inc", *flags)
            times = out[variant] = {side: ([], []) for side in sides}
            times["postcopy"] = []
            times["pause"] = {side: [] for side in sides}
            times["parts"] = {side: [] for side in sides}
            for r in range(2 * rounds):
                for side, vm in list(sides.items())[::1 if r % 2 == 0 else -1]:
                    (total, down), pause = clock.measure(vm.name, vm.migrate)
                    times[side][0].append(total)
                    if down is not None:
                        times[side][1].append(down)
                    if pause is not None:
                        times["pause"][side].append(pause)
                    times["parts"][side].append(clock.parts)
                    print(f"# {variant} round {r} {side}: total {total:.0f} ms, downtime {down} ms, "
                          f"paused (events) {pause if pause is None else round(pause)} ms"
                          + (f", postcopy {ours.last.get('postcopy')}" if side == "ours" else "")
                          + f"; parts: {parts_note(clock.parts)}"
                          + (f"; agent: {ours.last.get('switchover')}" if side == "ours" else ""),
                          file=sys.stderr, flush=True)
                    if side == "ours":  # (s, phase, pass, remaining MiB, dirty pages/s, throttle %)
                        print("#   " + " ".join("%s:%s/%s/%s/%s/%s" % (t, ph[:4] if ph else "-", i, rem, dr, th)
                                              for t, ph, i, rem, dr, th in ours.trace), file=sys.stderr, flush=True)
                times["postcopy"].append(bool(ours.last.get("postcopy")))
    finally:
        for vm in reversed(sides.values()):
            vm.delete()
    return out


def busy_lines(busy: dict) -> None:
    med = statistics.median
    for variant, (_controls, flags) in BUSY_VARIANTS.items():
        if variant not in busy:
            continue
        (o_total, o_down), (p_total, p_down) = busy[variant]["ours"], busy[variant]["peer"]
        peer = "virsh migrate --live --p2p --tls --copy-storage-inc " + " ".join(flags)
        metric = "vm_live_moderate" if variant == "moderate" else f"vm_live_busy_{variant}"
        line(f"{metric}_total_p50", med(o_total), peer, med(p_total))
        line(f"{metric}_downtime_p50", med(o_down) if o_down else float("nan"), peer,
             med(p_down) if p_down else None)
        pauses = busy[variant]["pause"]
        if pauses["ours"] and pauses["peer"]:  # libvirt's events: post-copy rounds included
            line(f"{metric}_paused_events_p50", med(pauses["ours"]), peer, med(pauses["peer"]))
            line(f"{metric}_paused_events_max", max(pauses["ours"]), peer, max(pauses["peer"]))
        parts_lines(metric, busy[variant].get("parts", {}), peer)
        # how many of our rounds switched to post-copy (libvirt reports no downtime for some)
        line(f"{metric}_rounds_in_postcopy", sum(busy[variant]["postcopy"]), unit="count")
        if variant == "moderate":  # plain virsh's bound, and how many of its rounds reached it
            line("vm_live_moderate_peer_timeout", PLAIN_LIMIT_S, unit="s")
            line("vm_live_moderate_peer_rounds_over_timeout",
                 sum(t > PLAIN_LIMIT_S * 1000 for t in p_total), unit="count")


CONTAINER_ROOTFS_MIB = 500


def container_rounds(cluster, work: Path) -> tuple[float, float]:
    """Downtime of a refresh migration of a container whose upper dir holds 500 MiB, and of
    a cold one (stop, full copy, start) of the same container back, in the same run."""
    from testbed.ocibuild import busybox_layers, write_layout
    apis = {h.name: Api(h.agent_url, h.admin_token) for h in cluster.hosts}
    for a in apis.values():
        a.s.headers["Connection"] = "close"
    # under h1's dir: the agents import files only from their import_dirs
    layout = write_layout(str(cluster.hosts[0].root / "busybox"), {"latest": busybox_layers()})
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


# Network continuity (issue 21): an idle booted guest on a bridged NIC is pinged every
# PING_INTERVAL_S from an observer on the same L2 segment while it migrates; the packets lost
# are those the ping sent from 1 s before the migration until 1 s after it.
PING_INTERVAL_S = 0.01
PING_ROUNDS = 2  # migrations per direction


class L2Fabric:
    """The two simulated hosts' VM bridges (``nabr0``, one subnet on both: a provider network
    that spans hosts) joined on one L2 segment: a bridge in an observer netns of this run, a
    veth into each host's bridge, and the observer's own address on it (the subnet's last).
    The observer is a client on that segment: it reaches a guest on either host by L2 alone,
    through whichever host the segment's forwarding table says (so a missing announcement
    after a migration shows as loss)."""

    BRIDGE = "nabr0"

    def __init__(self, cluster, subnet: str):
        import ipaddress
        self.ns = f"{harness.PREFIX}{cluster.tag}-ob"[:15]
        net = ipaddress.ip_network(subnet)
        self.address = str(list(net.hosts())[-1])
        self.peer_address = f"{list(net.hosts())[-2]}/{net.prefixlen}"  # the bare-virsh guest's
        self.gateway = str(next(net.hosts()))
        sh = harness.sh
        sh("ip", "netns", "add", self.ns)
        sh("ip", "-n", self.ns, "link", "add", "fab", "type", "bridge")
        for i, h in enumerate(cluster.hosts):
            if not h.run("ip", "link", "show", self.BRIDGE, check=False, timeout=30).returncode == 0:
                h.run("ip", "link", "add", self.BRIDGE, "type", "bridge", timeout=30)  # the agent adopts it
            sh("ip", "-n", self.ns, "link", "add", f"fa{i}", "type", "veth", "peer", "name", "l2up", "netns", h.netns)
            sh("ip", "-n", self.ns, "link", "set", f"fa{i}", "master", "fab", "up")
            sh("ip", "-n", h.netns, "link", "set", "l2up", "master", self.BRIDGE, "up")
            sh("ip", "-n", h.netns, "link", "set", self.BRIDGE, "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.address}/{net.prefixlen}", "dev", "fab")
        sh("ip", "-n", self.ns, "link", "set", "fab", "up")

    def reachable(self, ip: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while harness.sh("ip", "netns", "exec", self.ns, "ping", "-c", "1", "-W", "1", ip,
                         check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"guest {ip} does not answer on the L2 segment")
            time.sleep(1)

    def lost_during(self, ip: str, action, mac: str | None = None) -> tuple[int, list]:
        """Run ``action`` while pinging ``ip`` every PING_INTERVAL_S: (packets lost, what the
        segment saw: (time, link, kind) from SNIFFER, given the guest's ``mac``)."""
        import signal
        import sys
        sniff = subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-c", SNIFFER, mac, ip],
                                 stdout=subprocess.PIPE, text=True) if mac else None
        ping = subprocess.Popen(["ip", "netns", "exec", self.ns, "ping", "-q", "-i", str(PING_INTERVAL_S), ip],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            time.sleep(1)
            action()
            time.sleep(1)
        finally:
            ping.send_signal(signal.SIGINT)
            out = ping.communicate(timeout=30)[0]
            seen = []
            if sniff is not None:
                sniff.terminate()
                for ev in sniff.communicate(timeout=30)[0].splitlines():
                    t, link, kind = ev.split()
                    seen.append((float(t), link, kind))
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        if not m:
            raise RuntimeError(f"ping said: {out}")
        return int(m.group(1)) - int(m.group(2)), seen

    def remove(self) -> None:
        harness.sh("ip", "netns", "del", self.ns, check=False)


# What the observer's segment sees around a migration (run in its netns, all its links): each
# echo request to the guest (the link it left by: fa0 to h1, fa1 to h2), each echo reply from
# it, each RARP or ARP the guest's MAC sends (the announcements), with a timestamp.
SNIFFER = r"""
import signal, socket, struct, sys, time
mac, ip = bytes.fromhex(sys.argv[1].replace(":", "")), socket.inet_aton(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    data, addr = s.recvfrom(2048)
    t, ifname = time.time(), addr[0]
    if ifname == "fab" or len(data) < 14:
        continue
    etype = struct.unpack("!H", data[12:14])[0]
    kind = None
    if etype == 0x8035 and data[6:12] == mac:
        kind = "rarp"
    elif etype == 0x0806 and data[6:12] == mac:
        kind = "arp"
    elif etype == 0x0800 and len(data) >= 35 and data[23] == 1:
        if data[34] == 0 and data[26:30] == ip:
            kind = "reply"
        elif data[34] == 8 and data[30:34] == ip:
            kind = "request"
    if kind:
        print(f"{t:.4f} {ifname} {kind}", flush=True)
"""


def breakdown(events: list[tuple[float, str, str]], source_link: str) -> dict | None:
    """Where a ping's lost window went (ms). The switch is QEMU's first self-announcement
    (a RARP from the guest's MAC: the guest itself sends only ARP); ``gap``: the time without a reply around
    it; ``to_announce``: from that gap's start to the announcement; ``to_reply``: from the
    announcement to the first reply after it; ``old_after_announce``: how long requests still
    left towards the source alone after the announcement (the segment's forwarding table; a
    request flooded to both links is not counted); ``late_lost``: requests sent more than 50 ms
    after the gap that got no reply (losses after the path was back)."""
    replies = sorted(t for t, _, k in events if k == "reply")
    announced = sorted(t for t, _, k in events if k == "rarp")
    if len(replies) < 2 or not announced:
        return None
    ann = announced[0]
    start = max((t for t in replies if t <= ann), default=replies[0])
    end = min((t for t in replies if t > ann), default=replies[-1])
    requests: dict[float, set] = {}
    for t, link, k in events:
        if k == "request":
            requests.setdefault(round(t, 3), set()).add(link)
    old_only = [t for t, links in requests.items() if links == {source_link} and t >= ann]
    stop = max(t for t, _, _ in events) - 0.1  # the last requests' replies may fall after the capture
    late = [t for t in requests if end + 0.05 < t < stop]
    answered = 0
    ri = 0
    for t in sorted(late):  # a reply within 50 ms of a request answers it
        while ri < len(replies) and replies[ri] < t:
            ri += 1
        if ri < len(replies) and replies[ri] - t < 0.05:
            answered += 1
            ri += 1
    return {"gap": (end - start) * 1000, "to_announce": (ann - start) * 1000, "to_reply": (end - ann) * 1000,
            "old_after_announce": ((max(old_only) - ann) * 1000) if old_only else 0.0,
            "late_lost": float(len(late) - answered)}


def one_subnet(cluster) -> str:
    """Both agents on h1's subnet (restarted with it): the guest keeps its address there."""
    subnet = cluster.container_subnet(0)
    for h in cluster.hosts[1:]:
        text = h.agent_config.read_text()
        h.agent_config.write_text(re.sub(r'(?m)^subnet = ".*"$', f'subnet = "{subnet}"', text))
        h.stop_agent()
        h.start_agent()
    return subnet


def ping_rounds(cluster, work: Path) -> dict:
    """PING_ROUNDS migrations each way of an idle booted guest, ours and the peer's
    interleaved: {side: [packets lost], "breakdown": {side: [breakdown() + paused]}}."""
    import sys
    subnet = one_subnet(cluster)
    fabric = L2Fabric(cluster, subnet)
    sides: dict = {}
    try:
        ours = AgentVm(cluster, image="boot.qcow2", network="bridge")
        sides["ours"] = ours
        # tenant isolation admits nothing from outside its group: a group that lets pings in
        # (it moves with the guest; the destination renders its rules before the guest runs there)
        group = {"name": f"ping-{uuid.uuid4().hex[:6]}", "rules": [{"direction": "ingress", "protocol": "icmp"}]}
        assert ours.apis["h1"].post("/v1/security-groups", json=group).status_code == 201
        assert ours.apis["h1"].put(f"/v1/instances/{ours.name}/security-groups",
                                   json={"security_groups": [group["name"]]}).ok
        ip = ours.apis["h1"].get(f"/v1/instances/{ours.name}").json()["ip"]
        peer = local_peer(cluster, work, ours.domain_xml(), image="boot.qcow2", address=fabric.peer_address,
                          gateway=fabric.gateway)
        sides["peer"] = peer
        ips = {"ours": ip, "peer": fabric.peer_address.split("/")[0]}
        for side in sides:
            fabric.reachable(ips[side])
        macs = {"ours": ET.fromstring(ours.domain_xml()).find("devices/interface/mac").get("address"),
                "peer": ET.fromstring(Path(peer.xmls[0]).read_text()).find("devices/interface/mac").get("address")}
        lost: dict = {side: [] for side in sides}
        lost["breakdown"] = {side: [] for side in sides}
        lost["parts"] = {side: [] for side in sides}
        clock = PauseClock(cluster.hosts)
        for r in range(2 * PING_ROUNDS):
            for side, vm in list(sides.items())[::1 if r % 2 == 0 else -1]:
                source_link = "fa0" if vm.here in ("h1", 0) else "fa1"
                (n, seen), pause = clock.measure(vm.name, lambda: fabric.lost_during(ips[side], vm.migrate,
                                                                                        macs[side]))
                lost[side].append(n)
                if n > 50:  # the guest stopped answering: what its console says
                    print(f"# ping round {r} {side}: console tail: {vm.console()[-1500:]!r}", file=sys.stderr,
                          flush=True)
                if os.environ.get("MIGBENCH_DUMP"):  # every frame the segment saw, for a closer look
                    with open(os.environ["MIGBENCH_DUMP"], "a") as f:
                        f.write(f"== round {r} {side} from {source_link}\n")
                        f.writelines(f"{t:.4f} {link} {k}\n" for t, link, k in seen)
                parts = breakdown(seen, source_link) or {}
                parts["paused"] = pause
                lost["breakdown"][side].append(parts)
                lost["parts"][side].append(clock.parts)
                print(f"# ping round {r} {side}: parts: {parts_note(clock.parts)}", file=sys.stderr, flush=True)
                print(f"# ping round {r} {side}: lost {n}, "
                      + ", ".join(f"{k} {v if v is None else round(v)}" for k, v in parts.items())
                      + " ms; announcements " + " ".join(f"{t - min(x[0] for x in seen):.3f}/{link}/{k}"
                                                         for t, link, k in seen if k in ("rarp", "arp")),
                      file=sys.stderr, flush=True)
        moved = ours.apis[ours.here].get(f"/v1/instances/{ours.name}").json()["ip"]
        assert moved == ip, f"the guest's address changed: {ip} -> {moved}"
    finally:
        for vm in reversed(sides.values()):
            vm.delete()
        fabric.remove()
    return lost


def ping_lines(lost: dict) -> None:
    med = statistics.median
    line("vm_live_ping_loss", med(lost["ours"]), "virsh migrate --live --p2p --tls --copy-storage-inc",
         med(lost["peer"]), unit="packets")
    line("vm_live_ping_loss_max", max(lost["ours"]), "virsh migrate --live --p2p --tls --copy-storage-inc",
         max(lost["peer"]), unit="packets")
    # where the lost window went (ms, medians): the guest's pause (libvirt's events), the time
    # from the last reply until the guest's first announcement from the destination's side,
    # and from that until the first reply
    for part in ("gap", "paused", "to_announce", "to_reply", "old_after_announce", "late_lost"):
        vals = {side: [b[part] for b in lost["breakdown"][side] if b.get(part) is not None]
                for side in ("ours", "peer")}
        if vals["ours"] and vals["peer"]:
            line(f"vm_live_ping_{part}_p50", med(vals["ours"]), "virsh migrate --live --p2p --tls --copy-storage-inc",
                 med(vals["peer"]), unit="packets" if part == "late_lost" else "ms")
    parts_lines("vm_live_ping", lost.get("parts", {}), "virsh migrate --live --p2p --tls --copy-storage-inc")
    # what the ping would lose with no RAM part at all (issue 21's target: at most 3): the pause's
    # fixed part (QEMU events: all but the last memory pass and the device state) plus the first
    # round trip after the announcement, in pings
    floor = {}
    for side in ("ours", "peer"):
        fixed = [p["qemu_pause"] - p["ram_and_devices"] for p in lost.get("parts", {}).get(side, [])
                 if p and p.get("qemu_pause") is not None and p.get("ram_and_devices") is not None]
        reply = [b["to_reply"] for b in lost["breakdown"][side] if (b.get("to_reply") or 0) > 0]  # answered
        if fixed and reply:
            floor[side] = (med(fixed) + med(reply)) / (PING_INTERVAL_S * 1000)
    if "ours" in floor:
        line("vm_live_ping_loss_floor_breakdown", floor["ours"], "virsh migrate --live --p2p --tls --copy-storage-inc",
             floor.get("peer"), unit="packets")
    # migrations after which the segment saw no self-announcement from the guest at all
    line("vm_live_ping_no_announcement", sum("gap" not in b for b in lost["breakdown"]["ours"]),
         "virsh migrate --live --p2p --tls --copy-storage-inc",
         sum("gap" not in b for b in lost["breakdown"]["peer"]), unit="count")


def main_ping(work: Path) -> None:
    """Only the ping rounds (no Ceph): `bench/migration.py ping`."""
    with harness.Cluster(work / "sim") as cluster:
        cluster.start_agents()
        (work / "ping").mkdir()
        os.chmod(work / "ping", 0o755)
        ping_lines(ping_rounds(cluster, work / "ping"))


MODERATE_ROUNDS = 3  # `migration.py moderate`: migrations per direction


def main_moderate(work: Path) -> None:
    """Only the moderate guest, MODERATE_ROUNDS each way: `bench/migration.py moderate`."""
    with harness.Cluster(work / "sim") as cluster:
        cluster.start_agents()
        (work / "busy").mkdir()
        os.chmod(work / "busy", 0o755)
        busy_lines(busy_rounds(cluster, work / "busy", ("moderate",), MODERATE_ROUNDS))


IDLE_MEMORY_MIB = 256
PAUSE_ROUNDS = 2  # `migration.py pause`: migrations per direction


def idle_rounds(cluster, work: Path, rounds: int) -> dict:
    """``rounds`` migrations each way of an idle booted guest (no NIC), ours, plain virsh's and
    virsh's with ``--copy-storage-synchronous-writes`` (the NBD mirror in write-blocking mode),
    interleaved: {side: {"pause": [...], "down": [...], "parts": [...]}}."""
    import sys
    ours = AgentVm(cluster, image="boot.qcow2", memory_mib=IDLE_MEMORY_MIB)
    sides = {"ours": ours}
    out: dict = {}
    try:
        for side, flags in (("peer", ()), ("peer_sync", ("--copy-storage-synchronous-writes",))):
            (work / side).mkdir()
            os.chmod(work / side, 0o755)
            sides[side] = local_peer(cluster, work / side, ours.domain_xml(), image="boot.qcow2")
            sides[side].copy_flags += flags
        time.sleep(20)  # booted (the pause does not depend on it, the guest's state does)
        clock = PauseClock(cluster.hosts)
        out = {side: {"pause": [], "down": [], "parts": []} for side in sides}
        for r in range(2 * rounds):
            for side, vm in list(sides.items())[::1 if r % 2 == 0 else -1]:
                (total, down), pause = clock.measure(vm.name, vm.migrate)
                out[side]["down"].append(down)
                out[side]["pause"].append(pause)
                out[side]["parts"].append(clock.parts)
                print(f"# idle round {r} {side}: total {total:.0f} ms, downtime {down} ms, paused (events) "
                      f"{pause if pause is None else round(pause)} ms; parts: {parts_note(clock.parts)}"
                      + (f"; agent: {ours.last.get('switchover')}" if side == "ours" else ""),
                      file=sys.stderr, flush=True)
    finally:
        for vm in reversed(sides.values()):
            vm.delete()
    return out


def idle_lines(idle: dict) -> None:
    med = statistics.median
    peer = "virsh migrate --live --p2p --tls --copy-storage-inc"
    sync = peer + " --copy-storage-synchronous-writes"
    for side, metric, against in (("ours", "vm_live_idle", "peer"), ("peer_sync", "vm_live_idle_sync_writes", "peer")):
        vals = [v for v in idle[side]["pause"] if v is not None]
        pvals = [v for v in idle[against]["pause"] if v is not None]
        if vals and pvals:
            line(f"{metric}_paused_events_p50", med(vals), peer, med(pvals))
            line(f"{metric}_paused_events_max", max(vals), peer, max(pvals))
        parts_lines(metric, {"ours": idle[side]["parts"], "peer": idle[against]["parts"]},
                    sync if side == "peer_sync" else peer)


def main_pause(work: Path) -> None:
    """The pause's parts of an idle and of the moderate guest, PAUSE_ROUNDS each way, then the
    ping rounds (MIGBENCH_PING=0: without): `bench/migration.py pause [ROUNDS]`."""
    with harness.Cluster(work / "sim") as cluster:
        cluster.start_agents()
        for d in ("idle", "busy"):
            (work / d).mkdir()
            os.chmod(work / d, 0o755)
        idle_lines(idle_rounds(cluster, work / "idle", PAUSE_ROUNDS))
        busy_lines(busy_rounds(cluster, work / "busy", ("moderate",), PAUSE_ROUNDS))
        if os.environ.get("MIGBENCH_PING", "1") == "1":
            (work / "ping").mkdir()
            os.chmod(work / "ping", 0o755)
            ping_lines(ping_rounds(cluster, work / "ping"))  # last: it puts h2 on h1's subnet


def main_busy(work: Path) -> None:
    """Only the busy-guest rounds (no Ceph), then the ping rounds: `bench/migration.py busy`."""
    with harness.Cluster(work / "sim") as cluster:
        cluster.start_agents()
        for d in ("busy", "ping"):
            (work / d).mkdir()
            os.chmod(work / d, 0o755)
        busy_lines(busy_rounds(cluster, work / "busy", rounds=1))
        ping_lines(ping_rounds(cluster, work / "ping"))


def main() -> None:
    import sys
    if not os.path.exists(f"{IMAGES}/rootfs.qcow2"):
        subprocess.run([os.path.join(ROOT, "scripts", "build-test-images"), IMAGES], check=True)
    work = Path(tempfile.mkdtemp(prefix="nodeagent-benchmig-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    modes = {"busy": main_busy, "ping": main_ping, "moderate": main_moderate, "pause": main_pause}
    if len(sys.argv) == 3 and sys.argv[1] in ("moderate", "pause"):  # moderate|pause ROUNDS (each way)
        global MODERATE_ROUNDS, PAUSE_ROUNDS
        if sys.argv[1] == "moderate":
            MODERATE_ROUNDS = int(sys.argv.pop())
        else:
            PAUSE_ROUNDS = int(sys.argv.pop())
    if len(sys.argv) == 2 and sys.argv[1] in modes:
        try:
            modes[sys.argv[1]](work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    try:
        with harness.Cluster(work / "sim", ceph=True) as cluster:
            cluster.start_agents()
            dirs = {}
            for d in ("local", "shared", "containers"):
                dirs[d] = work / d
                dirs[d].mkdir()
                os.chmod(dirs[d], 0o755)
            local = vm_rounds(cluster, dirs["local"], plain=True)
            shared = vm_rounds(cluster, dirs["shared"], pool=harness.SHARED_POOL)
            med = statistics.median
            for label, times, peer in (("local_disk", local, "virsh migrate --live --p2p --tls --copy-storage-inc"),
                                       ("shared_rbd", shared, "virsh migrate --live --p2p --tls")):
                (o_total, o_down), (p_total, p_down) = times["ours"], times["peer"]
                line(f"vm_live_{label}_total_p50", med(o_total), peer, med(p_total))
                line(f"vm_live_{label}_downtime_p50", med(o_down) if o_down else float("nan"), peer,
                     med(p_down) if p_down else None)
            (t_total, t_down), (p_total, p_down) = local["peer"], local["plain"]
            plain = "virsh migrate --live --p2p --copy-storage-inc without --tls (QEMU's stream in cleartext)"
            line("vm_live_local_disk_tls_cost_total_p50", med(t_total), plain, med(p_total))
            line("vm_live_local_disk_tls_cost_downtime_p50", med(t_down) if t_down else float("nan"), plain,
                 med(p_down) if p_down else None)
            (work / "busy").mkdir()
            os.chmod(work / "busy", 0o755)
            busy = busy_rounds(cluster, work / "busy", rounds=1)
            c_refresh, c_cold = container_rounds(cluster, dirs["containers"])
            busy_lines(busy)
            (work / "ping").mkdir()
            os.chmod(work / "ping", 0o755)
            ping_lines(ping_rounds(cluster, work / "ping"))  # last: it puts h2 on h1's subnet
        line("container_refresh_500mib_downtime", c_refresh,
             "nodeagent cold container migration (stop, full copy, start)", c_cold)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
