"""Probe, on one GPU, the primitives a request-granular data plane would be built on (issue 18).

Measured before building on them:
  A. one batched copy launch for 32 layers vs 32 ``copy_`` vs ``torch._foreach_copy_``
  B. across two processes on the same GPU (CUDA IPC): a producer writes a request into the
     consumer's arena with one batched copy and writes a 64-bit flag behind it; the consumer's
     stream waits for the flag (a spin kernel with a deadline, and the driver's
     cuStreamWaitValue64 where it exists), then copies the data out; bit-exact check; latency
     from the producer's start to the consumer holding the data, with no host message at all
  C. a deadline: a wait for a flag nobody writes lets the stream go after the deadline
  D. one host message between the processes (ZMQ DEALER -> ROUTER, TCP loopback): sent by the
     caller's thread itself vs handed to an I/O thread, with the caller spinning in Python
  E. a tensor from torch's caching allocator exported through CUDA IPC (its allocation's base
     found with cuMemGetAddressRange) and read by the other process, bit-exact

    python benchmarks/probe_primitives.py [--out DIR]
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

LAYERS = 32
TOKENS = [512, 2048, 10000]


def layer_bytes(tokens: int) -> int:
    return 2 * ((tokens + 15) // 16) * 16 * 8 * 128 * 2


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- driver API (ctypes)
_cu: Any = None


def cu() -> Any:
    global _cu
    if _cu is None:
        _cu = ctypes.CDLL("libcuda.so.1")
    return _cu


def cu_fn(*names: str) -> Any:
    for n in names:
        f = getattr(cu(), n, None)
        if f is not None:
            return f
    return None


def address_range(ptr: int) -> tuple[int, int]:
    base = ctypes.c_uint64()
    size = ctypes.c_size_t()
    f = cu_fn("cuMemGetAddressRange_v2", "cuMemGetAddressRange")
    rc = f(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if rc != 0:
        raise RuntimeError(f"cuMemGetAddressRange -> {rc}")
    return base.value, size.value


# ----------------------------------------------------------------------------- A: batched copy
def part_a(res: dict[str, Any]) -> None:
    from p2pkv.kernels.batch import copier_for

    dev = torch.device("cuda", 0)
    bc = copier_for(dev)
    s = torch.cuda.current_stream(dev)
    out: dict[str, Any] = {}
    for tokens in TOKENS:
        n = layer_bytes(tokens)
        src = [torch.randint(0, 255, (n,), dtype=torch.uint8, device=dev) for _ in range(LAYERS)]
        dst = [torch.empty(n, dtype=torch.uint8, device=dev) for _ in range(LAYERS)]
        segs = [(a.data_ptr(), b.data_ptr(), n) for a, b in zip(src, dst, strict=True)]

        def batched(src=src, dst=dst, segs=segs) -> None:
            bc.copy(segs, s)

        def per_layer(src=src, dst=dst) -> None:
            for a, b in zip(src, dst, strict=True):
                b.copy_(a, non_blocking=True)

        def foreach(src=src, dst=dst) -> None:
            torch._foreach_copy_(dst, src, non_blocking=True)

        row: dict[str, Any] = {"MB": round(LAYERS * n / 1e6, 1)}
        for name, fn in (("batched", batched), ("32 copy_", per_layer), ("foreach_copy_", foreach)):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            gpu, host, wall = [], [], []
            for _ in range(10):
                for d in dst:
                    d.zero_()
                torch.cuda.synchronize()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                e0.record(s)
                fn()
                e1.record(s)
                t1 = time.perf_counter()
                e1.synchronize()
                t2 = time.perf_counter()
                gpu.append(e0.elapsed_time(e1) * 1e3)
                host.append((t1 - t0) * 1e6)
                wall.append((t2 - t0) * 1e6)
            ok = all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))
            row[name] = {"gpu_us": round(med(gpu), 1), "host_us": round(med(host), 1),
                         "wall_us": round(med(wall), 1), "exact": ok,
                         "GBps_rw": round(2 * LAYERS * n / (med(gpu) * 1e-6) / 1e9, 1)}
        out[str(tokens)] = row
        del src, dst
        torch.cuda.empty_cache()
    res["A_batched_copy"] = out


# ----------------------------------------------------------------------------- B, C: flags across processes
def _consumer_b(conn: Any) -> None:
    import cupy

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    from p2pkv.kernels.batch import copier_for

    bc = copier_for(dev)
    arena_bytes = LAYERS * layer_bytes(max(TOKENS)) + (1 << 20)
    mem = cupy.cuda.Memory(arena_bytes)
    arena = torch.as_tensor(cupy.ndarray((arena_bytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0)),
                            device=dev)
    arena[: 1 << 20].zero_()
    flag_ptr = arena.data_ptr()
    status = torch.zeros(1, dtype=torch.int64, device=dev)
    conn.send((bytes(cupy.cuda.runtime.ipcGetMemHandle(mem.ptr)), arena_bytes))
    s = torch.cuda.Stream(dev)
    wait_v2 = cu_fn("cuStreamWaitValue64_v2", "cuStreamWaitValue64")
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        kind, tokens, value, mode = cmd
        if kind == "E":
            # read a tensor exported from the producer's caching allocator
            handle, off, n, base_size = tokens
            ptr = cupy.cuda.runtime.ipcOpenMemHandle(handle)
            um = cupy.cuda.UnownedMemory(ptr, base_size, None)
            t = torch.as_tensor(cupy.ndarray((base_size,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(um, 0)),
                                device=dev)
            got = t[off:off + n].clone()
            torch.cuda.synchronize()
            conn.send(got.cpu())
            cupy.cuda.runtime.ipcCloseMemHandle(ptr)
            continue
        n = layer_bytes(tokens)
        data = arena[1 << 20: (1 << 20) + LAYERS * n]
        check = torch.empty_like(data)
        status.zero_()
        torch.cuda.synchronize()
        with torch.cuda.stream(s):
            if mode == "spin":
                bc.wait(flag_ptr, value, time.monotonic() + (0.05 if kind == "C" else 10.0), status.data_ptr(), s)
            else:
                rc = wait_v2(ctypes.c_void_p(s.cuda_stream), ctypes.c_uint64(flag_ptr), ctypes.c_uint64(value),
                             ctypes.c_uint(1))  # CU_STREAM_WAIT_VALUE_EQ
                if rc != 0:
                    conn.send(("err", f"cuStreamWaitValue64 -> {rc}"))
                    continue
            check.copy_(data, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s)
        conn.send(("armed", None))
        ev.synchronize()
        t1 = time.monotonic()
        conn.send(("done", (t1, int(status.item()), check[:: max(1, check.numel() // 65536)].cpu())))


def part_bc(res: dict[str, Any]) -> None:
    import cupy

    dev = torch.device("cuda", 0)
    from p2pkv.kernels.batch import copier_for

    bc = copier_for(dev)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    p = ctx.Process(target=_consumer_b, args=(child,), daemon=True)
    p.start()
    handle, arena_bytes = conn.recv()
    ptr = cupy.cuda.runtime.ipcOpenMemHandle(handle)
    flag_remote = ptr
    data_remote = ptr + (1 << 20)
    s = torch.cuda.Stream(dev)
    write_v2 = cu_fn("cuStreamWriteValue64_v2", "cuStreamWriteValue64")
    out: dict[str, Any] = {"has_cuStreamWaitValue64": cu_fn("cuStreamWaitValue64_v2", "cuStreamWaitValue64")
                           is not None}
    value = 100
    for mode in ("spin", "memop"):
        for tokens in TOKENS:
            n = layer_bytes(tokens)
            src = [torch.randint(0, 255, (n,), dtype=torch.uint8, device=dev) for _ in range(LAYERS)]
            expect = torch.cat(src)
            lat, exact, errs = [], True, []
            for rep in range(8):
                value += 1
                conn.send(("B", tokens, value, mode))
                kind, info = conn.recv()
                if kind == "err":
                    errs.append(info)
                    break
                time.sleep(0.003)
                t0 = time.monotonic()
                segs = [(a.data_ptr(), data_remote + i * n, n) for i, a in enumerate(src)]
                bc.copy(segs, s)
                if mode == "spin":
                    bc.signal(flag_remote, value, s)
                else:
                    rc = write_v2(ctypes.c_void_p(s.cuda_stream), ctypes.c_uint64(flag_remote), ctypes.c_uint64(value),
                                  ctypes.c_uint(0))
                    if rc != 0:
                        errs.append(f"cuStreamWriteValue64 -> {rc}")
                        bc.signal(flag_remote, value, s)  # release the consumer's wait anyway
                kind, (t1, st, sample) = conn.recv()
                if rep >= 2:
                    lat.append((t1 - t0) * 1e6)
                exact = exact and torch.equal(sample, expect[:: max(1, expect.numel() // 65536)].cpu()) and st == 0
            out[f"B_{mode}_{tokens}"] = {"latency_us_p50": round(med(lat), 1), "min": round(min(lat), 1) if lat else None,
                                         "exact": exact, "errors": errs[:2]}
            del src, expect
            torch.cuda.empty_cache()
    # C: nobody writes the flag; the spin wait must give up at its 50 ms deadline
    t0 = time.monotonic()
    conn.send(("C", TOKENS[0], 987654321, "spin"))
    conn.recv()
    kind, (t1, st, _) = conn.recv()
    out["C_deadline"] = {"released_after_ms": round((t1 - t0) * 1e3, 1), "status": st}
    # E: export a caching-allocator tensor
    x = torch.randint(0, 255, (3 << 20,), dtype=torch.uint8, device=dev)
    y = x[12345:12345 + (1 << 20)]
    base, size = address_range(y.data_ptr())
    h = bytes(cupy.cuda.runtime.ipcGetMemHandle(base))
    conn.send(("E", (h, y.data_ptr() - base, y.numel(), size), 0, ""))
    got = conn.recv()
    out["E_export_torch_tensor"] = {"exact": bool(torch.equal(got, y.cpu())), "alloc_base_offset": y.data_ptr() - base,
                                    "alloc_size": size}
    conn.send(None)
    p.join(20)
    cupy.cuda.runtime.ipcCloseMemHandle(ptr)
    res["BCE"] = out


# ----------------------------------------------------------------------------- D: host messages
def _rx_d(port_q: Any, stop: Any) -> None:
    import zmq

    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    port_q.put(port)
    got = threading.Event()
    stamp: list[float] = []

    def io() -> None:
        poller = zmq.Poller()
        poller.register(r, zmq.POLLIN)
        while True:
            ev = dict(poller.poll(1000))
            if r in ev:
                frames = r.recv_multipart()
                if frames[1] == b"stop":
                    got.set()
                    return
                stamp.append(time.monotonic())
                got.set()

    th = threading.Thread(target=io, daemon=True)
    th.start()
    lat = []
    while True:
        got.wait()
        t_w = time.monotonic()
        got.clear()
        if not stamp:
            break
        t_io = stamp.pop()
        port_q.put((t_io, t_w))
    th.join()


def part_d(res: dict[str, Any]) -> None:
    import zmq

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_rx_d, args=(q, None), daemon=True)
    p.start()
    port = q.get(timeout=60)
    zc = zmq.Context()
    d = zc.socket(zmq.DEALER)
    d.connect(f"tcp://127.0.0.1:{port}")
    d.send(b"hello")
    q.get(timeout=10)
    # an I/O thread of our own that sends what the caller queues (the engine's current design)
    cmds: list[bytes] = []
    wr, ww = os.pipe()
    io_sock = zc.socket(zmq.DEALER)
    io_sock.connect(f"tcp://127.0.0.1:{port}")
    io_sock.send(b"hello")
    q.get(timeout=10)

    def io() -> None:
        poller = zmq.Poller()
        poller.register(wr, zmq.POLLIN)
        while True:
            poller.poll(1000)
            os.read(wr, 4096)
            while cmds:
                m = cmds.pop(0)
                io_sock.send(m)
                if m == b"stop":
                    return

    th = threading.Thread(target=io, daemon=True)
    th.start()
    out: dict[str, Any] = {}
    for how in ("caller", "io-thread"):
        for busy in (False, True):
            to_io, to_w = [], []
            for _ in range(40):
                t0 = time.monotonic()
                if how == "caller":
                    d.send(b"x")
                else:
                    cmds.append(b"x")
                    os.write(ww, b"w")
                if busy:  # the caller goes on running Python, as a forward pass does
                    t_end = time.monotonic() + 0.004
                    x = 0
                    while time.monotonic() < t_end:
                        x += 1
                t_io, t_w = q.get(timeout=10)
                to_io.append((t_io - t0) * 1e6)
                to_w.append((t_w - t0) * 1e6)
                time.sleep(0.002)
            out[f"{how}{' busy' if busy else ''}"] = {"to_rx_io_us_p50": round(med(to_io), 1),
                                                      "to_rx_waiter_us_p50": round(med(to_w), 1),
                                                      "to_rx_waiter_us_p90": round(sorted(to_w)[int(0.9 * len(to_w))], 1)}
    cmds.append(b"stop")
    os.write(ww, b"w")
    th.join(5)
    p.join(5)
    res["D_host_message"] = out


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--parts", default="A,B,D")
    a = ap.parse_args()
    res: dict[str, Any] = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for part, fn in (("A", part_a), ("B", part_bc), ("D", part_d)):
        if part in a.parts.split(","):
            t = time.monotonic()
            try:
                fn(res)
            except Exception as exc:  # keep the other parts' figures
                import traceback

                res[f"{part}_error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            print(f"part {part}: {time.monotonic() - t:.1f}s", flush=True)
            print(json.dumps(res, indent=1), flush=True)
    if a.out:
        with open(os.path.join(a.out, "probe.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
