"""Buffer pool: one preallocated arena per engine, carved into aligned buffers.

The arena is a single ``uint8`` tensor allocated once on the engine's device
(CPU or CUDA). Buffers are views into it, so in steady state no allocation
happens per transfer. Free space is kept in size classes (power-of-two bins
of free extents) with neighbour coalescing: allocation looks at one bin and
the bins above it, freeing merges with adjacent free extents, both in time
bounded by the number of bins (about 40) plus a short scan.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .errors import InvalidTensor, P2pkvError, PoolExhausted

__all__ = ["BufferPool", "Buffer", "ALIGN"]

ALIGN = 256  # bytes; every buffer starts on this boundary (uint4 loads, NCCL, IPC)
_SCAN = 64   # how many extents of the exact bin are tried before moving up


def _round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


class _Extents:
    """Free-extent bookkeeping of the arena (offsets only, no tensors)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.by_start: dict[int, int] = {}
        self.by_end: dict[int, int] = {}
        self.bins: list[dict[int, None]] = [dict() for _ in range(64)]  # ordered sets of starts
        self.free_bytes = 0
        if capacity:
            self._add(0, capacity)

    def _add(self, start: int, size: int) -> None:
        self.by_start[start] = size
        self.by_end[start + size] = start
        self.bins[size.bit_length() - 1][start] = None
        self.free_bytes += size

    def _remove(self, start: int) -> int:
        size = self.by_start.pop(start)
        del self.by_end[start + size]
        del self.bins[size.bit_length() - 1][start]
        self.free_bytes -= size
        return size

    def take(self, size: int) -> int | None:
        b = size.bit_length() - 1
        start = None
        for i, s in enumerate(self.bins[b]):
            if self.by_start[s] >= size:
                start = s
                break
            if i >= _SCAN:
                break
        if start is None:
            for bb in range(b + 1, len(self.bins)):
                if self.bins[bb]:
                    start = next(iter(self.bins[bb]))
                    break
        if start is None:
            return None
        have = self._remove(start)
        if have > size:
            self._add(start + size, have - size)
        return start

    def give(self, start: int, size: int) -> None:
        prev = self.by_end.get(start)
        if prev is not None:
            size += self._remove(prev)
            start = prev
        nxt = start + size
        if nxt in self.by_start:
            size += self._remove(nxt)
        self._add(start, size)

    def largest(self) -> int:
        for bb in range(len(self.bins) - 1, -1, -1):
            if self.bins[bb]:
                return max(self.by_start[s] for s in self.bins[bb])
        return 0


