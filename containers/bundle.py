"""OCI runtime bundles: the ``config.json`` runc runs, made from a ContainerSpec and the
image's config.

Isolation by default: namespaces pid, mnt, uts, ipc, net (+ user with an id map when
``spec.userns``); Docker's default capabilities and seccomp profile, no_new_privileges
off unless the host says so (containers/security.py); read-only and masked /proc and /sys paths;
rlimits no higher than the agent's own (an OCI spec above the hard limit fails to start).
Pure functions, except ``write_bundle`` which writes files into the bundle dir.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource

from agent.errors import InvalidInput
from containers.runtime import ContainerSpec, IdMap
from containers.security import Security

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MASKED_PATHS = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap")
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
# the map of a user-namespaced spec recorded without one (before containers.idmap's host range)
LEGACY_IDMAP = IdMap(100000, 65536)
SHM_SIZE = "size=65536k"  # 64 MiB /dev/shm, runc's and Docker's default
CGROUP_PARENT = "nodeagent"  # containers' cgroups live under <controller>/nodeagent/<name>


def resolve_process(spec: ContainerSpec) -> dict:
    """args, env, cwd and user string of the container's process (Docker's rules: the
    image's Entrypoint + (spec.command or image Cmd); spec env over image Env)."""
    img = spec.image_config or {}
    entry = list(img.get("Entrypoint") or [])
    cmd = list(spec.command) if spec.command else list(img.get("Cmd") or [])
    args = entry + cmd
    env: dict[str, str] = {}
    for item in img.get("Env") or []:
        k, _, v = item.partition("=")
        env[k] = v
    env.update(spec.env)
    env.setdefault("PATH", DEFAULT_PATH.split("=", 1)[1])
    cwd = spec.workdir if spec.workdir != "/" else (img.get("WorkingDir") or "/")
    user = spec.user if spec.user != "0:0" else (img.get("User") or "0:0")
    return {"args": args, "env": env, "cwd": cwd, "user": user}


def apply_image_config(spec: ContainerSpec, *roots: str) -> ContainerSpec:
    """``spec`` with its image's config applied by ``resolve_process``'s rules and the user
    resolved against ``roots`` (see ``resolve_user``): the command is the whole argv, env
    the merged one, workdir and user (numeric uid:gid) final, image_config empty. So the
    spec a runtime is handed says what runs. InvalidInput if there is no command or the
    image does not know the user."""
    proc = resolve_process(spec)
    if not proc["args"]:
        raise InvalidInput("no command: give one or use an image with a Cmd or Entrypoint")
    uid, gid = resolve_user(proc["user"], *roots)
    return dataclasses.replace(spec, command=tuple(proc["args"]), env=proc["env"], workdir=proc["cwd"],
                               user=f"{uid}:{gid}", image_config={})


def resolve_user(user: str, *roots: str) -> tuple[int, int]:
    """uid, gid for ``user`` (uid[:gid], or names looked up in the image's /etc/passwd and
    /etc/group). ``roots``: the mounted rootfs, or the image's layer dirs top first (the
    overlayfs order: the topmost layer holding the file wins, a whiteout hides it).
    InvalidInput for a name the image does not know."""
    name, _, group = user.partition(":")

    def lookup(fname: str, key: str, field: int) -> int | None:
        path = _inside_layers(roots, f"/etc/{fname}")
        if path is None:
            return None
        with open(path, errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split(":")
                if len(parts) > field and parts[0] == key and parts[field].isdigit():
                    return int(parts[field])
        return None

    uid: int | None
    gid: int | None
    if name.isdigit():
        uid, default_gid = int(name), None
    else:
        uid = lookup("passwd", name, 2)
        if uid is None:
            raise InvalidInput(f"user {name!r} is not in the image's /etc/passwd: "
                               "give a numeric uid[:gid]")
        default_gid = lookup("passwd", name, 3)
    if not group:
        gid = default_gid if default_gid is not None else 0
    elif group.isdigit():
        gid = int(group)
    else:
        gid = lookup("group", group, 2)
        if gid is None:
            raise InvalidInput(f"group {group!r} is not in the image's /etc/group: "
                               "give a numeric gid")
    return uid, gid


MAX_SYMLINKS = 40  # the kernel's own limit for one path walk


def resolve_in_root(rootfs: str, path: str) -> str | None:
    """Host path of ``path`` as the container sees it: symlinks (absolute ones too) are
    followed as if ``rootfs`` were ``/``, so nothing resolves outside it. None if a
    component is missing or the links loop."""
    root = os.path.realpath(rootfs)
    todo = [p for p in path.split("/") if p]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        cur = os.path.join(root, *done, part)
        if os.path.islink(cur):
            hops += 1
            if hops > MAX_SYMLINKS:
                return None
            target = os.readlink(cur)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p] + todo
            continue
        if not os.path.lexists(cur):
            return None
        done.append(part)
    return os.path.join(root, *done)


def _inside_layers(roots: tuple[str, ...], path: str) -> str | None:
    """``path`` in the topmost of ``roots`` that has it, if a regular file there; None if a
    layer whites it out (or holds something else there)."""
    for root in roots:
        real = resolve_in_root(root, path)
        if real is None:
            continue
        return real if os.path.isfile(real) else None
    return None


