"""Block-to-block copies between paged KV caches as ``(src, dst, nbytes)`` segments for one launch.

A layer's cache is ``[num_blocks, ...]`` with any strides; one block is then a few contiguous
runs of bytes (its trailing contiguous dimensions folded together, e.g. K and V planes of a
FlashAttention cache are two runs). :func:`block_segments` lists, for every layer and every
``(source block, destination block)`` pair, the runs to copy; :class:`p2pkv.kernels.batch.BatchCopier`
moves them all in one kernel launch. This is the one copy of a one-sided read from a
producer's cache (mapped here through CUDA IPC) into a consumer's cache: no packing, no pool,
no unpacking. Both caches must lay a block out in runs of the same size (same shape after
dim 0, the same dimensions contiguous; where the runs start may differ, e.g. the K/V planes of
caches with different block counts); otherwise :func:`block_segments` raises and the caller
packs instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InvalidBlockIds, InvalidTensor

__all__ = ["block_runs", "block_segments", "copy_segments_cpu"]


def block_runs(cache: torch.Tensor) -> tuple[int, np.ndarray]:
    """``(run_bytes, run_offsets)`` of one block of ``cache`` (``[num_blocks, ...]``): the bytes of a block
    are ``len(run_offsets)`` contiguous runs of ``run_bytes`` starting at these offsets from its start."""
    if cache.dim() < 2:
        raise InvalidTensor(f"a paged cache is [num_blocks, ...], got shape {tuple(cache.shape)}")
    esize = cache.element_size()
    shape = list(cache.shape[1:])
    stride = list(cache.stride()[1:])
    # fold trailing dimensions that are contiguous with each other into one run
    run = esize
    k = len(shape)
    while k > 0 and (shape[k - 1] == 1 or stride[k - 1] * esize == run):
        run *= shape[k - 1]
        k -= 1
    offs = np.zeros(1, dtype=np.int64)
    for d in range(k):  # outer dimensions: every combination of their indices starts a run
        step = np.arange(shape[d], dtype=np.int64) * stride[d] * esize
        offs = (offs[:, None] + step[None, :]).reshape(-1)
    return run, offs


def block_segments(srcs: Sequence[torch.Tensor], src_ids: Sequence[int], dsts: Sequence[torch.Tensor],
                   dst_ids: Sequence[int]) -> np.ndarray:
    """Segments ``[n, 3]`` (src address, dst address, bytes) copying block ``src_ids[j]`` of every layer
    ``srcs[l]`` into block ``dst_ids[j]`` of ``dsts[l]``.

    Raises
    ------
    InvalidTensor
        Layers of different counts, dtypes or block layouts.
    InvalidBlockIds
        Id lists of different lengths, or ids outside a cache.
    """
    if len(srcs) != len(dsts):
        raise InvalidTensor(f"{len(srcs)} source layers but {len(dsts)} destination layers")
    if len(src_ids) != len(dst_ids):
        raise InvalidBlockIds(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    sid = np.asarray(src_ids, dtype=np.int64)
    did = np.asarray(dst_ids, dtype=np.int64)
    parts = []
    for s, d in zip(srcs, dsts, strict=True):
        if s.dtype != d.dtype or tuple(s.shape[1:]) != tuple(d.shape[1:]):
            raise InvalidTensor(f"source {s.dtype} {tuple(s.shape)} and destination {d.dtype} {tuple(d.shape)} "
                                "blocks differ")
        if len(sid) and (sid.min() < 0 or sid.max() >= s.shape[0] or did.min() < 0 or did.max() >= d.shape[0]):
            raise InvalidBlockIds(f"block ids outside the caches ({s.shape[0]} / {d.shape[0]} blocks)")
        srun, soffs = block_runs(s)
        drun, doffs = block_runs(d)
        if srun != drun or len(soffs) != len(doffs):  # same shape: runs then correspond index by index
            raise InvalidTensor("source and destination caches lay a block out differently; pack instead")
        es = s.element_size()
        sb = s.data_ptr() + sid * (s.stride(0) * es)
        db = d.data_ptr() + did * (d.stride(0) * es)
        seg = np.empty((len(sid), len(soffs), 3), dtype=np.int64)
        seg[:, :, 0] = sb[:, None] + soffs[None, :]
        seg[:, :, 1] = db[:, None] + doffs[None, :]
        seg[:, :, 2] = srun
        parts.append(seg.reshape(-1, 3))
    return np.concatenate(parts) if parts else np.empty((0, 3), dtype=np.int64)


def copy_segments_cpu(segs: np.ndarray) -> None:
    """Apply segments between CPU tensors (tests, and the CPU path)."""
    import ctypes

    for src, dst, n in segs.tolist():
        ctypes.memmove(dst, src, n)
