"""NBD exports by qemu-storage-daemon, read and written with qemu-io/qemu-img as clients:
over TLS (a per-export PSK by default, or x509 with the hosts' CA), refused to a client
without the credentials."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from agent.errors import Conflict, InvalidInput, NotFound
from storage.backend import VolumeSpec
from storage.nbd import NbdExports, client_options
from storage.units import MiB

pytestmark = pytest.mark.real



def qemu_io(export, *cmds, readonly=False, plain=False, **creds):
    """qemu-io on ``export`` with its client credentials (``plain``: none, by its nbd:// URI)."""
    argv = ["qemu-io"] + (["-r"] if readonly else [])
    for c in cmds:
        argv += ["-c", c]
    target = ["-f", "raw", export.uri] if plain else client_options(export, **creds)
    return subprocess.run(argv + target, capture_output=True, text=True, timeout=60)


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
    assert e.uri == f"nbd://127.0.0.1:{e.port}/disk0" and e.pid > 0 and e.tls == "psk"
    w = qemu_io(e, "write -P 0x5a 1M 64k")
    assert w.returncode == 0 and "wrote 65536" in w.stdout, w
    info = subprocess.run(["qemu-img", "info", *client_options(e)], capture_output=True, text=True)
    assert "16 MiB" in info.stdout, info
    with pytest.raises(Conflict):
        exports.create("disk0", local_volume)
    assert exports.delete("disk0") is True
    assert exports.delete("disk0") is False
    assert qemu_io(e, "read 0 4k").returncode != 0  # gone
    assert not os.path.exists(e.psk_dir)  # and its key with it
    # the data went into the qcow2 file
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x5a 1M 64k",
                        local_volume.path], capture_output=True, text=True)
    assert r.returncode == 0 and "verification failed" not in r.stdout, r
    ro = exports.create("disk0-ro", local_volume, readonly=True)
    ok = qemu_io(ro, "read -P 0x5a 1M 64k", readonly=True)
    assert ok.returncode == 0 and "verification failed" not in ok.stdout, ok
    bad = qemu_io(ro, "write -P 0x11 0 4k")  # a writer is refused
    assert bad.returncode != 0 and "Permission denied" in bad.stderr
    assert [x.name for x in exports.list()] == ["disk0-ro"]


def test_rbd_volume_export(exports, ceph, tmp_path):
    from testbed.ceph_cluster import block_backend

    b = block_backend(tmp_path)
    try:
        vol = b.create_volume(VolumeSpec("nbdvol", 8 * MiB, "raw"))
        e = exports.create("rbdvol", vol)
        assert qemu_io(e, "write -P 0x33 0 1M").returncode == 0
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
    assert qemu_io(b, "read 0 4k", readonly=True).returncode != 0
    assert sorted(os.listdir(tmp_path / "run")) == []  # no key of either left


def test_a_psk_export_serves_only_the_holder_of_its_key(exports, local_volume, tmp_path):
    e = exports.create("secret", local_volume, readonly=True)
    keys = os.path.join(e.psk_dir, "keys.psk")
    assert os.stat(keys).st_mode & 0o777 == 0o600 and os.stat(e.psk_dir).st_mode & 0o777 == 0o700
    plain = qemu_io(e, "read 0 4k", plain=True, readonly=True)  # no TLS at all
    assert plain.returncode != 0 and "TLS" in plain.stderr, plain.stderr
    wrong = tmp_path / "wrong-key"
    wrong.mkdir(mode=0o700)
    (wrong / "keys.psk").write_text(f"secret:{'ab' * 32}\n")  # the right identity, another key
    bad = qemu_io(e, "read 0 4k", readonly=True, psk_dir=str(wrong))
    assert bad.returncode != 0 and "TLS" in bad.stderr, bad.stderr
    other = exports.create("other", local_volume, readonly=True)  # each export has its own key
    assert qemu_io(other, "read 0 4k", readonly=True, psk_dir=e.psk_dir).returncode != 0
    ok = qemu_io(e, "read -P 0 0 64k", readonly=True)
    assert ok.returncode == 0 and "verification failed" not in ok.stdout, ok


def test_an_x509_export_serves_only_a_client_of_its_ca(db, local_volume, tmp_path):
    from testbed.pki import TestCA

    ca = TestCA(tmp_path / "ca")
    mine = ca.host_files(tmp_path / "pki", "nbd-host", "127.0.0.1") / "qemu"
    n = NbdExports(db, str(tmp_path / "run-x509"), tls="x509", x509_dir=str(mine))
    try:
        e = n.create("certified", local_volume)
        assert e.tls == "x509" and e.psk_dir is None
        ok = qemu_io(e, "write -P 0x24 0 64k")
        assert ok.returncode == 0 and "wrote 65536" in ok.stdout, ok
        assert qemu_io(e, "read 0 4k", plain=True, readonly=True).returncode != 0
        theirs = TestCA(tmp_path / "other-ca").host_files(tmp_path / "other", "intruder", "127.0.0.1") / "qemu"
        # it trusts our server (and its own CA, or QEMU will not present its certificate)
        bundle = (mine / "ca-cert.pem").read_bytes() + (theirs / "ca-cert.pem").read_bytes()
        (theirs / "ca-cert.pem").write_bytes(bundle)
        bad = qemu_io(e, "read 0 4k", readonly=True, x509_dir=str(theirs))
        assert bad.returncode != 0 and "Our own certificate" not in bad.stderr, bad.stderr  # the server said no
    finally:
        for x in n.list():
            n.delete(x.name)


def test_plain_nbd_only_on_loopback(db, tmp_path):
    with pytest.raises(InvalidInput, match="must use TLS"):
        NbdExports(db, str(tmp_path / "run"), host="198.18.0.9", tls="none")
    with pytest.raises(InvalidInput, match="x509_dir"):
        NbdExports(db, str(tmp_path / "run"), tls="x509")


def test_bad_requests_leave_nothing(exports, local_volume, tmp_path):
    with pytest.raises(InvalidInput):
        exports.create("bad name", local_volume)
    from dataclasses import replace
    with pytest.raises(NotFound):
        exports.create("gone", replace(local_volume, path=str(tmp_path / "missing.qcow2")))
    with pytest.raises(InvalidInput, match="cannot be exported"):
        exports.create("dir", replace(local_volume, path=None, uri="", format="dir"))
    assert exports.list() == []
