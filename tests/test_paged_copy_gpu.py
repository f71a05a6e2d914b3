"""The fused paged block copy of mode 'read' (``p2pkv_paged_copy``) on a GPU: exactly the right bytes, for
vLLM's cache layouts, odd sizes, caches of different block counts and many layers, against torch indexing;
and the segment path's long tables (one reused device buffer)."""

import numpy as np
import pytest
import torch

from p2pkv.kernels.blocks import block_pairs, paged_plans

pytestmark = pytest.mark.gpu


def _rand(shape, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, 255, shape, generator=g, dtype=torch.uint8).view(torch.uint8).to(device).view(dtype) \
        if dtype == torch.uint8 else torch.randn(shape, generator=g).to(dtype).to(device)


def cases(device="cuda", layers=3):
    """(name, sources, destinations, source ids, destination ids): the layouts the fused copy must cover."""
    bf = torch.bfloat16

    def ids(n, nb, seed):
        return torch.randperm(nb, generator=torch.Generator().manual_seed(seed))[:n].tolist()

    # K/V first [2, nb, bs, h, d] seen blocks-first (two runs per block, K and V planes), different block counts
    yield ("kv-first [2,nb,16,8,128] 40->57 blocks",
           [_rand((2, 40, 16, 8, 128), bf, device, i).transpose(0, 1) for i in range(layers)],
           [torch.zeros(2, 57, 16, 8, 128, dtype=bf, device=device).transpose(0, 1) for _ in range(layers)],
           ids(25, 40, 1), ids(25, 57, 2))
    yield ("[nb,2,16,8,128] 57->40 blocks",
           [_rand((57, 2, 16, 8, 128), bf, device, 10 + i) for i in range(layers)],
           [torch.zeros(40, 2, 16, 8, 128, dtype=bf, device=device) for _ in range(layers)],
           ids(30, 57, 3), ids(30, 40, 4))
    yield ("runs of 6 bytes (uint8 [nb,2,6] strided)",
           [_rand((20, 2, 9), torch.uint8, device, 20 + i)[:, :, 1:7] for i in range(layers)],
           [torch.zeros(13, 2, 6, dtype=torch.uint8, device=device) for _ in range(layers)],
           ids(9, 20, 5), ids(9, 13, 6))
    yield ("runs of 6 bytes, unaligned bases",
           [_rand((20 * 6 + 1,), torch.uint8, device, 30 + i)[1:].view(20, 6) for i in range(layers)],
           [torch.zeros(13 * 6 + 3, dtype=torch.uint8, device=device)[3:].view(13, 6) for _ in range(layers)],
           ids(9, 20, 7), ids(9, 13, 8))
    yield ("4-byte words (float32 [nb,3,5])",
           [_rand((11, 3, 5), torch.float32, device, 40 + i) for i in range(layers)],
           [torch.zeros(12, 3, 5, dtype=torch.float32, device=device) for _ in range(layers)],
           ids(7, 11, 9), ids(7, 12, 10))
    yield ("runs over UNIT_BYTES, not a multiple of 16 (uint8 [nb,20001])",
           [_rand((6, 20001), torch.uint8, device, 50 + i) for i in range(layers)],
           [torch.zeros(5, 20001, dtype=torch.uint8, device=device) for _ in range(layers)],
           ids(4, 6, 11), ids(4, 5, 12))
    yield ("HND into NHD (runs of one head's dim)",
           [_rand((12, 4, 16, 64), bf, device, 60 + i).transpose(1, 2) for i in range(layers)],
           [torch.zeros(15, 16, 4, 64, dtype=bf, device=device) for _ in range(layers)],
           ids(10, 12, 13), ids(10, 15, 14))
    yield ("96 layers, 2 KV-first blocks each way, 10000 pairs (ids > one ring slot)",
           [_rand((2, 10240, 1, 1, 8), bf, device, 70 + i).transpose(0, 1) for i in range(96)],
           [torch.zeros(2, 10300, 1, 1, 8, dtype=bf, device=device).transpose(0, 1) for _ in range(96)],
           ids(10000, 10240, 15), ids(10000, 10300, 16))


