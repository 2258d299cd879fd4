"""hypervisor.disks, hypervisor.host (virt-type cache) and hypervisor.validate."""
from __future__ import annotations

import json
import platform
from dataclasses import replace

import pytest

from agent.errors import InvalidInput, NotFound, Unprocessable
from hypervisor import host
from hypervisor.disks import disk_for_volume
from hypervisor.driver import DiskSpec, NicSpec, VmSpec
from hypervisor.validate import check_disk_file, check_spec
from storage.backend import Volume

UUID = "6f1c2a64-0d3b-4a53-9b7e-1f3f2d6c9a10"


def test_disk_for_file_volume():
    v = Volume("vm1-root", "local", "qcow2", 1 << 30, path="/p/vm1-root.qcow2", uri="file:///p/vm1-root.qcow2")
    assert disk_for_volume(v, "vda") == DiskSpec(target="vda", source="/p/vm1-root.qcow2")


def test_disk_for_rbd_volume_keeps_attach_facts():
    v = Volume("vm1-root", "ceph", "raw", 1 << 30, uri="rbd:vms/vm1-root",
               attach={"monitors": ["198.18.0.1:6789"], "user": "nodeagent", "secret_uuid": UUID, "x": 1})
    d = disk_for_volume(v, "vda")
    assert (d.type, d.source, d.format) == ("rbd", "vms/vm1-root", "raw")
    assert d.attach == {"monitors": ["198.18.0.1:6789"], "user": "nodeagent", "secret_uuid": UUID}


def test_disk_for_nbd_volume():
    v = Volume("d", "remote", "raw", 1 << 20, uri="nbd://198.18.0.9:10809/d")
    assert disk_for_volume(v, "vdb", readonly=True) == DiskSpec(
        target="vdb", source="nbd://198.18.0.9:10809/d", type="nbd", format="raw", readonly=True)


def test_an_nbd_export_over_x509_is_attached_with_tls_and_a_psk_one_refused():
    from hypervisor.domain_xml import disk_xml

    v = Volume("d", "remote", "raw", 1 << 20, uri="nbd://198.18.0.9:10809/d", attach={"tls": "x509"})
    d = disk_for_volume(v, "vdb")
    assert d.attach == {"tls": True} and "tls=\"yes\"" in disk_xml(d)
    assert "tls=" not in disk_xml(disk_for_volume(Volume("d", "r", "raw", 1, uri="nbd://h:1/d"), "vdb"))
    with pytest.raises(InvalidInput, match="x509 TLS only"):
        disk_for_volume(Volume("d", "remote", "raw", 1, uri="nbd://h:1/d", attach={"tls": "psk"}), "vdb")


def test_dir_volume_is_not_a_disk():
    with pytest.raises(InvalidInput, match="not a disk"):
        disk_for_volume(Volume("c", "local", "dir", 0, path="/p/c", uri="file:///p/c"), "vda")


def test_virt_type_cache_is_used(tmp_path):
    (tmp_path / host.CACHE_FILE).write_text(json.dumps(
        {"virt_type": "kvm", "kernel": platform.release(), "reason": "test"}))
    assert host.detect_virt_type(str(tmp_path)) == "kvm"


def test_no_usable_kvm_device_means_tcg(tmp_path, monkeypatch):
    monkeypatch.setattr(host, "KVM_DEVICE", str(tmp_path / "no-kvm"))  # inject: no /dev/kvm
    assert host.detect_virt_type(str(tmp_path)) == "qemu"
    cached = json.loads((tmp_path / host.CACHE_FILE).read_text())
    assert cached["virt_type"] == "qemu" and "not usable" in cached["reason"]


def spec(**over):
    return replace(VmSpec(name="vm1", uuid=UUID, cpus=1, memory_mib=128), **over)


@pytest.mark.parametrize("over, msg", [
    (dict(nics=(NicSpec(bridge="br0", mac="01:00:00:00:00:01"),)), "unicast"),
    (dict(nics=(NicSpec(bridge="a-very-long-bridge-name", mac="52:54:00:00:00:01"),)), "bridge"),
    (dict(disks=(DiskSpec("vda", "/a"), DiskSpec("vda", "/b"))), "unique"),
    (dict(disks=(DiskSpec("xvda", "/a"),)), "target"),
    (dict(disks=(DiskSpec("vda", "relative.qcow2"),)), "absolute"),
    (dict(disks=(DiskSpec("vda", "pool-only", type="rbd"),)), "rbd"),
    (dict(disks=(DiskSpec("vda", "http://x/y", type="nbd"),)), "nbd"),
    (dict(console_log="relative.log"), "absolute"),
])
def test_bad_specs(over, msg):
    with pytest.raises(InvalidInput, match=msg):
        check_spec(spec(**over), host_memory_mib=1024)


def test_missing_kernel_says_how_to_build_it(tmp_path):
    with pytest.raises(NotFound, match="build-test-images"):
        check_spec(spec(kernel=str(tmp_path / "vmlinuz")), host_memory_mib=1024)


def test_qcow2_declared_raw_is_refused(tmp_path):
    p = tmp_path / "d.img"
    p.write_bytes(b"QFI\xfb" + bytes(100))
    with pytest.raises(Unprocessable, match="declare format qcow2"):
        check_disk_file(DiskSpec("vda", str(p), format="raw"))
