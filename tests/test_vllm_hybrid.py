"""Hybrid models (several KV-cache groups: full attention plus sliding-window or chunked-local attention,
as Gemma 3 and gpt-oss) between two processes (vLLM objects faked; real sockets): every group moves with
its own block ids, a windowed group only the blocks a decode step still reads, bit-exact."""

import logging

import pytest

from p2pkv import ConfigError, new_transfer_id
from p2pkv.adapters.vllm._layout import KVGroup, groups_from_config

from . import vllm_fakes as F
from . import vllm_hetero as H
from .test_vllm_hetero import FAST, _free_port
from .conftest import process_context


def _blocks(geo: H.Geo, ntok: int, base: int, nulls: int = -1) -> tuple[list[int], ...]:
    """A request's blocks as vLLM allocates them: every prompt block in the full group; in the windowed
    group null blocks (0) for those a decode step no longer reads (``nulls``: how many; -1: as vLLM does)."""
    nblk = -(-ntok // geo.block)
    full = [base + i for i in range(nblk)][::-1]
    if not geo.hybrid:
        return (full,)
    if nulls < 0:
        g = KVGroup(1, geo.window_kind, geo.block, geo.window, ())
        nulls = g.first_needed_token(ntok) // geo.block
    win = [0] * nulls + [base + 100 + i for i in range(nblk - nulls)]
    return full, win


def _transfer(mode, pgeo, cgeo, ntok=100, pblocks=None, cblocks=None, num_computed=0, expect_ok=True):
    tid = new_transfer_id()
    pblocks = pblocks or _blocks(pgeo, ntok, 3)
    cblocks = cblocks or _blocks(cgeo, ntok, 20)
    cport, pport = _free_port(), _free_port()
    pgeo.nb = cgeo.nb = 256
    cons = H.make_instance("kv_consumer", cgeo, dict(FAST, mode=mode, port=cport))
    ctx = process_context()
    parent, child = ctx.Pipe()
    p = ctx.Process(target=H.run_producer, args=(child, pgeo, dict(FAST, mode=mode, port=pport), "cmpl-p-hy1", tid,
                                                 ntok, pblocks, cport, cgeo.tp), daemon=True)
    p.start()
    try:
        assert parent.poll(60), "producer gave no params"
        kind, params = parent.recv()
        assert kind == "params"
        if not cgeo.hybrid:
            cblocks = cblocks[0]
        _, results = H.load(cons, "cmpl-d-hy1", params, ntok, cblocks, num_computed)
        if not expect_ok:
            return results
        for res in results:
            assert not res.failed_recving
        for rank in range(cgeo.tp):
            H.check(cgeo, rank, cons[2][rank], cblocks, ntok, num_computed // cgeo.block)
        assert parent.poll(30) and parent.recv()[0] == "sent"
        return results
    finally:
        parent.send("bye")
        p.join(20)
        for w in cons[1]:
            w.shutdown()
        if p.is_alive():
            p.kill()


SW, CL = "sliding_window", "chunked_local"
CASES = [
    ("push", H.Geo(window=32), H.Geo(window=32)),
    ("pull", H.Geo(window=32), H.Geo(window=32)),
    ("pull", H.Geo(window=32, window_kind=CL), H.Geo(window=32, window_kind=CL)),
    ("push", H.Geo(window=48), H.Geo(window=48, layout="HND")),
    ("pull", H.Geo(tp=2, window=32), H.Geo(tp=1, window=32)),  # heterogeneous TP
    ("push", H.Geo(tp=1, window=32), H.Geo(tp=2, window=32)),
    ("push", H.Geo(block=16, window=32), H.Geo(block=32, window=32)),  # heterogeneous block sizes
    ("pull", H.Geo(block=32, window=32), H.Geo(block=16, window=32)),
    ("pull", H.Geo(), H.Geo(window=32)),  # a non-hybrid producer (HMA off) serves a hybrid decode engine
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode,pgeo,cgeo", CASES,
                         ids=[f"{m}-{p.window_kind if p.hybrid else 'full'}{p.window}-tp{p.tp}to{c.tp}-"
                              f"b{p.block}to{c.block}-{c.layout}" for m, p, c in CASES])
def test_every_kv_cache_group_moves_bit_exact(mode, pgeo, cgeo):
    _transfer(mode, pgeo, cgeo)


@pytest.mark.timeout(120)
def test_hybrid_prefix_hit_and_freed_window_blocks_on_the_producer():
    """The decode side had the first 2 blocks in its own prefix cache; the producer had already freed
    the windowed group's blocks below the window (chunked prefill): both hold, bit-exact."""
    geo = H.Geo(window=32)
    _transfer("pull", geo, H.Geo(window=32), ntok=100, pblocks=(_blocks(geo, 100, 3)[0], [0, 0, 0, 0, 50, 51, 52]),
              num_computed=32)


@pytest.mark.timeout(120)
def test_hybrid_producer_to_a_decode_engine_that_needs_every_block_fails_loudly(caplog):
    """A decode engine that keeps every block of every layer (HMA off) cannot use a windowed group
    that was sent from its window on: the load fails naming the blocks, never stale KV."""
    caplog.set_level(logging.WARNING, logger="p2pkv.vllm")
    results = _transfer("pull", H.Geo(window=32), H.Geo(), expect_ok=False)
    assert results[0].failed_recving == {"cmpl-d-hy1"}
    assert "the producer sent blocks 4..7 of the prompt; this engine needs blocks 0..7" in caplog.text


def test_producer_that_lost_a_window_block_does_not_hand_off(caplog):
    geo = H.Geo(window=32, nb=64)
    sched, workers, _ = H.make_instance("kv_producer", geo, dict(FAST, mode="pull", port=_free_port()))
    try:
        req = F.Request("cmpl-lost-1", list(range(100)), {"do_remote_decode": True})
        blocks = (list(range(1, 8)), [0, 0, 0, 0, 0, 12, 13])  # block 4 of the window is gone
        sched.get_num_new_matched_tokens(req, 0)
        sched.update_state_after_alloc(req, F.KVCacheBlocks(blocks), 0)
        so = F.SchedulerOutput(num_scheduled_tokens={"cmpl-lost-1": 100})
        so.scheduled_new_reqs.append(F.NewRequestData("cmpl-lost-1", req.prompt_token_ids, blocks, 0))
        assert sched.build_connector_meta(so).saves == []
        assert "no longer holds every block of the window" in caplog.text
        assert sched.request_finished_all_groups(req, blocks) == (False, None)
    finally:
        workers[0].shutdown()


def test_saves_name_each_groups_own_blocks():
    geo = H.Geo(window=32, nb=64)
    sched, workers, _ = H.make_instance("kv_producer", geo, dict(FAST, mode="pull", port=_free_port()))
    try:
        assert [(g.kind, g.window, g.layers) for g in sched.groups] == [
            ("full", 0, tuple(H.LAYERS4[0::2])), (SW, 32, tuple(H.LAYERS4[1::2]))]
        req = F.Request("cmpl-g-1", list(range(100)), {"do_remote_decode": True})
        blocks = (list(range(1, 8)), list(range(11, 18)))
        sched.get_num_new_matched_tokens(req, 0)
        sched.update_state_after_alloc(req, F.KVCacheBlocks(blocks), 0)
        so = F.SchedulerOutput(num_scheduled_tokens={"cmpl-g-1": 100})
        so.scheduled_new_reqs.append(F.NewRequestData("cmpl-g-1", req.prompt_token_ids, blocks, 0))
        (save,) = sched.build_connector_meta(so).saves
        assert save.block_ids == [list(range(1, 8)), [15, 16, 17]]  # tokens 68..99 live in blocks 4..6
    finally:
        workers[0].shutdown()


def test_group_kinds_and_refusals():
    spec = F.AttnSpec(16, 2, 8)
    groups = groups_from_config(F.FullKVCacheConfig(8, [F.GroupSpec(["a"], spec),
                                                        F.GroupSpec(["b"], F.SlidingWindowSpec(16, 2, 8,
                                                                                               sliding_window=100)),
                                                        F.GroupSpec(["c"], F.ChunkedLocalAttentionSpec(
                                                            16, 2, 8, attention_chunk_size=64))]), 16)
    assert [(g.kind, g.window) for g in groups] == [("full", 0), (SW, 100), (CL, 64)]
    assert [g.first_needed_token(250) for g in groups] == [0, 150, 192]
    assert groups_from_config(F.KVCacheConfig(), 16) == [KVGroup(0, "full", 16, 0, ())]
    with pytest.raises(ConfigError, match="cannot move a MambaSpec KV cache"):
        groups_from_config(F.FullKVCacheConfig(8, [F.GroupSpec(["a"], spec), F.GroupSpec(["m"], F.MambaSpec())]),
                           16)
    cfg = F.FullVllmConfig(F.KVTransferConfig("kv_consumer", dict(FAST, port=_free_port())), F.CacheConfig(16),
                           F.ParallelConfig(1), F.ModelConfig("m", 2))
    from p2pkv.adapters.vllm import KVConnectorRole, P2pkvConnector

    with pytest.raises(ConfigError, match="MambaSpec"):
        P2pkvConnector(cfg, KVConnectorRole.SCHEDULER,
                       F.FullKVCacheConfig(8, [F.GroupSpec(["a"], spec), F.GroupSpec(["m"], F.MambaSpec())]))
    w = P2pkvConnector(cfg, KVConnectorRole.WORKER, F.FullKVCacheConfig(8, [
        F.GroupSpec(["a"], spec), F.GroupSpec(["b"], F.SlidingWindowSpec(16, 2, 8, sliding_window=32))]))
    import torch

    with pytest.raises(ConfigError, match="layer x is in none of this model's KV-cache groups"):
        w.register_kv_caches({"a": torch.zeros(2, 8, 16, 2, 8), "x": torch.zeros(2, 8, 16, 2, 8)})
    w.shutdown()
