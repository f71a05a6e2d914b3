"""Paged-KV pack/unpack: gather blocks of a paged KV cache into a contiguous
buffer and scatter them back.

A layer cache is any tensor whose dim 0 indexes blocks (``[num_blocks, ...]``)
with arbitrary strides — e.g. vLLM's FlashAttention layout
``[2, num_blocks, block_size, heads, head]`` viewed as ``cache.transpose(0, 1)``.
The packed form is contiguous ``[len(block_ids), *layer.shape[1:]]`` (one layer)
or ``[L, len(block_ids), *layer.shape[1:]]`` (many layers, one launch); given an
``out`` buffer of the right byte size, the bytes are written there and ``out``
itself (any dtype or shape, e.g. a pool buffer's flat ``uint8`` data) is returned.

On CUDA tensors the work runs in ``csrc/paged_kv.cu``, compiled at run time
by NVRTC through CuPy (cached per device); elsewhere, or without CuPy, it runs
through ``torch.index_select`` / ``index_copy_``. Both give the same bits.
Block ids are checked on the host before any kernel runs; for ``unpack`` a
repeated id takes the data of its last occurrence.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from typing import Any

import torch

from .._tensors import dtype_name
from ..errors import InvalidBlockIds, InvalidTensor

__all__ = ["BlockIds", "pack", "unpack", "pack_layers", "unpack_layers", "cuda_available", "backend_for"]

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_THREADS = 256
_MAX_OUTER = 4


# ----------------------------------------------------------------------------- block ids
class BlockIds:
    """Validated block ids, uploaded once and reusable across layers.

    Parameters
    ----------
    ids:
        A sequence of ints or a 1-D integer tensor (CPU or CUDA).
    num_blocks:
        Valid ids are ``0 <= id < num_blocks``.
    device:
        Where the kernels will read them (the cache's device).

    The device copy is made on first use, from pinned memory without a host
    sync, ordered on the stream current at that moment; use the object on that
    stream (or after it).
    """

    __slots__ = ("host", "device", "num_blocks", "_dev", "_dev_unpack", "_host_unpack", "_pinned")
    host: torch.Tensor

    def __init__(self, ids: Any, num_blocks: int, device: torch.device | str = "cpu"):
        d = torch.device(device)
        if d.type == "cuda" and d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
        self.device = d
        self.num_blocks = int(num_blocks)
        if isinstance(ids, BlockIds):
            host = ids.host
        elif isinstance(ids, torch.Tensor):
            if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
                raise InvalidBlockIds(f"block ids must be an integer tensor, got dtype {ids.dtype}")
            if ids.dim() != 1:
                raise InvalidBlockIds(f"block ids must be 1-D, got shape {tuple(ids.shape)}")
            if ids.device.type == "cuda" and self.device.type == "cuda" and ids.device != self.device:
                raise InvalidBlockIds(f"block ids are on {ids.device} but the cache is on {self.device}")
            host = ids.detach().to("cpu", torch.int64)
        elif isinstance(ids, (list, tuple, range)):
            for x in ids:
                if isinstance(x, bool) or not isinstance(x, int):
                    raise InvalidBlockIds(f"block ids must be ints, got {type(x).__name__}: {x!r:.40}")
            host = torch.tensor(list(ids), dtype=torch.int64)
        else:
            raise InvalidBlockIds("block ids must be a sequence of ints or an integer tensor, "
                                  f"got {type(ids).__name__}")
        if host.numel():
            lo, hi = int(host.min()), int(host.max())
            if lo < 0 or hi >= self.num_blocks:
                bad = lo if lo < 0 else hi
                raise InvalidBlockIds(f"block id {bad} is out of range for a cache of {self.num_blocks} blocks")
        self.host = host.contiguous()
        self._dev: torch.Tensor | None = None
        self._dev_unpack: torch.Tensor | None = None
        self._host_unpack: torch.Tensor | None = None
        self._pinned: list[torch.Tensor] = []

    def __len__(self) -> int:
        return int(self.host.numel())

    def _upload(self, h: torch.Tensor) -> torch.Tensor:
        """Copy ids to the device without a host sync: from pinned memory, ordered on the current stream.

        The pinned host tensor is kept with this object, so it outlives the copy."""
        if self.device.type == "cpu":
            return h
        try:
            pinned = h.pin_memory()
        except RuntimeError:  # no pinned memory available: a synchronous copy is still correct
            return h.to(self.device, non_blocking=False)
        self._pinned.append(pinned)
        with torch.cuda.device(self.device):
            return pinned.to(self.device, non_blocking=True)

    def on_device(self) -> torch.Tensor:
        if self._dev is None:
            self._dev = self._upload(self.host)
        return self._dev

    def for_unpack_host(self) -> torch.Tensor:
        """Ids with every occurrence but the last of a repeated id set to -1."""
        if self._host_unpack is None:
            h = self.host
            if h.numel() and torch.unique(h).numel() != h.numel():
                last: dict[int, int] = {}
                for pos, v in enumerate(h.tolist()):
                    last[v] = pos
                keep = torch.full_like(h, -1)
                for v, pos in last.items():
                    keep[pos] = v
                self._host_unpack = keep
            else:
                self._host_unpack = h
        return self._host_unpack

    def for_unpack_device(self) -> torch.Tensor:
        if self._dev_unpack is None:
            h = self.for_unpack_host()
            self._dev_unpack = self.on_device() if h is self.host else self._upload(h)
        return self._dev_unpack


def _ids(block_ids: Any, layer: torch.Tensor) -> BlockIds:
    if isinstance(block_ids, BlockIds):
        if block_ids.num_blocks != layer.shape[0]:
            raise InvalidBlockIds(f"BlockIds were validated for {block_ids.num_blocks} blocks, "
                                  f"the cache has {layer.shape[0]}")
        if layer.device.type == "cuda" and block_ids.device != layer.device:
            raise InvalidBlockIds(f"BlockIds are for {block_ids.device} but the cache is on {layer.device}")
        return block_ids
    return BlockIds(block_ids, layer.shape[0], layer.device)


# ----------------------------------------------------------------------------- checks
def _check_layer(layer: Any, what: str = "layer") -> torch.Tensor:
    if not isinstance(layer, torch.Tensor):
        raise InvalidTensor(f"{what} must be a torch.Tensor, got {type(layer).__name__}")
    if layer.layout != torch.strided or layer.dim() < 1:
        raise InvalidTensor(f"{what} must be a dense tensor of at least 1 dimension (blocks first)")
    dtype_name(layer.dtype)
    if any(s < 0 for s in layer.stride()):
        raise InvalidTensor(f"{what} has negative strides {layer.stride()}")
    return layer


def _row_shape(layer: torch.Tensor) -> tuple[int, ...]:
    return tuple(layer.shape[1:])


def _check_buf(buf: Any, device: torch.device, nbytes: int, what: str = "buffer") -> torch.Tensor:
    if not isinstance(buf, torch.Tensor):
        raise InvalidTensor(f"{what} must be a torch.Tensor, got {type(buf).__name__}")
    if not buf.is_contiguous():
        raise InvalidTensor(f"{what} must be contiguous")
    if buf.device != device:
        raise InvalidTensor(f"{what} is on {buf.device} but the cache is on {device}")
    have = buf.numel() * buf.element_size()
    if have != nbytes:
        raise InvalidTensor(f"{what} holds {have} bytes; {nbytes} are needed")
    return buf


def _int_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.element_size()])


# ----------------------------------------------------------------------------- CUDA backend
_lock = threading.Lock()
_modules: dict[int, Any] = {}
_ptr_tables: dict[tuple, torch.Tensor] = {}
_streams: dict[int, Any] = {}
_disabled = os.environ.get("P2PKV_DISABLE_CUDA_KERNELS", "") not in ("", "0")


def cuda_available() -> bool:
    """True when CUDA kernels can run (CUDA visible and CuPy importable)."""
    if _disabled or not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def backend_for(t: torch.Tensor) -> str:
    return "cuda" if t.device.type == "cuda" and cuda_available() else "torch"


def _source() -> str:
    try:
        from importlib.resources import files

        return (files("p2pkv.csrc") / "paged_kv.cu").read_text()
    except Exception:
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "..", "..", "csrc", "paged_kv.cu")) as f:
            return f.read()


def _module(device: int) -> tuple[dict[tuple[str, int], Any], int]:
    mod = _modules.get(device)
    if mod is None:
        with _lock:
            mod = _modules.get(device)
            if mod is None:
                import cupy

                with cupy.cuda.Device(device):
                    mod = cupy.RawModule(code=_source(), options=("--std=c++17",), name_expressions=None)
                    kerns = {}
                    for vec in (16, 8, 4, 2, 1):
                        kerns[("pack", vec)] = mod.get_function(f"p2pkv_pack_v{vec}")
                        kerns[("unpack", vec)] = mod.get_function(f"p2pkv_unpack_v{vec}")
                    sms = torch.cuda.get_device_properties(device).multi_processor_count
                mod = (kerns, sms)
                _modules[device] = mod
    return mod


def _stream(ptr: int) -> Any:
    s = _streams.get(ptr)
    if s is None:
        import cupy

        s = None
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        if from_external is not None:
            try:
                s = from_external(_PtrStream(ptr))
            except Exception:
                s = None
        if s is None:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                s = cupy.cuda.ExternalStream(ptr)
        if len(_streams) > 64:
            _streams.clear()
        _streams[ptr] = s
    return s


class _PtrStream:
    """A raw stream handle speaking the CUDA stream protocol (for CuPy's from_external)."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


class _Plan:
    """How one layer layout maps onto the kernel's (run, outer dims) form."""

    __slots__ = ("block_stride", "outer_size", "outer_stride", "n_outer", "run_bytes")

    def __init__(self, layer: torch.Tensor):
        es = layer.element_size()
        dims = [(s, st * es) for s, st in zip(layer.shape[1:], layer.stride()[1:], strict=True) if s != 1]
        run = es
        while dims and dims[-1][1] == run:
            run *= dims.pop()[0]
        merged: list[list[int]] = []
        for size, stride in dims:  # merge outer dims that are contiguous with each other
            if merged and merged[-1][1] == stride * size:
                merged[-1] = [merged[-1][0] * size, stride]
            else:
                merged.append([size, stride])
        self.block_stride = layer.stride()[0] * es
        self.run_bytes = run
        if len(merged) > _MAX_OUTER:
            self.n_outer = -1
            return
        while len(merged) < _MAX_OUTER:
            merged.insert(0, [1, 0])
        self.outer_size = [m[0] for m in merged]
        self.outer_stride = [m[1] for m in merged]
        self.n_outer = math.prod(self.outer_size)

    @property
    def supported(self) -> bool:
        return self.n_outer > 0


_plans: dict[tuple, _Plan] = {}


def _plan(layer: torch.Tensor) -> _Plan:
    """Plans depend only on shape, strides and dtype: cached (a serving engine has a handful)."""
    key = (tuple(layer.shape), layer.stride(), layer.element_size())
    p = _plans.get(key)
    if p is None:
        p = _Plan(layer)
        if len(_plans) > 1024:
            _plans.clear()
        _plans[key] = p
    return p


def _vec_width(plan: _Plan, ptrs: Sequence[int], buf_ptr: int) -> int:
    g = plan.run_bytes
    for v in [plan.block_stride, buf_ptr, *plan.outer_stride, *ptrs]:
        g = math.gcd(g, int(v))
    for w in (16, 8, 4, 2, 1):
        if g % w == 0:
            return w
    return 1


def _launch(direction: str, layers: Sequence[torch.Tensor], buf: torch.Tensor, ids: torch.Tensor,
            plan: _Plan) -> None:
    import numpy as np

    dev = layers[0].device.index
    kerns, sms = _module(dev)
    n_ids = ids.numel()
    rows = len(layers) * n_ids * plan.n_outer
    if rows == 0 or plan.run_bytes == 0:
        return
    ptrs = [t.data_ptr() for t in layers]
    vec = _vec_width(plan, ptrs, buf.data_ptr())
    chunks = -(-(plan.run_bytes // vec) // 256)
    units = rows * chunks
    if units >= 2**31:  # the kernel indexes its work in 32 bits
        raise InvalidTensor(f"{units} work units exceed one launch; pack fewer blocks or layers per call")
    warps_per_cta = _THREADS // 32
    grid = max(1, min(-(-units // warps_per_cta), sms * 16))
    if len(layers) == 1:
        table, base0 = 0, ptrs[0]
    else:
        key = (dev, tuple(ptrs))
        tab = _ptr_tables.get(key)
        if tab is None:
            tab = torch.tensor(ptrs, dtype=torch.int64).to(layers[0].device)
            if len(_ptr_tables) > 256:
                _ptr_tables.clear()
            _ptr_tables[key] = tab
        table, base0 = tab.data_ptr(), 0
    i64 = np.int64
    args = (i64(table), i64(base0), i64(buf.data_ptr()), i64(ids.data_ptr()), i64(len(layers)), i64(n_ids),
            i64(plan.block_stride), *(i64(x) for x in plan.outer_size), *(i64(x) for x in plan.outer_stride),
            i64(plan.n_outer), i64(plan.run_bytes), i64(n_ids * plan.n_outer * plan.run_bytes), i64(chunks))
    import cupy

    stream = _stream(torch.cuda.current_stream(dev).cuda_stream)
    kern = kerns[(direction, vec)]
    if cupy.cuda.runtime.getDevice() != dev:
        with cupy.cuda.Device(dev), stream:
            kern((grid,), (_THREADS,), args)
    else:
        with stream:
            kern((grid,), (_THREADS,), args)


# ----------------------------------------------------------------------------- public API
def _same_layout(layers: Sequence[torch.Tensor]) -> None:
    first = layers[0]
    for i, t in enumerate(layers[1:], 1):
        _check_layer(t, f"layers[{i}]")
        if t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype or t.device != first.device:
            raise InvalidTensor(f"layers[{i}] differs from layers[0] in shape, strides, dtype or device "
                                f"({tuple(t.shape)}/{t.stride()}/{t.dtype}/{t.device} vs "
                                f"{tuple(first.shape)}/{first.stride()}/{first.dtype}/{first.device})")


def _row_bytes(layer: torch.Tensor) -> int:
    return math.prod(_row_shape(layer)) * layer.element_size()


def pack(layer: torch.Tensor, block_ids: Any, out: torch.Tensor | None = None, *,
         backend: str | None = None) -> torch.Tensor:
    """Gather ``layer[block_ids]`` into one contiguous buffer.

    Parameters
    ----------
    layer:
        A blocks-first layer cache ``[num_blocks, ...]`` (any strides).
    block_ids:
        The blocks to gather, in order: a :class:`BlockIds` or a sequence of ints.
    out:
        Optional destination: contiguous, on ``layer``'s device, exactly
        ``n * row`` bytes, of any dtype and shape (e.g. a pool buffer's flat
        ``uint8`` ``buf.data``).
    backend:
        ``"cuda"`` or ``"torch"``; default: CUDA kernels for CUDA tensors when
        CuPy is available, else the torch fallback.

    Returns
    -------
    torch.Tensor
        ``out`` itself when given (its dtype and shape unchanged, e.g. flat
        ``uint8``); otherwise a new ``[n, *layer.shape[1:]]`` tensor of
        ``layer``'s dtype. Runs on the current CUDA stream for CUDA tensors.

    Raises
    ------
    InvalidBlockIds, InvalidTensor
    """
    return pack_layers([layer], block_ids, out, backend=backend, _single=True)


def pack_layers(layers: Sequence[torch.Tensor], block_ids: Any, out: torch.Tensor | None = None, *,
                backend: str | None = None, _single: bool = False) -> torch.Tensor:
    """Gather the same blocks of many same-layout layers in one launch.

    Returns ``out`` itself when given (contiguous, ``L * n * row`` bytes, any
    dtype and shape); otherwise a new ``[L, n, *layer.shape[1:]]`` tensor.

    Raises
    ------
    InvalidBlockIds, InvalidTensor
    """
    if not isinstance(layers, (list, tuple)) or not layers:
        raise InvalidTensor("layers must be a non-empty list of tensors")
    first = _check_layer(layers[0], "layers[0]" if not _single else "layer")
    _same_layout(layers)
    ids = _ids(block_ids, first)
    n = len(ids)
    shape = ((n,) if _single else (len(layers), n)) + _row_shape(first)
    nbytes = len(layers) * n * _row_bytes(first)
    if out is None:
        out = torch.empty(shape, dtype=first.dtype, device=first.device)
    else:
        _check_buf(out, first.device, nbytes, "out")
    be = backend or backend_for(first)
    plan = _plan(first) if be == "cuda" else None
    if be == "cuda" and plan is not None and plan.supported:
        _launch("pack", layers, out, ids.on_device(), plan)
        return out
    flat = _int_view(out.view(first.dtype) if out.dtype != first.dtype else out).view(
        (len(layers), n) + _row_shape(first))
    idx = ids.on_device() if first.device.type != "cpu" else ids.host
    for li, layer in enumerate(layers):
        torch.index_select(_int_view(layer), 0, idx, out=flat[li])
    return out


def unpack(buf: torch.Tensor, layer: torch.Tensor, block_ids: Any, *, backend: str | None = None) -> None:
    """Scatter a packed ``[n, *layer.shape[1:]]`` buffer into ``layer[block_ids]`` (in place)."""
    unpack_layers(buf, [layer], block_ids, backend=backend)


def unpack_layers(buf: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Any, *,
                  backend: str | None = None) -> None:
    """Scatter ``[L, n, ...]`` packed data into the blocks of every layer, in one launch."""
    if not isinstance(layers, (list, tuple)) or not layers:
        raise InvalidTensor("layers must be a non-empty list of tensors")
    first = _check_layer(layers[0], "layers[0]")
    _same_layout(layers)
    ids = _ids(block_ids, first)
    n = len(ids)
    _check_buf(buf, first.device, len(layers) * n * _row_bytes(first), "buf")
    if n == 0:
        return
    be = backend or backend_for(first)
    plan = _plan(first) if be == "cuda" else None
    if be == "cuda" and plan is not None and plan.supported:
        _launch("unpack", layers, buf, ids.for_unpack_device(), plan)
        return
    src_all = buf.view(torch.uint8).view(-1) if buf.dtype != first.dtype else buf.reshape(-1)
    src_all = _int_view(src_all.view(first.dtype)).view((len(layers), n) + _row_shape(first))
    keep = ids.for_unpack_host()
    pos = (keep >= 0).nonzero().view(-1)
    idx = keep[pos]
    if first.device.type != "cpu":
        pos, idx = pos.to(first.device), idx.to(first.device)
    for li, layer in enumerate(layers):
        src = src_all[li] if pos.numel() == n else src_all[li].index_select(0, pos)
        _int_view(layer).index_copy_(0, idx, src)
