"""Real runc + conmon: isolation, limits, networking, re-adoption and clean failure."""
from __future__ import annotations

import os
import socket
import subprocess
import urllib.request

import pytest

from agent.errors import CommandFailed, Conflict, InvalidInput
from agent.state import Database
from containers import cgroups
from containers import Limits, NetworkSpec, PortMap
from containers.runc import RuncRuntime
from storage import mounts
from testbed.netattack import wait_until as wait_for
from testbed.runtimes import find_free_port, make_runc, make_spec

pytestmark = pytest.mark.real


@pytest.fixture
def rt(tmp_path):
    runtime, cleanup = make_runc(tmp_path)
    yield runtime
    cleanup()
    assert_nothing_left(runtime)
    assert cgroups.list_names(runtime.cgroup_parent) == set()
    assert not any(os.path.exists(f"/sys/fs/cgroup/{c}/{runtime.cgroup_parent}")
                   for c in os.listdir("/sys/fs/cgroup"))


def assert_nothing_left(rt: RuncRuntime, names=None):
    """No mount, cgroup, veth, netns, lease, port rule or dir of any container of ``rt``
    (or just of ``names``)."""
    known = set(names) if names is not None else None

    def mine(n):
        return known is None or n in known

    assert [m for m in mounts.mounts_under(rt.state_dir)
            if mine(os.path.basename(os.path.dirname(m)))] == []
    assert [n for n in cgroups.list_names(rt.cgroup_parent) if mine(n)] == []
    assert [n for n in rt.net.leftover_names() if mine(n)] == []
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for n in (known or []):
        assert rt.net.veth_name(n) not in links
    if known is None:
        assert f"nv{rt.rtag}" not in links
    ns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    assert [x for x in ns if x.startswith(f"nact-{rt.rtag}-") and mine(x.split("-", 2)[2])] == []
    rules = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True,
                           text=True).stdout
    assert [line for line in rules.splitlines()
            if f"nodeagent:{rt.rtag}:" in line and ":net:" not in line
            and (known is None or any(f"{rt.rtag}:{n}" in line for n in known))] == []
    assert [d for d in os.listdir(os.path.join(rt.state_dir, "containers")) if mine(d)] == []
    assert [d for d in os.listdir(os.path.join(rt.state_dir, "sock")) if mine(d)] == []  # conmon's links


def run_spec(rt, tmp_path, name, command, **kw):
    rt.create(make_spec(rt, tmp_path, name, command, **kw))
    return rt.start(name)


