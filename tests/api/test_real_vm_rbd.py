"""A VM on a `block` (Ceph RBD) pool through the API: the real agent, real LibvirtDriver (TCG)
and the live Ceph (`ceph` fixture). Its disk is an RBD clone attached by QEMU's librbd with
the cephx key in a libvirt secret; DELETE removes domain, RBD volume and secret. A pool with
a wrong key fails the create clearly and leaves nothing."""
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from testbed.agentproc import AgentProcess, Api

pytestmark = pytest.mark.real
READS_TIMEOUT_S = 60  # SeaBIOS reads the boot disk within a second or two; generous for CI


def virsh(uri: str, *args: str) -> str:
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True).stdout


def nodeagent_secrets(uri: str) -> set[str]:
    lines = virsh(uri, "secret-list").splitlines()
    return {ln.split()[0] for ln in lines if "nodeagent:" in ln}


@pytest.fixture(scope="module")
def agent(ceph, libvirtd):
    """An agent with a local default pool, a block pool `blk` on a Ceph pool of its own, and a
    block pool `badkey` on the same Ceph pool whose keyring holds a wrong key."""
    # QEMU runs as libvirt-qemu: seeds under the state dir must be reachable (pytest's tmp is 0700)
    tmp = Path(tempfile.mkdtemp(prefix="nodeagent-apirbd-", dir="/var/tmp"))
    os.chmod(tmp, 0o755)
    pool = "t" + secrets.token_hex(5)
    ceph.run("ceph", "osd", "pool", "create", pool, "8", "8")
    ceph.run("ceph", "osd", "pool", "application", "enable", pool, "rbd")
    wrong = subprocess.run(["ceph-authtool", "--gen-print-key"], check=True, capture_output=True,
                           text=True).stdout.strip()
    bad_keyring = tmp / "wrong.keyring"
    bad_keyring.write_text(f"[client.{ceph.user}]\n\tkey = {wrong}\n")
    block = (f'[pools.blk]\nkind = "block"\npool = "{pool}"\nconf = "{ceph.conf}"\n'
             f'user = "{ceph.user}"\nkeyring = "{ceph.keyring}"\n'
             f'[pools.badkey]\nkind = "block"\npool = "{pool}"\nconf = "{ceph.conf}"\n'
             f'user = "{ceph.user}"\nkeyring = "{bad_keyring}"\nconnect_timeout = 5\n')
    a = AgentProcess(tmp / "v", pool_kind="local", extra_config=block)
    a.config.write_text(a.config.read_text().replace(
        '[hypervisor]\ndriver = "fake"\n',
        f'[hypervisor]\ndriver = "libvirt"\nuri = "{libvirtd}"\nvirt_type = "qemu"\n'))
    a.token_value = a.token("admin", "admin")
    a.ceph_pool = pool
    a.start()
    api = Api(a.url, a.token_value)
    disk = tmp / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    op = api.wait(api.post("/v1/images", json={"name": "blank", "source": {"type": "file",
                                                                          "path": str(disk)}}).json())
    assert op["status"] == "succeeded", op
    try:
        yield a
    finally:
        a.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        ceph.run("ceph", "osd", "pool", "delete", pool, pool, "--yes-i-really-really-mean-it", check=False)


def wait_for_reads(api, name: str, timeout: float = READS_TIMEOUT_S) -> int:
    """The VM's disk read bytes, once the guest (here its BIOS) has read something."""
    deadline = time.monotonic() + timeout
    while True:
        rd = api.get(f"/v1/instances/{name}/stats").json()["io"].get("rd_bytes", 0)
        if rd > 0 or time.monotonic() > deadline:
            return rd
        time.sleep(0.2)


def rbd_ls(ceph, pool: str) -> list[str]:
    return ceph.run("rbd", "ls", pool).stdout.split()


def test_vm_on_a_block_pool_runs_from_an_rbd_clone(agent, ceph, libvirtd):
    api = Api(agent.url, agent.token_value)
    name = f"apirbd-{secrets.token_hex(3)}"
    before = nodeagent_secrets(libvirtd)
    try:
        op = api.wait(api.post("/v1/instances", json={"name": name, "kind": "vm", "image": "blank", "cpus": 1,
                                                      "memory_mib": 128, "network": "none", "pool": "blk"}
                               ).json(), timeout=120)
        assert op["status"] == "succeeded", op["error"]
        inst = op["result"]["instance"]
        assert (inst["state"], inst["pool"]) == ("running", "blk")
        image = f"navol.{inst['volumes'][0]}"
        assert image in rbd_ls(ceph, agent.ceph_pool)
        assert "parent:" in ceph.run("rbd", "info", f"{agent.ceph_pool}/{image}").stdout, "an RBD clone"
        root = ET.fromstring(virsh(libvirtd, "dumpxml", name))
        vda = next(d for d in root.findall("devices/disk") if d.find("target").get("dev") == "vda")
        assert vda.find("source").get("protocol") == "rbd"
        assert vda.find("source").get("name") == f"{agent.ceph_pool}/{image}"
        sid = vda.find("auth/secret").get("uuid")
        assert sid in nodeagent_secrets(libvirtd)
        assert wait_for_reads(api, name) > 0, "the BIOS reads the RBD disk through QEMU's librbd"

        assert api.delete(f"/v1/instances/{name}").json() == {"deleted": True}
        assert name not in virsh(libvirtd, "list", "--all", "--name").split()
        assert image not in rbd_ls(ceph, agent.ceph_pool)
        assert nodeagent_secrets(libvirtd) <= before
    finally:
        api.delete(f"/v1/instances/{name}")


def test_a_block_pool_with_a_wrong_key_fails_clearly_and_leaves_nothing(agent, ceph, libvirtd):
    api = Api(agent.url, agent.token_value)
    name = f"apirbd-bad-{secrets.token_hex(3)}"
    before = (nodeagent_secrets(libvirtd), rbd_ls(ceph, agent.ceph_pool))
    r = api.post("/v1/instances", json={"name": name, "kind": "vm", "image": "blank", "cpus": 1,
                                        "memory_mib": 128, "network": "none", "pool": "badkey"})
    assert r.status_code == 202, r.text
    op = api.wait(r.json(), timeout=120)
    assert op["status"] == "failed"
    assert op["error"]["code"] == "unavailable"
    assert "pool badkey" in op["error"]["message"] and "keyring" in op["error"]["message"], op["error"]
    assert api.get(f"/v1/instances/{name}").status_code == 404
    assert name not in virsh(libvirtd, "list", "--all", "--name").split()
    assert (nodeagent_secrets(libvirtd), rbd_ls(ceph, agent.ceph_pool)) == before
