"""Live migration on libvirt, peer to peer: the source libvirtd connects to the destination's
(``qemu+tcp://<host>/system`` or ``qemu+tls://``) and QEMU streams memory (and, for local
disks, the disks over libvirt's NBD-based copy) on the destination's ``migration_host``.

The job runs in a helper thread (``migrateToURI3`` blocks); the calling thread samples
``jobStats`` for progress, and aborts the job on cancel or on the completion timeout
(or, with ``timeout_action="pause"``, suspends the guest so the copy converges and the
destination resumes it). libvirt guarantees the source domain keeps running when the job
fails; the destination's half-made domain is removed by libvirt itself.

Post-copy (``options.postcopy``: ``VIR_MIGRATE_POSTCOPY``): the watcher calls
``migrateStartPostCopy`` when the completion timeout's action is "postcopy", when pre-copy
stopped converging (``postcopy_after_stalled``: that many memory passes in a row that did not
shrink the dirty set, see _Convergence) or when a backstop bound passes (``postcopy_after_s``
/ ``postcopy_after_iterations``). A guest whose pre-copy converges never switches: its
switchover is the short one of pre-copy, within ``max_downtime_ms``. From then on the guest
runs on the destination, which pulls missing pages from here (userfaultfd): the job is
never aborted, never hard-stopped, and a failure (the link cut) leaves the source paused
(``postcopy-failed``) and the destination stalled: ``PostCopyFailed``, both halves kept.
A cut link does not fail the job by itself (TCP retransmits for many minutes): a post-copy
that sent no byte for POSTCOPY_STALL_S is paused (``abortJobFlags(ABORT_JOB_POSTCOPY)``,
QEMU's ``migrate-pause``), which fails it in that resumable state.

Resume (``resume_postcopy``, libvirt 8.5+: ``VIR_MIGRATE_POSTCOPY_RESUME``): once the link is
back, the same peer-to-peer call with the resume flag restarts the copy from where it stopped.
libvirt refuses it ("QEMU reports migration is still running") while either end's QEMU is still
``postcopy-active``: a destination whose TCP connection has not failed yet never notices a
cut link by itself, so its end is paused first (``abortJobFlags(ABORT_JOB_POSTCOPY)`` there).
And the destination's QEMU must answer its monitor (libvirt's ``migrate-recover`` goes through
its main loop): under TCG a vCPU that faults on a missing page while holding QEMU's global lock
blocks that loop for good, and a resume started then would hang on both hosts; it is checked
first and the resume refused (``_pause_incoming_postcopy``; README "Post-copy failures").
"""
from __future__ import annotations

import threading
import time
import xml.etree.ElementTree as ET

import libvirt

from agent.errors import Cancelled, CommandFailed, Conflict, InvalidInput, NotFound, PostCopyFailed
from hypervisor import switchover
from hypervisor.domain_xml import NODEAGENT_NS, QEMU_NS, RBD_DEFAULT_PORT
from hypervisor.driver import TIMEOUT_ACTIONS, MigrationOptions, MigrationProgress, MigrationResult

