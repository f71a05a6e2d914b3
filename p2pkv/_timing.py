"""Timing helpers shared by the benchmark and the test helpers (no p2pkv imports)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["gpu_time", "wall_time"]


def gpu_time(fn: Callable[[], Any], reps: int = 20, warmup: int = 3) -> tuple[float, float]:
    """Time ``fn`` on the current CUDA device.

    GPU time is measured with CUDA events around ``reps`` calls queued behind a
    sleep kernel, so host launch cost does not leak into it; host time is the
    wall time of issuing the calls.

    Parameters
    ----------
    fn:
        The operation; it must queue its work on the current CUDA stream.
    reps, warmup:
        Timed and untimed calls.

    Returns
    -------
    tuple[float, float]
        (GPU seconds per call, host seconds per call).
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(2e8))  # ~0.1 s of GPU busy-wait while the host queues the calls
    start.record()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - t0) / reps
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps, host


def cpu_times(fn: Callable[[], Any], reps: int = 20, warmup: int = 3) -> list[float]:
    """Wall seconds of each of ``reps`` timed calls of a synchronous (CPU) ``fn``, after
    ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def wall_time(fn: Callable[[], Any], reps: int = 20, warmup: int = 3) -> float:
    """Wall seconds of a synchronous (CPU) ``fn``: the median of ``reps`` timed calls after
    ``warmup`` untimed ones (the median, so that a call the OS preempted does not skew it)."""
    return statistics.median(cpu_times(fn, reps, warmup))
