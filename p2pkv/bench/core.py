"""Benchmark driver: the suite registry, the command line, the table and the plot.

See :mod:`p2pkv.bench` for what each suite measures. A suite is a function
``(smoke, sizes, bar) -> rows`` registered in :data:`SUITES`; it is imported
only when it runs, so a suite may live in its own module of this package.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import importlib
import json
import multiprocessing as mp
import os
import platform
import re
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import __version__
from .._progress import Progress
from .._timing import cpu_times
from .._timing import gpu_time
from ..stats import percentile
from ..synthetic import PRESETS

__all__ = ["SUITES", "BadOption", "NothingToRun", "Suite", "check_sizes", "gpu_time", "main", "parse_size",
           "prepare_out_dir", "run"]

KiB, MiB, GiB = 2**10, 2**20, 2**30

Row = dict[str, Any]
Bar = Callable[[str], None]


# ----------------------------------------------------------------------------- suites
def _no_gpu() -> str | None:
    return None if torch.cuda.is_available() else "needs a CUDA GPU"


def _no_nccl() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    from ..transport.nccl import nccl_available

    return None if nccl_available() else "needs nccl4py (pip install 'p2pkv[cu13]')"


@dataclass(frozen=True)
class Suite:
    """One benchmark suite.

    Attributes
    ----------
    name:
        What ``--suite`` calls it.
    func:
        ``"module:function"`` (module relative to :mod:`p2pkv.bench`), imported
        when the suite runs; the function is ``(smoke, sizes, bar) -> list of rows``
        and calls ``bar(note)`` once per step.
    steps:
        ``(smoke, sizes) -> number of bar() calls`` (for the progress report).
    unavailable:
        ``() -> reason`` the suite cannot run on this machine, or ``None``.
    size_range:
        ``(smallest, largest)`` message size in bytes the suite measures, or ``None``
        when it does not take ``--sizes`` (its cases are fixed).
    """

    name: str
    func: str
    steps: Callable[[bool, list[int]], int]
    unavailable: Callable[[], str | None] = lambda: None
    size_range: tuple[int, int] | None = None

    def resolve(self) -> Callable[[bool, list[int], Bar], list[Row]]:
        """Import and return the suite's function."""
        module, _, name = self.func.partition(":")
        fn: Callable[[bool, list[int], Bar], list[Row]] = getattr(importlib.import_module(module, __package__), name)
        return fn


def _request_steps(smoke: bool, sizes: list[int]) -> int:
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    tokens = 1 if smoke else (3 if ngpu else 2)
    return tokens * (2 if ngpu >= 2 else 1) * 2 * 2  # x transports x (request, send) x (at once, layer-wise)


def _nccl_steps(smoke: bool, sizes: list[int]) -> int:
    two = torch.cuda.is_available() and torch.cuda.device_count() > 1
    return len(sizes) + 1 + (len(sizes) if two else 0)


#: Every suite, in the order ``--suite all`` runs them. To add one, write its
#: function (in a module of this package) and add a line here.
SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("tcp", ".core:bench_tcp", lambda smoke, sizes: len([x for x in sizes if x <= 256 * MiB]) + 1,
          size_range=(1, 256 * MiB)),
    Suite("pack", ".core:bench_pack", lambda smoke, sizes: 3 * len(_pack_tokens(smoke))),
    Suite("ipc", ".core:bench_ipc", lambda smoke, sizes: len([x for x in sizes if x >= 4 * KiB]), _no_gpu,
          size_range=(4 * KiB, 2 * GiB)),
    Suite("nccl", ".core:bench_nccl", _nccl_steps, _no_nccl, size_range=(1, 2 * GiB)),
    Suite("request", ".request:suite_request", _request_steps),
    Suite("recv", ".recv:suite_recv", lambda smoke, sizes: 1 if smoke else 2),
)}