def test_pid_mount_and_uts_isolation(rt, tmp_path):
    run_spec(rt, tmp_path, "iso", ("sleep", "1000"), hostname="isolated1")
    ps = rt.exec("iso", ["ps", "-o", "pid,comm"])
    assert ps.exit_code == 0
    pids = [line.split()[0] for line in ps.stdout.splitlines()[1:]]
    assert "1" in pids and len(pids) <= 3, ps.stdout  # sleep, ps (and nothing of the host)
    assert "pytest" not in ps.stdout and "conmon" not in ps.stdout
    assert rt.exec("iso", ["hostname"]).stdout.strip() == "isolated1"
    assert socket.gethostname() != "isolated1"
    mnt = rt.exec("iso", ["cat", "/proc/self/mountinfo"]).stdout
    points = {line.split()[4] for line in mnt.splitlines()}
    allowed = {"/", "/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys",
               "/sys/fs/cgroup", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf"}
    # only the container's own mounts (+ masked/read-only /proc and /sys paths, cgroups)
    assert {p for p in points if not p.startswith(("/proc/", "/sys/"))} <= allowed, points
    assert rt.exec("iso", ["ls", "/work"]).exit_code != 0
    # runc created it in a view of its own (issue #20); its monitor lives in the host's mount
    # namespace, so no copy of another container's (or any host) mount outlives a create
    cdir = os.path.join(rt.state_dir, "containers", "iso")
    with open(os.path.join(cdir, "conmon.pid")) as f:
        assert os.readlink(f"/proc/{int(f.read())}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    assert rt.private_views and rt.view_runc == os.path.join(rt.state_dir, "runc-view")
    # the seccomp profile and the capability set hold
    assert rt.exec("iso", ["mount", "-t", "tmpfs", "x", "/tmp"]).exit_code != 0
    assert rt.exec("iso", ["sh", "-c", "echo 1 > /proc/sys/kernel/panic"]).exit_code != 0


def test_start_releases_the_init_without_runc_and_falls_back_to_runc_start(rt, tmp_path, monkeypatch):
    """A start opens the exec fifo the created init waits on (no `runc start`, no mount view:
    issue #20); runc reads the container as running after. Where the fifo is not where this
    runc keeps it, `runc start` does it (in a private view)."""
    import containers.runc as runc_mod
    calls = []
    real = RuncRuntime._runc

    def spy(self, *args, **kw):
        calls.append(args[0])
        return real(self, *args, **kw)
    monkeypatch.setattr(RuncRuntime, "_runc", spy)
    assert run_spec(rt, tmp_path, "fifo", ("sleep", "1000")).state == "running"
    assert "start" not in calls
    assert not os.path.exists(os.path.join(rt.runc_root, "fifo", runc_mod.EXEC_FIFO))
    assert rt._runc("state", "fifo").stdout.count('"running"') == 1
    assert rt.exec("fifo", ["true"]).exit_code == 0
    monkeypatch.setattr(runc_mod, "EXEC_FIFO", "no-such-fifo")  # another runc's layout
    assert run_spec(rt, tmp_path, "viarunc", ("sleep", "1000")).state == "running"
    assert "start" in calls
    for name in ("fifo", "viarunc"):
        rt.delete(name)


def test_memory_hog_is_oom_killed_inside_its_limit(rt, tmp_path):
    # the shell (pid 1) itself holds 100 MB in a variable inside a 32 MiB container
    cwd_oom = os.path.join(os.getcwd(), "oom")  # conmon's OOM marker, written into its cwd
    had_oom = os.path.exists(cwd_oom)
    run_spec(rt, tmp_path, "hog", ("sh", "-c", "x=$(yes | head -c 100000000); echo survived"),
             limits=Limits(memory_mib=32))
    info = wait_for(lambda: (i := rt.get("hog")).state == "stopped" and i, 30)
    assert info.exit_code == 137  # SIGKILL by the OOM killer
    assert "survived" not in rt.logs("hog")
    assert rt.stats("hog")["oom_kills"] >= 1
    assert os.getpid() and rt.list()  # the agent lives on
    assert os.path.exists(cwd_oom) == had_oom  # the marker went to the container's dir


def test_fork_bomb_stops_at_pids_max(rt, tmp_path):
    run_spec(rt, tmp_path, "bomb", ("sleep", "1000"), limits=Limits(pids_max=20))
    res = rt.exec("bomb", ["sh", "-c", "for i in $(seq 1 60); do sleep 30 >/dev/null 2>&1 & done; "
                                       "sleep 0.5; ps -o pid | wc -l"], timeout=30)
    assert res.exit_code != 0 and "can't fork" in res.stderr, res
    assert 15 <= rt.stats("bomb")["pids"] <= 20  # the bomb filled the limit and stopped there
    rt.update_limits("bomb", Limits(pids_max=100))
    assert rt.stats("bomb")["limits"]["pids_max"] == 100


def test_cpu_and_memory_limits_reach_the_cgroup(rt, tmp_path):
    run_spec(rt, tmp_path, "lim", ("sleep", "1000"),
             limits=Limits(cpus=0.5, memory_mib=64, pids_max=30))
    base = "/sys/fs/cgroup"
    rel = f"{rt.cgroup_parent}/lim"
    if cgroups.is_v2():
        assert open(f"{base}/{rel}/cpu.max").read().split()[0] == "50000"
    else:
        assert open(f"{base}/cpu/{rel}/cpu.cfs_quota_us").read().strip() == "50000"
        assert int(open(f"{base}/memory/{rel}/memory.limit_in_bytes").read()) == 64 << 20
        if cgroups.has_memsw():
            assert int(open(f"{base}/memory/{rel}/memory.memsw.limit_in_bytes").read()) \
                == 64 << 20
    rt.update_limits("lim", Limits(cpus=1.5, memory_mib=128, pids_max=30))
    if not cgroups.is_v2():
        assert open(f"{base}/cpu/{rel}/cpu.cfs_quota_us").read().strip() == "150000"
        assert int(open(f"{base}/memory/{rel}/memory.limit_in_bytes").read()) == 128 << 20
    st = rt.stats("lim")
    assert st["memory_bytes"] > 0 and st["pids"] >= 1
    # a resize while stopped (kept in the state DB) reaches the cgroup at the next start
    rt.kill("lim", 9)
    rt.update_limits("lim", Limits(cpus=0.25, memory_mib=80, pids_max=30))
    rt.start("lim")
    if cgroups.is_v2():
        assert open(f"{base}/{rel}/cpu.max").read().split()[0] == "25000"
    else:
        assert open(f"{base}/cpu/{rel}/cpu.cfs_quota_us").read().strip() == "25000"
        assert int(open(f"{base}/memory/{rel}/memory.limit_in_bytes").read()) == 80 << 20


def test_two_containers_reach_each_other_over_the_bridge(rt, tmp_path):
    a = run_spec(rt, tmp_path, "a", ("sleep", "1000"), network=NetworkSpec())
    b = run_spec(rt, tmp_path, "b", ("sleep", "1000"), network=NetworkSpec())
    rt.delete("b")
    b = run_spec(rt, tmp_path, "b", ("httpd", "-f", "-p", "80", "-h", "/www"),
                 network=NetworkSpec())
    # busybox nc, not wget: static busybox's wget crashes without NSS libraries
    get = f"printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {b.ip} 80"
    res = wait_for(lambda: (r := rt.exec("a", ["sh", "-c", get])).exit_code == 0
                   and "hello from busybox" in r.stdout and r)
    assert res, rt.exec("a", ["sh", "-c", get])
    net = rt.stats("a")["net"]
    assert net["tx_bytes"] > 0 and net["tx_packets"] > 0 and net["rx_packets"] > 0
    gw = rt.exec("b", ["ip", "route"]).stdout
    assert f"default via {rt.net.gateway}" in gw
    assert a.ip in rt.exec("a", ["ip", "addr"]).stdout


def test_published_port_answers_from_the_host(rt, tmp_path):
    port = find_free_port()
    run_spec(rt, tmp_path, "web", ("httpd", "-f", "-p", "80", "-h", "/www"),
             network=NetworkSpec(ports=(PortMap(host_port=port, container_port=80),)))

    def fetch():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=2) as r:
                return r.read().decode()
        except OSError:
            return None
    assert wait_for(fetch, 10) == "hello from busybox\n"
    rt.delete("web")
    assert fetch() is None


def test_port_already_taken_on_the_host_is_conflict(rt, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(Conflict, match="in use"):
            rt.create(make_spec(rt, tmp_path, "taken", ("sleep", "1"), network=NetworkSpec(
                ports=(PortMap(host_port=port, container_port=80),))))
    assert rt.find("taken") is None
    assert_nothing_left(rt, ["taken"])


def test_network_none_and_host(rt, tmp_path):
    run_spec(rt, tmp_path, "nonet", ("sleep", "1000"), network=NetworkSpec(mode="none"))
    links = rt.exec("nonet", ["ip", "-o", "link"]).stdout
    assert "eth0" not in links and "lo" in links
    run_spec(rt, tmp_path, "hostnet", ("sleep", "1000"), network=NetworkSpec(mode="host"))
    assert "eth0" in rt.exec("hostnet", ["ip", "-o", "link"]).stdout


def test_bad_command_gives_clear_error_and_leaves_nothing(rt, tmp_path):
    with pytest.raises(InvalidInput, match="not in the image"):
        rt.create(make_spec(rt, tmp_path, "nocmd", ("/no/such/prog",), network=NetworkSpec()))
    assert rt.find("nocmd") is None
    assert_nothing_left(rt, ["nocmd"])
    # a command that exists but fails: the exit code says so
    run_spec(rt, tmp_path, "fails", ("sh", "-c", "echo oops >&2; exit 42"))
    info = wait_for(lambda: (i := rt.get("fails")).state == "stopped" and i)
    assert info.exit_code == 42 and rt.logs("fails") == "oops\n"


def test_unknown_image_and_bad_limits_leave_nothing(rt, tmp_path):
    spec = make_spec(rt, tmp_path, "noimg", ("sh",), network=NetworkSpec())
    bad = spec.__class__(**{**spec.__dict__, "rootfs": spec.rootfs.__class__(
        ("/nonexistent/layer",), spec.rootfs.upperdir, spec.rootfs.workdir)})
    with pytest.raises(InvalidInput, match="import the image"):
        rt.create(bad)
    with pytest.raises(InvalidInput):
        rt.create(make_spec(rt, tmp_path, "badlim", ("sh",), limits=Limits(memory_mib=-5),
                            network=NetworkSpec()))
    assert rt.list() == []
    assert_nothing_left(rt, ["noimg", "badlim"])


def test_failure_mid_create_rolls_back(rt, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise CommandFailed("injected bundle failure")
    monkeypatch.setattr("containers.bundle.write_bundle", broken)
    with pytest.raises(CommandFailed):
        rt.create(make_spec(rt, tmp_path, "half", ("sleep", "1"), network=NetworkSpec(
            ports=(PortMap(host_port=find_free_port(), container_port=80),))))
    assert rt.find("half") is None
    assert_nothing_left(rt, ["half"])


def test_readoption_after_agent_restart_and_reconcile(rt, tmp_path):
    run_spec(rt, tmp_path, "keep", ("sleep", "1000"), network=NetworkSpec())
    run_spec(rt, tmp_path, "done", ("sh", "-c", "exit 5"))
    wait_for(lambda: rt.get("done").state == "stopped")
    # a new runtime over the same state dir and DB (the agent restarted)
    again = RuncRuntime(rt.state_dir, Database(rt.db.path), bridge=rt.net.bridge,
                        subnet=str(rt.net.subnet), cgroup_parent=rt.cgroup_parent)
    keep = again.get("keep")
    assert keep.state == "running" and keep.pid == rt.get("keep").pid
    assert again.get("done").state == "stopped" and again.get("done").exit_code == 5
    assert again.exec("keep", ["echo", "back"]).stdout == "back\n"
    # a container whose record vanished (crash mid-delete) is released by reconcile
    again.db.execute("DELETE FROM containers WHERE name='keep'")
    out = again.reconcile()
    assert "keep" in out["released"]
    assert_nothing_left(again, ["keep"])
    assert again.stop("done").state == "stopped"


def test_stop_timeout_then_kill_and_restart_keeps_network(rt, tmp_path):
    info = run_spec(rt, tmp_path, "st", ("sleep", "1000"), network=NetworkSpec())
    # busybox sleep as pid 1 ignores SIGTERM: stop must fall back to SIGKILL
    assert rt.stop("st", timeout=0.5).exit_code == 137
    again = rt.start("st")
    assert again.state == "running" and again.ip == info.ip
    assert rt.exec("st", ["ip", "addr"]).exit_code == 0


AGENT_SCRIPT = """
from agent.state import Database
from containers import ContainerSpec, NetworkSpec, Rootfs
from containers.runc import RuncRuntime
rt = RuncRuntime({state!r}, Database({db!r}), bridge={bridge!r}, subnet={subnet!r},
                 cgroup_parent={parent!r})
rt.create(ContainerSpec(name="survivor", rootfs=Rootfs(({lower!r},), {up!r}, {work!r}),
                        command=("sleep", "1000"), network=NetworkSpec()))
print(rt.start("survivor").pid)
"""


def test_containers_outlive_the_agent_process(rt, tmp_path):
    """An agent process starts a container and exits; a new one re-adopts it."""
    import sys
    from testbed.runtimes import busybox_lower
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = AGENT_SCRIPT.format(
        state=rt.state_dir, db=rt.db.path, bridge=rt.net.bridge, subnet=str(rt.net.subnet),
        parent=rt.cgroup_parent, lower=busybox_lower(), up=str(tmp_path / "sup"),
        work=str(tmp_path / "swork"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=root)  # `-c` imports from the cwd: this checkout
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.strip())
    info = rt.get("survivor")
    assert info.state == "running" and info.pid == pid and info.ip
    assert rt.exec("survivor", ["echo", "adopted"]).stdout == "adopted\n"
    assert rt.stop("survivor", timeout=0.5).state == "stopped"


@pytest.fixture
def upstream(tmp_path):
    """A network namespace standing for 'the outside': veth to the host, 198.18.<k>.0/30,
    a TCP server on 198.18.<k>.2:9000 that answers with the peer's address."""
    import random
    import secrets
    from pyroute2 import IPRoute, NetNS, netns
    k = random.randrange(200, 250)
    ns, hif, pif = f"natest-up-{secrets.token_hex(3)}", f"nvup{secrets.token_hex(3)}", "nvpeer"
    host_ip, up_ip = f"198.18.{k}.1", f"198.18.{k}.2"
    netns.create(ns)
    server = None
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=hif, kind="veth", peer={"ifname": pif, "net_ns_fd": ns})
            i = ipr.link_lookup(ifname=hif)[0]
            ipr.addr("add", index=i, address=host_ip, prefixlen=30)
            ipr.link("set", index=i, state="up")
        with NetNS(ns) as n:
            i = n.link_lookup(ifname=pif)[0]
            n.addr("add", index=i, address=up_ip, prefixlen=30)
            n.link("set", index=i, state="up")
            n.link("set", index=n.link_lookup(ifname="lo")[0], state="up")
        code = ("import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,"
                "socket.SO_REUSEADDR,1)\n"
                f"s.bind(('{up_ip}',9000));s.listen()\n"
                "while True:\n c,a=s.accept();c.sendall(a[0].encode()+b'\\n');c.close()\n")
        import sys
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code])
        yield {"ip": up_ip, "host_ip": host_ip, "netns": ns}
    finally:
        if server:
            server.kill()
            server.wait()
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=hif)
            if idx:
                ipr.link("del", index=idx[0])
        netns.remove(ns)


