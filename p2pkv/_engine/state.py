"""State of the engine's peers, sessions and work items, and small wire helpers."""

from __future__ import annotations

import logging
import os
import re
import socket as _socket
import threading
import time
from collections import OrderedDict, deque
from typing import Any

import torch
import zmq

from ..errors import InvalidAddress, P2pkvError, TransportError
from ..handles import SendHandle
from ..keys import TransferKey
from ..pool import Buffer, BufferPool
from ..request import Incoming, RequestHandle

log = logging.getLogger("p2pkv")

_ADDR = re.compile(r"^(?:\[([0-9a-fA-F:.]+)\]|([A-Za-z0-9_.\-]+)):(\d{1,5})$")
_TICK_S = 0.02
_IPC_EVENTS = 64  # interprocess events per peer signalling IPC request writes (a ring)
_ROUTER_SNDHWM = 10_000  # replies queued per connection before further ones are dropped
_ROUTER_RCVHWM = 1_000   # requests queued per connection before TCP pushes the peer back
_DEALER_RCVHWM = 10_000  # replies queued from one peer we dialed
_ROUTER_PASS_S = 0.005   # time one loop pass spends on requests at the ROUTER before the rest of the loop runs
_MAX_CREDIT_VIOLATIONS = 8  # data messages or eager offers beyond granted credit before the session is dropped
_MAX_QUEUED_OFFERS = 256    # offers of one session waiting for room (more are refused at once)
_MAX_QUEUED_ITEMS = 16384   # ... and their tensors in all (8 offers of the largest size)
# Buffers one call of _admit allocates at most (a few microseconds each): a request of more tensors
# is admitted (its room reserved) at once and its buffers taken over several passes of the loop,
# which serves the other sockets in between; its grant goes once all are taken.
_ADMIT_SLICE = 256
# Tensors one session may offer (taken in for a full parse and admission, each costing the I/O thread
# some microseconds) per second, and in a burst: beyond that its offers are refused at once. (What its
# peer's sessions cost the I/O thread in all is bounded by the peer's share, _IO_SHARE, below; this
# bound is per session, so that the engines of one honest host are not held to one session's rate.)
_OFFER_ITEMS_PER_S = 8192
_OFFER_ITEMS_BURST = 32768
# Time of the I/O thread one peer's requests (all its sessions': see peer_key) may take (handling them,
# admitting its offers): a share of each second, sustained, and a burst; beyond, its offers are refused
# at once until it is back within (what its messages cost is measured, in the I/O thread's CPU time, so
# this holds however slow the machine is, and a box too loaded to run the thread is not charged to a peer).
# The share binds only while another session sent work in the last _IO_CONTENDED_S (heartbeats do not
# count): a session alone may take the whole I/O thread, as an honest producer under load does.
_IO_SHARE = 0.2
_IO_CONTENDED_S = 1.0
_IO_BURST_S = 0.25
# ... counting the messages a peer can make costly at will (offers, aborts, headers that do not decode);
# not what a new honest session costs once (its handshake, the fast path's lease), nor data it paid for
_IO_CHARGED = frozenset({"offer", "oabort", "?"})
# ... and the messages that are not work (heartbeats, session set-up, headers that do not decode): a peer
# sending only these does not make others' shares bind
_IO_IDLE = frozenset({"hello", "ping", "bye", "?"})
_IO_DEBT_S = 1.0  # the most a peer may be behind its share (it waits at most this long / _IO_SHARE)
_MAX_CONNS_PER_HOST = 128  # connections into our ROUTER from one remote address
_MAX_CONNS_TOTAL = 32768    # ... and from all (further bounded by the descriptor limit: _fd_ceiling)
_BUFFER_SLACK = 16 << 20    # what a connection may have ZMQ hold beyond the pool's size (headers, framing)
_CONN_SLACK = 8 << 20       # ... and one connection beyond what its session may have in flight (credit, requests)
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_ZAP_DOMAIN = b"p2pkv"
_PLAIN_USER = b"p2pkv"

