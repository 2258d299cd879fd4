"""Privileged mount work, in one visible place: overlayfs rootfs assembly and unmount."""
from __future__ import annotations

import ctypes
import os
from typing import Sequence

from agent.errors import CommandFailed, InvalidInput

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


def is_mounted(target: str) -> bool:
    target = os.path.realpath(target)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def mounts_under(prefix: str) -> list[str]:
    """Every mount point at or below ``prefix`` (for leak checks and crash cleanup)."""
    prefix = os.path.realpath(prefix)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix.rstrip("/") + "/")]
