"""RuncRuntime under concurrent use: per-container locks, atomic leases and ports."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from containers import NetworkSpec
from testbed.runtimes import make_runc, make_spec

pytestmark = pytest.mark.real


def test_parallel_creates_get_distinct_addresses_and_a_slow_stop_blocks_nobody(tmp_path):
    rt, cleanup = make_runc(tmp_path)
    try:
        rt.create(make_spec(rt, tmp_path, "slow", ("sleep", "1000"), network=NetworkSpec()))
        rt.start("slow")
        stopping = threading.Thread(target=rt.stop, args=("slow",), kwargs={"timeout": 60})
        stopping.start()  # busybox sleep ignores SIGTERM: this holds "slow" for up to 60 s

        def one(i):
            name = f"p{i}"
            rt.create(make_spec(rt, tmp_path, name, ("sleep", "1000"), network=NetworkSpec()))
            return rt.start(name)
        with ThreadPoolExecutor(6) as pool:
            infos = list(pool.map(one, range(8)))
        assert stopping.is_alive()  # all eight ran while "slow" was still stopping
        rt._runc("kill", "slow", "KILL")  # end the wait (behind the runtime's back)
        stopping.join()
        assert all(i.state == "running" for i in infos)
        assert len({i.ip for i in infos}) == 8
        assert rt.get("slow").exit_code == 137
    finally:
        cleanup()
