"""hypervisor.SupportsMigration contract: FakeDriver (two in-process fakes) and LibvirtDriver
(two simulated hosts of testbed/harness.py, a real TCP libvirtd-to-libvirtd link)
move a running test guest with its local disk copied, keep it on the source when the
destination cannot take it, and honour cancel."""
from __future__ import annotations

import shutil
import subprocess
import time
import uuid

import pytest

from agent.errors import Cancelled, CommandFailed, Conflict, InvalidInput
from hypervisor.driver import DiskSpec, MigrationOptions, SupportsMigration, SupportsPostcopyResume, VmSpec

BOOT_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory):
    from testbed import harness
    for tool in ("libvirtd", "virtlogd", "nsenter", "unshare", "ip"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: run scripts/setup-host")
    c = harness.Cluster(tmp_path_factory.mktemp("sim"))
    with c:
        yield c
    assert harness.leftovers(c.tag) == []


@pytest.fixture(params=["fake", "libvirt"])
def pair(request):
    """(source driver, destination driver, destination uri)."""
    if request.param == "fake":
        from hypervisor.fake import FakeDriver
        tag = uuid.uuid4().hex[:6]
        src, dst = FakeDriver(uri=f"fake://{tag}-a"), FakeDriver(uri=f"fake://{tag}-b")
        yield src, dst, dst.uri
        return
    yield from _libvirt_pair(request)


@pytest.fixture
def libvirt_pair(request):
    yield from _libvirt_pair(request)


def _libvirt_pair(request):
    c = request.getfixturevalue("cluster")
    from hypervisor.libvirt_driver import LibvirtDriver
    h1, h2 = c.hosts
    root = request.getfixturevalue("vm_root")
    src = LibvirtDriver(uri=h1.libvirt_uri, virt_type="qemu", state_dir=f"{root}/h1")
    dst = LibvirtDriver(uri=h2.libvirt_uri, virt_type="qemu", state_dir=f"{root}/h2")
    yield src, dst, h2.libvirt_uri
    for d in (src, dst):
        for info in d.list():
            d.delete(info.name)
        d.close()


def make_disk(path, size="64M") -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return str(path)


def guest(vm_dir, guest_images) -> tuple[VmSpec, dict]:
    name = f"mig-{uuid.uuid4().hex[:8]}"
    spec = VmSpec(name=name, uuid=str(uuid.uuid4()), cpus=1, memory_mib=128,
                  disks=(DiskSpec(target="vda", source=make_disk(f"{vm_dir}/{name}-src.qcow2")),),
                  console_log=f"{vm_dir}/{name}-src.log", kernel=guest_images["vmlinuz"],
                  initrd=guest_images["initrd"], cmdline=guest_images["cmdline"], machine="pc")
    dest = {"vda": make_disk(f"{vm_dir}/{name}-dst.qcow2")}
    return spec, dest


def wait_booted(driver, name):
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while "NODEAGENT-READY" not in driver.console_log(name):
        assert time.monotonic() < deadline, driver.console_log(name)[-2000:]
        time.sleep(0.2)


def test_implements_protocol(pair):
    src, dst, _ = pair
    assert isinstance(src, SupportsMigration) and isinstance(dst, SupportsMigration)
    assert isinstance(src, SupportsPostcopyResume)


def test_a_vm_that_is_not_split_has_nothing_to_resume(pair, vm_dir, guest_images):
    """SupportsPostcopyResume: a running VM (no broken post-copy) is not split; its resume is a
    Conflict and changes nothing (the split case: tests/api/test_postcopy_resume.py with the
    fakes, tests/multihost/test_migration.py with a cut link between two libvirtds)."""
    src, dst, uri = pair
    spec, dest_disks = guest(vm_dir, guest_images)
    src.define(spec)
    src.start(spec.name)
    assert src.postcopy_split(spec.name) is False
    with pytest.raises(Conflict, match="nothing to resume"):
        src.resume_postcopy(spec.name, uri, MigrationOptions(copy_storage="full", disk_sources=dest_disks,
                                                             postcopy=True))
    assert src.get(spec.name).state == "running"
    assert dst.find(spec.name) is None


def test_live_migration_with_copied_disk(pair, vm_dir, guest_images):
    src, dst, uri = pair
    spec, dest_disks = guest(vm_dir, guest_images)
    src.define(spec)
    src.start(spec.name)
    wait_booted(src, spec.name)
    seen = []
    res = src.migrate(spec.name, uri, MigrationOptions(copy_storage="full", disk_sources=dest_disks,
                                                        console_log=f"{vm_dir}/{spec.name}-dst.log"),
                      progress=seen.append)
    assert src.find(spec.name) is None
    moved = dst.get(spec.name)
    assert moved.state == "running" and moved.uuid == spec.uuid
    assert [d.source for d in dst.disks(spec.name) if d.target == "vda"] == [dest_disks["vda"]]
    assert res.data_bytes > 0 and res.total_ms > 0
    t0 = dst.stats(spec.name)["cpu_time_ns"]
    deadline = time.monotonic() + 30
    while dst.stats(spec.name)["cpu_time_ns"] <= t0:  # the guest keeps running there
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_unreachable_destination_keeps_the_vm(pair, vm_dir, guest_images):
    src, _dst, uri = pair
    spec, dest_disks = guest(vm_dir, guest_images)
    src.define(spec)
    src.start(spec.name)
    # fake: an unknown host; libvirt: the destination's address, a port nothing listens on
    bad = uri.replace("fake://", "fake://gone-") if uri.startswith("fake") else \
        uri.replace("/system", ":9/system")
    with pytest.raises(CommandFailed, match="keeps running here"):
        src.migrate(spec.name, bad, MigrationOptions(copy_storage="full", disk_sources=dest_disks))
    assert src.get(spec.name).state == "running"


def test_missing_destination_disk_keeps_the_vm(pair, vm_dir, guest_images):
    src, dst, uri = pair
    spec, _ = guest(vm_dir, guest_images)
    src.define(spec)
    src.start(spec.name)
    with pytest.raises((CommandFailed, InvalidInput)):
        src.migrate(spec.name, uri, MigrationOptions(copy_storage="full",
                                                     disk_sources={"vda": f"{vm_dir}/nope.qcow2"}))
    assert src.get(spec.name).state == "running"
    assert dst.find(spec.name) is None


def _cancel_keeps_the_vm(src, dst, uri, vm_dir, guest_images):
    """A slow (1 MiB/s) migration cancelled from its first poll: Cancelled, the VM still runs
    on the source and nothing is on the destination."""
    spec, dest_disks = guest(vm_dir, guest_images)
    src.define(spec)
    src.start(spec.name)
    with pytest.raises(Cancelled):  # (the completion timeout only bounds a lost cancel)
        src.migrate(spec.name, uri, MigrationOptions(copy_storage="full", disk_sources=dest_disks,
                                                     bandwidth_mib_s=1, completion_timeout_s=120),
                    cancelled=lambda: True)
    assert src.get(spec.name).state == "running"
    assert dst.find(spec.name) is None


def test_cancel_keeps_the_vm(pair, vm_dir, guest_images):
    _cancel_keeps_the_vm(*pair, vm_dir, guest_images)


def test_lost_abort_is_repeated(libvirt_pair, vm_dir, guest_images, monkeypatch):
    """libvirt refuses an abort that lands before its migration job has begun (or loses it
    between phases): the cancel is repeated until the job ends. Here the first abort is dropped."""
    from hypervisor import libvirt_migration
    real, calls = libvirt_migration._abort, []

    def first_lost(dom):
        calls.append(dom)
        if len(calls) > 1:
            real(dom)
    monkeypatch.setattr(libvirt_migration, "_abort", first_lost)
    _cancel_keeps_the_vm(*libvirt_pair, vm_dir, guest_images)
    assert len(calls) > 1


def test_unanswered_abort_ends_the_job_from_the_destination(libvirt_pair, vm_dir, guest_images,
                                                           monkeypatch):
    """libvirtd can hold an abort while the job sits in a monitor call: when no abort is
    honoured within the grace, the destination's incoming domain is destroyed, which ends
    the job with the guest still running here. Here every abort is lost."""
    from hypervisor import libvirt_migration
    lost = []
    monkeypatch.setattr(libvirt_migration, "_abort", lost.append)
    monkeypatch.setattr(libvirt_migration, "ABORT_GRACE_S", 1)
    _cancel_keeps_the_vm(*libvirt_pair, vm_dir, guest_images)
    assert lost


def test_stopped_vm_is_not_live_migrated(pair, vm_dir, guest_images):
    src, _dst, uri = pair
    spec, dest_disks = guest(vm_dir, guest_images)
    src.define(spec)
    with pytest.raises(InvalidInput, match="not running"):
        src.migrate(spec.name, uri, MigrationOptions(disk_sources=dest_disks))
    assert src.get(spec.name).state == "stopped"


DIRTIER = """#!/bin/sh
dd if=/dev/urandom of=/src bs=1M count=64 2>/dev/null
i=0
while :; do cp /src /dst; i=$((i+1)); echo "DIRTY $i"; done
"""


def _dirty_count(log: str) -> int:
    import re
    counts = [int(n) for n in re.findall(r"DIRTY (\d+)", log)]
    return max(counts) if counts else 0


def test_busy_guest_switches_to_postcopy_and_keeps_running_there(libvirt_pair, vm_dir, guest_images):
    """A guest rewriting 64 MiB of its RAM in a loop (its user-data script), migrated with
    post-copy allowed and a 1 s completion timeout whose action is post-copy (the pre-copy is
    capped at 16 MiB/s, so it is still copying then): the job switches to post-copy, the
    progress says so, it completes, and the dirtier goes on on the destination."""
    from dataclasses import replace

    from hypervisor.seed import make_seed
    src, dst, uri = libvirt_pair
    spec, dest_disks = guest(vm_dir, guest_images)
    seed = make_seed(f"{vm_dir}/{spec.name}-seed.iso", instance_id=spec.uuid, hostname=spec.name,
                     user_data=DIRTIER)
    os_seed = DiskSpec(target="vdz", source=seed, format="raw", readonly=True)
    spec = replace(spec, memory_mib=256, disks=spec.disks + (os_seed,))
    src.define(spec)
    src.start(spec.name)
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while _dirty_count(src.console_log(spec.name)) < 2:  # the dirtier runs
        assert time.monotonic() < deadline, src.console_log(spec.name)[-2000:]
        time.sleep(0.5)
    before = _dirty_count(src.console_log(spec.name))
    seen = []
    res = src.migrate(spec.name, uri, MigrationOptions(
        copy_storage="full", disk_sources=dest_disks, console_log=f"{vm_dir}/{spec.name}-dst.log",
        completion_timeout_s=1, timeout_action="postcopy", postcopy=True, bandwidth_mib_s=16),
        progress=seen.append)
    assert res.postcopy, seen[-3:]
    phases = [p.phase for p in seen]
    # the post-copy phase may end before the watcher's next sample: the result says it ran
    order = ["precopy", "postcopy"]
    assert "precopy" in phases and phases == sorted(phases, key=order.index), phases
    assert src.find(spec.name) is None
    assert dst.get(spec.name).state == "running"
    deadline = time.monotonic() + 60
    while _dirty_count(dst.console_log(spec.name)) <= before:  # the dirtier goes on there
        assert time.monotonic() < deadline, dst.console_log(spec.name)[-2000:]
        time.sleep(0.5)
