"""Start and stop a throw-away Ceph (scripts/ceph-dev-cluster) for the test session."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ceph-dev-cluster"
START_TIMEOUT = 180  # seconds; a start takes about 20 s here
# binary -> Debian package that ships it
REQUIRED = {"ceph-mon": "ceph-mon", "ceph-mgr": "ceph-mgr", "ceph-osd": "ceph-osd",
            "radosgw": "radosgw", "radosgw-admin": "radosgw", "ceph": "ceph-common",
            "rbd": "ceph-common", "ceph-authtool": "ceph-common", "monmaptool": "ceph-common"}


@dataclass(frozen=True)
class CephEnv:
    dir: str
    conf: str
    keyring: str
    user: str
    mon: str
    fsid: str
    rbd_pool: str
    s3_endpoint: str
    s3_region: str
    s3_access_key: str
    s3_secret_key: str
    s3_bucket: str

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Ceph CLI (ceph, rbd, rados, radosgw-admin) against this cluster."""
        return subprocess.run([argv[0], "-c", self.conf, *argv[1:]], capture_output=True,
                              text=True, check=check, timeout=120)


def missing_packages() -> list[str]:
    return sorted({pkg for binary, pkg in REQUIRED.items() if not shutil.which(binary)})


def start() -> CephEnv:
    """Start a cluster; RuntimeError (with the packages to install) if it cannot."""
    missing = missing_packages()
    if missing:
        raise RuntimeError("Ceph is not installed: apt-get install -y " + " ".join(missing))
    p = subprocess.run([sys.executable, str(SCRIPT), "start"], capture_output=True, text=True,
                       timeout=START_TIMEOUT)
    if p.returncode != 0:
        raise RuntimeError(f"scripts/ceph-dev-cluster start failed: {p.stderr.strip()}")
    return env(p.stdout.strip().splitlines()[-1])


def env(d: str) -> CephEnv:
    out = subprocess.run([sys.executable, str(SCRIPT), "env", "--dir", d], capture_output=True,
                         text=True, check=True).stdout
    kv = {}
    for line in out.splitlines():
        k, _, v = line.partition("=")
        kv[k] = shlex.split(v)[0] if v else ""
    return CephEnv(dir=kv["CEPH_DIR"], conf=kv["CEPH_CONF"], keyring=kv["CEPH_KEYRING"],
                   user=kv["CEPH_USER"], mon=kv["CEPH_MON"], fsid=kv["CEPH_FSID"],
                   rbd_pool=kv["RBD_POOL"], s3_endpoint=kv["S3_ENDPOINT"],
                   s3_region=kv["S3_REGION"], s3_access_key=kv["S3_ACCESS_KEY"],
                   s3_secret_key=kv["S3_SECRET_KEY"], s3_bucket=kv["S3_BUCKET"])


def stop(e: CephEnv) -> None:
    subprocess.run([sys.executable, str(SCRIPT), "stop", "--dir", e.dir], check=False,
                   timeout=60)


def existing() -> CephEnv | None:
    """A running cluster named by NODEAGENT_CEPH_DIR (reused, never stopped): for development."""
    d = os.environ.get("NODEAGENT_CEPH_DIR")
    return env(d) if d else None


_session: CephEnv | None = None  # set by the `ceph` session fixture


def current() -> CephEnv:
    if _session is None:
        raise RuntimeError("no Ceph cluster in this session: request the `ceph` fixture")
    return _session


def block_backend(tmp_path, *, quota: int | None = None):
    """An RbdBackend on a Ceph pool of its own, removed again by close()."""
    from storage.rbd import RbdBackend

    e = current()
    pool = "t" + os.urandom(5).hex()
    e.run("ceph", "osd", "pool", "create", pool, "8", "8")
    e.run("ceph", "osd", "pool", "application", "enable", pool, "rbd")
    if quota:
        e.run("ceph", "osd", "pool", "set-quota", pool, "max_bytes", str(quota))

    class OwnPool(RbdBackend):
        def close(self):
            super().close()
            e.run("ceph", "osd", "pool", "delete", pool, pool,
                  "--yes-i-really-really-mean-it", check=False)

    return OwnPool("block0", pool=pool, conf=e.conf, user=e.user, keyring=e.keyring)


def s3_client(e: CephEnv | None = None):
    import boto3
    from botocore.config import Config

    e = e or current()
    return boto3.client("s3", endpoint_url=e.s3_endpoint, region_name=e.s3_region,
                        aws_access_key_id=e.s3_access_key, aws_secret_access_key=e.s3_secret_key,
                        config=Config(request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required"))


def object_backend(tmp_path, **options):
    """An S3Backend on a bucket of its own, emptied and removed by close()."""
    from storage.s3 import S3Backend

    e = current()
    bucket = "t" + os.urandom(6).hex()
    client = s3_client(e)
    client.create_bucket(Bucket=bucket)

    class OwnBucket(S3Backend):
        def close(self):
            super().close()
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for o in page.get("Contents", []):
                    client.delete_object(Bucket=bucket, Key=o["Key"])
            for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
                client.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
            client.delete_bucket(Bucket=bucket)

    return OwnBucket("object0", endpoint=e.s3_endpoint, bucket=bucket,
                     access_key=e.s3_access_key, secret_key=e.s3_secret_key,
                     region=e.s3_region, **options)
