"""Keyed rendezvous between the I/O thread that delivers data and callers that claim it.

``claim`` may come before or after ``deliver``. Every wait has a deadline.
Unclaimed data is evicted after a TTL and its buffer returned to the pool;
``abort(transfer_id)`` drops every key of a transfer at once. A transfer whose
source was lost fails the waits on keys that had not arrived with
:class:`PeerLost`, while keys that did arrive stay claimable: nothing that was
delivered is thrown away behind the caller's back.

Tombstones (aborted transfer ids, evicted keys, lost sources) are remembered
for the TTL, so a late caller gets the precise error instead of a timeout.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import torch

from ._aborts import PeerTombs
from .errors import P2pkvError, TransferAborted, TransferEvicted, TransferTimeout
from .keys import TransferKey

__all__ = ["Mailbox", "Slot"]

MAX_TOMBSTONES = 100_000
MAX_PEER_TOMBSTONES = 10_000  # abort records one peer can make here
MAX_PEER_TOMBSTONES_TOTAL = 100_000  # abort records of all peers (see p2pkv._aborts: never shared evenly)


class Held(Protocol):
    """The bytes of one delivered tensor, as a :class:`Slot` holds them: a pool :class:`Buffer`, a
    :class:`DirectBuffer` (the caller's own tensor) or a fast-plane lease item (a peer's shared arena)."""

    @property
    def nbytes(self) -> int: ...  # the tensor's bytes
    @property
    def size(self) -> int: ...  # the room it takes in the pool (0 when none)
    @property
    def offset(self) -> int: ...  # where it lies in its arena (-1 when in none)
    @property
    def data(self) -> torch.Tensor: ...  # the bytes as a flat uint8 tensor
    def view(self, dtype: torch.dtype, shape: tuple[int, ...] | list[int]) -> torch.Tensor: ...
    def release(self) -> None: ...


class Slot:
    """One delivered tensor waiting to be claimed."""

    __slots__ = ("key", "buf", "dtype", "shape", "src", "t", "ready")

    def __init__(self, key: TransferKey, buf: Held, dtype: torch.dtype, shape: tuple[int, ...], src: object,
                 ready: Callable[[], bool] | None = None):
        self.key = key
        self.buf = buf
        self.dtype = dtype
        self.shape = shape
        self.src = src
        self.t = time.monotonic()
        # None: the bytes are in the buffer. Else the data is still landing (a same-host producer
        # writes it straight into the buffer) and this says when it has.
        self.ready = ready

    def tensor(self) -> torch.Tensor:
        return self.buf.view(self.dtype, self.shape)


class DirectBuffer:
    """Data received straight into the caller's tensor (a posted ``recv``): no pool room, nothing to free."""

    __slots__ = ("tensor", "nbytes", "size", "offset", "overflow", "released")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.nbytes = tensor.numel() * tensor.element_size()
        self.size = 0
        self.offset = -1
        self.overflow = False
        self.released = False

    @property
    def data(self) -> torch.Tensor:
        t = self.tensor.reshape(-1)
        return t if t.dtype == torch.uint8 else t.view(torch.uint8)

    def view(self, dtype: torch.dtype, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
        return self.tensor

    def release(self) -> None:
        self.released = True


class _Tombs:
    """Bounded, expiring map of name -> exception factory."""

    def __init__(self, cap: int = 0) -> None:
        self._d: OrderedDict[object, tuple[float, Callable[[], P2pkvError]]] = OrderedDict()
        self.cap = cap or MAX_TOMBSTONES

    def put(self, name: object, ttl: float, make: Callable[[], P2pkvError]) -> None:
        self._d[name] = (time.monotonic() + ttl, make)
        self._d.move_to_end(name)
        while len(self._d) > self.cap:
            self._d.popitem(last=False)

    def get(self, name: object) -> P2pkvError | None:
        item = self._d.get(name)
        if item is None:
            return None
        if item[0] < time.monotonic():
            del self._d[name]
            return None
        return item[1]()

    def pop(self, name: object) -> None:
        self._d.pop(name, None)

    def expire(self, now: float) -> None:
        while self._d:
            name, (exp, _) = next(iter(self._d.items()))
            if exp >= now:
                break
            del self._d[name]

    def __len__(self) -> int:
        return len(self._d)


class Mailbox:
    """Thread-safe store of delivered tensors keyed by :class:`TransferKey`."""

    def __init__(self, ttl_s: float, *, name: str = "mailbox", tomb_s: float | None = None):
        self.ttl_s = ttl_s
        # how long the fate of an aborted / evicted / lost key is remembered
        self.tomb_s = max(ttl_s, 300.0) if tomb_s is None else tomb_s
        self.name = name
        self._lock = threading.Lock()
        self._slots: dict[TransferKey, Slot] = {}
        self._by_tid: dict[str, set[TransferKey]] = {}
        self._waiting: dict[TransferKey, list] = {}  # key -> [Condition, waiter count]
        self._aborted = _Tombs()  # aborted here (by our own caller)
        # aborted by a peer: a budget per peer, so no peer's aborts can evict our or another's records
        self._aborted_by = PeerTombs(MAX_PEER_TOMBSTONES_TOTAL, MAX_PEER_TOMBSTONES)
        self._evicted = _Tombs()
        self._lost = _Tombs()
        self._tid_src: dict[str, dict[object, float]] = {}  # every sender of a transfer -> last seen
        self._posted: dict[TransferKey, list[Any]] = {}  # key -> [the caller's tensor or None, taken]
        self.bytes_held = 0
        self._held_by: dict[object, int] = {}  # src -> bytes of its data waiting unclaimed
        self.evictions = 0

    # ---------------------------------------------------------------- producer side
    def deliver(self, key: TransferKey, buf: Held, dtype: torch.dtype, shape: tuple[int, ...],
                src: object = None, ready: Callable[[], bool] | None = None) -> P2pkvError | None:
        """Store a tensor. Returns ``None`` on success, else the error to report
        to the sender (the buffer is then NOT taken: the caller releases it)."""
        with self._lock:
            tid = key.transfer_id
            err = self._aborted_locked(tid)
            if err is not None:
                return err
            if key in self._slots:
                from .errors import DuplicateKey

                return DuplicateKey("data for this key is already waiting unclaimed", key=key)
            self._insert_locked(Slot(key, buf, dtype, shape, src, ready))
            self._evicted.pop(key)
            if src is not None:
                self._tid_src.setdefault(tid, {})[src] = time.monotonic()
                self._lost.pop(tid)
        return None

    def _insert_locked(self, slot: Slot) -> None:
        """Hold ``slot`` under its key (counted against its sender) and wake whoever waits for it."""
        key, size = slot.key, slot.buf.size
        self._slots[key] = slot
        self._by_tid.setdefault(key.transfer_id, set()).add(key)
        self.bytes_held += size
        if slot.src is not None and size:
            self._held_by[slot.src] = self._held_by.get(slot.src, 0) + size
        w = self._waiting.get(key)
        if w is not None:
            w[0].notify_all()

    def put_back(self, slot: Slot) -> bool:
        """Return a slot taken by :meth:`take_nowait` (a consumer that failed before using it), keeping its
        arrival time (so ``ttl_s`` still counts from its delivery). False, and the caller keeps the buffer,
        when its transfer was aborted meanwhile or new data holds its key."""
        with self._lock:
            key = slot.key
            if key in self._slots or self._aborted_locked(key.transfer_id) is not None:
                return False
            self._insert_locked(slot)
        return True

    # ---------------------------------------------------------------- consumer side
    def take_nowait(self, key: TransferKey, check: Callable[[Slot], None] | None = None) -> Slot | None:
        with self._lock:
            return self._take_locked(key, check)

    def _take_locked(self, key: TransferKey, check: Callable[[Slot], None] | None) -> Slot | None:
        slot = self._slots.get(key)
        if slot is None:
            return None
        if check is not None:
            check(slot)  # raises, leaving the data in place
        self._remove_locked(slot)
        return slot

    def _remove_locked(self, slot: Slot) -> None:
        del self._slots[slot.key]
        keys = self._by_tid.get(slot.key.transfer_id)
        if keys is not None:
            keys.discard(slot.key)
            if not keys:
                del self._by_tid[slot.key.transfer_id]
        self.bytes_held -= slot.buf.size
        if slot.src is not None and slot.buf.size:
            left = self._held_by.get(slot.src, 0) - slot.buf.size
            if left > 0:
                self._held_by[slot.src] = left
            else:
                self._held_by.pop(slot.src, None)

    def held_by(self, src: object) -> int:
        """Bytes of the data ``src`` delivered that wait here unclaimed (what it holds of our pool)."""
        with self._lock:
            return self._held_by.get(src, 0)

    def error_for(self, key: TransferKey) -> P2pkvError | None:
        with self._lock:
            return self._error_locked(key)

    # ---------------------------------------------------------------- posted receives
    def post(self, key: TransferKey, dest: torch.Tensor | None) -> None:
        """A caller waits for ``key``: its data may land straight in ``dest`` (None: in a new tensor)."""
        with self._lock:
            if len(self._posted) < 65536:
                self._posted[key] = [dest, False]

    def take_post(self, key: TransferKey) -> tuple[bool, torch.Tensor | None]:
        """The receiving thread: ``(True, dest)`` if a caller posted ``key`` (it is then being written)."""
        with self._lock:
            p = self._posted.get(key)
            if p is None or p[1]:
                return False, None
            p[1] = True
            return True, p[0]

    def unpost(self, key: TransferKey) -> bool:
        """Withdraw a post; False if its data is being written into it right now (then it is delivered)."""
        with self._lock:
            p = self._posted.pop(key, None)
            return p is None or not p[1]

    def names_of(self, tid: str) -> set[str]:
        """Names of ``tid``'s tensors waiting here unclaimed."""
        with self._lock:
            return {k.name for k in self._by_tid.get(tid, ())}

    def note_evicted(self, tid: str, names: list[str]) -> None:
        """Tensors that waited elsewhere (a shared-memory record) were evicted: late claims say so."""
        with self._lock:
            msg = f"data arrived but was not claimed within ttl_s={self.ttl_s:g}"
            for n in names:
                k = TransferKey(tid, n)

                def make(k: TransferKey = k) -> P2pkvError:
                    return TransferEvicted(msg, key=k)

                self._evicted.put(k, self.tomb_s, make)
            self.evictions += len(names)
            self._wake_tid_locked(tid)

    def tid_error(self, tid: str) -> P2pkvError | None:
        """Why no more data of transfer ``tid`` can come, if it cannot (aborted, or its source lost)."""
        with self._lock:
            return self._aborted_locked(tid) or self._lost.get(tid)

    def _error_locked(self, key: TransferKey) -> P2pkvError | None:
        return (self._aborted_locked(key.transfer_id) or self._evicted.get(key)
                or self._lost.get(key.transfer_id))

    def claim(self, key: TransferKey, timeout: float, check: Callable[[Slot], None] | None = None,
              closed: Callable[[], P2pkvError | None] | None = None,
              poll: Callable[[], None] | None = None) -> Slot:
        """Wait up to ``timeout`` seconds for ``key`` and take it.

        ``poll`` (called without the lock, about every millisecond while waiting) lets the
        caller make progress itself, e.g. read a shared-memory ring that delivers here.

        Raises
        ------
        TransferTimeout, TransferAborted, TransferEvicted, PeerLost
            As the key's fate decides; ``check``'s own error if the data does
            not fit the caller (the data then stays claimable).
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            w = None
            try:
                while True:
                    slot = self._take_locked(key, check)
                    if slot is not None:
                        return slot
                    err = self._error_locked(key) or (closed() if closed else None)
                    if err is not None:
                        raise err
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TransferTimeout(f"no data arrived within {timeout:.3g}s", key=key)
                    if w is None:
                        w = self._waiting.get(key)
                        if w is None:
                            w = self._waiting[key] = [threading.Condition(self._lock), 0]
                        w[1] += 1
                    if poll is not None:
                        self._lock.release()
                        try:
                            poll()
                        finally:
                            self._lock.acquire()
                        if key in self._slots:
                            continue
                    w[0].wait(min(remaining, 0.25 if poll is None else 0.001))
            finally:
                if w is not None:
                    w[1] -= 1
                    if w[1] == 0:
                        del self._waiting[key]

    # ---------------------------------------------------------------- failure paths
    def _wake_tid_locked(self, tid: str | None) -> None:
        for key, w in self._waiting.items():
            if tid is None or key.transfer_id == tid:
                w[0].notify_all()

    def aborted(self, tid: str) -> bool:
        """True when transfer ``tid`` was aborted (here, or by a peer) and that is still remembered."""
        with self._lock:
            return isinstance(self._aborted_locked(tid), TransferAborted)

    def _aborted_locked(self, tid: str) -> P2pkvError | None:
        return self._aborted.get(tid) or self._aborted_by.get(tid)

    def abort(self, tid: str, reason: str = "transfer aborted", src: object = None) -> list[Held]:
        """Drop every key of ``tid``; return their buffers for the caller to release.

        ``src`` names the peer that asked (None: our own caller); each peer's abort records
        have their own budget (:data:`MAX_PEER_TOMBSTONES` each, never evicted by peers holding
        fewer records: see :class:`p2pkv._aborts.PeerTombs`).
        """
        with self._lock:
            if src is None:
                self._aborted.put(tid, self.tomb_s, lambda: TransferAborted(reason, key=tid))
            else:
                self._aborted_by.put(src, tid, self.tomb_s, lambda: TransferAborted(reason, key=tid))
            bufs = [self._drop_tid_locked(tid)]
            self._wake_tid_locked(tid)
        return bufs[0]

    def _drop_tid_locked(self, tid: str) -> list[Held]:
        out = []
        for key in list(self._by_tid.get(tid, ())):
            slot = self._slots[key]
            self._remove_locked(slot)
            out.append(slot.buf)
        self._tid_src.pop(tid, None)
        return out

    def has(self, key: TransferKey) -> bool:
        """True while data for ``key`` waits unclaimed."""
        with self._lock:
            return key in self._slots

    def expect(self, tid: str, src: object) -> None:
        """Note that ``src`` is sending transfer ``tid`` (so losing it fails the waits at once)."""
        with self._lock:
            self._tid_src.setdefault(tid, {})[src] = time.monotonic()
            self._lost.pop(tid)

    def fail_transfer(self, tid: str, make_error: Callable[[], P2pkvError]) -> None:
        """Fail the waits for keys of ``tid`` that have not arrived with ``make_error()``.

        Data of ``tid`` that did arrive stays claimable.
        """
        with self._lock:
            self._lost.put(tid, self.tomb_s, make_error)
            self._tid_src.pop(tid, None)
            self._wake_tid_locked(tid)

    def source_lost(self, src: object, make_error: Callable[[], P2pkvError], clean: bool = False) -> list[str]:
        """Fail waits for missing keys of every transfer that ``src`` was sending.

        Every sender of a transfer is tracked: a sender that was lost (killed, silent)
        fails the transfer's waits at once; one that closed cleanly (``clean``) does so
        only if it was the transfer's last sender, so another producer's keys still come.
        Returns the transfer ids whose waits failed.
        """
        with self._lock:
            failed = []
            for tid in [t for t, srcs in self._tid_src.items() if src in srcs]:
                srcs = self._tid_src[tid]
                del srcs[src]
                if clean and srcs:
                    continue
                self._lost.put(tid, self.tomb_s, make_error)
                del self._tid_src[tid]
                self._wake_tid_locked(tid)
                failed.append(tid)
        return failed

    def expire(self, now: float | None = None) -> list[Held]:
        """Evict data older than the TTL; return the buffers to release."""
        now = time.monotonic() if now is None else now
        out = []
        with self._lock:
            cutoff = now - self.ttl_s
            for slot in [s for s in self._slots.values() if s.t < cutoff]:
                self._remove_locked(slot)
                out.append(slot.buf)
                self.evictions += 1
                k = slot.key
                self._evicted.put(k, self.tomb_s, functools.partial(
                    TransferEvicted, f"data arrived but was not claimed within ttl_s={self.ttl_s:g}", key=k))
            for tid in [t for t, srcs in self._tid_src.items()
                        if max(srcs.values(), default=0.0) < cutoff and t not in self._by_tid]:
                del self._tid_src[tid]
            for tombs in (self._aborted, self._evicted, self._lost, self._aborted_by):
                tombs.expire(now)
        return out

    def fail_all(self, make_error: Callable[[], P2pkvError]) -> list[Held]:
        """Close: wake every waiter (they see ``closed()``) and hand back all buffers."""
        with self._lock:
            out = [s.buf for s in self._slots.values()]
            self._slots.clear()
            self._by_tid.clear()
            self.bytes_held = 0
            self._held_by.clear()
            self._wake_tid_locked(None)
        return out

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"held": len(self._slots), "bytes_held": self.bytes_held, "waiting_keys": len(self._waiting),
                    "evictions": self.evictions, "aborted_tids": len(self._aborted)}
