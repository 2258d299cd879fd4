"""Create a VM from an image in a pool: clone the root disk, write the NoCloud seed,
define the domain — and on any failure remove every piece already made.

This is the composition the agent's instance service (and bench/vms.py) uses; the
driver itself never creates or deletes volumes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from hypervisor.disks import disk_for_volume
from hypervisor.driver import DiskSpec, Driver, NicSpec, VmSpec
from hypervisor.seed import make_seed
from hypervisor.validate import check_name
from storage.backend import Backend

ROOT_TARGET = "vda"
SEED_TARGET = "vdz"  # read-only virtio disk labelled "cidata" (cloud kernels lack AHCI for a cdrom)


@dataclass(frozen=True)
class VmRequest:
    name: str
    uuid: str
    cpus: int
    memory_mib: int
    image_digest: str  # "sha256:<hex>" of a disk image blob in the pool
    image_format: str = "qcow2"
    disk_size: int | None = None  # bytes; grow the root disk to this
    nics: tuple[NicSpec, ...] = ()
    hostname: str | None = None
    user_data: str | None = None
    network_config: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    machine: str = "q35"


def seed_disk(path: str) -> DiskSpec:
    """The NoCloud seed as the guest sees it: a read-only virtio disk at SEED_TARGET."""
    return DiskSpec(target=SEED_TARGET, source=path, format="raw", readonly=True)


def root_volume_name(name: str) -> str:
    return f"{name}-root"


def seed_path(seed_dir: str, name: str) -> str:
    return os.path.join(seed_dir, f"{name}-seed.iso")


def create_vm(driver: Driver, backend: Backend, req: VmRequest, *, seed_dir: str,
              console_log: str | None = None) -> VmSpec:
    """Clone + seed + define (not started). On failure nothing is left: no domain, no
    root volume, no seed."""
    check_name(req.name)
    if driver.find(req.name) is not None:  # before making anything
        from agent.errors import Conflict
        raise Conflict(f"VM {req.name!r} already exists: pick another name or delete it", vm=req.name)
    made_volume = made_seed = False
    seed = seed_path(seed_dir, req.name)
    try:
        vol = backend.clone_volume(req.image_digest, root_volume_name(req.name),
                                   format=req.image_format, size=req.disk_size)
        made_volume = True
        make_seed(seed, instance_id=req.uuid, hostname=req.hostname or req.name,
                  user_data=req.user_data, network_config=req.network_config)
        made_seed = True
        spec = VmSpec(name=req.name, uuid=req.uuid, cpus=req.cpus, memory_mib=req.memory_mib,
                      disks=(disk_for_volume(vol, ROOT_TARGET),
                             seed_disk(seed)),
                      nics=req.nics, console_log=console_log, kernel=req.kernel, initrd=req.initrd,
                      cmdline=req.cmdline, machine=req.machine)
        driver.define(spec)
        return spec
    except BaseException:
        if made_seed:
            _unlink(seed)
        if made_volume:
            backend.delete_volume(root_volume_name(req.name))
        raise


def delete_vm(driver: Driver, backend: Backend, name: str, *, seed_dir: str) -> bool:
    """Delete the domain, its root volume and its seed; False if none of them existed."""
    gone = driver.delete(name)
    gone |= backend.delete_volume(root_volume_name(name))
    gone |= _unlink(seed_path(seed_dir, name))
    return gone


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