POLL_S = 0.2  # jobStats sampling interval
ABANDON_WAIT_S = 30  # how long a caller that goes away waits for its aborted job
ABORT_GRACE_S = 15  # an abort not honoured by then: the destination's incoming domain is destroyed
POSTCOPY_STALL_S = 10  # a post-copy that sent nothing for this long has lost its link: it is paused
# a resume first pauses the destination's end if it has not seen the break yet (QEMU's
# migrate-pause there); it reaches the failed state within this, or the resume is not tried
INCOMING_PAUSE_WAIT_S = 30
MONITOR_PROBE_S = 45  # the destination's QEMU answers query-migrate within this (libvirt waits 30 s for a job)
RESUME_STALL_S = 120  # a resume that moved no byte for this long is given up (the guest stays split)
# The guest's pause at the switchover (hypervisor/switchover.py, measured by bench/migration.py
# pause): the RAM part (last memory pass + device state) is what QEMU's downtime-limit bounds,
# from its estimate of the bandwidth: a busy guest's came out up to 1.4x the limit here. The
# fixed part (the stop's disk flush, libvirt ending the NBD mirrors, its Finish and `cont` on the
# destination) comes on top: 25-150 ms here (TCG, loaded hosts), most of it the flush. So QEMU's
# limit is the max minus a reserve: SWITCHOVER_RESERVE_MS, or more when the pauses of the last
# RESERVE_HISTORY migrations to that destination went further over their limits (the fixed part
# plus the RAM part's overshoot), times RESERVE_MARGIN. The reserve never shrinks below
# SWITCHOVER_RESERVE_MS: a larger limit lengthens an idle guest's pause (QEMU stops as soon as
# the remainder fits it), which the ping of "Network continuity" pays.
SWITCHOVER_RESERVE_MS = 150
RESERVE_HISTORY = 8
RESERVE_MARGIN = 1.25
DOWNTIME_FLOOR_MS = 10  # QEMU's limit never goes below this (a max the fixed part eats up)
# A limit that starts low (20 ms) and doubles per pass from the third up to its cap halved an
# idle guest's RAM part (17-25 ms instead of 41-72), but its extra memory passes came with a
# migrated guest that stopped answering (the ping guest: 2 of 3 migrations, lost 170 and 388
# pings; see README "Where the pause goes"), as a steeper auto-converge did before: off (None:
# the limit is the cap from the start) until that is understood.
DOWNTIME_START_MS: int | None = None
# With auto-converge on, stalled passes count only once its throttle reached this: QEMU
# raises it (20%, then +10%) at most every other pass of a second or more, and a guest it
# slows down converges in pre-copy, paused 0.1-0.5 s, where post-copy's switchover paused
# the moderate guest 0.7-2.5 s here (bench/migration.py vm_live_moderate).
THROTTLE_BEFORE_POSTCOPY_PCT = 50
PROGRESS_RATIO = 0.9  # a memory pass made progress when its dirty set is below 90% of the smallest before
COPY_FLAGS = {"none": 0, "incremental": libvirt.VIR_MIGRATE_NON_SHARED_INC,
              "full": libvirt.VIR_MIGRATE_NON_SHARED_DISK}
BASE_FLAGS = (libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
              | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE | libvirt.VIR_MIGRATE_ABORT_ON_ERROR)


POSTCOPY_REASONS = (libvirt.VIR_DOMAIN_PAUSED_POSTCOPY, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED)


def check_options(o: MigrationOptions) -> None:
    if o.copy_storage not in COPY_FLAGS:
        raise InvalidInput(f"copy_storage must be one of {sorted(COPY_FLAGS)}, got {o.copy_storage!r}")
    if o.timeout_action not in TIMEOUT_ACTIONS:
        raise InvalidInput(f"timeout_action must be one of {', '.join(TIMEOUT_ACTIONS)}, got {o.timeout_action!r}")
    if o.timeout_action == "postcopy" and not o.postcopy:
        raise InvalidInput("timeout_action=postcopy needs post-copy allowed (postcopy=True)")
    if o.postcopy and not o.live:
        raise InvalidInput("post-copy moves a running guest: it needs a live migration")


def qemu_downtime_limit(max_downtime_ms: int, reserve_ms: float = SWITCHOVER_RESERVE_MS) -> int:
    """The cap of QEMU's downtime-limit for a pause of at most ``max_downtime_ms`` when the
    switchover's fixed part takes up to ``reserve_ms``."""
    return max(DOWNTIME_FLOOR_MS, int(max_downtime_ms - reserve_ms))


class Reserves:
    """The fixed parts of the switchovers measured per destination (a driver keeps one; in
    memory: a restarted agent starts from SWITCHOVER_RESERVE_MS again)."""

    def __init__(self):
        self._seen: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def reserve_ms(self, dest_uri: str) -> float:
        with self._lock:
            seen = self._seen.get(dest_uri)
            return max(SWITCHOVER_RESERVE_MS, max(seen) * RESERVE_MARGIN) if seen else SWITCHOVER_RESERVE_MS

    def record(self, dest_uri: str, fixed_ms: float, ram_ms: float = 0.0, limit_ms: float | None = None) -> None:
        """One switchover's fixed part, plus what its RAM part took over QEMU's limit then."""
        over = max(0.0, ram_ms - limit_ms) if limit_ms is not None else 0.0
        with self._lock:
            self._seen[dest_uri] = (self._seen.get(dest_uri, []) + [max(0.0, fixed_ms) + over])[-RESERVE_HISTORY:]


class _Downtime:
    """QEMU's downtime-limit during one migration: ``start`` (at most the cap; None: the cap),
    doubled on each memory pass from the third that did not end the copy, up to ``cap``.
    ``step(pass)`` returns the new limit when it changes, else None."""

    def __init__(self, cap: int, start: int | None = None):
        self.cap = cap
        self.limit = cap if start is None else min(cap, start)
        self.iteration = 0

    def step(self, iteration: int) -> int | None:
        if iteration <= self.iteration:
            return None
        self.iteration = iteration
        if iteration < 3 or self.limit >= self.cap:
            return None
        self.limit = min(self.cap, self.limit * 2)
        return self.limit


