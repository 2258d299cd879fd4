"""hypervisor.Driver contract: the same behaviour from FakeDriver and LibvirtDriver."""
from __future__ import annotations

import subprocess
import uuid

import pytest

from agent.errors import Conflict, InvalidInput, NotFound, Unprocessable
from hypervisor.driver import STATES, DiskSpec, Driver, VmInfo, VmSpec

DRIVERS = ["fake"]


@pytest.fixture(params=DRIVERS)
def driver(request, tmp_path):
    if request.param == "fake":
        from hypervisor.fake import FakeDriver
        d = FakeDriver()
    yield d
    for info in d.list():
        if info.name.startswith("ct-"):
            d.delete(info.name)


def make_disk(path, size="64M") -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return str(path)


@pytest.fixture
def spec(tmp_path):
    def make(name=None, **over) -> VmSpec:
        name = name or f"ct-{uuid.uuid4().hex[:8]}"
        fields = dict(name=name, uuid=str(uuid.uuid4()), cpus=1, memory_mib=128,
                      disks=(DiskSpec(target="vda", source=make_disk(tmp_path / f"{name}.qcow2")),),
                      console_log=str(tmp_path / f"{name}.log"))
        fields.update(over)
        return VmSpec(**fields)
    return make


def test_implements_protocol(driver):
    assert isinstance(driver, Driver)


def test_define_get_find_list(driver, spec):
    s = spec()
    info = driver.define(s)
    assert info == VmInfo(name=s.name, uuid=s.uuid, state="stopped", cpus=1, memory_mib=128)
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


def test_missing_disk_file_defines_nothing(driver, spec, tmp_path):
    s = spec(disks=(DiskSpec(target="vda", source=str(tmp_path / "missing.qcow2")),))
    with pytest.raises(NotFound, match="does not exist"):
        driver.define(s)
    assert driver.find(s.name) is None


def test_disk_qemu_cannot_open_defines_nothing(driver, spec, tmp_path):
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"this is not a qcow2 image" * 100)
    s = spec(disks=(DiskSpec(target="vda", source=str(junk)),))
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
    assert set(st["net"]) >= {"rx_bytes", "tx_bytes"}


def test_console_log(driver, spec):
    s = spec()
    driver.define(s)
    assert isinstance(driver.console_log(s.name), str)
    driver.start(s.name)
    assert isinstance(driver.console_log(s.name, tail=5), str)
    assert driver.console_log(s.name, tail=0) == ""


def test_attach_detach(driver, spec, tmp_path):
    s = spec()
    driver.define(s)
    driver.start(s.name)
    data = DiskSpec(target="vdb", source=make_disk(tmp_path / "data.qcow2"))
    driver.attach_disk(s.name, data)
    assert [d.target for d in driver.disks(s.name)] == ["vda", "vdb"]
    with pytest.raises(Conflict, match="vdb"):
        driver.attach_disk(s.name, data)
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
