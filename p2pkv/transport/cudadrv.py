"""A few CUDA driver calls torch and CuPy do not expose, through ctypes (``libcuda.so.1``, loaded on first use).

* registering host memory (a shared-memory page) so that GPUs can read and write it,
* stream memory operations: a stream writes a 64-bit value after the work queued
  before it (``cuStreamWriteValue64``) or waits until a 64-bit word holds a value
  (``cuStreamWaitValue64``), with no kernel and no host involvement,
* the allocation that holds a device pointer (``cuMemGetAddressRange``), to export
  a tensor from torch's caching allocator through CUDA IPC.

Every call needs the device's primary context to be current on the calling thread
(:func:`use_device` makes it so). Errors raise :class:`p2pkv.TransportError` naming
the call and the CUDA error. Importing this module loads nothing.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import torch

from ..errors import TransportError

__all__ = ["available", "host_register", "host_unregister", "write_value64", "wait_value64", "address_range",
           "use_device", "WAIT_EQ", "WAIT_GEQ", "Launcher"]

WAIT_GEQ = 0x0
WAIT_EQ = 0x1
_HOSTREGISTER_PORTABLE = 0x1
_HOSTREGISTER_DEVICEMAP = 0x2

_lib: Any = None
_fns: dict[str, Any] = {}
_lock = threading.Lock()
_tls = threading.local()


def _load() -> Any:
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                try:
                    _lib = ctypes.CDLL("libcuda.so.1")
                except OSError as exc:
                    raise TransportError(f"the CUDA driver (libcuda.so.1) cannot be loaded: {exc}") from None
    return _lib


_pylib: Any = None


def _bind(lib: Any, name: str, argtypes: list[Any]) -> Any:
    """``name`` (its ``_v2`` form where the driver has one) from ``lib``, typed."""
    for sym in (name + "_v2", name):
        f = getattr(lib, sym, None)
        if f is not None:
            f.argtypes = argtypes
            f.restype = ctypes.c_int
            return f
    raise TransportError(f"the CUDA driver has no {name}")


def _fast_fn(name: str, argtypes: list[Any]) -> Any:
    """``_fn``, but called with the GIL kept: for calls that only queue work (microseconds, never a wait),
    where releasing the GIL costs more than the call and lets another thread take it in between."""
    global _pylib
    key = "py:" + name
    f = _fns.get(key)
    if f is None:
        _load()  # the library loads (and fails) the same way
        with _lock:
            if _pylib is None:
                _pylib = ctypes.PyDLL("libcuda.so.1")
        f = _fns[key] = _bind(_pylib, name, argtypes)
    return f


def _fn(name: str, argtypes: list[Any]) -> Any:
    f = _fns.get(name)
    if f is None:
        f = _fns[name] = _bind(_load(), name, argtypes)
    return f


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise TransportError(f"{what} failed with CUDA driver error {rc}")


def available() -> bool:
    """True when the driver and its stream memory operations can be used."""
    try:
        _fn("cuStreamWriteValue64", [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint])
        _fn("cuStreamWaitValue64", [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint])
        return True
    except TransportError:
        return False


def use_device(device: torch.device) -> None:
    """Make ``device``'s primary context current on this thread (once per thread and device)."""
    done = getattr(_tls, "devices", None)
    if done is None:
        done = _tls.devices = set()
    if device.index not in done:
        torch.cuda.set_device(device)
        torch.cuda.current_stream(device)  # initialises the runtime, which makes the context current
        torch.empty(0, device=device)
        done.add(device.index)


def host_register(addr: int, nbytes: int) -> int:
    """Register ``nbytes`` of host memory at ``addr`` for every device; return its device address."""
    f = _fn("cuMemHostRegister", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint])
    _check(f(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes), ctypes.c_uint(_HOSTREGISTER_PORTABLE
                                                                          | _HOSTREGISTER_DEVICEMAP)),
           "cuMemHostRegister")
    d = ctypes.c_uint64()
    g = _fn("cuMemHostGetDevicePointer", [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint])
    rc = g(ctypes.byref(d), ctypes.c_void_p(addr), ctypes.c_uint(0))
    if rc != 0:
        host_unregister(addr)
        _check(rc, "cuMemHostGetDevicePointer")
    return d.value


def host_unregister(addr: int) -> None:
    f = _fn("cuMemHostUnregister", [ctypes.c_void_p])
    f(ctypes.c_void_p(addr))  # best effort: nothing useful to do with an error here


def write_value64(stream: torch.cuda.Stream, dev_addr: int, value: int) -> None:
    """Queue on ``stream``: write ``value`` to ``dev_addr`` once the work before it is done (with a fence)."""
    f = _fn("cuStreamWriteValue64", [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint])
    _check(f(ctypes.c_void_p(stream.cuda_stream), ctypes.c_uint64(dev_addr), ctypes.c_uint64(value),
             ctypes.c_uint(0)), "cuStreamWriteValue64")


