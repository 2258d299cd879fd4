"""containers.bundle and containers.cgroups: config.json and resources from specs."""
from __future__ import annotations

import json
import resource

import pytest

from agent.errors import InvalidInput
from containers import ContainerSpec, Limits, NetworkSpec, Rootfs, bundle, cgroups, seccomp
from containers.security import DEFAULT_CAPABILITIES, Security

ROOTFS = Rootfs(("/l",), "/u", "/w")


def spec(**kw):
    kw.setdefault("command", ("sleep", "1"))
    return ContainerSpec(name="c1", rootfs=ROOTFS, **kw)


def config(s, **kw):
    args = dict(rootfs="/r", uid=0, gid=0, netns="/run/netns/x", cgroups_path="/nodeagent/c1",
                resources=cgroups.oci_resources(s.limits, root="/nonexistent"), hostname="h",
                security=Security().with_caps(s.cap_add, s.cap_drop))  # as RuncRuntime does
    args.update(kw)
    return bundle.build_config(s, **args)


def test_isolation_defaults():
    c = config(spec())
    assert [n["type"] for n in c["linux"]["namespaces"]] == ["pid", "ipc", "uts", "mount",
                                                              "network"]
    assert c["linux"]["namespaces"][-1]["path"] == "/run/netns/x"
    p = c["process"]
    assert p["noNewPrivileges"] is False and p["terminal"] is False  # Docker's default
    for kind in ("bounding", "effective", "permitted"):
        assert p["capabilities"][kind] == list(DEFAULT_CAPABILITIES)
    assert p["capabilities"]["inheritable"] == p["capabilities"]["ambient"] == []
    assert "CAP_SYS_ADMIN" not in DEFAULT_CAPABILITIES and len(DEFAULT_CAPABILITIES) == 14
    assert "/proc/sys" in c["linux"]["readonlyPaths"]
    assert "/proc/kcore" in c["linux"]["maskedPaths"]
    sc = c["linux"]["seccomp"]
    assert sc["defaultAction"] == "SCMP_ACT_ERRNO" and sc["defaultErrnoRet"] == 1  # EPERM
    allowed = {n for r in sc["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" and "args" not in r
               for n in r["names"]}
    assert {"read", "write", "execve", "openat", "ptrace"} <= allowed  # ptrace: kernel >= 4.8
    for call in ("mount", "kexec_load", "init_module", "bpf", "unshare", "setns", "keyctl",
                 "add_key", "userfaultfd", "open_by_handle_at", "io_uring_setup"):
        assert call not in allowed
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


def test_default_seccomp_profile_is_dockers_data():
    raw = json.load(open(seccomp.DEFAULT_PROFILE_PATH))
    assert raw["defaultAction"] == "SCMP_ACT_ERRNO" and raw["archMap"]
    notice = open(seccomp.DEFAULT_PROFILE_PATH.replace(".json", ".NOTICE")).read()
    assert "Apache License" in notice and "moby/profiles" in notice


def names_of(p, action="SCMP_ACT_ALLOW", plain=True):
    return {n for r in p["syscalls"] if r["action"] == action and (not plain or "args" not in r)
            for n in r["names"]}


def test_profile_conditions_follow_caps_arch_and_kernel():
    raw = seccomp.load(seccomp.DEFAULT_PROFILE_PATH)
    base = seccomp.oci_profile(raw, DEFAULT_CAPABILITIES, machine="x86_64", kernel="6.1.0-18-amd64")
    assert base["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]  # x32 left out: seccomp.SKIPPED_SUBARCHES
    assert "chroot" in names_of(base) and "arch_prctl" in names_of(base)  # CAP_SYS_CHROOT; amd64
    assert "s390_runtime_instr" not in names_of(base) and "mount" not in names_of(base)
    assert "clone3" in names_of(base, "SCMP_ACT_ERRNO")  # ENOSYS without CAP_SYS_ADMIN: glibc falls back
    clone = [r for r in base["syscalls"] if r["names"] == ["clone"]]
    assert clone == [{"names": ["clone"], "action": "SCMP_ACT_ALLOW",  # no namespace flags
                      "args": [{"index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ"}]}]
    admin = seccomp.oci_profile(raw, (*DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN"), machine="x86_64",
                                kernel="6.1.0")
    assert {"mount", "unshare", "setns", "clone"} <= names_of(admin)
    assert "clone3" not in names_of(admin, "SCMP_ACT_ERRNO")
    old = seccomp.oci_profile(raw, DEFAULT_CAPABILITIES, machine="x86_64", kernel="4.4.0")
    assert "ptrace" not in names_of(old) and "ptrace" in names_of(base)
    arm = seccomp.oci_profile(raw, (), machine="aarch64", kernel="6.1")
    assert arm["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"] and "chroot" not in names_of(arm)
    for p in (base, admin, old, arm):  # only the keys runc 1.1 reads
        for r in p["syscalls"]:
            assert set(r) <= {"names", "action", "errnoRet", "args"}


@pytest.mark.parametrize("bad, problem", [
    ({"defaultAction": "SCMP_ACT_NOTIFY"}, "action"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": -1}, "errnoRet"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "BOOM"}]}, "action"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read;rm"], "action": "SCMP_ACT_ALLOW"}]},
     "names"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                                                        "args": [{"index": 9, "value": 1, "op": "SCMP_CMP_EQ"}]}]},
     "index"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "flags": ["SECCOMP_FILTER_FLAG_NEW_LISTENER"]}, "flag"),
])
def test_a_bad_custom_profile_is_refused_with_its_fault(tmp_path, bad, problem):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(InvalidInput, match=problem):
        seccomp.profile_for(str(path))


