"""Operations data benchmarks: JSON lines as described in DESIGN.md section 7.

(a) What the access log (one INFO line per request, with its request id) costs: GET
    /v1/health p50 and requests/s on an agent with the access log on, the peer being the
    same request on an agent with `[api] access_log = false`, both started and loaded in
    this run (4 keep-alive connections, a separate load process; the log goes to a file).
(b) What a /metrics scrape costs with 200 running containers (fake runtime: the agent's
    own work, per-instance stats included; pool usage comes from its cache): p50 of a
    scrape, the peer being GET /v1/instances (the same 200 records, listed) on the same
    server.

Run: .venv/bin/python bench/opsdata.py
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from api import import_busybox, load
from jsonline import emitter
from testbed.agentproc import AgentProcess, Api

INSTANCES = 200
SCRAPES = 40
ROUNDS = 3

line = emitter("opsdata")


def bench_access_log(tmp):
    """Both agents run side by side; their loads alternate ROUNDS times (medians), so the
    machine's noise hits both alike."""
    agents = {}
    try:
        for on in ("true", "false"):
            agent = AgentProcess(Path(tmp) / on, pool_kind="fake", tls_extra=f"access_log = {on}\n")
            agents[on] = (agent, agent.token("bench", "admin"))
            agent.start()
        runs = {"true": [], "false": []}
        for _ in range(ROUNDS):
            for on, (agent, token) in agents.items():
                runs[on].append(load(agent, token, "/v1/health"))
    finally:
        for agent, _ in agents.values():
            agent.stop()
    assert "agent.access" in (Path(tmp) / "true" / "agent.log").read_text()
    assert "agent.access" not in (Path(tmp) / "false" / "agent.log").read_text()
    med = {on: {k: statistics.median(r[k] for r in rs) for k in ("p50", "rps")} for on, rs in runs.items()}
    peer = "same request, [api] access_log = false, same run"
    line("health_with_access_log_p50", med["true"]["p50"], peer, med["false"]["p50"])
    line("health_with_access_log_rps", med["true"]["rps"], peer, med["false"]["rps"], unit="req/s")


def _p50(api, path) -> float:
    times = []
    for _ in range(SCRAPES):
        t0 = time.perf_counter()
        r = api.get(path)
        times.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, r.text
    return statistics.median(times)


def bench_scrape(tmp):
    agent = AgentProcess(Path(tmp) / "scrape", pool_kind="fake")
    token = agent.token("bench", "admin")
    agent.start()
    try:
        api = Api(agent.url, token)
        import_busybox(api, tmp)
        ops = [api.post("/v1/instances", json={"name": f"m{i}", "kind": "container", "image": "busybox",
                                               "memory_mib": 32, "network": "none"}).json()
               for i in range(INSTANCES)]
        for op in ops:
            assert api.wait(op, timeout=300)["status"] == "succeeded"
        text = api.get("/metrics").text
        assert text.count("nodeagent_instance_cpu_seconds_total{") == INSTANCES
        scrape, listing = _p50(api, "/metrics"), _p50(api, "/v1/instances")
    finally:
        agent.stop()
    line(f"metrics_scrape_{INSTANCES}_instances_p50", scrape, f"GET /v1/instances ({INSTANCES}), same server",
         listing)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        bench_access_log(tmp)
        bench_scrape(tmp)


if __name__ == "__main__":
    main()
