"""containers.runc: a container whose processes and conmon are all gone (a host reboot, the
agent's restart after it) reads as stopped at once: no exit file is coming, so there is
nothing to wait for (the start's reconcile reads every container's state this way)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from containers import runc
from containers.runc import RuncRuntime


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def rt(tmp_path, monkeypatch):
    """The runtime's state-reading half on a bare state dir (no runc, conmon or cgroups used):
    container ``c1`` whose init and conmon are gone, without an exit file."""
    r = RuncRuntime.__new__(RuncRuntime)
    r.state_dir, r.runc_root = str(tmp_path), str(tmp_path / "runc")
    os.makedirs(os.path.join(r.runc_root, "c1"))
    with open(os.path.join(r.runc_root, "c1", "state.json"), "w") as f:
        json.dump({"init_process_pid": _dead_pid(), "init_process_start": 1}, f)
    os.makedirs(r._dir("c1"))
    with open(os.path.join(r._dir("c1"), "conmon.pid"), "w") as f:
        f.write(f"{_dead_pid()}\n")

    def no_wait(_s):
        raise AssertionError("waited for an exit file no conmon will write")
    monkeypatch.setattr(runc.time, "sleep", no_wait)
    return r


def test_gone_with_its_conmon_is_stopped_without_waiting(rt):
    assert rt._status("c1") == ("stopped", None, None)
    # a pid file naming a live process that is not a conmon (a reused pid) counts as gone too
    with open(os.path.join(rt._dir("c1"), "conmon.pid"), "w") as f:
        f.write(f"{os.getpid()}\n")
    assert rt._status("c1") == ("stopped", None, None)


def test_an_exit_file_conmon_wrote_before_it_died_is_read(rt):
    os.makedirs(os.path.dirname(rt._exit_file("c1")))
    with open(rt._exit_file("c1"), "w") as f:
        f.write("137")
    assert rt._status("c1") == ("stopped", None, 137)
