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

import torch

from .errors import P2pkvError, TransferAborted, TransferEvicted, TransferTimeout
from .keys import TransferKey
from .pool import Buffer

__all__ = ["Mailbox", "Slot"]

MAX_TOMBSTONES = 100_000
MAX_PEER_TOMBSTONES = 10_000  # abort records one peer can make here
MAX_ABORTING_PEERS = 64  # peers whose abort records are kept (least recently aborting dropped first)


class Slot:
    """One delivered tensor waiting to be claimed."""

    __slots__ = ("key", "buf", "dtype", "shape", "src", "t")

    def __init__(self, key: TransferKey, buf: Buffer, dtype: torch.dtype, shape: tuple[int, ...], src: object):
        self.key = key
        self.buf = buf
        self.dtype = dtype
        self.shape = shape
        self.src = src
        self.t = time.monotonic()

    def tensor(self) -> torch.Tensor:
        return self.buf.view(self.dtype, self.shape)


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
        self._aborted_by: OrderedDict[object, _Tombs] = OrderedDict()
        self._evicted = _Tombs()
        self._lost = _Tombs()
        self._tid_src: dict[str, dict[object, float]] = {}  # every sender of a transfer -> last seen
        self.bytes_held = 0
        self.evictions = 0

    # ---------------------------------------------------------------- producer side
    def deliver(self, key: TransferKey, buf: Buffer, dtype: torch.dtype, shape: tuple[int, ...],
                src: object = None) -> P2pkvError | None:
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
            self._slots[key] = Slot(key, buf, dtype, shape, src)
            self._by_tid.setdefault(tid, set()).add(key)
            self.bytes_held += buf.size
            self._evicted.pop(key)
            if src is not None:
                self._tid_src.setdefault(tid, {})[src] = time.monotonic()
                self._lost.pop(tid)
            w = self._waiting.get(key)
            if w is not None:
                w[0].notify_all()
        return None

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

    def error_for(self, key: TransferKey) -> P2pkvError | None:
        with self._lock:
            return self._error_locked(key)

    def _error_locked(self, key: TransferKey) -> P2pkvError | None:
        return (self._aborted_locked(key.transfer_id) or self._evicted.get(key)
                or self._lost.get(key.transfer_id))

    def claim(self, key: TransferKey, timeout: float, check: Callable[[Slot], None] | None = None,
              closed: Callable[[], P2pkvError | None] | None = None) -> Slot:
        """Wait up to ``timeout`` seconds for ``key`` and take it.

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
                    w[0].wait(min(remaining, 0.25))
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

    def _aborted_locked(self, tid: str) -> P2pkvError | None:
        err = self._aborted.get(tid)
        if err is None and self._aborted_by:
            for tombs in self._aborted_by.values():
                err = tombs.get(tid)
                if err is not None:
                    break
        return err

    def abort(self, tid: str, reason: str = "transfer aborted", src: object = None) -> list[Buffer]:
        """Drop every key of ``tid``; return their buffers for the caller to release.

        ``src`` names the peer that asked (None: our own caller); each peer's abort records
        have their own budget (:data:`MAX_PEER_TOMBSTONES`, :data:`MAX_ABORTING_PEERS` peers).
        """
        with self._lock:
            if src is None:
                tombs = self._aborted
            else:
                peer_tombs = self._aborted_by.get(src)
                if peer_tombs is None:
                    peer_tombs = self._aborted_by[src] = _Tombs(MAX_PEER_TOMBSTONES)
                    while len(self._aborted_by) > MAX_ABORTING_PEERS:
                        self._aborted_by.popitem(last=False)
                self._aborted_by.move_to_end(src)
                tombs = peer_tombs
            tombs.put(tid, self.tomb_s, lambda: TransferAborted(reason, key=tid))
            bufs = [self._drop_tid_locked(tid)]
            self._wake_tid_locked(tid)
        return bufs[0]

    def _drop_tid_locked(self, tid: str) -> list[Buffer]:
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

    def expire(self, now: float | None = None) -> list[Buffer]:
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
            for tombs in (self._aborted, self._evicted, self._lost, *self._aborted_by.values()):
                tombs.expire(now)
            for src in [s for s, t in self._aborted_by.items() if not len(t)]:
                del self._aborted_by[src]
        return out

    def fail_all(self, make_error: Callable[[], P2pkvError]) -> list[Buffer]:
        """Close: wake every waiter (they see ``closed()``) and hand back all buffers."""
        with self._lock:
            out = [s.buf for s in self._slots.values()]
            self._slots.clear()
            self._by_tid.clear()
            self.bytes_held = 0
            self._wake_tid_locked(None)
        return out

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"held": len(self._slots), "bytes_held": self.bytes_held, "waiting_keys": len(self._waiting),
                    "evictions": self.evictions, "aborted_tids": len(self._aborted)}