class _LocalArena:
    """An engine's arena in this process, viewed like an :class:`IpcMapping` (no IPC needed)."""

    def __init__(self, arena: torch.Tensor):
        self.tensor = arena

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.tensor.numel():
            raise TransportError(f"range [{offset}, {offset + nbytes}) outside the peer's arena")
        return self.tensor[offset:offset + nbytes]

    def close(self) -> None:
        pass


def parse_address(addr: Any) -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6]:port``); raise :class:`InvalidAddress`."""
    if not isinstance(addr, str):
        raise InvalidAddress(f"peer address must be a 'host:port' str, got {type(addr).__name__}")
    m = _ADDR.match(addr.strip())
    if not m or not 0 < int(m.group(3)) < 65536:
        raise InvalidAddress(f"peer address must look like 'host:port', got {addr!r:.100}")
    return (m.group(1) or m.group(2)), int(m.group(3))


def _zmq_endpoint(host: str, port: int | str) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _host_id() -> str:
    """An id equal for engines on one host, without revealing the machine id (which
    machine-id(5) says must stay confidential): an application-specific keyed hash of it."""
    import hashlib
    import hmac

    ident = f"host:{_socket.gethostname()}"
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as f:
                mid = f.read().strip()
            if mid:
                ident = f"{mid}:{_socket.gethostname()}"
                break
        except OSError:
            pass
    return "h-" + hmac.new(ident.encode(), b"p2pkv host id v1", hashlib.sha256).hexdigest()[:32]


# ----------------------------------------------------------------------------- work items
class _SendItem:
    __slots__ = ("handle", "key", "payload", "dtype", "shape", "nbytes", "footprint", "deadline", "seq", "ready",
                 "stage", "gpu_event")

    def __init__(self, handle: SendHandle, payload: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...],
                 deadline: float, ready: Any = None):
        self.handle = handle
        self.key = handle.key
        self.payload: torch.Tensor | None = payload  # None once the send finished (frees it)
        self.dtype = dtype
        self.shape = shape
        self.nbytes = handle.nbytes
        self.footprint = BufferPool.footprint(handle.nbytes)
        self.deadline = deadline
        self.seq = -1
        self.ready = ready          # CUDA event: the producer's stream has written the tensor
        self.stage: Buffer | None = None  # our pool buffer holding a staged copy (CUDA IPC)
        self.gpu_event: Any = None  # last GPU operation reading the payload or the stage


class _PullItem:
    __slots__ = ("key", "peer", "out", "deadline", "seq", "event", "result", "error", "timeout")

    def __init__(self, key: TransferKey, peer: str, out: torch.Tensor | None, timeout: float):
        self.key = key
        self.peer = peer
        self.out = out
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.seq = -1
        self.event = threading.Event()
        self.result: torch.Tensor | None = None
        self.error: P2pkvError | None = None

    def finish(self, result: torch.Tensor | None = None, error: P2pkvError | None = None) -> None:
        if self.event.is_set():
            return
        self.result, self.error = result, error
        self.event.set()


class _ConnectWaiter:
    __slots__ = ("event", "error", "deadline")

    def __init__(self, timeout: float = 3600.0) -> None:
        self.event = threading.Event()
        self.error: P2pkvError | None = None
        self.deadline = time.monotonic() + timeout


class _Peer:
    """Our outgoing connection (DEALER) to one peer engine."""

    def __init__(self, addr: str, sock: zmq.Socket, mon: zmq.Socket):
        now = time.monotonic()
        self.addr = addr
        self.sock = sock
        self.mon = mon
        self.ready = False
        self.connects = 0                       # TCP connections made (ZMQ reconnects on its own)
        self.eid = ""
        self.caps: dict[str, Any] = {}
        self.queue: deque[_SendItem] = deque()
        self.inflight: dict[int, _SendItem] = {}
        self.pulls: dict[int, _PullItem] = {}
        self.connect_waiters: list[_ConnectWaiter] = []
        self.credit = 0
        self.creq_pending = False
        self.window = 0
        self.pool = 0
        self.maxmsg = 0
        self.seq = 0
        self.created = now
        self.last_rx = now
        self.last_tx = now
        self.idle_since = now
        self.xport = "tcp"                      # transport for CUDA tensors to this peer
        self.nccl: dict[str, Any] = {}          # "push"/"pull" -> Comm
        self.ipc: Any = None                    # IpcMapping of the peer's arena
        self.pull_waiting: list[_PullItem] = []  # pulls waiting for the handshake or an NCCL comm
        # whole requests (p2pkv.request): waiting to be offered, offered by seq, and the posting order
        self.req_waiting: deque[RequestHandle] = deque()
        self.reqs: dict[int, RequestHandle] = {}
        self.req_order: deque[RequestHandle] = deque()
        # posting is done by callers' threads and the I/O thread; re-entered when a failure while
        # posting fails the request, which flushes again
        self.post_lock = threading.RLock()
        self.ipc_out: Any = None                # the peer's arena, mapped for writing (IPC requests)
        self.ipc_events: list[Any] = []         # interprocess events signalling our writes to the peer
        self.ipc_handles: list[bytes] = []
        self.ipc_next = 0
        self.copy_stream: Any = None
        self.rid = b""                          # our ZMQ routing id on this connection
        self.end: tuple[Any, Any] | None = None  # (local, remote) address of the current TCP connection
        self.fd = -1                            # its descriptor (ZMQ's), and what ZMQ had taken from
        self.rx_base = 0                        # it at a recent message boundary, and when
        self.rx_base_t = 0.0
        self.fast: Any = None                   # FastTx: the same-host fast path (p2pkv._engine.fastpath)
        self.fast_asked = False                 # we asked the peer for it (fq) once
        self.mq_pending = False                 # a caller waits for its memory regions (mq after the handshake)
        self.rdone_pending: list[str] = []      # read notifications waiting for the handshake
        self.shm_map: Any = None                # the peer's shared-memory arena, mapped (CPU fast path)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def busy(self) -> bool:
        return bool(self.queue or self.inflight or self.pulls or self.connect_waiters or self.pull_waiting
                    or self.req_waiting or self.reqs)


def peer_key(address: Any, user: Any = None) -> str:
    """Who a session's peer is, from what the kernel and the handshake say (never from what it
    claims, such as its engine id): its remote address (as the per-address connection cap counts
    them), and with CURVE the client key it authenticated with."""
    host = str(address)[:64] if address else "?"
    return f"{host}|{user}" if user else host


class _PeerBudget:
    """What one peer (all its sessions together: see peer_key) may take of the I/O thread (a token
    bucket, in seconds of its CPU time), and how many sessions it has."""

    __slots__ = ("io_tokens", "io_t", "sessions")

    def __init__(self, now: float):
        self.io_tokens = _IO_BURST_S                   # I/O-thread seconds it may still take now
        self.io_t = now
        self.sessions = 0

    def charge_io(self, dt: float, now: float) -> None:
        tokens = min(_IO_BURST_S, self.io_tokens + (now - self.io_t) * _IO_SHARE)
        self.io_tokens = max(-_IO_DEBT_S, tokens - dt)
        self.io_t = now

    def io_over(self, now: float) -> bool:
        return self.io_tokens + (now - self.io_t) * _IO_SHARE < 0

    def idle(self, now: float) -> bool:
        """No session, and its bucket full again: forgetting it gives its peer nothing."""
        return self.sessions == 0 and self.io_tokens + (now - self.io_t) * _IO_SHARE >= _IO_BURST_S


class _Session:
    """A peer's incoming connection to our ROUTER (identified by its routing id)."""

    def __init__(self, ident: bytes, eid: str, caps: dict[str, Any], budget: _PeerBudget | None = None):
        self.ident = ident
        self.eid = eid
        self.caps = caps
        self.last_rx = time.monotonic()
        # What this session may make us hold, in pool bytes (see _PushPath._charge): credit granted
        # and not used yet, credit revoked (crev) and not answered yet (data sent before the peer saw
        # the revocation may still come on it), eager offers paid from credit and not admitted yet,
        # admitted requests (``reserved``), and its data waiting unclaimed in the inbox.
        self.outstanding = 0
        self.revoked = 0
        self.eager_held = 0
        self.filling = 0                            # pool bytes of its admitted request not allocated yet
        self.tids: OrderedDict[str, None] = OrderedDict()  # transfer ids it sent or pulled (bounded)
        self.violations = 0                         # data messages refused for lack of credit
        self.last_use = self.last_rx                # last grant or data: credit idle since then
        self.revoking = 0.0                         # when we took its idle credit back (crev), or 0
        self.blocked_t = 0.0                        # when its window (its own credit) last held back its offer
        self.offer_tokens = float(_OFFER_ITEMS_BURST)  # tensors it may still offer now (a token bucket)
        self.offer_t = self.last_rx
        # what it may still take of the I/O thread: its peer's budget, shared by all the sessions of
        # that peer (see peer_key), so that many sessions get no more than one
        self.budget = budget if budget is not None else _PeerBudget(self.last_rx)
        self.budget.sessions += 1
        self.creq: tuple[int, int] | None = None
        self.creq_t = 0.0
        self.nccl: dict[str, Any] = {}
        self.nccl_backlog: list[dict[str, Any]] = []  # data headers waiting for the push comm
        self.ipc: Any = None
        self.offers: deque[Incoming] = deque()      # whole requests waiting for room (FIFO)
        self.admitted: dict[int, Incoming] = {}     # granted, not yet fully landed
        self.reserved = 0                           # pool bytes held by admitted requests
        self.watcher: Any = None                    # waits for this session's GPU landings
        self.ipc_events: dict[bytes, Any] = {}      # the peer's interprocess events, opened once

    @property
    def credit(self) -> int:
        """Credit this session may still send on: granted and unused, revoked but not answered yet."""
        return self.outstanding + self.revoked

    def spend(self, n: int) -> None:
        """Data or an eager offer of ``n`` pool bytes came on credit (revoked credit goes first: the
        peer sent it before it saw the revocation). The caller checked ``n <= credit``."""
        r = min(n, self.revoked)
        self.revoked -= r
        self.outstanding -= min(n - r, self.outstanding)

    def take_offer_budget(self, n: int, now: float) -> bool:
        """Take ``n`` tensors from the session's offer budget; False (nothing taken) if it has not that many."""
        tokens = min(float(_OFFER_ITEMS_BURST), self.offer_tokens + (now - self.offer_t) * _OFFER_ITEMS_PER_S)
        self.offer_t = now
        ok = tokens >= n
        self.offer_tokens = tokens - n if ok else tokens
        return ok

    def charge_io(self, dt: float, now: float) -> None:
        """The I/O thread spent ``dt`` seconds on this session's requests (charged to its peer)."""
        self.budget.charge_io(dt, now)

    def io_over(self, now: float) -> bool:
        """Whether its peer took more than its share of the I/O thread (see _IO_SHARE) and is not back within yet."""
        return self.budget.io_over(now)

    def queued_items(self) -> int:
        return sum(len(inc.specs) for inc in self.offers)

    def __repr__(self) -> str:
        return f"session({self.eid or self.ident.hex()})"


