"""NBD exports by qemu-storage-daemon, read and written with qemu-io/qemu-img as clients."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from agent.errors import Conflict, InvalidInput, NotFound
from storage.backend import VolumeSpec
from storage.nbd import NbdExports
from storage.units import MiB

pytestmark = pytest.mark.real



def qemu_io(uri, *cmds, readonly=False):
    argv = ["qemu-io", "-f", "raw"] + (["-r"] if readonly else [])
    for c in cmds:
        argv += ["-c", c]
    return subprocess.run(argv + [uri], capture_output=True, text=True, timeout=60)


@pytest.fixture
def exports(db, tmp_path):
    n = NbdExports(db, str(tmp_path / "run"))
    yield n
    for e in n.list():
        n.delete(e.name)


@pytest.fixture
def local_volume(tmp_path):
    from storage.local import LocalBackend

    b = LocalBackend("local0", path=str(tmp_path / "pool"))
    yield b.create_volume(VolumeSpec("disk0", 16 * MiB, "qcow2"))
    b.close()


def test_local_qcow2_export_read_write_and_read_only(exports, local_volume):
    e = exports.create("disk0", local_volume)
    assert e.uri == f"nbd://127.0.0.1:{e.port}/disk0" and e.pid > 0
    w = qemu_io(e.uri, "write -P 0x5a 1M 64k")
    assert w.returncode == 0 and "wrote 65536" in w.stdout, w
    info = subprocess.run(["qemu-img", "info", e.uri], capture_output=True, text=True)
    assert "16 MiB" in info.stdout, info
    with pytest.raises(Conflict):
        exports.create("disk0", local_volume)
    assert exports.delete("disk0") is True
    assert exports.delete("disk0") is False
    assert qemu_io(e.uri, "read 0 4k").returncode != 0  # gone
    # the data went into the qcow2 file
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x5a 1M 64k",
                        local_volume.path], capture_output=True, text=True)
    assert r.returncode == 0 and "verification failed" not in r.stdout, r
    ro = exports.create("disk0-ro", local_volume, readonly=True)
    ok = qemu_io(ro.uri, "read -P 0x5a 1M 64k", readonly=True)
    assert ok.returncode == 0 and "verification failed" not in ok.stdout, ok
    bad = qemu_io(ro.uri, "write -P 0x11 0 4k")  # a writer is refused
    assert bad.returncode != 0 and "Permission denied" in bad.stderr
    assert [x.name for x in exports.list()] == ["disk0-ro"]


def test_rbd_volume_export(exports, ceph, tmp_path):
    from testbed.ceph_cluster import block_backend

    b = block_backend(tmp_path)
    try:
        vol = b.create_volume(VolumeSpec("nbdvol", 8 * MiB, "raw"))
        e = exports.create("rbdvol", vol)
        assert qemu_io(e.uri, "write -P 0x33 0 1M").returncode == 0
        assert exports.delete("rbdvol")
        out = subprocess.run(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x33 0 1M",
                              f"rbd:{b.pool}/navol.nbdvol:conf={ceph.conf}"],
                             capture_output=True, text=True)
        assert out.returncode == 0 and "verification failed" not in out.stdout, out
        b.delete_volume("nbdvol")
    finally:
        b.close()


def test_reconcile_forgets_dead_and_stops_unwanted(exports, local_volume, db, tmp_path):
    a = exports.create("a", local_volume, readonly=True)
    b = exports.create("b", local_volume, readonly=True)
    os.kill(a.pid, signal.SIGKILL)  # a daemon dies while the agent is down
    os.waitpid(a.pid, 0)
    again = NbdExports(db, str(tmp_path / "run"))  # the agent restarts
    assert again.reconcile(wanted=set()) == {"removed": ["a"], "stopped": ["b"]}
    assert again.list() == []
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{b.pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert qemu_io(b.uri, "read 0 4k", readonly=True).returncode != 0


def test_bad_requests_leave_nothing(exports, local_volume, tmp_path):
    with pytest.raises(InvalidInput):
        exports.create("bad name", local_volume)
    from dataclasses import replace
    with pytest.raises(NotFound):
        exports.create("gone", replace(local_volume, path=str(tmp_path / "missing.qcow2")))
    with pytest.raises(InvalidInput, match="cannot be exported"):
        exports.create("dir", replace(local_volume, path=None, uri="", format="dir"))
    assert exports.list() == []
