"""Mode 'read''s block copy on one GPU: is the fused paged copy exact, and how fast is it against the
segment path? One JSON line per case. Run from the repository root::

    python benchmarks/probe_read_kernel.py [--reps 20] [--tokens 512,2048,10000]

Correctness: every layout of tests/test_paged_copy_gpu.py, fused and segment path against torch indexing.
Timing: Llama-3-8B (32 layers, FlashAttention cache ``[2, num_blocks, 16, 8, 128]`` bf16, random block ids,
source and destination caches of different block counts), per request as the connector does it: ``fused``
(block_pairs + one paged_copy launch, plans built once), ``segments`` (the plan expanded to one segment per
block run + BatchCopier.copy), ``block_segments`` (the path before the fused copy: block_segments per
request + BatchCopier.copy); host_us is the time until the launch is queued, wall_us until the stream is
synchronized, gpu_us the stream's own time (events); medians of --reps after 3 warm-ups.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from p2pkv.kernels.batch import copier_for
from p2pkv.kernels.blocks import block_pairs, block_segments, paged_plans
from tests.test_paged_copy_gpu import _same, cases, reference


def check() -> bool:
    dev = torch.device("cuda", torch.cuda.current_device())
    copier = copier_for(dev)
    s = torch.cuda.Stream()
    all_ok = True
    for name, srcs, dsts, sid, did in cases():
        ref = reference(srcs, sid, dsts, did)
        row: dict = {"case": name, "layers": len(srcs), "pairs": len(sid)}
        for path in ("fused", "segments"):
            for d in dsts:
                d.zero_()
            torch.cuda.synchronize()
            try:
                plans = paged_plans(srcs, dsts)
                row["plans"] = [repr(p) for p in plans]
                for p in plans:
                    pairs = block_pairs(sid, did, p.src_blocks, p.dst_blocks)
                    if path == "fused":
                        copier.paged_copy(p, pairs, s)
                    else:
                        copier.copy(p.segments(pairs), s)
                s.synchronize()
                ok = all(_same(d, r) for d, r in zip(dsts, ref, strict=True))
            except Exception as exc:  # report, go on with the other cases
                ok = False
                row[f"{path}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            row[f"{path}_ok"] = ok
            all_ok &= ok
        print(json.dumps(row), flush=True)
    return all_ok


def timing(tokens: list[int], reps: int) -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    copier = copier_for(dev)
    s = torch.cuda.Stream()
    L, BS, H, D = 32, 16, 8, 128
    nb_src = 2 * (-(-max(tokens) // BS)) + 8
    nb_dst = nb_src + 5
    srcs = [torch.randn(2, nb_src, BS, H, D, device=dev).to(torch.bfloat16).transpose(0, 1) for _ in range(L)]
    dsts = [torch.zeros(2, nb_dst, BS, H, D, dtype=torch.bfloat16, device=dev).transpose(0, 1) for _ in range(L)]
    plans = paged_plans(srcs, dsts)
    (plan,) = plans
    for tok in tokens:
        nblk = -(-tok // BS)
        nbytes = plan.nbytes(nblk)
        for path in ("fused", "segments", "block_segments"):
            hosts, walls, gpus = [], [], []
            ok = True
            for r in range(reps + 3):
                g = torch.Generator().manual_seed(r)
                sid = torch.randperm(nb_src, generator=g)[:nblk].tolist()
                did = torch.randperm(nb_dst, generator=g)[:nblk].tolist()
                torch.cuda.synchronize()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                e0.record(s)
                if path == "fused":
                    copier.paged_copy(plan, block_pairs(sid, did, plan.src_blocks, plan.dst_blocks), s)
                elif path == "segments":
                    copier.copy(plan.segments(block_pairs(sid, did, plan.src_blocks, plan.dst_blocks)), s)
                else:
                    copier.copy(block_segments(srcs, sid, dsts, did), s)
                t1 = time.perf_counter()
                e1.record(s)
                s.synchronize()
                t2 = time.perf_counter()
                if r >= 3:
                    hosts.append(t1 - t0)
                    walls.append(t2 - t0)
                    gpus.append(e0.elapsed_time(e1) / 1e3)
                if r == 3:  # one checked request per path
                    ok = all(torch.equal(d[did[:8]], x[sid[:8]]) and torch.equal(d[did[-8:]], x[sid[-8:]])
                             for d, x in zip(dsts, srcs, strict=True))
            gpu = statistics.median(gpus)
            print(json.dumps({"case": f"llama3-8b {tok} tokens", "path": path, "bytes": nbytes, "ok": ok,
                              "host_us_p50": round(statistics.median(hosts) * 1e6, 1),
                              "wall_us_p50": round(statistics.median(walls) * 1e6, 1),
                              "gpu_us_p50": round(gpu * 1e6, 1),
                              "gpu_GBps_rw": round(2 * nbytes / gpu / 1e9, 1)}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="512,2048,10000")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--skip-check", action="store_true")
    a = ap.parse_args()
    ok = True if a.skip_check else check()
    timing([int(t) for t in a.tokens.split(",")], a.reps)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