# ----------------------------------------------------------------------------- environment
def env_info(argv: list[str]) -> dict[str, Any]:
    """The machine and the versions a result depends on (recorded in ``bench.json``)."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m p2pkv.bench " + " ".join(argv),
        "host": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    try:
        import zmq

        info["pyzmq"] = zmq.__version__
        info["libzmq"] = zmq.zmq_version()
    except Exception:
        pass
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda_runtime"] = torch.version.cuda
        try:
            import subprocess

            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except Exception:
            info["driver"] = None
        from ..transport.nccl import nccl_version

        info["nccl"] = nccl_version()
        try:
            import cupy

            info["cupy"] = cupy.__version__
        except Exception:
            info["cupy"] = None
    else:
        info["gpus"] = []
    return info




def _sizes(smoke: bool, big: bool) -> list[int]:
    if smoke:
        return [4 * KiB, 64 * KiB, 1 * MiB]
    s = [4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB]
    return [*s, 1 * GiB] if big else s


def _count_for(size: int, smoke: bool, budget: int) -> int:
    if smoke:
        return 8
    return max(8, min(2000, budget // max(size, 1)))


def _row(suite: str, what: str, size: int, **kw: Any) -> dict[str, Any]:
    r = {"suite": suite, "what": what, "bytes": size}
    r.update(kw)
    return r


def _lat(vals: list[float]) -> dict[str, float | None]:
    return {"p50_us": _us(percentile(vals, 50)), "p99_us": _us(percentile(vals, 99))}


def _us(x: float | None) -> float | None:
    return None if x is None else round(x * 1e6, 2)



_SIZE_RE = re.compile(r"(\d+)\s*(?:([kmg])(?:ib|b)?|b)?", re.IGNORECASE)
_SIZE_UNIT = {"": 1, "k": KiB, "m": MiB, "g": GiB}


def parse_size(text: str) -> int:
    """A message size in bytes: ``4096``, ``4K``, ``16M``, ``1G`` (powers of 1024, as in
    nccl-tests; ``KiB``/``KB`` spellings too).

    Raises
    ------
    ValueError
        If ``text`` is not such a size or is 0.
    """
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"invalid size {text!r}: expected bytes such as 4096, 4K, 16M or 1G")
    n = int(m.group(1)) * _SIZE_UNIT[(m.group(2) or "").lower()]
    if n <= 0:
        raise ValueError(f"invalid size {text!r}: must be at least 1 byte")
    return n


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({parse_size(x) for x in text.split(",") if x.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not sizes:
        raise argparse.ArgumentTypeError("expected at least one size, e.g. 4K,16M")
    return sizes


def _measure_push(eng: Any, cons: Any, tid: str, tensor: torch.Tensor, n: int, lat_n: int) -> tuple[float, list]:
    """Seconds to push ``n`` copies of ``tensor`` pipelined (until the last ack), then ``lat_n``
    one-at-a-time send->ack latencies; the remote consumer claims everything as it arrives."""
    from .. import TransferKey

    cons.start("claim_many", tid, n + lat_n + 1, timeout=120)
    eng.send(cons.address, TransferKey(tid, "0"), tensor).wait(60)  # warm: connection and credit
    t0 = time.perf_counter()
    hs = [eng.send(cons.address, TransferKey(tid, str(i + 1)), tensor) for i in range(n)]
    for h in hs:
        h.wait(120)
    elapsed = time.perf_counter() - t0
    lat = []
    for i in range(lat_n):
        t1 = time.perf_counter()
        eng.send(cons.address, TransferKey(tid, str(n + 1 + i)), tensor).wait(60)
        lat.append(time.perf_counter() - t1)
    cons.result(timeout=120)
    return elapsed, lat


# ----------------------------------------------------------------------------- TCP
def _zmq_server(q: Any, biggest: int) -> None:
    """The raw pyzmq baseline's server: acknowledges each pushed frame (read into one buffer), and
    answers ``[b"pull", size]`` with ``size`` bytes. One server serves every size of a run."""
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    q.put(port)
    buf = memoryview(bytearray(max(biggest, 1)))
    try:
        while True:
            ident = s.recv()
            hdr = s.recv()
            if hdr == b"stop":
                break
            if hdr == b"pull":
                size = int(s.recv())
                s.send_multipart([ident, b"d", buf[:size]], copy=size < 65536)
                continue
            s.recv_into(buf)
            s.send_multipart([ident, b"ack"])
    finally:
        s.close(0)
        ctx.term()


def bench_tcp(smoke: bool, sizes: list[int], bar: Bar) -> list[Row]:
    """Two processes on loopback: p2pkv push and pull vs raw pyzmq (sizes up to 256 MiB), plus a whole
    Llama-3-8B request sent layer by layer vs at once."""
    import zmq

    from .. import Engine, TransferKey
    from ..testing import RemoteEngine

    sizes = [x for x in sizes if x <= 256 * MiB]
    rows: list[Row] = []
    budget = 64 * MiB if smoke else 512 * MiB
    req_tokens = 256 if smoke else 2048
    req_bytes = PRESETS["llama3-8b"].bytes_per_token() * req_tokens
    pool = max(2 * req_bytes + 64 * MiB, 4 * max(sizes, default=0))
    cfg: dict[str, Any] = {"timeout_s": 120.0, "pool_bytes": pool, "credit_bytes": pool}
    ctx = mp.get_context("spawn")
    cons = RemoteEngine(**cfg)
    prod_remote = RemoteEngine(**cfg)
    # ---- the raw pyzmq baseline's server (same process layout: client here, server in a child)
    q = ctx.Queue()
    srv = ctx.Process(target=_zmq_server, args=(q, max(sizes, default=1)), daemon=True)
    srv.start()
    zc = zmq.Context()
    d = zc.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    try:
        d.connect(f"tcp://127.0.0.1:{q.get(timeout=120)}")
        with Engine(**cfg) as eng:
            eng.connect(cons.address)
            for size in sizes:
                n = _count_for(size, smoke, budget)
                lat_n = 8 if smoke else 50
                # ---- raw pyzmq baseline
                a = memoryview(bytearray(max(size, 1)))[:size]
                d.send_multipart([b"h", a])
                d.recv()
                t0 = time.perf_counter()
                for _ in range(n):
                    d.send(b"h", zmq.SNDMORE)
                    d.send(a, 0, copy=size < 65536)
                for _ in range(n):
                    d.recv()
                raw_bw = n * size / (time.perf_counter() - t0) / 1e9
                raw_lat = []
                for _ in range(lat_n):
                    t1 = time.perf_counter()
                    d.send(b"h", zmq.SNDMORE)
                    d.send(a, 0, copy=size < 65536)
                    d.recv()
                    raw_lat.append(time.perf_counter() - t1)
                pull_lat = []
                for _ in range(lat_n):
                    t1 = time.perf_counter()
                    d.send_multipart([b"pull", str(size).encode()])
                    d.recv_multipart()
                    pull_lat.append(time.perf_counter() - t1)
                rows.append(_row("tcp", "raw pyzmq push", size, gbps=raw_bw, **_lat(raw_lat)))
                rows.append(_row("tcp", "raw pyzmq request/reply", size, **_lat(pull_lat)))
                # ---- p2pkv push
                t = torch.zeros(size, dtype=torch.uint8)
                el, lat = _measure_push(eng, cons, f"push-{size}", t, n, lat_n)
                bw = n * size / el / 1e9
                rows.append(_row("tcp", "p2pkv push", size, gbps=bw, ratio=bw / raw_bw if raw_bw else None,
                                 baseline="raw pyzmq push", **_lat(lat)))
                # ---- p2pkv pull
                ptid = f"pull-{size}"
                m = max(1, min(n, lat_n * 2, pool // (2 * max(size, 1))))  # all published before the pulls
                prod_remote.call("publish_n", ptid, m, size, timeout=120)
                out = torch.empty(size, dtype=torch.uint8)
                plat = []
                t0 = time.perf_counter()
                for i in range(m):
                    t1 = time.perf_counter()
                    eng.pull(prod_remote.address, TransferKey(ptid, str(i)), out=out, timeout=60)
                    plat.append(time.perf_counter() - t1)
                pbw = m * size / (time.perf_counter() - t0) / 1e9
                rows.append(_row("tcp", "p2pkv pull", size, gbps=pbw, baseline="raw pyzmq request/reply",
                                 **_lat(plat)))
                bar(f"tcp {size}")
            # ---- a whole Llama-3-8B request: layer-wise pipelined vs at once
            p = PRESETS["llama3-8b"]
            tokens = req_tokens
            shape = p.layer_shape(tokens)
            layer_bytes = 2 * int(torch.tensor(shape).prod())
            layers = [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(p.layers)]
            cons.start("claim_many", "req-lw", p.layers, timeout=120)
            t0 = time.perf_counter()
            hs = [eng.send(cons.address, TransferKey("req-lw", str(i)), x) for i, x in enumerate(layers)]
            for h in hs:
                h.wait(120)
            lw = time.perf_counter() - t0
            cons.result(timeout=120)
            whole = torch.cat([x.reshape(-1) for x in layers])
            cons.start("claim_many", "req-all", 1, timeout=120)
            t0 = time.perf_counter()
            eng.send(cons.address, TransferKey("req-all", "0"), whole).wait(120)
            at_once = time.perf_counter() - t0
            cons.result(timeout=120)
            total = layer_bytes * p.layers
            rows.append(_row("tcp", f"llama3-8b request {tokens} tok, layer-wise", total, seconds=lw,
                             gbps=total / lw / 1e9))
            rows.append(_row("tcp", f"llama3-8b request {tokens} tok, at once", total, seconds=at_once,
                             gbps=total / at_once / 1e9))
            bar("tcp request")
    finally:
        try:
            d.send(b"stop", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        d.close(0)
        zc.term()
        srv.join(10)
        if srv.is_alive():
            srv.kill()
        cons.close()
        prod_remote.close()
    return rows



# ----------------------------------------------------------------------------- pack
def _pack_tokens(smoke: bool) -> list[int]:
    if torch.cuda.is_available():
        return [128, 4096] if smoke else [128, 512, 2048, 4096, 16384, 65536, 131072]
    return [128, 1024] if smoke else [128, 512, 2048, 4096, 16384]


def bench_pack(smoke: bool, sizes: list[int], bar: Bar) -> list[Row]:
    """Pack/unpack of every preset's KV layout vs ``index_select``/``index_copy_`` and a plain copy.

    On a GPU the CUDA kernels are timed with CUDA events (``gpu us``, plus the
    host's issue time); without one the torch fallback is timed on the CPU
    (``host us`` is then the whole call, on one thread, with its spread; a timing whose spread
    exceeds its median is marked noisy and nothing is derived from it). ``sizes`` is not used: the
    cases are token counts of real models' layouts.
    """
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rows: list[Row] = []
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        # One thread: with several, each call waits for torch's worker threads to get a CPU, and on
        # a shared machine that wait (milliseconds) is most of what would be timed.
        torch.set_num_threads(1)
    try:
        for pname in ("llama3-8b", "llama3-70b-tp8", "deepseek-mla"):
            for tokens in _pack_tokens(smoke):
                rows.extend(_pack_case(pname, tokens, dev))
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                bar(f"pack {pname} {tokens}")
    finally:
        torch.set_num_threads(threads)
    return rows


def _pack_case(pname: str, tokens: int, dev: torch.device) -> list[Row]:
    from ..kernels import BlockIds, pack, pack_layers, unpack

    gpu = dev.type == "cuda"
    backend = "cuda" if gpu else "torch"
    p = PRESETS[pname]
    nblk = (tokens + p.block_size - 1) // p.block_size
    total_blocks = nblk * 2 + 7
    if p.kv_planes == 2:
        cache = torch.empty((2, total_blocks, p.block_size, p.kv_heads, p.head_size), dtype=torch.bfloat16,
                            device=dev).transpose(0, 1)
    else:
        cache = torch.empty((total_blocks, p.block_size, p.head_size), dtype=torch.bfloat16, device=dev)
    cache.view(torch.int16).random_()
    ids = BlockIds(torch.randperm(total_blocks)[:nblk].tolist(), total_blocks, dev)
    ids_idx = ids.on_device() if gpu else ids.host
    out = pack(cache, ids)
    nbytes = out.numel() * out.element_size()
    src = torch.empty_like(out)
    reps = (10 if nbytes > 256 * MiB else 30) if gpu else (5 if nbytes > 16 * MiB else 20)

    def timed(fn: Callable[[], Any], n: int = reps) -> dict[str, Any]:
        """gpu_us and host_us on a GPU; on the CPU host_us (the whole call: the median of ``n``
        calls), spread_us (their p90 - p10) and noisy (the spread exceeds the median); plus the
        seconds used."""
        if gpu:
            g, h = gpu_time(fn, n)
            return {"gpu_us": _us(g), "host_us": _us(h), "_s": g}
        times = cpu_times(fn, n)
        med = statistics.median(times)
        spread = (percentile(times, 90) or 0.0) - (percentile(times, 10) or 0.0)
        return {"host_us": _us(med), "spread_us": _us(spread), "noisy": spread > med, "_s": med}

    def row(what: str, size: int, t: dict[str, Any], *bases: dict[str, Any], **kw: Any) -> Row:
        """A row; figures derived from a noisy timing are left out (noise is not a result): all of
        them when its own timing is noisy, the ratios and speedups when a baseline's in ``bases`` is."""
        if t.get("noisy"):
            kw = {k: (None if k in _DERIVED else v) for k, v in kw.items()}
        elif any(b.get("noisy") for b in bases):
            kw = {k: (None if k in _DERIVED and k != "gbps_rw" else v) for k, v in kw.items()}
        return _row("pack", what, size, preset=pname, tokens=tokens, backend=backend,
                    **{k: v for k, v in t.items() if k not in ("_s", "noisy")}, **kw,
                    **({"noisy": True} if t.get("noisy") else {}))

    t_copy = timed(lambda: out.copy_(src))
    t_is = timed(lambda: torch.index_select(cache, 0, ids_idx, out=out))
    t_pk = timed(lambda: pack(cache, ids, out=out, backend=backend))
    t_up = timed(lambda: unpack(out, cache, ids, backend=backend))
    t_ic = timed(lambda: cache.index_copy_(0, ids_idx, out))

    def rw(t: dict[str, Any], size: int = nbytes) -> float:
        return size * 2 / t["_s"] / 1e9  # bytes read + written

    rows = [
        row("copy (baseline)", nbytes, t_copy, gbps_rw=rw(t_copy)),
        row("torch index_select", nbytes, t_is, gbps_rw=rw(t_is)),
        row("p2pkv pack", nbytes, t_pk, t_copy, t_is, gbps_rw=rw(t_pk), ratio_to_copy=t_copy["_s"] / t_pk["_s"],
            speedup_vs_index_select=t_is["_s"] / t_pk["_s"]),
        row("torch index_copy_", nbytes, t_ic, gbps_rw=rw(t_ic)),
        row("p2pkv unpack", nbytes, t_up, t_copy, t_ic, gbps_rw=rw(t_up), ratio_to_copy=t_copy["_s"] / t_up["_s"],
            speedup_vs_index_copy=t_ic["_s"] / t_up["_s"]),
    ]
    if tokens <= (16384 if gpu else 1024):
        # On the CPU, and for big GPU cases, every "layer" is the same tensor: the timing is the same.
        layers = [cache] * p.layers if (not gpu or nbytes * p.layers > 8 * GiB) else \
            [torch.empty_like(cache) for _ in range(p.layers)]
        allout = torch.empty((p.layers, *out.shape), dtype=out.dtype, device=dev)

        def per_layer() -> None:
            for li, layer in enumerate(layers):
                torch.index_select(layer, 0, ids_idx, out=allout[li])

        t_b = timed(lambda: pack_layers(layers, ids, out=allout, backend=backend), 5)
        t_pl = timed(per_layer, 5)
        # One launch vs L launches: on a GPU the slower of device and host time bounds each.
        slow_b = max(t_b["_s"], (t_b.get("host_us") or 0) / 1e6)
        slow_pl = max(t_pl["_s"], (t_pl.get("host_us") or 0) / 1e6)
        rows.append(row(f"pack_layers, {p.layers} layers", nbytes * p.layers, t_b, t_pl,
                        gbps_rw=rw(t_b, nbytes * p.layers), speedup_vs_index_select=slow_pl / slow_b))
        rows.append(row(f"index_select x{p.layers}", nbytes * p.layers, t_pl, gbps_rw=rw(t_pl, nbytes * p.layers)))
    return rows


_DERIVED = ("gbps_rw", "ratio_to_copy", "speedup_vs_index_select", "speedup_vs_index_copy")




# ----------------------------------------------------------------------------- IPC
def bench_ipc(smoke: bool, sizes: list[int], bar: Bar) -> list[Row]:
    """Two processes on one GPU over CUDA IPC vs a same-size device copy."""
    from .. import Engine
    from ..testing import RemoteEngine

    sizes = [x for x in sizes if x >= 4 * KiB]
    rows: list[Row] = []
    if not sizes:
        return rows
    biggest = max(sizes)
    pool = max(512 * MiB, 3 * biggest + 64 * MiB)
    cfg: dict[str, Any] = {"device": "cuda", "transport": "ipc", "timeout_s": 120.0, "pool_bytes": pool,
                           "credit_bytes": pool}
    cons = RemoteEngine(**cfg)
    budget = 256 * MiB if smoke else 4 * GiB
    try:
        with Engine(**cfg) as eng:
            eng.connect(cons.address)
            for size in sizes:
                n = _count_for(size, smoke, budget)
                n = min(n, 200)
                src = torch.empty(size, dtype=torch.uint8, device=eng.device)
                dst = torch.empty_like(src)
                g_copy, _ = gpu_time(functools.partial(dst.copy_, src), 10 if size >= 256 * MiB else 30)
                copy_bw = size / g_copy / 1e9
                rows.append(_row("ipc", "copy (baseline)", size, gbps=copy_bw, gpu_us=_us(g_copy)))
                buf = eng.alloc_buffer(size)
                for variant, tensor in (("p2pkv push, pool buffer", buf.data), ("p2pkv push, staged", src)):
                    el, lat = _measure_push(eng, cons, f"{variant[:20]}-{size}", tensor, n, 5 if smoke else 30)
                    bw = n * size / el / 1e9
                    rows.append(_row("ipc", variant, size, gbps=bw, ratio=bw / copy_bw,
                                     baseline="device copy", **_lat(lat)))
                g_ipc = cons.call("ipc_copy_gpu_time", size, 10 if size >= 256 * MiB else 30, timeout=120)
                rows.append(_row("ipc", "p2pkv IPC copy only (GPU time)", size, gbps=size / g_ipc / 1e9,
                                 gpu_us=_us(g_ipc), ratio=g_copy / g_ipc, baseline="device copy"))
                buf.release()
                bar(f"ipc {size}")
    finally:
        cons.close()
    return rows


# ----------------------------------------------------------------------------- NCCL
def bench_nccl(smoke: bool, sizes: list[int], bar: Bar) -> list[Row]:
    """p2pkv's NCCL path vs raw NCCL (one rank; with two GPUs also two processes)."""
    from ..transport.nccl import Comm, new_unique_id

    rows: list[Row] = []
    import nccl.core as nc

    dev = torch.device("cuda", torch.cuda.current_device())
    # raw nccl4py one-rank communicator (public API), the baseline
    raw = nc.Communicator.init(1, 0, nc.get_unique_id())
    comm = Comm(1, 0, new_unique_id(), dev, deadline=time.monotonic() + 60)
    while comm.poll() == "init":
        time.sleep(0.005)
    s = torch.cuda.current_stream(dev)
    for size in sizes:
        a = torch.empty(size, dtype=torch.uint8, device=dev)
        b = torch.empty_like(a)
        reps = 10 if size >= 256 * MiB else 30
        g_raw, h_raw = gpu_time(functools.partial(_raw_send_recv, nc, raw, a, b, s.cuda_stream), reps)
        g_p, h_p = gpu_time(functools.partial(comm.send_recv, a, b, s), reps)
        rows.append(_row("nccl", "raw nccl4py send/recv (1 rank)", size, gbps=size / g_raw / 1e9,
                         gpu_us=_us(g_raw), host_us=_us(h_raw)))
        rows.append(_row("nccl", "p2pkv Comm send/recv (1 rank)", size, gbps=size / g_p / 1e9, gpu_us=_us(g_p),
                         host_us=_us(h_p), ratio=g_raw / g_p, added_host_us=_us(h_p - h_raw),
                         baseline="raw nccl4py"))
        bar(f"nccl {size}")
    comm.abort()
    raw.destroy()
    rows.extend(_bench_engine_nccl_loopback(smoke, sizes, bar))
    if torch.cuda.device_count() >= 2:
        rows.extend(bench_nccl_two_gpus(smoke, sizes, bar))
    return rows


def _raw_send_recv(nc: Any, raw: Any, a: torch.Tensor, b: torch.Tensor, stream: int) -> None:
    nc.group_start()
    raw.send(a, 0, stream=stream)
    raw.recv(b, 0, stream=stream)
    nc.group_end()


def _bench_engine_nccl_loopback(smoke: bool, sizes: list[int], bar: Bar) -> list[Row]:
    """The whole engine path (header, credit-free loopback, completion, deliver) on one GPU."""
    from .. import Engine, TransferKey

    rows: list[Row] = []
    with Engine(device="cuda", transport="nccl", timeout_s=120.0, pool_bytes=max(512 * MiB, 2 * max(sizes))) as e:
        for size in sizes:
            t = torch.empty(size, dtype=torch.uint8, device=e.device)
            n = 8 if smoke else 30
            lat = []
            for i in range(n + 2):
                t1 = time.perf_counter()
                e.send(e.address, TransferKey(f"lb-{size}", str(i)), t).wait(60)
                with e.claim(TransferKey(f"lb-{size}", str(i))):
                    pass
                if i >= 2:
                    lat.append(time.perf_counter() - t1)
            rows.append(_row("nccl", "p2pkv engine send->claim (loopback)", size, **_lat(lat)))
    bar("nccl engine loopback")
    return rows


def _dist_p2p(dist: Any, x: torch.Tensor, rank: int) -> None:
    work = dist.isend(x, 1) if rank == 0 else dist.irecv(x, 0)
    if work is not None:
        work.wait()


def _two_gpu_worker(rank: int, port: int, sizes: list[int], reps: int, q: Any) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    out: dict[str, Any] = {}
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for size in sizes:
        x = torch.empty(size, dtype=torch.uint8, device="cuda")
        for _ in range(3):
            _dist_p2p(dist, x, rank)
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            _dist_p2p(dist, x, rank)
        torch.cuda.synchronize()
        out[f"torch.distributed:{size}"] = (time.perf_counter() - t0) / reps
    try:
        from cupy.cuda import nccl as cnccl

        uid = cnccl.get_unique_id() if rank == 0 else None
        obj = [uid]
        dist.broadcast_object_list(obj, 0)
        c = cnccl.NcclCommunicator(2, obj[0], rank)
        s = torch.cuda.current_stream().cuda_stream
        for size in sizes:
            x = torch.empty(size, dtype=torch.uint8, device="cuda")
            op = functools.partial(c.send if rank == 0 else c.recv, x.data_ptr(), size, cnccl.NCCL_UINT8,
                                   1 - rank, s)
            for _ in range(3):
                op()
            torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                op()
            torch.cuda.synchronize()
            out[f"cupy nccl:{size}"] = (time.perf_counter() - t0) / reps
    except Exception as exc:
        out["cupy_error"] = repr(exc)
    dist.destroy_process_group()
    q.put((rank, out))


def bench_nccl_two_gpus(smoke: bool, sizes: list[int], bar: Bar) -> list[Row]:
    from .. import Engine, TransferKey
    from ..testing import RemoteEngine

    rows: list[Row] = []
    reps = 5 if smoke else 20
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    procs = [ctx.Process(target=_two_gpu_worker, args=(r, port, sizes, reps, q), daemon=True) for r in (0, 1)]
    for pr in procs:
        pr.start()
    res = dict(q.get(timeout=600) for _ in procs)
    for pr in procs:
        pr.join(30)
    base = res[1]
    cfg: dict[str, Any] = {"transport": "nccl", "timeout_s": 120.0, "pool_bytes": max(512 * MiB, 3 * max(sizes))}
    cons = RemoteEngine(**cfg, device="cuda:1")
    try:
        with Engine(**cfg, device="cuda:0") as e:
            e.connect(cons.address)
            for size in sizes:
                t = torch.empty(size, dtype=torch.uint8, device=e.device)
                tid = f"mg-{size}"
                cons.start("claim_many", tid, reps + 3 + reps, timeout=300)
                for i in range(3):
                    e.send(cons.address, TransferKey(tid, str(i)), t).wait(120)
                t0 = time.perf_counter()
                hs = [e.send(cons.address, TransferKey(tid, str(3 + i)), t) for i in range(reps)]
                for h in hs:
                    h.wait(120)
                per = (time.perf_counter() - t0) / reps
                lat = []
                for i in range(reps):
                    t1 = time.perf_counter()
                    e.send(cons.address, TransferKey(tid, str(3 + reps + i)), t).wait(120)
                    lat.append(time.perf_counter() - t1)
                cons.result(timeout=300)
                raw = base.get(f"cupy nccl:{size}")
                td = base.get(f"torch.distributed:{size}")
                if raw:
                    rows.append(_row("nccl 2 GPUs", "raw CuPy NCCL send/recv", size, gbps=size / raw / 1e9,
                                     per_op_us=_us(raw)))
                if td:
                    rows.append(_row("nccl 2 GPUs", "torch.distributed isend/irecv", size, gbps=size / td / 1e9,
                                     per_op_us=_us(td)))
                rows.append(_row("nccl 2 GPUs", "p2pkv push over NCCL", size, gbps=size / per / 1e9,
                                 per_op_us=_us(per), ratio=(raw / per) if raw else None,
                                 added_us=_us(per - raw) if raw else None, baseline="raw CuPy NCCL", **_lat(lat)))
                bar(f"nccl2 {size}")
    finally:
        cons.close()
    return rows

# ----------------------------------------------------------------------------- table
#: (header, how to read it from a row); a column is printed only where some row of the suite has a value.
_COLUMNS: list[tuple[str, Callable[[Row], Any]]] = [
    ("case", lambda r: f"{r['preset']} {r['tokens']}tok" if "preset" in r else None),
    ("size", lambda r: _fmt_size(r["bytes"])),
    ("GB/s", lambda r: r.get("gbps")),
    ("GB/s r+w", lambda r: r.get("gbps_rw")),
    ("p50 us", lambda r: r.get("p50_us")),
    ("p99 us", lambda r: r.get("p99_us")),
    ("op us", lambda r: r.get("per_op_us")),
    ("gpu us", lambda r: r.get("gpu_us")),
    ("host us", lambda r: _noisy_mark(r, r.get("host_us", r.get("host_us_p50")))),
    ("spread", lambda r: r.get("spread_us")),
    ("ms", lambda r: r.get("ms")),
    ("last us", lambda r: r.get("last_layer_us")),
    ("seconds", lambda r: r.get("seconds")),
    ("ratio", lambda r: r.get("ratio", r.get("ratio_to_copy"))),
    ("speedup", lambda r: r.get("speedup_vs_index_select", r.get("speedup_vs_index_copy"))),
    ("+us", lambda r: r.get("added_host_us", r.get("added_us"))),
]
_NOTES = {
    "GB/s r+w": "GB/s r+w counts bytes read and written",
    "ratio": "ratio: p2pkv's speed / its baseline's (1.0 = as fast)",
    "speedup": "speedup: p2pkv's kernel vs torch's index_select / index_copy_ (all layers vs one per layer)",
    "host us": "host us: time the host spent issuing the call (on a CPU: the whole call, median)",
    "spread": "spread: p90 - p10 of the timed calls, us\n"
              "* after host us: the spread exceeds the median: noise, not a result (no GB/s, ratio, speedup)",
    "+us": "+us: host or per-operation time p2pkv adds to its baseline",
    "ms": "ms: a whole request, first send until the receiving process holds every layer (median)",
    "last us": "last us: layer-wise, from the last layer becoming ready until the receiver holds it",
}
TABLE_WIDTH = 100


def format_table(rows: list[Row], width: int = TABLE_WIDTH) -> list[str]:
    """The results as text lines, one section per suite, at most ``width`` columns wide.

    Only the columns some row of a section measured are shown; the baselines
    that ``ratio`` refers to are listed under each section.
    """
    lines: list[str] = []
    suites: dict[str, list[Row]] = {}
    for r in rows:
        suites.setdefault(r["suite"], []).append(r)
    for suite, rs in suites.items():
        cols = []
        for header, get in _COLUMNS:
            cells = [_f(get(r)) for r in rs]
            if any(c != "-" for c in cells):
                cols.append((header, cells, max(len(header), *map(len, cells))))
        fixed = sum(w + 1 for _, _, w in cols)
        what_w = max(12, min(max(len(r["what"]) for r in rs), width - fixed))
        lines.append("")
        lines.append(f"== {suite} ==")
        lines.append(f"{'what':<{what_w}}" + "".join(f" {h:>{w}}" for h, _, w in cols))
        for i, r in enumerate(rs):
            what = r["what"] if len(r["what"]) <= what_w else r["what"][:what_w - 1] + "~"
            lines.append(f"{what:<{what_w}}" + "".join(f" {cells[i]:>{w}}" for _, cells, w in cols))
        shown = {h for h, _, _ in cols}
        ratio = dict(_COLUMNS)["ratio"]
        baselines = sorted({(r["what"], r["baseline"]) for r in rs if r.get("baseline") and ratio(r) is not None})
        for what, base in baselines:
            lines.append(f"  ratio of {what!r}: vs {base!r}"[:width])
        lines.extend(f"  {note}"[:width] for h in _NOTES if h in shown for note in _NOTES[h].splitlines())
    return lines


def _noisy_mark(r: Row, x: Any) -> Any:
    return f"{_f(x)}*" if r.get("noisy") and x is not None else x


def _f(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def _fmt_size(n: int) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div:
            return f"{n / div:.4g}{unit}"
    return f"{n}B"


# ----------------------------------------------------------------------------- plot
def _plot(rows: list[Row], path: str) -> str | None:
    """Write the bandwidth plot; return why it was not written, or ``None``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'p2pkv[bench]')"
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        gb = r.get("gbps")
        if gb is None or r["suite"] == "pack" or "request" in r["what"]:
            continue
        series.setdefault(f"{r['suite']}: {r['what']}", []).append((r["bytes"], gb))
    if not series:
        return "no bandwidth was measured at several sizes"
    fig, ax = plt.subplots(figsize=(10, 6))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                linestyle="--" if ("raw" in name or "baseline" in name or "copy" in name) else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bandwidth (GB/s)")
    ax.set_title("p2pkv bandwidth vs message size (dashed: baselines)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------- driver
class NothingToRun(Exception):
    """Every requested suite is unavailable on this machine; nothing was measured or written."""


class BadOption(ValueError):
    """An option cannot work (a size no requested suite measures, an output folder that cannot be
    written); found before anything ran. The message is one line, naming the option."""


def check_sizes(suites: list[Suite], sizes: list[int]) -> None:
    """Raise :class:`BadOption` when a size given with ``--sizes`` would not be measured by one of
    ``suites`` (a size is never dropped silently), or when none of them takes sizes."""
    takers = [s for s in suites if s.size_range is not None]
    if not takers:
        names = ", ".join(s.name for s in suites)
        raise BadOption(f"--sizes: the {names} suite(s) do not take message sizes (tcp, ipc and nccl do)")
    for s in takers:
        assert s.size_range is not None
        lo, hi = s.size_range
        bad = [x for x in sizes if not lo <= x <= hi]
        if bad:
            raise BadOption(f"--sizes {_fmt_size(bad[0])}: the {s.name} suite measures sizes from "
                            f"{_fmt_size(lo)} to {_fmt_size(hi)}; leave it out (--suite) or give sizes in that range")


def prepare_out_dir(out_dir: str) -> None:
    """Create ``out_dir`` if needed and check that bench.json can be written there, before any
    suite runs; raise :class:`BadOption` naming the folder and why otherwise."""
    if not out_dir or not out_dir.strip():
        raise BadOption("--out: an empty path; give a folder, e.g. --out bench-results")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise BadOption(f"--out {out_dir}: exists and is not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise BadOption(f"--out {out_dir}: cannot create the folder: {exc.strerror or exc}") from None
    for name in ("bench.json", "bench.png"):
        if os.path.isdir(os.path.join(out_dir, name)):
            raise BadOption(f"--out {out_dir}: {name} there is a folder, so the results cannot be written")
    probe = os.path.join(out_dir, f".bench-write-test-{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise BadOption(f"--out {out_dir}: cannot write there: {exc.strerror or exc}") from None


def run(suites: list[str], smoke: bool = False, out_dir: str = "bench-results", sizes: list[int] | None = None,
        big: bool = False, argv: list[str] | None = None) -> dict[str, Any]:
    """Run ``suites`` and write ``bench.json`` (and ``bench.png``) into ``out_dir``.

    Returns
    -------
    dict
        ``meta`` (machine and versions), ``skipped_suites`` (name -> reason),
        ``results`` (rows), ``plot`` (the PNG's path or ``None``) and
        ``no_plot`` (why no PNG was written, or ``None``).

    Raises
    ------
    KeyError
        An unknown suite name.
    NothingToRun
        Every suite is unavailable here; ``out_dir`` is left as it was.
    BadOption
        A size in ``sizes`` that a suite to run does not measure, or an ``out_dir`` that cannot
        be written; found before any suite runs.
    """
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    chosen = [SUITES[s] for s in suites]
    skipped = {s.name: reason for s in chosen if (reason := s.unavailable()) is not None}
    todo = [s for s in chosen if s.name not in skipped]
    if not todo:
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise NothingToRun(f"every requested suite is unavailable here ({why}); nothing was written")
    if sizes:
        check_sizes(todo, sizes)
    prepare_out_dir(out_dir)
    info = env_info(argv or [])
    sz = sizes or _sizes(smoke, big)
    prog = Progress(sum(s.steps(smoke, sz) for s in todo), "bench", every_step=True)
    rows: list[Row] = []
    json_path, png_path = os.path.join(out_dir, "bench.json"), os.path.join(out_dir, "bench.png")
    if os.path.exists(png_path):
        os.remove(png_path)  # an older run's plot must not sit beside this run's numbers

    def save() -> dict[str, Any]:
        result = {"meta": info, "skipped_suites": skipped, "results": rows}
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, json_path)
        return result

    try:
        for s in todo:
            rows += s.resolve()(smoke, sz, lambda note: prog.update(1, note))
            save()  # partial results survive a later suite's failure
    finally:
        prog.close()
    result = save()
    result["no_plot"] = _plot(rows, png_path)
    result["plot"] = None if result["no_plot"] else png_path
    result["json"] = json_path
    return result


def _parse_suites(text: str) -> list[str]:
    names = list(SUITES) if text.strip() == "all" else [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SUITES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown suite(s) {', '.join(bad) or repr(text)}; "
                                         f"choose from {', '.join(SUITES)} or all")
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    """The ``p2pkv-bench`` command; returns its exit status (2: bad input or nothing to run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(
        prog="p2pkv-bench", description="p2pkv microbenchmarks, each beside its baseline (see docs/benchmarks.md).")
    ap.add_argument("--suite", type=_parse_suites, default=list(SUITES), metavar="NAMES",
                    help=f"comma-separated suites: {', '.join(SUITES)} or all (default: all; those this machine "
                         "cannot run are skipped)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and counts: seconds, as CI runs it")
    ap.add_argument("--big", action="store_true", help="also 1 GiB messages")
    ap.add_argument("--sizes", type=_parse_sizes, default=None, metavar="BYTES",
                    help="comma-separated message sizes in bytes for the tcp (up to 256M), ipc (4K..2G) "
                         "and nccl (up to 2G) suites; K, M, G suffixes are powers of 1024 "
                         "(e.g. 4K,16M,1G; default 4K..256M)")
    ap.add_argument("--out", default="bench-results", metavar="DIR",
                    help="folder for bench.json and bench.png (default: bench-results)")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    a = ap.parse_args(argv)
    try:
        res = run(a.suite, a.smoke, a.out, a.sizes, a.big, argv)
    except NothingToRun as exc:
        print(f"{ap.prog}: error: {exc}", file=sys.stderr)
        return 2
    except BadOption as exc:
        ap.error(str(exc))
    m = res["meta"]
    gpus = ", ".join(m.get("gpus") or []) or "none"
    print(f"p2pkv bench {m['date']}  torch {m['torch']}  GPUs: {gpus}"
          + (f"  driver {m['driver']}  NCCL {m['nccl']}" if m.get("gpus") else ""))
    for name, reason in res["skipped_suites"].items():
        print(f"skipped {name}: {reason}")
    print("\n".join(format_table(res["results"])))
    print(f"\nwrote {res['json']}")
    if res["plot"]:
        print(f"wrote {res['plot']}")
    else:
        print(f"no bench.png: {res['no_plot']}")
    return 0