def rewrite_xml(xml: str, o: MigrationOptions) -> str:
    """The domain XML as the destination must see it: disk sources and the console log
    moved to the destination's paths; an RBD disk (shared: the same image) gets the
    destination's monitors, ceph.conf and secret (everything else, including the uuid, stays)."""
    ET.register_namespace("nodeagent", NODEAGENT_NS)
    ET.register_namespace("qemu", QEMU_NS)
    root = ET.fromstring(xml)
    for disk in root.findall("devices/disk"):
        target = disk.find("target")
        src = disk.find("source")
        if target is None or src is None or target.get("dev") not in o.disk_sources:
            continue
        if src.get("file") is not None:
            src.set("file", o.disk_sources[target.get("dev")])
            backing = disk.find("backingStore")  # the destination's chain is probed there
            if backing is not None:
                disk.remove(backing)
        elif src.get("protocol") == "rbd":
            _rewrite_rbd(disk, src, o.disk_sources[target.get("dev")],
                         o.disk_attach.get(target.get("dev")) or {})
    if o.console_log:
        for log in root.findall("devices/serial/log"):
            log.set("file", o.console_log)
    return ET.tostring(root, encoding="unicode")


def _rewrite_rbd(disk: ET.Element, src: ET.Element, dest: str, attach: dict) -> None:
    """Shared storage: the destination must name the very image the guest uses here."""
    name = dest[len("rbd:"):] if dest.startswith("rbd:") else dest
    if name != src.get("name"):
        raise InvalidInput(f"disk {disk.find('target').get('dev')} is RBD image {src.get('name')} here "
                           f"but the destination prepared {name}: shared storage must be the same image")
    if attach.get("monitors"):
        for host in src.findall("host"):
            src.remove(host)
        for i, mon in enumerate(attach["monitors"]):
            host, _, port = str(mon).rpartition(":") if ":" in str(mon) else (str(mon), "", "")
            src.insert(i, ET.Element("host", {"name": host, "port": port or RBD_DEFAULT_PORT}))
    if attach.get("config"):
        conf = src.find("config")
        if conf is None:
            conf = ET.SubElement(src, "config")
        conf.set("file", attach["config"])
    auth = disk.find("auth")
    if auth is None:
        auth = src.find("auth")  # libvirt keeps <auth> where the defining XML put it
    if auth is not None and auth.find("secret") is not None and attach.get("secret_uuid"):
        auth.find("secret").set("uuid", attach["secret_uuid"])
        if attach.get("user"):
            auth.set("username", attach["user"])


def _sample(stats: dict, t0: float, phase: str) -> MigrationProgress:
    return MigrationProgress(phase=phase, throttle_pct=int(stats.get("auto_converge_throttle", 0)),
        elapsed_ms=int(stats.get("time_elapsed", (time.monotonic() - t0) * 1000)),
        data_total=int(stats.get("data_total", 0)), data_processed=int(stats.get("data_processed", 0)),
        data_remaining=int(stats.get("data_remaining", 0)),
        dirty_rate=int(stats.get("memory_dirty_rate", 0)),
        memory_iteration=int(stats.get("memory_iteration", 0)))


