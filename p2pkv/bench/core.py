"""Benchmark driver: see :mod:`p2pkv.bench` for the suites."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import socket
import sys
import time
from typing import Any, Callable

import torch

from .._progress import Progress
from ..stats import percentile
from ..synthetic import PRESETS

KiB, MiB, GiB = 2**10, 2**20, 2**30
SUITES = ("tcp", "pack", "ipc", "nccl")


# ----------------------------------------------------------------------------- environment
def env_info(argv: list[str]) -> dict[str, Any]:
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
    return s + [1 * GiB] if big else s


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
def _zmq_server(q, n_total: int, size: int) -> None:
    import numpy as np
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    q.put(port)
    buf = np.empty(max(size, 1), np.uint8)
    try:
        while True:
            ident = s.recv()
            hdr = s.recv()
            if hdr == b"stop":
                break
            if hdr == b"pull":
                s.send_multipart([ident, b"d", buf[:size]], copy=size < 65536)
                continue
            s.recv_into(buf)
            s.send_multipart([ident, b"ack"])
    finally:
        s.close(0)
        ctx.term()


def bench_tcp(smoke: bool, sizes: list[int], bar: Callable[[str], None]) -> list[dict[str, Any]]:
    import numpy as np
    import zmq

    from .. import Engine, TransferKey
    from ..testing import RemoteEngine

    rows: list[dict[str, Any]] = []
    budget = 64 * MiB if smoke else 512 * MiB
    req_tokens = 256 if smoke else 2048
    req_bytes = PRESETS["llama3-8b"].bytes_per_token() * req_tokens
    pool = max(2 * req_bytes + 64 * MiB, 4 * max(sizes))
    cfg = dict(timeout_s=120.0, pool_bytes=pool, credit_bytes=pool)
    ctx = mp.get_context("spawn")
    cons = RemoteEngine(**cfg)
    prod_remote = RemoteEngine(**cfg)
    try:
        with Engine(**cfg) as eng:
            eng.connect(cons.address)
            for size in sizes:
                n = _count_for(size, smoke, budget)
                lat_n = 8 if smoke else 50
                # ---- raw pyzmq baseline (same process layout: client here, server in a child)
                q = ctx.Queue()
                srv = ctx.Process(target=_zmq_server, args=(q, n, size), daemon=True)
                srv.start()
                port = q.get(timeout=60)
                zc = zmq.Context()
                d = zc.socket(zmq.DEALER)
                d.setsockopt(zmq.LINGER, 0)
                d.connect(f"tcp://127.0.0.1:{port}")
                a = np.zeros(max(size, 1), np.uint8)[:size]
                d.send_multipart([b"h", a])
                d.recv()
                t0 = time.perf_counter()
                for _ in range(n):
                    d.send(b"h", zmq.SNDMORE)
                    d.send(a, copy=size < 65536)
                for _ in range(n):
                    d.recv()
                raw_bw = n * size / (time.perf_counter() - t0) / 1e9
                raw_lat = []
                for _ in range(lat_n):
                    t1 = time.perf_counter()
                    d.send(b"h", zmq.SNDMORE)
                    d.send(a, copy=size < 65536)
                    d.recv()
                    raw_lat.append(time.perf_counter() - t1)
                pull_lat = []
                for _ in range(lat_n):
                    t1 = time.perf_counter()
                    d.send(b"pull")
                    d.recv_multipart()
                    pull_lat.append(time.perf_counter() - t1)
                d.send(b"stop")
                d.close(0)
                zc.term()
                srv.join(10)
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
        cons.close()
        prod_remote.close()
    return rows


# ----------------------------------------------------------------------------- GPU timing
def gpu_time(fn: Callable[[], Any], reps: int = 20, warmup: int = 3) -> tuple[float, float]:
    """(GPU seconds per call, host seconds per call).

    GPU time is measured with CUDA events around ``reps`` calls queued behind a
    sleep kernel, so host launch cost does not leak into it; host time is the
    wall time of issuing the calls.
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


