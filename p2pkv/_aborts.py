"""Abort records made by peers, with a budget per peer that no other peer can spend.

A peer that aborts a transfer leaves a record, so that late data for that transfer is
refused and a late ``recv`` gets :class:`~p2pkv.errors.TransferAborted`. Records are
bounded: ``per_src`` per peer (its own oldest go first) and ``cap`` in all. Over the cap,
the oldest record of the peer holding the MOST records is dropped; among peers holding
equally many, the one that reached that count last loses. So a peer (or any number of
sessions of one attacker) can only push out records of peers that hold at least as many
as it does and got there later: 64 sessions that abort one junk id each cannot evict the
one record of an honest peer. Evicting a record of a peer that holds ``k`` records takes
more than ``cap / k`` sessions, each holding ``k`` live records (they expire after the
tombstone time). Every operation is O(1) (amortised), whatever the number of peers.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from .errors import P2pkvError

__all__ = ["PeerTombs"]

_Make = Callable[[], P2pkvError]


class PeerTombs:
    """Expiring records ``(peer, transfer id) -> error factory``, budgeted per peer.

    Not thread-safe: the owner (:class:`p2pkv.mailbox.Mailbox`) holds its lock.
    """

    def __init__(self, cap: int, per_src: int) -> None:
        if cap < 1 or per_src < 1:
            raise ValueError("cap and per_src must be >= 1")
        self.cap = cap
        self.per_src = per_src
        self._by_src: dict[Hashable, OrderedDict[str, tuple[float, _Make]]] = {}
        self._srcs_of: dict[str, dict[Hashable, None]] = {}  # tid -> peers that recorded it
        # record count -> peers holding that many, in the order they got there (oldest first)
        self._level: dict[int, dict[Hashable, None]] = {}
        self._top = 0
        self._order: OrderedDict[tuple[Hashable, str], float] = OrderedDict()  # by expiry (one ttl)
        self.total = 0

    def __len__(self) -> int:
        return self.total

    def peers(self) -> int:
        return len(self._by_src)

    def count(self, src: Hashable) -> int:
        recs = self._by_src.get(src)
        return len(recs) if recs is not None else 0

    def put(self, src: Hashable, tid: str, ttl: float, make: _Make) -> None:
        exp = time.monotonic() + ttl
        recs = self._by_src.get(src)
        if recs is None:
            recs = self._by_src[src] = OrderedDict()
        if tid in recs:  # renewed: it becomes the peer's newest record
            recs[tid] = (exp, make)
            recs.move_to_end(tid)
            self._order[(src, tid)] = exp
            self._order.move_to_end((src, tid))
            return
        n = len(recs)
        recs[tid] = (exp, make)
        self._srcs_of.setdefault(tid, {})[src] = None
        self._order[(src, tid)] = exp
        self.total += 1
        self._move(src, n, n + 1)
        if n + 1 > self.per_src:
            self._drop_oldest(src)
        while self.total > self.cap:
            self._drop_oldest(self._heaviest())

    def get(self, tid: str) -> P2pkvError | None:
        srcs = self._srcs_of.get(tid)
        if not srcs:
            return None
        now = time.monotonic()
        for src in list(srcs):
            exp, make = self._by_src[src][tid]
            if exp >= now:
                return make()
            self._remove(src, tid)
        return None

    def expire(self, now: float) -> None:
        while self._order:
            (src, tid), exp = next(iter(self._order.items()))
            if exp >= now:
                break
            self._remove(src, tid)

    # ------------------------------------------------------------------ internals
    def _heaviest(self) -> Hashable:
        while self._top > 0 and not self._level.get(self._top):
            self._top -= 1
        return next(reversed(self._level[self._top]))  # of the heaviest, the one that got there last

    def _move(self, src: Hashable, old: int, new: int) -> None:
        if old:
            peers = self._level[old]
            del peers[src]
            if not peers:
                del self._level[old]
        if new:
            self._level.setdefault(new, {})[src] = None
            self._top = max(self._top, new)

    def _drop_oldest(self, src: Hashable) -> None:
        self._remove(src, next(iter(self._by_src[src])))

    def _remove(self, src: Hashable, tid: str) -> None:
        recs = self._by_src[src]
        n = len(recs)
        del recs[tid]
        self._order.pop((src, tid), None)
        srcs = self._srcs_of[tid]
        del srcs[src]
        if not srcs:
            del self._srcs_of[tid]
        self.total -= 1
        self._move(src, n, n - 1)
        if not recs:
            del self._by_src[src]
