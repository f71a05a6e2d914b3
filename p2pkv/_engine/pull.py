"""The pull path: ``publish`` parks data here, ``pull`` fetches it from a peer over TCP,
CUDA IPC or NCCL; a pull may come before the publish and waits until its deadline.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
import zmq

from .. import _tensors as T
from ..control.messages import encode
from ..errors import (P2pkvError, PeerLost, PoolExhausted, ProtocolError, ShapeMismatch, TransferTimeout,
                      TransportError)
from ..keys import TransferKey
from ..mailbox import Slot
from ..transport import tcp
from .state import (_ParkedPull, _Peer, _local_arena,
                    _PullItem, _Session, log)
from .base import _EngineBase


#: Pulls one session may have waiting here for their keys to be published; beyond, a pull is
#: refused at once (the puller gets ``PoolExhausted``). ``Engine.pull`` blocks its caller, so an
#: honest peer has about as many waiting as it has threads pulling.
MAX_PARKED_PER_SESSION = 1024


_K = TypeVar("_K")


def _unindex(index: dict[_K, dict[_ParkedPull, None]], k: _K, pp: _ParkedPull) -> None:
    pps = index.get(k)
    if pps is not None:
        pps.pop(pp, None)
        if not pps:
            del index[k]


class _ParkedPulls:
    """The pulls waiting for their key to be published, indexed by key (served on publish), by
    transfer id (aborts), by session (its cap, its loss) and by deadline (expired in order): every
    operation costs O(log n) at most, so many waiting pulls cannot slow the I/O thread down."""

    def __init__(self, items: Iterable[_ParkedPull] = ()) -> None:
        self._by_key: dict[TransferKey, dict[_ParkedPull, None]] = {}
        self._by_tid: dict[str, dict[_ParkedPull, None]] = {}
        self._by_sess: dict[_Session, dict[_ParkedPull, None]] = {}
        self._heap: list[tuple[float, int, _ParkedPull]] = []
        self._order = itertools.count()
        for pp in items:
            self.add(pp)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_sess.values()) if self._by_sess else 0

    def __bool__(self) -> bool:
        return bool(self._by_sess)

    def __iter__(self) -> Iterator[_ParkedPull]:
        return iter([pp for pps in self._by_sess.values() for pp in pps])

    def count(self, sess: _Session) -> int:
        pps = self._by_sess.get(sess)
        return len(pps) if pps is not None else 0

    def add(self, pp: _ParkedPull) -> None:
        self._by_key.setdefault(pp.key, {})[pp] = None
        self._by_tid.setdefault(pp.key.transfer_id, {})[pp] = None
        self._by_sess.setdefault(pp.sess, {})[pp] = None
        heapq.heappush(self._heap, (pp.deadline, next(self._order), pp))
        if len(self._heap) > 64 and len(self._heap) > 4 * len(self):  # drop entries of pulls gone
            self._heap = [h for h in self._heap if self._has(h[2])]
            heapq.heapify(self._heap)

    append = add

    def _has(self, pp: _ParkedPull) -> bool:
        pps = self._by_sess.get(pp.sess)
        return pps is not None and pp in pps

    def remove(self, pp: _ParkedPull) -> None:
        _unindex(self._by_key, pp.key, pp)
        _unindex(self._by_tid, pp.key.transfer_id, pp)
        _unindex(self._by_sess, pp.sess, pp)

    def for_key(self, key: TransferKey) -> list[_ParkedPull]:
        return list(self._by_key.get(key, ()))

    def for_tid(self, tid: str) -> list[_ParkedPull]:
        return list(self._by_tid.get(tid, ()))

    def of_session(self, sess: _Session) -> list[_ParkedPull]:
        return list(self._by_sess.get(sess, ()))

    def expired(self, now: float) -> list[_ParkedPull]:
        """Remove and return the pulls whose deadline passed."""
        out = []
        heap = self._heap
        while heap and heap[0][0] < now:
            pp = heapq.heappop(heap)[2]
            if self._has(pp):
                self.remove(pp)
                out.append(pp)
        return out


class _PullPath(_EngineBase):
    """Mixin of :class:`p2pkv.Engine` (shares its state; see :mod:`p2pkv._engine.base`)."""

    # Engine.__init__ assigns a plain list: kept as the indexed structure.
    @property
    def _parked(self) -> _ParkedPulls:
        parked: _ParkedPulls = self.__dict__["_parked_pulls"]
        return parked

    @_parked.setter
    def _parked(self, value: Iterable[_ParkedPull]) -> None:
        self.__dict__["_parked_pulls"] = value if isinstance(value, _ParkedPulls) else _ParkedPulls(value)

    def _expire_parked(self, now: float) -> None:
        for pp in self._parked.expired(now):
            self._reply(pp.sess.ident, "perr", seq=pp.seq, code="timeout",
                        msg="the key was not published before the pull's deadline")

    def _abort_parked(self, tid: str, reason: str) -> None:
        for pp in self._parked.for_tid(tid):
            self._parked.remove(pp)
            self._reply(pp.sess.ident, "perr", seq=pp.seq, code="aborted", msg=reason)

    def _retry_parked_pulls(self) -> None:
        for pp in list(self._parked):
            if self._try_serve(pp):
                self._parked.remove(pp)

    def _cmd_pull(self, addr: str, item: _PullItem) -> None:
        peer = self._get_peer(addr)
        if not peer.ready:
            peer.pull_waiting.append(item)
            return
        self._send_pull(peer, item)

    def _pull_transport(self, peer: _Peer, item: _PullItem) -> str:
        if not self._cuda or peer.xport == "tcp":
            return "tcp"
        if item.out is not None and item.out.device.type != "cuda":
            return "tcp"
        return peer.xport

    def _send_pull(self, peer: _Peer, item: _PullItem) -> None:
        if item.event.is_set() or item.deadline <= time.monotonic():
            item.finish(error=TransferTimeout("pull could not start before its deadline", key=item.key,
                                              peer=peer.addr))
            return  # timed out or cancelled while waiting: never sent later
        x = self._pull_transport(peer, item)
        if x == "nccl" and self._is_self(peer):
            x = "ipc" if self._ipc_handle is not None else "tcp"  # a pull from ourselves needs no NCCL
        if x == "nccl":
            comm = self._peer_comm(peer, "pull")
            if comm is None:
                peer.pull_waiting.append(item)  # sent once the communicator is up
                return
        item.seq = peer.next_seq()
        peer.pulls[item.seq] = item
        msg: dict[str, Any] = {"seq": item.seq, "key": item.key.to_wire(), "x": x,
                               "to": max(0.0, item.deadline - time.monotonic())}
        if item.out is not None:
            msg["dt"] = T.dtype_name(item.out.dtype)
            msg["sh"] = list(item.out.shape)
        peer.sock.send(encode("pull", **msg))
        peer.last_tx = time.monotonic()

    def _on_pdata(self, peer: _Peer, msg: dict[str, Any]) -> None:
        pull = peer.pulls.pop(msg["seq"], None)
        x = msg["x"]
        if pull is None:
            if x == "ipc":  # cancelled: let the publisher free its buffer
                peer.sock.send(encode("pdone", seq=msg["seq"]))
            return  # tcp frames are drained by the caller
        try:
            key = TransferKey.from_wire(msg["key"])
            dtype = T.dtype_from_name(msg["dt"])
            shape = T.check_shape(msg["sh"])
            n = msg["n"]
            if key != pull.key or n != T.nbytes_of(dtype, shape):
                raise ProtocolError(f"pulled data does not match the request (key {key}, {n} bytes)")
            if n > self._cfg.max_message_bytes:  # checked before anything is allocated
                raise ProtocolError(f"pulled data of {n} bytes exceeds max_message_bytes="
                                    f"{self._cfg.max_message_bytes}")
            if pull.out is not None:
                T.check_out(pull.out, self._device, dtype, shape)
                dst = pull.out
            else:
                try:
                    dst = torch.empty(shape, dtype=dtype, device=self._device)
                except RuntimeError as exc:  # out of memory
                    raise PoolExhausted(f"cannot allocate {n} bytes for pulled data: {exc}"[:300]) from None
            if x == "tcp":
                if not peer.sock.getsockopt(zmq.RCVMORE):
                    raise ProtocolError("pulled data lacks its payload frame")
                got = tcp.recv_payload_into(peer.sock, T.as_bytes(dst))
                if got != n:
                    raise ProtocolError(f"payload of {got} bytes, header said {n}")
                self._stats.add("bytes_pulled", n)
                pull.finish(result=dst)
            elif x == "ipc":
                self._pull_ipc(peer, pull, msg, dst, n)
            elif x == "nccl":
                self._pull_nccl(peer, pull, dst, n)
            else:
                raise ProtocolError(f"unknown transport {x!r:.20} in pulled data")
        except Exception as exc:
            if x == "ipc":
                peer.sock.send(encode("pdone", seq=msg["seq"]))
            if not isinstance(exc, P2pkvError):
                self._internal_error("pulled data")
                exc = ProtocolError(f"pulled data could not be received: {type(exc).__name__}: {exc}"[:300],
                                    key=pull.key, peer=peer.addr)
            pull.finish(error=exc)

    def _pull_ipc(self, peer: _Peer, pull: _PullItem, msg: dict[str, Any], dst: torch.Tensor, n: int) -> None:
        src = self._ipc_view(peer, peer.caps, peer.eid, msg.get("ipc"), n)
        seq = msg["seq"]
        with torch.cuda.stream(self._copy_stream):
            T.as_bytes(dst).copy_(src, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(self._copy_stream)

        def done(ok: bool) -> None:
            if self._peers.get(peer.addr) is peer:
                peer.sock.send(encode("pdone", seq=seq))
            if ok:
                self._stats.add("bytes_pulled", n)
                pull.finish(result=dst)
            else:
                pull.finish(error=TransportError("CUDA IPC copy did not finish in time", key=pull.key))

        self._completer.add(ev, done, pull.deadline + 5, blocking=True)

    def _pull_nccl(self, peer: _Peer, pull: _PullItem, dst: torch.Tensor, n: int) -> None:
        comm = peer.nccl.get("pull")
        if comm is None or comm.state != "ready":
            raise TransportError("no NCCL communicator for this pull", peer=peer.addr)
        comm.recv(T.as_bytes(dst), comm.stream)
        ev = torch.cuda.Event()
        ev.record(comm.stream)

        def done(ok: bool) -> None:
            if ok and comm.state == "ready":
                self._stats.add("bytes_pulled", n)
                pull.finish(result=dst)
                return
            if peer.nccl.get("pull") is comm:
                # the receive may still write into ``dst`` (maybe the caller's out): end it first
                peer.nccl.pop("pull").abort()
            ev.synchronize()  # returns promptly once the communicator is aborted
            pull.finish(error=PeerLost("NCCL receive did not complete", key=pull.key, peer=peer.addr))

        self._completer.add(ev, done, pull.deadline + 5)

    def _ipc_view(self, holder: Any, caps: dict[str, Any], eid: str, desc: Any, n: int) -> torch.Tensor:
        """``n`` bytes of a peer's arena at the offset in ``desc`` (mapped once per peer)."""
        if not isinstance(desc, dict) or not isinstance(desc.get("off"), int) or isinstance(desc.get("off"), bool):
            raise ProtocolError("IPC descriptor must be {'off': int}")
        off = desc["off"]
        local = _local_arena(eid, caps)
        if local is not None:
            if off < 0 or off + n > local.numel():
                raise ProtocolError(f"IPC range [{off}, {off + n}) outside the peer's arena")
            return local[off:off + n]
        if holder.ipc is None:
            info = caps.get("ipc")
            if not isinstance(info, dict) or not isinstance(info.get("handle"), bytes) \
                    or not isinstance(info.get("size"), int):
                raise TransportError("the peer offered no CUDA IPC handle")
            from ..transport.cuda import IpcMapping

            holder.ipc = IpcMapping(info["handle"], info["size"], self._device)
            self._stats.add("ipc_mappings")
        try:
            return holder.ipc.view(off, n)
        except TransportError as exc:
            raise ProtocolError(str(exc)) from None

    def _on_pull(self, sess: _Session, msg: dict[str, Any]) -> None:
        seq = msg["seq"]
        try:
            key = TransferKey.from_wire(msg["key"])
            dt = msg.get("dt")
            sh = msg.get("sh")
            if dt is not None:
                T.dtype_from_name(dt)
            if sh is not None:
                T.check_shape(sh)
        except P2pkvError as exc:
            self._reply(sess.ident, "perr", seq=seq, code=exc.code, msg=str(exc)[:500])
            return
        self._note_tid(sess, key.transfer_id)
        x = msg["x"]
        if x not in ("tcp", "ipc", "nccl") or (x == "ipc" and self._ipc_handle is None) \
                or (x == "nccl" and not self._nccl_ok):
            self._reply(sess.ident, "perr", seq=seq, code="transport",
                        msg=f"transport {x!r:.20} is not available on this engine")
            return
        to = float(msg["to"])
        if not 0.0 <= to < float("inf"):  # NaN, negative or infinite: would never expire
            self._reply(sess.ident, "perr", seq=seq, code="protocol", msg=f"pull timeout must be finite and >= 0, "
                        f"got {to!r}")
            return
        pp = _ParkedPull(sess, seq, key, time.monotonic() + min(to, self._cfg.timeout_s * 4), dt, sh, x)
        if self._try_serve(pp):
            return
        if self._parked.count(sess) >= MAX_PARKED_PER_SESSION:
            self._stats.add("pulls_refused")
            self._reply(sess.ident, "perr", seq=seq, code="pool_exhausted",
                        msg=f"too many pulls from this peer wait here for their keys to be published "
                            f"(at most {MAX_PARKED_PER_SESSION}); pull it again later")
            return
        self._parked.add(pp)

    def _try_serve(self, pp: _ParkedPull) -> bool:
        """Serve a pull if its key is published; True when answered (data or error)."""
        def check(slot: Slot) -> None:
            if pp.dt is not None and T.dtype_name(slot.dtype) != pp.dt:
                raise ShapeMismatch(f"puller's out has dtype {pp.dt} but the data is {T.dtype_name(slot.dtype)}")
            if pp.sh is not None and tuple(pp.sh) != tuple(slot.shape):
                raise ShapeMismatch(f"puller's out has shape {tuple(pp.sh)} but the data has shape "
                                      f"{tuple(slot.shape)}")

        comm = None
        if pp.x == "nccl":
            comm = pp.sess.nccl.get("pull")
            if comm is None:
                self._reply(pp.sess.ident, "perr", seq=pp.seq, code="transport", msg="no NCCL communicator for pulls")
                return True
            state = comm.poll()
            if state == "init":
                self._retry_parked = True
                return False
            if state != "ready":
                self._reply(pp.sess.ident, "perr", seq=pp.seq, code="transport",
                            msg=f"NCCL communicator {state}: {comm.error}")
                return True
        try:
            slot = self._outbox.take_nowait(pp.key, check)
        except P2pkvError as exc:
            self._reply(pp.sess.ident, "perr", seq=pp.seq, code=exc.code, msg=str(exc)[:500])
            return True
        if slot is None:
            err = self._outbox.error_for(pp.key)
            if err is None:
                return False
            self._reply(pp.sess.ident, "perr", seq=pp.seq, code=err.code, msg=err.message)
            return True
        n = slot.buf.nbytes
        raw = slot.buf.data
        meta: dict[str, Any] = dict(seq=pp.seq, key=pp.key.to_wire(), dt=T.dtype_name(slot.dtype),
                                    sh=list(slot.shape), n=n)
        if pp.x == "ipc":
            if self._reply(pp.sess.ident, "pdata", x="ipc", ipc={"off": slot.buf.offset}, **meta):
                self._lent[(pp.sess.ident, pp.seq)] = (slot.buf, time.monotonic() + 2 * self._cfg.timeout_s)
                self._stats.add("pulls_served")
                self._stats.add("bytes_served", n)
            else:
                slot.buf.release()
            return True
        if pp.x == "nccl":
            assert comm is not None  # found ready above
            if not self._reply(pp.sess.ident, "pdata", x="nccl", **meta):
                slot.buf.release()
                return True
            try:
                comm.send(raw, comm.stream)
            except P2pkvError as exc:
                log.warning("NCCL send of a pulled tensor failed: %s", exc)
                slot.buf.release()
                return True
            ev = torch.cuda.Event()
            ev.record(comm.stream)
            self._release_after(slot.buf, ev)
            self._stats.add("pulls_served")
            self._stats.add("bytes_served", n)
            return True
        payload = raw if raw.device.type == "cpu" else raw.cpu()
        ok = self._reply(pp.sess.ident, "pdata", payload=payload, track=slot.buf if raw.device.type == "cpu" else None,
                         seq=pp.seq, key=pp.key.to_wire(), dt=T.dtype_name(slot.dtype), sh=list(slot.shape),
                         n=n, x="tcp")
        if raw.device.type != "cpu":
            slot.buf.release()
        if ok:
            self._stats.add("pulls_served")
            self._stats.add("bytes_served", n)
        return True

    def _serve_parked(self, key: TransferKey) -> None:
        for pp in self._parked.for_key(key):
            if self._try_serve(pp):
                self._parked.remove(pp)

