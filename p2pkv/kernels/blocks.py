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

:func:`paged_plans` is the same copy without a segment per run: what does not change between
requests (every layer's cache addresses and block strides, the run layout, checked once) is a
:class:`PagedPlan`; per request only the ``(source block, destination block)`` pairs
(:func:`block_pairs`, checked once for all layers) go to the GPU, and
:meth:`p2pkv.kernels.batch.BatchCopier.paged_copy` copies every layer's runs of those blocks in one
launch. :meth:`PagedPlan.segments` expands a plan to segments (the CPU path, and a reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import InvalidBlockIds, InvalidTensor

__all__ = ["block_runs", "block_segments", "copy_segments_cpu", "PagedPlan", "paged_plans", "block_pairs"]


def block_runs(cache: torch.Tensor, most: int | None = None) -> tuple[int, np.ndarray]:
    """``(run_bytes, run_offsets)`` of one block of ``cache`` (``[num_blocks, ...]``): the bytes of a block
    are ``len(run_offsets)`` contiguous runs of ``run_bytes`` starting at these offsets from its start.
    ``most`` caps how many trailing dimensions are folded into a run."""
    if cache.dim() < 2:
        raise InvalidTensor(f"a paged cache is [num_blocks, ...], got shape {tuple(cache.shape)}")
    k, run = _fold(cache, most)
    esize = cache.element_size()
    shape = list(cache.shape[1:])
    stride = list(cache.stride()[1:])
    offs = np.zeros(1, dtype=np.int64)
    for d in range(k):  # outer dimensions: every combination of their indices starts a run
        step = np.arange(shape[d], dtype=np.int64) * stride[d] * esize
        offs = (offs[:, None] + step[None, :]).reshape(-1)
    return run, offs


def _fold(cache: torch.Tensor, most: int | None = None) -> tuple[int, int]:
    """(k, run bytes): a block's trailing dimensions from ``k`` on (at most ``most`` of them) are contiguous
    with each other and fold into one run."""
    esize = cache.element_size()
    shape = list(cache.shape[1:])
    stride = list(cache.stride()[1:])
    run = esize
    k = len(shape)
    lo = 0 if most is None else max(0, len(shape) - most)
    while k > lo and (shape[k - 1] == 1 or stride[k - 1] * esize == run):
        run *= shape[k - 1]
        k -= 1
    return k, run


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


class PagedPlan:
    """The constant part of a fused block copy between layers that share one block layout.

    ``layers`` is ``[n, 4]`` int64 (source base address, destination base address, source block
    stride, destination block stride; bytes), ``runs`` ``[r, 2]`` (each run's byte offset in a source
    block and in a destination block), each run ``run_bytes`` long; ``align`` is what every address,
    stride, offset and ``run_bytes`` is a multiple of (16, 4 or 1); ``src_blocks`` / ``dst_blocks``
    the fewest blocks of any source / destination layer (block ids must be below them).
    """

    __slots__ = ("layers", "runs", "run_bytes", "align", "src_blocks", "dst_blocks", "_dev")

    def __init__(self, layers: np.ndarray, runs: np.ndarray, run_bytes: int, src_blocks: int, dst_blocks: int):
        self.layers = layers
        self.runs = runs
        self.run_bytes = int(run_bytes)
        self.src_blocks = int(src_blocks)
        self.dst_blocks = int(dst_blocks)
        bits = int(np.bitwise_or.reduce(layers.reshape(-1))) if layers.size else 0
        bits |= int(np.bitwise_or.reduce(runs.reshape(-1))) if runs.size else 0
        bits |= self.run_bytes
        self.align = 16 if bits & 15 == 0 else 4 if bits & 3 == 0 else 1
        self._dev: dict[Any, Any] = {}  # device -> the tables there (BatchCopier.paged_copy)

    def nbytes(self, npairs: int) -> int:
        """Bytes copied for ``npairs`` block pairs."""
        return len(self.layers) * npairs * len(self.runs) * self.run_bytes

    def segments(self, pairs: np.ndarray) -> np.ndarray:
        """The plan's copy of ``pairs`` (``[n, 2]`` from :func:`block_pairs`) as ``[m, 3]`` segments, ordered
        layer, pair, run (as :func:`block_segments` orders them)."""
        nl, nr, npairs = len(self.layers), len(self.runs), len(pairs)
        seg = np.empty((nl, npairs, nr, 3), dtype=np.int64)
        L = self.layers
        seg[..., 0] = (L[:, 0, None] + pairs[None, :, 0] * L[:, 2, None])[:, :, None] + self.runs[None, None, :, 0]
        seg[..., 1] = (L[:, 1, None] + pairs[None, :, 1] * L[:, 3, None])[:, :, None] + self.runs[None, None, :, 1]
        seg[..., 2] = self.run_bytes
        return seg.reshape(-1, 3)

    def __repr__(self) -> str:
        return (f"<PagedPlan {len(self.layers)} layers, {len(self.runs)} runs of {self.run_bytes} B, "
                f"align {self.align}>")


def paged_plans(srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor]) -> list[PagedPlan]:
    """The plans copying blocks of every layer ``srcs[l]`` into ``dsts[l]`` (one per distinct block layout;
    usually one). Built once per pair of cache sets: only the block ids change between requests.

    Unlike :func:`block_segments`, source and destination blocks may lay their elements out
    differently (e.g. ``[block, head, token, dim]`` into ``[block, token, head, dim]`` seen as the same
    shape): runs are then as long as both sides keep contiguous.

    Raises
    ------
    InvalidTensor
        Layers of different counts, or a layer whose source and destination differ in dtype or in their
        blocks' shape.
    """
    if len(srcs) != len(dsts):
        raise InvalidTensor(f"{len(srcs)} source layers but {len(dsts)} destination layers")
    groups: dict[Any, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    runs_of: dict[Any, tuple[int, np.ndarray, np.ndarray]] = {}
    for s, d in zip(srcs, dsts, strict=True):
        if s.dtype != d.dtype or s.dim() != d.dim() or tuple(s.shape[1:]) != tuple(d.shape[1:]):
            raise InvalidTensor(f"source {s.dtype} {tuple(s.shape)} and destination {d.dtype} {tuple(d.shape)} "
                                "blocks differ")
        sig = (s.dtype, tuple(s.shape[1:]), tuple(s.stride()[1:]), tuple(d.stride()[1:]))
        if sig not in runs_of:
            # runs as long as both sides allow: fold only the trailing dimensions contiguous in both
            most = s.dim() - 1 - max(_fold(s)[0], _fold(d)[0])
            srun, soffs = block_runs(s, most)
            drun, doffs = block_runs(d, most)
            if srun != drun or len(soffs) != len(doffs):  # pragma: no cover - same shape, same fold depth
                raise InvalidTensor("source and destination caches lay a block out differently")
            runs_of[sig] = (srun, soffs, doffs)
        groups.setdefault(sig, []).append((s, d))
    plans = []
    for sig, pairs in groups.items():
        run, soffs, doffs = runs_of[sig]
        es = pairs[0][0].element_size()
        layers = np.array([[s.data_ptr(), d.data_ptr(), s.stride(0) * es, d.stride(0) * es] for s, d in pairs],
                          dtype=np.int64).reshape(-1, 4)
        runs = np.stack([soffs, doffs], axis=1).astype(np.int64)
        plans.append(PagedPlan(layers, runs, run, min(s.shape[0] for s, _ in pairs),
                               min(d.shape[0] for _, d in pairs)))
    return plans


def block_pairs(src_ids: Any, dst_ids: Any, src_blocks: int, dst_blocks: int) -> np.ndarray:
    """``[n, 2]`` int64 (source block, destination block), checked once for every layer: as many source as
    destination ids, each an integer in ``[0, src_blocks)`` / ``[0, dst_blocks)``.

    Raises
    ------
    InvalidBlockIds
    """
    sid, did = _ids(src_ids, "source"), _ids(dst_ids, "destination")
    if len(sid) != len(did):
        raise InvalidBlockIds(f"{len(sid)} source blocks but {len(did)} destination blocks")
    if len(sid) and (int(sid.min()) < 0 or int(sid.max()) >= src_blocks):
        raise InvalidBlockIds(f"source block ids outside the cache ({src_blocks} blocks): "
                              f"{int(sid.min())}..{int(sid.max())}")
    if len(did) and (int(did.min()) < 0 or int(did.max()) >= dst_blocks):
        raise InvalidBlockIds(f"destination block ids outside the cache ({dst_blocks} blocks): "
                              f"{int(did.min())}..{int(did.max())}")
    out = np.empty((len(sid), 2), dtype=np.int64)
    out[:, 0] = sid
    out[:, 1] = did
    return out


def _ids(ids: Any, what: str) -> np.ndarray:
    try:
        a = np.asarray(ids)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidBlockIds(f"{what} block ids are not a list of integers ({type(exc).__name__})") from None
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise InvalidBlockIds(f"{what} block ids must be a flat list of integers, got {a.dtype} of shape {a.shape}")
    if a.dtype.kind == "u" and a.size and int(a.max()) >= 2**63:
        raise InvalidBlockIds(f"{what} block ids out of range")
    return a.astype(np.int64, copy=False)
