"""The live-migration watcher's post-copy rules (hypervisor.libvirt_migration._watch) and the
source's controls (agent.migration.source.live_options). The watcher runs against a stand-in
for a libvirt domain whose job never ends by itself and whose aborts are never honoured (the
fault: libvirtd refuses abortJob once post-copy runs): a cancel after post-copy began must
not abort it, and the hard stop (destroying the destination's half) must never run."""
from __future__ import annotations

import sys
import threading
import time

import libvirt
import pytest

from agent import models
from agent.config import MigrationConfig
from agent.errors import Unprocessable
from hypervisor import libvirt_migration as lm
from hypervisor.driver import MigrationOptions


class _Domain:
    """A migrating domain as libvirt shows it: jobStats while its job runs; post-copy once
    migrateStartPostCopy was called (state paused, reason postcopy); aborts are recorded, never
    honoured."""

    def __init__(self):
        self.postcopy = False
        self.aborts = 0
        self.iteration = 1

    def jobStats(self):  # noqa: N802 - libvirt's name
        self.iteration += 1
        return {"type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED, "data_total": 100, "data_processed": 50,
                "data_remaining": 50, "memory_dirty_rate": 9000, "memory_iteration": self.iteration}

    def state(self):
        return ((libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY) if self.postcopy
                else (libvirt.VIR_DOMAIN_RUNNING, 1))

    def migrateStartPostCopy(self, flags):  # noqa: N802
        self.postcopy = True

    def abortJob(self):  # noqa: N802
        self.aborts += 1
        raise libvirt.libvirtError("cannot abort migration in post-copy mode")

    def abortJobFlags(self, flags):  # noqa: N802
        assert flags == libvirt.VIR_DOMAIN_ABORT_JOB_POSTCOPY
        self.pauses = getattr(self, "pauses", 0) + 1

    def suspend(self):
        pass


def _run(o: MigrationOptions, *, cancel_after_postcopy: bool, seconds: float = 1.0):
    dom, stops, seen = _Domain(), [], []
    job = threading.Thread(target=time.sleep, args=(seconds,))
    job.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm, "ABORT_GRACE_S", 0)
        mp.setattr(lm, "POLL_S", 0.02)
        last, reason, _ = lm._watch(dom, job, o, time.monotonic(), seen.append,
                                    lambda: cancel_after_postcopy and dom.postcopy,
                                    lambda: stops.append(1), watch := lm._Watch())
    return dom, stops, seen, reason, watch


def test_once_postcopy_runs_cancel_is_ignored_and_the_destination_never_hard_stopped():
    o = MigrationOptions(postcopy=True, postcopy_after_iterations=3)
    dom, stops, seen, reason, watch = _run(o, cancel_after_postcopy=True)
    assert watch.postcopy and dom.postcopy
    assert reason is None and dom.aborts == 0 and stops == []
    phases = [p.phase for p in seen]
    assert phases[0] == "precopy" and phases[-1] == "postcopy"
    assert phases.index("postcopy") > 0 and set(phases[phases.index("postcopy"):]) == {"postcopy"}


def test_a_postcopy_that_sends_nothing_is_paused_and_one_that_progresses_is_not(monkeypatch):
    """A cut link never fails post-copy by itself: the watcher pauses it (resumable) once no
    byte went out for POSTCOPY_STALL_S; a slow one that still sends is left alone."""
    monkeypatch.setattr(lm, "POSTCOPY_STALL_S", 0.2)
    o = MigrationOptions(postcopy=True, postcopy_after_iterations=2)
    dom, stops, _seen, reason, watch = _run(o, cancel_after_postcopy=False)  # data_processed stays 50
    assert watch.postcopy and getattr(dom, "pauses", 0) >= 1 and dom.aborts == 0 and stops == []

    class _Sending(_Domain):
        def jobStats(self):  # noqa: N802
            st = super().jobStats()
            return {**st, "data_processed": self.iteration}
    monkeypatch.setattr(sys.modules[__name__], "_Domain", _Sending)
    dom, stops, _seen, reason, watch = _run(o, cancel_after_postcopy=False)
    assert watch.postcopy and getattr(dom, "pauses", 0) == 0 and stops == []


def test_the_completion_timeout_switches_to_postcopy_when_its_action_says_so():
    o = MigrationOptions(postcopy=True, completion_timeout_s=0.1, timeout_action="postcopy")
    dom, stops, seen, reason, watch = _run(o, cancel_after_postcopy=False)
    assert watch.postcopy and reason is None and stops == []


def test_without_postcopy_allowed_a_timeout_aborts_and_hard_stops_an_unanswered_abort():
    o = MigrationOptions(completion_timeout_s=0.1, timeout_action="abort")
    dom, stops, seen, reason, watch = _run(o, cancel_after_postcopy=False)
    assert not dom.postcopy and reason == "timeout" and dom.aborts >= 1 and stops == [1]
    assert {p.phase for p in seen} == {"precopy"}


