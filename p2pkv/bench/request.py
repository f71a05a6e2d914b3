"""Whole-request benchmark: one Llama-3-8B request (32 layers, K and V, bf16) from an engine to
an engine in another process, beside the baselines a user would pick instead, in the same run.

Timed from the producer's start until the consumer process holds every layer, median of
``reps`` after 2 warm-ups (CLOCK_MONOTONIC is shared by the processes of one host, so the two
sides' timestamps are compared directly). Paths (``--paths``):

* ``request``: ``send_request`` + ``send_many`` (all layers at once) / ``send`` per layer
  (layer-wise), the consumer takes it with ONE ``recv_request(...).wait()``;
* ``request-recv``: ``send_request``, the consumer calls ``recv(key, out=...)`` per layer;
* ``send``: one ``send`` per layer, ``recv(key, out=...)`` per layer.

Baselines: on one GPU the hand-rolled CUDA IPC pipeline and NIXL (when ``nixl`` imports), see
:mod:`p2pkv.bench.peers`; on two GPUs raw NCCL (``torch.distributed`` ``batch_isend_irecv``).
Layer-wise (``--gaps``): the producer spins in Python between layers (as a forward pass
does) and makes one ready every gap; reported is how long after the last layer became ready
the consumer holds it. With ``P2PKV_TRACE=1`` each row gets the per-step breakdown of both
sides (:mod:`p2pkv._trace`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from .. import _trace
from ..synthetic import PRESETS

MiB = 2**20
STEPS = ["req.start", "req.announced", "rx.header", "req.posted", "rx.landed"]
PATHS = ("request", "request-recv", "send")
TRANSPORTS = ("auto", "ipc", "nccl", "tcp", "shm")


def _layer_shape(tokens: int) -> tuple[int, ...]:
    return tuple(PRESETS["llama3-8b"].layer_shape(tokens))


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _ms(s: float) -> float:
    return round(s * 1e3, 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- raw NCCL baseline (2 GPUs)
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
    """Receiver process: per command, take every layer of one request."""
    from .. import Engine, TransferKey

    eng = Engine(**cfg)
    conn.send(eng.address)
    outs: dict[tuple[Any, ...], list[torch.Tensor]] = {}
    cuda = eng.device.type == "cuda"
    try:
        while True:
            cmd = conn.recv()
            if cmd is None:
                break
            tid, names, shape, how = cmd
            if how == "request":
                h = eng.recv_request(tid, timeout=60)
                conn.send("armed")
                h.wait()  # every layer is in this process's memory
                t_hold = time.monotonic()
                _trace.mark("rx.landed", tid)
                h.release()
                conn.send(([t_hold], _trace.take()))
                continue
            key = (tuple(shape), len(names))
            if key not in outs:
                outs[key] = [torch.empty(shape, dtype=torch.bfloat16, device=eng.device) for _ in names]
            conn.send("armed")
            stamps = []
            for name, out in zip(names, outs[key], strict=True):
                eng.recv(TransferKey(tid, name), out=out, timeout=60)
                stamps.append(time.monotonic())
            if cuda:
                torch.cuda.current_stream(eng.device).synchronize()  # the copies into ``out`` are done
                stamps[-1] = time.monotonic()
            _trace.mark("rx.landed", tid)
            conn.send((stamps, _trace.take()))
    finally:
        eng.close()


class _Pair:
    """A producer engine here and a consumer engine in a child process."""

    def __init__(self, prod_cfg: dict[str, Any], cons_cfg: dict[str, Any]):
        from .. import Engine

        ctx = mp.get_context("spawn")
        self.layouts: dict[Any, Any] = {}
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_consumer, args=(cons_cfg, child), daemon=True)
        self.proc.start()
        if not self.conn.poll(120):
            raise RuntimeError("consumer engine did not start")
        self.address = self.conn.recv()
        self.eng = Engine(**prod_cfg)
        self.eng.connect(self.address, timeout=60)
        # the first request to a same-host peer asks for the fast path (and goes the ordinary way)
        t = torch.zeros(64, device=self.eng.device)
        _one_request(self, "warm-up", [t], ["w"], 0.0, "request")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self.eng._fast_ready(self.address) is None \
                and self.eng._fast.can_offer(self.eng._peers[self.address].caps):
            time.sleep(0.01)

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
                 path: str) -> dict[str, Any]:
    shape = tuple(layers[0].shape)
    pair.conn.send((tid, names, shape, "request" if path == "request" else "recv"))
    if not pair.conn.poll(60):
        raise RuntimeError("consumer did not answer")
    pair.conn.recv()
    time.sleep(0.005)  # the consumer waits before the producer starts
    ready: list[float] = []
    host: list[float] = []
    t0 = time.monotonic()
    handles = SEND_PATHS[path](pair, tid, layers, names, gap_s, ready, host)
    if not pair.conn.poll(120):
        raise RuntimeError("consumer did not finish the request")
    stamps, rx_events = pair.conn.recv()
    for h in handles:
        h.wait(60)
    tx_events = _trace.take()
    return {"total": stamps[-1] - t0, "last_lat": stamps[-1] - (ready[-1] if ready else t0), "host": host,
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
    """One announcement for the whole request; all layers at once (one launch) or each as it becomes ready.
    The layout is checked once per shape (a RequestLayout), as NIXL prepares its descriptor lists once."""
    from .. import RequestLayout

    eng = pair.eng
    key = (tuple(layers[0].shape), len(layers))
    layout = pair.layouts.get(key)
    if layout is None:
        layout = pair.layouts[key] = RequestLayout(list(zip(names, layers, strict=True)))
    t = time.monotonic()
    _trace.mark("req.start", tid)
    req = eng.send_request(pair.address, tid, layout)
    _trace.mark("req.announced", tid)
    if not gap_s:
        ready.append(t)
        req.send_all(layers)
        host.append(time.monotonic() - t)
        _trace.mark("req.posted", tid)
        return [req]
    host.append(time.monotonic() - t)
    t_next = time.monotonic()
    for name, x in zip(names, layers, strict=True):
        t_next += gap_s
        _busy_until(t_next)
        t = time.monotonic()
        ready.append(t)
        req.send(name, x)
        host.append(time.monotonic() - t)
    _trace.mark("req.posted", tid)
    return [req]


SEND_PATHS: dict[str, Callable[..., Any]] = {"request": _send_request, "request-recv": _send_request,
                                             "send": _send_layers}


def _baselines(devices: tuple[str, str], tokens_list: list[int], reps: int,
               bar: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[int, tuple[str, float]],
                                                    dict[int, float]]:
    """Baseline rows, the raw figure per token count (what p2pkv's ratio is against) and NIXL's."""
    from .core import _row

    rows: list[dict[str, Any]] = []
    raw: dict[int, tuple[str, float]] = {}
    nixl: dict[int, float] = {}
    layers_n = PRESETS["llama3-8b"].layers
    if devices[0].startswith("cuda") and devices[0] != devices[1]:
        res = raw_nccl(tokens_list, reps)
        for tok, v in res.items():
            raw[tok] = ("raw NCCL batch_isend_irecv", statistics.median(v))
        what = f"raw NCCL batch_isend_irecv {devices[0]}->{devices[1]}"
    elif devices[0].startswith("cuda"):
        from .peers import nixl_available, nixl_ipc, raw_ipc

        res = raw_ipc(tokens_list, reps, devices[0])
        for tok, v in res.items():
            raw[tok] = ("raw hand-rolled CUDA IPC", statistics.median(v))
        what = f"raw hand-rolled CUDA IPC {devices[0]} (2 processes)"
        bar("baseline raw IPC")
        if nixl_available():
            try:
                nres = nixl_ipc(tokens_list, reps, devices[0])
            except Exception as exc:  # NIXL is a peer, not ours: report and go on
                print(f"NIXL baseline failed: {type(exc).__name__}: {exc}", flush=True)
                nres = {}
            for tok, v in nres.items():
                nixl[tok] = statistics.median(v)
                rows.append(_row("request", f"NIXL {_nixl_version()} UCX WRITE {devices[0]} (2 processes)",
                                 2 * layers_n * _prod(_layer_shape(tok)), preset="llama3-8b", tokens=tok,
                                 ms=_ms(nixl[tok]), ms_min=_ms(min(v)), ms_max=_ms(max(v))))
            bar("baseline NIXL")
        else:
            print("NIXL not importable: its baseline is not in this run", flush=True)
    else:
        return rows, raw, nixl
    for tok, v in res.items():
        rows.append(_row("request", what, 2 * layers_n * _prod(_layer_shape(tok)), preset="llama3-8b", tokens=tok,
                         ms=_ms(statistics.median(v)), ms_min=_ms(min(v)), ms_max=_ms(max(v))))
    return rows, raw, nixl


def _nixl_version() -> str:
    try:
        from importlib.metadata import version

        return version("nixl")
    except Exception:
        return ""


def bench_request(tokens_list: list[int], transports: list[str], reps: int = 6, gaps_us: tuple[int, ...] = (200,),
                  bar: Callable[[str], None] = lambda note: None, paths: list[str] | None = None,
                  devices: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows for the ``request`` suite (see the module docstring)."""
    from .core import _row

    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if devices is None:
        devices = ("cuda:0", "cuda:1") if ngpu >= 2 else ("cuda:0", "cuda:0") if ngpu == 1 else ("cpu", "cpu")
    layers_n = PRESETS["llama3-8b"].layers
    names = [f"model.layers.{i}.self_attn" for i in range(layers_n)]
    rows, raw, nixl = _baselines(devices, tokens_list, reps, bar)
    biggest = max(tokens_list)
    req_bytes = 2 * layers_n * _prod(_layer_shape(biggest))
    pool = 2 * req_bytes + 256 * MiB
    for x in transports:
        if devices[0] == "cpu" and x not in ("tcp", "shm"):
            continue
        base = dict(timeout_s=120.0, pool_bytes=pool, credit_bytes=pool, transport=x)
        pair = _Pair(dict(base, device=devices[0]), dict(base, device=devices[1]))
        try:
            for tokens in tokens_list:
                shape = _layer_shape(tokens)
                nbytes = 2 * layers_n * _prod(shape)
                layers = [torch.randn(shape, device=devices[0]).to(torch.bfloat16) for _ in range(layers_n)]
                for path in paths or list(PATHS):
                    for gap in (0,) + tuple(gaps_us):
                        res = [_one_request(pair, f"r{tokens}-{path}-{gap}-{i}", layers, names, gap / 1e6, path)
                               for i in range(reps + 2)][2:]
                        totals = [r["total"] for r in res]
                        total = statistics.median(totals)
                        host = sorted(h for r in res for h in r["host"])
                        fast = pair.eng._fast_ready(pair.address) is not None
                        label = f"p2pkv {path} {x}{' fast' if fast and path != 'send' else ''} " \
                                f"{devices[0]}->{devices[1]}" + (f" layer-wise {gap}us" if gap else "")
                        row = _row("request", label, nbytes, preset="llama3-8b", tokens=tokens, ms=_ms(total),
                                   ms_min=_ms(min(totals)), ms_max=_ms(max(totals)),
                                   host_us_p50=round(host[len(host) // 2] * 1e6, 1),
                                   last_layer_us=round(statistics.median(r["last_lat"] for r in res) * 1e6, 1))
                        if tokens in raw and not gap:
                            row["baseline"], raw_s = raw[tokens]
                            row["ratio"] = round(raw_s / total, 3)
                            if tokens in nixl:
                                row["vs_nixl"] = round(nixl[tokens] / total, 3)
                        events = [e for r in res for e in r["events"]]
                        if events:
                            row["steps"] = _trace.breakdown(events, STEPS)
                        rows.append(row)
                        bar(f"request {x} {path} {tokens} gap {gap}")
                del layers
        finally:
            pair.close()
    return rows


def suite_request(smoke: bool, sizes: list[int], bar: Callable[[str], None]) -> list[dict[str, Any]]:
    """The ``request`` suite of ``python -m p2pkv.bench``: every transport this machine has.

    Two GPUs: NCCL and CUDA IPC across them beside raw NCCL; one GPU: CUDA IPC between two
    processes beside the hand-rolled IPC pipeline and NIXL; CPU: TCP and the shared-memory
    fast path. Every path, all at once and layer-wise (200 us apart).
    """
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    transports = ["nccl", "ipc"] if ngpu >= 2 else ["ipc"] if ngpu == 1 else ["tcp", "shm"]
    if ngpu >= 2:
        from ..transport.nccl import nccl_available

        if not nccl_available():
            transports = ["ipc"]
    tokens = [128] if smoke else ([512, 2048, 10000] if ngpu else [512, 2048])
    return bench_request(tokens, transports, reps=2 if smoke else 6, gaps_us=(200,), bar=bar)


def _parse_args(argv: list[str] | None, ngpu: int | None = None) -> Any:
    """The command line, with the defaults for this machine filled in (``ngpu``: CUDA devices, counted
    when None). Every bad value is a one-line usage error (exit 2) before any work starts."""
    import argparse

    if ngpu is None:
        ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0

    def ints(what: str, lo: int) -> Callable[[str], list[int]]:
        def parse(text: str) -> list[int]:
            try:
                vals = [int(v) for v in text.split(",") if v.strip()]
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
            if not vals or any(v < lo for v in vals):
                raise argparse.ArgumentTypeError(f"must be integers >= {lo}, got {text!r}")
            return vals
        return parse

    def choices(what: str, allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
        def parse(text: str) -> list[str]:
            vals = [v.strip() for v in text.split(",") if v.strip()]
            bad = [v for v in vals if v not in allowed]
            if not vals or bad:
                raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {text!r}")
            return vals
        return parse

    def positive(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
        return v

    def device_pair(text: str) -> tuple[str, str]:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 2 or not all(p == "cpu" or p.startswith("cuda") for p in parts):
            raise argparse.ArgumentTypeError(f"must be PRODUCER,CONSUMER (cpu or cuda:N), got {text!r}")
        for p in parts:
            if p.startswith("cuda"):
                try:
                    d = torch.device(p)
                except RuntimeError:
                    raise argparse.ArgumentTypeError(f"{p!r} is not a device") from None
                if (d.index or 0) >= ngpu:
                    raise argparse.ArgumentTypeError(f"{p} is not available here ({ngpu} CUDA devices)")
        if (parts[0] == "cpu") != (parts[1] == "cpu"):
            raise argparse.ArgumentTypeError("both sides must be cpu, or both cuda")
        return parts[0], parts[1]

    doc = (__doc__ or "").split("\n\n")[0].replace("\n", " ")
    ap = argparse.ArgumentParser(prog="python -m p2pkv.bench.request", description=doc)
    ap.add_argument("--tokens", type=ints("--tokens", 1), default=None,
                    help="comma-separated prompt lengths in tokens (default 512,2048,10000 with a GPU, else "
                         "512,2048)")
    ap.add_argument("--transports", type=choices("--transports", TRANSPORTS), default=None,
                    help="comma-separated: ipc, nccl, tcp, shm, auto (default: what this machine has)")
    ap.add_argument("--paths", type=choices("--paths", PATHS), default=None,
                    help=f"comma-separated: {', '.join(PATHS)} (default: all)")
    ap.add_argument("--reps", type=positive, default=6, help="timed requests per row, after 2 warm-ups (default 6)")
    ap.add_argument("--gaps", type=ints("--gaps", 1), default=[200],
                    help="layer-wise gaps between layers, in microseconds (default 200)")
    ap.add_argument("--devices", type=device_pair, default=None,
                    help="PRODUCER,CONSUMER devices (default: cuda:0,cuda:1 with two GPUs, cuda:0,cuda:0 with one, "
                         "else cpu,cpu)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON to this file")
    a = ap.parse_args(argv)
    if a.out is not None:
        if not a.out or os.path.isdir(a.out):
            ap.error(f"--out {a.out!r}: not a writable file path ({'empty' if not a.out else 'a folder'})")
        try:  # a file can be made there (root passes os.access checks that the file system then refuses)
            with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(a.out))):
                pass
        except OSError as exc:
            ap.error(f"--out {a.out!r}: not a writable file path ({exc.strerror or exc})")
    a.devices = a.devices or (("cuda:0", "cuda:1") if ngpu >= 2 else ("cuda:0", "cuda:0") if ngpu else ("cpu", "cpu"))
    a.transports = a.transports or (["nccl", "ipc"] if ngpu >= 2 else ["ipc"] if ngpu else ["tcp", "shm"])
    if a.tokens is None:
        a.tokens = [512, 2048, 10000] if ngpu else [512, 2048]
    gpu_only = [x for x in a.transports if x in ("ipc", "nccl")]
    if a.devices[0] == "cpu" and gpu_only:
        ap.error(f"--transports {','.join(gpu_only)} needs a GPU; this run is on the CPU (use tcp or shm)")
    return a


def main(argv: list[str] | None = None) -> int:
    """``python -m p2pkv.bench.request [--tokens 512,2048] [--transports ipc] [--out FILE]``."""
    import json

    a = _parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    rows = bench_request(a.tokens, a.transports, a.reps, tuple(a.gaps), paths=a.paths, devices=a.devices,
                         bar=lambda note: print("..", note, flush=True))
    for r in rows:
        steps = r.pop("steps", None)
        print(json.dumps(r))
        if steps:
            for k, v in steps.items():
                print(f"    {k:<34} p50 {v['p50_us']:>9} us  p90 {v['p90_us']:>9} us  (n={v['n']})")
            r["steps"] = steps
    if a.out is not None:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
