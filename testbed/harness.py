"""Several simulated hosts on one machine (DESIGN section 6).

A *host* is a network namespace with its own address on a shared test bridge plus a
persistent mount namespace with private /run, /var/lib/libvirt, /etc/libvirt,
/var/log/libvirt, /var/cache/libvirt and state dir; it runs its own virtlogd and
libvirtd (TLS only, listening on its own address, its own host_uuid and migration_host;
a certificate of the run's test CA, testbed/pki.py, required of every client). Live
migration between two hosts therefore crosses a real TLS connection between two
libvirtds, and QEMU's migration stream is TLS too when asked (VIR_MIGRATE_TLS). With
``Cluster(..., ceph=True)`` a *storage host* (a network namespace on the same bridge, no
libvirt, no agent) runs a throw-away Ceph (scripts/ceph-dev-cluster --addr) that every
host and the test process reach; each agent gets a ``block`` pool ``shared`` on it
(shared storage for memory-only live migration). Everything is named
with PREFIX so a crashed run's leftovers can be found and removed by name; daemons are
stopped by the PIDs we recorded.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from storage import mounts
from testbed import pki
from testbed.libvirt_daemon import terminate

TEST_IMAGES = os.environ.get("NODEAGENT_TEST_IMAGES", "/var/cache/nodeagent-test-images")
PREFIX = "nasim"  # every netns, link, bridge and mount this harness makes starts with it
NS_DIR = Path("/run/nodeagent-sim")  # holds the persistent mount-namespace files + run owners
TEST_SUPERNET = ipaddress.ip_network("198.18.0.0/16")  # benchmark range: no route off the machine
LIBVIRT_DIRS = ("/var/lib/libvirt", "/etc/libvirt", "/var/log/libvirt", "/var/cache/libvirt")
PKI_DIR = "/etc/libvirt/pki"  # a host's TLS files as it sees them (libvirt's layout; QEMU's in qemu/)
CONTAINER_SUPERNET = ipaddress.ip_network("198.19.0.0/16")  # container bridges: a /27 per host
AGENT_PORT = 8470  # every host has its own netns, so all agents use the well-known port
AGENT_START_TIMEOUT_S = 60
REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable  # the venv the tests run in runs the agents too


def sh(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


class TestNetwork:
    """The shared bridge the hosts' uplinks hang on; the test process gets .1 on it."""

    def __init__(self, tag: str):
        self.name = f"{PREFIX}{tag}br"
        self.net = list(TEST_SUPERNET.subnets(new_prefix=24))[int(tag, 16) % 250 + 1]
        self.gateway = str(self.net.network_address + 1)

    def address(self, index: int) -> str:
        return str(self.net.network_address + 10 + index)

    def up(self) -> None:
        if sh("ip", "link", "show", self.name, check=False).returncode != 0:
            sh("ip", "link", "add", self.name, "type", "bridge")
            sh("ip", "addr", "add", f"{self.gateway}/{self.net.prefixlen}", "dev", self.name)
        sh("ip", "link", "set", self.name, "up")

    def down(self) -> None:
        sh("ip", "link", "del", self.name, check=False)


CEPH_START_TIMEOUT_S = 180  # a start takes about 18 s here
CEPH_DIR = "ceph-cluster"  # under the cluster's workdir: conf, keyring, daemons' data and PIDs
SHARED_POOL = "shared"  # the agents' block pool on the storage host's Ceph


