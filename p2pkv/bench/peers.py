"""Baselines for the whole-request benchmark on one GPU, measured in the same run as p2pkv.

* ``raw_ipc``: what anyone would hand-write. The consumer process opens the
  producer's 32 layer tensors once (torch's CUDA IPC sharing through a
  ``multiprocessing`` pipe); per request the producer sends ONE pipe message, the
  consumer copies the 32 layers into its own buffers (``copy_(non_blocking=True)``)
  and synchronizes its stream.
* ``nixl_ipc``: NIXL (what vLLM's NixlConnector runs), UCX backend. Both agents
  register their tensors once; the producer prepares both descriptor lists once;
  per request it makes one prepped WRITE of all 32 layers with a notification and
  polls ``check_xfer_state``; the consumer polls ``get_new_notifs()`` until the
  request's tag arrives, then holds the data.

Both time one request from the producer's start until the consumer holds every
layer (CLOCK_MONOTONIC is shared by the processes of one host), median of
``reps`` after 2 warm-ups. Layer shape: Llama-3-8B, bf16.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from typing import Any

import torch

from ..synthetic import PRESETS

__all__ = ["raw_ipc", "nixl_ipc", "nixl_available"]

_WARM = 2


def _shape(tokens: int) -> tuple[int, ...]:
    return tuple(PRESETS["llama3-8b"].layer_shape(tokens))


def nixl_available() -> bool:
    try:
        import nixl._api  # noqa: F401

        return True
    except Exception:
        return False


# ----------------------------------------------------------------------------- raw hand-rolled IPC
def _raw_consumer(conn: Any, device: str) -> None:
    import torch.multiprocessing

    torch.cuda.set_device(torch.device(device))
    stream = torch.cuda.current_stream()
    srcs: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    while True:
        msg = conn.recv()
        if msg is None:
            break
        if msg[0] == "tensors":
            srcs = msg[1]
            outs = [torch.empty_like(s) for s in srcs]
            torch.cuda.synchronize()
            conn.send("ok")
            continue
        for s, o in zip(srcs, outs, strict=True):  # "go": one message per request
            o.copy_(s, non_blocking=True)
        stream.synchronize()
        conn.send(time.monotonic())
    del srcs, outs


def raw_ipc(tokens_list: list[int], reps: int, device: str = "cuda:0") -> dict[int, list[float]]:
    """Seconds per request of the hand-rolled IPC pipeline, per token count."""
    import torch.multiprocessing

    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    p = ctx.Process(target=_raw_consumer, args=(child, device), daemon=True)
    p.start()
    out: dict[int, list[float]] = {}
    try:
        layers = PRESETS["llama3-8b"].layers
        for tokens in tokens_list:
            xs = [torch.randn(_shape(tokens), device=device).to(torch.bfloat16) for _ in range(layers)]
            torch.cuda.synchronize()
            conn.send(("tensors", xs))
            if not conn.poll(120):
                raise RuntimeError("raw IPC consumer did not open the tensors")
            conn.recv()
            times = []
            for r in range(reps + _WARM):
                time.sleep(0.005)
                t0 = time.monotonic()
                conn.send(("go",))
                if not conn.poll(60):
                    raise RuntimeError("raw IPC consumer did not answer")
                t1 = conn.recv()
                if r >= _WARM:
                    times.append(t1 - t0)
            out[tokens] = times
            conn.send(("tensors", []))
            conn.recv()
            del xs
            torch.cuda.empty_cache()
    finally:
        conn.send(None)
        p.join(30)
        if p.is_alive():
            p.kill()
    return out


# ----------------------------------------------------------------------------- NIXL
def _nixl_consumer(conn: Any, device: str) -> None:
    from nixl._api import nixl_agent, nixl_agent_config

    torch.cuda.set_device(torch.device(device))
    agent = nixl_agent("p2pkv-bench-consumer", nixl_agent_config(backends=["UCX"]))
    outs: list[torch.Tensor] = []
    reg = None
    while True:
        msg = conn.recv()
        if msg is None:
            break
        if msg[0] == "alloc":
            if reg is not None:
                agent.deregister_memory(reg)
                reg = None
            outs = [torch.empty(msg[1], dtype=torch.bfloat16, device=device) for _ in range(msg[2])]
            torch.cuda.synchronize()
            if outs:
                reg = agent.register_memory(outs)
            # metadata AFTER registering, so the producer sees these regions
            conn.send((agent.get_agent_metadata(), [(t.data_ptr(), t.numel() * t.element_size(),
                                                     torch.device(device).index or 0) for t in outs]))
            continue
        tag = msg[1]  # "expect": poll until this request's notification arrives
        conn.send("polling")
        deadline = time.monotonic() + 60
        seen = False
        while not seen and time.monotonic() < deadline:
            for notes in agent.get_new_notifs().values():
                if tag in notes:
                    seen = True
        conn.send(time.monotonic() if seen else None)
    if reg is not None:
        agent.deregister_memory(reg)


def nixl_ipc(tokens_list: list[int], reps: int, device: str = "cuda:0") -> dict[int, list[float]]:
    """Seconds per request through NIXL (UCX) between two processes, per token count."""
    from nixl._api import nixl_agent, nixl_agent_config

    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    p = ctx.Process(target=_nixl_consumer, args=(child, device), daemon=True)
    p.start()
    agent = nixl_agent("p2pkv-bench-producer", nixl_agent_config(backends=["UCX"]))
    out: dict[int, list[float]] = {}
    layers = PRESETS["llama3-8b"].layers
    try:
        for tokens in tokens_list:
            xs = [torch.randn(_shape(tokens), device=device).to(torch.bfloat16) for _ in range(layers)]
            torch.cuda.synchronize()
            reg = agent.register_memory(xs)
            conn.send(("alloc", _shape(tokens), layers))
            if not conn.poll(120):
                raise RuntimeError("NIXL consumer did not register its memory")
            meta, remote = conn.recv()
            name = agent.add_remote_agent(meta)
            local_h = agent.prep_xfer_dlist("NIXL_INIT_AGENT", agent.get_xfer_descs(xs))
            remote_h = agent.prep_xfer_dlist(name, remote, "VRAM")
            idx = list(range(layers))
            times = []
            for r in range(reps + _WARM):
                tag = f"req-{tokens}-{r}".encode()
                conn.send(("expect", tag))
                conn.recv()
                time.sleep(0.005)
                t0 = time.monotonic()
                h = agent.make_prepped_xfer("WRITE", local_h, idx, remote_h, idx, notif_msg=tag)
                state = agent.transfer(h)
                while state not in ("DONE", "ERR"):
                    state = agent.check_xfer_state(h)
                if state == "ERR":
                    raise RuntimeError("NIXL transfer failed")
                if not conn.poll(60):
                    raise RuntimeError("NIXL consumer did not answer")
                t1 = conn.recv()
                agent.release_xfer_handle(h)
                if t1 is None:
                    raise RuntimeError("NIXL notification never arrived")
                if r >= _WARM:
                    times.append(t1 - t0)
            out[tokens] = times
            agent.release_dlist_handle(local_h)
            agent.release_dlist_handle(remote_h)
            agent.remove_remote_agent(name)
            agent.deregister_memory(reg)
            del xs
            torch.cuda.empty_cache()
        conn.send(("alloc", (1,), 0))
        conn.recv()
    finally:
        conn.send(None)
        p.join(30)
        if p.is_alive():
            p.kill()
    return out


def median_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 3)
