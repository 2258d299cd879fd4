"""A local OCI registry for tests (Debian's docker-registry on 127.0.0.1) and a busybox
image built in Python and pushed to it with skopeo."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
import urllib.request

from tests.containers_support import APPLETS, BUSYBOX, find_free_port

CONFIG = """version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


class RegistryServer:
    """``docker-registry serve`` on 127.0.0.1:<free port> with its storage in ``workdir``."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.port = find_free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "RegistryServer":
        binary = shutil.which("docker-registry")
        if binary is None:
            raise RuntimeError("docker-registry is missing: apt-get install docker-registry")
        os.makedirs(os.path.join(self.workdir, "data"), exist_ok=True)
        cfg = os.path.join(self.workdir, "config.yml")
        with open(cfg, "w") as f:
            f.write(CONFIG.format(root=os.path.join(self.workdir, "data"), port=self.port))
        log = open(os.path.join(self.workdir, "registry.log"), "wb")
        self.proc = subprocess.Popen([binary, "serve", cfg], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not start; see {self.workdir}/registry.log")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _blob(layout: str, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    d = os.path.join(layout, "blobs", "sha256")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest, len(data)


def busybox_layer() -> bytes:
    """A gzip tar layer: bin/busybox + applet symlinks + etc/passwd, group + www/."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        def add_dir(name):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(ti)

        def add_file(name, data: bytes, mode=0o644):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, 0
            tar.addfile(ti, io.BytesIO(data))
        for d in ("bin", "etc", "tmp", "root", "www", "proc", "sys", "dev"):
            add_dir(d)
        with open(BUSYBOX, "rb") as f:
            add_file("bin/busybox", f.read(), 0o755)
        for a in APPLETS:
            ti = tarfile.TarInfo(f"bin/{a}")
            ti.type, ti.linkname, ti.mode, ti.mtime = tarfile.SYMTYPE, "busybox", 0o777, 0
            tar.addfile(ti)
        add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                               b"nobody:x:65534:65534:nobody:/:/bin/false\n")
        add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        add_file("www/index.html", b"hello from busybox\n")
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, mtime=0), "sha256:" + hashlib.sha256(tar_bytes).hexdigest()


def build_busybox_layout(layout: str, *, tag: str = "test", multiarch: bool = False) -> str:
    """An OCI image layout at ``layout`` with one busybox image (Cmd ["sh"]) under ``tag``;
    with ``multiarch`` the tag points at an index of linux/amd64 + linux/arm64 (the arm64
    entry shares the layer but its config says arm64). Returns the amd64 manifest digest."""
    os.makedirs(layout, exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    layer, diff_id = busybox_layer()
    layer_digest, layer_size = _blob(layout, layer)
    manifests = []
    for arch in (("amd64", "arm64") if multiarch else ("amd64",)):
        config = {"architecture": arch, "os": "linux",
                  "config": {"Cmd": ["sh"], "Env": ["PATH=/bin", "IMAGE=busybox-test"],
                             "WorkingDir": "/"},
                  "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
        cdig, csize = _blob(layout, json.dumps(config, sort_keys=True).encode())
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": cdig, "size": csize},
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                "digest": layer_digest, "size": layer_size}]}
        mdig, msize = _blob(layout, json.dumps(manifest, sort_keys=True).encode())
        manifests.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                          "digest": mdig, "size": msize,
                          "platform": {"architecture": arch, "os": "linux"}})
    if multiarch:
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": [{k: v for k, v in m.items() if k != "platform"} |
                               {"platform": m["platform"]} for m in manifests]}
        idig, isize = _blob(layout, json.dumps(index, sort_keys=True).encode())
        top = [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": idig,
                "size": isize, "annotations": {"org.opencontainers.image.ref.name": tag}}]
    else:
        top = [{**{k: v for k, v in manifests[0].items() if k != "platform"},
                "annotations": {"org.opencontainers.image.ref.name": tag}}]
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": top}, f)
    return manifests[0]["digest"]


def push_layout(layout: str, tag: str, dest: str, *, all_images: bool = False) -> None:
    """skopeo copy oci:LAYOUT:TAG docker://DEST (plain HTTP)."""
    argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
            *(["--all"] if all_images else []), f"oci:{layout}:{tag}", f"docker://{dest}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo push failed: {proc.stderr}")


def push_busybox(registry: RegistryServer, workdir: str, *, repo: str = "busybox",
                 tag: str = "test", multiarch: bool = False) -> str:
    """Build and push the busybox image; return its reference and set nothing else."""
    layout = os.path.join(workdir, f"layout-{repo}-{tag}")
    build_busybox_layout(layout, tag=tag, multiarch=multiarch)
    ref = f"{registry.address}/{repo}:{tag}"
    push_layout(layout, tag, ref, all_images=multiarch)
    return ref