class StorageHost:
    """A network namespace on the test bridge running a single-node Ceph bound to its own
    address (mon, mgr, OSD, radosgw), so the OSD addresses in the osdmap are reachable from
    every simulated host and from the test process. Daemons are stopped by their PIDs."""

    def __init__(self, address: str, workdir: Path, network: TestNetwork, tag: str):
        self.name = "ceph"
        self.address = address
        self.dir = Path(workdir) / CEPH_DIR
        self.network = network
        self.netns = f"{PREFIX}{tag}-ceph"[:15]
        self.uplink = self.netns
        self.env = None  # testbed.ceph_cluster.CephEnv once started
        self._starter: subprocess.Popen | None = None

    def begin_start(self) -> None:
        """Make the namespace and start the cluster in the background (see wait_started)."""
        from testbed import ceph_cluster
        missing = ceph_cluster.missing_packages()
        if missing:
            raise RuntimeError("Ceph is not installed: apt-get install -y " + " ".join(missing))
        _net_up(self.netns, self.uplink, self.address, self.network)
        self._starter = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", "--", PYTHON, str(ceph_cluster.SCRIPT),
             "start", "--dir", str(self.dir), "--addr", self.address],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_started(self):
        from testbed import ceph_cluster
        try:
            out, err = self._starter.communicate(timeout=CEPH_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._starter.kill()
            out, err = self._starter.communicate()
        if self._starter.returncode != 0:
            raise RuntimeError(f"Ceph on the storage host {self.address} did not start: {err.strip()[-2000:]}")
        self.env = ceph_cluster.env(str(self.dir))
        return self.env

    def pool_options(self) -> dict:
        """The agents' [pools.shared] (conf and keyring are outside the hosts' private mounts)."""
        return {"kind": "block", "pool": self.env.rbd_pool, "conf": self.env.conf,
                "user": self.env.user, "keyring": self.env.keyring}

    def stop(self) -> None:
        if self._starter is not None and self._starter.poll() is None:
            self._starter.kill()  # a start still under way; its daemons' PIDs are in the dir
            self._starter.communicate()
        if self.dir.exists():
            stop_ceph(self.dir)
        _remove_ns(self.netns, None, self.uplink)


def stop_ceph(d: Path) -> None:
    """scripts/ceph-dev-cluster stop: the daemons recorded in ``d`` by PID, then ``d``."""
    from testbed import ceph_cluster
    sh(PYTHON, str(ceph_cluster.SCRIPT), "stop", "--dir", str(d), check=False, timeout=60)


class SimHost:
    def __init__(self, name: str, address: str, workdir: Path, network: TestNetwork, tag: str,
                 pool_size: str | None = None, *, ca: pki.TestCA | None = None,
                 client_pki: Path | None = None):
        self.name = name
        self.tag = tag
        self.ca = ca  # None: the host makes its own at start()
        self.client_pki = client_pki  # the test process's client identity (a pkipath)
        self.pool_size = pool_size  # e.g. "256M": the default pool is a tmpfs this big (a disk that fills up)
        self.address = address
        self.root = Path(workdir) / name
        self.network = network
        self.netns = f"{PREFIX}{tag}-{name}"[:15]
        self.mntns = NS_DIR / f"{self.netns}.mnt"
        self.uplink = self.netns
        self.pids: dict[str, int] = {}
        self.admin_token: str | None = None
        self.extra_pools: dict[str, dict] = {}  # name -> options, added to the agent's config

    # -- running things inside the host --
    def argv(self, *argv: str) -> list[str]:
        return ["nsenter", f"--mount={self.mntns}", f"--net=/run/netns/{self.netns}", "--", *argv]

    def run(self, *argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return sh(*self.argv(*argv), check=check, **kw)

    def popen(self, *argv: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*argv), **kw)

    @property
    def libvirt_uri(self) -> str:
        """How the test process (or another host, as the test) reaches this host's libvirtd:
        TLS with the test client's certificate."""
        return f"qemu+tls://{self.address}/system?pkipath={self.client_pki}"

    @property
    def migration_uri(self) -> str:
        """What this host's agent answers a peer: the peer's own certificate authenticates it."""
        return f"qemu+tls://{self.address}/system"

    @property
    def cert_cn(self) -> str:
        return peer_cn(self.tag, self.name)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def pool_dir(self) -> Path:
        return self.state_dir / "pool"

    def path(self, p: Path | str) -> Path:
        """``p`` as this host sees it (through its libvirtd's root: the host's mount
        namespace, where its pool may be a tmpfs), for the test process to read or write."""
        return Path(f"/proc/{self.pids['libvirtd']}/root") / Path(p).relative_to("/")

    # -- lifecycle --
    def start(self, libvirt: bool = True) -> "SimHost":
        """``libvirt=False``: a bare host, no virtlogd or libvirtd running (its agent starts
        them: agent.hostdaemons; ``adopt_host_daemons`` then makes them ours to stop)."""
        _private_ns_dir()
        if self.ca is None:
            self.ca = pki.TestCA(self.root / "ca")
        if self.client_pki is None:
            self.client_pki = self.ca.client_files(self.root / "pki-client", test_client_cn(self.tag))
        self._net_up()
        self._mounts_up()
        if libvirt:
            self._libvirt_up()
        return self

    def adopt_host_daemons(self) -> dict[str, int]:
        """The PIDs of the daemons this host's agent started (its host-daemons.json), taken
        as this host's: stop() ends them."""
        record = self.state_dir / "host-daemons.json"
        started = json.loads(record.read_text())["started"] if record.exists() else {}
        self.pids.update({name: pid for name, pid in started.items() if pid})
        return started

    # -- the agent --
    @property
    def agent_config(self) -> Path:
        return self.root / "agent.toml"

    @property
    def agent_url(self) -> str:
        return f"http://{self.address}:{AGENT_PORT}"

    def write_agent_config(self, subnet: str, peers: dict[str, tuple[str, str]]) -> Path:
        """The agent's config: API on this host's address, a local pool and state under
        the host's dir, this host's libvirtd, a container subnet of its own, ``peers``
        {name: (url, token)}."""
        lines = [f'state_dir = "{self.state_dir}"', 'log_format = "text"', "workers = 4",
                 "[api]", f'listen = "{self.address}:{AGENT_PORT}"',
                 "[pools.default]", 'kind = "local"', f'path = "{self.state_dir / "pool"}"',
                 *(line for name, opts in sorted(self.extra_pools.items())
                   for line in [f"[pools.{name}]", *(f"{k} = {json.dumps(v)}" for k, v in opts.items())]),
                 # image files the tests import: the host's dir and the built test guest
                 "[images]", f"import_dirs = {json.dumps([str(self.root), TEST_IMAGES])}",
                 "[hypervisor]", 'uri = "qemu:///system"', 'virt_type = "qemu"',
                 f'migration_uri = "{self.migration_uri}"',
                 "[migration]", "tls = true", f'pki_path = "{PKI_DIR}"',
                 "[containers]", f'cgroup_parent = "{self.netns}"',  # the hosts share one cgroupfs
                 # a user namespace range of its own, as real hosts may have: migrations shift owners
                 f'idmap = "{1000000 + 65536 * (int(self.name[1:]) if self.name[1:].isdigit() else 0)}:65536"',
                 "[network]", 'bridge = "nabr0"', f'subnet = "{subnet}"']
        for name, (url, token) in sorted(peers.items()):
            lines += [f"[peers.{name}]", f'url = "{url}"', f'token = "{token}"']
        self.agent_config.write_text("\n".join(lines) + "\n")
        return self.agent_config

    def agent_cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """``nodeagent --config <host's> ARGS`` inside this host (this worktree's code)."""
        return self.run(PYTHON, "-m", "agent", "--config", str(self.agent_config), *args,
                        check=check, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)},
                        timeout=120)

    def start_agent(self, env: dict | None = None) -> None:
        import requests
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "agent.log", "ab")
        proc = self.popen(PYTHON, "-m", "agent", "--config", str(self.agent_config), "serve",
                          cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                          stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.pids["agent"] = proc.pid  # nsenter execs the agent: this is its PID
        (self.root / "run" / "agent.pid").write_text(str(proc.pid))
        deadline = time.monotonic() + AGENT_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"agent of {self.name} exited with {proc.returncode}: "
                                   f"{(self.root / 'agent.log').read_text()[-3000:]}")
            try:
                r = requests.get(self.agent_url + "/v1/health", timeout=1)
                if r.ok and not r.json().get("adopting"):  # answering, and its workloads re-adopted
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop_agent()
                raise RuntimeError(f"agent of {self.name} did not answer on {self.agent_url}")
            time.sleep(0.1)
        self._agent_proc = proc

    def stop_agent(self) -> None:
        pid = self.pids.pop("agent", None)
        proc = getattr(self, "_agent_proc", None)
        if proc is not None and proc.pid == pid:  # our child: wait() reaps it (no zombie to poll)
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        else:
            terminate(pid, timeout=30)
        (self.root / "run" / "agent.pid").unlink(missing_ok=True)

    def kill_agent(self) -> None:
        """Crash the agent: SIGKILL its process (ours, by PID); its children live on, as after a real crash."""
        pid = self.pids.pop("agent", None)
        if pid:
            os.kill(pid, signal.SIGKILL)
            proc = getattr(self, "_agent_proc", None)
            if proc is not None:
                proc.wait(10)
        (self.root / "run" / "agent.pid").unlink(missing_ok=True)

    def stop(self) -> None:
        """Destroy this host's domains, stop its daemons by PID, remove its namespaces."""
        if self.pids.get("agent"):
            self.stop_agent()
        if self.pids.get("libvirtd"):
            out = self.run("virsh", "-c", "qemu:///system", "list", "--all", "--name",
                           check=False, timeout=30).stdout
            for dom in filter(None, (line.strip() for line in out.splitlines())):
                self.run("virsh", "-c", "qemu:///system", "destroy", dom, check=False, timeout=30)
                self.run("virsh", "-c", "qemu:///system", "undefine", dom, "--nvram",
                         check=False, timeout=30)
        for name in ("libvirtd", "virtlogd"):
            terminate(self.pids.pop(name, None))
        _remove_ns(self.netns, self.mntns, self.uplink)
        _remove_cgroups(self.netns)

    def _net_up(self) -> None:
        _net_up(self.netns, self.uplink, self.address, self.network)

    def _mounts_up(self) -> None:
        for d in ("run", "etc-libvirt", "var-lib-libvirt", "var-log-libvirt",
                  "var-cache-libvirt", "state"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc-libvirt"
        shutil.copytree("/etc/libvirt", etc, dirs_exist_ok=True, ignore=_libvirt_state)
        self.ca.host_files(etc / "pki", self.cert_cn, self.address)
        with open(etc / "libvirtd.conf", "a") as f:
            f.write(libvirtd_tls_conf(self.address, PKI_DIR, allowed_dns(self.tag))
                    + f'host_uuid = "{uuid.uuid4()}"\n')
        with open(etc / "qemu.conf", "a") as f:
            f.write(f'\nmigration_host = "{self.address}"\n'
                    f'default_tls_x509_cert_dir = "{PKI_DIR}/qemu"\ndefault_tls_x509_verify = 1\n')
        self.mntns.touch()
        sh("unshare", f"--mount={self.mntns}", "--propagation", "private", "true")
        binds = "".join(
            f" && mount --bind {self.root / d.strip('/').replace('/', '-')} {d}"
            for d in LIBVIRT_DIRS)
        if self.pool_size:
            self.pool_dir.mkdir(parents=True, exist_ok=True)
            binds += f" && mount -t tmpfs -o size={self.pool_size},mode=0755 {self.netns}-pool {self.pool_dir}"
        sh("nsenter", f"--mount={self.mntns}", "sh", "-c",
           f"mount -t tmpfs -o mode=0755 {self.netns}-run /run && mkdir -p /run/libvirt /run/lock"
           + binds)

    def _libvirt_up(self) -> None:
        piddir = self.root / "run"
        self.run("virtlogd", "-d", "-p", str(piddir / "virtlogd.pid"))
        self.pids["virtlogd"] = _read_pid(piddir / "virtlogd.pid")
        self.run("libvirtd", "-d", "--listen", "-p", str(piddir / "libvirtd.pid"))
        self.pids["libvirtd"] = _read_pid(piddir / "libvirtd.pid")
        deadline = time.monotonic() + 30
        while self.run("virsh", "-c", self.libvirt_uri, "hostname", check=False,
                       timeout=10).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd of simulated host {self.name} did not answer on "
                                   f"{self.libvirt_uri}; see {self.root}/var-log-libvirt")
            time.sleep(0.2)