def migrate(driver, name: str, dest_uri: str, o: MigrationOptions, *, progress=None,
            cancelled=None) -> MigrationResult:
    check_options(o)
    dom = driver._dom(name)
    state = driver._state(dom)
    if state not in ("running", "paused"):
        raise InvalidInput(f"VM {name!r} is not running: live migration needs a running VM "
                           "(start it, or migrate it cold)")
    live = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))
    # the writable local disks: a network disk (RBD) is shared storage, the same image there
    writable = [d.find("target").get("dev") for d in live.findall("devices/disk")
                if d.find("readonly") is None and d.get("device", "disk") == "disk"
                and d.find("target") is not None and d.get("type") != "network"]
    params = {
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: rewrite_xml(ET.tostring(live, encoding="unicode"), o),
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: rewrite_xml(
            dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_INACTIVE), o),
    }
    if o.copy_storage != "none":
        params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = writable
    if o.bandwidth_mib_s:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(o.bandwidth_mib_s)
    flags = BASE_FLAGS | COPY_FLAGS[o.copy_storage]
    if o.live:
        flags |= libvirt.VIR_MIGRATE_LIVE
    if o.auto_converge:
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
    if o.tls:  # memory AND the NBD disk copy, with qemu.conf's migrate (default) TLS x509 dir
        flags |= libvirt.VIR_MIGRATE_TLS
    if o.postcopy:  # allowed only: it starts when the watcher calls migrateStartPostCopy
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
    reserves = _reserves(driver)
    reserve = reserves.reserve_ms(dest_uri)
    downtime = (_Downtime(qemu_downtime_limit(int(o.max_downtime_ms), reserve), DOWNTIME_START_MS)
                if o.max_downtime_ms else None)
    if downtime is not None and not _set_downtime(dom, downtime.limit):
        downtime = None  # older QEMU: libvirt's default (300 ms) applies
    tracer = switchover.Tracer(driver.uri, dest_uri, name)
    try:
        tracer.start()
    except Exception:  # noqa: BLE001 - the breakdown is a measurement, never a reason to fail
        pass

    t0 = time.monotonic()
    worker, outcome = _start_migrate(driver, dom, dest_uri, params, flags, f"migrate-{name}")
    watch = _Watch()
    try:
        last, reason, paused = _watch(dom, worker, o, t0, progress, cancelled,
                                      lambda: _destroy_incoming(dest_uri, name), watch, downtime=downtime)
    except BaseException:
        tracer.stop(wait=False)
        # the caller is going away (a progress callback raised, the agent is stopping):
        # the job must not outlive it unwatched (in post-copy libvirt refuses the abort: the
        # copy goes on, which is the only way the guest stays whole)
        _abort(dom)
        worker.join(ABANDON_WAIT_S)
        raise
    total_ms = (time.monotonic() - t0) * 1000
    # a guest paused here (or by the timeout) arrives paused: no RESUME to wait for
    tracer.stop(wait="error" not in outcome and state == "running" and not paused)
    if "error" in outcome and (watch.postcopy or _in_postcopy(dom)):
        raise PostCopyFailed(
            f"migration of VM {name!r} to {dest_uri} failed during post-copy: {outcome['error']}; the "
            "guest's memory is split between this host and the destination, so it is paused here and "
            "stalls there; both halves are kept: resume it once the link is back, or give it up "
            "(delete it on both hosts: its unsaved state is lost)", stderr=outcome["error"])
    if "error" in outcome:
        if paused:
            _resume_quietly(dom)
        if reason == "cancelled":
            raise Cancelled(f"migration of VM {name!r} cancelled; it keeps running here")
        if reason == "timeout":
            raise CommandFailed(f"migration of VM {name!r} did not converge within "
                                f"{o.completion_timeout_s}s and was aborted; it keeps running here "
                                "(raise the timeout, allow more downtime, or use timeout_action=pause)")
        raise CommandFailed(f"migration of VM {name!r} to {dest_uri} failed: {outcome['error']}; "
                            "it keeps running here", stderr=outcome["error"])
    pause, data = _completed_stats(dest_uri, name)
    if data is None:
        data = last.data_processed if last else 0
    parts = tracer.result()
    breakdown = None
    if parts is not None:
        if not paused:  # a pause-to-finish's parts say nothing about the switchover's
            reserves.record(dest_uri, parts.fixed_ms, parts.ram_ms, downtime.limit if downtime else None)
        breakdown = {**parts.as_dict(), "reserve_ms": round(reserve, 1),
                     "downtime_limit_ms": downtime.limit if downtime else None}
    return MigrationResult(total_ms=total_ms, downtime_ms=pause, data_bytes=int(data),
                           paused_by_timeout=bool(paused), postcopy=watch.postcopy, switchover=breakdown)


def _reserves(driver) -> Reserves:
    """The driver's Reserves (made at its first migration)."""
    reserves = getattr(driver, "_switchover_reserves", None)
    if reserves is None:
        reserves = driver._switchover_reserves = Reserves()
    return reserves


def _start_migrate(driver, dom, dest_uri: str, params: dict, flags: int, thread: str):
    """libvirt's migrateToURI3 of ``dom`` on a thread of its own (started): (the thread, a dict
    that holds "error" once it failed). On a connection of its own: a call in flight on a
    remote connection holds the others back (the watcher's jobStats, abortJob,
    migrateStartPostCopy would wait for its end)."""
    outcome: dict = {}

    def job():
        conn = None
        try:
            conn = libvirt.open(driver.uri)
            conn.lookupByUUIDString(dom.UUIDString()).migrateToURI3(dest_uri, params, flags)
        except libvirt.libvirtError as e:
            outcome["error"] = e.get_error_message() or str(e)
        except Exception as e:  # noqa: BLE001 - reported to the caller
            outcome["error"] = str(e)
        finally:
            if conn is not None:
                try:
                    conn.close()
                except libvirt.libvirtError:
                    pass

    worker = threading.Thread(target=job, name=thread, daemon=True)
    worker.start()
    return worker, outcome