class _ParkedPull:
    __slots__ = ("sess", "seq", "key", "deadline", "dt", "sh", "x")

    def __init__(self, sess: _Session, seq: int, key: TransferKey, deadline: float, dt: Any, sh: Any, x: str):
        self.sess, self.seq, self.key, self.deadline, self.dt, self.sh, self.x = sess, seq, key, deadline, dt, sh, x


# Arenas of engines in this process, by engine id: CUDA IPC cannot open a handle
# exported by its own process, so same-process peers read each other's arena directly.
_LOCAL_ARENAS: dict[str, torch.Tensor] = {}
# Engines of this process by id (for reading a same-process engine's registered memory directly).
import weakref as _weakref  # noqa: E402

_LOCAL_ENGINES: _weakref.WeakValueDictionary[str, Any] = _weakref.WeakValueDictionary()
# Interprocess events of engines in this process, by IPC handle: a process cannot open its own handle.
_LOCAL_EVENTS: dict[bytes, Any] = {}

# Which peers live in this process is decided from what the kernel says about the connection,
# never from anything a peer sends (a value sent to one peer can be replayed by it, and a
# challenge answered by a local engine can be relayed by a peer in the middle):
# - every TCP connection end an engine of this process holds, (local, remote) -> its engine id.
#   A connection whose other end is in this table is between two engines of this process.
# - (listener's engine id, dialer's ZMQ routing id) -> dialer's engine id: written by a dialer
#   once the table above proved that its connection ends at that listener. The listener finds
#   its session (keyed by that routing id) here; a stranger reusing the routing id cannot, as the
#   ROUTER refuses a second connection with a routing id in use and the id is random.
_Endpoint = tuple[str, int]
_LOCAL_ENDS: dict[tuple[_Endpoint, _Endpoint], str] = {}
_LOCAL_DIALS: dict[tuple[str, bytes], str] = {}


