"""A VM booted the API's way — from its image's disk, no direct kernel — to the test guest's
init, on a local pool and on a block (Ceph RBD) pool.

The image is scripts/build-test-images' boot.qcow2 (MBR + syslinux on FAT + an ext4 root),
imported through POST /v1/images. The guest's serial console, read through
GET /v1/instances/{id}/logs, proves what it got: SeaBIOS ran the bootloader, the kernel
reached init, init read the NoCloud seed the agent wrote (instance-id, hostname, and the
exact user_data by its sha256, and ran it when it is a script), saw its NIC with the MAC
from the agent's state and its root filesystem on the image's second partition. Stop
(ACPI), start and restart boot it again; DELETE leaves no domain, volume, seed or tap.
"""
import hashlib
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from testbed import runtimes
from testbed.agentproc import AgentProcess, Api

pytestmark = pytest.mark.real
# Under TCG here SeaBIOS + syslinux + kernel reach the marker in about 3 s (as fast as a
# direct kernel boot); generous for a loaded CI machine.
BOOT_TIMEOUT_S = 120
OP_TIMEOUT_S = 120
READY = "NODEAGENT-READY"
ROOTFS_MARK = "nodeagent test rootfs v1"  # scripts/build-test-images' /etc/nodeagent-rootfs


def virsh(uri: str, *args: str) -> str:
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def vmtmp():
    """A directory QEMU (user libvirt-qemu) can reach: pytest's tmp is 0700."""
    d = Path(tempfile.mkdtemp(prefix="nodeagent-apiboot-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def bridge():
    """A test bridge name and subnet: the agent makes the bridge, gives it the subnet's first
    address and leases the VMs theirs (no NAT: no traffic leaves the host)."""
    name, subnet = runtimes.test_network("naboot")
    yield name, subnet
    runtimes.drop_test_network(name)


def start_agent(state_dir: Path, libvirtd: str, bridge: tuple[str, str], extra: str = "") -> AgentProcess:
    """A real agent on the real LibvirtDriver (TCG) with a local default pool, VM NICs on
    ``bridge``, and ``extra`` config (more pools)."""
    name, subnet = bridge
    a = AgentProcess(state_dir, pool_kind="local",
                     import_dirs=[state_dir.parent, os.environ.get("NODEAGENT_TEST_IMAGES",
                                                                   "/var/cache/nodeagent-test-images")],
                     extra_config=f'{extra}[network]\nbridge = "{name}"\nsubnet = "{subnet}"\nnat = false\n')
    a.config.write_text(a.config.read_text().replace(
        '[hypervisor]\ndriver = "fake"\n',
        f'[hypervisor]\ndriver = "libvirt"\nuri = "{libvirtd}"\nvirt_type = "qemu"\n'))
    a.token_value = a.token("admin", "admin")
    return a.start()


def stop_agent(agent: AgentProcess, bridge: tuple[str, str]) -> None:
    """Stop the agent and drop its rules and tables (the bridge goes with the module)."""
    agent.stop()
    runtimes.drop_test_network(None, agent.rtag)


def import_boot_image(api: Api, path: str) -> dict:
    op = api.wait(api.post("/v1/images", json={"name": "bootable", "source": {"type": "file",
                                                                             "path": path}}).json())
    assert op["status"] == "succeeded", op
    return op["result"]["image"]


def console(api: Api, name: str) -> str:
    r = api.get(f"/v1/instances/{name}/logs")
    assert r.status_code == 200, r.text
    return r.json()["logs"].replace("\r", "")


def wait_console(api: Api, name: str, boots: int, timeout: float = BOOT_TIMEOUT_S) -> str:
    """The console once the guest's init finished its ``boots``-th boot (the log spans boots)."""
    deadline = time.monotonic() + timeout
    while True:
        text = console(api, name)
        if text.count(READY) >= boots:
            return text
        if time.monotonic() > deadline:
            pytest.fail(f"no {READY} #{boots} on {name}'s console within {timeout}s:\n{text[-3000:]}")
        time.sleep(0.5)


def wait_for_line(api: Api, name: str, prefix: str, timeout: float = BOOT_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout
    while not any(ln.startswith(prefix) for ln in console(api, name).splitlines()):
        if time.monotonic() > deadline:
            pytest.fail(f"no {prefix} line on {name}'s console within {timeout}s:\n"
                        f"{console(api, name)[-3000:]}")
        time.sleep(0.5)
    return console(api, name)


def line(text: str, prefix: str) -> str:
    found = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    assert found, f"no {prefix} line on the console:\n{text[-3000:]}"
    return found[-1]


def act(api: Api, name: str, action: str, **kw) -> dict:
    op = api.wait(api.post(f"/v1/instances/{name}/actions", json={"action": action, **kw}).json(),
                  timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    return op["result"]["instance"]


def boot_and_check(api: Api, libvirtd: str, bridge: tuple[str, str], image: dict, pool: str | None, name: str,
                   script: bool = False) -> dict:
    """Create a VM from ``image`` with unique user_data, and check its first boot on the console.
    With ``script``, the user_data is a shell script the guest runs once it is up."""
    mark = secrets.token_hex(8)
    user_data = (f"#!/bin/sh\n# nodeagent boot test {mark}\necho NODEAGENT-UD-RAN {mark} $(hostname)\nexit 3\n"
                 if script else f"#cloud-config\n# nodeagent boot test {mark}\nhostname: {name}\n")
    body = {"name": name, "kind": "vm", "image": image["id"], "cpus": 1, "memory_mib": 192,
            "network": "bridge", "user_data": user_data, **({"pool": pool} if pool else {})}
    op = api.wait(api.post("/v1/instances", json=body).json(), timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op["error"]
    inst = op["result"]["instance"]
    assert inst["state"] == "running"

    os_ = ET.fromstring(virsh(libvirtd, "dumpxml", name)).find("os")
    assert os_.find("kernel") is None and os_.find("boot").get("dev") == "hd", "booted from its disk"
    text = wait_console(api, name, boots=1)
    assert "SYSLINUX" in text, "SeaBIOS ran the image's bootloader"
    assert line(text, "NODEAGENT-GUEST-BOOTED")
    # the guest names virtio disks in PCI order (the seed, libvirt's vdz, is its /dev/vdb)
    assert re.fullmatch(f"NODEAGENT-SEED device=/dev/vd[a-z] instance-id={inst['id']} hostname={name}",
                        line(text, "NODEAGENT-SEED ")), "the seed the agent wrote for this VM"
    digest = hashlib.sha256(user_data.encode()).hexdigest()[:16]
    assert line(text, "NODEAGENT-USERDATA ") == \
        f"NODEAGENT-USERDATA {user_data.splitlines()[0]} sha256={digest}", "the guest read exactly this VM's user_data"
    if script:
        text = wait_for_line(api, name, "NODEAGENT-USERDATA-EXIT ")
        assert line(text, "NODEAGENT-UD-RAN ") == f"NODEAGENT-UD-RAN {mark} {name}", "the script ran in the guest"
        assert line(text, "NODEAGENT-USERDATA-EXIT ") == "NODEAGENT-USERDATA-EXIT 3"
    else:
        assert "NODEAGENT-USERDATA-EXIT" not in text, "cloud-config is not run as a script"
    # the seed's network-config gave the NIC the address the agent leased: reachable from the host
    assert ipaddress.ip_address(inst["ip"]) in ipaddress.ip_network(bridge[1])
    assert line(text, "NODEAGENT-NET ") == f"NODEAGENT-NET eth0 mac={inst['mac']} ip={inst['ip']}/24"
    assert subprocess.run(["busybox", "ping", "-c", "1", "-W", "5", inst["ip"]], capture_output=True).returncode == 0
    assert line(text, "NODEAGENT-ROOTFS ") == f"NODEAGENT-ROOTFS vda2 {ROOTFS_MARK}"
    assert os.listdir(f"/sys/class/net/{bridge[0]}/brif"), "the VM's tap is on the bridge"
    return inst


def stop_start(api: Api, name: str) -> None:
    """A graceful stop (the guest's acpid powers off), then a start that boots it again."""
    assert act(api, name, "stop", timeout=60)["state"] == "stopped"
    assert "NODEAGENT-ACPI-POWEROFF" in console(api, name), "an ACPI shutdown, not a destroy"
    assert act(api, name, "start")["state"] == "running"
    assert line(wait_console(api, name, boots=2), "NODEAGENT-SEED ").endswith(f"hostname={name}")


def delete_and_check(api: Api, agent: AgentProcess, libvirtd: str, bridge: tuple[str, str], inst: dict) -> None:
    assert api.delete(f"/v1/instances/{inst['name']}").json() == {"deleted": True}
    assert api.get(f"/v1/instances/{inst['name']}").status_code == 404
    assert inst["name"] not in virsh(libvirtd, "list", "--all", "--name").split()
    assert not (agent.state_dir / "instances" / inst["id"]).exists(), "seed and console log removed"
    assert not list(agent.state_dir.rglob(f"*{inst['volumes'][0]}*")), "no overlay left"
    assert not os.listdir(f"/sys/class/net/{bridge[0]}/brif"), "no tap left"


def test_vm_boots_from_a_bootable_image_on_a_local_pool(libvirtd, guest_images, vmtmp, bridge):
    agent = start_agent(vmtmp / "local", libvirtd, bridge)
    api = Api(agent.url, agent.token_value)
    name = f"apiboot-{secrets.token_hex(3)}"
    try:
        image = import_boot_image(api, guest_images["boot"])
        inst = boot_and_check(api, libvirtd, bridge, image, None, name, script=True)
        stop_start(api, name)
        assert act(api, name, "restart")["state"] == "running"
        wait_console(api, name, boots=3)
        delete_and_check(api, agent, libvirtd, bridge, inst)
    finally:
        api.delete(f"/v1/instances/{name}")
        stop_agent(agent, bridge)


def test_vm_boots_from_a_bootable_image_on_an_rbd_pool(ceph, libvirtd, guest_images, vmtmp, bridge):
    pool = "t" + secrets.token_hex(5)
    ceph.run("ceph", "osd", "pool", "create", pool, "8", "8")
    ceph.run("ceph", "osd", "pool", "application", "enable", pool, "rbd")
    block = (f'[pools.blk]\nkind = "block"\npool = "{pool}"\nconf = "{ceph.conf}"\n'
             f'user = "{ceph.user}"\nkeyring = "{ceph.keyring}"\n')
    agent = start_agent(vmtmp / "rbd", libvirtd, bridge, extra=block)
    api = Api(agent.url, agent.token_value)
    name = f"apibootrbd-{secrets.token_hex(3)}"
    try:
        image = import_boot_image(api, guest_images["boot"])
        inst = boot_and_check(api, libvirtd, bridge, image, "blk", name)
        assert inst["pool"] == "blk"
        rbd_image = f"navol.{inst['volumes'][0]}"
        assert rbd_image in ceph.run("rbd", "ls", pool).stdout.split()
        vda = next(d for d in ET.fromstring(virsh(libvirtd, "dumpxml", name)).findall("devices/disk")
                   if d.find("target").get("dev") == "vda")
        assert vda.find("source").get("protocol") == "rbd", "the guest booted through QEMU's librbd"
        stop_start(api, name)
        delete_and_check(api, agent, libvirtd, bridge, inst)
        assert rbd_image not in ceph.run("rbd", "ls", pool).stdout.split()
    finally:
        api.delete(f"/v1/instances/{name}")
        stop_agent(agent, bridge)
        ceph.run("ceph", "osd", "pool", "delete", pool, pool, "--yes-i-really-really-mean-it", check=False)
