"""The host's id range for user-namespaced containers: one shared range per host.

Container root (uid/gid 0) and every id up to ``size - 1`` map to ``host_id ..
host_id + size - 1`` on the host. One range for every container of the host (Incus's
default, Docker's userns-remap) because the image layers are shared: they are seen through
an id-mapped mount per container (storage.mounts.mount_overlay_idmapped), which shifts
owners by the same map for all, so a layer is unpacked once and never copied or chowned.
Containers are kept apart from each other by everything else (pid/mnt/net/ipc namespaces,
cgroups, seccomp, 0700 upper dirs); a per-container range would add protection between
containers of one host against a shared-uid attack at the cost of one range per container.

The range comes from ``[containers] idmap = "HOST_ID:SIZE"`` or the ``nodeagent`` entry of
/etc/subuid and /etc/subgid (the same start in both), which ``host_idmap`` allocates above
every other entry when it is missing: nothing else on the host is given those ids.
"""
from __future__ import annotations

import fcntl
import os

from agent.errors import InvalidInput, Unsupported
from containers.runtime import IdMap

SUBID_USER = "nodeagent"
SUBUID, SUBGID = "/etc/subuid", "/etc/subgid"
FIRST_HOST_ID = 1000000  # above any regular user's uid (login.defs: UID_MAX 60000, SUB_UID_MIN 100000)
RANGE_SIZE = 65536  # ids 0..65535 inside: root, system users, nobody (65534), a regular user
MAX_ID = 2**32 - 2  # (uid_t)-1 is "no id"


def parse_idmap(text: str) -> IdMap:
    """``HOST_ID:SIZE`` -> IdMap; InvalidInput unless the range is of unprivileged ids only
    (HOST_ID >= 65536) and holds at least 65536 ids (so nobody, 65534, exists inside)."""
    base, _, size = text.partition(":")
    if not (base.isdigit() and size.isdigit()):
        raise InvalidInput(f"idmap {text!r} is invalid: give HOST_ID:SIZE, e.g. 1000000:65536")
    m = IdMap(int(base), int(size))
    if m.host_id < RANGE_SIZE or m.size < RANGE_SIZE or m.host_id + m.size - 1 > MAX_ID:
        raise InvalidInput(f"idmap {text!r} is invalid: HOST_ID must be at least {RANGE_SIZE} (no host "
                           f"user's ids), SIZE at least {RANGE_SIZE}, and the range below 2^32-1")
    return m


def _entries(path: str) -> list[tuple[str, int, int]]:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def host_idmap(configured: str | None = None, *, subuid: str = SUBUID, subgid: str = SUBGID) -> IdMap:
    """The host's range: ``configured`` (``[containers] idmap``) if given, else the
    ``nodeagent`` entry of ``subuid``/``subgid``, appended to both (above every entry there
    and FIRST_HOST_ID) if missing. Unsupported if the two files give the agent different
    starts (fix them by hand, or set ``[containers] idmap``)."""
    if configured:
        return parse_idmap(configured)
    lock = os.open(subuid, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two agents starting at once allocate one range
        uids, gids = _entries(subuid), _entries(subgid)
        mine_u = [(b, n) for u, b, n in uids if u == SUBID_USER]
        mine_g = [(b, n) for u, b, n in gids if u == SUBID_USER]
        if mine_u and mine_g:
            if mine_u[0] != mine_g[0]:
                raise Unsupported(f"{subuid} and {subgid} give {SUBID_USER} different ranges "
                                  f"({mine_u[0][0]}:{mine_u[0][1]} and {mine_g[0][0]}:{mine_g[0][1]}): make "
                                  "them equal or set [containers] idmap")
            return parse_idmap(f"{mine_u[0][0]}:{mine_u[0][1]}")
        if mine_u or mine_g:
            base, size = (mine_u or mine_g)[0]
        else:
            base = max([FIRST_HOST_ID] + [b + n for _, b, n in uids + gids])
            size = RANGE_SIZE
        m = parse_idmap(f"{base}:{size}")
        for path, have in ((subuid, mine_u), (subgid, mine_g)):
            if not have:
                _append(path, f"{SUBID_USER}:{m.host_id}:{m.size}\n")
        return m
    finally:
        os.close(lock)


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = "\n" + line
        os.write(fd, line.encode())
    finally:
        os.close(fd)
