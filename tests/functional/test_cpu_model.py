"""The CPU-model check of live migrations through the local libvirtd's CPU map (no KVM needed:
compareCPU and baselineCPU only read libvirt's CPU definitions and the host's capabilities):
captured guest/host CPU pairs, compatible and not; this host's own CPU against itself; hostile
XML refused. And the domain XML: host-model under KVM, QEMU's default under TCG."""
from __future__ import annotations

import pytest

from agent.errors import InvalidInput

# a KVM guest started with <cpu mode='host-model'/> on an EPYC-Milan host (its live migratable XML)
MILAN_GUEST = """<cpu mode='custom' match='exact' check='full'>
  <model fallback='forbid'>EPYC-Milan</model>
  <vendor>AMD</vendor>
  <feature policy='require' name='x2apic'/>
  <feature policy='require' name='tsc-deadline'/>
  <feature policy='require' name='hypervisor'/>
  <feature policy='require' name='tsc_adjust'/>
  <feature policy='require' name='stibp'/>
  <feature policy='disable' name='svm'/>
</cpu>"""
# host CPUs as libvirt's capabilities report them
MILAN_HOST = """<cpu><arch>x86_64</arch><model>EPYC-Milan</model><vendor>AMD</vendor>
  <feature name='x2apic'/><feature name='tsc-deadline'/><feature name='hypervisor'/>
  <feature name='tsc_adjust'/><feature name='stibp'/><feature name='svm'/></cpu>"""
ROME_HOST = """<cpu><arch>x86_64</arch><model>EPYC-Rome</model><vendor>AMD</vendor>
  <feature name='x2apic'/><feature name='tsc-deadline'/><feature name='hypervisor'/>
  <feature name='tsc_adjust'/><feature name='stibp'/></cpu>"""
SKYLAKE_HOST = """<cpu><arch>x86_64</arch><model>Skylake-Server</model><vendor>Intel</vendor>
  <feature name='x2apic'/><feature name='hypervisor'/></cpu>"""
SKYLAKE_GUEST = """<cpu mode='custom' match='exact' check='full'>
  <model fallback='forbid'>Skylake-Server</model><vendor>Intel</vendor>
  <feature policy='require' name='hypervisor'/></cpu>"""
HASWELL_HOST = """<cpu><arch>x86_64</arch><model>Haswell</model><vendor>Intel</vendor>
  <feature name='hypervisor'/></cpu>"""
HASWELL_GUEST = """<cpu mode='custom' match='exact'><model fallback='forbid'>Haswell</model><vendor>Intel</vendor>
  <feature policy='require' name='hypervisor'/></cpu>"""


@pytest.fixture(scope="module")
def conn(libvirtd):
    import libvirt
    c = libvirt.open(libvirtd)
    yield c
    c.close()


@pytest.mark.parametrize("guest, host, says", [
    (MILAN_GUEST, MILAN_HOST, None),
    (HASWELL_GUEST, SKYLAKE_HOST, None),  # an older model runs on a newer host
    (MILAN_GUEST, ROME_HOST, "lacks"),  # Rome lacks Milan's additions (pku, erms, invpcid, ...)
    (SKYLAKE_GUEST, HASWELL_HOST, "avx512f"),
    (MILAN_GUEST, SKYLAKE_HOST, "AMD"),
])
def test_captured_pairs_through_libvirts_cpu_map(conn, guest, host, says):
    from hypervisor.libvirt_driver import cpu_missing
    why = cpu_missing(conn, guest, host)
    assert (why is None) if says is None else (why and says in why), why


def test_this_hosts_own_cpu_and_one_it_lacks_through_compare_cpu(conn):
    import xml.etree.ElementTree as ET

    from hypervisor.libvirt_driver import cpu_unsupported, host_cpu
    mine = host_cpu(conn)
    assert mine and "<model>" in mine
    assert cpu_unsupported(conn, mine) is None
    have = {f.get("name") for f in ET.fromstring(mine).iter("feature")}
    absent = next(f for f in ("avx512f", "amx-tile", "avx512-fp16", "sgx") if f not in have)
    model = ET.fromstring(mine).findtext("model")
    guest = (f"<cpu mode='custom' match='exact'><model fallback='forbid'>{model}</model>"
             f"<feature policy='require' name='{absent}'/></cpu>")
    why = cpu_unsupported(conn, guest)
    assert why and absent in why, why
    assert cpu_missing_is_consistent(conn, guest, mine, absent)


