"""Privileged mount work, in one visible place: overlayfs rootfs assembly and unmount."""
from __future__ import annotations

import ctypes
import errno
import os
from typing import Sequence

from agent.errors import CommandFailed, InvalidInput, Unprocessable

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
MNT_DETACH = 2  # lazy unmount: detach now, clean up when no longer busy


def mount_overlay(lowerdirs: Sequence[str], upperdir: str, workdir: str, target: str) -> None:
    """Mount overlayfs at ``target``: ``lowerdirs`` top first, writes going to ``upperdir``.

    ``workdir`` must be an empty dir on the same filesystem as ``upperdir``. On failure
    nothing is mounted.
    """
    if not lowerdirs:
        raise InvalidInput("an overlay needs at least one lower dir")
    for d in (*lowerdirs, upperdir, workdir, target):
        if "," in d or ":" in d:
            raise InvalidInput(f"overlay path {d!r} contains ',' or ':'")
    opts = f"lowerdir={':'.join(lowerdirs)},upperdir={upperdir},workdir={workdir}"
    if _libc.mount(b"overlay", target.encode(), b"overlay", 0, opts.encode()) != 0:
        err = ctypes.get_errno()
        raise CommandFailed(f"mount overlay on {target}: {os.strerror(err)}",
                            argv=["mount", "-t", "overlay", "-o", opts, "overlay", target],
                            returncode=err)


def unmount(target: str, lazy: bool = False) -> bool:
    """Unmount ``target``; return False if nothing was mounted there."""
    if not is_mounted(target):
        return False
    if _libc.umount2(target.encode(), MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        raise CommandFailed(f"umount {target}: {os.strerror(err)}", argv=["umount", target],
                            returncode=err)
    return True


class _Statx(ctypes.Structure):
    """struct statx up to stx_attributes_mask (the rest is padding here)."""
    _fields_ = [("stx_mask", ctypes.c_uint32), ("stx_blksize", ctypes.c_uint32),
                ("stx_attributes", ctypes.c_uint64), ("stx_nlink", ctypes.c_uint32),
                ("stx_uid", ctypes.c_uint32), ("stx_gid", ctypes.c_uint32), ("stx_mode", ctypes.c_uint16),
                ("pad", ctypes.c_uint16), ("stx_ino", ctypes.c_uint64), ("stx_size", ctypes.c_uint64),
                ("stx_blocks", ctypes.c_uint64), ("stx_attributes_mask", ctypes.c_uint64),
                ("rest", ctypes.c_uint8 * 200)]


STATX_ATTR_MOUNT_ROOT = 0x2000  # Linux 5.8+
AT_SYMLINK_NOFOLLOW = 0x100
AT_NO_AUTOMOUNT = 0x800
_statx = getattr(_libc, "statx", None)


def is_mounted(target: str) -> bool:
    """Whether something is mounted at ``target``: statx's mount-root attribute (one syscall,
    whatever the number of mounts on the host), else a scan of /proc/self/mountinfo."""
    target = os.path.realpath(target)
    if _statx is not None:
        st = _Statx()
        if _statx(AT_FDCWD, target.encode(), AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT, 0, ctypes.byref(st)) != 0:
            if ctypes.get_errno() == errno.ENOENT:
                return False
        elif st.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT:
            return bool(st.stx_attributes & STATX_ATTR_MOUNT_ROOT)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def mounts_under(prefix: str) -> list[str]:
    """Every mount point at or below ``prefix`` (for leak checks and crash cleanup)."""
    prefix = os.path.realpath(prefix)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix.rstrip("/") + "/")]


