"""What the two sides say to each other: transfer ids and the decode ranks' metadata.

Ids (SGLang's internal request ids are never used):

* ``sglang-{room}`` (:func:`transfer_id_for_room`): the room's *rendezvous*
  id. Decode rank ``r`` pushes its metadata to prefill rank ``q`` under
  ``TransferKey("sglang-{room}", "meta/p{q}/d{r}")``. This id is never
  aborted, so a retry under the same ``bootstrap_room`` can always meet.
* ``sglang-{room}.{attempt}`` (:func:`attempt_transfer_id`): the data of one
  attempt; ``attempt`` is chosen by the decode rank (unique per receiver) and
  named in its metadata. Aborting an attempt blocks only that attempt's id, so
  late data of an old attempt is refused while a retry moves under a new id.

Everything read from a peer is checked here (a peer may be buggy or hostile):
a bad message is a :class:`~p2pkv.ProtocolError` naming what was wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...engine import parse_address
from ...errors import InvalidAddress, InvalidKey, ProtocolError
from ...keys import TransferKey

__all__ = ["META_VERSION", "transfer_id_for_room", "attempt_transfer_id", "DecodeMeta", "encode_meta",
           "decode_meta", "json_tensor"]

META_VERSION = 2
MAX_META_BYTES = 1 << 16
MAX_RANKS = 4096
_ATTEMPT = re.compile(r"^[0-9a-z]{1,40}$")


def _room(bootstrap_room: Any) -> int:
    if isinstance(bootstrap_room, bool) or not isinstance(bootstrap_room, (int, np.integer)) or bootstrap_room < 0:
        raise InvalidKey(f"bootstrap_room must be a non-negative int, got {bootstrap_room!r}")
    return int(bootstrap_room)


def transfer_id_for_room(bootstrap_room: Any) -> str:
    """The rendezvous transfer id of one SGLang request: ``f"sglang-{bootstrap_room}"``.

    Raises
    ------
    InvalidKey
        ``bootstrap_room`` is not a non-negative integer.
    """
    return f"sglang-{_room(bootstrap_room)}"


def attempt_transfer_id(bootstrap_room: Any, attempt: str) -> str:
    """The transfer id of one attempt at a room's KV: ``f"sglang-{room}.{attempt}"``.

    Raises
    ------
    InvalidKey
        A bad room, or ``attempt`` is not 1-40 characters of ``[0-9a-z]``.
    """
    if not isinstance(attempt, str) or not _ATTEMPT.match(attempt):
        raise InvalidKey(f"attempt must be 1-40 characters of [0-9a-z], got {attempt!r:.60}")
    return f"{transfer_id_for_room(bootstrap_room)}.{attempt}"


def json_tensor(obj: dict[str, Any]) -> torch.Tensor:
    """``obj`` as UTF-8 JSON bytes in a ``uint8`` tensor."""
    return torch.frombuffer(bytearray(json.dumps(obj, separators=(",", ":")).encode()), dtype=torch.uint8)


@dataclass(frozen=True)
class DecodeMeta:
    """One decode rank's message to one prefill rank about one attempt.

    ``kind`` is ``"meta"`` (where to send what) or ``"abort"`` (the decode
    rank gave up before it sent its metadata).
    """

    kind: str
    tid: str
    dst_rank: int
    n_dst: int
    addr: str = ""
    n_pages: int = 0
    heads: tuple[int, int] | None = None
    aux: bool = False
    prefix_len: int = 0
    bytes_per_head: int = 0
    n_buffers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"v": META_VERSION, "kind": self.kind, "tid": self.tid, "dst_rank": self.dst_rank,
                "n_dst": self.n_dst, "addr": self.addr, "n_pages": self.n_pages,
                "heads": list(self.heads) if self.heads is not None else None, "aux": self.aux,
                "prefix_len": self.prefix_len, "bytes_per_head": self.bytes_per_head, "n_buffers": self.n_buffers}


def encode_meta(meta: DecodeMeta) -> torch.Tensor:
    return json_tensor(meta.to_dict())


def _int(obj: dict[str, Any], name: str, lo: int, hi: int, key: TransferKey) -> int:
    v = obj.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ProtocolError(f"SGLang metadata field {name}={v!r:.40} is not an int in [{lo}, {hi}]", key=key)
    return v


def decode_meta(t: torch.Tensor, key: TransferKey, room: int) -> DecodeMeta:
    """Parse and check one decode rank's message received under ``key`` for ``room``.

    Raises
    ------
    ProtocolError
        Not JSON, another version, a field missing or out of range, or an
        attempt id that is not of this room.
    """
    if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() > MAX_META_BYTES:
        raise ProtocolError(f"SGLang metadata must be at most {MAX_META_BYTES} uint8 bytes, got "
                            f"{tuple(t.shape)} {t.dtype}", key=key)
    try:
        obj = json.loads(bytes(t.cpu().numpy().tobytes()).decode())
    except ValueError as e:
        raise ProtocolError(f"unreadable SGLang metadata: {e}", key=key) from None
    if not isinstance(obj, dict) or obj.get("v") != META_VERSION:
        raise ProtocolError(f"SGLang metadata of unknown version: {obj!r:.200}", key=key)
    kind = obj.get("kind")
    if kind not in ("meta", "abort"):
        raise ProtocolError(f"SGLang metadata of unknown kind {kind!r:.40}", key=key)
    tid = obj.get("tid")
    prefix = f"{transfer_id_for_room(room)}."
    if not isinstance(tid, str) or not tid.startswith(prefix) or not _ATTEMPT.match(tid[len(prefix):]):
        raise ProtocolError(f"SGLang metadata names transfer {tid!r:.80}, not an attempt of room {room}", key=key)
    n_dst = _int(obj, "n_dst", 1, MAX_RANKS, key)
    dst_rank = _int(obj, "dst_rank", 0, n_dst - 1, key)
    if kind == "abort":
        return DecodeMeta(kind="abort", tid=tid, dst_rank=dst_rank, n_dst=n_dst)
    addr = obj.get("addr")
    try:
        parse_address(addr)
    except InvalidAddress as e:
        raise ProtocolError(f"SGLang metadata: {e}", key=key) from None
    heads_raw = obj.get("heads")
    heads: tuple[int, int] | None = None
    if heads_raw is not None:
        if (not isinstance(heads_raw, list) or len(heads_raw) != 2
                or not all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h <= 1 << 20 for h in heads_raw)
                or heads_raw[0] > heads_raw[1]):
            raise ProtocolError(f"SGLang metadata: heads={heads_raw!r:.60} is not [lo, hi]", key=key)
        heads = (heads_raw[0], heads_raw[1])
    aux = obj.get("aux")
    if not isinstance(aux, bool):
        raise ProtocolError(f"SGLang metadata: aux={aux!r:.20} is not a bool", key=key)
    return DecodeMeta(kind="meta", tid=tid, dst_rank=dst_rank, n_dst=n_dst, addr=str(addr),
                      n_pages=_int(obj, "n_pages", 0, 1 << 31, key), heads=heads, aux=aux,
                      prefix_len=_int(obj, "prefix_len", 0, 1 << 40, key),
                      bytes_per_head=_int(obj, "bytes_per_head", 0, 1 << 31, key),
                      n_buffers=_int(obj, "n_buffers", 0, 1 << 20, key))
