"""Asynchronous operations: long work runs in a bounded worker pool and is persisted.

An operation moves pending -> running -> succeeded | failed | cancelled. Its work is a
callable ``fn(op: OperationContext) -> dict`` that reports progress with
``op.phase(...)``/``op.bytes(...)``; ``op.phase()`` is also the cancel point: a cancelled
operation raises ``Cancelled`` there and the work cleans up its partial artefacts.
On agent start, ``recover()`` marks operations left pending/running by a crash as failed.
Finished operations stay readable for ``retention`` seconds, and at most the ``max_finished``
newest of them are kept: ``prune()`` removes the rest at start and every ``prune_interval``
seconds (a pruned id is 404 like one never made). An operation that has not finished is never
pruned, nor one that finished less than PRUNE_GRACE seconds ago (its waiter reads it).
An operation keeps the request id of the request that made it (``request_id``), and every
line its work logs carries that id and the operation's; a failed operation is logged (a
WARNING with its id, kind, target and error; an ERROR with the trace for an agent bug).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from agent import log as agent_log
from agent import schema
from agent.errors import AgentError, Cancelled, Conflict, NotFound, Unavailable, public_error
from agent.events import EventBus
from agent.state import Database

log = logging.getLogger(__name__)

FINAL = ("succeeded", "failed", "cancelled")
PROGRESS_WRITE_INTERVAL = 0.5  # seconds between progress writes to SQLite per operation
MAX_WAIT = 3600  # seconds a client may block in /wait
DEFAULT_RETENTION = 7 * 86400  # seconds a finished operation stays readable ([operations] retention)
DEFAULT_MAX_FINISHED = 10_000  # finished operations kept at most ([operations] max_finished)
DEFAULT_PRUNE_INTERVAL = 600  # seconds between two prunes ([operations] prune_interval)
PRUNE_GRACE = 60  # seconds: an operation finished since then is kept whatever the row cap says
# Test hook to inject a slow phase: NODEAGENT_SLOW_PHASE="instance.create:clone=5,image.import:bytes=5"
# (phase "bytes": sleep once at the first byte progress report, i.e. mid-copy)
SLOW_PHASE_ENV = "NODEAGENT_SLOW_PHASE"


def _slow_phases() -> dict[tuple[str, str], float]:
    out = {}
    for item in filter(None, os.environ.get(SLOW_PHASE_ENV, "").split(",")):
        key, _, secs = item.partition("=")
        kind, _, phase = key.partition(":")
        out[(kind, phase)] = float(secs or 0)
    return out


class OperationContext:
    """What the work sees: progress reporting and the cancel flag."""

    def __init__(self, manager: "Operations", op_id: str, kind: str, target: str | None = None,
                 request_id: str | None = None):
        self._m, self.id, self.kind = manager, op_id, kind
        self.target, self.request_id = target, request_id
        self.cancelled = threading.Event()
        self.committed = False  # past its point of no return: not cancellable
        self.progress = {"phase": None, "bytes_done": None, "bytes_total": None}
        self.status = "pending"  # live status; SQLite gets it at the end (a crash fails it anyway)
        self.started_at: float | None = None
        self._last_write = time.monotonic()
        self.submitted = time.perf_counter()
        self.phases_ms: dict[str, float] = {}  # wall time per phase, logged when it ends
        self._phase_t = self.submitted

    def _close_phase(self) -> None:
        now = time.perf_counter()
        key = self.progress.get("phase") or "-"
        self.phases_ms[key] = round(self.phases_ms.get(key, 0.0) + (now - self._phase_t) * 1000, 1)
        self._phase_t = now

    def check_cancel(self) -> None:
        if self.cancelled.is_set() and not self.committed:
            raise Cancelled("operation cancelled by request")

    def point_of_no_return(self) -> None:
        """From here the work can no longer be undone (a migrated guest runs elsewhere): it is
        no longer cancelled, and a cancel request gets a Conflict."""
        self.committed = True

    def phase(self, name: str, *, bytes_total: int | None = None) -> None:
        """Enter phase ``name``: a cancel point; progress is written through at once."""
        self.check_cancel()
        self._close_phase()
        self.progress.update(phase=name, bytes_done=0 if bytes_total else None, bytes_total=bytes_total)
        self._m._write_progress(self)
        delay = self._m._slow.get((self.kind, name))
        if delay:
            if self.committed:
                time.sleep(delay)
            else:
                self.cancelled.wait(delay)  # a cancel ends the injected pause at once
                self.check_cancel()

    def report(self, **figures) -> None:
        """Set progress figures (a live migration's phase, remaining bytes, dirty rate...)
        without a cancel point: for work that reports from where it cannot stop."""
        self.progress.update(figures)
        self._m._write_progress(self)

    def bytes(self, done: int, total: int | None = None) -> None:
        """Byte progress inside a phase; also a cancel point (storage cleans up on the raise)."""
        self.check_cancel()
        delay = self._m._slow.get((self.kind, "bytes"))
        if delay and not self.progress.get("bytes_done"):
            self.progress["bytes_done"] = done
            self._m._write_progress(self, force=True)
            self.cancelled.wait(delay)
            self.check_cancel()
        self.progress["bytes_done"] = done
        if total is not None:
            self.progress["bytes_total"] = total
        self._m._write_progress(self)


def _row(r) -> dict:
    return {
        "id": r["id"], "kind": r["kind"], "target": r["target"], "status": r["status"],
        "progress": json.loads(r["progress"] or "{}"),
        "result": json.loads(r["result"]) if r["result"] else None,
        "error": json.loads(r["error"]) if r["error"] else None,
        "created_at": r["created_at"], "started_at": r["started_at"], "finished_at": r["finished_at"],
        "request_id": r["request_id"],
    }


class Operations:
    """The one writer of the ``operations`` table."""

    def __init__(self, db: Database, events: EventBus, workers: int = 8, *,
                 retention: float = DEFAULT_RETENTION, max_finished: int = DEFAULT_MAX_FINISHED,
                 prune_interval: float = DEFAULT_PRUNE_INTERVAL):
        self.db, self.events, self.workers = db, events, workers
        self.retention, self.max_finished, self.prune_interval = retention, max_finished, prune_interval
        schema.apply(db)
        self._prune_stop = threading.Event()
        self._prune_thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.on_idle: Callable[[], None] | None = None  # called when the last operation in flight ends
        self._active: dict[str, OperationContext] = {}
        self._cond = threading.Condition()
        self._slow = _slow_phases()

    # -- lifecycle --
    def start(self) -> None:
        """Start the worker pool, prune what is past retention now and every prune_interval."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="op")
        if self._prune_thread is None:
            self._safe_prune()
            self._prune_stop = threading.Event()  # a fresh one: a stopped loop never resumes
            self._prune_thread = threading.Thread(target=self._prune_loop, args=(self._prune_stop,),
                                                  name="op-prune", daemon=True)
            self._prune_thread.start()

    def shutdown(self, wait: bool = False) -> None:
        self._prune_stop.set()
        self._prune_thread = None
        if self._pool is not None:
            for ctx in list(self._active.values()):
                ctx.cancelled.set()
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None

    def recover(self) -> list[dict]:
        """Mark operations a crash left pending/running as failed; return them for cleanup."""
        rows = [_row(r) for r in self.db.query(
            "SELECT * FROM operations WHERE status IN ('pending', 'running')")]
        err = json.dumps({"code": "agent_restarted",
                          "message": "the agent restarted while this operation ran; its partial work was cleaned up"})
        for op in rows:
            self.db.execute("UPDATE operations SET status='failed', error=?, finished_at=? WHERE id=?",
                            (err, time.time(), op["id"]))
            log.warning("operation failed", extra={"operation": op["id"], "kind": op["kind"],
                                                   "target": op["target"], "code": "agent_restarted",
                                                   "error": "the agent restarted while it ran",
                                                   "request_id": op["request_id"]})
        return rows

    # -- retention --
    def prune(self, now: float | None = None) -> int:
        """Remove the finished operations past ``retention`` or beyond the ``max_finished``
        newest, except those finished in the last PRUNE_GRACE seconds; return how many went.
        Pending and running operations are never removed."""
        now = time.time() if now is None else now
        final = ",".join("?" * len(FINAL))
        grace = now - PRUNE_GRACE
        with self.db.tx() as c:
            old = c.execute(f"DELETE FROM operations WHERE status IN ({final}) AND finished_at < ?",
                            (*FINAL, min(now - self.retention, grace))).rowcount
            over = c.execute(
                f"DELETE FROM operations WHERE finished_at < ? AND id IN (SELECT id FROM operations "
                f"WHERE status IN ({final}) ORDER BY finished_at DESC LIMIT -1 OFFSET ?)",
                (grace, *FINAL, self.max_finished)).rowcount
        if old or over:
            log.info("finished operations pruned", extra={"expired": old, "over_cap": over,
                                                          "retention": self.retention,
                                                          "max_finished": self.max_finished})
        return old + over

    def _safe_prune(self) -> None:
        try:
            self.prune()
        except Exception as e:  # a busy or broken state DB must not stop the agent: next round
            log.warning("operations not pruned", extra={"error": str(e)})

    def _prune_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.prune_interval):
            self._safe_prune()

    # -- submit and run --
    def submit(self, kind: str, target: str | None, fn: Callable[[OperationContext], dict | None],
               *, on_final: Callable[[dict], None] | None = None) -> dict:
        if self._pool is None:
            raise Unavailable("the agent is shutting down (or not started): retry against the restarted agent")
        op_id = uuid.uuid4().hex
        now = time.time()
        request_id = agent_log.current("request_id")  # of the request that asks for it, if any
        self.db.execute("INSERT INTO operations(id, kind, target, status, progress, created_at, request_id) "
                        "VALUES(?,?,?,?,?,?,?)", (op_id, kind, target, "pending", "{}", now, request_id))
        ctx = OperationContext(self, op_id, kind, target, request_id)
        with self._cond:
            self._active[op_id] = ctx
        self._publish(op_id)
        self._pool.submit(self._run, ctx, fn, on_final)
        return self.get(op_id)

    def _run(self, ctx: OperationContext, fn, on_final) -> None:
        with agent_log.bind(request_id=ctx.request_id, operation=ctx.id):
            self._run_bound(ctx, fn, on_final)

    def _run_bound(self, ctx: OperationContext, fn, on_final) -> None:
        status, result, error = "failed", None, None
        try:
            if ctx.cancelled.is_set():
                raise Cancelled("operation cancelled before it started")
            ctx.started_at, ctx.status = time.time(), "running"
            ctx.phases_ms["queued"] = round((time.perf_counter() - ctx.submitted) * 1000, 1)
            ctx._phase_t = time.perf_counter()
            self._publish(ctx.id)
            result = fn(ctx) or {}
            status = "succeeded"
        except Cancelled as e:
            status, error = "cancelled", e.to_dict()
            log.info("operation cancelled", extra={"operation": ctx.id, "kind": ctx.kind, "target": ctx.target})
        except AgentError as e:
            error = e.to_dict()
            # the full error (host paths, argv, stderr) for admins and this log; readers get it redacted
            log.warning("operation failed", extra={"operation": ctx.id, "kind": ctx.kind, "target": ctx.target,
                                                   "code": e.code, "error": e.message,
                                                   "details": e.details or None})
        except Exception as e:  # an agent bug: log it, do not leak the trace
            log.exception("operation failed", extra={"operation": ctx.id, "kind": ctx.kind, "target": ctx.target,
                                                     "code": "internal", "error": f"{type(e).__name__}: {e}"})
            error = {"code": "internal", "message": f"internal error in {ctx.kind}; see the agent log"}
        ctx._close_phase()
        self._set(ctx.id, status=status, result=json.dumps(result) if result is not None else None,
                  error=json.dumps(error) if error else None, progress=json.dumps(ctx.progress),
                  started_at=ctx.started_at, finished_at=time.time())
        # where its time went ("queued": waiting for a worker; "-": before its first phase)
        log.info("operation finished", extra={"operation": ctx.id, "kind": ctx.kind, "target": ctx.target,
                                              "status": status, "phases_ms": ctx.phases_ms})
        with self._cond:
            self._active.pop(ctx.id, None)
            idle = not self._active
            self._cond.notify_all()
        op = self._publish(ctx.id)
        if on_final:
            try:
                on_final(op)
            except Exception:
                log.exception("operation final hook failed", extra={"operation": ctx.id})
        if idle and self.on_idle is not None:
            try:
                self.on_idle()
            except Exception:
                log.exception("operation idle hook failed")

    def _set(self, op_id: str, **cols) -> None:
        sets = ", ".join(f"{k}=?" for k in cols)
        self.db.execute(f"UPDATE operations SET {sets} WHERE id=?", (*cols.values(), op_id))

    def _write_progress(self, ctx: OperationContext, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - ctx._last_write >= PROGRESS_WRITE_INTERVAL:
            ctx._last_write = now
            self._set(ctx.id, progress=json.dumps(ctx.progress))

    def _publish(self, op_id: str) -> dict:
        """Publish the operation to /v1/events (readers subscribe too: its error is redacted)."""
        op = self.get(op_id)
        self.events.publish("operation", {**op, "error": public_error(op["error"], op["id"])}
                            if op.get("error") else op)
        return op

    # -- queries --
    def get(self, op_id: str) -> dict:
        r = self.db.one("SELECT * FROM operations WHERE id=?", (op_id,))
        if r is None:
            raise NotFound(f"operation {op_id} not found")
        return self._live(_row(r))

    def _live(self, op: dict) -> dict:
        """Overlay what only memory knows about a running operation (status, progress)."""
        ctx = self._active.get(op["id"])
        if ctx is not None and op["status"] not in FINAL:
            op["progress"] = dict(ctx.progress)  # fresher than the throttled DB copy
            op["status"], op["started_at"] = ctx.status, ctx.started_at
        return op

    def list(self, status: str | None = None, limit: int = 100) -> list[dict]:
        if status in ("pending", "running"):  # running ones are 'pending' in SQLite until they end
            rows = self.db.query("SELECT * FROM operations WHERE status IN ('pending', 'running') "
                                 "ORDER BY created_at DESC LIMIT ?", (limit,))
        elif status:
            rows = self.db.query("SELECT * FROM operations WHERE status=? ORDER BY created_at DESC LIMIT ?",
                                 (status, limit))
        else:
            rows = self.db.query("SELECT * FROM operations ORDER BY created_at DESC LIMIT ?", (limit,))
        ops = [self._live(_row(r)) for r in rows]
        return [o for o in ops if status is None or o["status"] == status]

    def counts(self) -> list[tuple[str, str, int]]:
        n = {(r["kind"], r["status"]): r["n"] for r in self.db.query(
            "SELECT kind, status, count(*) AS n FROM operations GROUP BY kind, status")}
        for ctx in list(self._active.values()):
            if ctx.status == "running" and n.get((ctx.kind, "pending")):
                n[(ctx.kind, "pending")] -= 1
                n[(ctx.kind, "running")] = n.get((ctx.kind, "running"), 0) + 1
        return [(k, s, c) for (k, s), c in n.items()]

    def wait(self, op_id: str, timeout: float, gone: threading.Event | None = None) -> dict:
        """Block until the operation is final, ``timeout`` seconds passed or ``gone`` is set
        (the waiting client left); return it."""
        deadline = time.monotonic() + min(max(timeout, 0), MAX_WAIT)
        self.get(op_id)  # NotFound for an unknown id, before waiting
        with self._cond:
            while op_id in self._active:
                left = deadline - time.monotonic()
                if left <= 0 or (gone is not None and gone.is_set()):
                    break
                self._cond.wait(min(left, 1.0))
        return self.get(op_id)

    def cancel(self, op_id: str) -> dict:
        """Ask a pending or running operation to stop; Conflict once it is final."""
        op = self.get(op_id)
        ctx = self._active.get(op_id)
        if op["status"] in FINAL or ctx is None:
            raise Conflict(f"operation {op_id} is already {op['status']}: nothing to cancel")
        if ctx.committed:
            raise Conflict(f"operation {op_id} is past its point of no return (phase "
                           f"{ctx.progress.get('phase')}): it can no longer be cancelled; wait for it")
        ctx.cancelled.set()
        return self.get(op_id)