def _set_downtime(dom, limit_ms: int) -> bool:
    try:
        dom.migrateSetMaxDowntime(limit_ms, 0)
        return True
    except libvirt.libvirtError:
        return False


class _Watch:
    """What the watcher learnt that the caller needs after the job: whether post-copy started."""

    postcopy = False
    gave_up = False  # stall_limit_s passed with no byte moved


def _in_postcopy(dom) -> bool:
    """Whether the source domain is in post-copy (running there) or failed in it."""
    try:
        state, why = dom.state()
    except libvirt.libvirtError:
        return False
    return state == libvirt.VIR_DOMAIN_PAUSED and why in POSTCOPY_REASONS


class _Convergence:
    """Whether pre-copy gets anywhere. Each memory pass starts with the pages dirtied during
    the one before (QEMU's ``memory_remaining`` right after its bitmap sync; here the largest
    sample of the pass): a pass whose dirty set is not below PROGRESS_RATIO of the smallest one
    before is *stalled*, one that is resets the count. The first pass (all of memory) is not
    compared. Auto-converge's throttle shrinks the sets of a guest it can slow down, so the
    count rises only once neither the link nor the throttle keeps up."""

    def __init__(self):
        self.iteration = 0  # the pass being sampled
        self.peak = 0  # its largest remaining so far
        self.best: int | None = None  # the smallest dirty set of a finished pass (from the second)
        self.stalled = 0  # finished passes in a row that did not beat ``best``

    def sample(self, iteration: int, remaining: int) -> int:
        """One jobStats sample: returns the stalled passes in a row so far."""
        if iteration == self.iteration:
            self.peak = max(self.peak, remaining)
            return self.stalled
        if self.iteration >= 2:  # the pass just finished
            if self.best is not None and self.peak >= self.best * PROGRESS_RATIO:
                self.stalled += 1
            else:
                self.stalled = 0
            self.best = self.peak if self.best is None else min(self.best, self.peak)
        self.iteration, self.peak = iteration, remaining
        return self.stalled


def _postcopy_due(o: MigrationOptions, elapsed: float, last: MigrationProgress | None,
                  timed_out: bool, stalled: int = 0) -> bool:
    """Whether the policy (or the completion timeout's action) says: switch to post-copy now:
    pre-copy stopped converging (``stalled`` passes in a row, see _Convergence; with
    auto-converge, once its throttle is at THROTTLE_BEFORE_POSTCOPY_PCT or more), or a
    backstop bound passed."""
    if not o.postcopy:
        return False
    if timed_out and o.timeout_action == "postcopy":
        return True
    if o.postcopy_after_stalled and stalled >= o.postcopy_after_stalled and (
            not o.auto_converge or (last is not None and last.throttle_pct >= THROTTLE_BEFORE_POSTCOPY_PCT)):
        return True
    if o.postcopy_after_s is not None and elapsed >= o.postcopy_after_s:
        return True
    return bool(o.postcopy_after_iterations and last is not None
                and last.memory_iteration >= o.postcopy_after_iterations)


def _start_postcopy(dom, started: threading.Event) -> None:
    """Ask QEMU to switch to post-copy (from its own thread: libvirtd may hold the call while
    the job sits in a monitor call); ``started`` is set when it did. A refusal (the job is
    just ending) leaves it unset: the watcher asks again at a later poll."""
    try:
        dom.migrateStartPostCopy(0)
        started.set()
    except libvirt.libvirtError:
        if _in_postcopy(dom):
            started.set()


