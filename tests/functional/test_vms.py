"""VMs on real libvirtd + QEMU (TCG here): the test guest from scripts/build-test-images,
booted from a local pool through hypervisor.provision, LibvirtDriver and QMP."""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET

import libvirt
import pytest

from agent.errors import AgentError, Conflict, NotFound, Unavailable, Unprocessable
from hypervisor import qmp
from hypervisor.disks import disk_for_volume
from hypervisor.driver import NicSpec
from hypervisor.libvirt_driver import LibvirtDriver
from hypervisor.provision import VmRequest, create_vm, delete_vm, root_volume_name, seed_path
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
def pool(vm_root, guest_images):
    p = LocalBackend("local", f"{vm_root}/pool")
    with open(guest_images["rootfs"], "rb") as f:
        blob = p.put_blob(f)
    p.image_digest = blob.digest
    return p


@pytest.fixture(scope="module")
def seed_dir(vm_root):
    d = f"{vm_root}/seeds"
    os.makedirs(d, exist_ok=True)
    return d


@pytest.fixture
def bridge():
    """A bridge with no address and no route: a place for the guest's tap device."""
    name = f"natest{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    yield name
    subprocess.run(["ip", "link", "del", name], check=False)


@pytest.fixture
def vms(lv, pool, seed_dir, guest_images):
    """make(**over) -> VmRequest created (defined, not started); all deleted afterwards."""
    made = []

    def make(**over) -> VmRequest:
        name = over.pop("name", f"fn-{uuid.uuid4().hex[:8]}")
        fields = dict(name=name, uuid=str(uuid.uuid4()), cpus=1, memory_mib=128,
                      image_digest=pool.image_digest, kernel=guest_images["vmlinuz"],
                      initrd=guest_images["initrd"], cmdline=guest_images["cmdline"])
        fields.update(over)
        req = VmRequest(**fields)
        made.append(req.name)
        create_vm(lv, pool, req, seed_dir=seed_dir)
        return req
    yield make
    for name in made:
        delete_vm(lv, pool, name, seed_dir=seed_dir)


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


def test_boot_from_local_pool_with_cloud_init(lv, vms, pool, bridge):
    mac = "52:54:00:c0:ff:01"
    req = vms(nics=(NicSpec(bridge=bridge, mac=mac),), hostname="guest-one",
              user_data="#cloud-config\nruncmd: [echo hi]\n",
              network_config="version: 2\nethernets:\n  eth0:\n    addresses:\n      - 198.18.77.2/24\n")
    dom = libvirt.open(lv.uri).lookupByName(req.name)
    assert ET.fromstring(dom.XMLDesc(0)).get("type") == lv.virt_type
    assert lv.start(req.name).state == "running"
    log = wait_console(lv, req.name, "NODEAGENT-READY")
    assert "NODEAGENT-GUEST-BOOTED" in log
    assert f"instance-id={req.uuid} hostname=guest-one" in log
    assert "NODEAGENT-USERDATA #cloud-config" in log
    assert "NODEAGENT-ROOTFS vda nodeagent test rootfs v1" in log
    assert f"mac={mac} ip=198.18.77.2/24" in log
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
    va, vb = pool.get_volume(root_volume_name(a.name)), pool.get_volume(root_volume_name(b.name))
    base = pool.blob_path(pool.image_digest)
    assert va.path != vb.path
    assert backing_file(va.path) == backing_file(vb.path) == base
    assert os.path.getsize(va.path) < 1 * MiB  # an overlay, not a copy
    for req in (a, b):
        lv.start(req.name)
    for req in (a, b):
        assert f"instance-id={req.uuid}" in wait_console(lv, req.name, "NODEAGENT-READY")


def test_snapshot_of_a_stopped_vm(lv, vms, pool):
    req = vms()
    lv.start(req.name)
    with pytest.raises(Conflict, match="stop it"):
        lv.snapshot(req.name, "before")
    lv.stop(req.name, force=True)
    lv.snapshot(req.name, "before")
    assert lv.list_snapshots(req.name) == ["before"]
    out = subprocess.run(["qemu-img", "snapshot", "-l", pool.get_volume(root_volume_name(req.name)).path],
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


def test_a_new_driver_readopts_defined_domains(lv, vms, vm_root):
    req = vms()
    lv.start(req.name)
    again = LibvirtDriver(uri=lv.uri, virt_type="auto", state_dir=f"{vm_root}/functional-state")
    assert again.get(req.name) == lv.get(req.name)
    assert req.name in [i.name for i in again.list()]
    spec = again.spec(req.name)
    assert (spec.uuid, spec.cpus, spec.memory_mib, spec.kernel) == (req.uuid, 1, 128, req.kernel)
    assert [d.target for d in spec.disks] == ["vda", "vdz"]
    assert again.stop(req.name, force=True).state == "stopped"
    assert lv.get(req.name).state == "stopped"
    again.close()


def _leftovers(lv, pool, seed_dir, name):
    return {"domain": name in libvirt_names("qemu:///system"),
            "volume": pool.find_volume(root_volume_name(name)) is not None,
            "seed": os.path.exists(seed_path(seed_dir, name))}


NOTHING = {"domain": False, "volume": False, "seed": False}


@pytest.mark.parametrize("case", ["unknown_image", "too_much_memory", "disk_qemu_cannot_open",
                                  "libvirtd_down"])
def test_bad_input_leaves_nothing(case, lv, pool, seed_dir, guest_images, vm_dir, libvirtd):
    name = f"fn-bad-{uuid.uuid4().hex[:6]}"
    fields = dict(name=name, uuid=str(uuid.uuid4()), cpus=1, memory_mib=128,
                  image_digest=pool.image_digest, kernel=guest_images["vmlinuz"],
                  initrd=guest_images["initrd"], cmdline=guest_images["cmdline"])
    driver, error, match = lv, AgentError, None
    if case == "unknown_image":
        fields["image_digest"] = "sha256:" + "0" * 64
        error, match = NotFound, "not found"
    elif case == "too_much_memory":
        fields["memory_mib"] = 64 * 1024 * 1024
        error, match = Unprocessable, "ask for less memory"
    elif case == "disk_qemu_cannot_open":
        junk = f"{vm_dir}/junk.img"
        with open(junk, "wb") as f:
            f.write(b"QFI\xfb" + b"\xff" * 4096)  # qcow2 magic, nonsense header
        with open(junk, "rb") as f:
            fields["image_digest"] = pool.put_blob(f).digest
        error, match = AgentError, None  # refused by the pool's clone (storage words the message)
    elif case == "libvirtd_down":
        driver = LibvirtDriver(uri="qemu+unix:///system?socket=/nonexistent/libvirt-sock",
                               virt_type="qemu", state_dir=f"{vm_dir}/state")
        error, match = Unavailable, r"libvirtd is not running: start it with `libvirtd -d`"
    with pytest.raises(error, match=match):
        create_vm(driver, pool, VmRequest(**fields), seed_dir=seed_dir)
    assert _leftovers(lv, pool, seed_dir, name) == NOTHING


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


def test_name_clash_keeps_the_first_and_adds_nothing(lv, vms, pool, seed_dir):
    first = vms()
    before = (pool.list_volumes(), sorted(os.listdir(seed_dir)))
    with pytest.raises(Conflict, match="already exists"):
        create_vm(lv, pool, VmRequest(name=first.name, uuid=str(uuid.uuid4()), cpus=1, memory_mib=128,
                                      image_digest=pool.image_digest), seed_dir=seed_dir)
    assert (pool.list_volumes(), sorted(os.listdir(seed_dir))) == before
    assert lv.get(first.name).uuid == first.uuid
