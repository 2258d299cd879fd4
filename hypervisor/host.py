"""Which accelerator this host's guests really run on: "kvm" or "qemu" (TCG).

/dev/kvm being there proves nothing (on some nested hosts KVM guests hang right after
the kernel starts), so ``detect_virt_type`` boots the host's own kernel under KVM with no
root device and ``panic=-1 -no-reboot``: a working KVM reaches the root-mount panic and
QEMU exits in about a second; a hanging one is killed after ``KVM_PROBE_TIMEOUT_S``.
The answer is cached in ``<state_dir>/virt_type.json`` per kernel release.
"""
from __future__ import annotations

import glob
import json
import os
import platform
import subprocess
import tempfile

KVM_DEVICE = "/dev/kvm"
KVM_PROBE_TIMEOUT_S = 10  # a KVM guest reaches its root-mount panic in ~1 s; TCG in ~2 s
KVM_PROBE_MARKER = "Kernel panic"
CACHE_FILE = "virt_type.json"
VIRT_TYPES = ("kvm", "qemu")
# present exactly when the kernel was built with userfaultfd (CONFIG_USERFAULTFD), which the
# destination of a post-copy migration needs (QEMU registers the guest's RAM with it). libvirt
# runs QEMU unprivileged (its own user, capabilities cleared) and QEMU before 8.1 opens it with
# the syscall, which such a process may use only with the sysctl at 1 (scripts/setup-host and the
# Ansible role set it; containers' seccomp profile still refuses the syscall to tenants).
USERFAULTFD_SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"


def userfaultfd_missing() -> str | None:
    """None when QEMU may use userfaultfd here (post-copy can run); else why not, and the fix."""
    try:
        with open(USERFAULTFD_SYSCTL) as f:
            allowed = f.read().strip() == "1"
    except FileNotFoundError:
        return (f"this host's kernel has no userfaultfd ({USERFAULTFD_SYSCTL} is missing): post-copy cannot "
                "run here; migrate without postcopy, or use a kernel built with CONFIG_USERFAULTFD")
    except OSError as e:
        return f"cannot read {USERFAULTFD_SYSCTL} ({e.strerror}): post-copy is off"
    if not allowed:
        return ("QEMU may not use userfaultfd on this host (vm.unprivileged_userfaultfd = 0; QEMU runs "
                "unprivileged): post-copy cannot run; set `sysctl -w vm.unprivileged_userfaultfd=1` "
                "(scripts/setup-host and the Ansible role do), or migrate without postcopy")
    return None


def probe_kernel() -> str | None:
    """A kernel image to probe with: the running one if readable, else any under /boot."""
    mine = f"/boot/vmlinuz-{platform.release()}"
    if os.access(mine, os.R_OK):
        return mine
    found = sorted(glob.glob("/boot/vmlinuz-*"))
    return found[-1] if found else None


def kvm_guest_runs(kernel: str, timeout: float = KVM_PROBE_TIMEOUT_S) -> bool:
    """Boot ``kernel`` under KVM; True if it reaches the root-mount panic in time."""
    with tempfile.TemporaryDirectory(prefix="nodeagent-kvm-probe-") as tmp:
        log = os.path.join(tmp, "serial.log")
        argv = ["qemu-system-x86_64", "-accel", "kvm", "-m", "128", "-nodefaults",
                "-display", "none", "-no-reboot", "-serial", f"file:{log}",
                "-kernel", kernel, "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent"]
        try:
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return False  # subprocess.run killed it
        except FileNotFoundError:
            return False
        try:
            return KVM_PROBE_MARKER in open(log, errors="replace").read()
        except FileNotFoundError:
            return False


def detect_virt_type(state_dir: str | None = None) -> str:
    """"kvm" where KVM guests really make progress, else "qemu"; cached in state_dir."""
    cache = os.path.join(state_dir, CACHE_FILE) if state_dir else None
    release = platform.release()
    if cache:
        try:
            data = json.load(open(cache))
            if data.get("kernel") == release and data.get("virt_type") in VIRT_TYPES:
                return data["virt_type"]
        except (OSError, ValueError):
            pass
    kernel = probe_kernel()
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK) or kernel is None:
        virt_type, reason = "qemu", f"{KVM_DEVICE} not usable or no kernel to probe with"
    elif kvm_guest_runs(kernel):
        virt_type, reason = "kvm", f"a KVM guest booting {kernel} reached its panic"
    else:
        virt_type, reason = "qemu", f"a KVM guest booting {kernel} made no progress in {KVM_PROBE_TIMEOUT_S}s"
    if cache:
        os.makedirs(state_dir, exist_ok=True)
        tmp = cache + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"virt_type": virt_type, "kernel": release, "reason": reason}, f)
        os.replace(tmp, cache)
    return virt_type
