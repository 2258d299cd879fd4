"""``containers.Runtime`` on runc, with conmon as the per-container monitor.

Layout under ``state_dir``::

    containers/<name>/rootfs/       overlayfs mount of the spec's layers + upper dir
    containers/<name>/bundle/       config.json, hosts, hostname, resolv.conf
    containers/<name>/ctr.log       stdout/stderr (conmon's k8s-file format)
    containers/<name>/exit/<name>   exit code, written by conmon when the process ends
    runc/                           runc --root (its own, so ids never clash with others')

The agent keeps no process per container: conmon (detached, own session) runs
``runc create``, holds the container's stdio, writes the log and the exit file; the agent
then calls ``runc start``. All state is read back from the DB, runc's state.json and the
exit file, so a new RuncRuntime over the same state_dir and DB re-adopts everything.
create() prepares (mount, network, bundle); start() creates the runc container.

Where systemd is PID 1, each conmon starts in a transient scope of its own
(``systemd-run --scope``, unit ``nodeagent-conmon-<name>-<random>.scope``): the monitor and
the container it runs are then outside the agent's service cgroup, and stopping, restarting
or upgrading the agent's unit never kills them (``monitor_scope_argv``). There runc also uses
its systemd cgroup driver (``cgroup_driver`` "auto"): each container is a transient scope of
its own, ``<cgroup_parent>-<name>.scope`` in ``<cgroup_parent>.slice`` (cgroupsPath
``nodeagent.slice:nodeagent:<name>``), which systemd accounts and keeps across agent restarts;
elsewhere (or with "cgroupfs") runc writes ``<controller>/<cgroup_parent>/<name>`` itself. A
container keeps the placement its bundle names until it is started again, so containers made
under the other driver (an agent upgrade) are still read, stopped and removed.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import json
import logging
import os
import re
import select
import selectors
import shutil
import signal as signals
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from agent.errors import (CommandFailed, Conflict, InvalidInput, NotFound, Unavailable,
                          Unsupported)
from agent.state import Database
from containers import bandwidth, bundle, cgroups, files, idmap as idmaps, validate
from containers.network import NETNS_DIR, Network, short_hash
from containers.runtime import (ContainerInfo, ContainerSpec, ExecOptions, ExecResult, IdMap, Limits,
                                NetworkSpec, PortMap, Rootfs, RootfsImage, VolumeMount)
from containers.security import Security
from storage import mounts

BUNDLES_MODE = 0o711  # not listable; traversable by a user namespace's root (config.json itself is 0600)
SCHEMA_STEPS = [
    """CREATE TABLE containers (
         name TEXT PRIMARY KEY, spec TEXT NOT NULL, limits TEXT NOT NULL,
         ip TEXT, created_at REAL NOT NULL);""",
]
LOG_SIZE_MAX = 64 * 1024 * 1024  # 64 MiB of stdout/stderr per container; beyond it conmon truncates the file
SYNC_TIMEOUT = 30.0  # seconds to wait for conmon to report `runc create` done
START_TIMEOUT = 60.0  # seconds to wait for a created container's init to take the start (_release_init)
EXEC_FIFO = "exec.fifo"  # runc's: in <runc root>/<id>, where a created container's init waits for its start
EXIT_GRACE = 5.0  # seconds to wait for the exit file after SIGKILL
EXEC_OUTPUT_BYTES = 1024 * 1024  # 1 MiB of stdout and of stderr kept per exec; the rest is read and dropped
EXEC_TIMEOUT_EXIT = 124  # the exit code of an exec killed at its timeout (as coreutils' timeout(1))
POLL = 0.01
log = logging.getLogger(__name__)
# runc update's error when the memory cgroup cannot shrink below what the container uses (v1: EBUSY)
MEMORY_BUSY_RE = re.compile(r"unable to set memory limit to \d+ \(current usage: (\d+)")


def spec_to_json(spec: ContainerSpec) -> str:
    return json.dumps(dataclasses.asdict(spec))


def spec_from_json(text: str) -> ContainerSpec:
    d = json.loads(text)
    net = d["network"]
    return ContainerSpec(
        name=d["name"], rootfs=Rootfs(tuple(d["rootfs"]["lowerdirs"]), d["rootfs"]["upperdir"],
                                      d["rootfs"]["workdir"], d["rootfs"].get("quota_bytes")),
        command=tuple(d["command"]), env=d["env"], workdir=d["workdir"], user=d["user"],
        hostname=d["hostname"], limits=Limits(**d["limits"]),
        network=NetworkSpec(net["mode"], tuple(PortMap(**p) for p in net["ports"])),
        userns=d["userns"], idmap=IdMap(**d["idmap"]) if d.get("idmap") else None,
        image_config=d.get("image_config") or {},
        bandwidth=bandwidth.Bandwidth.from_dict(d.get("bandwidth")),
        cap_add=tuple(d.get("cap_add") or ()), cap_drop=tuple(d.get("cap_drop") or ()),
        volumes=tuple(VolumeMount(**v) for v in d.get("volumes") or ()), tty=bool(d.get("tty")))


SCOPE_PREFIX = "nodeagent-conmon-"  # transient scope units of the monitors (systemd hosts)
CGROUP_DRIVERS = ("auto", "systemd", "cgroupfs")  # runc's cgroup manager: see the module's docstring
# Every container's init gets a session keyring of its own (runc), charged to the host uid
# its root maps to: one uid for all user-namespaced containers of an id map. The kernel's
# default quota for a non-root uid (200 keys, 20000 bytes) stops container creation at about
# 200 containers ("unable to create session key: disk quota exceeded"); these floors fit a
# few thousand (LXD's production settings are 2000 keys and 2 MB).
KEYS_DIR = "/proc/sys/kernel/keys"
KEY_QUOTA = {"maxkeys": 20000, "maxbytes": 2_000_000}


def ensure_key_quota(keys_dir: str = KEYS_DIR) -> dict[str, int]:
    """Raise the kernel's per-uid key quota (kernel.keys.maxkeys, maxbytes) to KEY_QUOTA
    where it is lower, never lowering it; what was raised. Privileged (sysctl); a host
    where it cannot be written keeps its quota (logged): containers past it fail to start
    with the kernel's message."""
    raised = {}
    for key, floor in KEY_QUOTA.items():
        path = os.path.join(keys_dir, key)
        try:
            with open(path) as f:
                if int(f.read()) >= floor:
                    continue
            with open(path, "w") as f:
                f.write(str(floor))
            raised[key] = floor
        except (OSError, ValueError) as e:
            log.warning("cannot raise the kernel's key quota: containers past it fail to start",
                        extra={"key": f"kernel.keys.{key}", "error": str(e)})
    return raised


def systemd_booted(run_dir: str = "/run/systemd/system") -> bool:
    """True when systemd is the init system (sd_booted(3)'s test)."""
    return os.path.isdir(run_dir)


def monitor_scope_argv(name: str, systemd_run: str | None) -> list[str]:
    """The argv prefix that starts a container's monitor in its own transient scope:
    ``systemd-run --scope`` registers the scope and then execs the monitor in place (its
    fds and environment, the sync pipe, go through unchanged). Empty without systemd.
    The random suffix keeps a restarted container clear of its previous, not yet collected
    scope."""
    if not systemd_run:
        return []
    unit = f"{SCOPE_PREFIX}{name}-{os.urandom(4).hex()}"
    return [systemd_run, "--scope", "--quiet", "--collect", f"--unit={unit}",
            f"--description=nodeagent container {name} (conmon)"]


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (fields[0] is the state), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


def _proc_start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return None
    return int(fields[19])  # field 22 of stat: starttime in clock ticks


