"""Container test beds: runtimes by kind, specs on a busybox rootfs, free ports."""
from __future__ import annotations

import contextlib
import glob
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


# What this test process made on the host, by name: the bridges of test networks and the
# rtags of the agents and runtimes it ran (their NAT rules and nft tables carry them).
# tests/conftest.py checks at session end that none of it is left.
MADE_BRIDGES: set[str] = set()
MADE_RTAGS: set[str] = set()


def test_network(prefix: str = "natst") -> tuple[str, str]:
    """A bridge name (``prefix`` + 6 hex) and a /24 of 198.19.0.0/16 (test-only range) that
    no interface of this host uses now (a parallel run or a killed one's leftover bridge would
    make two routes). Remove it with drop_test_network()."""
    import subprocess
    used = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    free = [n for n in range(100, 250) if f" 198.19.{n}." not in used]
    n = random.choice(free or [random.randrange(100, 250)])
    name = f"{prefix}{secrets.token_hex(3)}"
    MADE_BRIDGES.add(name)
    return name, f"198.19.{n}.0/24"


def test_rtag() -> str:
    """A fresh rtag for a test's own Network (recorded for the leftover check)."""
    rtag = secrets.token_hex(2)
    MADE_RTAGS.add(rtag)
    return rtag


def agent_rtag(state_dir) -> str:
    """The tag an agent (or runtime) on ``state_dir`` gives its network's rules and tables
    (containers.network: 4 hex of its containers state dir); recorded for the leftover check."""
    from containers.network import short_hash
    rtag = short_hash(os.path.abspath(os.path.join(str(state_dir), "containers")), 4)
    MADE_RTAGS.add(rtag)
    return rtag


def drop_test_network(bridge: str | None, rtag: str | None = None) -> None:
    """Remove what a test network left on the host: the agent's NAT rules for ``bridge``
    (NODEAGENT-NAT) and, with ``rtag``, every rule of that agent (NODEAGENT-NAT, -DNAT) and
    its nft tables ``nodeagent_<rtag>``, then the bridge itself. Each step tolerates absence;
    nothing another run made is touched (the names carry this run's bridge or rtag)."""
    import subprocess
    from containers.network import DNAT_CHAIN, NAT_CHAIN, delete_rules
    if bridge:
        for rule in _nat_rules_of_bridge(bridge):
            subprocess.run(["iptables", "-w", "5", "-t", "nat", "-D", NAT_CHAIN, *rule], capture_output=True)
    if rtag:
        delete_rules("nat", NAT_CHAIN, f"nodeagent:{rtag}:")
        delete_rules("nat", DNAT_CHAIN, f"nodeagent:{rtag}:")
        table = f"nodeagent_{rtag}"
        subprocess.run(["nft", "-f", "-"], input=f"table bridge {table} {{}}\ndelete table bridge {table}\n"
                       f"table inet {table} {{}}\ndelete table inet {table}\n", text=True, capture_output=True)
    if bridge:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def _nat_rules_of_bridge(bridge: str) -> list[list[str]]:
    """NODEAGENT-NAT rules whose comment names ``bridge`` (``nodeagent:<rtag>:net:<bridge>``)."""
    from containers.network import NAT_CHAIN, rules_with_comment
    return [r for r in rules_with_comment("nat", NAT_CHAIN, "nodeagent:")
            if r[r.index("--comment") + 1].endswith(f":net:{bridge}")]


def leftovers() -> list[str]:
    """What of MADE_BRIDGES and MADE_RTAGS is still on the host (for the session-end check)."""
    import shutil
    import subprocess
    left = []
    if not (MADE_BRIDGES or MADE_RTAGS):
        return left
    from containers.network import DNAT_CHAIN, NAT_CHAIN, rules_with_comment
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = {ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines() if ":" in ln}
    left += [f"bridge {b}" for b in sorted(MADE_BRIDGES & names)]
    if shutil.which("iptables"):
        for chain in (NAT_CHAIN, DNAT_CHAIN):
            for rule in rules_with_comment("nat", chain, "nodeagent:"):
                comment = rule[rule.index("--comment") + 1]
                rtag = comment.split(":")[1]
                if rtag in MADE_RTAGS or any(comment.endswith(f":net:{b}") for b in MADE_BRIDGES):
                    left.append(f"iptables -t nat {chain} rule {comment!r}")
    if shutil.which("nft"):
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        left += [f"nft {ln.strip()}" for ln in tables.splitlines()
                 if ln.split()[-1:] and ln.split()[-1].startswith("nodeagent_")
                 and ln.split()[-1][len("nodeagent_"):] in MADE_RTAGS]
    return left


def make_runc(tmp_path, **kw):
    """A RuncRuntime on a private state dir, bridge, subnet and cgroup parent; cleanup
    deletes its containers, bridge and rules (through the runtime: its leftovers are a bug
    the tests' end-of-run check reports, not something to sweep here)."""
    from agent.state import Database
    from containers.runc import RuncRuntime
    bridge, subnet = test_network()
    db = Database(str(tmp_path / "rt-state.db"))
    kw.setdefault("bridge", bridge)
    kw.setdefault("subnet", subnet)
    kw.setdefault("cgroup_parent", test_cgroup_parent())
    rt = RuncRuntime(str(tmp_path / "rt-state"), db, **kw)
    MADE_RTAGS.add(rt.rtag)

    def cleanup():
        for info in rt.list():
            rt.delete(info.name)
        rt.reconcile()
        rt.close()  # the bridge, its rules and tables: what it leaves, the run's end reports
        db.close()
        drop_cgroup_parent(kw["cgroup_parent"])
    return rt, cleanup


def test_cgroup_parent() -> str:
    """A cgroup parent of the test's own (``cgroup_parent`` of the runtime)."""
    return f"nodeagent-test-{secrets.token_hex(3)}"


def drop_cgroup_parent(parent: str) -> None:
    """Remove the test's own cgroup parent in every hierarchy, once its containers are gone."""
    for d in glob.glob(f"/sys/fs/cgroup/*/{parent}"):
        with contextlib.suppress(OSError):
            os.rmdir(d)


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
