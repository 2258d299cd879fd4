"""/metrics by the Prometheus conventions: the exposition passes a lint with the rules of
`promtool check metrics` (Debian's promtool comes only with the whole prometheus package,
about 96 MB installed, so the rules are checked here on prometheus_client's parser)."""
from __future__ import annotations

import re
import time

from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import inprocess_app

NAME_RE = re.compile(r"^[a-z_:][a-z0-9_:]*$")
LABEL_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
# promtool's (client_golang promlint) non-base units, and the suffixes only histograms/summaries may use
NON_BASE_UNITS = ("milliseconds", "microseconds", "nanoseconds", "minutes", "hours", "days", "weeks",
                  "kilobytes", "megabytes", "gigabytes", "terabytes", "kibibytes", "mebibytes", "gibibytes",
                  "bits", "percent", "celsius", "fahrenheit", "ms", "us", "ns", "kb", "mb", "gb")
RESERVED = ("_count", "_sum", "_bucket")


def lint(text: str) -> list[str]:
    """What `promtool check metrics` would say about this exposition, plus a parse of it."""
    problems = []
    help_seen, type_seen = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, doc = line[len("# HELP "):].partition(" ")
            if name in help_seen:
                problems.append(f"{name}: duplicate HELP")
            help_seen[name] = doc
        elif line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE "):].partition(" ")
            if name in type_seen:
                problems.append(f"{name}: duplicate TYPE")
            type_seen[name] = kind
    for name, kind in type_seen.items():
        if not help_seen.get(name):
            problems.append(f"{name}: no help text")
        if not NAME_RE.match(name):
            problems.append(f"{name}: not a lower-case snake_case name")
        if kind == "counter" and not name.endswith("_total"):
            problems.append(f"{name}: counter metrics should have \"_total\" suffix")
        if kind != "counter" and name.endswith("_total"):
            problems.append(f"{name}: non-counter metrics should not have \"_total\" suffix")
        if kind not in ("histogram", "summary") and name.endswith(RESERVED):
            problems.append(f"{name}: non-histogram and non-summary metrics should not have a {RESERVED} suffix")
        for unit in NON_BASE_UNITS:
            if f"_{unit}_" in name + "_":
                problems.append(f"{name}: use base unit instead of {unit}")
        if kind == "gauge" and name.endswith("_info") is False and "info" in name.split("_")[-1:]:
            problems.append(f"{name}: an info metric's name ends in _info")
    series = set()
    for family in text_string_to_metric_families(text):  # raises on anything malformed
        for s in family.samples:
            for label in s.labels:
                if not LABEL_RE.match(label) or label.startswith("__"):
                    problems.append(f"{s.name}: label {label!r} is not a valid snake_case label")
            key = (s.name, tuple(sorted(s.labels.items())))
            if key in series:
                problems.append(f"{s.name}{s.labels}: duplicate series")
            series.add(key)
    return problems


