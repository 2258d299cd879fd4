"""Snapshots of a libvirt VM's disks (hypervisor.driver.SupportsSnapshots for LibvirtDriver).

A snapshot is an *internal* qcow2 snapshot of every writable file disk (the read-only seed is
left out), named as asked: it lives inside the disk file, so removing the disk removes it, and
the disk's backing image (the instance's image) is the same for every snapshot.

- running or paused VM: one QMP ``transaction`` of ``blockdev-snapshot-internal-sync`` on each
  disk's format node, through the agent's own monitor (hypervisor/qmp.py). QEMU drains the
  disks' in-flight I/O and writes the snapshot's tables while the vCPUs keep running (no
  STOP/RESUME event): the guest is not paused, only its disk requests wait for the drain
  and the metadata write (tens of ms; bench/snapshots.py measures both). All disks or none:
  the transaction is atomic. A running guest whose agent holds its port open
  (hypervisor/guest_agent.py) is asked to freeze its filesystems just before the
  transaction and to thaw right after it: filesystem-consistent. Otherwise (no agent, or
  one that fails or does not answer in time) crash-consistent: the disks as a power cut
  would leave them. A paused guest is not asked (its agent cannot answer).
- stopped VM: ``qemu-img snapshot -c`` on each disk, undone on failure.
- revert: only while stopped (``qemu-img snapshot -a``): reverting a running guest's disk
  under its page cache would corrupt its filesystems.
- delete: ``blockdev-snapshot-delete-internal-sync`` while QEMU holds the disks, else
  ``qemu-img snapshot -d``.

RBD disks are refused (Unprocessable) here: the agent snapshots a VM on an RBD pool through
the pool itself (storage.backend.SnapshotsVolumes: RBD snapshots of its root volume).
"""
from __future__ import annotations

import os
import subprocess
from contextlib import nullcontext
from typing import TYPE_CHECKING

from agent.errors import CommandFailed, Conflict, NotFound, Unavailable, Unprocessable
from hypervisor import guest_agent, qmp
from hypervisor.driver import CRASH_CONSISTENT, FILESYSTEM_CONSISTENT, STOPPED
from hypervisor.validate import check_snapshot_name

if TYPE_CHECKING:
    from hypervisor.libvirt_driver import LibvirtDriver

QEMU_IMG_TIMEOUT_S = 120  # a revert of a large disk rewrites its refcounts
QMP_SNAPSHOT_TIMEOUT_S = 60  # the drain waits for the guest's in-flight I/O
EXPORT_TIMEOUT_S = 6 * 3600  # a copy of a large disk (backups) reads and writes all of it


def _qemu_img(*args: str) -> subprocess.CompletedProcess:
    argv = ["qemu-img", *args]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT_S)
    except FileNotFoundError:
        raise Unavailable("qemu-img is missing: apt-get install qemu-utils (or run scripts/setup-host)") from None


def _checked(*args: str) -> None:
    r = _qemu_img(*args)
    if r.returncode != 0:
        raise CommandFailed(f"qemu-img {args[0]} {args[1]} failed: {r.stderr.strip()}",
                            argv=["qemu-img", *args], returncode=r.returncode, stderr=r.stderr)


def _disks(drv: LibvirtDriver, name: str) -> list:
    """The writable disks a snapshot covers (qcow2 files); Unprocessable for any other."""
    out = []
    for d in drv.disks(name):
        if d.readonly or d.device == "cdrom":
            continue
        if d.type != "file" or d.format != "qcow2":
            raise Unprocessable(f"VM {name!r}: disk {d.target} is {d.type}/{d.format}; snapshots of a VM "
                                "cover qcow2 file disks only (local pools)", vm=name)
        out.append(d)
    return out


def _nodes(drv: LibvirtDriver, name: str, dom, targets: list[str], root=None) -> dict[str, str]:
    """target -> the QEMU block node (format layer) of each of ``targets`` in the running VM
    (``root``: its live XML, if the caller has it)."""
    alias = {}
    for el in (drv._xml(dom) if root is None else root).findall("devices/disk"):
        t, a = el.find("target"), el.find("alias")
        if t is not None and a is not None:
            alias[t.get("dev")] = a.get("name")
    found = {}
    for b in qmp.execute(drv.qmp_socket(name), "query-block"):
        node = (b.get("inserted") or {}).get("node-name")
        for t in targets:
            if node and alias.get(t) and f"/{alias[t]}/" in (b.get("qdev") or "") + "/":
                found[t] = node
    missing = [t for t in targets if t not in found]
    if missing:
        raise Unavailable(f"VM {name!r}: QEMU shows no block node for disk(s) {', '.join(missing)}", vm=name)
    return found


def _on_disk(path: str) -> set[str]:
    r = _qemu_img("snapshot", "-U", "-l", path)
    if r.returncode != 0:
        raise CommandFailed(f"qemu-img snapshot -l {path} failed: {r.stderr.strip()}",
                            argv=["qemu-img", "snapshot", "-l", path], returncode=r.returncode, stderr=r.stderr)
    names = set()
    for ln in r.stdout.splitlines()[2:]:  # "Snapshot list:" and the column header
        parts = ln.split()
        if len(parts) >= 2:
            names.add(parts[1])
    return names


