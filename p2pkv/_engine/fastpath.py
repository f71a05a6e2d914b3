"""The same-host fast path of whole requests: no message, no I/O thread, no grant on the way.

Between two engines of one host (CUDA IPC, or CPU engines with ``transport="shm"``) the
consumer gives the producer, once per session:

* a **lease**: a range of its pool that only this producer writes into, and
* a **channel** (:class:`~p2pkv.transport.shm.ShmChannel`): shared memory holding a header
  ring, a free ring and completion flags.

A request then costs the producer, on its own thread: picking room inside its lease (and
flag slots), one header record in the ring, and per tensor (or per batch of tensors) one
copy straight into the consumer's pool followed by a flag written behind it by the same
stream (``cuStreamWriteValue64``; a CPU store for CPU engines). The consumer learns of the
request by reading the ring and of each tensor's landing by reading its flag: no thread
hop, no host message, and its stream can wait for a flag (``cuStreamWaitValue64``) instead
of its host. When the consumer is done with a tensor it hands the range and flag back
through the free ring.

The first probe on one H200 (``benchmarks/probe_primitives.py``, ``probe_shm.py``) is why:
a ZMQ message between two processes took 0.4-0.6 ms, GPU work in both processes around a
transfer cost a context switch, and a flag written by the producer's GPU into shared host
memory was seen by the consumer's CPU as soon as the copy ended.

Trust: a same-host peer that maps our pool could write anywhere in it, whatever the
protocol says (CUDA IPC shares the whole allocation); what the consumer checks here keeps
an honest-but-buggy or replaying producer inside its lease and stops one request's data
from being taken for another's.

This module holds the two sides as objects with explicit interfaces: :class:`FastTx`
(producer, one per peer) with a mover (:class:`CudaMover` or :class:`HostMover`), and
:class:`FastRx` (consumer, one per session).
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import torch

from .. import _tensors as T
from ..errors import (P2pkvError, PeerLost, ProtocolError, TransferAborted, TransferTimeout, error_from_code)
from ..keys import TransferKey, validate_transfer_id
from ..pool import ALIGN, BufferLike, BufferPool, _Extents
from ..request import MAX_ITEMS, ItemSpec, RequestState
from ..transport.shm import NFLAGS, ShmChannel

if TYPE_CHECKING:
    from ..request import RequestHandle

log = logging.getLogger("p2pkv")

__all__ = ["FastTx", "FastRx", "FastIncoming", "FastLayout", "LeaseItem", "CudaMover", "HostMover",
           "flag_value", "MIN_LEASE"]

FLAG_SHIFT = 16          # flag value of item i of request seq: (seq << 16) | (i + 1); never 0
# Each request also has a verdict slot after its items' flags, written by the consumer once it has
# read the header: accepted, or refused with an error code (the reason text follows by message).
_ACCEPT = 0xFFFF
_REFUSE = 0x8000
_CODES = ("error", "config", "invalid_key", "invalid_tensor", "shape_mismatch", "timeout", "peer_lost", "protocol",
          "auth", "pool_exhausted", "aborted", "evicted", "duplicate_key", "closed", "invalid_address", "transport")
MIN_LEASE = 16 << 20     # a lease smaller than this is not worth a channel
# Header: s seq, t transfer id, L layout id, l the layout (when L is new or redefined), o where the
# request's room starts in the consumer's arena (its tensors lie back to back from there), f first
# flag slot, d seconds left before the producer's deadline. Layouts are cached on both sides, so a
# repeated layout costs the consumer O(1) whatever its number of tensors.
_HEADER_KEYS = frozenset({"s", "t", "L", "o", "f", "d"})
MAX_LAYOUTS = 64         # layout ids per channel (the producer evicts the least recently used)
DRAIN_RECORDS = 256      # header records read per channel and call (see FastRx.drain)
DRAIN_BYTES = 64 << 10
# How long closing a producer's path waits for copies callers are issuing into the consumer's memory right
# then (a host call for CUDA, a memcpy on CPU); past it the channel is left mapped rather than unmapped
# under a copy.
_CLOSE_WAIT_S = 10.0


def flag_value(seq: int, i: int) -> int:
    return (seq << FLAG_SHIFT) | (i + 1)


def verdict_value(seq: int, err: P2pkvError | None) -> int:
    if err is None:
        return (seq << FLAG_SHIFT) | _ACCEPT
    code = _CODES.index(err.code) if err.code in _CODES else 0
    return (seq << FLAG_SHIFT) | _REFUSE | code


def _fence() -> None:
    """A full memory barrier on this CPU (a lock's acquire/release): orders a copy before a flag."""
    with _FENCE:
        pass


_FENCE = threading.Lock()


# ----------------------------------------------------------------------------- ranges
class RangeSet:
    """Free ranges of ``[0, size)`` that can be taken at a given offset (the consumer's mirror of a lease)."""

    def __init__(self, size: int):
        self._starts = [0] if size else []
        self._ends = [size] if size else []

    def take_at(self, start: int, size: int) -> bool:
        """Take ``[start, start + size)`` if it lies inside one free range."""
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or size <= 0 or start + size > self._ends[i]:
            return False
        s, e = self._starts[i], self._ends[i]
        del self._starts[i], self._ends[i]
        if start + size < e:
            self._starts.insert(i, start + size)
            self._ends.insert(i, e)
        if s < start:
            self._starts.insert(i, s)
            self._ends.insert(i, start)
        return True

    def give(self, start: int, size: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        end = start + size
        if i > 0 and self._ends[i - 1] == start:  # merge with the range before
            i -= 1
            start = self._starts[i]
            del self._starts[i], self._ends[i]
        if i < len(self._starts) and self._starts[i] == end:  # and the one after
            end = self._ends[i]
            del self._starts[i], self._ends[i]
        self._starts.insert(i, start)
        self._ends.insert(i, end)

    def free_bytes(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))


# ----------------------------------------------------------------------------- layouts
class FastLayout:
    """A request layout as both sides of a channel use it: tensors back to back from one offset."""

    __slots__ = ("specs", "names", "index", "nameset", "sizes", "rel", "total", "n", "steps", "wire", "key",
                 "max_nbytes", "_tmpl")

    def __init__(self, specs: list[ItemSpec]):
        self.specs = specs
        self.names = tuple(s.name for s in specs)
        self.index = {nm: i for i, nm in enumerate(self.names)}
        self.nameset = frozenset(self.names)
        self.sizes = [BufferPool.footprint(s.nbytes) for s in specs]
        rel, off = [], 0
        for sz in self.sizes:
            rel.append(off)
            off += sz
        self.rel = rel
        self.total = off
        self.n = len(specs)
        self.steps = np.arange(1, self.n + 1, dtype=np.uint64)  # flag value = (seq << 16) | (i + 1)
        self.wire = [[sp.name, T.dtype_name(sp.dtype), list(sp.shape), sp.nbytes] for sp in specs]
        self.key = (self.names, tuple((sp.dtype, sp.shape) for sp in specs))
        self.max_nbytes = max((sp.nbytes for sp in specs), default=0)
        self._tmpl: Any = None

    def template(self) -> Any:
        """Its :class:`p2pkv.kernels.batch.CopyTemplate` (built on first use)."""
        if self._tmpl is None:
            from ..kernels.batch import CopyTemplate

            self._tmpl = CopyTemplate(self.rel, [sp.nbytes for sp in self.specs])
        return self._tmpl

    @classmethod
    def from_wire(cls, items: Any, max_bytes: int) -> FastLayout:
        if not isinstance(items, list) or not 0 < len(items) <= MAX_ITEMS:
            raise ProtocolError(f"a fast-path layout holds 1..{MAX_ITEMS} tensors")
        specs: list[ItemSpec] = []
        seen: set[str] = set()
        for it in items:
            if not isinstance(it, list) or len(it) != 4:
                raise ProtocolError("fast-path layout items are [name, dtype, shape, nbytes]")
            name, dt, sh, n = it
            if not isinstance(name, str) or name in seen:
                raise ProtocolError(f"fast-path item name {name!r:.60} is not a unique str")
            seen.add(name)
            TransferKey("x", name)  # validates the name
            spec = ItemSpec(name, T.dtype_from_name(dt), T.check_shape(sh))
            if isinstance(n, bool) or n != spec.nbytes or spec.nbytes > max_bytes:
                raise ProtocolError(f"fast-path item {name!r:.60}: bad size")
            specs.append(spec)
        return cls(specs)


# ----------------------------------------------------------------------------- producer
class CudaMover:
    """Moves bytes from this process's CUDA tensors into a same-host consumer's mapped arena."""

    def __init__(self, device: torch.device, arena_base: int, chan: ShmChannel):
        from ..kernels.batch import copier_for
        from ..transport import cudadrv

        cudadrv.use_device(device)
        self.device = device
        self.base = arena_base
        self.chan = chan
        chan.register_cuda()
        self.stream = torch.cuda.Stream(device)
        self._stream_ptr = int(self.stream.cuda_stream)
        self.copier = copier_for(device)
        self._memop = cudadrv.available()
        self._drv = cudadrv

    def move(self, items: list[tuple[torch.Tensor, int, int, int, int]], ready: Any) -> Any:
        """Copy ``(src, dst_offset, nbytes, flag_slot, flag_value)`` items; flags follow their copies.

        Runs on the caller's thread and never waits for the GPU: the copies are ordered after
        ``ready`` (the caller's stream when it handed the tensors over). Returns an event
        that completes when every copy and flag is done.
        """
        import cupy

        s = self.stream
        if ready is not None:
            s.wait_event(ready)
        if len(items) == 1:
            src, off, n, slot, value = items[0]
            if n:
                cupy.cuda.runtime.memcpyAsync(self.base + off, src.data_ptr(), n,
                                              cupy.cuda.runtime.memcpyDefault, s.cuda_stream)
            if self._memop:
                self._drv.write_value64(s, self.chan.flag_dev_addr(slot), value)
            else:
                self.copier.signal(self.chan.flag_dev_addr(slot), value, s)
        else:
            segs = [(src.data_ptr(), self.base + off, n) for src, off, n, _, _ in items if n]
            flags = [(self.chan.flag_dev_addr(slot), value) for _, _, _, slot, value in items]
            self.copier.copy(segs, s, flags=flags)
        ev = torch.cuda.Event()
        ev.record(s)
        return ev

    def move_all(self, req: RequestHandle, tensors: list[torch.Tensor], ptrs: list[int]) -> Any:
        """Every tensor of a started request (``ptrs``: their addresses, in the layout's order) in ONE
        launch that also writes their flags; ordered after the caller's current stream. Returns an
        event that completes when every copy and flag is done."""
        assert req.offs is not None and req.layout is not None  # set by FastTx.start
        lay = req.layout
        ev = self.copier.copy_request(ptrs, self.base + req.offs[0] - lay.rel[0], lay.template(),
                                      self.chan.flag_dev_addr(req.flag0), req.seq << FLAG_SHIFT,
                                      self.stream, self._stream_ptr)
        if ev is None:  # no driver launch here: the same copies and flags through CuPy
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            ev = self.move([(t, req.offs[i], req.specs[i].nbytes, req.flag0 + i, flag_value(req.seq, i))
                            for i, t in enumerate(tensors)], ready)
        return ev

    def close(self) -> None:
        try:
            self.stream.synchronize()  # nothing of ours may still write the consumer's memory or the flags
        except Exception as exc:  # pragma: no cover - a broken context
            log.warning("synchronizing an IPC copy stream failed: %s", exc)


class HostMover:
    """CPU engines: copies into a same-host consumer's arena, a shared memory file mapped here."""

    def __init__(self, arena: torch.Tensor, chan: ShmChannel):
        self.arena = arena
        self.base = arena.data_ptr()
        self.chan = chan

    def move(self, items: list[tuple[torch.Tensor, int, int, int, int]], ready: Any) -> Any:
        import ctypes

        flags = self.chan.flags
        for src, off, n, slot, value in items:
            if n:
                # one plain memcpy on this thread: torch's parallel copy would fight a spinning consumer
                # for the cores (measured: 64 MiB took 0.5 s instead of 20 ms on a loaded 2-core machine)
                ctypes.memmove(self.base + off, src.data_ptr(), n)
            _fence()  # the bytes before the flag, also on weakly ordered CPUs
            flags[slot] = value
        return None

    def close(self) -> None:
        pass


class FastTx:
    """The producer's side of the fast path to one peer (thread-safe: callers and the I/O thread)."""

    def __init__(self, peer_addr: str, chan: ShmChannel, lease_off: int, lease_size: int, mover: Any,
                 doorbell: Callable[[], None], on_done: Callable[[Any, Callable[[], None]], None],
                 max_bytes: int = 2**62):
        self.peer_addr = peer_addr
        self.max_bytes = max_bytes       # the consumer's max_message_bytes: a bigger tensor takes the ordinary path
        self.chan = chan
        self.lease_off = lease_off
        self.lease_size = lease_size
        self.mover = mover
        self._doorbell = doorbell
        self._on_done = on_done          # (event, callback): run callback once the event completed
        self.lock = threading.Lock()
        self._space = _Extents(lease_size)
        self._flags = _Extents(NFLAGS)
        self._seq = 0
        self._layout_ids: OrderedDict[Any, int] = OrderedDict()  # layout -> id the consumer knows it by
        self.reqs: dict[int, RequestHandle] = {}
        self._orphans: dict[int, int] = {}  # seq -> verdict slot of requests failed before their verdict
        # Room handed to requests and not handed back yet: start in the lease -> (size, first flag, flags).
        # The free ring is written by the consumer: only an entry that matches one of these exactly is
        # taken back (duplicates, overlaps and garbage there must not make us hand one range out twice).
        self._out: dict[int, tuple[int, int, int]] = {}
        self.bad_frees = 0
        self.closed = False
        self._moving = 0  # callers issuing copies into the consumer's memory (and flags) right now
        self._idle = threading.Condition(self.lock)  # notified when _moving drops to 0
        self.sent_requests = 0

    def _reclaim(self) -> None:
        """Take back the room the consumer handed back (under the lock). Raises ProtocolError if the
        free ring's positions are corrupt."""
        if not self.chan.frees_pending():
            return
        for off, size, f0, nf in self.chan.take_frees():
            rel = off - self.lease_off
            if self._out.get(rel) != (size, f0, nf):
                self.bad_frees += 1
                continue
            del self._out[rel]
            self._space.give(rel, size)
            self._flags.give(f0, nf)

    def start(self, req: RequestHandle, wait_s: float = 0.002) -> bool:
        """Place ``req`` in the lease and announce it; False when it does not fit (the caller then
        takes the ordinary path). Runs on the caller's thread. When the lease is full only because
        the consumer has not handed room back yet, waits up to ``wait_s`` for it."""
        lay = req.layout
        if lay is None:
            lay = req.layout = FastLayout(req.specs)
        total = lay.total
        n = lay.n
        if total > self.lease_size or n + 1 > NFLAGS or lay.max_nbytes > self.max_bytes:
            return False  # the ordinary path takes it (and reports what the consumer thinks of it)
        give_up = time.monotonic() + min(wait_s, max(0.0, req.deadline - time.monotonic()))
        broken: ProtocolError | None = None
        while True:
            with self.lock:
                if self.closed:
                    return False
                try:
                    self._reclaim()
                except ProtocolError as exc:
                    broken = exc
                    break
                start = self._space.take(total)
                f0 = self._flags.take(n + 1) if start is not None else None  # + the verdict slot
                if start is not None and f0 is None:
                    self._space.give(start, total)
                    start = None
                if start is not None:
                    break
            if time.monotonic() >= give_up:
                return False
            time.sleep(2e-5)
        if broken is not None:  # the consumer scribbled over its side of the channel: stop using it
            log.warning("fast path to %s closed: %s", self.peer_addr, broken.message)
            self.close(ProtocolError(f"the fast path's channel is corrupt: {broken.message}", peer=self.peer_addr))
            return False
        assert start is not None and f0 is not None  # the loop above ends with both taken or returns
        with self.lock:
            key = lay.key
            lid = self._layout_ids.get(key)
            hdr: dict[str, Any] = {"s": self._seq + 1, "t": req.transfer_id, "L": lid, "o": self.lease_off + start,
                                   "f": f0, "d": max(0.0, req.deadline - time.monotonic())}
            if lid is None:
                lid = len(self._layout_ids) if len(self._layout_ids) < MAX_LAYOUTS else \
                    next(iter(self._layout_ids.values()))  # the least recently used id, redefined
                hdr["L"] = lid
                hdr["l"] = lay.wire
            rec = msgpack.packb(hdr, use_bin_type=True)
            if not self.chan.put_record(rec):
                self._space.give(start, total)
                self._flags.give(f0, n + 1)
                return False
            if "l" in hdr:  # only once the consumer is sure to see the definition
                for k in [k for k, v in self._layout_ids.items() if v == lid]:
                    del self._layout_ids[k]
            self._layout_ids[key] = lid
            self._layout_ids.move_to_end(key)
            self._out[start] = (total, f0, n)
            self._seq += 1
            seq = self._seq
            base = self.lease_off + start
            req.seq = seq
            req.offs = [base + r for r in lay.rel]
            req.flag0 = f0
            req.x = "fast"
            req._fast = self
            req.granted = True
            self.reqs[seq] = req
            self.sent_requests += 1
        req._set(RequestState.GRANTED)
        if not self.consumer_waiting():
            self._doorbell()  # nobody polls the channel over there right now: wake its I/O thread
        return True

    def consumer_waiting(self) -> bool:
        return self.chan.waiters() > 0

    def send(self, req: RequestHandle, idxs: list[int], tensors: list[torch.Tensor], ready: Any) -> None:
        """Move items ``idxs`` of a started request (the caller's thread; never blocks on the GPU)."""
        assert req.offs is not None  # set by start()
        items = [(t, req.offs[i], req.specs[i].nbytes, req.flag0 + i, flag_value(req.seq, i))
                 for i, t in zip(idxs, tensors, strict=True)]
        self._begin_move(req)
        try:
            ev = self.mover.move(items, ready)
        finally:
            self._end_move()
        complete = False
        with req.lock:
            req.keep.extend(tensors)
            req.last_event = ev
            req.next_post += len(idxs)
            complete = req.next_post >= len(req.specs)
        if complete and ev is None:
            self.copied(req)  # CPU copies are done already
        # CUDA: finished when asked (done/state/wait poll the last copy's event) or at the I/O thread's tick,
        # not by a thread woken per request (each wake-up took the GIL from the caller's next request)

    def send_all(self, req: RequestHandle, tensors: list[torch.Tensor], ptrs: list[int]) -> None:
        """Move every tensor of a started request in one launch (CUDA; the caller's thread)."""
        self._begin_move(req)
        try:
            ev = self.mover.move_all(req, tensors, ptrs)
        finally:
            self._end_move()
        with req.lock:
            req.keep.extend(tensors)
            req.last_event = ev
            req.next_post = len(req.specs)

    def _begin_move(self, req: RequestHandle) -> None:
        """A caller is about to issue copies into the consumer's memory: :meth:`close` waits for it to
        finish issuing them before it unmaps anything (else a copy or flag write would land in memory
        unmapped under it: a raw error on CPU, an illegal address that kills the CUDA context on a GPU).

        Raises
        ------
        PeerLost
            The path is closed.
        """
        with self.lock:
            if self.closed:
                raise PeerLost("the fast path to the peer was closed", key=req.transfer_id, peer=self.peer_addr)
            self._moving += 1

    def _end_move(self) -> None:
        with self.lock:
            self._moving -= 1
            if not self._moving:
                self._idle.notify_all()

    def poll(self, req: RequestHandle) -> None:
        """Finish ``req`` if its copies are done and the consumer took it (any thread; cheap)."""
        if req.done_polled():
            return
        if not req.acked and req.next_post >= len(req.specs):
            ev = req.last_event
            if ev is None or ev.query():
                req.keep = []
                req.acked = True
        if req.acked:
            self.check(req)

    def copied(self, req: RequestHandle) -> None:
        """Every copy of ``req`` is done (the watcher thread): DONE once the consumer accepted it too."""
        req.keep = []
        req.acked = True  # here: its bytes are all in the consumer's memory
        self.check(req)

    def check(self, req: RequestHandle) -> None:
        """Finish ``req`` if its copies are done and the consumer's verdict is in (any thread)."""
        flags = self.chan.flags
        if flags is None or req.done_polled():
            return
        v = int(flags[req.flag0 + len(req.specs)])
        if v >> FLAG_SHIFT != req.seq:
            return  # not read by the consumer yet
        with self.lock:
            if self.reqs.get(req.seq) is not req:
                return
            if v & 0xFFFF == _ACCEPT and not req.acked:
                return  # accepted, still copying
            self.reqs.pop(req.seq, None)
            self._flags.give(req.flag0 + len(req.specs), 1)  # the verdict is read: its slot is ours again
        if v & 0xFFFF == _ACCEPT:
            if req._set(RequestState.DONE):
                eng = req._engine
                eng._stats.add("requests_done")
                eng._stats.observe("request", time.monotonic() - req.t_start)
            return
        code = _CODES[v & 0x7FFF] if (v & 0x7FFF) < len(_CODES) else "error"
        err = error_from_code(code, "the receiver refused the request", key=req.transfer_id, peer=self.peer_addr)
        if req._set(RequestState.ABORTED if isinstance(err, TransferAborted) else RequestState.FAILED, err):
            req._engine._stats.add("requests_failed")

    def check_all(self) -> None:
        """Look at every request waiting for its copies or verdict (the I/O thread: its tick, or the bell)."""
        with self.lock:
            reqs = list(self.reqs.values())
            flags = self.chan.flags
            if self._orphans and flags is not None:  # verdicts of requests we gave up on: free their slots
                for seq, slot in list(self._orphans.items()):
                    if int(flags[slot]) >> FLAG_SHIFT == seq:
                        del self._orphans[seq]
                        self._flags.give(slot, 1)
        for r in reqs:
            self.poll(r)

    def fail(self, seq: int, err: P2pkvError) -> None:
        with self.lock:
            req = self.reqs.pop(seq, None)
            if req is not None and len(self._orphans) < NFLAGS:
                self._orphans[seq] = req.flag0 + len(req.specs)  # its verdict slot, freed once written
            if req is not None and isinstance(err, ProtocolError) and req.layout is not None:
                # the consumer could not read its header: the next request of this layout defines it again
                self._layout_ids.pop(req.layout.key, None)
        state = RequestState.ABORTED if isinstance(err, TransferAborted) else RequestState.FAILED
        if req is not None and req._set(state, err):
            req._engine._stats.add("requests_failed")

    def abort_tid(self, tid: str, reason: str) -> None:
        """Fail this path's requests of ``tid`` as aborted (the consumer is told by the abort message)."""
        with self.lock:
            reqs = [r for r in self.reqs.values() if r.transfer_id == tid]
            for r in reqs:
                self.reqs.pop(r.seq, None)
        for r in reqs:
            if r._set(RequestState.ABORTED, TransferAborted(reason, key=tid, peer=self.peer_addr)):
                r._engine._stats.add("requests_failed")

    def tick(self, now: float) -> None:
        with self.lock:
            late = [r for r in self.reqs.values() if r.deadline < now]
        for r in late:
            what = "not every tensor was handed over" if r.next_post < len(r.specs) else \
                "the receiver never took it" if r.acked else "its copies did not finish"
            self.fail(r.seq, TransferTimeout(f"request did not complete within its deadline ({what})",
                                             key=r.transfer_id, peer=self.peer_addr))

    def close(self, err: P2pkvError) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            reqs, self.reqs = list(self.reqs.values()), {}
            end = time.monotonic() + _CLOSE_WAIT_S
            while self._moving and time.monotonic() < end:  # copies being issued right now: let them be queued
                self._idle.wait(max(0.0, end - time.monotonic()))
            busy = self._moving
        self.mover.close()  # CUDA: waits for every copy queued, those just issued included
        for r in reqs:
            if r._set(RequestState.FAILED, err.__class__(err.message, key=r.transfer_id, peer=self.peer_addr)):
                r._engine._stats.add("requests_failed")
        if busy:  # pragma: no cover - a copy still issuing after _CLOSE_WAIT_S: leave its memory mapped
            log.warning("fast path to %s closed with %d copies still being issued; its channel stays mapped",
                        self.peer_addr, busy)
            return
        self.chan.close()


# ----------------------------------------------------------------------------- consumer
class LeaseItem(BufferLike):
    """One tensor of a fast-path request, taken on its own (``recv``/``claim`` by key): a pool-buffer look-alike.

    Releasing it drops one reference on its request; the request's room goes back to the
    producer once nothing of it is held.
    """

    __slots__ = ("_inc", "offset", "size", "nbytes", "_data", "_released", "overflow", "__weakref__")

    def __init__(self, inc: FastIncoming, i: int):
        self._inc = inc
        self.offset = inc.base + inc.layout.rel[i]
        self.size = inc.layout.sizes[i]
        self.nbytes = inc.layout.specs[i].nbytes
        self._data = inc.rx.arena[self.offset:self.offset + self.nbytes]
        self._released = False
        self.overflow = False

    @property
    def data(self) -> torch.Tensor:
        if self._released:
            raise P2pkvError("buffer used after release")
        return self._data

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._data = torch.empty(0, dtype=torch.uint8)
        self._inc.unref()

    def __repr__(self) -> str:
        return f"<LeaseItem {self.nbytes}B offset={self.offset} {'released' if self._released else 'held'}>"


class FastIncoming:
    """One request announced through a channel: its layout, where its room starts, and its flags.

    It is delivered whole (one record, whatever its number of tensors): :class:`~p2pkv.RecvRequest`
    takes it whole, ``recv``/``claim`` by key take single tensors (:class:`LeaseItem`). Its room
    goes back to the producer, in one piece, once it is out of the index and nothing of it is held.
    """

    __slots__ = ("rx", "seq", "transfer_id", "layout", "base", "flag0", "deadline", "error", "t_arrived",
                 "values", "avail", "refs", "listed", "freed", "gone", "counted", "_lock", "__weakref__")

    def __init__(self, rx: FastRx, seq: int, tid: str, layout: FastLayout, base: int, flag0: int, deadline: float):
        self.rx = rx
        self.seq = seq
        self.transfer_id = tid
        self.layout = layout
        self.base = base
        self.flag0 = flag0
        self.deadline = deadline
        self.error: P2pkvError | None = None
        self.t_arrived = time.monotonic()
        self.values = layout.steps | np.uint64(seq << FLAG_SHIFT)
        self.avail: set[str] = set(layout.names)  # not yet taken by anyone
        self.refs = 0                             # holders (a RecvRequest, LeaseItems)
        self.listed = True                        # still in the index (takeable)
        self.freed = False
        self.gone = False                         # out of the index for good (evicted, aborted, refused, ...)
        self.counted = False                      # its landed tensors are counted in the receiver's stats
        self._lock = threading.Lock()

    @property
    def specs(self) -> list[ItemSpec]:
        return self.layout.specs

    @property
    def keys(self) -> list[TransferKey]:
        return [TransferKey(self.transfer_id, n) for n in self.layout.names]

    def landed(self, i: int) -> bool:
        flags = self.rx.chan.flags
        if flags is None:  # the channel closed
            return False
        if int(flags[self.flag0 + i]) == int(self.values[i]):
            _fence()  # reads of the tensor come after the flag's, also on weakly ordered CPUs
            return True
        return False

    def all_landed(self) -> bool:
        flags = self.rx.chan.flags
        if flags is None:
            return False
        if np.array_equal(flags[self.flag0:self.flag0 + self.layout.n], self.values):
            _fence()
            if not self.counted:
                self.count_landed()
            return True
        return False

    def count_landed(self) -> None:
        """Count its tensors that landed in the receiver's stats, once (the first time every one was seen
        landed, else when its room goes back: whatever landed by then)."""
        with self._lock:
            if self.counted:
                return
            self.counted = True
        count = self.rx.on_landed
        flags = self.rx.chan.flags
        if count is None or flags is None:
            return
        got = [i for i in range(self.layout.n) if int(flags[self.flag0 + i]) == int(self.values[i])]
        if got:
            count(len(got), sum(self.layout.specs[i].nbytes for i in got))

    def check(self) -> None:
        """Raise the request's error once it can no longer land."""
        err = self.failed()
        if err is None and time.monotonic() > self.deadline and not self.all_landed():
            err = self.error = TransferTimeout("the producer's deadline passed before every tensor landed",
                                               key=self.transfer_id)
        if err is not None:
            raise err

    def failed(self) -> P2pkvError | None:
        if self.error is None and self.rx.lost is not None and not self.all_landed():
            return self.rx.lost
        return self.error

    def view(self, i: int) -> torch.Tensor:
        spec = self.layout.specs[i]
        off = self.base + self.layout.rel[i]
        raw = self.rx.arena[off:off + spec.nbytes]
        if raw.numel() == 0:
            return torch.empty(spec.shape, dtype=spec.dtype, device=raw.device)
        return raw.view(spec.dtype).view(spec.shape)

    def take(self, names: Any = None) -> list[str] | None:
        """Take tensors (all that are left, or ``names``, all or none); None if they are not all here."""
        with self._lock:
            if not self.listed:
                return None
            want = set(self.avail) if names is None else set(names)
            if not want or not want <= self.avail:
                return None
            self.avail -= want
            self.refs += 1
            if not self.avail:
                self.listed = False
            return [n for n in self.layout.names if n in want]

    def unref(self) -> None:
        with self._lock:
            self.refs -= 1
            free = self.refs <= 0 and not self.listed and not self.freed
            if free:
                self.freed = True
        if free:
            self.count_landed()
            self.rx.free_request(self)

    def give_back(self, names: list[str], keep_ref: bool = False) -> bool:
        """A taker that failed before using ``names`` returns them (and its reference, unless ``keep_ref``:
        it holds views of other tensors of it): takeable again. False when the request is out of the index
        for good or can no longer land."""
        with self._lock:
            if self.gone or self.freed or self.failed() is not None:
                return False
            self.avail |= set(names)
            self.listed = True
            if not keep_ref:
                self.refs -= 1
            return True

    def unlist(self) -> None:
        """Out of the index (evicted, aborted, refused, session over): free it once nothing of it is held."""
        with self._lock:
            self.gone = True
            self.listed = False
            self.avail.clear()
            free = self.refs <= 0 and not self.freed
            if free:
                self.freed = True
        if free:
            self.count_landed()
            self.rx.free_request(self)

    def __repr__(self) -> str:
        return f"<FastIncoming {self.transfer_id} seq={self.seq} {self.layout.n} items>"


class FastRx:
    """The consumer's side of the fast path from one session (thread-safe)."""

    def __init__(self, sess_ident: bytes, sess_eid: str, chan: ShmChannel, lease: Any, arena: torch.Tensor,
                 max_message_bytes: int, max_deadline_s: float):
        self.ident = sess_ident
        self.eid = sess_eid
        self.chan = chan
        self.lease = lease               # the pool Buffer that holds the lease
        self.lease_off = lease.offset
        self.lease_size = lease.size
        self.arena = arena
        self._maxmsg = max_message_bytes
        self._max_deadline_s = max_deadline_s
        self.lock = threading.Lock()
        self._space = RangeSet(self.lease_size)
        self._flags = RangeSet(NFLAGS)
        self._layouts: dict[int, FastLayout] = {}
        self.lost: P2pkvError | None = None
        self.accepted = False            # the producer opened the channel
        self.closed = False
        self.ring_producer: Callable[[], None] = lambda: None  # the producer's doorbell
        self.offer: dict[str, Any] = {}  # what the producer was offered (sent again if it asks again)
        self.t_offered = time.monotonic()  # an offer not taken within timeout_s is withdrawn
        self.waits: list[tuple[int, int, float, FastIncoming]] = []  # stream waits to release on failure
        self.held = 0                    # lease bytes held by delivered requests
        self._last_seq = 0               # headers must come in increasing sequence (no replays)
        self.requests_in = 0
        self.on_landed: Callable[[int, int], None] | None = None  # (tensors, bytes) that landed: the stats

    def drain(self) -> tuple[list[FastIncoming], list[tuple[int, P2pkvError]]]:
        """Read new header records: ``(requests, refusals)`` where a refusal is ``(seq, error)``.

        Reads at most :data:`DRAIN_RECORDS` records and about :data:`DRAIN_BYTES` bytes per call (a
        header can cost the consumer milliseconds: a new 2048-tensor layout), so that no thread, the
        I/O thread least of all, is held for long by a producer that floods its ring; the rest is read
        by the next call. A ring whose positions make no sense ends this channel (once).
        """
        if self.closed or not self.accepted:
            return [], []
        with self.lock:
            if self.closed:
                return [], []
            try:
                recs = self.chan.take_records(DRAIN_RECORDS, DRAIN_BYTES)
            except ProtocolError as exc:
                broken = exc
            else:
                out, bad = [], []
                for rec in recs:
                    try:
                        out.append(self._parse(rec))
                    except P2pkvError as exc:
                        bad.append((self._seq_of(rec), exc))
                return out, bad
        self.lost = broken
        self.close()  # requests not landed yet fail with this error; landed ones stay claimable
        return [], [(-1, broken)]

    @staticmethod
    def _seq_of(rec: bytes) -> int:
        try:
            m = msgpack.unpackb(rec, raw=False, max_array_len=16, max_map_len=8, max_str_len=64, max_bin_len=0)
            s = m.get("s") if isinstance(m, dict) else None
            return s if isinstance(s, int) and not isinstance(s, bool) and s >= 0 else -1
        except Exception:
            return -1

    def _parse(self, rec: bytes) -> FastIncoming:
        """Decode and check one header (under the lock); take its room and flags. O(1) for a known layout."""
        try:
            m = msgpack.unpackb(rec, raw=False, strict_map_key=True, max_array_len=MAX_ITEMS + 8, max_map_len=8,
                                max_str_len=8192, max_bin_len=0)
        except Exception as exc:
            raise ProtocolError(f"fast-path header is not valid msgpack: {type(exc).__name__}") from None
        if not isinstance(m, dict) or not m.keys() >= _HEADER_KEYS or not m.keys() <= _HEADER_KEYS | {"l"}:
            raise ProtocolError("fast-path header must be a map with fields s, t, L, o, f, d (and l)")
        seq, tid, lid, base, f0, dl = m["s"], m["t"], m["L"], m["o"], m["f"], m["d"]
        if not isinstance(lid, int) or isinstance(lid, bool) or not 0 <= lid < MAX_LAYOUTS:
            raise ProtocolError("fast-path header has a bad layout id")
        if "l" in m:  # a definition holds whatever else is wrong with this header: the producer counts on it
            # ... and one we refuse leaves the id undefined: a later header naming it must not be read
            # with the layout the id had before (the producer no longer means that one)
            self._layouts.pop(lid, None)
            lay = FastLayout.from_wire(m["l"], self._maxmsg)
            self._layouts[lid] = lay
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 < seq < 2**47:
            raise ProtocolError("fast-path header has a bad sequence number")
        if seq <= self._last_seq:  # a replayed header would pass off what its room holds now as that request
            raise ProtocolError(f"fast-path header seq {seq} is not after {self._last_seq} (replayed?)")
        tid = validate_transfer_id(tid)
        if "l" not in m:
            known = self._layouts.get(lid)
            if known is None:
                raise ProtocolError(f"fast-path header names layout {lid}, which was never defined")
            lay = known
        if not isinstance(f0, int) or isinstance(f0, bool) or not 0 <= f0 <= NFLAGS - lay.n - 1:
            raise ProtocolError("fast-path header names flags outside the channel")
        if not isinstance(dl, (int, float)) or isinstance(dl, bool) or not dl >= 0:
            raise ProtocolError("fast-path header has a bad deadline")
        if isinstance(base, bool) or not isinstance(base, int) or base % ALIGN:
            raise ProtocolError("fast-path header has a bad offset")
        rel = base - self.lease_off
        if rel < 0 or rel + lay.total > self.lease_size or not self._space.take_at(rel, lay.total):
            raise ProtocolError("fast-path header names room outside the producer's lease or already in use")
        if not self._flags.take_at(f0, lay.n + 1):
            self._space.give(rel, lay.total)
            raise ProtocolError("fast-path header names flags that are in use")
        self._last_seq = seq
        self.held += lay.total
        self.requests_in += 1
        return FastIncoming(self, seq, tid, lay, base, f0,
                            time.monotonic() + min(float(dl), self._max_deadline_s) + 0.25)

    def verdict(self, inc: FastIncoming, err: P2pkvError | None) -> None:
        """Tell the producer we took ``inc`` (or why not); its verdict slot is its own again."""
        with self.lock:
            if self.closed:
                return
            slot = inc.flag0 + inc.layout.n
            self.chan.flags[slot] = verdict_value(inc.seq, err)
            self._flags.give(slot, 1)

    def free_request(self, inc: FastIncoming) -> None:
        """A request's room and flags are free again (any thread): hand them back in one piece."""
        size = inc.layout.total
        with self.lock:
            self.held -= size
            if self.closed:
                return  # the lease goes back to the pool once nothing in it is held
            self._space.give(inc.base - self.lease_off, size)
            self._flags.give(inc.flag0, inc.layout.n)
            if not self.chan.put_free(inc.base, size, inc.flag0, inc.layout.n):  # holds every flag: cannot fill
                log.warning("fast-path free ring full; a lease range is lost until the session ends")

    def add_wait(self, slot: int, value: int, deadline: float, inc: FastIncoming) -> None:
        with self.lock:
            self.waits.append((slot, value, deadline, inc))

    def release_waits(self, now: float, force: bool = False) -> int:
        """Write the flags that streams wait for whose request failed or whose deadline passed (so no
        stream waits forever); forget waits whose flag was written. Returns how many were released."""
        n = 0
        with self.lock:
            keep = []
            flags = self.chan.flags
            for w in self.waits:
                slot, value, deadline, inc = w
                if flags is None:
                    continue
                if int(flags[slot]) == value:
                    continue
                if force or now > deadline or inc.failed() is not None:
                    if inc.error is None:
                        inc.error = TransferTimeout("the request's tensors did not land within its deadline",
                                                    key=inc.transfer_id) if now > deadline else inc.failed()
                    flags[slot] = value
                    n += 1
                    continue
                keep.append(w)
            self.waits = keep
        return n

    def close(self) -> None:
        """The session ended (the I/O thread): no more headers; stream waits are released. The channel
        stays mapped (landed requests stay claimable) until :meth:`dispose`."""
        self.release_waits(time.monotonic(), force=True)
        with self.lock:
            self.closed = True

    def dispose(self) -> None:
        """Unmap the channel (its lease went back to the pool)."""
        self.chan.close()
