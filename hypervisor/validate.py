"""Checks every driver makes before it defines anything, so fake and libvirt refuse the
same input with the same error (InvalidInput for malformed specs, Unprocessable for
well-formed ones the host cannot honour, NotFound for a disk file that is not there).
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import uuid as uuidlib

from agent.errors import Conflict, InvalidInput, NotFound, Unprocessable
from hypervisor.driver import DiskSpec, VmSpec

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # fits libvirt, file names and hostnames
TARGET_RE = re.compile(r"^(vd|sd|hd)[a-z]{1,2}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # IFNAMSIZ - 1
NBD_RE = re.compile(r"^nbd://[^/:]+:\d{1,5}/[^/]+$")
RBD_RE = re.compile(r"^[^/@\s]+/[^/@\s]+$")
MAX_VCPUS = 255  # q35 without an IOMMU
MIN_MEMORY_MIB = 16
QCOW2_MAGIC = b"QFI\xfb"
DISK_TYPES = ("file", "rbd", "nbd")
DISK_FORMATS = ("qcow2", "raw")
DISK_DEVICES = ("disk", "cdrom")
CEPHX_KEY_BYTES = (16, 28)  # a cephx key decodes to its 16 secret bytes (28 with its header)
# a snapshot's name reaches qemu-img's argv, QMP and file names: no ',', '/', '.', leading '-'
SNAPSHOT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInput(f"bad VM name {name!r}: use 1-63 letters, digits, '.', '-', '_' "
                           "starting with a letter or digit")


def check_spec(spec: VmSpec, *, host_memory_mib: int) -> None:
    """Raise InvalidInput/Unprocessable for a spec no driver should define."""
    check_name(spec.name)
    spec.bandwidth.check()
    try:
        uuidlib.UUID(str(spec.uuid))
    except ValueError:
        raise InvalidInput(f"bad uuid {spec.uuid!r} for VM {spec.name!r}: give an RFC 4122 UUID") from None
    if not isinstance(spec.cpus, int) or not 1 <= spec.cpus <= MAX_VCPUS:
        raise InvalidInput(f"cpus must be 1..{MAX_VCPUS}, got {spec.cpus!r}")
    if not isinstance(spec.memory_mib, int) or spec.memory_mib < MIN_MEMORY_MIB:
        raise InvalidInput(f"memory_mib must be at least {MIN_MEMORY_MIB}, got {spec.memory_mib!r}")
    if spec.max_cpus is not None and (not isinstance(spec.max_cpus, int)
                                      or not spec.cpus <= spec.max_cpus <= MAX_VCPUS):
        raise InvalidInput(f"max_cpus must be {spec.cpus}..{MAX_VCPUS} (at least cpus), got {spec.max_cpus!r}")
    if spec.max_memory_mib is not None and (not isinstance(spec.max_memory_mib, int)
                                            or spec.max_memory_mib < spec.memory_mib):
        raise InvalidInput(f"max_memory_mib must be at least memory_mib ({spec.memory_mib}), "
                           f"got {spec.max_memory_mib!r}")
    if spec.memory_mib > host_memory_mib:
        raise Unprocessable(f"VM {spec.name!r} asks for {spec.memory_mib} MiB but this host has "
                            f"{host_memory_mib} MiB: ask for less memory", memory_mib=spec.memory_mib,
                            host_memory_mib=host_memory_mib)
    if spec.memory_max > host_memory_mib:
        raise Unprocessable(f"VM {spec.name!r} may grow to {spec.memory_max} MiB but this host has "
                            f"{host_memory_mib} MiB: ask for less (max_memory_mib)",
                            memory_mib=spec.memory_max, host_memory_mib=host_memory_mib)
    targets = [d.target for d in spec.disks]
    if len(set(targets)) != len(targets):
        raise InvalidInput(f"disk targets must be unique, got {targets}")
    for disk in spec.disks:
        check_disk(disk)
    for nic in spec.nics:
        if not MAC_RE.match(nic.mac or "") or int(nic.mac[:2], 16) & 1:
            raise InvalidInput(f"bad MAC {nic.mac!r}: give a unicast lower-case aa:bb:cc:dd:ee:ff")
        if not BRIDGE_RE.match(nic.bridge or ""):
            raise InvalidInput(f"bad bridge name {nic.bridge!r}")
        if nic.target is not None and (not BRIDGE_RE.match(nic.target) or nic.target.startswith("vnet")):
            raise InvalidInput(f"bad tap name {nic.target!r}: at most 15 letters, digits, '-' or '_', "
                               "not vnet* (libvirt's own)")
    for label, path in (("kernel", spec.kernel), ("initrd", spec.initrd)):
        if path is not None and not os.path.isfile(path):
            raise NotFound(f"{label} {path} does not exist: run scripts/build-test-images", path=path)
    if spec.initrd and not spec.kernel:
        raise InvalidInput("an initrd needs a kernel")
    if spec.console_log is not None and not os.path.isabs(spec.console_log):
        raise InvalidInput(f"console_log must be an absolute path, got {spec.console_log!r}")


def check_resize(name: str, *, cpus: int | None, memory_mib: int | None, max_cpus: int,
                 max_memory_mib: int, live_cpus: int | None = None) -> None:
    """A resize of VM ``name`` to ``cpus``/``memory_mib`` (None: unchanged) within its maximum:
    InvalidInput for a malformed value, Unprocessable (naming the maximum) past it. ``live_cpus``:
    the vCPUs of a running (or paused) VM, which can only grow: Conflict for fewer (an unplug
    needs the guest's consent, which QEMU may refuse or grant long after libvirt gave up)."""
    if cpus is not None:
        if not isinstance(cpus, int) or isinstance(cpus, bool) or cpus < 1:
            raise InvalidInput(f"cpus of a VM are whole vCPUs, at least 1, got {cpus!r}")
        if live_cpus is not None and cpus < live_cpus:
            raise Conflict(f"VM {name!r} runs with {live_cpus} vCPUs: a running VM's vCPUs are only added "
                           f"(hot-plug); stop it to go down to {cpus}", cpus=live_cpus)
        if cpus > max_cpus:
            raise Unprocessable(f"VM {name!r} can have at most {max_cpus} vCPUs (its max_cpus, set at "
                                f"create), asked for {cpus}", max_cpus=max_cpus)
    if memory_mib is not None:
        if not isinstance(memory_mib, int) or isinstance(memory_mib, bool) or memory_mib < MIN_MEMORY_MIB:
            raise InvalidInput(f"memory_mib of a VM must be at least {MIN_MEMORY_MIB}, got {memory_mib!r}")
        if memory_mib > max_memory_mib:
            raise Unprocessable(f"VM {name!r} can have at most {max_memory_mib} MiB (its max_memory_mib, "
                                f"set at create), asked for {memory_mib}", max_memory_mib=max_memory_mib)


def check_disk(disk: DiskSpec) -> None:
    """Shape checks of one disk (no I/O)."""
    if not TARGET_RE.match(disk.target or ""):
        raise InvalidInput(f"bad disk target {disk.target!r}: use vda, vdb, ... (sda for a cdrom)")
    if disk.type not in DISK_TYPES:
        raise InvalidInput(f"disk {disk.target}: type must be one of {DISK_TYPES}, got {disk.type!r}")
    if disk.format not in DISK_FORMATS:
        raise InvalidInput(f"disk {disk.target}: format must be one of {DISK_FORMATS}, got {disk.format!r}")
    if disk.device not in DISK_DEVICES:
        raise InvalidInput(f"disk {disk.target}: device must be one of {DISK_DEVICES}, got {disk.device!r}")
    if disk.type == "file" and not os.path.isabs(disk.source or ""):
        raise InvalidInput(f"disk {disk.target}: a file disk needs an absolute path, got {disk.source!r}")
    if disk.type == "rbd" and not RBD_RE.match(disk.source or ""):
        raise InvalidInput(f"disk {disk.target}: an rbd disk source is '<pool>/<image>', got {disk.source!r}")
    if disk.type == "rbd" and disk.attach.get("key") is not None:
        ceph_key_bytes(disk.attach["key"])
    if disk.type == "nbd" and not NBD_RE.match(disk.source or ""):
        raise InvalidInput(f"disk {disk.target}: an nbd disk source is 'nbd://host:port/export', "
                           f"got {disk.source!r}")


def ceph_key_bytes(key: str) -> bytes:
    """The decoded cephx key; InvalidInput if it is not one (libvirt would store any bytes
    and QEMU would only fail at start)."""
    try:
        raw = base64.b64decode(key if isinstance(key, str) else "", validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) not in CEPHX_KEY_BYTES:
        raise InvalidInput("the Ceph key is not a cephx key (the base64 text of a keyring's "
                           "'key = ...' line): check the pool's keyring")
    return raw


def check_disk_file(disk: DiskSpec) -> None:
    """For a file disk: it exists and its header matches the declared format (QEMU would
    otherwise fail at start, or worse, probe the format of a guest-written raw disk)."""
    check_disk(disk)
    if disk.type != "file":
        return
    try:
        with open(disk.source, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise NotFound(f"disk {disk.target}: {disk.source} does not exist: create the volume first",
                       path=disk.source) from None
    except IsADirectoryError:
        raise Unprocessable(f"disk {disk.target}: {disk.source} is a directory, not a disk image") from None
    if disk.format == "qcow2" and head != QCOW2_MAGIC:
        raise Unprocessable(f"disk {disk.target}: {disk.source} is not a qcow2 image, QEMU cannot open "
                            "it as qcow2: convert it with `qemu-img convert -O qcow2` or declare its "
                            "real format", path=disk.source)
    if disk.format == "raw" and head == QCOW2_MAGIC and not disk.readonly:
        raise Unprocessable(f"disk {disk.target}: {disk.source} is a qcow2 image declared raw: "
                            "declare format qcow2", path=disk.source)


def check_snapshot_name(snapshot: str) -> None:
    """InvalidInput unless ``snapshot`` matches SNAPSHOT_NAME_RE (VM disks and container rootfs alike)."""
    if not isinstance(snapshot, str) or not SNAPSHOT_NAME_RE.fullmatch(snapshot):
        raise InvalidInput(f"bad snapshot name {str(snapshot)[:80]!r}: 1-63 letters, digits, '-', '_', "
                           "starting with a letter or digit")
