"""KV buffers and head placement: raw SGLang pointers as tensors, which heads each rank holds."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError

__all__ = ["wrap_buffer", "head_start", "heads_per_rank", "plan_sources"]


class _CudaArray:
    """A ``__cuda_array_interface__`` view of raw device memory (no copy, no ownership)."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__: dict[str, Any] = {
            "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3, "strides": None}


def wrap_buffer(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A 1-D ``uint8`` tensor over ``nbytes`` of memory at ``ptr`` (no copy).

    The memory must outlive the tensor (SGLang's KV pool does).

    Raises
    ------
    ConfigError
        A negative size or a null pointer with a non-zero size.
    """
    ptr, nbytes = int(ptr), int(nbytes)
    if nbytes < 0 or (ptr == 0 and nbytes > 0):
        raise ConfigError(f"invalid buffer: ptr={ptr:#x} nbytes={nbytes}")
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    if device.type == "cuda":
        return torch.as_tensor(_CudaArray(ptr, nbytes), device=device)
    arr = (ctypes.c_uint8 * nbytes).from_address(ptr)
    return torch.from_numpy(np.frombuffer(memoryview(arr).cast("B"), dtype=np.uint8))


def head_start(rank: int, tp_size: int, total_heads: int) -> int:
    """First global KV head held by attention-TP ``rank`` (heads replicated when tp > heads)."""
    return rank * total_heads // tp_size


def heads_per_rank(tp_size: int, total_heads: int) -> int:
    """KV heads one attention-TP rank holds: ``max(1, total // tp)``, as SGLang's model config gives."""
    return max(1, total_heads // tp_size)


def plan_sources(*, decode_rank: int, decode_tp: int, decode_heads: int, prefill_tp: int, prefill_heads: int,
                 total_heads: int, is_mla: bool) -> dict[int, tuple[int, int] | None]:
    """Which heads decode rank ``decode_rank`` takes from each prefill rank.

    Returns ``{prefill_rank: (lo, hi)}`` in global head numbers, ``None`` for a
    prefill rank it needs nothing from; for MLA one rank gives ``(0, 0)``
    (the whole item).

    Raises
    ------
    ConfigError
        The two sides' head layouts cannot cover this rank's heads.
    """
    out: dict[int, tuple[int, int] | None] = dict.fromkeys(range(prefill_tp))
    if is_mla:
        out[decode_rank % prefill_tp] = (0, 0)
        return out
    lo = head_start(decode_rank, decode_tp, total_heads)
    hi = lo + decode_heads
    cursor = lo
    for q in range(prefill_tp):
        qs = head_start(q, prefill_tp, total_heads)
        a, b = max(cursor, qs), min(hi, qs + prefill_heads)
        if a < b:
            out[q] = (a, b)
            cursor = b
    if cursor != hi:
        raise ConfigError(f"decode rank {decode_rank}/{decode_tp} holds heads [{lo}, {hi}) of {total_heads} but "
                          f"prefill (tp={prefill_tp}, {prefill_heads} heads per rank) covers only up to {cursor}")
    return out
