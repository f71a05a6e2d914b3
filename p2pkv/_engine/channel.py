"""The control channel and sessions: one DEALER per peer we dial (handshake, auth,
transport choice, liveness), one ROUTER for peers that dial us; message dispatch.
"""

from __future__ import annotations

import errno
import functools
import hmac
import os
import socket as _socket
import time
import uuid
from typing import Any

import torch
import zmq

from .. import _trace
from ..control.messages import REPLY_TYPES, REQUEST_TYPES, decode, encode
from ..errors import (AuthError, InvalidAddress, P2pkvError, PeerLost, ProtocolError, SessionRefused,
                      TransferAborted, TransportError, error_from_code)
from ..handles import TransferState
from ..keys import validate_transfer_id
from ..mailbox import Held
from ..pool import ALIGN
from ..transport import tcp
from .state import (_DEALER_RCVHWM, _MAX_CONNS_PER_HOST, _ROUTER_PASS_S, _MAX_CONNS_TOTAL, _BUFFER_SLACK, _CONN_SLACK,
                    _Accepted, _fd_ceiling,
                    _fds_in_use, _rss_bytes, _shutdown_fd, _zmq_consumed,
                    _LOCAL_DIALS, _LOCAL_ENDS, _LOCAL_EVENTS, _PLAIN_USER, _ZAP_DOMAIN,
                    _ZAP_ENDPOINT, _ConnectWaiter, _fd_ends, _LocalLink, _Peer, _Session, _drain, _seq_of,
                    _IO_CHARGED, _IO_CONTENDED_S, _IO_IDLE, _PEEK_BYTES, _PeerBudget, _peek, peer_key,
                    _valid_seq, _zmq_endpoint, log, parse_address)
from .state import _PullItem, _SendItem
from .base import MakeError, _EngineBase


