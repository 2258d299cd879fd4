"""VMs on real libvirtd + QEMU (TCG here): the test guest from scripts/build-test-images,
booted from a local pool through the agent's assembly (agent.services.assembly: the
clone, seed, address and spec the API's create makes), LibvirtDriver and QMP."""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt
import pytest

from agent import models
from agent.errors import AgentError, Conflict, NotFound, Unavailable, Unprocessable
from agent.services.assembly import Assembly, DirectBoot, mac_for, root_volume
from agent.state import Database
from containers.network import Network
from hypervisor import qmp
from hypervisor.disks import disk_for_volume
from hypervisor.driver import NicSpec
from hypervisor.libvirt_driver import LibvirtDriver
from storage import ImageStore
from storage.backend import VolumeSpec
from storage.local import LocalBackend
from storage.units import MiB

pytestmark = pytest.mark.real
BOOT_TIMEOUT_S = 90  # a TCG boot takes ~3 s; generous for a loaded CI host


@pytest.fixture(scope="module")
def lv(libvirtd, vm_root):
    """A driver that detects the accelerator by behaviour (KVM guests hang here -> qemu)."""
    d = LibvirtDriver(uri=libvirtd, virt_type="auto", state_dir=f"{vm_root}/functional-state")
    yield d
    d.close()


@pytest.fixture(scope="module")
def store(vm_root, guest_images):
    """The agent's image store on a local pool holding the test guest's disk as image "guest"."""
    db = Database(f"{vm_root}/assembly.db")
    s = ImageStore(db, {"local": LocalBackend("local", f"{vm_root}/pool")}, default_pool="local",
                   cache_dir=f"{vm_root}/cache")
    s.import_file(guest_images["rootfs"], name="guest")
    yield s
    db.close()


@pytest.fixture(scope="module")
def pool(store):
    p = store.pools["local"]
    p.image_digest = store.get("guest").digest
    return p


@pytest.fixture(scope="module")
def seed_dir(vm_root):
    """Where instance dirs (seed.iso, console.log) go."""
    d = f"{vm_root}/instances"
    os.makedirs(d, exist_ok=True)
    return d


@pytest.fixture
def bridge():
    """A bridge with no address and no route: a place for the guest's tap device."""
    from testbed import runtimes
    name, _ = runtimes.test_network("natest")
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    yield name
    runtimes.drop_test_network(name)


@dataclass(frozen=True)
class Vm:
    """An instance the assembly made: its name, id, the domain's uuid and the address it leased."""
    name: str
    id: str
    uuid: str
    ip: str | None = None


def assemble(driver, store, seed_dir, guest_images, *, name=None, network=None, image="guest",
             memory_mib=128, user_data=None) -> Vm:
    """Make a VM (not started) as the API's create does, with the test guest's kernel booted
    directly; on failure remove what was made (what the agent does by its record)."""
    inst_id = uuid.uuid4().hex
    name = name or f"fn-{inst_id[:8]}"
    asm = Assembly(store, network, bridge=network.bridge if network else "none", instances_dir=seed_dir)
    req = models.InstanceCreate.model_construct(  # unvalidated: the driver's own checks are under test
        name=name, kind="vm", image=image, cpus=1, memory_mib=memory_mib, disk_gib=None,
        network="bridge" if network else "none", user_data=user_data, start=False)
    boot = DirectBoot(guest_images["vmlinuz"], guest_images["initrd"], guest_images["cmdline"])
    try:
        _, ip = asm.create_vm(driver, inst_id, req, store.get(image).id, "local", boot=boot)
    except BaseException:
        asm.remove_vm_parts(inst_id, "local")
        raise
    return Vm(name, inst_id, str(uuid.UUID(inst_id)), ip)


@pytest.fixture
def vms(lv, store, seed_dir, guest_images):
    """make(**over) -> Vm created (defined, not started); all deleted afterwards."""
    made = []

    def make(**over) -> Vm:
        vm = assemble(lv, store, seed_dir, guest_images, **over)
        made.append(vm)
        return vm
    yield make
    for vm in made:
        Assembly(store, None, bridge="none", instances_dir=seed_dir).remove_vm(lv, vm.id, vm.name, "local")


def wait_console(driver, name, text, count=1, timeout=BOOT_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = driver.console_log(name)
        if log.count(text) >= count:
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} x{count} not on {name}'s console after {timeout}s:\n{log[-3000:]}")
        time.sleep(0.1)


def backing_file(path: str) -> str:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["backing-filename"]


def libvirt_names(uri: str) -> set[str]:
    conn = libvirt.open(uri)
    try:
        return {d.name() for d in conn.listAllDomains(0)}
    finally:
        conn.close()


def test_virt_type_is_detected_by_behaviour_and_cached(lv, vm_root):
    assert lv.virt_type in ("kvm", "qemu")
    cached = json.load(open(f"{vm_root}/functional-state/virt_type.json"))
    assert cached["virt_type"] == lv.virt_type and cached["reason"]