def peer_cn(tag: str, name: str) -> str:
    """The certificate name of simulated host ``name`` of run ``tag``."""
    return f"nodeagent-peer-{tag}-{name}"


def test_client_cn(tag: str) -> str:
    return f"nodeagent-test-{tag}"


def allowed_dns(tag: str) -> list[str]:
    """Who a run's libvirtds let in: its hosts and its test process (not just any holder
    of a certificate of the CA)."""
    return [pki.subject(peer_cn(tag, "*")), pki.subject(test_client_cn(tag))]


def libvirtd_tls_conf(address: str, pki_dir: str, dns: list[str]) -> str:
    """libvirtd.conf lines: TLS only on ``address``, a client certificate of the CA in
    ``pki_dir`` with a DN in ``dns`` required; nothing listens on plain TCP."""
    return (f'\nlisten_tls = 1\nlisten_tcp = 0\nlisten_addr = "{address}"\nauth_tls = "none"\n'
            f'ca_file = "{pki_dir}/cacert.pem"\ncert_file = "{pki_dir}/servercert.pem"\n'
            f'key_file = "{pki_dir}/serverkey.pem"\ntls_no_verify_certificate = 0\n'
            f'tls_allowed_dn_list = {json.dumps(dns)}\n')


def _libvirt_state(d: str, names: list[str]) -> set[str]:
    """What a simulated host must not inherit from this machine's /etc/libvirt: its
    persistent domains and secrets (a fresh host starts with neither), only the config."""
    if d == "/etc/libvirt":
        return {"secrets"} & set(names)
    if d == "/etc/libvirt/qemu":
        return {n for n in names if n.endswith(".xml") or n == "autostart"}
    return set()


