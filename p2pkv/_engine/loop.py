"""The progress loop: the I/O thread that owns every socket, runs commands from callers
and GPU completions, and fires the timers (deadlines, heartbeats, TTL); plus shutdown.
"""

from __future__ import annotations

import errno
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import zmq

from ..control.messages import encode
from ..errors import (EngineClosed, P2pkvError, PeerLost, TransferAborted,
                      TransferTimeout, TransportError)
from ..handles import TransferState
from ..mailbox import Held
from ..request import RequestState
from .state import (_LOCAL_ARENAS, _TICK_S, _Peer,
                    log)
from .state import _PullItem, _SendItem
from .base import MakeError, _EngineBase


class _ProgressLoop(_EngineBase):
    """Mixin of :class:`p2pkv.Engine` (shares its state; see :mod:`p2pkv._engine.base`)."""


    def _internal_error(self, where: str) -> None:
        """Count (and log, at most once a second) an unexpected exception caught on the I/O thread."""
        self._stats.add("internal_errors")
        now = time.monotonic()
        if now - getattr(self, "_last_internal_log", 0.0) >= 1.0:
            self._last_internal_log = now
            log.exception("p2pkv internal error in %s (the engine keeps running)", where)

    def _step(self, events: dict) -> bool:
        """One pass of the loop over the polled ``events``; True when the engine stops."""
        if self._wake_r in events:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        # Cleared after emptying the pipe and before draining: a command queued
        # from here on either is drained below or writes a fresh wake-up byte.
        self._wake_sent = False
        if self._cmds:
            if self._drain_commands():
                return True
            self._flush_acks()
        fast = self._fast
        if fast.bell_fd is not None and fast.bell_fd in events:
            fast.drain_bell()
        fast.poll()
        if self._router in events:
            self._pump_router()
        if self._zap is not None and self._zap in events:
            self._pump_zap()
        if self._rmon in events:
            self._pump_router_monitor()
        for sock in list(events):
            peer = self._peer_by_sock.get(sock)
            if peer is not None:
                self._pump_peer(peer)
                continue
            peer = self._peer_by_mon.get(sock)
            if peer is not None:
                self._pump_monitor(peer)
        if self._mem_dirty:
            self._mem_dirty = False
            self._want_mem = False  # whatever still waits sets it again
            self._grant_credit()
            self._admit()
            for peer in list(self._peers.values()):
                if peer.queue and peer.ready:  # sends waiting for a staging buffer
                    self._pump_sends(peer)
        now = time.monotonic()
        if now >= self._next_tick:  # timers scan whole queues: at most every 10 ms
            self._next_tick = now + 0.01
            self._tick()
        return False

    def _drain_commands(self) -> bool:
        while self._cmds:
            cmd = self._cmds.popleft()
            op = cmd[0]
            try:
                if op == "stop":
                    self._say_goodbye()
                    return True
                if op == "gpu":
                    cmd[1](cmd[2])
                elif op == "send":
                    self._cmd_send(cmd[1], cmd[2])
                elif op == "pull":
                    self._cmd_pull(cmd[1], cmd[2])
                elif op == "cancel_pull":
                    peer = self._peers.get(cmd[1])
                    pull: _PullItem = cmd[2]
                    if peer is not None:
                        if peer.pulls.get(pull.seq) is pull:
                            del peer.pulls[pull.seq]
                        if pull in peer.pull_waiting:  # never sent later
                            peer.pull_waiting.remove(pull)
                elif op == "cancel_connect":
                    peer = self._peers.get(cmd[1])
                    if peer is not None and cmd[2] in peer.connect_waiters:
                        peer.connect_waiters.remove(cmd[2])
                elif op == "connect":
                    self._cmd_connect(cmd[1], cmd[2])
                elif op == "published":
                    self._serve_parked(cmd[1])
                elif op == "abort":
                    self._do_abort(cmd[1], broadcast=cmd[2], reason="transfer aborted locally")
                elif op == "offer":
                    self._cmd_offer(cmd[1], cmd[2])
                elif op == "oflush":
                    peer = self._peers.get(cmd[1])
                    if peer is not None:
                        self._flush_requests(peer)
                elif op == "opost":
                    dst: _Peer = cmd[1]
                    req = cmd[2]
                    if self._peers.get(dst.addr) is dst and req.seq in dst.reqs:
                        dst.sock.send(encode("opost", seq=req.seq, idx=cmd[3], ev=cmd[4]))
                        dst.last_tx = time.monotonic()
                elif op == "ofail":
                    self._fail_request(cmd[1], RequestState.FAILED, cmd[2])
                elif op == "odone":
                    self._request_done(cmd[1])
                elif op == "mq":
                    peer = self._get_peer(cmd[1])
                    if peer.ready:
                        peer.sock.send(encode("mq"))
                        peer.last_tx = time.monotonic()
                    else:
                        peer.mq_pending = True
                elif op == "rdone":
                    peer = self._get_peer(cmd[1])
                    if peer.ready:
                        peer.sock.send(encode("rdone", tid=cmd[2]))
                        peer.last_tx = time.monotonic()
                    else:
                        peer.rdone_pending.append(cmd[2])
                elif op == "fast_ask":
                    peer = self._peers.get(cmd[1])
                    if peer is not None:
                        self._fast.ask(peer)
                elif op == "fast_ferr":
                    _, ident, seq, err = cmd
                    if ident in self._sessions and seq >= 0:
                        self._reply(ident, "ferr", seq=seq, code=err.code, msg=err.message[:300])
            except P2pkvError as exc:
                log.warning("command %s failed: %s", op, exc)
                def same(failed: P2pkvError = exc) -> P2pkvError:
                    return failed
                self._fail_command(cmd, same)
            except Exception as exc:  # a bug in one command must not stop the engine
                self._internal_error(f"command {op}")
                err = f"internal error: {type(exc).__name__}: {exc}"[:300]
                self._fail_command(cmd, functools.partial(P2pkvError, err))
        return False

    def _fail_command(self, cmd: tuple, make_error: MakeError) -> None:
        """Fail the caller's work item carried by ``cmd`` (so no handle or wait stays pending)."""
        try:
            op = cmd[0]
            if op == "send":
                item: _SendItem = cmd[2]
                for peer in self._peers.values():
                    if item in peer.queue:
                        peer.queue.remove(item)
                    if peer.inflight.get(item.seq) is item:
                        del peer.inflight[item.seq]
                self._finish_send(item, TransferState.FAILED, make_error())
            elif op == "pull":
                pull: _PullItem = cmd[2]
                for peer in self._peers.values():
                    if peer.pulls.get(pull.seq) is pull:
                        del peer.pulls[pull.seq]
                    if pull in peer.pull_waiting:
                        peer.pull_waiting.remove(pull)
                pull.finish(error=make_error())
            elif op == "connect":
                w = cmd[2]
                for peer in self._peers.values():
                    if w in peer.connect_waiters:
                        peer.connect_waiters.remove(w)
                w.error = make_error()
                w.event.set()
            elif op == "offer":
                req = cmd[2]
                for peer in self._peers.values():
                    if req in peer.req_waiting:
                        peer.req_waiting.remove(req)
                req._set(RequestState.FAILED, make_error())
        except Exception:  # pragma: no cover - never let cleanup stop the loop
            self._internal_error("failing a command")

    def _post_gpu(self, callback: Callable[[bool], None], ok: bool) -> None:
        """Called by the CUDA completion thread: run ``callback(ok)`` on the I/O thread."""
        self._cmds.append(("gpu", callback, ok))
        self._wake(b"g")

    def _release_after(self, buf: Held, event: Any) -> None:
        """Release ``buf`` once the GPU work reading or writing it (``event``) is done."""
        if event is None or event.query() or self._completer is None:
            buf.release()
        else:
            self._completer.add(event, lambda ok: buf.release(), time.monotonic() + 3600)

    def _do_abort(self, tid: str, *, broadcast: bool, reason: str, skip: bytes | None = None,
                  src: object = None) -> None:
        self._fast.forget(tid)
        self._fast.abort_tid(tid, reason)
        self._regions.abort(tid, reason)
        for buf in self._inbox.abort(tid, reason, src) + self._outbox.abort(tid, reason, src):
            buf.release()
        if broadcast:  # decided before the work is failed below: who carried this transfer
            # every peer we dialed (we chose them; a consumer may wait for keys not sent yet),
            # but of the peers that dialed us only those whose session carried the transfer
            tell_peers = [p for p in self._peers.values() if p.ready]
            tell_sessions = [s for s in self._sessions.values() if s.ident != skip and self._session_carries(s, tid)]
        for inc in [i for i in self._incoming.values() if i.transfer_id == tid and not i.failed]:
            if not inc.admitted:
                try:
                    inc.sess.offers.remove(inc)
                except ValueError:
                    pass
            self._fail_incoming(inc, TransferAborted(reason, key=tid), reply=inc.sess.ident != skip,
                                keys_error=False)
        for peer in list(self._peers.values()):
            for req in [r for r in peer.req_waiting if r.transfer_id == tid]:
                peer.req_waiting.remove(req)
                req._set(RequestState.ABORTED, TransferAborted(reason, key=tid))
            for req in [r for r in peer.reqs.values() if r.transfer_id == tid]:
                self._fail_request(req, RequestState.ABORTED, TransferAborted(reason, key=tid))
        for peer in list(self._peers.values()):
            for item in [i for i in peer.queue if i.key.transfer_id == tid]:
                peer.queue.remove(item)
                self._finish_send(item, TransferState.ABORTED, TransferAborted(reason, key=item.key))
            for seq, item in [(s, i) for s, i in peer.inflight.items() if i.key.transfer_id == tid]:
                del peer.inflight[seq]
                self._finish_send(item, TransferState.ABORTED, TransferAborted(reason, key=item.key))
            for seq, pull in [(s, p) for s, p in peer.pulls.items() if p.key.transfer_id == tid]:
                del peer.pulls[seq]
                pull.finish(error=TransferAborted(reason, key=pull.key))
        self._abort_parked(tid, reason)
        if broadcast:
            for peer in tell_peers:
                if self._peers.get(peer.addr) is peer:
                    peer.sock.send(encode("abort", tid=tid))
            for sess in tell_sessions:
                if self._sessions.get(sess.ident) is sess:
                    self._reply(sess.ident, "abort", tid=tid)

    @staticmethod
    def _note_tid(holder: Any, tid: str) -> None:
        """Remember that ``holder`` (a peer or session) carried transfer ``tid`` (bounded)."""
        tids = holder.tids
        tids[tid] = None
        tids.move_to_end(tid)
        if len(tids) > 4096:
            tids.popitem(last=False)

    def _session_carries(self, sess: Any, tid: str) -> bool:
        return (tid in sess.tids or any(pp.sess is sess for pp in self._parked.for_tid(tid))
                or any(i.sess is sess and i.transfer_id == tid for i in self._incoming.values()))

    def _tick_gpu(self, now: float) -> None:
        for peer in list(self._peers.values()):
            for direction, comm in list(peer.nccl.items()):
                if comm.state == "init":
                    state = comm.poll()
                    if state == "failed":
                        self._fail_nccl(peer, direction, TransportError(comm.error or "NCCL init failed",
                                                                        peer=peer.addr))
                    elif state == "ready" and direction == "pull" and peer.pull_waiting:
                        waiting, peer.pull_waiting = peer.pull_waiting, []
                        for pull in waiting:
                            self._send_pull(peer, pull)
            if peer.queue and peer.ready:
                self._pump_sends(peer)
            if peer.req_waiting and peer.ready:
                self._pump_offers(peer)
        if any(sess.offers for sess in self._sessions.values()):
            self._admit()
        for sess in list(self._sessions.values()):
            comm = sess.nccl.get("push")
            if sess.nccl_backlog and comm is not None and comm.poll() != "init":
                backlog, sess.nccl_backlog = sess.nccl_backlog, []
                for msg in backlog:
                    self._on_data(sess, msg)
            for direction, comm in list(sess.nccl.items()):
                if comm.poll() == "failed":
                    log.warning("NCCL %s communicator with %s failed: %s", direction, sess, comm.error)
                    sess.nccl.pop(direction).abort()
        if self._retry_parked:
            self._retry_parked = False
            self._retry_parked_pulls()
        if self._lent:
            for k in [k for k, (_, dl) in self._lent.items() if dl < now]:
                self._lent.pop(k)[0].release()

    def _tick(self) -> None:
        now = time.monotonic()
        if self._want_mem:
            self._mem_dirty = True  # retry what waits for memory, also if a wake-up was missed
        cfg = self._cfg
        if self._cuda:
            self._tick_gpu(now)
        for peer in list(self._peers.values()):
            if peer.ready:
                if now - peer.last_rx > cfg.effective_peer_timeout_s:
                    silent = now - peer.last_rx
                    self._lose_peer(peer, functools.partial(PeerLost, f"peer silent for {silent:.2f}s", peer=peer.addr))
                    continue
                if now - peer.last_tx >= cfg.effective_heartbeat_s:
                    peer.sock.send(encode("ping"))
                    peer.last_tx = now
                if (peer.credit > 0 and not peer.queue and not peer.inflight
                        and now - peer.idle_since > 4 * cfg.effective_heartbeat_s):
                    peer.sock.send(encode("cret", n=peer.credit))
                    peer.credit = 0
            elif not peer.busy() and now - peer.created > cfg.effective_peer_timeout_s:
                self._close_peer(peer)  # nobody waits for an unreachable peer
                continue
            for item in [i for i in peer.queue if i.deadline < now]:
                peer.queue.remove(item)
                # say what was still missing when the deadline (possibly 0 s) passed, not a guess at why
                why = ("no credit from the receiver yet (it is full, or has not answered)" if peer.ready else
                       "connected, but the peer had not finished the handshake" if peer.connects else
                       "peer unreachable" if now - peer.created >= cfg.effective_peer_timeout_s else
                       "not connected to the peer yet")
                timeout = round(item.deadline - item.handle.t_start, 3)
                self._finish_send(item, TransferState.FAILED, TransferTimeout(
                    f"send not started within its deadline (timeout={timeout:g}s): {why}", key=item.key,
                    peer=peer.addr))
            for seq, item in [(s, i) for s, i in peer.inflight.items() if i.deadline < now]:
                del peer.inflight[seq]
                self._finish_send(item, TransferState.FAILED, TransferTimeout(
                    f"no acknowledgement from the receiver within the deadline "
                    f"(timeout={round(item.deadline - item.handle.t_start, 3):g}s)", key=item.key, peer=peer.addr))
            if peer.req_waiting or peer.reqs:
                self._tick_requests(peer, now)
            for pull in [p for p in peer.pull_waiting if p.deadline < now or p.event.is_set()]:
                peer.pull_waiting.remove(pull)  # on every engine (CPU too): never sent after its deadline
                pull.finish(error=TransferTimeout("pull could not start before its deadline (no connection or "
                                                  "NCCL communicator)", key=pull.key, peer=peer.addr))
            if peer.connect_waiters:
                for w in [w for w in peer.connect_waiters if w.deadline < now or w.event.is_set()]:
                    peer.connect_waiters.remove(w)
                    if not w.event.is_set():
                        w.error = TransferTimeout(f"no handshake with {peer.addr} before the deadline",
                                                  peer=peer.addr)
                        w.event.set()
            for seq, pull in [(s, p) for s, p in peer.pulls.items() if p.deadline + 0.25 < now]:
                del peer.pulls[seq]
                pull.finish(error=TransferTimeout(f"pull got no data within {pull.timeout:.3g}s", key=pull.key,
                                                  peer=peer.addr))
        if self._incoming:
            self._tick_incoming(now)
        self._fast.tick(now)
        self._fast.tick_tx(now)
        self._regions.tick(now)
        if self._probe_due:
            self._probe_sessions(now)
        self._check_buffered(now)
        if self._sessions:
            self._revoke_idle_credit(now)
        if self._budgets and now >= self.__dict__.get("_next_budget_scan", 0.0):
            self.__dict__["_next_budget_scan"] = now + 1.0
            self._forget_idle_budgets(now)
        for sess in [s for s in self._sessions.values() if now - s.last_rx > cfg.effective_peer_timeout_s]:
            self._lose_session(sess, f"silent for {now - sess.last_rx:.2f}s")
        if self._parked:
            self._expire_parked(now)
        if self._tracked:
            still = []
            for tracker, buf in self._tracked:
                if tracker.done:
                    buf.release()
                else:
                    still.append((tracker, buf))
            self._tracked = still
        if now >= self._next_expire:
            self._next_expire = now + min(0.5, cfg.ttl_s / 4)
            for buf in self._inbox.expire(now) + self._outbox.expire(now):
                buf.release()
                self._stats.add("evicted")

    def _say_goodbye(self) -> None:
        for peer in self._peers.values():
            if peer.ready:
                try:
                    peer.sock.send(encode("bye"), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass

    def _fail_peer_work(self, peer: _Peer, make_error: MakeError) -> int:
        """Fail every send, pull and connect waiting on ``peer``; return how many there were."""
        n = 0
        for item in list(peer.queue) + list(peer.inflight.values()):
            if self._finish_send(item, TransferState.FAILED, make_error()):
                n += 1
        for pull in list(peer.pulls.values()) + peer.pull_waiting:
            pull.finish(error=make_error())
            n += 1
        for w in peer.connect_waiters:
            w.error = make_error()
            w.event.set()
        for req in list(peer.req_waiting) + list(peer.reqs.values()):
            if req._set(RequestState.FAILED, make_error()):
                n += 1
            if req.keep and req.last_event is not None and self._completer is not None:
                keep = req.keep
                self._completer.add(req.last_event, lambda ok, keep=keep: None, time.monotonic() + 60)
            req.keep = []
        peer.req_waiting.clear()
        peer.reqs.clear()
        with peer.post_lock:
            peer.req_order.clear()
        peer.queue.clear()
        peer.inflight.clear()
        peer.pulls.clear()
        peer.pull_waiting.clear()
        peer.connect_waiters.clear()
        return n

    def _fail_everything(self, make_error: MakeError) -> None:
        for peer in list(self._peers.values()):
            self._fail_peer_work(peer, make_error)
        while self._cmds:
            cmd = self._cmds.popleft()
            if cmd[0] == "send":
                self._finish_send(cmd[2], TransferState.FAILED, make_error())
            elif cmd[0] == "pull":
                cmd[2].finish(error=make_error())
            elif cmd[0] == "connect":
                cmd[2].error = make_error()
                cmd[2].event.set()
            elif cmd[0] == "offer":
                cmd[2]._set(RequestState.FAILED, make_error())

    def _teardown(self) -> None:
        th = self._thread
        if th is not None and th.is_alive():  # pragma: no cover - a stuck I/O thread
            log.error("p2pkv I/O thread did not stop; closing sockets anyway")
        for buf in self._inbox.fail_all(lambda: EngineClosed("closed")) + \
                self._outbox.fail_all(lambda: EngineClosed("closed")):
            buf.release()
        for _, buf in self._tracked:
            buf.release()
        self._tracked = []
        self._release_local_ends()
        for peer in list(self._peers.values()):
            self._close_peer(peer)
        self._fast.close()
        self._regions.close()
        for sess in list(self._sessions.values()):
            self._release_gpu_state(sess)
            if sess.watcher is not None:
                sess.watcher.close()
        for inc in list(self._incoming.values()):
            with inc.lock:
                bufs = [b for b in inc.bufs if b is not None]
                inc.bufs = [None] * len(inc.bufs)
                inc.failed = True
            for b in bufs:
                b.release()
        self._incoming.clear()
        for buf, _ in self._lent.values():
            buf.release()
        self._lent.clear()
        if self._loop_comm is not None:
            self._loop_comm.abort()
            self._loop_comm = None
        if self._completer is not None:
            self._completer.close()
        if self._release_watcher is not None:
            self._release_watcher.close()
        _LOCAL_ARENAS.pop(self.eid, None)
        if self._pinned is not None:
            self._pinned.close()
        try:
            try:
                self._router.disable_monitor()
            except zmq.ZMQError:
                pass
            self._rmon.close(0)
            if self._zap is not None:
                self._zap.close(0)
            self._router.close(0)
            self._ctx.destroy(linger=0)
        finally:
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._pool.close()
            if self._shm_fd >= 0:
                os.close(self._shm_fd)  # peers that mapped the pool keep their mappings
                self._shm_fd = -1


def io_main(wref: Any) -> None:
    """The I/O thread: runs the engine's progress loop while the engine exists.

    It holds the engine only through a weak reference between turns, so an
    engine that its owner forgot to close can still be collected (its
    ``__del__`` warns and closes it).
    """
    eng = wref()
    if eng is None:
        return
    if eng._cuda:
        torch.cuda.set_device(eng._device)
    poller = eng._poller  # polled without holding the engine
    del eng
    while True:
        try:
            events = dict(poller.poll(int(_TICK_S * 1000)))
        except zmq.ZMQError as exc:
            if exc.errno == errno.EINTR:
                continue
            return  # the context was torn down under us: the engine is gone
        eng = wref()
        if eng is None:
            return
        try:
            stop = eng._step(events)
        except Exception:  # a bug or a hostile message must never stop the engine
            eng._internal_error("the I/O loop")
            stop = False
        if stop:
            eng._fail_everything(functools.partial(EngineClosed, f"engine {eng.address} closed"))
            return
        del eng