def test_boot_from_local_pool_with_cloud_init(lv, vms, pool, bridge, db, request):
    from testbed.runtimes import test_rtag
    net = Network(db, bridge=bridge, subnet="198.18.77.0/24", nat=False, rtag=test_rtag())
    request.addfinalizer(net.delete_bridge)
    req = vms(name="guest-one", network=net, user_data="#cloud-config\nruncmd: [echo hi]\n")
    mac = mac_for(req.id)
    assert req.ip == "198.18.77.2"  # the first address after the bridge's gateway
    dom = libvirt.open(lv.uri).lookupByName(req.name)
    assert ET.fromstring(dom.XMLDesc(0)).get("type") == lv.virt_type
    assert lv.start(req.name).state == "running"
    log = wait_console(lv, req.name, "NODEAGENT-READY")
    assert "NODEAGENT-GUEST-BOOTED" in log
    assert f"instance-id={req.id} hostname=guest-one" in log
    assert "NODEAGENT-USERDATA #cloud-config" in log
    assert "NODEAGENT-ROOTFS vda nodeagent test rootfs v1" in log
    assert f"mac={mac} ip={req.ip}/24" in log
    assert os.listdir(f"/sys/class/net/{bridge}/brif"), "the guest's tap is on the bridge"
    st = lv.stats(req.name)
    assert st["cpu_time_ns"] > 0 and st["memory_bytes"] > 0 and st["disk"]["rd_bytes"] > 0
    assert lv.qmp_status(req.name)["status"] == "running"
    lv.delete(req.name)
    assert not os.listdir(f"/sys/class/net/{bridge}/brif"), "no tap left after delete"


def test_stop_start_reboot_pause_resume(lv, vms):
    req = vms()
    lv.start(req.name)
    wait_console(lv, req.name, "NODEAGENT-READY")
    assert lv.stop(req.name, timeout=60).state == "stopped"  # graceful: the guest handles ACPI
    assert "NODEAGENT-ACPI-POWEROFF" in lv.console_log(req.name)
    lv.start(req.name)
    wait_console(lv, req.name, "NODEAGENT-READY", count=2)
    assert lv.reboot(req.name).state == "running"
    wait_console(lv, req.name, "NODEAGENT-READY", count=3)
    assert lv.pause(req.name).state == "paused"
    assert lv.qmp_status(req.name)["status"] == "paused"
    assert lv.resume(req.name).state == "running"
    assert lv.qmp_status(req.name)["running"] is True
    assert lv.stop(req.name, force=True).state == "stopped"
    with pytest.raises(Unavailable, match="is the VM running"):
        lv.qmp_status(req.name)


def test_attach_volume_and_see_it_in_the_guest(lv, vms, pool):
    req = vms()
    lv.start(req.name)
    wait_console(lv, req.name, "NODEAGENT-READY")
    vol = pool.create_volume(VolumeSpec(f"{req.name}-data", 16 * MiB))
    try:
        lv.attach_disk(req.name, disk_for_volume(vol, "vdb"))
        log = wait_console(lv, req.name, "NODEAGENT-DISK-ADDED")
        added = log.split("NODEAGENT-DISK-ADDED ")[1].split()[0]
        assert "vdb" in [d.target for d in lv.disks(req.name)]
        assert lv.stats(req.name)["state"] == "running"
        lv.detach_disk(req.name, "vdb")
        wait_console(lv, req.name, f"NODEAGENT-DISK-REMOVED {added}")
        assert "vdb" not in [d.target for d in lv.disks(req.name)]
        assert pool.find_volume(vol.name) is not None, "detach never deletes the volume"
    finally:
        pool.delete_volume(vol.name)


def test_two_vms_from_one_image_share_the_base(lv, vms, pool):
    a, b = vms(), vms()
    va, vb = pool.get_volume(root_volume("vm", a.id)), pool.get_volume(root_volume("vm", b.id))
    base = pool.blob_path(pool.image_digest)
    assert va.path != vb.path
    assert backing_file(va.path) == backing_file(vb.path) == base
    assert os.path.getsize(va.path) < 1 * MiB  # an overlay, not a copy
    for req in (a, b):
        lv.start(req.name)
    for req in (a, b):
        assert f"instance-id={req.id}" in wait_console(lv, req.name, "NODEAGENT-READY")


def test_snapshot_of_a_stopped_vm(lv, vms, pool):
    req = vms()
    lv.start(req.name)
    with pytest.raises(Conflict, match="stop it"):
        lv.snapshot(req.name, "before")
    lv.stop(req.name, force=True)
    lv.snapshot(req.name, "before")
    assert lv.list_snapshots(req.name) == ["before"]
    out = subprocess.run(["qemu-img", "snapshot", "-l", pool.get_volume(root_volume("vm", req.id)).path],
                         check=True, capture_output=True, text=True).stdout
    assert "before" in out