def _net_up(netns: str, uplink: str, address: str, network: TestNetwork) -> None:
    """A network namespace whose eth0 (``address``) hangs on the test bridge by ``uplink``."""
    sh("ip", "netns", "add", netns)
    sh("ip", "link", "add", uplink, "type", "veth", "peer", "name", "eth0", "netns", netns)
    sh("ip", "link", "set", uplink, "master", network.name, "up")
    ns = ("ip", "-n", netns)
    sh(*ns, "addr", "add", f"{address}/{network.net.prefixlen}", "dev", "eth0")
    sh(*ns, "link", "set", "eth0", "up")
    sh(*ns, "link", "set", "lo", "up")
    sh(*ns, "route", "add", "default", "via", network.gateway)


def _private_ns_dir() -> None:
    NS_DIR.mkdir(parents=True, exist_ok=True)
    if not mounts.is_mounted(str(NS_DIR)):  # ns files can only be bound on a private mount
        sh("mount", "--bind", str(NS_DIR), str(NS_DIR))
        sh("mount", "--make-private", str(NS_DIR))


def _read_pid(path: Path, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            time.sleep(0.05)
    raise RuntimeError(f"no pid file {path}")


def _guest_pids(mntns: Path) -> list[int]:
    """PIDs of the guests whose pid files a simulated host's libvirtd keeps in its private /run."""
    r = subprocess.run(["nsenter", f"--mount={mntns}", "sh", "-c", "cat /run/libvirt/qemu/*.pid"],
                       capture_output=True, text=True)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def _remove_ns(netns: str, mntns: Path | None, uplink: str) -> None:
    if mntns is not None and mntns.exists():
        sh("umount", str(mntns), check=False)
        mntns.unlink(missing_ok=True)
    sh("ip", "netns", "del", netns, check=False)
    sh("ip", "link", "del", uplink, check=False)


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _remove_cgroups(parent: str) -> None:
    """The agent's container cgroup parent (named after the host's netns) in every
    hierarchy. Containers a failed test left there are killed by the PIDs their cgroups
    list (their conmon exits with them), then the cgroups go, children first."""
    for procs in CGROUP_ROOT.glob(f"pids/{parent}/*/cgroup.procs"):
        for pid in procs.read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    deadline = time.monotonic() + 10
    dirs = sorted((p for p in list(CGROUP_ROOT.glob(f"*/{parent}/*")) + list(CGROUP_ROOT.glob(f"*/{parent}"))
                   if p.is_dir()),  # not the control files in them: rmdir fails on those until the deadline
                  key=lambda p: -len(p.parts))
    for d in dirs:
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)