class _LocalLink:
    """Our own mark in a peer's or session's caps (``caps["local"]``) that it is engine ``eid`` of
    this process; only ever put there by this process's code, never decoded from the wire."""

    __slots__ = ("eid", "listener", "rid")

    def __init__(self, eid: str, listener: str | None = None, rid: bytes = b""):
        self.eid = eid
        self.listener = listener  # set on the listening side: checked against _LOCAL_DIALS when used
        self.rid = rid

    def holds(self, eid: str) -> bool:
        if eid != self.eid:
            return False
        return self.listener is None or _LOCAL_DIALS.get((self.listener, self.rid)) == eid

    def __repr__(self) -> str:
        return f"_LocalLink({self.eid})"


def _plain_ip(host: Any) -> str:
    """``::ffff:a.b.c.d`` (an IPv4 peer of a dual-stack socket) as ``a.b.c.d``: both ends agree."""
    host = str(host)
    return host[7:] if host.lower().startswith("::ffff:") and "." in host else host


def _fd_ends(fd: int) -> tuple[_Endpoint, _Endpoint] | None:
    """``(local, remote)`` address of the TCP socket ``fd`` (ZMQ's: looked at, never closed)."""
    try:
        sock = _socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        local, remote = sock.getsockname(), sock.getpeername()
        if not isinstance(local, tuple) or not isinstance(remote, tuple):
            return None
        return (_plain_ip(local[0]), int(local[1])), (_plain_ip(remote[0]), int(remote[1]))
    except OSError:
        return None
    finally:
        sock.detach()


