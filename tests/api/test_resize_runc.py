"""A real agent on runc: PATCH resizes a running container's cgroups in place (cpu quota,
memory limit), refuses past the host, and after a simulated host reboot (the workload's
processes gone while the agent is down, a new boot id) the agent starts it again; a plain
crash-restart (same boot id) only re-adopts."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import time
from pathlib import Path

import pytest

from containers import cgroups
from containers.bundle import CGROUP_PARENT

pytestmark = pytest.mark.real
CG = Path("/sys/fs/cgroup")


def _limits(name: str) -> tuple[str, int]:
    """(cpu quota, memory limit in bytes) of the container's cgroup."""
    if cgroups.is_v2():
        quota = (CG / CGROUP_PARENT / name / "cpu.max").read_text().split()[0]
        return quota, int((CG / CGROUP_PARENT / name / "memory.max").read_text())
    return ((CG / "cpu" / CGROUP_PARENT / name / "cpu.cfs_quota_us").read_text().strip(),
            int((CG / "memory" / CGROUP_PARENT / name / "memory.limit_in_bytes").read_text()))


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
        assert _limits(name) == ("150000", 128 << 20), "runc update changed the live cgroup"
        r = api.patch(f"/v1/instances/{name}", json={"cpus": os.cpu_count() + 1})
        assert r.status_code == 422 and "this host has" in r.json()["error"]["message"], r.text
        assert _limits(name) == ("150000", 128 << 20)
        # memory it holds (tmpfs pages: no swap to push them to) cannot be taken away: 409, nothing changed
        ex = api.post(f"/v1/instances/{name}/exec", json={"command": [
            "/bin/sh", "-c", "dd if=/dev/zero of=/dev/shm/held bs=1M count=40 2>/dev/null"]}).json()
        assert ex["exit_code"] == 0, ex
        r = api.patch(f"/v1/instances/{name}", json={"cpus": 0.25, "memory_mib": 16})
        assert r.status_code == 409 and "MiB of memory now, more than 16 MiB" in r.json()["error"]["message"], r.text
        assert _limits(name) == ("150000", 128 << 20), "the cpu quota runc set first was put back"
        assert api.get(f"/v1/instances/{name}").json()["memory_mib"] == 128
        api.post(f"/v1/instances/{name}/exec", json={"command": ["rm", "/dev/shm/held"]})
        # a crash of the agent alone (same boot): the running container is re-adopted as it is
        agent.kill9()
        agent.start()
        assert _state(api, name, "running")["memory_mib"] == 128
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
        assert _limits(name) == ("150000", 128 << 20), "with the limits it was resized to"
        ex = api.post(f"/v1/instances/{name}/exec", json={"command": ["/bin/sh", "-c", "echo up"]}).json()
        assert (ex["exit_code"], ex["stdout"]) == (0, "up\n"), ex
    finally:
        if agent.proc is None or agent.proc.poll() is not None:
            agent.start()
        Api(agent.url, agent.admin_token).delete(f"/v1/instances/{name}")
        assert agent.stop() == 0