# -- idmapped mounts (user-namespaced containers) ----------------------------------------
# x86_64 and aarch64 share these numbers (the "new" mount API, Linux 5.2+; mount_setattr 5.12+)
SYS_OPEN_TREE, SYS_MOUNT_SETATTR = 428, 442
OPEN_TREE_CLONE = 1  # a detached copy of the mount, ours to change
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000
AT_FDCWD = -100
MOUNT_ATTR_IDMAP = 0x100000
CLONE_NEWUSER = 0x10000000
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def open_userns(host_id: int, size: int) -> int:
    """A user namespace mapping ids 0..size-1 to host ids host_id.. (uids and gids alike):
    an fd of it, the caller's to close. The namespace lives as long as the fd; no process
    stays in it (a short `unshare --user cat` holds it while the maps are written)."""
    import subprocess
    import time
    proc = subprocess.Popen(["unshare", "--user", "cat"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        mine = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{proc.pid}/ns/user") == mine:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise CommandFailed("unshare --user failed: "
                                    f"{proc.stderr.read().decode(errors='replace').strip() or 'timed out'}",
                                    argv=["unshare", "--user", "cat"])
            time.sleep(0.0005)
        for f in ("uid_map", "gid_map"):
            with open(f"/proc/{proc.pid}/{f}", "w") as fh:
                fh.write(f"0 {host_id} {size}\n")
        return os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        proc.stdin.close()
        proc.wait()
        proc.stderr.close()


def idmapped_tree(path: str, userns_fd: int) -> int:
    """A detached mount of ``path`` whose owners are shifted by the map of ``userns_fd``
    (an id-mapped mount, Linux 5.12+): its fd, the caller's to close. Nothing on disk changes;
    the mount vanishes with the last reference (the fd, or an overlay using it)."""
    fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise CommandFailed(f"open_tree {path}: {os.strerror(err)}", argv=["open_tree", path],
                            returncode=err)
    attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
    if _libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH, ctypes.byref(attr),
                     ctypes.sizeof(attr)) < 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise CommandFailed(f"id-mapped mount of {path}: {os.strerror(err)} (needs Linux 5.12+ and a "
                            "filesystem that supports id-mapped mounts: ext4, xfs, btrfs, tmpfs 6.3+)",
                            argv=["mount_setattr", path], returncode=err)
    return fd


def mount_overlay_idmapped(lowerdirs: Sequence[str], upperdir: str, workdir: str, target: str,
                           userns_fd: int, stage_dir: str, *, detached: bool = True) -> None:
    """mount_overlay with every lower dir seen through an id-mapped mount (``idmapped_tree``):
    a user namespace's root owns what host root owns in the layers, without a copy. The upper
    dir is not shifted: it holds host ids as the container's processes write them.

    Overlayfs takes the layers as detached mounts (``/proc/self/fd/N``) since Linux 6.15;
    older kernels (5.19+) refuse them (EINVAL): then each is attached under ``stage_dir``
    (an empty dir of the caller's) for the overlay mount and detached again right after (the
    overlay keeps private clones). ``detached=False`` takes that path at once. On failure
    nothing is mounted and ``stage_dir`` holds no mount."""
    fds = []
    try:
        for d in lowerdirs:
            if "," in d or ":" in d:
                raise InvalidInput(f"overlay path {d!r} contains ',' or ':'")
            fds.append(idmapped_tree(d, userns_fd))
        if detached:
            try:
                mount_overlay([f"/proc/self/fd/{fd}" for fd in fds], upperdir, workdir, target)
                return
            except CommandFailed as e:
                if e.returncode != errno.EINVAL:
                    raise
        _mount_overlay_staged(fds, upperdir, workdir, target, stage_dir)
    finally:
        for fd in fds:
            os.close(fd)


SYS_MOVE_MOUNT = 429
MOVE_MOUNT_F_EMPTY_PATH = 0x4


def _mount_overlay_staged(fds: list[int], upperdir: str, workdir: str, target: str, stage_dir: str) -> None:
    points = []
    try:
        for i, fd in enumerate(fds):
            p = os.path.join(stage_dir, str(i))
            os.makedirs(p, exist_ok=True)
            if _libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, p.encode(), MOVE_MOUNT_F_EMPTY_PATH) < 0:
                err = ctypes.get_errno()
                raise CommandFailed(f"move_mount to {p}: {os.strerror(err)}", argv=["move_mount", p],
                                    returncode=err)
            points.append(p)
        mount_overlay(points, upperdir, workdir, target)
    finally:
        for p in points:
            unmount(p, lazy=True)


# -- size-limited filesystems (container rootfs limits) ----------------------------------
def make_fs_image(path: str, size_bytes: int) -> None:
    """A sparse file of ``size_bytes`` at ``path`` holding an empty ext4 filesystem (lazy
    inode-table and journal init, no root reserve: the whole size is usable). It takes the
    host's space only as it is written. On failure the file is removed."""
    try:
        with open(path, "xb") as f:
            f.truncate(size_bytes)
        format_ext4(path)
    except BaseException:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        raise


def format_ext4(path: str) -> None:
    """Write an empty ext4 filesystem over the whole of the file ``path`` (lazy inode-table
    and journal init, no root reserve). Sparse files stay sparse."""
    import subprocess
    r = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                        "lazy_itable_init=1,lazy_journal_init=1,nodiscard", path],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise CommandFailed(f"mkfs.ext4 {path} failed: {r.stderr.strip()[-300:]}",
                            argv=r.args, returncode=r.returncode, stderr=r.stderr)