def bench_pack(smoke: bool, bar: Callable[[str], None]) -> list[dict[str, Any]]:
    from ..kernels import BlockIds, pack, pack_layers, unpack

    rows: list[dict[str, Any]] = []
    token_counts = [128, 4096] if smoke else [128, 512, 2048, 4096, 16384, 65536, 131072]
    dev = torch.device("cuda", torch.cuda.current_device())
    for pname in ("llama3-8b", "llama3-70b-tp8", "deepseek-mla"):
        p = PRESETS[pname]
        for tokens in token_counts:
            nblk = (tokens + p.block_size - 1) // p.block_size
            total_blocks = nblk * 2 + 7
            if p.kv_planes == 2:
                cache = torch.empty((2, total_blocks, p.block_size, p.kv_heads, p.head_size), dtype=torch.bfloat16,
                                    device=dev).transpose(0, 1)
            else:
                cache = torch.empty((total_blocks, p.block_size, p.head_size), dtype=torch.bfloat16, device=dev)
            cache.view(torch.int16).random_()
            ids_list = torch.randperm(total_blocks)[:nblk].tolist()
            ids = BlockIds(ids_list, total_blocks, dev)
            ids_dev = ids.on_device()
            out = pack(cache, ids)
            nbytes = out.numel() * out.element_size()
            src = torch.empty_like(out)
            reps = 10 if nbytes > 256 * MiB else 30
            g_copy, _ = gpu_time(lambda: out.copy_(src), reps)
            g_is, h_is = gpu_time(lambda: torch.index_select(cache, 0, ids_dev, out=out), reps)
            g_pk, h_pk = gpu_time(lambda: pack(cache, ids, out=out, backend="cuda"), reps)
            g_up, h_up = gpu_time(lambda: unpack(out, cache, ids, backend="cuda"), reps)
            g_ic, _ = gpu_time(lambda: cache.index_copy_(0, ids_dev, out), reps)
            bw = lambda g: nbytes * 2 / g / 1e9  # bytes read + written  # noqa: E731
            base = dict(preset=pname, tokens=tokens)
            rows.append(_row("pack", "device copy (baseline)", nbytes, gpu_us=_us(g_copy), gbps_rw=bw(g_copy), **base))
            rows.append(_row("pack", "torch index_select", nbytes, gpu_us=_us(g_is), host_us=_us(h_is),
                             gbps_rw=bw(g_is), **base))
            rows.append(_row("pack", "p2pkv pack", nbytes, gpu_us=_us(g_pk), host_us=_us(h_pk), gbps_rw=bw(g_pk),
                             ratio_to_copy=g_copy / g_pk, speedup_vs_index_select=g_is / g_pk, **base))
            rows.append(_row("pack", "torch index_copy_", nbytes, gpu_us=_us(g_ic), gbps_rw=bw(g_ic), **base))
            rows.append(_row("pack", "p2pkv unpack", nbytes, gpu_us=_us(g_up), host_us=_us(h_up), gbps_rw=bw(g_up),
                             ratio_to_copy=g_copy / g_up, speedup_vs_index_copy=g_ic / g_up, **base))
            if tokens <= 16384:
                layers = [cache] * p.layers if nbytes * p.layers > 8 * GiB else \
                    [torch.empty_like(cache) for _ in range(p.layers)]
                allout = torch.empty((p.layers,) + tuple(out.shape), dtype=out.dtype, device=dev)
                g_b, h_b = gpu_time(lambda: pack_layers(layers, ids, out=allout, backend="cuda"), 5)

                def per_layer() -> None:
                    for li, layer in enumerate(layers):
                        torch.index_select(layer, 0, ids_dev, out=allout[li])

                g_pl, h_pl = gpu_time(per_layer, 5)
                rows.append(_row("pack", f"p2pkv pack_layers ({p.layers} layers, 1 launch)", nbytes * p.layers,
                                 gpu_us=_us(g_b), host_us=_us(h_b), gbps_rw=nbytes * p.layers * 2 / g_b / 1e9,
                                 speedup_vs_index_select=max(g_pl, h_pl) / max(g_b, h_b), **base))
                rows.append(_row("pack", f"torch index_select x{p.layers}", nbytes * p.layers, gpu_us=_us(g_pl),
                                 host_us=_us(h_pl), **base))
                del layers, allout
            del cache, out, src
            torch.cuda.empty_cache()
            bar(f"pack {pname} {tokens}")
    return rows


