"""Probe 2 (issue 18): completion flags in shared host memory, written by the producer's GPU.

The first probe showed, on one H200 with two processes: a ZMQ message between the processes
takes 0.4-0.6 ms (three thread wake-ups in this VM), and GPU work in BOTH processes around one
transfer costs a context switch (0.3-1 ms). So: can the producer's GPU write a completion flag
into host memory shared by both processes (a /dev/shm page registered with CUDA in each), and the
consumer see it from the CPU, with no message and no GPU work on the consumer's side?

  F1. the producer copies a request into the consumer's arena (one batched launch) and writes
      a flag into shared host memory behind it (cuStreamWriteValue64, or a kernel); the
      consumer's CPU spins on the flag; latency from the producer's start; bit-exact check
  F2. the consumer's STREAM waits on that host flag (cuStreamWaitValue64), then copies out
  F3. wake-up costs on this machine: a Unix datagram between processes (blocked reader),
      Python's time.sleep(50e-6), threading.Event hand-off
  F4. one process registering the same shm file through two mappings

    python benchmarks/probe_shm.py [--out DIR]
"""

from __future__ import annotations

import ctypes
import json
import mmap
import multiprocessing as mp
import os
import socket
import statistics
import sys
import threading
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

LAYERS = 32
TOKENS = [512, 2048, 10000]
SHM_BYTES = 1 << 20


def layer_bytes(tokens: int) -> int:
    return 2 * ((tokens + 15) // 16) * 16 * 8 * 128 * 2


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 1) if xs else float("nan")


_cu: Any = None


def cu(name: str) -> Any:
    global _cu
    if _cu is None:
        _cu = ctypes.CDLL("libcuda.so.1")
    for n in (name + "_v2", name):
        f = getattr(_cu, n, None)
        if f is not None:
            return f
    raise RuntimeError(name)


def shm_map(path: str, create: bool) -> tuple[mmap.mmap, int]:
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
    if create:
        os.ftruncate(fd, SHM_BYTES)
    m = mmap.mmap(fd, SHM_BYTES)
    os.close(fd)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    return m, addr


def host_register(addr: int, n: int) -> int:
    rc = cu("cuMemHostRegister")(ctypes.c_void_p(addr), ctypes.c_size_t(n), ctypes.c_uint(0x1 | 0x2))
    if rc != 0:
        raise RuntimeError(f"cuMemHostRegister -> {rc}")
    d = ctypes.c_uint64()
    rc = cu("cuMemHostGetDevicePointer")(ctypes.byref(d), ctypes.c_void_p(addr), ctypes.c_uint(0))
    if rc != 0:
        raise RuntimeError(f"cuMemHostGetDevicePointer -> {rc}")
    return d.value


