"""Golden-file tests of hypervisor.domain_xml. Regenerate with NODEAGENT_UPDATE_GOLDEN=1."""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hypervisor.domain_xml import domain_xml
from hypervisor.driver import DiskSpec, NicSpec, VmSpec

GOLDEN = Path(__file__).parent / "golden"
UUID = "6f1c2a64-0d3b-4a53-9b7e-1f3f2d6c9a10"

SPECS = {
    "local_q35_kvm": (VmSpec(
        name="web-1", uuid=UUID, cpus=2, memory_mib=2048, max_cpus=4, max_memory_mib=4096,
        disks=(DiskSpec(target="vda", source="/var/lib/nodeagent/pools/local/web-1.qcow2"),
               DiskSpec(target="vdz", source="/var/lib/nodeagent/seeds/web-1.iso", format="raw",
                        readonly=True)),
        nics=(NicSpec(bridge="nabr0", mac="52:54:00:12:34:56"),),
        console_log="/var/lib/nodeagent/console/web-1.log"),
        dict(virt_type="kvm", qmp_socket="/var/lib/libvirt/qemu/nodeagent-web-1.qmp")),
    "rbd_nbd_pc_tcg": (VmSpec(
        name="db-1", uuid=UUID, cpus=1, memory_mib=256, machine="pc",
        disks=(DiskSpec(target="vda", source="rbd/db-1-root", type="rbd", format="raw",
                        attach={"monitors": ["198.18.0.1:6789", "198.18.0.2"], "user": "nodeagent",
                                "secret_uuid": "0d9e2f6a-9b2c-4f4e-8a43-5c1d2b3e4f50"}),
               DiskSpec(target="vdb", source="nbd://198.18.0.9:10809/data", type="nbd", format="raw"),
               DiskSpec(target="hdc", source="/seeds/db-1.iso", format="raw", device="cdrom"))),
        dict(virt_type="qemu")),
    "rbd_secret_config_q35_tcg": (VmSpec(
        name="vm-rbd", uuid=UUID, cpus=1, memory_mib=128,
        disks=(DiskSpec(target="vda", source="rbd/navol.vm-rbd-root", type="rbd", format="raw",
                        attach={"monitors": ["127.0.0.1:3300"], "user": "admin",
                                "secret_uuid": "5b7c3a52-1f0e-5d7a-9c1b-2e4f6a8b0c1d",
                                "config": "/var/lib/libvirt/qemu/nodeagent-ceph-client.conf"}),)),
        dict(virt_type="qemu")),
    "kernel_boot_tcg": (VmSpec(
        name="guest", uuid=UUID, cpus=1, memory_mib=128,
        disks=(DiskSpec(target="vda", source="/tmp/guest.qcow2"),
               DiskSpec(target="sda", source="/tmp/seed.iso", format="raw", device="cdrom")),
        console_log="/tmp/guest.log", kernel="/cache/vmlinuz", initrd="/cache/initrd.img",
        cmdline="console=ttyS0 quiet"),
        dict(virt_type="qemu", qmp_socket="/run/q.sock")),
}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_golden(case):
    spec, kw = SPECS[case]
    got = domain_xml(spec, **kw)
    path = GOLDEN / f"{case}.xml"
    if os.environ.get("NODEAGENT_UPDATE_GOLDEN"):
        path.write_text(got)
    assert got == path.read_text()


def test_always_acpi_and_metadata_tag():
    spec, kw = SPECS["kernel_boot_tcg"]
    root = ET.fromstring(domain_xml(spec, **kw))
    assert root.find("features/acpi") is not None
    assert root.find("{urn:nodeagent:vm:1}vm") is None  # it lives under <metadata>
    assert root.find("metadata/{urn:nodeagent:vm:1}vm") is not None
    assert root.get("type") == "qemu"


def test_unknown_machine_is_refused():
    spec, _ = SPECS["kernel_boot_tcg"]
    from dataclasses import replace
    with pytest.raises(ValueError, match="machine"):
        domain_xml(replace(spec, machine="virt"))


def test_a_cephx_key_never_reaches_the_xml():
    """The driver swaps a key for a libvirt secret; a key left in attach is not written."""
    spec = VmSpec(name="k", uuid=UUID, cpus=1, memory_mib=128,
                  disks=(DiskSpec(target="vda", source="rbd/img", type="rbd", format="raw",
                                  attach={"monitors": ["127.0.0.1:3300"], "user": "admin",
                                          "key": "AQDKTgVr/8wAMhAA8B4PL9b8eQp+cXB6qksXMg=="}),))
    xml = domain_xml(spec)
    assert "AQDKTgVr" not in xml and "<auth" not in xml


def test_bandwidth_is_kept_in_metadata_and_read_back():
    from containers.bandwidth import Bandwidth
    from hypervisor.domain_xml import BANDWIDTH_NS, bandwidth_from, bandwidth_xml, taps
    spec = VmSpec(name="bw", uuid="6f1c2c4e-1d4f-4a35-9a55-3c8f1c1b2a10", cpus=1, memory_mib=128,
                  nics=(NicSpec(bridge="br0", mac="52:54:00:00:00:01"),), bandwidth=Bandwidth(8000, None, 512))
    root = ET.fromstring(domain_xml(spec))
    el = root.find(f"metadata/{{{BANDWIDTH_NS}}}bandwidth")
    assert el is not None and dict(el.attrib) == {"ingress_kbit": "8000", "burst_kbit": "512"}
    assert bandwidth_from(root) == Bandwidth(8000, None, 512)
    assert root.find("devices/interface/bandwidth") is None  # not libvirt's own (needs sfq, act_police)
    plain = ET.fromstring(domain_xml(VmSpec(name="bw", uuid=spec.uuid, cpus=1, memory_mib=128)))
    assert plain.find(f"metadata/{{{BANDWIDTH_NS}}}bandwidth") is None and bandwidth_from(plain) == Bandwidth()
    assert bandwidth_xml(Bandwidth(None, 640)) == '<bandwidth egress_kbit="640" />'
    live = ET.fromstring("<domain><devices><interface type='bridge'><target dev='vnet7'/></interface>"
                         "<interface type='network'><target dev='vnet8'/></interface></devices></domain>")
    assert taps(live) == ["vnet7"]
