"""Synthetic, reproducible KV-cache tensors shaped like real models' (demo, tests, benchmarks).

Values are cheap bit patterns, different for every (request, layer), so both
sides can regenerate them and compare bit for bit without sending hashes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["ModelPreset", "PRESETS", "kv_layer", "same_bits"]


@dataclass(frozen=True)
class ModelPreset:
    """The KV-cache geometry of one model (per tensor-parallel rank)."""

    name: str
    layers: int
    kv_heads: int
    head_size: int
    kv_planes: int = 2  # K and V; 1 for MLA's joint latent
    block_size: int = 16

    def layer_shape(self, tokens: int) -> tuple[int, ...]:
        """Per-layer packed KV of ``tokens`` tokens: ``[planes, blocks, block_size, heads, head]``."""
        blocks = (tokens + self.block_size - 1) // self.block_size
        return (self.kv_planes, blocks, self.block_size, self.kv_heads, self.head_size)

    def bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """KV bytes of one token over all layers."""
        esize = torch.empty((), dtype=dtype).element_size()
        return self.kv_planes * self.kv_heads * self.head_size * esize * self.layers

    def layer_bytes(self, tokens: int, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of one layer of ``tokens`` tokens in the packed layout of :meth:`layer_shape`."""
        return math.prod(self.layer_shape(tokens)) * torch.empty((), dtype=dtype).element_size()


PRESETS = {
    "llama3-8b": ModelPreset("llama3-8b", layers=32, kv_heads=8, head_size=128),
    "llama3-70b-tp8": ModelPreset("llama3-70b-tp8", layers=80, kv_heads=1, head_size=128),
    "deepseek-mla": ModelPreset("deepseek-mla", layers=61, kv_heads=1, head_size=576, kv_planes=1),
}


_BASES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _base(n32: int, device: torch.device) -> torch.Tensor:
    """``n32`` pseudo-random int32 words on ``device``, cached for reuse."""
    key = (n32, device)
    base = _BASES.get(key)
    if base is None:
        w = torch.arange(n32, dtype=torch.int64, device=device)
        w = (w * 2654435761) & 0xFFFFFFFF
        base = ((w ^ (w >> 13)) & 0x7FFFFFFF).to(torch.int32)
        if len(_BASES) > 8:
            _BASES.clear()
        _BASES[key] = base
    return base


def kv_layer(request: int, layer: int, shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16,
             device: str | torch.device = "cpu") -> torch.Tensor:
    """A deterministic tensor for ``(request, layer)``; any dtype, filled through its bits."""
    numel = 1
    for d in shape:
        numel *= d
    esize = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * esize
    n32 = (nbytes + 3) // 4
    seed = ((request * 1_000_003 + layer * 7919 + 17) * 2654435761) & 0x7FFFFFFF
    words = _base(n32, torch.device(device)) ^ seed
    raw = words.view(torch.uint8)[:nbytes]
    if dtype == torch.bool:
        raw = raw & 1  # only 0 and 1 are valid bool bytes
    return raw.view(dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype, device=device)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN patterns included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
