"""Density and storm benchmarks (issue #20): JSON lines as described in DESIGN.md section 7,
peers measured in the same run.

(a) container storm: STORM creates with INFLIGHT in flight through the API (POST + wait
    for the operation) vs `podman run -d` with INFLIGHT in flight (its own --root, so no
    other podman state is touched) and vs the runtime layer (RuncRuntime.create + start in
    this process, INFLIGHT threads). All three run busybox `sleep` with network none: the
    same work on every side (podman's bridge is netavark's, not comparable). creates/s and
    the p50/p99 of one create; the p99 is also compared with the quiet p50 (one at a time).
(b) density: --n containers (bridge networking, one lease and veth each) created INFLIGHT
    at a time; then the agent's RSS, conmon RSS and cgroup memory per container, GET
    /v1/instances p50/p99 (peer: GET /v1/health on the same server), /metrics scrape time,
    and create p50 with --n running vs on the empty host (measured at the start).
(c) restart: kill -9 the agent (ours, by PID) and start it again: ms until it answers
    (health; then a list of every instance), ms until every instance is re-adopted (health
    no longer says ``adopting``, every instance listed running and its stats readable).
(d) delete storm: the --n deletes with INFLIGHT in flight, then a count of what is left:
    mounts under the agent's state dir, cgroups under its parent, its veths and netns,
    leases and rows.
(e) VM storm: --vms VMs at once through the API (an agent of its own on libvirt) to each
    guest's marker, vs as many `virsh create` at once of the same disk; total seconds and
    the p50/p99 of one VM.
(f) with --running-vms V (and --n): the density agent also runs VMs (libvirt, TCG, the
    test guest's boot.qcow2, --vm-network: on the same bridge or none), booted VM_INFLIGHT at a time to their
    marker after the containers; (b) is measured again with them (metric names end in
    ``_vms<V>``, with QEMU's RSS per VM), (c) restarts with them (every VM re-adopted too,
    its stats readable, and a lifecycle event flows for a VM and a container after it), and
(g) host reboot (simulated): the agent killed, then every workload by PID (conmons, the
    containers' processes, QEMUs), a new boot id in the file the agent reads it from, the
    agent started: ms from its start until every instance marked autostart runs again.
    One container stopped by the operator and one container and one VM with autostart
    false must stay stopped (the bench fails otherwise).

Run as root (the machine is shared: N=100..200 while developing):
    .venv/bin/python bench/scale.py --n 200
The full run: .venv/bin/python bench/scale.py --n 1000 --running-vms 50
Each quiet create's phases (the agent's `operation finished` log lines) are printed beside
create_p50_at_<n> with the load average of both series; --phases adds the runtime's own
(bench/create_phases.py's hook in the agent).
Everything it makes (agent state dir, bridge and rules, cgroups, podman root) is removed at the end.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
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

STORM = 100
INFLIGHT = 20
QUIET = 10
LIST_REQUESTS = 200
METRICS_REQUESTS = 10
VM_STORM = 20
VM_MEMORY_MIB = 128  # the disk-boot test guest reboots in a loop with 64 MiB (SYSLINUX again and again)
VM_MARKER = "NODEAGENT-GUEST-BOOTED"
VM_BOOT_TIMEOUT_S = 600  # 20 TCG guests share this host's cores
VM_POLL_S = 0.2  # both sides look for the marker at this pace
VM_DENSITY_MEMORY_MIB = 96  # the least that boots boot.qcow2 here: at 64 MiB SYSLINUX restarts again and again
VM_INFLIGHT = 3  # VMs booting at once next to the containers: the 2 cores keep serving the API
VM_BOOT_TIMEOUT_DENSITY_S = 300
REBOOT_TIMEOUT_S = 900
VM_IMAGES = os.environ.get("NODEAGENT_TEST_IMAGES", "/var/cache/nodeagent-test-images")
SETTLE_S = 0.1  # as bench/api.py: every quiet create pays the cgroup v1 RCU wait

line = emitter("scale")


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def rss_mb(pid) -> float:
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) / 1024
    return 0.0


def free_block() -> str:
    """A /21 of 198.19.0.0/16 (test-only) below the /24s test_network() hands out (100..249)
    that no interface uses now: 1000 leases do not fit a /24."""
    used = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    for base in range(8, 96, 8):
        if not any(f" 198.19.{n}." in used for n in range(base, base + 8)):
            return f"198.19.{base}.0/21"
    raise RuntimeError("no free /21 in 198.19.8.0-198.19.95.255")


def storm(fn, n, inflight=INFLIGHT):
    """Run fn(i) for i < n with ``inflight`` at once: (creates/s, latencies ms)."""
    lat = []

    def one(i):
        t0 = time.perf_counter()
        fn(i)
        lat.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(inflight) as ex:
        for f in [ex.submit(one, i) for i in range(n)]:
            f.result()
    return n / (time.perf_counter() - t0), lat


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
        os.chmod(self.tmp, 0o711)  # user-namespaced containers' roots traverse it to their rootfs
        self.bridge, self.subnet = f"nascale{secrets.token_hex(2)}", free_block()
        self.cgparent = f"nodeagent-scale-{secrets.token_hex(3)}"
        self.agent = AgentProcess(self.tmp / "agent", pool_kind="local", import_dirs=[self.tmp, VM_IMAGES])
        self.agent.config.write_text(
            self.agent.config.read_text()
            .replace("workers = 8", f"workers = {INFLIGHT}")
            .replace('runtime = "fake"', f'runtime = "runc"\ncgroup_parent = "{self.cgparent}"')
            + f'[network]\nbridge = "{self.bridge}"\nsubnet = "{self.subnet}"\nnat = false\n')
        self.vms = args.running_vms if args.n else 0
        self.vm_names = [f"dv{secrets.token_hex(2)}-{i}" for i in range(self.vms)]  # domains are host-wide
        self.boot_id = self.tmp / "boot_id"
        self.boot_id.write_text("bench-boot-1\n")
        self.agent.config.write_text(f'boot_id_path = "{self.boot_id}"\n' + self.agent.config.read_text())
        self.daemons = None
        if self.vms:
            from testbed import libvirt_daemon
            self.daemons = libvirt_daemon.ensure()
            self.agent.config.write_text(self.agent.config.read_text().replace(
                '[hypervisor]\ndriver = "fake"\n', f'[hypervisor]\ndriver = "libvirt"\nuri = "{self.daemons.uri}"\n'))
        self.token = self.agent.token("bench", "admin")
        self.api: Api | None = None
        self.podman_root = self.tmp / "podman"
        self.tag = f"_vms{self.vms}" if self.vms else ""  # metric suffix of the figures taken with VMs
        self.phases: dict[str, tuple[list[dict], float]] = {}
        self.rt_phases = None
        if args.phases:  # the runtime's phases too (bench/create_phases.py's hook in the agent)
            from create_phases import HOOK
            hook = self.tmp / "hook"
            hook.mkdir()
            (hook / "sitecustomize.py").write_text(HOOK.format(bench=str(Path(__file__).resolve().parent)))
            self.rt_phases = self.tmp / "rt-phases.jsonl"
            self.agent.env.update(PYTHONPATH=f"{hook}:{self.agent.env['PYTHONPATH']}",
                                  CREATE_PHASES_OUT=str(self.rt_phases))

    # -- agent helpers --
    def start(self):
        self.agent.start()
        self.api = Api(self.agent.url, self.token)

    def create(self, name, network="bridge"):
        api = Api(self.agent.url, self.token)  # a session per thread
        r = api.post("/v1/instances", json={"name": name, "kind": "container", "image": "busybox",
                                            "network": network, "memory_mib": 32,
                                            "command": ["/bin/busybox", "sleep", "100000"]})
        assert r.status_code == 202, r.text
        op = api.wait(r.json(), timeout=600)
        assert op["status"] == "succeeded", op

    def delete(self, name):
        r = Api(self.agent.url, self.token).delete(f"/v1/instances/{name}", timeout=600)
        assert r.status_code in (200, 204), r.text

    def import_busybox(self):
        from testbed.ocibuild import busybox_layers, write_layout
        layout = write_layout(str(self.tmp / "layout"), {"latest": busybox_layers()})
        op = self.api.wait(self.api.post("/v1/images", json={"name": "busybox", "format": "oci",
                                                             "source": {"type": "file", "path": layout}}).json())
        assert op["status"] == "succeeded", op

    def timed_gets(self, path, n):
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = self.api.get(path)
            r.content  # noqa: B018 - the whole body
            lat.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200, r.text
        return lat

    def quiet_creates(self, prefix):
        """QUIET creates one at a time: their latencies (ms). Each one's phases (the agent's
        log: operation phases; with --phases the runtime's too) go to ``self.phases[prefix]``."""
        lat = []
        off = self.agent.log.stat().st_size
        if self.rt_phases:
            self.rt_phases.write_text("")
        load = os.getloadavg()[0]
        for i in range(QUIET):
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            self.create(f"{prefix}{i}")
            lat.append((time.perf_counter() - t0) * 1000)
        import json

        from create_phases import op_phases
        phases = op_phases(self.agent.log, off)[-QUIET:]
        if self.rt_phases:
            rts = [json.loads(ln) for ln in self.rt_phases.read_text().splitlines()][-QUIET:]
            for d, r in zip(phases, rts):
                d.update(r)
        for d, ms in zip(phases, lat):
            d["client_total"] = ms
        self.phases[prefix] = (phases, (load + os.getloadavg()[0]) / 2)
        for i in range(QUIET):
            self.delete(f"{prefix}{i}")
        return lat

    def phase_lines(self, prefix, n, tag=""):
        """One line per phase of the quiet creates ``prefix`` against the empty host's ("e"),
        and the load average while each series ran."""
        (at, load), (empty, load0) = self.phases[prefix], self.phases["e"]
        line(f"create_load_avg_at_{n}{tag}", load, "on the empty host", load0, unit="load")
        for k in sorted({k for d in at + empty for k in d}):
            line(f"create_phase_{k}_at_{n}{tag}", statistics.median([d.get(k, 0) for d in at]),
                 "on the empty host", statistics.median([d.get(k, 0) for d in empty]))

    # -- (a) storm --
    def container_storm(self):
        n = self.args.storm
        rate, lat = storm(lambda i: self.create(f"s{i}", network="none"), n)
        storm(lambda i: self.delete(f"s{i}"), n)
        rt_rate, rt_lat = self.runtime_storm(n)
        pm = self.podman_storm(n)
        peer = f"podman run -d, {INFLIGHT} in flight" if pm else None
        line(f"container_storm_creates_per_s_{n}", rate, peer, pm[0] if pm else None, unit="creates/s")
        line(f"container_storm_creates_per_s_{n}_vs_runtime", rate,
             f"runtime layer create+start, {INFLIGHT} in flight", rt_rate, unit="creates/s")
        line(f"container_storm_p50_{n}", statistics.median(lat), peer, statistics.median(pm[1]) if pm else None)
        line(f"container_storm_p99_{n}", pct(lat, 99), peer, pct(pm[1], 99) if pm else None)
        line(f"container_storm_p99_{n}_vs_quiet_p50", pct(lat, 99), "API create p50, one at a time",
             statistics.median(self.quiet))
        line(f"container_storm_runtime_p99_{n}", pct(rt_lat, 99))

    def runtime_storm(self, n):
        from containers.runtime import ContainerSpec, Limits, NetworkSpec, Rootfs
        from storage.unpack import layer_dir
        from testbed.runtimes import make_runc
        layers = self.api.get("/v1/images/busybox").json()["layers"]
        lowerdirs = tuple(layer_dir(str(self.agent.state_dir / "cache"), d) for d in reversed(layers))
        rt, cleanup = make_runc(self.tmp / "rt")
        try:
            def one(i):
                base = self.tmp / "rt-rootfs" / f"r{i}"
                (base / "upper").mkdir(parents=True)
                (base / "work").mkdir(parents=True)
                spec = ContainerSpec(name=f"r{i}", rootfs=Rootfs(lowerdirs, str(base / "upper"), str(base / "work")),
                                     command=("/bin/busybox", "sleep", "100000"), env={"PATH": "/bin"},
                                     hostname=f"r{i}", limits=Limits(cpus=1, memory_mib=32),
                                     network=NetworkSpec(mode="none"), userns=True)
                rt.create(spec)
                rt.start(spec.name)
            out = storm(one, n)
            storm(lambda i: rt.delete(f"r{i}"), n)
            return out
        finally:
            cleanup()

    def podman(self, *args, **kw):
        return subprocess.run(["podman", "--root", str(self.podman_root / "root"),
                               "--runroot", str(self.podman_root / "run"), "--cgroup-manager", "cgroupfs",
                               "--events-backend", "file", *args], capture_output=True, text=True, **kw)

    def podman_storm(self, n):
        if not shutil.which("podman"):
            print("podman not installed: no podman peer", file=sys.stderr)
            return None
        from testbed.runtimes import build_busybox_rootfs
        rootfs = build_busybox_rootfs(str(self.tmp / "pm-rootfs"))
        tar = self.tmp / "busybox.tar"
        subprocess.run(["tar", "-C", rootfs, "-cf", str(tar), "."], check=True)
        self.podman("import", str(tar), "localhost/nascale-busybox", check=True)

        def one(i):
            r = self.podman("run", "-d", "--network", "none", "--memory", "32m",
                            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",  # runc may not raise them
                            "--cgroup-parent", f"/{self.cgparent}-pm", "--name", f"p{i}",
                            "localhost/nascale-busybox", "/bin/busybox", "sleep", "100000")
            assert r.returncode == 0, r.stderr
        try:
            return storm(one, n)
        finally:
            self.podman("rm", "-af", "-t", "0")

    # -- (b) density, (c) restart, (d) delete storm, (f) VMs next to them, (g) host reboot --
    def density(self):
        n = self.args.n
        _, lat = storm(lambda i: self.create(f"d{i}"), n)
        if os.environ.get("BENCH_DEBUG"):
            print(f"density create p50 {statistics.median(lat):.0f} ms p99 {pct(lat, 99):.0f} ms", file=sys.stderr)
        self.measure("")
        if self.vms:
            self.boot_vms()
            self.measure(self.tag)

    def measure(self, tag):
        """The density figures with what runs now; ``tag`` ends every metric's name."""
        n = self.args.n
        rows = self.api.get("/v1/instances").json()["instances"]
        want = n + (self.vms if tag else 0)
        assert sum(1 for i in rows if i["state"] == "running") == want, "not all running"
        line(f"agent_rss_{n}{tag}", rss_mb(self.agent.proc.pid), unit="MB")
        conmons, mem = [], []
        for pidfile in glob.glob(str(self.agent.state_dir / "containers" / "containers" / "d*" / "conmon.pid")):
            try:
                conmons.append(rss_mb(int(Path(pidfile).read_text().strip())))
            except (OSError, ValueError):
                pass
        for i in range(0, n, max(1, n // 50)):
            mem.append(self.api.get(f"/v1/instances/d{i}/stats").json().get("memory_bytes") or 0)
        if tag:
            qemus = [rss_mb(p) for p in self.qemu_pids().values()]
            line(f"qemu_rss_per_vm{tag}", statistics.median(qemus), unit="MB")
        else:
            line("conmon_rss_per_container", statistics.median(conmons) if conmons else 0, unit="MB")
            line("container_cgroup_memory_per_container", statistics.median(mem) / 2**20, unit="MB")
        lst, health = self.timed_gets("/v1/instances", LIST_REQUESTS), self.timed_gets("/v1/health", LIST_REQUESTS)
        line(f"list_{n}_p50{tag}", statistics.median(lst), "GET /v1/health, same server", statistics.median(health))
        line(f"list_{n}_p99{tag}", pct(lst, 99), "GET /v1/health, same server", pct(health, 99))
        met = self.timed_gets("/metrics", METRICS_REQUESTS)
        line(f"metrics_scrape_{n}{tag}", statistics.median(met))
        prefix = "qv" if tag else "q"
        at = self.quiet_creates(prefix)
        line(f"create_p50_at_{n}{tag}", statistics.median(at), "create p50 on the empty host",
             statistics.median(self.quiet))
        self.phase_lines(prefix, n, tag)

    def import_boot(self):
        op = self.api.wait(self.api.post("/v1/images", json={"name": "boot", "source": {
            "type": "file", "path": f"{VM_IMAGES}/boot.qcow2"}}).json(), timeout=300)
        assert op["status"] == "succeeded", op

    def console_has(self, api, name, count=1):
        return api.get(f"/v1/instances/{name}/logs").json().get("logs", "").count(VM_MARKER) >= count

    def boot_vms(self):
        """--running-vms VMs (on the bridge with --vm-network bridge), VM_INFLIGHT at a time, each
        to its guest's marker. A Linux bridge holds at most 1024 ports (BR_MAX_PORTS): the
        containers' veths and the VMs' taps together must stay below it."""
        def one(i):
            api, name = Api(self.agent.url, self.token), self.vm_names[i]
            r = api.post("/v1/instances", json={"name": name, "kind": "vm", "image": "boot", "cpus": 1,
                                                "memory_mib": VM_DENSITY_MEMORY_MIB,
                                                "network": self.args.vm_network})
            assert r.status_code == 202, r.text
            op = api.wait(r.json(), timeout=600)
            assert op["status"] == "succeeded", op
            t0 = time.monotonic()
            while not self.console_has(api, name):
                if time.monotonic() - t0 > VM_BOOT_TIMEOUT_DENSITY_S:
                    raise RuntimeError(f"{VM_MARKER} not on {name}'s console after {VM_BOOT_TIMEOUT_DENSITY_S}s")
                time.sleep(1)
        _, lat = storm(one, self.vms, inflight=VM_INFLIGHT)
        if os.environ.get("BENCH_DEBUG"):
            print(f"VMs booted: p50 {statistics.median(lat):.0f} ms", file=sys.stderr)

    def qemu_pids(self) -> dict[str, int]:
        """Our VMs' QEMU PIDs by domain name (libvirt's pid files)."""
        out = {}
        for name in self.vm_names:
            try:
                out[name] = int(Path(f"/var/run/libvirt/qemu/{name}.pid").read_text().strip())
            except (OSError, ValueError):
                pass
        return out

    def readopted(self, t0, want_running: int, names, poll=0.05) -> float:
        """ms from ``t0`` until health no longer says adopting, ``want_running`` instances are
        listed running and the stats of each of ``names`` read (asked every ``poll`` s)."""
        while True:
            if time.perf_counter() - t0 > REBOOT_TIMEOUT_S:
                raise RuntimeError(f"not re-adopted in {REBOOT_TIMEOUT_S} s")
            if self.api.get("/v1/health").json().get("adopting"):
                time.sleep(poll)
                continue
            rows = self.api.get("/v1/instances").json()["instances"]
            if sum(1 for i in rows if i["state"] == "running") >= want_running and \
                    all(self.api.get(f"/v1/instances/{x}/stats").status_code == 200 for x in names):
                return (time.perf_counter() - t0) * 1000
            time.sleep(poll)

    def restart(self):
        n, total = self.args.n, self.args.n + self.vms
        self.agent.kill9()
        t0 = time.perf_counter()
        self.agent.start(wait_adopted=False)
        answer = (time.perf_counter() - t0) * 1000
        lst = self.api.get("/v1/instances")  # a list answers too while re-adopting
        assert lst.status_code == 200 and len(lst.json()["instances"]) == total, lst.text[:500]
        answer_list = (time.perf_counter() - t0) * 1000
        readopt = self.readopted(t0, total, [f"d{n - 1}", *self.vm_names[-1:]])
        if os.environ.get("BENCH_DEBUG"):
            started = [ln for ln in self.agent.log.read_text().splitlines() if "agent services started" in ln]
            print(f"restart: {started[-1] if started else '?'}", file=sys.stderr)
        line(f"restart_answer_ms_{n}{self.tag}", answer)
        line(f"restart_answer_list_ms_{n}{self.tag}", answer_list)
        line(f"restart_readopt_ms_{n}{self.tag}", readopt)
        self.events_flow(["d0", *self.vm_names[:1]])

    def events_flow(self, names):
        """Pause and resume each of ``names`` and see both lifecycle events on /v1/events."""
        import json
        import threading
        seen, ready = [], threading.Event()

        def listen():
            r = Api(self.agent.url, self.token).get("/v1/events", params={"type": "lifecycle", "timeout": 60,
                                                                          "heartbeat": 0.5}, stream=True,
                                                    timeout=90)
            for raw in r.iter_lines(decode_unicode=True):
                ready.set()
                if raw and raw.startswith("data:"):
                    d = json.loads(raw[5:]).get("data") or {}
                    seen.append((d.get("name"), d.get("state")))
                    if all((x, "running") in seen and (x, "paused") in seen for x in names):
                        return
        t = threading.Thread(target=listen, daemon=True)
        t.start()
        assert ready.wait(30), "no event stream"
        for name in names:
            for action in ("pause", "resume"):
                op = self.api.wait(self.api.post(f"/v1/instances/{name}/actions", json={"action": action}).json())
                assert op["status"] == "succeeded", op
        t.join(60)
        missing = [x for x in names if (x, "paused") not in seen or (x, "running") not in seen]
        assert not missing, f"no lifecycle events after the restart for {missing}: {seen[-10:]}"

    def host_reboot(self):
        """(g): kill the agent, then every workload by PID; a new boot id; start the agent and
        time until every instance with autostart runs. The others must stay stopped."""
        from containers import cgroups
        n, api = self.args.n, self.api
        held = ["d0", "d1", *self.vm_names[:1]]  # d0 stopped by the operator, d1 and a VM: autostart false
        op = api.wait(api.post("/v1/instances/d0/actions", json={"action": "stop", "timeout": 5}).json())
        assert op["status"] == "succeeded", op
        for name in held[1:]:
            r = api.patch(f"/v1/instances/{name}", json={"autostart": False})
            assert r.status_code == 200, r.text
        self.agent.kill9()
        pids = []
        for pidfile in glob.glob(str(self.agent.state_dir / "containers" / "containers" / "*" / "conmon.pid")):
            try:
                pids.append(int(Path(pidfile).read_text().strip()))
            except (OSError, ValueError):
                pass
        ctl = "unified" if cgroups.is_v2() else "pids"
        for procs in glob.glob(f"/sys/fs/cgroup/{ctl}/{self.cgparent}/**/cgroup.procs", recursive=True):
            pids += [int(x) for x in Path(procs).read_text().split()]
        pids += list(self.qemu_pids().values())
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 60
        while any(os.path.exists(f"/proc/{p}") and "zombie" not in Path(f"/proc/{p}/status").read_text()
                  for p in pids if os.path.exists(f"/proc/{p}")):
            if time.monotonic() > deadline:
                raise RuntimeError("workloads still alive 60 s after SIGKILL")
            time.sleep(0.1)
        # libvirt sees its QEMUs gone: wait until none of ours is active
        from testbed.libvirt_daemon import URI
        uri = self.daemons.uri if self.daemons else URI
        while set(subprocess.run(["virsh", "-c", uri, "list", "--name"], capture_output=True,
                                 text=True).stdout.split()) & set(self.vm_names):
            if time.monotonic() > deadline:
                raise RuntimeError("libvirt still lists our VMs running 60 s after their QEMUs were killed")
            time.sleep(0.1)
        self.boot_id.write_text("bench-boot-2\n")
        want = n + self.vms - len(held)
        t0 = time.perf_counter()
        self.agent.start(wait_adopted=False)
        ms = self.readopted(t0, want, [f"d{n - 1}", *self.vm_names[-1:]], poll=0.25)  # lists of n+V: less load
        rows = {i["name"]: i for i in self.api.get("/v1/instances").json()["instances"]}
        others = {x: rows[x]["state"] for x in held}
        if os.environ.get("BENCH_DEBUG"):
            started = [ln for ln in self.agent.log.read_text().splitlines() if "agent services started" in ln]
            print(f"reboot: {started[-1] if started else '?'}; not autostarted: {others}", file=sys.stderr)
        assert all(s == "stopped" for s in others.values()), others
        running = sum(1 for i in rows.values() if i["state"] == "running")
        assert running == want, f"{running} running of {want}"
        line(f"host_reboot_autostart_ms_{n}{self.tag}", ms)
        if self.vms:  # the guests boot again too (not part of the figure: "running" is QEMU's)
            t1 = time.perf_counter()
            for name in self.vm_names[1:]:
                while not self.console_has(self.api, name, 2):
                    if time.perf_counter() - t1 > VM_BOOT_TIMEOUT_DENSITY_S * 2:
                        raise RuntimeError(f"{name} did not boot again")
                    time.sleep(1)
            line(f"host_reboot_guests_booted_ms_{n}{self.tag}", ms + (time.perf_counter() - t1) * 1000)

    def delete_storm(self):
        from containers import cgroups
        n = self.args.n
        if self.vms:
            storm(lambda i: self.delete(self.vm_names[i]), self.vms, inflight=VM_INFLIGHT)
        storm(lambda i: self.delete(f"d{i}"), n)
        state = str(self.agent.state_dir)
        # the runtime's own mount (RuncRuntime._bind_bundles), not a leak
        bundles = os.path.join(state, "containers", "containers")
        with open("/proc/self/mountinfo") as f:
            mounts = [ln for ln in f if state in ln and ln.split()[4] != bundles]
        cg = cgroups.list_names(self.cgparent)
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        veths = [ln for ln in links.splitlines() if f": nv{self.agent.rtag}" in ln]
        netns = [x for x in (os.listdir("/run/netns") if os.path.isdir("/run/netns") else [])
                 if x.startswith(f"nact-{self.agent.rtag}-")]
        from agent.state import Database
        db = Database(str(self.agent.state_dir / "state.db"))
        leases = db.query("SELECT name FROM containers_leases")
        crows = db.query("SELECT name FROM containers")
        irows = self.api.get("/v1/instances").json()["instances"]
        doms = []
        if self.vms:
            doms = [x for x in subprocess.run(["virsh", "-c", self.daemons.uri, "list", "--all", "--name"],
                                              capture_output=True, text=True).stdout.split() if x in self.vm_names]
        left = len(mounts) + len(cg) + len(veths) + len(netns) + len(leases) + len(crows) + len(irows) + len(doms)
        if left:
            print(f"left: mounts {len(mounts)} cgroups {len(cg)} veths {len(veths)} netns {len(netns)} "
                  f"leases {len(leases)} container rows {len(crows)} instances {len(irows)} domains {len(doms)}",
                  file=sys.stderr)
        line(f"delete_storm_leaks_{n}", left, unit="count")

    # -- (e) VM storm --
    def vm_storm(self):
        """--vms VMs of the test guest's boot.qcow2 (disk boot, 64 MiB, TCG here) created at
        once through the API (an agent of its own on libvirt, network none) until each
        guest's marker is on its console, vs as many `virsh create` at once of the same disk
        (a pre-made overlay and seed each) until the marker in each console log."""
        import uuid

        from hypervisor.domain_xml import domain_xml
        from hypervisor.driver import DiskSpec, VmSpec
        from hypervisor.libvirt_driver import LibvirtDriver
        from hypervisor.seed import make_seed
        from testbed import libvirt_daemon
        k = self.args.vms
        daemons = libvirt_daemon.ensure()
        work = self.tmp / "vms"
        work.mkdir()
        os.chmod(work, 0o755)
        virt_type = LibvirtDriver(uri=daemons.uri, virt_type="auto", state_dir=str(work / "probe")).virt_type
        agent = AgentProcess(work / "agent", pool_kind="local", import_dirs=[VM_IMAGES])
        agent.config.write_text(agent.config.read_text().replace(
            '[hypervisor]\ndriver = "fake"\n', f'[hypervisor]\ndriver = "libvirt"\nuri = "{daemons.uri}"\n'))
        token = agent.token("bench", "admin")
        agent.start()
        peers = [f"nascale-virsh-{secrets.token_hex(3)}-{i}" for i in range(k)]
        try:
            api = Api(agent.url, token)
            op = api.wait(api.post("/v1/images", json={"name": "boot", "source": {
                "type": "file", "path": f"{VM_IMAGES}/boot.qcow2"}}).json(), timeout=300)
            assert op["status"] == "succeeded", op

            def ours(i):
                c = Api(agent.url, token)
                r = c.post("/v1/instances", json={"name": f"v{i}", "kind": "vm", "image": "boot", "cpus": 1,
                                                  "memory_mib": VM_MEMORY_MIB, "network": "none"})
                assert r.status_code == 202, r.text
                t0 = time.monotonic()
                while VM_MARKER not in c.get(f"/v1/instances/v{i}/logs").json().get("logs", ""):
                    if time.monotonic() - t0 > VM_BOOT_TIMEOUT_S:
                        raise RuntimeError(f"{VM_MARKER} not on v{i}'s console after {VM_BOOT_TIMEOUT_S}s")
                    time.sleep(VM_POLL_S)
            ours("warm")  # one boot first: the image's pages are in the page cache for both sides
            Api(agent.url, token).delete("/v1/instances/vwarm", timeout=300)
            rate, lat = storm(ours, k, inflight=k)
            for i in range(k):
                Api(agent.url, token).delete(f"/v1/instances/v{i}", timeout=300)
            xmls = []
            for name in peers:
                disk = work / f"{name}.qcow2"
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", f"{VM_IMAGES}/boot.qcow2",
                                "-F", "qcow2", str(disk)], check=True)
                seed = make_seed(str(work / f"{name}-seed.iso"), instance_id=name, hostname=name)
                spec = VmSpec(name=name, uuid=str(uuid.uuid4()), cpus=1, memory_mib=VM_MEMORY_MIB,
                              disks=(DiskSpec("vda", str(disk)), DiskSpec("vdz", seed, format="raw", readonly=True)),
                              console_log=str(work / f"{name}.log"))
                (work / f"{name}.xml").write_text(domain_xml(spec, virt_type=virt_type))
                xmls.append((name, spec.console_log))

            def peer(i):
                name, log_path = xmls[i]
                subprocess.run(["virsh", "-q", "-c", daemons.uri, "create", str(work / f"{name}.xml")], check=True,
                               stdout=subprocess.DEVNULL)
                t0 = time.monotonic()
                while True:
                    try:
                        if VM_MARKER in Path(log_path).read_text(errors="replace"):
                            return
                    except FileNotFoundError:
                        pass
                    if time.monotonic() - t0 > VM_BOOT_TIMEOUT_S:
                        raise RuntimeError(f"{VM_MARKER} not in {log_path} after {VM_BOOT_TIMEOUT_S}s")
                    time.sleep(VM_POLL_S)
            peer_rate, peer_lat = storm(peer, k, inflight=k)
            vpeer = f"virsh create x{k} at once (pre-made overlay + seed), to the marker"
            line(f"vm_storm_{k}_total_s", k / rate, vpeer, k / peer_rate, unit="s")
            line(f"vm_storm_{k}_p50", statistics.median(lat), vpeer, statistics.median(peer_lat))
            line(f"vm_storm_{k}_p99", pct(lat, 99), vpeer, pct(peer_lat, 99))
        finally:
            for name in peers:
                subprocess.run(["virsh", "-q", "-c", daemons.uri, "destroy", name], capture_output=True)
            try:
                for i in range(k):
                    Api(agent.url, token).delete(f"/v1/instances/v{i}", timeout=300)
            finally:
                agent.stop()
                daemons.stop()  # only what ensure() started (none if libvirtd ran)

    def run(self):
        if self.args.vms:
            self.vm_storm()
        if not (self.args.n or self.args.storm):
            return
        self.start()
        self.import_busybox()
        if self.vms:
            self.import_boot()
        self.create("warm")  # the agent unpacks the layers on first use
        self.delete("warm")
        self.quiet = self.quiet_creates("e")
        if self.args.storm:
            self.container_storm()
        if self.args.n:
            self.density()
            self.restart()
            self.host_reboot()
            self.delete_storm()

    def cleanup(self):
        from testbed.runtimes import drop_test_network
        try:
            if self.api is not None and self.agent.proc and self.agent.proc.poll() is None:
                for i in self.api.get("/v1/instances").json()["instances"]:
                    self.api.delete(f"/v1/instances/{i['id']}", timeout=120)
        finally:
            self.agent.stop()
            if self.daemons is not None:
                for name in self.vm_names:  # what a failed run left: destroy and undefine ours only
                    for verb in ("destroy", "undefine"):
                        subprocess.run(["virsh", "-c", self.daemons.uri, verb, name], capture_output=True)
                self.daemons.stop()  # only what ensure() started (none if libvirtd ran)
            drop_test_network(self.bridge, self.agent.rtag)
            from containers import cgroups
            cgroups.remove_parent(self.cgparent)
            if shutil.which("podman") and self.podman_root.exists():
                self.podman("rm", "-af", "-t", "0")
                self.podman("rmi", "-af")
                with open("/proc/self/mountinfo") as f:
                    mine = [ln.split()[4] for ln in f if ln.split()[4].startswith(str(self.podman_root) + "/")]
                for m in reversed(mine):
                    subprocess.run(["umount", m], capture_output=True)
                drop_cgroup_tree(f"{self.cgparent}-pm")
            shutil.rmtree(self.tmp, ignore_errors=True)


