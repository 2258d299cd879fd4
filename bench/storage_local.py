"""Benchmarks of the local image store, each beside its peer (one JSON line per metric).

(a) clone of a 1 GiB and an 8 GiB qcow2 image   peer: `qemu-img create -b` alone
(b) import of a 1 GiB file                       peer: `sha256sum` + `cp`
(c) unpack of a ~200 MB gzip layer               peer: GNU `tar -xzf`

Run: .venv/bin/python bench/storage_local.py [--workdir DIR]
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time

from agent.state import Database
from jsonline import emitter
from storage import ImageStore, qemu_img
from storage.local import LocalBackend
from storage.unpack import unpack_layer
from storage.units import GiB

CLONE_RUNS = 21
IMPORT_RUNS = 3
UNPACK_RUNS = 3


def ms(f) -> float:
    t = time.perf_counter()
    f()
    return (time.perf_counter() - t) * 1000


line = emitter("storage_local")


def drop_file(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def bench_clone(store, work):
    for gib in (1, 8):
        raw = os.path.join(work, f"base{gib}.raw")
        with open(raw, "wb") as f:  # sparse, with a little real data at both ends
            f.write(os.urandom(4 * 1024 * 1024))
            f.seek(gib * GiB - 4 * 1024 * 1024)
            f.write(os.urandom(4 * 1024 * 1024))
        q = os.path.join(work, f"base{gib}.qcow2")
        qemu_img.convert(raw, q, src_format="raw", dst_format="qcow2")
        img = store.import_file(q, name=f"base{gib}")
        base = store.pools["local"].blob_path(img.digest)
        ours, peer = [], []
        for i in range(CLONE_RUNS):
            ours.append(ms(lambda: store.clone_disk(img.id, f"c{gib}-{i}")))
            out = os.path.join(work, f"peer{gib}-{i}.qcow2")
            peer.append(ms(lambda: subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", out],
                check=True)))
        for i in range(CLONE_RUNS):
            store.release("local", f"c{gib}-{i}")
            drop_file(os.path.join(work, f"peer{gib}-{i}.qcow2"))
        drop_file(raw)
        drop_file(q)
        line(f"clone_{gib}gib_p50", statistics.median(ours),
             "qemu-img create -b", statistics.median(peer))


def bench_import(store, work):
    src = os.path.join(work, "import.bin")
    with open(src, "wb") as f:
        block = os.urandom(16 * 1024 * 1024)
        for _ in range(GiB // len(block)):
            f.write(block[::-1] if f.tell() % 3 else block)
    ours, peer = [], []
    for i in range(IMPORT_RUNS):
        dst = os.path.join(work, "peer-copy.bin")
        peer.append(ms(lambda: (subprocess.run(["sha256sum", src], check=True,
                                               capture_output=True),
                                subprocess.run(["cp", src, dst], check=True))))
        drop_file(dst)
        ours.append(ms(lambda: store.import_file(src, name=f"imp{i}")))
        img = store.get(f"imp{i}")
        store.delete(img.id)
        store.gc()
    drop_file(src)
    line("import_1gib", statistics.median(ours), "sha256sum + cp",
         statistics.median(peer))


def make_layer(path):
    """~200 MB unpacked: 2 big files (mixed data, 96 MiB) and 3000 small text-ish files."""
    rnd = os.urandom(8 * 1024 * 1024)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as gz, \
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as t:
        def add(name, data, mode=0o644):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, 1_700_000_000
            t.addfile(ti, io.BytesIO(data))
        for d in range(30):
            ti = tarfile.TarInfo(f"usr/lib/pkg{d}")
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            t.addfile(ti)
        for i in range(2):
            add(f"usr/lib/big{i}.so", (rnd + bytes(8 * 1024 * 1024)) * 3, 0o755)
        text = (b"lorem ipsum dolor sit amet, consectetur adipiscing elit %d\n" * 600)
        for i in range(3000):
            add(f"usr/lib/pkg{i % 30}/file{i}.py", text[: 20_000 + (i % 50) * 500] + rnd[i:i + 8000])


def bench_unpack(work):
    layer = os.path.join(work, "layer.tar.gz")
    make_layer(layer)
    ours, peer = [], []
    for i in range(UNPACK_RUNS):
        d1, d2 = os.path.join(work, f"u{i}"), os.path.join(work, f"t{i}")
        os.mkdir(d1)
        os.mkdir(d2)
        peer.append(ms(lambda: subprocess.run(["tar", "-xzf", layer, "-C", d2], check=True)))
        ours.append(ms(lambda: unpack_layer(layer, d1)))
        shutil.rmtree(d1)
        shutil.rmtree(d2)
    drop_file(layer)
    line("unpack_200mb_layer", statistics.median(ours), "tar -xzf",
         statistics.median(peer))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="scratch dir (default: a temp dir in /var/tmp)")
    ap.add_argument("--only", choices=["clone", "import", "unpack"], default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-storage-", dir=args.workdir or "/var/tmp")
    try:
        db = Database(os.path.join(work, "state.db"))
        store = ImageStore(db, {"local": LocalBackend("local", path=os.path.join(work, "pool"))},
                           default_pool="local", cache_dir=os.path.join(work, "cache"))
        if args.only in (None, "clone"):
            bench_clone(store, work)
        if args.only in (None, "import"):
            bench_import(store, work)
        if args.only in (None, "unpack"):
            bench_unpack(work)
        db.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
