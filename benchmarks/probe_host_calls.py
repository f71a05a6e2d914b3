"""What one host call of the request data plane costs on this machine (issue 18's profile step).

The adapter's read path spends ~40-50 us per step issuing a table upload and one launch (trace marks
pc.enter -> pc.uploaded -> pc.launched on an H200 VM), far above what those calls cost on bare metal.
This separates the candidates: each call timed alone (median of 2000), in a process with and without
a p2pkv engine (its I/O thread) alive, and ctypes driver calls made through CDLL (GIL released around
the call) vs PyDLL (GIL kept): a GIL hand-off theory predicts CDLL slower only with the engine alive.

    python benchmarks/probe_host_calls.py
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _t(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    xs = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        xs.append(time.perf_counter_ns() - t0)
    return round(statistics.median(xs) / 1e3, 2)


def suite(tag: str) -> dict[str, float]:
    import cupy
    import numpy as np

    from p2pkv.kernels.batch import _PAGED_ARGS, copier_for
    from p2pkv.transport import cudadrv

    dev = torch.device("cuda", 0)
    s = torch.cuda.Stream(dev)
    sp = int(s.cuda_stream)
    cop = copier_for(dev)
    host = torch.empty(4096, dtype=torch.int64, pin_memory=True)
    d = torch.empty(4096, dtype=torch.int64, device=dev)
    hn = host.numpy()
    tab = np.arange(1250, dtype=np.int64)
    lau = cudadrv.Launcher(dev, cop._paged, _PAGED_ARGS)
    ev = torch.cuda.Event()
    ev.record(s)
    s.synchronize()
    out: dict[str, float] = {}
    out["numpy slice assign 1250 words"] = _t(lambda: hn.__setitem__(slice(0, 1250), tab))
    out["cupy memcpyAsync H2D 10 KB"] = _t(lambda: cupy.cuda.runtime.memcpyAsync(
        d.data_ptr(), host.data_ptr(), 10000, cupy.cuda.runtime.memcpyHostToDevice, sp))
    s.synchronize()

    def drv_h2d() -> None:
        lau.enter()
        lau.upload(d.data_ptr(), host.data_ptr(), 10000, sp)
        lau.leave()

    out["driver H2D 10 KB (push/pop ctx)"] = _t(drv_h2d)
    s.synchronize()
    out["ctx push+pop only"] = _t(lambda: (lau.enter(), lau.leave()))

    def launch0() -> None:  # an empty paged copy: total 0 units, one block that returns
        lau.enter()
        lau.launch(1, 32, sp, d.data_ptr(), d.data_ptr(), 0, d.data_ptr(), 1, 16, 1, 0, 16)
        lau.leave()

    out["driver launch (empty kernel)"] = _t(launch0)
    s.synchronize()
    out["torch Event() + record"] = _t(lambda: torch.cuda.Event().record(s))
    s.synchronize()
    out["torch record (reused event)"] = _t(lambda: ev.record(s))
    s.synchronize()
    out["torch event synchronize (done)"] = _t(lambda: ev.synchronize())
    out["torch event query (done)"] = _t(lambda: ev.query())
    out["torch current_stream"] = _t(lambda: torch.cuda.current_stream(dev))
    out["raw current stream"] = _t(lambda: torch._C._cuda_getCurrentRawStream(0))
    lib = ctypes.PyDLL("libcuda.so.1")
    rec = lib.cuEventRecord
    rec.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    rec.restype = ctypes.c_int
    lib2 = ctypes.CDLL("libcuda.so.1")
    rec2 = lib2.cuEventRecord
    rec2.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    rec2.restype = ctypes.c_int
    lau.enter()
    out["cuEventRecord via CDLL (GIL released)"] = _t(lambda: rec2(lau._ready, ctypes.c_void_p(sp)))
    out["cuEventRecord via PyDLL (GIL kept)"] = _t(lambda: rec(lau._ready, ctypes.c_void_p(sp)))
    lau.leave()
    s.synchronize()
    return {f"{tag}: {k}": v for k, v in out.items()}


def main() -> int:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    res = suite("alone")
    from p2pkv import Engine

    with Engine(device="cuda:0", pool_bytes=64 << 20) as a, Engine(device="cuda:0", pool_bytes=64 << 20) as b:
        a.connect(b.address, timeout=20)
        res.update(suite("two engines alive"))
    for k, v in res.items():
        print(json.dumps({"call": k, "us_p50": v}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