def reference(srcs, sid, dsts, did):
    out = [d.clone() for d in dsts]
    for s, o in zip(srcs, out, strict=True):
        o[torch.tensor(did, device=o.device)] = s[torch.tensor(sid, device=s.device)]
    return out


def _same(a, b):
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("case", list(range(8)))
def test_paged_copy_exact(case):
    from p2pkv.kernels import cuda_available
    from p2pkv.kernels.batch import copier_for

    assert cuda_available(), "CuPy is needed for the CUDA kernels"
    name, srcs, dsts, sid, did = list(cases())[case]
    ref = reference(srcs, sid, dsts, did)
    before = [d.clone() for d in dsts]
    s = torch.cuda.Stream()
    torch.cuda.synchronize()
    copier = copier_for(torch.device("cuda", torch.cuda.current_device()))
    total = 0
    for p in paged_plans(srcs, dsts):
        total += copier.paged_copy(p, block_pairs(sid, did, p.src_blocks, p.dst_blocks), s)
    s.synchronize()
    assert total == sum(x[0].numel() * x.element_size() for x in srcs) * len(sid), name
    for d, r in zip(dsts, ref, strict=True):
        assert _same(d, r), name
    # the segment path copies the same bytes (into a fresh copy of the destinations)
    for d, b in zip(dsts, before, strict=True):
        d.copy_(b)
    torch.cuda.synchronize()
    segs = np.concatenate([p.segments(block_pairs(sid, did, p.src_blocks, p.dst_blocks))
                           for p in paged_plans(srcs, dsts)])
    copier.copy(segs, s)
    s.synchronize()
    for d, r in zip(dsts, ref, strict=True):
        assert _same(d, r), name


def test_paged_copy_repeated_requests_reuse_the_plan():
    """One plan, many requests in a row on one stream without waiting between them: each request's pairs
    are its own (ring slots are not overwritten under a queued launch)."""
    from p2pkv.kernels.batch import copier_for

    bf = torch.bfloat16
    srcs = [_rand((2, 64, 16, 2, 64), bf, "cuda", i).transpose(0, 1) for i in range(4)]
    s = torch.cuda.Stream()
    copier = copier_for(torch.device("cuda", torch.cuda.current_device()))
    outs, refs = [], []
    for r in range(80):  # more than the ring's slots
        dsts = [torch.zeros(2, 64, 16, 2, 64, dtype=bf, device="cuda").transpose(0, 1) for _ in range(4)]
        g = torch.Generator().manual_seed(r)
        sid, did = torch.randperm(64, generator=g)[:20].tolist(), torch.randperm(64, generator=g)[:20].tolist()
        (p,) = paged_plans(srcs, dsts)
        torch.cuda.synchronize()
        copier.paged_copy(p, block_pairs(sid, did, 64, 64), s)
        outs.append(dsts)
        refs.append(reference(srcs, sid, [torch.zeros_like(d) for d in dsts], did))
    s.synchronize()
    for o, r in zip(outs, refs, strict=True):
        assert all(_same(a, b) for a, b in zip(o, r, strict=True))


def test_long_segment_tables_reuse_one_buffer():
    """Segment tables longer than a ring slot (the segment path at 10,000 tokens) go through one growable
    device buffer: back-to-back calls on one stream each copy their own segments."""
    from p2pkv.kernels.batch import copier_for

    src = torch.arange(3 * 2**20, dtype=torch.int32, device="cuda")
    copier = copier_for(torch.device("cuda", torch.cuda.current_device()))
    s = torch.cuda.Stream()
    dsts = []
    for n, k in ((5000, 1), (9000, 2), (6000, 3)):  # grows, then reuses
        dst = torch.zeros_like(src)
        idx = np.arange(n, dtype=np.int64) * 64
        segs = np.stack([src.data_ptr() + idx * 4, dst.data_ptr() + (idx + k) * 4, np.full(n, 8 * k)], 1)
        torch.cuda.synchronize()
        copier.copy(segs, s)
        dsts.append((dst, idx, k))
    s.synchronize()
    for dst, idx, k in dsts:
        for j in (0, len(idx) // 2, len(idx) - 1):
            i = int(idx[j])
            assert torch.equal(dst[i + k:i + k + 2 * k].cpu(), src[i:i + 2 * k].cpu())
        assert int((dst != 0).sum()) <= len(idx) * 2 * k
