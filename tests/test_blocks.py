"""Block-to-block segments between paged caches (the one copy of a one-sided read), checked on CPU."""

import numpy as np
import pytest
import torch

from p2pkv import InvalidTensor
from p2pkv.errors import InvalidBlockIds
from p2pkv.kernels.blocks import block_runs, block_segments, copy_segments_cpu


def _cache(layout: str, nb: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if layout == "flash":  # [2, nb, bs, H, D] seen as [nb, 2, bs, H, D]
        return torch.randint(-100, 100, (2, nb, 16, 4, 8), generator=g).to(torch.bfloat16).transpose(0, 1)
    if layout == "nhd":    # [nb, bs, H, D]
        return torch.randint(-100, 100, (nb, 16, 4, 8), generator=g).to(torch.bfloat16)
    if layout == "hnd":    # [nb, H, bs, D] seen as [nb, bs, H, D]
        return torch.randint(-100, 100, (nb, 4, 16, 8), generator=g).to(torch.bfloat16).transpose(1, 2)
    raise AssertionError(layout)


@pytest.mark.parametrize("layout", ["flash", "nhd", "hnd"])
def test_block_segments_copy_exact(layout):
    srcs = [_cache(layout, seed=i) for i in range(3)]
    dsts = [torch.zeros_like(_cache(layout, nb=20)) for _ in range(3)]
    if layout == "flash":
        dsts = [torch.zeros(2, 20, 16, 4, 8, dtype=torch.bfloat16).transpose(0, 1) for _ in range(3)]
    if layout == "hnd":
        dsts = [torch.zeros(20, 4, 16, 8, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)]
    sid, did = [3, 0, 11, 7], [19, 2, 5, 6]
    segs = block_segments(srcs, sid, dsts, did)
    copy_segments_cpu(segs)
    for s, d in zip(srcs, dsts, strict=True):
        for a, b in zip(sid, did, strict=True):
            assert torch.equal(d[b], s[a])
        untouched = [b for b in range(20) if b not in did]
        assert not d[untouched].any()


def test_runs_fold_contiguous_dims():
    run, offs = block_runs(_cache("nhd"))
    assert run == 16 * 4 * 8 * 2 and list(offs) == [0]
    run, offs = block_runs(_cache("flash"))
    assert run == 16 * 4 * 8 * 2 and len(offs) == 2


def test_mismatches_refused():
    with pytest.raises(InvalidTensor):
        block_segments([_cache("nhd")], [0], [_cache("hnd")], [0])
    with pytest.raises(InvalidBlockIds):
        block_segments([_cache("nhd")], [0, 1], [_cache("nhd")], [0])
    with pytest.raises(InvalidBlockIds):
        block_segments([_cache("nhd")], [12], [_cache("nhd")], [0])
    assert block_segments([], [], [], []).shape == (0, 3)
    assert isinstance(block_segments([_cache("nhd")], [], [_cache("nhd")], []), np.ndarray)


# ----------------------------------------------------------------------------- fused paged copy: host side
from p2pkv.kernels.blocks import PagedPlan, block_pairs, paged_plans  # noqa: E402


def _reference(srcs, sid, dsts, did):
    """What a read must leave in the destinations, by torch indexing."""
    out = [d.clone() for d in dsts]
    if sid:
        for s, o in zip(srcs, out, strict=True):
            o[torch.tensor(did)] = s[torch.tensor(sid)]
    return out


@pytest.mark.parametrize("layout", ["flash", "nhd", "hnd"])
def test_paged_plan_segments_match_block_segments(layout):
    """Same layout on both sides: the plan's segments are exactly block_segments' (same order)."""
    srcs = [_cache(layout, seed=i) for i in range(3)]
    dsts = [_cache(layout, nb=20, seed=10 + i) for i in range(3)]
    sid, did = [3, 0, 11, 7], [19, 2, 5, 6]
    plans = paged_plans(srcs, dsts)
    assert len(plans) == 1
    p = plans[0]
    assert (p.src_blocks, p.dst_blocks) == (12, 20)
    pairs = block_pairs(sid, did, p.src_blocks, p.dst_blocks)
    assert np.array_equal(p.segments(pairs), block_segments(srcs, sid, dsts, did))
    assert p.nbytes(len(sid)) == int(block_segments(srcs, sid, dsts, did)[:, 2].sum())


def test_paged_plan_across_layouts_copies_exact():
    """[block, head, token, dim] into [block, token, head, dim] (same logical shape): block_segments refuses,
    the plan copies in runs as long as both sides keep contiguous (one head's dim here)."""
    srcs = [_cache("hnd", seed=i) for i in range(2)]
    dsts = [torch.zeros(20, 16, 4, 8, dtype=torch.bfloat16) for _ in range(2)]
    sid, did = [3, 0, 11], [19, 2, 5]
    with pytest.raises(InvalidTensor):
        block_segments(srcs, sid, dsts, did)
    ref = _reference(srcs, sid, dsts, did)
    (p,) = paged_plans(srcs, dsts)
    assert p.run_bytes == 8 * 2 and len(p.runs) == 16 * 4
    copy_segments_cpu(p.segments(block_pairs(sid, did, p.src_blocks, p.dst_blocks)))
    for d, r in zip(dsts, ref, strict=True):
        assert torch.equal(d, r)


def test_paged_plans_odd_sizes_and_mixed_layers():
    """Runs of 6 bytes (align 1), 4-byte words (align 4), and layers of two layouts: one plan each."""
    g = torch.Generator().manual_seed(3)
    srcs = [torch.randint(0, 255, (10, 2, 3), generator=g, dtype=torch.uint8) for _ in range(2)]
    srcs.append(torch.randint(0, 255, (10, 2, 5), generator=g, dtype=torch.uint8)[:, :, :3])  # strided rows
    dsts = [torch.zeros(7, 2, 3, dtype=torch.uint8) for _ in range(3)]
    sid, did = [9, 0, 4], [6, 1, 0]
    ref = _reference(srcs, sid, dsts, did)
    plans = paged_plans(srcs, dsts)
    assert sorted((p.run_bytes, len(p.runs), len(p.layers), p.align) for p in plans) == [(3, 2, 1, 1), (6, 1, 2, 1)]
    for p in plans:
        copy_segments_cpu(p.segments(block_pairs(sid, did, p.src_blocks, p.dst_blocks)))
    for d, r in zip(dsts, ref, strict=True):
        assert torch.equal(d, r)
    f = [torch.zeros(4, 3, dtype=torch.float32)]
    assert paged_plans(f, [torch.zeros(4, 3, dtype=torch.float32)])[0].align == 4
    assert paged_plans([_cache("flash")], [_cache("flash")])[0].align == 16


def test_paged_plan_tables():
    """The per-layer table is (src base, dst base, src block stride, dst block stride) in bytes; the run
    table holds each run's offset in a source and a destination block (K and V planes of a flash cache)."""
    src = _cache("flash", nb=12)
    dst = torch.zeros(2, 30, 16, 4, 8, dtype=torch.bfloat16).transpose(0, 1)
    (p,) = paged_plans([src], [dst])
    assert isinstance(p, PagedPlan)
    blk = 16 * 4 * 8 * 2
    assert p.layers.tolist() == [[src.data_ptr(), dst.data_ptr(), blk, blk]]
    assert p.runs.tolist() == [[0, 0], [12 * blk, 30 * blk]]
    assert p.run_bytes == blk and p.nbytes(5) == 5 * 2 * blk
    assert p.segments(np.empty((0, 2), dtype=np.int64)).shape == (0, 3)
    assert paged_plans([], []) == []


def test_paged_plans_refuse_mismatches():
    with pytest.raises(InvalidTensor, match="2 source layers but 1"):
        paged_plans([_cache("nhd"), _cache("nhd")], [_cache("nhd")])
    with pytest.raises(InvalidTensor, match="differ"):
        paged_plans([_cache("nhd")], [_cache("nhd").float()])
    with pytest.raises(InvalidTensor, match="differ"):
        paged_plans([_cache("nhd")], [torch.zeros(12, 16, 4, 4, dtype=torch.bfloat16)])
    with pytest.raises(InvalidTensor, match="num_blocks"):
        paged_plans([torch.zeros(4)], [torch.zeros(4)])


@pytest.mark.parametrize("sid,did,match", [
    ([0, 1], [0], "2 source blocks but 1"),
    ([12], [0], "source block ids outside"),
    ([-1], [0], "source block ids outside"),
    ([0], [20], "destination block ids outside"),
    ([1.5], [0], "integers"),
    ([True], [0], "integers"),
    ([2**70], [0], "integers"),
    ([[1]], [0], "flat"),
    ("ab", [0], "integers"),
    ([0], [None], "integers"),
])
def test_block_pairs_refuses_bad_ids(sid, did, match):
    with pytest.raises(InvalidBlockIds, match=match):
        block_pairs(sid, did, 12, 20)


def test_block_pairs_accepts_arrays_and_empty():
    assert block_pairs([], [], 1, 1).shape == (0, 2)
    out = block_pairs(np.array([3, 0], dtype=np.uint16), torch.tensor([1, 2]).numpy(), 4, 4)
    assert out.dtype == np.int64 and out.tolist() == [[3, 1], [0, 2]]
