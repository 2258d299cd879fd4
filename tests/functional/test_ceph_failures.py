"""Ceph failures: unreachable, wrong key, missing pool, pool full. Clear errors naming the
pool and the fix; nothing partial left in the pool."""
from __future__ import annotations

import io
import json
import os
import re
import socket
import time

import pytest

from agent.errors import InsufficientResources, Unavailable
from storage.backend import VolumeSpec
from storage.units import MiB

pytestmark = pytest.mark.real



def _conf_with_mon(ceph, tmp_path, port):
    text = open(ceph.conf).read()
    text = re.sub(r"mon_host = .*", f"mon_host = v2:127.0.0.1:{port}", text)
    p = tmp_path / "ceph.conf"
    p.write_text(text)
    return str(p)


def test_ceph_unreachable(ceph, tmp_path):
    from storage.rbd import RbdBackend

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = RbdBackend("blkdown", pool=ceph.rbd_pool, conf=_conf_with_mon(ceph, tmp_path, port),
                   keyring=ceph.keyring, connect_timeout=2)
    with pytest.raises(Unavailable, match="pool blkdown: cannot connect to Ceph.*monitors"):
        b.list_volumes()
    missing_conf = RbdBackend("blk2", pool="rbd", conf=str(tmp_path / "nope.conf"))
    with pytest.raises(Unavailable, match="does not exist"):
        missing_conf.usage()


def test_wrong_key_and_missing_pool(ceph, tmp_path):
    from storage.rbd import RbdBackend

    bad = tmp_path / "keyring"
    bad.write_text("[client.admin]\n\tkey = AQBz5S9kAAAAABAAo0vU+6qzG6wXyJ2dYlpHCQ==\n")
    b = RbdBackend("blkkey", pool=ceph.rbd_pool, conf=ceph.conf, keyring=str(bad),
                   connect_timeout=3)
    with pytest.raises(Unavailable, match="user and keyring"):
        b.put_blob(io.BytesIO(b"x"))
    nopool = RbdBackend("blkpool", pool="no-such-pool", conf=ceph.conf, keyring=ceph.keyring)
    with pytest.raises(Unavailable, match="'no-such-pool' does not exist.*ceph osd pool create"):
        nopool.list_blobs()
    nopool.close()


def _wait_full(ceph, pool, full=True, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in json.loads(ceph.run("ceph", "osd", "pool", "ls", "detail", "-f",
                                     "json").stdout):
            if p["pool_name"] == pool and ("full" in p.get("flags_names", "")) == full:
                return
        time.sleep(0.5)
    raise AssertionError(f"pool {pool} never became {'full' if full else 'not full'}")


def test_pool_full_is_insufficient_resources_and_leaves_nothing(ceph, tmp_path):
    from testbed.ceph_cluster import block_backend

    b = block_backend(tmp_path, quota=8 * MiB)
    try:
        assert b.usage().capacity == 8 * MiB
        with pytest.raises(InsufficientResources, match=f"{b.pool}.*set-quota"):
            b.put_blob(io.BytesIO(os.urandom(MiB)), size=16 * MiB)  # known too big up front
        src = tmp_path / "filler.raw"
        src.write_bytes(os.urandom(12 * MiB))
        # filled behind the backend's back (it would refuse: 12 MiB > quota)
        ceph.run("rbd", "import", str(src), f"{b.pool}/navol.filler")
        _wait_full(ceph, b.pool)
        before = ceph.run("rbd", "ls", b.pool).stdout.split()
        with pytest.raises(InsufficientResources, match=f"Ceph pool '{b.pool}' is full.*set-quota"):
            b.put_blob(io.BytesIO(b"more"))
        with pytest.raises(InsufficientResources, match="is full"):
            b.create_volume(VolumeSpec("more", MiB, "raw"))
        assert ceph.run("rbd", "ls", b.pool).stdout.split() == before
        with pytest.raises(InsufficientResources, match="set-quota"):  # Ceph refuses even this
            b.delete_volume("filler")
        ceph.run("ceph", "osd", "pool", "set-quota", b.pool, "max_bytes", "0")  # the fix given
        _wait_full(ceph, b.pool, full=False)
        assert b.delete_volume("filler") is True
        assert ceph.run("rbd", "ls", b.pool).stdout.split() == []
    finally:
        b.close()
