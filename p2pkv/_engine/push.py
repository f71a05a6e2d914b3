"""The per-tensor push path: ``Engine.send`` -> credit -> header + data -> coalesced acks;
and its receiving side (credit grants, storing, NCCL drains).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import zmq

from .. import _tensors as T
from .. import _trace
from ..control.messages import encode
from ..errors import (DuplicateKey, InvalidTensor,
                      P2pkvError, PoolExhausted, ProtocolError, TransferAborted,
                      TransferTimeout, TransportError)
from ..handles import TransferState
from ..keys import TransferKey
from ..mailbox import DirectBuffer, Held
from ..pool import Buffer, BufferPool
from ..transport import tcp
from .state import (_MAX_CREDIT_VIOLATIONS, _TICK_S, _Peer,
                    _SendItem, _Session, log)
from .base import _EngineBase

Nack = Callable[[P2pkvError], None]  # refuses one received tensor: tells its sender why


class _PushPath(_EngineBase):
    """Mixin of :class:`p2pkv.Engine` (shares its state; see :mod:`p2pkv._engine.base`)."""

    def _cmd_send(self, addr: str, item: _SendItem) -> None:
        _trace.mark("io.cmd", item.key)
        if isinstance(self._inbox.error_for(item.key), TransferAborted):
            self._finish_send(item, TransferState.ABORTED, TransferAborted("transfer aborted", key=item.key))
            return
        peer = self._get_peer(addr)
        if peer.ready and not self._fits_peer(peer, item):
            return
        peer.queue.append(item)
        self._pump_sends(peer)

    def _fits_peer(self, peer: _Peer, item: _SendItem) -> bool:
        limit = min(peer.window, peer.pool)
        if item.footprint > limit or item.nbytes > peer.maxmsg:
            self._finish_send(item, TransferState.FAILED, PoolExhausted(
                f"tensor of {item.nbytes} bytes can never fit the receiver (credit window {peer.window}, "
                f"pool {peer.pool}, max message {peer.maxmsg} bytes)", key=item.key, peer=peer.addr))
            return False
        return True

    def _item_transport(self, peer: _Peer, item: _SendItem) -> str:
        return peer.xport if item.ready is not None else "tcp"

    def _pump_sends(self, peer: _Peer) -> None:
        if not peer.ready:
            return
        while peer.queue:
            item = peer.queue[0]
            assert item.payload is not None  # a queued send is unfinished
            x = self._item_transport(peer, item)
            loop_nccl = x == "nccl" and self._is_self(peer)
            comm = None
            if x == "nccl":
                comm = self._loopback_comm() if loop_nccl else self._peer_comm(peer, "push")
                if comm is None:
                    return  # communicator still initialising: the tick pumps again
            if loop_nccl:
                if not self._loopback_nccl_send(peer, item, comm):
                    return
                continue
            if x == "ipc" and item.stage is None and self._pool.offset_of(item.payload) is None:
                item.stage = self._pool.try_alloc(item.nbytes)
                if item.stage is None:
                    self._want_mem = True
                    return  # our own pool is full: retried when memory comes back
            if item.footprint > peer.credit:
                if not peer.creq_pending:
                    want = sum(i.footprint for i in peer.queue) - peer.credit
                    peer.sock.send(encode("creq", need=item.footprint - peer.credit, want=max(want, 0)))
                    peer.creq_pending = True
                    peer.last_tx = time.monotonic()
                    self._stats.add("credit_requests")
                return
            peer.queue.popleft()
            peer.credit -= item.footprint
            item.seq = peer.next_seq()
            peer.inflight[item.seq] = item
            item.handle._set(TransferState.IN_FLIGHT)
            try:
                if x == "tcp":
                    self._send_tcp(peer, item)
                elif x == "ipc":
                    self._send_ipc(peer, item)
                else:
                    self._send_nccl(peer, item, comm)
            except P2pkvError as exc:
                peer.inflight.pop(item.seq, None)
                self._finish_send(item, TransferState.FAILED, exc)
                continue
            _trace.mark("io.sent", item.key)
            peer.last_tx = time.monotonic()
            self._stats.add("bytes_sent", item.nbytes)
            self._stats.add(f"sent_{x}")
        peer.idle_since = time.monotonic()

    def _data_header(self, item: _SendItem, x: str, **extra: Any) -> bytes:
        return encode("data", seq=item.seq, key=item.key.to_wire(), dt=T.dtype_name(item.dtype),
                      sh=list(item.shape), n=item.nbytes, x=x, **extra)

    def _send_tcp(self, peer: _Peer, item: _SendItem) -> None:
        payload = item.payload
        assert payload is not None  # (None only once the send finished)
        if item.ready is not None:  # a CUDA tensor: stage it through host memory
            item.ready.synchronize()
            src = T.as_bytes(payload)
            stage = self._pinned.try_alloc(item.nbytes) if self._pinned is not None else None
            if stage is not None:
                stage.data.copy_(src)
                item.stage = stage  # ZMQ reads it until the send finishes
                payload = stage.data
            else:
                payload = src.cpu()
        peer.sock.send(self._data_header(item, "tcp"), zmq.SNDMORE)
        tcp.send_payload(peer.sock, payload)

    def _send_ipc(self, peer: _Peer, item: _SendItem) -> None:
        assert item.payload is not None  # (None only once the send finished)
        src = T.as_bytes(item.payload)
        if item.stage is None:
            off = self._pool.offset_of(item.payload)
            event = item.ready
        else:
            off = item.stage.offset
            stream = self._copy_stream
            stream.wait_event(item.ready)
            with torch.cuda.stream(stream):
                item.stage.data.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
            item.gpu_event = event
        seq = item.seq
        hdr = self._data_header(item, "ipc", ipc={"off": off})

        def announce(ok: bool) -> None:
            if peer.inflight.get(seq) is not item or self._peers.get(peer.addr) is not peer:
                return  # failed or aborted meanwhile
            if not ok:
                peer.inflight.pop(seq, None)
                self._finish_send(item, TransferState.FAILED, TransferTimeout(
                    "the tensor was not ready on the GPU before the send's deadline", key=item.key, peer=peer.addr))
                return
            peer.sock.send(hdr)
            peer.last_tx = time.monotonic()

        if event.query():
            announce(True)
        else:
            self._completer.add(event, announce, item.deadline)

    def _send_nccl(self, peer: _Peer, item: _SendItem, comm: Any) -> None:
        assert item.payload is not None  # (None only once the send finished)
        peer.sock.send(self._data_header(item, "nccl"))
        comm.stream.wait_event(item.ready)
        comm.send(T.as_bytes(item.payload), comm.stream)
        item.gpu_event = torch.cuda.Event()
        item.gpu_event.record(comm.stream)

    def _loopback_nccl_send(self, peer: _Peer, item: _SendItem, comm: Any) -> bool:
        """An engine sending to itself over NCCL: one grouped send+recv on a one-rank communicator."""
        assert item.payload is not None  # (None only once the send finished)
        dst = self._pool.try_alloc(item.nbytes)
        if dst is None:
            return False
        peer.queue.popleft()
        item.handle._set(TransferState.IN_FLIGHT)
        try:
            comm.stream.wait_event(item.ready)
            comm.send_recv(T.as_bytes(item.payload), dst.data, comm.stream)
        except P2pkvError as exc:
            dst.release()
            self._finish_send(item, TransferState.FAILED, exc)
            return True
        ev = torch.cuda.Event()
        ev.record(comm.stream)
        item.gpu_event = ev

        def done(ok: bool) -> None:
            if not ok or comm.state != "ready":
                if self._loop_comm is comm:
                    self._loop_comm = None
                    comm.abort()  # the grouped receive may still write into dst: end it first
                self._release_after(dst, ev)
                self._finish_send(item, TransferState.FAILED, TransportError(
                    "NCCL loopback transfer did not complete", key=item.key))
                return
            err = self._inbox.deliver(item.key, dst, item.dtype, item.shape, src=b"loopback")
            if err is not None:
                dst.release()
                self._finish_send(item, TransferState.FAILED, err)
                return
            self._stats.add("bytes_received", item.nbytes)
            self._stats.add("tensors_received")
            self._stats.add("received_nccl")
            self._finish_send(item, TransferState.DONE)

        self._completer.add(ev, done, item.deadline)
        self._stats.add("bytes_sent", item.nbytes)
        self._stats.add("sent_nccl")
        return True

    def _finish_send(self, item: _SendItem, state: TransferState, error: P2pkvError | None = None) -> bool:
        item.payload = None
        if item.stage is not None:
            self._release_after(item.stage, item.gpu_event)
            item.stage = None
        if item.handle.done():
            return False
        # count before the handle wakes its waiter, so stats() never lags a finished wait
        if state is TransferState.DONE:
            self._stats.add("sends_done")
            self._stats.observe("send", time.monotonic() - item.handle.t_start)
        else:
            self._stats.add("sends_failed")
        if item.gpu_event is not None and not item.gpu_event.query() and state is not TransferState.DONE:
            # the GPU may still read the caller's tensor: keep it alive until it is done
            keep = item.handle._tensor
            self._completer.add(item.gpu_event, lambda ok, keep=keep: None, time.monotonic() + 60)
        return item.handle._set(state, error)

    def _on_data(self, sess: _Session, msg: dict[str, Any]) -> None:
        seq = msg["seq"]
        ident = sess.ident
        x = msg["x"]
        if x == "nccl" and self._nccl_ok:
            comm = sess.nccl.get("push")
            if comm is not None and (comm.poll() == "init" or sess.nccl_backlog):
                sess.nccl_backlog.append(msg)  # handled, in order, once our side has joined
                return

        def nack(exc: P2pkvError) -> None:
            self._stats.add("nacks")
            self._reply(ident, "nack", seq=seq, code=exc.code, msg=exc.message[:500])
            if x == "nccl":
                # the sender posted its ncclSend with the header: match it, or the next receive of
                # this communicator would take these bytes under another key
                self._drain_nccl(sess, msg.get("n"))

        try:
            key = TransferKey.from_wire(msg["key"])
            dtype = T.dtype_from_name(msg["dt"])
            shape = T.check_shape(msg["sh"])
        except P2pkvError as exc:
            nack(exc)
            return
        _trace.mark("rx.hdr", key)
        self._note_tid(sess, key.transfer_id)
        n = msg["n"]
        if n != T.nbytes_of(dtype, shape):
            nack(ProtocolError(f"n={n} does not match dtype {msg['dt']} and shape {shape}"))
            return
        if n > self._cfg.max_message_bytes:
            nack(InvalidTensor(f"{n} bytes exceed max_message_bytes={self._cfg.max_message_bytes}"))
            return
        if x not in ("tcp", "ipc", "nccl") or (x != "tcp" and not self._cuda) \
                or (x == "nccl" and not self._nccl_ok):
            nack(ProtocolError(f"transport {x!r:.20} is not available on this engine"))
            return
        if x == "tcp" and not self._router.getsockopt(zmq.RCVMORE):
            nack(ProtocolError("data message lacks its payload frame"))
            return
        if x == "nccl" and sess.nccl.get("push") is None:
            nack(TransportError("no NCCL communicator with this peer"))
            return
        fp = BufferPool.footprint(n)
        if fp > sess.credit:
            # Credit is enforced, not only counted: data beyond what we granted is refused (never
            # allocated outside the pool), and a peer that keeps doing it loses its session.
            err = ProtocolError(f"data of {fp} pool bytes beyond the credit granted to this peer "
                                f"({sess.credit} bytes left): ask for credit (creq) first")
            if not self._credit_violation(sess, err):
                nack(err)
            return
        sess.spend(fp)
        sess.last_use = time.monotonic()
        if key in self._incoming_keys:
            # a whole request reserved this key: its data comes with that request (odata), from
            # the session that offered it, and from nowhere else
            nack(DuplicateKey("this key belongs to a request on its way (send_request): data for it comes "
                              "only with that request", key=key))
            return
        if x == "tcp" and not self._cuda and self._recv_posted(sess, key, dtype, shape, seq, nack):
            return
        try:
            # within granted credit the room exists; overflow only covers pool fragmentation
            buf = self._pool.try_alloc(n, overflow=True)
        except PoolExhausted as exc:
            nack(exc)
            return
        assert buf is not None
        if x != "tcp":
            self._recv_gpu(sess, msg, key, dtype, shape, buf, nack)
            return
        try:
            got = self._recv_payload(buf)
            if got != n:
                raise ProtocolError(f"payload of {got} bytes, header said {n}")
        except P2pkvError as exc:
            buf.release()
            nack(exc)
            return
        self._store(sess, key, buf, dtype, shape, seq, nack, "tcp")

    def _recv_posted(self, sess: _Session, key: TransferKey, dtype: torch.dtype, shape: tuple[int, ...], seq: int,
                     nack: Nack) -> bool:
        """A caller already waits in ``recv`` for ``key``: land the bytes straight in its tensor (no pool
        hop, no copy out of the pool). False when nobody waits or its ``out`` does not fit."""
        found, dest = self._inbox.take_post(key)
        if not found:
            return False
        if dest is None:
            dest = torch.empty(shape, dtype=dtype)
        elif dest.dtype != dtype or tuple(dest.shape) != shape or not dest.is_contiguous() or \
                dest.device.type != "cpu":
            return False  # its check fails later, with the precise error; the data stays claimable
        direct = DirectBuffer(dest)
        try:
            got = tcp.recv_payload_into(self._router, direct.data)
            if got != direct.nbytes:
                raise ProtocolError(f"payload of {got} bytes, header said {direct.nbytes}")
        except P2pkvError as exc:
            nack(exc)
            return True
        self._stats.add("received_direct")
        self._store(sess, key, direct, dtype, shape, seq, nack, "tcp")
        return True

    def _drain_nccl(self, sess: _Session, n: Any, direction: str = "push") -> None:
        """Receive and discard ``n`` bytes the sender already posted on one of the session's communicators."""
        comm = sess.nccl.get(direction)
        if comm is None or comm.state != "ready":
            return  # no communicator: the sender cannot have posted anything
        if isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= self._cfg.max_message_bytes:
            try:
                buf = self._pool.try_alloc(n, overflow=True)
                assert buf is not None
                comm.recv(buf.data, comm.stream)
                ev = torch.cuda.Event()
                ev.record(comm.stream)
                self._release_after(buf, ev)
                self._stats.add("drained_items")
                return
            except P2pkvError as exc:
                log.warning("draining a refused NCCL tensor from %s failed: %s", sess, exc)
        # size unknown (or no memory for it): end the communicator on both sides instead of shifting data
        self._end_session_comm(sess, direction, TransportError("refused an NCCL tensor that could not be drained"))

    def _store(self, sess: _Session, key: TransferKey, buf: Held, dtype: torch.dtype, shape: tuple[int, ...],
               seq: int, nack: Nack, x: str) -> None:
        """Put a fully received tensor in the inbox and ack it, or release it and nack why not."""
        if key in self._incoming_keys:  # (a request reserved the key while this tensor moved on a GPU)
            buf.release()
            nack(DuplicateKey("this key belongs to a request on its way (send_request)", key=key))
            return
        err = self._inbox.deliver(key, buf, dtype, shape, src=sess.ident)
        if err is not None:
            buf.release()
            nack(err)
            return
        _trace.mark("rx.delivered", key)
        self._stats.add("bytes_received", buf.nbytes)
        self._stats.add("tensors_received")
        self._stats.add(f"received_{x}")
        self._ack(sess.ident, seq)

    def _ack(self, ident: bytes, seq: int) -> None:
        """Queue an ack; the acks of one burst of messages go back as one ``acks`` message."""
        pend = self._pending_acks.get(ident)
        if pend is None:
            self._pending_acks[ident] = [seq]
        else:
            pend.append(seq)

    def _flush_acks(self) -> None:
        pending, self._pending_acks = self._pending_acks, {}
        for ident, seqs in pending.items():
            if len(seqs) == 1:
                self._reply(ident, "ack", seq=seqs[0])
            else:
                self._reply(ident, "acks", seqs=seqs)

    def _recv_payload(self, buf: Buffer) -> int:
        if buf.data.device.type == "cuda" and self._pinned is not None:
            stage = self._pinned.try_alloc(buf.nbytes)
            if stage is not None:
                with stage:
                    got = tcp.recv_payload_into(self._router, stage.data)
                    if got == buf.nbytes:
                        buf.data.copy_(stage.data)
                    return got
        return tcp.recv_payload_into(self._router, buf.data)

    def _recv_gpu(self, sess: _Session, msg: dict[str, Any], key: TransferKey, dtype: torch.dtype,
                  shape: tuple[int, ...], buf: Buffer, nack: Nack) -> None:
        """Receive a CUDA IPC or NCCL tensor into ``buf``; deliver and ack once the GPU is done."""
        x, n, seq = msg["x"], msg["n"], msg["seq"]
        ident_of = sess.ident
        comm = None
        try:
            if x == "ipc":
                src = self._ipc_view(sess, sess.caps, sess.eid, msg.get("ipc"), n)
                stream = self._copy_stream
                with torch.cuda.stream(stream):
                    buf.data.copy_(src, non_blocking=True)
            else:
                comm = sess.nccl["push"]
                stream = comm.stream
                comm.recv(buf.data, stream)
        except P2pkvError as exc:
            buf.release()
            nack(exc)
            return
        ev = torch.cuda.Event()
        ev.record(stream)
        _trace.mark("rx.posted", key)

        def done(ok: bool) -> None:
            _trace.mark("rx.io_done", key)
            if not ok or (comm is not None and comm.state != "ready"):
                if comm is not None and sess.nccl.get("push") is comm:
                    # the receive may still write into the buffer: end the communicator first
                    self._end_session_comm(sess, "push", TransportError("an NCCL receive missed its deadline"))
                self._release_after(buf, ev)  # once the (now aborted) receive has ended
                if self._sessions.get(sess.ident) is sess:
                    self._reply(ident_of, "nack", seq=seq, code="transport", msg=f"{x} transfer did not complete")
                return
            self._store(sess, key, buf, dtype, shape, seq, nack, x)

        done.tkey = key  # type: ignore[attr-defined]  # mypy has no function attributes; Completer traces it
        self._completer.add(ev, done, time.monotonic() + self._cfg.timeout_s, blocking=comm is None)

    def _credit_violation(self, sess: _Session, err: P2pkvError) -> bool:
        """Count data or an eager offer beyond the credit granted to ``sess``; a session that keeps
        doing it is dropped (True: it was, and told why)."""
        self._stats.add("credit_violations")
        sess.violations += 1
        if sess.violations < _MAX_CREDIT_VIOLATIONS:
            return False
        self._reply(sess.ident, "err", code="protocol",
                    msg=f"{sess.violations} credit violations (the last: {err.message[:200]}): session dropped")
        self._lose_session(sess, "credit violations")
        return True

    def _charge(self, sess: _Session) -> int:
        """Pool bytes ``sess`` holds or may still make us hold; its credit window bounds it. Its
        credit (also revoked credit not answered yet), its eager offers not admitted yet, its
        admitted requests, and its data waiting unclaimed in the inbox (until a caller claims it)."""
        return (sess.outstanding + sess.revoked + sess.eager_held + sess.reserved
                + self._inbox.held_by(sess.ident))

    def _holding(self) -> set[bytes]:
        """The sessions that hold something of the pool (a charge, see _charge)."""
        return {s.ident for s in self._sessions.values() if self._charge(s) > 0}

    def _limit(self, sess: _Session, holding: set[bytes]) -> int:
        """What ``sess`` may hold in all (its charge's bound; ``holding`` from _holding): its credit
        window; and while other sessions hold something, a fair share of the pool that leaves one
        share for a session holding nothing yet, ``pool // (others + 2)``. However many sessions hold
        all they may, one that comes later finds room (what was taken before the others came goes
        back as it is used, expires or is revoked)."""
        window = self._cfg.effective_credit_bytes
        others = len(holding) - (sess.ident in holding)
        return window if others == 0 else min(window, self._pool.capacity // (others + 2))

    def _room(self) -> int:
        """Pool bytes that may still be promised: the arena's free bytes, less what overflow buffers
        hold outside it, less what is promised but not allocated yet (credit, revoked credit that may
        still be used, eager offers not admitted yet, admitted requests whose buffers are still being
        taken). May be negative (memory taken by others)."""
        promised = sum(s.outstanding + s.revoked + s.eager_held + s.filling for s in self._sessions.values())
        return self._pool.room - promised

    def _grant_credit(self) -> None:
        """Answer the waiting credit requests (oldest first) from the room no one was promised,
        each within what its session's window leaves (see _charge)."""
        waiting = sorted((s for s in self._sessions.values() if s.creq is not None), key=lambda s: s.creq_t)
        if not waiting:
            return
        room = self._room()
        window = self._cfg.effective_credit_bytes
        holding = self._holding()
        now = time.monotonic()
        for sess in waiting:
            if sess.revoking or sess.creq is None:
                continue  # granted once it answered our revocation (or that timed out)
            need, want = sess.creq
            charge = self._charge(sess)
            own = self._limit(sess, holding) - charge
            if need > own:
                # its own window (or share) is full (credit, requests, data it left unclaimed): it
                # waits for itself, never in front of other sessions
                self._want_mem = True
                if need <= window - charge:
                    self._starved_t = now  # held back by its share only: idle credit elsewhere is taken back
                continue
            g = min(room, own, max(want, need, window // 4))
            if g < need:
                self._want_mem = True
                self._starved_t = now  # idle credit held elsewhere is taken back for it
                if now - sess.creq_t > self._cfg.effective_peer_timeout_s:
                    break  # waited long enough: later requesters wait behind it (no starvation of big ones)
                continue  # others that fit are served meanwhile
            sess.outstanding += g
            room -= g
            holding.add(sess.ident)
            sess.creq = None
            sess.last_use = now
            self._reply(sess.ident, "grant", n=g)

    def _revoke_idle_credit(self, now: float) -> None:
        """While credit or an offer waits for room, take back the credit that sessions left unused
        for a while (``crev``). It is taken at once: from then on only data the peer sent before it
        saw the revocation may still come on it (``revoked``), until the peer answers (``cret``,
        whatever it says) or ``peer_timeout_s`` passed; then it is free for others. A session
        being revoked gets no new credit until then."""
        cfg = self._cfg
        idle = 4 * cfg.effective_heartbeat_s
        starved = now - self._starved_t < 2 * _TICK_S + 0.05
        for sess in list(self._sessions.values()):
            if sess.revoking:
                if now - sess.revoking > cfg.effective_peer_timeout_s:
                    self._stats.add("credit_revoked")
                    sess.revoked = 0  # never answered: data on it is refused from now on
                    sess.revoking = 0.0
                    self._mem_dirty = True  # grant the freed room
            elif (starved or now - sess.blocked_t < 2 * _TICK_S + 0.05) and sess.outstanding > 0 \
                    and now - sess.last_use > idle:
                self._revoke_credit(sess, now)

    def _revoke_credit(self, sess: _Session, now: float) -> None:
        """Take back all the unused credit of ``sess`` now (``crev``, see _revoke_idle_credit). Its
        charge stays what it was until the peer answers (data it sent before it saw the revocation
        may still come on it): it never gets more than its window."""
        sess.revoking = now
        sess.revoked += sess.outstanding
        self._reply(sess.ident, "crev", n=sess.outstanding)
        sess.outstanding = 0