def create(drv: LibvirtDriver, name: str, snapshot: str) -> str:
    """SupportsSnapshots.create_snapshot: returns STOPPED, CRASH_CONSISTENT or FILESYSTEM_CONSISTENT."""
    check_snapshot_name(snapshot)
    dom = drv._dom(name)
    disks = _disks(drv, name)
    if not disks:
        raise Unprocessable(f"VM {name!r} has no writable disk to snapshot", vm=name)
    for d in disks:
        if snapshot in _on_disk(d.source):
            raise Conflict(f"VM {name!r} already has a snapshot {snapshot!r} (disk {d.target})", vm=name)
    state = drv._state(dom)
    if state in ("running", "paused"):
        root = drv._xml(dom)
        nodes = _nodes(drv, name, dom, [d.target for d in disks], root)
        actions = [{"type": "blockdev-snapshot-internal-sync", "data": {"device": nodes[d.target], "name": snapshot}}
                   for d in disks]
        # frozen only for the transaction: everything it needs was looked up above
        quiesce = guest_agent.frozen(dom, root, name) if state == "running" else nullcontext(False)
        with quiesce as fs:
            qmp.execute(drv.qmp_socket(name), "transaction", {"actions": actions}, timeout=QMP_SNAPSHOT_TIMEOUT_S)
        return FILESYSTEM_CONSISTENT if fs else CRASH_CONSISTENT
    done = []
    try:
        for d in disks:
            _checked("snapshot", "-c", snapshot, d.source)
            done.append(d.source)
    except BaseException:
        for p in done:
            _qemu_img("snapshot", "-d", snapshot, p)
        raise
    return STOPPED


def revert(drv: LibvirtDriver, name: str, snapshot: str) -> None:
    check_snapshot_name(snapshot)
    dom = drv._dom(name)
    state = drv._state(dom)
    if state != "stopped":
        raise Conflict(f"VM {name!r} is {state}: stop it before restoring a snapshot", vm=name)
    disks = _disks(drv, name)
    for d in disks:
        if snapshot not in _on_disk(d.source):
            raise NotFound(f"VM {name!r}: disk {d.target} has no snapshot {snapshot!r}", vm=name)
    for d in disks:
        _checked("snapshot", "-a", snapshot, d.source)


def delete(drv: LibvirtDriver, name: str, snapshot: str) -> bool:
    check_snapshot_name(snapshot)
    dom = drv._dom(name)
    disks = [d for d in drv.disks(name) if not d.readonly and d.device != "cdrom" and d.type == "file"
             and d.format == "qcow2" and snapshot in _on_disk(d.source)]  # raw or RBD disks hold none
    if not disks:
        return False
    if drv._state(dom) in ("running", "paused"):
        nodes = _nodes(drv, name, dom, [d.target for d in disks])
        for d in disks:
            qmp.execute(drv.qmp_socket(name), "blockdev-snapshot-delete-internal-sync",
                        {"device": nodes[d.target], "name": snapshot}, timeout=QMP_SNAPSHOT_TIMEOUT_S)
        return True
    for d in disks:
        _checked("snapshot", "-d", snapshot, d.source)
    return True


def listed(drv: LibvirtDriver, name: str) -> list[str]:
    """Snapshots present on every writable disk."""
    disks = _disks(drv, name)
    if not disks:
        return []
    common = _on_disk(disks[0].source)
    for d in disks[1:]:
        common &= _on_disk(d.source)
    return sorted(common)



def export_disk(drv: LibvirtDriver, name: str, target: str, dest: str, *, snapshot: str,
                backing: str | None = None, backing_format: str | None = None, held=None) -> None:
    """hypervisor.driver.SupportsDiskExport: a running or paused VM's disk is read from an
    internal snapshot of that disk alone taken for the copy (crash-consistent, no pause; removed
    afterwards), a stopped VM's disk directly. ``qemu-img convert`` writes a fresh qcow2 (with
    ``backing``: only the clusters the VM wrote over its image). ``held()`` runs once the
    snapshot is taken, before the copy."""
    check_snapshot_name(snapshot)
    disk = next((d for d in drv.disks(name) if d.target == target and not d.readonly and d.device != "cdrom"),
                None)
    if disk is None:
        raise NotFound(f"VM {name!r} has no writable disk {target}", vm=name)
    if disk.type != "file" or disk.format != "qcow2":
        raise Unprocessable(f"VM {name!r}: disk {target} is {disk.type}/{disk.format}, not a qcow2 file", vm=name)
    dom = drv._dom(name)
    live = drv._state(dom) in ("running", "paused")
    args = ["convert", "-U", "-f", "qcow2", "-O", "qcow2"]
    if backing:
        args += ["-B", backing, "-F", backing_format or "qcow2"]
    node = None
    if live:
        if snapshot in _on_disk(disk.source):
            raise Conflict(f"VM {name!r} already has a snapshot {snapshot!r} (disk {target})", vm=name)
        node = _nodes(drv, name, dom, [target])[target]
        qmp.execute(drv.qmp_socket(name), "transaction", {"actions": [
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": node, "name": snapshot}}]},
            timeout=QMP_SNAPSHOT_TIMEOUT_S)
        args += ["-l", f"snapshot.name={snapshot}"]
    try:
        if held is not None:
            held()
        r = subprocess.run(["qemu-img", *args, disk.source, dest], capture_output=True, text=True,
                           timeout=EXPORT_TIMEOUT_S)
        if r.returncode != 0:
            raise CommandFailed(f"qemu-img convert of VM {name!r} disk {target} failed: {r.stderr.strip()}",
                                argv=["qemu-img", *args], returncode=r.returncode, stderr=r.stderr)
    except BaseException:
        try:
            os.unlink(dest)
        except FileNotFoundError:
            pass
        raise
    finally:
        if node is not None:
            qmp.execute(drv.qmp_socket(name), "blockdev-snapshot-delete-internal-sync",
                        {"device": node, "name": snapshot}, timeout=QMP_SNAPSHOT_TIMEOUT_S)
