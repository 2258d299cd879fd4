"""VMs whose root disk is an RBD clone on the live Ceph (`ceph` fixture), booted by the real
libvirtd + QEMU (TCG) through librbd with cephx auth held in a libvirt secret."""
from __future__ import annotations

import os
import subprocess
import uuid
import xml.etree.ElementTree as ET
from dataclasses import replace

import libvirt
import pytest

from agent.errors import Conflict, InvalidInput, Unavailable
from agent.state import Database
from hypervisor import secrets
from hypervisor.disks import disk_for_volume
from hypervisor.driver import DiskSpec, VmSpec
from hypervisor.seed import make_seed
from storage.backend import VolumeSpec
from storage.images import ImageStore
from storage.units import MiB
from testbed import ceph_cluster
from tests.functional.test_vms import libvirt_names, lv, seed_dir, wait_console  # noqa: F401 (fixtures)

pytestmark = pytest.mark.real
POOL = "blk"
ROOTFS_MARKER = "NODEAGENT-ROOTFS vda nodeagent test rootfs v1"


@pytest.fixture(scope="module")
def store(ceph, vm_root, guest_images):
    """An ImageStore over an RbdBackend on a Ceph pool of its own, holding the test guest's
    rootfs as image "guest"; the pool is removed afterwards."""
    backend = ceph_cluster.block_backend(None)
    db = Database(f"{vm_root}/rbd-images.db")
    s = ImageStore(db, {POOL: backend}, default_pool=POOL, cache_dir=f"{vm_root}/rbd-cache")
    s.image = s.import_file(guest_images["rootfs"], name="guest")
    yield s
    backend.close()
    db.close()


def rbd_images(store) -> list[str]:
    backend = store.pools[POOL]
    return ceph_cluster.current().run("rbd", "ls", backend.pool).stdout.split()


def secret_uuids(conn_uri: str) -> set[str]:
    conn = libvirt.open(conn_uri)
    try:
        return set(secrets.list_ceph_secrets(conn))
    finally:
        conn.close()


@pytest.fixture
def rbd_vms(lv, store, seed_dir, guest_images):  # noqa: F811
    """make(name=None, key=None) -> (VmSpec, Volume): the guest with its root on an RBD clone
    (``key`` overrides the cephx key handed to libvirt), defined and started. Everything is
    deleted afterwards."""
    made = []

    def make(*, key: str | None = None, start: bool = True):
        name = f"rbd-{uuid.uuid4().hex[:8]}"
        made.append(name)
        vol = store.clone_disk("guest", f"{name}-root")
        disk = disk_for_volume(vol, "vda")
        if key is not None:
            disk = replace(disk, attach={**disk.attach, "key": key})
        vm_uuid = str(uuid.uuid4())
        seed = make_seed(f"{seed_dir}/{name}-seed.iso", instance_id=vm_uuid, hostname=name)
        spec = VmSpec(name=name, uuid=vm_uuid, cpus=1, memory_mib=128,
                      disks=(disk, DiskSpec(target="vdz", source=seed, format="raw", readonly=True)),
                      kernel=guest_images["vmlinuz"], initrd=guest_images["initrd"],
                      cmdline=guest_images["cmdline"])
        lv.define(spec)
        if start:
            lv.start(name)
        return spec, vol

    def remove(name: str) -> None:
        lv.delete(name)
        store.release(POOL, f"{name}-root")
        try:
            os.unlink(f"{seed_dir}/{name}-seed.iso")
        except FileNotFoundError:
            pass

    make.remove, make.made = remove, made
    yield make
    for name in made:
        remove(name)


def rbd_disk_xml(uri: str, name: str, target: str = "vda") -> ET.Element:
    conn = libvirt.open(uri)
    try:
        root = ET.fromstring(conn.lookupByName(name).XMLDesc(0))
    finally:
        conn.close()
    return next(d for d in root.findall("devices/disk") if d.find("target").get("dev") == target)


