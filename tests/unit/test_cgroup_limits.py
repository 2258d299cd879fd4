"""containers.cgroups.set_limits (the live resize's writes, what `runc update` writes) on a
cgroup tree made of plain files, with the kernel's rules for them modelled in the one
function that writes (v1: memory <= memory+swap or EINVAL, a limit below the usage EBUSY):
the order for growing and shrinking, all or nothing on a failure, v2's files.
The real kernel's files after a PATCH: tests/api/test_resize_runc.py."""
from __future__ import annotations

import errno
import os

import pytest

from containers import cgroups
from containers.runtime import Limits

MiB = 1 << 20
UNLIMITED = 9223372036854771712  # what v1 reads back for -1


@pytest.fixture
def kernel(monkeypatch):
    """cgroups._write with v1 memory's checks; records every write as (file name, value)."""
    writes: list[tuple[str, str]] = []
    real = cgroups._write

    def write(path: str, value: str) -> None:
        d, f = os.path.split(path)
        if f in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
            def num(text):  # -1: unlimited
                return UNLIMITED if int(text) == -1 else int(text)
            v = num(value)
            lim = v if f == "memory.limit_in_bytes" else num(open(os.path.join(d, "memory.limit_in_bytes")).read())
            sw = v if f != "memory.limit_in_bytes" else num(open(os.path.join(d, "memory.memsw.limit_in_bytes")).read())
            if lim > sw:
                raise OSError(errno.EINVAL, "memory above memory+swap", path)
            if v < int(open(os.path.join(d, "memory.usage_in_bytes")).read()):
                raise OSError(errno.EBUSY, "Device or resource busy", path)
        real(path, value)
        writes.append((f, value))
    monkeypatch.setattr(cgroups, "_write", write)
    return writes


def _v1(tmp_path, mem=64 * MiB, quota=50000, usage=MiB):
    """A v1 tree with one container "c": its runc cgroup_paths and the root."""
    paths = {}
    files = {"memory": {"memory.limit_in_bytes": mem, "memory.memsw.limit_in_bytes": mem,
                        "memory.usage_in_bytes": usage, "memory.memsw.usage_in_bytes": usage},
             "cpu": {"cpu.cfs_quota_us": quota, "cpu.cfs_period_us": 100000},
             "pids": {"pids.max": "max"}}
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.memsw.limit_in_bytes").write_text("9223372036854771712\n")
    for ctrl, kv in files.items():
        d = tmp_path / ctrl / "nodeagent" / "c"
        d.mkdir(parents=True)
        for f, v in kv.items():
            (d / f).write_text(f"{v}\n")
        paths[ctrl] = str(d)
    paths[""] = str(tmp_path / "unified" / "nodeagent" / "c")  # hybrid: runc lists it, never written
    return paths, str(tmp_path)


def _read(paths, ctrl, f):
    return open(os.path.join(paths[ctrl], f)).read().strip()


def test_v1_grow_and_shrink_in_the_kernels_order(tmp_path, kernel):
    paths, root = _v1(tmp_path)
    cgroups.set_limits(paths, cgroups.update_resources(Limits(cpus=1.5, memory_mib=128), root), root)
    assert kernel[:2] == [("memory.memsw.limit_in_bytes", str(128 * MiB)), ("memory.limit_in_bytes", str(128 * MiB))]
    assert _read(paths, "cpu", "cpu.cfs_quota_us") == "150000"
    assert ("cpu.cfs_period_us", "100000") not in kernel, "a file holding the value is not written"
    kernel.clear()
    cgroups.set_limits(paths, cgroups.update_resources(Limits(cpus=0.5, memory_mib=32, pids_max=20), root), root)
    assert kernel == [("memory.limit_in_bytes", str(32 * MiB)), ("memory.memsw.limit_in_bytes", str(32 * MiB)),
                      ("cpu.cfs_quota_us", "50000"), ("pids.max", "20")]
    kernel.clear()
    cgroups.set_limits(paths, cgroups.update_resources(Limits(), root), root)  # no limits: unlimited
    assert kernel == [("memory.memsw.limit_in_bytes", "-1"), ("memory.limit_in_bytes", "-1"),
                      ("cpu.cfs_quota_us", "-1"), ("pids.max", "max")]


