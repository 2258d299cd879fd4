"""Start a real ``python -m agent serve`` on 127.0.0.1:<free port> for API tests; stop it by PID."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(state_dir: Path, port: int, *, pool_kind="fake", extra: str = "",
                 import_dirs=None, allow_url_hosts=("127.0.0.1/32",), runtime: str = "fake",
                 network: tuple[str, str] | None = None) -> Path:
    """The agent's config. Image sources: host files under ``import_dirs`` (default: the
    state dir's parent, where tests keep their images) and URLs/registries on
    ``allow_url_hosts`` (default: loopback 127.0.0.1, where tests run their servers).
    ``runtime``: the container runtime (fake or runc); ``network``: (bridge, subnet) of a
    test network (testbed.runtimes.test_network), without NAT."""
    state_dir.mkdir(parents=True, exist_ok=True)
    cfg = state_dir / "agent.toml"
    pool = f'[pools.default]\nkind = "{pool_kind}"\n'
    if pool_kind == "local":
        pool += f'path = "{state_dir / "pool"}"\n'
    dirs = [str(d) for d in (import_dirs if import_dirs is not None else [state_dir.parent])]
    images = (f'[images]\nimport_dirs = {json.dumps(dirs)}\n'
              f'allow_url_hosts = {json.dumps(list(allow_url_hosts))}\n')
    cfg.write_text(f'state_dir = "{state_dir}"\nlog_format = "text"\nworkers = 8\n{extra}\n'
                   f'[api]\nlisten = "127.0.0.1:{port}"\n'
                   f'[hypervisor]\ndriver = "fake"\n[containers]\nruntime = "{runtime}"\n' + images + pool
                   + (f'[network]\nbridge = "{network[0]}"\nsubnet = "{network[1]}"\nnat = false\n' if network else ""))
    return cfg


class AgentProcess:
    def __init__(self, state_dir: Path, *, pool_kind="fake", extra_config: str = "", env: dict | None = None,
                 scheme="http", tls_extra: str = "", import_dirs=None, allow_url_hosts=("127.0.0.1/32",),
                 images_extra: str = "", runtime: str = "fake", network: tuple[str, str] | None = None):
        from testbed.runtimes import agent_rtag
        self.state_dir = Path(state_dir)
        self.rtag = agent_rtag(self.state_dir)  # its network's rules and tables carry it
        self.port = free_port()
        self.config = write_config(self.state_dir, self.port, pool_kind=pool_kind, extra=extra_config,
                                   import_dirs=import_dirs, allow_url_hosts=allow_url_hosts, runtime=runtime,
                                   network=network)
        if images_extra:  # more [images] keys
            self.config.write_text(self.config.read_text().replace("[images]\n", "[images]\n" + images_extra))
        if tls_extra:
            self.config.write_text(self.config.read_text().replace("[api]\n", "[api]\n" + tls_extra))
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log = self.state_dir / "agent.log"

    def cli(self, *args, env=None, check=True) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agent", "--config", str(self.config), *args],
                              cwd=REPO, env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=120, check=check)

    def token(self, name: str, role: str) -> str:
        return self.cli("token", "create", name, "--role", role).stdout.strip()

    def start(self, verify=None, cert=None, *, wait_adopted: bool = True) -> "AgentProcess":
        """Start the agent and return once it answers and (``wait_adopted``) has re-adopted
        its workloads (its health no longer says ``adopting``)."""
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(self.config), "serve"],
                                     cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                r = requests.get(self.url + "/v1/health", timeout=1, verify=verify if verify is not None else True,
                                 cert=cert)
                if r.ok and not (wait_adopted and r.json().get("adopting")):
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"agent did not answer within {STARTUP_TIMEOUT}s: {self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        """Crash the agent: SIGKILL its process (ours; the agent is one process)."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self) -> int | None:
        """End the agent (if it still runs: a test may have killed it) and drop its tables."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        self.drop_host_filter()
        self.drop_containers_mount()
        return self.proc.returncode

    def drop_containers_mount(self) -> None:
        """Undo the runc runtime's bind of its containers/ dir on itself (RuncRuntime._bind_bundles),
        which a stopped agent keeps as a host keeps it across agent restarts; only once nothing
        is mounted below it (storage.mounts.unbind_self)."""
        from storage import mounts
        mounts.unbind_self(str(self.state_dir / "containers" / "containers"))

    def drop_host_filter(self) -> None:
        drop_host_filter(self.state_dir)


def drop_host_filter(state_dir) -> None:
    """Remove the nft tables (containers/firewall.py) of the agent on ``state_dir``. A stopped
    agent keeps them for the workloads that keep running and rebuilds them at start; a test
    leaves none."""
    from containers.network import short_hash
    if not shutil.which("nft"):
        return
    table = "nodeagent_" + short_hash(os.path.abspath(os.path.join(str(state_dir), "containers")), 4)
    subprocess.run(["nft", "-f", "-"], input=f"table bridge {table} {{}}\ndelete table bridge {table}\n"
                   f"table inet {table} {{}}\ndelete table inet {table}\n", text=True, capture_output=True)


class Api:
    """requests with the base URL and a token; returns the Response (tests assert on it)."""

    def __init__(self, url: str, token: str | None = None, **kw):
        self.url, self.s = url, requests.Session()
        if token:
            self.s.headers["Authorization"] = f"Bearer {token}"
        self.kw = kw

    def __getattr__(self, method):
        def call(path, **kw):
            return self.s.request(method.upper(), self.url + path, timeout=kw.pop("timeout", 60), **self.kw, **kw)
        return call

    def wait(self, op: dict, timeout: float = 60) -> dict:
        r = self.get(f"/v1/operations/{op['id']}/wait", params={"timeout": timeout}, timeout=timeout + 10)
        assert r.status_code == 200, r.text
        return r.json()
