"""TCP on CPU: one tensor at a time through ``send`` + ``recv`` vs raw pyzmq moving the same bytes.

Raw: a DEALER sends one message, the ROUTER in the other process ``recv_into``s a buffer it
reuses and answers; the time of that round is the raw figure. p2pkv: ``send`` from this
process, the consumer process waits in ``recv(key, out=...)`` (and in plain ``recv(key)``)
and notes when it returned. Both run in alternating rounds (raw, p2pkv, raw, ...) so a
passing load on the machine hits both; the row gives the medians and their ratio.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

MiB = 2**20


def _raw_server(q: Any, size: int) -> None:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    q.put(s.bind_to_random_port("tcp://127.0.0.1"))
    buf = memoryview(bytearray(max(size, 1)))
    try:
        while True:
            ident = s.recv()
            n = s.recv_into(buf)
            if n != size:
                break
            s.send_multipart([ident, b"ok"])
    finally:
        s.close(0)
        ctx.term()


def _p2pkv_consumer(q: Any, cmds: Any, size: int, cfg: dict[str, Any]) -> None:
    from .. import Engine, TransferKey

    with Engine(**cfg) as eng:
        q.put(eng.address)
        out = torch.empty(size, dtype=torch.uint8)
        while True:
            cmd = cmds.get()
            if cmd is None:
                break
            tid, n, use_out = cmd
            stamps = []
            for i in range(n):
                t = eng.recv(TransferKey(tid, str(i)), out=out if use_out else None, timeout=60)
                stamps.append(time.monotonic())
                del t
            q.put(stamps)


def bench_recv(sizes: list[int], rounds: int = 5, per_round: int = 8,
               bar: Callable[[str], None] = lambda note: None) -> list[dict[str, Any]]:
    import zmq

    from .. import Engine, TransferKey
    from .core import _row

    ctx = mp.get_context("spawn")
    rows: list[dict[str, Any]] = []
    for size in sizes:
        cfg: dict[str, Any] = dict(timeout_s=60.0, pool_bytes=max(64 * MiB, 8 * size),
                                   credit_bytes=max(64 * MiB, 8 * size))
        q, cq = ctx.Queue(), ctx.Queue()
        srv_q = ctx.Queue()
        srv = ctx.Process(target=_raw_server, args=(srv_q, size), daemon=True)
        cons = ctx.Process(target=_p2pkv_consumer, args=(q, cq, size, cfg), daemon=True)
        srv.start()
        cons.start()
        port = srv_q.get(timeout=60)
        addr = q.get(timeout=60)
        zc = zmq.Context()
        d = zc.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.connect(f"tcp://127.0.0.1:{port}")
        payload = memoryview(bytearray(size))
        t = torch.randint(0, 255, (size,), dtype=torch.uint8)
        raw: list[float] = []
        got: dict[bool, list[float]] = {True: [], False: []}
        with Engine(**cfg) as eng:
            eng.connect(addr)
            for r in range(rounds + 1):
                for _ in range(per_round):  # raw pyzmq
                    t0 = time.monotonic()
                    d.send(payload, copy=False)
                    d.recv()
                    if r:
                        raw.append(time.monotonic() - t0)
                for use_out in (True, False):
                    tid = f"recv-{size}-{r}-{use_out}"
                    cq.put((tid, per_round, use_out))
                    time.sleep(0.01)  # the consumer waits in recv before the first send
                    starts = []
                    for i in range(per_round):
                        starts.append(time.monotonic())
                        eng.send(addr, TransferKey(tid, str(i)), t).wait(60)
                    stamps = q.get(timeout=120)
                    if r:
                        got[use_out].extend(s - t0 for s, t0 in zip(stamps, starts, strict=True))
            cq.put(None)
        d.send(b"stop")
        d.close(0)
        zc.term()
        cons.join(30)
        srv.join(10)
        raw_s = statistics.median(raw)
        rows.append(_row("recv", "raw pyzmq send + recv_into (TCP loopback)", size, ms=round(raw_s * 1e3, 3),
                         gbps=round(size / raw_s / 1e9, 3)))
        for use_out, what in ((True, "p2pkv send + recv(key, out=)"), (False, "p2pkv send + recv(key)")):
            s = statistics.median(got[use_out])
            rows.append(_row("recv", f"{what} (TCP loopback)", size, ms=round(s * 1e3, 3),
                             gbps=round(size / s / 1e9, 3), ratio=round(raw_s / s, 3),
                             baseline="raw pyzmq send + recv_into"))
        bar(f"recv {size}")
    return rows


def suite_recv(smoke: bool, sizes: list[int], bar: Callable[[str], None]) -> list[dict[str, Any]]:
    """The ``recv`` suite of ``python -m p2pkv.bench``: TCP ``recv()`` vs raw pyzmq (CPU)."""
    return bench_recv([MiB] if smoke else [MiB, 16 * MiB], rounds=2 if smoke else 5, bar=bar)


if __name__ == "__main__":
    import json

    for row in bench_recv([16 * MiB]):
        print(json.dumps(row))
