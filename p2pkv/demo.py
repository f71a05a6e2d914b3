"""``p2pkv-demo`` (``python -m p2pkv.demo``): a producer and a consumer process move a
synthetic Llama-3-8B KV cache over p2pkv, verify it bit for bit, and print a table.

Runs with no GPU and no configuration (TCP on loopback). Options::

    p2pkv-demo --requests 16 --tokens 512 --mode both --device cpu --timeout 60

The transfer rate counts only the time spent moving data: the producer makes
each request's layers before it sends them, and the consumer receives all of a
request's layers before it regenerates and bit-compares them (the verification
time is reported on its own line).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import __version__
from .stats import percentile

__all__ = ["DemoError", "main", "run"]

PRESET = "llama3-8b"
MiB = 2**20
_MIN_POOL = 256 * MiB
_MAX_MESSAGE = 2 * 2**30  # EngineConfig's default max_message_bytes
MAX_TIMEOUT_S = 1e6  # the engine's limit on any deadline (p2pkv.config.MAX_TIMEOUT_S)
# multiprocessing waits in poll(), whose timeout is a C int of milliseconds: at most 2**31 - 1 ms
_MAX_QUEUE_WAIT_S = 2_000_000.0


class DemoError(Exception):
    """The demo could not run or finish; the message is one line for the user."""


class _Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C, so that the children are stopped and nothing leaks."""


def _orchestration_s(timeout: float) -> float:
    """Deadline of the demo's own hand-offs (process start, "request ready"), beyond ``timeout``:
    a side may wait for the other to start (importing torch takes seconds) or to finish a request."""
    return min(max(120.0, 4 * timeout), _MAX_QUEUE_WAIT_S)


def _take(qu: Any, timeout: float, what: str) -> Any:
    """The next item of ``qu`` within ``timeout``; in a child, give up at once when the demo's
    main process is gone (killed), instead of waiting out the deadline."""
    parent = mp.parent_process()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            return qu.get(timeout=max(0.0, min(left, 0.5)))
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                raise DemoError("the demo's main process is gone") from None
            if left <= 0.5:
                raise DemoError(f"{what} did not come within {timeout:g} s") from None


def _layer_key(tid: str, layer: int) -> Any:
    from . import TransferKey

    return TransferKey(tid, f"model.layers.{layer}.self_attn")


def _child(role: str, target: Callable[..., None], q: Any, *args: Any) -> None:
    """Run one side; report a failure to the parent as one line instead of a traceback."""
    try:
        target(q, *args)
    except Exception as exc:  # shipped to the parent, which prints it
        q.put(("error", role, str(exc) if isinstance(exc, DemoError) else f"{type(exc).__name__}: {exc}"))
        sys.exit(1)


def _consumer(q: Any, cfg: dict[str, Any], args: dict[str, Any], ctl: Any, ready: Any, go: Any) -> None:
    import torch

    from . import Engine
    from .synthetic import PRESETS, kv_layer, same_bits

    preset = PRESETS[args["preset"]]
    shape = preset.layer_shape(args["tokens"])
    timeout = args["timeout"]
    with Engine(**cfg) as eng:
        q.put(("address", eng.address))
        wait_s = _orchestration_s(timeout)
        producer = _take(ctl, wait_s, "the producer's address")
        bad = 0
        # One reusable destination per layer, as a serving engine's KV cache would be.
        outs = [torch.empty(shape, dtype=torch.bfloat16, device=eng.device) for _ in range(preset.layers)]
        times: dict[str, dict[str, Any]] = {}
        for mode in args["modes"]:
            transfer_s = verify_s = 0.0
            lat: list[float] = []
            for r in range(args["requests"]):
                tid = f"demo-{mode}-{r}"
                # the producer has made the request (and for pull published it)
                if _take(ready, wait_s, f"{mode} request {r} from the producer") != (mode, r):
                    raise RuntimeError("producer and consumer are out of step")
                t0 = time.perf_counter()
                go.put((mode, r))
                for layer, out in enumerate(outs):
                    t1 = time.perf_counter()
                    if mode == "push":
                        eng.recv(_layer_key(tid, layer), timeout=timeout, out=out)
                    else:
                        eng.pull(producer, _layer_key(tid, layer), timeout=timeout, out=out)
                        lat.append(time.perf_counter() - t1)
                if eng.device.type == "cuda":
                    torch.cuda.synchronize(eng.device)
                t2 = time.perf_counter()
                for layer, out in enumerate(outs):
                    if not same_bits(out, kv_layer(r, layer, shape, device=eng.device)):
                        bad += 1
                transfer_s += t2 - t0
                verify_s += time.perf_counter() - t2
                q.put(("progress", mode, r))
            times[mode] = {"transfer_s": transfer_s, "verify_s": verify_s, "pull_lat": lat}
        q.put(("consumer_done", bad, times))
        _take(ctl, wait_s, "the end of the run")  # keep serving until the producer is finished


