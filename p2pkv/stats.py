"""Counters and latency reservoirs of an engine (thread-safe, cheap)."""

from __future__ import annotations

import threading
from collections import defaultdict, deque

__all__ = ["Stats", "percentile"]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    i = min(len(s) - 1, max(0, round(q / 100.0 * (len(s) - 1))))
    return s[i]


class Stats:
    def __init__(self, reservoir: int = 8192):
        self._lock = threading.Lock()
        self._counters: dict[str, int] = defaultdict(int)
        self._lat: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=reservoir))

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            self._lat[name].append(seconds)

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            out: dict[str, object] = dict(self._counters)
            lat = {}
            for name, vals in self._lat.items():
                v = list(vals)
                lat[name] = {"count": len(v), "p50_us": _us(percentile(v, 50)), "p99_us": _us(percentile(v, 99)),
                             "max_us": _us(max(v) if v else None)}
            out["latency"] = lat
        return out


def _us(x: float | None) -> float | None:
    return None if x is None else round(x * 1e6, 1)