def test_egress_is_masqueraded(rt, tmp_path, upstream):
    info = run_spec(rt, tmp_path, "out", ("sleep", "1000"), network=NetworkSpec())
    res = wait_for(lambda: (r := rt.exec("out", ["nc", "-w", "2", upstream["ip"], "9000"]))
                   .exit_code == 0 and r.stdout.strip() and r)
    assert res, "container could not reach the upstream namespace"
    # the outside saw the host's address, not the container's: NAT did its job
    assert res.stdout.strip() == upstream["host_ip"] != info.ip


def test_user_namespace_maps_root_and_keeps_networking(open_tmp):
    rt, cleanup = make_runc(open_tmp)
    try:
        run_spec(rt, open_tmp, "u", ("sleep", "1000"), userns=True, network=NetworkSpec())
        assert rt.exec("u", ["cat", "/proc/self/uid_map"]).stdout.split() == \
            ["0", str(rt.idmap.host_id), str(rt.idmap.size)]
        assert rt.exec("u", ["id", "-u"]).stdout == "0\n"
        assert rt.exec("u", ["touch", "/made-inside"]).exit_code == 0
        # container root is an unprivileged uid on the host
        assert os.stat(open_tmp / "rootfs" / "u" / "upper" / "made-inside").st_uid == rt.idmap.host_id
        ip = rt.get("u").ip
        assert ip in rt.exec("u", ["ip", "addr"]).stdout
        rt.restart("u", timeout=0.5)  # a new netns each run: wired up again
        assert ip in rt.exec("u", ["ip", "addr"]).stdout
    finally:
        cleanup()
    assert_nothing_left(rt)


