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


def test_bulk_stats_record_reads_as_stats_does():
    """LibvirtDriver.bulk_stats' reading of one getAllDomainStats record: sums over disks and
    NICs, QEMU's RSS in KiB; a busy domain's missing figures (NOWAIT) are unknown, not 0; a
    shut-off domain is all zeros whatever cpu.time libvirt reports for it."""
    libvirt = pytest.importorskip("libvirt")
    from hypervisor.libvirt_driver import stats_from_record
    running = {"state.state": libvirt.VIR_DOMAIN_RUNNING, "cpu.time": 5_000, "balloon.current": 131072,
               "balloon.rss": 2048, "block.count": 2, "block.0.rd.bytes": 10, "block.0.wr.bytes": 1,
               "block.1.rd.bytes": 5, "block.1.wr.bytes": 2, "net.count": 1, "net.0.rx.bytes": 7,
               "net.0.rx.pkts": 1, "net.0.tx.bytes": 3, "net.0.tx.pkts": 2}
    assert stats_from_record(running) == {
        "state": "running", "cpu_time_ns": 5_000, "memory_bytes": 2048 * 1024,
        "disk": {"rd_bytes": 15, "wr_bytes": 3},
        "net": {"rx_bytes": 7, "tx_bytes": 3, "rx_packets": 1, "tx_packets": 2}}
    busy = {k: v for k, v in running.items() if not k.startswith("block.") or k == "block.count"}
    busy.pop("balloon.rss")
    got = stats_from_record(busy)
    assert got["disk"] == {} and got["memory_bytes"] == 131072 * 1024 and got["net"]["rx_bytes"] == 7
    off = stats_from_record({"state.state": libvirt.VIR_DOMAIN_SHUTOFF, "cpu.time": 600_000_000,
                             "block.count": 1, "balloon.current": 131072})
    assert off == {"state": "stopped", "cpu_time_ns": 0, "memory_bytes": 0, "disk": {"rd_bytes": 0, "wr_bytes": 0},
                   "net": {"rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0, "tx_packets": 0}}
