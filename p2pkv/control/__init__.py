"""Control plane: msgpack messages (:mod:`.messages`) over ZMQ."""

from .messages import PROTOCOL_VERSION, decode, encode

__all__ = ["PROTOCOL_VERSION", "decode", "encode"]
