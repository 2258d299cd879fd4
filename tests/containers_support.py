"""Helpers for container tests: runtimes by kind, specs on a busybox rootfs, free ports."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile

import pytest

from containers import ContainerSpec, NetworkSpec, Rootfs

RUNTIMES = ["fake"]
BUSYBOX = "/bin/busybox"
# applets linked into test rootfs dirs and the test OCI image
APPLETS = ("sh", "ls", "sleep", "cat", "echo", "hostname", "ps", "wget", "nc", "ip", "true",
           "false", "id", "mount", "top", "kill", "env", "httpd", "ping", "head", "yes",
           "dd", "mkdir", "rm", "touch", "grep", "wc", "seq", "ifconfig", "route")


def build_busybox_rootfs(root: str) -> str:
    """A minimal rootfs dir at ``root``: /bin/busybox + applet symlinks + /etc basics."""
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "root", "www"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    shutil.copy2(BUSYBOX, os.path.join(root, "bin", "busybox"))
    for a in APPLETS:
        link = os.path.join(root, "bin", a)
        if not os.path.lexists(link):
            os.symlink("busybox", link)
    with open(os.path.join(root, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    with open(os.path.join(root, "etc", "group"), "w") as f:
        f.write("root:x:0:\nnogroup:x:65534:\n")
    with open(os.path.join(root, "www", "index.html"), "w") as f:
        f.write("hello from busybox\n")
    return root


_LOWER: dict[str, str] = {}


def busybox_lower() -> str:
    """One shared read-only busybox layer per test process."""
    if "dir" not in _LOWER:
        d = tempfile.mkdtemp(prefix="nodeagent-busybox-")
        _LOWER["dir"] = build_busybox_rootfs(d)
    return _LOWER["dir"]


def make_runtime(kind: str, tmp_path):
    """(runtime, cleanup) for ``kind`` in RUNTIMES."""
    if kind == "fake":
        from containers.fake import FakeRuntime
        return FakeRuntime(), lambda: None
    raise AssertionError(f"unknown runtime kind {kind}")


def make_spec(rt, tmp_path, name, command, **kw) -> ContainerSpec:
    base = tmp_path / "rootfs" / name.replace("/", "_")
    upper, work = base / "upper", base / "work"
    for d in (upper, work):
        d.mkdir(parents=True, exist_ok=True)
    kw.setdefault("network", NetworkSpec(mode="none"))
    return ContainerSpec(name=name, rootfs=Rootfs((busybox_lower(),), str(upper), str(work)),
                         command=tuple(command), **kw)


def find_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    return find_free_port()
