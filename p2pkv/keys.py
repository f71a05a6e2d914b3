"""Transfer keys: the canonical names under which tensors travel.

A transfer is named by a *transfer id* that the router/proxy allocates once and
hands to both sides (never derived from an engine's internal request id). Each
tensor of a transfer has a *name* (e.g. the layer name). A key is the
structured pair; it is encoded on the wire as a two-element array, never as a
joined string that has to be parsed back apart.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import InvalidKey

__all__ = ["TransferKey", "MAX_ID_LEN", "MAX_NAME_LEN", "new_transfer_id", "validate_transfer_id"]

MAX_ID_LEN = 256
MAX_NAME_LEN = 512
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_part(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidKey(f"{what} must be a str, got {type(value).__name__}: {value!r:.80}")
    if not value:
        raise InvalidKey(f"{what} must not be empty")
    if len(value) > limit:
        raise InvalidKey(f"{what} is {len(value)} characters long; the limit is {limit}")
    m = _CONTROL.search(value)
    if m:
        raise InvalidKey(f"{what} contains control character {m.group()!r} at index {m.start()}: {value!r:.80}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates: the wire (msgpack) cannot carry them
        raise InvalidKey(f"{what} is not UTF-8 encodable ({exc.reason} at index {exc.start}): {value!r:.80}") from None
    return value


def validate_transfer_id(transfer_id: Any) -> str:
    """Return ``transfer_id`` if valid, else raise :class:`InvalidKey`."""
    return _check_part(transfer_id, "transfer_id", MAX_ID_LEN)


def names_note(names: list[str], most: int = 8) -> str:
    """Tensor names for an error message: the first ``most`` (each cut to 80 characters), then how many more."""
    shown = ", ".join(repr(n)[:80] for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def new_transfer_id() -> str:
    """A fresh random transfer id, for routers/proxies that allocate them."""
    return "xfer-" + uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class TransferKey:
    """Immutable ``(transfer_id, name)`` pair naming one tensor of one transfer.

    Raises
    ------
    InvalidKey
        If either part is not a non-empty ``str`` within its length limit,
        contains control characters, or is not UTF-8 encodable (lone surrogates).
    """

    transfer_id: str
    name: str

    def __post_init__(self) -> None:
        _check_part(self.transfer_id, "transfer_id", MAX_ID_LEN)
        _check_part(self.name, "name", MAX_NAME_LEN)

    def to_wire(self) -> list[str]:
        return [self.transfer_id, self.name]

    @classmethod
    def from_wire(cls, value: Any) -> TransferKey:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise InvalidKey(f"a key on the wire is a [transfer_id, name] array, got {value!r:.80}")
        return cls(value[0], value[1])

    def __str__(self) -> str:
        return f"{self.transfer_id}/{self.name}"
