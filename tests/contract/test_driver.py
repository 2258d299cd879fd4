"""hypervisor.Driver contract: the same behaviour from FakeDriver and LibvirtDriver."""
from __future__ import annotations

import base64
import os
import subprocess
import time
import uuid

import pytest

from agent.errors import Conflict, InvalidInput, NotFound, Unprocessable
from hypervisor.driver import (STATES, DiskSpec, Driver, ReportsVirtType, SupportsBulkStats, SupportsConsole,
                               SupportsDiskResize, SupportsIncomingDisks, SupportsMigration, SupportsResize, VmInfo,
                               VmSpec)

DRIVERS = ["fake", "libvirt"]
CONSOLE_TIMEOUT_S = 60  # TCG boot takes ~3 s; generous for a loaded CI host


@pytest.fixture(params=DRIVERS)
def driver(request):
    if request.param == "fake":
        from hypervisor.fake import FakeDriver
        d = FakeDriver()
    else:
        uri = request.getfixturevalue("libvirtd")
        root = request.getfixturevalue("vm_root")
        from hypervisor.libvirt_driver import LibvirtDriver
        d = LibvirtDriver(uri=uri, virt_type="qemu", state_dir=f"{root}/state")
    mine = set()
    d._contract_mine = mine
    yield d
    for name in mine:
        d.delete(name)