def _producer(q: Any, cfg: dict[str, Any], args: dict[str, Any], consumer: str, ctl: Any, ready: Any,
              go: Any) -> None:
    from . import Engine
    from .synthetic import PRESETS, kv_layer

    preset = PRESETS[args["preset"]]
    shape = preset.layer_shape(args["tokens"])
    timeout = args["timeout"]
    wait_s = _orchestration_s(timeout)
    with Engine(**cfg) as eng:
        q.put(("producer_address", eng.address))
        eng.connect(consumer)
        lat: dict[str, list[float]] = {}
        for mode in args["modes"]:
            lat[mode] = []
            for r in range(args["requests"]):
                tid = f"demo-{mode}-{r}"
                layers = [kv_layer(r, layer, shape, device=eng.device) for layer in range(preset.layers)]
                if mode == "push":
                    ready.put((mode, r))
                    _take(go, wait_s, "the consumer's go")  # the consumer's clock runs from here
                    handles = [eng.send(consumer, _layer_key(tid, i), t, timeout=timeout) for i, t in enumerate(layers)]
                    for h in handles:
                        h.wait(timeout)
                        lat[mode].append(h.latency_s or 0.0)
                else:
                    for i, t in enumerate(layers):
                        eng.publish(_layer_key(tid, i), t, timeout=timeout)
                    ready.put((mode, r))
                    _take(go, wait_s, "the consumer's go")
        sent = [x for x in ("tcp", "ipc", "nccl") if eng.stats().get(f"sent_{x}")]
        q.put(("producer_done", lat, sent))
        _take(ctl, wait_s, "the end of the run")


# ----------------------------------------------------------------------------- input checks
def pool_bytes_for(tokens: int, preset: str = PRESET) -> int:
    """The pool each side of the demo allocates: room for four requests, at least 256 MiB."""
    from .synthetic import PRESETS

    p = PRESETS[preset]
    return max(_MIN_POOL, 4 * p.layers * p.layer_bytes(tokens))


def memory_needed(tokens: int, preset: str = PRESET) -> int:
    """Bytes the demo holds on its device: two pools, the producer's request and the consumer's
    destination buffers (one request each), and one layer being verified."""
    from .synthetic import PRESETS

    p = PRESETS[preset]
    request = p.layers * p.layer_bytes(tokens)
    return 2 * pool_bytes_for(tokens, preset) + 2 * request + 2 * p.layer_bytes(tokens)


def _available_memory(device: str) -> tuple[int, str] | None:
    """(free bytes, where) for ``device``, or ``None`` where it cannot be told."""
    if device.startswith("cuda"):
        import torch

        idx = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        return torch.cuda.mem_get_info(idx)[0], f"free on {device}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "of memory available"
    except OSError:
        pass
    return None


def check_inputs(requests: int, tokens: int, device: str, timeout: float, preset: str = PRESET) -> None:
    """Check the demo's options before any process or memory is started.

    Raises
    ------
    ValueError
        With a one-line message naming the option and a remedy.
    """
    from .synthetic import PRESETS

    if requests < 1:
        raise ValueError(f"--requests must be at least 1, got {requests}")
    if tokens < 1:
        raise ValueError(f"--tokens must be at least 1, got {tokens}")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"--timeout must be a positive number of seconds, got {timeout:g}")
    if timeout > MAX_TIMEOUT_S:
        raise ValueError(f"--timeout must be at most 1e6 seconds (about 11.6 days), got {timeout:g}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"--device must be cpu, cuda or cuda:N (N = GPU index), got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); "
                             "use --device cpu")
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    layer = PRESETS[preset].layer_bytes(tokens)
    if layer > _MAX_MESSAGE:
        raise ValueError(f"--tokens {tokens}: one layer would be {layer / 2**30:.1f} GiB, more than the 2 GiB "
                         "a single tensor may be")
    avail = _available_memory(device)
    need = memory_needed(tokens, preset)
    if avail is not None and need > 0.9 * avail[0]:
        lo, hi = 1, tokens  # the most tokens that fit (memory_needed grows with tokens)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if memory_needed(mid, preset) <= 0.9 * avail[0] else (lo, mid - 1)
        fit = f"use --tokens {lo} or fewer" if memory_needed(lo, preset) <= 0.9 * avail[0] else "free some memory"
        pool = pool_bytes_for(tokens, preset)
        raise ValueError(f"--tokens {tokens} needs about {need / 1e9:.1f} GB (two {pool / 1e9:.1f} GB pools and one "
                         f"request per side); {avail[0] / 1e9:.1f} GB {avail[1]}: {fit}")


