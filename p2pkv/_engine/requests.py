"""Whole-request transfers (see :mod:`p2pkv.request`): the producer's offer/grant/post
machinery and the consumer's admission, landing and completion.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from typing import Any

import torch
import zmq

from .. import _tensors as T
from .. import _trace
from ..control.messages import encode
from ..errors import (DuplicateKey, InvalidKey, InvalidTensor,
                      P2pkvError, PeerLost, PoolExhausted, ProtocolError, TransferAborted,
                      TransferTimeout, TransportError, error_from_code)
from ..keys import TransferKey, validate_transfer_id
from ..pool import Buffer, BufferPool
from ..request import Incoming, ItemSpec, RequestHandle, RequestState, Watcher, offer_sizes, wire_items
from ..transport import tcp
from .state import (_ADMIT_SLICE, _IO_SHARE, _IPC_EVENTS, _LOCAL_EVENTS, _MAX_QUEUED_ITEMS, _MAX_QUEUED_OFFERS,
                    _OFFER_ITEMS_BURST,
                    _OFFER_ITEMS_PER_S, _LocalArena, _Peer, _local_arena, _Session, log)
from .base import _EngineBase


class _RequestPath(_EngineBase):
    """Mixin of :class:`p2pkv.Engine` (shares its state; see :mod:`p2pkv._engine.base`)."""

    def _request_send_many(self, req: RequestHandle, idxs: list[int], ts: list[torch.Tensor]) -> None:
        """``RequestHandle.send_many``: one launch on the fast path, else one send each (caller's thread)."""
        if req._fast is None:
            # refused whole before any is sent (one sent here and another refused could never be sent again)
            self._check_open()
            for t in ts:
                if t.device != self._device:
                    raise InvalidTensor(f"tensor is on {t.device}; this engine sends requests from {self._device}",
                                        key=req.transfer_id)
            with req.lock:
                for i in idxs:
                    if i in req.sent:
                        raise InvalidKey(f"{req.specs[i].name!r} was sent already", key=req.transfer_id)
            for i, t in zip(idxs, ts, strict=True):
                self._request_send(req, i, t)
            return
        self._fast_send(req, idxs, ts)

    def _one_launch_device(self, req: RequestHandle) -> int | None:
        """The device index whose tensors ``req`` moves in one launch (the same-host CUDA path), or None."""
        fast = req._fast
        if fast is None or not self._cuda or not hasattr(fast.mover, "move_all"):
            return None
        return self._device.index

    def _request_send_all(self, req: RequestHandle, ts: list[torch.Tensor], ptrs: list[int]) -> None:
        """``RequestHandle.send_all`` on the same-host CUDA path (tensors checked against the layout and
        the device, ``ptrs`` their addresses): ONE launch that copies them all and writes their flags."""
        self._fast_send(req, list(range(len(ts))), ts, ptrs)

    def _fast_send(self, req: RequestHandle, idxs: list[int], ts: list[torch.Tensor],
                   ptrs: list[int] | None = None) -> None:
        """Move tensors of a request on the same-host fast path (the caller's thread; never blocks on the GPU).
        With ``ptrs`` (every tensor of the request, already checked against the device, and their
        addresses) they go in the one launch of :meth:`FastTx.send_all`."""
        self._check_open()
        ready = None
        if ptrs is None:
            for t in ts:
                if t.device != self._device:
                    raise InvalidTensor(f"tensor is on {t.device}; this engine sends requests from {self._device}",
                                        key=req.transfer_id)
            if self._cuda:
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self._device))
        with req.lock:
            for i in idxs:
                if i in req.sent:
                    raise InvalidKey(f"{req.specs[i].name!r} was sent already", key=req.transfer_id)
            if req._state.finished:
                raise req._error or P2pkvError("request already finished", key=req.transfer_id)
            req.sent.update(idxs)
        try:
            if ptrs is None:
                req._fast.send(req, idxs, ts, ready)
            else:
                req._fast.send_all(req, ts, ptrs)
        except (P2pkvError, RuntimeError) as exc:  # a CUDA launch error, or the path closed under us
            err = exc if isinstance(exc, P2pkvError) else TransportError(f"fast-path copy failed: {exc}",
                                                                         key=req.transfer_id)
            req._fast.fail(req.seq, err)
            raise err from None
        self._stats.add("bytes_sent", req.nbytes if ptrs is not None else sum(req.specs[i].nbytes for i in idxs))
        self._stats.add("sent_fast", len(idxs))
        _trace.mark("req.posted", req.transfer_id)

    def _request_send(self, req: RequestHandle, i: int, t: torch.Tensor) -> None:
        """``RequestHandle.send``: runs on the caller's thread."""
        if req._fast is not None:
            self._fast_send(req, [i], [t])
            return
        self._check_open()
        if t.device != self._device:
            raise InvalidTensor(f"tensor is on {t.device}; this engine sends requests from {self._device}",
                                key=req.transfer_id)
        ready = None
        if t.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(t.device))
        else:
            t = T.as_bytes(t)
        with req.lock:
            if i in req.sent:
                raise InvalidKey(f"{req.specs[i].name!r} was sent already", key=req.transfer_id)
            if req._state.finished:
                raise req._error or P2pkvError("request already finished", key=req.transfer_id)
            req.sent.add(i)
            req.pending[i] = (t, ready)
            granted = req._state is RequestState.GRANTED
        if granted:
            peer = req._p
            if req.x == "tcp" or peer is None:
                self._submit(("oflush", req.peer))
            else:
                self._flush_requests(peer)

    def _cmd_offer(self, addr: str, req: RequestHandle) -> None:
        if isinstance(self._inbox.error_for(req.key(0)), TransferAborted):
            req._set(RequestState.ABORTED, TransferAborted("transfer aborted", key=req.transfer_id))
            return
        peer = self._get_peer(addr)
        req._p = peer
        peer.req_waiting.append(req)
        self._pump_offers(peer)

    def _request_over_peer(self, peer: _Peer, req: RequestHandle) -> InvalidTensor | None:
        """The error for a request with a tensor over the receiver's ``max_message_bytes`` (``peer`` is
        ready), or None. Each tensor travels as one message over TCP; one the receiver's ZMQ cannot take
        drops the whole connection there, so such a request is refused before it is offered."""
        limit = peer.maxmsg
        for s in req.specs:
            if s.nbytes > limit:
                return InvalidTensor(f"tensor {s.name!r:.60} of {s.nbytes} bytes exceeds the receiver's "
                                     f"max_message_bytes={limit}", key=req.transfer_id, peer=peer.addr)
        return None

    def _request_transport(self, peer: _Peer) -> str:
        if not self._cuda or peer.xport not in ("ipc", "nccl"):
            return "tcp"
        if peer.xport == "nccl" and self._is_self(peer):
            return "ipc"  # to ourselves: a copy inside our own arena
        return peer.xport

    def _pump_offers(self, peer: _Peer) -> None:
        """Send the offers waiting for the handshake (and, for NCCL, the communicator)."""
        if not peer.ready:
            return
        while peer.req_waiting:
            req = peer.req_waiting[0]
            if req.done():
                peer.req_waiting.popleft()
                continue
            too_big = self._request_over_peer(peer, req)
            if too_big is not None:  # would go out as a message the receiver's ZMQ drops the connection for
                peer.req_waiting.popleft()
                req._set(RequestState.FAILED, too_big)
                continue
            x = self._request_transport(peer)
            extra: dict[str, Any] = {}
            try:
                if x == "nccl":
                    comm = self._peer_comm(peer, "req")
                    if comm is None:
                        return  # initialising: the tick pumps again
                    req.comm = comm
                elif x == "ipc":
                    self._peer_out_arena(peer)
                    extra["evs"] = self._ipc_event_ring(peer)
            except P2pkvError as exc:
                peer.req_waiting.popleft()
                req._set(RequestState.FAILED, exc)
                continue
            peer.req_waiting.popleft()
            req.x = x
            req.seq = peer.next_seq()
            peer.reqs[req.seq] = req
            need = sum(BufferPool.footprint(s.nbytes) for s in req.specs)
            eager = False
            with peer.post_lock:
                # Eager: the receiver already reserved room for us (credit), and nothing offered before
                # is still waiting to be posted, so the data may move at once, before any grant: the
                # offer/grant round trip leaves the critical path. (IPC needs the grant's offsets.)
                if x in ("nccl", "tcp") and self._cfg.eager_requests and peer.credit >= need \
                        and not peer.req_order:
                    eager = True
                    peer.credit -= need
                    req.granted = True
                peer.req_order.append(req)
            if eager:
                extra["eager"] = True
                req._set(RequestState.GRANTED)
                self._stats.add("requests_eager")
            elif x in ("nccl", "tcp") and self._cfg.eager_requests and not peer.creq_pending \
                    and peer.credit < need <= min(peer.window, peer.pool):
                # ask for credit now, so that the next request can move without waiting for a grant.
                # (Asking again right after every eager request kept a credit request pending at the
                # receiver, which then woke its I/O thread for every freed buffer: not done. Asking
                # while the credit held already covers it only piled up credit, up to the whole
                # window, that then held back this session's own offers: not done either.)
                peer.sock.send(encode("creq", need=need, want=need))
                peer.creq_pending = True
            peer.sock.send(encode("offer", seq=req.seq, tid=req.transfer_id, items=[s.to_wire() for s in req.specs],
                                  x=x, to=max(0.0, req.deadline - time.monotonic()), **extra))
            peer.last_tx = time.monotonic()
            _trace.mark("req.offer", req.transfer_id)
            req.offered.set()
            if eager:
                self._flush_requests(peer)

    def _peer_out_arena(self, peer: _Peer) -> Any:
        """The receiver's arena, mapped here for writing (CUDA IPC requests)."""
        if peer.ipc_out is None:
            local = _local_arena(peer.eid, peer.caps)  # only an engine that proves it is in this process
            if local is not None:
                peer.ipc_out = _LocalArena(local)
            else:
                info = peer.caps.get("ipc")
                if not isinstance(info, dict) or not isinstance(info.get("handle"), bytes) \
                        or not isinstance(info.get("size"), int):
                    raise TransportError("the peer offered no CUDA IPC handle", peer=peer.addr)
                from ..transport.cuda import IpcMapping

                peer.ipc_out = IpcMapping(info["handle"], info["size"], self._device)
                self._stats.add("ipc_mappings")
            peer.copy_stream = torch.cuda.Stream(self._device)
        return peer.ipc_out

    def _ipc_event_ring(self, peer: _Peer) -> list[bytes]:
        if not peer.ipc_events:
            for _ in range(_IPC_EVENTS):
                ev = torch.cuda.Event(interprocess=True)
                ev.record(torch.cuda.current_stream(self._device))  # an IPC handle needs a recorded event
                peer.ipc_events.append(ev)
                h = bytes(ev.ipc_handle())
                peer.ipc_handles.append(h)
                _LOCAL_EVENTS[h] = ev
        return peer.ipc_handles

    def _flush_requests(self, peer: _Peer) -> None:
        """Move every tensor that may move now (any thread). NCCL and IPC requests move in the global posting
        order (a communicator's receives are matched in order; both sides agree on it): one that waits for
        its grant or its caller holds back those behind it. A TCP request's tensors are addressed by request
        and index, so a granted TCP request moves whatever it was handed at once, whatever waits before it:
        a request handed over layer by layer, or left half-sent, does not stall the next one."""
        io = threading.current_thread() is self._thread
        oflush: str | None = None
        with peer.post_lock:
            orig = peer.req_order
            reqs = list(orig)
            keep: list[RequestHandle] = []
            blocked = False  # an NCCL/IPC request waits: the NCCL/IPC requests behind it wait too
            for j, req in enumerate(reqs):
                ordered = req.x != "tcp"
                if req.done():
                    if req.x == "nccl" and ((not req.acked and req.seq >= 0) or
                                            (req.granted and req.next_post < len(req.specs) and blocked)):
                        blocked = True  # not confirmed discarded yet (a grant may come), or not drained yet
                        keep.append(req)
                        continue
                    if req.x == "nccl" and req.granted and req.next_post < len(req.specs):
                        try:
                            while req.next_post < len(req.specs):  # keep the communicator in step
                                self._drain_item(req, req.next_post)
                                req.next_post += 1
                        except P2pkvError as exc:
                            log.warning("draining request %s failed: %s", req.transfer_id, exc)
                    continue  # out of the order
                if not req.granted or (ordered and blocked):
                    blocked = blocked or ordered
                    keep.append(req)
                    continue
                if not ordered and not io:
                    with req.lock:
                        handed = req.next_post in req.pending
                    if handed:
                        oflush = req.peer  # TCP posts go out on the I/O thread
                    keep.append(req)
                    continue
                while req.next_post < len(req.specs):
                    i = req.next_post
                    with req.lock:
                        ent = req.pending.pop(i, None)
                    if ent is None:
                        break  # the caller has not handed this tensor over yet
                    try:
                        self._post_item(peer, req, i, ent[0], ent[1], io)
                    except P2pkvError as exc:
                        req.next_post = len(req.specs)
                        if io:
                            self._fail_request(req, RequestState.FAILED, exc)
                        else:
                            self._submit(("ofail", req, exc))
                        keep.extend(reqs[j:])  # (this pass ends here; a failed request leaves once done)
                        if peer.req_order is orig:  # (unless failing it rebuilt the order)
                            peer.req_order = deque(keep)
                        return
                    req.next_post += 1
                if req.next_post < len(req.specs):
                    blocked = blocked or ordered
                    keep.append(req)
            if peer.req_order is orig:
                peer.req_order = deque(keep)
        if oflush is not None:
            self._submit(("oflush", oflush))

    def _post_item(self, peer: _Peer, req: RequestHandle, i: int, t: torch.Tensor, ready: Any, io: bool) -> None:
        """Move tensor ``i`` of a granted request (under ``peer.post_lock``)."""
        n = req.specs[i].nbytes
        if req.x == "nccl":
            comm = req.comm
            if ready is not None:
                comm.stream.wait_event(ready)
            comm.send(T.as_bytes(t), comm.stream)
            ev = torch.cuda.Event()
            ev.record(comm.stream)
            req.last_event = ev
            req.keep.append(t)
        elif req.x == "ipc":
            assert req.offs is not None  # set by the receiver's grant, before any item is posted
            dst = peer.ipc_out.view(req.offs[i], n)
            stream = peer.copy_stream
            if ready is not None:
                stream.wait_event(ready)
            if n:
                with torch.cuda.stream(stream):
                    dst.copy_(T.as_bytes(t), non_blocking=True)
            evi = peer.ipc_next
            peer.ipc_next = (evi + 1) % len(peer.ipc_events)
            peer.ipc_events[evi].record(stream)
            ev = torch.cuda.Event()
            ev.record(stream)
            req.last_event = ev
            req.keep.append(t)
            if io:
                peer.sock.send(encode("opost", seq=req.seq, idx=i, ev=evi))
            else:
                self._submit(("opost", peer, req, i, evi))
        else:  # tcp, on the I/O thread
            payload = t
            if ready is not None:
                ready.synchronize()
                payload = T.as_bytes(t).cpu()
            peer.sock.send(encode("odata", seq=req.seq, idx=i, n=n), zmq.SNDMORE)
            tcp.send_payload(peer.sock, T.as_bytes(payload))
        peer.last_tx = time.monotonic()
        self._stats.add("bytes_sent", n)
        self._stats.add(f"sent_{req.x}")
        _trace.mark("req.posted", f"{req.transfer_id}/{req.specs[i].name}")

    def _drain_item(self, req: RequestHandle, i: int) -> None:
        """Match a receive the consumer posted for a tensor we will never send (scratch bytes it discards)."""
        n = req.specs[i].nbytes
        if self._scratch is None or self._scratch.numel() < n:
            self._scratch = torch.empty(max(n, 1 << 20), dtype=torch.uint8, device=self._device)
        req.comm.send(self._scratch[:n], req.comm.stream)
        self._stats.add("drained_items")

    def _fail_request(self, req: RequestHandle, state: RequestState, err: P2pkvError, *,
                      from_peer: bool = False, drain: bool = False) -> None:
        """Finish a request with an error (I/O thread), keeping the transport in step with the receiver.

        ``from_peer``: the receiver failed it (its ``oerr``). Otherwise we give up and
        tell the receiver (``oabort``); for NCCL the receiver's confirmation
        comes before we drain what it posted (see :meth:`_flush_requests`).
        """
        was_granted = req.granted
        if not req._set(state, err):
            return
        self._stats.add("requests_failed")
        if req.keep and req.last_event is not None and not req.last_event.query():
            keep = req.keep  # posted GPU work may still read the caller's tensors
            self._completer.add(req.last_event, lambda ok, keep=keep: None, time.monotonic() + 60)
        req.keep = []
        peer: _Peer | None = req._p
        if peer is None or req.seq < 0 or self._peers.get(peer.addr) is not peer:
            return
        if from_peer:
            req.acked = True
            peer.reqs.pop(req.seq, None)
            if req.x == "nccl" and was_granted and not isinstance(err, TransferAborted) and not drain:
                # the receiver ended its communicator: ours must end too, or posted sends never finish
                self._end_req_comm(peer, err)
            elif req.x == "ipc" and was_granted:
                self._after_writes(req, lambda: self._send_oabort(peer, req, err, force=True))
        elif req.seq in peer.reqs:
            if req.x == "ipc" and was_granted:
                self._after_writes(req, lambda: self._send_oabort(peer, req, err))
            else:
                self._send_oabort(peer, req, err)
        self._flush_requests(peer)

    def _after_writes(self, req: RequestHandle, fn: Any) -> None:
        ev = req.last_event
        if ev is None or ev.query():
            fn()
        else:
            self._completer.add(ev, lambda ok: fn(), time.monotonic() + 60)

    def _send_oabort(self, peer: _Peer, req: RequestHandle, err: P2pkvError, force: bool = False,
                     end: bool = False) -> None:
        if self._peers.get(peer.addr) is peer and (force or req.seq in peer.reqs):
            peer.sock.send(encode("oabort", seq=req.seq, msg=err.message[:300], code=err.code, end=end))
            peer.last_tx = time.monotonic()
            if req.x != "nccl":
                # only NCCL waits for the receiver's confirmation (to drain in step); TCP and IPC are
                # finished here, so a receiver that never answers cannot make them pile up
                peer.reqs.pop(req.seq, None)

    def _end_req_comm(self, peer: _Peer, err: P2pkvError) -> None:
        """Abort our request communicator with ``peer`` (local, immediate) and fail what it carried."""
        comm = peer.nccl.pop("req", None)
        if comm is not None:
            comm.abort()
        for req in [r for r in peer.reqs.values() if r.x == "nccl"]:
            peer.reqs.pop(req.seq, None)
            req.acked = True
            if req._set(RequestState.FAILED, err if isinstance(err, PeerLost) else
                        TransportError(f"NCCL communicator ended: {err}", key=req.transfer_id, peer=peer.addr)):
                self._stats.add("requests_failed")
            if req.keep and req.last_event is not None:
                keep = req.keep
                self._completer.add(req.last_event, lambda ok, keep=keep: None, time.monotonic() + 60)
            req.keep = []
        with peer.post_lock:
            peer.req_order = deque(r for r in peer.req_order if r.x != "nccl")

    def _on_request_reply(self, peer: _Peer, t: str, msg: dict[str, Any]) -> None:
        req = peer.reqs.get(msg["seq"])
        if req is None:
            return
        if t == "ogrant":
            offs = msg.get("offs")
            if req.x == "ipc":
                if not isinstance(offs, list) or len(offs) != len(req.specs) or \
                        not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs):
                    self._fail_request(req, RequestState.FAILED,
                                       ProtocolError("IPC grant without a valid offset per tensor", peer=peer.addr))
                    return
                req.offs = offs
            req.granted = True
            _trace.mark("req.granted", req.transfer_id)
            req._set(RequestState.GRANTED)
            self._flush_requests(peer)
        elif t == "odone":
            if not req.done() and req.next_post < len(req.specs):
                # the receiver cannot hold tensors we never moved: a broken or lying peer
                self._fail_request(req, RequestState.FAILED, ProtocolError(
                    "the receiver reported the request done before every tensor was sent", key=req.transfer_id,
                    peer=peer.addr), from_peer=True, drain=req.x != "nccl")
                return
            peer.reqs.pop(req.seq, None)
            req.keep = []
            if req._set(RequestState.DONE):
                self._stats.add("requests_done")
                self._stats.observe("request", time.monotonic() - req.t_start)
        elif t == "oerr":
            err = error_from_code(msg["code"], msg["msg"], key=req.transfer_id, peer=peer.addr)
            if req.done():  # our give-up, confirmed: drain what the receiver posted
                req.acked = True
                peer.reqs.pop(req.seq, None)
                self._flush_requests(peer)
            else:
                state = RequestState.ABORTED if isinstance(err, TransferAborted) else RequestState.FAILED
                self._fail_request(req, state, err, from_peer=True, drain=msg.get("drain") is True)

    def _tick_requests(self, peer: _Peer, now: float) -> None:
        for req in [r for r in peer.req_waiting if r.deadline < now]:
            peer.req_waiting.remove(req)
            # say what was still missing when the deadline (possibly 0 s) passed, not a guess at why
            why = (("handshake done, but no NCCL communicator with the peer yet"
                    if self._request_transport(peer) == "nccl" else "the deadline passed before the offer went out")
                   if peer.ready else
                   "connected, but the peer had not finished the handshake" if peer.connects else
                   "peer unreachable" if now - peer.created >= self._cfg.effective_peer_timeout_s else
                   "not connected to the peer yet")
            req._set(RequestState.FAILED, TransferTimeout(
                f"request not offered within its deadline (timeout={req.timeout:g}s): {why}",
                key=req.transfer_id, peer=peer.addr))
        for req in [r for r in peer.reqs.values() if r.deadline < now and not r.done()]:
            what = "no grant from the receiver yet (it has no room, or has not answered)" if not req.granted else \
                "not every tensor was handed over" if req.next_post < len(req.specs) else "no completion"
            err = TransferTimeout(f"request did not complete within its deadline (timeout={req.timeout:g}s): {what}",
                                  key=req.transfer_id, peer=peer.addr)
            if req.x == "nccl" and req.granted and req.next_post >= len(req.specs):
                # posted sends may still read the caller's tensors: end them before reporting
                self._send_oabort(peer, req, err, end=True)
                self._end_req_comm(peer, err)
            else:
                self._fail_request(req, RequestState.FAILED, err)
        grace = self._cfg.effective_peer_timeout_s
        stale = [r for r in peer.reqs.values() if r.done() and r.deadline + grace < now]
        for r in [r for r in stale if r.x != "nccl"]:
            peer.reqs.pop(r.seq, None)
        stale = [r for r in stale if r.x == "nccl"]
        if stale:
            # given up, and the receiver never confirmed it will discard what it posted: the only
            # safe way to keep NCCL in step is to end the communicator (this also frees the entries)
            self._end_req_comm(peer, TransferTimeout("the receiver never confirmed an abandoned request",
                                                     peer=peer.addr))
            for r in stale:
                peer.reqs.pop(r.seq, None)
    def _on_offer(self, sess: _Session, msg: dict[str, Any]) -> None:
        """An offer. What can refuse it cheaply is decided first, from one pass over its items that
        builds no object per item (its size, the session's credit and caps), so that a refused offer
        costs the I/O thread little whatever it holds; only an offer that may be taken is parsed in full."""
        seq = msg["seq"]
        eager = msg.get("eager") is True
        x = msg["x"]
        cfg = self._cfg
        refusal: P2pkvError | None = None
        sizes: list[int] | None = None
        try:
            sizes = offer_sizes(msg["items"], cfg.max_message_bytes)
        except P2pkvError as exc:
            refusal = exc
        need = sum(BufferPool.footprint(n) for n in sizes) if sizes is not None else 0
        if eager and sizes is not None:
            # its data already moves on credit, as data messages do: checked (and paid) first
            credit = sess.credit
            if need > credit:
                # the producer paid it from credit it believed it had: spent here too, so the two
                # sides stay in step; and counted, as data beyond credit is (the session is dropped)
                sess.spend(credit)
                err = ProtocolError(f"eager offer of {need} bytes beyond the {credit} bytes of credit granted "
                                    "to this peer: ask for credit (creq) first")
                if not self._credit_violation(sess, err):
                    self._refuse_eager(sess, seq, x, sizes, err)
                return
            sess.spend(need)  # from here on a refusal spends it too: the producer paid it
            sess.last_use = time.monotonic()
        evs = msg.get("evs")
        if refusal is None and (x not in ("tcp", "ipc", "nccl") or (x != "tcp" and not self._cuda) or
                                (x == "nccl" and (not self._nccl_ok or sess.nccl.get("req") is None)) or
                                (x == "ipc" and (not isinstance(evs, list) or not evs or len(evs) > 1024 or
                                                 not all(isinstance(e, bytes) and len(e) == 64 for e in evs)))):
            refusal = ProtocolError(f"transport {x!r:.20} is not available for requests on this engine")
        if refusal is None and (sess.ident, seq) in self._incoming:
            refusal = ProtocolError(f"offer seq {seq} is already in use")
        limit = min(cfg.effective_credit_bytes, self._pool.capacity)
        if refusal is None and need > limit:
            refusal = PoolExhausted(f"request of {need} bytes can never fit the receiver (credit window "
                                    f"{cfg.effective_credit_bytes}, pool {self._pool.capacity} bytes)")
        if refusal is None and sizes is not None and (len(sess.offers) >= _MAX_QUEUED_OFFERS or
                                                      sess.queued_items() + len(sizes) > _MAX_QUEUED_ITEMS):
            refusal = PoolExhausted(f"too many requests from this peer wait for room here ({len(sess.offers)} "
                                    f"requests of {sess.queued_items()} tensors; at most {_MAX_QUEUED_OFFERS} "
                                    f"and {_MAX_QUEUED_ITEMS}): retry once some are done")
        if refusal is None and self._io_refuses(sess, time.monotonic()):
            self._stats.add("offers_over_budget")
            refusal = PoolExhausted(f"this peer's requests took more than the {_IO_SHARE:.0%} of this engine's "
                                    "I/O thread one peer may take: retry later")
        if refusal is None and sizes is not None and not sess.take_offer_budget(len(sizes), time.monotonic()):
            self._stats.add("offers_over_budget")
            refusal = PoolExhausted(f"this peer offers tensors faster than the {_OFFER_ITEMS_PER_S} a second "
                                    f"(bursts of {_OFFER_ITEMS_BURST}) this engine takes from one peer: retry later")
        tid = ""
        specs: list[ItemSpec] = []
        keys: list[TransferKey] = []
        if refusal is None:
            try:
                tid = validate_transfer_id(msg["tid"])
                self._note_tid(sess, tid)  # abort() tells only the sessions that carried the transfer
                gone = self._inbox.tid_error(tid)
                if isinstance(gone, TransferAborted):
                    raise gone
                specs = wire_items(msg["items"], cfg.max_message_bytes)
                keys = [TransferKey(tid, s.name) for s in specs]
            except P2pkvError as exc:
                refusal = exc
        for k in keys if refusal is None else ():
            if k in self._incoming_keys or self._inbox.has(k):
                refusal = DuplicateKey("data for this key is already waiting or on its way", key=k)
                break
        if refusal is not None:
            if eager:
                self._refuse_eager(sess, seq, x, sizes, refusal)
            else:
                self._stats.add("offers_refused")
                self._reply(sess.ident, "oerr", seq=seq, code=refusal.code, msg=refusal.message[:500])
            return
        to = msg["to"]
        to = min(float(to), cfg.timeout_s * 4) if to == to and to >= 0 else 0.0
        # a little after the producer's own deadline, so its error (which knows why) wins
        inc = Incoming(sess, seq, tid, specs, x, time.monotonic() + to + 0.25, evs, keys)
        if eager:
            inc.eager = True
            sess.eager_held += inc.need  # paid from its credit, held for it until admitted
        sess.offers.append(inc)
        self._incoming[(sess.ident, seq)] = inc
        self._incoming_keys.update(keys)
        self._inbox.expect(tid, sess.ident)
        inc.record = self._fast.note_offer(tid, specs, sess.ident)
        _trace.mark("rx.offer", tid)
        self._admit()

    def _refuse_eager(self, sess: _Session, seq: int, x: Any, sizes: list[int] | None, err: P2pkvError) -> None:
        """Refuse an eager offer, whose data already moves. TCP frames of an offer we do not hold are
        dropped as they come. NCCL sends are posted already: their receives (into scratch) are posted
        in their turn, after those of the session's offers before it, so that both sides stay in the
        sender's order; where that cannot be (sizes unknown, too many refusals waiting) the
        communicator ends instead."""
        if x == "nccl" and sess.nccl.get("req") is not None:
            if sizes is not None and len(sess.offers) < _MAX_QUEUED_OFFERS:
                inc = Incoming(sess, seq, "", [], x, 0.0, None)
                inc.sizes = sizes
                inc.refusal = err
                inc.failed = True
                sess.offers.append(inc)
                self._admit()
                return
            self._end_session_comm(sess, "req", ProtocolError("refused an eager offer that cannot be drained"))
        self._stats.add("offers_refused")
        self._reply(sess.ident, "oerr", seq=seq, code=err.code, msg=err.message[:500], drain=True)

    def _admit(self) -> None:
        """Grant waiting offers that fit, oldest first within a session; one session cannot block another.
        At most ``_ADMIT_SLICE`` buffers are taken per call: a request being filled stays at the head of
        its session's queue and is continued by the next pass of the loop (see _admit_one). Eager
        requests are taken in full at once (their data follows their offer)."""
        room = self._room()
        holding = self._holding()
        slice_left = [_ADMIT_SLICE]
        sessions = list(self._sessions.values())
        # round robin: a call that ran out of its slice starts the next one at the first session it
        # left waiting, so that sessions of large requests cannot keep the others' waiting
        start = self.__dict__.get("_admit_next", 0) % max(1, len(sessions))
        resume: int | None = None
        for k, sess in enumerate(sessions[start:] + sessions[:start]):
            while sess.offers:
                inc = sess.offers[0]
                if inc.refusal is not None:
                    if not self._refuse_in_turn(sess, inc):
                        break  # the communicator is still joining
                    sess.offers.popleft()
                    continue
                if inc.failed:
                    sess.offers.popleft()
                    continue
                if inc.eager:
                    # its data already moves (TCP frames follow the offer, and are dropped unless it is
                    # admitted): taken in full, now; its size is bounded by the credit it was paid from
                    budget = [len(inc.specs)]
                elif slice_left[0] <= 0:
                    if resume is None:
                        resume = start + k  # the first session left waiting goes first next time
                    self._admit_later()
                    break
                else:
                    budget = slice_left
                t0 = time.thread_time()  # (CPU time, as in _pump_router)
                took = self._admit_one(sess, inc, room, holding, budget)
                dt = time.thread_time() - t0
                sess.charge_io(dt, time.monotonic())  # its own cost, also when another's request made room
                self._io_admit_s += dt
                if took is None:
                    break
                room -= took
                holding.add(sess.ident)
                if inc.filling is not None:  # admitted, its buffers still being taken: next pass
                    self._admit_later()
                    break
                sess.offers.popleft()
        if resume is not None:
            self.__dict__["_admit_next"] = resume

    def _revoke_own_credit(self, sess: _Session, now: float) -> None:
        """The session's own unused credit is what holds back its offer (its peer offered it before it
        knew of that credit, so the offer could not go eager on it): take that credit back at once
        instead of when it has been idle for a while (the offer is admitted when the peer answers,
        see the ``cret`` handler). Nothing is granted meanwhile: its charge stays within its window."""
        if sess.outstanding > 0 and not sess.revoking:
            self._revoke_credit(sess, now)

    def _admit_later(self) -> None:
        """Run _admit again on the next pass of the loop, without waiting for its poll's timeout."""
        if not self._mem_dirty:
            self._mem_dirty = True
            self._wake(b"a")

    def _drop_filling(self, inc: Incoming) -> None:
        """An admitted request whose buffers were still being taken failed: give back what it took."""
        bufs = inc.filling
        if bufs is None:
            return
        inc.filling = None
        sess: _Session = inc.sess
        if not inc.eager:
            sess.reserved -= inc.need
            sess.filling -= inc.fill_left
        inc.fill_left = 0
        self._pool.release_many(bufs)

    def _admit_one(self, sess: _Session, inc: Incoming, room: int, holding: set[bytes],
                   slice_left: list[int]) -> int | None:
        """Admit ``inc`` (reserve its room, grant it); None if it must wait, else the pool room it took
        that was not promised before. An ordinary offer needs room in its session's window (what the
        session holds in all: credit, requests, unclaimed data; see _charge; bounded by _limit) and in the pool beyond
        what is promised to others. An eager one was paid from credit: its room is promised already.
        Its buffers are taken ``slice_left[0]`` at most (decremented) per call: while some are left to
        take, ``inc.filling`` holds those taken and the rest of its room is promised (``sess.filling``);
        the grant goes once all are taken."""
        comm = None
        if inc.x == "nccl":
            comm = sess.nccl.get("req")
            state = comm.poll() if comm is not None else "failed"
            if state == "init":
                return None
            if state != "ready":
                self._drop_filling(inc)
                self._fail_incoming(inc, TransportError("no NCCL communicator for requests"))
                return 0
        need = inc.need
        eager = inc.eager
        took = 0
        if inc.filling is None:
            if not eager:
                charge = self._charge(sess)
                limit = self._limit(sess, holding)
                if need > limit - charge:
                    self._want_mem = True
                    sess.blocked_t = time.monotonic()  # its own idle credit is taken back for it
                    if need <= self._cfg.effective_credit_bytes - charge:
                        self._starved_t = sess.blocked_t  # held back by its share only: others' idle credit too
                    if need <= limit - charge + sess.outstanding:
                        self._revoke_own_credit(sess, sess.blocked_t)
                    return None
                if need > room:
                    self._want_mem = True
                    self._starved_t = time.monotonic()  # idle credit held anywhere is taken back for it
                    if need <= room + sess.outstanding:
                        self._revoke_own_credit(sess, self._starved_t)
                    return None
                # admitted: its room is its own from here on (promised while its buffers are taken)
                sess.reserved += need
                sess.filling += need
                took = need
            inc.filling = []
            inc.fill_left = need
        # within the room counted above, fragmentation of the arena is covered by overflow buffers
        # (they count against that room: BufferPool.room); CUDA IPC needs places in the arena
        bufs: list[Buffer] = inc.filling
        specs = inc.specs
        n = min(len(specs) - len(bufs), max(slice_left[0], 0))
        try:
            new = self._pool.try_alloc_many([s.nbytes for s in specs[len(bufs):len(bufs) + n]],
                                            overflow=inc.x != "ipc")
        except PoolExhausted as exc:  # a real out-of-memory
            self._drop_filling(inc)
            if eager:
                self._refuse_admitted_eager(sess, inc, exc)
            else:
                self._fail_incoming(inc, exc)
            return 0
        if new is None:  # no place in the arena (CUDA IPC): give back what it took, wait
            self._drop_filling(inc)
            self._want_mem = True
            return None
        slice_left[0] -= n
        bufs.extend(new)
        got = sum(b.size for b in new)
        inc.fill_left -= got
        if not eager:
            sess.filling -= got
        if len(bufs) < len(specs):
            return took  # the rest on the next pass
        inc.filling = None
        inc.fill_left = 0
        inc.bufs = bufs
        inc.comm = comm
        if eager:
            inc.eager = False  # admitted: from here on it is an ordinary granted request
            sess.eager_held -= need
            sess.reserved += need
        sess.admitted[inc.seq] = inc
        offs: dict[str, Any] = {"offs": [b.offset for b in bufs]} if inc.x == "ipc" else {}
        self._reply(sess.ident, "ogrant", seq=inc.seq, **offs)
        _trace.mark("rx.granted", inc.transfer_id)
        if inc.x == "nccl":
            assert comm is not None  # found ready above
            watcher = self._session_watcher(sess)
            try:
                for i, b in enumerate(bufs):
                    comm.recv(b.data, comm.stream)
                    ev = torch.cuda.Event()
                    ev.record(comm.stream)
                    inc.posted[i] = True
                    watcher.add(ev, functools.partial(self._landed, inc, i))
            except P2pkvError as exc:
                self._end_session_comm(sess, "req", exc)
        return took

    def _refuse_in_turn(self, sess: _Session, inc: Incoming) -> bool:
        """Refuse an eager offer at its turn: receive its tensors into scratch, tell the producer to drain."""
        if inc.x == "nccl":
            comm = sess.nccl.get("req")
            if comm is not None and comm.poll() == "init":
                return False
            for n in inc.sizes:
                self._drain_nccl(sess, n, "req")
        err = inc.refusal
        assert err is not None
        self._stats.add("offers_refused")
        self._reply(sess.ident, "oerr", seq=inc.seq, code=err.code, msg=err.message[:500], drain=True)
        return True

    def _refuse_admitted_eager(self, sess: _Session, inc: Incoming, exc: P2pkvError) -> None:
        """An eager request that found no memory at all (a real out-of-memory): drain and refuse it."""
        self._forget_incoming(inc)
        with inc.lock:
            inc.failed = True
        if inc.eager:
            inc.eager = False
            sess.eager_held -= inc.need
        if inc.x == "nccl":
            for s in inc.specs:
                self._drain_nccl(sess, s.nbytes, "req")
        self._inbox.fail_transfer(inc.transfer_id, lambda: exc.__class__(exc.message, key=inc.transfer_id))
        self._reply(sess.ident, "oerr", seq=inc.seq, code=exc.code, msg=exc.message[:500], drain=True)

    def _session_watcher(self, sess: _Session) -> Watcher:
        if sess.watcher is None:
            sess.watcher = Watcher(self._device, name=f"p2pkv-land-{self.port}")
        return sess.watcher

    def _landed(self, inc: Incoming, i: int) -> None:
        """Tensor ``i`` of ``inc`` is in its buffer (watcher thread for GPUs, I/O thread for TCP)."""
        with inc.lock:
            buf, inc.bufs[i] = inc.bufs[i], None
            inc.posted[i] = False
            good = not inc.failed and (inc.comm is None or inc.comm.state == "ready")
            if good:
                inc.landed[i] = True
            complete = good and all(inc.landed)
        if buf is None:
            return
        if not good:
            buf.release()  # failed meanwhile: the bytes are not trusted
            return
        spec = inc.specs[i]
        err = self._inbox.deliver(inc.keys[i], buf, spec.dtype, spec.shape, src=inc.sess.ident)
        _trace.mark("rx.landed", inc.keys[i])
        if err is not None:
            buf.release()  # aborted (or a duplicate) meanwhile: discard
        self._stats.add("bytes_received", spec.nbytes)
        self._stats.add("tensors_received")
        self._stats.add(f"received_{inc.x}")
        if complete:
            if threading.current_thread() is self._thread:
                self._request_done(inc)
            else:
                self._submit(("odone", inc), force=True)

    def _request_done(self, inc: Incoming) -> None:
        sess: _Session = inc.sess
        if sess.admitted.pop(inc.seq, None) is not None:
            sess.reserved -= inc.need  # its data waits in the inbox now, charged to it until claimed
        self._forget_incoming(inc)
        if self._sessions.get(sess.ident) is sess:
            self._reply(sess.ident, "odone", seq=inc.seq)
        self._stats.add("requests_received")
        self._admit()

    def _forget_incoming(self, inc: Incoming) -> None:
        self._incoming.pop((inc.sess.ident, inc.seq), None)
        self._incoming_keys.difference_update(inc.keys)

    def _fail_incoming(self, inc: Incoming, err: P2pkvError, *, reply: bool = True, keys_error: bool = True) -> None:
        """Give up on an incoming request (I/O thread): free what no GPU work can still write."""
        self._drop_filling(inc)
        with inc.lock:
            if inc.failed:
                return
            inc.failed = True
            free = [(i, b) for i, b in enumerate(inc.bufs) if b is not None and not inc.posted[i]]
            if inc.x == "ipc" and reply and inc.admitted:
                inc.quarantine = True  # the producer may still write unposted items: wait for its ofin
                free = []
            for i, _ in free:
                inc.bufs[i] = None
        if free:
            self._pool.release_many([b for _, b in free])
        sess: _Session = inc.sess
        if sess.admitted.pop(inc.seq, None) is not None:
            sess.reserved -= inc.need
        if inc.eager:  # paid from credit and never admitted: the room held for it is free again
            inc.eager = False
            sess.eager_held -= inc.need
        if not inc.quarantine:
            self._forget_incoming(inc)
        else:
            self._incoming_keys.difference_update(inc.keys)
        if inc.record is not None:  # a recv_request must not bind a request that will never complete
            self._fast.drop_offer(inc.record)
        if keys_error:
            self._inbox.fail_transfer(inc.transfer_id, lambda: err.__class__(str(err.message), key=inc.transfer_id))
        if reply and self._sessions.get(sess.ident) is sess:
            self._reply(sess.ident, "oerr", seq=inc.seq, code=err.code, msg=err.message[:500])
        self._stats.add("requests_failed_rx")

    def _release_quarantine(self, inc: Incoming) -> None:
        with inc.lock:
            free = [(i, b) for i, b in enumerate(inc.bufs) if b is not None and not inc.posted[i]]
            for i, _ in free:
                inc.bufs[i] = None
            inc.quarantine = False
        for _, b in free:
            b.release()
        self._forget_incoming(inc)

    def _on_offer_msg(self, sess: _Session, t: str, msg: dict[str, Any]) -> None:
        inc = self._incoming.get((sess.ident, msg["seq"]))
        if t == "odata":
            if inc is None or inc.x != "tcp" or not inc.admitted or inc.failed or \
                    not 0 <= msg["idx"] < len(inc.specs) or inc.bufs[msg["idx"]] is None:
                return  # late frames of a failed request: drained by the caller
            i = msg["idx"]
            buf = inc.bufs[i]
            if not self._router.getsockopt(zmq.RCVMORE):
                self._fail_incoming(inc, ProtocolError("odata lacks its payload frame"))
                return
            got = self._recv_payload(buf)
            if got != buf.nbytes or msg["n"] != buf.nbytes:
                self._fail_incoming(inc, ProtocolError(f"payload of {got} bytes, the offer said {buf.nbytes}"))
                return
            self._landed(inc, i)
        elif t == "opost":
            i, evi = msg["idx"], msg["ev"]
            if inc is None or inc.x != "ipc" or not inc.admitted or not 0 <= i < len(inc.specs) or \
                    evi >= len(inc.evs) or inc.bufs[i] is None or inc.posted[i]:
                return
            ev = sess.ipc_events.get(inc.evs[evi]) or _LOCAL_EVENTS.get(inc.evs[evi])
            if ev is None:
                try:
                    ev = torch.cuda.Event.from_ipc_handle(self._device, inc.evs[evi])
                except Exception as exc:
                    self._fail_incoming(inc, TransportError(f"cannot open the peer's CUDA IPC event: {exc}"))
                    return
                sess.ipc_events[inc.evs[evi]] = ev
            with inc.lock:
                inc.posted[i] = True
            self._session_watcher(sess).add(ev, lambda: self._landed(inc, i))
        elif t == "oabort":
            if inc is None:
                return
            if not inc.admitted:
                try:
                    sess.offers.remove(inc)
                except ValueError:
                    pass
            err = error_from_code(msg.get("code", "aborted"), f"the producer gave up: {msg['msg'][:300]}",
                                  key=inc.transfer_id)
            with inc.lock:
                inc.quarantine = False
            if msg.get("end") and inc.x == "nccl" and inc.admitted:
                self._end_session_comm(sess, "req", err)  # its communicator ended: ours must too
            self._fail_incoming(inc, err, reply=False, keys_error=True)
            if inc.x == "ipc":
                self._release_quarantine(inc)
            self._reply(sess.ident, "oerr", seq=inc.seq, code=err.code, msg="discarded")
        elif t == "ofin" and inc is not None and inc.quarantine:
            self._release_quarantine(inc)

    def _tick_incoming(self, now: float) -> None:
        for inc in [i for i in self._incoming.values() if i.deadline < now]:
            if inc.quarantine:
                if inc.deadline + 2 * self._cfg.timeout_s < now:
                    self._release_quarantine(inc)  # the producer never said it stopped writing
                continue
            if inc.failed:
                continue
            sess: _Session = inc.sess
            err = TransferTimeout("the receiver's deadline passed before every tensor of the request arrived"
                                  + ("" if inc.admitted else " (no room for it)"), key=inc.transfer_id)
            if inc.x == "nccl" and inc.admitted:
                self._end_session_comm(sess, "req", err)  # posted receives may still write: end them first
            else:
                try:
                    sess.offers.remove(inc)
                except ValueError:
                    pass
                self._fail_incoming(inc, err)

