"""The engine: p2pkv's public API and its I/O thread.

One engine per process (or per GPU worker). It listens on a ZMQ ROUTER socket
for peers' requests and opens one DEALER socket per peer it talks to, so every
request travels on the requester's own connection and its reply comes back on
it. A single I/O thread owns every socket; API calls hand it commands through a
queue and a wake-up pipe and wait on events with deadlines.

Flow control: a receiver grants *credit* (bytes of pool space) to each sending
peer; a sender never pushes beyond its credit. The first tensor of a burst
costs one credit request, later layers ride on the window granted with it,
and unused credit goes back when the sender goes idle. A full receiver
therefore pushes back (the sender's handle waits, then times out with a clear
error); it never over-admits and never drops a tensor silently.

Liveness: peers ping each other every ``heartbeat_s``; a peer silent for
``peer_timeout_s`` (or whose TCP connection closed) is lost, and every transfer
it had in flight fails with :class:`PeerLost`, freeing its memory.
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import re
import socket as _socket
import threading
import time
import uuid
import warnings
from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import zmq

from . import _tensors as T
from . import _trace
from .config import EngineConfig
from .control.messages import REPLY_TYPES, REQUEST_TYPES, decode, encode
from .errors import (AuthError, ConfigError, DuplicateKey, EngineClosed, InvalidAddress, InvalidKey, InvalidTensor,
                     P2pkvError, PeerLost, PoolExhausted, ProtocolError, ShapeMismatch, TransferAborted, TransferTimeout,
                     TransportError,
                     error_from_code)
from .handles import SendHandle, TransferState
from .keys import TransferKey, validate_transfer_id
from .mailbox import Mailbox, Slot
from .pool import ALIGN, Buffer, BufferPool
from .request import Incoming, RequestHandle, RequestState, Watcher, parse_layout, wire_items
from .stats import Stats
from .transport import tcp

__all__ = ["Engine"]

log = logging.getLogger("p2pkv")

_ADDR = re.compile(r"^(?:\[([0-9a-fA-F:.]+)\]|([A-Za-z0-9_.\-]+)):(\d{1,5})$")
_TICK_S = 0.02
_IPC_EVENTS = 64  # interprocess events per peer signalling IPC request writes (a ring)


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
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as f:
                mid = f.read().strip()
            if mid:
                return f"{mid}:{_socket.gethostname()}"
        except OSError:
            pass
    return f"host:{_socket.gethostname()}"


# ----------------------------------------------------------------------------- work items
class _SendItem:
    __slots__ = ("handle", "key", "payload", "dtype", "shape", "nbytes", "footprint", "deadline", "seq", "ready",
                 "stage", "gpu_event")

    def __init__(self, handle: SendHandle, payload: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...],
                 deadline: float, ready: Any = None):
        self.handle = handle
        self.key = handle.key
        self.payload = payload
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
    __slots__ = ("event", "error")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: P2pkvError | None = None


class _Peer:
    """Our outgoing connection (DEALER) to one peer engine."""

    def __init__(self, addr: str, sock: zmq.Socket, mon: zmq.Socket):
        now = time.monotonic()
        self.addr = addr
        self.sock = sock
        self.mon = mon
        self.ready = False
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
        self.post_lock = threading.Lock()      # posting is done by callers' threads and the I/O thread
        self.ipc_out: Any = None                # the peer's arena, mapped for writing (IPC requests)
        self.ipc_events: list[Any] = []         # interprocess events signalling our writes to the peer
        self.ipc_handles: list[bytes] = []
        self.ipc_next = 0
        self.copy_stream: Any = None

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def busy(self) -> bool:
        return bool(self.queue or self.inflight or self.pulls or self.connect_waiters or self.pull_waiting
                    or self.req_waiting or self.reqs)


class _Session:
    """A peer's incoming connection to our ROUTER (identified by its routing id)."""

    def __init__(self, ident: bytes, eid: str, caps: dict[str, Any]):
        self.ident = ident
        self.eid = eid
        self.caps = caps
        self.last_rx = time.monotonic()
        self.outstanding = 0
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

    def __repr__(self) -> str:
        return f"session({self.eid or self.ident.hex()})"


class _ParkedPull:
    __slots__ = ("sess", "seq", "key", "deadline", "dt", "sh", "x")

    def __init__(self, sess: _Session, seq: int, key: TransferKey, deadline: float, dt: Any, sh: Any, x: str):
        self.sess, self.seq, self.key, self.deadline, self.dt, self.sh, self.x = sess, seq, key, deadline, dt, sh, x


# Arenas of engines in this process, by engine id: CUDA IPC cannot open a handle
# exported by its own process, so same-process peers read each other's arena directly.
_LOCAL_ARENAS: dict[str, torch.Tensor] = {}