class _Channel(_EngineBase):
    """Mixin of :class:`p2pkv.Engine` (shares its state; see :mod:`p2pkv._engine.base`)."""

    def _get_peer(self, addr: str) -> _Peer:
        peer = self._peers.get(addr)
        if peer is not None:
            return peer
        host, port = parse_address(addr)
        try:
            sock = self._ctx.socket(zmq.DEALER)
        except zmq.ZMQError as exc:  # EMFILE: out of file descriptors
            raise TransportError(f"cannot open a socket to {addr}: {exc}", peer=addr) from None
        mon = None
        try:
            sock.setsockopt(zmq.LINGER, 0)
            # SNDHWM stays unbounded: what we queue to a peer is bounded by its credit and our
            # callers' deadlines, and a full queue would block the I/O thread.
            sock.setsockopt(zmq.SNDHWM, 0)
            # never block the I/O thread: a DEALER whose handshake was refused has no pipe left and
            # a blocking send would wait forever (zmq.Again is raised instead; the monitor reports why)
            sock.setsockopt(zmq.SNDTIMEO, 0)
            sock.setsockopt(zmq.RCVHWM, _DEALER_RCVHWM)
            rid = uuid.uuid4().bytes
            sock.setsockopt(zmq.ROUTING_ID, rid)
            sock.setsockopt(zmq.MAXMSGSIZE, self._cfg.max_message_bytes + 65536)
            sock.setsockopt(zmq.RECONNECT_IVL, 50)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            self._set_keepalive(sock)
            self._set_client_security(sock)
            if ":" in host:
                sock.setsockopt(zmq.IPV6, 1)
            mon = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
                                          | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
            sock.connect(_zmq_endpoint(host, port))
        except zmq.ZMQError as exc:
            if mon is not None:
                try:
                    sock.disable_monitor()
                except zmq.ZMQError:
                    pass
                mon.close(0)
            sock.close(0)
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                raise TransportError(f"cannot open a connection to {addr}: {exc}", peer=addr) from None
            raise InvalidAddress(f"cannot connect to {addr!r:.100}: {exc}") from None
        peer = _Peer(addr, sock, mon)
        peer.rid = rid
        self._peers[addr] = peer
        self._peer_by_sock[sock] = peer
        self._peer_by_mon[mon] = peer
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(mon, zmq.POLLIN)
        try:
            sock.send(encode("hello", **self._hello()))
        except zmq.Again:  # refused already (the monitor's handshake event fails the peer)
            pass
        peer.last_tx = time.monotonic()
        self._stats.add("connections")
        return peer

    def _is_self(self, peer: _Peer) -> bool:
        """True when ``peer`` is this very engine (it dialed itself): its id alone is a claim anyone
        can make, so the connection itself must end at our own listening socket (see _LocalLink)."""
        link = peer.caps.get("local") if isinstance(peer.caps, dict) else None
        return peer.eid == self.eid and isinstance(link, _LocalLink) and link.holds(self.eid)

    def _check_local_peer(self, peer: _Peer) -> None:
        """After a handshake: mark ``peer`` as an engine of this process if the other end of our TCP
        connection is held by that engine (the kernel's addresses, not a claim), and tell it so."""
        peer.caps.pop("local", None)
        ends = peer.end
        if ends is None or _LOCAL_ENDS.get((ends[1], ends[0])) != peer.eid:
            return
        peer.caps["local"] = _LocalLink(peer.eid)
        _LOCAL_DIALS[(peer.eid, peer.rid)] = self.eid

    def _forget_peer_end(self, peer: _Peer) -> None:
        if peer.end is not None and _LOCAL_ENDS.get(peer.end) == self.eid:
            del _LOCAL_ENDS[peer.end]
        peer.end = None
        peer.fd = -1
        if peer.eid and _LOCAL_DIALS.get((peer.eid, peer.rid)) == self.eid:
            del _LOCAL_DIALS[(peer.eid, peer.rid)]

    def _release_local_ends(self) -> None:
        """On close: forget the connection ends this engine held."""
        for peer in self._peers.values():
            self._forget_peer_end(peer)
        for fd in list(self._accepted().ends):
            self._forget_accepted(fd)

    def _hello(self) -> dict[str, Any]:
        hello = {"eid": self.eid, "host": self._host, "pid": os.getpid(), "dev": str(self._device),
                 "caps": self._caps()}
        if self._cfg.auth_token is not None:
            hello["tok"] = self._cfg.auth_token
        return hello

    def _set_keepalive(self, sock: zmq.Socket) -> None:
        """TCP keepalive: a dead host's connection closes within about ``peer_timeout_s`` +
        3 ``heartbeat_s`` on both sides, also where we never dialed that peer ourselves (a killed
        process's connection closes at once; a live but silent peer is dropped by our own pings).

        No ZMQ heartbeats (ZMQ_HEARTBEAT_IVL): with a receive high-water mark, libzmq 4.3 aborts
        the whole process (``Assertion failed: !_io_error``, libzmq issues 3937 and 4364) when a
        connection whose input is stopped by the high-water mark is closed and the heartbeat timer
        then fires; any authenticated peer could do that to us by flooding requests that take time
        to handle and disconnecting. Its heartbeats would also cut a live connection whose input is
        held back that way."""
        cfg = self._cfg
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, max(1, int(cfg.effective_peer_timeout_s)))
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, max(1, int(cfg.effective_heartbeat_s)))
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)

    def _setup_router_security(self) -> None:
        """With ``auth_token``: the ROUTER is a ZMQ PLAIN server checked by our own ZAP handler
        (polled on the I/O thread), so a peer without the token is refused in the ZMTP
        handshake, before any of its message frames is read or buffered."""
        cfg = self._cfg
        if cfg.auth_token is None and cfg.curve_secret_key is None:
            return
        self._zap = zap = self._ctx.socket(zmq.REP)
        zap.setsockopt(zmq.LINGER, 0)
        zap.bind(_ZAP_ENDPOINT)
        self._router.setsockopt(zmq.ZAP_DOMAIN, _ZAP_DOMAIN)
        pub = cfg.curve_public_key  # None exactly when curve_secret_key is
        if cfg.curve_secret_key is not None and pub is not None:  # strong mode: CurveZMQ, both ends authenticated
            from zmq.utils import z85

            self._curve_allowed = {z85.decode(k) for k in (cfg.curve_allowed_keys or (pub,))}
            self._router.setsockopt(zmq.CURVE_SERVER, 1)
            self._router.setsockopt(zmq.CURVE_SECRETKEY, cfg.curve_secret_key.encode())
        else:
            self._router.setsockopt(zmq.PLAIN_SERVER, 1)

    def _set_client_security(self, sock: zmq.Socket) -> None:
        cfg = self._cfg
        pub = cfg.curve_public_key  # None exactly when curve_secret_key is
        if cfg.curve_secret_key is not None and pub is not None:  # the server's key is pinned
            sock.setsockopt(zmq.CURVE_SERVERKEY, (cfg.curve_server_key or pub).encode())
            sock.setsockopt(zmq.CURVE_PUBLICKEY, pub.encode())
            sock.setsockopt(zmq.CURVE_SECRETKEY, cfg.curve_secret_key.encode())
        elif cfg.auth_token is not None:
            sock.setsockopt(zmq.PLAIN_USERNAME, _PLAIN_USER)
            sock.setsockopt(zmq.PLAIN_PASSWORD, cfg.auth_token.encode())

    def _pump_zap(self) -> None:
        """Answer ZAP requests (RFC 27): accept a PLAIN handshake only with our token, a CURVE
        one only from an allowed client key."""
        zap = self._zap
        if zap is None:  # no authentication: nothing to answer
            return
        tok = self._cfg.auth_token.encode() if self._cfg.auth_token is not None else None
        for _ in range(256):
            try:
                frames = zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            req_id = frames[1] if len(frames) > 1 else b""
            if self._cfg.curve_secret_key is not None:
                ok = (len(frames) >= 7 and frames[0] == b"1.0" and frames[5] == b"CURVE"
                      and frames[6] in self._curve_allowed)
            else:
                ok = (tok is not None and len(frames) >= 8 and frames[0] == b"1.0" and frames[5] == b"PLAIN"
                      and hmac.compare_digest(frames[6], _PLAIN_USER) & hmac.compare_digest(frames[7], tok))
            user = b""
            if not ok:
                self._stats.add("auth_failures")
            elif self._cfg.curve_secret_key is not None:  # who the peer is: its key (see peer_key)
                from zmq.utils import z85

                user = z85.encode(frames[6])
            zap.send_multipart([b"1.0", req_id, b"200" if ok else b"400",
                                b"OK" if ok else b"wrong or missing auth_token", user, b""])

    def _sessionless_reply_ok(self) -> bool:
        """A token bucket for error replies to peers without a session (100/s, bursts of 200):
        a flood of requests before hello cannot make us queue replies without bound."""
        now = time.monotonic()
        last, tokens = getattr(self, "_noses_bucket", (now, 200.0))
        tokens = min(200.0, tokens + (now - last) * 100.0)
        ok = tokens >= 1.0
        self._noses_bucket = (now, tokens - 1.0 if ok else tokens)
        if not ok:
            self._stats.add("replies_suppressed")
        return ok

    def _pump_router_monitor(self) -> None:
        """Connections into our ROUTER: count them, and the handshakes refused."""
        from zmq.utils.monitor import recv_monitor_message

        for _ in range(1024):
            try:
                evt = recv_monitor_message(self._rmon, zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            e = evt["event"]
            if e == zmq.EVENT_ACCEPTED:
                self._conns += 1
                self._conns_pending += 1
                self._on_accepted(evt["value"])
            elif e == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._conns_pending = max(0, self._conns_pending - 1)
            elif e in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                       zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self._conns_pending = max(0, self._conns_pending - 1)
                self._stats.add("handshakes_refused")
                if (self._cfg.auth_token is not None or self._cfg.curve_secret_key is not None) \
                        and e != zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    self._stats.add("auth_failures")  # no or another mechanism (ZAP counts the rest)
            elif e == zmq.EVENT_DISCONNECTED:
                self._conns = max(0, self._conns - 1)
                self._conn_fds.pop(evt["value"], None)
                self._forget_accepted(evt["value"])
                # Which session was it? ZMQ does not say: probe them all shortly (a routed send
                # to a closed connection fails), so a killed sender is noticed at once.
                if self._sessions and not self._probe_due:
                    self._probe_due = [time.monotonic() + 0.02, time.monotonic() + 0.25]

    def _probe_sessions(self, now: float) -> None:
        """Drop the sessions whose connection is gone (found by a harmless routed ``pong``)."""
        if not self._probe_due or now < self._probe_due[0]:
            return
        self._probe_due.pop(0)
        for sess in list(self._sessions.values()):
            try:
                self._router.send_multipart([sess.ident, encode("pong")])
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    self._lose_session(sess, "its connection closed")

    def _accepted(self) -> _Accepted:
        acc: _Accepted | None = self.__dict__.get("_accepted_conns")
        if acc is None:
            acc = self.__dict__["_accepted_conns"] = _Accepted()
            self.__dict__.update(_fd_ceiling=_fd_ceiling(), _conn_cap=_MAX_CONNS_TOTAL, _conn_cap_t=0.0)
        return acc

    def _forget_accepted(self, fd: int) -> None:
        ends = self._accepted().drop(fd)
        if ends is not None and _LOCAL_ENDS.get(ends) == self.eid:
            del _LOCAL_ENDS[ends]

    def _shed_accepted(self, fd: int) -> None:
        ends = self._accepted().ends.get(fd)
        self._forget_accepted(fd)
        if _shutdown_fd(fd, ends):
            self._stats.add("connections_shed")

    def _cap_connections(self, fd: int) -> bool:
        """Keep the connections into our ROUTER within their caps: ``_MAX_CONNS_PER_HOST`` per remote
        address, and in all below ``_MAX_CONNS_TOTAL`` and the descriptor ceiling (the descriptors
        above it stay free for the rest of the process, e.g. dialing out). Over the total, a
        connection from the address holding the most goes: the new one, unless another address
        holds more (then that one's newest goes, so an address holding fewer can always connect).
        False if ``fd`` itself was shut down."""
        acc = self._accepted()
        host = acc.ends[fd][1][0]
        if acc.count(host) > _MAX_CONNS_PER_HOST:
            self._shed_accepted(fd)
            return False
        st = self.__dict__
        ceiling = st["_fd_ceiling"]
        if fd >= ceiling:  # every descriptor below is in use: hold no more connections than now
            st["_conn_cap"] = min(st["_conn_cap"], len(acc) - 1)
        if len(acc) > st["_conn_cap"]:
            now = time.monotonic()
            if now - st["_conn_cap_t"] >= 1.0:  # descriptors may have been freed elsewhere: look again
                st["_conn_cap_t"] = now
                used = _fds_in_use()
                if used is not None:
                    st["_conn_cap"] = min(_MAX_CONNS_TOTAL, len(acc) + ceiling - used)
        if len(acc) <= st["_conn_cap"]:
            return True
        heavy = acc.heaviest()
        if heavy == host or acc.count(heavy) <= acc.count(host):
            self._shed_accepted(fd)
            return False
        self._shed_accepted(next(reversed(acc.by_host[heavy])))
        return True

    def _note_message(self, frame: zmq.Frame, ident: bytes) -> None:
        """A whole message came from the connection ``frame`` names: note (at most every 2 ms per
        connection) how much ZMQ had taken from it by now: its baseline for _check_buffered."""
        acc = self.__dict__.get("_accepted_conns")
        if acc is None:
            return
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            return
        t = acc.base_t.get(fd)
        if t is None and fd not in acc.ends:
            return  # (its ACCEPTED event is not read yet)
        now = time.monotonic()
        acc.last[fd] = now
        if t is None or now - t >= 0.002:
            taken = _zmq_consumed(fd)
            if taken is not None:
                acc.base[fd] = taken
                acc.base_t[fd] = now
        acc.ident[fd] = ident

    def _check_peer_buffered(self, now: float) -> None:
        """Like the check below, for the peers we dialed: what an honest one has in flight to us is
        the data of our pulls, at most ``max_message_bytes`` each; a peer whose connection holds
        more of a message it does not finish is dropped (its work fails with ProtocolError)."""
        for peer in list(self._peers.values()):
            if peer.fd < 0 or now - peer.last_rx < 0.02:
                continue
            taken = _zmq_consumed(peer.fd)
            if taken is None or peer.end is None or _fd_ends(peer.fd) != peer.end:
                continue
            limit = self._cfg.max_message_bytes * max(1, len(peer.pulls)) + _BUFFER_SLACK
            held = taken - peer.rx_base
            if held > limit:
                self._stats.add("connections_overbuffered")
                msg = f"peer sent an unfinished message of {held} bytes (at most {limit} may be in flight)"
                log.warning("dropping peer %s: %s", peer.addr, msg)
                self._lose_peer(peer, functools.partial(ProtocolError, msg, peer=peer.addr))

    def _check_buffered(self, now: float) -> None:
        """Drop the connections that make ZMQ hold messages they never finish: ZMQ hands a message
        over only once all its frames arrived and buffers the frames until then (MAXMSGSIZE caps
        each frame, not their number). What honest peers have in flight to us is paid by credit
        or reservations in our pool, so all connections together may hold at most the pool's
        size + ``_BUFFER_SLACK`` unread; beyond, the one holding the most is dropped, until
        within; and one connection at most what its session may have in flight (its credit, its
        eager offers and admitted requests) + ``_CONN_SLACK`` (headers). A connection that
        delivered a whole message in the last 20 ms is not in an endless one (its messages are
        sequential) and is not judged. Looked at every 250 ms, and at once
        when our memory grew by 8 MiB."""
        acc = self.__dict__.get("_accepted_conns") or _Accepted()
        st = self.__dict__
        rss = _rss_bytes()
        # Whole messages waiting at the ROUTER (we are behind) count in what a connection holds too: then
        # only the bound on all connections applies (an honest peer's queued requests are not an endless one)
        events = self._router.getsockopt(zmq.EVENTS)
        behind = isinstance(events, int) and bool(events & zmq.POLLIN)
        if now - st.get("_buf_scan_t", 0.0) < 0.25 and rss - st.get("_buf_scan_rss", 0) < 8 << 20:
            if behind:
                return
            # between scans, a few connections each tick (round robin) against their own bound: an
            # endless message is cut within a few ticks of passing it (memory freed by an earlier cut
            # is reused without growing ours, and loopback moves ~100 MiB in a scan interval)
            fds = list(acc.ends)
            i = st.get("_buf_rr", 0)
            for k in range(min(8, len(fds))):
                fd = fds[(i + k) % len(fds)]
                if fd in acc.ends and now - acc.last.get(fd, 0.0) >= 0.02:
                    taken = _zmq_consumed(fd)
                    n = taken - acc.base.get(fd, 0) if taken is not None else 0
                    if n > _CONN_SLACK:
                        may = self._conn_may_hold(acc, fd)
                        if n > may:
                            self._drop_overbuffered(acc, fd, n, may)
            st["_buf_rr"] = (i + 8) % max(1, len(fds))
            return
        st["_buf_scan_t"], st["_buf_scan_rss"] = now, rss
        if self._peers:
            self._check_peer_buffered(now)
        limit = self._pool.capacity + _BUFFER_SLACK
        held: dict[int, int] = {}
        for fd in acc.ends:
            if now - acc.last.get(fd, 0.0) >= 0.02:  # (else it is delivering whole messages)
                taken = _zmq_consumed(fd)
                if taken is not None and taken - acc.base.get(fd, 0) > 1 << 20:
                    held[fd] = taken - acc.base.get(fd, 0)
        for fd, n in list(held.items()) if not behind else ():
            may = self._conn_may_hold(acc, fd)
            if n > may:  # more than anything its session may have in flight: in an endless message
                del held[fd]
                self._drop_overbuffered(acc, fd, n, may)
        total = sum(held.values())
        for fd in sorted(held, key=held.__getitem__, reverse=True):
            if total <= limit:
                break
            total -= held[fd]
            self._drop_overbuffered(acc, fd, held[fd], limit)

    def _conn_may_hold(self, acc: Any, fd: int) -> int:
        """What connection ``fd`` may make ZMQ hold unfinished: what its session may have in flight
        (credit, eager offers, admitted requests) + ``_CONN_SLACK``."""
        ident = acc.ident.get(fd)
        sess = self._sessions.get(ident) if ident is not None else None
        return _CONN_SLACK + (sess.credit + sess.eager_held + sess.reserved if sess is not None else 0)

    def _drop_overbuffered(self, acc: Any, fd: int, held: int, limit: int) -> None:
        """Drop the connection ``fd`` (and its session): it made ZMQ hold ``held`` bytes, over ``limit``."""
        ident = acc.ident.get(fd)
        self._stats.add("connections_overbuffered")
        log.warning("dropping a connection from %s: it made us hold %d bytes of a message it does not "
                    "finish (at most %d may be held)", acc.ends[fd][1][0], held, limit)
        self._shed_accepted(fd)
        sess = self._sessions.get(ident) if ident is not None else None
        if sess is not None:
            self._lose_session(sess, f"sent an unfinished message of {held} bytes")

    def _on_accepted(self, fd: int) -> None:
        """Cap the connections (see _cap_connections); shut down a new connection when too many
        were opened within the handshake interval (an idle-connection flood must not take every
        file descriptor of the process)."""
        ends = _fd_ends(fd)
        if ends is None or ends[0][1] != self.port:
            return  # the fd was closed (and maybe reused) meanwhile: ZMQ dropped that connection
        self._accepted().add(fd, ends)
        _LOCAL_ENDS[ends] = self.eid
        if not self._cap_connections(fd):
            return
        now = time.monotonic()
        window = min(self._cfg.effective_peer_timeout_s, 5.0)
        fds = self._conn_fds
        if len(fds) > 64:
            for f in [f for f, t in fds.items() if now - t > window]:
                del fds[f]  # older ones finished (or failed) their handshake by now
        fds[fd] = now
        if len(fds) <= self._cfg.max_pending_connections:
            return
        del fds[fd]
        try:  # shutdown (not close: the fd is ZMQ's) makes ZMQ drop the connection at once
            dup = _socket.socket(fileno=os.dup(fd))
            try:
                if dup.getsockname()[1] != self.port:
                    return  # the fd was closed and reused meanwhile: not ours to judge
                info = dup.getsockopt(_socket.IPPROTO_TCP, _socket.TCP_INFO, 256)
                if len(info) >= 136 and int.from_bytes(info[128:136], "little") >= 64:
                    return  # it sent a whole ZMTP greeting: a peer in its handshake, not an idle socket
                dup.shutdown(_socket.SHUT_RDWR)
                self._stats.add("connections_shed")
            finally:
                dup.close()
        except OSError:
            pass

    def _caps(self) -> dict[str, Any]:
        caps: dict[str, Any] = {"transports": ["tcp"], "align": ALIGN, "host": self._host, "cuda": self._cuda,
                                "dev": str(self._device), "pid": os.getpid()}
        if self._ipc_handle is not None:
            caps["transports"].append("ipc")
            caps["ipc"] = {"handle": self._ipc_handle, "size": self._pool.capacity}
        if self._nccl_ok:
            caps["transports"].append("nccl")
        if self._shm_loc is not None:
            caps["transports"].append("shm")
            caps["shm"] = self._shm_loc
        return caps

    def _choose_transport(self, caps: dict[str, Any]) -> str:
        """The transport for CUDA tensors to a peer with ``caps`` (CPU tensors always use TCP)."""
        want = self._cfg.transport
        listed = caps.get("transports")
        theirs = listed if isinstance(listed, list) else []
        cuda_both = self._cuda and caps.get("cuda") is True
        ipc_ok = cuda_both and self._ipc_handle is not None and "ipc" in theirs and caps.get("host") == self._host
        nccl_ok = cuda_both and self._nccl_ok and "nccl" in theirs
        if want == "tcp":
            return "tcp"
        if want == "ipc":
            if not ipc_ok:
                raise TransportError("transport='ipc' but the peer is not a CUDA engine on this host with IPC")
            return "ipc"
        if want == "nccl":
            if not nccl_ok:
                raise TransportError("transport='nccl' but the peer has no NCCL (or no CUDA device)")
            return "nccl"
        return "ipc" if ipc_ok else "nccl" if nccl_ok else "tcp"

    def _release_gpu_state(self, holder: Any) -> None:
        """Abort a peer's or session's NCCL communicators (local, never hangs) and unmap its arena."""
        for comm in holder.nccl.values():
            comm.abort()
        holder.nccl.clear()
        if holder.ipc is not None:
            holder.ipc.close()
            holder.ipc = None
        if getattr(holder, "ipc_out", None) is not None:
            holder.ipc_out.close()
            holder.ipc_out = None

    def _close_peer(self, peer: _Peer) -> None:
        self._forget_peer_end(peer)
        self._fast.peer_lost(peer, PeerLost("connection to the peer closed", peer=peer.addr))
        self._regions.peer_lost(peer, PeerLost("connection to the peer closed", peer=peer.addr))
        for h in peer.ipc_handles:
            _LOCAL_EVENTS.pop(h, None)
        self._release_gpu_state(peer)
        self._peers.pop(peer.addr, None)
        self._peer_by_sock.pop(peer.sock, None)
        self._peer_by_mon.pop(peer.mon, None)
        for s in (peer.sock, peer.mon):
            try:
                self._poller.unregister(s)
            except KeyError:
                pass
        try:
            peer.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        peer.mon.close(0)
        peer.sock.close(0)

    def _lose_peer(self, peer: _Peer, make_error: MakeError) -> None:
        """Fail everything in flight to ``peer`` and drop the connection."""
        n = self._fail_peer_work(peer, make_error)
        self._close_peer(peer)
        if peer.ready:
            self._stats.add("peers_lost")
            log.info("peer %s lost: %s (%d transfers failed)", peer.addr, make_error(), n)
            # Sessions are not dropped by the engine id the peer claimed (anyone can claim any id):
            # a session ends on its own connection's close, silence or bye.
            if self._sessions and not self._probe_due:
                self._probe_due = [time.monotonic() + 0.02, time.monotonic() + 0.25]

    def _cmd_connect(self, addr: str, w: _ConnectWaiter) -> None:
        peer = self._get_peer(addr)
        if peer.ready:
            w.event.set()
        else:
            peer.connect_waiters.append(w)

    def _pump_peer(self, peer: _Peer) -> None:
        sock = peer.sock
        for _ in range(256):
            if peer.addr not in self._peers:
                return
            try:
                hdr = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:  # pragma: no cover
                log.warning("recv from %s failed: %s", peer.addr, exc)
                return
            now = peer.last_rx = time.monotonic()
            if now - peer.rx_base_t >= 0.002 and peer.fd >= 0:  # a message boundary (see _check_buffered)
                taken = _zmq_consumed(peer.fd)
                if taken is not None:
                    peer.rx_base, peer.rx_base_t = taken, now
            try:
                msg = decode(hdr, REPLY_TYPES)
                self._on_reply(peer, msg)
            except P2pkvError as exc:
                self._stats.add("protocol_errors")
                log.warning("bad reply from %s: %s", peer.addr, exc)
            except Exception:  # a bug or a hostile reply must not stop the engine
                self._internal_error(f"a reply from {peer.addr}")
            finally:
                if peer.addr in self._peers:
                    _drain(sock)

    def _on_reply(self, peer: _Peer, msg: dict[str, Any]) -> None:
        item: _SendItem | None  # names reused across the branches below
        pull: _PullItem | None
        err: P2pkvError
        t = msg["t"]
        if t == "pong":
            return
        if t == "hok":
            if peer.ready and msg["eid"] != peer.eid:
                self._lose_peer(peer, lambda: PeerLost("peer restarted", peer=peer.addr))
                return
            self._pump_monitor(peer)  # our connection's addresses (its CONNECTED event came before)
            if self._peers.get(peer.addr) is not peer:
                return
            peer.ready = True
            if peer.eid and _LOCAL_DIALS.get((peer.eid, peer.rid)) == self.eid:
                del _LOCAL_DIALS[(peer.eid, peer.rid)]
            peer.eid = msg["eid"]
            peer.caps = msg["caps"]
            self._check_local_peer(peer)
            peer.window = msg["window"]
            peer.pool = msg["pool"]
            peer.maxmsg = msg["maxmsg"]
            try:
                peer.xport = self._choose_transport(peer.caps)
            except TransportError as exc:
                peer.xport = "none"
                err = exc
                for item in [i for i in peer.queue if i.ready is not None]:
                    peer.queue.remove(item)
                    self._finish_send(item, TransferState.FAILED, TransportError(str(err), peer=peer.addr))

            for w in peer.connect_waiters:
                w.event.set()
            peer.connect_waiters.clear()
            for item in list(peer.queue):
                if not self._fits_peer(peer, item):
                    peer.queue.remove(item)
            waiting, peer.pull_waiting = peer.pull_waiting, []
            for pull in waiting:
                self._send_pull(peer, pull)
            self._pump_sends(peer)
            self._pump_offers(peer)
            self._fast.on_ready(peer)
            if peer.mq_pending:
                peer.mq_pending = False
                peer.sock.send(encode("mq"))
            for tid in peer.rdone_pending:
                peer.sock.send(encode("rdone", tid=tid))
            peer.rdone_pending.clear()
        elif t == "ack":
            item = peer.inflight.pop(msg["seq"], None)
            if item is not None:
                _trace.mark("ack.rx", item.key)
                self._finish_send(item, TransferState.DONE)
        elif t == "acks":
            for seq in msg["seqs"]:
                item = peer.inflight.pop(seq, None) if isinstance(seq, int) else None
                if item is not None:
                    _trace.mark("ack.rx", item.key)
                    self._finish_send(item, TransferState.DONE)
        elif t == "nack":
            item = peer.inflight.pop(msg["seq"], None)
            if item is not None:
                err = error_from_code(msg["code"], msg["msg"], key=item.key, peer=peer.addr)
                state = TransferState.ABORTED if isinstance(err, TransferAborted) else TransferState.FAILED
                self._finish_send(item, state, err)
        elif t == "grant":
            peer.credit += msg["n"]
            peer.creq_pending = False
            self._pump_sends(peer)
        elif t == "crev":  # the receiver wants idle credit back for other senders
            r = min(msg["n"], peer.credit)
            peer.credit -= r
            peer.sock.send(encode("cret", n=r))
            peer.last_tx = time.monotonic()
        elif t == "pdata":
            self._on_pdata(peer, msg)
        elif t == "perr":
            pull = peer.pulls.pop(msg["seq"], None)
            if pull is not None:
                pull.finish(error=error_from_code(msg["code"], msg["msg"], key=pull.key, peer=peer.addr))
        elif t == "abort":
            tid = validate_transfer_id(msg["tid"])
            self._do_abort(tid, broadcast=False, reason=f"transfer aborted by peer {peer.addr}", src=peer.addr)
        elif t == "nok":
            pass  # the peer is joining the communicator; readiness shows in poll()
        elif t in ("ogrant", "oerr", "odone"):
            self._on_request_reply(peer, t, msg)
        elif t == "ferr":
            self._fast.on_ferr(peer, msg)
        elif t == "fo":
            self._fast.accept(peer, msg)
        elif t == "mr":
            self._regions.on_regions(peer, msg)
        elif t == "err":
            code = msg["code"]
            if code == "auth":
                err_msg = msg["msg"]
                self._lose_peer(peer, lambda: AuthError(err_msg, peer=peer.addr))
            elif code == SessionRefused.code and msg.get("seq") is None:
                refusal = msg["msg"]
                self._lose_peer(peer, lambda: SessionRefused(refusal, peer=peer.addr))
            elif code == "no_session":
                self._lose_peer(peer, lambda: PeerLost("peer restarted (it has no session for us)", peer=peer.addr))
            elif code == "pool_exhausted" and msg.get("seq") is None:
                peer.creq_pending = False  # our credit request can never be met: ask again when it can
                log.warning("peer %s refused a credit request: %s", peer.addr, msg["msg"])
            elif code == "transport" and msg.get("seq") is None:
                xerr = TransportError(msg["msg"], peer=peer.addr)
                only = msg.get("dir")
                for direction in list(peer.nccl):
                    if only is None or only == direction:
                        self._fail_nccl(peer, direction, xerr)
            else:
                seq = msg.get("seq")
                item = peer.inflight.pop(seq, None) if seq is not None else None
                if item is not None:
                    self._finish_send(item, TransferState.FAILED,
                                      error_from_code(code, msg["msg"], key=item.key, peer=peer.addr))
                pull = peer.pulls.pop(seq, None) if seq is not None else None
                if pull is not None:
                    pull.finish(error=error_from_code(code, msg["msg"], key=pull.key, peer=peer.addr))
                req = peer.reqs.get(seq) if seq is not None else None
                if req is not None:
                    self._on_request_reply(peer, "oerr", msg)
                if item is None and pull is None and req is None:
                    log.warning("peer %s reported: [%s] %s", peer.addr, code, msg["msg"])

    def _pump_monitor(self, peer: _Peer) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                evt = recv_monitor_message(peer.mon, zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            if evt["event"] == zmq.EVENT_DISCONNECTED and peer.ready:
                self._lose_peer(peer, lambda: PeerLost("connection to peer closed", peer=peer.addr))
                return
            if evt["event"] == zmq.EVENT_DISCONNECTED:
                self._forget_peer_end(peer)
            if evt["event"] == zmq.EVENT_CONNECTED:
                peer.connects += 1
                if peer.end is not None and _LOCAL_ENDS.get(peer.end) == self.eid:
                    del _LOCAL_ENDS[peer.end]
                ends = _fd_ends(evt["value"])
                peer.end = ends if ends is not None and ends[1][1] == parse_address(peer.addr)[1] else None
                peer.fd, peer.rx_base, peer.rx_base_t = -1, 0, 0.0
                if peer.end is not None:
                    _LOCAL_ENDS[peer.end] = self.eid
                    peer.fd = int(evt["value"])
                if peer.connects > 1 and not peer.ready:
                    # a reconnect before the handshake finished (the listener shed or lost our first
                    # connection): our hello may have gone with it, so say it again
                    try:
                        peer.sock.send(encode("hello", **self._hello()))
                        peer.last_tx = time.monotonic()
                    except zmq.Again:
                        pass
            if evt["event"] in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                # (a connection closed mid-handshake, NO_DETAIL, is only retried: the peer may be busy)
                self._lose_peer(peer, lambda: AuthError(
                    "the peer refused our handshake: wrong or missing auth_token or CURVE key (both engines "
                    "must use the same security mode and credentials)", peer=peer.addr))
                return

    def _pump_router(self) -> None:
        """Handle the messages waiting at our ROUTER, for at most ``_ROUTER_PASS_S`` (or 256 of them):
        ZMQ hands them over fair-queued, one connection's after another's, so a peer whose messages
        cost much (large offers) delays another's by about one of its own; the bound lets the rest of
        the loop (acks, callers' commands, replies from the peers we dialed, timers) run in between."""
        r = self._router
        end = time.perf_counter() + _ROUTER_PASS_S
        for _ in range(256):
            if time.perf_counter() > end:
                break  # the poller reports the rest at once
            try:
                first = r.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            ident = first.bytes
            self._note_message(first, ident)
            if not r.getsockopt(zmq.RCVMORE):
                continue  # an empty message: nothing to do
            t0 = time.thread_time()  # (CPU time: a box too loaded to run us is not the peer's doing)
            admit0 = self._io_admit_s
            self._rx_first = first  # (a hello reads who sent it from its connection's metadata)
            hdr = r.recv()
            kind = "?"  # (a header that does not decode is charged too)
            try:
                if len(hdr) > _PEEK_BYTES and self._skip_costly(ident, hdr):
                    kind = "offer"
                    continue  # answered (or dropped) from a peek at it
                msg = decode(hdr, REQUEST_TYPES)
                kind = msg["t"]
                self._on_request(ident, msg)
            except P2pkvError as exc:
                self._stats.add("protocol_errors")
                self._reply(ident, "err", code=exc.code, msg=str(exc)[:500], seq=_seq_of(hdr))
            except Exception as exc:  # a bug must not kill the engine
                self._stats.add("internal_errors")
                log.exception("internal error handling a request")
                self._reply(ident, "err", code="error", msg=f"internal error: {type(exc).__name__}")
            finally:
                extra = _drain(r)
                if extra > 1:  # no request carries more than one frame after its header
                    self._stats.add("protocol_errors")
                    sess = self._sessions.get(ident)
                    if sess is not None:
                        self._reply(ident, "err", code="protocol", msg=f"message of {extra + 2} frames: "
                                    "session dropped")
                        self._lose_session(sess, "multipart flood")
                if kind not in _IO_IDLE and ident in self._sessions:
                    self._note_work(ident)  # (a stranger without a session is no contention: see _io_refuses)
                sess = self._sessions.get(ident) if kind in _IO_CHARGED else None
                if sess is not None:  # what its requests cost the I/O thread (see _IO_SHARE)
                    sess.charge_io(time.thread_time() - t0 - (self._io_admit_s - admit0), time.monotonic())
        self._flush_acks()

    def _note_work(self, ident: bytes) -> None:
        """The session ``ident`` sent work just now (for :meth:`_io_refuses`): O(1), the two sessions that
        sent work last are kept, newest first."""
        recent, now = self._io_recent, time.monotonic()
        if recent and recent[0][0] == ident:
            recent[0] = (ident, now)
        else:
            recent.insert(0, (ident, now))
            del recent[2:]

    def _io_refuses(self, sess: _Session, now: float) -> bool:
        """Whether the peer of ``sess`` is over its share of the I/O thread (see _IO_SHARE) while another
        session wants the thread too: a session alone may take all of it (work-conserving). (Contention is
        by session, the budget by peer: two sessions of one host restrain each other once over their share.)"""
        if not sess.io_over(now):
            return False
        for ident, t in self._io_recent:
            if ident != sess.ident:
                return now - t < _IO_CONTENDED_S
        return False

    def _skip_costly(self, ident: bytes, hdr: bytes) -> bool:
        """A large header (a many-tensor offer) that need not be decoded: from a peer without a session
        (answered ``no_session``, as any request is), or an offer from a session over its share of
        the I/O thread (refused, as :meth:`_on_offer` would). Decoding one costs about a millisecond
        for 2,048 tensors; peeking at its type and seq, a few microseconds. True if handled."""
        sess = self._sessions.get(ident)
        if sess is not None and not self._io_refuses(sess, time.monotonic()):
            return False
        m = _peek(hdr)
        seq = _valid_seq(m.get("seq"))
        if sess is None:
            if m.get("t") in ("hello", None):
                return False  # (decoded: its errors are told as they are)
            if m.get("t") not in ("bye", "pong") and self._sessionless_reply_ok():
                self._reply(ident, "err", code="no_session", msg="no session: send hello first", seq=seq)
            return True
        if m.get("t") != "offer" or seq is None or m.get("eager") is not None or m.get("v") is None:
            return False  # (an eager offer's data already moves: refused the full way, in step)
        self._stats.add("offers_over_budget")
        self._stats.add("offers_refused")
        self._reply(ident, "oerr", seq=seq, code="pool_exhausted",
                    msg="this peer's requests took more than its share of this engine's I/O thread: retry later")
        return True

    def _reply(self, ident: bytes, mtype: str, payload: torch.Tensor | None = None, track: Held | None = None,
               **fields: Any) -> bool:
        try:
            if payload is None:
                self._router.send_multipart([ident, encode(mtype, **fields)])
            else:
                self._router.send(ident, zmq.SNDMORE)
                self._router.send(encode(mtype, **fields), zmq.SNDMORE)
                n = payload.numel()
                if track is not None and n >= tcp.ZERO_COPY_MIN:
                    # numpy's stubs give ndarray __buffer__ only for Python >= 3.12 (the buffer protocol is there)
                    tracker = self._router.send(payload.numpy(), copy=False, track=True)  # type: ignore[call-overload]
                    self._tracked.append((tracker, track))
                else:
                    tcp.send_payload(self._router, payload)
                    if track is not None:
                        track.release()
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone
            if track is not None:
                track.release()
            log.debug("reply to %s dropped: %s", ident.hex(), exc)
            return False

    def _on_request(self, ident: bytes, msg: dict[str, Any]) -> None:
        t = msg["t"]
        sess = self._sessions.get(ident)
        if t == "hello":
            self._pump_router_monitor()  # our end of its connection is known before we answer
            tok = self._cfg.auth_token
            if tok is not None and not (isinstance(msg.get("tok"), str)
                                        and hmac.compare_digest(msg["tok"].encode(), tok.encode())):
                self._stats.add("auth_failures")
                self._reply(ident, "err", code="auth", msg="authentication failed: wrong or missing auth_token")
                return
            if sess is not None:
                self._lose_session(sess, "peer said hello again")
            key = self._peer_key()
            budget = self._budgets.get(key)
            cap = self._cfg.max_sessions_per_peer
            if budget is not None and budget.sessions >= cap:
                self._stats.add("sessions_refused")
                self._reply(ident, "err", code=SessionRefused.code,
                            msg=f"session refused: this peer ({key}) holds {budget.sessions} sessions with this "
                                f"engine, as many as it allows (max_sessions_per_peer={cap})")
                return
            if budget is None:
                budget = self._budgets[key] = _PeerBudget(time.monotonic())
            caps = msg["caps"]
            # whether it is an engine of this process is looked up when it matters (see _LocalLink),
            # never taken from what it sent
            caps["local"] = _LocalLink(msg["eid"], listener=self.eid, rid=ident)
            self._sessions[ident] = _Session(ident, msg["eid"], caps, budget)
            self._reply(ident, "hok", eid=self.eid, align=ALIGN, window=self._cfg.effective_credit_bytes,
                        maxmsg=self._cfg.max_message_bytes, pool=self._pool.capacity, caps=self._caps())
            return
        if sess is None:
            if t not in ("bye", "pong") and self._sessionless_reply_ok():
                self._reply(ident, "err", code="no_session", msg="no session: send hello first",
                            seq=_valid_seq(msg.get("seq")))
            return
        sess.last_rx = time.monotonic()
        if t == "ping":
            self._reply(ident, "pong")
        elif t == "data":
            self._on_data(sess, msg)
        elif t == "creq":
            need = msg["need"]
            limit = min(self._cfg.effective_credit_bytes, self._pool.capacity)
            if need > limit:  # can never be met: refused at once instead of blocking other senders
                sess.creq = None
                self._reply(ident, "err", code="pool_exhausted",
                            msg=f"credit request of {need} bytes exceeds the credit window ({limit} bytes)")
                return
            sess.creq = (need, msg["want"])
            sess.creq_t = time.monotonic()
            self._grant_credit()
        elif t == "cret":
            if sess.revoking:
                # the answer to our crev: whatever it says, the revoked credit is gone (the data the
                # peer sent on it came before this answer)
                sess.revoked = 0
                sess.revoking = 0.0
                if sess.offers:
                    self._admit()  # its own offers first: the room was taken back for them
            else:  # credit it had no use for (unasked)
                sess.outstanding -= min(msg["n"], sess.outstanding)
            self._grant_credit()
        elif t == "pull":
            self._on_pull(sess, msg)
        elif t == "abort":
            tid = validate_transfer_id(msg["tid"])
            self._do_abort(tid, broadcast=False, reason=f"transfer aborted by peer {sess}", skip=ident, src=ident)
        elif t == "bye":
            self._lose_session(sess, "peer closed its engine")
        elif t == "pdone":
            lent = self._lent.pop((ident, msg["seq"]), None)
            if lent is not None:
                lent[0].release()
        elif t == "nccl":
            self._on_nccl_request(sess, msg)
        elif t == "offer":
            self._on_offer(sess, msg)
        elif t in ("odata", "opost", "oabort", "ofin"):
            self._on_offer_msg(sess, t, msg)
        elif t == "fast":
            self._fast.on_fast_msg(sess, msg)
        elif t == "mq":
            if sess.caps.get("host") != self._host or not self._cuda or not isinstance(sess.caps, dict) \
                    or sess.caps.get("cuda") is not True:
                self._reply(ident, "mr", no="memory regions are served to CUDA engines of this host only")
            else:
                self._reply(ident, "mr", r=self._regions.describe())
        elif t == "rdone":
            self._regions.on_read_done(sess, validate_transfer_id(msg["tid"]))
        elif t == "fq":
            offer = self._fast.offer(sess)
            if offer is None:
                self._reply(ident, "fo", no="no fast path into this engine for that peer")
            else:
                self._reply(ident, "fo", **offer)

    def _peer_key(self) -> str:
        """Who sent the request being handled (see peer_key): its connection's remote address and,
        with CURVE, its key, as ZMQ reports them for the message's first frame."""
        first = self._rx_first
        addr: Any = None
        user: Any = None
        if first is not None:
            try:
                addr = first.get("Peer-Address")
                user = first.get("User-Id") if self._cfg.curve_secret_key is not None else None
            except (zmq.ZMQError, KeyError, AttributeError):
                pass
        return peer_key(addr, user)

    def _forget_idle_budgets(self, now: float) -> None:
        """Forget the budgets of peers without a session once they are full again (a peer that left
        in debt finds its debt when it comes back within that time)."""
        for key in [k for k, b in self._budgets.items() if b.sessions <= 0 and b.idle(now)]:
            del self._budgets[key]

    def _lose_session(self, sess: _Session, reason: str) -> None:
        if self._sessions.get(sess.ident) is not sess:
            return
        del self._sessions[sess.ident]
        sess.budget.sessions -= 1
        self._fast.session_lost(sess, reason)
        for pp in self._parked.of_session(sess):
            self._parked.remove(pp)
        self._release_gpu_state(sess)  # aborted communicators end their posted receives
        lost = PeerLost(f"sending peer {sess.eid} lost: {reason}")
        for inc in [i for i in self._incoming.values() if i.sess is sess]:
            if inc.quarantine:
                self._release_quarantine(inc)
            else:
                self._fail_incoming(inc, lost, reply=False)
                if inc.x == "ipc":
                    self._release_quarantine(inc)
        sess.offers.clear()
        if sess.watcher is not None:
            sess.watcher.close(join=False)  # it finishes the landings queued before it
            sess.watcher = None
        for k in [k for k in self._lent if k[0] == sess.ident]:
            self._lent.pop(k)[0].release()
        sess.nccl_backlog.clear()
        eid = sess.eid
        tids = self._inbox.source_lost(sess.ident, lambda: PeerLost(f"sending peer {eid} lost: {reason}"),
                                       clean=reason == "peer closed its engine")
        if reason != "peer said hello again":
            self._stats.add("sessions_lost")
        log.info("session %s ended (%s); %d transfer(s) affected", sess, reason, len(tids))
        self._grant_credit()

