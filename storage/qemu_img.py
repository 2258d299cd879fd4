"""A thin wrapper over ``qemu-img`` (info/create/convert/resize/check/rebase).

Subcommands that support it run with ``--output=json`` and return the parsed dict.
Errors: a missing input file or an image qemu-img cannot read raises ``InvalidInput``
naming the file; any other non-zero exit raises ``CommandFailed`` with qemu-img's
stderr; a host without qemu-img raises ``Unavailable`` saying which package to install.

Untrusted images are probed with resource limits (CPU seconds and address space),
as QEMU's documentation advises, so a crafted header cannot exhaust the host.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
from typing import Sequence

from agent.errors import CommandFailed, InvalidInput, Unavailable

QEMU_IMG = "qemu-img"
PROBE_CPU_SECONDS = 30  # qemu-img info on a hostile header: OpenStack uses the same cap
PROBE_ADDRESS_SPACE = 1024 * 1024 * 1024  # 1 GiB: far more than info ever needs
DEFAULT_TIMEOUT = 3600  # seconds; convert of a large image may take minutes


def _limit_probe():  # runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_CPU, (PROBE_CPU_SECONDS, PROBE_CPU_SECONDS))
    resource.setrlimit(resource.RLIMIT_AS, (PROBE_ADDRESS_SPACE, PROBE_ADDRESS_SPACE))


def run(args: Sequence[str], *, input_file: str | None = None, limited: bool = False,
        timeout: float = DEFAULT_TIMEOUT) -> str:
    """Run ``qemu-img ARGS``; return stdout. ``input_file`` names the file errors blame."""
    argv = [QEMU_IMG, *map(str, args)]
    if input_file is not None and not os.path.exists(input_file):
        raise InvalidInput(f"{input_file}: no such file; give an existing image path")
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           preexec_fn=_limit_probe if limited else None)
    except FileNotFoundError:
        raise Unavailable("qemu-img is not installed: apt-get install -y qemu-utils "
                          "(or run scripts/setup-host)") from None
    except subprocess.TimeoutExpired:
        raise CommandFailed(f"qemu-img {args[0]} timed out after {timeout:.0f}s", argv=argv) from None
    if p.returncode != 0:
        err = p.stderr.strip()
        if input_file is not None and args[0] in ("info", "check"):
            raise InvalidInput(f"{input_file}: not a disk image qemu-img can read ({err}); "
                               "give a qcow2 or raw image")
        raise CommandFailed(f"qemu-img {args[0]} failed: {err}", argv=argv,
                            returncode=p.returncode, stderr=p.stderr)
    return p.stdout


def _json(out: str, argv0: str) -> dict:
    try:
        return json.loads(out)
    except ValueError:
        raise CommandFailed(f"qemu-img {argv0} printed no JSON", argv=[QEMU_IMG, argv0],
                            stderr=out) from None


def info(path: str, *, format: str | None = None) -> dict:
    """``qemu-img info --output=json``; probes the format when ``format`` is None.

    Keys used by callers: format, virtual-size, actual-size, backing-filename,
    full-backing-filename, format-specific.
    """
    args = ["info", "--output=json", "-U"]
    if format:
        args += ["-f", format]
    return _json(run([*args, path], input_file=path, limited=True), "info")


def create(path: str, *, format: str = "qcow2", size: int | None = None,
           backing: str | None = None, backing_format: str | None = None,
           options: dict | None = None) -> None:
    """Create an image; with ``backing`` a copy-on-write overlay (O(1) in the base's size)."""
    if backing is None and size is None:
        raise InvalidInput("qemu-img create needs a size or a backing file")
    if backing is not None and not backing_format:
        raise InvalidInput("a backing file needs its format (never let qemu probe it)")
    args = ["create", "-q", "-f", format]
    if backing is not None:
        args += ["-b", backing, "-F", backing_format]
    if options:
        args += ["-o", ",".join(f"{k}={v}" for k, v in options.items())]
    args.append(path)
    if size is not None:
        args.append(str(int(size)))
    run(args)


def convert(src: str, dst: str, *, src_format: str, dst_format: str,
            sparse: bool = True) -> None:
    """Convert ``src`` to a new file ``dst``; zero runs stay holes when ``sparse``."""
    args = ["convert", "-q", "-f", src_format, "-O", dst_format]
    if not sparse:
        args += ["-S", "0"]
    run([*args, src, dst], input_file=src)


def resize(path: str, size: int, *, format: str) -> None:
    """Grow ``path`` to ``size`` bytes (callers refuse shrinking before calling)."""
    run(["resize", "-q", "-f", format, path, str(int(size))], input_file=path)


def check(path: str, *, format: str = "qcow2") -> dict:
    """``qemu-img check --output=json``; a corrupt image raises InvalidInput.

    qemu-img exits 2 (corruptions) / 3 (leaks only) with the JSON on stdout; leaks are
    harmless and are returned, corruptions are refused.
    """
    argv = [QEMU_IMG, "check", "--output=json", "-U", "-f", format, path]
    if not os.path.exists(path):
        raise InvalidInput(f"{path}: no such file; give an existing image path")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=DEFAULT_TIMEOUT,
                       preexec_fn=_limit_probe)
    if p.returncode in (0, 3):
        return _json(p.stdout, "check")
    if p.returncode == 2:
        raise InvalidInput(f"{path}: qemu-img check found corruption: {p.stdout.strip()[:500]}")
    raise InvalidInput(f"{path}: qemu-img check could not read the image: {p.stderr.strip()}")


def rebase(path: str, backing: str | None, *, backing_format: str | None = None,
           format: str = "qcow2", unsafe: bool = False) -> None:
    """Point ``path`` at a new backing file (``None``: flatten onto no backing file)."""
    args = ["rebase", "-q", "-f", format]
    if unsafe:
        args.append("-u")
    args += ["-b", backing or ""]
    if backing is not None:
        if not backing_format:
            raise InvalidInput("a backing file needs its format (never let qemu probe it)")
        args += ["-F", backing_format]
    run([*args, path], input_file=path)
