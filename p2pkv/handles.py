"""Transfer handles and their states."""

from __future__ import annotations

import enum
import threading
import time
from typing import TYPE_CHECKING

from .errors import P2pkvError, TransferTimeout
from .keys import TransferKey

if TYPE_CHECKING:
    import torch

__all__ = ["TransferState", "SendHandle"]


class TransferState(enum.Enum):
    """Life of one send: PENDING -> IN_FLIGHT -> DONE, or FAILED / ABORTED."""

    PENDING = "pending"      # queued: waiting for the connection or for credit
    IN_FLIGHT = "in_flight"  # on the wire, waiting for the receiver's ack
    DONE = "done"            # the receiver stored it
    FAILED = "failed"        # see .error (timeout, peer lost, refused...)
    ABORTED = "aborted"      # its transfer id was aborted

    @property
    def finished(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED, TransferState.ABORTED)


class SendHandle:
    """Handle of one pushed tensor, returned at once by :meth:`Engine.send`.

    The tensor passed to ``send`` must not be modified until the handle is
    finished (as with NCCL or MPI non-blocking sends).
    """

    __slots__ = ("key", "peer", "nbytes", "_state", "_error", "_event", "t_start", "t_done", "_tensor")

    def __init__(self, key: TransferKey, peer: str, nbytes: int):
        self.key = key
        self.peer = peer
        self.nbytes = nbytes
        self._state = TransferState.PENDING
        self._error: P2pkvError | None = None
        self._event = threading.Event()
        self.t_start = time.monotonic()
        self.t_done: float | None = None
        self._tensor: torch.Tensor | None = None  # keeps the payload alive until finished

    @property
    def state(self) -> TransferState:
        return self._state

    @property
    def error(self) -> P2pkvError | None:
        return self._error

    def done(self) -> bool:
        return self._state.finished

    def wait(self, timeout: float | None = None) -> None:
        """Block until the send finished; raise its error if it failed.

        Raises
        ------
        TransferTimeout
            If the handle is still unfinished after ``timeout`` seconds (the
            transfer itself goes on until its own deadline).
        PeerLost, TransferAborted, PoolExhausted, ...
            The error the transfer failed with.
        """
        if not self._event.wait(timeout):
            raise TransferTimeout(f"send still {self._state.value} after waiting {timeout:.3g}s",
                                  key=self.key, peer=self.peer)
        if self._error is not None:
            raise self._error

    # called by the engine's I/O thread only
    def _set(self, state: TransferState, error: P2pkvError | None = None) -> bool:
        if self._state.finished:
            return False
        self._state = state
        if state.finished:
            self._error = error
            self.t_done = time.monotonic()
            self._tensor = None
            self._event.set()
        return True

    @property
    def latency_s(self) -> float | None:
        return None if self.t_done is None else self.t_done - self.t_start

    def __repr__(self) -> str:
        err = f" error={self._error!r}" if self._error else ""
        return f"<SendHandle {self.key} -> {self.peer} {self.nbytes}B {self._state.value}{err}>"