def _consumer(conn: Any, path: str) -> None:
    import cupy

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    torch.zeros(1, device=dev)
    m, addr = shm_map(path, create=False)
    dflag = host_register(addr, SHM_BYTES)
    flags = (ctypes.c_uint64 * (SHM_BYTES // 8)).from_address(addr)
    n_max = LAYERS * layer_bytes(max(TOKENS))
    mem = cupy.cuda.Memory(n_max)
    arena = torch.as_tensor(cupy.ndarray((n_max,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0)),
                            device=dev)
    conn.send((bytes(cupy.cuda.runtime.ipcGetMemHandle(mem.ptr)), dflag == addr))
    s = torch.cuda.Stream(dev)
    wait = cu("cuStreamWaitValue64")
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        mode, tokens, slot, value = cmd
        n = LAYERS * layer_bytes(tokens)
        if mode == "cpu":
            conn.send("armed")
            deadline = time.monotonic() + 10
            while flags[slot] != value and time.monotonic() < deadline:
                pass
            t1 = time.monotonic()
            sample = arena[:n:4099].cpu()  # read after seeing the flag: must be the new data
            conn.send((t1, flags[slot] == value, sample))
        else:  # "stream": the consumer's stream waits on the host flag
            check = torch.empty(n, dtype=torch.uint8, device=dev)
            torch.cuda.synchronize()
            rc = wait(ctypes.c_void_p(s.cuda_stream), ctypes.c_uint64(dflag + 8 * slot), ctypes.c_uint64(value),
                      ctypes.c_uint(1))
            with torch.cuda.stream(s):
                check.copy_(arena[:n], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s)
            conn.send("armed")
            ev.synchronize()
            t1 = time.monotonic()
            conn.send((t1, rc == 0, check[::4099].cpu()))
            del check
    m.close()


def part_f(res: dict[str, Any]) -> None:
    import cupy
    import numpy as np

    from p2pkv.kernels.batch import copier_for

    dev = torch.device("cuda", 0)
    torch.zeros(1, device=dev)  # the driver API needs the primary context current
    path = f"/dev/shm/p2pkv-probe-{os.getpid()}"
    m, addr = shm_map(path, create=True)
    dflag = host_register(addr, SHM_BYTES)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    p = ctx.Process(target=_consumer, args=(child, path), daemon=True)
    p.start()
    handle, same_ptr = conn.recv()
    remote = cupy.cuda.runtime.ipcOpenMemHandle(handle)
    bc = copier_for(dev)
    s = torch.cuda.Stream(dev)
    write = cu("cuStreamWriteValue64")
    out: dict[str, Any] = {"devptr_equals_hostptr": same_ptr}
    value = 1000
    slot = 0
    for how in ("memop", "kernel"):
        for mode in ("cpu", "stream"):
            for tokens in TOKENS:
                n = layer_bytes(tokens)
                src = [torch.randint(0, 255, (n,), dtype=torch.uint8, device=dev) for _ in range(LAYERS)]
                expect = torch.cat(src)[::4099].cpu()
                lat, host, ok = [], [], True
                for rep in range(8):
                    value += 1
                    slot = (slot + 1) % 64
                    for x in src:  # new bytes each time, so stale data cannot pass the check
                        x.add_(1)
                    expect = torch.cat(src)[::4099].cpu()
                    torch.cuda.synchronize()
                    conn.send((mode, tokens, slot, value))
                    conn.recv()
                    time.sleep(0.003)
                    t0 = time.monotonic()
                    bc.copy([(x.data_ptr(), remote + i * n, n) for i, x in enumerate(src)], s)
                    if how == "memop":
                        rc = write(ctypes.c_void_p(s.cuda_stream), ctypes.c_uint64(dflag + 8 * slot),
                                   ctypes.c_uint64(value), ctypes.c_uint(0))
                        ok = ok and rc == 0
                    else:
                        bc.signal(dflag + 8 * slot, value, s)
                    th = time.monotonic()
                    t1, seen, sample = conn.recv()
                    if rep >= 2:
                        lat.append((t1 - t0) * 1e6)
                        host.append((th - t0) * 1e6)
                    ok = ok and seen and torch.equal(sample, expect)
                out[f"F_{how}_{mode}_{tokens}"] = {"latency_us_p50": med(lat), "producer_host_us": med(host),
                                                   "exact": ok}
                del src
                torch.cuda.empty_cache()
    conn.send(None)
    p.join(20)
    cupy.cuda.runtime.ipcCloseMemHandle(remote)
    # F4: the same shm file mapped and registered twice in one process
    try:
        m2, addr2 = shm_map(path, create=False)
        d2 = host_register(addr2, SHM_BYTES)
        out["F4_double_register"] = {"ok": True, "distinct": d2 != dflag}
        f1 = (ctypes.c_uint64 * 8).from_address(addr)
        f2 = (ctypes.c_uint64 * 8).from_address(addr2)
        f1[3] = 77
        out["F4_double_register"]["shared"] = f2[3] == 77
        bc.signal(d2 + 8 * 4, 99, s)
        s.synchronize()
        out["F4_double_register"]["gpu_write_seen_in_first"] = f1[4] == 99
    except Exception as exc:
        out["F4_double_register"] = {"ok": False, "error": str(exc)}
    os.unlink(path)
    del np
    res["F"] = out


def _dgram_rx(path: str, q: Any) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    q.put("bound")
    ev = threading.Event()
    stamps: list[float] = []

    def rx() -> None:
        while True:
            b = s.recv(64)
            stamps.append(time.monotonic())
            ev.set()
            if b == b"stop":
                return

    th = threading.Thread(target=rx, daemon=True)
    th.start()
    while True:
        ev.wait()
        t_w = time.monotonic()
        ev.clear()
        t_rx = stamps.pop()
        q.put((t_rx, t_w))
        if not th.is_alive():
            break


def part_w(res: dict[str, Any]) -> None:
    path = "\0p2pkv-probe-dgram-%d" % os.getpid()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_dgram_rx, args=(path, q), daemon=True)
    p.start()
    q.get(timeout=30)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx, w = [], []
    for _ in range(50):
        t0 = time.monotonic()
        s.sendto(b"x", path)
        t_rx, t_w = q.get(timeout=10)
        rx.append((t_rx - t0) * 1e6)
        w.append((t_w - t0) * 1e6)
        time.sleep(0.002)
    s.sendto(b"stop", path)
    sl = []
    for _ in range(50):
        t0 = time.monotonic()
        time.sleep(50e-6)
        sl.append((time.monotonic() - t0) * 1e6)
    res["W"] = {"dgram_to_rx_thread_us": med(rx), "dgram_plus_event_us": med(w), "sleep_50us_takes_us": med(sl)}
    p.join(5)


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    res: dict[str, Any] = {}
    for name, fn in (("W", part_w), ("F", part_f)):
        try:
            fn(res)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            res[name + "_error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(res, indent=1), flush=True)
    if a.out:
        with open(os.path.join(a.out, "probe_shm.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