def test_user_namespace_on_a_closed_dir_is_a_clear_error(rt, tmp_path):
    from agent.errors import Unsupported
    with pytest.raises(Unsupported, match="chmod o\\+x"):
        rt.create(make_spec(rt, tmp_path, "closed", ("sleep", "1"), userns=True,
                            network=NetworkSpec()))
    assert rt.find("closed") is None
    assert_nothing_left(rt, ["closed"])


def test_port_published_on_a_chosen_address_answers_from_outside(rt, tmp_path, upstream):
    """host_ip = one of the host's addresses; a client in another netns (PREROUTING path)."""
    port = find_free_port()
    run_spec(rt, tmp_path, "pub", ("httpd", "-f", "-p", "80", "-h", "/www"),
             network=NetworkSpec(ports=(PortMap(host_port=port, container_port=80,
                                                host_ip=upstream["host_ip"]),)))
    ns = upstream["netns"]
    get = ["ip", "netns", "exec", ns, "busybox", "sh", "-c",
           f"printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 2 "
           f"{upstream['host_ip']} {port}"]
    out = wait_for(lambda: "hello from busybox" in (r := subprocess.run(
        get, capture_output=True, text=True)).stdout and r)
    assert out, "published port did not answer on the chosen address"


def test_start_after_a_host_reboot_remakes_mount_and_network(rt, tmp_path):
    """A reboot loses mounts and netns but keeps the state dir and DB."""
    info = run_spec(rt, tmp_path, "boot", ("sleep", "1000"), network=NetworkSpec())
    rt.stop("boot", timeout=0.2)
    mounts.unmount(os.path.join(rt.state_dir, "containers", "boot", "rootfs"))
    rt.net.detach("boot", keep_lease=True)
    again = rt.start("boot")
    assert again.state == "running" and again.ip == info.ip
    assert info.ip in rt.exec("boot", ["ip", "addr"]).stdout