# ----------------------------------------------------------------------------- driver
def run(requests: int = 16, tokens: int = 512, mode: str = "both", device: str = "cpu",
        timeout: float = 60.0, preset: str = PRESET, quiet: bool = False) -> dict[str, Any]:
    """Run the demo and return its summary (also printed unless ``quiet``).

    Raises
    ------
    ValueError
        Bad options (see :func:`check_inputs`).
    DemoError
        A side failed or did not report in time; the message says which and why.
    """
    from ._progress import Progress
    from .synthetic import PRESETS

    check_inputs(requests, tokens, device, timeout, preset)
    p = PRESETS[preset]
    modes = ["push", "pull"] if mode == "both" else [mode]
    args = {"requests": requests, "tokens": tokens, "modes": modes, "timeout": timeout, "preset": preset}
    cfg = {"device": device, "timeout_s": timeout, "pool_bytes": pool_bytes_for(tokens, preset)}
    ctx = mp.get_context("spawn")
    q: Any = ctx.Queue()
    cons_ctl: Any = ctx.Queue()
    prod_ctl: Any = ctx.Queue()
    ready: Any = ctx.Queue()  # producer -> consumer: request (mode, r) is made / published
    go: Any = ctx.Queue()  # consumer -> producer: the consumer's clock runs
    cons = ctx.Process(target=_child, args=("consumer", _consumer, q, cfg, args, cons_ctl, ready, go),
                       name="consumer", daemon=True)
    _start_quietly(cons)
    procs = [cons]
    result: dict[str, Any] = {}
    bar = None
    finished = False
    try:
        msg = _get(q, _orchestration_s(timeout), procs)
        prod = ctx.Process(target=_child, args=("producer", _producer, q, cfg, args, msg[1], prod_ctl, ready, go),
                           name="producer", daemon=True)
        _start_quietly(prod)
        procs.append(prod)
        bar = None if quiet else Progress(requests * len(modes), "moving KV", unit="request")
        while "bad" not in result or "lat" not in result:
            msg = _get(q, _orchestration_s(timeout), procs)
            if msg[0] == "producer_address":
                cons_ctl.put(msg[1])
            elif msg[0] == "progress":
                if bar:
                    bar.update(1, f"{msg[1]} request {msg[2]}")
            elif msg[0] == "consumer_done":
                result["bad"], result["times"] = msg[1], msg[2]
            elif msg[0] == "producer_done":
                result["lat"], result["sent"] = msg[1], msg[2]
        finished = True
    finally:
        if bar:
            bar.close()
        cons_ctl.put("stop")
        prod_ctl.put("stop")
        for pr in procs:  # after a failure the other side may be waiting for it: do not wait long
            pr.join(timeout=15 if finished else 1)
            if pr.is_alive():
                pr.kill()
                pr.join(timeout=5)
    layer_bytes = p.layer_bytes(tokens)
    rows = []
    for m in modes:
        t = result["times"][m]
        nbytes = requests * p.layers * layer_bytes
        lat = result["lat"][m] if m == "push" else t["pull_lat"]
        rows.append({"mode": m, "requests": requests, "layers": requests * p.layers, "bytes": nbytes,
                     "transfer_s": t["transfer_s"], "gbps": nbytes / max(t["transfer_s"], 1e-9) / 1e9,
                     "verify_s": t["verify_s"],
                     "p50_us": _us(percentile(lat, 50)), "p99_us": _us(percentile(lat, 99))})
    transport = "+".join(result["sent"]) or ("tcp" if device == "cpu" else "auto")
    summary = {"rows": rows, "mismatches": result["bad"], "preset": preset, "tokens": tokens, "device": device,
               "layer_bytes": layer_bytes, "transport": transport, "modes": modes}
    if not quiet:
        print_table(summary)
    return summary


