"""Prometheus metrics through vLLM's hook (``build_prom_metrics``); needs vLLM, imported lazily."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["make_prom_metrics", "COUNTERS"]

COUNTERS = {
    "bytes_sent": "Bytes of KV handed off by p2pkv (producer).",
    "bytes_received": "Bytes of KV received by p2pkv (consumer).",
    "transfers_saved": "Requests whose KV p2pkv handed off.",
    "transfers_loaded": "Requests whose KV p2pkv loaded.",
    "save_failures": "p2pkv KV hand-offs that failed.",
    "load_failures": "p2pkv KV loads that failed (reported through failed_recving).",
}
_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


def make_prom_metrics(vllm_config: Any, metric_types: dict[Any, Any], labelnames: list[str],
                      per_engine_labelvalues: dict[int, list[object]]) -> Any:
    """A ``KVConnectorPromMetrics`` with p2pkv's counters (``vllm:p2pkv_<name>``) and a load-latency
    histogram (``vllm:p2pkv_load_seconds``), fed from each interval's stats ``data``."""
    prometheus_client = importlib.import_module("prometheus_client")  # vLLM's dependency, not ours
    Counter, Histogram = prometheus_client.Counter, prometheus_client.Histogram
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics
    from vllm.v1.metrics.utils import create_metric_per_engine

    class P2pkvPromMetrics(KVConnectorPromMetrics):
        def __init__(self) -> None:
            super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
            counter_cls, hist_cls = metric_types[Counter], metric_types[Histogram]
            self.counters = {
                name: create_metric_per_engine(counter_cls(name=f"vllm:p2pkv_{name}", documentation=doc,
                                                           labelnames=labelnames), per_engine_labelvalues)
                for name, doc in COUNTERS.items()}
            self.load_seconds = create_metric_per_engine(
                hist_cls(name="vllm:p2pkv_load_seconds", documentation="Time to load one request's KV with p2pkv.",
                         buckets=_BUCKETS, labelnames=labelnames), per_engine_labelvalues)

        def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
            for name, metric in self.counters.items():
                n = int(transfer_stats_data.get(name, 0) or 0)
                if n:
                    metric[engine_idx].inc(n)
            for s in transfer_stats_data.get("load_latency_s", []) or []:
                self.load_seconds[engine_idx].observe(float(s))

    return P2pkvPromMetrics()
