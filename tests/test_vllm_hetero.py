"""Heterogeneous TP sizes, block sizes and layouts between two processes (vLLM objects faked):
each decode rank ends up with exactly its own heads, bit-exact."""

import socket

import pytest

from p2pkv import new_transfer_id

from . import vllm_hetero as H
from .conftest import process_context

FAST = dict(timeout_s=10.0, peer_timeout_s=2.0, heartbeat_s=0.2, pool_bytes=32 * 2**20, load_timeout_s=20.0)


def _free_port(span: int = 4) -> int:
    """A base port with ``span`` free ports after it."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        ok = True
        for i in range(1, span):
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", base + i))
                except OSError:
                    ok = False
        if ok:
            return base
    raise RuntimeError("no free port range")


def _transfer(mode, pgeo, cgeo, ntok=70, pblocks=None, cblocks=None, num_computed=0):
    tid = new_transfer_id()
    pblocks = pblocks or list(range(3, 3 + -(-ntok // pgeo.block)))[::-1]
    cblocks = cblocks or [40 - i for i in range(-(-ntok // cgeo.block))]
    cport, pport = _free_port(), _free_port()
    cons = H.make_instance("kv_consumer", cgeo, dict(FAST, mode=mode, port=cport))
    ctx = process_context()
    parent, child = ctx.Pipe()
    p = ctx.Process(target=H.run_producer, args=(child, pgeo, dict(FAST, mode=mode, port=pport), "cmpl-p-1a2b", tid,
                                                 ntok, pblocks, cport, cgeo.tp), daemon=True)
    p.start()
    try:
        assert parent.poll(60), "producer gave no params"
        kind, params = parent.recv()
        assert kind == "params" and params["remote_tp_size"] == pgeo.tp
        assert params["p2pkv_fingerprint"]["block_size"] == pgeo.block
        _, results = H.load(cons, "cmpl-d-9f8e", params, ntok, cblocks, num_computed)
        for res in results:
            assert not res.failed_recving
        for rank in range(cgeo.tp):
            H.check(cgeo, rank, cons[2][rank], cblocks, ntok, num_computed // cgeo.block)
        assert parent.poll(30) and parent.recv()[0] == "sent"
        parent.send("bye")
        p.join(20)
        assert p.exitcode == 0
        return cons
    finally:
        for w in cons[1]:
            w.shutdown()
        if p.is_alive():
            p.kill()


CASES = [
    # (mode, producer geometry, consumer geometry)
    ("pull", H.Geo(tp=2), H.Geo(tp=1)),  # TP 2 -> 1: two producer ranks merged
    ("push", H.Geo(tp=2), H.Geo(tp=1)),
    ("push", H.Geo(tp=1), H.Geo(tp=2)),  # TP 1 -> 2: heads split
    ("pull", H.Geo(tp=4, total_heads=8), H.Geo(tp=2, total_heads=8)),  # TP 4 -> 2
    ("pull", H.Geo(tp=1, total_heads=2), H.Geo(tp=4, total_heads=2)),  # GQA: 2 heads over 4 ranks, replicated
    ("pull", H.Geo(tp=2, mla=True, head=16), H.Geo(tp=1, mla=True, head=16)),  # MLA: any rank serves
    ("push", H.Geo(tp=1, mla=True, head=16), H.Geo(tp=2, mla=True, head=16)),
    ("push", H.Geo(block=16), H.Geo(block=32)),  # block sizes
    ("pull", H.Geo(block=32), H.Geo(block=16)),
    ("push", H.Geo(block=64), H.Geo(block=16)),
    ("pull", H.Geo(layout="HND"), H.Geo(layout="NHD")),  # layouts
    ("push", H.Geo(layout="NHD", block=16), H.Geo(layout="HND", block=32)),
    ("pull", H.Geo(tp=2, block=16, layout="HND"), H.Geo(tp=1, block=32)),  # all at once
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode,pgeo,cgeo", CASES,
                         ids=[f"{m}-tp{p.tp}to{c.tp}-b{p.block}to{c.block}-{p.layout}to{c.layout}"
                              f"{'-mla' if p.mla else ''}-h{p.total_heads}" for m, p, c in CASES])
def test_heterogeneous_transfer_is_bit_exact(mode, pgeo, cgeo):
    _transfer(mode, pgeo, cgeo)


@pytest.mark.timeout(120)
def test_prefix_hit_with_different_block_sizes_keeps_local_blocks():
    _transfer("push", H.Geo(block=16), H.Geo(block=32), ntok=100, num_computed=32)


def test_layout_and_pieces_math():
    from p2pkv.adapters.vllm._layout import heads_of, piece_name, pieces_for_consumer, pieces_from_producer

    assert heads_of(1, 2, 8) == (4, 8) and heads_of(3, 4, 2) == (1, 2)
    assert pieces_for_consumer(8, 4, 2, 1) == [(2, 4, 6), (3, 6, 8)]
    assert pieces_for_consumer(4, 1, 2, 1) == [(0, 2, 4)]
    assert pieces_for_consumer(1, 2, 4, 3) == [(1, 0, 1)]  # MLA: replicas spread over consumers
    assert pieces_from_producer(2, 1, 4, 0) == [(0, 0, 1), (1, 0, 1), (2, 1, 2), (3, 1, 2)]
    assert piece_name("L", 1, 2, 1, 2, 2, 4, 4) == "L|tp1/2"
    assert piece_name("L", 0, 1, 1, 2, 2, 4, 4) == "L|tp0/1|h2-4>tp1/2"
    from p2pkv import ConfigError

    with pytest.raises(ConfigError, match="cannot be split"):
        heads_of(0, 3, 8)


GPU_CASES = [("pull", 2, 1, 16, 16), ("push", 1, 2, 16, 16), ("push", 1, 1, 16, 32), ("pull", 1, 1, 32, 16)]


@pytest.mark.gpu
@pytest.mark.multi_gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode,ptp,ctp,pblock,cblock", GPU_CASES)
def test_heterogeneous_transfer_between_two_gpus(mode, ptp, ctp, pblock, cblock):
    """The same conversions with the caches on cuda:0 (prefill) and cuda:1 (decode)."""
    _transfer(mode, H.Geo(tp=ptp, block=pblock, device="cuda:0"), H.Geo(tp=ctp, block=cblock, device="cuda:1"))


def test_fingerprint_fields_unknown_on_one_side_are_not_mismatches():
    from p2pkv.adapters.vllm._layout import Fingerprint, incompatibilities

    a = Fingerprint("m", 32, "bfloat16", 8, 128, 16, "NHD", 2, False)
    assert incompatibilities(a, Fingerprint("?", 0, "?", 0, 0, 32, "HND", 1, False)) == []
    bad = incompatibilities(a, Fingerprint("m2", 32, "float16", 8, 64, 16, "NHD", 2, True))
    assert bad == ["model: producer 'm' vs consumer 'm2'", "dtype: producer 'bfloat16' vs consumer 'float16'",
                   "head_size: producer 128 vs consumer 64", "mla: producer False vs consumer True"]


@pytest.mark.timeout(120)
def test_dtype_mismatch_without_a_fingerprint_is_refused_by_the_worker():
    import torch

    cgeo = H.Geo(dtype=torch.float16)
    cons = H.make_instance("kv_consumer", cgeo, dict(FAST, mode="pull", port=_free_port()))
    ctx = process_context()
    parent, child = ctx.Pipe()
    tid = new_transfer_id()
    p = ctx.Process(target=H.run_producer, args=(child, H.Geo(), dict(FAST, mode="pull", port=_free_port()),
                                                 "cmpl-dt-p", tid, 40, [7, 8, 9], 1, 1), daemon=True)
    p.start()
    try:
        assert parent.poll(60)
        _, params = parent.recv()
        params.pop("p2pkv_fingerprint")  # e.g. a proxy that drops unknown params
        _, results = H.load(cons, "cmpl-dt-d", params, 40, [1, 2, 3])
        assert results[0].failed_recving == {"cmpl-dt-d"}
        assert not cons[2][0][H.LAYERS4[0]][:, 1:4].reshape(-1).view(torch.int16).any(), "blocks were written"
        parent.recv()
        parent.send("bye")
        p.join(20)
    finally:
        cons[1][0].shutdown()
        if p.is_alive():
            p.kill()
