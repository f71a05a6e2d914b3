"""Exception tree of p2pkv.

Every error p2pkv raises at its API boundary derives from :class:`P2pkvError`
and carries a stable string ``code`` that also travels on the wire, so an
error raised on one engine can be re-raised with the same type on its peer.
"""

from __future__ import annotations

__all__ = [
    "P2pkvError",
    "ConfigError",
    "InvalidKey",
    "InvalidTensor",
    "ShapeMismatch",
    "InvalidBlockIds",
    "TransferTimeout",
    "PeerLost",
    "SessionRefused",
    "ProtocolError",
    "AuthError",
    "PoolExhausted",
    "TransferAborted",
    "TransferEvicted",
    "DuplicateKey",
    "EngineClosed",
    "TransportError",
    "InvalidAddress",
    "error_from_code",
]


class P2pkvError(Exception):
    """Base of every p2pkv error. ``code`` names the error on the wire."""

    code = "error"

    def __init__(self, message: str = "", *, peer: str | None = None, key: object = None):
        self.peer = peer
        self.key = key
        parts = [message or self.__class__.__name__]
        if key is not None:
            parts.append(f"key={key}")
        if peer is not None:
            parts.append(f"peer={peer}")
        super().__init__(" ".join([parts[0]] + ([f"({', '.join(parts[1:])})"] if len(parts) > 1 else [])))
        self.message = message


class ConfigError(P2pkvError, ValueError):
    """An :class:`~p2pkv.EngineConfig` field (or env var / dict entry) is invalid."""

    code = "config"


class InvalidKey(P2pkvError, ValueError):
    """A transfer key or transfer id is malformed (empty, too long, bad type...)."""

    code = "invalid_key"


class InvalidTensor(P2pkvError, ValueError):
    """A tensor argument is unusable: wrong type, dtype, device, layout or size."""

    code = "invalid_tensor"


class ShapeMismatch(InvalidTensor):
    """An ``out=`` tensor does not match the shape/dtype of the data that arrived."""

    code = "shape_mismatch"


class InvalidBlockIds(InvalidTensor, IndexError):
    """Block ids are out of range, of a non-integer dtype or on the wrong device."""

    code = "invalid_block_ids"


class TransferTimeout(P2pkvError, TimeoutError):
    """A wait passed its deadline (data never came, no credit, no ack)."""

    code = "timeout"


class PeerLost(P2pkvError, ConnectionError):
    """The peer stopped answering or restarted; its pending transfers failed."""

    code = "peer_lost"


class ProtocolError(P2pkvError):
    """A control message was malformed, of an unknown type or version."""

    code = "protocol"


class AuthError(P2pkvError, PermissionError):
    """The peer did not present the configured shared secret."""

    code = "auth"


class PoolExhausted(P2pkvError, MemoryError):
    """No room in the buffer pool (after waiting up to the deadline)."""

    code = "pool_exhausted"


class TransferAborted(P2pkvError):
    """The transfer id was aborted (locally or by the peer)."""

    code = "aborted"


class TransferEvicted(P2pkvError):
    """Data for the key arrived but nobody claimed it within the TTL."""

    code = "evicted"


class DuplicateKey(P2pkvError):
    """Data for this key is already waiting unclaimed at the receiver."""

    code = "duplicate_key"


class EngineClosed(P2pkvError, RuntimeError):
    """The engine was closed; the call cannot proceed."""

    code = "closed"


class InvalidAddress(P2pkvError, ValueError):
    """A peer address is not of the form ``host:port``."""

    code = "invalid_address"


class SessionRefused(P2pkvError, ConnectionError):
    """The peer refused our session: this host (or CURVE key) holds as many sessions with it as it
    allows (its ``max_sessions_per_peer``)."""

    code = "session_refused"


class TransportError(P2pkvError):
    """A data transport (TCP, CUDA IPC, NCCL) failed."""

    code = "transport"


_BY_CODE: dict[str, type[P2pkvError]] = {}
for _cls in list(globals().values()):
    if isinstance(_cls, type) and issubclass(_cls, P2pkvError):
        _BY_CODE[_cls.code] = _cls


def error_from_code(code: str, message: str, **kw: object) -> P2pkvError:
    """Rebuild an error received from a peer; unknown codes become P2pkvError."""
    cls = _BY_CODE.get(code, P2pkvError)
    return cls(message, **kw)  # type: ignore[arg-type]