def test_boot_from_an_rbd_clone_and_delete_everything(lv, store, rbd_vms):  # noqa: F811
    spec, vol = rbd_vms()
    assert vol.uri == f"rbd:{store.pools[POOL].pool}/navol.{vol.name}"
    log = wait_console(lv, spec.name, "NODEAGENT-READY")
    assert f"instance-id={spec.uuid}" in log
    assert ROOTFS_MARKER in log, "the guest's root is the image's ext4 on the RBD disk"
    el = rbd_disk_xml(lv.uri, spec.name)
    src, auth = el.find("source"), el.find("auth")
    assert (el.get("type"), src.get("protocol"), src.get("name")) == \
        ("network", "rbd", f"{store.pools[POOL].pool}/navol.{vol.name}")
    sid = auth.find("secret").get("uuid")
    assert auth.get("username") == ceph_cluster.current().user
    assert sid in secret_uuids(lv.uri)
    assert vol.attach["key"] not in ET.tostring(el, encoding="unicode"), "the key stays in the secret"
    parent = ceph_cluster.current().run("rbd", "info", f"{store.pools[POOL].pool}/navol.{vol.name}").stdout
    assert "parent:" in parent, "the root disk is an RBD clone, not a copy"
    assert lv.disks(spec.name)[0].attach["secret_uuid"] == sid

    data = store.pools[POOL].create_volume(VolumeSpec(f"{spec.name}-data", 16 * MiB))
    try:  # hot-plug an RBD data volume: same key, same secret
        lv.attach_disk(spec.name, disk_for_volume(data, "vdb"))
        added = wait_console(lv, spec.name, "NODEAGENT-DISK-ADDED").split("NODEAGENT-DISK-ADDED ")[1].split()[0]
        assert rbd_disk_xml(lv.uri, spec.name, "vdb").find("auth/secret").get("uuid") == sid
        lv.detach_disk(spec.name, "vdb")
        wait_console(lv, spec.name, f"NODEAGENT-DISK-REMOVED {added}")
        assert sid in secret_uuids(lv.uri), "vda still uses it"
    finally:
        store.pools[POOL].delete_volume(data.name)

    rbd_vms.remove(spec.name)
    assert spec.name not in libvirt_names(lv.uri)
    assert f"navol.{vol.name}" not in rbd_images(store)
    assert sid not in secret_uuids(lv.uri), "no domain uses the secret any more"


def test_two_vms_from_one_rbd_image_share_the_parent_and_the_secret(lv, store, rbd_vms):  # noqa: F811
    (a, va), (b, vb) = rbd_vms(), rbd_vms()
    pool = store.pools[POOL].pool
    raw_parent = f"naraw.{store.image.id}"  # the qcow2 image's raw conversion, made once
    children = ceph_cluster.current().run("rbd", "children", f"{pool}/{raw_parent}@base").stdout.split()
    assert sorted(children) == sorted([f"{pool}/navol.{va.name}", f"{pool}/navol.{vb.name}"])
    for spec in (a, b):
        assert ROOTFS_MARKER in wait_console(lv, spec.name, "NODEAGENT-READY")
    sid_a = rbd_disk_xml(lv.uri, a.name).find("auth/secret").get("uuid")
    assert sid_a == rbd_disk_xml(lv.uri, b.name).find("auth/secret").get("uuid"), "one secret per key"
    assert sid_a in secret_uuids(lv.uri)
    rbd_vms.remove(a.name)
    assert sid_a in secret_uuids(lv.uri), "b still uses the secret"
    rbd_vms.remove(b.name)
    assert sid_a not in secret_uuids(lv.uri)


def test_a_wrong_cephx_key_fails_the_start_clearly_and_leaves_nothing(lv, store, rbd_vms):  # noqa: F811
    wrong = new_key()
    before = secret_uuids(lv.uri)
    with pytest.raises(Unavailable, match=r"QEMU cannot connect to the Ceph cluster .* key"):
        rbd_vms(key=wrong)
    name = rbd_vms.made[-1]
    assert lv.get(name).state == "stopped"
    rbd_vms.remove(name)
    assert name not in libvirt_names(lv.uri)
    assert not [i for i in rbd_images(store) if i.startswith("navol.")]
    assert secret_uuids(lv.uri) <= before, "the wrong key's secret is gone with its domain"


def test_a_malformed_key_defines_nothing(lv, store, rbd_vms):  # noqa: F811
    before = (libvirt_names(lv.uri), secret_uuids(lv.uri))
    with pytest.raises(InvalidInput, match="not a cephx key"):
        rbd_vms(key="not-a-key", start=False)
    assert (libvirt_names(lv.uri), secret_uuids(lv.uri)) == before


def new_key() -> str:
    return subprocess.run(["ceph-authtool", "--gen-print-key"], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_a_define_that_fails_removes_the_secret_it_made(lv, store, rbd_vms):  # noqa: F811
    first, _ = rbd_vms(start=False)
    before = secret_uuids(lv.uri)
    vol = store.clone_disk("guest", "rbd-clash-root")
    try:
        disk = disk_for_volume(vol, "vda")
        clash = VmSpec(name=f"rbd-{uuid.uuid4().hex[:8]}", uuid=first.uuid, cpus=1, memory_mib=128,
                       disks=(replace(disk, attach={**disk.attach, "key": new_key()}),))
        with pytest.raises(Conflict, match=f"uuid {first.uuid} already exists"):
            lv.define(clash)
        assert clash.name not in libvirt_names(lv.uri)
        assert secret_uuids(lv.uri) == before, "the new key's secret went with the failed define"
    finally:
        store.release(POOL, vol.name)
