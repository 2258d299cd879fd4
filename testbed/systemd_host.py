"""A real systemd host on this machine: systemd 252 booted as PID 1 by
``systemd-nspawn -b --register=no --keep-unit`` from the Debian 12 root that
scripts/build-systemd-image caches. The root is mounted read-only under an overlay (each
boot starts clean); the container shares the host's network (no --private-network), so an
agent inside listening on 127.0.0.1:PORT is reached from here. ``stop()`` halts it and
removes the overlay; everything it started ends with its PID namespace. Two changes from
nspawn's defaults make it a host rather than a sandbox: every capability plus the keyring
calls runc needs, and the cgroup v1 controllers writable (nspawn binds them read-only).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOOT_TIMEOUT_S = 120
HALT_TIMEOUT_S = 60
CONNECTION_PLUGINS = REPO / "tests" / "functional" / "ansible_plugins" / "connection"  # the nsenter connection


def image() -> Path:
    """The cached root (built on first use: a few minutes, the Debian mirror)."""
    run = subprocess.run([str(REPO / "scripts" / "build-systemd-image")], capture_output=True, text=True,
                         timeout=1800)
    if run.returncode != 0:
        raise RuntimeError(f"scripts/build-systemd-image failed: {run.stderr[-3000:]}")
    return Path(run.stdout.strip().splitlines()[-1])


class SystemdHost:
    """One booted system container. ``binds``: {host dir: path inside}."""

    def __init__(self, root: Path, *, binds: dict[str, str] | None = None, base: Path | None = None):
        self.root = root
        self.binds = binds or {}
        self.base = Path(tempfile.mkdtemp(prefix="nodeagent-nspawn-", dir=base))
        self.merged = self.base / "merged"
        self.proc: subprocess.Popen | None = None
        self.leader: int | None = None  # the container's PID 1, in our PID namespace
        self._mounted = False

    def boot(self) -> None:
        for d in ("upper", "work", "merged"):
            (self.base / d).mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.root},upperdir={self.base / 'upper'},workdir={self.base / 'work'}",
                        str(self.merged)], check=True)
        self._mounted = True
        argv = ["systemd-nspawn", "-q", "-D", str(self.merged), "-b", "--register=no", "--keep-unit",
                f"--machine=nodeagent-test-{os.urandom(4).hex()}", "--console=passive",
                # a host's root: every capability, and the keyring calls runc makes for each
                # container (nspawn's default filter refuses them)
                "--capability=all", "--system-call-filter=add_key keyctl request_key"]
        argv += [f"--bind={src}:{dst}" for src, dst in self.binds.items()]
        self._log = open(self.base / "nspawn.log", "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while self.leader is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"systemd-nspawn did not boot: {self.log()}")
            # nspawn's first child only sets the container up and exits; the container's PID 1,
            # a child of nspawn too, is the one that became systemd (a loaded host showed the
            # first child here, and every nsenter into it failed until the boot timed out)
            kids = subprocess.run(["ps", "--ppid", str(self.proc.pid), "-o", "pid=,comm="],
                                  capture_output=True, text=True)
            for line in kids.stdout.splitlines():
                pid, _, comm = line.strip().partition(" ")
                if comm.strip() == "systemd":
                    self.leader = int(pid)
            if self.leader is None:
                time.sleep(0.1)
        state = ""
        while state not in ("running", "degraded"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"systemd did not finish booting ({state!r}): {self.log()}")
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            time.sleep(0.2)
        self._writable_cgroups()

    def _writable_cgroups(self) -> None:
        """nspawn binds the cgroup v1 controllers read-only (only name=systemd is the
        container's); on a real v1/hybrid host root writes them, as runc's cgroupfs driver
        does. Remount them writable inside (their root is this container's own subtree)."""
        mounts = self.run("cat", "/proc/self/mountinfo").stdout.splitlines()
        for line in mounts:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype == "cgroup" and fields[4].startswith("/sys/fs/cgroup/") and "name=systemd" not in line:
                self.run("mount", "-o", "remount,bind,rw", fields[4])

    def log(self) -> str:
        return (self.base / "nspawn.log").read_text(errors="replace")[-3000:]

    def run(self, *argv: str, check: bool = True, timeout: float = 300, input: str | None = None):
        """Run ``argv`` inside the container (all its namespaces)."""
        proc = subprocess.run(["nsenter", "-t", str(self.leader), "-a", *argv], capture_output=True, text=True,
                              timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} (in the container) failed rc={proc.returncode}: "
                               f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return proc

    def stop(self) -> None:
        """Halt (SIGTERM makes nspawn ask systemd to power off), then SIGKILL if it hangs;
        unmount the overlay and remove its dirs."""
        if self.proc is not None and self.proc.poll() is None:
            # the agent's (empty) parent cgroups of its containers, made inside the container's
            # cgroup namespace, i.e. under this test's own cgroup on the host: cgroupfs's
            # nodeagent, and the systemd driver's slice (the controllers systemd does not
            # manage in v1 keep runc's dirs of it)
            self.run("sh", "-c", "systemctl stop nodeagent.slice 2>/dev/null; "
                     "rmdir /sys/fs/cgroup/*/nodeagent /sys/fs/cgroup/*/nodeagent.slice 2>/dev/null", check=False)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(HALT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        if self.proc is not None:
            self._log.close()
        if self._mounted:
            subprocess.run(["umount", str(self.merged)], check=False)
            self._mounted = False
        # nspawn without a host systemd puts the container under <its own cgroup>/payload and
        # leaves the empty dirs behind (busy ones, another boot's, stay)
        for hierarchy in ("systemd", "unified"):
            own = _own_cgroup(hierarchy)
            if own is not None:
                for d in (f"{own}/payload/init.scope", f"{own}/payload"):
                    try:
                        os.rmdir(f"/sys/fs/cgroup/{hierarchy}{d}")
                    except OSError:
                        pass
        shutil.rmtree(self.base, ignore_errors=True)


def _own_cgroup(hierarchy: str) -> str | None:
    """This process's cgroup path in a v1 named hierarchy ("systemd") or v2 ("unified")."""
    want = "name=systemd" if hierarchy == "systemd" else ""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == want:
            return path.rstrip("/")
    return None
