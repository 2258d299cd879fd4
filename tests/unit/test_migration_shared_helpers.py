"""Shared-storage migration helpers: the destination's XML for an RBD disk, the image
store taking over (adopt_volume) and letting go of (forget_volume) a volume without
copying or deleting it, and scripts/ceph-dev-cluster refusing a bad --addr."""
import xml.etree.ElementTree as ET

import pytest

from agent.errors import Conflict, InvalidInput, NotFound
from hypervisor.driver import MigrationOptions

RBD_XML = """<domain type='qemu'><name>v</name><devices>
<disk type='network' device='disk'><driver name='qemu' type='raw'/>
<source protocol='rbd' name='rbd/navol.v-disk'><host name='198.18.5.10' port='3300'/>
<config file='/src/ceph-client.conf'/></source>
<auth username='admin'><secret type='ceph' uuid='11111111-1111-1111-1111-111111111111'/></auth>
<target dev='vda' bus='virtio'/></disk>
<disk type='file' device='disk'><source file='/src/seed.iso'/><target dev='vdz' bus='virtio'/><readonly/></disk>
</devices></domain>"""


def test_rewrite_xml_keeps_the_rbd_image_and_takes_the_destinations_secret_and_monitors():
    from hypervisor.libvirt_migration import rewrite_xml
    attach = {"monitors": ["198.18.5.11:3300", "198.18.5.12:3300"], "config": "/dst/ceph-client.conf",
              "user": "admin", "secret_uuid": "22222222-2222-2222-2222-222222222222"}
    out = ET.fromstring(rewrite_xml(RBD_XML, MigrationOptions(
        disk_sources={"vda": "rbd:rbd/navol.v-disk", "vdz": "/dst/seed.iso"}, disk_attach={"vda": attach})))
    rbd, seed = out.findall("devices/disk")
    assert rbd.find("source").get("name") == "rbd/navol.v-disk"
    assert [h.get("name") for h in rbd.findall("source/host")] == ["198.18.5.11", "198.18.5.12"]
    assert rbd.find("source/config").get("file") == "/dst/ceph-client.conf"
    assert rbd.find("auth/secret").get("uuid") == attach["secret_uuid"]
    assert seed.find("source").get("file") == "/dst/seed.iso"


def test_rewrite_xml_refuses_another_image_for_a_shared_disk():
    from hypervisor.libvirt_migration import rewrite_xml
    with pytest.raises(InvalidInput, match="must be the same image"):
        rewrite_xml(RBD_XML, MigrationOptions(disk_sources={"vda": "rbd:rbd/navol.other"}))


@pytest.fixture
def store(db, tmp_path):
    from storage import ImageStore
    from storage.local import LocalBackend
    pools = {"local": LocalBackend("local", path=str(tmp_path / "pool"))}
    return ImageStore(db, pools, default_pool="local", cache_dir=str(tmp_path / "cache"))


def test_adopt_and_forget_a_volume_move_only_the_reference(store, tmp_path):
    raw = tmp_path / "a.raw"
    raw.write_bytes(b"R" * (1 << 20))
    store.import_file(str(raw), name="a")
    vol = store.clone_disk("a", "vm0-disk")
    assert store.forget_volume("local", "vm0-disk") is True  # the source lets go: the volume stays
    assert store.forget_volume("local", "vm0-disk") is False
    assert store.references("a") == [] and store.pools["local"].find_volume("vm0-disk") is not None
    assert store.adopt_volume("a", "local", "vm0-disk").path == vol.path  # the destination takes it over
    assert store.references("a") == [("local", "vm0-disk")]
    with pytest.raises(Conflict):
        store.adopt_volume("a", "local", "vm0-disk")
    with pytest.raises(NotFound, match="same Ceph pool"):
        store.adopt_volume("a", "local", "nosuch-disk")
    assert store.release("local", "vm0-disk") is True  # its owner deletes it for real
    assert store.pools["local"].find_volume("vm0-disk") is None


def test_ceph_dev_cluster_refuses_a_bad_addr_and_makes_nothing(tmp_path):
    import subprocess
    import sys

    from testbed.ceph_cluster import SCRIPT
    d = tmp_path / "c"
    r = subprocess.run([sys.executable, str(SCRIPT), "start", "--addr", "not-an-address", "--dir", str(d)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "is not an IPv4 address" in r.stderr
    assert not d.exists()
