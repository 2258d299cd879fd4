"""containers.bundle and containers.cgroups: config.json and resources from specs."""
from __future__ import annotations

import resource

import pytest

from agent.errors import InvalidInput
from containers import ContainerSpec, Limits, NetworkSpec, Rootfs, bundle, cgroups, seccomp

ROOTFS = Rootfs(("/l",), "/u", "/w")


def spec(**kw):
    kw.setdefault("command", ("sleep", "1"))
    return ContainerSpec(name="c1", rootfs=ROOTFS, **kw)


def config(s, **kw):
    args = dict(rootfs="/r", uid=0, gid=0, netns="/run/netns/x", cgroups_path="/nodeagent/c1",
                resources=cgroups.oci_resources(s.limits, root="/nonexistent"), hostname="h")
    args.update(kw)
    return bundle.build_config(s, **args)


def test_isolation_defaults():
    c = config(spec())
    assert [n["type"] for n in c["linux"]["namespaces"]] == ["pid", "ipc", "uts", "mount",
                                                              "network"]
    assert c["linux"]["namespaces"][-1]["path"] == "/run/netns/x"
    p = c["process"]
    assert p["noNewPrivileges"] is True and p["terminal"] is False
    for kind in ("bounding", "effective", "permitted"):
        assert p["capabilities"][kind] == ["CAP_AUDIT_WRITE", "CAP_KILL",
                                           "CAP_NET_BIND_SERVICE"]
    assert "/proc/sys" in c["linux"]["readonlyPaths"]
    assert "/proc/kcore" in c["linux"]["maskedPaths"]
    sc = c["linux"]["seccomp"]
    assert sc["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = sc["syscalls"][0]["names"]
    for call in ("mount", "kexec_load", "init_module", "ptrace", "bpf", "unshare", "setns"):
        assert call in denied
    assert sc["syscalls"][0]["action"] == "SCMP_ACT_ERRNO"
    assert c["linux"]["cgroupsPath"] == "/nodeagent/c1" and c["hostname"] == "h"
    assert "uidMappings" not in c["linux"]


def test_rlimits_never_exceed_the_agents_hard_limit():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    (nofile,) = config(spec())["process"]["rlimits"]
    assert nofile["type"] == "RLIMIT_NOFILE" and nofile["hard"] <= hard and \
        nofile["soft"] <= nofile["hard"]


def test_userns_adds_an_id_map():
    c = config(spec(userns=True))
    assert {"type": "user"} in c["linux"]["namespaces"]
    assert c["linux"]["uidMappings"] == [{"containerID": 0, "hostID": bundle.LEGACY_IDMAP.host_id,
                                          "size": bundle.LEGACY_IDMAP.size}]
    assert c["linux"]["gidMappings"] == c["linux"]["uidMappings"]


def test_network_modes():
    assert {"type": "network"} in config(spec(network=NetworkSpec(mode="none")))["linux"][
        "namespaces"]
    host = config(spec(network=NetworkSpec(mode="host")))
    assert all(n["type"] != "network" for n in host["linux"]["namespaces"])


def test_image_config_merges_docker_style():
    img = {"Entrypoint": ["/bin/entry"], "Cmd": ["default"], "Env": ["A=1", "B=2"],
           "WorkingDir": "/app", "User": "1000:1000"}
    p = bundle.resolve_process(spec(command=(), env={"B": "3"}, image_config=img))
    assert p["args"] == ["/bin/entry", "default"]
    assert p["env"]["A"] == "1" and p["env"]["B"] == "3" and "PATH" in p["env"]
    assert (p["cwd"], p["user"]) == ("/app", "1000:1000")
    p = bundle.resolve_process(spec(command=("x",), workdir="/w", image_config=img))
    assert p["args"] == ["/bin/entry", "x"] and p["cwd"] == "/w"
    with pytest.raises(InvalidInput, match="no command"):
        config(spec(command=()))


def test_resolve_user_from_image_files(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("app:x:1001:1002::/:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text("staff:x:50:\n")
    assert bundle.resolve_user("app", str(tmp_path)) == (1001, 1002)
    assert bundle.resolve_user("app:staff", str(tmp_path)) == (1001, 50)
    assert bundle.resolve_user("7:8", str(tmp_path)) == (7, 8)
    with pytest.raises(InvalidInput):
        bundle.resolve_user("ghost", str(tmp_path))


def test_passwd_symlink_out_of_the_rootfs_is_not_followed(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(InvalidInput):
        bundle.resolve_user("root", str(tmp_path))


def test_resources_v1_and_v2(tmp_path):
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.memsw.limit_in_bytes").write_text("0")
    (v1 / "blkio").mkdir()
    lim = Limits(cpus=1.5, memory_mib=64, pids_max=10, io_weight=300)
    r = cgroups.oci_resources(lim, root=str(v1))
    assert r["cpu"] == {"quota": 150000, "period": 100000}
    assert r["memory"] == {"limit": 64 << 20, "swap": 64 << 20}  # swap off
    assert r["pids"] == {"limit": 10}
    assert "blockIO" not in r and cgroups.unsupported(lim, root=str(v1)) == ["io_weight"]
    (v1 / "blkio" / "blkio.weight").write_text("500")
    assert cgroups.oci_resources(lim, root=str(v1))["blockIO"] == {"weight": 300}
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu io memory pids\n")
    assert cgroups.is_v2(str(v2)) and cgroups.has_io_weight(str(v2))
    (v2 / "other").mkdir()
    (v2 / "other" / "io.stat").write_text("")
    assert not cgroups.has_io_weight(str(v2))  # io controller but no weight (no iocost/bfq)
    (v2 / "other" / "io.weight").write_text("default 100\n")
    assert cgroups.oci_resources(lim, root=str(v2))["blockIO"] == {"weight": 300}
    (v2 / "nodeagent" / "c1").mkdir(parents=True)
    d = v2 / "nodeagent" / "c1"
    (d / "cpu.stat").write_text("usage_usec 42\nuser_usec 40\n")
    (d / "memory.current").write_text("1048576\n")
    (d / "pids.current").write_text("3\n")
    (d / "memory.events").write_text("oom 1\noom_kill 1\n")
    (d / "io.stat").write_text("8:0 rbytes=100 wbytes=200 rios=1 wios=2\n")
    st = cgroups.read_stats("nodeagent", "c1", root=str(v2))
    assert st == {"cpu_ns": 42000, "memory_bytes": 1048576, "pids": 3, "oom_kills": 1,
                  "io": {"read_bytes": 100, "write_bytes": 200}}


def test_default_seccomp_profile_is_data():
    p = seccomp.default_profile()
    assert len(set(p["syscalls"][0]["names"])) == len(seccomp.DENIED_SYSCALLS)


def test_resolve_in_root_never_leaves_the_rootfs(tmp_path):
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "usr" / "bin" / "sh").write_text("")
    (tmp_path / "bin").symlink_to("/usr/bin")  # absolute: means the image's /usr/bin
    (tmp_path / "evil").symlink_to("../../../../../../etc")
    (tmp_path / "loop").symlink_to("loop")
    assert bundle.resolve_in_root(str(tmp_path), "/bin/sh") == str(tmp_path / "usr/bin/sh")
    assert bundle.resolve_in_root(str(tmp_path), "/evil/passwd") is None  # no /etc in image
    assert bundle.resolve_in_root(str(tmp_path), "/loop") is None
    assert bundle.resolve_in_root(str(tmp_path), "/../../usr/bin/sh") == \
        str(tmp_path / "usr/bin/sh")