def test_profile_settings_unconfined_missing_and_oci_format(tmp_path):
    assert seccomp.profile_for("unconfined") is None
    with pytest.raises(InvalidInput, match="readable"):
        seccomp.profile_for(str(tmp_path / "missing.json"))
    (tmp_path / "junk.json").write_text("{nope")
    with pytest.raises(InvalidInput, match="not valid JSON"):
        seccomp.profile_for(str(tmp_path / "junk.json"))
    oci = {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
           "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}
    (tmp_path / "oci.json").write_text(json.dumps(oci))
    assert seccomp.oci_profile(seccomp.profile_for(str(tmp_path / "oci.json")), ()) == oci
    c = config(spec(), security=Security(profile=None))
    assert "seccomp" not in c["linux"]


def test_a_non_root_process_gets_no_capabilities():
    p = config(spec(), uid=1000, gid=1000)["process"]
    assert p["capabilities"]["bounding"] == list(DEFAULT_CAPABILITIES)
    assert p["capabilities"]["effective"] == p["capabilities"]["permitted"] == []
    assert config(spec(), security=Security(no_new_privileges=True))["process"]["noNewPrivileges"] is True


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


def test_cap_add_and_drop_follow_dockers_order_and_the_filter_follows_them():
    from containers.security import ALL_CAPABILITIES, adjusted
    assert adjusted(DEFAULT_CAPABILITIES, ("CAP_NET_ADMIN",), ("CAP_NET_RAW",)) == \
        tuple(c for c in DEFAULT_CAPABILITIES if c != "CAP_NET_RAW") + ("CAP_NET_ADMIN",)
    assert adjusted(DEFAULT_CAPABILITIES, ("CAP_CHOWN",), ("ALL",)) == ("CAP_CHOWN",)
    assert adjusted(DEFAULT_CAPABILITIES, ("ALL",))[:14] == DEFAULT_CAPABILITIES
    assert set(adjusted((), ("ALL",))) == set(ALL_CAPABILITIES) and len(ALL_CAPABILITIES) == 41
    c = config(spec(cap_add=("CAP_SYS_ADMIN",)))
    allowed = {n for r in c["linux"]["seccomp"]["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]}
    assert {"mount", "unshare"} <= allowed  # Docker's profile follows the caps granted
    assert "CAP_SYS_ADMIN" in c["process"]["capabilities"]["bounding"]
    with pytest.raises(InvalidInput, match="not a capability"):
        from containers import validate
        validate.check_spec(spec(cap_drop=("CAP_NOPE",)))


def test_the_systemd_driver_places_each_container_in_a_scope_of_the_slice(tmp_path):
    """runc --systemd-cgroup: cgroupsPath slice:prefix:name; systemd nests a dashed slice in
    its prefixes; the scopes under it name the containers (nothing else there is one)."""
    assert cgroups.systemd_cgroups_path("nodeagent", "web-1") == "nodeagent.slice:nodeagent:web-1"
    assert cgroups.slice_dir("nodeagent") == "nodeagent.slice"
    assert cgroups.slice_dir("na-test-3") == "na.slice/na-test.slice/na-test-3.slice"
    assert cgroups.scope_unit("nodeagent", "web-1") == "nodeagent-web-1.scope"
    v1 = tmp_path / "v1"
    for ctrl in ("memory", "pids", "cpuacct"):
        for leaf in ("nodeagent-web-1.scope", "nodeagent-db.x.scope", "other.scope", "nodeagent-.scope"):
            (v1 / ctrl / "nodeagent.slice" / leaf).mkdir(parents=True)
    assert cgroups.scope_names("nodeagent", root=str(v1)) == {"web-1", "db.x"}
    scope = v1 / "memory" / "nodeagent.slice" / "nodeagent-web-1.scope"
    (scope / "memory.usage_in_bytes").write_text("4096\n")
    (v1 / "pids" / "nodeagent.slice" / "nodeagent-web-1.scope" / "pids.current").write_text("2\n")
    st = cgroups.read_stats(cgroups.slice_dir("nodeagent"), cgroups.scope_unit("nodeagent", "web-1"), root=str(v1))
    assert (st["memory_bytes"], st["pids"]) == (4096, 2)
