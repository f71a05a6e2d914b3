"""``python -m p2pkv.demo``: a producer and a consumer process move a synthetic
Llama-3-8B KV cache over p2pkv, verify it bit for bit, and print a table.

Runs with no GPU and no configuration (TCP on loopback). Options::

    python -m p2pkv.demo --requests 16 --tokens 512 --mode both --device cpu
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import sys
import time
from typing import Any

from .stats import percentile

PRESET = "llama3-8b"


def _consumer(cfg: dict, args: dict, q: "mp.Queue", ctl: "mp.Queue") -> None:
    import torch

    from . import Engine, TransferKey
    from .synthetic import PRESETS, kv_layer, same_bits

    preset = PRESETS[args["preset"]]
    shape = preset.layer_shape(args["tokens"])
    with Engine(**cfg) as eng:
        q.put(("address", eng.address))
        producer = ctl.get(timeout=60)
        bad = 0
        # One reusable destination per layer slot, as a serving engine's KV cache would be.
        out = torch.empty(shape, dtype=torch.bfloat16, device=eng.device)
        spans = {}
        for mode in args["modes"]:
            t0 = time.monotonic()
            for r in range(args["requests"]):
                tid = f"demo-{mode}-{r}"
                for layer in range(preset.layers):
                    key = TransferKey(tid, f"model.layers.{layer}.self_attn")
                    if mode == "push":
                        got = eng.recv(key, timeout=args["timeout"], out=out)
                    else:
                        got = eng.pull(producer, key, timeout=args["timeout"], out=out)
                    if not same_bits(got, kv_layer(r, layer, shape, device=eng.device)):
                        bad += 1
                q.put(("progress", mode, r))
            spans[mode] = (t0, time.monotonic())
        q.put(("consumer_done", bad, spans, eng.stats()))
        ctl.get(timeout=60)  # keep serving until the producer is finished


def _producer(cfg: dict, args: dict, consumer: str, q: "mp.Queue", ctl: "mp.Queue") -> None:
    from . import Engine, TransferKey
    from .synthetic import PRESETS, kv_layer

    preset = PRESETS[args["preset"]]
    shape = preset.layer_shape(args["tokens"])
    with Engine(**cfg) as eng:
        q.put(("producer_address", eng.address))
        eng.connect(consumer)
        lat: dict[str, list[float]] = {}
        for mode in args["modes"]:
            lat[mode] = []
            for r in range(args["requests"]):
                tid = f"demo-{mode}-{r}"
                handles = []
                for layer in range(preset.layers):
                    key = TransferKey(tid, f"model.layers.{layer}.self_attn")
                    t = kv_layer(r, layer, shape, device=eng.device)
                    if mode == "push":
                        handles.append(eng.send(consumer, key, t, timeout=args["timeout"]))
                    else:
                        eng.publish(key, t, timeout=args["timeout"])
                for h in handles:
                    h.wait(args["timeout"])
                    lat[mode].append(h.latency_s or 0.0)
        q.put(("producer_done", lat, eng.stats()))
        ctl.get(timeout=args["timeout"] * 4)


def run(requests: int = 16, tokens: int = 512, mode: str = "both", device: str = "cpu",
        timeout: float = 60.0, preset: str = PRESET, quiet: bool = False) -> dict[str, Any]:
    """Run the demo; return the summary (also printed unless ``quiet``)."""
    from ._progress import Progress
    from .synthetic import PRESETS

    p = PRESETS[preset]
    modes = ["push", "pull"] if mode == "both" else [mode]
    args = {"requests": requests, "tokens": tokens, "modes": modes, "timeout": timeout, "preset": preset}
    cfg = {"device": device, "timeout_s": timeout,
           "pool_bytes": max(256 * 2**20, 2 * p.layers * 2 * _layer_bytes(p, tokens))}
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    cons_ctl: mp.Queue = ctx.Queue()
    prod_ctl: mp.Queue = ctx.Queue()
    cons = ctx.Process(target=_consumer, args=(cfg, args, q, cons_ctl), name="p2pkv-consumer", daemon=True)
    cons.start()
    procs = [cons]
    try:
        msg = _get(q, timeout, procs)
        consumer_addr = msg[1]
        prod = ctx.Process(target=_producer, args=(cfg, args, consumer_addr, q, prod_ctl), name="p2pkv-producer",
                           daemon=True)
        prod.start()
        procs.append(prod)
        bar = None if quiet else Progress(requests * len(modes), "moving KV")
        result: dict[str, Any] = {}
        while "bad" not in result or "lat" not in result:
            msg = _get(q, timeout * 2, procs)
            if msg[0] == "producer_address":
                cons_ctl.put(msg[1])
            elif msg[0] == "progress":
                if bar:
                    bar.update(1, f"{msg[1]} request {msg[2]}")
            elif msg[0] == "consumer_done":
                result["bad"], result["spans"], result["consumer_stats"] = msg[1], msg[2], msg[3]
            elif msg[0] == "producer_done":
                result["lat"], result["producer_stats"] = msg[1], msg[2]
        if bar:
            bar.close()
    finally:
        cons_ctl.put("stop")
        prod_ctl.put("stop")
        for pr in procs:
            pr.join(timeout=15)
            if pr.is_alive():
                pr.kill()
    layer_bytes = _layer_bytes(p, tokens)
    rows = []
    for m in modes:
        t0, t1 = result["spans"][m]
        nbytes = requests * p.layers * layer_bytes
        lat = result["lat"][m]
        rows.append({"mode": m, "requests": requests, "layers": requests * p.layers, "bytes": nbytes,
                     "seconds": t1 - t0, "gbps": nbytes / max(t1 - t0, 1e-9) / 1e9,
                     "p50_us": _us(percentile(lat, 50)), "p99_us": _us(percentile(lat, 99))})
    ps = result["producer_stats"]
    used = [x for x in ("tcp", "ipc", "nccl") if ps.get(f"sent_{x}")]
    summary = {"rows": rows, "mismatches": result["bad"], "preset": preset, "tokens": tokens, "device": device,
               "layer_bytes": layer_bytes, "transport": "+".join(used) or "tcp"}
    if not quiet:
        _print_table(summary)
    return summary


def _layer_bytes(p, tokens: int) -> int:
    n = 2
    for d in p.layer_shape(tokens):
        n *= d
    return n


def _us(x: float | None) -> float | None:
    return None if x is None else x * 1e6


def _get(q: "mp.Queue", timeout: float, procs: list) -> tuple:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            dead = [pr for pr in procs if not pr.is_alive() and pr.exitcode not in (0, None)]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited with code {dead[0].exitcode}")
            if time.monotonic() > deadline:
                raise TimeoutError("demo peers did not report in time")


def _print_table(s: dict[str, Any]) -> None:
    print(f"\np2pkv demo: {s['preset']} KV, {s['tokens']} tokens/request, "
          f"{s['layer_bytes'] / 2**20:.2f} MiB/layer, device={s['device']}, transport={s['transport']} (push)")
    hdr = f"{'mode':<5} {'requests':>8} {'layers':>7} {'MiB':>9} {'seconds':>8} {'GB/s':>7} {'p50 us/layer':>13} {'p99 us/layer':>13}"
    print(hdr)
    print("-" * len(hdr))
    for r in s["rows"]:
        p50 = "-" if r["p50_us"] is None else f"{r['p50_us']:.0f}"
        p99 = "-" if r["p99_us"] is None else f"{r['p99_us']:.0f}"
        print(f"{r['mode']:<5} {r['requests']:>8} {r['layers']:>7} {r['bytes'] / 2**20:>9.1f} {r['seconds']:>8.2f} "
              f"{r['gbps']:>7.2f} {p50:>13} {p99:>13}")
    verdict = "all tensors bit-exact" if s["mismatches"] == 0 else f"{s['mismatches']} MISMATCHED tensors"
    print(f"verification: {verdict}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m p2pkv.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--mode", choices=["push", "pull", "both"], default="both")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args(argv)
    if a.requests < 1 or a.tokens < 1:
        ap.error("--requests and --tokens must be >= 1")
    s = run(a.requests, a.tokens, a.mode, a.device, a.timeout)
    return 0 if s["mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
