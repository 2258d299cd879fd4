"""A real agent on runc: PATCH resizes a running container's cgroups in place (cpu quota,
memory limit, memory+swap limit: the kernel's files, written by the agent itself), runc's
own record follows (a later partial `runc update` keeps them; pause, exec and stop/start
see them), refuses past the host, and after a simulated host reboot (the workload's
processes gone while the agent is down, a new boot id) the agent starts it again; a plain
crash-restart (same boot id) only re-adopts."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from containers import cgroups
from containers.bundle import CGROUP_PARENT

pytestmark = pytest.mark.real
CG = Path("/sys/fs/cgroup")


def _limits(name: str) -> tuple[str, int]:
    """(cpu quota, memory limit in bytes) of the container's cgroup; on v1 with swap
    accounting, the memory+swap limit equals the memory limit (no swap)."""
    if cgroups.is_v2():
        quota = (CG / CGROUP_PARENT / name / "cpu.max").read_text().split()[0]
        return quota, int((CG / CGROUP_PARENT / name / "memory.max").read_text())
    mem = CG / "memory" / CGROUP_PARENT / name
    limit = int((mem / "memory.limit_in_bytes").read_text())
    if (mem / "memory.memsw.limit_in_bytes").exists():
        assert int((mem / "memory.memsw.limit_in_bytes").read_text()) == limit, "memory+swap = memory"
    return (CG / "cpu" / CGROUP_PARENT / name / "cpu.cfs_quota_us").read_text().strip(), limit


def _pids_max(name: str) -> str:
    d = CG / CGROUP_PARENT / name if cgroups.is_v2() else CG / "pids" / CGROUP_PARENT / name
    return (d / "pids.max").read_text().strip()


def _pids(name: str) -> list[int]:
    d = CG / CGROUP_PARENT / name if cgroups.is_v2() else CG / "pids" / CGROUP_PARENT / name
    try:
        return [int(p) for p in (d / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def _state(api, name: str, want: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        inst = api.get(f"/v1/instances/{name}").json()
        if inst.get("state") == want or time.monotonic() > deadline:
            assert inst.get("state") == want, inst
            return inst
        time.sleep(0.1)


def test_runc_live_resize_and_start_after_a_reboot(open_tmp):
    for tool in ("runc", "conmon"):
        assert shutil.which(tool), f"{tool} is not installed: run scripts/setup-host"
    from testbed.agentproc import AgentProcess, Api
    from tests.api.test_crash import _import_busybox
    boot_id = open_tmp / "boot_id"
    boot_id.write_text("boot-a\n")
    agent = AgentProcess(open_tmp / "r", pool_kind="local", runtime="runc", extra_config=f'boot_id_path = "{boot_id}"')
    agent.admin_token = agent.token("admin", "admin")
    agent.start()
    api = Api(agent.url, agent.admin_token)
    name = f"rs-{secrets.token_hex(3)}"  # runc cgroups are host-wide: unique per run
    try:
        _import_busybox(api, open_tmp)
        op = api.wait(api.post("/v1/instances", json={"name": name, "kind": "container", "image": "busybox",
                                                      "cpus": 0.5, "memory_mib": 64, "network": "none",
                                                      "command": ["/bin/sh", "-c", "sleep 600"]}).json())
        assert op["status"] == "succeeded", op
        assert _limits(name) == ("50000", 64 << 20)
        r = api.patch(f"/v1/instances/{name}", json={"cpus": 1.5, "memory_mib": 128})
        assert r.status_code == 200, r.text
        assert _limits(name) == ("150000", 128 << 20), "the live cgroup changed"
        # runc's own record follows (runc >= 1.2 merges a later `runc update` into it): a later
        # `runc update` of one knob keeps the resized ones
        runc_root = str(open_tmp / "r" / "containers" / "runc")
        cg = json.loads((Path(runc_root) / name / "state.json").read_text())["config"]["cgroups"]
        assert (cg["memory"], cg["cpu_quota"], cg["cpu_period"]) == (128 << 20, 150000, 100000), cg
        subprocess.run(["runc", "--root", runc_root, "update", "--pids-limit", "77", name], check=True)
        assert _limits(name) == ("150000", 128 << 20) and _pids_max(name) == "77"
        for action, mib in (("pause", 112), ("resume", 128)):  # a paused (frozen) one resizes too
            assert api.wait(api.post(f"/v1/instances/{name}/actions", json={"action": action}).json())["status"] \
                == "succeeded"
            assert api.patch(f"/v1/instances/{name}", json={"memory_mib": mib}).status_code == 200
            assert _limits(name) == ("150000", mib << 20)
        ex = api.post(f"/v1/instances/{name}/exec", json={"command": ["/bin/sh", "-c", "echo in"]}).json()
        assert (ex["exit_code"], ex["stdout"]) == (0, "in\n"), ex
        # stopped and started again: the bundle is rendered with the resized limits
        for action in ("stop", "start"):
            op = api.wait(api.post(f"/v1/instances/{name}/actions", json={"action": action, "force": True}).json())
            assert op["status"] == "succeeded", op
        assert _limits(name) == ("150000", 128 << 20), "a new start keeps the resize"
        assert _pids_max(name) == "max", "and the agent's own limits (no pids limit), not runc's old record"
        r = api.patch(f"/v1/instances/{name}", json={"cpus": os.cpu_count() + 1})
        assert r.status_code == 422 and "this host has" in r.json()["error"]["message"], r.text
        assert _limits(name) == ("150000", 128 << 20)
        # memory it holds (tmpfs pages: no swap to push them to) cannot be taken away: 409, nothing changed
        ex = api.post(f"/v1/instances/{name}/exec", json={"command": [
            "/bin/sh", "-c", "dd if=/dev/zero of=/dev/shm/held bs=1M count=40 2>/dev/null"]}).json()
        assert ex["exit_code"] == 0, ex
        r = api.patch(f"/v1/instances/{name}", json={"cpus": 0.25, "memory_mib": 16})
        assert r.status_code == 409 and "MiB of memory now, more than 16 MiB" in r.json()["error"]["message"], r.text
        assert _limits(name) == ("150000", 128 << 20), "nothing changed, the cpu quota neither"
        assert api.get(f"/v1/instances/{name}").json()["memory_mib"] == 128
        api.post(f"/v1/instances/{name}/exec", json={"command": ["rm", "/dev/shm/held"]})
        # a crash of the agent alone (same boot): the running container is re-adopted as it is
        agent.kill9()
        agent.start()
        assert _state(api, name, "running")["memory_mib"] == 128
        r = api.patch(f"/v1/instances/{name}", json={"cpus": 1, "memory_mib": 96})  # the re-adopted one resizes
        assert r.status_code == 200 and _limits(name) == ("100000", 96 << 20), r.text
        # the host "reboots": the agent and the container's processes die, the kernel has a new boot id
        agent.kill9()
        for pid in _pids(name):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _pids(name) and time.monotonic() < deadline:
            time.sleep(0.05)
        boot_id.write_text("boot-b\n")
        agent.start()
        _state(api, name, "running")
        assert _pids(name), "its processes run again"
        assert _limits(name) == ("100000", 96 << 20), "with the limits it was resized to"
        ex = api.post(f"/v1/instances/{name}/exec", json={"command": ["/bin/sh", "-c", "echo up"]}).json()
        assert (ex["exit_code"], ex["stdout"]) == (0, "up\n"), ex
    finally:
        if agent.proc is None or agent.proc.poll() is not None:
            agent.start()
        Api(agent.url, agent.admin_token).delete(f"/v1/instances/{name}")
        assert agent.stop() == 0
    assert not cgroups.cgroup_dirs(CGROUP_PARENT, name), "runc's delete removed its cgroups"
