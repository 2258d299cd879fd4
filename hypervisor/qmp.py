"""The agent's own QMP monitor (a second monitor libvirt does not own), through qemu.qmp.

Used for what libvirt does not expose cleanly: the exact run state (query-status) and
block job progress (query-block-jobs). Each call opens the unix socket, negotiates,
runs one command and closes: no background threads or event loops are kept.
"""
from __future__ import annotations

import asyncio

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from agent.errors import Unavailable

QMP_TIMEOUT_S = 5.0


async def _execute(socket_path: str, command: str, arguments: dict | None, timeout: float):
    client = QMPClient("nodeagent")
    try:
        await asyncio.wait_for(client.connect(socket_path), timeout)
        return await asyncio.wait_for(client.execute(command, arguments), timeout)
    finally:
        await client.disconnect()


def execute(socket_path: str, command: str, arguments: dict | None = None,
            *, timeout: float = QMP_TIMEOUT_S):
    """Run one QMP command and return its ``return`` value.

    Unavailable when the socket is missing or QEMU does not answer (the VM is not running).
    """
    try:
        return asyncio.run(_execute(socket_path, command, arguments, timeout))
    except (OSError, QMPError, asyncio.TimeoutError) as e:
        raise Unavailable(f"QMP {command} on {socket_path} failed: {e or type(e).__name__}; "
                          "is the VM running?", socket=socket_path) from None


def query_status(socket_path: str) -> dict:
    """{"status": "running"|"paused"|..., "running": bool, ...} straight from QEMU."""
    return execute(socket_path, "query-status")


def query_block_jobs(socket_path: str) -> list[dict]:
    """Active block jobs: [{"device", "type", "offset", "len", "ready", ...}]."""
    return execute(socket_path, "query-block-jobs")


def block_job_progress(socket_path: str) -> dict[str, float]:
    """Progress of each active block job, device -> fraction done in [0, 1]."""
    return {j["device"]: (j["offset"] / j["len"] if j.get("len") else 0.0)
            for j in query_block_jobs(socket_path)}
