"""p2pkv: move KV-cache tensors between engines for disaggregated LLM serving.

Importing p2pkv touches no GPU, opens no socket and starts no thread: all
resources start in :class:`Engine` and end in :meth:`Engine.close`.
"""

from .config import EngineConfig
from .engine import Engine
from .errors import (AuthError, ConfigError, DuplicateKey, EngineClosed, InvalidAddress, InvalidKey,
                     InvalidTensor, P2pkvError, PeerLost, PoolExhausted, ProtocolError, SessionRefused,
                     ShapeMismatch, TransferAborted, TransferEvicted, TransferTimeout, TransportError)
from .handles import SendHandle, TransferState
from .keys import TransferKey, new_transfer_id
from .pool import Buffer, BufferPool
from .recv_request import RecvRequest, RecvState
from .request import RequestHandle, RequestLayout, RequestState

__version__ = "0.1.0"

__all__ = [
    "Engine", "EngineConfig", "TransferKey", "new_transfer_id", "SendHandle", "TransferState",
    "BufferPool", "Buffer", "RequestHandle", "RequestState", "RequestLayout", "RecvRequest", "RecvState",
    "P2pkvError", "ConfigError", "InvalidKey", "InvalidTensor", "ShapeMismatch", "InvalidAddress",
    "TransferTimeout", "PeerLost", "ProtocolError", "AuthError", "SessionRefused", "PoolExhausted", "TransferAborted",
    "TransferEvicted", "DuplicateKey", "EngineClosed", "TransportError", "__version__",
]
