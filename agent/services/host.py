"""Host facts: hostname, hypervisor kind, cpus, memory, pools and their usage, versions; and
whether the host is draining (host maintenance: kept in the state DB, so it outlives a restart)."""
from __future__ import annotations

import os
import platform
import socket
import time

from importlib import metadata

from hypervisor.driver import ReportsVirtType, SupportsCpuCheck


SCHEMA_STEPS = [
    """
    CREATE TABLE host_draining (
        id INTEGER PRIMARY KEY CHECK (id = 1),  -- one row while the host is draining
        since REAL NOT NULL
    );
    """,
]


def _meminfo_bytes(field: str = "MemTotal") -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


class HostService:
    def __init__(self, root):
        self.root = root
        root.db.apply_schema("host", SCHEMA_STEPS)

    # -- draining (host maintenance): the only reader/writer of host_draining --
    def draining_since(self) -> float | None:
        """When the host started draining (unix seconds), None if it is not."""
        row = self.root.db.one("SELECT since FROM host_draining WHERE id=1")
        return row["since"] if row else None

    def draining(self) -> bool:
        return self.draining_since() is not None

    def set_draining(self, on: bool) -> None:
        if on:
            self.root.db.execute("INSERT OR IGNORE INTO host_draining(id, since) VALUES(1, ?)", (time.time(),))
        else:
            self.root.db.execute("DELETE FROM host_draining")

    def refuse_if_draining(self, what: str) -> None:
        """Conflict while the host is draining: it takes no new work (``what``) until restored."""
        if self.draining():
            from agent.errors import Conflict
            raise Conflict(f"host is draining (maintenance): {what} refused; its instances are being moved "
                           "to peers; `nodeagent host restore` (POST /v1/host/restore) accepts work again")

    def _host_cpu(self) -> str | None:
        from agent.errors import AgentError
        try:
            driver = self.root.driver
            return driver.host_cpu() if isinstance(driver, SupportsCpuCheck) else None
        except AgentError:  # no hypervisor here: peers then skip the check (the destination's prepare does it)
            return None

    def peer_facts(self) -> dict:
        """What a peer sees of this host (GET /v1/peer/host): whether it takes instances, and
        its free capacity (the evacuating peer chooses destinations by it)."""
        pools = self.pools()
        default = next((p for p in pools if p["default"]), None)
        hc = self.root.config.hypervisor
        return {"hostname": self.hostname(), "draining": self.draining(), "host_cpu": self._host_cpu(),
                "cpu_model": hc.cpu_model, "cpu_group": hc.cpu_group,
                "capacity": {"cpus": os.cpu_count() or 1, "memory_bytes": _meminfo_bytes(),
                             "memory_available_bytes": _meminfo_bytes("MemAvailable"),
                             "instances": self.root.records.count(),
                             "storage_available_bytes": ((default or {}).get("usage") or {}).get("available", 0)}}

    def hostname(self) -> str:
        return socket.gethostname()

    def hypervisor(self) -> str:
        hc = self.root.config.hypervisor
        try:
            driver = self.root.driver
            vt = driver.virt_type if isinstance(driver, ReportsVirtType) else None
        except Exception:
            return "none"
        if vt in ("kvm", "qemu"):
            return vt
        if hc.virt_type != "auto":
            return hc.virt_type
        return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"

    def pools(self) -> list[dict]:
        out = []
        default = self.root.config.default_pool
        for name, pc in self.root.config.pools.items():
            out.append(self._pool(name, pc.kind, default))
        return out

    def get_pool(self, name: str) -> dict:
        from agent.errors import NotFound
        pc = self.root.config.pools.get(name)
        if pc is None:
            raise NotFound(f"pool {name!r} not found; configured pools: "
                           f"{', '.join(sorted(self.root.config.pools))}")
        return self._pool(name, pc.kind, self.root.config.default_pool)

    def _pool(self, name, kind, default) -> dict:
        d = {"name": name, "kind": kind, "default": name == default, "supports_volumes": False,
             "usage": None, "error": None}
        try:
            b = self.root.pools[name]
            d["supports_volumes"] = bool(b.supports_volumes)
            u = b.usage()
            d["usage"] = {"capacity": u.capacity, "used": u.used, "available": u.available}
        except Exception as e:  # a pool that is down is reported, not fatal
            d["error"] = str(e) or type(e).__name__
        return d

    def capacity(self) -> tuple[int, int]:
        """(cpus, memory in MiB) of this host: what one instance may be given at most."""
        return os.cpu_count() or 1, _meminfo_bytes() // (1024 * 1024)

    def info(self) -> dict:
        pools = self.pools()
        cpus = os.cpu_count() or 1
        mem = _meminfo_bytes()
        versions = {"nodeagent": _version("nodeagent") or "0.1.0", "python": platform.python_version(),
                    "flask": _version("flask") or "", "kernel": platform.release()}
        since = self.draining_since()
        return {
            "hostname": self.hostname(), "hypervisor": self.hypervisor(),
            "draining": since is not None, "draining_since": since,
            "hypervisor_driver": self.root.config.hypervisor.driver,
            "container_runtime": self.root.config.containers.runtime,
            "container_idmap": {"host_id": self.root.runtime.idmap.host_id, "size": self.root.runtime.idmap.size},
            "migration_tls": self.root.config.migration.tls_enabled,
            "cpu_model": self.root.config.hypervisor.cpu_model, "cpu_group": self.root.config.hypervisor.cpu_group,
            "cpus": cpus, "memory_bytes": mem, "pools": pools,
            "capacity": {"cpus": cpus, "memory_bytes": mem, "memory_available_bytes": _meminfo_bytes("MemAvailable"),
                         "instances": self.root.records.count(),
                         "storage_available_bytes": sum((p["usage"] or {}).get("available", 0) for p in pools)},
            "versions": {k: v for k, v in versions.items() if v},
        }
