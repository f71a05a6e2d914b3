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
