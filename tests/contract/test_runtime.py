"""The containers.Runtime contract, run against the fake and against runc + conmon.

Commands used here behave the same on both (see containers/fake.py for the fake's
interpreter): ``true``, ``false``, ``echo``, ``sh -c "exit N"``, ``hostname``, and a
long-running ``sleep``.
"""
from __future__ import annotations

import os
import time

import pytest

from agent.errors import Conflict, InvalidInput, NotFound
from containers import ContainerSpec, Limits, NetworkSpec, PortMap, Runtime
from containers.runtime import SupportsLiveVolumes, SupportsPause, SupportsReconcile, SupportsVolumes, VolumeMount
from testbed.runtimes import RUNTIMES, make_runtime, make_spec

LONG = ("sleep", "1000")


def wait_state(rt, name, state, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        info = rt.get(name)
        if info.state == state or time.monotonic() > deadline:
            return info
        time.sleep(0.02)


@pytest.fixture(params=RUNTIMES)
def rt(request, tmp_path):
    runtime, cleanup = make_runtime(request.param, tmp_path)
    yield runtime
    cleanup()


@pytest.fixture
def spec(rt, tmp_path):
    def build(name, command=LONG, **kw) -> ContainerSpec:
        return make_spec(rt, tmp_path, name, command, **kw)
    return build


def test_is_a_runtime(rt):
    assert isinstance(rt, Runtime)


def test_lifecycle_create_start_stop_delete(rt, spec):
    info = rt.create(spec("c1", network=NetworkSpec(mode="none")))
    assert (info.name, info.state, info.pid) == ("c1", "created", None)
    assert [i.name for i in rt.list()] == ["c1"]
    info = rt.start("c1")
    assert info.state == "running" and info.pid
    assert rt.start("c1").state == "running"  # idempotent
    info = rt.stop("c1", timeout=1)
    assert info.state == "stopped" and info.exit_code in (143, 137) and info.pid is None
    assert rt.get("c1").state == "stopped"
    assert rt.delete("c1") is True
    assert rt.delete("c1") is False
    assert rt.find("c1") is None
    with pytest.raises(NotFound):
        rt.get("c1")


def test_exit_codes_are_kept(rt, spec):
    rt.create(spec("ok", ("true",), network=NetworkSpec(mode="none")))
    rt.create(spec("bad", ("sh", "-c", "exit 7"), network=NetworkSpec(mode="none")))
    rt.start("ok")
    rt.start("bad")
    assert wait_state(rt, "ok", "stopped").exit_code == 0
    assert wait_state(rt, "bad", "stopped").exit_code == 7
    # a stopped container starts again
    rt.start("bad")
    assert wait_state(rt, "bad", "stopped").exit_code == 7


def test_kill_sets_signal_exit_code(rt, spec):
    rt.create(spec("k", network=NetworkSpec(mode="none")))
    rt.start("k")
    assert wait_state(rt, "k", "running").state == "running"
    rt.kill("k", 9)
    info = wait_state(rt, "k", "stopped")
    assert info.state == "stopped" and info.exit_code == 137
    with pytest.raises(Conflict):
        rt.kill("k", 9)


def test_restart(rt, spec):
    rt.create(spec("r", network=NetworkSpec(mode="none")))
    first = rt.start("r").pid
    info = rt.restart("r", timeout=1)
    assert info.state == "running" and info.pid and info.pid != first


def test_logs_capture_stdout(rt, spec):
    rt.create(spec("l", ("echo", "hello", "world"), network=NetworkSpec(mode="none")))
    rt.start("l")
    wait_state(rt, "l", "stopped")
    assert rt.logs("l") == "hello world\n"
    assert rt.logs("l", tail=1) == "hello world\n"
    assert rt.logs("l", tail=0) == ""
    rt.start("l")  # a second run appends
    wait_state(rt, "l", "stopped")
    assert rt.logs("l") == "hello world\nhello world\n"
    assert rt.logs("l", tail=1) == "hello world\n"


def test_exec_in_running_container(rt, spec):
    rt.create(spec("e", hostname="box1", network=NetworkSpec(mode="none")))
    with pytest.raises(Conflict):
        rt.exec("e", ["true"])
    rt.start("e")
    res = rt.exec("e", ["echo", "hi"])
    assert (res.exit_code, res.stdout) == (0, "hi\n")
    assert rt.exec("e", ["hostname"]).stdout == "box1\n"
    assert rt.exec("e", ["sh", "-c", "exit 3"]).exit_code == 3


def test_name_clash_is_conflict(rt, spec):
    rt.create(spec("dup", network=NetworkSpec(mode="none")))
    with pytest.raises(Conflict):
        rt.create(spec("dup", network=NetworkSpec(mode="none")))
    assert len(rt.list()) == 1


def test_unknown_names_are_not_found(rt):
    for call in (rt.start, rt.stop, rt.kill, rt.logs, rt.stats, rt.get):
        with pytest.raises(NotFound):
            call("nope")
    with pytest.raises(NotFound):
        rt.exec("nope", ["true"])
    with pytest.raises(NotFound):
        rt.update_limits("nope", Limits(cpus=1))


@pytest.mark.parametrize("limits", [Limits(cpus=0), Limits(cpus=-1), Limits(memory_mib=1),
                                    Limits(pids_max=0), Limits(io_weight=5000)])
def test_bad_limits_are_invalid(rt, spec, limits):
    with pytest.raises(InvalidInput):
        rt.create(spec("bl", limits=limits, network=NetworkSpec(mode="none")))
    assert rt.find("bl") is None


def test_bad_specs_are_invalid(rt, spec):
    for bad in (dict(name="bad/name"), dict(command=()),
                dict(network=NetworkSpec(mode="weird"))):
        name = bad.pop("name", "bs")
        with pytest.raises(InvalidInput):
            rt.create(spec(name, **bad))
    assert rt.list() == []


def test_limits_kept_and_updated(rt, spec):
    lim = Limits(cpus=0.5, memory_mib=64, pids_max=50, io_weight=200)
    rt.create(spec("lim", limits=lim, network=NetworkSpec(mode="none")))
    rt.start("lim")
    st = rt.stats("lim")
    assert st["limits"] == {"cpus": 0.5, "memory_mib": 64, "pids_max": 50, "io_weight": 200}
    assert st["pids"] >= 1
    assert set(st) >= {"cpu_ns", "memory_bytes", "pids", "io", "net", "oom_kills", "unsupported"}
    assert set(st["net"]) >= {"rx_bytes", "tx_bytes", "rx_packets", "tx_packets"}  # /metrics counters
    rt.update_limits("lim", Limits(cpus=1.0, memory_mib=96, pids_max=60, io_weight=200))
    st = rt.stats("lim")
    assert st["limits"]["memory_mib"] == 96 and st["limits"]["pids_max"] == 60
    with pytest.raises(InvalidInput):
        rt.update_limits("lim", Limits(memory_mib=0))


def test_bulk_stats_are_each_containers_stats(rt, spec):
    """bulk_stats(names) gives each known name what stats() gives (same keys, counters between a
    stats() before and one after), stopped ones included, unknown names left out."""
    from containers.runtime import SupportsBulkStats
    assert isinstance(rt, SupportsBulkStats)
    rt.create(spec("bb", network=NetworkSpec(mode="bridge")))
    rt.create(spec("bn", network=NetworkSpec(mode="none")))
    rt.create(spec("bs", network=NetworkSpec(mode="bridge")))
    for name in ("bb", "bn"):
        rt.start(name)
    rt.exec("bb", ["true"])
    names = ("bb", "bn", "bs")
    before = {n: rt.stats(n) for n in names}
    bulk = rt.bulk_stats([*names, "nope"])
    after = {n: rt.stats(n) for n in names}
    assert set(bulk) == set(names)
    for n in names:
        got = bulk[n]
        assert set(got) == set(before[n]) and got["limits"] == before[n]["limits"], n
        assert got["unsupported"] == before[n]["unsupported"]
        for key in ("cpu_ns", "oom_kills"):
            assert before[n][key] <= got[key] <= after[n][key], (n, key)
        assert got["pids"] >= 1 if n != "bs" else got["pids"] == 0
        for section in ("io", "net"):
            assert set(got[section]) == set(before[n][section]), (n, section)
            for key, value in got[section].items():
                assert before[n][section][key] <= value <= after[n][section][key], (n, section, key)
    assert rt.bulk_stats([]) == {}


def test_bridge_network_gets_distinct_ips(rt, spec):
    a = rt.create(spec("n1", network=NetworkSpec(mode="bridge")))
    b = rt.create(spec("n2", network=NetworkSpec(mode="bridge")))
    assert a.ip and b.ip and a.ip != b.ip
    rt.delete("n1")
    c = rt.create(spec("n3", network=NetworkSpec(mode="bridge")))
    assert c.ip and c.ip != b.ip


def test_port_clash_is_conflict(rt, spec, free_port):
    ports = (PortMap(host_port=free_port, container_port=80),)
    rt.create(spec("p1", network=NetworkSpec(mode="bridge", ports=ports)))
    with pytest.raises(Conflict):
        rt.create(spec("p2", network=NetworkSpec(mode="bridge", ports=ports)))
    assert rt.find("p2") is None


def test_pause_and_resume(rt, spec):
    rt.create(spec("pz", network=NetworkSpec(mode="none")))
    with pytest.raises(Conflict):
        rt.pause("pz")
    rt.start("pz")
    assert rt.pause("pz").state == "paused"
    with pytest.raises(Conflict):
        rt.start("pz")
    assert rt.resume("pz").state == "running"
    with pytest.raises(Conflict):
        rt.resume("pz")
    rt.pause("pz")
    assert rt.delete("pz") is True and rt.find("pz") is None


def test_limits_updated_while_stopped_apply_on_next_start(rt, spec):
    rt.create(spec("ls", network=NetworkSpec(mode="none")))
    rt.update_limits("ls", Limits(memory_mib=48, pids_max=40))
    rt.start("ls")
    assert rt.stats("ls")["limits"] == {"cpus": None, "memory_mib": 48, "pids_max": 40,
                                        "io_weight": None}


# -- optional capabilities (containers.runtime): the fake claims what runc claims --

def test_claims_its_optional_capabilities(rt):
    assert isinstance(rt, SupportsPause) and isinstance(rt, SupportsReconcile) and isinstance(rt, SupportsVolumes)
    assert isinstance(rt, SupportsLiveVolumes)


def test_volumes_change_only_while_stopped(rt, spec, tmp_path):
    from storage import mounts
    img = str(tmp_path / "vol.img")
    mounts.make_fs_image(img, 16 * 1024 * 1024)
    rt.create(spec("vc", network=NetworkSpec(mode="none")))
    with pytest.raises(InvalidInput, match="runtime"):
        rt.set_volumes("vc", (VolumeMount(img, "/proc/x"),))
    with pytest.raises(NotFound):
        rt.set_volumes("nope", (VolumeMount(img, "/data"),))
    rt.set_volumes("vc", (VolumeMount(img, "/data"),))
    assert rt.volumes("vc") == (VolumeMount(img, "/data"),)
    rt.start("vc")
    with pytest.raises(Conflict, match="stop it first"):
        rt.set_volumes("vc", ())
    rt.stop("vc", timeout=1)
    rt.set_volumes("vc", ())
    assert rt.volumes("vc") == ()
    assert rt.delete("vc") is True
    assert not mounts.release_fs_image(img), "no loop device of the volume is left"


def test_volumes_change_live_while_running(rt, spec, tmp_path):
    from storage import mounts
    img = str(tmp_path / "live.img")
    mounts.make_fs_image(img, 16 * 1024 * 1024)
    rt.create(spec("vl", network=NetworkSpec(mode="none")))
    with pytest.raises(Conflict):
        rt.add_volume_live("vl", VolumeMount(img, "/data"))  # stopped: set_volumes
    rt.start("vl")
    with pytest.raises(InvalidInput, match="runtime"):
        rt.add_volume_live("vl", VolumeMount(img, "/proc/x"))
    rt.add_volume_live("vl", VolumeMount(img, "/data"))
    assert rt.volumes("vl") == (VolumeMount(img, "/data"),)
    with pytest.raises(NotFound):
        rt.remove_volume_live("vl", "/other")
    rt.remove_volume_live("vl", "/data")
    assert rt.volumes("vl") == ()
    rt.stop("vl", timeout=1)
    assert rt.delete("vl") is True
    assert not mounts.release_fs_image(img), "no loop device of the volume is left"


def test_reconcile_keeps_recorded_containers_and_releases_leftovers(rt, spec):
    rt.create(spec("rk", network=NetworkSpec(mode="none")))
    rt.start("rk")
    leftover = None
    if hasattr(rt, "state_dir"):  # runc: a crash mid-create left a container dir with no record
        leftover = os.path.join(rt.state_dir, "containers", "ghost")
        os.makedirs(leftover)
    out = rt.reconcile()
    assert set(out) == {"released", "veths_removed"}
    assert "rk" not in out["released"] and rt.get("rk").state == "running"
    if leftover is not None:
        assert out["released"] == ["ghost"] and not os.path.exists(leftover)
    assert rt.reconcile()["released"] == []
    assert rt.delete("rk") is True


def test_bandwidth_is_checked_kept_and_changeable(rt, spec):
    from containers.bandwidth import Bandwidth
    from containers.runtime import SupportsBandwidth
    assert isinstance(rt, SupportsBandwidth)
    with pytest.raises(InvalidInput, match="bridge port"):
        rt.create(spec("bwnone", network=NetworkSpec(mode="none"), bandwidth=Bandwidth(1000)))
    with pytest.raises(InvalidInput, match="ingress_kbit"):
        rt.create(spec("bwbad", network=NetworkSpec(mode="bridge"), bandwidth=Bandwidth(1)))
    with pytest.raises(InvalidInput, match="burst_kbit"):
        rt.create(spec("bwbad", network=NetworkSpec(mode="bridge"), bandwidth=Bandwidth(burst_kbit=1000)))
    assert rt.list() == []  # refused before anything was made
    rt.create(spec("bw", network=NetworkSpec(mode="bridge"), bandwidth=Bandwidth(8000, 4000)))
    rt.start("bw")
    rt.set_bandwidth("bw", Bandwidth(16000, None, 256))
    with pytest.raises(InvalidInput):
        rt.set_bandwidth("bw", Bandwidth(egress_kbit=-5))
    with pytest.raises(NotFound):
        rt.set_bandwidth("nope", Bandwidth(1000))
    rt.stop("bw", timeout=1)
    rt.set_bandwidth("bw", Bandwidth())  # stopped: kept for the next start
    assert rt.start("bw").state == "running"


def test_interactive_exec_pipes_a_terminal_and_exit_codes(rt, spec):
    from containers.runtime import ExecOptions, SupportsInteractiveExec
    assert isinstance(rt, SupportsInteractiveExec)
    rt.create(spec("ie", network=NetworkSpec(mode="none")))
    rt.start("ie")
    p = rt.exec_interactive("ie", ExecOptions(command=("/bin/sh", "-c", "cat")))
    try:
        os.write(p.stdin, b"through stdin\n")
        p.close_stdin()
        out = b""
        while data := os.read(p.stdout, 65536):
            out += data
        assert out == b"through stdin\n" and p.wait(10) == 0
    finally:
        p.release()
    p = rt.exec_interactive("ie", ExecOptions(command=("/bin/sh", "-c", "exit 3"), tty=True, cols=100, rows=30))
    try:
        assert p.pty is not None and p.stdin is None
        assert p.wait(10) == 3
    finally:
        p.release()
    rt.stop("ie", timeout=1)
    with pytest.raises(Conflict):
        rt.exec_interactive("ie", ExecOptions(command=("/bin/sh",)))
    assert rt.delete("ie") is True


def test_files_round_trip_with_owner_and_mode(rt, spec):
    import io

    from containers.runtime import SupportsFiles
    assert isinstance(rt, SupportsFiles)
    rt.create(spec("fl", network=NetworkSpec(mode="none")))
    assert rt.put_file("fl", "/pushed.txt", io.BytesIO(b"x" * 3_000_000).read, uid=5, gid=6, mode=0o600) == 3_000_000
    fd, info = rt.open_file("fl", "/pushed.txt")
    try:
        got = b""
        while data := os.read(fd, 1 << 20):
            got += data
    finally:
        os.close(fd)
    assert got == b"x" * 3_000_000 and (info.size, info.mode, info.uid, info.gid) == (3_000_000, 0o600, 5, 6)
    with pytest.raises(NotFound):
        rt.put_file("fl", "/no-such-dir/f", io.BytesIO(b"x").read)
    with pytest.raises(NotFound):
        rt.open_file("fl", "/no-such-file")
    fd, info = rt.open_file("fl", "/")
    assert fd == -1 and info.kind == "directory"
    rt.make_dir("fl", "/made", uid=5, gid=6, mode=0o700)
    with pytest.raises(Conflict):
        rt.make_dir("fl", "/made")
    with pytest.raises(NotFound):
        rt.make_dir("fl", "/no-such-dir/sub")
    rt.put_file("fl", "/made/inner", io.BytesIO(b"abc").read)
    entries, truncated = rt.list_dir("fl", "/made")
    assert not truncated and [(e["name"], e["type"], e["size"]) for e in entries] == [("inner", "file", 3)]
    listed = {e["name"]: e for e in rt.list_dir("fl", "/")[0]}
    assert listed["made"]["type"] == "directory" and (listed["made"]["uid"], listed["made"]["mode"]) == (5, "0700")
    assert listed["pushed.txt"]["size"] == 3_000_000
    with pytest.raises(InvalidInput):
        rt.open_file("fl", "relative/path")
    assert rt.delete("fl") is True


def test_rootfs_snapshots_and_reset(rt, spec):
    """containers.runtime.SupportsRootfsSnapshots and SupportsRootfsReset (both runtimes):
    taken running (thawed after) or stopped, reverted and reset only while stopped."""
    from containers.runtime import SupportsRootfsReset, SupportsRootfsSnapshots
    assert isinstance(rt, SupportsRootfsSnapshots) and isinstance(rt, SupportsRootfsReset)
    rt.create(spec("sn", network=NetworkSpec(mode="none")))
    rt.start("sn")
    rt.snapshot_rootfs("sn", "one")
    assert rt.get("sn").state == "running", "thawed after the copy"
    assert rt.rootfs_snapshots("sn") == ["one"]
    with pytest.raises(Conflict):
        rt.snapshot_rootfs("sn", "one")
    for bad in ("", "-x", "a/b", "..", ".tmp-one"):
        with pytest.raises(InvalidInput):
            rt.snapshot_rootfs("sn", bad)
    with pytest.raises(Conflict, match="stop it"):
        rt.revert_rootfs("sn", "one")
    with pytest.raises(Conflict, match="stop it"):
        rt.reset_rootfs("sn")
    rt.kill("sn", 9)
    wait_state(rt, "sn", "stopped")
    with pytest.raises(NotFound):
        rt.revert_rootfs("sn", "nope")
    rt.revert_rootfs("sn", "one")
    rt.reset_rootfs("sn")
    assert rt.start("sn").state == "running"
    assert rt.delete_rootfs_snapshot("sn", "one") is True
    assert rt.delete_rootfs_snapshot("sn", "one") is False
    assert rt.rootfs_snapshots("sn") == []
    with pytest.raises(NotFound):
        rt.snapshot_rootfs("nosuch", "x")
    assert rt.delete("sn") is True


def _read_terminal(term, until: bytes, seconds: float = 10) -> bytes:
    import select
    got = b""
    deadline = time.monotonic() + seconds
    while until not in got:
        assert time.monotonic() < deadline, f"{until!r} never came: {got!r}"
        if not select.select([term], [], [], 0.2)[0]:
            continue
        try:
            data = term.read()
        except BlockingIOError:
            continue
        if not data:
            break
        got += data
    return got


def test_a_tty_containers_terminal_attaches_detaches_and_ends_with_it(rt, spec):
    from containers.runtime import SupportsTerminal
    assert isinstance(rt, SupportsTerminal)
    rt.create(spec("tt", command=("/bin/sh",), tty=True))
    rt.create(spec("nt"))
    with pytest.raises(Conflict):  # not started yet
        rt.open_terminal("tt")
    rt.start("tt")
    rt.start("nt")
    with pytest.raises(Conflict):  # created without a TTY
        rt.open_terminal("nt")
    with pytest.raises(NotFound):
        rt.open_terminal("nosuch")
    term = rt.open_terminal("tt")
    try:
        term.resize(100, 30)
        assert term.write(b"contract-typed\r") > 0
        _read_terminal(term, b"contract-typed")  # the terminal's echo, at least
    finally:
        term.close()  # detached: the container runs on, its terminal too
    assert rt.get("tt").state == "running"
    term = rt.open_terminal("tt")
    try:
        term.write(b"again\r")
        _read_terminal(term, b"again")
        rt.kill("tt", 9)
        assert _read_terminal(term, b"\0never") is not None  # ends (b"") once the container is gone
    finally:
        term.close()
    assert rt.delete("tt") is True and rt.delete("nt") is True
