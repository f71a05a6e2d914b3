"""Helpers for heterogeneous-TP / block-size / layout tests of P2pkvConnector (vLLM objects faked).

One "instance" is a scheduler-side connector plus one worker-side connector per
TP rank, each rank with its own CPU KV caches in vLLM's logical dim order
(``[2, num_blocks, block_size, heads, head_size]``; HND caches are physically
``[2, num_blocks, heads, block_size, head_size]`` seen through a transpose;
MLA caches are ``[num_blocks, block_size, latent]``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from p2pkv.adapters.vllm._layout import heads_of
from p2pkv.synthetic import same_bits

from . import vllm_fakes as F

LAYERS4 = [f"model.layers.{i}.self_attn.attn" for i in range(4)]


@dataclass
class Geo:
    tp: int = 1
    block: int = 16
    layout: str = "NHD"
    total_heads: int = 4
    head: int = 8
    mla: bool = False
    nb: int = 48
    model: str = "tiny-llama"
    dtype: Any = torch.bfloat16
    device: str = "cpu"
    window: int = 0  # > 0: a hybrid model, odd layers in a windowed KV-cache group (even layers: full attention)
    window_kind: str = "sliding_window"  # or "chunked_local"

    @property
    def hybrid(self) -> bool:
        return self.window > 0


def group_of(geo: Geo, layer: int) -> int:
    return layer % 2 if geo.hybrid else 0


def per_group(geo: Geo, block_ids: Any) -> tuple[list[int], ...]:
    """Block ids per KV-cache group: a tuple of lists as given, or one list for every group."""
    if isinstance(block_ids, tuple):
        return tuple(list(g) for g in block_ids)
    return tuple(list(block_ids) for _ in range(2 if geo.hybrid else 1))


def make_instance(role: str, geo: Geo, extra: dict[str, Any]):
    """(scheduler connector, [worker connector per rank], [caches per rank])."""
    from p2pkv.adapters.vllm import KVConnectorRole, P2pkvConnector

    sched, workers, caches = None, [], []
    for rank in range(geo.tp):
        lo, hi = heads_of(rank, geo.tp, 1 if geo.mla else geo.total_heads)
        spec = F.AttnSpec(geo.block, hi - lo, geo.head, geo.dtype)
        if geo.hybrid:
            wspec = (F.SlidingWindowSpec(geo.block, hi - lo, geo.head, geo.dtype, sliding_window=geo.window)
                     if geo.window_kind == "sliding_window" else
                     F.ChunkedLocalAttentionSpec(geo.block, hi - lo, geo.head, geo.dtype,
                                                 attention_chunk_size=geo.window))
            kcc = F.FullKVCacheConfig(geo.nb, [F.GroupSpec(LAYERS4[0::2], spec), F.GroupSpec(LAYERS4[1::2], wspec)])
        else:
            kcc = F.FullKVCacheConfig(geo.nb, [F.GroupSpec(list(LAYERS4), spec)])
        cfg = F.FullVllmConfig(F.KVTransferConfig(role, dict(extra, rank=rank, tp_size=geo.tp)),
                               F.CacheConfig(geo.block), F.ParallelConfig(geo.tp),
                               F.ModelConfig(geo.model, geo.total_heads, geo.mla))
        if rank == 0:
            sched = P2pkvConnector(cfg, KVConnectorRole.SCHEDULER, kcc)
        w = P2pkvConnector(cfg, KVConnectorRole.WORKER, kcc)
        c = {}
        for name in LAYERS4:
            kw = dict(dtype=geo.dtype, device=geo.device)
            if geo.mla:
                c[name] = torch.zeros(geo.nb, geo.block, geo.head, **kw)
            elif geo.layout == "HND":
                c[name] = torch.zeros(2, geo.nb, hi - lo, geo.block, geo.head, **kw).transpose(2, 3)
            else:
                c[name] = torch.zeros(2, geo.nb, geo.block, hi - lo, geo.head, **kw)
        w.register_kv_caches(c)
        workers.append(w)
        caches.append(c)
    return sched, workers, caches


def reference(layer: int, geo: Geo, ntok: int) -> torch.Tensor:
    """The prompt's KV as the model computed it: [2, ntok, heads, head] (MLA: [ntok, latent])."""
    g = torch.Generator().manual_seed(1000 + layer)
    shape = (ntok, geo.head) if geo.mla else (2, ntok, geo.total_heads, geo.head)
    return torch.randn(shape, generator=g).to(geo.dtype)