class BufferLike:
    """What a holder of received bytes sees: ``data`` (flat ``uint8``), ``view``, ``released``, ``release``.

    :class:`Buffer` (a pool region) and the fast path's per-tensor lease share it.
    """

    __slots__ = ()
    _released: bool

    @property
    def data(self) -> torch.Tensor:
        raise NotImplementedError

    def view(self, dtype: torch.dtype, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
        """The bytes reinterpreted as a contiguous tensor of ``dtype`` and ``shape``."""
        raw = self.data
        if raw.numel() == 0:
            return torch.empty(tuple(shape), dtype=dtype, device=raw.device)
        return raw.view(dtype).view(tuple(shape))

    @property
    def released(self) -> bool:
        return self._released


class Buffer(BufferLike):
    """A region of the pool (or an overflow allocation) holding one tensor.

    ``release()`` returns it to the pool; calling it twice is harmless. Also a
    context manager.
    """

    __slots__ = ("_pool", "offset", "size", "nbytes", "_data", "_arena", "_released", "overflow", "__weakref__")

    def __init__(self, pool: BufferPool, offset: int, size: int, nbytes: int, data: torch.Tensor | None,
                 overflow: bool = False, arena: torch.Tensor | None = None):
        self._pool = pool
        self.offset = offset
        self.size = size
        self.nbytes = nbytes
        # the bytes: ``data``, or (None) a view of ``arena`` made on first use; slicing a tensor
        # costs microseconds, and a buffer released unused (a request given up) never needs it
        self._data = data
        self._arena = arena
        self._released = False
        self.overflow = overflow

    @property
    def data(self) -> torch.Tensor:
        """The buffer's bytes as a flat ``uint8`` tensor."""
        if self._released:
            raise P2pkvError("buffer used after release")
        d = self._data
        if d is None:
            arena = self._arena
            if arena is None:  # (released by another thread meanwhile)
                raise P2pkvError("buffer used after release")
            d = self._data = arena[self.offset:self.offset + self.nbytes]
        return d

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._pool._free(self)

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        kind = "overflow" if self.overflow else f"offset={self.offset}"
        return f"<Buffer {self.nbytes}B {kind} {state}>"


class BufferPool:
    """A thread-safe arena allocator on one device.

    Parameters
    ----------
    capacity:
        Arena size in bytes (allocated once, at construction).
    device:
        ``torch.device`` or string, ``cpu`` or ``cuda:N``.
    pin_memory:
        For a CPU arena, allocate it in page-locked memory (staging for GPUs).
    on_free:
        Called (outside the pool lock) after memory returns to the pool.
    """

    def __init__(self, capacity: int, device: str | torch.device = "cpu", *, pin_memory: bool = False,
                 on_free: Callable[[], None] | None = None, prefault: bool = True,
                 arena: torch.Tensor | None = None):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise InvalidTensor(f"pool capacity must be a positive int, got {capacity!r}")
        self.device = torch.device(device)
        self.capacity = _round_up(capacity) if capacity % ALIGN else capacity
        kw: dict[str, Any] = {"pin_memory": True} if pin_memory and self.device.type == "cpu" else {}
        if arena is not None:
            if arena.dtype != torch.uint8 or arena.dim() != 1 or arena.numel() < self.capacity \
                    or arena.device != self.device:
                raise InvalidTensor(f"arena must be a 1-D uint8 tensor of >= {self.capacity} bytes on {self.device}")
            self._arena: torch.Tensor | None = arena[: self.capacity]
        else:
            self._arena = torch.empty(self.capacity, dtype=torch.uint8, device=self.device, **kw)
        if prefault and self.device.type == "cpu" and arena is None:
            # Touch every page now: first-touch page faults would otherwise halve
            # the bandwidth of the first transfers into each part of the arena.
            self._arena.zero_()
        self._ext = _Extents(self.capacity)
        self._cond = threading.Condition(threading.Lock())
        self._on_free = on_free
        self.in_use = 0
        self.high_water = 0
        self.allocs = 0
        self.failed = 0
        self.overflow_allocs = 0
        self.overflow_in_use = 0
        self._live = 0

    @property
    def arena(self) -> torch.Tensor:
        if self._arena is None:
            raise P2pkvError("buffer pool is closed")
        return self._arena

    def offset_of(self, t: torch.Tensor) -> int | None:
        """Byte offset of ``t``'s memory inside the arena, or None if it lies elsewhere."""
        arena = self._arena
        if arena is None or t.device != self.device:
            return None
        off = t.data_ptr() - arena.data_ptr()
        n = t.numel() * t.element_size()
        return off if off >= 0 and off + n <= self.capacity else None

    @staticmethod
    def footprint(nbytes: int) -> int:
        """Bytes of pool space a tensor of ``nbytes`` occupies (alignment included)."""
        return _round_up(max(nbytes, 1))

    def try_alloc(self, nbytes: int, *, overflow: bool = False) -> Buffer | None:
        """Take a buffer at once, or return ``None`` when no extent fits.

        With ``overflow=True`` a request that cannot be placed because the
        arena is fragmented (though enough bytes are free in total) is served
        by a separate allocation, counted in ``overflow_allocs``.
        """
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise InvalidTensor(f"buffer size must be an int >= 0, got {nbytes!r}")
        size = self.footprint(nbytes)
        with self._cond:
            arena = self.arena
            start = self._ext.take(size) if size <= self.capacity else None
            if start is not None:
                self.in_use += size
                self.high_water = max(self.high_water, self.in_use)
                self.allocs += 1
                self._live += 1
                return Buffer(self, start, size, nbytes, None, arena=arena)
            if overflow:
                self.overflow_allocs += 1
                self.overflow_in_use += size
                self._live += 1
            else:
                self.failed += 1
                return None
        try:
            data = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        except RuntimeError as exc:  # real OOM: report, never crash the engine
            with self._cond:
                self.overflow_in_use -= size
                self._live -= 1
                self.failed += 1
            raise PoolExhausted(f"pool full and overflow allocation of {nbytes} bytes failed: {exc}") from None
        return Buffer(self, -1, size, nbytes, data, overflow=True)

    def try_alloc_many(self, sizes: list[int], *, overflow: bool = False) -> list[Buffer] | None:
        """:meth:`try_alloc` for each of ``sizes`` (ints >= 0, checked by the caller), under one lock:
        all of them, or ``None`` (nothing taken) when one does not fit and ``overflow`` is False.
        Raises :class:`PoolExhausted` (nothing taken) when an overflow allocation fails."""
        out: list[Buffer] = []
        spill: list[tuple[int, int]] = []  # (index, nbytes) served outside the arena
        fp = self.footprint
        with self._cond:
            arena = self.arena
            take = self._ext.take
            cap = self.capacity
            for nbytes in sizes:
                size = fp(nbytes)
                start = take(size) if size <= cap else None
                if start is None:
                    if not overflow:
                        for b in out:
                            b._released = True
                            if not b.overflow:
                                self._ext.give(b.offset, b.size)
                        self.failed += 1
                        return None
                    spill.append((len(out), nbytes))
                    out.append(Buffer(self, -1, size, nbytes, None, overflow=True))
                    continue
                out.append(Buffer(self, start, size, nbytes, None, arena=arena))
            placed = len(out) - len(spill)
            placed_bytes = sum(b.size for b in out if not b.overflow)
            spilled_bytes = sum(fp(n) for _, n in spill)
            self.in_use += placed_bytes
            self.high_water = max(self.high_water, self.in_use)
            self.allocs += placed
            self.overflow_allocs += len(spill)
            self.overflow_in_use += spilled_bytes
            self._live += len(out)
        try:
            for i, nbytes in spill:
                out[i]._data = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        except RuntimeError as exc:  # real OOM: give back everything, report, never crash the engine
            self.release_many(out)
            with self._cond:
                self.failed += 1
            raise PoolExhausted(f"pool full and overflow allocation of {nbytes} bytes failed: {exc}") from None
        return out

    def release_many(self, bufs: list[Buffer]) -> None:
        """:meth:`Buffer.release` for each of ``bufs`` (those not released yet), under one lock."""
        freed = False
        with self._cond:
            for buf in bufs:
                if buf._released:
                    continue
                buf._released = True
                self._give_locked(buf)
                freed = True
            if freed:
                self._cond.notify_all()
        if freed and self._on_free is not None:
            self._on_free()

    def alloc(self, nbytes: int, timeout: float | None = None) -> Buffer:
        """Take a buffer, waiting up to ``timeout`` seconds for space.

        Raises
        ------
        PoolExhausted
            If no space came free in time, or ``nbytes`` exceeds the capacity.
        """
        if isinstance(nbytes, int) and not isinstance(nbytes, bool) and self.footprint(max(nbytes, 0)) > self.capacity:
            with self._cond:
                self.failed += 1
            raise PoolExhausted(f"{nbytes} bytes can never fit in a pool of {self.capacity} bytes")
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            buf = self.try_alloc(nbytes)
            if buf is not None:
                return buf
            with self._cond:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise PoolExhausted(f"no {nbytes}-byte buffer free within {timeout:.3g}s "
                                        f"(in use {self.in_use} of {self.capacity})")
                self._cond.wait(0.05 if remaining is None else min(remaining, 0.05))

    def _give_locked(self, buf: Buffer) -> None:
        """Its room back to the arena (or its overflow allocation dropped); under ``self._cond``."""
        if buf.overflow:
            self.overflow_in_use -= buf.size
        else:
            self._ext.give(buf.offset, buf.size)
            self.in_use -= buf.size
        self._live -= 1
        buf._data = buf._arena = None  # (its view of the arena goes)

    def _free(self, buf: Buffer) -> None:
        with self._cond:
            self._give_locked(buf)
            self._cond.notify_all()
        if self._on_free is not None:
            self._on_free()

    @property
    def free_bytes(self) -> int:
        with self._cond:
            return self._ext.free_bytes

    @property
    def room(self) -> int:
        """Free bytes less what overflow allocations hold outside the arena: an overflow buffer
        stands in for arena room that fragmentation kept from it, so it uses up as much room as
        if it had been placed (what may still be promised to senders; at least 0)."""
        with self._cond:
            return max(0, self._ext.free_bytes - self.overflow_in_use)

    def stats(self) -> dict[str, float]:
        with self._cond:
            free = self._ext.free_bytes
            largest = self._ext.largest()
            return {
                "capacity": self.capacity,
                "in_use": self.in_use,
                "high_water": self.high_water,
                "free": free,
                "largest_free": largest,
                "fragmentation": 0.0 if free == 0 else 1.0 - largest / free,
                "allocs": self.allocs,
                "failed": self.failed,
                "overflow_allocs": self.overflow_allocs,
                "overflow_in_use": self.overflow_in_use,
                "live_buffers": self._live,
            }

    def close(self) -> None:
        """Drop the arena. Buffers still held keep their memory alive until released."""
        with self._cond:
            live = self._live
            self._arena = None
        if live:
            warnings.warn(f"BufferPool closed with {live} buffer(s) still held", ResourceWarning, stacklevel=2)
