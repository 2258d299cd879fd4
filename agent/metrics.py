"""Prometheus metrics on a registry of our own (never the process-global one).

Request counts and latencies are recorded as requests finish; operation, instance,
pool and per-instance figures are read from state when /metrics is scraped.
"""
from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _StateCollector:
    def __init__(self, root):
        self.root = root

    def collect(self):
        ops = GaugeMetricFamily("nodeagent_operations", "Operations by kind and status", labels=["kind", "status"])
        for kind, status, n in self.root.operations.counts():
            ops.add_metric([kind, status], n)
        yield ops
        inst = GaugeMetricFamily("nodeagent_instances", "Instances by kind and state", labels=["kind", "state"])
        for kind, state, n in self.root.instances.counts():
            inst.add_metric([kind, state], n)
        yield inst
        pool = GaugeMetricFamily("nodeagent_pool_bytes", "Pool capacity/used/available bytes",
                                 labels=["pool", "kind", "what"])
        for p in self.root.host.pools():
            for what in ("capacity", "used", "available"):
                if p["usage"]:
                    pool.add_metric([p["name"], p["kind"], what], p["usage"][what])
        yield pool
        cpu = GaugeMetricFamily("nodeagent_instance_cpu_seconds", "CPU time used by each running instance",
                                labels=["instance", "kind"])
        mem = GaugeMetricFamily("nodeagent_instance_memory_bytes", "Memory used by each running instance",
                                labels=["instance", "kind"])
        for i in self.root.instances.list():
            if i.state != "running":
                continue
            try:
                s = self.root.instances.stats(i.id)
            except Exception as e:
                log.debug("no stats for instance", extra={"instance": i.name, "error": str(e)})
                continue
            if s.get("cpu_ns") is not None:
                cpu.add_metric([i.name, i.kind], s["cpu_ns"] / 1e9)
            if s.get("memory_bytes") is not None:
                mem.add_metric([i.name, i.kind], s["memory_bytes"])
        yield cpu
        yield mem


class Metrics:
    def __init__(self, root):
        self.registry = CollectorRegistry()
        self.requests = Counter("nodeagent_http_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("nodeagent_http_request_duration_seconds", "HTTP request latency",
                                 ["endpoint", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_StateCollector(root))

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint, method).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