def fill(geo: Geo, rank: int, caches: dict[str, torch.Tensor], block_ids: Any, ntok: int) -> None:
    """The forward pass: every block a request holds (a windowed group's null blocks excepted) gets its tokens."""
    lo, hi = heads_of(rank, geo.tp, 1 if geo.mla else geo.total_heads)
    groups = per_group(geo, block_ids)
    for li, name in enumerate(LAYERS4):
        ref = reference(li, geo, ntok)
        for i, b in enumerate(groups[group_of(geo, li)]):
            t0, t1 = i * geo.block, min((i + 1) * geo.block, ntok)
            if t0 >= ntok:
                break
            if b == 0 and geo.hybrid and group_of(geo, li) == 1:
                continue
            if geo.mla:
                caches[name][b, :t1 - t0] = ref[t0:t1]
            else:
                caches[name][:, b, :t1 - t0] = ref[:, t0:t1, lo:hi]


def check(geo: Geo, rank: int, caches: dict[str, torch.Tensor], block_ids: Any, ntok: int,
          skip_blocks: int = 0) -> None:
    """Every token slot of the prompt holds exactly this rank's heads of the reference (in a windowed
    group: every block the request holds; its null block 0 is never written)."""
    lo, hi = heads_of(rank, geo.tp, 1 if geo.mla else geo.total_heads)
    groups = per_group(geo, block_ids)
    for li, name in enumerate(LAYERS4):
        ref = reference(li, geo, ntok)
        if geo.hybrid and group_of(geo, li) == 1:
            assert not caches[name][:, 0].reshape(-1).view(torch.int16).any(), f"{name}: the null block was written"
        for i, b in enumerate(groups[group_of(geo, li)]):
            t0, t1 = i * geo.block, min((i + 1) * geo.block, ntok)
            if t0 >= ntok:
                break
            if i < skip_blocks or (b == 0 and geo.hybrid and group_of(geo, li) == 1):
                continue
            if geo.mla:
                got, want = caches[name][b, :t1 - t0], ref[t0:t1]
            else:
                got, want = caches[name][:, b, :t1 - t0], ref[:, t0:t1, lo:hi]
            assert same_bits(got.cpu(), want), (name, rank, i, b)


def run_producer(conn, geo: Geo, extra: dict[str, Any], req_id: str, tid: str, ntok: int, block_ids: Any,
                 consumer_port: int, dst_tp: int) -> None:
    """A producer instance in its own process: compute (fill), save every layer, hand the params over."""
    sched, workers, caches = make_instance("kv_producer", geo, extra)
    try:
        params = {"transfer_id": tid, "do_remote_decode": True, "remote_host": "127.0.0.1",
                  "remote_port": consumer_port, "decode_tp_size": dst_tp}
        req = F.Request(req_id, list(range(ntok)), params)
        assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
        sched.update_state_after_alloc(req, F.KVCacheBlocks(per_group(geo, block_ids)), 0)
        so = F.SchedulerOutput(num_scheduled_tokens={req_id: ntok})
        so.scheduled_new_reqs.append(F.NewRequestData(req_id, req.prompt_token_ids, per_group(geo, block_ids), 0))
        meta = sched.build_connector_meta(so)
        assert len(meta.saves) == 1
        for rank, (w, c) in enumerate(zip(workers, caches, strict=True)):
            fill(geo, rank, c, block_ids, ntok)
            w.bind_connector_metadata(meta)
            for name in LAYERS4:
                w.save_kv_layer(name, c[name], None)
            w.wait_for_save()
            w.clear_connector_metadata()
        delay, out = sched.request_finished(req, per_group(geo, block_ids))
        assert delay is True
        conn.send(("params", out))
        deadline = time.monotonic() + 30
        for w in workers:
            while not (w.get_finished({req_id})[0] or set()) >= {req_id}:
                assert time.monotonic() < deadline, "sends never finished"
                time.sleep(0.01)
        conn.send(("sent", None))
        conn.recv()
    finally:
        for w in workers:
            w.shutdown()


def load(instance, req_id: str, params: dict[str, Any], ntok: int, block_ids: Any, num_computed: int = 0,
         timeout: float = 30.0):
    """Drive a consumer instance through one load; returns (results per rank: (finished, failed))."""
    sched, workers, _ = instance
    req = F.Request(req_id, list(range(ntok)), params)
    n, is_async = sched.get_num_new_matched_tokens(req, num_computed)
    assert (n, is_async) == (ntok - num_computed, True)
    sched.update_state_after_alloc(req, F.KVCacheBlocks(block_ids), n)  # a hybrid instance: a tuple per group
    meta = sched.build_connector_meta(F.SchedulerOutput())
    assert len(meta.loads) == 1
    out = []
    for w in workers:
        w.bind_connector_metadata(meta)
        w.start_load_kv(None)
        w.clear_connector_metadata()
    deadline = time.monotonic() + timeout
    for w in workers:
        while True:
            res = w.get_transfer_results(set())
            if req_id in res.finished_recving:
                out.append(res)
                break
            assert time.monotonic() < deadline, "load never finished"
            time.sleep(0.01)
    return req, out