def grow_fs_image(path: str) -> str:
    """After the file ``path`` grew: if it is loop-mounted, let its loop devices see the new
    size and grow the ext4 filesystem on them online. Returns "grown", "unmounted" (grow it
    with grow_fs_offline) or "deferred": mounted, but the kernel refused the online resize
    (it needs CAP_SYS_RESOURCE, which some hosts' root lacks); ``grow_fs_if_short`` grows it
    at its next mount."""
    import subprocess
    r = subprocess.run(["losetup", "-j", path, "-O", "NAME", "-n"], capture_output=True, text=True)
    devs = [d.strip() for d in r.stdout.splitlines() if d.strip()]
    if not devs:
        return "unmounted"
    for dev in devs:
        subprocess.run(["losetup", "-c", dev], capture_output=True)
        r = subprocess.run(["resize2fs", dev], capture_output=True, text=True)
        if r.returncode != 0:
            if "Permission denied" in r.stderr or "Operation not permitted" in r.stderr:
                return "deferred"
            raise CommandFailed(f"resize2fs of {path} failed: {r.stderr.strip()[-300:]}",
                                argv=r.args, returncode=r.returncode, stderr=r.stderr)
    return "grown"


EXT4_SUPERBLOCK = 1024
GROW_SLACK = 4 * 1024 * 1024  # an ext4 smaller than its file by less than this is left as it is


def ext4_bytes(path: str) -> int | None:
    """The size of the ext4 filesystem at the start of the file ``path`` (its superblock's
    block count times its block size); None if there is no ext4 there."""
    import struct
    try:
        with open(path, "rb") as f:
            f.seek(EXT4_SUPERBLOCK)
            sb = f.read(1024)
    except OSError:
        return None
    if len(sb) < 0x154 or sb[0x38:0x3a] != b"\x53\xef":
        return None
    lo, = struct.unpack_from("<I", sb, 0x4)
    log_bs, = struct.unpack_from("<I", sb, 0x18)
    incompat, = struct.unpack_from("<I", sb, 0x60)
    hi = struct.unpack_from("<I", sb, 0x150)[0] if incompat & 0x80 else 0  # INCOMPAT_64BIT
    return (lo | hi << 32) * (1024 << log_bs)


def grow_fs_if_short(path: str) -> bool:
    """Grow the unmounted ext4 in ``path`` to the file's size if the file grew meanwhile (a
    resize the kernel deferred); False if there was nothing to do."""
    size = ext4_bytes(path)
    if size is None or os.path.getsize(path) - size < GROW_SLACK:
        return False
    grow_fs_offline(path)
    return True


def grow_fs_offline(path: str) -> None:
    """Grow the unmounted ext4 filesystem in the file ``path`` to the file's size (a forced
    check first, as resize2fs asks)."""
    import subprocess
    for argv in (["e2fsck", "-f", "-p", path], ["resize2fs", path]):
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode not in (0, 1):  # e2fsck: 1 = errors corrected
            raise CommandFailed(f"{argv[0]} of {path} failed: {(r.stderr or r.stdout).strip()[-300:]}",
                                argv=argv, returncode=r.returncode, stderr=r.stderr)


def mount_fs_image(path: str, target: str, *, readonly: bool = False) -> None:
    """Loop-mount the filesystem image ``path`` at ``target`` (nodev, nosuid; ``readonly``: the
    loop device and the filesystem read-only, which no bind mount of it can undo). The loop
    device is set up with autoclear (mount(8)'s `-o loop`): it goes away with the unmount."""
    import subprocess
    opts = "loop,nodev,nosuid" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "ext4", "-o", opts, path, target],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise CommandFailed(f"mount of {path} on {target} failed: {r.stderr.strip()[-300:]} (loop devices: "
                            "is the loop module loaded? `modprobe loop`)",
                            argv=r.args, returncode=r.returncode, stderr=r.stderr)


def fs_image_mounts(path: str) -> list[str]:
    """Where the filesystem image ``path`` is mounted now (through its loop devices): [] if
    nowhere (then the caller may mount it itself without a second writer)."""
    import subprocess
    if not os.path.exists(path):
        return []
    r = subprocess.run(["losetup", "-j", path, "-O", "NAME", "-n"], capture_output=True, text=True)
    devs = {d.strip() for d in r.stdout.splitlines() if d.strip()}
    if not devs:
        return []
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split(" - ", 1)[1].split()[1] in devs]


