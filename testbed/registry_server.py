"""A local OCI registry for tests (Debian's docker-registry on 127.0.0.1) and a busybox
image built in Python and pushed to it with skopeo."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request

from testbed.runtimes import APPLETS, BUSYBOX, find_free_port
from testbed import ocibuild

IMAGE_CONFIG = {"cmd": ("sh",), "env": ("PATH=/bin", "IMAGE=busybox-test")}

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


def busybox_layer() -> bytes:
    """A gzip tar layer: bin/busybox + applet symlinks + etc/passwd, group + www/."""
    with open(BUSYBOX, "rb") as f:
        bb = f.read()
    return ocibuild.layer(
        [(f"{d}/", "dir", None) for d in ("bin", "etc", "tmp", "root", "www", "proc", "sys", "dev")]
        + [("bin/busybox", "file", bb, 0o755)]
        + [(f"bin/{a}", "sym", "busybox", 0o777) for a in APPLETS]
        + [("etc/passwd", "file", b"root:x:0:0:root:/root:/bin/sh\n"
                                  b"nobody:x:65534:65534:nobody:/:/bin/false\n"),
           ("etc/group", "file", b"root:x:0:\nnogroup:x:65534:\n"),
           ("www/index.html", "file", b"hello from busybox\n")])


def build_busybox_layout(layout: str, *, tag: str = "test", multiarch: bool = False) -> str:
    """An OCI image layout at ``layout`` with one busybox image (Cmd ["sh"]) under ``tag``;
    with ``multiarch`` the tag points at an index of linux/amd64 + linux/arm64 (the arm64
    entry shares the layer but its config says arm64). Returns the amd64 manifest digest."""
    layers = [busybox_layer()]
    ocibuild.write_layout(layout, {tag: layers}, multiarch=multiarch, arm64_blobs=True, **IMAGE_CONFIG)
    manifest, _ = ocibuild.image_blobs(layers, **IMAGE_CONFIG)
    return ocibuild.sha(manifest)


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