def test_the_linter_catches_what_promtool_catches():
    bad = ("# HELP x_seconds h\n# TYPE x_seconds counter\nx_seconds 1\n"
           "# HELP y_total h\n# TYPE y_total gauge\ny_total 1\n"
           "# TYPE z_milliseconds gauge\nz_milliseconds 1\n"
           "# HELP dup h\n# TYPE dup gauge\ndup 1\n# HELP dup h\n# TYPE dup gauge\n")
    found = "\n".join(lint(bad))
    for expect in ("x_seconds: counter", "y_total: non-counter", "z_milliseconds: no help",
                   "use base unit instead of milliseconds", "dup: duplicate HELP", "dup: duplicate TYPE"):
        assert expect in found, (expect, found)


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_pass_the_lint_and_name_what_operators_need(tmp_path):
    app, client, root = inprocess_app(tmp_path)
    try:
        op = client.post("/v1/instances", json={"name": "m1", "kind": "vm", "image": "tiny-vm",
                                                "cpus": 1, "memory_mib": 64}).json
        op = client.get(f"/v1/operations/{op['id']}/wait?timeout=30").json
        assert op["status"] == "succeeded", op
        client.get("/v1/host")
        r = client.get("/metrics")
        assert r.status_code == 200 and r.content_type.startswith("text/plain")
        text = r.get_data(as_text=True)
        assert lint(text) == [], lint(text)
        fam = _families(text)
        # types, as the parser reads them (counters lose their _total in the family name)
        expected = {"nodeagent_http_requests": "counter", "nodeagent_http_request_duration_seconds": "histogram",
                    "nodeagent_build_info": "gauge", "nodeagent_operations": "gauge",
                    "nodeagent_instances": "gauge", "nodeagent_pool_up": "gauge",
                    "nodeagent_pool_usage_age_seconds": "gauge", "nodeagent_pool_size_bytes": "gauge",
                    "nodeagent_pool_used_bytes": "gauge", "nodeagent_pool_free_bytes": "gauge",
                    "nodeagent_instance_cpu_seconds": "counter", "nodeagent_instance_memory_bytes": "gauge",
                    "nodeagent_instance_network_receive_bytes": "counter",
                    "nodeagent_instance_network_transmit_bytes": "counter",
                    "nodeagent_instance_network_receive_packets": "counter",
                    "nodeagent_instance_network_transmit_packets": "counter",
                    "nodeagent_instance_disk_read_bytes": "counter",
                    "nodeagent_instance_disk_written_bytes": "counter",
                    "nodeagent_instance_oom_kills": "counter",
                    "process_cpu_seconds": "counter", "process_resident_memory_bytes": "gauge",
                    "process_open_fds": "gauge", "process_start_time_seconds": "gauge",
                    "python_info": "gauge", "python_gc_collections": "counter"}
        for name, kind in expected.items():
            assert name in fam and fam[name].type == kind, (name, fam.get(name))
        # the old names are gone (a breaking rename, listed in the README)
        for old in ("nodeagent_pool_bytes", "nodeagent_instance_cpu_seconds "):
            assert f"\n{old}" not in text and f"# TYPE {old}" not in text
        (build,) = fam["nodeagent_build_info"].samples
        assert build.value == 1 and build.labels["version"] and build.labels["python"]
        cpu = [s for s in fam["nodeagent_instance_cpu_seconds"].samples if s.labels["name"] == "m1"]
        assert cpu and cpu[0].labels == {"name": "m1", "kind": "vm"} and cpu[0].name.endswith("_total")
        rx = [s for s in fam["nodeagent_instance_network_receive_packets"].samples if s.labels["name"] == "m1"]
        assert rx and rx[0].value >= 0
        sizes = {s.labels["pool"]: s.value for s in fam["nodeagent_pool_size_bytes"].samples}
        used = {s.labels["pool"]: s.value for s in fam["nodeagent_pool_used_bytes"].samples}
        free = {s.labels["pool"]: s.value for s in fam["nodeagent_pool_free_bytes"].samples}
        assert sizes["default"] > 0 and 0 < used["default"] <= sizes["default"] and free["default"] > 0
        status_of = {(s.labels["kind"], s.labels["status"]): s.value for s in fam["nodeagent_operations"].samples}
        assert status_of[("instance.create", "succeeded")] >= 1
        assert client.delete("/v1/instances/m1").status_code in (200, 202)
    finally:
        root.stop()


# what /metrics says of an instance -> where GET /v1/instances/{id}/stats says it (section, keys)
STATS_OF_SERIES = {
    "nodeagent_instance_network_receive_bytes": ("net", ("rx_bytes",)),
    "nodeagent_instance_network_transmit_bytes": ("net", ("tx_bytes",)),
    "nodeagent_instance_network_receive_packets": ("net", ("rx_packets",)),
    "nodeagent_instance_network_transmit_packets": ("net", ("tx_packets",)),
    "nodeagent_instance_disk_read_bytes": ("io", ("read_bytes", "rd_bytes")),
    "nodeagent_instance_disk_written_bytes": ("io", ("write_bytes", "wr_bytes")),
    "nodeagent_instance_oom_kills": (None, ("oom_kills",)),
}
MEMORY_SLACK = 4 << 20  # bytes a running instance's memory may move past both reads around the scrape
MEMORY_TRIES = 5  # a booting guest's QEMU grows and shrinks by more: the memory must match once in so many


def assert_metrics_match_stats(stats, scrape, name: str, kind: str) -> None:
    """/metrics reports instance ``name`` as its stats route does: each counter between a
    ``stats()`` before the ``scrape()`` and one after (they only grow), every time; the memory
    (a gauge) between them give or take MEMORY_SLACK, at least once in MEMORY_TRIES; every
    counter the stats give has its series."""
    for attempt in range(MEMORY_TRIES):
        before, text, after = stats(), scrape(), stats()
        fam = _families(text)

        def value(metric):
            got = [s.value for s in fam[metric].samples if s.labels == {"name": name, "kind": kind}]
            assert len(got) == 1, (metric, name, got)
            return got[0]
        cpu = value("nodeagent_instance_cpu_seconds")
        assert before["cpu_ns"] / 1e9 - 1e-6 <= cpu <= after["cpu_ns"] / 1e9 + 1e-6, (cpu, before, after)
        for metric, (section, keys) in STATS_OF_SERIES.items():
            lo, hi = ((before.get(section) or {}), (after.get(section) or {})) if section else (before, after)
            key = next((k for k in keys if lo.get(k) is not None), None)
            if key is None:
                continue  # e.g. a VM has no oom_kills
            assert lo[key] <= value(metric) <= hi[key], (metric, lo[key], hi[key])
        mem = value("nodeagent_instance_memory_bytes")
        low, high = sorted((before["memory_bytes"], after["memory_bytes"]))
        if low - MEMORY_SLACK <= mem <= high + MEMORY_SLACK:
            return
        assert attempt < MEMORY_TRIES - 1, ("memory", mem, before, after)
        time.sleep(0.5)