def release_fs_image(path: str) -> bool:
    """Unmount every mount of the image ``path`` (found by its loop devices) and detach those
    devices; False if it had none. Tolerates a missing file."""
    import subprocess
    if not os.path.exists(path):
        return False  # the runtime removes an image only after releasing it here
    r = subprocess.run(["losetup", "-j", path, "-O", "NAME", "-n"], capture_output=True, text=True)
    devs = [d.strip() for d in r.stdout.splitlines() if d.strip()]
    for dev in devs:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f if line.split(" - ", 1)[1].split()[1] == dev]
        for p in sorted(points, key=len, reverse=True):
            unmount(p, lazy=True)  # an overlay just detached lazily may still hold it
        _detach_loop(dev)
    return bool(devs)


LOOP_RELEASE_WAIT = 5.0  # seconds for the last reference of a lazily unmounted filesystem to go


def _detach_loop(dev: str) -> bool:
    """Detach loop device ``dev`` once nothing holds it (an overlay's clones of its filesystem
    are released a moment after the unmount); False if it is still attached after the wait."""
    import subprocess
    import time
    bound = f"/sys/block/{os.path.basename(dev)}/loop/backing_file"
    deadline = time.monotonic() + LOOP_RELEASE_WAIT
    while os.path.exists(bound):
        subprocess.run(["losetup", "-d", dev], capture_output=True)  # autoclear may beat us to it
        if not os.path.exists(bound) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return not os.path.exists(bound)


# -- a runtime's private view (per-create cost that would grow with the host's mounts) ---
# runc reads /proc/self/mountinfo five times per container start (cgroup v1 mount discovery in
# `runc create` and `runc start`, the rootfs parent checks in `runc init`), and `runc init`
# copies then detaches every mount of the namespace it starts in: with every container's
# overlay on the host that is O(containers) per create (35 ms -> 87 ms for a `runc run` with
# 1000 overlays on the host, README "Density and storms"). runc therefore runs in a mount
# namespace of its own in which the other containers' mounts are detached.
CLONE_NEWNS = 0x20000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
AT_RECURSIVE = 0x8000


def _fail(what: str, path: str) -> CommandFailed:
    err = ctypes.get_errno()
    return CommandFailed(f"{what} {path}: {os.strerror(err)}", argv=[what, path], returncode=err)


MS_SHARED = 0x100000


def bind_self(path: str, *, shared: bool = False) -> bool:
    """Make the dir ``path`` a mount of its own (a bind mount of itself), so that
    ``enter_private_view`` can detach everything mounted below it in one step; ``shared``:
    its mounts propagate to its peers (as `ip netns` makes /run/netns). False if it
    already is a mount point. Only while nothing is mounted below it (a bind made above
    existing mounts would hide them): the caller checks ``mounts_under``."""
    if is_mounted(path):
        return False
    if _libc.mount(path.encode(), path.encode(), None, MS_BIND, None) != 0:
        raise _fail("bind mount", path)
    if shared and _libc.mount(b"none", path.encode(), None, MS_SHARED | MS_REC, None) != 0:
        err = _fail("make-shared", path)
        _libc.umount2(path.encode(), 0)
        raise err
    return True


def unbind_self(path: str) -> bool:
    """Undo ``bind_self`` if nothing is mounted below ``path`` any more; False if it is
    busy (mounts below it, which a non-lazy unmount never detaches) or not a mount point."""
    if not is_mounted(path):
        return False
    return _libc.umount2(path.encode(), 0) == 0


