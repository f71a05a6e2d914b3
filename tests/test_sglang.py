"""p2pkv's SGLang transfer backend (``p2pkv.adapters.sglang``), CPU, with real sockets and processes.

Two spawned processes play SGLang's prefill and decode schedulers: they call
``init`` / ``send`` / ``send_metadata`` / ``poll`` / ``abort`` / ``clear`` in the
order ``sglang/srt/disaggregation/prefill.py`` and ``decode.py`` (0.5.23) do,
and accept only the ``KVPoll`` states those loops accept at each point. The KV
pool is raw memory handed over as pointers in ``KVArgs``, filled field by field
as SGLang's ``_init_kv_manager`` fills them on each side (the decode side has no
head counts). The ordinary flow runs with p2pkv's default engine deadlines.
In-process tests below cover what issue 22 found with real servers: a retry
under the same room, the decode side giving up, a prefill restart, a bootstrap
server that is away, ``send`` returning before the work, hostile metadata.
Without sglang the backend's stand-in base classes are used; tests/test_sglang_real.py
runs the same flows with the real package (classes taken from SGLang's own
``get_kv_class`` after ``install()``), tests/test_sglang_e2e.py real servers.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from typing import Any

import numpy as np
import pytest
import torch

from p2pkv import ConfigError, EngineConfig, InvalidKey, TransferAborted, TransferKey, TransferTimeout
from p2pkv.adapters import sglang as sg
from p2pkv.adapters.sglang import KVPoll
from .conftest import process_context

NUM_PAGES, PAGE, HEAD_BYTES, LAYERS = 64, 4, 32, 3  # K and V per layer: 6 buffers
AUX_SLOTS, AUX_ITEM = 8, 48
TIMEOUTS = dict(bootstrap_timeout_s=3.0, waiting_timeout_s=12.0, buffer_device="cpu")
ENGINE = dict(host="127.0.0.1", port=0, timeout_s=5.0, peer_timeout_s=1.5, heartbeat_s=0.2, ttl_s=30.0,
              pool_bytes=32 * 2**20)
# p2pkv's defaults (peer_timeout_s, heartbeat_s, timeout_s, ttl_s unset), only a smaller pool: what a user gets
DEFAULT_ENGINE = dict(pool_bytes=32 * 2**20)
MAX_POLL_S = 0.25  # poll() must never block
# what SGLang's inflight queue accepts from a sender between send() and the end (prefill.py): the chunks are
# queued for the backend's workers, so the state may still be WaitingForInput right after send()
SENDING = {KVPoll.WaitingForInput, KVPoll.Transferring}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pool:
    """A paged KV pool in raw memory plus the KVArgs describing it, filled field by field as SGLang
    0.5.23's ``_init_kv_manager`` fills them on each side (prefill.py / decode.py). In particular the
    decode side never sets ``kv_head_num`` / ``total_kv_head_num`` (only its staging branch does, after
    the manager is built): the backend must work without them."""

    def __init__(self, kv_args_cls: Any, *, seed: int | None, heads: int, total_heads: int, rank: int = 0,
                 device: str = "cpu", side: str | None = None, attn_tp: int = 1):
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        side = side or ("prefill" if seed is not None else "decode")
        nbytes = NUM_PAGES * PAGE * heads * HEAD_BYTES
        self.kv = [torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8) if g is not None
                   else torch.zeros(nbytes, dtype=torch.uint8) for _ in range(2 * LAYERS)]
        self.aux = [torch.zeros(AUX_SLOTS * AUX_ITEM, dtype=torch.uint8) for _ in range(2)]
        self.kv = [t.to(device) for t in self.kv]
        self.aux = [t.to(device) for t in self.aux]
        a = kv_args_cls()
        # both sides (prefill.py / decode.py _init_kv_manager)
        a.engine_rank = rank if side == "prefill" else rank % attn_tp
        a.pp_rank = 0
        a.system_dp_rank = 0
        a.kv_cache_dtype_str = "bfloat16"
        a.kv_layout = None
        a.kv_data_ptrs = [t.data_ptr() for t in self.kv]
        a.kv_data_lens = [t.numel() for t in self.kv]
        a.kv_item_lens = [PAGE * heads * HEAD_BYTES] * len(self.kv)
        a.num_draft_entries = 0
        a.kv_layer_ids = [i % LAYERS for i in range(2 * LAYERS)]
        a.page_size = PAGE
        a.aux_data_ptrs = [t.data_ptr() for t in self.aux]
        a.aux_data_lens = [t.numel() for t in self.aux]
        a.aux_item_lens = [AUX_ITEM] * len(self.aux)
        a.state_types = []  # setup_state_kv_args: no hybrid-model state
        a.ib_device = None
        a.gpu_id = torch.device(device).index or 0
        if side == "prefill":
            a.rust_http_port = None
            a.prefill_start_layer = 0
            a.prefill_end_layer = LAYERS
            a.kv_head_num = heads  # non-MLA only, and on the prefill side only
            a.total_kv_head_num = total_heads
        self.args = a
        self.heads = heads

    def pages(self, i: int) -> torch.Tensor:
        return self.kv[i].view(NUM_PAGES, PAGE, self.heads, HEAD_BYTES)

    def aux_row(self, j: int, slot: int) -> torch.Tensor:
        return self.aux[j].view(AUX_SLOTS, AUX_ITEM)[slot]


def server_args(bport: int, tp: int = 1, dp: int = 1) -> Any:
    return types.SimpleNamespace(host="127.0.0.1", disaggregation_bootstrap_port=bport, tp_size=tp, dp_size=dp,
                                 enable_dp_attention=False, pp_size=1)


def classes(real: bool) -> dict[str, Any]:
    """The backend's classes: straight from the module, or (real sglang) through SGLang's get_kv_class."""
    if not real:
        return dict(kvargs=sg.KVArgs, manager=sg.P2pkvKVManager, sender=sg.P2pkvKVSender,
                    receiver=sg.P2pkvKVReceiver, server=sg.P2pkvBootstrapServer, poll=sg.KVPoll)
    sg.install()
    from sglang.srt.disaggregation.base.conn import KVPoll as RealPoll
    from sglang.srt.disaggregation.utils import KVClassType, TransferBackend, get_kv_class

    tb = TransferBackend("p2pkv")
    return dict(kvargs=get_kv_class(tb, KVClassType.KVARGS), manager=get_kv_class(tb, KVClassType.MANAGER),
                sender=get_kv_class(tb, KVClassType.SENDER), receiver=get_kv_class(tb, KVClassType.RECEIVER),
                server=get_kv_class(tb, KVClassType.BOOTSTRAP_SERVER), poll=RealPoll)


def engine_for(scenario: str) -> dict[str, Any]:
    """The ordinary flow runs with p2pkv's default deadlines; the kill flow with short liveness deadlines."""
    return ENGINE if scenario == "kill" else DEFAULT_ENGINE


