"""Paged-KV pack/unpack: torch fallback on CPU against a naive reference; CUDA kernels against the fallback."""

import pytest
import torch

from p2pkv import InvalidTensor
from p2pkv.errors import InvalidBlockIds
from p2pkv.kernels import BlockIds, pack, pack_layers, unpack, unpack_layers
from p2pkv.synthetic import kv_layer, same_bits

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.uint8, torch.float8_e4m3fn, torch.int8]


def layouts(num_blocks=12, bs=4, heads=3, head=8, dtype=torch.bfloat16, device="cpu"):
    """Cache views of vLLM's layout families: [num_blocks, ...] with various strides."""
    def mk(shape, seed):
        return kv_layer(seed, 0, shape, dtype, device)
    yield "contiguous NHBD", mk((num_blocks, heads, bs, head), 1)
    yield "flash KV-first (2,N,B,H,D).transpose", mk((2, num_blocks, bs, heads, head), 2).transpose(0, 1)
    yield "NB2HD", mk((num_blocks, bs, 2, heads, head), 3)
    yield "MLA one head", mk((num_blocks, bs, 72), 4)
    yield "HND permuted", mk((num_blocks, bs, heads, head), 5).permute(0, 2, 1, 3)
    yield "kernel blocks (2x per sched block)", mk((2 * num_blocks, heads, bs // 2, head), 6)[::2]
    yield "sliced head dim", mk((num_blocks, heads, bs, head * 2), 7)[..., :head]
    yield "1-D rows", mk((num_blocks, 5), 8)


def ref_pack(layer, ids):
    return torch.stack([layer[i] for i in ids]) if ids else torch.empty((0, *layer.shape[1:]), dtype=layer.dtype)


ID_LISTS = [[3, 1, 7], [0], [], [5, 5, 2, 5], list(range(11, -1, -1))]


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_matches_reference_cpu(dtype):
    for name, layer in layouts(dtype=dtype):
        for ids in ID_LISTS:
            if any(i >= layer.shape[0] for i in ids):
                continue
            got = pack(layer, ids)
            assert got.is_contiguous()
            assert same_bits(got, ref_pack(layer, ids).to(dtype)), (name, ids)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unpack_roundtrip_cpu(dtype):
    for name, layer in layouts(dtype=dtype):
        ids = [4, 0, 2]
        packed = pack(layer, ids)
        target = torch.zeros_like(layer)
        unpack(packed, target, ids)
        for i in ids:
            assert same_bits(target[i], layer[i]), name
        untouched = [i for i in range(layer.shape[0]) if i not in ids]
        assert all(not target[i].view(torch.uint8).any() for i in untouched)


def test_unpack_repeated_ids_last_wins():
    layer = torch.zeros(6, 4)
    buf = torch.arange(12, dtype=torch.float32).view(3, 4)
    unpack(buf, layer, [2, 5, 2])
    assert torch.equal(layer[2], buf[2]) and torch.equal(layer[5], buf[1])


def test_batched_layers_cpu():
    layers = [kv_layer(0, i, (2, 10, 4, 2, 8)).transpose(0, 1) for i in range(5)]
    ids = [9, 0, 4]
    packed = pack_layers(layers, ids)
    assert packed.shape == (5, 3, 2, 4, 2, 8)
    for li, layer in enumerate(layers):
        assert same_bits(packed[li], ref_pack(layer, ids))
    targets = [torch.zeros_like(t) for t in layers]
    unpack_layers(packed, targets, ids)
    for t, layer in zip(targets, layers, strict=True):
        for i in ids:
            assert same_bits(t[i], layer[i])


def test_out_buffer_and_raw_bytes():
    layer = kv_layer(1, 1, (8, 3, 4), torch.float16)
    out = torch.empty(2 * 3 * 4 * 2, dtype=torch.uint8)
    pack(layer, [1, 6], out=out)
    assert same_bits(out.view(torch.float16).view(2, 3, 4), ref_pack(layer, [1, 6]))
    target = torch.zeros_like(layer)
    unpack(out, target, [1, 6])
    assert same_bits(target[6], layer[6])


@pytest.mark.parametrize("ids,needle", [
    ([0, 12], "out of range"),
    ([-1], "out of range"),
    ([1.5], "must be ints"),
    ([True], "must be ints"),
    ("12", "sequence of ints"),
    (torch.tensor([0.0]), "integer tensor"),
    (torch.tensor([[0]]), "1-D"),
])
def test_bad_block_ids(ids, needle):
    layer = torch.zeros(12, 4)
    with pytest.raises(InvalidBlockIds, match=needle):
        pack(layer, ids)
    with pytest.raises(InvalidBlockIds):
        unpack(torch.zeros(1, 4), layer, ids)


def test_bad_buffers_and_layers():
    layer = torch.zeros(12, 4)
    with pytest.raises(InvalidTensor, match="bytes"):
        pack(layer, [1, 2], out=torch.empty(3, 4))
    with pytest.raises(InvalidTensor, match="contiguous"):
        pack(layer, [1, 2], out=torch.empty(4, 4)[:, ::2])
    with pytest.raises(InvalidTensor, match=r"torch\.Tensor"):
        pack([1, 2], [0])  # type: ignore[arg-type]
    with pytest.raises(InvalidTensor, match="differs"):
        pack_layers([layer, torch.zeros(12, 5)], [0])
    with pytest.raises(InvalidTensor, match="non-empty"):
        pack_layers([], [0])
    ids = BlockIds([1], 12)
    with pytest.raises(InvalidBlockIds, match="validated for 12"):
        pack(torch.zeros(13, 4), ids)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_match_fallback(dtype):
    from p2pkv.kernels import cuda_available

    assert cuda_available(), "CuPy is needed for the CUDA kernels"
    for name, layer in layouts(num_blocks=40, bs=16, heads=4, head=64, dtype=dtype, device="cuda"):
        for ids in ([3, 1, 7], [0], [], [5, 5, 2, 5], list(range(39, -1, -2)), [39] * 7):
            a = pack(layer, ids, backend="cuda")
            b = pack(layer, ids, backend="torch")
            assert same_bits(a, b), (name, ids)
            t1, t2 = torch.zeros_like(layer), torch.zeros_like(layer)
            unpack(a, t1, ids, backend="cuda")
            unpack(a, t2, ids, backend="torch")
            torch.cuda.synchronize()
            assert same_bits(t1, t2), (name, ids)


@pytest.mark.gpu
def test_cuda_batched_and_odd_alignment():
    layers = [kv_layer(0, i, (2, 64, 16, 8, 128), torch.bfloat16, "cuda").transpose(0, 1) for i in range(32)]
    ids = BlockIds(list(range(0, 64, 3)), 64, "cuda")
    a = pack_layers(layers, ids, backend="cuda")
    b = pack_layers(layers, ids, backend="torch")
    assert same_bits(a, b)
    targets = [torch.zeros_like(t) for t in layers]
    unpack_layers(a, targets, ids, backend="cuda")
    torch.cuda.synchronize()
    for t, layer in zip(targets, layers, strict=True):
        assert same_bits(t[ids.host.cuda()], layer[ids.host.cuda()])
    # byte-aligned odd sizes force narrow vectors
    odd = kv_layer(1, 1, (9, 3, 7), torch.uint8, "cuda")[:, :, 1:]
    assert same_bits(pack(odd, [8, 0, 3], backend="cuda"), pack(odd, [8, 0, 3], backend="torch"))
