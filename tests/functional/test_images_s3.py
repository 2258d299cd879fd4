"""ImageStore with an object pool (S3 on the live radosgw): images living in S3 are
fetched once into a host's local or block pool and reused from there; two hosts share
images through one bucket; fetch failures leave nothing behind."""
from __future__ import annotations

import os
import socket
import subprocess

import pytest

from agent.errors import InvalidInput, NotFound, Unavailable
from agent.state import Database
from storage import ImageStore
from storage.local import LocalBackend
from storage.s3 import S3Backend
from storage.units import MiB
from testbed import ocibuild

pytestmark = pytest.mark.real



@pytest.fixture
def bucket(ceph, tmp_path):
    from testbed.ceph_cluster import object_backend

    b = object_backend(tmp_path, part_size=5 * MiB, concurrency=3)
    b.name = "s3"  # the pool's name in these hosts' configs
    yield b
    b.close()


def host(tmp_path, name, obj, *more) -> ImageStore:
    """One simulated host: its own state db, local pool and cache, sharing ``obj``."""
    root = tmp_path / name
    pools = {"local": LocalBackend("local", path=str(root / "pool")), "s3": obj,
             **{b.name: b for b in more}}
    return ImageStore(Database(root / "state.db"), pools, default_pool="local",
                      cache_dir=str(root / "cache"))


def s3_gets(obj) -> list:
    """Every S3 GetObject the backend sends from now on (a boto3 event hook)."""
    seen = []
    obj.client.meta.events.register("before-call.s3.GetObject",
                                    lambda params, **_: seen.append(params.get("Range")))
    return seen


def disk(path, size=6 * MiB) -> str:
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    return str(path)


def qcow2(path) -> str:
    raw = disk(str(path) + ".raw", 2 * MiB)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, str(path)],
                   check=True)
    return str(path)


def local_blobs(store, pool="local"):
    return [b.digest for b in store.pools[pool].list_blobs()]


def test_clone_fetches_once_into_the_host_pool_and_reuses_it(bucket, tmp_path):
    from testbed.ceph_cluster import block_backend

    block = block_backend(tmp_path)
    a = host(tmp_path, "a", bucket, block)
    try:
        img = a.import_file(disk(tmp_path / "a.raw"), name="a", pool="s3")
        assert img.pool == "s3" and bucket.find_blob(img.digest).size == 6 * MiB
        assert local_blobs(a) == []
        gets = s3_gets(bucket)
        v1 = a.clone_disk("a", "d1")  # an object pool holds no volumes: the default pool
        assert v1.pool == "local" and v1.base == img.digest and gets  # fetched from S3
        assert local_blobs(a) == [img.digest] and a.cached_in("a") == ["local", "s3"]
        gets.clear()
        v2 = a.clone_disk("a", "d2")
        assert v2.base == img.digest and gets == []  # the cached copy, no S3 GET
        v3 = a.clone_disk("a", "d3", pool=block.name)  # a block pool caches its own copy
        assert v3.pool == block.name and gets and block.find_blob(img.digest)
        gets.clear()
        a.clone_disk("a", "d4", pool=block.name)
        assert gets == [] and a.cached_in("a") == [block.name, "local", "s3"]
        assert a.gc()["blobs_removed"] == 0  # all in use
        for pool, vol in (("local", "d1"), ("local", "d2"), (block.name, "d3"), (block.name, "d4")):
            assert a.release(pool, vol)
        assert a.gc()["blobs_removed"] == 2  # the caches go, the image stays in S3
        assert local_blobs(a) == [] and block.find_blob(img.digest) is None
        assert a.cached_in("a") == ["s3"] and bucket.find_blob(img.digest)
        a.clone_disk("a", "d5")  # fetched again
        assert gets and local_blobs(a) == [img.digest]
        assert os.listdir(a.tmp_dir) == []
        a.release("local", "d5")
    finally:
        block.close()