# ----------------------------------------------------------------------------- engine
class Engine:
    """A p2pkv endpoint: pushes, receives, publishes and pulls KV tensors.

    Parameters
    ----------
    config:
        An :class:`EngineConfig`; keyword arguments override its fields (or
        build one when ``config`` is omitted).

    Raises
    ------
    ConfigError
        Invalid settings, or a device that is not available.
    P2pkvError
        The control socket could not be bound.
    """

    def __init__(self, config: EngineConfig | None = None, **overrides: Any):
        if config is None:
            config = EngineConfig.from_dict(overrides)
        elif not isinstance(config, EngineConfig):
            raise ConfigError(f"config must be an EngineConfig, got {type(config).__name__}")
        elif overrides:
            config = EngineConfig.from_dict({**{k: getattr(config, k) for k in EngineConfig.field_names()},
                                             **overrides})
        self._cfg = config
        self._closed = True  # until construction completes (so __del__ stays quiet on failure)
        self._thread: threading.Thread | None = None
        self._device = self._resolve_device(config.device)
        self.eid = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._stats = Stats()
        self._cuda = self._device.type == "cuda"
        self._arena_owner = None
        arena = None
        if self._cuda:
            from .transport.cuda import alloc_arena

            arena, self._arena_owner = alloc_arena(BufferPool.footprint(config.pool_bytes), self._device)
        self._pool = BufferPool(config.pool_bytes, self._device, on_free=self._on_pool_free, arena=arena)
        self._pinned = (BufferPool(config.pinned_bytes, "cpu", pin_memory=True, prefault=False)
                        if self._cuda and config.pinned_bytes else None)
        self._inbox = Mailbox(config.ttl_s, name="inbox")
        self._outbox = Mailbox(config.ttl_s, name="outbox")
        self._cmds: deque[tuple] = deque()
        self._mem_dirty = False
        self._host = _host_id()
        self._init_gpu_plane()

        self._ctx = zmq.Context(io_threads=1)
        try:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._router.setsockopt(zmq.SNDHWM, 0)
            self._router.setsockopt(zmq.RCVHWM, 0)
            self._router.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes + 65536)
            if ":" in config.host:
                self._router.setsockopt(zmq.IPV6, 1)
            try:
                self._router.bind(_zmq_endpoint(config.host, config.port or "*"))
            except zmq.ZMQError as exc:
                raise P2pkvError(f"cannot listen on {config.host}:{config.port}: {exc}") from None
            endpoint = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
            self.port = int(endpoint.rsplit(":", 1)[1])
            adv = config.advertise_host or ("127.0.0.1" if config.host in ("0.0.0.0", "*") else
                                            "::1" if config.host == "::" else config.host)
            self.address = f"[{adv}]:{self.port}" if ":" in adv else f"{adv}:{self.port}"
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
        except BaseException:
            self._ctx.destroy(linger=0)
            self._pool.close()
            raise

        self._peers: dict[str, _Peer] = {}
        self._peer_by_sock: dict[zmq.Socket, _Peer] = {}
        self._peer_by_mon: dict[zmq.Socket, _Peer] = {}
        self._sessions: dict[bytes, _Session] = {}
        self._parked: list[_ParkedPull] = []
        self._pending_acks: dict[bytes, list[int]] = {}
        self._incoming: dict[tuple[bytes, int], Incoming] = {}   # whole requests coming in, by (session, seq)
        self._incoming_keys: set[TransferKey] = set()
        self._scratch: torch.Tensor | None = None
        self._tracked: list[tuple[zmq.MessageTracker, Buffer]] = []
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._next_expire = 0.0
        self._next_tick = 0.0
        self._wake_sent = False
        if self._cuda:
            from .transport.cuda import Completer

            _LOCAL_ARENAS[self.eid] = self._pool.arena
            self._completer = Completer(self._post_gpu, name=f"p2pkv-cuda-{self.port}")
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"p2pkv-io-{self.port}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> EngineConfig:
        return self._cfg

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def pool(self) -> BufferPool:
        return self._pool

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"<p2pkv.Engine {self.address} device={self._device} {'closed' if self._closed else 'open'}>"

    # ------------------------------------------------------------------ public API
    def send(self, peer: str, key: TransferKey, tensor: torch.Tensor, *, timeout: float | None = None) -> SendHandle:
        """Push ``tensor`` to the engine at ``peer`` under ``key``; returns at once.

        The handle finishes when the receiver has stored the tensor (``DONE``)
        or the send failed (``FAILED``/``ABORTED`` with a typed ``error``).
        ``timeout`` (default ``timeout_s``) bounds the whole send: connecting,
        waiting for credit and the receiver's ack.

        Raises
        ------
        InvalidKey, InvalidTensor, InvalidAddress, EngineClosed
            Bad arguments are refused before anything is queued.
        """
        _trace.mark("send.enter", key)
        self._check_open()
        parse_address(peer)
        self._check_key(key)
        t = T.check_tensor(tensor)
        nbytes = t.numel() * t.element_size()
        if nbytes > self._cfg.max_message_bytes:
            raise InvalidTensor(f"tensor of {nbytes} bytes exceeds max_message_bytes={self._cfg.max_message_bytes}",
                                key=key)
        to = self._timeout(timeout)
        handle = SendHandle(key, peer, nbytes)
        ready = None
        if t.device.type == "cuda":
            if t.device != self._device:
                raise InvalidTensor(f"tensor is on {t.device}; this engine sends from {self._device}", key=key)
            # Ordered after whatever the caller's stream still has to write into the tensor;
            # nothing here blocks the caller.
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(t.device))
            payload = t
        else:
            payload = T.as_bytes(t)
        handle._tensor = payload
        item = _SendItem(handle, payload, t.dtype, tuple(t.shape), time.monotonic() + to, ready)
        self._stats.add("sends")
        self._submit(("send", peer, item))
        _trace.mark("send.ret", key)
        return handle

    def send_request(self, peer: str, transfer_id: str, layout: Any, *,
                     timeout: float | None = None) -> RequestHandle:
        """Start a whole-request push to ``peer``: one offer naming every tensor, then the data.

        ``layout`` lists the request's tensors in the order they will move:
        ``[(name, tensor), ...]`` or ``[(name, dtype, shape), ...]`` (or a dict).
        The receiver reserves pool room for all of them at once; hand each
        tensor over with :meth:`RequestHandle.send` as soon as it is ready (it
        moves without blocking the caller, on the caller's thread for NCCL and
        CUDA IPC). The receiver claims each tensor with :meth:`recv` /
        :meth:`claim` under ``TransferKey(transfer_id, name)``, as for
        :meth:`send`. ``timeout`` (default ``timeout_s``) bounds the whole request.

        Raises
        ------
        InvalidKey, InvalidTensor, InvalidAddress, EngineClosed
            Bad arguments are refused before anything is queued.
        """
        self._check_open()
        parse_address(peer)
        specs = parse_layout(transfer_id, layout, self._cfg.max_message_bytes)
        req = RequestHandle(self, peer, transfer_id, specs, self._timeout(timeout))
        self._stats.add("requests")
        self._submit(("offer", peer, req))
        return req

    def _request_send(self, req: RequestHandle, i: int, t: torch.Tensor) -> None:
        """``RequestHandle.send``: runs on the caller's thread."""
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

    def recv(self, key: TransferKey, *, timeout: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Wait for the tensor pushed under ``key`` and return it (or fill ``out``).

        May be called before or after the data arrived.

        Raises
        ------
        TransferTimeout
            Nothing arrived within ``timeout`` (default ``timeout_s``).
        PeerLost
            The peer that was sending this transfer was lost before this key came.
        TransferAborted, TransferEvicted
            The transfer was aborted, or the data expired unclaimed.
        ShapeMismatch, InvalidTensor
            ``out`` does not fit the data (which stays claimable) or this engine.
        """
        self._check_open()
        self._check_key(key)
        if out is not None:
            T.check_out(out, self._device)
        t0 = time.monotonic()
        slot = self._inbox.claim(key, self._timeout(timeout), self._out_check(out), self._closed_error)
        _trace.mark("recv.woke", key)
        try:
            src = slot.tensor()
            result = out.copy_(src) if out is not None else src.clone()
        finally:
            self._release_after_caller(slot.buf)
        _trace.mark("recv.ret", key)
        self._stats.add("recvs")
        self._stats.add("bytes_received_claimed", slot.buf.nbytes)
        self._stats.observe("recv_wait", time.monotonic() - t0)
        return result

    @contextmanager
    def claim(self, key: TransferKey, *, timeout: float | None = None) -> Iterator[torch.Tensor]:
        """Like :meth:`recv` without the copy: yields a view of the pool buffer,
        valid inside the ``with`` block only; the buffer returns to the pool at exit
        (for CUDA, once the work queued on the current stream by then has finished)."""
        self._check_open()
        self._check_key(key)
        slot = self._inbox.claim(key, self._timeout(timeout), None, self._closed_error)
        try:
            self._stats.add("recvs")
            yield slot.tensor()
        finally:
            self._release_after_caller(slot.buf)

    def alloc_buffer(self, nbytes: int, *, timeout: float | None = None) -> Buffer:
        """A buffer from this engine's pool (e.g. to pack KV blocks into).

        Tensors sent from inside the pool go out over CUDA IPC without a
        staging copy. Release the buffer once its send handle has finished.

        Raises
        ------
        PoolExhausted
        """
        self._check_open()
        return self._pool.alloc(nbytes, timeout=self._timeout(timeout))

    def publish(self, key: TransferKey, tensor: torch.Tensor, *, timeout: float | None = None) -> None:
        """Park a copy of ``tensor`` in this engine's pool under ``key`` for a peer to :meth:`pull`.

        Waits up to ``timeout`` for pool space. Unpulled data is evicted after
        ``ttl_s``; :meth:`abort` drops it at once.

        Raises
        ------
        PoolExhausted
            No pool space came free in time.
        DuplicateKey
            Data is already published under this key.
        """
        self._check_open()
        self._check_key(key)
        t = T.check_tensor(tensor)
        if t.device != self._device and not (t.device.type == "cpu" or self._device.type == "cpu"):
            raise InvalidTensor(f"tensor is on {t.device}; this engine's pool is on {self._device}", key=key)
        nbytes = t.numel() * t.element_size()
        buf = self._pool.alloc(nbytes, timeout=self._timeout(timeout))
        try:
            if nbytes:
                buf.data.copy_(T.as_bytes(t))
                if self._device.type == "cuda":
                    torch.cuda.current_stream(self._device).synchronize()
            err = self._outbox.deliver(key, buf, t.dtype, tuple(t.shape))
        except BaseException:
            buf.release()
            raise
        if err is not None:
            buf.release()
            raise err
        self._stats.add("published")
        self._submit(("published", key))

    def pull(self, peer: str, key: TransferKey, *, timeout: float | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Fetch the tensor that the engine at ``peer`` published under ``key``.

        Waits (up to ``timeout``) for the publisher to publish it if it has
        not yet. With ``out`` the data lands directly there; its dtype and
        shape are checked by the publisher before anything is sent.

        Raises
        ------
        TransferTimeout, PeerLost, TransferAborted, ShapeMismatch, InvalidTensor
        """
        self._check_open()
        parse_address(peer)
        self._check_key(key)
        if out is not None:
            T.check_out(out, self._device)
        to = self._timeout(timeout)
        item = _PullItem(key, peer, out, to)
        t0 = time.monotonic()
        self._submit(("pull", peer, item))
        if not item.event.wait(to + 0.5):
            self._submit(("cancel_pull", peer, item))
            item.finish(error=TransferTimeout(f"pull got no answer within {to:.3g}s", key=key, peer=peer))
        if item.error is not None:
            self._stats.add("pull_errors")
            raise item.error
        assert item.result is not None
        self._stats.add("pulls")
        self._stats.observe("pull", time.monotonic() - t0)
        return item.result

    def connect(self, peer: str, *, timeout: float | None = None) -> None:
        """Open (and handshake) the connection to ``peer`` ahead of the first send.

        Raises
        ------
        TransferTimeout, AuthError, PeerLost
        """
        self._check_open()
        parse_address(peer)
        to = self._timeout(timeout)
        w = _ConnectWaiter()
        self._submit(("connect", peer, w))
        if not w.event.wait(to):
            raise TransferTimeout(f"no handshake with {peer} within {to:.3g}s", peer=peer)
        if w.error is not None:
            raise w.error

    def abort(self, transfer_id: str) -> None:
        """Drop every key of ``transfer_id`` here and tell every connected peer to do the same.

        Pending sends and pulls of it fail with :class:`TransferAborted`; its
        received and published data is freed at once; data for it that
        arrives later is refused.
        """
        self._check_open()
        validate_transfer_id(transfer_id)
        self._stats.add("aborts")
        # Local data is dropped here and now (the mailboxes are thread-safe), so memory is
        # back when abort() returns; the I/O thread fails in-flight work and tells the peers.
        reason = "transfer aborted locally"
        for buf in self._inbox.abort(transfer_id, reason) + self._outbox.abort(transfer_id, reason):
            buf.release()  # complete data nobody is reading: no GPU work can still touch it
        self._submit(("abort", transfer_id, True))

    def stats(self) -> dict[str, Any]:
        """Counters, bytes, pool use, mailbox state and latency percentiles."""
        s = self._stats.snapshot()
        s["pool"] = self._pool.stats()
        s["inbox"] = self._inbox.stats()
        s["outbox"] = self._outbox.stats()
        s["peers"] = len(self._peers)
        s["sessions"] = len(self._sessions)
        s["address"] = self.address
        s["device"] = str(self._device)
        return s

    def close(self) -> None:
        """Stop the engine: pending transfers fail with :class:`EngineClosed`,
        peers are told goodbye, sockets and the pool are released. Idempotent."""
        if self._closed:
            return
        self._closed = True
        th = self._thread
        if th is not None and th.is_alive():
            self._submit(("stop",), force=True)
            th.join(timeout=10.0)
        self._teardown()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True) is False:
            warnings.warn(f"p2pkv Engine at {getattr(self, 'address', '?')} was not closed", ResourceWarning,
                          stacklevel=2)
            try:
                self.close()
            except Exception:  # pragma: no cover - interpreter shutdown
                pass

    # ------------------------------------------------------------------ helpers (API side)
    def _resolve_device(self, dev: str) -> torch.device:
        if dev == "cpu":
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise ConfigError(f"device {dev!r} requested but CUDA is not available")
        d = torch.device(dev)
        idx = torch.cuda.current_device() if d.index is None else d.index
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"device {dev!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", idx)

    def _init_gpu_plane(self) -> None:
        cfg = self._cfg
        self._ipc_handle: bytes | None = None
        self._nccl_ok = False
        self._completer: Any = None
        self._copy_stream: Any = None
        self._loop_comm: Any = None
        self._lent: dict[tuple[bytes, int], tuple[Buffer, float]] = {}
        self._retry_parked = False
        if not self._cuda:
            if cfg.transport in ("ipc", "nccl"):
                raise ConfigError(f"transport={cfg.transport!r} needs a CUDA device; this engine is on {self._device}")
            return
        if cfg.transport in ("auto", "ipc"):
            from .transport.cuda import ipc_handle

            try:
                self._ipc_handle = ipc_handle(self._arena_owner)
            except Exception as exc:  # pragma: no cover - driver refuses IPC
                log.warning("CUDA IPC unavailable: %s", exc)
            if cfg.transport == "ipc" and self._ipc_handle is None:
                raise ConfigError("transport='ipc' but the pool cannot be exported through CUDA IPC (is CuPy installed?)")
        if cfg.transport in ("auto", "nccl"):
            from .transport.nccl import nccl_available

            self._nccl_ok = nccl_available()
            if cfg.transport == "nccl" and not self._nccl_ok:
                raise ConfigError("transport='nccl' but nccl4py is not installed (pip install 'p2pkv[cu13]')")
        self._copy_stream = torch.cuda.Stream(self._device)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed(f"engine {self.address} is closed")

    @staticmethod
    def _check_key(key: Any) -> None:
        if not isinstance(key, TransferKey):
            raise InvalidKey(f"key must be a p2pkv.TransferKey, got {type(key).__name__}: {key!r:.80}")

    def _timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return self._cfg.timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout != timeout or timeout < 0:
            raise ConfigError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        return float(timeout)

    def _out_check(self, out: torch.Tensor | None):
        if out is None:
            return None

        def check(slot: Slot) -> None:
            T.check_out(out, self._device, slot.dtype, slot.shape)

        return check

    def _closed_error(self) -> P2pkvError | None:
        return EngineClosed(f"engine {self.address} closed while waiting") if self._closed else None

    def _submit(self, cmd: tuple, force: bool = False) -> None:
        if self._closed and not force:
            raise EngineClosed(f"engine {self.address} is closed")
        self._cmds.append(cmd)
        if not self._wake_sent:
            self._wake_sent = True
            try:
                os.write(self._wake_w, b"x")
            except (BlockingIOError, OSError):
                pass  # pipe full: the I/O thread is already due to wake

    def _release_after_caller(self, buf: Buffer) -> None:
        """Return a pool buffer once the work the caller queued on its current CUDA stream
        (a copy out of it, an unpack kernel) has finished; at once for CPU buffers."""
        if not self._cuda or self._completer is None or self._closed:
            if self._cuda:
                torch.cuda.current_stream(self._device).synchronize()
            buf.release()
            return
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self._device))
        self._completer.add(ev, lambda ok: buf.release(), time.monotonic() + 3600)

    def _post_gpu(self, callback, ok: bool) -> None:
        """Called by the CUDA completion thread: run ``callback(ok)`` on the I/O thread."""
        self._cmds.append(("gpu", callback, ok))
        try:
            os.write(self._wake_w, b"g")
        except (BlockingIOError, OSError):
            pass

    def _on_pool_free(self) -> None:
        if not self._mem_dirty and not self._closed:
            self._mem_dirty = True
            try:
                os.write(self._wake_w, b"m")
            except (BlockingIOError, OSError):
                pass

    # ================================================================== I/O thread
    def _run(self) -> None:
        if self._cuda:
            torch.cuda.set_device(self._device)
        try:
            while True:
                try:
                    events = dict(self._poller.poll(int(_TICK_S * 1000)))
                except zmq.ZMQError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    raise
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
                        return
                    self._flush_acks()
                if self._router in events:
                    self._pump_router()
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
                    self._grant_credit()
                    self._admit()
                    for peer in list(self._peers.values()):
                        if peer.queue and peer.ready:  # sends waiting for a staging buffer
                            self._pump_sends(peer)
                now = time.monotonic()
                if now >= self._next_tick:  # timers scan whole queues: at most every 10 ms
                    self._next_tick = now + 0.01
                    self._tick()
        except Exception:  # pragma: no cover - a bug: fail loudly, never hang callers
            log.exception("p2pkv I/O thread crashed; failing all pending transfers")
            self._closed = True
        finally:
            self._fail_everything(lambda: EngineClosed(f"engine {self.address} closed"))

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
                    if peer is not None:
                        peer.pulls.pop(cmd[2].seq, None)
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
                    peer, req = cmd[1], cmd[2]
                    if self._peers.get(peer.addr) is peer and req.seq in peer.reqs:
                        peer.sock.send(encode("opost", seq=req.seq, idx=cmd[3], ev=cmd[4]))
                        peer.last_tx = time.monotonic()
                elif op == "ofail":
                    self._fail_request(cmd[1], RequestState.FAILED, cmd[2])
                elif op == "odone":
                    self._request_done(cmd[1])
            except P2pkvError as exc:  # pragma: no cover - defensive
                log.warning("command %s failed: %s", op, exc)
            except Exception:  # a bug in one command must not stop the engine
                self._stats.add("internal_errors")
                log.exception("command %s failed", op)
        return False

    # ------------------------------------------------------------------ peers (DEALER side)
    def _get_peer(self, addr: str) -> _Peer:
        peer = self._peers.get(addr)
        if peer is not None:
            return peer
        host, port = parse_address(addr)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        sock.setsockopt(zmq.MAXMSGSIZE, self._cfg.max_message_bytes + 65536)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
        mon = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(_zmq_endpoint(host, port))
        peer = _Peer(addr, sock, mon)
        self._peers[addr] = peer
        self._peer_by_sock[sock] = peer
        self._peer_by_mon[mon] = peer
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(mon, zmq.POLLIN)
        hello = {"eid": self.eid, "host": self._host, "pid": os.getpid(), "dev": str(self._device),
                 "caps": self._caps()}
        if self._cfg.auth_token is not None:
            hello["tok"] = self._cfg.auth_token
        sock.send(encode("hello", **hello))
        peer.last_tx = time.monotonic()
        self._stats.add("connections")
        return peer

    def _caps(self) -> dict[str, Any]:
        caps: dict[str, Any] = {"transports": ["tcp"], "align": ALIGN, "host": self._host, "cuda": self._cuda,
                                "dev": str(self._device), "pid": os.getpid()}
        if self._ipc_handle is not None:
            caps["transports"].append("ipc")
            caps["ipc"] = {"handle": self._ipc_handle, "size": self._pool.capacity}
        if self._nccl_ok:
            caps["transports"].append("nccl")
        return caps

    def _choose_transport(self, caps: dict[str, Any]) -> str:
        """The transport for CUDA tensors to a peer with ``caps`` (CPU tensors always use TCP)."""
        want = self._cfg.transport
        theirs = caps.get("transports") if isinstance(caps.get("transports"), list) else []
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

    def _lose_peer(self, peer: _Peer, make_error) -> None:
        """Fail everything in flight to ``peer`` and drop the connection."""
        n = self._fail_peer_work(peer, make_error)
        self._close_peer(peer)
        if peer.ready:
            self._stats.add("peers_lost")
            log.info("peer %s lost: %s (%d transfers failed)", peer.addr, make_error(), n)
            # The same engine's connection into our ROUTER is dead too.
            for sess in [s for s in self._sessions.values() if s.eid == peer.eid]:
                self._lose_session(sess, "peer lost")

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
        x = self._pull_transport(peer, item)
        if x == "nccl" and peer.eid == self.eid:
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

    def _cmd_connect(self, addr: str, w: _ConnectWaiter) -> None:
        peer = self._get_peer(addr)
        if peer.ready:
            w.event.set()
        else:
            peer.connect_waiters.append(w)

    # ------------------------------------------------------------------ send pipeline
    def _item_transport(self, peer: _Peer, item: _SendItem) -> str:
        return peer.xport if item.ready is not None else "tcp"

    def _pump_sends(self, peer: _Peer) -> None:
        if not peer.ready:
            return
        while peer.queue:
            item = peer.queue[0]
            x = self._item_transport(peer, item)
            loop_nccl = x == "nccl" and peer.eid == self.eid
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
        peer.sock.send(self._data_header(item, "nccl"))
        comm.stream.wait_event(item.ready)
        comm.send(T.as_bytes(item.payload), comm.stream)
        item.gpu_event = torch.cuda.Event()
        item.gpu_event.record(comm.stream)

    def _loopback_nccl_send(self, peer: _Peer, item: _SendItem, comm: Any) -> bool:
        """An engine sending to itself over NCCL: one grouped send+recv on a one-rank communicator."""
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
            self._finish_send(item, TransferState.DONE)

        self._completer.add(ev, done, item.deadline)
        self._stats.add("bytes_sent", item.nbytes)
        self._stats.add("sent_nccl")
        return True

    def _finish_send(self, item: _SendItem, state: TransferState, error: P2pkvError | None = None) -> bool:
        item.payload = None  # type: ignore[assignment]
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

    def _release_after(self, buf: Buffer, event: Any) -> None:
        """Release ``buf`` once the GPU work reading or writing it (``event``) is done."""
        if event is None or event.query() or self._completer is None:
            buf.release()
        else:
            self._completer.add(event, lambda ok: buf.release(), time.monotonic() + 3600)

    # ------------------------------------------------------------------ NCCL communicators
    def _nccl_kwargs(self) -> dict[str, Any]:
        c = self._cfg
        return {"deadline": time.monotonic() + c.nccl_init_timeout_s, "min_ctas": c.nccl_min_ctas,
                "max_ctas": c.nccl_max_ctas, "buffsize": c.nccl_buffsize}

    def _peer_comm(self, peer: _Peer, direction: str) -> Any:
        """The ready communicator of ``direction`` to ``peer``, starting it if needed; None while it initialises."""
        comm = peer.nccl.get(direction)
        if comm is None:
            from .transport.nccl import Comm, new_unique_id

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
            from .transport.nccl import Comm, new_unique_id

            comm = self._loop_comm = Comm(1, 0, new_unique_id(), self._device, **self._nccl_kwargs())
            self._stats.add("nccl_comms")
        state = comm.poll()
        if state == "ready":
            return comm
        if state == "failed":
            self._loop_comm = None
            for peer in self._peers.values():
                if peer.eid == self.eid:
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
            peer.last_rx = time.monotonic()
            try:
                msg = decode(hdr, REPLY_TYPES)
                self._on_reply(peer, msg)
            except P2pkvError as exc:
                self._stats.add("protocol_errors")
                log.warning("bad reply from %s: %s", peer.addr, exc)
            finally:
                if peer.addr in self._peers:
                    _drain(sock)

    def _on_reply(self, peer: _Peer, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "pong":
            return
        if t == "hok":
            if peer.ready and msg["eid"] != peer.eid:
                self._lose_peer(peer, lambda: PeerLost("peer restarted", peer=peer.addr))
                return
            peer.ready = True
            peer.eid = msg["eid"]
            peer.caps = msg["caps"]
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
        elif t == "pdata":
            self._on_pdata(peer, msg)
        elif t == "perr":
            pull = peer.pulls.pop(msg["seq"], None)
            if pull is not None:
                pull.finish(error=error_from_code(msg["code"], msg["msg"], key=pull.key, peer=peer.addr))
        elif t == "abort":
            self._do_abort(msg["tid"], broadcast=False, reason=f"transfer aborted by peer {peer.addr}")
        elif t == "nok":
            pass  # the peer is joining the communicator; readiness shows in poll()
        elif t in ("ogrant", "oerr", "odone"):
            self._on_request_reply(peer, t, msg)
        elif t == "err":
            code = msg["code"]
            if code == "auth":
                err_msg = msg["msg"]
                self._lose_peer(peer, lambda: AuthError(err_msg, peer=peer.addr))
            elif code == "no_session":
                self._lose_peer(peer, lambda: PeerLost("peer restarted (it has no session for us)", peer=peer.addr))
            elif code == "transport" and msg.get("seq") is None:
                exc = TransportError(msg["msg"], peer=peer.addr)
                only = msg.get("dir")
                for direction in list(peer.nccl):
                    if only is None or only == direction:
                        self._fail_nccl(peer, direction, exc)
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
            dst = pull.out if pull.out is not None else torch.empty(shape, dtype=dtype, device=self._device)
            if pull.out is not None:
                T.check_out(dst, self._device, dtype, shape)
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
        except P2pkvError as exc:
            if x == "ipc":
                peer.sock.send(encode("pdone", seq=msg["seq"]))
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
        local = _LOCAL_ARENAS.get(eid)
        if local is not None:
            if off < 0 or off + n > local.numel():
                raise ProtocolError(f"IPC range [{off}, {off + n}) outside the peer's arena")
            return local[off:off + n]
        if holder.ipc is None:
            info = caps.get("ipc")
            if not isinstance(info, dict) or not isinstance(info.get("handle"), bytes) \
                    or not isinstance(info.get("size"), int):
                raise TransportError("the peer offered no CUDA IPC handle")
            from .transport.cuda import IpcMapping

            holder.ipc = IpcMapping(info["handle"], info["size"], self._device)
            self._stats.add("ipc_mappings")
        try:
            return holder.ipc.view(off, n)
        except TransportError as exc:
            raise ProtocolError(str(exc)) from None

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

    # ------------------------------------------------------------------ sessions (ROUTER side)
    def _pump_router(self) -> None:
        r = self._router
        for _ in range(256):
            try:
                ident = r.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if not r.getsockopt(zmq.RCVMORE):
                continue  # an empty message: nothing to do
            hdr = r.recv()
            try:
                msg = decode(hdr, REQUEST_TYPES)
                self._on_request(ident, msg)
            except P2pkvError as exc:
                self._stats.add("protocol_errors")
                self._reply(ident, "err", code=exc.code, msg=str(exc)[:500], seq=_seq_of(hdr))
            except Exception as exc:  # a bug must not kill the engine
                self._stats.add("internal_errors")
                log.exception("internal error handling a request")
                self._reply(ident, "err", code="error", msg=f"internal error: {type(exc).__name__}")
            finally:
                _drain(r)
        self._flush_acks()

    def _reply(self, ident: bytes, mtype: str, payload: torch.Tensor | None = None, track: Buffer | None = None,
               **fields: Any) -> bool:
        try:
            if payload is None:
                self._router.send_multipart([ident, encode(mtype, **fields)])
            else:
                self._router.send(ident, zmq.SNDMORE)
                self._router.send(encode(mtype, **fields), zmq.SNDMORE)
                n = payload.numel()
                if track is not None and n >= tcp.ZERO_COPY_MIN:
                    tracker = self._router.send(payload.numpy(), copy=False, track=True)
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
            tok = self._cfg.auth_token
            if tok is not None and not (isinstance(msg.get("tok"), str)
                                        and hmac.compare_digest(msg["tok"].encode(), tok.encode())):
                self._stats.add("auth_failures")
                self._reply(ident, "err", code="auth", msg="authentication failed: wrong or missing auth_token")
                return
            if sess is not None:
                self._lose_session(sess, "peer said hello again")
            self._sessions[ident] = _Session(ident, msg["eid"], msg["caps"])
            self._reply(ident, "hok", eid=self.eid, align=ALIGN, window=self._cfg.effective_credit_bytes,
                        maxmsg=self._cfg.max_message_bytes, pool=self._pool.capacity, caps=self._caps())
            return
        if sess is None:
            if t not in ("bye", "pong"):
                self._reply(ident, "err", code="no_session", msg="no session: send hello first",
                            seq=_valid_seq(msg.get("seq")))
            return
        sess.last_rx = time.monotonic()
        if t == "ping":
            self._reply(ident, "pong")
        elif t == "data":
            self._on_data(sess, msg)
        elif t == "creq":
            sess.creq = (msg["need"], msg["want"])
            sess.creq_t = time.monotonic()
            self._grant_credit()
        elif t == "cret":
            sess.outstanding -= min(msg["n"], sess.outstanding)
            self._grant_credit()
        elif t == "pull":
            self._on_pull(sess, msg)
        elif t == "abort":
            tid = validate_transfer_id(msg["tid"])
            self._do_abort(tid, broadcast=False, reason=f"transfer aborted by peer {sess}", skip=ident)
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
        from .transport.nccl import Comm

        try:
            sess.nccl[direction] = Comm(2, 1, msg["uid"], self._device, **self._nccl_kwargs())
        except TransportError as exc:
            self._reply(sess.ident, "err", code="transport", msg=str(exc)[:500])
            return
        self._stats.add("nccl_comms")
        self._reply(sess.ident, "nok", dir=direction)

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
        if fp > sess.outstanding:
            self._stats.add("credit_violations")
        sess.outstanding -= min(fp, sess.outstanding)
        try:
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

    def _drain_nccl(self, sess: _Session, n: Any) -> None:
        """Receive and discard ``n`` bytes the sender already posted on the session's push communicator."""
        comm = sess.nccl.get("push")
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
        self._end_session_comm(sess, "push", TransportError("refused an NCCL tensor that could not be drained"))

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

    def _store(self, sess: _Session, key: TransferKey, buf: Buffer, dtype: torch.dtype, shape: tuple[int, ...],
               seq: int, nack, x: str) -> None:
        """Put a fully received tensor in the inbox and ack it, or release it and nack why not."""
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
                  shape: tuple[int, ...], buf: Buffer, nack) -> None:
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

        done.tkey = key  # type: ignore[attr-defined]
        self._completer.add(ev, done, time.monotonic() + self._cfg.timeout_s, blocking=comm is None)

    def _grant_credit(self) -> None:
        waiting = sorted((s for s in self._sessions.values() if s.creq is not None), key=lambda s: s.creq_t)
        if not waiting:
            return
        available = self._pool.free_bytes - sum(s.outstanding for s in self._sessions.values())
        window = self._cfg.effective_credit_bytes
        for sess in waiting:
            need, want = sess.creq  # type: ignore[misc]
            g = min(available, window - sess.outstanding, max(want, need, window // 4))
            if g < need:
                break  # FIFO: later requesters wait behind this one
            sess.outstanding += g
            available -= g
            sess.creq = None
            self._reply(sess.ident, "grant", n=g)

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
        x = msg["x"]
        if x not in ("tcp", "ipc", "nccl") or (x == "ipc" and self._ipc_handle is None) \
                or (x == "nccl" and not self._nccl_ok):
            self._reply(sess.ident, "perr", seq=seq, code="transport",
                        msg=f"transport {x!r:.20} is not available on this engine")
            return
        pp = _ParkedPull(sess, seq, key, time.monotonic() + min(float(msg["to"]), self._cfg.timeout_s * 4), dt, sh,
                         x)
        if not self._try_serve(pp):
            self._parked.append(pp)

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
        meta = dict(seq=pp.seq, key=pp.key.to_wire(), dt=T.dtype_name(slot.dtype), sh=list(slot.shape), n=n)
        if pp.x == "ipc":
            if self._reply(pp.sess.ident, "pdata", x="ipc", ipc={"off": slot.buf.offset}, **meta):
                self._lent[(pp.sess.ident, pp.seq)] = (slot.buf, time.monotonic() + 2 * self._cfg.timeout_s)
                self._stats.add("pulls_served")
                self._stats.add("bytes_served", n)
            else:
                slot.buf.release()
            return True
        if pp.x == "nccl":
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
        keep = []
        for pp in self._parked:
            if pp.key == key and self._try_serve(pp):
                continue
            keep.append(pp)
        self._parked = keep

    def _lose_session(self, sess: _Session, reason: str) -> None:
        if self._sessions.get(sess.ident) is not sess:
            return
        del self._sessions[sess.ident]
        self._parked = [pp for pp in self._parked if pp.sess is not sess]
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
        tids = self._inbox.source_lost(sess.ident, lambda: PeerLost(f"sending peer {eid} lost: {reason}"))
        if reason != "peer said hello again":
            self._stats.add("sessions_lost")
        log.info("session %s ended (%s); %d transfer(s) affected", sess, reason, len(tids))
        self._grant_credit()

    # ================================================================== whole requests: producer side
    def _cmd_offer(self, addr: str, req: RequestHandle) -> None:
        if isinstance(self._inbox.error_for(req.key(0)), TransferAborted):
            req._set(RequestState.ABORTED, TransferAborted("transfer aborted", key=req.transfer_id))
            return
        peer = self._get_peer(addr)
        req._p = peer
        peer.req_waiting.append(req)
        self._pump_offers(peer)

    def _request_transport(self, peer: _Peer) -> str:
        if not self._cuda or peer.xport not in ("ipc", "nccl"):
            return "tcp"
        if peer.xport == "nccl" and peer.eid == self.eid:
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
            with peer.post_lock:
                peer.req_order.append(req)
            peer.sock.send(encode("offer", seq=req.seq, tid=req.transfer_id, items=[s.to_wire() for s in req.specs],
                                  x=x, to=max(0.0, req.deadline - time.monotonic()), **extra))
            peer.last_tx = time.monotonic()
            _trace.mark("req.offer", req.transfer_id)

    def _peer_out_arena(self, peer: _Peer) -> Any:
        """The receiver's arena, mapped here for writing (CUDA IPC requests)."""
        if peer.ipc_out is None:
            local = _LOCAL_ARENAS.get(peer.eid)
            if local is not None:
                peer.ipc_out = _LocalArena(local)
            else:
                info = peer.caps.get("ipc")
                if not isinstance(info, dict) or not isinstance(info.get("handle"), bytes) \
                        or not isinstance(info.get("size"), int):
                    raise TransportError("the peer offered no CUDA IPC handle", peer=peer.addr)
                from .transport.cuda import IpcMapping

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
                peer.ipc_handles.append(bytes(ev.ipc_handle()))
        return peer.ipc_handles

    def _flush_requests(self, peer: _Peer) -> None:
        """Move every tensor that may move now, in the global posting order (any thread)."""
        io = threading.current_thread() is self._thread
        with peer.post_lock:
            while peer.req_order:
                req = peer.req_order[0]
                if req.done():
                    if req.x == "nccl" and not req.acked and req.seq >= 0:
                        return  # the receiver has not confirmed it will discard yet (a grant may be on its way)
                    if req.x == "nccl" and req.granted and req.next_post < len(req.specs):
                        try:
                            while req.next_post < len(req.specs):  # keep the communicator in step
                                self._drain_item(req, req.next_post)
                                req.next_post += 1
                        except P2pkvError as exc:
                            log.warning("draining request %s failed: %s", req.transfer_id, exc)
                    peer.req_order.popleft()
                    continue
                if not req.granted:
                    return
                while req.next_post < len(req.specs):
                    i = req.next_post
                    with req.lock:
                        ent = req.pending.pop(i, None)
                    if ent is None:
                        return  # the caller has not handed this tensor over yet
                    if req.x == "tcp" and not io:
                        with req.lock:
                            req.pending[i] = ent
                        self._submit(("oflush", req.peer))
                        return
                    try:
                        self._post_item(peer, req, i, ent[0], ent[1], io)
                    except P2pkvError as exc:
                        req.next_post = len(req.specs)
                        if io:
                            self._fail_request(req, RequestState.FAILED, exc)
                        else:
                            self._submit(("ofail", req, exc))
                        return
                    req.next_post += 1
                peer.req_order.popleft()

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
                      from_peer: bool = False) -> None:
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
        peer = req._p
        if peer is None or req.seq < 0 or self._peers.get(peer.addr) is not peer:
            return
        if from_peer:
            req.acked = True
            peer.reqs.pop(req.seq, None)
            if req.x == "nccl" and was_granted and not isinstance(err, TransferAborted):
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
                self._fail_request(req, state, err, from_peer=True)

    def _tick_requests(self, peer: _Peer, now: float) -> None:
        for req in [r for r in peer.req_waiting if r.deadline < now]:
            peer.req_waiting.remove(req)
            why = "no NCCL communicator" if peer.ready else "peer unreachable"
            req._set(RequestState.FAILED, TransferTimeout(f"request not offered within its deadline: {why}",
                                                          key=req.transfer_id, peer=peer.addr))
        for req in [r for r in peer.reqs.values() if r.deadline < now and not r.done()]:
            what = "no room at the receiver" if not req.granted else \
                "not every tensor was handed over" if req.next_post < len(req.specs) else "no completion"
            err = TransferTimeout(f"request did not complete within its deadline ({what})", key=req.transfer_id,
                                  peer=peer.addr)
            if req.x == "nccl" and req.granted and req.next_post >= len(req.specs):
                # posted sends may still read the caller's tensors: end them before reporting
                self._send_oabort(peer, req, err, end=True)
                self._end_req_comm(peer, err)
            else:
                self._fail_request(req, RequestState.FAILED, err)

    # ================================================================== whole requests: consumer side
    def _on_offer(self, sess: _Session, msg: dict[str, Any]) -> None:
        seq = msg["seq"]

        def refuse(exc: P2pkvError) -> None:
            self._stats.add("offers_refused")
            self._reply(sess.ident, "oerr", seq=seq, code=exc.code, msg=exc.message[:500])

        try:
            tid = validate_transfer_id(msg["tid"])
            specs = wire_items(msg["items"], self._cfg.max_message_bytes)
        except P2pkvError as exc:
            refuse(exc)
            return
        x = msg["x"]
        evs = msg.get("evs")
        if x not in ("tcp", "ipc", "nccl") or (x != "tcp" and not self._cuda) or \
                (x == "nccl" and (not self._nccl_ok or sess.nccl.get("req") is None)) or \
                (x == "ipc" and (not isinstance(evs, list) or not evs or len(evs) > 1024 or
                                 not all(isinstance(e, bytes) and len(e) == 64 for e in evs))):
            refuse(ProtocolError(f"transport {x!r:.20} is not available for requests on this engine"))
            return
        if (sess.ident, seq) in self._incoming:
            refuse(ProtocolError(f"offer seq {seq} is already in use"))
            return
        keys = [TransferKey(tid, s.name) for s in specs]
        err = self._inbox.error_for(keys[0])
        if isinstance(err, TransferAborted):
            refuse(err)
            return
        for k in keys:
            if k in self._incoming_keys or self._inbox.has(k):
                refuse(DuplicateKey("data for this key is already waiting or on its way", key=k))
                return
        need = sum(BufferPool.footprint(s.nbytes) for s in specs)
        limit = min(self._cfg.effective_credit_bytes, self._pool.capacity)
        if need > limit:
            refuse(PoolExhausted(f"request of {need} bytes can never fit the receiver (credit window "
                                 f"{self._cfg.effective_credit_bytes}, pool {self._pool.capacity} bytes)"))
            return
        to = msg["to"]
        to = min(float(to), self._cfg.timeout_s * 4) if to == to and to >= 0 else 0.0
        # a little after the producer's own deadline, so its error (which knows why) wins
        inc = Incoming(sess, seq, tid, specs, x, time.monotonic() + to + 0.25, evs)
        sess.offers.append(inc)
        self._incoming[(sess.ident, seq)] = inc
        self._incoming_keys.update(keys)
        self._inbox.expect(tid, sess.ident)
        _trace.mark("rx.offer", tid)
        self._admit()

    def _admit(self) -> None:
        """Grant waiting offers that fit, oldest first within a session; one session cannot block another."""
        for sess in list(self._sessions.values()):
            while sess.offers:
                inc = sess.offers[0]
                if inc.failed:
                    sess.offers.popleft()
                    continue
                if not self._admit_one(sess, inc):
                    break
                sess.offers.popleft()

    def _admit_one(self, sess: _Session, inc: Incoming) -> bool:
        comm = None
        if inc.x == "nccl":
            comm = sess.nccl.get("req")
            state = comm.poll() if comm is not None else "failed"
            if state == "init":
                return False
            if state != "ready":
                self._fail_incoming(inc, TransportError("no NCCL communicator for requests"))
                return True
        need = sum(BufferPool.footprint(s.nbytes) for s in inc.specs)
        if sess.reserved + sess.outstanding + need > self._cfg.effective_credit_bytes:
            return False
        bufs = []
        for s in inc.specs:
            b = self._pool.try_alloc(s.nbytes)
            if b is None:
                for b2 in bufs:
                    b2.release()
                return False
            bufs.append(b)
        inc.bufs = bufs
        inc.comm = comm
        sess.reserved += need
        sess.admitted[inc.seq] = inc
        offs = {"offs": [b.offset for b in bufs]} if inc.x == "ipc" else {}
        self._reply(sess.ident, "ogrant", seq=inc.seq, **offs)
        _trace.mark("rx.granted", inc.transfer_id)
        if inc.x == "nccl":
            watcher = self._session_watcher(sess)
            try:
                for i, b in enumerate(bufs):
                    comm.recv(b.data, comm.stream)
                    ev = torch.cuda.Event()
                    ev.record(comm.stream)
                    inc.posted[i] = True
                    watcher.add(ev, lambda i=i: self._landed(inc, i))
            except P2pkvError as exc:
                self._end_session_comm(sess, "req", exc)
        return True

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
        if complete:
            if threading.current_thread() is self._thread:
                self._request_done(inc)
            else:
                self._submit(("odone", inc), force=True)

    def _request_done(self, inc: Incoming) -> None:
        sess = inc.sess
        if sess.admitted.pop(inc.seq, None) is not None:
            sess.reserved -= sum(BufferPool.footprint(s.nbytes) for s in inc.specs)
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
        for _, b in free:
            b.release()
        sess = inc.sess
        if sess.admitted.pop(inc.seq, None) is not None:
            sess.reserved -= sum(BufferPool.footprint(s.nbytes) for s in inc.specs)
        if not inc.quarantine:
            self._forget_incoming(inc)
        else:
            self._incoming_keys.difference_update(inc.keys)
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
            ev = sess.ipc_events.get(inc.evs[evi])
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
        elif t == "ofin":
            if inc is not None and inc.quarantine:
                self._release_quarantine(inc)

    def _tick_incoming(self, now: float) -> None:
        for inc in [i for i in self._incoming.values() if i.deadline < now]:
            if inc.quarantine:
                if inc.deadline + 2 * self._cfg.timeout_s < now:
                    self._release_quarantine(inc)  # the producer never said it stopped writing
                continue
            if inc.failed:
                continue
            sess = inc.sess
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

    # ------------------------------------------------------------------ abort
    def _do_abort(self, tid: str, *, broadcast: bool, reason: str, skip: bytes | None = None) -> None:
        for buf in self._inbox.abort(tid, reason) + self._outbox.abort(tid, reason):
            buf.release()
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
        keep = []
        for pp in self._parked:
            if pp.key.transfer_id == tid:
                self._reply(pp.sess.ident, "perr", seq=pp.seq, code="aborted", msg=reason)
            else:
                keep.append(pp)
        self._parked = keep
        if broadcast:
            for peer in self._peers.values():
                if peer.ready:
                    peer.sock.send(encode("abort", tid=tid))
            for sess in self._sessions.values():
                if sess.ident != skip:
                    self._reply(sess.ident, "abort", tid=tid)

    # ------------------------------------------------------------------ timers
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
            for pull in [p for p in peer.pull_waiting if p.deadline < now]:
                peer.pull_waiting.remove(pull)
                pull.finish(error=TransferTimeout("pull could not start before its deadline (no connection or "
                                                  "NCCL communicator)", key=pull.key, peer=peer.addr))
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
            keep = []
            for pp in self._parked:
                if not self._try_serve(pp):
                    keep.append(pp)
            self._parked = keep
        if self._lent:
            for k in [k for k, (_, dl) in self._lent.items() if dl < now]:
                self._lent.pop(k)[0].release()

    def _tick(self) -> None:
        now = time.monotonic()
        cfg = self._cfg
        if self._cuda:
            self._tick_gpu(now)
        for peer in list(self._peers.values()):
            if peer.ready:
                if now - peer.last_rx > cfg.effective_peer_timeout_s:
                    silent = now - peer.last_rx
                    self._lose_peer(peer, lambda s=silent: PeerLost(f"peer silent for {s:.2f}s", peer=peer.addr))
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
                why = "no credit from the receiver (it is full)" if peer.ready else "peer unreachable"
                self._finish_send(item, TransferState.FAILED, TransferTimeout(
                    f"send not started within its deadline: {why}", key=item.key, peer=peer.addr))
            for seq, item in [(s, i) for s, i in peer.inflight.items() if i.deadline < now]:
                del peer.inflight[seq]
                self._finish_send(item, TransferState.FAILED, TransferTimeout(
                    "no acknowledgement from the receiver within the deadline", key=item.key, peer=peer.addr))
            if peer.req_waiting or peer.reqs:
                self._tick_requests(peer, now)
            for seq, pull in [(s, p) for s, p in peer.pulls.items() if p.deadline + 0.25 < now]:
                del peer.pulls[seq]
                pull.finish(error=TransferTimeout(f"pull got no data within {pull.timeout:.3g}s", key=pull.key,
                                                  peer=peer.addr))
        if self._incoming:
            self._tick_incoming(now)
        for sess in [s for s in self._sessions.values() if now - s.last_rx > cfg.effective_peer_timeout_s]:
            self._lose_session(sess, f"silent for {now - sess.last_rx:.2f}s")
        if self._parked:
            keep = []
            for pp in self._parked:
                if pp.deadline < now:
                    self._reply(pp.sess.ident, "perr", seq=pp.seq, code="timeout",
                                msg="the key was not published before the pull's deadline")
                else:
                    keep.append(pp)
            self._parked = keep
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

    # ------------------------------------------------------------------ shutdown
    def _say_goodbye(self) -> None:
        for peer in self._peers.values():
            if peer.ready:
                try:
                    peer.sock.send(encode("bye"), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass

    def _fail_peer_work(self, peer: _Peer, make_error) -> int:
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

    def _fail_everything(self, make_error) -> None:
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
        for peer in list(self._peers.values()):
            self._close_peer(peer)
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
        _LOCAL_ARENAS.pop(self.eid, None)
        if self._pinned is not None:
            self._pinned.close()
        try:
            self._router.close(0)
            self._ctx.destroy(linger=0)
        finally:
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._pool.close()


def _valid_seq(seq: Any) -> int | None:
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**63 else None


def _seq_of(hdr: bytes) -> int | None:
    """Best-effort ``seq`` of a header that failed validation, so the sender's item fails fast."""
    try:
        import msgpack

        m = msgpack.unpackb(hdr, raw=False, max_str_len=8192, max_bin_len=8192, max_array_len=4096,
                            max_map_len=64)
        return _valid_seq(m.get("seq")) if isinstance(m, dict) else None
    except Exception:
        return None


def _drain(sock: zmq.Socket) -> None:
    """Discard the rest of a multipart message (keeps framing safe after an error)."""
    while sock.getsockopt(zmq.RCVMORE):
        sock.recv(copy=False)
