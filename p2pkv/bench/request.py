"""Whole-request benchmark: one Llama-3-8B request (32 layers, K and V) from one
engine to an engine in another process, beside raw NCCL (``torch.distributed``
``batch_isend_irecv`` of the same tensors) in the same run.

Timed from the first ``send`` until the receiving process holds every layer
(its ``recv(out=...)`` returned and its stream finished), median of ``reps``.
Also: the caller's host time per ``send``, layer-wise latency (layers made
ready one at a time, ``gap_us`` apart: how long after the last layer became
ready the receiver holds it), and, with ``P2PKV_TRACE=1``, where the time goes
per step on both sides (:mod:`p2pkv._trace`).

Clocks: ``time.monotonic`` is CLOCK_MONOTONIC, shared by the processes of one
host, so sender and receiver timestamps are compared directly.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import statistics
import time
from typing import Any
from collections.abc import Callable

import torch

from .. import _trace
from ..synthetic import PRESETS

MiB = 2**20
# Step order of one tensor's path, for the per-step breakdown.
STEPS = ["send.enter", "send.ret", "io.cmd", "io.sent", "req.posted", "rx.hdr", "rx.posted", "cq.fire", "rx.io_done",
         "rx.delivered", "rx.landed", "recv.woke", "recv.ret", "ack.rx"]


def _layer_shape(tokens: int) -> tuple[int, ...]:
    return tuple(PRESETS["llama3-8b"].layer_shape(tokens))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- raw NCCL baseline
def _raw_worker(rank: int, port: int, tokens_list: list[int], reps: int, q: Any) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out: dict[int, list[float]] = {}
    layers = PRESETS["llama3-8b"].layers
    for tokens in tokens_list:
        xs = [torch.zeros(_layer_shape(tokens), dtype=torch.bfloat16, device="cuda") for _ in range(layers)]
        times = []
        for r in range(reps + 2):
            torch.cuda.synchronize()
            dist.barrier()
            t0 = time.monotonic()
            ops = [dist.P2POp(dist.isend if rank == 0 else dist.irecv, x, 1 - rank) for x in xs]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
            torch.cuda.synchronize()
            t1 = time.monotonic()
            stamps: list[Any] = [None, None]
            dist.all_gather_object(stamps, (t0, t1))
            if r >= 2:
                times.append(stamps[1][1] - stamps[0][0])  # receiver done - sender start
        out[tokens] = times
        del xs
        torch.cuda.empty_cache()
    dist.destroy_process_group()
    q.put((rank, out))


def raw_nccl(tokens_list: list[int], reps: int) -> dict[int, list[float]]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_raw_worker, args=(r, port, tokens_list, reps, q), daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(30)
    return res[0]


# ----------------------------------------------------------------------------- p2pkv
def _consumer(cfg: dict[str, Any], conn: Any) -> None:
    """Receiver process: per command, receive every layer of one request into preallocated tensors."""
    from .. import Engine, TransferKey

    eng = Engine(**cfg)
    conn.send(eng.address)
    outs: dict[tuple, list[torch.Tensor]] = {}
    try:
        while True:
            cmd = conn.recv()
            if cmd is None:
                break
            tid, names, shape = cmd
            key = (tuple(shape), len(names))
            if key not in outs:
                outs[key] = [torch.empty(shape, dtype=torch.bfloat16, device=eng.device) for _ in names]
            bufs = outs[key]
            stamps = []
            stream = torch.cuda.current_stream(eng.device) if eng.device.type == "cuda" else None
            for name, out in zip(names, bufs, strict=True):
                eng.recv(TransferKey(tid, name), out=out, timeout=60)
                stamps.append(time.monotonic())
            if stream is not None:
                stream.synchronize()  # the copies into ``out`` are done: the process holds every layer
                stamps[-1] = time.monotonic()
            conn.send((stamps, _trace.take()))
    finally:
        eng.close()


class _Pair:
    """A producer engine here and a consumer engine in a child process."""

    def __init__(self, prod_cfg: dict[str, Any], cons_cfg: dict[str, Any]):
        from .. import Engine

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_consumer, args=(cons_cfg, child), daemon=True)
        self.proc.start()
        if not self.conn.poll(120):
            raise RuntimeError("consumer engine did not start")
        self.address = self.conn.recv()
        self.eng = Engine(**prod_cfg)
        self.eng.connect(self.address, timeout=60)

    def close(self) -> None:
        try:
            self.conn.send(None)
            self.proc.join(20)
        finally:
            if self.proc.is_alive():
                self.proc.kill()
            self.eng.close()


def _busy_until(t: float) -> None:
    while time.monotonic() < t:
        pass


def _one_request(pair: _Pair, tid: str, layers: list[torch.Tensor], names: list[str], gap_s: float,
                 send_fn: Callable[..., Any]) -> dict[str, Any]:
    shape = tuple(layers[0].shape)
    pair.conn.send((tid, names, shape))
    time.sleep(0.005)  # the consumer is waiting in recv before the first send
    ready: list[float] = []
    host: list[float] = []
    t0 = time.monotonic()
    handles = send_fn(pair, tid, layers, names, gap_s, ready, host)
    stamps, rx_events = pair.conn.recv()
    for h in handles:
        h.wait(60)
    tx_events = _trace.take()
    return {"total": stamps[-1] - t0, "last_lat": stamps[-1] - ready[-1], "host": host,
            "events": tx_events + rx_events}


def _send_layers(pair: _Pair, tid: str, layers: list[torch.Tensor], names: list[str], gap_s: float,
                 ready: list[float], host: list[float]) -> list[Any]:
    from .. import TransferKey

    eng = pair.eng
    hs = []
    t_next = time.monotonic()
    for name, x in zip(names, layers, strict=True):
        if gap_s:
            t_next += gap_s
            _busy_until(t_next)
        t = time.monotonic()
        ready.append(t)
        hs.append(eng.send(pair.address, TransferKey(tid, name), x))
        host.append(time.monotonic() - t)
    return hs


def _send_request(pair: _Pair, tid: str, layers: list[torch.Tensor], names: list[str], gap_s: float,
                  ready: list[float], host: list[float]) -> list[Any]:
    """One offer for the whole request, then each layer handed over as it becomes ready."""
    eng = pair.eng
    t = time.monotonic()
    req = eng.send_request(pair.address, tid, list(zip(names, layers, strict=True)))
    host.append(time.monotonic() - t)
    t_next = time.monotonic()
    for name, x in zip(names, layers, strict=True):
        if gap_s:
            t_next += gap_s
            _busy_until(t_next)
        t = time.monotonic()
        ready.append(t)
        req.send(name, x)
        host.append(time.monotonic() - t)
    return [req]


SEND_PATHS: dict[str, Callable[..., Any]] = {"send": _send_layers, "request": _send_request}


def bench_request(tokens_list: list[int], transports: list[str], reps: int = 6, gaps_us: tuple[int, ...] = (200,),
                  bar: Callable[[str], None] = lambda note: None, paths: list[str] | None = None,
                  devices: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows for the ``request`` suite (see the module docstring)."""
    from .core import _row

    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if devices is None:
        devices = ("cuda:0", "cuda:1") if ngpu >= 2 else ("cuda:0", "cuda:0") if ngpu == 1 else ("cpu", "cpu")
    rows: list[dict[str, Any]] = []
    layers_n = PRESETS["llama3-8b"].layers
    names = [f"model.layers.{i}.self_attn" for i in range(layers_n)]
    raw = raw_nccl(tokens_list, reps) if ngpu >= 2 and devices[0] != devices[1] else {}
    for tokens in tokens_list:
        if tokens in raw:
            rows.append(_row("request", f"raw NCCL batch_isend_irecv {devices[0]}->{devices[1]}",
                             2 * layers_n * _prod(_layer_shape(tokens)), preset="llama3-8b", tokens=tokens,
                             ms=_ms(statistics.median(raw[tokens]))))
    biggest = max(tokens_list)
    req_bytes = 2 * layers_n * _prod(_layer_shape(biggest))
    pool = 2 * req_bytes + 256 * MiB
    for x in transports:
        if devices[0] == "cpu" and x != "tcp":
            continue
        base = dict(timeout_s=120.0, pool_bytes=pool, credit_bytes=pool, transport=x)
        pair = _Pair(dict(base, device=devices[0]), dict(base, device=devices[1]))
        try:
            for tokens in tokens_list:
                shape = _layer_shape(tokens)
                nbytes = 2 * layers_n * _prod(shape)
                layers = [torch.randn(shape, device=devices[0]).to(torch.bfloat16) for _ in range(layers_n)]
                for path in paths or list(SEND_PATHS):
                    fn = SEND_PATHS[path]
                    for gap in (0,) + tuple(gaps_us):
                        res = [_one_request(pair, f"r{tokens}-{path}-{gap}-{i}", layers, names, gap / 1e6, fn)
                               for i in range(reps + 2)][2:]
                        total = statistics.median(r["total"] for r in res)
                        host = sorted(h for r in res for h in r["host"])
                        row = _row("request", f"p2pkv {path} {x} {devices[0]}->{devices[1]}"
                                   + (f" layer-wise {gap}us" if gap else ""), nbytes, preset="llama3-8b", tokens=tokens,
                                   ms=_ms(total), host_us_p50=round(host[len(host) // 2] * 1e6, 1),
                                   last_layer_us=round(statistics.median(r["last_lat"] for r in res) * 1e6, 1))
                        if tokens in raw and not gap:
                            row["ratio"] = statistics.median(raw[tokens]) / total
                            row["baseline"] = "raw NCCL batch_isend_irecv"
                        events = [e for r in res for e in r["events"]]
                        if events:
                            row["steps"] = _trace.breakdown(events, STEPS)
                        rows.append(row)
                        bar(f"request {x} {path} {tokens} gap {gap}")
                del layers
        finally:
            pair.close()
    return rows


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _ms(s: float) -> float:
    return round(s * 1e3, 3)


def suite_request(smoke: bool, sizes: list[int], bar: Callable[[str], None]) -> list[dict[str, Any]]:
    """The ``request`` suite of ``python -m p2pkv.bench``: every transport this machine has.

    Two GPUs: NCCL and CUDA IPC across them; one GPU: CUDA IPC between two
    processes; CPU: TCP. Both send paths (``send_request`` and per-tensor
    ``send``), all at once and layer-wise (200 us apart).
    """
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    transports = ["nccl", "ipc"] if ngpu >= 2 else ["ipc"] if ngpu == 1 else ["tcp"]
    if ngpu >= 2:
        from ..transport.nccl import nccl_available

        if not nccl_available():
            transports = ["ipc"]
    tokens = [128] if smoke else ([512, 2048, 10000] if ngpu else [512, 2048])
    return bench_request(tokens, transports, reps=2 if smoke else 6, gaps_us=(200,), bar=bar)


def main(argv: list[str] | None = None) -> int:
    """``python -m p2pkv.bench.request [--tokens 512,2048] [--transports nccl,ipc] [--out FILE]``."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m p2pkv.bench.request", description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="512,2048,10000", help="comma-separated prompt lengths")
    ap.add_argument("--transports", default="nccl,ipc,auto", help="comma-separated: tcp, ipc, nccl, auto")
    ap.add_argument("--paths", default="", help="comma-separated send paths (default: all)")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--gaps", default="200,2000", help="layer-wise gaps in microseconds")
    ap.add_argument("--devices", default="", help="producer,consumer devices (default: cuda:0,cuda:1)")
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    a = ap.parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    devs = tuple(a.devices.split(",")) if a.devices else None
    rows = bench_request([int(t) for t in a.tokens.split(",")], a.transports.split(","), a.reps,
                         tuple(int(g) for g in a.gaps.split(",") if g), paths=a.paths.split(",") if a.paths else None,
                         devices=devs, bar=lambda note: print("..", note, flush=True))
    for r in rows:
        steps = r.pop("steps", None)
        print(json.dumps(r))
        if steps:
            for k, v in steps.items():
                print(f"    {k:<28} p50 {v['p50_us']:>9} us  p90 {v['p90_us']:>9} us  (n={v['n']})")
        r["steps"] = steps
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
