"""Tensor checks and dtype names shared by every layer (no GPU work here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import InvalidTensor, ShapeMismatch

# Wire names of the dtypes p2pkv moves. 8-bit float formats travel as their
# own names so the receiver rebuilds exactly the same dtype.
_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        _DTYPES[_name] = getattr(torch, _name)
_NAMES = {v: k for k, v in _DTYPES.items()}

MAX_DIMS = 16


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise InvalidTensor(f"dtype {dtype} is not supported; supported: {sorted(_DTYPES)}") from None


def dtype_from_name(name: Any) -> torch.dtype:
    if not isinstance(name, str) or name not in _DTYPES:
        raise InvalidTensor(f"unknown dtype name {name!r:.40}; supported: {sorted(_DTYPES)}")
    return _DTYPES[name]


def supported_dtypes() -> list[torch.dtype]:
    return list(_DTYPES.values())


def check_tensor(t: Any, what: str = "tensor") -> torch.Tensor:
    """Validate a tensor that p2pkv will read as raw bytes."""
    if not isinstance(t, torch.Tensor):
        raise InvalidTensor(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    # a lazy negation or conjugation: its memory does not hold the values it reads as, and p2pkv
    # moves (or writes) memory
    if t.is_neg():
        raise InvalidTensor(f"{what} is a negative-bit view (torch._neg_view): its memory holds the values "
                            "negated; call .resolve_neg() first")
    if t.is_conj():
        raise InvalidTensor(f"{what} is a conjugate-bit view (.conj()): its memory holds the values "
                            "unconjugated; call .resolve_conj() first")
    dtype_name(t.dtype)
    if t.device.type == "meta":
        raise InvalidTensor(f"{what} is a meta tensor (it has no data)")
    if t.layout != torch.strided:
        raise InvalidTensor(f"{what} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dim() > MAX_DIMS:
        raise InvalidTensor(f"{what} has {t.dim()} dimensions; at most {MAX_DIMS} are supported")
    if not t.is_contiguous():
        raise InvalidTensor(f"{what} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
                            "call .contiguous() first, or pack paged blocks with p2pkv.kernels.pack")
    if t.requires_grad:
        t = t.detach()
    return t


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's memory (no copy)."""
    flat = t.reshape(-1)
    if flat.dtype == torch.uint8:
        return flat
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=t.device)
    return flat.view(torch.uint8)


_ITEMSIZE = {d: d.itemsize for d in _DTYPES.values()}


def nbytes_of(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = _ITEMSIZE.get(dtype) or dtype.itemsize
    for d in shape:
        n *= int(d)
    return n


def check_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS:
        raise InvalidTensor(f"shape must be a list of at most {MAX_DIMS} ints, got {shape!r:.80}")
    out = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0 or d > 2**48:
            raise InvalidTensor(f"shape entries must be ints in 0..2**48, got {shape!r:.80}")
        out.append(d)
    return tuple(out)


def check_out(out: Any, device: torch.device, dtype: torch.dtype | None = None,
              shape: Sequence[int] | None = None) -> torch.Tensor:
    """Validate an ``out=`` tensor against the engine device and, once known, the data."""
    if isinstance(out, torch.Tensor) and out.requires_grad:
        raise InvalidTensor("out requires grad: p2pkv writes into it in place, which autograd forbids; "
                            "pass out.detach() or a tensor without requires_grad")
    out = check_tensor(out, "out")
    if out.is_inference() and not torch.is_inference_mode_enabled():
        raise InvalidTensor("out is an inference tensor and cannot be written outside torch.inference_mode()")
    if out.device != device:
        raise InvalidTensor(f"out is on {out.device} but this engine receives on {device}")
    if dtype is not None and out.dtype != dtype:
        raise ShapeMismatch(f"out has dtype {out.dtype} but the data is {dtype}")
    if shape is not None and tuple(out.shape) != tuple(shape):
        raise ShapeMismatch(f"out has shape {tuple(out.shape)} but the data has shape {tuple(shape)}")
    return out
