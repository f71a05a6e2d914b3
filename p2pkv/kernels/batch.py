"""Batched copies and GPU-side flags (``csrc/batch_copy.cu``), for the request data plane.

:class:`BatchCopier` moves many ``(src_ptr, dst_ptr, nbytes)`` segments in ONE
kernel launch (a request's 32 layers cost one launch, not 32 copies), copies
blocks between paged caches of many layers in one launch from a constant
plan and the request's block pairs (:meth:`BatchCopier.paged_copy`), writes
64-bit flags after the work queued before them (:meth:`BatchCopier.signal`),
and makes a stream wait for a flag with a deadline on the GPU's own clock
(:meth:`BatchCopier.wait`), so a GPU-side wait can never hang a stream.

Compiled at run time through CuPy's NVRTC on first use; importing this module
touches no GPU.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import torch

from .. import _trace
from ..errors import TransportError

__all__ = ["BatchCopier", "CopyTemplate", "copier_for", "UNIT_BYTES"]

log = logging.getLogger("p2pkv.kernels")

UNIT_BYTES = 8192           # must match csrc/batch_copy.cu
_SEG_WORDS = 4              # src, dst, nbytes, unit0 (int64 each)
_RING = 32                  # segment tables in flight per copier
_SLOT_SEGS = 4096           # segments per ring slot (128 KiB)
_THREADS = 256

_copiers: dict[int, BatchCopier] = {}
_copiers_lock = threading.Lock()


def _source() -> str:
    try:
        from importlib.resources import files

        return (files("p2pkv.csrc") / "batch_copy.cu").read_text()
    except Exception:
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "..", "..", "csrc", "batch_copy.cu")) as f:
            return f.read()


class CopyTemplate:
    """What :meth:`BatchCopier.copy_request` needs of a request layout, computed once per layout: the
    destination offsets (from the request's base), sizes and first work units of its tensors, and the
    flag offsets and per-item flag values. Per request only the source addresses, the destination
    base, the first flag's address and the request's number change."""

    __slots__ = ("n", "rel", "nbytes", "unit0", "total_units", "flag_rel", "steps", "words")

    def __init__(self, rel: list[int], nbytes: list[int]):
        import numpy as np

        n = self.n = len(rel)
        self.rel = np.asarray(rel, dtype=np.int64)
        self.nbytes = np.asarray(nbytes, dtype=np.int64)
        units = (self.nbytes + (UNIT_BYTES - 1)) // UNIT_BYTES
        self.unit0 = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(units[:-1], out=self.unit0[1:])
        self.total_units = int(units.sum())
        self.flag_rel = np.arange(n, dtype=np.int64) * 8
        self.steps = np.arange(1, n + 1, dtype=np.int64)
        self.words = n * _SEG_WORDS + 2 * n + 1  # segments, (flag address, value) pairs, the done counter


def _argtypes(spec: str) -> list[Any]:
    """ctypes of a kernel's arguments: ``p`` a pointer (64-bit), ``i`` int32, ``l`` int64."""
    import ctypes

    kinds = {"p": ctypes.c_uint64, "i": ctypes.c_int32, "l": ctypes.c_int64}
    return [kinds[c] for c in spec]


_COPY_SIGNAL_ARGS = _argtypes("pilpip")   # segs, nseg, total_units, flag pairs, nflags, done counter
_PAGED_ARGS = _argtypes("pplplllli")      # layers, pairs, npair, runs, nrun, run_bytes, units_per_run, total, align


def copier_for(device: torch.device) -> BatchCopier:
    """The process-wide copier of ``device`` (built on first use)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    c = _copiers.get(idx)
    if c is None:
        with _copiers_lock:
            c = _copiers.get(idx)
            if c is None:
                c = BatchCopier(torch.device("cuda", idx))
                _copiers[idx] = c
    return c


class BatchCopier:
    """Launches ``p2pkv_batch_copy``, ``p2pkv_signal`` and ``p2pkv_wait`` on one device (thread-safe)."""

    def __init__(self, device: torch.device):
        import cupy

        self.device = device
        self._lock = threading.Lock()
        with cupy.cuda.Device(device.index):
            mod = cupy.RawModule(code=_source(), options=("--std=c++17",))
            self._copy = mod.get_function("p2pkv_batch_copy")
            self._copy_signal = mod.get_function("p2pkv_batch_copy_signal")
            self._paged = mod.get_function("p2pkv_paged_copy")
            self._signal = mod.get_function("p2pkv_signal")
            self._set_flags = mod.get_function("p2pkv_set_flags")
            self._wait = mod.get_function("p2pkv_wait")
            self._now = mod.get_function("p2pkv_globaltimer_now")
        self._sms = torch.cuda.get_device_properties(device).multi_processor_count
        # segment tables: pinned host slots copied to device slots; a slot is reused once the
        # kernel that read it has run (its event)
        self._host = torch.empty(_RING * _SLOT_SEGS * _SEG_WORDS, dtype=torch.int64, pin_memory=True)
        self._hostnp = self._host.numpy()
        self._dev = torch.empty(_RING * _SLOT_SEGS * _SEG_WORDS, dtype=torch.int64, device=device)
        self._events: list[Any] = [None] * _RING
        # tables longer than a slot: one growable buffer (pinned host and device), reused once the
        # launch that read it last has run
        self._big_host: torch.Tensor | None = None
        self._big_dev: torch.Tensor | None = None
        self._big_event: Any = None
        self._next = 0
        self._launcher: Any = None  # cudadrv.Launcher of the fused copy+flags kernel (built on first use)
        self._paged_launcher: Any = None  # ... and of the paged copy
        self._streams: dict[int, Any] = {}
        self._clock_offset_ns: int | None = None

    # ------------------------------------------------------------------ helpers
    def _cupy_stream(self, stream: torch.cuda.Stream) -> Any:
        ptr = stream.cuda_stream
        s = self._streams.get(ptr)
        if s is None:
            import cupy

            s = cupy.cuda.ExternalStream(ptr, self.device.index)
            if len(self._streams) > 256:
                self._streams.clear()
            self._streams[ptr] = s
        return s

    def _new_launcher(self, kernel: Any, argtypes: list[Any], fallback: str) -> Any:
        """A :class:`cudadrv.Launcher` of ``kernel``, or False (logged once) where it cannot be built."""
        from ..transport import cudadrv

        try:
            return cudadrv.Launcher(self.device, kernel, argtypes)
        except TransportError as exc:  # e.g. a CuPy that does not expose the kernel's handle
            log.warning("%s (%s)", fallback, exc)
            return False

    def _grid(self, total_units: int) -> int:
        """Blocks of ``_THREADS`` for ``total_units`` warp work units (at most 8 per multiprocessor)."""
        warps = _THREADS // 32
        return max(1, min((total_units + warps - 1) // warps, self._sms * 8))

    def _slot(self) -> int:
        i = self._next
        self._next = (i + 1) % _RING
        ev = self._events[i]
        if ev is not None and not ev.query():
            ev.synchronize()  # a kernel queued _RING launches ago still reads this slot: wait for it
        return i

    # ------------------------------------------------------------------ copies
    def copy(self, segs: Any, stream: torch.cuda.Stream,
             flags: list[tuple[int, int]] | None = None) -> None:
        """Copy every ``(src_ptr, dst_ptr, nbytes)`` segment (a list, or an ``[n, 3]`` int64 array) in one
        launch queued on ``stream``; then
        (a second, tiny launch) write each ``(address, value)`` of ``flags`` once every copy is done."""
        import numpy as np

        n = len(segs)
        nf = len(flags) if flags else 0
        if n == 0 and nf == 0:
            return
        words = n * _SEG_WORDS + 2 * nf
        table = np.empty(words, dtype=np.int64)
        total = 0
        if n:
            arr = table[: n * _SEG_WORDS].reshape(n, _SEG_WORDS)
            arr[:, :3] = segs
            if (arr[:, 2] < 0).any():
                raise TransportError("a copy segment has a negative size")
            units = (arr[:, 2] + (UNIT_BYTES - 1)) // UNIT_BYTES
            arr[0, 3] = 0
            if n > 1:
                np.cumsum(units[:-1], out=arr[1:, 3])
            total = int(units.sum())
        if nf:
            table[n * _SEG_WORDS:] = np.array(flags, dtype=np.uint64).view(np.int64).reshape(-1)
        cs = self._cupy_stream(stream)
        with self._lock:
            dev_ptr, i = self._upload_locked(table, stream)
            if total:
                self._copy((self._grid(total),), (_THREADS,), (np.uint64(dev_ptr), np.int32(n), np.int64(total)),
                           stream=cs)
            if nf:
                self._set_flags(((nf + 255) // 256,), (256,),
                                (np.uint64(dev_ptr + n * _SEG_WORDS * 8), np.int32(nf)), stream=cs)
            self._record_locked(i, stream)

    def paged_copy(self, plan: Any, pairs: Any, stream: torch.cuda.Stream, tag: Any = None) -> int:
        """:meth:`paged_copy_async` without its event: returns the bytes copied."""
        return self.paged_copy_async(plan, pairs, stream, tag)[0]

    def paged_copy_async(self, plan: Any, pairs: Any, stream: torch.cuda.Stream,
                         tag: Any = None) -> tuple[int, Any]:
        """Copy blocks ``pairs[j, 0]`` of every source layer of ``plan`` (a
        :class:`p2pkv.kernels.blocks.PagedPlan`) into blocks ``pairs[j, 1]`` of its destination layers, in
        one launch queued on ``stream``; ``pairs`` is ``[n, 2]`` int64, checked by
        :func:`p2pkv.kernels.blocks.block_pairs` against the plan's block counts (nothing here checks it
        again). Only ``pairs`` is uploaded per call: the plan's tables are uploaded on first use on this
        device and kept with the plan. Returns (the bytes copied, an event that completes with the launch;
        None when there was nothing to copy). The event may be recorded again by a later launch, which
        only completes later."""
        import numpy as np

        npairs, nl, nr = len(pairs), len(plan.layers), len(plan.runs)
        upr = -(-plan.run_bytes // UNIT_BYTES)
        total = nl * npairs * nr * upr
        if total <= 0:
            return 0, None
        tables = plan._dev.get(self.device.index)
        if tables is None:  # once per plan: the layer table, then the run offsets
            host = np.concatenate([plan.layers.reshape(-1), plan.runs.reshape(-1)]).astype(np.int64)
            with torch.cuda.stream(stream):
                tables = torch.from_numpy(host).to(self.device)  # synchronous: ready for any stream
            plan._dev[self.device.index] = tables
        words = np.ascontiguousarray(pairs, dtype=np.int64).reshape(-1)
        layers_ptr = tables.data_ptr()
        runs_ptr = layers_ptr + nl * 4 * 8
        grid = self._grid(total)
        _trace.mark("pc.enter", tag)
        with self._lock:
            lau = self._paged_launcher
            if lau is None:
                lau = self._paged_launcher = self._new_launcher(self._paged, _PAGED_ARGS, "paged copies launch "
                                                                "through CuPy")
            if lau is False:
                dev_ptr, i = self._upload_locked(words, stream)
                _trace.mark("pc.uploaded", tag)
                self._paged((grid,), (_THREADS,),
                            (np.uint64(layers_ptr), np.uint64(dev_ptr), np.int64(npairs), np.uint64(runs_ptr),
                             np.int64(nr), np.int64(plan.run_bytes), np.int64(upr), np.int64(total),
                             np.int32(plan.align)), stream=self._cupy_stream(stream))
            else:
                sp = int(stream.cuda_stream)
                lau.enter()
                try:
                    dev_ptr, i = self._upload_locked(words, stream, lau)
                    _trace.mark("pc.uploaded", tag)
                    lau.launch(grid, _THREADS, sp, layers_ptr, dev_ptr, npairs, runs_ptr, nr, int(plan.run_bytes),
                               upr, total, int(plan.align))
                finally:
                    lau.leave()
            _trace.mark("pc.launched", tag)
            ev = self._record_locked(i, stream)
            _trace.mark("pc.recorded", tag)
        return int(plan.nbytes(npairs)), ev

    def _upload_locked(self, table: Any, stream: torch.cuda.Stream, lau: Any = None) -> tuple[int, int]:
        """Queue on ``stream`` the upload of ``table`` (int64 words) to device memory the next launch on
        ``stream`` reads: a ring slot (index returned), or for a long table the growable big buffer (-1).
        Either is reused only once the launch that read it before has run (its event)."""
        import cupy

        words = len(table)
        if words <= _SLOT_SEGS * _SEG_WORDS:
            i = self._slot()
            base = i * _SLOT_SEGS * _SEG_WORDS
            self._hostnp[base:base + words] = table
            host_ptr, dev_ptr = self._host.data_ptr() + base * 8, self._dev.data_ptr() + base * 8
        else:
            i = -1
            if self._big_event is not None:
                self._big_event.synchronize()  # the last launch reading the big buffer has run
                self._big_event = None
            if self._big_dev is None or self._big_dev.numel() < words:
                n = max(words, 2 * (self._big_dev.numel() if self._big_dev is not None else 0))
                self._big_host = torch.empty(n, dtype=torch.int64, pin_memory=True)
                self._big_dev = torch.empty(n, dtype=torch.int64, device=self.device)
            assert self._big_host is not None
            self._big_host.numpy()[:words] = table
            host_ptr, dev_ptr = self._big_host.data_ptr(), self._big_dev.data_ptr()
        if lau is not None:  # inside its enter(): a driver call with the GIL kept
            lau.upload(dev_ptr, host_ptr, words * 8, int(stream.cuda_stream))
        else:
            cupy.cuda.runtime.memcpyAsync(dev_ptr, host_ptr, words * 8, cupy.cuda.runtime.memcpyHostToDevice,
                                          stream.cuda_stream)
        return dev_ptr, i

    def _record_locked(self, i: int, stream: torch.cuda.Stream) -> Any:
        """Record the event that tells when the launch reading slot ``i`` (-1: the big buffer) has run. A
        slot's event object is recorded again for its next launch (``_slot`` waited for it first)."""
        ev = self._events[i] if i >= 0 else None
        if ev is None:
            ev = torch.cuda.Event()
        ev.record(stream)
        if i >= 0:
            self._events[i] = ev
        else:
            self._big_event = ev
        return ev

    def copy_request(self, srcs: list[int], dst_base: int, tmpl: CopyTemplate, flag_base: int, flag_hi: int,
                     stream: torch.cuda.Stream, stream_ptr: int) -> Any:
        """A whole request in ONE launch on ``stream`` (``stream_ptr`` its raw handle), ordered after the
        calling thread's current stream: tensor ``i`` (at ``srcs[i]``, ``tmpl.nbytes[i]`` bytes) goes to
        ``dst_base + tmpl.rel[i]``; once every copy is done, the 64-bit flag at ``flag_base + 8 * i`` gets
        ``flag_hi | (i + 1)``. Returns an event that completes with the launch (it may be recorded
        again by a later launch, which only completes later), or None when the driver launch is not
        available (the caller then copies through :meth:`copy`). Host cost: a few numpy writes into a
        pinned table slot and five driver calls."""
        import numpy as np

        n = tmpl.n
        if tmpl.words > _SLOT_SEGS * _SEG_WORDS:
            raise TransportError(f"a request of {n} tensors does not fit one copy table")
        with self._lock:
            lau = self._launcher
            if lau is None:
                lau = self._launcher = self._new_launcher(self._copy_signal, _COPY_SIGNAL_ARGS, "one-launch "
                                                          "request copies are off; copying through CuPy")
            if lau is False:
                return None
            i = self._slot()
            base = i * _SLOT_SEGS * _SEG_WORDS
            h = self._hostnp
            seg = h[base:base + n * _SEG_WORDS].reshape(n, _SEG_WORDS)
            seg[:, 0] = srcs
            np.add(tmpl.rel, dst_base, out=seg[:, 1])
            seg[:, 2] = tmpl.nbytes
            seg[:, 3] = tmpl.unit0
            fo = base + n * _SEG_WORDS
            pairs = h[fo:fo + 2 * n].reshape(n, 2)
            np.add(tmpl.flag_rel, flag_base, out=pairs[:, 0])
            np.bitwise_or(tmpl.steps, flag_hi, out=pairs[:, 1])
            h[fo + 2 * n] = 0  # the blocks' done counter
            dev = self._dev.data_ptr() + base * 8
            pairs_dev = dev + n * _SEG_WORDS * 8
            total = tmpl.total_units
            lau.enter()
            try:
                lau.follow(stream_ptr, lau.caller_stream())
                lau.upload(dev, self._host.data_ptr() + base * 8, tmpl.words * 8, stream_ptr)
                lau.launch(self._grid(total), _THREADS, stream_ptr, dev, n, total, pairs_dev, n, pairs_dev + 2 * n * 8)
            finally:
                lau.leave()
            return self._record_locked(i, stream)

    # ------------------------------------------------------------------ flags
    def signal(self, flag_ptr: int, value: int, stream: torch.cuda.Stream) -> None:
        """Write the 64-bit ``value`` to ``flag_ptr`` after the work queued on ``stream`` before it."""
        import numpy as np

        self._signal((1,), (1,), (np.uint64(flag_ptr), np.uint64(value)), stream=self._cupy_stream(stream))

    def wait(self, flag_ptr: int, value: int, deadline: float, status_ptr: int, stream: torch.cuda.Stream) -> None:
        """Hold ``stream`` until ``*flag_ptr == value`` or ``deadline`` (``time.monotonic``) passes; on a
        timeout the kernel writes 1 to ``*status_ptr`` and the stream goes on."""
        import numpy as np

        dl = self.gpu_time_ns(deadline)
        self._wait((1,), (1,), (np.uint64(flag_ptr), np.uint64(value), np.uint64(dl), np.uint64(status_ptr)),
                   stream=self._cupy_stream(stream))

    def gpu_time_ns(self, monotonic_s: float) -> int:
        """The GPU's global timer value at the host time ``monotonic_s``."""
        if self._clock_offset_ns is None:
            self._clock_offset_ns = self._measure_offset()
        return max(0, int(monotonic_s * 1e9) + self._clock_offset_ns)

    def _measure_offset(self) -> int:
        import numpy as np

        out = torch.zeros(1, dtype=torch.int64, device=self.device)
        s = torch.cuda.Stream(self.device)
        best = None
        for _ in range(5):
            t0 = time.monotonic_ns()
            self._now((1,), (1,), (np.uint64(out.data_ptr()),), stream=self._cupy_stream(s))
            s.synchronize()
            t1 = time.monotonic_ns()
            g = int(out.item())
            off = g - (t0 + t1) // 2
            if best is None or t1 - t0 < best[0]:
                best = (t1 - t0, off)
        assert best is not None
        return best[1]
