"""The README's first command on a host without systemd and without libvirt's daemons:
``nodeagent serve`` starts virtlogd and libvirtd itself, and a VM made through the API
boots. The host is simulated (a network and a mount namespace with private /run and
libvirt dirs: testbed.harness), so this machine's own libvirtd is never touched.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from testbed.agentproc import Api
from testbed.harness import Cluster, leftovers

pytestmark = [pytest.mark.real, pytest.mark.slow]
MARKER_TIMEOUT_S = 60


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_serve_starts_libvirt_daemons_and_a_vm_boots(guest_images):
    for tool in ("libvirtd", "virtlogd", "nsenter", "unshare", "ip"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: run scripts/setup-host")
    work = Path(tempfile.mkdtemp(prefix="bare-host-", dir="/var/tmp"))
    os.chmod(work, 0o755)  # QEMU runs as libvirt-qemu: the host's dirs must be reachable
    c = Cluster(work, names=("bare",), libvirt=False)
    try:
        with c:
            h = c.hosts[0]
            assert h.run("test", "-S", "/run/libvirt/libvirt-sock", check=False).returncode != 0
            h.write_agent_config(c.container_subnet(0), {})
            h.admin_token = h.agent_cli("token", "create", "admin", "--role", "admin").stdout.strip()
            try:
                h.start_agent()
            finally:
                started = h.adopt_host_daemons()  # ours to stop from here, whatever happens next
            assert set(started) == {"virtlogd", "libvirtd"}, started
            assert all(_alive(pid) for pid in started.values()), started
            api = Api(h.agent_url, h.admin_token)
            op = api.wait(api.post("/v1/images", json={
                "name": "boot", "format": "qcow2", "source": {"type": "file", "path": guest_images["boot"]}}).json(),
                timeout=120)
            assert op["status"] == "succeeded", op
            op = api.wait(api.post("/v1/instances", json={"name": "vm1", "kind": "vm", "image": "boot",
                                                          "memory_mib": 128, "network": "none"}).json(), timeout=180)
            assert op["status"] == "succeeded", json.dumps(op.get("error"))
            deadline = time.monotonic() + MARKER_TIMEOUT_S
            while "NODEAGENT-GUEST-BOOTED" not in (logs := api.get("/v1/instances/vm1/logs").json()["logs"]):
                assert time.monotonic() < deadline, logs
                time.sleep(0.5)
            # the agent leaves the host daemons running when it stops, and a restart starts none
            h.stop_agent()
            assert all(_alive(pid) for pid in started.values()), started
            (h.state_dir / "host-daemons.json").unlink()
            h.start_agent()
            assert not (h.state_dir / "host-daemons.json").exists()
            assert Api(h.agent_url, h.admin_token).get("/v1/instances/vm1").json()["state"] == "running"
        assert leftovers(c.tag) == []
        assert not any(_alive(pid) for pid in started.values())  # stop() ended them, by PID
    finally:
        shutil.rmtree(work, ignore_errors=True)
