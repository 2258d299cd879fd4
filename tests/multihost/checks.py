"""What the multihost tests ask of simulated hosts and their agents."""
from __future__ import annotations

import time

OP_TIMEOUT_S = 300


def migrate(api, name, dest, mode="live") -> dict:
    """POST /v1/migrations and wait for the operation; the finished operation."""
    r = api.post("/v1/migrations", json={"instance": name, "destination": dest, "mode": mode})
    assert r.status_code == 202, r.text
    return api.wait(r.json(), timeout=OP_TIMEOUT_S)


def domains(host) -> list[str]:
    """Names of the libvirt domains (any state) on ``host``."""
    out = host.run("virsh", "-c", "qemu:///system", "list", "--all", "--name", timeout=30).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def assert_runs(api, name):
    """The guest runs: its cpu time grows, and the agent says running."""
    first = api.get(f"/v1/instances/{name}/stats").json()["cpu_ns"]
    deadline = time.monotonic() + 30
    while api.get(f"/v1/instances/{name}/stats").json()["cpu_ns"] <= first:
        assert time.monotonic() < deadline, "the guest does not run"
        time.sleep(0.3)
    assert api.get(f"/v1/instances/{name}").json()["state"] == "running"
