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
           "use_device", "WAIT_EQ", "WAIT_GEQ"]

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


def _fn(name: str, argtypes: list[Any]) -> Any:
    f = _fns.get(name)
    if f is None:
        lib = _load()
        for sym in (name + "_v2", name):
            f = getattr(lib, sym, None)
            if f is not None:
                break
        if f is None:
            raise TransportError(f"the CUDA driver has no {name}")
        f.argtypes = argtypes
        f.restype = ctypes.c_int
        _fns[name] = f
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
