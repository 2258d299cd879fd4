"""Pull container images from an OCI/Docker registry into an OCI image layout, with skopeo.

The caller then imports the layout with ``storage.ImageStore.import_oci``. A multi-arch
index resolves to linux/amd64 (skopeo's --override-os/--override-arch), so the layout
always holds one single-platform image.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading

from agent.errors import CommandFailed, InvalidInput, NotFound, Unavailable
from storage.sources import AddressPolicy, Watchdog, tree_bytes

PULL_TIMEOUT = 1800  # seconds; a large image over a slow link (a stalled one ends sooner)
DEFAULT_REGISTRY = "registry-1.docker.io"  # where a reference without a registry host goes
TARGET_OS, TARGET_ARCH = "linux", "amd64"
# name[:tag][@sha256:<64 hex>] with an optional registry host[:port]/ prefix
REFERENCE_RE = re.compile(
    r"^(?P<name>[a-z0-9]+(?:[._-][a-z0-9]+)*(?:[:][0-9]+)?(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")


def parse_reference(reference: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of ``reference``; InvalidInput if it is not one."""
    ref = reference.removeprefix("docker://")
    m = REFERENCE_RE.match(ref)
    if not m:
        raise InvalidInput(f"image reference {reference!r} is invalid: use "
                           "[host[:port]/]name[:tag][@sha256:<digest>], e.g. "
                           "127.0.0.1:5000/busybox:latest")
    return m["name"], m["tag"], m["digest"]


def registry_host(name: str) -> tuple[str, int]:
    """The registry (host, port) of a reference's name, by Docker's rule: the first path
    component is a registry when it has a "." or ":" or is "localhost"."""
    first, sep, _ = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, _, port = first.rpartition(":") if ":" in first else (first, "", "")
        return host, int(port) if port else 443
    return DEFAULT_REGISTRY, 443


def pull_to_layout(reference: str, dest_dir: str, *, tls_verify: bool = True,
                   policy: AddressPolicy | None = None, cancel: threading.Event | None = None,
                   stall_timeout: float = 60) -> str:
    """Copy ``reference`` (tag or digest) from its registry into the OCI layout ``dest_dir``
    and return the layout's tag for it (what ``import_oci(..., ref=)`` takes).

    The registry's host must pass ``policy`` (default: the strict AddressPolicy()), like a
    URL's. skopeo runs as a child process, killed by its PID on ``cancel`` (Cancelled) or
    when ``dest_dir`` has not grown for ``stall_timeout`` seconds (Unavailable).
    ``dest_dir`` may hold other images; a failed pull leaves it as it was (a new dir is
    removed again). NotFound when the registry has no such image."""
    name, tag, digest = parse_reference(reference)
    host, port = registry_host(name)
    (policy or AddressPolicy()).check_host(host, port, f"registry of {reference}")
    if shutil.which("skopeo") is None:
        raise Unavailable("skopeo is not installed: apt-get install skopeo "
                          "(or run scripts/setup-host)")
    layout_tag = tag or (digest.split(":", 1)[1][:12] if digest else "latest")
    # skopeo takes a tag or a digest, not both: the digest pins the content
    src = f"{name}@{digest}" if digest else f"{name}:{tag or 'latest'}"
    created = not os.path.exists(dest_dir)
    os.makedirs(dest_dir, exist_ok=True)
    argv = ["skopeo", "--override-os", TARGET_OS, "--override-arch", TARGET_ARCH, "copy",
            "--quiet", f"--src-tls-verify={'true' if tls_verify else 'false'}",
            f"docker://{src}", f"oci:{dest_dir}:{layout_tag}"]
    proc = None
    try:
        with Watchdog(f"pull of {reference}", cancel=cancel, stall_timeout=stall_timeout,
                      probe=lambda: tree_bytes(dest_dir)) as wd:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env={**os.environ, "TMPDIR": dest_dir})
            wd.abort_with(lambda: os.kill(proc.pid, signal.SIGKILL))
            try:
                _, stderr = proc.communicate(timeout=PULL_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.communicate()
                stderr = f"timed out after {PULL_TIMEOUT} s"
                proc.returncode = -1
    except BaseException:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if created:
            shutil.rmtree(dest_dir, ignore_errors=True)
        raise
    if proc.returncode != 0:
        if created:
            shutil.rmtree(dest_dir, ignore_errors=True)
        err = stderr.strip()
        low = err.lower()
        if "manifest unknown" in low or "name unknown" in low or "not found" in low:
            raise NotFound(f"image {reference} is not in its registry: check the name and "
                           "tag (skopeo list-tags docker://NAME lists the tags)")
        if "connection refused" in low or "no such host" in low or "timeout" in low:
            raise Unavailable(f"registry for {reference} is unreachable: {err[-300:]}")
        if "certificate" in low or "http response to https client" in low:
            raise Unavailable(f"TLS to the registry of {reference} failed: {err[-300:]} "
                              "(for a plain-HTTP test registry pass tls_verify=False)")
        raise CommandFailed(f"skopeo could not pull {reference}: {err[-500:]}", argv=argv,
                            returncode=proc.returncode, stderr=err)
    return layout_tag