def test_two_hosts_share_images_through_one_bucket(bucket, tmp_path):
    a, b = host(tmp_path, "a", bucket), host(tmp_path, "b", bucket)
    vm = a.import_file(qcow2(tmp_path / "vm.qcow2"), name="vm")
    assert vm.pool == "local" and bucket.find_blob(vm.digest) is None
    a.copy_to_pool("vm", "s3")
    assert a.copies("vm") == ["s3"] and bucket.find_blob(vm.digest).size == vm.size
    assert a.gc()["blobs_removed"] == 0  # a kept copy, not a cache
    layout = ocibuild.write_layout(str(tmp_path / "l"), {"latest": ocibuild.busybox_layers()})
    ct = a.import_oci(layout, name="bb", pool="s3")  # container images straight into S3
    assert ct.pool == "s3" and bucket.find_blob(ct.digest)

    shared = b.import_digest("s3", vm.digest, name="shared")
    assert (shared.id, shared.kind, shared.format, shared.pool, shared.virtual_size) == \
        (vm.id, "vm", "qcow2", "s3", vm.virtual_size)
    assert local_blobs(b) == [vm.digest]  # fetched to inspect it: kept as the cached base
    gets = s3_gets(bucket)
    vol = b.clone_disk("shared", "disk0")
    assert vol.pool == "local" and vol.base == vm.digest and gets == []
    assert os.stat(b.pools["local"].blob_path(vm.digest)).st_mode & 0o777 == 0o444
    bb = b.import_digest("s3", ct.digest, name="bb")
    assert (bb.kind, bb.layers, bb.config) == ("container", ct.layers, ct.config)
    rootfs = b.prepare_rootfs("bb", "c0")
    assert rootfs.volume.pool == "local"
    assert os.path.isfile(os.path.join(rootfs.lowerdirs[-1], "bin", "busybox"))

    # host B never removes what host A put into the shared bucket
    b.release("local", "disk0")
    b.release("local", "c0")
    assert b.delete("shared") and b.delete("bb")
    b.gc()
    assert bucket.find_blob(vm.digest) and bucket.find_blob(ct.digest)
    assert local_blobs(b) == []
    # host A owns them: deleted and collected there, they leave the bucket
    assert a.delete("vm") and a.delete("bb")
    a.gc()
    assert bucket.list_blobs() == [] and local_blobs(a) == []


def test_fetch_failures_are_clear_and_leave_nothing(bucket, tmp_path, ceph):
    a = host(tmp_path, "a", bucket)
    img = a.import_file(disk(tmp_path / "a.raw", 2 * MiB), name="a", pool="s3")
    with pytest.raises(NotFound, match="pool s3 holds no blob.*put the image there first"):
        a.import_digest("s3", "sha256:" + "4" * 64, name="nothing")

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = S3Backend("s3", endpoint=f"http://127.0.0.1:{port}", bucket=bucket.bucket,
                     access_key="a", secret_key="b")
    unreachable = ImageStore(a.db, {"local": a.pools["local"], "s3": down},
                             default_pool="local", cache_dir=a.cache_dir)
    with pytest.raises(Unavailable, match=r"image \w+ from pool s3 into pool local.*"
                                          "unreachable.*check that the endpoint"):
        unreachable.clone_disk("a", "d")

    bucket.client.put_object(Bucket=bucket.bucket, Key="sha256/" + img.id, Body=b"evil")
    with pytest.raises(InvalidInput, match="pool s3.*corrupt"):
        a.clone_disk("a", "d")

    bucket.client.delete_object(Bucket=bucket.bucket, Key="sha256/" + img.id)
    with pytest.raises(NotFound, match="pool s3 no longer holds blob.*import the image"):
        a.clone_disk("a", "d")

    assert local_blobs(a) == [] and a.references("a") == []
    assert a.cached_in("a") == ["s3"]  # no catalog row for the target pool
    assert os.listdir(a.tmp_dir) == [] and os.listdir(a.pools["local"].blob_dir) == []


def test_concurrent_first_clones_fetch_once(bucket, tmp_path):
    import threading

    a = host(tmp_path, "a", bucket)
    img = a.import_file(disk(tmp_path / "a.raw", 3 * MiB), name="a", pool="s3")
    gets, errors = s3_gets(bucket), []

    def clone(n):
        try:
            a.clone_disk("a", f"d{n}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=clone, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(gets) == 1  # one 3 MiB range: one GET for all three
    assert sorted(v for _, v in a.references("a")) == ["d0", "d1", "d2"]
    assert local_blobs(a) == [img.digest]