def poll_until(obj: Any, done: set[int], allowed: set[int], deadline_s: float, stats: dict[str, float]) -> int:
    """Poll like SGLang's event loop; fail on a state its loop would reject at this point."""
    end = time.monotonic() + deadline_s
    while True:
        t0 = time.monotonic()
        st = obj.poll()
        stats["max_poll_s"] = max(stats.get("max_poll_s", 0.0), time.monotonic() - t0)
        if st in done:
            return st
        if st not in allowed:
            raise AssertionError(f"unexpected KVPoll state {st}")
        if time.monotonic() > end:
            raise AssertionError(f"still in state {st} after {deadline_s}s (no deadline fired)")
        time.sleep(0.005)


def failure(obj: Any) -> str:
    try:
        obj.failure_exception()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no exception"


def chunks_of(pages: list[int]) -> list[list[int]]:
    n = len(pages)
    return [pages[: n // 3], pages[n // 3: 2 * n // 3], pages[2 * n // 3:]]


def req_pages(seed: int, n: int) -> tuple[list[int], list[int]]:
    """Random, scattered page ids on each side for one request."""
    rng = np.random.default_rng(seed)
    return rng.permutation(NUM_PAGES)[:n].tolist(), rng.permutation(NUM_PAGES)[:n].tolist()


# ----------------------------------------------------------------------------- the two processes
def prefill_proc(real: bool, bport: int, rooms: list[int], scenario: str, q: Any, ev: Any, go: Any) -> None:
    """SGLang's prefill side: bootstrap queue -> chunked prefill sends -> inflight queue."""
    try:
        C = classes(real)
        P = C["poll"]
        server = C["server"]("127.0.0.1", bport)
        pool = Pool(C["kvargs"], seed=1234, heads=2, total_heads=2)
        mgr = C["manager"](pool.args, "prefill", server_args(bport), False,
                           config=EngineConfig(**engine_for(scenario)), settings=sg.SglangSettings(**TIMEOUTS))
        q.put(("ready", None))
        assert go.wait(60), "the decode process never came up"
        for room in rooms:
            stats: dict[str, float] = {}
            ppages, _ = req_pages(room, 30)
            sender = C["sender"](mgr, f"127.0.0.1:{bport}", room)
            st = poll_until(sender, {P.WaitingForInput, P.Failed}, {P.Bootstrapping}, 20, stats)
            if st == P.Failed:
                q.put(("prefill", dict(room=room, state=int(st), error=failure(sender), **stats)))
                continue
            assert sender.pop_decode_prefix_len() == 0
            aux_slot = room % AUX_SLOTS
            for j in range(2):
                pool.aux_row(j, aux_slot).copy_(torch.arange(AUX_ITEM, dtype=torch.uint8) + room % 100 + j)
            sender.init(len(ppages), aux_slot)
            chunks = chunks_of(ppages)
            for k, chunk in enumerate(chunks):
                assert sender.should_send_kv_chunk(len(chunk), k == len(chunks) - 1)
                sender.send(np.asarray(chunk, dtype=np.int32), None, num_kv_tokens=len(chunk) * PAGE)
                st = sender.poll()
                if st == P.Failed:
                    break
                assert st in (P.WaitingForInput, P.Transferring, P.Success), st
                if scenario == "abort_prefill" and k == 1:
                    sender.abort()
                    break
                if scenario == "kill" and k == 1:
                    q.put(("chunk1_sent", time.monotonic()))
                    time.sleep(60)  # the test SIGKILLs this process here
                if scenario == "abort_decode" and k == 0:
                    assert ev.wait(20), "decode never aborted"
            st = poll_until(sender, {P.Success, P.Failed}, {P.WaitingForInput, P.Transferring}, 20, stats)
            q.put(("prefill", dict(room=room, state=int(st), error=failure(sender) if st == P.Failed else None,
                                   metric_bytes=sender.get_transfer_metric().transfer_total_bytes, **stats)))
            sender.clear()
        q.put(("prefill_stats", settled_use(mgr.engine)))
        assert ev.wait(30) or True
        mgr.close()
        server.close()
    except BaseException as e:  # report, never hang the test
        import traceback

        q.put(("error", traceback.format_exc()))
        raise SystemExit(1) from e


def decode_proc(real: bool, bport: int, rooms: list[int], scenario: str, q: Any, ev: Any, go: Any) -> None:
    """SGLang's decode side: prealloc queue (bootstrap, send_metadata) -> transfer queue."""
    try:
        C = classes(real)
        P = C["poll"]
        pool = Pool(C["kvargs"], seed=None, heads=2, total_heads=2)
        mgr = C["manager"](pool.args, "decode", server_args(bport), False,
                           config=EngineConfig(**engine_for(scenario)), settings=sg.SglangSettings(**TIMEOUTS))
        addr = f"127.0.0.1:{bport}"
        end = time.monotonic() + 20
        while scenario != "bootstrap_down" and not mgr.try_ensure_parallel_info(addr):
            assert time.monotonic() < end, "prefill never registered"
            time.sleep(0.05)
        go.set()
        src = Pool(C["kvargs"], seed=1234, heads=2, total_heads=2)  # what the prefill side holds
        for room in rooms:
            stats: dict[str, float] = {}
            ppages, dpages = req_pages(room, 30)
            recv = C["receiver"](mgr, addr, room)
            recv.init(0)
            t0 = time.monotonic()
            st = poll_until(recv, {P.WaitingForInput, P.Failed}, {P.Bootstrapping}, 20, stats)
            if st == P.Failed:
                q.put(("decode", dict(room=room, state=int(st), error=failure(recv),
                                      elapsed=time.monotonic() - t0, **stats)))
                recv.clear()
                continue
            aux_slot = (room + 3) % AUX_SLOTS
            recv.send_metadata(np.asarray(dpages, dtype=np.int32), aux_slot, None)
            if scenario == "abort_decode":
                poll_until(recv, {P.Transferring}, {P.WaitingForInput}, 10, stats)
                recv.abort()
                ev.set()
            st = poll_until(recv, {P.Success, P.Failed}, {P.WaitingForInput, P.Transferring}, 30, stats)
            res: dict[str, Any] = dict(room=room, state=int(st), t_end=time.monotonic(), **stats)
            if st == P.Failed:
                res["error"] = failure(recv)
            else:
                exact = all(torch.equal(pool.pages(i)[dpages], src.pages(i)[ppages]) for i in range(2 * LAYERS))
                untouched = sorted(set(range(NUM_PAGES)) - set(dpages))
                zero = all(int(pool.pages(i)[untouched].count_nonzero()) == 0 for i in range(2 * LAYERS))
                aux = all(torch.equal(pool.aux_row(j, aux_slot),
                                      torch.arange(AUX_ITEM, dtype=torch.uint8) + room % 100 + j) for j in range(2))
                res.update(exact=exact, untouched_zero=zero, aux=aux)
                for t in pool.kv:
                    t.zero_()
            q.put(("decode", res))
            recv.clear()
        q.put(("decode_stats", settled_use(mgr.engine)))
        ev.set()
        mgr.close()
    except BaseException as e:
        import traceback

        q.put(("error", traceback.format_exc()))
        raise SystemExit(1) from e


def settled_use(eng: Any, wait_s: float = 3.0) -> int:
    """Bytes still held in the engine's pool and mailboxes (0 once everything was freed)."""
    end = time.monotonic() + wait_s
    while True:
        st = eng.stats()
        used = st["pool"]["in_use"] + st["inbox"]["bytes_held"] + st["outbox"]["bytes_held"]
        if used == 0 or time.monotonic() > end:
            return used
        time.sleep(0.05)


_stashes: dict[int, list[tuple[str, Any]]] = {}


def q_get(q: Any, kind: str, timeout: float = 30.0) -> Any:
    """Next message of ``kind`` (others are kept for later calls)."""
    _stash = _stashes.setdefault(id(q), [])
    for i, (k, v) in enumerate(_stash):
        if k == kind:
            del _stash[i]
            return v
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            k, v = q.get(timeout=max(0.01, end - time.monotonic()))
        except Exception:
            break
        if k == "error":
            raise AssertionError(f"a scheduler process failed:\n{v}")
        if k == kind:
            return v
        _stash.append((k, v))
    raise AssertionError(f"no {kind!r} message within {timeout}s")


class Flow:
    """Starts the prefill and decode processes of one scenario and collects their reports."""

    def __init__(self, real: bool, rooms: list[int], scenario: str = "ok", *, with_prefill: bool = True):
        _stashes.clear()
        ctx = process_context()
        # one queue per process: a SIGKILLed prefill must not take the decode's channel with it
        self.qp, self.qd, self.ev, self.go = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
        self.bport = free_port()
        self.procs: list[Any] = []
        if with_prefill:
            self.prefill = ctx.Process(target=prefill_proc,
                                       args=(real, self.bport, rooms, scenario, self.qp, self.ev, self.go),
                                       daemon=True)
            self.prefill.start()
            self.procs.append(self.prefill)
            q_get(self.qp, "ready", 90)
        self.decode = ctx.Process(target=decode_proc,
                                  args=(real, self.bport, rooms, scenario, self.qd, self.ev, self.go),
                                  daemon=True)
        self.decode.start()
        self.procs.append(self.decode)

    def get(self, kind: str, timeout: float = 60.0) -> Any:
        return q_get(self.qd if kind.startswith("decode") else self.qp, kind, timeout)

    def close(self) -> None:
        for p in self.procs:
            p.join(timeout=15)
            if p.is_alive():
                p.kill()
                p.join(5)


def run_ok(real: bool) -> None:
    rooms = [11, 2**40 + 7, 12345]
    f = Flow(real, rooms)
    try:
        for room in rooms:
            d, p = f.get("decode"), f.get("prefill")
            assert d["room"] == room and p["room"] == room
            assert d["state"] == KVPoll.Success, d
            assert p["state"] == KVPoll.Success, p
            assert d["exact"] and d["untouched_zero"] and d["aux"], d
            assert d["max_poll_s"] < MAX_POLL_S and p["max_poll_s"] < MAX_POLL_S, (d, p)
            assert p["metric_bytes"] >= 30 * PAGE * 2 * HEAD_BYTES * 2 * LAYERS
        # every pool byte came back on both sides
        assert f.get("decode_stats") == 0
        assert f.get("prefill_stats") == 0
    finally:
        f.close()
    assert f.decode.exitcode == 0 and f.prefill.exitcode == 0


def run_abort(real: bool, side: str) -> None:
    f = Flow(real, [77], f"abort_{side}")
    try:
        d, p = f.get("decode"), f.get("prefill")
        assert d["state"] == KVPoll.Failed and p["state"] == KVPoll.Failed, (d, p)
        assert "TransferAborted" in d["error"] and "TransferAborted" in p["error"], (d, p)
        assert f"aborted on the {side} side" in (d["error"] if side == "decode" else p["error"])
        assert f.get("decode_stats") == 0
        assert f.get("prefill_stats") == 0
    finally:
        f.close()


def run_kill(real: bool) -> None:
    f = Flow(real, [99], "kill")
    try:
        f.get("chunk1_sent")
        os.kill(f.prefill.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        d = f.get("decode", 30)
        assert d["state"] == KVPoll.Failed, d
        # noticed as a lost peer (at once for a closed connection with data of the transfer in flight,
        # else by the receiver's liveness probe every peer_timeout_s), well before the waiting timeout
        assert "PeerLost" in d["error"], d
        assert d["t_end"] - t_kill < TIMEOUTS["waiting_timeout_s"] / 2, d["t_end"] - t_kill
    finally:
        f.close()


def run_bootstrap_down(real: bool) -> None:
    f = Flow(real, [5], "bootstrap_down", with_prefill=False)
    try:
        d = f.get("decode", 30)
        assert d["state"] == KVPoll.Failed, d
        assert "TransferTimeout" in d["error"] and "bootstrap server" in d["error"], d
        assert TIMEOUTS["bootstrap_timeout_s"] - 0.2 <= d["elapsed"] < TIMEOUTS["bootstrap_timeout_s"] + 2.0, d
    finally:
        f.close()


# ----------------------------------------------------------------------------- two-process flows
@pytest.mark.timeout(120)
def test_chunked_prefill_three_chunks_bit_exact_random_pages():
    run_ok(real=False)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("side", ["prefill", "decode"])
def test_abort_frees_both_sides(side):
    run_abort(False, side)


@pytest.mark.timeout(120)
def test_prefill_killed_midway_fails_decode_fast():
    run_kill(False)


@pytest.mark.timeout(120)
def test_bootstrap_server_down_fails_within_deadline():
    run_bootstrap_down(False)


# ----------------------------------------------------------------------------- in-process: TP, deadlines, units
def _mgr(pool: Pool, mode: str, bport: int, tp: int = 1, **settings: Any) -> sg.P2pkvKVManager:
    if pool.kv[0].is_cuda:
        settings.setdefault("buffer_device", "cuda")
    s = dict(TIMEOUTS, **settings)
    return sg.P2pkvKVManager(pool.args, mode, server_args(bport, tp), False, config=EngineConfig(**ENGINE),
                             settings=sg.SglangSettings(**s))


def _drive(senders: list[Any], receivers: list[tuple[Any, list[int], int]], ppages: list[int]) -> None:
    stats: dict[str, float] = {}
    for r, _dpages, _slot in receivers:
        r.init(0)
    for r, dpages, slot in receivers:
        assert poll_until(r, {KVPoll.WaitingForInput}, {KVPoll.Bootstrapping}, 10, stats) == KVPoll.WaitingForInput
        r.send_metadata(np.asarray(dpages), slot, None)
    for s in senders:
        assert poll_until(s, {KVPoll.WaitingForInput}, {KVPoll.Bootstrapping}, 10, stats) == KVPoll.WaitingForInput
        s.init(len(ppages), 1)
    for chunk in chunks_of(ppages):
        for s in senders:
            s.send(np.asarray(chunk), None)
    for s in senders:
        assert poll_until(s, {KVPoll.Success, KVPoll.Failed}, SENDING, 20, stats) == KVPoll.Success, \
            failure(s)
    for r, _, _ in receivers:
        assert poll_until(r, {KVPoll.Success, KVPoll.Failed}, {KVPoll.WaitingForInput, KVPoll.Transferring}, 20,
                          stats) == KVPoll.Success, failure(r)
    assert stats["max_poll_s"] < MAX_POLL_S


@pytest.mark.timeout(60)
@pytest.mark.parametrize("p_tp,d_tp", [(2, 1), (1, 2), (2, 4)])
def test_different_tp_sizes_slice_heads(p_tp, d_tp):
    """Heads sliced by kv_head_num / total_kv_head_num: 2 KV heads, either side's TP may differ."""
    total = 2
    ppages, dpages = req_pages(3, 21)
    bport = free_port()
    mgrs: list[sg.P2pkvKVManager] = []
    with sg.P2pkvBootstrapServer("127.0.0.1", bport):
        try:
            ph = max(1, total // p_tp)
            dh = max(1, total // d_tp)
            ppools = [Pool(sg.KVArgs, seed=100 + q, heads=ph, total_heads=total, rank=q) for q in range(p_tp)]
            for pp in ppools:
                for j in range(2):
                    pp.aux_row(j, 1).fill_(40 + j)
            dpools = [Pool(sg.KVArgs, seed=None, heads=dh, total_heads=total, rank=r, attn_tp=d_tp)
                      for r in range(d_tp)]
            pm = [_mgr(pp, "prefill", bport, p_tp) for pp in ppools]
            dm = [_mgr(dp, "decode", bport, d_tp) for dp in dpools]
            mgrs = pm + dm
            senders = [sg.P2pkvKVSender(m, f"127.0.0.1:{bport}", 42) for m in pm]
            receivers = [(sg.P2pkvKVReceiver(m, f"127.0.0.1:{bport}", 42), dpages, 2) for m in dm]
            _drive(senders, receivers, ppages)
            # the full-head reference: concatenate the prefill ranks' distinct heads
            for i in range(2 * LAYERS):
                heads = {}
                for q, pp in enumerate(ppools):
                    for k in range(ph):
                        heads.setdefault(sg.head_start(q, p_tp, total) + k, pp.pages(i)[ppages][:, :, k])
                for r, dp in enumerate(dpools):
                    for k in range(dh):
                        h = sg.head_start(r, d_tp, total) + k
                        assert torch.equal(dp.pages(i)[dpages][:, :, k], heads[h]), (i, r, k)
            for dp in dpools:
                assert all(bool((dp.aux_row(j, 2) == 40 + j).all()) for j in range(2))
        finally:
            for m in mgrs:
                m.close()


@pytest.mark.timeout(60)
def test_prefill_dp_rank_picks_the_dp_worker():
    """Plain DP on the prefill side: the decode's init(prefill_dp_rank) selects the worker."""
    ppages, dpages = req_pages(4, 12)
    bport = free_port()
    mgrs: list[sg.P2pkvKVManager] = []
    with sg.P2pkvBootstrapServer("127.0.0.1", bport):
        try:
            workers = []
            for d in range(2):
                pool = Pool(sg.KVArgs, seed=300 + d, heads=2, total_heads=2)
                pool.args.system_dp_rank = d
                m = sg.P2pkvKVManager(pool.args, "prefill", server_args(bport, 1, 2), False,
                                      config=EngineConfig(**ENGINE), settings=sg.SglangSettings(**TIMEOUTS))
                mgrs.append(m)
                workers.append((pool, m))
            dpool = Pool(sg.KVArgs, seed=None, heads=2, total_heads=2)
            dm = _mgr(dpool, "decode", bport)
            mgrs.append(dm)
            assert dm.try_ensure_parallel_info(f"127.0.0.1:{bport}")
            assert dm.prefill_info_table[f"127.0.0.1:{bport}"].dp_size == 2
            s = sg.P2pkvKVSender(workers[1][1], f"127.0.0.1:{bport}", 44)
            r = sg.P2pkvKVReceiver(dm, f"127.0.0.1:{bport}", 44)
            stats: dict[str, float] = {}
            r.init(1)
            poll_until(r, {KVPoll.WaitingForInput}, {KVPoll.Bootstrapping}, 10, stats)
            r.send_metadata(np.asarray(dpages), 0, None)
            poll_until(s, {KVPoll.WaitingForInput}, {KVPoll.Bootstrapping}, 10, stats)
            s.init(len(ppages), 0)
            for chunk in chunks_of(ppages):
                s.send(np.asarray(chunk), None)
            assert poll_until(s, {KVPoll.Success, KVPoll.Failed}, SENDING, 20, stats) == KVPoll.Success
            assert poll_until(r, {KVPoll.Success, KVPoll.Failed}, {KVPoll.WaitingForInput, KVPoll.Transferring}, 20,
                              stats) == KVPoll.Success, failure(r)
            src = workers[1][0]
            assert all(torch.equal(dpool.pages(i)[dpages], src.pages(i)[ppages]) for i in range(2 * LAYERS))
        finally:
            for m in mgrs:
                m.close()


@pytest.mark.timeout(30)
def test_sender_fails_when_decode_never_sends_metadata():
    bport = free_port()
    with sg.P2pkvBootstrapServer("127.0.0.1", bport):
        m = _mgr(Pool(sg.KVArgs, seed=1, heads=2, total_heads=2), "prefill", bport, bootstrap_timeout_s=0.5)
        try:
            s = sg.P2pkvKVSender(m, f"127.0.0.1:{bport}", 8)
            st = poll_until(s, {KVPoll.Failed}, {KVPoll.Bootstrapping}, 5, {})
            assert st == KVPoll.Failed
            with pytest.raises(TransferTimeout, match="no KV metadata from decode rank 0"):
                s.failure_exception()
        finally:
            m.close()


@pytest.mark.timeout(30)
def test_sender_fails_when_scheduler_never_sends_a_chunk():
    """WaitingForInput has a deadline too (SGLang's waiting timeout)."""
    bport = free_port()
    with sg.P2pkvBootstrapServer("127.0.0.1", bport):
        pm = _mgr(Pool(sg.KVArgs, seed=1, heads=2, total_heads=2), "prefill", bport, waiting_timeout_s=0.5)
        dm = _mgr(Pool(sg.KVArgs, seed=None, heads=2, total_heads=2), "decode", bport, waiting_timeout_s=3.0)
        try:
            s = sg.P2pkvKVSender(pm, f"127.0.0.1:{bport}", 9)
            r = sg.P2pkvKVReceiver(dm, f"127.0.0.1:{bport}", 9)
            r.init(0)
            poll_until(r, {KVPoll.WaitingForInput}, {KVPoll.Bootstrapping}, 5, {})
            r.send_metadata(np.arange(4), 0, None)
            poll_until(s, {KVPoll.WaitingForInput}, {KVPoll.Bootstrapping}, 5, {})
            s.init(4, 0)
            assert poll_until(s, {KVPoll.Failed}, {KVPoll.WaitingForInput}, 5, {}) == KVPoll.Failed
            assert "sent no KV chunk" in failure(s)
            # the receiver waits for chunk 0 no longer than its waiting_timeout_s either (or hears of the abort)
            assert poll_until(r, {KVPoll.Failed}, {KVPoll.WaitingForInput}, 10, {}) == KVPoll.Failed
            assert "TransferTimeout" in failure(r) or "TransferAborted" in failure(r)
        finally:
            pm.close()
            dm.close()


@pytest.mark.timeout(30)
def test_bootstrap_server_rejects_bad_registrations():
    import json
    import urllib.error
    import urllib.request

    good = {"v": 2, "dp_rank": 0, "tp_rank": 0, "dp_size": 1, "tp_size": 1, "address": "127.0.0.1:5",
            "page_size": 4, "kv_head_num": 2, "total_kv_head_num": 2, "is_mla": False, "item_lens": [256],
            "aux_item_lens": [48], "kv_cache_dtype": "bf16", "instance": "abc"}
    bad = [b"not json", b"[1, 2]", b"\xff\xfe", json.dumps({"dp_rank": 0}).encode()]
    for change in ({"v": 1}, {"tp_rank": 1}, {"dp_rank": -1}, {"tp_size": 0}, {"address": "nowhere"},
                   {"address": 5}, {"page_size": True}, {"item_lens": []}, {"item_lens": [0]},
                   {"item_lens": "256"}, {"is_mla": "no"}, {"instance": ""}, {"kv_head_num": 2.0}):
        bad.append(json.dumps({**good, **change}).encode())
    with sg.P2pkvBootstrapServer("127.0.0.1", 0) as srv:
        for body in bad:
            req = urllib.request.Request(f"http://{srv.address}/register", data=body, method="PUT")
            with pytest.raises(urllib.error.HTTPError) as ei:
                urllib.request.urlopen(req, timeout=5)
            ei.value.close()  # an HTTP error holds its connection's socket until closed
            assert ei.value.code == 400, body[:80]
        # an oversized body is refused before it is read (the client may see the refusal or a reset connection)
        req = urllib.request.Request(f"http://{srv.address}/register", data=b"x" * (2 << 20), method="PUT")
        with pytest.raises((urllib.error.HTTPError, ConnectionError, urllib.error.URLError)) as ei:
            urllib.request.urlopen(req, timeout=5)
        if isinstance(ei.value, urllib.error.HTTPError):
            ei.value.close()
            assert ei.value.code == 400
        with urllib.request.urlopen(f"http://{srv.address}/route", timeout=5) as resp:
            assert json.loads(resp.read()) == {"ranks": {}}
        req = urllib.request.Request(f"http://{srv.address}/register", data=json.dumps(good).encode(), method="PUT")
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(f"http://{srv.address}/route", timeout=5) as resp:
            assert json.loads(resp.read()) == {"ranks": {"0": {"0": good}}}


def test_bootstrap_http_error_is_an_oserror_naming_the_status_and_closes_its_socket():
    import gc
    import warnings

    with sg.P2pkvBootstrapServer("127.0.0.1", 0) as srv, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(3):
            with pytest.raises(OSError, match=r"PUT .*/register: HTTP 400") as ei:
                sg.bootstrap.http_json("PUT", f"http://{srv.address}/register", {"v": 1}, 5)
            del ei
        gc.collect()
    assert not [w for w in seen if issubclass(w.category, ResourceWarning)], [str(w.message) for w in seen]


def test_layout_mismatch_is_a_typed_failure():
    bport = free_port()
    with sg.P2pkvBootstrapServer("127.0.0.1", bport):
        pm = _mgr(Pool(sg.KVArgs, seed=1, heads=2, total_heads=2), "prefill", bport)
        bad = Pool(sg.KVArgs, seed=None, heads=2, total_heads=2)
        bad.args.kv_item_lens = [PAGE * 2 * 16] * len(bad.kv)  # other head size
        dm = _mgr(bad, "decode", bport)
        try:
            r = sg.P2pkvKVReceiver(dm, f"127.0.0.1:{bport}", 1)
            r.init(0)
            assert poll_until(r, {KVPoll.Failed}, {KVPoll.Bootstrapping}, 5, {}) == KVPoll.Failed
            assert "ShapeMismatch" in failure(r)
        finally:
            pm.close()
            dm.close()


def test_plan_sources():
    kw = dict(total_heads=8, is_mla=False)
    assert sg.plan_sources(decode_rank=0, decode_tp=1, decode_heads=8, prefill_tp=2, prefill_heads=4, **kw) == \
        {0: (0, 4), 1: (4, 8)}
    assert sg.plan_sources(decode_rank=1, decode_tp=2, decode_heads=4, prefill_tp=1, prefill_heads=8, **kw) == \
        {0: (4, 8)}
    assert sg.plan_sources(decode_rank=3, decode_tp=4, decode_heads=2, prefill_tp=2, prefill_heads=4, **kw) == \
        {0: None, 1: (6, 8)}
    # replicated heads (TP 4 > 2 heads): each head taken once, from the first rank holding it
    assert sg.plan_sources(decode_rank=0, decode_tp=1, decode_heads=2, prefill_tp=4, prefill_heads=1,
                           total_heads=2, is_mla=False) == {0: (0, 1), 1: None, 2: (1, 2), 3: None}
    assert sg.plan_sources(decode_rank=3, decode_tp=4, decode_heads=1, prefill_tp=2, prefill_heads=1,
                           total_heads=2, is_mla=True) == {0: None, 1: (0, 0)}
    with pytest.raises(ConfigError):
        sg.plan_sources(decode_rank=0, decode_tp=1, decode_heads=8, prefill_tp=2, prefill_heads=2, **kw)


def test_transfer_id_and_settings():
    assert sg.transfer_id_for_room(7) == "sglang-7"
    assert sg.transfer_id_for_room(np.int64(2**62)) == f"sglang-{2**62}"
    for bad in (-1, "7", None, 1.0, True):
        with pytest.raises(InvalidKey):
            sg.transfer_id_for_room(bad)
    s = sg.SglangSettings.from_env({"SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "12",
                                    "P2PKV_SGLANG_BOOTSTRAP_TIMEOUT_S": "3",
                                    "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "9"})
    assert (s.waiting_timeout_s, s.bootstrap_timeout_s) == (12.0, 3.0)
    for env in ({"P2PKV_SGLANG_WAITING_TIMEOUT_S": "x"}, {"P2PKV_SGLANG_HTTP_TIMEOUT_S": "0"},
                {"P2PKV_SGLANG_BUFFER_DEVICE": "tpu"}):
        with pytest.raises(ConfigError):
            sg.SglangSettings.from_env(env)


def test_wrap_buffer_is_zero_copy_and_manager_validates():
    t = torch.arange(64, dtype=torch.uint8)
    w = sg.wrap_buffer(t.data_ptr(), 64, torch.device("cpu"))
    w[3] = 200
    assert int(t[3]) == 200
    with pytest.raises(ConfigError):
        sg.wrap_buffer(0, 16, torch.device("cpu"))
    pool = Pool(sg.KVArgs, seed=None, heads=2, total_heads=2)
    pool.args.state_types = ["mamba"]
    with pytest.raises(ConfigError, match="state buffers"):
        _mgr(pool, "decode", free_port())
    pool.args.state_types = []
    pool.args.kv_item_lens = [PAGE * 2 * HEAD_BYTES + 1] * len(pool.kv)
    with pytest.raises(ConfigError):
        _mgr(pool, "decode", free_port())
    with pytest.raises(ConfigError):
        _mgr(Pool(sg.KVArgs, seed=None, heads=2, total_heads=2), "both", free_port())


def test_import_needs_no_sglang_and_starts_nothing():
    code = ("import sys, threading, p2pkv.adapters.sglang as s; "
            "assert threading.active_count() == 1, threading.enumerate(); "
            "assert 'torch.cuda' not in sys.modules or not __import__('torch').cuda.is_initialized(); "
            "print(s.HAVE_SGLANG)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    _ = threading  # (threads are checked in the child)


@pytest.mark.multi_gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("p_tp,d_tp", [(1, 1), (2, 1)])
def test_cuda_pools_on_two_gpus(p_tp, d_tp):
    """The same flow with the KV pools on two GPUs: raw device pointers wrapped through
    __cuda_array_interface__, the engines on the pools' GPUs (CUDA IPC between them)."""
    total = 2
    ppages, dpages = req_pages(5, 21)
    bport = free_port()
    mgrs: list[sg.P2pkvKVManager] = []
    with sg.P2pkvBootstrapServer("127.0.0.1", bport):
        try:
            ph, dh = total // p_tp, total // d_tp
            ppools = [Pool(sg.KVArgs, seed=200 + q, heads=ph, total_heads=total, rank=q, device="cuda:0")
                      for q in range(p_tp)]
            dpools = [Pool(sg.KVArgs, seed=None, heads=dh, total_heads=total, rank=r, device="cuda:1", attn_tp=d_tp)
                      for r in range(d_tp)]
            pm = [_mgr(pp, "prefill", bport, p_tp) for pp in ppools]
            dm = [_mgr(dp, "decode", bport, d_tp) for dp in dpools]
            mgrs = pm + dm
            devs = ["cuda:0"] * p_tp + ["cuda:1"] * d_tp
            assert all(str(m.engine.device) == d for m, d in zip(pm + dm, devs, strict=True))
            senders = [sg.P2pkvKVSender(m, f"127.0.0.1:{bport}", 43) for m in pm]
            receivers = [(sg.P2pkvKVReceiver(m, f"127.0.0.1:{bport}", 43), dpages, 2) for m in dm]
            _drive(senders, receivers, ppages)
            torch.cuda.synchronize(0)
            torch.cuda.synchronize(1)
            for i in range(2 * LAYERS):
                heads = {}
                for q, pp in enumerate(ppools):
                    for k in range(ph):
                        heads[sg.head_start(q, p_tp, total) + k] = pp.pages(i)[ppages][:, :, k].cpu()
                for r, dp in enumerate(dpools):
                    for k in range(dh):
                        got = dp.pages(i)[dpages][:, :, k].cpu()
                        assert torch.equal(got, heads[sg.head_start(r, d_tp, total) + k]), (i, r, k)
        finally:
            for m in mgrs:
                m.close()


# ----------------------------------------------------------------------------- issue 22: SGLang as it really runs
def _pair(bport: int, *, engine: dict[str, Any] | None = None, p_settings: dict[str, Any] | None = None,
          d_settings: dict[str, Any] | None = None) -> tuple[Pool, sg.P2pkvKVManager, Pool, sg.P2pkvKVManager]:
    """A prefill and a decode manager (KVArgs as SGLang fills them on each side) in this process."""
    cfg = EngineConfig(**(engine or ENGINE))
    pp = Pool(sg.KVArgs, seed=7, heads=2, total_heads=2, side="prefill")
    dp = Pool(sg.KVArgs, seed=None, heads=2, total_heads=2, side="decode")
    pm = sg.P2pkvKVManager(pp.args, "prefill", server_args(bport), False, config=cfg,
                           settings=sg.SglangSettings(**dict(TIMEOUTS, **(p_settings or {}))))
    dm = sg.P2pkvKVManager(dp.args, "decode", server_args(bport), False, config=cfg,
                           settings=sg.SglangSettings(**dict(TIMEOUTS, **(d_settings or {}))))
    return pp, pm, dp, dm


def _one_request(pm: sg.P2pkvKVManager, dm: sg.P2pkvKVManager, bport: int, room: int, pp: Pool, dp: Pool,
                 seed: int = 0) -> None:
    """One whole request, driven as SGLang's two schedulers drive it; asserts the pages arrived bit-exact."""
    ppages, dpages = req_pages(seed or room, 12)
    s = sg.P2pkvKVSender(pm, f"127.0.0.1:{bport}", room)
    r = sg.P2pkvKVReceiver(dm, f"127.0.0.1:{bport}", room)
    _drive([s], [(r, dpages, 1)], ppages)
    assert all(torch.equal(dp.pages(i)[dpages], pp.pages(i)[ppages]) for i in range(2 * LAYERS))
    s.clear()
    r.clear()


def test_decode_kvargs_without_head_counts_learn_them_from_the_prefill():
    """Defect 1: SGLang's decode side sets no kv_head_num / total_kv_head_num; the decode manager must start
    and learn the head count (max(1, total // attn_tp)) from the prefill ranks' registrations."""
    dpool = Pool(sg.KVArgs, seed=None, heads=1, total_heads=2, side="decode", rank=1, attn_tp=2)
    assert not hasattr(dpool.args, "kv_head_num") and not hasattr(dpool.args, "total_kv_head_num")
    bport = free_port()
    with sg.P2pkvBootstrapServer("127.0.0.1", bport):
        pm = _mgr(Pool(sg.KVArgs, seed=1, heads=2, total_heads=2, side="prefill"), "prefill", bport)
        dm = _mgr(dpool, "decode", bport, tp=2)
        try:
            assert dm.kv_head_num is None and dm.total_kv_head_num is None
            end = time.monotonic() + 10
            while not dm.try_ensure_parallel_info(f"127.0.0.1:{bport}"):
                assert time.monotonic() < end
                time.sleep(0.05)
            assert (dm.kv_head_num, dm.total_kv_head_num, dm.bytes_per_head()) == (1, 2, HEAD_BYTES)
        finally:
            pm.close()
            dm.close()


@pytest.mark.timeout(60)
def test_default_engine_settings_move_a_request():
    """Defect 2: with p2pkv's default EngineConfig (peer_timeout_s=None) every decode transfer failed."""
    bport = free_port()
    with sg.P2pkvBootstrapServer("127.0.0.1", bport):
        pp, pm, dp, dm = _pair(bport, engine=DEFAULT_ENGINE)
        try:
            assert pm.engine.config.peer_timeout_s is None and dm.engine.config.peer_timeout_s is None
            _one_request(pm, dm, bport, 5, pp, dp)
        finally:
            pm.close()
            dm.close()


def test_plugin_entry_point_is_declared_and_never_raises():
    """Defect 3: SGLang 0.5.23 loads the `sglang.srt.plugins` entry-point group in every process it starts."""
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "p2pkv"]
    assert [ep.value for ep in eps] == ["p2pkv.adapters.sglang:plugin"], "reinstall p2pkv (pip install -e .)"
    assert eps[0].load() is sg.plugin
    if not sg.HAVE_SGLANG:
        assert sg.plugin() is None  # without sglang: logged, not raised (a plugin must not take SGLang down)
        assert not sg.installed()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("when", ["after_metadata", "before_prefill_sender"])
def test_retry_with_the_same_room_works(when):
    """Behaviour 4: an attempt that failed or was aborted does not block a retry under the same bootstrap_room
    (as with Mooncake); late data of the old attempt is still refused."""
    bport = free_port()
    room = 31
    with sg.P2pkvBootstrapServer("127.0.0.1", bport):
        pp, pm, dp, dm = _pair(bport)
        try:
            stats: dict[str, float] = {}
            r1 = sg.P2pkvKVReceiver(dm, f"127.0.0.1:{bport}", room)
            r1.init(0)
            poll_until(r1, {KVPoll.WaitingForInput}, {KVPoll.Bootstrapping}, 10, stats)
            r1.send_metadata(np.arange(12), 1, None)
            if when == "after_metadata":
                s1 = sg.P2pkvKVSender(pm, f"127.0.0.1:{bport}", room)
                poll_until(s1, {KVPoll.WaitingForInput}, {KVPoll.Bootstrapping}, 10, stats)
            else:  # the prefill never got attempt 1: its metadata waits there unclaimed
                end = time.monotonic() + 10
                while not r1._meta_sent:
                    assert time.monotonic() < end
                    time.sleep(0.01)
            r1.abort()
            r1.clear()
            # the decode's abort reaches the prefill engine before SGLang could answer the client (and anyone
            # retry): wait for that order here too
            end = time.monotonic() + 10
            while True:
                try:
                    pm.engine.recv(TransferKey(r1.tid, "probe"), timeout=0)
                except TransferAborted:
                    break
                except TransferTimeout:
                    assert time.monotonic() < end
                    time.sleep(0.01)
            if when == "after_metadata":
                assert poll_until(s1, {KVPoll.Failed}, SENDING, 10, stats) == KVPoll.Failed
                s1.clear()
                # the old attempt's id stays refused on the decode side: late data cannot land in its pages
                h = pm.engine.send(dm.engine.address, TransferKey(r1.tid, "p0/d0/c0"),
                                   torch.zeros(3, dtype=torch.int64))
                with pytest.raises(TransferAborted):
                    h.wait(timeout=10)
            _one_request(pm, dm, bport, room, pp, dp)  # attempt 2, same room
        finally:
            pm.close()
            dm.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["abort_after_metadata", "abort_before_metadata", "decode_deadline"])
def test_decode_giving_up_fails_the_prefill_sender_at_once(how):
    """Behaviour 5: the prefill sender hears of the decode side giving up (abort or its own deadline) at once,
    not after its own waiting timeout (60 s here)."""
    bport = free_port()
    with sg.P2pkvBootstrapServer("127.0.0.1", bport):
        d_set = {"waiting_timeout_s": 1.0} if how == "decode_deadline" else {}
        _, pm, _, dm = _pair(bport, p_settings={"waiting_timeout_s": 60.0, "bootstrap_timeout_s": 60.0},
                             d_settings=d_set)
        try:
            stats: dict[str, float] = {}
            s = sg.P2pkvKVSender(pm, f"127.0.0.1:{bport}", 41)
            r = sg.P2pkvKVReceiver(dm, f"127.0.0.1:{bport}", 41)
            r.init(0)
            poll_until(r, {KVPoll.WaitingForInput}, {KVPoll.Bootstrapping}, 10, stats)
            if how == "abort_before_metadata":
                assert s.poll() == KVPoll.Bootstrapping
                t0 = time.monotonic()
                r.abort()
                assert poll_until(s, {KVPoll.Failed}, {KVPoll.Bootstrapping}, 20, stats) == KVPoll.Failed
            else:
                r.send_metadata(np.arange(12), 1, None)
                poll_until(s, {KVPoll.WaitingForInput}, {KVPoll.Bootstrapping}, 10, stats)
                s.init(12, 1)  # ... and the prefill scheduler has not computed anything yet
                t0 = time.monotonic()
                if how == "abort_after_metadata":
                    r.abort()
                assert poll_until(s, {KVPoll.Failed}, {KVPoll.WaitingForInput}, 20, stats) == KVPoll.Failed
            assert time.monotonic() - t0 < 15.0  # far inside the sender's own 60 s deadlines
            assert "TransferAborted" in failure(s) and "decode rank 0 gave up" in failure(s), failure(s)
            assert stats["max_poll_s"] < MAX_POLL_S
            s.clear()
            r.clear()
            assert settled_use(pm.engine) == 0 and settled_use(dm.engine) == 0
        finally:
            pm.close()
            dm.close()


@pytest.mark.timeout(90)
def test_prefill_restarted_first_request_after_works():
    """Behaviour 6: the decode side caches the prefill ranks' addresses; after the prefill server restarted
    (new engine, new port, same bootstrap port) the first request re-resolves and works."""
    bport = free_port()
    pp, pm, dp, dm = _pair(bport, engine=DEFAULT_ENGINE)
    server = sg.P2pkvBootstrapServer("127.0.0.1", bport)
    pm2 = None
    try:
        _one_request(pm, dm, bport, 51, pp, dp)
        old = pm.engine.address
        pm.close()
        server.close()
        server = sg.P2pkvBootstrapServer("127.0.0.1", bport)
        pp2 = Pool(sg.KVArgs, seed=8, heads=2, total_heads=2, side="prefill")
        pm2 = sg.P2pkvKVManager(pp2.args, "prefill", server_args(bport), False, config=EngineConfig(**DEFAULT_ENGINE),
                                settings=sg.SglangSettings(**TIMEOUTS))
        assert pm2.registrar is not None and pm2.registrar.registered.wait(10)
        assert pm2.engine.address != old
        assert f"127.0.0.1:{bport}" in dm.prefill_info_table  # the stale entry is still cached
        _one_request(pm2, dm, bport, 52, pp2, dp)
    finally:
        for m in (pm, dm, pm2):
            if m is not None:
                m.close()
        server.close()


@pytest.mark.timeout(90)
def test_bootstrap_server_down_at_prefill_start_warns_and_carries_on(caplog):
    """Behaviour 7: no bootstrap server when the prefill rank starts: a warning, never an exception (that took the
    prefill server down); it registers once the bootstrap server is there."""
    bport = free_port()
    caplog.set_level(logging.WARNING, logger="p2pkv.sglang")
    pp, pm, dp, dm = _pair(bport, p_settings={"register_warn_s": 0.3})
    server = None
    try:
        assert pm.registrar is not None and not pm.registrar.registered.is_set()
        end = time.monotonic() + 30
        while "could not register with the SGLang bootstrap server" not in caplog.text:
            assert time.monotonic() < end, caplog.text
            time.sleep(0.05)
        server = sg.P2pkvBootstrapServer("127.0.0.1", bport)
        assert pm.registrar.registered.wait(30)
        _one_request(pm, dm, bport, 61, pp, dp)
    finally:
        pm.close()
        dm.close()
        if server is not None:
            server.close()


@pytest.mark.timeout(60)
def test_send_queues_the_work_and_returns(monkeypatch):
    """Behaviour 8: send() runs on SGLang's scheduler thread: it queues the chunk and returns; gathering the pages
    (pack) runs on the backend's worker threads."""
    from p2pkv.adapters.sglang import sender as sender_mod

    gate = threading.Event()
    threads: list[int] = []
    real_pack = sender_mod.pack

    def slow_pack(*a: Any, **kw: Any) -> Any:
        threads.append(threading.get_ident())
        assert gate.wait(30)
        return real_pack(*a, **kw)

    monkeypatch.setattr(sender_mod, "pack", slow_pack)
    bport = free_port()
    with sg.P2pkvBootstrapServer("127.0.0.1", bport):
        pp, pm, dp, dm = _pair(bport)
        try:
            ppages, dpages = req_pages(71, 12)
            s = sg.P2pkvKVSender(pm, f"127.0.0.1:{bport}", 71)
            r = sg.P2pkvKVReceiver(dm, f"127.0.0.1:{bport}", 71)
            stats: dict[str, float] = {}
            r.init(0)
            poll_until(r, {KVPoll.WaitingForInput}, {KVPoll.Bootstrapping}, 10, stats)
            r.send_metadata(np.asarray(dpages), 1, None)
            poll_until(s, {KVPoll.WaitingForInput}, {KVPoll.Bootstrapping}, 10, stats)
            s.init(len(ppages), 1)
            for chunk in chunks_of(ppages):
                s.send(np.asarray(chunk), None)  # returns although every pack is held at the gate
                assert s.poll() in SENDING
            assert not gate.is_set()
            gate.set()
            assert poll_until(s, {KVPoll.Success, KVPoll.Failed}, SENDING, 20, stats) == KVPoll.Success, failure(s)
            assert poll_until(r, {KVPoll.Success, KVPoll.Failed}, SENDING, 20, stats) == KVPoll.Success, failure(r)
            assert threads and threading.get_ident() not in threads
            assert all(torch.equal(dp.pages(i)[dpages], pp.pages(i)[ppages]) for i in range(2 * LAYERS))
        finally:
            gate.set()
            pm.close()
            dm.close()


@pytest.mark.timeout(60)
def test_hostile_metadata_fails_only_its_request():
    """A peer pushing garbage under a room's metadata key: that request fails with a ProtocolError naming the
    problem; the manager serves the next request."""
    from p2pkv.adapters.sglang import _wire

    bport = free_port()
    room = 81
    with sg.P2pkvBootstrapServer("127.0.0.1", bport):
        pp, pm, dp, dm = _pair(bport)
        try:
            key = TransferKey(sg.transfer_id_for_room(room), "meta/p0/d0")
            bad = [b"not json", b'{"v": 2, "kind": "meta", "tid": "sglang-9.x", "n_dst": 1, "dst_rank": 0}',
                   _wire.json_tensor({"v": 2, "kind": "meta", "tid": f"sglang-{room}.a1", "n_dst": 1,
                                      "dst_rank": 0, "addr": "nowhere", "n_pages": 1, "heads": None, "aux": False,
                                      "prefix_len": 0, "bytes_per_head": 0, "n_buffers": 0}).numpy().tobytes()]
            for i, raw in enumerate(bad):
                s = sg.P2pkvKVSender(pm, f"127.0.0.1:{bport}", room)
                dm.engine.send(pm.engine.address, key, torch.frombuffer(bytearray(raw), dtype=torch.uint8)).wait(10)
                assert poll_until(s, {KVPoll.Failed}, {KVPoll.Bootstrapping}, 10, {}) == KVPoll.Failed, i
                assert "ProtocolError" in failure(s), failure(s)
                s.clear()
            _one_request(pm, dm, bport, room + 1, pp, dp)
        finally:
            pm.close()
            dm.close()


def test_metadata_parser_refuses_what_it_cannot_use():
    from p2pkv import ProtocolError
    from p2pkv.adapters.sglang import _wire

    key = TransferKey("sglang-5", "meta/p0/d0")
    good = _wire.DecodeMeta(kind="meta", tid="sglang-5.ab1", dst_rank=1, n_dst=2, addr="127.0.0.1:5",
                            n_pages=3, heads=(0, 1), aux=True, prefix_len=0, bytes_per_head=32, n_buffers=6)
    assert _wire.decode_meta(_wire.encode_meta(good), key, 5) == good
    for change in ({"v": 1}, {"kind": "x"}, {"tid": "sglang-6.ab1"}, {"tid": "sglang-5.AB!"}, {"dst_rank": 2},
                   {"n_dst": 0}, {"addr": "x"}, {"heads": [2, 1]}, {"heads": [0]}, {"aux": 1}, {"n_pages": -1},
                   {"n_pages": True}):
        with pytest.raises(ProtocolError):
            _wire.decode_meta(_wire.json_tensor({**good.to_dict(), **change}), key, 5)
    with pytest.raises(ProtocolError):
        _wire.decode_meta(torch.zeros(70000, dtype=torch.uint8), key, 5)
    assert sg.attempt_transfer_id(5, "ab1") == "sglang-5.ab1"
    with pytest.raises(InvalidKey):
        sg.attempt_transfer_id(5, "a.b")


def test_launcher_without_sglang_prints_an_install_hint_and_exits_2():
    """Issue 23: no 27-line ModuleNotFoundError: one line saying what to install, exit status 2."""
    if sg.HAVE_SGLANG:
        pytest.skip("sglang is installed here")
    out = subprocess.run([sys.executable, "-m", "p2pkv.adapters.sglang.launch", "--model-path", "m"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install" in lines[0] and "sglang" in lines[0], out.stderr