def _fd_ceiling() -> int:
    """Descriptors at or above this number are kept free for the rest of the process (dialing
    out, files): an accepted connection that gets one is shut down at once."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft > 1 << 20:
        soft = 1 << 20
    return max(16, soft - max(32, soft // 8))


def _fds_in_use() -> int | None:
    """Descriptors open in this process (Linux), or None when that cannot be told."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # (less the one listing it)
    except OSError:
        return None


def _shutdown_fd(fd: int, ends: tuple[_Endpoint, _Endpoint] | None) -> bool:
    """Shut down ZMQ's TCP socket ``fd`` (ZMQ then drops that connection and closes the fd), but
    only if it still is the connection ``ends`` (a closed fd may be reused by anything)."""
    if ends is None or _fd_ends(fd) != ends:
        return False
    sock = _socket.socket(fileno=fd)
    try:
        sock.shutdown(_socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        sock.detach()


def _zmq_consumed(fd: int) -> int | None:
    """Bytes ZMQ has taken from TCP socket ``fd`` so far (received by the kernel less those still
    queued in it), or None where the kernel does not say (Linux >= 4.1 does)."""
    import fcntl
    import struct
    import termios

    try:
        sock = _socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        info = sock.getsockopt(_socket.IPPROTO_TCP, _socket.TCP_INFO, 256)
        if len(info) < 136:
            return None
        queued = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        return int.from_bytes(info[128:136], "little") - queued  # tcpi_bytes_received
    except OSError:
        return None
    finally:
        sock.detach()


def _rss_bytes() -> int:
    """This process's resident memory (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _Accepted:
    """The connections into our ROUTER, by descriptor and by remote address (for their caps), and
    what ZMQ had taken from each when a whole message of it was last read (see _check_buffered)."""

    def __init__(self) -> None:
        self.ends: dict[int, tuple[_Endpoint, _Endpoint]] = {}
        self.by_host: dict[str, dict[int, None]] = {}  # remote address -> fds, oldest first
        self.base: dict[int, int] = {}       # fd -> bytes ZMQ had taken at a recent message boundary
        self.base_t: dict[int, float] = {}   # fd -> when that was measured
        self.ident: dict[int, bytes] = {}    # fd -> routing id of its messages (its session)
        self.last: dict[int, float] = {}     # fd -> when its last whole message was read

    def __len__(self) -> int:
        return len(self.ends)

    def add(self, fd: int, ends: tuple[_Endpoint, _Endpoint]) -> None:
        self.drop(fd)
        self.ends[fd] = ends
        self.by_host.setdefault(ends[1][0], {})[fd] = None

    def drop(self, fd: int) -> tuple[_Endpoint, _Endpoint] | None:
        self.base.pop(fd, None)
        self.base_t.pop(fd, None)
        self.ident.pop(fd, None)
        self.last.pop(fd, None)
        ends = self.ends.pop(fd, None)
        if ends is not None:
            fds = self.by_host[ends[1][0]]
            del fds[fd]
            if not fds:
                del self.by_host[ends[1][0]]
        return ends

    def count(self, host: str) -> int:
        fds = self.by_host.get(host)
        return len(fds) if fds is not None else 0

    def heaviest(self) -> str:
        return max(self.by_host, key=lambda h: len(self.by_host[h]))


def _local_arena(eid: str, caps: Any) -> torch.Tensor | None:
    """The arena of engine ``eid`` if it really is an engine of this process (see _LocalLink)."""
    arena = _LOCAL_ARENAS.get(eid)
    if arena is None or not isinstance(caps, dict):
        return None
    link = caps.get("local")
    return arena if isinstance(link, _LocalLink) and link.holds(eid) else None


def _forget_local_arenas() -> None:
    """After fork: the parent's engines and connections are not ours."""
    _LOCAL_ARENAS.clear()
    _LOCAL_ENDS.clear()
    _LOCAL_DIALS.clear()


# ----------------------------------------------------------------------------- engine
def _valid_seq(seq: Any) -> int | None:
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**63 else None


_PEEK_BYTES = 16 << 10  # a header this large from a peer over its share of the I/O thread is peeked at, not decoded


def _peek(hdr: bytes) -> dict[str, Any]:
    """The top-level scalar fields of a header, read without building its lists or maps (msgpack
    skips them, in C): enough to answer or drop a large header without decoding it. {} if malformed."""
    import msgpack

    out: dict[str, Any] = {}
    try:
        u = msgpack.Unpacker(raw=False, max_str_len=8192, max_bin_len=8192, max_array_len=4096, max_map_len=64)
        u.feed(hdr)
        for _ in range(min(u.read_map_header(), 64)):
            k = u.unpack()
            if k in ("t", "seq", "eager", "v"):
                out[k] = u.unpack()
            else:
                u.skip()
    except Exception:
        return {}
    return out


def _seq_of(hdr: bytes) -> int | None:
    """Best-effort ``seq`` of a header that failed validation, so the sender's item fails fast."""
    try:
        import msgpack

        m = msgpack.unpackb(hdr, raw=False, max_str_len=8192, max_bin_len=8192, max_array_len=4096,
                            max_map_len=64)
        return _valid_seq(m.get("seq")) if isinstance(m, dict) else None
    except Exception:
        return None


def _drain(sock: zmq.Socket) -> int:
    """Discard the rest of a multipart message (keeps framing safe after an error); return how
    many frames were left. ZMQ hands over a message only once all of it arrived, so these are
    never waited for."""
    n = 0
    while sock.getsockopt(zmq.RCVMORE):
        sock.recv(copy=False)
        n += 1
    return n

