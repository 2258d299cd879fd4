"""Prometheus metrics on a registry of our own (never the process-global one).

Names follow the Prometheus conventions (what ``promtool check metrics`` checks): counters
end in ``_total``, values are in base units (seconds, bytes), one metric per unit (a pool's
size, used and free bytes are three gauges, not one summed over a ``what`` label), build
facts are a ``nodeagent_build_info`` gauge of 1. Per-instance series carry the label
``name`` (not ``instance``: Prometheus sets that label to the scraped target).

Request counts and latencies are recorded as requests finish; operation and instance
counts and per-instance figures are read from state when /metrics is scraped. Pool usage
is not: listing an object pool walks its whole bucket, so usage is cached per pool and
refreshed in the background at most every ``[metrics] pool_usage_interval`` seconds; a
scrape never waits for it (except up to FIRST_USAGE_WAIT for a pool never read yet), and
``nodeagent_pool_usage_age_seconds`` says how old the figures are. Scrapes that arrive while
one renders share its result: however many clients scrape at once, one render runs.
"""
from __future__ import annotations

import logging
import platform
import threading
import time
from concurrent.futures import Future
from importlib import metadata

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, GCCollector, Histogram,
                               PlatformCollector, ProcessCollector, disable_created_metrics, generate_latest)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
FIRST_USAGE_WAIT = 1.0  # seconds a scrape waits for a pool's very first usage reading (local: microseconds)

# per-instance series: (name, type, help, where in InstanceService.stats(): section or None, keys (the
# containers' name first, the VMs' next), the divisor to the series' unit); a counter's name ends in _total
INSTANCE_SERIES = (
    ("nodeagent_instance_cpu_seconds_total", "counter", "CPU time used by each running instance (restarts from "
     "0 when the instance restarts)", None, ("cpu_ns",), 1e9),
    ("nodeagent_instance_memory_bytes", "gauge", "Memory used by each running instance (containers: the memory "
     "cgroup's usage; VMs: QEMU's resident set)", None, ("memory_bytes",), 1),
    ("nodeagent_instance_network_receive_bytes_total", "counter", "Bytes received by the instance's network "
     "interfaces", "net", ("rx_bytes",), 1),
    ("nodeagent_instance_network_transmit_bytes_total", "counter", "Bytes sent by the instance's network "
     "interfaces", "net", ("tx_bytes",), 1),
    ("nodeagent_instance_network_receive_packets_total", "counter", "Packets received by the instance's network "
     "interfaces", "net", ("rx_packets",), 1),
    ("nodeagent_instance_network_transmit_packets_total", "counter", "Packets sent by the instance's network "
     "interfaces", "net", ("tx_packets",), 1),
    ("nodeagent_instance_disk_read_bytes_total", "counter", "Bytes read from the instance's disks (VMs) or block "
     "devices (containers' cgroup io)", "io", ("read_bytes", "rd_bytes"), 1),
    ("nodeagent_instance_disk_written_bytes_total", "counter", "Bytes written to the instance's disks (VMs) or "
     "block devices (containers' cgroup io)", "io", ("write_bytes", "wr_bytes"), 1),
    ("nodeagent_instance_oom_kills_total", "counter", "Processes the kernel's OOM killer ended in the instance's "
     "memory cgroup (containers; a guest's own OOM kills are not visible to the host)", None, ("oom_kills",), 1),
)