class RuncRuntime:
    """Containers run by runc under conmon. Thread-safe (one lock per container name)."""

    uses_host_network = True  # veths on the host bridge, filtered by its nft tables

    def __init__(self, state_dir: str, db: Database, *, bridge: str = "nabr0",
                 subnet: str = "10.88.0.0/24", nat: bool = True,
                 cgroup_parent: str = bundle.CGROUP_PARENT, runc: str = "runc",
                 conmon: str = "conmon", exec_output_bytes: int = EXEC_OUTPUT_BYTES,
                 network: Network | None = None, security: Security | None = None,
                 idmap: IdMap | None = None, cgroup_driver: str = "auto"):
        """``network``: the host's bridge network, shared with the agent's VM addresses (one
        lease table, one bridge); without it the runtime makes its own from ``bridge``,
        ``subnet`` and ``nat`` (tests, benches). ``security``: capabilities, seccomp profile
        and no_new_privileges of every container (None: Docker's defaults,
        containers/security.py). ``idmap``: the host range user-namespaced containers map to
        (None: /etc/subuid's ``nodeagent`` entry, see containers.idmap). ``cgroup_driver``:
        auto (systemd where systemd is PID 1, else cgroupfs), systemd or cgroupfs."""
        found = {tool: shutil.which(path) for tool, path in (("runc", runc), ("conmon", conmon))}
        self.systemd_run = shutil.which("systemd-run") if systemd_booted() else None
        if cgroup_driver not in CGROUP_DRIVERS:
            raise InvalidInput(f"cgroup_driver must be one of {', '.join(CGROUP_DRIVERS)}, got {cgroup_driver!r}")
        if cgroup_driver == "systemd" and not self.systemd_run:
            raise Unavailable("cgroup_driver \"systemd\" needs systemd as PID 1 (and systemd-run): use \"auto\" "
                              "or \"cgroupfs\" on this host")
        self.systemd_cgroups = cgroup_driver == "systemd" or (cgroup_driver == "auto" and bool(self.systemd_run))
        if self.systemd_cgroups and not validate.NAME_RE.fullmatch(cgroup_parent):
            raise InvalidInput(f"cgroup_parent {cgroup_parent!r} cannot name a systemd slice (letters, digits, "
                               "_ . - only): change it or set [containers] cgroup_driver = \"cgroupfs\"")
        for tool, path in found.items():
            if path is None:
                raise Unavailable(f"{tool} is not installed: apt-get install {tool} "
                                  "(or run scripts/setup-host)")
        self.runc: str = found["runc"] or ""
        ensure_key_quota()
        self.conmon: str = found["conmon"] or ""
        self.state_dir = os.path.abspath(state_dir)
        self.db = db
        self.exec_output_bytes = exec_output_bytes
        self.security = security or Security()
        self.rtag = network.rtag if network is not None else short_hash(self.state_dir, 4)
        self.cgroup_parent = cgroup_parent
        self.runc_root = os.path.join(self.state_dir, "runc")
        bundles = os.path.join(self.state_dir, "containers")
        os.makedirs(bundles, mode=BUNDLES_MODE, exist_ok=True)
        os.chmod(bundles, BUNDLES_MODE)
        os.makedirs(self.runc_root, exist_ok=True)
        os.makedirs(self._sock_dir(), exist_ok=True)  # conmon needs it
        self.private_views = self._bind_bundles(bundles)
        if self.private_views and not mounts.mounts_under(NETNS_DIR):
            try:  # as `ip netns add` does: then the views can leave the other netns files out
                os.makedirs(NETNS_DIR, exist_ok=True)
                mounts.bind_self(NETNS_DIR, shared=True)
            except CommandFailed as e:
                log.warning("cannot make %s a mount of its own (%s): each container's monitor "
                            "still sees every netns file", NETNS_DIR, e)
        db.apply_schema("containers", SCHEMA_STEPS)
        self.net = network or Network(db, bridge=bridge, subnet=subnet, nat=nat, rtag=self.rtag)
        self.view_runc = self._write_view_runc()  # after self.net: it names the netns files
        self._lock = threading.Lock()  # guards _locks only
        self._locks: dict[str, threading.RLock] = {}  # one per container name
        self.idmap = idmap or idmaps.host_idmap()
        self._userns_fds: dict[IdMap, int] = {}  # one user namespace per map, for id-mapped layers
        self.detached_layers = True  # False: the pre-6.15 kernels' way (storage.mounts.mount_overlay_idmapped)

    @staticmethod
    def _bind_bundles(bundles: str) -> bool:
        """Make ``containers/`` a mount of its own so that each monitor can start in a view
        without the other containers' mounts (``_in_private_view``). Not where mounts already
        sit right below it (containers of an agent before this one, until the host reboots):
        binding over them would hide them. Whether views are used."""
        if mounts.is_mounted(bundles):
            return True  # an earlier agent's, with the running containers' mounts below it
        if mounts.mounts_under(bundles):
            log.warning("containers under %s were mounted before it was a mount of its own: new "
                        "containers start in the host's mount namespace (a create then costs more "
                        "with every container) until the host reboots", bundles)
            return False
        try:
            mounts.bind_self(bundles)
        except CommandFailed as e:
            log.warning("cannot make %s a mount of its own (%s): containers start in the host's "
                        "mount namespace", bundles, e)
            return False
        return True

    def _hidden(self, name: str) -> list[tuple[str, list[str]]]:
        """What a view of ``name`` leaves out: every container's tree but its own, every netns
        file but its own (storage.mounts.enter_private_view's ``hidden``)."""
        hidden = [(os.path.join(self.state_dir, "containers"), [self._dir(name)])]
        if mounts.is_mounted(NETNS_DIR):  # every bridged container's netns file is a mount there
            netns = self.net.netns_path(name)
            hidden.append((NETNS_DIR, [netns] if os.path.exists(netns) else []))
        return hidden

    def _write_view_runc(self) -> str:
        """The runtime path conmon gets: runc itself, or (views on) a wrapper that runs each
        `runc create` in a view of its own (storage.mounts.write_view_wrapper), written once
        here. conmon itself stays in the agent's namespace: it lives as long as the container,
        and a view it lived in would keep a copy of every mount the host had when it started
        (another container's disk, a migration's volume)."""
        if not self.private_views:
            return self.runc
        path = os.path.join(self.state_dir, "runc-view")
        mounts.write_view_wrapper(path, self.runc, os.path.join(self.state_dir, "containers"),
                                  os.path.join(self.state_dir, "view"),
                                  netns_dir=NETNS_DIR if mounts.is_mounted(NETNS_DIR) else None,
                                  netns_prefix=self.net.netns_name(""), busybox=shutil.which("busybox"))
        return path

    @contextlib.contextmanager
    def _private_view(self, name: str):
        """A runner (``run(fn, *args)`` -> fn's result) on a thread of its own whose mount
        namespace holds the host's mounts minus every container's but ``name``'s
        (storage.mounts.enter_private_view): the processes ``fn`` starts read and copy a
        mount table that does not grow with the containers on the host. Only for processes
        that end before the block does (`runc start`): one that outlived it would keep a copy
        of the host's mounts of that moment alive. Where views are off (``private_views``)
        or this one cannot be made, ``fn`` runs here, in the agent's namespace. The thread
        ends on leaving the block."""
        def here(fn, *args):
            return fn(*args)

        if not self.private_views:
            yield here
            return
        hidden = self._hidden(name)
        with cf.ThreadPoolExecutor(1, thread_name_prefix=f"view-{name}") as view:
            try:
                view.submit(mounts.enter_private_view, hidden).result()
            except CommandFailed as e:  # that thread's namespace is unusable: it ends unused
                log.warning("no private mount view for %s (%s): it starts in the agent's namespace", name, e)
                yield here
                return
            yield lambda fn, *args: view.submit(fn, *args).result()

    @classmethod
    def from_config(cls, settings: Mapping[str, Any], *, state_dir: str, db: Database,
                    network: Network | None) -> RuncRuntime:
        """agent.registry's uniform construction from ``[containers]`` (``cgroup_parent``,
        ``exec_output_bytes``, ``seccomp_profile``, ``no_new_privileges``): containers' state
        under ``state_dir``, records in ``db``, addresses from the host's ``network`` (None:
        one of the defaults, see __init__). InvalidInput for a bad seccomp profile file."""
        extra = {"cgroup_parent": settings["cgroup_parent"]} if settings.get("cgroup_parent") else {}
        if settings.get("cgroup_driver"):
            extra["cgroup_driver"] = settings["cgroup_driver"]
        security = Security.from_settings(settings.get("seccomp_profile") or "default",
                                          bool(settings.get("no_new_privileges")))
        return cls(state_dir, db, network=network, exec_output_bytes=settings["exec_output_bytes"],
                   security=security, idmap=idmaps.host_idmap(settings.get("idmap")), **extra)

    def _name_lock(self, name: str) -> threading.RLock:
        """Operations on one container are serialised; different containers run in parallel
        (a 10 s stop of one never blocks another)."""
        with self._lock:
            return self._locks.setdefault(name, threading.RLock())

    # -- paths ----------------------------------------------------------------------------
    def _dir(self, name: str) -> str:
        return os.path.join(self.state_dir, "containers", name)

    def _rootfs(self, name: str) -> str:
        return os.path.join(self._dir(name), "rootfs")

    def _bundle(self, name: str) -> str:
        return os.path.join(self._dir(name), "bundle")

    def _log(self, name: str) -> str:
        return os.path.join(self._dir(name), "ctr.log")

    def _exit_file(self, name: str) -> str:
        return os.path.join(self._dir(name), "exit", name)

    def _sock_dir(self) -> str:
        """conmon's --socket-dir-path: it links ``<dir>/<name>`` to the bundle (whose
        ``attach`` socket would be too long a path for a socket address)."""
        return os.path.join(self.state_dir, "sock")

    # -- cgroups ----------------------------------------------------------------------------
    def _cgroup(self, name: str) -> tuple[str, str]:
        """Where the container's cgroups are, as (parent dir, leaf) for containers.cgroups:
        its scope under the systemd driver, unless only a cgroupfs dir exists (made before)."""
        fs = (self.cgroup_parent, name)
        if not self.systemd_cgroups:
            return fs
        sd = (cgroups.slice_dir(self.cgroup_parent), cgroups.scope_unit(self.cgroup_parent, name))
        return fs if cgroups.cgroup_dirs(*fs) and not cgroups.cgroup_dirs(*sd) else sd

    def _cgroups_path(self, name: str) -> str:
        """runc's cgroupsPath of a container (re)created now."""
        if self.systemd_cgroups:
            return cgroups.systemd_cgroups_path(self.cgroup_parent, name)
        return cgroups.cgroups_path(self.cgroup_parent, name)

    def _systemd_bundle(self, name: str) -> bool:
        """Whether the container's bundle asks for runc's systemd driver (slice:prefix:name)."""
        try:
            with open(os.path.join(self._bundle(name), "config.json")) as f:
                return ":" in (json.load(f).get("linux", {}).get("cgroupsPath") or "")
        except (OSError, ValueError, AttributeError):
            return False

    # -- runc -----------------------------------------------------------------------------
    def _runc(self, *args: str, check: bool = True, input: str | None = None,
              timeout: float | None = 60) -> subprocess.CompletedProcess:
        argv = [self.runc, "--root", self.runc_root, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, input=input,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise CommandFailed(f"runc {args[0]} failed: {_runc_message(proc.stderr)}",
                                argv=argv, returncode=proc.returncode, stderr=proc.stderr)
        return proc

    def _runc_state(self, name: str) -> dict | None:
        try:
            with open(os.path.join(self.runc_root, name, "state.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _row(self, name: str):
        row = self.db.one("SELECT * FROM containers WHERE name=?", (name,))
        if row is None:
            raise NotFound(f"container {name!r} does not exist")
        return row

    def _read_exit(self, name: str) -> int | None:
        try:
            with open(self._exit_file(name)) as f:
                text = f.read().strip()
        except OSError:
            return None
        return int(text) if text.lstrip("-").isdigit() else None

    def _status(self, name: str) -> tuple[str, int | None, int | None]:
        """(state, pid, exit_code) from the exit file and runc's state.json."""
        code = self._read_exit(name)
        if code is not None:
            return "stopped", None, code
        st = self._runc_state(name)
        if st is None:
            return "created", None, None
        pid = st.get("init_process_pid")
        if pid and _proc_start_time(pid) == st.get("init_process_start"):
            if os.path.exists(os.path.join(self.runc_root, name, "exec.fifo")):
                return "created", pid, None
            if self._frozen(name):
                return "paused", pid, None
            return "running", pid, None
        # the process is gone; conmon writes the exit file a moment later, unless it died too
        # (a host reboot, or its kill): then no exit file comes and nothing is worth a wait
        if not self._conmon_alive(name):
            code = self._read_exit(name)  # it may have written it just before it exited
            return "stopped", None, code
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            code = self._read_exit(name)
            if code is not None:
                return "stopped", None, code
            time.sleep(POLL)
        return "stopped", None, None

    def _conmon_alive(self, name: str) -> bool:
        """Whether the container's conmon (its pid file's) still runs; True when unknown (no
        pid file yet): the caller then waits for the exit file as it would for a live one."""
        try:
            with open(os.path.join(self._dir(name), "conmon.pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return True
        fields = _stat_fields(pid)
        if fields is None or fields[0] == "Z":
            return False
        try:
            with open(f"/proc/{pid}/comm") as f:
                return f.read().strip() == "conmon"  # a reused pid is not our conmon
        except OSError:
            return False

    def _frozen(self, name: str) -> bool:
        rel = os.path.join(*self._cgroup(name))
        if cgroups.is_v2():
            path = os.path.join(cgroups.CGROUP_ROOT, rel, "cgroup.freeze")
            want = "1"
        else:
            path = os.path.join(cgroups.CGROUP_ROOT, "freezer", rel, "freezer.state")
            want = "FROZEN"
        try:
            with open(path) as f:
                return f.read().strip() == want
        except OSError:
            return False

    def _info(self, row) -> ContainerInfo:
        state, pid, code = self._status(row["name"])
        spec = json.loads(row["spec"])
        m = IdMap(**spec["idmap"]) if spec.get("idmap") else bundle.LEGACY_IDMAP
        return ContainerInfo(row["name"], state, pid, code, row["ip"], m if spec["userns"] else None)

    # -- create ---------------------------------------------------------------------------
    def create(self, spec: ContainerSpec) -> ContainerInfo:
        """Mount the rootfs, set up networking and write the bundle. Conflict on a name
        clash or a taken port; on any failure everything made here is removed."""
        validate.check_spec(spec)
        if spec.userns:
            spec = dataclasses.replace(spec, idmap=self.idmap)
        for d in spec.rootfs.lowerdirs:
            if not os.path.isdir(d):
                raise InvalidInput(f"image layer {d} does not exist: import the image "
                                   "first (unknown image?)")
        with self._name_lock(spec.name):
            if self.db.one("SELECT 1 FROM containers WHERE name=?", (spec.name,)) or \
                    os.path.exists(self._dir(spec.name)):
                raise Conflict(f"container {spec.name!r} already exists: pick another name "
                               "or delete it first")
            try:
                self.db.execute("INSERT INTO containers(name, spec, limits, created_at) "
                                "VALUES(?,?,?,?)", (spec.name, spec_to_json(spec),
                                                    json.dumps(dataclasses.asdict(spec.limits)),
                                                    time.time()))
            except sqlite3.IntegrityError:  # another agent process won the race
                raise Conflict(f"container {spec.name!r} already exists") from None
            try:
                ip = self._prepare(spec)
            except BaseException:
                self._release(spec.name)
                raise
            self.db.execute("UPDATE containers SET ip=? WHERE name=?", (ip, spec.name))
            return self._info(self._row(spec.name))

    def _prepare(self, spec: ContainerSpec) -> str | None:
        name = spec.name
        rootfs, bdir = self._rootfs(name), self._bundle(name)
        for d in (rootfs, bdir, os.path.dirname(self._exit_file(name))):
            os.makedirs(d, exist_ok=True)
        r = spec.rootfs
        for d in (r.upperdir, r.workdir):
            os.makedirs(d, exist_ok=True)
        if r.quota_bytes:
            self._mount_disk(spec)
        if spec.userns:
            self._prepare_userns(spec)
        self._mount_volumes(spec)
        self._mount_rootfs(spec)
        proc = bundle.resolve_process(spec)
        uid, gid = bundle.resolve_user(proc["user"], rootfs)
        _check_command(proc["args"][0], proc["env"].get("PATH", ""), proc["cwd"], rootfs)
        netns = ip = None
        if spec.network.mode == "bridge" and spec.userns:
            # joining a netns the host's user namespace owns fails from inside a new one:
            # runc makes the netns, start() wires it up (attach(pid=...))
            ip = self.net.reserve(name, spec.network.ports)
        elif spec.network.mode == "bridge":
            netns, ip = self.net.attach(name, spec.network.ports)
            self._shape(spec)
        self._write_config(spec, spec.limits, netns=netns, ip=ip, uid=uid, gid=gid)
        return ip

    def _prepare_userns(self, spec: ContainerSpec) -> None:
        """Container root is host uid ``spec.idmap.host_id``: it must reach the rootfs and
        bundle and own the top of the upper dir (so it can write to /). The layers are read
        through the overlay with the mounter's (host root's) credentials: they need no access."""
        m = spec.idmap or bundle.LEGACY_IDMAP
        for d in (self._dir(spec.name), self._rootfs(spec.name)):
            os.chmod(d, 0o711)
        for d in (self._rootfs(spec.name), self._bundle(spec.name)):
            blocked = _untraversable(d)
            if blocked:
                raise Unsupported(f"user namespaces need {blocked} to be traversable by "
                                  f"uid {m.host_id}: chmod o+x {blocked} (or put "
                                  "state_dir under such a dir)")
        os.chown(spec.rootfs.upperdir, m.host_id, m.host_id)

    def _disk_image(self, name: str) -> str:
        return os.path.join(self._dir(name), "disk.img")

    def _mount_disk(self, spec: ContainerSpec) -> None:
        """Put the upper and work dirs on a filesystem of ``rootfs.quota_bytes`` (a sparse ext4
        image in the container's dir, loop-mounted at their parent): the container's writes
        end in ENOSPC there, the host's filesystem keeps the rest. Made at create (with what
        the upper dir already holds: a migration's), mounted again after a reboot."""
        r = spec.rootfs
        top = os.path.dirname(r.upperdir)
        if not r.quota_bytes or mounts.is_mounted(top):
            return
        img = self._disk_image(spec.name)
        if not os.path.exists(img):
            mounts.make_fs_image(img, r.quota_bytes)
            if os.listdir(r.upperdir):
                self._copy_in(img, r.upperdir)
        mounts.mount_fs_image(img, top)
        os.chmod(top, 0o700)
        os.makedirs(r.upperdir, mode=0o755, exist_ok=True)
        os.makedirs(r.workdir, mode=0o700, exist_ok=True)

    def _volume_dir(self, name: str, i: int) -> str:
        return os.path.join(self._dir(name), "volumes", str(i))

    def _mount_volumes(self, spec: ContainerSpec) -> None:
        """Loop-mount each volume's filesystem under the container's dir (bind-mounted into
        the container by its config); under a user namespace its top dir is given to the
        container's root when host root owns it (a fresh volume). Made at create, again after
        a reboot; released with the container's dir."""
        m = (spec.idmap or bundle.LEGACY_IDMAP) if spec.userns else None
        for i, v in enumerate(spec.volumes):
            point = self._volume_dir(spec.name, i)
            if mounts.is_mounted(point):
                continue
            os.makedirs(point, mode=0o711, exist_ok=True)
            os.chmod(os.path.dirname(point), 0o711)
            if not v.readonly:
                mounts.grow_fs_if_short(v.source)  # a grow the kernel could not do while it was mounted
            # read-only on the host: a bind mount's "ro" alone is undone by the container's root,
            # who owns the mount namespace it is made in
            mounts.mount_fs_image(v.source, point, readonly=v.readonly)
            st = os.stat(point)
            if m is not None and st.st_uid == 0 and not v.readonly:
                os.chown(point, m.host_id, m.host_id)

    def _copy_in(self, img: str, upper: str) -> None:
        """Move what ``upper`` holds (a migration's stream, received before the create) onto the
        new filesystem: owners, modes, xattrs (overlay whiteouts and opaque dirs) kept."""
        tmp = os.path.join(os.path.dirname(img), "disk-in")
        os.makedirs(tmp, exist_ok=True)
        mounts.mount_fs_image(img, tmp)
        try:
            r = subprocess.run(["cp", "-a", "--sparse=always", upper, tmp + "/"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise InvalidInput(f"the rootfs does not fit its size limit: {r.stderr.strip()[-300:]}")
        finally:
            mounts.unmount(tmp)
            os.rmdir(tmp)
        shutil.rmtree(upper)
        os.mkdir(upper, 0o755)

    def _mount_rootfs(self, spec: ContainerSpec) -> None:
        """The overlay at rootfs/: under a user namespace, the layers through id-mapped mounts
        of the container's map (root's files are container root's, without a copy)."""
        r = spec.rootfs
        if not spec.userns:
            mounts.mount_overlay(list(r.lowerdirs), r.upperdir, r.workdir, self._rootfs(spec.name))
            return
        mounts.mount_overlay_idmapped(list(r.lowerdirs), r.upperdir, r.workdir, self._rootfs(spec.name),
                                      self._userns_fd(spec.idmap or bundle.LEGACY_IDMAP),
                                      os.path.join(self._dir(spec.name), "layers"), detached=self.detached_layers)

    def _userns_fd(self, m: IdMap) -> int:
        """A user namespace of map ``m`` (made once per runtime and map, kept open)."""
        with self._lock:
            fd = self._userns_fds.get(m)
            if fd is None:
                fd = self._userns_fds[m] = mounts.open_userns(m.host_id, m.size)
            return fd

    def _write_config(self, spec: ContainerSpec, limits: Limits, *, netns, ip, uid, gid):
        name = spec.name
        hostname = spec.hostname or name
        etc = bundle.etc_files_for(self._bundle(name), hostname=hostname, ip=ip,
                                   nameservers=bundle.host_nameservers()) \
            if spec.network.mode != "host" else {}
        m = (spec.idmap or bundle.LEGACY_IDMAP) if spec.userns else None
        _make_mountpoints(self._rootfs(name), etc, owner=m.host_id if m else None)
        cfg = bundle.build_config(
            spec, rootfs=self._rootfs(name), uid=uid, gid=gid, netns=netns,
            cgroups_path=self._cgroups_path(name),
            resources=cgroups.oci_resources(limits), hostname=hostname, etc_files=etc,
            security=self.security.with_caps(spec.cap_add, spec.cap_drop),
            volume_dirs=[self._volume_dir(name, i) for i in range(len(spec.volumes))])
        bundle.write_bundle(self._bundle(name), cfg)

    def volumes(self, name: str) -> tuple[VolumeMount, ...]:
        """containers.runtime.SupportsVolumes."""
        return spec_from_json(self._row(name)["spec"]).volumes

    def set_volumes(self, name: str, volumes) -> ContainerInfo:
        """containers.runtime.SupportsVolumes: replace the container's volumes while it is
        stopped (the old ones are unmounted, the new ones mounted and its config rewritten).
        On failure its volumes are as before."""
        with self._name_lock(name):
            row = self._row(name)
            state, _, _ = self._status(name)
            if state in ("running", "paused"):
                raise Conflict(f"container {name!r} is {state}: stop it first")
            old = spec_from_json(row["spec"])
            spec = dataclasses.replace(old, volumes=tuple(volumes))
            validate.check_volumes(spec)
            try:
                self._configure_volumes(spec, row)
            except BaseException:
                self._configure_volumes(old, row)
                raise
            self.db.execute("UPDATE containers SET spec=? WHERE name=?", (spec_to_json(spec), name))
            return self._info(self._row(name))

    def add_volume_live(self, name: str, volume: VolumeMount) -> ContainerInfo:
        """containers.runtime.SupportsLiveVolumes: the volume's filesystem is mounted on the
        host (a free slot under the container's dir; the others are left alone: a second mount
        of an image in use would corrupt it), a clone of that mount moved into the container's
        mount namespace at its path, then kept in the spec and config for the next start."""
        with self._name_lock(name):
            row = self._row(name)
            state, pid, _ = self._status(name)
            if state not in ("running", "paused") or not pid:
                raise Conflict(f"container {name!r} is {state}: it takes the volume at its next start")
            old = spec_from_json(row["spec"])
            spec = dataclasses.replace(old, volumes=old.volumes + (volume,))
            validate.check_volumes(spec)
            if mounts.fs_image_mounts(volume.source):
                raise Conflict(f"the volume's filesystem {volume.source} is mounted already")
            i = len(old.volumes)
            while mounts.is_mounted(self._volume_dir(name, i)):
                i += 1  # a slot a live detach left out of order: the next start puts them in order
            point = self._volume_dir(name, i)
            os.makedirs(point, mode=0o711, exist_ok=True)
            os.chmod(os.path.dirname(point), 0o711)
            if not volume.readonly:
                mounts.grow_fs_if_short(volume.source)
            mounts.mount_fs_image(volume.source, point, readonly=volume.readonly)
            m = (spec.idmap or bundle.LEGACY_IDMAP) if spec.userns else None
            # the spec first: an agent killed from here on leaves it with the volume, which the
            # next start mounts (and the service's record stays attached)
            self.db.execute("UPDATE containers SET spec=? WHERE name=?", (spec_to_json(spec), name))
            try:
                if m is not None and os.stat(point).st_uid == 0 and not volume.readonly:
                    os.chown(point, m.host_id, m.host_id)  # as _mount_volumes: the container's root's
                mounts.mount_into_ns(pid, point, volume.destination, owner=m.host_id if m else None)
            except BaseException:
                self.db.execute("UPDATE containers SET spec=? WHERE name=?", (row["spec"], name))
                mounts.unmount(point, lazy=True)
                mounts.release_fs_image(volume.source)
                raise
            self._rewrite_config(spec, self._row(name))
            return self._info(self._row(name))

    def remove_volume_live(self, name: str, destination: str) -> ContainerInfo:
        """containers.runtime.SupportsLiveVolumes: unmounted in the container's namespace, then
        (if none of its filesystem's mounts is left there) on the host and from the spec."""
        with self._name_lock(name):
            row = self._row(name)
            state, pid, _ = self._status(name)
            if state not in ("running", "paused") or not pid:
                raise Conflict(f"container {name!r} is {state}: detach it as a stopped container's")
            old = spec_from_json(row["spec"])
            vol = next((v for v in old.volumes if v.destination == destination), None)
            if vol is None:
                raise NotFound(f"container {name!r} has no volume at {destination!r}")
            top = os.path.join(self._dir(name), "volumes")
            points = [p for p in mounts.fs_image_mounts(vol.source) if p.startswith(top + "/")]
            if points:
                dev = os.stat(points[0]).st_dev
                if not mounts.unmount_in_ns(pid, destination, dev):
                    raise Conflict(f"the container {name!r} still holds the volume (mounted elsewhere in it); "
                                   "stop it first")
            for p in points:
                mounts.unmount(p, lazy=True)
            mounts.release_fs_image(vol.source)
            spec = dataclasses.replace(old, volumes=tuple(v for v in old.volumes if v is not vol))
            self.db.execute("UPDATE containers SET spec=? WHERE name=?", (spec_to_json(spec), name))
            self._rewrite_config(spec, self._row(name))
            return self._info(self._row(name))

    def _rewrite_config(self, spec: ContainerSpec, row) -> None:
        """The config for the next start; its volume slots are put in order then (_ensure_prepared)."""
        netns = None
        if spec.network.mode == "bridge" and not spec.userns and os.path.exists(self.net.netns_path(spec.name)):
            netns = self.net.netns_path(spec.name)
        proc = bundle.resolve_process(spec)
        uid, gid = bundle.resolve_user(proc["user"], self._rootfs(spec.name))
        self._write_config(spec, Limits(**json.loads(row["limits"])), netns=netns, ip=row["ip"],
                           uid=uid, gid=gid)

    def _volumes_in_order(self, spec: ContainerSpec) -> bool:
        """True if each volume's filesystem is mounted at its slot (or not yet) and no other
        slot is mounted: after a live detach or attach they may not be."""
        top = os.path.join(self._dir(spec.name), "volumes")
        want = {str(i) for i in range(len(spec.volumes))}
        if not os.path.isdir(top):
            return True
        if any(d not in want and mounts.is_mounted(os.path.join(top, d)) for d in os.listdir(top)):
            return False
        for i, v in enumerate(spec.volumes):  # stat and sysfs only: no mountinfo read per start
            point = self._volume_dir(spec.name, i)
            if mounts.is_mounted(point) and not mounts.mount_backed_by(point, v.source):
                return False
        return True

    def _configure_volumes(self, spec: ContainerSpec, row) -> None:
        """Unmount every volume of the container, mount ``spec.volumes`` and write its config."""
        top = os.path.join(self._dir(spec.name), "volumes")
        for p in sorted(mounts.mounts_under(top), key=len, reverse=True):
            mounts.unmount(p, lazy=True)  # detached from the tree at once
        for d in os.listdir(top) if os.path.isdir(top) else ():
            os.rmdir(os.path.join(top, d))  # empty mount points only: never a tenant's files
        self._mount_volumes(spec)
        self._rewrite_config(spec, row)

    # -- start / stop -----------------------------------------------------------------------
    def start(self, name: str) -> ContainerInfo:
        """Run the container (again). Idempotent on a running one; Conflict if paused."""
        with self._name_lock(name):
            row = self._row(name)
            state, _, _ = self._status(name)
            if state == "running":
                return self._info(row)
            if state == "paused":
                raise Conflict(f"container {name!r} is paused: resume it instead")
            self._ensure_prepared(row)
            self._sync_bundle_limits(self._row(name))
            if self._runc_state(name) is not None:
                self._runc("delete", "--force", name, check=False)
            for path in (self._exit_file(name),):
                if os.path.exists(path):
                    os.unlink(path)
            spec = spec_from_json(row["spec"])
            pid = self._spawn_conmon(name, tty=spec.tty)
            try:
                if spec.userns and spec.network.mode == "bridge":
                    self.net.attach(name, spec.network.ports, pid=pid)  # here: it mounts the netns file
                    self._shape(spec)
                if not self._release_init(name, pid):
                    with self._private_view(name) as run:
                        run(self._runc, "start", name)
            except BaseException:
                self._runc("delete", "--force", name, check=False)
                raise
            return self._info(self._row(name))  # re-read: _ensure_prepared may set the ip

    def _release_init(self, name: str, pid: int) -> bool:
        """Start a created container as `runc start` does once it has loaded it: open the exec
        fifo its init blocks on (in our runc root: only root reaches it), read until the init
        has written its byte and exec'd the command (the end of the file), remove the fifo
        (runc then reads the container as running). Without a runc process: `runc start`
        reads the host's mount table (cgroup v1 discovery), so it ran in a private mount view
        whose making copies every mount of the agent's namespace (6 ms at 1000 containers),
        plus runc's own start (8-10 ms). False if there is no fifo (another runc's way):
        the caller runs `runc start`. CommandFailed if the init died or took no start."""
        path = os.path.join(self.runc_root, name, EXEC_FIFO)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise CommandFailed(f"container {name!r} failed to start: cannot open its exec fifo: {e}") from None
        data, ended = b"", False
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise CommandFailed(f"container {name!r} failed to start: {path} is not a fifo")
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            deadline = time.monotonic() + START_TIMEOUT
            while not ended and time.monotonic() < deadline:
                # no POLLHUP before a writer came (the kernel's fifo rule): wait for the init's byte
                if poller.poll(100):
                    while True:
                        try:
                            chunk = os.read(fd, 64)
                        except BlockingIOError:
                            break
                        if not chunk:
                            ended = bool(data)  # an end before any byte: the writer is not there yet
                            break
                        data += chunk
                    if data:
                        continue
                if _proc_start_time(pid) is None:  # the init is gone (runc checks the same)
                    break
                time.sleep(POLL)  # a writer that came and went without its byte: poll says so at once
        finally:
            os.close(fd)
        if not data:
            raise CommandFailed(f"container {name!r} failed to start: its init "
                                + ("exited before its start" if _proc_start_time(pid) is None
                                   else f"took no start within {START_TIMEOUT:.0f} s"))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True

    def _ensure_prepared(self, row) -> None:
        """After a host reboot the mount and netns are gone: make them again."""
        spec = spec_from_json(row["spec"])
        if not mounts.is_mounted(self._rootfs(spec.name)):
            if spec.rootfs.quota_bytes:
                self._mount_disk(spec)
            self._mount_rootfs(spec)
        if not self._volumes_in_order(spec):
            self._configure_volumes(spec, row)  # stopped: its volumes may be mounted again
        self._mount_volumes(spec)
        if spec.network.mode == "bridge" and not spec.userns and \
                not os.path.exists(self.net.netns_path(spec.name)):
            netns, ip = self.net.attach(spec.name, spec.network.ports)
            self._shape(spec)
            proc = bundle.resolve_process(spec)
            uid, gid = bundle.resolve_user(proc["user"], self._rootfs(spec.name))
            self._write_config(spec, Limits(**json.loads(row["limits"])), netns=netns, ip=ip,
                               uid=uid, gid=gid)
            self.db.execute("UPDATE containers SET ip=? WHERE name=?", (ip, spec.name))

    def _spawn_conmon(self, name: str, *, tty: bool = False) -> int:
        """conmon runs `runc create` and stays as the container's monitor; we wait on its
        sync pipe for the container's pid (or runc's error). With ``tty`` conmon hands runc a
        console socket and keeps the terminal's master (``-t``): it logs what the terminal
        writes and relays it to the clients of its attach socket (open_terminal)."""
        rfd, wfd = os.pipe()
        argv = [*monitor_scope_argv(name, self.systemd_run),
                self.conmon, "--api-version", "1", "-c", name, "-u", name, "-n", name,
                "-r", self.view_runc, "-b", self._bundle(name),
                "-p", os.path.join(self._dir(name), "container.pid"),
                "-P", os.path.join(self._dir(name), "conmon.pid"),
                "-l", f"k8s-file:{self._log(name)}", "--log-size-max", str(LOG_SIZE_MAX),
                "--exit-dir", os.path.dirname(self._exit_file(name)),
                "--socket-dir-path", self._sock_dir(),
                "--runtime-arg", "--root", "--runtime-arg", self.runc_root,
                *(("--runtime-arg", "--systemd-cgroup") if self._systemd_bundle(name) else ()),
                *(("--terminal",) if tty else ()),
                "--log-level", "error", "--syslog"]
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "_OCI_SYNCPIPE": str(wfd)}
        try:
            # cwd: conmon writes an `oom` marker into its working directory when the kernel
            # OOM-kills the container; it belongs in the container's dir, not the agent's cwd
            proc = subprocess.Popen(argv, pass_fds=(wfd,), env=env, start_new_session=True,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, cwd=self._dir(name))
        finally:
            os.close(wfd)
        data = b""
        try:
            deadline = time.monotonic() + SYNC_TIMEOUT
            while b"\n" not in data and time.monotonic() < deadline:
                ready, _, _ = select.select([rfd], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    break
                chunk = os.read(rfd, 4096)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(rfd)
            _, err = proc.communicate(timeout=SYNC_TIMEOUT)
        msg = {}
        for line in data.decode(errors="replace").splitlines():
            try:
                msg = json.loads(line)
                break
            except ValueError:
                continue
        if not isinstance(msg.get("data"), int) or msg["data"] <= 0:
            detail = msg.get("message") or err.decode(errors="replace").strip() or \
                "conmon gave no pid"
            self._runc("delete", "--force", name, check=False)
            raise CommandFailed(f"container {name!r} failed to start: "
                                f"{_runc_message(detail)}", argv=argv, stderr=detail)
        return msg["data"]

    def _wait_exit(self, name: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._status(name)[0] == "stopped":
                return True
            time.sleep(POLL)
        return False

    def stop(self, name: str, *, timeout: float = 10) -> ContainerInfo:
        """SIGTERM, then SIGKILL after ``timeout`` seconds. Idempotent."""
        with self._name_lock(name):
            row = self._row(name)
            state, _, _ = self._status(name)
            if state in ("running", "paused", "created") and self._runc_state(name):
                if state == "paused":
                    self._runc("resume", name, check=False)
                self._runc("kill", name, "TERM", check=False)
                if not self._wait_exit(name, timeout):
                    self._runc("kill", name, "KILL", check=False)
                    self._wait_exit(name, EXIT_GRACE)
            return self._info(row)

    def kill(self, name: str, signal: int = 9) -> ContainerInfo:
        with self._name_lock(name):
            row = self._row(name)
            if not isinstance(signal, int) or not 1 <= signal <= 64:
                raise InvalidInput(f"signal {signal!r} is invalid: give 1..64 (9 = SIGKILL)")
            state, _, _ = self._status(name)
            if state not in ("running", "paused"):
                raise Conflict(f"container {name!r} is {state}, not running: nothing to signal")
            self._runc("kill", name, str(signal))
            if signal == signals.SIGKILL:
                self._wait_exit(name, EXIT_GRACE)
            return self._info(row)

    def restart(self, name: str, *, timeout: float = 10) -> ContainerInfo:
        self.stop(name, timeout=timeout)
        return self.start(name)

    def pause(self, name: str) -> ContainerInfo:
        with self._name_lock(name):
            row = self._row(name)
            state, _, _ = self._status(name)
            if state != "running":
                raise Conflict(f"container {name!r} is {state}: only a running one pauses")
            self._runc("pause", name)
            return self._info(row)

    def resume(self, name: str) -> ContainerInfo:
        with self._name_lock(name):
            row = self._row(name)
            if self._status(name)[0] != "paused":
                raise Conflict(f"container {name!r} is not paused")
            self._runc("resume", name)
            return self._info(row)

    # -- delete / reconcile -------------------------------------------------------------------
    def delete(self, name: str) -> bool:
        """Kill if running and release mounts, cgroups, network, lease, ports, files."""
        with self._name_lock(name):
            known = self.db.one("SELECT 1 FROM containers WHERE name=?", (name,)) is not None
            if not known and not os.path.exists(self._dir(name)):
                return False
            self._release(name)
            return True

    # -- rootfs snapshots (containers.runtime.SupportsRootfsSnapshots) ------------------------
    def _snapshot_dir(self, name: str, snapshot: str = "") -> str:
        """<container dir>/snapshots/<snapshot>: a copy of the upper dir (0700 above it: the
        tenant's files, setuid bits included, reachable by root only). Goes with _release."""
        return os.path.join(self._dir(name), "snapshots", snapshot)

    def snapshot_rootfs(self, name: str, snapshot: str) -> None:
        """Copy the container's writes (its upper dir) to a snapshot: a running container is
        frozen for the copy and thawed after, whatever happens. The copy is made under a
        temporary name and renamed when complete (a kill leaves no snapshot, only a temp dir
        that delete_rootfs_snapshot or the container's delete removes)."""
        validate.check_snapshot_name(snapshot)
        with self._name_lock(name):
            spec = spec_from_json(self._row(name)["spec"])
            final = self._snapshot_dir(name, snapshot)
            if os.path.exists(final):
                raise Conflict(f"container {name!r} already has a snapshot {snapshot!r}")
            os.makedirs(self._snapshot_dir(name), mode=0o700, exist_ok=True)
            tmp = self._snapshot_dir(name, f".tmp-{snapshot}")
            shutil.rmtree(tmp, ignore_errors=True)
            if spec.rootfs.quota_bytes:
                self._mount_disk(spec)  # stopped since a host reboot: its filesystem is not mounted yet
            frozen = self._status(name)[0] == "running"
            if frozen:
                self._runc("pause", name)
            try:
                _copy_tree(spec.rootfs.upperdir, tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:
                if frozen:
                    self._runc("resume", name, check=False)
            os.rename(tmp, final)

    def revert_rootfs(self, name: str, snapshot: str) -> None:
        """Only while stopped: the overlay is unmounted (start() mounts it again), a copy of the
        snapshot is made next to the upper dir and swapped in by rename, the old writes removed.
        A failure before the swap leaves the rootfs as it was."""
        validate.check_snapshot_name(snapshot)
        with self._name_lock(name):
            spec = spec_from_json(self._row(name)["spec"])
            state = self._status(name)[0]
            if state in ("running", "paused"):
                raise Conflict(f"container {name!r} is {state}: stop it before restoring a snapshot")
            src = self._snapshot_dir(name, snapshot)
            if not os.path.isdir(src):
                raise NotFound(f"container {name!r} has no snapshot {snapshot!r}")
            self._replace_upper(spec, lambda new: _copy_tree(src, new))

    def _replace_upper(self, spec: ContainerSpec, fill) -> None:
        """Unmount the overlay and swap in a new upper dir that ``fill(path)`` makes (absent
        before), by rename: a failure before the swap leaves the rootfs as it was. The
        container is stopped (the caller checked, under its lock)."""
        root = self._rootfs(spec.name)
        if mounts.is_mounted(root):
            mounts.unmount(root)
        if spec.rootfs.quota_bytes:
            self._mount_disk(spec)
        upper, work = spec.rootfs.upperdir, spec.rootfs.workdir
        new, old = upper + ".restore", upper + ".old"
        for d in (new, old):
            shutil.rmtree(d, ignore_errors=True)
        try:
            fill(new)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        os.rename(upper, old)
        os.rename(new, upper)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)  # overlayfs's scratch space: empty for a fresh mount
        os.makedirs(work, mode=0o700, exist_ok=True)

    def reset_rootfs(self, name: str, image: RootfsImage | None = None) -> None:
        """containers.runtime.SupportsRootfsReset: only while stopped, the container's writes
        are dropped (a fresh, empty upper dir owned as the old one), the overlay mounted again
        with the mount points of its /etc files; its name, address, volumes and limits stay.
        With ``image`` the overlay is made of its layers and the config runs its process
        (checked before the upper dir goes: its layers exist, its command is in them)."""
        with self._name_lock(name):
            row = self._row(name)
            spec = spec_from_json(row["spec"])
            state = self._status(name)[0]
            if state in ("running", "paused"):
                raise Conflict(f"container {name!r} is {state}: stop it before rebuilding its rootfs")
            new = spec if image is None else self._rebased(spec, image)
            st = os.stat(spec.rootfs.upperdir)

            def empty(path: str) -> None:
                os.mkdir(path, 0o700)
                os.chown(path, st.st_uid, st.st_gid)
                os.chmod(path, st.st_mode & 0o7777)

            self._replace_upper(spec, empty)
            self._mount_rootfs(new)
            etc = bundle.etc_files_for(self._bundle(name), hostname=spec.hostname or name, ip=row["ip"],
                                       nameservers=bundle.host_nameservers()) \
                if spec.network.mode != "host" else {}
            m = (spec.idmap or bundle.LEGACY_IDMAP) if spec.userns else None
            _make_mountpoints(self._rootfs(name), etc, owner=m.host_id if m else None)
            if new is not spec:
                uid, gid = (int(x) for x in new.user.split(":"))
                self._write_config(new, Limits(**json.loads(row["limits"])), netns=self._netns_of(new),
                                   ip=row["ip"], uid=uid, gid=gid)
                self.db.execute("UPDATE containers SET spec=? WHERE name=?", (spec_to_json(new), name))

    def _rebased(self, spec: ContainerSpec, image: RootfsImage) -> ContainerSpec:
        """``spec`` on ``image``'s layers running its process; InvalidInput (nothing changed)
        if a layer is missing or the command is not an executable of the layers."""
        for d in image.lowerdirs:
            if not os.path.isdir(d):
                raise InvalidInput(f"image layer {d} does not exist: import the image first")
        uid, _, gid = image.user.partition(":")
        if not (uid.isdigit() and gid.isdigit()):
            raise InvalidInput(f"user {image.user!r} must be resolved to a numeric uid:gid")
        new = dataclasses.replace(spec, rootfs=dataclasses.replace(spec.rootfs, lowerdirs=tuple(image.lowerdirs)),
                                  command=tuple(image.command), env=dict(image.env), workdir=image.workdir,
                                  user=image.user, image_config={})
        validate.check_spec(new)
        if not new.command:
            raise InvalidInput("no command: give one or use an image with a Cmd or Entrypoint")
        _check_command(new.command[0], new.env.get("PATH", ""), new.workdir, *image.lowerdirs)
        return new

    def _netns_of(self, spec: ContainerSpec) -> str | None:
        """The netns a stopped container's config names: its own (made by the host, a
        container without a user namespace), else None (runc makes one at start)."""
        if spec.network.mode == "bridge" and not spec.userns and os.path.exists(self.net.netns_path(spec.name)):
            return self.net.netns_path(spec.name)
        return None

    def delete_rootfs_snapshot(self, name: str, snapshot: str) -> bool:
        validate.check_snapshot_name(snapshot)
        with self._name_lock(name):
            self._row(name)
            shutil.rmtree(self._snapshot_dir(name, f".tmp-{snapshot}"), ignore_errors=True)
            path = self._snapshot_dir(name, snapshot)
            if not os.path.isdir(path):
                return False
            shutil.rmtree(path)
            return True

    def rootfs_snapshots(self, name: str) -> list[str]:
        self._row(name)
        try:
            return sorted(e for e in os.listdir(self._snapshot_dir(name)) if not e.startswith("."))
        except FileNotFoundError:
            return []

    def _release(self, name: str) -> None:
        if self._runc_state(name) is not None:
            if self._frozen(name):
                self._runc("resume", name, check=False)  # a frozen process cannot die
            self._runc("kill", name, "KILL", check=False)
            self._wait_exit(name, EXIT_GRACE)
            self._runc("delete", "--force", name, check=False)
        rootfs = self._rootfs(name)
        if mounts.is_mounted(rootfs):
            mounts.unmount(rootfs, lazy=True)
        for p in sorted(mounts.mounts_under(self._dir(name)), key=len, reverse=True):
            mounts.unmount(p, lazy=True)  # a crash's leftovers (layers staged for the overlay)
        mounts.release_fs_image(self._disk_image(name))  # a rootfs size limit's filesystem
        cgroups.remove(self.cgroup_parent, name)
        if self.systemd_cgroups:  # runc delete stopped the scope; what a crash left of it
            cgroups.remove(cgroups.slice_dir(self.cgroup_parent), cgroups.scope_unit(self.cgroup_parent, name))
        if bandwidth.port_exists(bandwidth.ifb_name(self.net.veth_name(name))):
            bandwidth.clear(self.net.veth_name(name))
        self.net.detach(name)
        try:
            os.unlink(os.path.join(self._sock_dir(), name))  # conmon's attach link, never its target
        except FileNotFoundError:
            pass
        shutil.rmtree(self._dir(name), ignore_errors=True)
        self.db.execute("DELETE FROM containers WHERE name=?", (name,))

    def reconcile(self) -> dict:
        """containers.runtime.SupportsReconcile. Release the leftovers of containers that have
        no record (crash mid-create or mid-delete): runc state, mounts, cgroups, veths, netns, leases, port rules, dirs.
        Containers with a record are kept as they are (running or stopped). Meant for agent
        start-up, before serving requests."""
        known = {r["name"] for r in self.db.query("SELECT name FROM containers")}
        found = set()
        try:
            found.update(os.listdir(os.path.join(self.state_dir, "containers")))
            found.update(e for e in os.listdir(self.runc_root)
                         if os.path.isdir(os.path.join(self.runc_root, e)))
            found.update(os.listdir(self._sock_dir()))
        except FileNotFoundError:
            pass
        found.update(cgroups.list_names(self.cgroup_parent))  # the parent is ours alone
        if self.systemd_cgroups:
            found.update(n for n in cgroups.scope_names(self.cgroup_parent)  # and so is the slice
                         if validate.NAME_RE.fullmatch(n))
        found.update(self.net.leftover_names())
        gone = []
        for name in sorted(found - known):
            with self._name_lock(name):  # a create in flight holds it and has a row
                if self.db.one("SELECT 1 FROM containers WHERE name=?", (name,)):
                    continue
                self._release(name)
                gone.append(name)
        live = {r["name"] for r in self.db.query("SELECT name FROM containers")}
        veths = self.net.leftover_veths(live)
        for v in veths:
            self.net.delete_veth(v)
        bandwidth.sweep()  # ifbs of ports gone with a crash
        return {"released": gone, "veths_removed": veths}

    # -- exec / logs / stats / limits ---------------------------------------------------------
    def exec(self, name: str, command: list[str], *, timeout: float = 60) -> ExecResult:
        """Run ``command`` in the running container (``runc exec``). At most
        ``exec_output_bytes`` of stdout and of stderr are kept (``truncated`` says so); the
        rest is read and dropped, so a chatty command neither blocks nor fills our memory.
        At ``timeout`` the exec'd process, its process group and every process it started in
        the container are killed (``timed_out``, exit code 124)."""
        if not command or not all(isinstance(a, str) and "\0" not in a for a in command):
            raise InvalidInput("exec needs a command: a non-empty list of strings without NUL")
        self._row(name)
        state, init_pid, _ = self._status(name)
        if state != "running":
            raise Conflict(f"container {name!r} is {state}: exec needs it running")
        pid_file = os.path.join(self._dir(name), f"exec-{os.getpid()}-{threading.get_ident()}.pid")
        argv = [self.runc, "--root", self.runc_root, "exec", "--pid-file", pid_file, name, *command]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            (out, err), truncated, timed_out = _capture(proc, self.exec_output_bytes, timeout)
            if timed_out:
                _kill_exec(_read_pid(pid_file), init_pid)
                os.killpg(proc.pid, signals.SIGKILL)  # runc exec itself (its own session)
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            try:
                os.unlink(pid_file)
            except FileNotFoundError:
                pass
        stderr = err.decode(errors="replace")
        if timed_out:
            code = EXEC_TIMEOUT_EXIT
            sep = "\n" if stderr and not stderr.endswith("\n") else ""
            stderr += f"{sep}timed out after {timeout} s: killed with every process it started"
        return ExecResult(code, out.decode(errors="replace"), stderr, truncated=truncated,
                          timed_out=timed_out)

    def exec_interactive(self, name: str, options: ExecOptions) -> "RuncExec":
        """containers.runtime.SupportsInteractiveExec: ``runc exec`` in the foreground, with a
        TTY (runc hands the terminal's master over --console-socket) or with our pipes as its
        stdin, stdout and stderr. Its exit status is runc's."""
        if not options.command or not all(isinstance(a, str) and "\0" not in a for a in options.command):
            raise InvalidInput("exec needs a command: a non-empty list of strings without NUL")
        self._row(name)
        state, init_pid, _ = self._status(name)
        if state != "running":
            raise Conflict(f"container {name!r} is {state}: exec needs it running")
        return RuncExec.start([self.runc, "--root", self.runc_root], name, options, self._dir(name), init_pid)

    def open_terminal(self, name: str) -> "ConmonTerminal":
        """containers.runtime.SupportsTerminal: a client of conmon's attach socket (the
        ``attach`` socket in the container's bundle dir, which conmon made when it started
        the container; so a later agent process attaches to a container an earlier one
        started). Its ``ctl`` fifo there takes resizes."""
        spec = spec_from_json(self._row(name)["spec"])
        if not spec.tty:
            raise Conflict(f"container {name!r} was created without a TTY: it has no terminal to attach to")
        state, _, _ = self._status(name)
        if state not in ("running", "paused"):
            raise Conflict(f"container {name!r} is {state}: its terminal opens when it runs")
        return ConmonTerminal.connect(self._bundle(name))

    def _files_root(self, name: str):
        info = self._info(self._row(name))
        rootfs = self._rootfs(name)
        if not mounts.is_mounted(rootfs):
            raise Conflict(f"container {name!r} has no root filesystem mounted (state {info.state}): "
                           "start it, or recreate it")
        return rootfs, info.idmap

    def open_file(self, name: str, path: str):
        """containers.runtime.SupportsFiles (containers/files.py)."""
        rootfs, m = self._files_root(name)
        return files.open_for_read(rootfs, path, m)

    def put_file(self, name: str, path: str, read, *, uid: int = 0, gid: int = 0, mode: int = 0o644) -> int:
        rootfs, m = self._files_root(name)
        return files.write_file(rootfs, path, read, uid=uid, gid=gid, mode=mode, idmap=m)

    def list_dir(self, name: str, path: str) -> tuple[list[dict], bool]:
        rootfs, m = self._files_root(name)
        return files.list_dir(rootfs, path, m)

    def make_dir(self, name: str, path: str, *, uid: int = 0, gid: int = 0, mode: int = 0o755) -> None:
        rootfs, m = self._files_root(name)
        files.make_dir(rootfs, path, uid=uid, gid=gid, mode=mode, idmap=m)

    def logs(self, name: str, tail: int | None = None) -> str:
        self._row(name)
        try:
            with open(self._log(name), errors="replace") as f:
                raw = f.read()
        except FileNotFoundError:
            return ""
        text = _parse_k8s_log(raw)
        if tail is not None:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-tail:]) if tail > 0 else ""
        return text

    def stats(self, name: str) -> dict:
        row = self._row(name)
        limits = Limits(**json.loads(row["limits"]))
        st = cgroups.read_stats(*self._cgroup(name))
        spec = spec_from_json(row["spec"])
        st["net"] = self.net.counters(name) if spec.network.mode == "bridge" else \
            {"rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0, "tx_packets": 0}
        st["limits"] = dataclasses.asdict(limits)
        st["unsupported"] = cgroups.unsupported(limits)
        return st

    def bulk_stats(self, names: Iterable[str]) -> dict[str, dict]:
        """containers.runtime.SupportsBulkStats: stats() of each of ``names`` from one query of
        the state DB (the network mode read by SQLite, not a parse of each spec) and one read of
        the host's interface counters, then each container's cgroup files."""
        want = set(names)
        rows = [r for r in self.db.query("SELECT name, limits, json_extract(spec, '$.network.mode') AS mode "
                                         "FROM containers") if r["name"] in want]
        net = self.net.counters_of([r["name"] for r in rows if r["mode"] == "bridge"])
        out = {}
        for r in rows:
            limits = Limits(**json.loads(r["limits"]))
            st = cgroups.read_stats(*self._cgroup(r["name"]))
            st["net"] = net.get(r["name"]) or {"rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0, "tx_packets": 0}
            st["limits"] = dataclasses.asdict(limits)
            st["unsupported"] = cgroups.unsupported(limits)
            out[r["name"]] = st
        return out

    def update_limits(self, name: str, limits: Limits) -> None:
        """Apply to the running container and keep for later starts (in the state DB: start()
        renders them into the bundle). Live, the container's cgroup files get what `runc update`
        would write, in its order (containers.cgroups.set_limits, no runc spawned), and runc's
        state.json records them as `runc update` does, so runc's later commands (a later
        `runc update` of one knob) keep them; `runc update` itself runs under the systemd driver
        (systemd owns a scope's properties) and for an io weight. Conflict if it uses more
        memory than ``limits`` allow (the kernel cannot reclaim it): then nothing changed."""
        validate.check_limits(limits)
        with self._name_lock(name):
            self._row(name)  # NotFound for an unknown container
            # runc knows it and it has not exited: update it
            st = self._runc_state(name) if self._read_exit(name) is None else None
            if st is not None:
                try:
                    self._update_live(name, st, limits)
                except CommandFailed:
                    if self._status(name)[0] in ("running", "paused", "created"):
                        raise
                    # it stopped meanwhile: the limits apply from its next start
            self.db.execute("UPDATE containers SET limits=? WHERE name=?",
                            (json.dumps(dataclasses.asdict(limits)), name))

    def _update_live(self, name: str, st: dict, limits: Limits) -> None:
        """The live half of update_limits on runc's state ``st`` of the container."""
        res = cgroups.update_resources(limits)
        paths = st.get("cgroup_paths") or {}
        if (st.get("config", {}).get("cgroups") or {}).get("Systemd") or "blockIO" in res or not paths:
            try:
                self._runc("update", "--resources", "-", name, input=json.dumps(res))
            except CommandFailed as e:
                used = MEMORY_BUSY_RE.search(e.message)
                if used is None:
                    raise
                raise self._memory_busy(name, limits, int(used.group(1))) from None
            return
        try:
            cgroups.set_limits(paths, res)
        except cgroups.MemoryBusy as e:
            raise self._memory_busy(name, limits, e.usage) from None
        except (OSError, ValueError) as e:  # FileNotFoundError: its cgroup is gone (it stopped)
            raise CommandFailed(f"cannot set the cgroup limits of container {name!r}: {e}") from None
        self._record_runc_resources(name, st, res)

    @staticmethod
    def _memory_busy(name: str, limits: Limits, used: int) -> Conflict:
        return Conflict(f"container {name!r} uses {used >> 20} MiB of memory now, more than {limits.memory_mib} "
                        "MiB: free memory in it first (files in its tmpfs count), or ask for more", container=name)

    def _record_runc_resources(self, name: str, st: dict, res: dict) -> None:
        """Write ``res`` into runc's state.json of the container as `runc update --resources`
        leaves it (its config's cgroup resources), replacing the file atomically as runc does."""
        cg = st["config"]["cgroups"]
        cg.update(memory=res["memory"]["limit"], memory_swap=res["memory"].get("swap", 0),
                  cpu_quota=res["cpu"]["quota"], cpu_period=res["cpu"]["period"],
                  pids_limit=res["pids"]["limit"], blkio_weight=0)
        path = os.path.join(self.runc_root, name, "state.json")
        tmp = path + ".nodeagent"  # runc's dir: root's alone, and this container's lock is held
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(st, separators=(",", ":")).encode())
        os.replace(tmp, path)

    def _sync_bundle_limits(self, row) -> None:
        """Before a start: the bundle's cgroup resources as the state DB keeps them (a live
        resize only runs `runc update` and writes the DB; the bundle is rendered here, once)."""
        want = cgroups.oci_resources(Limits(**json.loads(row["limits"])))
        try:
            with open(os.path.join(self._bundle(row["name"]), "config.json")) as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            return  # no bundle yet: _prepare writes it from the same limits
        if cfg.get("linux", {}).get("resources") != want:
            cfg.setdefault("linux", {})["resources"] = want
            bundle.write_bundle(self._bundle(row["name"]), cfg)

    # -- bandwidth ---------------------------------------------------------------------------
    def _shape(self, spec: ContainerSpec) -> None:
        """Apply the spec's limits to its host veth (just made or made again)."""
        if spec.bandwidth.limited:
            bandwidth.apply(self.net.veth_name(spec.name), spec.bandwidth)

    def set_bandwidth(self, name: str, bw: bandwidth.Bandwidth) -> None:
        """containers.runtime.SupportsBandwidth: kept in the container's spec (every later
        attach applies it) and applied now to its host veth if it has one."""
        with self._name_lock(name):
            spec = spec_from_json(self._row(name)["spec"])
            validate.check_bandwidth(spec.network.mode, bw)
            spec = dataclasses.replace(spec, bandwidth=bw)
            port = self.net.veth_name(name)
            if bandwidth.port_exists(port):
                if bw.limited:
                    bandwidth.apply(port, bw)
                else:
                    bandwidth.clear(port)
            self.db.execute("UPDATE containers SET spec=? WHERE name=?", (spec_to_json(spec), name))

    def get(self, name: str) -> ContainerInfo:
        return self._info(self._row(name))

    def find(self, name: str) -> ContainerInfo | None:
        row = self.db.one("SELECT * FROM containers WHERE name=?", (name,))
        return self._info(row) if row else None

    def list(self) -> list[ContainerInfo]:
        return [self._info(r) for r in self.db.query("SELECT * FROM containers ORDER BY name")]

    def close(self) -> None:
        """Remove the bridge, its rules and the parent cgroups if no container is left;
        drop the user namespaces kept for id-mapped layers."""
        with self._lock:
            for fd in self._userns_fds.values():
                os.close(fd)
            self._userns_fds.clear()
        if not self.db.query("SELECT name FROM containers"):
            self.net.delete_bridge()
            cgroups.remove_parent(self.cgroup_parent)
            mounts.unbind_self(os.path.join(self.state_dir, "containers"))  # if nothing is below it


def _make_mountpoints(rootfs: str, files: dict[str, str], owner: int | None = None) -> None:
    """Create empty files for bind mounts (as host root: a user-namespaced runc could not),
    resolving symlinks inside the rootfs only; what is made belongs to host id ``owner``
    (container root under a user namespace), else to host root."""
    root = os.path.realpath(rootfs)
    for dest in files:
        dirname = os.path.dirname(dest)
        parent = bundle.resolve_in_root(root, dirname)
        if parent is None:
            plain = os.path.join(root, dirname.lstrip("/"))
            if os.path.lexists(plain):
                continue  # a dangling or looping link: let runc refuse it
            os.makedirs(plain)
            if owner is not None:
                os.chown(plain, owner, owner, follow_symlinks=False)
            parent = plain
        if not os.path.isdir(parent):
            continue
        final = os.path.join(parent, os.path.basename(dest))
        if not os.path.lexists(final):
            fd = os.open(final, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o644)
            if owner is not None:
                os.fchown(fd, owner, owner)
            os.close(fd)


def _untraversable(path: str) -> str | None:
    """The first ancestor of ``path`` (or itself) others cannot enter, or None."""
    path = os.path.abspath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        d = os.sep.join(parts[:i]) or os.sep
        try:
            if not os.stat(d).st_mode & 0o001:
                return d
        except FileNotFoundError:
            return None
    return None


def _check_command(prog: str, path: str, cwd: str, *roots: str) -> None:
    """InvalidInput unless ``prog`` exists in the rootfs (absolute, relative or on PATH), or
    in one of an image's layer dirs (``roots``, top first)."""
    if "/" in prog:
        cands = [prog if prog.startswith("/") else os.path.join(cwd, prog)]
    else:
        cands = [os.path.join(d, prog) for d in path.split(":") if d.startswith("/")]
    for c in cands:
        if any(bundle.resolve_in_root(root, c) for root in roots):
            return
    raise InvalidInput(f"command {prog!r} is not in the image (searched "
                       f"{', '.join(cands) or 'nothing'}): fix the command or the image")


def _capture(proc: subprocess.Popen, limit: int, timeout: float) -> tuple[tuple[bytes, bytes], bool, bool]:
    """Read ``proc``'s stdout and stderr until both close or ``timeout`` seconds pass:
    ((stdout, stderr) with at most ``limit`` bytes each, truncated, timed_out)."""
    assert proc.stdout is not None and proc.stderr is not None  # both piped
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    truncated = False
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return (bytes(bufs[out_fd]), bytes(bufs[err_fd])), truncated, True
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                room = limit - len(buf)
                if len(chunk) > room:
                    truncated = True
                    chunk = chunk[:max(room, 0)]
                buf += chunk
    return (bytes(bufs[out_fd]), bytes(bufs[err_fd])), truncated, False


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat_ids(pid: int) -> tuple[int, int, int] | None:
    """(ppid, pgrp, session) of ``pid``, None if it is gone."""
    fields = _stat_fields(pid)
    return (int(fields[1]), int(fields[2]), int(fields[3])) if fields else None


def _pid_ns(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def _kill_exec(exec_pid: int | None, init_pid: int | None) -> list[int]:
    """SIGKILL an exec'd process and everything it started: its session (runc exec makes the
    exec'd process a session and group leader) and its descendants, in the container's pid
    namespace only (a reused pid elsewhere is never touched). Returns the pids signalled."""
    if not exec_pid or not init_pid:
        return []
    ns = _pid_ns(init_pid)
    if ns is None:
        return []
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (ids := _stat_ids(int(entry))) is not None:
            procs[int(entry)] = ids
    doomed = {pid for pid, (_, pgrp, sid) in procs.items() if exec_pid in (pid, pgrp, sid)}
    grew = True
    while grew:  # descendants that made their own session
        more = {pid for pid, (ppid, _, _) in procs.items() if ppid in doomed} - doomed
        doomed |= more
        grew = bool(more)
    killed = []
    for pid in sorted(doomed):
        if pid == init_pid or _pid_ns(pid) != ns:
            continue
        try:
            os.kill(pid, signals.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


def _runc_message(stderr: str) -> str:
    """The useful part of runc's logrus output (msg="...")."""
    text = stderr.strip()
    for line in reversed(text.splitlines()):
        if 'msg="' in line:
            return line.split('msg="', 1)[1].rsplit('"', 1)[0].replace('\\"', '"')
    return text[-500:] or "no output"


def _parse_k8s_log(raw: str) -> str:
    """conmon's k8s-file lines ``TIME STREAM P|F TEXT`` -> the text; P = partial line."""
    out = []
    for line in raw.splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 3:
            continue
        text = parts[3] if len(parts) == 4 else ""
        out.append(text if parts[2] == "P" else text + "\n")
    return "".join(out)


ATTACH_WRITE_MAX = 32768  # conmon's CONN_SOCK_BUF_SIZE: one attach-socket message is read whole up to this
ATTACH_READ_MAX = 8192 + 1  # conmon's STDIO_BUF_SIZE + the stream byte it puts first
CTL_RESIZE = 1  # conmon's ctl fifo: "1 ROWS COLS\n" resizes the terminal (WIN_RESIZE_EVENT)


class ConmonTerminal:
    """containers.runtime.Terminal through conmon's attach socket (SOCK_SEQPACKET): each
    message conmon sends is a stream byte (2 stdout, 3 stderr: a terminal has only stdout)
    then the terminal's output; each message sent to it is input for the terminal. Closing
    it detaches: conmon (run without --stdin) keeps the terminal open for the next client."""

    def __init__(self, sock, ctl_path: str):
        self._sock, self._ctl = sock, ctl_path

    @classmethod
    def connect(cls, bundle_dir: str) -> "ConmonTerminal":
        import socket
        dfd = os.open(bundle_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            # through the dir's descriptor: the socket's own path may be too long for sun_path
            sock.connect(f"/proc/self/fd/{dfd}/attach")
        except OSError as e:
            sock.close()
            raise Conflict(f"the container's monitor has no attach socket ({e.strerror}): it is not "
                           "running under conmon any more; restart the container") from None
        finally:
            os.close(dfd)
        sock.setblocking(False)
        return cls(sock, os.path.join(bundle_dir, "ctl"))

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> bytes:
        while True:
            msg = self._sock.recv(ATTACH_READ_MAX)  # BlockingIOError when nothing is there
            if not msg:
                return b""
            if len(msg) > 1:
                return msg[1:]

    def write(self, data: bytes) -> int:
        return self._sock.send(data[:ATTACH_WRITE_MAX])

    def resize(self, cols: int, rows: int) -> None:
        if not (1 <= cols <= 1000 and 1 <= rows <= 1000):
            raise InvalidInput("cols and rows are integers from 1 to 1000")
        fd = os.open(self._ctl, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.write(fd, f"{CTL_RESIZE} {rows} {cols}\n".encode())
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()


_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `-m containers...` imports from
EXEC_CONSOLE_WAIT = 10.0  # seconds runc may take to hand over an exec's terminal


class RuncExec:
    """containers.runtime.ExecProcess of a foreground ``runc exec`` (see exec_interactive)."""

    def __init__(self, proc: subprocess.Popen, pid_file: str, init_pid: int | None, sockdir: str | None,
                 pty: int | None):
        self.proc, self.pid_file, self.init_pid, self._sockdir = proc, pid_file, init_pid, sockdir
        self.pty = pty
        self.stdin = proc.stdin.fileno() if proc.stdin else None
        self.stdout = proc.stdout.fileno() if proc.stdout else None
        self.stderr = proc.stderr.fileno() if proc.stderr and pty is None else None
        self._released = False

    @classmethod
    def start(cls, runc: list[str], name: str, o: ExecOptions, work_dir: str, init_pid: int | None) -> "RuncExec":
        import socket
        import tempfile
        pid_file = os.path.join(work_dir, f"iexec-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}.pid")
        argv = [*runc, "exec", "--pid-file", pid_file]
        if o.cwd:
            argv += ["--cwd", o.cwd]
        for k, v in o.env:
            argv += ["--env", f"{k}={v}"]
        if o.user:
            argv += ["--user", o.user]
        if not o.tty:
            piped = subprocess.Popen([*argv, name, *o.command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
            return cls(piped, pid_file, init_pid, None, None)
        sockdir = tempfile.mkdtemp(prefix="nodeagent-exec-")  # 0700; a short path for sun_path
        path = os.path.join(sockdir, "console.sock")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        proc: subprocess.Popen | None = None
        try:
            lsock.bind(path)
            lsock.listen(1)
            lsock.settimeout(0.2)
            # runc hands a terminal over only when it detaches: containers.exec_reaper waits in its place
            proc = subprocess.Popen([sys.executable, "-m", "containers.exec_reaper", pid_file, "--",
                                     *argv, "--detach", "--tty", "--console-socket", path, name, *o.command],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True, cwd=_REPO_ROOT)
            deadline = time.monotonic() + EXEC_CONSOLE_WAIT
            while True:
                try:
                    conn, _ = lsock.accept()
                    break
                except TimeoutError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        err = ""
                        if proc.poll() is not None and proc.stderr is not None:
                            err = proc.stderr.read().decode(errors="replace").strip()
                        raise CommandFailed(f"runc exec in {name!r} did not start: "
                                            f"{_runc_message(err) if err else 'no terminal handed over'}",
                                            stderr=err)
            with conn:
                conn.settimeout(EXEC_CONSOLE_WAIT)
                _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
            if not fds:
                raise CommandFailed(f"runc exec in {name!r} handed over no terminal")
            ex = cls(proc, pid_file, init_pid, sockdir, fds[0])
            ex.resize(o.cols, o.rows)
            return ex
        except BaseException:
            if proc is not None and proc.poll() is None:
                _kill_exec(_read_pid(pid_file), init_pid)
                os.killpg(proc.pid, signals.SIGKILL)
                proc.wait()
            shutil.rmtree(sockdir, ignore_errors=True)
            raise
        finally:
            lsock.close()

    def resize(self, cols: int, rows: int) -> None:
        import fcntl
        import struct
        import termios
        if self.pty is not None:
            fcntl.ioctl(self.pty, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def _pid(self) -> int | None:
        """The exec'd process, if it still runs in the container's pid namespace."""
        pid = _read_pid(self.pid_file)
        if not pid or not self.init_pid or _pid_ns(pid) is None or _pid_ns(pid) != _pid_ns(self.init_pid):
            return None
        return pid

    def signal(self, sig: int) -> None:
        pid = self._pid()
        if pid:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def close_stdin(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
            self.stdin = None

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return 128 - code if code < 0 else code

    def kill(self) -> None:
        if self.proc.poll() is None:
            _kill_exec(_read_pid(self.pid_file), self.init_pid)
            try:
                os.killpg(self.proc.pid, signals.SIGKILL)
            except ProcessLookupError:
                pass

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self.proc.poll() is None:
            self.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None and not f.closed:
                f.close()
        if self.pty is not None:
            os.close(self.pty)
        try:
            os.unlink(self.pid_file)
        except FileNotFoundError:
            pass
        if self._sockdir:
            shutil.rmtree(self._sockdir, ignore_errors=True)


def _copy_tree(src: str, dest: str) -> None:
    """``dest`` (absent) becomes a copy of ``src``: owners, modes, xattrs (overlayfs's opaque
    dirs), whiteouts (0/0 devices), hard links and holes kept."""
    r = subprocess.run(["cp", "-a", "--sparse=always", "--no-target-directory", src, dest],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise CommandFailed(f"copying {src} failed: {r.stderr.strip()[-300:]}",
                            argv=["cp", "-a", src, dest], returncode=r.returncode, stderr=r.stderr)
