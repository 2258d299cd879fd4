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
