"""The one JSON line every bench prints (DESIGN.md section 7), always with the same keys:
{"bench", "metric", "unit", "value", "peer", "peer_value", "ratio"}; ``ratio`` is
value / peer_value, and ``peer``, ``peer_value`` and ``ratio`` are null where no peer exists.

Benches run as ``.venv/bin/python bench/NAME.py``, so this directory is sys.path[0] and
``from jsonline import emitter`` needs no path edit.
"""
from __future__ import annotations

import json
from typing import Callable


def emitter(bench: str, digits: int = 2) -> Callable[..., None]:
    """A ``line(metric, value, peer=None, peer_value=None, unit="ms")`` for ``bench`` that
    prints one JSON line (flushed), figures rounded to ``digits`` decimals, the ratio to 2."""
    def line(metric: str, value: float, peer: str | None = None, peer_value: float | None = None,
             unit: str = "ms") -> None:
        print(json.dumps({"bench": bench, "metric": metric, "unit": unit, "value": round(value, digits),
                          "peer": peer,
                          "peer_value": None if peer_value is None else round(peer_value, digits),
                          "ratio": round(value / peer_value, 2) if peer_value else None}), flush=True)
    return line
