"""What a container's process may do: its capabilities, its seccomp profile and whether it
may gain privileges on exec. Docker's defaults, so images made for Docker run unchanged:

- capabilities: ``DEFAULT_CAPABILITIES`` (Docker's 14) in the bounding, effective and
  permitted sets of a root process; a process of another uid gets them in its bounding set
  only (effective and permitted empty: what a non-root user has on any host, so an
  image's ``USER nobody`` is not root in all but name). Inheritable and ambient are always
  empty (CVE-2022-24769: inheritable caps reached programs that did not ask for them).
  Everything else, CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_MODULE, CAP_SYS_PTRACE,
  CAP_SYS_TIME, ..., is never granted.
- seccomp: containers/seccomp.py (default deny, Docker's allow-list), evaluated against
  the bounding set.
- no new privileges: off, as Docker and Podman (setuid and file-capability programs work,
  within the bounding set); ``[containers] no_new_privileges = true`` turns it on for
  every container of the host.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from containers import seccomp

# Docker's default set (moby's oci/caps/defaults.go): file ownership and modes, setuid/setgid,
# mknod (the devices cgroup still limits which nodes open), raw sockets (ping), low ports,
# chroot, signals, audit writes
DEFAULT_CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
                        "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
                        "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE")


# every capability of Linux 6.x (capability.h), the names cap_add/cap_drop may use
ALL_CAPABILITIES = tuple("CAP_" + n for n in (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE"))


def adjusted(base: tuple[str, ...], add: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> tuple[str, ...]:
    """``base`` minus ``drop`` ("ALL": everything) plus ``add`` ("ALL": every capability),
    Docker's order of application; names as in ALL_CAPABILITIES."""
    caps = [] if "ALL" in drop else [c for c in base if c not in drop]
    for c in (ALL_CAPABILITIES if "ALL" in add else add):
        if c not in caps:
            caps.append(c)
    return tuple(caps)


@functools.lru_cache(maxsize=1)
def _default_profile() -> dict | None:
    return seccomp.profile_for(seccomp.DEFAULT)


@dataclass(frozen=True)
class Security:
    """A host's container security settings (``[containers]`` seccomp_profile and
    no_new_privileges). ``profile``: the seccomp profile as loaded (Docker's format), None
    for unconfined."""
    capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES
    profile: dict | None = field(default_factory=_default_profile, hash=False, compare=False)
    no_new_privileges: bool = False

    @classmethod
    def from_settings(cls, seccomp_profile: str = seccomp.DEFAULT,
                      no_new_privileges: bool = False) -> Security:
        """InvalidInput if the profile file is missing or malformed."""
        profile = _default_profile() if seccomp_profile == seccomp.DEFAULT else \
            seccomp.profile_for(seccomp_profile)
        return cls(profile=profile, no_new_privileges=no_new_privileges)

    def with_caps(self, add: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> Security:
        """These settings for a container with ``cap_add``/``cap_drop`` (its seccomp profile is
        evaluated against the capabilities it ends up with, as Docker does)."""
        if not add and not drop:
            return self
        return Security(capabilities=adjusted(self.capabilities, add, drop), profile=self.profile,
                        no_new_privileges=self.no_new_privileges)

    def process_capabilities(self, uid: int) -> dict:
        """The OCI ``process.capabilities`` of a process running as ``uid``."""
        caps = list(self.capabilities)
        held = caps if uid == 0 else []
        return {"bounding": caps, "effective": list(held), "permitted": list(held),
                "inheritable": [], "ambient": []}

    def oci_seccomp(self) -> dict | None:
        """The OCI ``linux.seccomp`` for these capabilities on this host; None: unconfined."""
        return None if self.profile is None else seccomp.oci_profile(self.profile, self.capabilities)