def _cgroup_names(tag: str) -> list[str]:
    return sorted({str(p) for p in CGROUP_ROOT.glob(f"*/{PREFIX}{tag}-*")})


def _run_names(tag: str) -> list[str]:
    out = sh("ip", "-o", "link", "show", check=False).stdout
    links = [l.split(":")[1].strip().split("@")[0] for l in out.splitlines()]
    nss = [l.split()[0] for l in sh("ip", "netns", "list", check=False).stdout.splitlines()]
    mnts = [str(p) for p in NS_DIR.glob(f"{PREFIX}{tag}-*.mnt")] if NS_DIR.exists() else []
    return sorted({n for n in links + nss if n.startswith(PREFIX + tag)}) + mnts


def leftovers(tag: str) -> list[str]:
    """Names of namespaces, links, mount-namespace files and cgroups of run ``tag`` still present."""
    return _run_names(tag) + _cgroup_names(tag)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def clean_leftovers() -> None:
    """Remove, by name, what runs whose owner process has died left behind (their daemons
    died with them or are ended by the PIDs in their pid files). Live runs are left alone."""
    if not NS_DIR.exists():
        return
    for owner in NS_DIR.glob(f"{PREFIX}*.owner"):
        tag = owner.stem[len(PREFIX):]
        try:
            pid, workdir = owner.read_text().split("\n", 1)
            if _alive(int(pid)):
                continue
        except ValueError:
            pass
        else:
            for pidfile in Path(workdir.strip()).glob("*/run/*.pid"):
                try:
                    terminate(int(pidfile.read_text().strip()))
                except (ValueError, OSError):
                    pass
            if (Path(workdir.strip()) / CEPH_DIR / "pids").exists():
                stop_ceph(Path(workdir.strip()) / CEPH_DIR)
        for mnt in NS_DIR.glob(f"{PREFIX}{tag}-*.mnt"):
            for pid in _guest_pids(mnt):  # the QEMUs its libvirtd started outlive it
                terminate(pid)
            _remove_ns(mnt.stem, mnt, mnt.stem)
        for name in _run_names(tag):
            sh("ip", "netns", "del", name, check=False)
            sh("ip", "link", "del", name, check=False)
        for cg in _cgroup_names(tag):
            _remove_cgroups(Path(cg).name)
        owner.unlink(missing_ok=True)


