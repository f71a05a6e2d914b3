"""CUDA helpers of the data plane: IPC-exportable arenas, IPC mappings, and a
completion thread that turns CUDA events into engine callbacks.

Everything here imports CuPy lazily, only when an engine on a CUDA device
needs it; importing this module touches no GPU.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import TransportError

log = logging.getLogger("p2pkv")

__all__ = ["alloc_arena", "ipc_handle", "IpcMapping", "Completer", "have_cupy"]


def have_cupy() -> bool:
    try:
        import cupy  # noqa: F401

        return True
    except Exception:
        return False


def alloc_arena(nbytes: int, device: torch.device) -> tuple[torch.Tensor, Any]:
    """A raw ``cudaMalloc`` arena (so CUDA IPC can export it whole) as a uint8 tensor.

    Returns the tensor and the owner object that keeps the memory alive. Falls
    back to a torch allocation (not IPC-exportable) when CuPy is missing.
    """
    if not have_cupy():
        return torch.empty(nbytes, dtype=torch.uint8, device=device), None
    import cupy

    with cupy.cuda.Device(device.index):
        mem = cupy.cuda.Memory(nbytes)
        arr = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
        t = torch.as_tensor(arr, device=device)
    if t.data_ptr() != mem.ptr:  # pragma: no cover - defensive
        raise TransportError("arena tensor does not alias its allocation")
    return t, mem


def ipc_handle(owner: Any) -> bytes | None:
    """The CUDA IPC handle of an arena made by :func:`alloc_arena` (None if not exportable)."""
    if owner is None:
        return None
    import cupy

    return bytes(cupy.cuda.runtime.ipcGetMemHandle(owner.ptr))


class IpcMapping:
    """Another process's arena, opened once and cached; ``close()`` unmaps it."""

    def __init__(self, handle: bytes, nbytes: int, device: torch.device):
        import cupy

        self.device = device
        self.nbytes = nbytes
        with cupy.cuda.Device(device.index):
            try:
                self.ptr = cupy.cuda.runtime.ipcOpenMemHandle(handle)
            except Exception as exc:
                raise TransportError(f"cannot open the peer's CUDA IPC handle: {exc}") from None
            mem = cupy.cuda.UnownedMemory(self.ptr, nbytes, self)
            arr = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
            self.tensor: torch.Tensor | None = torch.as_tensor(arr, device=device)  # None once closed
        self._closed = False

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        tensor = self.tensor
        if self._closed or tensor is None:
            raise TransportError("IPC mapping used after close")
        if offset < 0 or nbytes < 0 or offset + nbytes > self.nbytes:
            raise TransportError(f"IPC range [{offset}, {offset + nbytes}) outside the peer's arena of {self.nbytes}")
        return tensor[offset:offset + nbytes]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        import cupy

        try:
            torch.cuda.synchronize(self.device)  # no copy may still read the mapping
            with cupy.cuda.Device(self.device.index):
                cupy.cuda.runtime.ipcCloseMemHandle(self.ptr)
        except Exception as exc:  # pragma: no cover
            log.warning("closing a CUDA IPC mapping failed: %s", exc)
        self.tensor = None


class Completer:
    """A thread that waits for CUDA events in order and hands completions to the engine.

    ``add(event, callback, deadline)``: when ``event`` has completed (or the
    deadline passed: ``callback(False)``), ``post(callback, ok)`` is called,
    which queues the callback for the engine's I/O thread.
    """

    def __init__(self, post: Callable[[Callable[[bool], None], bool], None], name: str = "p2pkv-cuda"):
        self._post = post
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, event: torch.cuda.Event, callback: Callable[[bool], None], deadline: float,
            blocking: bool = False) -> None:
        """``blocking=True`` marks work that always completes (a copy): the thread may block on it."""
        self._q.put((event, callback, deadline, blocking))

    def _run(self) -> None:
        pending: list = []
        idle = 0
        while not self._stop:
            try:
                while True:  # take everything queued; block only when nothing is pending
                    item = self._q.get(timeout=0.1) if not pending else self._q.get_nowait()
                    if item is None:
                        return
                    pending.append(item)
            except queue.Empty:
                pass
            if not pending:
                continue
            now = time.monotonic()
            still = []
            fired = False
            for entry in pending:
                event, callback, deadline, _ = entry
                if event.query():
                    self._fire(callback, True)
                    fired = True
                elif now > deadline:
                    self._fire(callback, False)
                    fired = True
                else:
                    still.append(entry)
            pending = still
            idle = 0 if fired else idle + 1
            if pending:
                if all(blocking for _, _, _, blocking in pending):
                    # only copies pending: they always finish, so wait on the oldest
                    # (cudaEventSynchronize releases the GIL and wakes on completion)
                    pending[0][0].synchronize()
                    continue
                # Poll in short sleeps, never a sleep(0) spin: a thread that drops and at once
                # retakes the GIL starves the others for a whole switch interval (5 ms), which
                # the first profile showed as 1-5 ms per hand-off on both sides of a transfer.
                time.sleep(0.00005 if idle < 2000 else 0.0002)

    def _fire(self, callback: Callable[[bool], None], ok: bool) -> None:
        from .. import _trace

        _trace.mark("cq.fire", getattr(callback, "tkey", None))
        try:
            self._post(callback, ok)
        except Exception:  # pragma: no cover
            log.exception("posting a CUDA completion failed")

    def close(self) -> None:
        self._stop = True
        self._q.put(None)
        self._thread.join(5)
