"""Containers' seccomp profile: default deny. A syscall the profile does not allow fails
with EPERM (``defaultErrnoRet``), as with Docker and Podman, so programs that probe for a
feature fall back cleanly; new syscalls are denied until the profile names them.

The profile is data: ``seccomp_default.json`` is Docker's default profile unchanged
(github.com/moby/profiles/seccomp v0.2.3, Apache-2.0; origin and license in
``seccomp_default.NOTICE``). Its entries carry conditions that ``oci_profile`` evaluates
as Docker does, against the container's capabilities (its bounding set), this machine's
architecture (x86_64 and i386 here; x32 is left out, see SKIPPED_SUBARCHES) and its
kernel: ``includes`` (every cap listed held, the arch listed, the kernel at least
``minKernel``) and ``excludes`` (none of the caps held, not the arch). So
``mount``, ``unshare``, ``setns`` and friends are allowed only with CAP_SYS_ADMIN, which
no container gets, ``clone`` only without namespace flags, ``ptrace`` only on kernels >=
4.8, and keyrings, kexec, modules, bpf, userfaultfd and io_uring not at all.

A host may use another profile in the same format (or the OCI ``linux.seccomp`` format,
with ``architectures``) with ``[containers] seccomp_profile = "/path/profile.json"``, or
none: ``"unconfined"``. Names the kernel or libseccomp does not know are skipped by runc
(then denied by the default action).
"""
from __future__ import annotations

import json
import os
from typing import Any
from collections.abc import Iterable

from agent.errors import InvalidInput

DEFAULT = "default"
UNCONFINED = "unconfined"
DEFAULT_PROFILE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seccomp_default.json")
EPERM = 1
# machine (uname -m) -> (Go's GOARCH, the name Docker's conditions use; libseccomp's native arch)
MACHINES = {
    "x86_64": ("amd64", "SCMP_ARCH_X86_64"),
    "aarch64": ("arm64", "SCMP_ARCH_AARCH64"),
    "ppc64le": ("ppc64le", "SCMP_ARCH_PPC64LE"),
    "s390x": ("s390x", "SCMP_ARCH_S390X"),
    "riscv64": ("riscv64", "SCMP_ARCH_RISCV64"),
}
# what runc 1.1 accepts (libcontainer/seccomp/config.go); NOTIFY needs a listener we do not run
ACTIONS = ("SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP",
           "SCMP_ACT_ERRNO", "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG")
OPERATORS = ("SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE",
             "SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ")
FLAGS = ("SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW")
MAX_PROFILE_BYTES = 4 * 1024 * 1024  # a profile is a few tens of KiB; refuse anything absurd
# Sub-architectures of Docker's archMap left out of the filter. x32 (the ILP32 ABI of x86_64):
# Debian and most distribution kernels are built without it (CONFIG_X86_X32_ABI), nothing
# ships for it, and each architecture in the filter costs runc 1.1 about 25 ms per container
# start here (measured: 3 arches +52 ms, 2 arches +25 ms over no filter). Without it, an x32
# syscall hits libseccomp's bad-arch action (the process is killed) instead of ENOSYS. i386
# (SCMP_ARCH_X86) stays: 32-bit binaries run, under the same allow-list. A profile in OCI's
# format (an explicit ``architectures`` list) is taken as written.
SKIPPED_SUBARCHES = ("SCMP_ARCH_X32",)


def load(path: str) -> dict:
    """The profile in ``path`` (Docker's format or OCI's), parsed; InvalidInput naming the
    file if it is unreadable, too large or not a JSON object."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as e:
        raise InvalidInput(f"seccomp profile {path}: {e.strerror}: give a readable file "
                           f"(or \"{DEFAULT}\" or \"{UNCONFINED}\")") from None
    if len(raw) > MAX_PROFILE_BYTES:
        raise InvalidInput(f"seccomp profile {path} is larger than {MAX_PROFILE_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"seccomp profile {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"seccomp profile {path} must be a JSON object")
    return data


def _kernel(release: str) -> tuple[int, int]:
    parts = release.split("-", 1)[0].split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return 0, 0


def _applies(entry: dict, caps: frozenset[str], goarch: str, kernel: tuple[int, int]) -> bool:
    """Docker's rules: every ``includes`` condition holds and no ``excludes`` one does."""
    inc, exc = entry.get("includes") or {}, entry.get("excludes") or {}
    if inc.get("arches") and goarch not in inc["arches"]:
        return False
    if inc.get("caps") and not all(c in caps for c in inc["caps"]):
        return False
    if inc.get("minKernel") and kernel < _kernel(str(inc["minKernel"])):
        return False
    if exc.get("arches") and goarch in exc["arches"]:
        return False
    if exc.get("caps") and any(c in caps for c in exc["caps"]):
        return False
    return True