def wait_value64(stream: torch.cuda.Stream, dev_addr: int, value: int, flags: int = WAIT_EQ) -> None:
    """Queue on ``stream``: hold the work after this until the 64-bit word at ``dev_addr`` holds ``value``."""
    f = _fn("cuStreamWaitValue64", [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint])
    _check(f(ctypes.c_void_p(stream.cuda_stream), ctypes.c_uint64(dev_addr), ctypes.c_uint64(value),
             ctypes.c_uint(flags)), "cuStreamWaitValue64")


def address_range(ptr: int) -> tuple[int, int]:
    """``(base, size)`` of the device allocation that holds ``ptr``."""
    f = _fn("cuMemGetAddressRange", [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                                     ctypes.c_uint64])
    base = ctypes.c_uint64()
    size = ctypes.c_size_t()
    _check(f(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)), "cuMemGetAddressRange")
    return base.value, size.value


_NOT_READY = 600  # CUDA_ERROR_NOT_READY
_EVENT_DISABLE_TIMING = 0x2


class Launcher:
    """A request's copy issued with a handful of driver calls: order a stream after the caller's
    current stream (an event of our own, recorded there and waited on), upload a table, launch one
    kernel. Every call runs inside the device's primary context (pushed and popped), whatever
    context the calling thread has current; torch's and CuPy's per-call Python wrappers are skipped
    (on the producer's critical path they cost more than the GPU work of a small request). A launcher
    lives as long as the process-wide copier that owns it (its event and its hold on the primary
    context are never given back before the process ends).

    Raises
    ------
    TransportError
        A driver call failed (naming it), or the kernel handle cannot be read from CuPy.
    """

    def __init__(self, device: torch.device, kernel: Any, argtypes: list[Any]):
        self.device_index = device.index if device.index is not None else torch.cuda.current_device()
        fn = getattr(kernel, "ptr", None)
        if not fn:
            fn = getattr(getattr(kernel, "kernel", None), "ptr", None)
        if not fn:
            raise TransportError(f"cannot read the CUfunction of {kernel!r:.80}")
        self.fn = ctypes.c_void_p(int(fn))
        dev = ctypes.c_int()
        _check(_fn("cuDeviceGet", [ctypes.POINTER(ctypes.c_int), ctypes.c_int])(
            ctypes.byref(dev), ctypes.c_int(self.device_index)), "cuDeviceGet")
        ctx = ctypes.c_void_p()
        _check(_fn("cuDevicePrimaryCtxRetain", [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int])(
            ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        self._dev = dev
        self.ctx = ctx
        # these only queue work: called with the GIL kept (see _fast_fn)
        self._push = _fast_fn("cuCtxPushCurrent", [ctypes.c_void_p])
        self._pop = _fast_fn("cuCtxPopCurrent", [ctypes.POINTER(ctypes.c_void_p)])
        self._popped = ctypes.c_void_p()
        self._record = _fast_fn("cuEventRecord", [ctypes.c_void_p, ctypes.c_void_p])
        self._wait = _fast_fn("cuStreamWaitEvent", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint])
        self._h2d = _fast_fn("cuMemcpyHtoDAsync", [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t,
                                                   ctypes.c_void_p])  # from pinned memory: never waits
        self._launch = _fast_fn("cuLaunchKernel", [ctypes.c_void_p] + [ctypes.c_uint] * 6
                                + [ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p])
        ev = ctypes.c_void_p()
        self.enter()
        try:
            _check(_fn("cuEventCreate", [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint])(
                ctypes.byref(ev), ctypes.c_uint(_EVENT_DISABLE_TIMING)), "cuEventCreate")
        finally:
            self.leave()
        self._ready = ev
        # the kernel's arguments, in place: launch() sets their values
        self._args = tuple(t() for t in argtypes)
        self._params = (ctypes.c_void_p * len(self._args))(*[ctypes.addressof(a) for a in self._args])
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        self._raw_stream = raw if callable(raw) else None

    def caller_stream(self) -> int:
        """The calling thread's current CUDA stream of this device (a raw handle)."""
        if self._raw_stream is not None:
            return int(self._raw_stream(self.device_index))
        return int(torch.cuda.current_stream(self.device_index).cuda_stream)

    def enter(self) -> None:
        _check(self._push(self.ctx), "cuCtxPushCurrent")

    def leave(self) -> None:
        self._pop(ctypes.byref(self._popped))

    def follow(self, stream: int, after: int) -> None:
        """Hold ``stream`` until the work queued on ``after`` so far is done (inside :meth:`enter`)."""
        if stream == after:
            return
        _check(self._record(self._ready, ctypes.c_void_p(after)), "cuEventRecord")
        _check(self._wait(ctypes.c_void_p(stream), self._ready, 0), "cuStreamWaitEvent")

    def upload(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        _check(self._h2d(ctypes.c_uint64(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes),
                         ctypes.c_void_p(stream)), "cuMemcpyHtoDAsync")

    def launch(self, grid: int, threads: int, stream: int, *args: int) -> None:
        """Launch the kernel on ``stream`` with ``args`` (as many as its ``argtypes``; inside :meth:`enter`)."""
        for slot, v in zip(self._args, args, strict=True):
            slot.value = v
        _check(self._launch(self.fn, grid, 1, 1, threads, 1, 1, 0, ctypes.c_void_p(stream), self._params, None),
               "cuLaunchKernel")