def test_metrics_report_what_the_stats_route_reports(tmp_path):
    """The scrape reads every instance's counters together (the drivers' bulk_stats), the
    stats route one at a time: the same figures (fake driver and runtime; the real ones in
    test_real_vm.py and test_interactive_runc.py)."""
    app, client, root = inprocess_app(tmp_path)
    try:
        from containers.runtime import SupportsBulkStats as BulkContainers
        from hypervisor.driver import SupportsBulkStats as BulkVms
        assert isinstance(root.driver, BulkVms) and isinstance(root.runtime, BulkContainers)
        op = client.post("/v1/instances", json={"name": "mv", "kind": "vm", "image": "tiny-vm", "cpus": 1,
                                                "memory_mib": 64}).json
        assert client.get(f"/v1/operations/{op['id']}/wait?timeout=30").json["status"] == "succeeded"
        assert_metrics_match_stats(lambda: client.get("/v1/instances/mv/stats").json,
                                   lambda: client.get("/metrics").get_data(as_text=True), "mv", "vm")
        op = client.post("/v1/instances/mv/actions", json={"action": "stop"}).json
        assert client.get(f"/v1/operations/{op['id']}/wait?timeout=30").json["status"] == "succeeded"
        assert 'name="mv"' not in client.get("/metrics").get_data(as_text=True)  # stopped: no series
    finally:
        root.stop()


def _age(client) -> float:
    fam = _families(client.get("/metrics").get_data(as_text=True))
    (sample,) = [s for s in fam["nodeagent_pool_usage_age_seconds"].samples if s.labels["pool"] == "default"]
    return sample.value


def test_pool_usage_is_cached_with_its_age(tmp_path):
    """Scrapes within [metrics] pool_usage_interval read the cached usage: its age grows."""
    app, client, root = inprocess_app(tmp_path, metrics={"pool_usage_interval": 3600})
    try:
        first = _age(client)
        time.sleep(0.3)
        second = _age(client)
        assert second >= first + 0.3
    finally:
        root.stop()


def test_stale_pool_usage_is_refreshed_in_the_background(tmp_path):
    app, client, root = inprocess_app(tmp_path, metrics={"pool_usage_interval": 1})
    try:
        start = time.monotonic()
        ages = [_age(client)]
        deadline = start + 15
        while time.monotonic() < deadline and not (len(ages) > 2 and ages[-1] < max(ages)):
            time.sleep(0.25)
            ages.append(_age(client))
        # A new reading came (the age fell), and only once the cached one had outlived the
        # interval: the scrape that finds it stale may already see the refreshed reading.
        assert len(ages) > 2 and ages[-1] < max(ages), ages
        assert time.monotonic() - start >= 1, ages
    finally:
        root.stop()


def test_concurrent_scrapes_share_one_render(tmp_path):
    """Many clients scraping at once cost one render (a slow collector stands in for a host
    with many instances: the fault injected)."""
    import threading

    app, client, root = inprocess_app(tmp_path)
    try:
        calls, gate = [], threading.Event()

        class Slow:
            def collect(self):
                calls.append(1)
                gate.wait(10)
                return []
        root.metrics.registry.register(Slow())
        results = []
        threads = [threading.Thread(target=lambda: results.append(root.metrics.render()[0])) for _ in range(8)]
        threads[0].start()
        while not calls:
            time.sleep(0.01)
        for t in threads[1:]:
            t.start()
        shared = root.metrics._rendering
        deadline = time.monotonic() + 10
        while len(shared._condition._waiters) < 7 and time.monotonic() < deadline:
            time.sleep(0.01)  # until the seven others wait on the first render
        gate.set()
        for t in threads:
            t.join(10)
        assert len(results) == 8 and len(set(results)) == 1 and len(calls) == 1
        assert b"nodeagent_build_info" in root.metrics.render()[0] and len(calls) == 2  # the next one renders
    finally:
        root.stop()


def test_a_hung_pool_never_holds_up_a_scrape(tmp_path):
    """A pool whose usage call hangs (an S3 endpoint that stopped answering: the fault
    injected) leaves scrapes answering with the last reading, its age growing."""
    import threading

    app, client, root = inprocess_app(tmp_path, metrics={"pool_usage_interval": 1})
    pool = root.pools["default"]
    hung, real = threading.Event(), type(pool).usage
    try:
        assert _age(client) < 1
        pool.usage = lambda: hung.wait(60) and real(pool)  # this pool object only
        time.sleep(1.2)  # the reading goes stale; the next scrape starts a refresh that hangs
        answers = []
        scraper = threading.Thread(target=lambda: answers.extend(_age(client) for _ in range(3)))
        scraper.start()
        scraper.join(30)
        assert len(answers) == 3 and min(answers) >= 1  # three scrapes answered, with the stale reading
        fam = _families(client.get("/metrics").get_data(as_text=True))
        assert [s.value for s in fam["nodeagent_pool_up"].samples] == [1]
    finally:
        hung.set()
        del pool.usage
        root.stop()