# ----------------------------------------------------------------------------- IPC
def bench_ipc(smoke: bool, sizes: list[int], bar: Callable[[str], None]) -> list[dict[str, Any]]:
    from .. import Engine
    from ..testing import RemoteEngine

    rows: list[dict[str, Any]] = []
    biggest = max(sizes)
    pool = max(512 * MiB, 3 * biggest + 64 * MiB)
    cfg = dict(device="cuda", transport="ipc", timeout_s=120.0, pool_bytes=pool, credit_bytes=pool)
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
                g_copy, _ = gpu_time(lambda: dst.copy_(src), 10 if size >= 256 * MiB else 30)
                copy_bw = size / g_copy / 1e9
                rows.append(_row("ipc", "device copy (baseline)", size, gbps=copy_bw, gpu_us=_us(g_copy)))
                buf = eng.alloc_buffer(size)
                for variant, tensor in (("p2pkv push from pool buffer", buf.data), ("p2pkv push, staged", src)):
                    el, lat = _measure_push(eng, cons, f"{variant[:20]}-{size}", tensor, n, 5 if smoke else 30)
                    bw = n * size / el / 1e9
                    rows.append(_row("ipc", variant + " (end to end)", size, gbps=bw, ratio=bw / copy_bw,
                                     baseline="device copy", **_lat(lat)))
                g_ipc = cons.call("ipc_copy_gpu_time", size, 10 if size >= 256 * MiB else 30, timeout=120)
                rows.append(_row("ipc", "p2pkv IPC copy, cross-process (GPU time)", size, gbps=size / g_ipc / 1e9,
                                 gpu_us=_us(g_ipc), ratio=g_copy / g_ipc, baseline="device copy"))
                buf.release()
                del src, dst
                bar(f"ipc {size}")
    finally:
        cons.close()
    return rows


# ----------------------------------------------------------------------------- NCCL
def bench_nccl(smoke: bool, sizes: list[int], bar: Callable[[str], None]) -> list[dict[str, Any]]:
    from ..transport.nccl import Comm, nccl_available, new_unique_id

    rows: list[dict[str, Any]] = []
    if not nccl_available():
        return [_row("nccl", "skipped: nccl4py not installed", 0)]
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

        def raw_op() -> None:
            nc.group_start()
            raw.send(a, 0, stream=s.cuda_stream)
            raw.recv(b, 0, stream=s.cuda_stream)
            nc.group_end()

        def p2p_op() -> None:
            comm.send_recv(a, b, s)

        reps = 10 if size >= 256 * MiB else 30
        g_raw, h_raw = gpu_time(raw_op, reps)
        g_p, h_p = gpu_time(p2p_op, reps)
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


def _bench_engine_nccl_loopback(smoke: bool, sizes: list[int], bar) -> list[dict[str, Any]]:
    """The whole engine path (header, credit-free loopback, completion, deliver) on one GPU."""
    from .. import Engine, TransferKey

    rows = []
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
            rows.append(_row("nccl", "p2pkv engine send->recv over NCCL (loopback)", size, **_lat(lat)))
    bar("nccl engine loopback")
    return rows


def _two_gpu_worker(rank: int, port: int, sizes: list[int], reps: int, q) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    out: dict[str, Any] = {}
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for size in sizes:
        x = torch.empty(size, dtype=torch.uint8, device="cuda")
        for _ in range(3):
            (dist.isend(x, 1) if rank == 0 else dist.irecv(x, 0)).wait()
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            (dist.isend(x, 1) if rank == 0 else dist.irecv(x, 0)).wait()
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
            op = (lambda: c.send(x.data_ptr(), size, cnccl.NCCL_UINT8, 1, s)) if rank == 0 else \
                (lambda: c.recv(x.data_ptr(), size, cnccl.NCCL_UINT8, 0, s))
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


def bench_nccl_two_gpus(smoke: bool, sizes: list[int], bar) -> list[dict[str, Any]]:
    from .. import Engine, TransferKey
    from ..testing import RemoteEngine

    rows: list[dict[str, Any]] = []
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
    cfg = dict(transport="nccl", timeout_s=120.0, pool_bytes=max(512 * MiB, 3 * max(sizes)))
    cons = RemoteEngine(**dict(cfg, device="cuda:1"))
    try:
        with Engine(**dict(cfg, device="cuda:0")) as e:
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
                    rows.append(_row("nccl2", "raw CuPy NCCL send/recv (2 GPUs)", size, gbps=size / raw / 1e9,
                                     per_op_us=_us(raw)))
                if td:
                    rows.append(_row("nccl2", "torch.distributed isend/irecv (2 GPUs)", size, gbps=size / td / 1e9,
                                     per_op_us=_us(td)))
                rows.append(_row("nccl2", "p2pkv push over NCCL (2 GPUs)", size, gbps=size / per / 1e9,
                                 per_op_us=_us(per), ratio=(raw / per) if raw else None,
                                 added_us=_us(per - raw) if raw else None, baseline="raw CuPy NCCL", **_lat(lat)))
                bar(f"nccl2 {size}")
    finally:
        cons.close()
    return rows


