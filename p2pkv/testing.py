"""Helpers to run an engine in a separate process and drive it (tests, demos, soak runs).

``RemoteEngine`` starts a real process (``spawn``) holding a real
:class:`~p2pkv.Engine` and executes commands sent over a pipe. Bulk helpers
generate and verify synthetic tensors inside the child, so nothing large is
pickled. Every call has a deadline.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
import zlib
from multiprocessing.connection import Connection
from typing import Any
from collections.abc import Callable

__all__ = ["RemoteEngine", "RemoteError"]


class RemoteError(RuntimeError):
    """A command failed inside the child; ``kind`` is the exception class name."""

    def __init__(self, kind: str, message: str, tb: str = "") -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.tb = tb


def _child(conn: Connection, cfg: dict[str, Any]) -> None:
    import faulthandler

    import torch

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for stacks on a timeout

    from . import Engine, TransferKey
    from .synthetic import kv_layer, same_bits

    eng = Engine(**cfg)
    conn.send(("ok", eng.address))
    handles: list[Any] = []

    def key(tid: str, layer: int) -> TransferKey:
        return TransferKey(tid, f"model.layers.{layer}.self_attn")

    def send_many(peer: str, tids: list[str], layers: int, shape: list[int], dtype: str = "bfloat16",
                  wait: bool = True, timeout: float | None = None, seed_of: list[int] | None = None) -> int:
        dt = getattr(torch, dtype)
        hs = []
        for ti, tid in enumerate(tids):
            r = seed_of[ti] if seed_of else ti
            for layer in range(layers):
                hs.append(eng.send(peer, key(tid, layer), kv_layer(r, layer, tuple(shape), dt, eng.device),
                                   timeout=timeout))
        handles.extend(hs)
        if wait:
            for h in hs:
                h.wait(timeout)
        return len(hs)

    def send_requests(peer: str, tids: list[str], layers: int, shape: list[int], dtype: str = "bfloat16",
                      wait: bool = True, req_timeout: float | None = None, seed_of: list[int] | None = None,
                      only: int | None = None, abort: bool = False, many: bool = False) -> dict[str, int]:
        """One whole request (send_request) per transfer id; ``only`` sends just the first N layers
        (the rest never come), ``abort`` then aborts the transfer. ``req_timeout``: each request's
        deadline (``timeout=`` is the remote call's own)."""
        timeout = req_timeout
        dt = getattr(torch, dtype)
        outcome: dict[str, int] = {}
        reqs: list[Any] = []
        for ti, tid in enumerate(tids):
            r = seed_of[ti] if seed_of else ti
            data = [(key(tid, layer).name, kv_layer(r, layer, tuple(shape), dt, eng.device)) for layer in range(layers)]
            req = eng.send_request(peer, tid, data, timeout=timeout)
            part = data[: only if only is not None else layers]
            if many:
                req.send_many(part)
            else:
                for name, t in part:
                    req.send(name, t)
            if abort:
                eng.abort(tid)
            reqs.append(req)
            if wait:
                try:
                    req.wait(None if timeout is None else timeout + 5)
                    outcome["done"] = outcome.get("done", 0) + 1
                except Exception as exc:
                    outcome[type(exc).__name__] = outcome.get(type(exc).__name__, 0) + 1
        return outcome

    def wait_sends(timeout: float | None = None) -> dict[str, int]:
        errors: dict[str, int] = {}
        for h in handles:
            try:
                h.wait(timeout)
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        handles.clear()
        return errors

    def recv_many(tids: list[str], layers: int, shape: list[int], dtype: str = "bfloat16", timeout: float | None = None,
                  seed_of: list[int] | None = None, use_out: bool = False) -> int:
        dt = getattr(torch, dtype)
        bad = 0
        out = torch.empty(tuple(shape), dtype=dt, device=eng.device) if use_out else None
        for ti, tid in enumerate(tids):
            r = seed_of[ti] if seed_of else ti
            for layer in range(layers):
                got = eng.recv(key(tid, layer), timeout=timeout, out=out)
                if not same_bits(got, kv_layer(r, layer, tuple(shape), dt, eng.device)):
                    bad += 1
        return bad

    def recv_requests(tids: list[str], layers: int, shape: list[int], dtype: str = "bfloat16",
                      timeout: float | None = None, seed_of: list[int] | None = None, use_outs: bool = False) -> int:
        """Take each request whole (recv_request) and check every layer; returns the number that differ."""
        dt = getattr(torch, dtype)
        bad = 0
        for ti, tid in enumerate(tids):
            r = seed_of[ti] if seed_of else ti
            outs = {key(tid, layer).name: torch.empty(tuple(shape), dtype=dt, device=eng.device)
                    for layer in range(layers)} if use_outs else None
            with eng.recv_request(tid, outs=outs, timeout=timeout) as h:
                h.wait()
                for layer in range(layers):
                    got = h.tensor(key(tid, layer).name)
                    if not same_bits(got, kv_layer(r, layer, tuple(shape), dt, eng.device)):
                        bad += 1
        return bad

    kept: dict[str, Any] = {}

    def register_pattern(name: str, shape: list[int], seed: int) -> None:
        """Register a slice (not at its allocation's start) of a tensor of known bytes for peers to read."""
        t = kv_layer(seed, 0, (shape[0] + 1, *shape[1:]), torch.bfloat16, eng.device)
        kept[name] = t
        eng.register_memory(name, t[1:])

    def expose_wait(tid: str, timeout: float = 30.0) -> str:
        h = eng.expose(tid, timeout=timeout)
        try:
            h.wait(timeout + 5)
            return "done"
        except Exception as exc:
            return type(exc).__name__

    def publish_many(tids: list[str], layers: int, shape: list[int], dtype: str = "bfloat16",
                     timeout: float | None = None) -> int:
        dt = getattr(torch, dtype)
        for ti, tid in enumerate(tids):
            for layer in range(layers):
                eng.publish(key(tid, layer), kv_layer(ti, layer, tuple(shape), dt, eng.device), timeout=timeout)
        return len(tids) * layers

    def publish_many_from(tids: list[str], first_seed: int, layers: int, shape: list[int], dtype: str = "bfloat16",
                          timeout: float | None = None) -> int:
        dt = getattr(torch, dtype)
        for ti, tid in enumerate(tids):
            for layer in range(layers):
                eng.publish(key(tid, layer), kv_layer(first_seed + ti, layer, tuple(shape), dt, eng.device),
                            timeout=timeout)
        return len(tids) * layers

    def pull_many(peer: str, tids: list[str], layers: int, shape: list[int], dtype: str = "bfloat16",
                  timeout: float | None = None) -> int:
        dt = getattr(torch, dtype)
        bad = 0
        for ti, tid in enumerate(tids):
            for layer in range(layers):
                got = eng.pull(peer, key(tid, layer), timeout=timeout)
                if not same_bits(got, kv_layer(ti, layer, tuple(shape), dt, eng.device)):
                    bad += 1
        return bad

    def claim_many(tid: str, n: int, timeout: float | None = None) -> int:
        for i in range(n):
            with eng.claim(TransferKey(tid, str(i)), timeout=timeout):
                pass
        return n

    def publish_n(tid: str, n: int, nbytes: int, timeout: float | None = None) -> int:
        t = torch.zeros(nbytes, dtype=torch.uint8, device=eng.device)
        for i in range(n):
            eng.publish(TransferKey(tid, str(i)), t, timeout=timeout)
        return n

    def ipc_copy_gpu_time(nbytes: int, reps: int = 20) -> float:
        """GPU time of the transport's own copy: from a peer's mapped arena into our pool."""
        from ._timing import gpu_time

        sess = next(s for s in eng._sessions.values() if s.ipc is not None)
        src = sess.ipc.view(0, nbytes)
        with eng.alloc_buffer(nbytes) as buf:
            g, _ = gpu_time(lambda: buf.data.copy_(src, non_blocking=True), reps)
        return g

    def soak_produce(plan: list[tuple[str, str]], layers: int, nbytes: int, seed: int, peer: str) -> dict[str, int]:
        """Push or publish every layer of every transfer in a random interleaving; abort some."""
        import random

        rng = random.Random(seed)
        work = [(tid, mode, layer) for tid, mode in plan for layer in range(layers)]
        rng.shuffle(work)
        hs = []
        aborted = set()
        sent_before_abort: dict[str, int] = {}
        for tid, mode, layer in work:
            if tid in aborted:
                continue
            t = kv_layer(zlib.crc32(tid.encode()) & 0xFFFF, layer, (nbytes,), torch.uint8, eng.device)
            k = TransferKey(tid, str(layer))
            if mode == "pull":
                eng.publish(k, t)
            else:
                hs.append(eng.send(peer, k, t))
                if mode == "abort":
                    sent_before_abort[tid] = sent_before_abort.get(tid, 0) + 1
                    if sent_before_abort[tid] == layers // 2:
                        eng.abort(tid)
                        aborted.add(tid)
        outcome: dict[str, int] = {}
        for h in hs:
            try:
                h.wait(60)
                outcome["done"] = outcome.get("done", 0) + 1
            except Exception as exc:
                outcome[type(exc).__name__] = outcome.get(type(exc).__name__, 0) + 1
        return outcome

    def soak_consume(plan: list[tuple[str, str]], layers: int, nbytes: int, seed: int, peer: str, threads: int = 4,
                     timeout: float = 60.0) -> dict[str, Any]:
        """Receive / pull everything in random order from several threads; count outcomes."""
        import random
        import threading as th

        from .errors import TransferAborted

        rng = random.Random(seed)
        work = [(tid, mode, layer) for tid, mode in plan for layer in range(layers)]
        rng.shuffle(work)
        results: dict[str, Any] = {"ok": 0, "bad": 0, "aborted": 0, "other": 0}
        errors: list[str] = []
        lock = th.Lock()

        def run(part: list[tuple[str, str, int]]) -> None:
            for tid, mode, layer in part:
                k = TransferKey(tid, str(layer))
                try:
                    got = eng.pull(peer, k, timeout=timeout) if mode == "pull" else eng.recv(k, timeout=timeout)
                    want = kv_layer(zlib.crc32(tid.encode()) & 0xFFFF, layer, (nbytes,), torch.uint8, eng.device)
                    good = same_bits(got, want)
                    with lock:
                        results["ok" if good else "bad"] += 1
                except TransferAborted:
                    with lock:
                        results["aborted" if mode == "abort" else "other"] += 1
                except Exception as exc:
                    with lock:
                        results["other"] += 1
                        errors.append(f"{mode} {k}: {type(exc).__name__}: {exc}")

        parts = [work[i::threads] for i in range(threads)]
        ts = [th.Thread(target=run, args=(p,)) for p in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        results["errors"] = errors[:10]
        return results

    ops: dict[str, Callable[..., Any]] = {
           "send_many": send_many, "send_requests": send_requests, "soak_produce": soak_produce,
           "soak_consume": soak_consume,
           "ipc_copy_gpu_time": ipc_copy_gpu_time, "claim_many": claim_many, "publish_n": publish_n,
           "recv_many": recv_many, "recv_requests": recv_requests, "publish_many": publish_many,
           "publish_many_from": publish_many_from, "register_pattern": register_pattern,
           "expose_wait": expose_wait,
           "pull_many": pull_many, "wait_sends": wait_sends,
           "stats": lambda: eng.stats(), "abort": lambda tid: eng.abort(tid),
           "connect": lambda peer, timeout=None: eng.connect(peer, timeout=timeout),
           "threads": lambda: __import__("threading").active_count(),
           "fds": lambda: len(os.listdir("/proc/self/fd"))}
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            op, args, kwargs = msg
            if op == "close":
                eng.close()
                conn.send(("ok", None))
                return
            try:
                conn.send(("ok", ops[op](*args, **kwargs)))
            except Exception as exc:
                conn.send(("err", (type(exc).__name__, str(exc), traceback.format_exc())))
    finally:
        eng.close()


class RemoteEngine:
    """An engine in its own process. ``cfg`` is passed to ``Engine(**cfg)``."""

    def __init__(self, start_timeout: float = 180.0, method: str | None = None, **cfg: Any):
        """``method``: how the process starts. ``"forkserver"`` forks it from a server that has
        imported torch and p2pkv once (a second or so instead of several: what a test suite that
        starts many engines needs); ``"spawn"`` starts a fresh interpreter. Default: forkserver
        where this process sees no CUDA device, else spawn (a fork and CUDA do not mix)."""
        if method is None:
            import torch

            method = "spawn" if torch.cuda.is_available() else "forkserver"
        ctx: Any = mp.get_context(method)  # spawn / forkserver / fork: each has .Process and .Pipe
        if method == "forkserver":
            ctx.set_forkserver_preload(["torch", "zmq", "p2pkv", "p2pkv.testing"])
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child, cfg), daemon=True, name="p2pkv-remote")
        self.proc.start()
        child.close()
        self.address: str = self._wait(start_timeout)

    def _wait(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not self._conn.poll(0.1):
            if not self.proc.is_alive():
                raise RemoteError("ProcessDied", f"remote engine exited with code {self.proc.exitcode}")
            if time.monotonic() > deadline:
                try:
                    os.kill(self.proc.pid, signal.SIGUSR1)  # the child prints its threads' stacks
                    time.sleep(0.5)
                except OSError:
                    pass
                raise RemoteError("Timeout", f"remote engine gave no answer within {timeout}s")
        try:
            status, value = self._conn.recv()
        except EOFError:  # the child died after the pipe became readable (e.g. failed while starting)
            self.proc.join(5)
            raise RemoteError("ProcessDied", f"remote engine exited with code {self.proc.exitcode}") from None
        if status == "err":
            raise RemoteError(*value)
        return value

    def call(self, op: str, *args: Any, timeout: float = 120.0, **kwargs: Any) -> Any:
        self._conn.send((op, args, kwargs))
        return self._wait(timeout)

    def start(self, op: str, *args: Any, **kwargs: Any) -> None:
        """Send a command without waiting; collect its answer with :meth:`result`."""
        self._conn.send((op, args, kwargs))

    def result(self, timeout: float = 120.0) -> Any:
        return self._wait(timeout)

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self, timeout: float = 20.0) -> None:
        if self.proc.is_alive():
            try:
                self.call("close", timeout=timeout)
            except (RemoteError, OSError, EOFError):
                pass
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.kill()
        self._conn.close()

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
