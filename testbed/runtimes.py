"""Container test beds: runtimes by kind, specs on a busybox rootfs, free ports."""
from __future__ import annotations

import os
import random
import secrets
import shutil
import socket
import tempfile

from containers import ContainerSpec, NetworkSpec, Rootfs

RUNTIMES = ["fake", "runc"]
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


def busybox_lower() -> str:
    """One shared read-only busybox layer, kept at a fixed path per busybox build (so test
    runs reuse it instead of leaving a copy each): /tmp/nodeagent-test-busybox-<hash>."""
    st = os.stat(BUSYBOX)
    key = f"{st.st_size}-{int(st.st_mtime)}-{len(APPLETS)}"
    final = os.path.join(tempfile.gettempdir(), f"nodeagent-test-busybox-{key}")
    if not os.path.isdir(final):
        tmp = tempfile.mkdtemp(prefix="nodeagent-test-busybox-build-")
        build_busybox_rootfs(tmp)
        os.chmod(tmp, 0o755)  # user-namespaced containers must traverse it
        try:
            os.rename(tmp, final)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def make_runtime(kind: str, tmp_path):
    """(runtime, cleanup) for ``kind`` in RUNTIMES."""
    if kind == "fake":
        from containers.fake import FakeRuntime
        return FakeRuntime(), lambda: None
    if kind == "runc":
        return make_runc(tmp_path)
    raise AssertionError(f"unknown runtime kind {kind}")


def test_network() -> tuple[str, str]:
    """A bridge name and a /24 of 198.19.0.0/16 (test-only range) that no interface of this
    host uses now (a parallel run or a killed one's leftover bridge would make two routes)."""
    import subprocess
    used = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    free = [n for n in range(100, 250) if f" 198.19.{n}." not in used]
    n = random.choice(free or [random.randrange(100, 250)])
    return f"natst{secrets.token_hex(3)}", f"198.19.{n}.0/24"


def make_runc(tmp_path, **kw):
    """A RuncRuntime on a private state dir, bridge, subnet and cgroup parent; cleanup
    deletes its containers, bridge and rules."""
    from agent.state import Database
    from containers.runc import RuncRuntime
    bridge, subnet = test_network()
    db = Database(str(tmp_path / "rt-state.db"))
    kw.setdefault("bridge", bridge)
    kw.setdefault("subnet", subnet)
    kw.setdefault("cgroup_parent", f"nodeagent-test-{secrets.token_hex(3)}")
    rt = RuncRuntime(str(tmp_path / "rt-state"), db, **kw)

    def cleanup():
        for info in rt.list():
            rt.delete(info.name)
        rt.reconcile()
        rt.close()
        db.close()
    return rt, cleanup


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