class Cluster:
    """N simulated hosts on one test bridge; a context manager that removes all of it.
    Each run has its own tag (in every name) and /24, so concurrent runs do not collide."""

    def __init__(self, workdir: Path, names=("h1", "h2"), *, ceph: bool = False, libvirt: bool = True):
        _private_ns_dir()
        clean_leftovers()
        while True:
            self.tag = f"{secrets.randbelow(0xfff):03x}"
            self.owner = NS_DIR / f"{PREFIX}{self.tag}.owner"
            try:
                with open(self.owner, "x") as f:
                    f.write(f"{os.getpid()}\n{workdir}")
                break
            except FileExistsError:
                continue
        self.network = TestNetwork(self.tag)
        self.ca = pki.TestCA(Path(workdir) / "pki-ca")
        self.client_pki = self.ca.client_files(Path(workdir) / "pki-client", test_client_cn(self.tag))
        self.hosts = [SimHost(n, self.network.address(i + 1), Path(workdir), self.network,
                              self.tag, ca=self.ca, client_pki=self.client_pki) for i, n in enumerate(names)]
        self.storage = StorageHost(self.network.address(0), Path(workdir), self.network,
                                   self.tag) if ceph else None
        self.libvirt = libvirt  # False: bare hosts, no libvirt daemons running (SimHost.start)

    @property
    def ceph(self):
        """The storage host's Ceph (testbed.ceph_cluster.CephEnv), or None without ceph=True."""
        return self.storage.env if self.storage else None

    def __enter__(self) -> "Cluster":
        self.network.up()
        try:
            if self.storage:
                self.storage.begin_start()  # about 18 s: the hosts start meanwhile
            for h in self.hosts:
                h.start(libvirt=self.libvirt)
            if self.storage:
                self.storage.wait_started()
                for h in self.hosts:
                    h.extra_pools[SHARED_POOL] = self.storage.pool_options()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def container_subnet(self, index: int) -> str:
        """A /27 of 198.19.0.0/16 for host ``index``, distinct per run and host."""
        base = self.network.net.network_address.packed[2]  # this run's /24 index
        net = ipaddress.ip_network(f"198.19.{base}.0/24")
        return str(list(net.subnets(new_prefix=27))[index % 8])

    def start_agents(self) -> None:
        """A real agent in every host: an admin token per host, and on every host an admin
        token named after each other host, which that host's ``[peers]`` entry carries."""
        for i, h in enumerate(self.hosts):
            h.write_agent_config(self.container_subnet(i), {})
            h.admin_token = h.agent_cli("token", "create", "admin", "--role", "admin").stdout.strip()
        peers = {h.name: {} for h in self.hosts}
        for h in self.hosts:
            for other in self.hosts:
                if other is not h:
                    tok = other.agent_cli("token", "create", h.name, "--role", "peer").stdout.strip()
                    peers[h.name][other.name] = (other.agent_url, tok)
        for i, h in enumerate(self.hosts):
            h.write_agent_config(self.container_subnet(i), peers[h.name])
            h.start_agent()

    def __exit__(self, *exc) -> None:
        errors = []
        for h in self.hosts:
            try:
                h.stop()
            except Exception as e:  # keep stopping the others; report at the end
                errors.append(f"{h.name}: {e}")
        if self.storage:
            try:
                self.storage.stop()
            except Exception as e:
                errors.append(f"storage host: {e}")
        self.network.down()
        self.owner.unlink(missing_ok=True)
        if errors:
            raise RuntimeError("simulated hosts not fully removed: " + "; ".join(errors))