def _action(value, where: str) -> str:
    if value not in ACTIONS:
        raise InvalidInput(f"seccomp profile: {where} action {value!r} is not one runc 1.1 "
                           f"runs: use one of {', '.join(ACTIONS)}")
    return value


def _errno(value, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 4095:
        raise InvalidInput(f"seccomp profile: {where} errnoRet must be an errno 0..4095")
    return value


def _arg(a, where: str) -> dict:
    if not isinstance(a, dict) or a.get("op") not in OPERATORS:
        raise InvalidInput(f"seccomp profile: {where} needs an op of {', '.join(OPERATORS)}")
    out = {"index": a.get("index"), "value": a.get("value", 0), "op": a["op"]}
    if "valueTwo" in a:
        out["valueTwo"] = a["valueTwo"]
    for k in ("index", "value", "valueTwo"):
        v = out.get(k, 0)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**64:
            raise InvalidInput(f"seccomp profile: {where} {k} must be an integer 0..2^64-1")
    if out["index"] > 5:
        raise InvalidInput(f"seccomp profile: {where} index must be 0..5 (a syscall's argument)")
    return out


def oci_profile(profile: dict, caps: Iterable[str], *, machine: str | None = None,
                kernel: str | None = None) -> dict:
    """The runc ``linux.seccomp`` object of ``profile`` (Docker's format: ``archMap`` and
    conditional entries; or OCI's: ``architectures``) for a container holding ``caps``
    (its bounding set) on ``machine`` (uname -m) and ``kernel`` (a release string; both
    default to this host's). Entries whose conditions do not hold are left out; every
    action, errno and argument comparison is checked (InvalidInput naming it)."""
    uname = os.uname()
    machine = machine or uname.machine
    goarch, native = MACHINES.get(machine, (machine, None))
    kern = _kernel(kernel or uname.release)
    held = frozenset(caps)
    out: dict = {"defaultAction": _action(profile.get("defaultAction"), "defaultAction")}
    if "defaultErrnoRet" in profile:
        out["defaultErrnoRet"] = _errno(profile["defaultErrnoRet"], "defaultErrnoRet")
    if profile.get("architectures"):
        out["architectures"] = [str(a) for a in profile["architectures"]]
    else:
        for m in profile.get("archMap") or []:
            if m.get("architecture") == native:
                out["architectures"] = [native, *(a for a in m.get("subArchitectures") or []
                                                  if a not in SKIPPED_SUBARCHES)]
        if "architectures" not in out and native:
            out["architectures"] = [native]
    flags = profile.get("flags") or []
    for f in flags:
        if f not in FLAGS:
            raise InvalidInput(f"seccomp profile: flag {f!r} is not one of {', '.join(FLAGS)}")
    if flags:
        out["flags"] = list(flags)
    rules = []
    for i, entry in enumerate(profile.get("syscalls") or []):
        where = f"syscalls[{i}]"
        if not isinstance(entry, dict):
            raise InvalidInput(f"seccomp profile: {where} must be an object")
        names = entry.get("names") or ([entry["name"]] if entry.get("name") else [])
        if not names or not all(isinstance(n, str) and n.replace("_", "").isalnum() for n in names):
            raise InvalidInput(f"seccomp profile: {where} needs names: syscall names")
        if not _applies(entry, held, goarch, kern):
            continue
        rule: dict[str, Any] = {"names": list(names), "action": _action(entry.get("action"), where)}
        if "errnoRet" in entry:
            rule["errnoRet"] = _errno(entry["errnoRet"], where)
        if entry.get("args"):
            rule["args"] = [_arg(a, f"{where}.args") for a in entry["args"]]
        rules.append(rule)
    out["syscalls"] = rules
    return out


def profile_for(setting: str) -> dict | None:
    """The profile a ``[containers] seccomp_profile`` setting names, loaded and checked
    once (None: unconfined). InvalidInput for a missing or malformed file."""
    if setting == UNCONFINED:
        return None
    profile = load(DEFAULT_PROFILE_PATH if setting == DEFAULT else setting)
    oci_profile(profile, ())  # refuse a bad profile now, not at a container's start
    return profile