def _passes(peaks, per_pass=3):
    """The stalled count _Convergence reports after memory passes whose dirty sets are ``peaks``
    (the first pass, all of memory, first), sampled ``per_pass`` times each as they drain."""
    c = lm._Convergence()
    for it, peak in enumerate(peaks, start=1):
        for k in range(per_pass):
            c.sample(it, peak * (per_pass - k) // per_pass)
    return c.sample(len(peaks) + 1, 0)


def test_convergence_counts_only_passes_that_do_not_shrink_the_dirty_set():
    assert _passes([512, 128, 64, 30, 10]) == 0  # converging: every pass beats the one before
    assert _passes([512, 128, 125, 130, 127]) == 3  # stuck at the working set
    assert _passes([512, 128, 125, 60, 61]) == 1  # a new low (the throttle bit) resets the count
    assert _passes([512, 128]) == 0  # the first pass (all of memory) is never compared


class _Stuck(_Domain):
    """A guest whose dirty set never shrinks (two samples per pass)."""

    def jobStats(self):  # noqa: N802
        st = super().jobStats()
        return {**st, "memory_iteration": self.iteration // 2, "memory_remaining": 40}


class _Shrinking(_Domain):
    """A guest whose dirty set halves every pass (it converges)."""

    def jobStats(self):  # noqa: N802
        st = super().jobStats()
        return {**st, "memory_remaining": 2 ** 40 >> self.iteration}


class _StuckThrottled(_Stuck):
    def jobStats(self):  # noqa: N802
        return {**super().jobStats(), "auto_converge_throttle": 60}


def test_with_auto_converge_stalled_passes_count_once_the_throttle_is_high(monkeypatch):
    o = MigrationOptions(postcopy=True, postcopy_after_stalled=2, auto_converge=True)
    monkeypatch.setattr(sys.modules[__name__], "_Domain", _Stuck)  # throttle 0: let it work first
    dom, stops, seen, reason, watch = _run(o, cancel_after_postcopy=False, seconds=0.6)
    assert not watch.postcopy and not dom.postcopy and seen[-1].memory_iteration >= 6
    monkeypatch.setattr(sys.modules[__name__], "_Domain", _StuckThrottled)
    dom, stops, seen, reason, watch = _run(o, cancel_after_postcopy=False)
    assert watch.postcopy and dom.postcopy


def test_the_policy_switches_to_postcopy_only_when_precopy_stops_converging(monkeypatch):
    o = MigrationOptions(postcopy=True, postcopy_after_stalled=2, auto_converge=False)
    monkeypatch.setattr(sys.modules[__name__], "_Domain", _Shrinking)
    dom, stops, seen, reason, watch = _run(o, cancel_after_postcopy=False, seconds=0.5)
    assert not watch.postcopy and not dom.postcopy and len(seen) > 5
    monkeypatch.setattr(sys.modules[__name__], "_Domain", _Stuck)
    dom, stops, seen, reason, watch = _run(o, cancel_after_postcopy=False)
    assert watch.postcopy and dom.postcopy and reason is None
    switched = [p.phase for p in seen].index("postcopy")
    assert seen[switched - 1].memory_iteration >= 4  # pass 2 sets the mark, 3 and 4 stall


def _req(**kw):
    return models.MigrationCreate.model_validate({"instance": "v", "destination": "d", **kw})


def test_live_options_follow_the_policy_where_the_request_is_silent():
    from agent.migration.source import live_options
    opts = live_options(_req(), MigrationConfig(), None)
    assert opts.pop("postcopy_required") is False
    assert opts == {"max_downtime_ms": 300, "bandwidth_mib_s": None, "auto_converge": True,
                    "completion_timeout_s": None, "timeout_action": "abort", "postcopy": True,
                    "postcopy_after_stalled": 3, "postcopy_after_s": 60.0, "postcopy_after_iterations": None}
    MigrationOptions(**opts)  # what the driver gets
    # the caller's own switch replaces the policy's bounds
    opts = live_options(_req(completion_timeout_s=5, timeout_action="postcopy"), MigrationConfig(), None)
    assert (opts["postcopy_required"], opts["postcopy"], opts["timeout_action"], opts["postcopy_after_s"]) == \
        (True, True, "postcopy", None)


def test_live_options_without_userfaultfd():
    from agent.migration.source import live_options
    why = "no userfaultfd here"
    assert live_options(_req(), MigrationConfig(), why)["postcopy"] is False  # the policy falls back
    policy = MigrationConfig(completion_timeout_s=60, timeout_action="postcopy")
    assert live_options(_req(), policy, why)["timeout_action"] == "abort"
    for asked in ({"postcopy": True}, {"completion_timeout_s": 5, "timeout_action": "postcopy"}):
        with pytest.raises(Unprocessable, match="userfaultfd"):
            live_options(_req(**asked), MigrationConfig(), why)
    assert live_options(_req(mode="cold"), MigrationConfig(), None)["postcopy"] is False


def test_qemu_plans_for_less_than_the_max_downtime_leaving_room_for_the_switchover():
    assert lm.qemu_downtime_limit(300) == 300 - lm.SWITCHOVER_RESERVE_MS
    assert lm.qemu_downtime_limit(2000) == 2000 - lm.SWITCHOVER_RESERVE_MS
    assert lm.qemu_downtime_limit(300, 62.5) == 237
    # a max the fixed part eats up: QEMU still gets the floor (the guest may then need the policy)
    assert lm.qemu_downtime_limit(101) == lm.DOWNTIME_FLOOR_MS and lm.qemu_downtime_limit(1) == lm.DOWNTIME_FLOOR_MS


def test_the_reserve_grows_with_the_largest_fixed_part_measured_per_destination():
    r = lm.Reserves()
    dest = "qemu+tls://h2/system"
    assert r.reserve_ms(dest) == lm.SWITCHOVER_RESERVE_MS  # nothing measured yet
    r.record(dest, 40)
    assert r.reserve_ms(dest) == lm.SWITCHOVER_RESERVE_MS  # never below the default
    r.record(dest, 160)
    r.record(dest, 20)
    assert r.reserve_ms(dest) == 160 * lm.RESERVE_MARGIN
    assert r.reserve_ms("qemu+tls://h3/system") == lm.SWITCHOVER_RESERVE_MS  # per destination
    for _ in range(lm.RESERVE_HISTORY):  # only the recent ones count
        r.record(dest, 30)
    assert r.reserve_ms(dest) == lm.SWITCHOVER_RESERVE_MS
    r.record(dest, 100, ram_ms=204, limit_ms=150)  # the RAM part overshot QEMU's limit
    assert r.reserve_ms(dest) == (100 + 54) * lm.RESERVE_MARGIN
    r.record(dest, 30, ram_ms=100, limit_ms=150)  # under it: the fixed part alone
    assert r.reserve_ms(dest) == (100 + 54) * lm.RESERVE_MARGIN


def test_the_downtime_limit_starts_at_its_cap_or_low_and_doubles_per_pass():
    d = lm._Downtime(cap=150)  # the default (DOWNTIME_START_MS off): the cap throughout
    assert d.limit == 150 and [d.step(i) for i in range(1, 8)] == [None] * 7
    d = lm._Downtime(cap=150, start=20)
    assert [d.step(i) for i in (0, 1, 1, 2)] == [None, None, None, None]  # the first passes at the start
    assert d.step(3) == 40 and d.step(3) is None  # once per pass
    assert d.step(4) == 80
    assert d.step(6) == 150 and d.step(7) is None and d.limit == 150  # never above the cap
    assert lm._Downtime(cap=10, start=20).limit == 10


# QMP events of one migration as hypervisor/switchover.py sees them (from bench/migration.py pause)
EVENTS = [("src", 205.478373, "MIGRATION", '{"status":"setup"}'),
          ("dst", 205.481383, "MIGRATION", '{"status":"active"}'),
          ("src", 206.021781, "STOP", ""),
          ("src", 206.056957, "MIGRATION", '{"status":"pre-switchover"}'),
          ("src", 206.069372, "MIGRATION", '{"status":"device"}'),
          ("dst", 206.127019, "MIGRATION", '{"status":"completed"}'),
          ("src", 206.127427, "MIGRATION", '{"status":"completed"}'),
          ("dst", 206.144089, "RESUME", "")]


def test_switchover_parts_from_qemu_events():
    from hypervisor import switchover
    sw = switchover.parse(EVENTS)
    assert round(sw.flush_ms, 1) == 35.2 and round(sw.mirror_ms, 1) == 12.4
    assert round(sw.ram_ms, 1) == 58.1 and round(sw.finish_ms, 1) == 17.1
    assert abs(sw.pause_ms - (35.2 + 12.4 + 58.1 + 17.1)) < 0.2
    assert abs(sw.fixed_ms - (35.2 + 12.4 + 17.1)) < 0.2
    assert switchover.parse(EVENTS[:-1]) is None  # not resumed there: no whole switchover
    assert switchover.parse([e for e in EVENTS if e[2] != "STOP"]) is None
    postcopy = EVENTS + [("src", 206.0, "MIGRATION", '{"status":"postcopy-active"}')]
    assert switchover.parse(postcopy) is None  # post-copy's switchover is another story
