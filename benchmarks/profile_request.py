"""Where the producer's host time goes in one whole request (issue 18's profile step).

The request benchmark shows ``send_request`` + ``send_all`` costing the producer 0.6-0.8 ms of
host time on one H200 (``req.start -> req.posted``) while the GPU moves the bytes in 0.1-0.6 ms.
This separates the candidates before anything is built on a guess:

* wall time vs the calling thread's CPU time per call (``time.thread_time``): a call whose wall
  time is well above its CPU time waits (for the GIL, a lock, a system call) instead of computing;
* the same with ``sys.setswitchinterval(1e-4)`` (a GIL hand-off theory: does the figure move?);
* the threads alive in the producer process (who could take the GIL);
* a cProfile of the two calls (internal time per function).

    python benchmarks/profile_request.py [--tokens 2048] [--reps 40] [--device cuda:0]

On CPU it runs the same on the shared-memory path (``transport="shm"``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _run(pair, layers, names, reps, tag, prof=None):  # type: ignore[no-untyped-def]
    from p2pkv import RequestLayout
    from p2pkv.bench import request as br

    lay = RequestLayout(list(zip(names, layers, strict=True)))
    rows: dict[str, list[float]] = {"req_wall": [], "req_cpu": [], "all_wall": [], "all_cpu": []}

    def path(pair, tid, layers, names, gap, ready, host):  # type: ignore[no-untyped-def]
        if prof is not None:
            prof.enable()
        w0, c0 = time.perf_counter(), time.thread_time()
        req = pair.eng.send_request(pair.address, tid, lay)
        w1, c1 = time.perf_counter(), time.thread_time()
        req.send_all(layers)
        w2, c2 = time.perf_counter(), time.thread_time()
        if prof is not None:
            prof.disable()
        rows["req_wall"].append(w1 - w0)
        rows["req_cpu"].append(c1 - c0)
        rows["all_wall"].append(w2 - w1)
        rows["all_cpu"].append(c2 - c1)
        ready.append(time.monotonic())
        host.append(w2 - w0)
        return [req]

    old = br.SEND_PATHS["request"]
    br.SEND_PATHS["request"] = path
    totals = []
    try:
        for i in range(reps):
            totals.append(br._one_request(pair, f"{tag}-{i}", layers, names, 0.0, "request")["total"])
    finally:
        br.SEND_PATHS["request"] = old
    skip = min(5, reps // 4)
    out = {k: round(statistics.median(v[skip:]) * 1e6, 1) for k, v in rows.items()}
    out["total"] = round(statistics.median(totals[skip:]) * 1e6, 1)
    print(f"{tag:<24} " + "  ".join(f"{k} {v:8.1f} us" for k, v in out.items()), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    from p2pkv.bench.request import _layer_shape, _Pair, _prod

    dev = args.device
    shape = _layer_shape(args.tokens)
    nbytes = 2 * 32 * _prod(shape)
    pool = 2 * nbytes + (256 << 20)
    xport = "ipc" if dev.startswith("cuda") else "shm"
    base = dict(timeout_s=60.0, pool_bytes=pool, credit_bytes=pool, transport=xport)
    pair = _Pair(dict(base, device=dev), dict(base, device=dev))
    try:
        names = [f"model.layers.{i}.self_attn" for i in range(32)]
        layers = [torch.randn(shape, device=dev).to(torch.bfloat16) for _ in range(32)]
        print(f"device {dev} tokens {args.tokens} ({nbytes / 1e6:.0f} MB) fast path "
              f"{pair.eng._fast_ready(pair.address) is not None}; producer threads: "
              + ", ".join(sorted(t.name for t in threading.enumerate())), flush=True)
        _run(pair, layers, names, args.reps, "default")
        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        try:
            _run(pair, layers, names, args.reps, "switchinterval=100us")
        finally:
            sys.setswitchinterval(old)
        prof = cProfile.Profile()
        _run(pair, layers, names, args.reps, "under cProfile", prof)
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        pstats.Stats(prof, stream=s).sort_stats("cumtime").print_stats(30)
        print("\n".join(line for line in s.getvalue().splitlines() if line.strip())[:12000])
    finally:
        pair.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