def _watch(dom, worker, o: MigrationOptions, t0: float, progress, cancelled, hard_stop,
           watch: _Watch | None = None, stall_limit_s: float | None = None, downtime: _Downtime | None = None):
    """Sample progress until the job thread ends; abort on cancel or on the completion
    timeout (or suspend the guest, timeout_action="pause"; or switch to post-copy,
    "postcopy", as the policy's bound does). Returns (last sample, reason for an abort or
    None, whether the guest was paused); ``watch.postcopy`` says whether post-copy began.
    ``downtime``: QEMU's downtime-limit, raised as its passes go (_Downtime; from a thread of
    its own: libvirtd may hold the call while the job sits in a monitor call).

    An abort is sent from its own thread: libvirtd holds ``abortJob`` while the migration
    job is inside a monitor call (30 s at a time), and a watcher blocked there would let the
    copy run to its end. An abort still not honoured after ABORT_GRACE_S ends the job from
    the other side: ``hard_stop`` destroys the destination's incoming domain, which fails
    the job here while the guest keeps running (libvirt's guarantee) -- but never once
    post-copy has begun: the destination then holds the running guest, and destroying it
    would lose it. Post-copy is never started after an abort was sent, and once it runs,
    cancel and timeout are ignored (the copy must finish for the guest to be whole).
    ``stall_limit_s`` (a resume): in post-copy, stop watching once no byte moved for that
    long (``watch.gave_up``; the job thread is left to libvirt)."""
    watch = watch or _Watch()
    last: MigrationProgress | None = None
    reason = paused = None
    aborter: threading.Thread | None = None
    switcher: threading.Thread | None = None
    switched = threading.Event()
    abort_since = None
    stall: dict = {}  # post-copy: the bytes last sent and since when
    moved: dict = {}  # the same for stall_limit_s (not reset by a pause)
    pauser: threading.Thread | None = None
    converging = _Convergence()
    stalled = 0
    while worker.is_alive():
        worker.join(POLL_S)
        if not worker.is_alive():
            break
        try:
            stats = dom.jobStats()
        except libvirt.libvirtError:
            stats = {}
        if o.postcopy and not watch.postcopy and (switched.is_set() or _in_postcopy(dom)):
            watch.postcopy = True  # the caller hears it with this very sample: it commits first
        phase = "postcopy" if watch.postcopy else "precopy"
        if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE:
            last = _sample(stats, t0, phase)
            if not watch.postcopy:
                stalled = converging.sample(last.memory_iteration,
                                            int(stats.get("memory_remaining", last.data_remaining)))
                raised = downtime.step(last.memory_iteration) if downtime is not None else None
                if raised is not None:
                    threading.Thread(target=_set_downtime, args=(dom, raised), name="migrate-downtime",
                                     daemon=True).start()
            if progress:
                progress(last)
        if watch.postcopy:  # nothing may stop it now; a dead link pauses it (resumable)
            pauser = _pause_stalled_postcopy(dom, stats, stall, pauser)
            if stall_limit_s is not None:
                now = time.monotonic()
                if stats.get("data_processed") not in (None, moved.get("bytes")):
                    moved.update(bytes=stats["data_processed"], at=now)
                if now - moved.setdefault("at", now) > stall_limit_s:
                    watch.gave_up = True
                    break
            continue
        elapsed = time.monotonic() - t0
        timed_out = o.completion_timeout_s is not None and elapsed > o.completion_timeout_s
        if reason is None and cancelled is not None and cancelled():
            reason = "cancelled"
        elif reason is None and switcher is None and last is not None and last.memory_iteration >= 1 \
                and _postcopy_due(o, elapsed, last, timed_out, stalled):
            # only once memory is being copied (QEMU refuses it during the disk copy before)
            switcher = threading.Thread(target=_start_postcopy, args=(dom, switched),
                                        name="migrate-postcopy", daemon=True)
            switcher.start()
            continue
        elif switcher is not None and not switched.is_set():
            if not switcher.is_alive():
                switcher = None  # refused: asked again at the next poll
            continue
        elif reason is None and not paused and timed_out:
            if o.timeout_action == "pause":
                paused = True
                try:
                    dom.suspend()
                except libvirt.libvirtError:
                    pass
            elif o.timeout_action == "abort":
                reason = "timeout"
        if reason is not None:
            # every poll until the job ends: an abort that lands before libvirt has begun
            # the job (or between its phases) is refused or lost, and the copy would go on
            if abort_since is None:
                abort_since = time.monotonic()
            if aborter is None or not aborter.is_alive():
                aborter = threading.Thread(target=_abort, args=(dom,), name="migrate-abort",
                                           daemon=True)
                aborter.start()
            if hard_stop is not None and time.monotonic() - abort_since > ABORT_GRACE_S \
                    and not _in_postcopy(dom):
                hard_stop()
                hard_stop = None
    return last, reason, paused


