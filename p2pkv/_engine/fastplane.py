"""The engine's same-host fast path as one object (see :mod:`p2pkv._engine.fastpath`).

:class:`FastPlane` is what the engine calls at the points where the fast path begins and
ends: the handshake (a consumer offers a lease and a channel, a producer accepts it), the
caller's ``send_request``, the consumer's reads of its channels (by any waiting thread, and
by the I/O thread when a producer rings the doorbell), timers, and the end of sessions and
peers. It also keeps the index that lets :meth:`Engine.recv_request` find a request by
transfer id, whichever path (fast, TCP or NCCL offer) announced it.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from ..errors import (DuplicateKey, InvalidKey, P2pkvError, PeerLost, ProtocolError, TransferAborted, TransportError,
                      error_from_code)
from ..keys import TransferKey, names_note
from ..mailbox import Slot
from ..request import ItemSpec, RequestHandle, Watcher
from ..transport.shm import ShmChannel, open_memfd
from .fastpath import MIN_LEASE, CudaMover, FastIncoming, FastRx, FastTx, HostMover, LeaseItem

if TYPE_CHECKING:
    from ..engine import Engine
    from .state import _Peer, _Session

log = logging.getLogger("p2pkv")

__all__ = ["FastPlane", "OfferRecord"]

_MAX_RECORDS = 65536  # transfer ids remembered for recv_request (oldest dropped first); offer records in all
# offer records one session may have listed: beyond, its own oldest goes (a consumer that takes requests
# with recv/claim leaves them until ttl_s; one that uses recv_request takes them)
_MAX_SESSION_RECORDS = 4096


class OfferRecord:
    """A request announced by an ordinary offer (TCP, NCCL): only its layout, for recv_request."""

    __slots__ = ("transfer_id", "specs", "t_arrived", "names", "sess", "listed", "dead")

    def __init__(self, tid: str, specs: list[ItemSpec], sess: bytes = b""):
        self.transfer_id = tid
        self.specs = specs
        self.t_arrived = time.monotonic()
        self.names = tuple(s.name for s in specs)
        self.sess = sess        # the session that offered it
        self.listed = False     # in the index (recv_request may still take it)
        self.dead = False       # its request failed: never to be listed again


def _names_of(rec: Any) -> tuple[str, ...]:
    return rec.layout.names if isinstance(rec, FastIncoming) else rec.names


class FastPlane:
    """Leases, channels, the doorbell and the request index of one engine."""

    def __init__(self, eng: Engine):
        self._eng = eng
        self.rx: dict[bytes, FastRx] = {}           # consumer: by session ident
        self._rx_list: list[FastRx] = []            # a snapshot for lock-free iteration by pollers
        self._quarantine: list[tuple[float, FastRx]] = []  # ended sessions whose lease may still be written
        self._index: OrderedDict[str, list[Any]] = OrderedDict()  # tid -> records (FastIncoming/OfferRecord)
        # tid -> tensor name -> the records in the index that hold it: a new request's duplicate check
        # costs O(its tensors), not O(the requests already announced under its transfer id)
        self._holders: dict[str, dict[str, list[Any]]] = {}
        self._no_offer: set[bytes] = set()          # sessions not offered a lease again (withdrawn, refused)
        self._lock = threading.Lock()               # the index and the rx snapshot
        self._poll_lock = threading.Lock()          # one reader of the channels at a time
        self._bell: socket.socket | None = None     # consumer: woken by producers (abstract Unix socket)
        self._bell_name = ""
        self._bell_out: socket.socket | None = None  # producer: rings consumers' doorbells
        self._done_watcher: Watcher | None = None    # producer: completes requests after their copies
        self._spinning = 0                           # our threads polling the channels right now
        self._wanted: set[str] = set()               # peers a request wanted the path to before their handshake
        # session ident -> its offer records in the index (insertion-ordered), and their count in all
        self._sess_recs: dict[bytes, dict[OfferRecord, None]] = {}
        self._n_records = 0
        self._records_dropped = 0  # listed records dropped to keep within the caps

    # ------------------------------------------------------------------ common
    @property
    def bell_fd(self) -> int | None:
        return self._bell.fileno() if self._bell is not None else None

    def can_offer(self, caps: Any) -> bool:
        """Whether a session with ``caps`` can use the fast path into this engine."""
        eng = self._eng
        if not isinstance(caps, dict) or caps.get("host") != eng._host:
            return False
        listed = caps.get("transports")
        theirs = listed if isinstance(listed, list) else []
        if eng._cuda:
            return (eng._ipc_handle is not None and caps.get("cuda") is True and "ipc" in theirs
                    and eng._cfg.transport in ("auto", "ipc"))
        return eng._shm_arena is not None and "shm" in theirs

    # ------------------------------------------------------------------ consumer side
    def offer(self, sess: _Session) -> dict[str, Any] | None:
        """At a same-host peer's hello (I/O thread): a lease of our pool and a channel, or None."""
        eng = self._eng
        if not self.can_offer(sess.caps) or eng._closed:
            return None
        have = self.rx.get(sess.ident)
        if have is not None:  # asked again: the same offer while it is not taken, never a second lease
            return None if have.accepted else have.offer
        if sess.ident in self._no_offer:  # its offer was withdrawn or refused: the ordinary path it is
            return None
        # Leases (live, and ended ones still quarantined) never hold more than half the pool, however
        # many same-host peers ask: the ordinary path, and the credit it grants, keep the other half.
        cap = eng._pool.capacity
        want = min(eng._cfg.effective_credit_bytes, cap // 2)
        if want < MIN_LEASE and cap >= 2 * MIN_LEASE:
            want = MIN_LEASE
        left = cap // 2 - self._lease_bytes()
        size = min(want, left)
        size -= size % 256
        if size <= 0 or (size < want and size < MIN_LEASE):
            log.info("fast-path leases hold half the pool already: %s uses the ordinary path", sess)
            return None
        lease = eng._pool.try_alloc(size)
        if lease is None:
            log.info("no pool room for a fast-path lease for %s: it uses the ordinary path", sess)
            return None
        try:
            chan = ShmChannel.create()
            self._ensure_bell()
        except (OSError, P2pkvError) as exc:
            lease.release()
            log.warning("cannot make a shared-memory channel for %s: %s", sess, exc)
            return None
        rx = FastRx(sess.ident, sess.eid, chan, lease, eng._pool.arena, eng._cfg.max_message_bytes,
                    4 * eng._cfg.timeout_s)
        rx.on_landed = self._count_landed
        with self._lock:
            old = self.rx.pop(sess.ident, None)
            self.rx[sess.ident] = rx
            self._rx_list = list(self.rx.values())
        if old is not None:
            self._end_rx(old, PeerLost("peer said hello again"))
        eng._stats.add("fast_leases")
        rx.offer = {"chan": chan.locator(), "lease": [lease.offset, lease.size], "bell": self._bell_name}
        rx.t_offered = time.monotonic()
        return rx.offer

    def _lease_bytes(self) -> int:
        return sum(rx.lease_size for rx in self.rx.values()) + sum(rx.lease_size for _, rx in self._quarantine)

    def _ensure_bell(self) -> None:
        if self._bell is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            name = f"\0p2pkv-bell-{os.getpid()}-{secrets.token_hex(12)}"
            s.bind(name)
            s.setblocking(False)
            self._bell = s
            self._bell_name = name[1:]
            self._eng._poller.register(s.fileno(), 1)  # zmq.POLLIN

    def drain_bell(self) -> None:
        s = self._bell
        if s is None:
            return
        try:
            while True:
                s.recv(64)
        except (BlockingIOError, OSError):
            pass
        for peer in list(self._eng._peers.values()):  # a consumer may have rung: verdicts to read
            if peer.fast is not None and peer.fast.reqs:
                peer.fast.check_all()

    def _ringer(self, addr: str) -> Any:
        if self._bell_out is None:
            self._bell_out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._bell_out.setblocking(False)
        out = self._bell_out

        def ring() -> None:
            try:
                out.sendto(b"r", addr)
            except OSError:
                pass  # full or gone: the other side's own polling still finds the work

        return ring

    def on_fast_msg(self, sess: _Session, msg: dict[str, Any]) -> None:
        """The producer's answer to our offer (I/O thread)."""
        rx = self.rx.get(sess.ident)
        if rx is None or rx.accepted:
            if rx is None and msg.get("ok") is True:  # too late: tell it to stop using what it mapped
                self._eng._reply(sess.ident, "fo", no="the fast-path offer was withdrawn (not taken in time)")
            return
        if msg.get("ok") is True:
            bell = msg.get("bell")
            if isinstance(bell, str) and bell.startswith("p2pkv-bell-") and len(bell) <= 100:
                rx.ring_producer = self._ringer("\0" + bell)
            rx.accepted = True
            return
        log.info("%s did not take the fast path: %s", sess, str(msg.get("msg", ""))[:200])
        self._withdraw(rx, PeerLost("the producer refused the fast path"))

    def _withdraw(self, rx: FastRx, err: P2pkvError) -> None:
        """End an offer that was refused or never taken (I/O thread); that session is not offered another."""
        with self._lock:
            self.rx.pop(rx.ident, None)
            self._rx_list = list(self.rx.values())
        self._no_offer.add(rx.ident)
        self._end_rx(rx, err, quarantine=False)

    def poll(self) -> None:
        """Read every channel and deliver what it announced (any thread; cheap when idle)."""
        rxs = self._rx_list
        if not rxs:
            return
        if not self._poll_lock.acquire(blocking=False):
            return  # another thread is reading: it delivers for us too
        more = False
        try:
            for rx in rxs:
                if not rx.accepted or rx.closed or not rx.chan.pending_records():
                    continue
                incs, bad = rx.drain()
                refused = bool(bad)
                for inc in incs:
                    refused = not self._deliver(rx, inc) or refused
                for seq, err in bad:
                    self._refuse(rx, seq, err)
                if refused:
                    rx.ring_producer()  # a refusal: the producer learns at once (acceptances it reads itself)
                if not rx.closed and rx.chan.pending_records():
                    more = True
        finally:
            self._poll_lock.release()
        if more:  # what one call may read was read: the I/O thread comes back for the rest at once
            self._wake_self()

    def _wake_self(self) -> None:
        if self._bell_name:
            try:
                self._ringer("\0" + self._bell_name)()
            except OSError:
                pass

    def spin(self, delta: int) -> None:
        """A thread of ours starts (+1) or stops (-1) polling the channels: producers need not ring us."""
        with self._lock:
            self._spinning += delta
            n = self._spinning
            rxs = self._rx_list
        for rx in rxs:
            if not rx.closed:
                rx.chan.set_waiters(n)

    def _deliver(self, rx: FastRx, inc: FastIncoming) -> bool:
        """One record into the index, O(1) in the number of tensors (refused whole if it cannot be taken)."""
        eng = self._eng
        tid = inc.transfer_id
        err = eng._inbox.tid_error(tid)
        if err is not None and not isinstance(err, TransferAborted):
            err = None  # a lost sender of earlier data does not refuse new data
        if err is None:
            with self._lock:
                dup = self._held_name(tid, inc.layout.names)
                if dup is not None:
                    err = DuplicateKey("data for this key is already waiting or on its way", key=f"{tid}/{dup}")
                if err is None:
                    held = eng._inbox.names_of(tid)
                    if held and held & inc.layout.nameset:
                        err = DuplicateKey("data for this key is already waiting unclaimed",
                                           key=f"{tid}/{min(held & inc.layout.nameset)}")
                if err is None:
                    self._add_locked(tid, inc)
        if err is not None:
            inc.unlist()
            rx.verdict(inc, err)
            self._refuse(rx, inc.seq, err)
            return False
        eng._inbox.expect(tid, rx.ident)
        rx.verdict(inc, None)
        eng._stats.add("requests_received_fast")
        return True

    def _count_landed(self, n: int, nbytes: int) -> None:
        """Tensors of a request that landed through the channel (any thread), counted once each."""
        self._eng._stats.add("tensors_received", n)
        self._eng._stats.add("bytes_received", nbytes)

    def _refuse(self, rx: FastRx, seq: int, err: P2pkvError) -> None:
        eng = self._eng
        eng._stats.add("fast_refused")
        if isinstance(err, ProtocolError):
            log.warning("fast-path header from %s refused: %s", rx.eid, err.message)
        eng._submit(("fast_ferr", rx.ident, seq, err), force=True)

    def note_offer(self, tid: str, specs: list[ItemSpec], sess: bytes = b"") -> OfferRecord:
        """An ordinary offer was accepted (I/O thread): remember its layout for recv_request."""
        rec = OfferRecord(tid, specs, sess)
        with self._lock:
            self._held_name(tid, rec.names, stop=False)  # supersedes dead same-host requests of these names
            self._list_offer_locked(rec)
        return rec

    def give_back(self, rec: Any, taken: list[str], keep_ref: bool = False) -> bool:
        """A ``recv_request`` handle that failed before handing anything out (its own deadline, names the
        request lacks, outs that do not fit) returns the request it took, so that a later ``recv_request``
        or ``recv`` can still take it. False (the handle keeps it, and releases it) when the request can no
        longer be taken: it failed, was aborted or evicted, or another request holds its names now.
        ``keep_ref``: the handle gives back only ``taken`` of a same-host record and keeps its reference (the
        caller holds views of the rest)."""
        with self._lock:
            tid = rec.transfer_id
            if isinstance(rec, FastIncoming):
                indexed = rec in self._index.get(tid, ())
                if not indexed and self._held_name(tid, rec.layout.names) is not None:
                    return False
                if not rec.give_back(taken, keep_ref):
                    return False
                if not indexed:
                    self._add_locked(tid, rec)
                return True
            if rec.listed or rec.dead or self._held_name(tid, rec.names) is not None:
                return False
            self._list_offer_locked(rec)
            return True

    def _list_offer_locked(self, rec: OfferRecord) -> None:
        self._add_locked(rec.transfer_id, rec, cap=False)
        rec.listed = True
        mine = self._sess_recs.setdefault(rec.sess, {})
        mine[rec] = None
        self._n_records += 1
        if len(mine) > _MAX_SESSION_RECORDS:  # the session pays with its own oldest record
            self._evict_record_locked(next(iter(mine)))
        if self._n_records > _MAX_RECORDS:
            # over the total: the session holding the most pays (never one holding fewer, e.g. honest)
            heaviest = max(self._sess_recs.values(), key=len)
            self._evict_record_locked(next(iter(heaviest)))
        self._cap_tids_locked()

    def _evict_record_locked(self, rec: OfferRecord) -> None:
        self._records_dropped += 1
        self._drop_record_locked(rec)

    def drop_offer(self, rec: OfferRecord) -> None:
        """The request of ``rec`` failed before it completed (I/O thread): a recv_request must never bind
        it (its producer's retry, or another producer, may send the transfer id again)."""
        with self._lock:
            rec.dead = True
            self._drop_record_locked(rec)

    def _drop_record_locked(self, rec: OfferRecord) -> None:
        if not rec.listed:
            return  # taken, or gone already
        tid = rec.transfer_id
        lst = self._index.get(tid)
        if lst is not None:
            lst[:] = [r for r in lst if r is not rec]
            if not lst:
                self._pop_tid_locked(tid)
        self._drop_locked(tid, rec)
        self._unlist_record_locked(rec)

    def _unlist_record_locked(self, rec: Any) -> None:
        if not isinstance(rec, OfferRecord) or not rec.listed:
            return
        rec.listed = False
        self._n_records -= 1
        mine = self._sess_recs.get(rec.sess)
        if mine is not None:
            mine.pop(rec, None)
            if not mine:
                del self._sess_recs[rec.sess]

    # ------------------------------------------------------------------ the index (under self._lock)
    def _add_locked(self, tid: str, rec: Any, cap: bool = True) -> None:
        lst = self._index.get(tid)
        if lst is None:
            lst = self._index[tid] = []
        lst.append(rec)
        self._index.move_to_end(tid)
        held = self._holders.setdefault(tid, {})
        for nm in _names_of(rec):
            held.setdefault(nm, []).append(rec)
        if cap:
            self._cap_tids_locked()

    def _cap_tids_locked(self) -> None:
        while len(self._index) > _MAX_RECORDS:
            old_tid, old = self._index.popitem(last=False)
            self._holders.pop(old_tid, None)
            for r in old:
                if isinstance(r, FastIncoming):
                    r.unlist()
                else:
                    self._unlist_record_locked(r)

    def _drop_locked(self, tid: str, rec: Any) -> None:
        """``rec`` holds its names no more (taken whole, or superseded)."""
        held = self._holders.get(tid)
        if held is None:
            return
        for nm in _names_of(rec):
            hs = held.get(nm)
            if hs is not None:
                hs[:] = [h for h in hs if h is not rec]
                if not hs:
                    del held[nm]
        if not held:
            del self._holders[tid]

    def _pop_tid_locked(self, tid: str) -> list[Any]:
        self._holders.pop(tid, None)
        recs = self._index.pop(tid, [])
        for r in recs:
            self._unlist_record_locked(r)
        return recs

    def _held_name(self, tid: str, names: tuple[str, ...], stop: bool = True) -> str | None:
        """A name of ``names`` that a request in the index holds (O(len(names))), or None. A same-host
        request that can no longer land (its producer was lost, its deadline passed) holds nothing:
        it is dropped, so that the producer's retry (or another producer) can send those names again.
        ``stop=False``: look at every name (to drop such requests) and return None."""
        held = self._holders.get(tid)
        for nm in names:
            hs = held.get(nm) if held else None
            if not hs:
                continue
            for h in list(hs):
                if isinstance(h, FastIncoming) and (not h.listed or h.failed() is not None):
                    h.unlist()  # its room goes back once nothing of it is held
                    self._drop_locked(tid, h)
                    continue
                if stop:
                    return nm
                break
            held = self._holders.get(tid)
        return None

    def take_record(self, tid: str, names: list[str] | None) -> tuple[Any, list[str] | None] | None:
        """Take a request of ``tid`` whole (or ``names`` of it): ``(record, names taken)``, or None.

        Raises :class:`InvalidKey` when ``names`` lists a tensor that no request of ``tid`` in the index
        holds (nothing is taken then): waiting for it could only time out."""
        with self._lock:
            lst = self._index.get(tid)
            if not lst:
                return None
            if names is not None:
                want = set(names)
                known = [set(_names_of(r)) for r in lst]
                if not any(want <= k for k in known):
                    held = set().union(*known)
                    missing = sorted(want - held)
                    if missing:
                        raise InvalidKey(f"names lists {names_note(missing)}, which request {tid} does not hold "
                                         f"(it holds {len(held)} tensors)", key=tid)
            for i, rec in enumerate(lst):
                if isinstance(rec, FastIncoming):
                    taken = rec.take(names)
                    if taken is None:
                        continue
                    if not rec.listed:
                        del lst[i]
                        self._drop_locked(tid, rec)
                else:
                    if names is not None and not set(names) <= set(rec.names):
                        continue
                    del lst[i]
                    self._drop_locked(tid, rec)
                    self._unlist_record_locked(rec)
                    taken = None
                if not lst:
                    self._pop_tid_locked(tid)
                return rec, taken
        return None

    def claim_key(self, key: TransferKey) -> Slot | None:
        """Take one tensor of a same-host request by key (``recv``/``claim``), if it was announced."""
        with self._lock:
            lst = self._index.get(key.transfer_id)
            if not lst:
                return None
            for j, rec in enumerate(lst):
                if not isinstance(rec, FastIncoming) or key.name not in rec.avail:
                    continue
                if rec.take([key.name]) is None:
                    continue
                if not rec.listed:
                    del lst[j]
                    self._drop_locked(key.transfer_id, rec)
                    if not lst:
                        self._pop_tid_locked(key.transfer_id)
                break
            else:
                return None
        i = rec.layout.index[key.name]
        spec = rec.layout.specs[i]

        def ready() -> bool:
            if rec.landed(i):
                return True
            rec.check()
            return False

        return Slot(key, LeaseItem(rec, i), spec.dtype, spec.shape, rec.rx.ident, ready)

    def forget(self, tid: str) -> None:
        """``tid`` was aborted: its announced requests go (their room once nothing of them is held)."""
        with self._lock:
            recs = self._pop_tid_locked(tid)
        for rec in recs:
            if isinstance(rec, FastIncoming):
                rec.error = rec.error or TransferAborted("transfer aborted", key=tid)
                rec.unlist()

    def session_lost(self, sess: _Session, reason: str) -> None:
        """A session ended (I/O thread): its requests fail; its lease waits until nothing can write it."""
        self._no_offer.discard(sess.ident)
        with self._lock:
            rx = self.rx.pop(sess.ident, None)
            self._rx_list = list(self.rx.values())
        if rx is not None:
            self._end_rx(rx, PeerLost(f"sending peer {sess.eid} lost: {reason}"),
                         quarantine=reason != "peer closed its engine")

    def _end_rx(self, rx: FastRx, err: P2pkvError, quarantine: bool = True) -> None:
        rx.lost = err
        rx.close()
        # a producer that is only silent may still be copying into the lease: keep it out of the pool
        # for a while; one that said goodbye (or refused, or never took the offer) writes nothing there
        until = time.monotonic() + (self._eng._cfg.timeout_s if quarantine and rx.accepted else 0.0)
        self._quarantine.append((until, rx))

    def tick(self, now: float) -> None:
        """Timers (I/O thread): deadlines of stream waits, offers never taken, old index entries,
        quarantined leases."""
        for rx in self._rx_list:
            if rx.waits:
                rx.release_waits(now)
            if not rx.accepted and now - rx.t_offered > self._eng._cfg.timeout_s:
                log.info("fast-path offer to %s withdrawn: not taken within %.3gs", rx.eid, self._eng._cfg.timeout_s)
                self._withdraw(rx, PeerLost("the fast-path offer was not taken in time"))
        if self._quarantine:
            keep = []
            for until, rx in self._quarantine:
                if until <= now and rx.held <= 0:
                    rx.lease.release()
                    rx.dispose()
                else:
                    keep.append((until, rx))
            self._quarantine = keep
        ttl = self._eng._cfg.ttl_s
        gone: list[Any] = []
        with self._lock:
            while self._index:
                tid, lst = next(iter(self._index.items()))
                if lst and lst[-1].t_arrived > now - ttl:
                    break
                gone.extend(self._pop_tid_locked(tid))
        for rec in gone:  # announced, never (wholly) taken: evicted like unclaimed data
            if isinstance(rec, FastIncoming) and rec.listed:
                names = list(rec.avail)
                rec.unlist()
                self._eng._inbox.note_evicted(rec.transfer_id, names)
                self._eng._stats.add("evicted", len(names))

    # ------------------------------------------------------------------ producer side
    def accept(self, peer: _Peer, info: Any) -> None:
        """The consumer's answer to our ``fq``: a lease and a channel, or why not (I/O thread)."""
        eng = self._eng
        if isinstance(info, dict) and "no" in info:
            log.info("fast path to %s not offered: %s", peer.addr, str(info["no"])[:200])
            if peer.fast is not None:  # withdrawn after we took it: the consumer reads that channel no more
                self.peer_lost(peer, PeerLost("the peer withdrew the fast path", peer=peer.addr))
            return
        try:
            if not isinstance(info, dict) or not isinstance(info.get("lease"), list) or len(info["lease"]) != 2:
                raise ProtocolError("malformed fast-path offer")
            off, size = info["lease"]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (off, size)) or \
                    size < 256 or off + size > int(peer.pool):
                raise ProtocolError("fast-path lease outside the peer's pool")
            bell = info.get("bell")
            if not isinstance(bell, str) or not bell.startswith("p2pkv-bell-") or len(bell) > 100:
                raise ProtocolError("malformed fast-path doorbell")
            if not self.can_offer(peer.caps) or (eng._cuda and peer.xport != "ipc"):
                raise TransportError("this engine does not use the fast path to that peer")
            chan = ShmChannel.open(info["chan"])
        except P2pkvError as exc:
            self._answer(peer, False, str(exc.message))
            return
        try:
            mover: Any
            if eng._cuda:
                arena = eng._peer_out_arena(peer)
                mover = CudaMover(eng._device, arena.tensor.data_ptr(), chan)
            else:
                mover = HostMover(self._peer_host_arena(peer), chan)
        except (P2pkvError, OSError, RuntimeError) as exc:
            chan.close()
            self._answer(peer, False, f"{type(exc).__name__}: {exc}"[:300])
            return
        try:
            self._ensure_bell()
        except OSError as exc:
            chan.close()
            mover.close()
            self._answer(peer, False, f"no doorbell: {exc}")
            return
        tx = FastTx(peer.addr, chan, off, size, mover, self._ringer("\0" + bell), self._on_done,
                    max_bytes=int(peer.maxmsg) or 2**62)
        old = peer.fast
        peer.fast = tx
        if old is not None:
            old.close(PeerLost("the peer restarted its session", peer=peer.addr))
        self._answer(peer, True, "")

    def _peer_host_arena(self, peer: _Peer) -> torch.Tensor:
        import mmap

        loc = peer.caps.get("shm")
        size = loc.get("size") if isinstance(loc, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size != int(peer.pool):
            raise ProtocolError("the peer offered no shared-memory arena of its pool's size")
        fd = open_memfd(loc, size, prefix="p2pkv-arena")
        try:
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        peer.shm_map = mm  # kept alive with the peer
        return torch.frombuffer(mm, dtype=torch.uint8)

    def _answer(self, peer: _Peer, ok: bool, why: str) -> None:
        from ..control.messages import encode

        if not ok:
            log.info("fast path to %s not used: %s", peer.addr, why)
        try:
            peer.sock.send(encode("fast", ok=ok, msg=why[:300], **({"bell": self._bell_name} if ok else {})))
            peer.last_tx = time.monotonic()
        except Exception:  # the peer is going away: its loss is handled elsewhere
            pass

    def _on_done(self, event: Any, callback: Any) -> None:
        w = self._done_watcher
        if w is None:
            w = self._done_watcher = Watcher(self._eng._device, name=f"p2pkv-fast-{self._eng.port}")
        w.add(event, callback)

    def start(self, peer_addr: str, req: RequestHandle) -> bool:
        """Try to send ``req`` by the fast path (the caller's thread). The first request to a same-host
        peer asks for the path (lease and channel) and goes the ordinary way itself."""
        peer = self._eng._peers.get(peer_addr)
        tx = peer.fast if peer is not None and peer.ready else None
        if tx is None:
            if peer is None or not peer.ready:
                self._wanted.add(peer_addr)  # asked for once the handshake is done (on_ready)
            elif not peer.fast_asked:
                self._eng._submit(("fast_ask", peer_addr))
            return False
        if tx.closed:
            return False
        if self._eng._inbox.aborted(req.transfer_id):
            return False  # the ordinary path fails it with the abort's error
        return tx.start(req)

    def on_ready(self, peer: _Peer) -> None:
        """The handshake with ``peer`` is done (I/O thread): ask for the fast path if a request wanted it."""
        if peer.addr in self._wanted:
            self._wanted.discard(peer.addr)
            self.ask(peer)

    def ask(self, peer: _Peer) -> None:
        """Ask ``peer`` for a lease and a channel (I/O thread), once, if it can be used at all."""
        if peer.fast_asked or peer.fast is not None or not peer.ready:
            return
        if not self.can_offer(peer.caps) or (self._eng._cuda and peer.xport != "ipc"):
            return
        from ..control.messages import encode

        peer.fast_asked = True
        peer.sock.send(encode("fq"))
        peer.last_tx = time.monotonic()

    def on_ferr(self, peer: _Peer, msg: dict[str, Any]) -> None:
        tx = peer.fast
        if tx is not None:
            tx.fail(msg["seq"], error_from_code(msg["code"], msg["msg"], peer=peer.addr))

    def abort_tid(self, tid: str, reason: str) -> None:
        for peer in list(self._eng._peers.values()):
            if peer.fast is not None:
                peer.fast.abort_tid(tid, reason)

    def stats(self) -> dict[str, int]:
        rxs = self._rx_list
        return {"leases": len(rxs), "lease_bytes": sum(rx.lease_size for rx in rxs),
                "held": sum(rx.held for rx in rxs), "records": self._n_records,
                "records_dropped": self._records_dropped,
                "quarantined_bytes": sum(rx.lease_size for _, rx in self._quarantine)}

    def peer_lost(self, peer: _Peer, err: P2pkvError) -> None:
        tx = peer.fast
        if tx is not None:
            peer.fast = None
            tx.close(err)

    def tick_tx(self, now: float) -> None:
        for peer in list(self._eng._peers.values()):
            if peer.fast is not None and peer.fast.reqs:
                peer.fast.check_all()  # also if a doorbell ring was lost
                peer.fast.tick(now)

    def close(self) -> None:
        """Engine close (after the I/O thread stopped)."""
        for peer in list(self._eng._peers.values()):
            self.peer_lost(peer, PeerLost("engine closed"))
        for rx in list(self.rx.values()):
            rx.lost = PeerLost("engine closed")
            rx.close()
            rx.lease.release()  # the pool itself goes now
            rx.dispose()
        for _, rx in self._quarantine:
            rx.lease.release()
            rx.dispose()
        self.rx.clear()
        self._rx_list = []
        self._quarantine = []
        if self._done_watcher is not None:
            self._done_watcher.close()
        for s in (self._bell, self._bell_out):
            if s is not None:
                s.close()
        self._bell = self._bell_out = None
