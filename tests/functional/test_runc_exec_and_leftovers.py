"""Real runc + conmon: exec output is bounded, an exec timeout kills what it started, and a
create+delete leaves nothing new under the runtime's directories."""
from __future__ import annotations

import os
import resource
import time

import pytest

from testbed.runtimes import make_runc, make_spec
from tests.functional.test_containers_runc import assert_nothing_left

pytestmark = pytest.mark.real
LIMIT = 64 * 1024


@pytest.fixture
def rt(tmp_path):
    runtime, cleanup = make_runc(tmp_path, exec_output_bytes=LIMIT)
    yield runtime
    cleanup()
    assert_nothing_left(runtime)


def _tree(*roots) -> set[str]:
    out = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            out.update(os.path.join(dirpath, n) for n in dirnames + filenames)
    return out


def _runtime_dirs(rt) -> list[str]:
    """Where runc, conmon and the runtime keep per-container files (ours and the tools' defaults)."""
    return [rt.state_dir, "/run/runc", "/run/conmon", "/var/run/conmon", "/run/crun"]


def test_create_and_delete_leave_nothing_under_the_runtime_dirs(rt, tmp_path):
    before = _tree(*_runtime_dirs(rt))
    for i in range(3):
        rt.create(make_spec(rt, tmp_path, f"leave{i}", ("sleep", "1000")))
        rt.start(f"leave{i}")
    assert os.path.islink(os.path.join(rt.state_dir, "sock", "leave0"))  # conmon's attach link
    rt.delete("leave0")  # running
    rt.stop("leave1", timeout=1)
    rt.delete("leave1")  # stopped
    rt.delete("leave2")
    assert _tree(*_runtime_dirs(rt)) - before == set()


def test_reconcile_removes_a_leftover_conmon_link(rt, tmp_path):
    rt.create(make_spec(rt, tmp_path, "orphan", ("sleep", "1000")))
    rt.start("orphan")
    rt.db.execute("DELETE FROM containers WHERE name=?", ("orphan",))  # a crash mid-delete
    assert "orphan" in rt.reconcile()["released"]
    assert not os.path.lexists(os.path.join(rt.state_dir, "sock", "orphan"))


def test_exec_keeps_at_most_the_limit_and_drains_the_rest(rt, tmp_path):
    rt.create(make_spec(rt, tmp_path, "chatty", ("sleep", "1000")))
    rt.start("chatty")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    res = rt.exec("chatty", ["sh", "-c", "yes | head -c 100000000; yes e | head -c 20000000 >&2; echo done"],
                  timeout=300)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert res.exit_code == 0, res.stderr[-500:]
    assert res.truncated and not res.timed_out
    assert len(res.stdout) == LIMIT and res.stdout.startswith("y\ny\n")
    assert len(res.stderr) == LIMIT and res.stderr.startswith("e\ne\n")
    assert grown_mib < 64, f"exec of 120 MB of output grew the agent by {grown_mib:.0f} MiB"
    small = rt.exec("chatty", ["echo", "hi"])
    assert (small.stdout, small.truncated, small.timed_out) == ("hi\n", False, False)


def test_exec_timeout_kills_the_command_and_what_it_started(rt, tmp_path):
    rt.create(make_spec(rt, tmp_path, "slow", ("sleep", "1000")))
    rt.start("slow")
    t0 = time.monotonic()
    # a child in the background, a grandchild reparented to the container's init, the command itself
    res = rt.exec("slow", ["sh", "-c", "sleep 301 & (sleep 302 &); echo started; sleep 303"], timeout=1)
    assert time.monotonic() - t0 < 10
    assert res.timed_out and res.exit_code == 124, res
    assert res.stdout == "started\n" and "timed out after 1" in res.stderr
    deadline = time.monotonic() + 5
    while True:
        ps = rt.exec("slow", ["ps", "-o", "pid,stat,args"]).stdout
        alive = [line for line in ps.splitlines() if "sleep 30" in line]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert alive == [], ps
    assert "sleep 1000" in ps  # the container's own process is untouched
    assert rt.get("slow").state == "running"


def test_a_containers_env_is_root_only_on_the_host(rt, tmp_path):
    """config.json holds the env (secrets): other host users can neither list bundles nor read it."""
    import stat
    spec = make_spec(rt, tmp_path, "secretive", ("sleep", "1000"))
    rt.create(spec)
    try:
        bundles = os.path.join(rt.state_dir, "containers")
        assert stat.S_IMODE(os.stat(bundles).st_mode) == 0o711
        configs = [os.path.join(d, "config.json") for d, _, files in os.walk(bundles) if "config.json" in files]
        assert configs and all(stat.S_IMODE(os.stat(c).st_mode) == 0o600 for c in configs), configs
    finally:
        rt.delete("secretive")