def _escape(text: str, quote: bool = True) -> str:
    """The text format's escapes: a backslash and a newline in HELP, and a quote in a label value."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quote else text


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


class PoolUsageCache:
    """Each pool's last usage reading and when it was taken; a stale one is refreshed by a
    thread of its own (one per pool at a time), so a slow pool delays neither a scrape nor
    the other pools."""

    def __init__(self, root, interval: float):
        self.root, self.interval = root, interval
        self._lock = threading.Lock()
        self._readings: dict[str, tuple[float, object, str | None]] = {}  # pool -> (monotonic at, usage, error)
        self._busy: dict[str, threading.Event] = {}  # pool -> set when its refresh ends

    def readings(self) -> dict[str, tuple[float, object, str | None]]:
        """pool -> (age in seconds, Usage or None, error or None), for the pools read at least once."""
        now = time.monotonic()
        waits = []
        for name in self.root.config.pools:
            with self._lock:
                have = self._readings.get(name)
                if (have is None or now - have[0] >= self.interval) and name not in self._busy:
                    self._busy[name] = done = threading.Event()
                    threading.Thread(target=self._refresh, args=(name, done), daemon=True,
                                     name=f"pool-usage-{name}"[:40]).start()
                if have is None:
                    waits.append(self._busy[name])
        deadline = time.monotonic() + FIRST_USAGE_WAIT
        for done in waits:
            done.wait(max(0.0, deadline - time.monotonic()))
        now = time.monotonic()
        with self._lock:
            return {n: (now - at, usage, err) for n, (at, usage, err) in self._readings.items()}

    def _refresh(self, name: str, done: threading.Event) -> None:
        usage, err = None, None
        try:
            usage = self.root.pools[name].usage()
        except Exception as e:  # a pool that is down is reported (nodeagent_pool_up 0), not fatal
            err = str(e) or type(e).__name__
            log.debug("pool usage unavailable", extra={"pool": name, "error": err})
        with self._lock:
            self._readings[name] = (time.monotonic(), usage, err)
            self._busy.pop(name, None)
        done.set()


class _StateCollector:
    def __init__(self, root, pools: PoolUsageCache):
        self.root, self.pools = root, pools

    def collect(self):
        info = GaugeMetricFamily("nodeagent_build_info", "The agent's version and Python's (always 1)",
                                 labels=["version", "python"])
        info.add_metric([_version("nodeagent"), platform.python_version()], 1)
        yield info
        ops = GaugeMetricFamily("nodeagent_operations", "Operations kept in state, by kind and status",
                                labels=["kind", "status"])
        for kind, status, n in self.root.operations.counts():
            ops.add_metric([kind, status], n)
        yield ops
        inst = GaugeMetricFamily("nodeagent_instances", "Instances by kind and state", labels=["kind", "state"])
        for kind, state, n in self.root.instances.counts():
            inst.add_metric([kind, state], n)
        yield inst
        yield from self._pools()

    def _pools(self):
        kinds = {name: pc.kind for name, pc in self.root.config.pools.items()}
        labels = ["pool", "kind"]
        up = GaugeMetricFamily("nodeagent_pool_up", "1 if the pool's usage could be read at the last "
                               "reading, else 0", labels=labels)
        age = GaugeMetricFamily("nodeagent_pool_usage_age_seconds", "Age of the pool usage figures "
                                "(refreshed every [metrics] pool_usage_interval seconds)", labels=labels)
        size = GaugeMetricFamily("nodeagent_pool_size_bytes", "Pool capacity in bytes (object pools: "
                                 "none, S3 has no capacity)", labels=labels)
        used = GaugeMetricFamily("nodeagent_pool_used_bytes", "Bytes used in the pool", labels=labels)
        free = GaugeMetricFamily("nodeagent_pool_free_bytes", "Bytes still available in the pool "
                                 "(object pools: none)", labels=labels)
        for name, (secs, usage, _err) in sorted(self.pools.readings().items()):
            lv = [name, kinds.get(name, "")]
            up.add_metric(lv, 0 if usage is None else 1)
            age.add_metric(lv, secs)
            if usage is None:
                continue
            used.add_metric(lv, usage.used)
            if lv[1] != "object":  # an S3 bucket's capacity is nominal: no series rather than a made-up one
                size.add_metric(lv, usage.capacity)
                free.add_metric(lv, usage.available)
        yield from (up, age, size, used, free)


class _InstanceSeries:
    """The per-instance series (INSTANCE_SERIES) of every running instance, written straight in
    the text format: their stats read together (InstanceService.stats_of_many: one driver call
    per kind where it can), each instance's labels escaped once. prometheus_client's renderer
    checks and escapes every label of every sample again: nine samples per instance made it
    most of a scrape's own cost with hundreds of instances."""

    def __init__(self, root):
        self.root = root

    def render(self) -> bytes:
        running = self.root.instances.running()
        stats = self.root.instances.stats_of_many(running)
        lines: list[list[str]] = [[] for _ in INSTANCE_SERIES]
        for i in running:
            s = stats.get(i.id)
            if s is None:
                continue
            labels = f'{{kind="{_escape(i.kind)}",name="{_escape(i.name)}"}} '
            for out, (_name, _type, _help, section, keys, divisor) in zip(lines, INSTANCE_SERIES):
                where = (s.get(section) or {}) if section else s
                value = next((where[k] for k in keys if where.get(k) is not None), None)
                if value is not None:
                    out.append(labels + floatToGoString(value / divisor if divisor != 1 else value))
        text = []
        for (name, kind, help_text, *_), samples in zip(INSTANCE_SERIES, lines):
            text.append(f"# HELP {name} {_escape(help_text, quote=False)}\n# TYPE {name} {kind}\n")
            text.extend(f"{name}{sample}\n" for sample in samples)
        return "".join(text).encode()


class Metrics:
    def __init__(self, root):
        disable_created_metrics()  # no `*_created` gauge beside each counter: noise to every scraper
        self.registry = CollectorRegistry()
        self.requests = Counter("nodeagent_http_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("nodeagent_http_request_duration_seconds", "HTTP request latency",
                                 ["endpoint", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        # process_* (cpu, resident memory, open fds, start time) and python_* (gc, info)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.pool_usage = PoolUsageCache(root, root.config.metrics.pool_usage_interval)
        self.registry.register(_StateCollector(root, self.pool_usage))
        self.instance_series = _InstanceSeries(root)
        self._lock = threading.Lock()
        self._rendering: Future | None = None  # the render in progress, shared by scrapes meanwhile

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint, method).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        with self._lock:
            shared, mine = self._rendering, self._rendering is None
            if mine:
                shared = self._rendering = Future()
        if not mine:
            return shared.result()
        try:
            out = generate_latest(self.registry) + self.instance_series.render(), CONTENT_TYPE_LATEST
            shared.set_result(out)
            return out
        except BaseException as e:
            shared.set_exception(e)
            raise
        finally:
            with self._lock:
                self._rendering = None
