"""Host maintenance: drain this host (POST /v1/host/evacuate) and accept work again (restore).

Evacuating marks the host draining first (agent.services.host: in the state DB, so a restart
keeps it; creates and incoming migrations are refused with 409 until restore), then moves every
instance (or those named) to peers through the ordinary migrations of MigrationSource, ``parallel``
at a time: running or paused VMs live, stopped VMs offline, running containers by refresh,
stopped ones cold. Each instance's destination is the peer (of those the caller names, else all
configured) with the most free memory left after what this evacuation already sent it, as its
GET /v1/peer/host reports; a peer that is draining, unreachable or without room for it is passed
over. Nothing stops the evacuation but a cancel: an instance that cannot move stays, and the
operation's progress (and result) lists each instance's status: pending, migrating, done, or
failed with the reason it stayed (without host paths: readers see operations too; the
migration's own operation has the full error for admins). A cancel cancels the migrations still cancellable and leaves
the rest pending; the host stays draining either way."""
from __future__ import annotations

import logging
import threading
from collections import deque

from agent import models
from agent.errors import AgentError, Conflict, NotFound, Unprocessable, redact
from agent.migration.common import INCOMING
from agent.operations import FINAL
from storage.units import MiB

log = logging.getLogger(__name__)

POLL_S = 0.5  # how long the evacuation waits on one migration before looking at the others