def _loops_of(img: str) -> list[str]:
    out = subprocess.run(["losetup", "-j", img, "-O", "NAME", "-n"], capture_output=True, text=True).stdout
    return out.split()


@pytest.mark.parametrize("userns", [True, False])
def test_rootfs_size_limit_ends_in_enospc_and_leaves_nothing(open_tmp, userns):
    """Writes past the limit fail with ENOSPC inside; the host keeps its space (the image is
    sparse: it takes what was written, at most the limit); after a reboot (mounts gone) the
    files are there again; delete leaves no loop device, mount or file."""
    from containers import Rootfs
    import dataclasses
    rt, cleanup = make_runc(open_tmp)
    try:
        spec = make_spec(rt, open_tmp, "q", ("sleep", "1000"), userns=userns)
        spec = dataclasses.replace(spec, rootfs=Rootfs(spec.rootfs.lowerdirs, spec.rootfs.upperdir,
                                                       spec.rootfs.workdir, quota_bytes=64 * 1024 * 1024))
        rt.create(spec)
        rt.start("q")
        img = os.path.join(rt.state_dir, "containers", "q", "disk.img")
        assert len(_loops_of(img)) == 1
        free_before = os.statvfs(rt.state_dir).f_bavail * os.statvfs(rt.state_dir).f_frsize
        r = rt.exec("q", ["dd", "if=/dev/zero", "of=/big", "bs=1M", "count=200"])
        assert r.exit_code != 0 and "No space left on device" in r.stderr, r
        used = os.stat(img).st_blocks * 512
        assert used <= 66 * 1024 * 1024  # the limit (+ the filesystem's metadata), not 200 MiB
        free_after = os.statvfs(rt.state_dir).f_bavail * os.statvfs(rt.state_dir).f_frsize
        assert free_before - free_after <= 70 * 1024 * 1024
        assert rt.exec("q", ["rm", "/big"]).exit_code == 0
        assert rt.exec("q", ["sh", "-c", "echo kept > /kept"]).exit_code == 0
        # a host reboot: every mount gone, the state dir kept
        rt.stop("q", timeout=0.2)
        mounts.unmount(os.path.join(rt.state_dir, "containers", "q", "rootfs"))
        mounts.release_fs_image(img)
        assert _loops_of(img) == []
        rt.start("q")
        assert rt.exec("q", ["cat", "/kept"]).stdout == "kept\n"
        assert rt.exec("q", ["dd", "if=/dev/zero", "of=/big", "bs=1M", "count=200"]).exit_code != 0
        assert rt.delete("q")
        assert _loops_of(img) == [] and not os.path.exists(img)
        # the runtime's own containers/ mount (RuncRuntime._bind_bundles) stays while it lives
        assert mounts.mounts_under(str(open_tmp)) in ([], [os.path.join(rt.state_dir, "containers")])
    finally:
        cleanup()
    assert_nothing_left(rt)