@contextlib.contextmanager
def running_cluster(prefix: str, *, pool_sizes: dict | None = None, ceph: bool = False):
    """A started Cluster (agents up) in a fresh work dir under /var/tmp; on exit everything it
    made is checked gone, the agents' logs are kept in the temp dir (``prefix``-HOST-agent.log)
    and the work dir removed. Fails (not skips) when a tool is missing."""
    for tool in ("libvirtd", "virtlogd", "nsenter", "unshare", "ip", "qemu-img"):
        if not shutil.which(tool):
            raise RuntimeError(f"{tool} is missing: run scripts/setup-host")
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/var/tmp"))
    os.chmod(work, 0o755)  # QEMU runs as libvirt-qemu: the hosts' dirs must be reachable
    try:
        c = Cluster(work, ceph=ceph)
        for h in c.hosts:
            h.pool_size = (pool_sizes or {}).get(h.name, h.pool_size)  # before the hosts start
        with c:
            c.start_agents()
            yield c
        assert leftovers(c.tag) == []
        assert not (work / CEPH_DIR).exists()  # Ceph's daemons were stopped, their dir removed
    finally:
        for log in work.glob("*/agent.log"):  # kept for a look after a failure
            shutil.copyfile(log, Path(tempfile.gettempdir()) / f"{prefix}-{log.parent.name}-agent.log")
        shutil.rmtree(work, ignore_errors=True)