def drop_cgroup_tree(parent: str) -> None:
    """rmdir ``parent`` (podman's --cgroup-parent, ours) and what podman made under it in every
    hierarchy, deepest first; its conmons exit a moment after `podman rm`."""
    for _ in range(50):
        dirs = [d for base in glob.glob(f"/sys/fs/cgroup/*/{parent}") for d, _, _ in os.walk(base)]
        for d in sorted(dirs, key=len, reverse=True):
            try:
                os.rmdir(d)
            except OSError:
                pass
        if not glob.glob(f"/sys/fs/cgroup/*/{parent}"):
            return
        time.sleep(0.1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="containers for density, restart, delete storm (0: skip)")
    ap.add_argument("--storm", type=int, default=STORM, help="creates in the container storm (0: skip)")
    ap.add_argument("--vms", type=int, default=VM_STORM, help="VMs in the VM storm (0: skip)")
    ap.add_argument("--running-vms", type=int, default=0,
                    help="VMs running next to the --n containers for density, restart and host reboot (0: none)")
    ap.add_argument("--vm-network", choices=("bridge", "none"), default="bridge",
                    help="the running VMs' network: bridge (a tap each on the containers' bridge) or none")
    ap.add_argument("--phases", action="store_true",
                    help="also time the runtime's phases of each quiet create (a hook in the agent)")
    args = ap.parse_args()
    b = Bench(args)
    try:
        b.run()
    finally:
        b.cleanup()


if __name__ == "__main__":
    main()
