"""GET /v1/events: server-sent events (lifecycle, operation, migration) with a type filter;
a client reconnecting with ``Last-Event-ID`` first gets what it missed (or a ``gap`` event)."""
import json
import time

from flask import Blueprint, Response, request, stream_with_context

from agent.api import query_number, route, services
from agent.errors import InvalidInput
from agent.events import TYPES

bp = Blueprint("events", __name__)
HEARTBEAT_SECONDS = 15  # a comment line this often keeps proxies open and detects gone clients
GONE_POLL_SECONDS = 1.0  # how soon a stream ends after its client left or the agent stops


@route(bp, "GET", "/v1/events", summary="Server-sent events; ?type=lifecycle,operation,migration",
       responses={200: "text/event-stream", 400: None},
       query=[{"name": "type", "schema": {"type": "string"}, "description": "comma-separated event types"},
              {"name": "heartbeat", "schema": {"type": "number", "minimum": 0.1, "maximum": 300},
               "description": "seconds between heartbeats (default 15)"},
              {"name": "timeout", "schema": {"type": "number", "minimum": 0, "maximum": 86400},
               "description": "close the stream after this many seconds (default: never)"}], long=True)
def stream_events():
    types = [t for t in (request.args.get("type") or "").split(",") if t]
    bad = [t for t in types if t not in TYPES]
    if bad:
        raise InvalidInput(f"unknown event type {bad[0]!r}: use {', '.join(TYPES)}")
    heartbeat = query_number("heartbeat", HEARTBEAT_SECONDS, lo=0.1, hi=300)
    timeout = query_number("timeout", 0, lo=0, hi=86400)
    after = request.headers.get("Last-Event-ID")
    if after is not None and not (after.isdigit() and len(after) <= 18):
        raise InvalidInput(f"Last-Event-ID {after[:40]!r} is not an event id (a number this stream sent)")
    root = services()
    gone = request.environ.get("nodeagent.gone")  # set by the server when the client leaves or it stops

    def gen():  # subscribes when the stream starts: a HEAD (never iterated) leaves nothing behind
        sub = root.events.subscribe(types or None)
        missed = root.events.replay(int(after), sub.floor, types or None) if after is not None else []
        now = time.monotonic()
        deadline = now + timeout if timeout else None
        beat = now + heartbeat
        try:
            yield ": connected\n\n"
            for ev in missed:
                yield _frame(ev)
            while root.started and not (gone and gone.is_set()) and (deadline is None or now < deadline):
                ev = sub.get(max(0.01, min(beat, deadline or beat, now + GONE_POLL_SECONDS) - now))
                now = time.monotonic()
                if ev is not None:
                    yield _frame(ev)
                elif now >= beat:
                    beat = now + heartbeat
                    yield ": heartbeat\n\n"
        finally:
            sub.close()

    return Response(stream_with_context(gen()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _frame(ev: dict) -> str:
    """One SSE frame; a gap event has no id (a client's Last-Event-ID stays its last real one)."""
    head = f"id: {ev['id']}\n" if ev["id"] is not None else ""
    return f"{head}event: {ev['type']}\ndata: {json.dumps(ev, separators=(',', ':'))}\n\n"