def postcopy_split(driver, name: str) -> bool:
    """Whether ``name`` here is the paused source half of a broken post-copy (resumable)."""
    dom = driver._dom(name)
    try:
        state, why = dom.state()
    except libvirt.libvirtError as e:
        raise driver._error(e, name) from None
    return state == libvirt.VIR_DOMAIN_PAUSED and why == libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED


def resume_postcopy(driver, name: str, dest_uri: str, o: MigrationOptions, *, progress=None) -> MigrationResult:
    """Restart the broken post-copy of ``name`` to ``dest_uri`` (hypervisor.driver.
    SupportsPostcopyResume): the destination's end paused first if it has not seen the break,
    then the peer-to-peer resume, watched as a post-copy (a link that dies again is paused
    again after POSTCOPY_STALL_S). On success the guest runs there, undefined here."""
    if not postcopy_split(driver, name):
        raise Conflict(f"VM {name!r} is not the paused half of a broken post-copy here: nothing to resume")
    dom = driver._dom(name)
    _pause_incoming_postcopy(dest_uri, name)
    flags = (BASE_FLAGS | libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_POSTCOPY
             | libvirt.VIR_MIGRATE_POSTCOPY_RESUME)
    if o.tls:
        flags |= libvirt.VIR_MIGRATE_TLS
    t0 = time.monotonic()
    worker, outcome = _start_migrate(driver, dom, dest_uri, {}, flags, f"migrate-resume-{name}")
    watch = _Watch()
    watch.postcopy = True  # from the first sample: nothing may stop it, a dead link pauses it
    try:
        last, _, _ = _watch(dom, worker, o, t0, progress, None, None, watch, stall_limit_s=RESUME_STALL_S)
    except BaseException:
        worker.join(ABANDON_WAIT_S)  # never aborted: in post-copy only the copy's end makes it whole
        raise
    total_ms = (time.monotonic() - t0) * 1000
    if watch.gave_up:
        raise PostCopyFailed(
            f"resuming the post-copy migration of VM {name!r} to {dest_uri} moved no byte in {RESUME_STALL_S}s; "
            "the guest is still split between this host and the destination (paused here, stalled there); "
            "libvirt may still hold the resume's job on both hosts: give the guest up (delete it on both "
            "hosts) or restart libvirtd on both and resume it again")
    if "error" in outcome:
        raise PostCopyFailed(
            f"resuming the post-copy migration of VM {name!r} to {dest_uri} failed: {outcome['error']}; "
            "the guest is still split between this host and the destination (paused here, stalled there); "
            "both halves are kept: resume it again once the link works", stderr=outcome["error"])
    downtime, data = _completed_stats(dest_uri, name)
    if data is None:
        data = last.data_processed if last else 0
    return MigrationResult(total_ms=total_ms, downtime_ms=downtime, data_bytes=int(data), postcopy=True)


def _pause_incoming_postcopy(dest_uri: str, name: str) -> None:
    """Make the destination's end of a broken post-copy resumable, or say why it cannot be.
    Its QEMU must answer its monitor: libvirt's resume runs ``migrate-recover`` there, and a
    QEMU whose main loop is blocked would hang the resume on both hosts (libvirt holds both
    domains' jobs, with no timeout), so it is asked first (``query-migrate``, bounded by
    libvirt's own 30 s job wait). A QEMU still in ``postcopy-active`` (its TCP connection has
    not failed yet) is paused (``abortJobFlags(ABORT_JOB_POSTCOPY)``, QEMU's migrate-pause);
    then it must say ``postcopy-paused``. CommandFailed otherwise (the guest stays split)."""
    import json

    import libvirt_qemu
    try:
        conn = libvirt.open(dest_uri)
    except libvirt.libvirtError as e:
        raise CommandFailed(f"cannot reach the destination's hypervisor at {dest_uri} to resume the post-copy "
                            f"of VM {name!r}: {e.get_error_message()}; the guest stays split: retry when the "
                            "link is back") from None
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            raise CommandFailed(f"the destination at {dest_uri} has no domain {name!r}: its half of the guest "
                                "is gone, so the post-copy cannot be resumed (the guest is lost: delete it "
                                "here)") from None
        deadline = time.monotonic() + INCOMING_PAUSE_WAIT_S
        asked = False
        while True:
            try:
                answer = _bounded(lambda: libvirt_qemu.qemuMonitorCommand(
                    dom, json.dumps({"execute": "query-migrate"}), 0), MONITOR_PROBE_S)
                status = json.loads(answer).get("return", {}).get("status")
            except (libvirt.libvirtError, ValueError, TimeoutError) as e:
                why = e.get_error_message() if isinstance(e, libvirt.libvirtError) else str(e)
                raise CommandFailed(
                    f"the destination's QEMU of VM {name!r} does not answer its monitor ({why}): its main loop "
                    "is blocked, most likely by a vCPU waiting for a page that is still on this host while it "
                    "holds QEMU's global lock (TCG does that; libvirt sends the resume's migrate-recover through "
                    "that loop, not out of band), so the post-copy cannot be resumed: the guest stays split; "
                    "give it up (delete it on both hosts) or retry (README \"Post-copy failures\")",
                    stderr=why) from None
            if status == "postcopy-paused":
                return
            if status == "postcopy-active" and not asked:
                try:
                    dom.abortJobFlags(libvirt.VIR_DOMAIN_ABORT_JOB_POSTCOPY)
                except libvirt.libvirtError:
                    pass  # it saw the break meanwhile: the next query says so
                asked = True
            if time.monotonic() > deadline:
                raise CommandFailed(f"the destination's end of VM {name!r} did not reach the failed post-copy "
                                    f"state within {INCOMING_PAUSE_WAIT_S}s (QEMU says {status!r}): the guest "
                                    "stays split; retry the resume")
            time.sleep(POLL_S)
    finally:
        conn.close()


