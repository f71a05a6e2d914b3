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

import contextlib
import os
import threading
import time
import uuid
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import zmq

from . import _tensors as T
from . import _trace
from ._engine.base import _EngineBase
from ._engine.channel import _Channel
from ._engine.comms import _CommManager
from ._engine.fastplane import FastPlane
from ._engine.regions import ExposeHandle, Regions
from ._engine.loop import _ProgressLoop, io_main
from ._engine.pull import _PullPath
from ._engine.push import _PushPath
from ._engine.requests import _RequestPath
from ._engine.state import (_LOCAL_ARENAS, _LOCAL_ENGINES, _ROUTER_RCVHWM, _ROUTER_SNDHWM, _ConnectWaiter,
                            _forget_local_arenas, _host_id, _PullItem, _SendItem, _zmq_endpoint, log, parse_address)
from .config import EngineConfig, pool_memory_error
from .errors import (ConfigError, EngineClosed, InvalidKey, InvalidTensor, P2pkvError, PeerLost, TransferTimeout)
from .handles import SendHandle
from .keys import TransferKey, validate_transfer_id
from .mailbox import DirectBuffer, Mailbox, Slot
from .pool import Buffer, BufferPool
from .recv_request import RecvRequest, validate_names
from .request import RequestHandle, RequestLayout, Watcher, parse_layout
from .stats import Stats

__all__ = ["Engine", "parse_address"]

_LIVE: weakref.WeakSet[Engine] = weakref.WeakSet()  # open engines of this process


def _after_fork_in_child() -> None:
    """A forked child inherits engines whose I/O thread and sockets it does not have: close them
    (without touching the parent's sockets) so that every call raises EngineClosed at once."""
    for eng in list(_LIVE):
        eng._closed = True
        eng._forked = True
    _forget_local_arenas()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_OFFER_WAIT_S = 0.002  # how long send_request lets the I/O thread send the offer
_MAX_TIMEOUT_S = 1e6  # about 11.6 days: longer waits are a bug (and overflow the OS's timers)

