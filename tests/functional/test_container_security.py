"""Real runc containers as attackers: the seccomp allow-list (default deny) and Docker's
capability set hold, and the workload they are meant to allow still runs."""
from __future__ import annotations

import json
import time

import pytest

from agent.errors import InvalidInput
from containers import NetworkSpec, seccomp
from containers.security import DEFAULT_CAPABILITIES, Security
from testbed import syscall_probe
from testbed.runtimes import make_runc, make_spec

pytestmark = pytest.mark.real

EPERM, EBADF, EFAULT, ENOSYS, EOPNOTSUPP = 1, 9, 14, 38, 95
# syscall numbers (x86_64) and arguments that fail harmlessly when allowed, with the errno
# the kernel gives then: a probe's exit code is its errno, 0 for success
PROBES = {
    "getpid": (39, (), 0),  # in the allow-list
    "keyctl": (250, (9999,), EOPNOTSUPP),  # kernel keyrings: not namespaced, never allowed
    "add_key": (248, (), EFAULT),
    "pidfd_getfd": (438, (-1, 0, 0), EBADF),  # only with CAP_SYS_PTRACE; the old deny-list let it through
    "io_uring_setup": (425, (0, 0), EFAULT),  # in neither the old deny-list nor the allow-list
    "kexec_load": (246, (), EPERM),  # EPERM anyway without CAP_SYS_BOOT: here for the record
}
# /proc/self/status CapBnd/CapEff of Docker's default set
DOCKER_CAPS_MASK = 0xA80425FB


@pytest.fixture
def runtime(tmp_path):
    made = []

    def make(**kw):
        rt, cleanup = make_runc(tmp_path / f"rt{len(made)}", **kw)
        made.append(cleanup)
        return rt
    yield make
    for cleanup in made:
        cleanup()


def start_with_probes(rt, tmp_path, name, **kw):
    spec = make_spec(rt, tmp_path, name, ("sleep", "1000"), **kw)
    for probe, (nr, args, _) in PROBES.items():
        syscall_probe.install(spec.rootfs.upperdir, probe, nr, *args)
    rt.create(spec)
    return rt.start(name)


def caps(rt, name, field):
    cmd = ["sh", "-c", f"grep {field} /proc/self/status"]
    res = rt.exec(name, cmd)
    assert res.exit_code == 0, res
    return int(res.stdout.split()[1], 16)


def test_syscalls_outside_the_allow_list_fail_with_eperm(runtime, tmp_path):
    rt = runtime()
    start_with_probes(rt, tmp_path, "sc")
    got = {p: rt.exec("sc", [f"/bin/{p}"]).exit_code for p in PROBES}
    assert got == {"getpid": 0, "keyctl": EPERM, "add_key": EPERM, "pidfd_getfd": EPERM,
                   "io_uring_setup": EPERM, "kexec_load": EPERM}
    # a syscall number no profile names (past the newest): runc answers ENOSYS, as the kernel would
    syscall_probe.install(rt._rootfs("sc"), "future", 1000)
    assert rt.exec("sc", ["/bin/future"]).exit_code == ENOSYS
    # namespaces and mounts: unshare(2) (a user namespace needs no capability) and mount(2)
    res = rt.exec("sc", ["busybox", "unshare", "-U", "true"])
    assert res.exit_code != 0 and "Operation not permitted" in res.stderr, res
    res = rt.exec("sc", ["mount", "-t", "tmpfs", "x", "/tmp"])
    assert res.exit_code != 0 and ("denied" in res.stderr or "not permitted" in res.stderr), res
    # the process runs under the filter (mode 2) with no new privileges off, as Docker
    status = rt.exec("sc", ["cat", "/proc/self/status"]).stdout
    assert "Seccomp:\t2" in status and "NoNewPrivs:\t0" in status, status


def test_normal_workload_runs_under_the_profile(runtime, tmp_path):
    rt = runtime()
    info = start_with_probes(rt, tmp_path, "work", network=NetworkSpec(mode="bridge"))
    script = ("set -e; mkdir -p /data/d; echo hello > /data/d/f; cat /data/d/f; ls -l /data/d >/dev/null; "
              "chown 65534:65534 /data/d/f; rm -r /data/d; ps >/dev/null; "
              "(sleep 0.1 &) ; wait; id -u; hostname >/dev/null; echo ok")
    res = rt.exec("work", ["sh", "-c", script])
    assert res.exit_code == 0 and res.stdout.split() == ["hello", "0", "ok"], res
    # network: raw sockets (CAP_NET_RAW) for ping, TCP through the bridge to the gateway
    res = rt.exec("work", ["ping", "-c", "1", "-W", "5", rt.net.gateway], timeout=20)
    assert res.exit_code == 0, res
    assert info.ip and rt.exec("work", ["ip", "-4", "addr", "show", "eth0"]).stdout.count(info.ip) == 1


