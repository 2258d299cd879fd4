"""Remote storage benchmarks on a throw-away Ceph (scripts/ceph-dev-cluster), JSON lines:

(a) 1 GiB image upload/download through S3Backend (radosgw) vs plain boto3
    upload_file/download_file with default settings;
(b) RBD clone of a 1 GiB and an 8 GiB image through RbdBackend.clone_volume vs `rbd clone`;
(c) the first clone of a 1 GiB image living in S3 into a local pool (ImageStore.clone_disk:
    fetch, verify, cache, qcow2 overlay) vs boto3 download_file of the same object.

Run: .venv/bin/python bench/storage_remote.py   (medians of ROUNDS runs)
"""
from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from jsonline import emitter
from testbed import ceph_cluster
from storage.units import GiB, MiB

S3_ROUNDS = 3
DOWNLOAD_ROUNDS = 6
CLONE_ROUNDS = 7
SETTLE_S = 5  # free page reporting gives freed guest memory back to the host within seconds


def settle() -> None:
    """Start every download from the same state: earlier writes on disk, and the memory the
    previous round freed (its deleted file's page cache) given back to the host. A download
    run right after another one reuses pages the host still backs and is up to 2x faster,
    which would favour whichever side runs second."""
    os.sync()
    time.sleep(SETTLE_S)


