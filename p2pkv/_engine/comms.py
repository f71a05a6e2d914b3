"""NCCL communicators per peer and direction (``push``, ``pull``, ``req``): created lazily,
non-blocking init with a deadline, aborted (locally, at once) on failure or deadline.
"""

from __future__ import annotations

import time
from typing import Any


from ..control.messages import encode
from ..errors import (P2pkvError, ProtocolError, TransportError)
from ..handles import TransferState
from ..request import RequestState
from .state import (_Peer,
                    _Session)
from .base import _EngineBase


class _CommManager(_EngineBase):
    """Mixin of :class:`p2pkv.Engine` (shares its state; see :mod:`p2pkv._engine.base`)."""

    def _nccl_kwargs(self) -> dict[str, Any]:
        c = self._cfg
        return {"deadline": time.monotonic() + c.nccl_init_timeout_s, "min_ctas": c.nccl_min_ctas,
                "max_ctas": c.nccl_max_ctas, "buffsize": c.nccl_buffsize}

    def _peer_comm(self, peer: _Peer, direction: str) -> Any:
        """The ready communicator of ``direction`` to ``peer``, starting it if needed; None while it initialises."""
        comm = peer.nccl.get(direction)
        if comm is None:
            from ..transport.nccl import Comm, new_unique_id

            uid = new_unique_id()
            peer.sock.send(encode("nccl", uid=uid, dir=direction))
            peer.last_tx = time.monotonic()
            try:
                comm = Comm(2, 0, uid, self._device, **self._nccl_kwargs())
            except TransportError as exc:
                self._fail_nccl(peer, direction, exc)
                return None
            peer.nccl[direction] = comm
            self._stats.add("nccl_comms")
        state = comm.poll()
        if state == "ready":
            return comm
        if state == "failed":
            self._fail_nccl(peer, direction, TransportError(comm.error or "NCCL communicator failed", peer=peer.addr))
        return None

    def _loopback_comm(self) -> Any:
        comm = self._loop_comm
        if comm is None:
            from ..transport.nccl import Comm, new_unique_id

            comm = self._loop_comm = Comm(1, 0, new_unique_id(), self._device, **self._nccl_kwargs())
            self._stats.add("nccl_comms")
        state = comm.poll()
        if state == "ready":
            return comm
        if state == "failed":
            self._loop_comm = None
            for peer in self._peers.values():
                if self._is_self(peer):
                    self._fail_nccl(peer, "push", TransportError(comm.error or "NCCL loopback failed"))
        return None

    def _fail_nccl(self, peer: _Peer, direction: str, exc: P2pkvError) -> None:
        """A communicator could not be made: fail what waited for it; the next use retries."""
        comm = peer.nccl.pop(direction, None)
        if comm is not None:
            comm.abort()
        if direction == "req":
            for req in [r for r in peer.req_waiting if self._request_transport(peer) == "nccl"]:
                peer.req_waiting.remove(req)
                req._set(RequestState.FAILED, exc)
            self._end_req_comm(peer, exc)
        elif direction == "push":
            for item in [i for i in peer.queue if self._item_transport(peer, i) == "nccl"]:
                peer.queue.remove(item)
                self._finish_send(item, TransferState.FAILED, exc)
        else:
            for pull in [p for p in peer.pull_waiting if self._pull_transport(peer, p) == "nccl"]:
                peer.pull_waiting.remove(pull)
                pull.finish(error=exc)

    def _on_nccl_request(self, sess: _Session, msg: dict[str, Any]) -> None:
        direction = msg["dir"]
        if direction not in ("push", "pull", "req"):
            raise ProtocolError(f"NCCL direction must be 'push', 'pull' or 'req', got {direction!r:.20}")
        if not self._nccl_ok:
            self._reply(sess.ident, "err", code="transport", msg="this engine has no NCCL (CPU device or no nccl4py)")
            return
        old = sess.nccl.pop(direction, None)
        if old is not None:
            old.abort()
        from ..transport.nccl import Comm

        try:
            sess.nccl[direction] = Comm(2, 1, msg["uid"], self._device, **self._nccl_kwargs())
        except TransportError as exc:
            self._reply(sess.ident, "err", code="transport", msg=str(exc)[:500])
            return
        self._stats.add("nccl_comms")
        self._reply(sess.ident, "nok", dir=direction)

    def _end_session_comm(self, sess: _Session, direction: str, err: P2pkvError) -> None:
        """Abort a session's communicator (its posted operations end), fail what it carried, tell the peer."""
        comm = sess.nccl.pop(direction, None)
        if comm is not None:
            comm.abort()
        sess.nccl_backlog.clear() if direction == "push" else None
        if direction == "req":
            for inc in [i for i in list(sess.admitted.values()) + list(sess.offers) if i.x == "nccl"]:
                self._fail_incoming(inc, err)
        elif comm is not None:
            self._reply(sess.ident, "err", code="transport", msg=f"NCCL {direction} communicator ended: {err.message}",
                        dir=direction)

