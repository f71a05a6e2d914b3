"""Per-step timestamps of the data path, for profiling (off unless ``P2PKV_TRACE=1``).

``mark(step, key)`` records ``(monotonic_ns, thread name, step, key)``; the
clock is CLOCK_MONOTONIC, shared by every process of a host, so traces of a
sender and a receiver line up. When tracing is off, ``mark`` is a no-op that
costs one global lookup and one branch.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

__all__ = ["enabled", "mark", "take", "breakdown"]

enabled = os.environ.get("P2PKV_TRACE", "") not in ("", "0")
_events: list[tuple[int, str, str, Any]] = []
_lock = threading.Lock()


def mark(step: str, key: Any = None) -> None:
    if enabled:
        ev = (time.monotonic_ns(), threading.current_thread().name, step, key)
        with _lock:
            _events.append(ev)


def take() -> list[tuple[int, str, str, Any]]:
    """Return and clear the recorded events."""
    global _events
    with _lock:
        out, _events = _events, []
    return out


def breakdown(events: list[tuple[int, str, str, Any]], order: list[str]) -> dict[str, dict[str, float]]:
    """Median and p90 microseconds between consecutive steps of ``order``, per key.

    Steps that a key lacks are skipped; the time is measured from the previous
    step the key has.
    """
    by_key: dict[Any, dict[str, int]] = {}
    for t, _, step, key in events:
        by_key.setdefault(str(key), {}).setdefault(step, t)
    gaps: dict[str, list[float]] = {}
    for steps in by_key.values():
        prev = None
        for s in order:
            if s not in steps:
                continue
            if prev is not None:
                gaps.setdefault(f"{prev} -> {s}", []).append((steps[s] - steps[prev]) / 1e3)
            prev = s
    out = {}
    for name, v in gaps.items():
        v.sort()
        out[name] = {"n": len(v), "p50_us": round(v[len(v) // 2], 1), "p90_us": round(v[int(len(v) * 0.9)], 1)}
    return out