def test_v1_shrink_below_usage_is_busy_and_changes_nothing(tmp_path, kernel):
    paths, root = _v1(tmp_path, usage=40 * MiB)
    with pytest.raises(cgroups.MemoryBusy) as e:
        cgroups.set_limits(paths, cgroups.update_resources(Limits(cpus=0.25, memory_mib=16), root), root)
    assert e.value.usage == 40 * MiB and e.value.errno == errno.EBUSY
    assert kernel == []
    assert _read(paths, "memory", "memory.limit_in_bytes") == str(64 * MiB)
    assert _read(paths, "cpu", "cpu.cfs_quota_us") == "50000"


def test_a_later_failure_puts_back_what_was_written(tmp_path, kernel, monkeypatch):
    paths, root = _v1(tmp_path)
    model = cgroups._write

    def fault(path, value):  # the cpu controller refuses (a parent's quota, say)
        if path.endswith("cpu.cfs_quota_us") and value == "150000":
            raise OSError(errno.EINVAL, "Invalid argument", path)
        model(path, value)
    monkeypatch.setattr(cgroups, "_write", fault)
    with pytest.raises(OSError):
        cgroups.set_limits(paths, cgroups.update_resources(Limits(cpus=1.5, memory_mib=128), root), root)
    assert _read(paths, "memory", "memory.limit_in_bytes") == str(64 * MiB)
    assert _read(paths, "memory", "memory.memsw.limit_in_bytes") == str(64 * MiB)
    assert kernel[-2:] == [("memory.limit_in_bytes", str(64 * MiB)), ("memory.memsw.limit_in_bytes", str(64 * MiB))]


def test_a_gone_cgroup_or_a_dir_outside_the_root_writes_nothing(tmp_path, kernel):
    paths, root = _v1(tmp_path)
    with pytest.raises(ValueError):
        cgroups.set_limits({**paths, "cpu": "/etc"}, cgroups.update_resources(Limits(cpus=1), root), root)
    with pytest.raises(ValueError):
        cgroups.set_limits({**paths, "cpu": f"{root}/cpu/../../etc"}, cgroups.update_resources(Limits(cpus=1), root),
                           root)
    for f in os.listdir(paths["cpu"]):
        os.unlink(os.path.join(paths["cpu"], f))
    os.rmdir(paths["cpu"])
    with pytest.raises(FileNotFoundError):
        cgroups.set_limits(paths, cgroups.update_resources(Limits(cpus=1, memory_mib=128), root), root)
    assert kernel == []


def test_v2_files(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    d = tmp_path / "nodeagent" / "c"
    d.mkdir(parents=True)
    for f, v in (("memory.max", "max"), ("memory.swap.max", "max"), ("cpu.max", "max 100000"), ("pids.max", "max"),
                 ("memory.current", str(64 * MiB)),
                 ("memory.stat", f"anon {8 * MiB}\nfile {56 * MiB}\nshmem {4 * MiB}")):
        (d / f).write_text(v + "\n")
    paths, root = {"": str(d)}, str(tmp_path)
    cgroups.set_limits(paths, cgroups.update_resources(Limits(cpus=1.5, memory_mib=128, pids_max=9), root), root)
    got = {f: (d / f).read_text().strip() for f in ("memory.max", "memory.swap.max", "cpu.max", "pids.max")}
    assert got == {"memory.max": str(128 * MiB), "memory.swap.max": "0", "cpu.max": "150000 100000",
                   "pids.max": "9"}
    cgroups.set_limits(paths, cgroups.update_resources(Limits(), root), root)
    assert (d / "memory.max").read_text() == "max" and (d / "cpu.max").read_text() == "max 100000"
    # 64 MiB held, 52 of them page cache the kernel can drop: 12 MiB it cannot (anon + tmpfs)
    cgroups.set_limits(paths, cgroups.update_resources(Limits(memory_mib=16), root), root)
    assert (d / "memory.max").read_text() == str(16 * MiB)
    with pytest.raises(cgroups.MemoryBusy) as e:  # the kernel would OOM-kill: refused, nothing written
        cgroups.set_limits(paths, cgroups.update_resources(Limits(cpus=0.5, memory_mib=8), root), root)
    assert e.value.usage == 12 * MiB
    assert (d / "memory.max").read_text() == str(16 * MiB) and (d / "cpu.max").read_text() == "max 100000"