def test_rootfs_size_limit_failed_create_leaves_nothing(rt, tmp_path):
    """A create that fails after the filesystem was made (an unknown command) removes it all."""
    from containers import Rootfs
    import dataclasses
    spec = make_spec(rt, tmp_path, "qbad", ("no-such-program",))
    spec = dataclasses.replace(spec, rootfs=Rootfs(spec.rootfs.lowerdirs, spec.rootfs.upperdir,
                                                   spec.rootfs.workdir, quota_bytes=64 * 1024 * 1024))
    with pytest.raises(InvalidInput):
        rt.create(spec)
    img = os.path.join(rt.state_dir, "containers", "qbad", "disk.img")
    assert _loops_of(img) == [] and not os.path.exists(img)
    assert mounts.mounts_under(str(tmp_path)) == [os.path.join(rt.state_dir, "containers")]  # the runtime's own
    assert_nothing_left(rt, ["qbad"])


def test_rootfs_size_limit_takes_in_what_the_upper_dir_held(open_tmp):
    """A migration's destination receives the upper dir before the create: the new filesystem
    starts with it (owners and overlay xattrs kept)."""
    from containers import Rootfs
    import dataclasses
    rt, cleanup = make_runc(open_tmp)
    try:
        spec = make_spec(rt, open_tmp, "qin", ("sleep", "1000"), userns=True)
        up = spec.rootfs.upperdir
        os.makedirs(os.path.join(up, "srv"))
        with open(os.path.join(up, "srv", "moved"), "w") as f:
            f.write("moved\n")
        os.chown(os.path.join(up, "srv", "moved"), rt.idmap.host_id + 7, rt.idmap.host_id + 7)
        os.setxattr(os.path.join(up, "srv"), "trusted.overlay.opaque", b"y")
        spec = dataclasses.replace(spec, rootfs=Rootfs(spec.rootfs.lowerdirs, up, spec.rootfs.workdir,
                                                       quota_bytes=64 * 1024 * 1024))
        rt.create(spec)
        rt.start("qin")
        assert rt.exec("qin", ["cat", "/srv/moved"]).stdout == "moved\n"
        assert rt.exec("qin", ["ls", "-n", "/srv/moved"]).stdout.split()[2:4] == ["7", "7"]
        assert os.getxattr(os.path.join(up, "srv"), "trusted.overlay.opaque") == b"y"
        assert mounts.is_mounted(os.path.dirname(up))
    finally:
        cleanup()
    assert_nothing_left(rt)