def agent_rlimits() -> list[dict]:
    """Container rlimits no higher than this process's hard limits (raising fails here)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = hard if hard != resource.RLIM_INFINITY else 1048576
    return [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}]


def build_config(spec: ContainerSpec, *, rootfs: str, uid: int, gid: int,
                 netns: str | None, cgroups_path: str, resources: dict,
                 hostname: str, etc_files: dict[str, str] | None = None,
                 security: Security | None = None, volume_dirs: list[str] | None = None) -> dict:
    """The OCI config for ``spec``. ``netns``: path of a prepared network namespace to join,
    None for a fresh one (mode none) — host mode shares the host's. ``resources``: the OCI
    linux.resources from containers.cgroups.oci_resources. ``etc_files``: container path ->
    host file bind-mounted read-only (e.g. /etc/hosts). ``security``: capabilities, seccomp
    and no_new_privileges (None: the defaults, containers/security.py). ``volume_dirs``: the
    host dirs where ``spec.volumes`` are mounted, in order (bind-mounted at their destinations)."""
    proc = resolve_process(spec)
    if not proc["args"]:
        raise InvalidInput("no command: give one or use an image with a Cmd or Entrypoint")
    security = security or Security()
    namespaces = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
    mode = spec.network.mode
    if mode == "bridge":
        namespaces.append({"type": "network", "path": netns} if netns else {"type": "network"})
    elif mode == "none":
        namespaces.append({"type": "network"})
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", SHM_SIZE]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]
    # sysfs can only be mounted by the owner of the netns: with the host's netns, or a
    # prepared netns joined from a new user namespace, bind the host's read-only instead
    if mode == "host" or (spec.userns and netns):
        mounts[5] = {"destination": "/sys", "type": "bind", "source": "/sys",
                     "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}
    for vol, src in zip(spec.volumes, volume_dirs or ()):  # each volume's mounted filesystem
        mounts.append({"destination": vol.destination, "type": "bind", "source": src,
                       "options": ["rbind", "nosuid", "nodev", "ro" if vol.readonly else "rw"]})
    for dest, src in sorted((etc_files or {}).items()):
        mounts.append({"destination": dest, "type": "bind", "source": src,
                       "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]})
    linux: dict = {
        "namespaces": namespaces,
        "cgroupsPath": cgroups_path,
        "resources": resources,
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    profile = security.oci_seccomp()
    if profile is not None:
        linux["seccomp"] = profile
    if spec.userns:
        namespaces.append({"type": "user"})
        ids = spec.idmap or LEGACY_IDMAP
        idmap = [{"containerID": 0, "hostID": ids.host_id, "size": ids.size}]
        linux["uidMappings"] = idmap
        linux["gidMappings"] = [dict(m) for m in idmap]
        # cgroupfs is not mountable from a user namespace without cgroupns on v1
        mounts = [m for m in mounts if m["destination"] != "/sys/fs/cgroup"]
    env = dict(proc["env"])
    if spec.tty:
        env.setdefault("TERM", "xterm")  # as Docker and Podman give a container run with a TTY
    process: dict = {
        "terminal": spec.tty,
        "user": {"uid": uid, "gid": gid},
        "args": proc["args"],
        "env": [f"{k}={v}" for k, v in env.items()],
        "cwd": proc["cwd"],
        "capabilities": security.process_capabilities(uid),
        "rlimits": agent_rlimits(),
        "noNewPrivileges": security.no_new_privileges,
    }
    if spec.tty:
        process["consoleSize"] = {"height": 24, "width": 80}  # until an attached client resizes it
    return {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": rootfs, "readonly": False},
        "hostname": hostname,
        "mounts": mounts,
        "linux": linux,
    }


def etc_files_for(bundle_dir: str, *, hostname: str, ip: str | None,
                  nameservers: list[str]) -> dict[str, str]:
    """Write hosts, hostname and resolv.conf into ``bundle_dir``; return the bind map."""
    files = {
        "hostname": hostname + "\n",
        "hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"
                 + (f"{ip}\t{hostname}\n" if ip else f"127.0.1.1\t{hostname}\n"),
        "resolv.conf": "".join(f"nameserver {n}\n" for n in nameservers),
    }
    out = {}
    for name, text in files.items():
        path = os.path.join(bundle_dir, name)
        with open(path, "w") as f:
            f.write(text)
        out[f"/etc/{name}"] = path
    return out


def host_nameservers(path: str = "/etc/resolv.conf") -> list[str]:
    """The host's nameservers minus loopback ones (unreachable from a netns)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver" and not parts[1].startswith("127."):
            out.append(parts[1])
    return out


def write_bundle(bundle_dir: str, config: dict) -> str:
    """Write config.json, root's only (0600): it holds the container's env. runc reads it as root."""
    path = os.path.join(bundle_dir, "config.json")
    tmp = path + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "w") as f:
        f.write(json.dumps(config))  # one shot: C's encoder (indent or json.dump take the Python one: ~10 ms)
    os.replace(tmp, path)
    return path
