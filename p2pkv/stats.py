"""Counters and latency reservoirs of an engine (thread-safe, cheap)."""

from __future__ import annotations

import threading
from collections import defaultdict, deque

__all__ = ["ENGINE_COUNTERS", "ENGINE_LATENCIES", "Stats", "percentile"]

# Every counter an engine's stats() reports, present (at 0) from the start: a caller may index any
# of them on a fresh engine. Documented in docs/reference.md ("stats()").
ENGINE_COUNTERS: tuple[str, ...] = (
    # per-tensor push
    "sends", "sends_done", "sends_failed", "bytes_sent", "sent_tcp", "sent_ipc", "sent_nccl",
    "credit_requests", "credit_revoked",
    # receiving
    "tensors_received", "bytes_received", "received_tcp", "received_ipc", "received_nccl",
    "recvs", "bytes_received_claimed", "evicted",
    # publish / pull
    "published", "pulls", "bytes_pulled", "pull_errors", "pulls_served", "bytes_served",
    # whole requests
    "requests", "requests_done", "requests_failed", "requests_eager",
    "requests_received", "requests_failed_rx", "offers_refused", "drained_items", "offers_over_budget",
    # the same-host fast path, recv_request, posted receives, one-sided reads
    "requests_fast", "sent_fast", "requests_received_fast", "fast_leases", "fast_refused", "recv_requests",
    "recv_requests_failed", "received_direct", "reads_done", "reads_refused",
    # peers and connections
    "connections", "connections_shed", "connections_overbuffered", "pulls_refused", "handshakes_refused",
    "auth_failures", "peers_lost", "sessions_lost", "sessions_refused",
    "ipc_mappings", "nccl_comms", "aborts",
    # misbehaving peers, and our own failures
    "protocol_errors", "credit_violations", "nacks", "replies_suppressed", "internal_errors",
)
# Latency reservoirs (stats()["latency"][name]: count, p50_us, p99_us, max_us), likewise present from the start.
ENGINE_LATENCIES: tuple[str, ...] = ("send", "recv_wait", "pull", "request")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    i = min(len(s) - 1, max(0, round(q / 100.0 * (len(s) - 1))))
    return s[i]


class Stats:
    """Counters and latency reservoirs; ``counters`` and ``latencies`` name those reported (at zero)
    before anything was counted (default: an engine's, :data:`ENGINE_COUNTERS` and
    :data:`ENGINE_LATENCIES`). Other names are added when first counted."""

    def __init__(self, reservoir: int = 8192, counters: tuple[str, ...] = ENGINE_COUNTERS,
                 latencies: tuple[str, ...] = ENGINE_LATENCIES) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, int] = defaultdict(int)
        self._lat: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=reservoir))
        for name in counters:
            self._counters[name] = 0
        for name in latencies:
            self._lat[name] = deque(maxlen=reservoir)

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