def _start_quietly(proc: Any) -> None:
    """Start a child that ignores SIGINT: Ctrl-C in a terminal reaches the whole process group,
    and only this process should handle it (it stops the children), not print their tracebacks.
    The disposition is inherited through spawn's exec and kept by the child's Python."""
    if threading.current_thread() is not threading.main_thread():
        proc.start()
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc.start()
    finally:
        signal.signal(signal.SIGINT, old)


def _us(x: float | None) -> float | None:
    return None if x is None else x * 1e6


def _get(q: Any, timeout: float, procs: list[Any]) -> tuple[Any, ...]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg: tuple[Any, ...] = q.get(timeout=0.2)
        except queue.Empty:
            dead = [pr for pr in procs if not pr.is_alive() and pr.exitcode not in (0, None)]
            if dead:
                raise DemoError(f"the {dead[0].name} process exited with code {dead[0].exitcode}") from None
            if time.monotonic() > deadline:
                raise DemoError(f"the demo's processes reported nothing for {timeout:g} s") from None
            continue
        if msg[0] == "error":
            raise DemoError(f"the {msg[1]} failed: {msg[2]}")
        return msg


def print_table(s: dict[str, Any]) -> None:
    """Print a :func:`run` summary."""
    print(f"\np2pkv demo: {s['preset']} KV, {s['tokens']} tokens/request, "
          f"{s['layer_bytes'] / MiB:.2f} MiB/layer, device={s['device']}, transport={s['transport']}, "
          f"mode={'+'.join(s['modes'])}")
    hdr = (f"{'mode':<5} {'requests':>8} {'layers':>7} {'MiB':>9} {'transfer s':>10} {'GB/s':>7} "
           f"{'p50 us/layer':>13} {'p99 us/layer':>13}")
    print(hdr)
    print("-" * len(hdr))
    for r in s["rows"]:
        p50 = "-" if r["p50_us"] is None else f"{r['p50_us']:.0f}"
        p99 = "-" if r["p99_us"] is None else f"{r['p99_us']:.0f}"
        print(f"{r['mode']:<5} {r['requests']:>8} {r['layers']:>7} {r['bytes'] / MiB:>9.1f} {r['transfer_s']:>10.2f} "
              f"{r['gbps']:>7.2f} {p50:>13} {p99:>13}")
    print("transfer s: from each request's first recv/pull to its last layer (data made before, checked after);")
    print("latency: push = send until the receiver stored it, pull = one pull call")
    verify = sum(r["verify_s"] for r in s["rows"])
    verdict = "all tensors bit-exact" if s["mismatches"] == 0 else f"{s['mismatches']} MISMATCHED tensors"
    print(f"verification (regenerate and bit-compare every layer, timed apart): {verify:.2f} s, {verdict}")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    if v > MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"must be at most 1e6 seconds (about 11.6 days), got {text!r}")
    return v


def main(argv: list[str] | None = None) -> int:
    """The ``p2pkv-demo`` command; returns its exit status.

    0: every tensor arrived bit-exact; 1: a mismatch or a failure while running;
    2: bad options (one ``p2pkv-demo: error: ...`` line on stderr, after the usage).
    """
    ap = argparse.ArgumentParser(
        prog="p2pkv-demo", description="A producer and a consumer process move a synthetic Llama-3-8B KV cache over "
        "p2pkv, verify it bit for bit and print the transfer rate, latency and verification time.")
    ap.add_argument("--requests", type=_positive_int, default=16, metavar="N",
                    help="requests to move per mode; each is one whole KV cache of 32 layers (default 16)")
    ap.add_argument("--tokens", type=_positive_int, default=512, metavar="N",
                    help="prompt length in tokens per request; 128 KiB of KV per token (default 512 = 64 MiB)")
    ap.add_argument("--mode", choices=["push", "pull", "both"], default="both",
                    help="push: the producer sends; pull: the consumer fetches what the producer published "
                         "(default both)")
    ap.add_argument("--device", default="cpu", help="where tensors and pools live: cpu, cuda or cuda:N (default cpu)")
    ap.add_argument("--timeout", type=_seconds, default=60.0, metavar="SECONDS",
                    help="deadline of every wait, in seconds, at most 1e6 (default 60)")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    a = ap.parse_args(argv)
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        try:
            check_inputs(a.requests, a.tokens, a.device, a.timeout)
        except ValueError as exc:
            ap.error(str(exc))
        s = run(a.requests, a.tokens, a.mode, a.device, a.timeout)
    except DemoError as exc:
        print(f"{ap.prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{ap.prog}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"{ap.prog}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return 0 if s["mismatches"] == 0 else 1


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
