"""TCP data path: tensor bytes as ZMQ frames.

CPU tensors go out zero-copy (ZMQ references their memory until sent); GPU
tensors are staged through host memory first. On receipt the frame is read
straight into its destination buffer with ``recv_into`` when that buffer is in
host memory, or through one host frame and one host-to-device copy otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
import zmq

__all__ = ["ZERO_COPY_MIN", "send_payload", "recv_payload_into"]

ZERO_COPY_MIN = 64 * 1024  # below this, copying is cheaper than ZMQ's zero-copy bookkeeping


def send_payload(sock: zmq.Socket, payload: torch.Tensor) -> None:
    """Send a host uint8 tensor as the last frame of the current message."""
    n = payload.numel()
    if n == 0:
        sock.send(b"")
    elif n < ZERO_COPY_MIN:
        sock.send(payload.numpy().tobytes())
    else:
        sock.send(_buffer(payload), copy=False)


def recv_payload_into(sock: zmq.Socket, dst: torch.Tensor) -> int:
    """Receive the next frame into the flat uint8 tensor ``dst``.

    Returns the frame's real size (compare with ``dst.numel()`` to detect a
    peer that lied about its size: a longer frame is truncated, never written
    past ``dst``).
    """
    n = dst.numel()
    if dst.device.type == "cpu":
        if n == 0:
            return len(sock.recv(copy=True))
        return sock.recv_into(_buffer(dst))
    frame = sock.recv(copy=False)
    size = len(frame.buffer)
    if size == n and n:
        src = torch.frombuffer(bytearray(frame.buffer), dtype=torch.uint8) if n < ZERO_COPY_MIN else \
            _readonly_view(frame.buffer)
        dst.copy_(src)
    return size


def _buffer(t: torch.Tensor) -> memoryview:
    """A writable view of a host uint8 tensor's bytes, shared with the tensor (no copy)."""
    arr: Any = t.numpy()  # numpy's type stubs declare the buffer protocol only for Python >= 3.12
    return memoryview(arr)


def _readonly_view(buf: memoryview) -> torch.Tensor:
    import numpy as np
    import warnings

    arr = np.frombuffer(buf, dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only source; we only read it
        return torch.from_numpy(arr)