class Engine(_RequestPath, _PushPath, _PullPath, _CommManager, _Channel, _ProgressLoop, _EngineBase):
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
        self._thread = None
        self._device = self._resolve_device(config.device)
        self.eid = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._stats = Stats()
        self._cuda = self._device.type == "cuda"
        self._arena_owner = None
        arena = None
        self._shm_loc: dict[str, Any] | None = None
        self._shm_fd = -1
        try:
            if self._cuda:
                from .transport.cuda import alloc_arena

                arena, self._arena_owner = alloc_arena(BufferPool.footprint(config.pool_bytes), self._device)
            elif config.transport == "shm":
                arena = self._shared_arena(BufferPool.footprint(config.pool_bytes))
            self._pool = BufferPool(config.pool_bytes, self._device, on_free=self._on_pool_free, arena=arena)
        except (RuntimeError, MemoryError) as exc:  # the allocator's own error: say what failed and what is free
            err = pool_memory_error(config.pool_bytes, self._device, exc)
            if err is None:
                raise
            raise err from None
        self._shm_arena = arena if self._shm_loc is not None else None
        self._pinned = (BufferPool(config.pinned_bytes, "cpu", pin_memory=True, prefault=False)
                        if self._cuda and config.pinned_bytes else None)
        self._inbox = Mailbox(config.ttl_s, name="inbox")
        self._outbox = Mailbox(config.ttl_s, name="outbox")
        self._cmds = deque()
        self._mem_dirty = False
        self._want_mem = False  # credit, an offer or a staged send waits for pool memory
        self._starved_t = 0.0   # when credit or an offer last waited for room (see _revoke_idle_credit)
        self._io_admit_s = 0.0  # I/O-thread time charged by _admit (not charged again to the request it ran in)
        self._io_recent = []  # the two sessions that last sent work (not heartbeats), newest first
        self._host = _host_id()
        self._init_gpu_plane()

        self._ctx = zmq.Context(io_threads=1)
        try:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._zap = None
            self._setup_router_security()
            # Finite queues per connection: a peer that floods requests is pushed back by TCP
            # (RCVHWM) and one that never reads its replies loses them (SNDHWM; SNDTIMEO=0 so
            # the I/O thread never blocks on a full queue). TCP keepalive notices a dead
            # connection even when we never dialed that peer ourselves (see _set_keepalive).
            self._router.setsockopt(zmq.SNDHWM, _ROUTER_SNDHWM)
            self._router.setsockopt(zmq.RCVHWM, _ROUTER_RCVHWM)
            self._router.setsockopt(zmq.SNDTIMEO, 0)
            self._router.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes + 65536)
            self._router.setsockopt(zmq.HANDSHAKE_IVL, int(1000 * min(config.effective_peer_timeout_s, 5.0)))
            self._set_keepalive(self._router)
            if ":" in config.host:
                self._router.setsockopt(zmq.IPV6, 1)
            try:
                self._router.bind(_zmq_endpoint(config.host, config.port or "*"))
            except zmq.ZMQError as exc:
                raise P2pkvError(f"cannot listen on {config.host}:{config.port}: {exc}") from None
            self._rmon = self._router.get_monitor_socket(
                zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
            endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
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

        self._peers = {}
        self._peer_by_sock = {}
        self._peer_by_mon = {}
        self._sessions = {}
        self._budgets = {}
        self._rx_first = None
        self._parked = []
        self._pending_acks = {}
        self._incoming = {}   # whole requests coming in, by (session, seq)
        self._incoming_keys = set()
        self._scratch = None
        self._release_watcher = None
        self._tracked = []
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        if self._zap is not None:
            self._poller.register(self._zap, zmq.POLLIN)
        self._poller.register(self._rmon, zmq.POLLIN)
        self._fast = FastPlane(self)
        self._regions = Regions(self)
        self._probe_due: list[float] = []  # when to probe sessions for closed connections
        self._conn_fds: dict[int, float] = {}  # recently accepted connections: fd -> when
        self._conns = 0          # TCP connections into our ROUTER (accepted, not yet closed)
        self._conns_pending = 0  # of which the ZMTP handshake is not finished
        self._next_expire = 0.0
        self._next_tick = 0.0
        self._wake_sent = False
        if self._cuda:
            from .transport.cuda import Completer

            _LOCAL_ARENAS[self.eid] = self._pool.arena
            post = weakref.WeakMethod(self._post_gpu)
            self._completer = Completer(lambda cb, ok: (lambda m: m and m(cb, ok))(post()),
                                        name=f"p2pkv-cuda-{self.port}")
        self._closed = False
        self._forked = False
        _LIVE.add(self)
        _LOCAL_ENGINES[self.eid] = self
        self._thread = threading.Thread(target=io_main, args=(weakref.ref(self),), name=f"p2pkv-io-{self.port}",
                                        daemon=True)
        self._thread.start()

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
            Bad arguments are refused before anything is queued; so is a tensor over the receiver's
            ``max_message_bytes`` when this engine knows the receiver already (else the handle
            fails with ``InvalidTensor`` once the receiver's limit is known, before anything moves).
        """
        self._check_open()
        known = self._peers.get(peer)  # a peer we talked to: its address was checked, its limit is known
        if known is None:
            parse_address(peer)
        prepared = layout if isinstance(layout, RequestLayout) else None
        specs = parse_layout(transfer_id, layout, self._cfg.max_message_bytes)
        req = RequestHandle(self, peer, transfer_id, specs, self._timeout(timeout), prepared)
        if known is not None and known.ready and (prepared is None or prepared.max_nbytes > known.maxmsg):
            too_big = self._request_over_peer(known, req)  # refused here at once
            if too_big is not None:
                raise too_big
        if prepared is not None:
            if prepared._fast is None:
                from ._engine.fastpath import FastLayout

                prepared._fast = FastLayout(specs)
            req.layout = prepared._fast
        self._stats.add("requests")
        if self._fast.start(peer, req):  # same host: announced in shared memory, GRANTED already
            self._stats.add("requests_fast")
            return req
        self._submit(("offer", peer, req))
        # Give the I/O thread the GIL until the offer is out (at most 2 ms): a caller that goes on
        # running Python would otherwise hold it off for up to a switch interval (5 ms), and an eager
        # request is GRANTED when this returns, so every send() posts on this thread at once.
        req.offered.wait(_OFFER_WAIT_S)
        return req

    def recv_request(self, transfer_id: str, *, names: list[str] | None = None,
                     outs: Any = None, timeout: float | None = None) -> RecvRequest:
        """Take a whole request: one call, whatever its number of tensors; returns at once.

        The handle's :meth:`~RecvRequest.wait` blocks until every tensor landed;
        :meth:`~RecvRequest.wait_layer` makes a CUDA stream wait for one tensor (for a
        same-host producer with no host wake-up at all); :meth:`~RecvRequest.tensor` gives
        a tensor (a zero-copy view of the pool until :meth:`~RecvRequest.release`). It may be
        called before or after the data arrives. The request's layout comes from the
        producer's :meth:`send_request`; ``names`` picks some of its tensors, or names the
        keys of plain :meth:`send` calls. ``outs`` (``{name: tensor}``, or a list in the order
        of ``names``: a list needs ``names``) receives copies instead (one batched launch on CUDA), checked against
        the layout when it is known. ``timeout`` (default ``timeout_s``) bounds the whole wait.

        Raises
        ------
        InvalidKey
            A bad transfer id or names.
        InvalidTensor, EngineClosed
            A bad ``outs`` tensor, or a closed engine.
        """
        self._check_open()
        nm = validate_names(transfer_id, names)
        to = self._timeout(timeout)
        out_map: dict[str, torch.Tensor] | None = None
        if outs is not None:
            if isinstance(outs, dict):
                out_map = dict(outs)
            elif isinstance(outs, (list, tuple)) and nm is not None and len(outs) == len(nm):
                out_map = dict(zip(nm, outs, strict=True))
            else:
                raise InvalidTensor("outs must be a {name: tensor} dict (or a list as long as names)",
                                    key=transfer_id)
            for name, t in out_map.items():
                if not isinstance(name, str):
                    raise InvalidKey(f"outs keys must be tensor names, got {name!r:.40}", key=transfer_id)
                T.check_out(t, self._device)
        self._stats.add("recv_requests")
        return RecvRequest(self, transfer_id, nm, out_map, to)

    # ------------------------------------------------------------------ one-sided reads (same host, CUDA)
    def register_memory(self, name: str, tensor: torch.Tensor) -> None:
        """Let same-host peers read ``tensor`` (e.g. a KV cache) straight out of this process's memory.

        Registered once; a peer maps it once (:meth:`remote_memory`) and copies what it needs with
        its own kernels, then says so (:meth:`read_done`). CUDA IPC shares whole allocations:
        register only memory a same-host peer may see. Re-registering a name replaces it.

        Raises
        ------
        InvalidKey, InvalidTensor, TransportError
            A bad name, a tensor not on this engine's CUDA device, or one whose allocation
            cannot be shared (torch's expandable segments).
        """
        self._check_open()
        self._regions.register(name, tensor)

    def unregister_memory(self, name: str) -> None:
        """Stop serving ``name`` to peers that ask from now on (those that mapped it keep their view)."""
        self._regions.unregister(name)

    def expose(self, transfer_id: str, *, timeout: float | None = None) -> ExposeHandle:
        """Mark ``transfer_id`` as readable from this engine's registered memory; the handle completes
        when a peer reports it read it (:meth:`read_done`), fails on :meth:`abort` or at ``timeout``.

        Raises
        ------
        InvalidKey, DuplicateKey
        """
        self._check_open()
        validate_transfer_id(transfer_id)
        return self._regions.expose(transfer_id, self._timeout(timeout))

    def remote_memory(self, peer: str, *, timeout: float | None = None) -> dict[str, torch.Tensor]:
        """The memory ``peer`` registered, mapped into this process: ``{name: tensor}`` views of the peer's
        tensors (same dtype, shape and strides), to read with any kernel. Mapped once per peer.

        Raises
        ------
        TransportError
            The peer is not a CUDA engine of this host, or its memory cannot be mapped.
        TransferTimeout, PeerLost, InvalidAddress
        """
        self._check_open()
        parse_address(peer)
        views = self._regions.views(peer)
        if views is not None:
            return views
        to = self._timeout(timeout)
        w = _ConnectWaiter(to)
        if self._regions.add_waiter(peer, w):
            self._submit(("mq", peer))
        if not w.event.wait(to + 0.5):
            raise TransferTimeout(f"{peer} did not describe its memory within {to:.3g}s", peer=peer)
        if w.error is not None:
            raise w.error
        views = self._regions.views(peer)
        if views is None:  # pragma: no cover - answered without error but lost meanwhile
            raise PeerLost("the peer went away while its memory was mapped", peer=peer)
        return views

    def mapped_memory(self, peer: str) -> dict[str, torch.Tensor] | None:
        """What :meth:`remote_memory` returns if ``peer``'s memory is mapped here already, else None (never
        waits, never asks the peer). The views are unmapped once the peer is lost (after the copies queued
        by then are done): queue copies from them inside :meth:`reading_memory`."""
        return self._regions.views(peer)

    def reading_memory(self, peer: str) -> contextlib.AbstractContextManager[dict[str, torch.Tensor] | None]:
        """``with engine.reading_memory(peer) as views:`` :meth:`mapped_memory`'s views (or None), kept
        mapped while the block runs: copies queued from them inside it run before the peer's memory is
        unmapped (the engine unmaps a lost peer's memory after a device synchronize; a copy queued after
        that would fault). Keep the block to queuing copies: it holds off that unmapping."""
        return self._regions.reading(peer)

    def read_done(self, peer: str, transfer_id: str) -> None:
        """Tell ``peer`` that this engine has read ``transfer_id`` from its memory (completes its
        :meth:`expose` handle). Returns at once."""
        self._check_open()
        parse_address(peer)
        validate_transfer_id(transfer_id)
        self._submit(("rdone", peer, transfer_id))

    def _is_local_peer(self, peer: Any) -> bool:
        """``peer`` is an engine of this very process (proved, not claimed)."""
        from ._engine.state import _local_arena

        return _local_arena(peer.eid, peer.caps) is not None

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
        to = self._timeout(timeout)
        # a CPU engine lets TCP data land straight in the caller's tensor when it is posted in time
        posted = not self._cuda
        if posted:
            self._inbox.post(key, out)
        try:
            slot = self._claim_landed(key, to, self._out_check(out))
        except TransferTimeout:
            if not posted or self._inbox.unpost(key):
                raise
            slot = self._inbox.claim(key, 30.0, None, self._closed_error)  # being written now: it comes
        else:
            if posted:
                self._inbox.unpost(key)
        _trace.mark("recv.woke", key)
        if isinstance(slot.buf, DirectBuffer):
            result = slot.buf.tensor  # ``out`` itself, or a new tensor: nothing to copy, nothing to free
        else:
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
        slot = self._claim_landed(key, self._timeout(timeout), None)
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
        w = _ConnectWaiter(to)
        self._submit(("connect", peer, w))
        if not w.event.wait(to + 0.5):
            self._submit(("cancel_connect", peer, w))
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
        self._fast.forget(transfer_id)  # same-host requests announced for it: gone at once too
        self._submit(("abort", transfer_id, True))

    def stats(self) -> dict[str, Any]:
        """Counters, bytes, pool use, mailbox state and latency percentiles."""
        s = self._stats.snapshot()
        s["pool"] = self._pool.stats()
        s["inbox"] = self._inbox.stats()
        s["fast"] = self._fast.stats()
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
        _LIVE.discard(self)
        th = self._thread
        if th is threading.current_thread():  # collected on the I/O thread (an engine never closed)
            self._say_goodbye()
            self._fail_everything(lambda: EngineClosed(f"engine {self.address} closed"))
        elif th is not None and th.is_alive():
            self._submit(("stop",), force=True)
            th.join(timeout=10.0)
        self._teardown()

    def __enter__(self) -> Engine:
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

    def _claim_landed(self, key: TransferKey, timeout: float, check: Any) -> Any:
        """Take ``key``'s data once it has landed: from the inbox, or from a same-host request's record
        (a same-host producer announces a tensor before its bytes arrive)."""
        fast = self._fast
        if not fast.rx:
            return self._inbox.claim(key, timeout, check, self._closed_error)
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while True:
            fast.poll()
            slot = fast.claim_key(key)
            if slot is None:
                slot = self._inbox.take_nowait(key, check)
            elif check is not None:
                try:
                    check(slot)
                except BaseException:
                    slot.buf.release()  # the tensor goes back (its record stays whole for others only in part)
                    raise
            if slot is not None:
                break
            err = self._inbox.error_for(key) or self._closed_error()
            if err is not None:
                raise err
            now = time.monotonic()
            if now > deadline:
                raise TransferTimeout(f"no data arrived within {timeout:.3g}s", key=key)
            if now - last > self._cfg.spin_s:
                time.sleep(5e-5)
        if slot.ready is None:
            return slot
        try:
            while not slot.ready():
                now = time.monotonic()
                if now > deadline:
                    raise TransferTimeout(f"the data did not land within {timeout:.3g}s", key=key)
                if self._closed:
                    raise EngineClosed(f"engine {self.address} closed while waiting", key=key)
                if now - last > self._cfg.spin_s:
                    time.sleep(5e-5)
        except BaseException:
            slot.buf.release()
            raise
        return slot

    def _fast_ready(self, peer: str) -> Any:
        """The fast path to ``peer`` once the handshake set it up (None otherwise)."""
        p = self._peers.get(peer)
        tx = p.fast if p is not None and p.ready else None
        return tx if tx is not None and not tx.closed else None

    def _rx_take_record(self, tid: str, names: list[str] | None) -> Any:
        return self._fast.take_record(tid, names)

    def _fast_poll(self) -> None:
        self._fast.poll()

    def _shared_arena(self, nbytes: int) -> torch.Tensor:
        """A CPU pool arena in a memory file that same-host peers can map (``transport="shm"``)."""
        import mmap

        from .transport.shm import create_memfd

        try:
            fd, tok = create_memfd("p2pkv-arena", nbytes)
            mm = mmap.mmap(fd, nbytes)
        except OSError as exc:
            raise ConfigError(f"transport='shm': cannot make a shared-memory pool of {nbytes} bytes: {exc}") from None
        self._shm_fd = fd
        self._shm_loc = {"pid": os.getpid(), "fd": fd, "tok": tok, "size": nbytes}
        arena = torch.frombuffer(mm, dtype=torch.uint8)
        arena.zero_()  # touch every page now, as the private pool does
        return arena

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
        self._ipc_handle = None
        self._nccl_ok = False
        self._completer = None
        self._copy_stream = None
        self._loop_comm = None
        self._lent = {}
        self._retry_parked = False
        if self._cuda and cfg.transport == "shm":
            raise ConfigError("transport='shm' is for CPU engines; CUDA engines on one host use 'ipc' (or 'auto')")
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
                raise ConfigError("transport='ipc' but the pool cannot be exported through CUDA IPC "
                                  "(is CuPy installed?)")
        if cfg.transport in ("auto", "nccl"):
            from .transport.nccl import nccl_available

            self._nccl_ok = nccl_available()
            if cfg.transport == "nccl" and not self._nccl_ok:
                raise ConfigError("transport='nccl' but nccl4py is not installed (pip install 'p2pkv[cu13]')")
        self._copy_stream = torch.cuda.Stream(self._device)

    def _check_open(self) -> None:
        if self._closed:
            if getattr(self, "_forked", False):
                raise EngineClosed(f"engine {self.address} belongs to the parent process (this one was forked): "
                                   "create a new Engine in the child")
            raise EngineClosed(f"engine {self.address} is closed")

    @staticmethod
    def _check_key(key: Any) -> None:
        if not isinstance(key, TransferKey):
            raise InvalidKey(f"key must be a p2pkv.TransferKey, got {type(key).__name__}: {key!r:.80}")

    def _timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return self._cfg.timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= _MAX_TIMEOUT_S:
            raise ConfigError(f"timeout must be a finite number of seconds in 0..{_MAX_TIMEOUT_S:g}, got {timeout!r}")
        return float(timeout)

    def _out_check(self, out: torch.Tensor | None) -> Callable[[Slot], None] | None:
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
            self._wake(b"x")

    def _wake(self, tag: bytes) -> None:
        """Wake the I/O thread from its poll (any thread)."""
        try:
            os.write(self._wake_w, tag)
        except (BlockingIOError, OSError):
            pass  # pipe full: the I/O thread is already due to wake

    def _release_after_caller(self, buf: Any) -> None:
        """Return a pool buffer once the work the caller queued on its current CUDA stream
        (a copy out of it, an unpack kernel) has finished; at once for CPU buffers."""
        if not self._cuda or self._completer is None or self._closed:
            if self._cuda:
                torch.cuda.current_stream(self._device).synchronize()
            buf.release()
            return
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self._device))
        if ev.query():  # nothing of the caller's still reads it: at once, no thread hop
            buf.release()
            return
        # A thread blocked (GIL released) on the caller's work, in order: no polling.
        w = self._release_watcher
        if w is None:
            w = self._release_watcher = Watcher(self._device, name=f"p2pkv-release-{self.port}")
        w.add(ev, buf.release)

    def _on_pool_free(self) -> None:
        # Wake the I/O thread only when something waits for memory: a pipe write per freed
        # buffer cost about 13 us of every recv() (measured with cProfile).
        if self._want_mem and not self._mem_dirty and not self._closed:
            self._mem_dirty = True
            self._wake(b"m")

