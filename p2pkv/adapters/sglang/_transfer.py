"""What the sender and the receiver share: a ``KVPoll`` state, one recorded failure, metrics."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ...errors import ConfigError, P2pkvError
from ._compat import KVPoll, KVTransferMetric
from ._wire import transfer_id_for_room
from .manager import P2pkvKVManager

__all__ = ["Transfer"]

log = logging.getLogger("p2pkv.sglang")


class Transfer:
    """State shared by sender and receiver: a state, a failure, timings and bytes."""

    kv_mgr: P2pkvKVManager

    def _setup(self, mgr: P2pkvKVManager, bootstrap_addr: str, bootstrap_room: Any) -> None:
        if not isinstance(mgr, P2pkvKVManager):
            raise ConfigError(f"expected a P2pkvKVManager, got {type(mgr).__name__}")
        self.kv_mgr = mgr
        self.bootstrap_addr = bootstrap_addr
        self.bootstrap_room = bootstrap_room
        self.control_tid = transfer_id_for_room(bootstrap_room)
        self._lock = threading.RLock()
        self._state: int = KVPoll.Bootstrapping
        self._error: P2pkvError | None = None
        self._aborted = False
        self.conclude_state: int | None = None
        self._t_start: float | None = None
        self._t_end: float | None = None
        self._bytes = 0

    @property
    def failed(self) -> bool:
        return self._state == KVPoll.Failed

    @property
    def finished(self) -> bool:
        return self._state in (KVPoll.Failed, KVPoll.Success)

    def _fail(self, err: BaseException) -> bool:
        """Record ``err`` and go to ``Failed`` (the first failure wins). True if this call failed it."""
        with self._lock:
            if self.finished:
                return False
            if not isinstance(err, P2pkvError):
                err = P2pkvError(f"{type(err).__name__}: {err}")
            self._error = err
            self._state = KVPoll.Failed
            self.conclude_state = KVPoll.Failed
        log.warning("p2pkv: %s room %s failed: %s", type(self).__name__, self.bootstrap_room, err)
        return True

    def _set_state(self, state: int) -> None:
        with self._lock:
            if not self.finished:
                self._state = state
                if state == KVPoll.Success:
                    self.conclude_state = state
                    self._t_end = time.monotonic()

    def failure_exception(self) -> None:
        """Raise the error that failed this transfer (a typed :class:`p2pkv.P2pkvError`).

        Raises
        ------
        P2pkvError
            Always: the recorded failure, or one saying there was none.
        """
        err = self._error
        if err is None:
            raise P2pkvError(f"room {self.bootstrap_room}: no failure recorded (state {self._state})")
        raise err

    def get_transfer_metric(self) -> Any:
        """Latency from the first chunk to success, and the bytes moved."""
        lat = (self._t_end - self._t_start) if self._t_end is not None and self._t_start is not None else None
        return KVTransferMetric(transfer_latency_s=lat, transfer_total_bytes=self._bytes or None)
