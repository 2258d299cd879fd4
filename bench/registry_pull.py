"""Registry pull: our client (storage/registry.py) beside skopeo, the same image from the
same local docker-registry, in the same run (one JSON line per metric, medians of RUNS).

(a) registry_pull        the test busybox image (one ~1 MB gzip layer)
(b) registry_pull_64mib  an image with one 64 MiB layer of random bytes (streaming + hashing)

Both write an OCI image layout: ours with pull_to_layout, the peer with
`skopeo copy docker://REF oci:DIR:TAG` (over plain http: --src-tls-verify=false).

Run: .venv/bin/python bench/registry_pull.py [--workdir DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time

from jsonline import emitter
from storage.registry import pull_to_layout
from storage.sources import AddressPolicy
from testbed import ocibuild
from testbed.registry_server import RegistryServer, push_busybox, push_layout

RUNS = 3
POLICY = AddressPolicy(["127.0.0.1/32"])  # the bench registry listens on loopback
line = emitter("registry_pull")


def ms(f) -> float:
    t = time.perf_counter()
    f()
    return (time.perf_counter() - t) * 1000


def ours(ref: str, dest: str) -> None:
    pull_to_layout(ref, dest, tls_verify=False, policy=POLICY)


def skopeo(ref: str, dest: str) -> None:
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
                    f"oci:{dest}:bench"], check=True, capture_output=True)


def compare(metric: str, ref: str, work: str) -> None:
    a, b = [], []
    for i in range(RUNS):  # alternate, so both see the same cache and load
        for fn, out in ((ours, a), (skopeo, b)):
            dest = os.path.join(work, f"{fn.__name__}-{i}")
            out.append(ms(lambda: fn(ref, dest)))
            shutil.rmtree(dest)
    line(metric, statistics.median(a), "skopeo copy docker:// oci:", statistics.median(b))


def big_image(registry: RegistryServer, work: str) -> str:
    layout = os.path.join(work, "layout-big")
    layer = ocibuild.layer([("data/", "dir", None), ("data/blob", "file", os.urandom(64 << 20))],
                           compress=True)
    ocibuild.write_layout(layout, {"big": [layer]})
    ref = f"{registry.address}/big:big"
    push_layout(layout, "big", ref)
    return ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-registry-", dir=args.workdir)
    registry = RegistryServer(os.path.join(work, "registry")).start()
    try:
        compare("registry_pull", push_busybox(registry, work), work)
        compare("registry_pull_64mib", big_image(registry, work), work)
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
