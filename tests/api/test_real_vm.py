"""A VM through the API on the real LibvirtDriver (TCG): create, stats, logs, stop, delete."""
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from testbed.agentproc import AgentProcess, Api
from tests.api.test_metrics import assert_metrics_match_stats


@pytest.mark.real
def test_vm_on_real_libvirt(libvirtd):
    # QEMU runs as libvirt-qemu: the state dir must be reachable by it (pytest's tmp is 0700)
    tmp_path = Path(tempfile.mkdtemp(prefix="nodeagent-apitest-", dir="/var/tmp"))
    os.chmod(tmp_path, 0o755)
    agent = AgentProcess(tmp_path / "v", pool_kind="local")
    agent.config.write_text(agent.config.read_text().replace(
        '[hypervisor]\ndriver = "fake"\n',
        f'[hypervisor]\ndriver = "libvirt"\nuri = "{libvirtd}"\nvirt_type = "qemu"\n'))
    token = agent.token("admin", "admin")
    disk = tmp_path / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    name = f"apitest-{secrets.token_hex(3)}"
    agent.start()
    api = Api(agent.url, token)
    try:
        assert api.get("/v1/host").json()["hypervisor"] in ("kvm", "qemu")
        op = api.wait(api.post("/v1/images",
                               json={"name": "blank", "source": {"type": "file", "path": str(disk)}}).json())
        assert op["status"] == "succeeded", op
        op = api.wait(api.post("/v1/instances", json={"name": name, "kind": "vm", "image": "blank", "cpus": 1,
                                                      "memory_mib": 128, "network": "none"}).json(), timeout=120)
        assert op["status"] == "succeeded", op["error"]
        assert op["result"]["instance"]["state"] == "running"
        assert name in subprocess.run(["virsh", "-c", libvirtd, "list", "--name"], capture_output=True,
                                      text=True).stdout
        assert api.get(f"/v1/instances/{name}/stats").json()["cpu_ns"] is not None
        # /metrics reads every VM in one libvirt call (bulk_stats): the same figures as the stats route
        assert_metrics_match_stats(lambda: api.get(f"/v1/instances/{name}/stats").json(),
                                   lambda: api.get("/metrics").text, name, "vm")
        assert api.get(f"/v1/instances/{name}/logs").status_code == 200
        op = api.wait(api.post(f"/v1/instances/{name}/actions", json={"action": "stop", "force": True}).json())
        assert op["status"] == "succeeded" and op["result"]["instance"]["state"] == "stopped", op
        volume = op["result"]["instance"]["volumes"][0]
        assert api.delete(f"/v1/instances/{name}").json() == {"deleted": True}
        assert name not in subprocess.run(["virsh", "-c", libvirtd, "list", "--all", "--name"],
                                          capture_output=True, text=True).stdout
        assert not list(agent.state_dir.rglob(f"*{volume}*"))
    finally:
        Api(agent.url, token).delete(f"/v1/instances/{name}")
        agent.stop()
        subprocess.run(["virsh", "-c", libvirtd, "undefine", name], capture_output=True)
        shutil.rmtree(tmp_path, ignore_errors=True)
