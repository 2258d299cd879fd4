"""Backup of a VM disk with 1 GiB written to the object pool (radosgw on a throw-away Ceph,
scripts/ceph-dev-cluster), JSON lines:

- vm_backup_1g_s3: POST /v1/instances/{id}/backups until its operation succeeded (the agent
  in-process on the fake driver, whose disk copy is the same `qemu-img convert` the libvirt
  driver runs for a stopped VM: the disk layer and the image exported, hashed, streamed as one
  tar into a multipart upload, the marker written) vs the peer measured in the same run:
  `qemu-img convert -O qcow2` of the same disk + boto3 upload_file (default settings).
- vm_backup_1g_rbd: the same for a VM whose root disk is an RBD image of a block pool with
  1 GiB written (the agent: an RBD snapshot, `qemu-img convert` of it into a standalone qcow2,
  the image exported, hashed, streamed into the multipart upload, the snapshot removed) vs
  `rbd snap create` + `rbd export` of the snapshot + boto3 upload_file + `rbd snap rm`.

Run: .venv/bin/python bench/backups.py   (medians of ROUNDS runs, the order alternating)
"""
from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from jsonline import emitter
from testbed import ceph_cluster

ROUNDS = 3
WRITTEN_MIB = 1024
SETTLE_S = 3

emit = emitter("backups", digits=1)


def settle() -> None:
    os.sync()
    time.sleep(SETTLE_S)


def main() -> int:
    from agent import config as agent_config
    from agent.app import create_app

    env = ceph_cluster.existing() or ceph_cluster.start()
    work = tempfile.mkdtemp(prefix="bench-backups-", dir="/var/tmp")
    root = None
    rbd_pool = "bkb" + secrets.token_hex(4)  # our own Ceph pool, removed at the end
    env.run("ceph", "osd", "pool", "create", rbd_pool, "8", "8")
    env.run("ceph", "osd", "pool", "application", "enable", rbd_pool, "rbd")
    try:
        cfg = agent_config.parse({
            "state_dir": f"{work}/state", "workers": 2, "hypervisor": {"driver": "fake"},
            "containers": {"runtime": "fake"}, "images": {"import_dirs": [work]},
            "pools": {"default": {"kind": "local", "path": f"{work}/pool"},
                      "blk": {"kind": "block", "pool": rbd_pool, "conf": env.conf, "user": env.user,
                              "keyring": env.keyring},
                      "backups": {"kind": "object", "endpoint": env.s3_endpoint, "bucket": env.s3_bucket,
                                  "access_key": env.s3_access_key, "secret_key": env.s3_secret_key,
                                  "region": env.s3_region}}})
        app = create_app(cfg)
        root = app.config["SERVICES"]
        root.start()
        c = app.test_client()
        c.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {root.tokens.create('bench', 'admin')}"

        def wait(op):
            assert "id" in op, op
            op = c.get(f"/v1/operations/{op['id']}/wait?timeout=600").json
            assert op["status"] == "succeeded", op
            return op

        base = f"{work}/base.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "2G"], check=True)
        wait(c.post("/v1/images", json={"name": "base", "source": {"type": "file", "path": base}}).json)
        inst = wait(c.post("/v1/instances", json={"name": "bench-vm", "kind": "vm", "image": "base", "cpus": 1,
                                                  "memory_mib": 128, "start": False}).json)["result"]["instance"]
        disk = root.pools["default"].get_volume(f"i-{inst['id'][:12]}-disk").path
        raw = f"{work}/data.raw"
        with open(raw, "wb") as f:  # incompressible, distinct data: what a guest would have written
            for _ in range(WRITTEN_MIB // 16):
                f.write(os.urandom(16 << 20))
        subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "", disk], check=True)
        subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", raw, disk], check=True)
        subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2",
                        "-b", root.pools["default"].blob_path("sha256:" + inst["image"]), disk], check=True)
        rinst = wait(c.post("/v1/instances", json={"name": "bench-rbd", "kind": "vm", "image": "base", "cpus": 1,
                                                   "memory_mib": 128, "pool": "blk", "start": False}).json)
        rimg = f"navol.{rinst['result']['instance']['volumes'][0]}"
        subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", raw,
                        f"rbd:{rbd_pool}/{rimg}:id={env.user}:conf={env.conf}:keyring={env.keyring}"], check=True)
        os.unlink(raw)
        s3 = ceph_cluster.s3_client(env)
        ours, peer = [], []

        def backup(i):
            settle()
            t = time.perf_counter()
            op = wait(c.post("/v1/instances/bench-vm/backups", json={"pool": "backups"}).json)
            ours.append((time.perf_counter() - t) * 1000)
            assert op["result"]["backup"]["data_bytes"] >= WRITTEN_MIB << 20, op["result"]
            c.delete(f"/v1/backups/{op['result']['backup']['id']}")

        def convert_upload(i):
            settle()
            out = f"{work}/peer.qcow2"
            t = time.perf_counter()
            subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", disk, out], check=True)
            s3.upload_file(out, env.s3_bucket, "peer/disk.qcow2")
            peer.append((time.perf_counter() - t) * 1000)
            os.unlink(out)
            s3.delete_object(Bucket=env.s3_bucket, Key="peer/disk.qcow2")

        ours_rbd, peer_rbd = [], []

        def backup_rbd(i):
            settle()
            t = time.perf_counter()
            op = wait(c.post("/v1/instances/bench-rbd/backups", json={"pool": "backups"}).json)
            ours_rbd.append((time.perf_counter() - t) * 1000)
            assert op["result"]["backup"]["data_bytes"] >= WRITTEN_MIB << 20, op["result"]
            c.delete(f"/v1/backups/{op['result']['backup']['id']}")

        def export_upload(i):
            settle()
            out = f"{work}/peer.raw"
            t = time.perf_counter()
            env.run("rbd", "snap", "create", f"{rbd_pool}/{rimg}@peer")
            env.run("rbd", "export", "--no-progress", f"{rbd_pool}/{rimg}@peer", out)
            s3.upload_file(out, env.s3_bucket, "peer/disk.raw")
            env.run("rbd", "snap", "rm", f"{rbd_pool}/{rimg}@peer")
            peer_rbd.append((time.perf_counter() - t) * 1000)
            os.unlink(out)
            s3.delete_object(Bucket=env.s3_bucket, Key="peer/disk.raw")

        for i in range(ROUNDS):
            for fn in (backup, convert_upload)[::1 if i % 2 == 0 else -1]:
                fn(i)
        emit("vm_backup_1g_s3", statistics.median(ours), "qemu-img convert + boto3 upload_file",
             statistics.median(peer))
        for i in range(ROUNDS):
            for fn in (backup_rbd, export_upload)[::1 if i % 2 == 0 else -1]:
                fn(i)
        emit("vm_backup_1g_rbd", statistics.median(ours_rbd), "rbd snap create + rbd export + boto3 upload_file",
             statistics.median(peer_rbd))
        c.delete("/v1/instances/bench-vm")
        c.delete("/v1/instances/bench-rbd")
    finally:
        if root is not None:
            root.stop()
        shutil.rmtree(work, ignore_errors=True)
        env.run("ceph", "osd", "pool", "delete", rbd_pool, rbd_pool, "--yes-i-really-really-mean-it", check=False)
        if ceph_cluster.existing() is None:
            ceph_cluster.stop(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
