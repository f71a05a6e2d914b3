"""p2pkv: move KV-cache tensors between engines for disaggregated LLM serving.

Importing p2pkv touches no GPU, opens no socket and starts no thread: all
resources start in :class:`Engine` and end in :meth:`Engine.close`. The errors
and keys load at once; the engine and its parts (and torch with them) load on
first use of one of their names, so that ``python -m p2pkv.proxy`` (which needs
no torch) starts in a fraction of a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (AuthError, ConfigError, DuplicateKey, EngineClosed, InvalidAddress, InvalidKey,
                     InvalidTensor, P2pkvError, PeerLost, PoolExhausted, ProtocolError, SessionRefused,
                     ShapeMismatch, TransferAborted, TransferEvicted, TransferTimeout, TransportError)
from .keys import TransferKey, new_transfer_id

if TYPE_CHECKING:
    from .config import EngineConfig
    from .engine import Engine
    from .handles import SendHandle, TransferState
    from .pool import Buffer, BufferPool
    from .recv_request import RecvRequest, RecvState
    from .request import RequestHandle, RequestLayout, RequestState

__version__ = "0.1.0"

# name -> the module that defines it (imported on first use: they import torch)
_LAZY = {
    "EngineConfig": "config", "Engine": "engine", "SendHandle": "handles", "TransferState": "handles",
    "Buffer": "pool", "BufferPool": "pool", "RecvRequest": "recv_request", "RecvState": "recv_request",
    "RequestHandle": "request", "RequestLayout": "request", "RequestState": "request",
}


# submodules that ``import p2pkv`` made attributes of the package when it loaded the engine at once:
# ``p2pkv.config.EngineConfig`` after a plain ``import p2pkv`` keeps working (loaded on first use)
_SUBMODULES = frozenset({"config", "engine", "handles", "pool", "recv_request", "request", "mailbox", "control",
                         "transport", "stats", "_engine", "_tensors", "_trace", "_aborts"})


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # (the import binds it in the package)
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'p2pkv' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Engine", "EngineConfig", "TransferKey", "new_transfer_id", "SendHandle", "TransferState",
    "BufferPool", "Buffer", "RequestHandle", "RequestState", "RequestLayout", "RecvRequest", "RecvState",
    "P2pkvError", "ConfigError", "InvalidKey", "InvalidTensor", "ShapeMismatch", "InvalidAddress",
    "TransferTimeout", "PeerLost", "ProtocolError", "AuthError", "SessionRefused", "PoolExhausted",
    "TransferAborted", "TransferEvicted", "DuplicateKey", "EngineClosed", "TransportError", "__version__",
]