def test_a_container_recorded_before_user_namespaces_is_adopted_as_it_was(rt, tmp_path):
    """A record of an earlier agent (no idmap, no rootfs quota in its spec; no user namespace)
    is re-adopted running, restarts, and keeps running as host root (unchanged)."""
    import json
    run_spec(rt, tmp_path, "old", ("sleep", "1000"))
    row = rt.db.one("SELECT spec FROM containers WHERE name='old'")
    spec = json.loads(row["spec"])
    del spec["idmap"], spec["rootfs"]["quota_bytes"]
    rt.db.execute("UPDATE containers SET spec=? WHERE name='old'", (json.dumps(spec),))
    again = RuncRuntime(rt.state_dir, Database(rt.db.path), bridge=rt.net.bridge,
                        subnet=str(rt.net.subnet), cgroup_parent=rt.cgroup_parent)
    info = again.get("old")
    assert info.state == "running" and info.idmap is None and info.pid == rt.get("old").pid
    again.restart("old", timeout=0.2)
    assert again.exec("old", ["cat", "/proc/self/uid_map"]).stdout.split() == ["0", "0", "4294967295"]
    again.close()


def test_an_image_without_etc_gets_one_its_root_owns(open_tmp):
    """The mount points the agent makes for /etc/hosts & co. belong to container root."""
    import shutil
    from containers import Rootfs
    from testbed.runtimes import build_busybox_rootfs
    import dataclasses
    lower = build_busybox_rootfs(str(open_tmp / "noetc"))
    shutil.rmtree(os.path.join(lower, "etc"))
    rt, cleanup = make_runc(open_tmp)
    try:
        spec = make_spec(rt, open_tmp, "noetc", ("sleep", "1000"), userns=True)
        rt.create(dataclasses.replace(spec, rootfs=Rootfs((lower,), spec.rootfs.upperdir, spec.rootfs.workdir)))
        rt.start("noetc")
        assert rt.exec("noetc", ["ls", "-nd", "/etc"]).stdout.split()[2:4] == ["0", "0"]
        assert rt.exec("noetc", ["touch", "/etc/mine"]).exit_code == 0
    finally:
        cleanup()
    assert_nothing_left(rt)


def test_id_mapped_layers_the_way_older_kernels_take_them(open_tmp):
    """Kernels before 6.15 refuse detached layers: attached under the container's dir for the
    overlay mount, detached right after. Same view inside, no mount left behind."""
    rt, cleanup = make_runc(open_tmp)
    rt.detached_layers = False
    try:
        run_spec(rt, open_tmp, "staged", ("sleep", "1000"), userns=True)
        assert rt.exec("staged", ["ls", "-nd", "/bin/busybox", "/"]).stdout.split()[2:4] == ["0", "0"]
        assert rt.exec("staged", ["touch", "/x"]).exit_code == 0
        cdir = os.path.join(rt.state_dir, "containers", "staged")
        assert mounts.mounts_under(cdir) == [os.path.join(cdir, "rootfs")]
    finally:
        cleanup()
    assert_nothing_left(rt)