def enter_private_view(hidden: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Move the CALLING THREAD (not the process) into a new mount namespace: a copy of its
    own with every mount private (nothing propagates back to the host or in from it), in
    which, for each ``(hide, keep)`` of ``hidden``, everything mounted at and below ``hide``
    (a mount point: ``bind_self``) is detached except the paths ``keep`` below it, each with
    every mount below it. Processes the thread starts from then on live in that namespace;
    the thread must do nothing else (end it after). On failure the thread's namespace is
    unusable: raise, and the caller drops the thread."""
    if _libc.unshare(CLONE_NEWNS) != 0:
        raise _fail("unshare(CLONE_NEWNS)", "")
    # private first: an unmount in a namespace whose mounts are peers of the host's would
    # propagate to the host
    if _libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise _fail("make-rprivate", "/")
    for hide, keep in hidden:
        fds = []
        try:
            for k in keep:
                fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, k.encode(),
                                   OPEN_TREE_CLONE | AT_RECURSIVE | OPEN_TREE_CLOEXEC)
                if fd < 0:
                    raise _fail("open_tree", k)
                fds.append((fd, k))
            if _libc.umount2(hide.encode(), MNT_DETACH) != 0:
                raise _fail("umount", hide)
            for fd, k in fds:
                if _libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, k.encode(), MOVE_MOUNT_F_EMPTY_PATH) < 0:
                    raise _fail("move_mount to", k)
        finally:
            for fd, _ in fds:
                os.close(fd)


VIEW_MARK = "NODEAGENT_IN_VIEW"


def write_view_wrapper(path: str, program: str, containers: str, stage_dir: str, *,
                       netns_dir: str | None = None, netns_prefix: str = "",
                       busybox: str | None = None) -> None:
    """Write at ``path`` an executable that runs ``program`` (runc, with its arguments) in a
    mount namespace of its own made as ``enter_private_view`` makes one: everything mounted
    at and below ``containers`` (a ``bind_self`` mount point) detached but the dir of the
    bundle its ``--bundle`` argument names; with ``netns_dir`` (a mount point too),
    everything there detached but ``<netns_prefix><that dir's name>``. It is for processes
    that outlive the agent's thread (conmon's `runc create`): each run makes its namespace
    anew and it ends with the program, so no copy of the host's mounts stays behind.
    ``stage_dir``: a dir outside both where the kept trees wait while their parent is
    detached (private to each run's namespace: runs never see each other's). A failing step
    fails the run (mount's or umount's exit status). Without ``--bundle`` the program runs
    with nothing detached.

    One script for every container, written once (when the runtime starts): a file written
    while other threads fork can be held open for writing by a child not yet exec'd, and
    executing it then fails (ETXTBSY). ``busybox``: its mount and umount instead of
    util-linux's, which parse /proc/self/mountinfo (the whole host's table) at every call: 43
    instead of 50 ms of CPU for a wrapped `runc run` with 1000 overlays on the host, 79 ms
    unwrapped (README "Density and storms")."""
    import shlex
    q = shlex.quote
    tool = f"{q(busybox)} " if busybox else ""
    os.makedirs(os.path.join(stage_dir, "tree"), mode=0o700, exist_ok=True)
    open(os.path.join(stage_dir, "netns"), "a").close()
    tree, ns_stage = q(os.path.join(stage_dir, "tree")), q(os.path.join(stage_dir, "netns"))
    netns = [] if netns_dir is None else [
        f"    ns={q(os.path.join(netns_dir, netns_prefix))}\"${{keep##*/}}\"",
        '    if [ -e "$ns" ]; then',
        f'        {tool}mount --rbind "$ns" {ns_stage}',
        f"        {tool}umount -l {q(netns_dir)}",
        f'        {tool}mount --move {ns_stage} "$ns"',
        "    else",
        f"        {tool}umount -l {q(netns_dir)}",
        "    fi"]
    script = "\n".join([
        "#!/bin/sh",
        "# written by storage.mounts.write_view_wrapper: runs runc in a mount namespace of its",
        "# own, without the mounts of the other containers (issue #20)",
        "set -e",
        f'if [ "${{{VIEW_MARK}:-}}" != 1 ]; then',
        f'    {VIEW_MARK}=1 exec unshare --mount --propagation private "$0" "$@"',
        "fi",
        f"unset {VIEW_MARK}",
        "bundle= prev=",
        'for a in "$@"; do',
        '    if [ "$prev" = --bundle ]; then bundle=$a; fi',
        "    prev=$a",
        "done",
        'if [ -n "$bundle" ]; then',
        '    keep=${bundle%/*}',
        f'    case "$keep" in {q(containers.rstrip("/") + "/")}*) ;; *) echo "bundle $bundle is not under '
        f'{containers}" >&2; exit 125;; esac',
        f'    {tool}mount --rbind "$keep" {tree}',
        f"    {tool}umount -l {q(containers)}",
        f'    {tool}mount --move {tree} "$keep"',
        *netns,
        "fi",
        f'exec {q(program)} "$@"', ""])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(script)
    os.chmod(tmp, 0o700)
    os.replace(tmp, path)


# -- live volumes: a mount moved into (or taken out of) a running container's namespace ----
# The work runs on a thread of its own that joins the container's mount namespace (its root
# is then the container's root) and ends after: its namespaces are not the agent's.
CLONE_FS = 0x200
SYS_SETNS = 308
MOVE_MOUNT_T_EMPTY_PATH = 0x40
UMOUNT_NOFOLLOW = 8


def _in_mount_ns(pid: int, fn):
    """Run ``fn()`` on a new thread in the mount namespace of process ``pid``; its result or
    its exception. Unprocessable if that is the agent's own namespace (a pid reused since)."""
    import threading
    ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    if os.fstat(ns).st_ino == os.stat("/proc/self/ns/mnt").st_ino:  # e.g. the pid was reused
        os.close(ns)
        raise Unprocessable(f"process {pid} is in the agent's own mount namespace, not a container's")
    out: dict = {}

    def run():
        try:
            # setns to a mount namespace refuses a thread that shares its fs struct
            if _libc.unshare(CLONE_FS) != 0:
                raise _fail("unshare(CLONE_FS)", "")
            if _libc.syscall(SYS_SETNS, ns, CLONE_NEWNS) != 0:
                raise _fail("setns(mnt) of", str(pid))
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["error"] = e

    try:
        t = threading.Thread(target=run, name=f"mntns-{pid}", daemon=True)
        t.start()
        t.join()
    finally:
        os.close(ns)
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _open_dir_path(path: str, owner: int | None) -> int:
    """An O_PATH fd of the dir ``path`` (absolute, from the calling thread's root), made step by
    step as host id ``owner``'s (else root's) where missing; no component is followed as a
    symlink and each must be a dir: Unprocessable otherwise."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for comp in [c for c in path.split("/") if c]:
            if comp in (".", ".."):
                raise Unprocessable(f"mount path {path!r}: no '.' or '..' components")
            flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                nxt = os.open(comp, flags, dir_fd=fd)
            except FileNotFoundError:
                try:
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    if owner is not None:
                        os.chown(comp, owner, owner, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
                try:
                    nxt = os.open(comp, flags, dir_fd=fd)
                except OSError as e:
                    raise Unprocessable(f"mount path {path!r}: {comp!r} is not a dir ({e.strerror})") from None
            except OSError as e:  # ENOTDIR (a file or, with O_NOFOLLOW, a symlink) or ELOOP
                raise Unprocessable(f"mount path {path!r}: {comp!r} is a symlink or not a dir ({e.strerror}): "
                                   "pick another path") from None
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def mount_into_ns(pid: int, source: str, dest: str, *, owner: int | None = None) -> None:
    """Mount a detached clone of the mount at ``source`` (the host's) at ``dest`` in the mount
    namespace of process ``pid`` (a container's init: ``dest`` is in its root), making the
    missing dirs of ``dest`` (as ``owner``'s) without following a symlink; Unprocessable for a
    path through a symlink or a non-dir (nothing mounted then)."""
    clone = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, source.encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
    if clone < 0:
        raise _fail("open_tree", source)

    def move():
        fd = _open_dir_path(dest, owner)
        try:
            if _libc.syscall(SYS_MOVE_MOUNT, clone, b"", fd, b"",
                             MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) < 0:
                raise _fail("move_mount to", dest)
        finally:
            os.close(fd)

    try:
        _in_mount_ns(pid, move)
    finally:
        os.close(clone)


def unmount_in_ns(pid: int, dest: str, dev: int) -> bool:
    """Detach the mount at ``dest`` in the mount namespace of process ``pid`` (lazily, the
    last component not followed); True if then no mount of device ``dev`` (a st_dev) is left
    in that namespace (one a tenant bound elsewhere keeps the filesystem in use)."""
    def umount():
        _libc.umount2(dest.encode(), MNT_DETACH | UMOUNT_NOFOLLOW)  # already gone: the check below says
    _in_mount_ns(pid, umount)
    return not ns_holds_dev(pid, dev)


def mount_backed_by(point: str, image: str) -> bool:
    """True if the filesystem mounted at ``point`` is on a loop device of the file ``image``."""
    st = os.stat(point)
    try:
        with open(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/loop/backing_file") as f:
            return os.path.realpath(f.read().strip()) == os.path.realpath(image)
    except OSError:
        return False


def ns_holds_dev(pid: int, dev: int) -> bool:
    """True if the mount namespace of process ``pid`` has a mount of device ``dev``."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    with open(f"/proc/{pid}/mountinfo") as f:
        return any(line.split()[2] == want for line in f)