def wait_console(driver, name, text, timeout=CONSOLE_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = driver.console_log(name)
        if text in log:
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not on {name}'s console after {timeout}s:\n{log[-2000:]}")
        time.sleep(0.1)


def make_disk(path, size="64M") -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return str(path)


@pytest.fixture
def spec(driver, vm_dir, guest_images):
    """A VmSpec of the test guest (direct kernel boot, a fresh qcow2 disk); every name it
    hands out is deleted after the test."""
    def make(name=None, **over) -> VmSpec:
        name = name or f"ct-{uuid.uuid4().hex[:8]}"
        driver._contract_mine.add(name)
        fields = dict(name=name, uuid=str(uuid.uuid4()), cpus=1, memory_mib=128,
                      disks=(DiskSpec(target="vda", source=make_disk(f"{vm_dir}/{name}.qcow2")),),
                      console_log=f"{vm_dir}/{name}.log", kernel=guest_images["vmlinuz"],
                      initrd=guest_images["initrd"], cmdline=guest_images["cmdline"])
        fields.update(over)
        return VmSpec(**fields)
    return make


def test_implements_protocol(driver):
    assert isinstance(driver, Driver)


def test_a_stopped_vm_resizes_within_its_maximum_only(driver, spec):
    assert isinstance(driver, SupportsResize)
    s = spec(cpus=1, memory_mib=128, max_cpus=2, max_memory_mib=192)
    driver.define(s)
    info = driver.resize(s.name, cpus=2, memory_mib=160)
    assert (info.state, info.cpus, info.memory_mib, info.max_cpus, info.max_memory_mib) == ("stopped", 2, 160, 2, 192)
    with pytest.raises(Unprocessable, match="at most 2 vCPUs"):
        driver.resize(s.name, cpus=3)
    with pytest.raises(Unprocessable, match="at most 192 MiB"):
        driver.resize(s.name, cpus=1, memory_mib=256)
    with pytest.raises(InvalidInput):
        driver.resize(s.name, memory_mib=8)
    assert driver.get(s.name) == info, "a refused resize changes nothing"
    running = driver.start(s.name)  # running: vCPUs are only plugged, never unplugged
    with pytest.raises(Conflict, match="only added"):
        driver.resize(s.name, cpus=1, memory_mib=128)
    assert driver.get(s.name) == running and running.cpus == 2
    driver.stop(s.name, force=True)
    with pytest.raises(NotFound):
        driver.resize("ct-nosuch", cpus=1)
    with pytest.raises(InvalidInput, match="max_cpus"):
        driver.define(spec(cpus=2, max_cpus=1))


def test_define_get_find_list(driver, spec):
    s = spec()
    info = driver.define(s)
    assert info == VmInfo(name=s.name, uuid=s.uuid, state="stopped", cpus=1, memory_mib=128,
                          max_cpus=1, max_memory_mib=128)
    assert driver.get(s.name) == info
    assert driver.find(s.name) == info
    assert s.name in [i.name for i in driver.list()]


def test_unknown_vm(driver):
    assert driver.find("ct-nope") is None
    for call in (driver.get, driver.start, driver.pause, driver.stats, driver.console_log):
        with pytest.raises(NotFound, match="ct-nope"):
            call("ct-nope")
    assert driver.delete("ct-nope") is False


def test_name_clash_keeps_the_first(driver, spec):
    s = spec()
    first = driver.define(s)
    with pytest.raises(Conflict, match="already exists"):
        driver.define(spec(name=s.name))
    assert driver.get(s.name) == first


@pytest.mark.parametrize("over, error", [
    (dict(memory_mib=10**9), Unprocessable),
    (dict(cpus=0), InvalidInput),
    (dict(name="bad name!"), InvalidInput),
    (dict(uuid="not-a-uuid"), InvalidInput),
])
def test_bad_spec_defines_nothing(driver, spec, over, error):
    before = driver.list()
    with pytest.raises(error):
        driver.define(spec(**over))
    assert driver.list() == before


def test_missing_disk_file_defines_nothing(driver, spec, vm_dir):
    s = spec(disks=(DiskSpec(target="vda", source=f"{vm_dir}/missing.qcow2"),))
    with pytest.raises(NotFound, match="does not exist"):
        driver.define(s)
    assert driver.find(s.name) is None


def test_disk_qemu_cannot_open_defines_nothing(driver, spec, vm_dir):
    junk = f"{vm_dir}/junk.qcow2"
    with open(junk, "wb") as f:
        f.write(b"this is not a qcow2 image" * 100)
    s = spec(disks=(DiskSpec(target="vda", source=junk),))
    with pytest.raises(Unprocessable, match="not a qcow2 image"):
        driver.define(s)
    assert driver.find(s.name) is None


def test_lifecycle(driver, spec):
    s = spec()
    driver.define(s)
    with pytest.raises(Conflict):
        driver.pause(s.name)
    with pytest.raises(Conflict):
        driver.reboot(s.name)
    assert driver.start(s.name).state == "running"
    assert driver.start(s.name).state == "running"  # already there: no-op
    assert driver.pause(s.name).state == "paused"
    with pytest.raises(Conflict, match="resume"):
        driver.start(s.name)
    assert driver.resume(s.name).state == "running"
    assert driver.reboot(s.name).state == "running"
    assert driver.stop(s.name, force=True).state == "stopped"
    assert driver.stop(s.name, force=True).state == "stopped"
    assert driver.get(s.name).state in STATES
    assert driver.delete(s.name) is True
    assert driver.delete(s.name) is False
    with pytest.raises(NotFound):
        driver.get(s.name)


def test_delete_running(driver, spec):
    s = spec()
    driver.define(s)
    driver.start(s.name)
    assert driver.delete(s.name) is True
    assert driver.find(s.name) is None


def test_stats(driver, spec):
    s = spec()
    driver.define(s)
    driver.start(s.name)
    st = driver.stats(s.name)
    assert isinstance(st["cpu_time_ns"], int) and st["cpu_time_ns"] >= 0
    assert st["memory_bytes"] > 0
    assert set(st["disk"]) >= {"rd_bytes", "wr_bytes"}
    assert set(st["net"]) >= {"rx_bytes", "tx_bytes", "rx_packets", "tx_packets"}


def test_console_log(driver, spec):
    s = spec()
    driver.define(s)
    assert isinstance(driver.console_log(s.name), str)
    driver.start(s.name)
    log = wait_console(driver, s.name, "NODEAGENT-GUEST-BOOTED")
    assert log.startswith(driver.console_log(s.name)[:len(log)])  # a log only grows
    assert len(driver.console_log(s.name, tail=2).splitlines()) <= 2
    assert driver.console_log(s.name, tail=0) == ""


def test_attach_detach(driver, spec, vm_dir):
    s = spec()
    driver.define(s)
    driver.start(s.name)
    wait_console(driver, s.name, "NODEAGENT-READY")
    data = DiskSpec(target="vdb", source=make_disk(f"{vm_dir}/data.qcow2"))
    driver.attach_disk(s.name, data)
    assert [d.target for d in driver.disks(s.name)] == ["vda", "vdb"]
    with pytest.raises(Conflict, match="vdb"):
        driver.attach_disk(s.name, data)
    driver.resize_disk(s.name, "vdb", 96 * 1024 * 1024)  # SupportsDiskResize: online, the guest is told
    with pytest.raises(NotFound, match="vdc"):
        driver.resize_disk(s.name, "vdc", 96 * 1024 * 1024)
    driver.detach_disk(s.name, "vdb")
    assert [d.target for d in driver.disks(s.name)] == ["vda"]
    with pytest.raises(NotFound, match="vdb"):
        driver.detach_disk(s.name, "vdb")


def test_snapshot_only_when_stopped(driver, spec):
    s = spec()
    driver.define(s)
    driver.start(s.name)
    with pytest.raises(Conflict, match="stop it"):
        driver.snapshot(s.name, "s1")
    driver.stop(s.name, force=True)
    driver.snapshot(s.name, "s1")
    assert driver.list_snapshots(s.name) == ["s1"]
    with pytest.raises(Conflict, match="s1"):
        driver.snapshot(s.name, "s1")


# -- optional capabilities (hypervisor.driver) --

CAPABILITIES = {"fake": {SupportsMigration, SupportsConsole, SupportsDiskResize, SupportsBulkStats},
                "libvirt": {SupportsMigration, SupportsIncomingDisks, ReportsVirtType, SupportsConsole,
                            SupportsDiskResize, SupportsBulkStats}}


def _claiming(capability) -> list[str]:
    """The drivers that claim ``capability``: its contract runs on each of them."""
    return sorted(kind for kind, caps in CAPABILITIES.items() if capability in caps)


def test_claims_its_optional_capabilities(driver):
    claimed = {p for p in (SupportsMigration, SupportsIncomingDisks, ReportsVirtType, SupportsConsole,
                           SupportsDiskResize, SupportsBulkStats)
               if isinstance(driver, p)}
    kind = "fake" if type(driver).__name__ == "FakeDriver" else "libvirt"
    assert claimed == CAPABILITIES[kind]


@pytest.mark.parametrize("driver", _claiming(SupportsConsole), indirect=True)
def test_console_reads_and_writes_the_serial_line(driver, spec):
    import os
    import select
    s = spec()
    driver.define(s)
    with pytest.raises(Conflict):
        driver.open_console(s.name)  # not running
    with pytest.raises(NotFound):
        driver.open_console("no-such-vm")
    driver.start(s.name)
    wait_console(driver, s.name, "NODEAGENT-READY")
    fd = driver.open_console(s.name)
    try:
        word, seen = f"echo-{uuid.uuid4().hex[:8]}".encode(), b""
        os.write(fd, word + b"\r")  # the guest's tty echoes it (the fake's pty does the same)
        deadline = time.monotonic() + CONSOLE_TIMEOUT_S
        while word not in seen:
            assert time.monotonic() < deadline, f"no echo of {word!r}: {seen[-500:]!r}"
            if select.select([fd], [], [], 0.5)[0]:
                seen += os.read(fd, 4096)
        driver.stop(s.name, force=True)
        deadline = time.monotonic() + CONSOLE_TIMEOUT_S
        while True:  # the line hangs up when the VM stops
            assert time.monotonic() < deadline, "the console did not end with the VM"
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    if not os.read(fd, 4096):
                        break
                except OSError:  # EIO
                    break
    finally:
        os.close(fd)


@pytest.mark.parametrize("driver", _claiming(SupportsBulkStats), indirect=True)
def test_bulk_stats_are_every_vms_stats_in_one_call(driver, spec):
    """bulk_stats() gives each of the driver's VMs what stats() gives (same keys, same units,
    counters between a stats() before and one after), stopped ones included, and nothing of
    a domain that is not the driver's."""
    up, down = spec(), spec()
    for s in (up, down):
        driver.define(s)
    driver.start(up.name)
    wait_console(driver, up.name, "NODEAGENT-GUEST-BOOTED")
    foreign = None
    if type(driver).__name__ == "LibvirtDriver":  # a domain of someone else's on the same libvirtd
        foreign = driver.conn().defineXML(
            f"<domain type='qemu'><name>{up.name}-foreign</name><memory unit='MiB'>32</memory>"
            "<os><type arch='x86_64'>hvm</type></os><features><acpi/></features></domain>")
    try:
        before = driver.stats(up.name)
        bulk = driver.bulk_stats()
        after = driver.stats(up.name)
    finally:
        if foreign is not None:
            foreign.undefine()
    assert {up.name, down.name} <= set(bulk) and f"{up.name}-foreign" not in bulk
    assert bulk[down.name] == driver.stats(down.name)  # stopped: zeros, as stats() says
    got = bulk[up.name]
    assert set(got) == set(before) and got["state"] == "running"
    assert before["cpu_time_ns"] <= got["cpu_time_ns"] <= after["cpu_time_ns"]
    assert got["memory_bytes"] > 0 and isinstance(got["memory_bytes"], int)
    for section in ("disk", "net"):
        assert set(got[section]) == set(before[section])
        for key, value in got[section].items():
            assert before[section][key] <= value <= after[section][key], (section, key)
    assert set(driver.bulk_stats()) == set(bulk)  # asked again: the same VMs (the ownership kept)


@pytest.mark.parametrize("driver", _claiming(ReportsVirtType), indirect=True)
def test_reports_virt_type(driver):
    assert isinstance(driver, ReportsVirtType)
    assert driver.virt_type in ("kvm", "qemu")


@pytest.mark.parametrize("driver", _claiming(SupportsIncomingDisks), indirect=True)
def test_incoming_disks_get_a_secret_that_goes_when_unused(driver, vm_dir):
    assert isinstance(driver, SupportsIncomingDisks)
    from hypervisor import secrets
    key = base64.b64encode(uuid.uuid4().bytes).decode()
    file_disk = DiskSpec(target="vda", source=f"{vm_dir}/incoming.qcow2")
    rbd_disk = DiskSpec(target="vdb", source="rbdpool/incoming", type="rbd", format="raw",
                        attach={"monitors": ["127.0.0.1:6789"], "user": "contract", "key": key})
    file_out, rbd_out = driver.prepare_incoming_disks((file_disk, rbd_disk))
    assert file_out == file_disk
    assert "key" not in rbd_out.attach and rbd_out.attach["user"] == "contract" and rbd_out.attach["config"]
    sid = rbd_out.attach["secret_uuid"]
    assert sid in secrets.list_ceph_secrets(driver.conn())
    driver.delete_unused_secrets()  # no domain refers to it
    assert sid not in secrets.list_ceph_secrets(driver.conn())


def test_bandwidth_is_kept_checked_and_defined_with_the_vm(driver, spec):
    from containers.bandwidth import Bandwidth
    from hypervisor.driver import SupportsBandwidth
    assert isinstance(driver, SupportsBandwidth)
    with pytest.raises(InvalidInput, match="ingress_kbit"):
        driver.define(spec(bandwidth=Bandwidth(ingress_kbit=1)))
    s = spec(bandwidth=Bandwidth(8000, 4000))
    driver.define(s)
    assert driver.bandwidth(s.name) == Bandwidth(8000, 4000)
    driver.set_bandwidth(s.name, Bandwidth(egress_kbit=640, burst_kbit=256))  # stopped: kept
    assert driver.bandwidth(s.name) == Bandwidth(None, 640, 256)
    with pytest.raises(InvalidInput):
        driver.set_bandwidth(s.name, Bandwidth(egress_kbit=-1))
    with pytest.raises(NotFound):
        driver.set_bandwidth("ct-nope", Bandwidth(1000))
    driver.set_bandwidth(s.name, Bandwidth())
    assert driver.bandwidth(s.name) == Bandwidth()


def test_nic_taps_name_each_running_nic(driver, spec):
    """ReportsNicTaps: a NIC's tap is its ``target``, or the hypervisor's own name (libvirt's
    vnetN) where the definition has none (VMs defined before the tenant filter existed)."""
    from hypervisor.driver import NicSpec, ReportsNicTaps
    from testbed import runtimes
    assert isinstance(driver, ReportsNicTaps)
    bridge, _ = runtimes.test_network("nactap")
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    try:
        tap = "ntc" + uuid.uuid4().hex[:8]
        s = spec(nics=(NicSpec(bridge=bridge, mac="52:54:00:aa:00:01", target=tap),
                       NicSpec(bridge=bridge, mac="52:54:00:aa:00:02")))
        driver.define(s)
        assert driver.nic_taps(s.name) == {}  # defined, not running: no taps
        driver.start(s.name)
        got = driver.nic_taps(s.name)
        assert got["52:54:00:aa:00:01"] == tap and set(got) == {"52:54:00:aa:00:01", "52:54:00:aa:00:02"}
        assert got["52:54:00:aa:00:02"].startswith("vnet")
        driver.stop(s.name, force=True)
        assert driver.nic_taps(s.name) == {}
        with pytest.raises(NotFound):
            driver.nic_taps("ct-nope")
    finally:
        for name in list(driver._contract_mine):  # the VM goes before its bridge
            driver.delete(name)
        runtimes.drop_test_network(bridge)


def test_snapshots_of_a_running_and_a_stopped_vm(driver, spec):
    """hypervisor.driver.SupportsSnapshots (both drivers): taken and deleted while it runs,
    reverted only while stopped; names checked; a missing one is NotFound, a second one
    of a name Conflict. Each says what it holds: this guest runs no guest agent, so one taken
    while it runs is crash-consistent (SupportsFilesystemFreeze: nothing frozen, nothing waited
    for), one taken while stopped exact."""
    from hypervisor.driver import SupportsFilesystemFreeze, SupportsSnapshots
    assert isinstance(driver, SupportsSnapshots) and isinstance(driver, SupportsFilesystemFreeze)
    s = spec()
    driver.define(s)
    with driver.frozen(s.name) as fs:
        assert fs is False, "a stopped VM is not asked"
    driver.start(s.name)
    with driver.frozen(s.name) as fs:
        assert fs is False, "no agent holds the port open"
    assert driver.thaw(s.name) is False, "no agent to ask"
    with pytest.raises(NotFound):
        driver.frozen("ct-nope").__enter__()
    assert driver.create_snapshot(s.name, "live") == "crash-consistent"
    assert driver.list_snapshots(s.name) == ["live"]
    assert driver.get(s.name).state == "running"
    with pytest.raises(Conflict, match="live"):
        driver.create_snapshot(s.name, "live")
    for bad in ("", "a,b", "-x", "a/b", "a.b"):
        with pytest.raises(InvalidInput):
            driver.create_snapshot(s.name, bad)
    with pytest.raises(Conflict, match="stop it"):
        driver.revert_snapshot(s.name, "live")
    assert driver.delete_snapshot(s.name, "live") is True
    assert driver.delete_snapshot(s.name, "live") is False
    driver.create_snapshot(s.name, "s2")
    driver.stop(s.name, force=True)
    with pytest.raises(NotFound):
        driver.revert_snapshot(s.name, "nope")
    driver.revert_snapshot(s.name, "s2")
    assert driver.create_snapshot(s.name, "s3") == "stopped"  # qemu-img
    assert driver.list_snapshots(s.name) == ["s2", "s3"]
    assert driver.delete_snapshot(s.name, "s3") is True
    assert driver.list_snapshots(s.name) == ["s2"]


def test_exports_a_disk_of_a_running_and_a_stopped_vm(driver, spec, vm_dir):
    """hypervisor.driver.SupportsDiskExport (both drivers): a running VM's disk is copied without
    stopping it and without leaving the snapshot it read; a stopped VM's directly; the copy
    holds what the disk held; an unknown disk is NotFound and leaves no file."""
    from hypervisor.driver import SupportsDiskExport
    assert isinstance(driver, SupportsDiskExport)
    s = spec()
    disk = s.disks[0].source
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 1M 64k", disk], check=True, capture_output=True)
    driver.define(s)
    driver.start(s.name)
    for state in ("running", "stopped"):
        out = f"{vm_dir}/{s.name}-{state}.qcow2"
        held = []
        driver.export_disk(s.name, "vda", out, snapshot="backup-ct",
                           held=lambda: held.append((driver.get(s.name).state, os.path.exists(out))))
        assert held == [(state, False)], "held() runs once, before the copy is written"
        assert driver.get(s.name).state == state
        assert "backup-ct" not in driver.list_snapshots(s.name)
        r = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x77 1M 64k", out],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout
        driver.stop(s.name, force=True)
    with pytest.raises(NotFound):
        driver.export_disk(s.name, "vdq", f"{vm_dir}/none.qcow2", snapshot="backup-ct")
    assert not os.path.exists(f"{vm_dir}/none.qcow2")