def cpu_missing_is_consistent(conn, guest, host, absent) -> bool:
    from hypervisor.libvirt_driver import cpu_missing
    why = cpu_missing(conn, guest, host)
    return bool(why) and absent in why


@pytest.mark.parametrize("xml", [
    "<?xml version='1.0'?><!DOCTYPE cpu [<!ENTITY a 'x'>]><cpu><model>&a;</model></cpu>",
    "<domain/>", "not xml", "<cpu><model>NoSuchModel</model></cpu>",
])
def test_hostile_or_broken_cpu_xml_is_refused(conn, xml):
    from hypervisor.libvirt_driver import cpu_missing, cpu_unsupported
    with pytest.raises(InvalidInput):
        cpu_missing(conn, xml, MILAN_HOST)
    with pytest.raises(InvalidInput):
        cpu_unsupported(conn, xml)


def test_kvm_domains_get_host_model_and_tcg_ones_qemus_default():
    from hypervisor.domain_xml import domain_xml
    from hypervisor.driver import DiskSpec, VmSpec
    spec = VmSpec(name="cpu-t", uuid="0" * 8 + "-0000-4000-8000-" + "0" * 12, cpus=1, memory_mib=64,
                  disks=(DiskSpec(target="vda", source="/tmp/x.qcow2"),))
    assert "<cpu mode=\"host-model\" check=\"partial\"" in domain_xml(spec, virt_type="kvm")
    assert "<cpu" not in domain_xml(spec, virt_type="qemu")


def test_a_named_model_is_exact_on_kvm_and_tcg_alike():
    """[hypervisor] cpu_model = a host group's baseline: the same <cpu> whatever the accelerator."""
    from hypervisor.domain_xml import domain_xml
    from hypervisor.driver import DiskSpec, VmSpec
    spec = VmSpec(name="cpu-t", uuid="0" * 8 + "-0000-4000-8000-" + "0" * 12, cpus=1, memory_mib=64,
                  disks=(DiskSpec(target="vda", source="/tmp/x.qcow2"),))
    for virt in ("kvm", "qemu"):
        xml = domain_xml(spec, virt_type=virt, cpu_model="Haswell-noTSX")
        assert '<cpu mode="custom" match="exact" check="partial">' in xml
        assert '<model fallback="forbid">Haswell-noTSX</model>' in xml and "host-model" not in xml


def test_a_tcg_guest_runs_its_groups_named_model_and_the_check_knows_qemus_models(libvirtd, guest_images,
                                                                                   tmp_path):
    """Under TCG (these machines) a driver configured with cpu_model = "qemu64" starts its
    guest with that model, reports it for a migration's check, and a destination's check
    refuses a model this QEMU cannot emulate."""
    import os
    import uuid

    from hypervisor.driver import VmSpec
    from hypervisor.libvirt_driver import LibvirtDriver
    d = LibvirtDriver(uri=libvirtd, virt_type="qemu", state_dir=str(tmp_path / "state"), cpu_model="qemu64")
    name = f"cpu-{uuid.uuid4().hex[:6]}"
    os.chmod(tmp_path, 0o755)
    spec = VmSpec(name=name, uuid=str(uuid.uuid4()), cpus=1, memory_mib=64, kernel=guest_images["vmlinuz"],
                  initrd=guest_images["initrd"], cmdline=guest_images["cmdline"],
                  console_log=str(tmp_path / "console.log"))
    try:
        d.define(spec)
        d.start(name)
        cpu = d.guest_cpu(name)
        assert cpu and ">qemu64</model>" in cpu, cpu
        assert d.cpu_unsupported(cpu) is None
        why = d.cpu_unsupported("<cpu mode='custom' match='exact'><model>NoSuchModel</model></cpu>")
        assert why and "'NoSuchModel'" in why, why
    finally:
        d.delete(name)
        d.close()
