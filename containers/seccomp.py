"""The default seccomp profile: allow everything except the syscalls a container has no
business making (Docker's default profile blocks the same ones by allow-listing around them).

Denied calls fail with EPERM instead of killing the process, so programs that probe for a
feature (e.g. ``unshare``) fall back cleanly. Names are x86_64 syscalls; runc ignores names
that do not exist on the running architecture.
"""
from __future__ import annotations

EPERM = 1

DENIED_SYSCALLS = (
    # kernel modules and kexec: host takeover
    "create_module", "delete_module", "finit_module", "init_module", "query_module",
    "get_kernel_syms", "kexec_file_load", "kexec_load",
    # reboot, swap, clocks, accounting, quotas: host-wide state
    "reboot", "swapon", "swapoff", "clock_adjtime", "clock_settime", "settimeofday",
    "adjtimex", "acct", "quotactl", "quotactl_fd", "nfsservctl", "_sysctl", "sysfs", "ustat",
    "uselib", "lookup_dcookie", "vhangup",
    # mounts and namespaces: escape and confusion (runc sets these up before seccomp)
    "mount", "umount2", "pivot_root", "unshare", "setns", "fsopen", "fsconfig", "fsmount",
    "fspick", "move_mount", "open_tree", "mount_setattr",
    # kernel keyring: not namespaced
    "add_key", "request_key", "keyctl",
    # tracing and other processes' memory: cross-container information leaks
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "perf_event_open", "bpf",
    "userfaultfd", "name_to_handle_at", "open_by_handle_at",
    # raw I/O ports and NUMA policy: hardware and host memory placement
    "iopl", "ioperm", "mbind", "set_mempolicy", "move_pages", "get_mempolicy",
)

ARCHITECTURES = ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32")


def default_profile() -> dict:
    """The OCI ``linux.seccomp`` object of the default profile."""
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": list(ARCHITECTURES),
        "syscalls": [{"names": list(DENIED_SYSCALLS), "action": "SCMP_ACT_ERRNO",
                      "errnoRet": EPERM}],
    }