emit = emitter("storage_remote", digits=1)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def make_image(path: str, size: int) -> str:
    h = hashlib.sha256()
    block = os.urandom(4 * MiB)
    with open(path, "wb") as f:
        for i in range(size // len(block)):
            chunk = block[:8] + i.to_bytes(8, "big") + block[16:]  # distinct blocks
            h.update(chunk)
            f.write(chunk)
    return "sha256:" + h.hexdigest()


def bench_s3(env, work: str) -> None:
    from boto3.s3.transfer import TransferConfig  # noqa: F401 - defaults are the peer

    from storage.s3 import S3Backend

    src = os.path.join(work, "image.raw")
    digest = make_image(src, GiB)
    client = ceph_cluster.s3_client(env)
    backend = S3Backend("obj", endpoint=env.s3_endpoint, bucket=env.s3_bucket,
                        access_key=env.s3_access_key, secret_key=env.s3_secret_key,
                        region=env.s3_region)
    up, up_known, up_peer, down, down_peer = [], [], [], [], []
    info = None

    def put():  # digest unknown: hashed on the way up, then copied into place
        nonlocal info
        with open(src, "rb") as f:
            up.append(timed(lambda: backend.put_blob(f)))
        info = backend.stat_blob(digest)
        backend.delete_blob(digest)  # the digest-known upload makes it again

    def put_known():  # digest known (the image store's case): hashed in flight
        with open(src, "rb") as f:
            up_known.append(timed(lambda: backend.put_blob(f, digest=digest)))

    def put_peer():
        up_peer.append(timed(lambda: client.upload_file(src, env.s3_bucket, "peer/image.raw")))

    for r in range(S3_ROUNDS):  # put before put_known: both make the same object
        for fn in ((put, put_known, put_peer) if r % 2 == 0 else (put_peer, put, put_known)):
            settle()
            fn()
        if r < S3_ROUNDS - 1:
            backend.delete_blob(info.digest)
            client.delete_object(Bucket=env.s3_bucket, Key="peer/image.raw")
        env.run("radosgw-admin", "gc", "process", "--include-all")  # free the OSD now
    dst = os.path.join(work, "down.raw")
    sides = [(down, lambda: backend.fetch_blob(info.digest, dst)),
             (down_peer, lambda: client.download_file(env.s3_bucket, "peer/image.raw", dst))]
    for r in range(DOWNLOAD_ROUNDS):
        for times, fn in sides[::1 if r % 2 == 0 else -1]:  # alternate who goes first
            settle()
            times.append(timed(fn))
            os.unlink(dst)
    backend.delete_blob(info.digest)
    client.delete_object(Bucket=env.s3_bucket, Key="peer/image.raw")
    env.run("radosgw-admin", "gc", "process", "--include-all")
    os.unlink(src)
    emit("s3_upload_1GiB", statistics.median(up), "boto3 upload_file (defaults)",
         statistics.median(up_peer))
    emit("s3_upload_1GiB_digest_known", statistics.median(up_known),
         "boto3 upload_file (defaults)", statistics.median(up_peer))
    emit("s3_download_1GiB", statistics.median(down), "boto3 download_file (defaults)",
         statistics.median(down_peer))
    backend.close()


def bench_rbd_clone(env, work: str) -> None:
    import rados
    import rbd

    from storage.rbd import BASE_SNAP, BLOB_PREFIX, RbdBackend

    backend = RbdBackend("blk", pool=env.rbd_pool, conf=env.conf, user=env.user,
                         keyring=env.keyring)
    # 1 GiB: a real blob (1 GiB written through put_blob); 8 GiB: a sparse image stored the
    # same way (nablob.<hex> with a protected "base" snapshot), 64 MiB of it written.
    src = os.path.join(work, "img1g.raw")
    d1 = make_image(src, GiB)
    with open(src, "rb") as f:
        backend.put_blob(f, digest=d1)
    os.unlink(src)
    ioctx = backend._io()
    d8 = "sha256:" + hashlib.sha256(b"sparse 8 GiB bench image").hexdigest()
    name8 = BLOB_PREFIX + d8[7:]
    rbd.RBD().create(ioctx, name8, 8 * GiB)
    with rbd.Image(ioctx, name8) as img:
        img.write(os.urandom(64 * MiB), 0)
        img.create_snap(BASE_SNAP)
        img.protect_snap(BASE_SNAP)
    for label, digest in (("1GiB", d1), ("8GiB", d8)):
        ours, peer = [], []
        parent = f"{env.rbd_pool}/{BLOB_PREFIX}{digest[7:]}@{BASE_SNAP}"
        for i in range(CLONE_ROUNDS):
            ours.append(timed(lambda: backend.clone_volume(digest, f"bench-{i}", format="raw")))
            peer.append(timed(lambda: subprocess.run(
                ["rbd", "-c", env.conf, "clone", parent, f"{env.rbd_pool}/peer-{i}"],
                check=True)))
        for i in range(CLONE_ROUNDS):
            backend.delete_volume(f"bench-{i}")
            env.run("rbd", "rm", f"{env.rbd_pool}/peer-{i}")
        emit(f"rbd_clone_{label}", statistics.median(ours), "rbd clone", statistics.median(peer))
    backend.delete_blob(d1)
    backend.delete_blob(d8)
    backend.close()
    del rados


def bench_image_cache(env, work: str) -> None:
    from agent.state import Database
    from storage import ImageStore
    from storage.local import LocalBackend
    from storage.s3 import S3Backend

    src = os.path.join(work, "image.raw")
    make_image(src, GiB)
    client = ceph_cluster.s3_client(env)
    obj = S3Backend("obj", endpoint=env.s3_endpoint, bucket=env.s3_bucket,
                    access_key=env.s3_access_key, secret_key=env.s3_secret_key,
                    region=env.s3_region)
    root = os.path.join(work, "host")
    store = ImageStore(Database(os.path.join(work, "state.db")),
                       {"local": LocalBackend("local", path=os.path.join(root, "pool")),
                        "obj": obj}, default_pool="local", cache_dir=os.path.join(root, "cache"))
    store.import_file(src, name="big", pool="obj")
    client.upload_file(src, env.s3_bucket, "peer/image.raw")
    os.unlink(src)
    ours, peer = [], []
    dst = os.path.join(work, "down.raw")
    def first_clone(i):
        ours.append(timed(lambda: store.clone_disk("big", f"d{i}")))
        store.release("local", f"d{i}")
        store.gc()  # drop the cached copy: every round is a cold cache

    def download(i):
        peer.append(timed(lambda: client.download_file(env.s3_bucket, "peer/image.raw", dst)))
        os.unlink(dst)

    for i in range(S3_ROUNDS):
        for fn in (first_clone, download)[::1 if i % 2 == 0 else -1]:  # alternate the order
            settle()
            fn(i)
    emit("s3_image_first_clone_1GiB", statistics.median(ours),
         "boto3 download_file (defaults)", statistics.median(peer))
    store.delete("big")
    store.gc()
    client.delete_object(Bucket=env.s3_bucket, Key="peer/image.raw")
    env.run("radosgw-admin", "gc", "process", "--include-all")
    obj.close()


def main() -> int:
    env = ceph_cluster.existing() or ceph_cluster.start()
    work = tempfile.mkdtemp(prefix="bench-storage-remote-", dir="/var/tmp")
    try:
        bench_rbd_clone(env, work)
        bench_s3(env, work)
        bench_image_cache(env, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if ceph_cluster.existing() is None:
            ceph_cluster.stop(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