class Evacuation:
    """The one evacuation this host may run at a time."""

    def __init__(self, root, peers, source):
        self.root, self.peers, self.source = root, peers, source
        self._lock = threading.Lock()
        self._running: str | None = None  # the evacuation's operation id

    def running(self) -> str | None:
        """The running evacuation's operation id (or "starting"), None if none runs. An operation
        that ended counts as ended even before its on_final hook ran (a waiter may see it first)."""
        with self._lock:
            op_id = self._running
        if op_id in (None, "starting"):
            return op_id
        try:
            ended = self.root.operations.get(op_id)["status"] in FINAL
        except NotFound:
            ended = True
        if not ended:
            return op_id
        with self._lock:
            if self._running == op_id:
                self._running = None
        return None

    def start(self, req: models.EvacuateRequest) -> dict:
        """Mark the host draining and start moving its instances (202 + operation). 422 before
        anything changes for an unknown peer, 404 for an unknown instance, 409 while another
        evacuation runs."""
        cfg = self.root.config
        names = list(dict.fromkeys(req.peers or sorted(cfg.peers)))
        if not names:
            raise Unprocessable("no peers are configured: evacuation moves instances to peers; add [peers.NAME] "
                                "with its url and token to this agent's config")
        for name in names:
            self.peers.get(name)  # 422 for one that is not configured
        if cfg.workers < 2:
            raise Unprocessable(f"workers = {cfg.workers}: an evacuation runs alongside its migrations and needs "
                                "at least 2 operation workers")
        if req.instances:
            insts = [self.root.instances.get(ref) for ref in dict.fromkeys(req.instances)]  # 404 first
        else:
            insts = [i for i in self.root.records.list() if i.state != INCOMING]
        insts = list({i.id: i for i in insts}.values())
        items = [{"instance": i.id, "name": i.name, "kind": i.kind, "status": "pending", "destination": None,
                  "mode": None, "migration": None, "error": None} for i in insts]
        parallel = min(req.parallel, cfg.workers - 1)
        running = self.running()
        with self._lock:
            if running or self._running:
                raise Conflict(f"an evacuation is running (operation {running or self._running}): wait for it or "
                               "cancel it")
            self._running = "starting"
        try:
            self.root.host.set_draining(True)
            op = self.root.operations.submit("evacuation", self.root.host.hostname(),
                                             lambda ctx: self._run(ctx, items, names, parallel),
                                             on_final=lambda final: self._ended(final["id"]))
        except BaseException:
            with self._lock:
                self._running = None
            raise
        with self._lock:
            if self._running == "starting":
                self._running = op["id"]
        log.info("host evacuation started", extra={"operation": op["id"], "instances": len(items),
                                                    "peers": names, "parallel": parallel})
        return op

    def restore(self) -> dict:
        """Accept creates and incoming migrations again; 409 while an evacuation runs."""
        running = self.running()
        if running:
            raise Conflict(f"an evacuation is running (operation {running}): cancel it "
                           f"(DELETE /v1/operations/{running}) or wait for it, then restore")
        self.root.host.set_draining(False)
        log.info("host restored: it accepts work again")
        return {"draining": False}

    def _ended(self, op_id: str) -> None:
        with self._lock:
            if self._running in (op_id, "starting"):
                self._running = None

    # -- the work --
    def _run(self, op, items: list[dict], names: list[str], parallel: int) -> dict:
        op.phase("capacity")
        room, why_not = self._capacity(names)
        op.report(instances=items)
        op.phase("migrate")
        queue, inflight = deque(items), {}
        while queue or inflight:
            while queue and len(inflight) < parallel and not op.cancelled.is_set():
                it = queue.popleft()
                self._launch(it, room, why_not)
                if it["status"] == "migrating":
                    inflight[it["migration"]] = it
                op.report(instances=items)
            if op.cancelled.is_set():
                self._cancel(inflight)
                queue.clear()
            if not inflight:
                continue
            self.root.operations.wait(next(iter(inflight)), POLL_S)
            for mig_id, it in list(inflight.items()):
                mig = self.root.operations.get(mig_id)
                if mig["status"] in FINAL:
                    del inflight[mig_id]
                    if mig["status"] == "succeeded":
                        it["status"] = "done"
                    else:
                        it["status"] = "failed"
                        it["error"] = redact((mig["error"] or {}).get("message") or f"migration {mig['status']}")
            op.report(instances=items)
        moved = [i for i in items if i["status"] == "done"]
        stayed = [i for i in items if i["status"] != "done"]
        log.info("host evacuation ended", extra={"moved": len(moved), "stayed": len(stayed)})
        op.check_cancel()  # cancelled: the progress above lists where each instance is
        return {"draining": True, "moved": len(moved), "stayed": len(stayed), "instances": items}

    def _capacity(self, names: list[str]) -> tuple[dict[str, dict], dict[str, str]]:
        """The peers that take instances ({name: their capacity figures}) and why the others do not."""
        room, why_not = {}, {}
        for name in names:
            try:
                facts = self.peers.get(name).host()
            except AgentError as e:
                why_not[name] = e.message
                continue
            if facts.draining:
                why_not[name] = f"peer {name!r} is draining too"
            else:
                room[name] = dict(facts.capacity)
        return room, why_not

    def _choose(self, inst, room: dict[str, dict], why_not: dict[str, str]) -> str:
        """The peer with the most free memory that has room for ``inst``; Unprocessable (with
        each peer's reason) if none has."""
        need = int(inst.spec_dict().get("memory_mib") or 0) * MiB
        best, best_free, full = None, -1, []
        for name, cap in room.items():
            free = cap.get("memory_available_bytes", cap.get("memory_bytes"))
            if free is None:
                free = 0 if need else 1
            if free < need:
                full.append(f"peer {name!r} has {free // MiB} MiB memory free, it needs {need // MiB} MiB")
                continue
            if free > best_free or (free == best_free and cap.get("instances", 0) < room[best].get("instances", 0)):
                best, best_free = name, free
        if best is None:
            reasons = [*why_not.values(), *full] or ["no peer to move it to"]
            raise Unprocessable("no peer can take it: " + "; ".join(reasons))
        cap = room[best]
        if "memory_available_bytes" in cap:
            cap["memory_available_bytes"] -= need
        cap["instances"] = cap.get("instances", 0) + 1
        return best

    def _launch(self, it: dict, room: dict[str, dict], why_not: dict[str, str]) -> None:
        """Start ``it``'s migration (status migrating) or say why it stays (status failed)."""
        try:
            inst = self.root.instances.get(it["instance"])
            mode = _mode(inst, self.root)
            dest = self._choose(inst, room, why_not)
            mig = self.source.create(models.MigrationCreate(instance=inst.id, destination=dest, mode=mode))
        except AgentError as e:
            it.update(status="failed", error=redact(e.message))
            return
        it.update(status="migrating", destination=dest, mode=mode, migration=mig["id"])

    def _cancel(self, inflight: dict[str, dict]) -> None:
        for mig_id in inflight:
            try:
                self.root.operations.cancel(mig_id)
            except AgentError:
                pass  # final already, or past its point of no return: it finishes


def _mode(inst, root) -> str:
    """How ``inst`` moves: running VMs live, stopped VMs offline (cold), running containers by
    refresh, stopped ones cold."""
    if inst.kind == "vm":
        return "cold" if inst.state == "stopped" else "live"
    try:
        running = root.runtime.get(inst.name).state == "running"
    except AgentError:
        running = inst.state == "running"
    return "refresh" if running else "cold"