def test_capabilities_are_dockers_default_set(runtime, tmp_path):
    rt = runtime()
    start_with_probes(rt, tmp_path, "caps")
    assert caps(rt, "caps", "CapBnd") == DOCKER_CAPS_MASK
    assert caps(rt, "caps", "CapEff") == DOCKER_CAPS_MASK
    assert caps(rt, "caps", "CapInh") == 0 and caps(rt, "caps", "CapAmb") == 0
    # what is not granted: CAP_SYS_TIME (date -s), CAP_SYS_ADMIN (mount, hostname), CAP_NET_ADMIN
    res = rt.exec("caps", ["busybox", "date", "-s", "2000-01-01 00:00:00"])
    assert "can't set date: Operation not permitted" in res.stderr, res  # busybox exits 0 anyway
    assert time.time() > 1.7e9  # the host's clock is untouched
    assert rt.exec("caps", ["hostname", "evil"]).exit_code != 0
    assert rt.exec("caps", ["ip", "link", "set", "lo", "down"]).exit_code != 0
    assert rt.exec("caps", ["sh", "-c", "echo 1 > /proc/sys/kernel/panic"]).exit_code != 0
    # what is: chown, mknod of a char device node (the devices cgroup still refuses opening it)
    assert rt.exec("caps", ["sh", "-c", "touch /f && chown 1:1 /f"]).exit_code == 0
    assert rt.exec("caps", ["busybox", "mknod", "/null2", "c", "1", "3"]).exit_code == 0


def test_a_non_root_user_holds_no_capabilities(runtime, tmp_path):
    rt = runtime()
    start_with_probes(rt, tmp_path, "nobody", user="65534:65534")
    assert caps(rt, "nobody", "CapEff") == 0 and caps(rt, "nobody", "CapPrm") == 0
    assert caps(rt, "nobody", "CapBnd") == DOCKER_CAPS_MASK
    assert rt.exec("nobody", ["sh", "-c", "touch /tmp/f && chown 0:0 /tmp/f"]).exit_code != 0
    assert rt.exec("nobody", ["/bin/keyctl"]).exit_code == EPERM


def test_unconfined_and_custom_profiles(runtime, tmp_path):
    # the matching allowed case: without a filter the same probes reach the kernel
    rt = runtime(security=Security(profile=None))
    start_with_probes(rt, tmp_path, "open")
    got = {p: rt.exec("open", [f"/bin/{p}"]).exit_code for p in ("keyctl", "pidfd_getfd", "add_key")}
    assert got == {"keyctl": EOPNOTSUPP, "pidfd_getfd": EBADF, "add_key": EFAULT}
    assert "Seccomp:\t0" in rt.exec("open", ["cat", "/proc/self/status"]).stdout
    # a host's own profile file: Docker's plus keyctl
    profile = json.load(open(seccomp.DEFAULT_PROFILE_PATH))
    profile["syscalls"].append({"names": ["keyctl"], "action": "SCMP_ACT_ALLOW"})
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    rt2 = runtime(security=Security.from_settings(str(path), no_new_privileges=True))
    start_with_probes(rt2, tmp_path, "custom")
    assert rt2.exec("custom", ["/bin/keyctl"]).exit_code == EOPNOTSUPP
    assert rt2.exec("custom", ["/bin/add_key"]).exit_code == EPERM
    assert "NoNewPrivs:\t1" in rt2.exec("custom", ["cat", "/proc/self/status"]).stdout
    assert set(DEFAULT_CAPABILITIES) <= set(rt2.security.capabilities)


def test_cap_add_and_cap_drop_change_caps_and_the_filter_with_them(runtime, tmp_path):
    rt = runtime()
    # CAP_SYS_PTRACE added: Docker's profile then allows pidfd_getfd/ptrace (the kernel answers EBADF)
    start_with_probes(rt, tmp_path, "added", cap_add=("CAP_SYS_PTRACE", "CAP_NET_ADMIN"))
    assert caps(rt, "added", "CapEff") == DOCKER_CAPS_MASK | (1 << 19) | (1 << 12)
    assert rt.exec("added", ["/bin/pidfd_getfd"]).exit_code == EBADF
    assert rt.exec("added", ["ip", "link", "set", "lo", "down"]).exit_code == 0  # its own netns only
    assert rt.exec("added", ["/bin/keyctl"]).exit_code == EPERM  # never in the allow-list
    # CAP_NET_RAW dropped: no ping; everything dropped: root cannot even chown
    start_with_probes(rt, tmp_path, "dropped", cap_drop=("CAP_NET_RAW",), network=NetworkSpec(mode="bridge"))
    res = rt.exec("dropped", ["ping", "-c", "1", "-W", "2", rt.net.gateway], timeout=20)
    assert res.exit_code != 0 and "permission denied" in res.stderr, res
    start_with_probes(rt, tmp_path, "none", cap_drop=("ALL",))
    assert caps(rt, "none", "CapBnd") == 0
    assert rt.exec("none", ["sh", "-c", "touch /f && chown 1:1 /f"]).exit_code != 0
    with pytest.raises(InvalidInput, match="not a capability"):
        rt.create(make_spec(rt, tmp_path, "bad", ("sleep", "1"), cap_add=("CAP_EVERYTHING",)))