def test_qmp_reports_block_job_progress(lv, vms, vm_dir):
    req = vms()
    lv.start(req.name)
    dom = libvirt.open(lv.uri).lookupByName(req.name)
    dest = f"{vm_dir}/copy.qcow2"
    dom.blockCopy("vda", f"<disk type='file'><source file='{dest}'/><driver type='qcow2'/></disk>",
                  flags=libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB | libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW)
    try:
        jobs = lv.block_jobs(req.name)
        assert jobs and jobs[0]["type"] == "mirror"
        progress = qmp.block_job_progress(lv.qmp_socket(req.name))
        assert all(0.0 <= p <= 1.0 for p in progress.values()) and progress
    finally:
        dom.blockJobAbort("vda", 0)


def test_a_new_driver_readopts_defined_domains(lv, vms, vm_root, guest_images):
    req = vms()
    lv.start(req.name)
    again = LibvirtDriver(uri=lv.uri, virt_type="auto", state_dir=f"{vm_root}/functional-state")
    assert again.get(req.name) == lv.get(req.name)
    assert req.name in [i.name for i in again.list()]
    spec = again.spec(req.name)
    assert (spec.uuid, spec.cpus, spec.memory_mib, spec.kernel) == (req.uuid, 1, 128, guest_images["vmlinuz"])
    assert [d.target for d in spec.disks] == ["vda", "vdz"]
    assert again.stop(req.name, force=True).state == "stopped"
    assert lv.get(req.name).state == "stopped"
    again.close()


def _leftovers(lv, pool, seed_dir, name, before):
    """What making VM ``name`` left: its domain, a root volume, an instance dir (its seed)."""
    return {"domain": name in libvirt_names("qemu:///system"),
            "volume": {v.name for v in pool.list_volumes()} != before[0],
            "seed": set(os.listdir(seed_dir)) != before[1]}


NOTHING = {"domain": False, "volume": False, "seed": False}


@pytest.mark.parametrize("case", ["unknown_image", "too_much_memory", "disk_qemu_cannot_open",
                                  "libvirtd_down"])
def test_bad_input_leaves_nothing(case, lv, store, pool, seed_dir, guest_images, vm_dir, libvirtd):
    name = f"fn-bad-{uuid.uuid4().hex[:6]}"
    before = ({v.name for v in pool.list_volumes()}, set(os.listdir(seed_dir)))
    fields: dict = {"name": name}
    driver, error, match = lv, AgentError, None
    if case == "unknown_image":
        fields["image"] = "sha256:" + "0" * 64
        error, match = NotFound, "not found"
    elif case == "too_much_memory":
        fields["memory_mib"] = 64 * 1024 * 1024
        error, match = Unprocessable, "ask for less memory"
    elif case == "disk_qemu_cannot_open":
        junk = f"{vm_dir}/junk.img"
        with open(junk, "wb") as f:
            f.write(b"QFI\xfb" + b"\xff" * 4096)  # qcow2 magic, nonsense header
        fields["image"] = "junk"
        error, match = AgentError, None  # refused by storage (it words the message)
    elif case == "libvirtd_down":
        driver = LibvirtDriver(uri="qemu+unix:///system?socket=/nonexistent/libvirt-sock",
                               virt_type="qemu", state_dir=f"{vm_dir}/state")
        error, match = Unavailable, r"libvirtd is not running: start it as root: `virtlogd -d && libvirtd -d`"
    with pytest.raises(error, match=match):
        if case == "disk_qemu_cannot_open":
            store.import_file(junk, name="junk")
        assemble(driver, store, seed_dir, guest_images, **fields)
    assert _leftovers(lv, pool, seed_dir, name, before) == NOTHING


def test_overlay_whose_base_is_gone_and_missing_bridge_define_nothing(lv, vm_dir, guest_images):
    overlay = f"{vm_dir}/orphan.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", f"{vm_dir}/gone.qcow2",
                    "-F", "qcow2", overlay, "64M"], check=True)
    from hypervisor.driver import DiskSpec, VmSpec
    base = VmSpec(name=f"fn-bad-{uuid.uuid4().hex[:6]}", uuid=str(uuid.uuid4()), cpus=1, memory_mib=128,
                  disks=(DiskSpec("vda", overlay),))
    with pytest.raises(Unprocessable, match="QEMU cannot open"):
        lv.define(base)
    assert lv.find(base.name) is None
    ok_disk = f"{vm_dir}/ok.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", ok_disk, "64M"], check=True)
    from dataclasses import replace
    with pytest.raises(NotFound, match="ip link add nabr-nope type bridge"):
        lv.define(replace(base, disks=(DiskSpec("vda", ok_disk),),
                          nics=(NicSpec(bridge="nabr-nope", mac="52:54:00:00:00:09"),)))
    assert base.name not in libvirt_names(lv.uri)


def test_name_clash_keeps_the_first_and_adds_nothing(lv, vms, store, pool, seed_dir, guest_images):
    first = vms()
    before = (pool.list_volumes(), sorted(os.listdir(seed_dir)))
    with pytest.raises(Conflict, match="already exists"):
        assemble(lv, store, seed_dir, guest_images, name=first.name)
    assert (pool.list_volumes(), sorted(os.listdir(seed_dir))) == before
    assert lv.get(first.name).uuid == first.uuid