# ----------------------------------------------------------------------------- driver
def _print(rows: list[dict[str, Any]]) -> None:
    cur = None
    for r in rows:
        if r["suite"] != cur:
            cur = r["suite"]
            print(f"\n== {cur} ==")
            print(f"{'what':<52} {'size':>10} {'GB/s':>9} {'p50 us':>9} {'p99 us':>9} {'gpu us':>9} "
                  f"{'host us':>9} {'ratio':>6}  extra")
        gb = r.get("gbps", r.get("gbps_rw"))
        ratio = r.get("ratio", r.get("ratio_to_copy"))
        extra = {k: v for k, v in r.items() if k in ("preset", "tokens", "speedup_vs_index_select",
                                                       "speedup_vs_index_copy", "seconds", "added_host_us",
                                                       "added_us", "baseline")}
        print(f"{r['what'][:52]:<52} {_fmt_size(r['bytes']):>10} {_f(gb):>9} {_f(r.get('p50_us')):>9} "
              f"{_f(r.get('p99_us')):>9} {_f(r.get('gpu_us')):>9} {_f(r.get('host_us')):>9} {_f(ratio):>6}  "
              f"{json.dumps(extra) if extra else ''}")


def _f(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if isinstance(x, float) and abs(x) < 100 else f"{x:.0f}" if isinstance(x, float) else str(x)


def _fmt_size(n: int) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div:
            return f"{n / div:g}{unit}"
    return f"{n}B"


def _plot(rows: list[dict[str, Any]], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        gb = r.get("gbps")
        if gb is None or r["suite"] == "pack" or "request" in r["what"]:
            continue
        series.setdefault(f"{r['suite']}: {r['what']}", []).append((r["bytes"], gb))
    if not series:
        return False
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
    return True


def run(suites: list[str], smoke: bool = False, out_dir: str = "bench-results", sizes: list[int] | None = None,
        big: bool = False, argv: list[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    info = env_info(argv or [])
    gpu = torch.cuda.is_available()
    sz = sizes or _sizes(smoke, big)
    steps = {"tcp": len(sz) + 1, "pack": 6 if smoke else 21, "ipc": len(sz), "nccl": len(sz) + 1 +
             (len(sz) if gpu and torch.cuda.device_count() > 1 else 0)}
    todo = [s for s in suites if s == "tcp" or gpu]
    skipped = [s for s in suites if s not in todo]
    prog = Progress(sum(steps[s] for s in todo), "bench", every_step=True)
    bar = lambda note: prog.update(1, note)  # noqa: E731
    rows: list[dict[str, Any]] = []
    os.makedirs(out_dir, exist_ok=True)

    def save() -> dict[str, Any]:
        result = {"meta": info, "skipped_suites": skipped, "results": rows}
        with open(os.path.join(out_dir, "bench.json"), "w") as f:
            json.dump(result, f, indent=1)
        return result

    for s in todo:
        if s == "tcp":
            rows += bench_tcp(smoke, [x for x in sz if x <= 256 * MiB], bar)
        elif s == "pack":
            rows += bench_pack(smoke, bar)
        elif s == "ipc":
            rows += bench_ipc(smoke, [x for x in sz if x >= 4 * KiB], bar)
        elif s == "nccl":
            rows += bench_nccl(smoke, sz, bar)
        save()  # partial results survive a later suite's failure
    prog.close()
    result = save()
    result["plot"] = _plot(rows, os.path.join(out_dir, "bench.png"))
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m p2pkv.bench", description="p2pkv microbenchmarks")
    ap.add_argument("--suite", default="all", help=f"comma-separated subset of {','.join(SUITES)} (default all)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and counts (CI)")
    ap.add_argument("--big", action="store_true", help="also 1 GiB messages")
    ap.add_argument("--sizes", default="", help="comma-separated byte sizes, e.g. 4096,1048576")
    ap.add_argument("--out", default="bench-results", help="folder for bench.json and bench.png")
    a = ap.parse_args(argv)
    suites = list(SUITES) if a.suite == "all" else [s.strip() for s in a.suite.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad:
        ap.error(f"unknown suite(s) {bad}; choose from {SUITES}")
    sizes = [int(x) for x in a.sizes.split(",") if x.strip()] or None
    res = run(suites, a.smoke, a.out, sizes, a.big, argv)
    m = res["meta"]
    print(f"p2pkv bench {m['date']}  gpus={m.get('gpus')} driver={m.get('driver')} nccl={m.get('nccl')} "
          f"torch={m['torch']}")
    if res["skipped_suites"]:
        print(f"skipped (no GPU): {', '.join(res['skipped_suites'])}")
    _print(res["results"])
    print(f"\nwrote {os.path.join(a.out, 'bench.json')}" + (" and bench.png" if res["plot"] else ""))
    return 0