def _bounded(call, timeout: float):
    """``call()`` on a thread of its own; TimeoutError if it has not returned within ``timeout``
    (a libvirt call into a QEMU whose monitor hangs never returns: the thread is left to it)."""
    out: dict = {}

    def run():
        try:
            out["value"] = call()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            out["error"] = e

    t = threading.Thread(target=run, name="libvirt-bounded", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no answer within {timeout:g}s")
    if "error" in out:
        raise out["error"]
    return out["value"]


def _pause_stalled_postcopy(dom, stats: dict, stall: dict, pauser: threading.Thread | None):
    """Post-copy with a cut link sends nothing and never fails by itself: once no byte went
    out for POSTCOPY_STALL_S, pause it (from its own thread, again after as long if the job
    still runs). The job then fails, the guest paused here (``postcopy-failed``), resumable
    with ``--postcopy-resume`` once the link is back. Returns the pausing thread."""
    now = time.monotonic()
    if "data_processed" in stats and stats["data_processed"] != stall.get("bytes"):
        stall.update(bytes=stats["data_processed"], since=now)
    stall.setdefault("since", now)
    if now - stall["since"] < POSTCOPY_STALL_S or (pauser is not None and pauser.is_alive()):
        return pauser
    stall["since"] = now
    pauser = threading.Thread(target=_pause_postcopy, args=(dom,), name="migrate-pause", daemon=True)
    pauser.start()
    return pauser


def _pause_postcopy(dom) -> None:
    try:
        dom.abortJobFlags(libvirt.VIR_DOMAIN_ABORT_JOB_POSTCOPY)
    except libvirt.libvirtError:
        pass  # finished or failed meanwhile


def _abort(dom) -> None:
    try:
        dom.abortJob()
    except libvirt.libvirtError:
        pass  # finished or failed meanwhile


def _destroy_incoming(dest_uri: str, name: str) -> None:
    """End a migration from the destination: its incoming (paused, never run) domain goes."""
    try:
        conn = libvirt.open(dest_uri)
    except libvirt.libvirtError:
        return
    try:
        dom = conn.lookupByName(name)
        if dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
            dom.destroy()
    except libvirt.libvirtError:
        pass  # not there (yet, or any more)
    finally:
        conn.close()


def _resume_quietly(dom) -> None:
    try:
        if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
            dom.resume()
    except libvirt.libvirtError:
        pass


def _completed_stats(dest_uri: str, name: str) -> tuple[float | None, int | None]:
    """Downtime and bytes of the finished job, as the destination recorded them."""
    try:
        conn = libvirt.open(dest_uri)
    except libvirt.libvirtError:
        return None, None
    try:
        st = conn.lookupByName(name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        dt = st.get("downtime")  # total, network included (what the guest saw)
        return (float(dt) if dt is not None else None), st.get("data_processed")
    except libvirt.libvirtError:
        return None, None
    finally:
        conn.close()


def abort(driver, name: str) -> bool:
    try:
        dom = driver._dom(name)
    except NotFound:
        return False
    try:
        if dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE or _in_postcopy(dom):
            return False  # no job, or one in post-copy: it must finish for the guest to be whole
        dom.abortJob()
        return True
    except libvirt.libvirtError:
        return False
