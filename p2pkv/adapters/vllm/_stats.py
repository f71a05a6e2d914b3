"""p2pkv's numbers in vLLM's own channel: ``KVConnectorStats`` per logging interval."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from ._base import KVConnectorStats

__all__ = ["P2pkvKVConnectorStats", "StatsCollector"]

_COUNTERS = ("bytes_sent", "bytes_received", "transfers_saved", "transfers_loaded", "save_failures",
             "load_failures")
_MAX_SAMPLES = 4096


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


@dataclass
class P2pkvKVConnectorStats(KVConnectorStats):
    """Per-interval counters and load latencies of one or more workers.

    ``data`` holds plain ints and a list of load latencies in seconds, so it
    pickles/serialises as vLLM requires; :meth:`aggregate` adds workers
    together and :meth:`reduce` gives what vLLM logs (sums, p50/p90/p99 in ms).
    """

    def __post_init__(self) -> None:
        for k in _COUNTERS:
            self.data.setdefault(k, 0)
        self.data.setdefault("load_latency_s", [])

    def reset(self) -> None:
        self.data: dict[str, Any] = {}
        self.__post_init__()

    def aggregate(self, other: KVConnectorStats) -> P2pkvKVConnectorStats:
        od = other.data if other is not None else {}
        for k in _COUNTERS:
            self.data[k] = int(self.data.get(k, 0)) + int(od.get(k, 0) or 0)
        self.data["load_latency_s"] = (list(self.data.get("load_latency_s", []))
                                       + list(od.get("load_latency_s", []) or []))[-_MAX_SAMPLES:]
        return self

    def reduce(self) -> dict[str, int | float]:
        lat = [float(x) for x in self.data.get("load_latency_s", [])]
        out: dict[str, int | float] = {k: int(self.data.get(k, 0)) for k in _COUNTERS}
        out["load_p50_ms"] = round(_pct(lat, 0.5) * 1e3, 3)
        out["load_p90_ms"] = round(_pct(lat, 0.9) * 1e3, 3)
        out["load_p99_ms"] = round(_pct(lat, 0.99) * 1e3, 3)
        return out

    def is_empty(self) -> bool:
        return not any(int(self.data.get(k, 0)) for k in _COUNTERS) and not self.data.get("load_latency_s")


class StatsCollector:
    """Thread-safe accumulation on a worker; :meth:`take` hands over one interval."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cur = P2pkvKVConnectorStats()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._cur.data[name] = int(self._cur.data.get(name, 0)) + n

    def latency(self, seconds: float) -> None:
        with self._lock:
            lat = self._cur.data["load_latency_s"]
            if len(lat) < _MAX_SAMPLES:
                lat.append(float(seconds))

    def take(self) -> P2pkvKVConnectorStats | None:
        with self._lock:
            cur, self._cur = self._cur, P2pkvKVConnectorStats()
        return None if cur.is_empty() else cur

    def peek(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._cur.data)
