"""SGLang's transfer-backend base classes, or stand-ins with the same surface when sglang is absent.

Importing this module needs no sglang: with sglang 0.5.23 installed the backend's
classes subclass SGLang's real ``BaseKV*`` classes (so ``isinstance`` checks in
SGLang's scheduler hold); without it they subclass the stand-ins below, which
carry only what the backend and its tests read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

__all__ = ["HAVE_SGLANG", "KVPoll", "KVArgs", "KVTransferMetric", "BaseKVManager", "BaseKVSender",
           "BaseKVReceiver", "BaseKVBootstrapServer"]


class _KVPoll:
    """Stand-in for ``sglang.srt.disaggregation.base.conn.KVPoll`` (same values)."""

    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


class _KVArgs:
    """Stand-in for SGLang's ``KVArgs``: a bag of attributes the scheduler sets."""


@dataclass
class _KVTransferMetric:
    """Stand-in for SGLang's ``KVTransferMetric``."""

    transfer_latency_s: float | None = None
    alloc_latency_s: float | None = None
    transfer_total_bytes: int | None = None


class _BaseKVManager(ABC):
    """Stand-in for SGLang's ``BaseKVManager`` (the same abstract methods, so that a missing one
    fails here too, not only where sglang is installed)."""

    enable_deferred_decode_kv_release: bool = False
    supports_host_destination: bool = False
    supports_role_switch: bool = False
    supports_deferred_decode_kv_release: bool = False

    @abstractmethod
    def register_to_bootstrap(self) -> None: ...

    def should_verify_kv_checksum(self, bootstrap_addr: str) -> bool:
        return True


class _BaseKVSender(ABC):
    """Stand-in for SGLang's ``BaseKVSender`` (same abstract methods)."""

    @abstractmethod
    def init(self, num_kv_indices: int, aux_index: int | None = None) -> None: ...

    @abstractmethod
    def send(self, kv_indices: Any, state_indices: Any = None, num_kv_tokens: int | None = None) -> None: ...

    @abstractmethod
    def poll(self) -> int: ...

    @abstractmethod
    def failure_exception(self) -> None: ...

    @abstractmethod
    def get_transfer_metric(self) -> Any: ...


class _BaseKVReceiver(ABC):
    """Stand-in for SGLang's ``BaseKVReceiver`` (same abstract methods)."""

    @abstractmethod
    def init(self, prefill_dp_rank: int = 0) -> None: ...

    @abstractmethod
    def send_metadata(self, kv_indices: Any, aux_index: int | None = None, state_indices: Any = None,
                      decode_prefix_len: int | None = None, destination: Any = None) -> None: ...

    @abstractmethod
    def poll(self) -> int: ...

    @abstractmethod
    def failure_exception(self) -> None: ...


class _BaseKVBootstrapServer:
    """Stand-in for SGLang's ``BaseKVBootstrapServer``."""


KVPoll: Any = _KVPoll
KVArgs: Any = _KVArgs
KVTransferMetric: Any = _KVTransferMetric
HAVE_SGLANG = False

if TYPE_CHECKING:  # mypy checks the backend against the stand-ins' surface
    BaseKVManager = _BaseKVManager
    BaseKVSender = _BaseKVSender
    BaseKVReceiver = _BaseKVReceiver
    BaseKVBootstrapServer = _BaseKVBootstrapServer
else:
    try:  # pragma: no cover - exercised only where sglang is installed
        from sglang.srt.disaggregation.base.conn import (BaseKVBootstrapServer, BaseKVManager, BaseKVReceiver,
                                                          BaseKVSender)
        from sglang.srt.disaggregation.base.conn import KVArgs as _RealKVArgs
        from sglang.srt.disaggregation.base.conn import KVPoll as _RealKVPoll
        from sglang.srt.disaggregation.base.conn import KVTransferMetric as _RealMetric

        KVPoll, KVArgs, KVTransferMetric = _RealKVPoll, _RealKVArgs, _RealMetric
        HAVE_SGLANG = True
    except Exception:  # sglang absent (or broken): the stand-ins
        BaseKVManager = _BaseKVManager
        BaseKVSender = _BaseKVSender
        BaseKVReceiver = _BaseKVReceiver
        BaseKVBootstrapServer = _BaseKVBootstrapServer
