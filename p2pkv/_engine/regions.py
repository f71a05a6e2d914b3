"""One-sided reads between engines of one host: registered memory, remote views, read notifications.

A producer registers tensors once (:meth:`Engine.register_memory`, e.g. vLLM's KV caches); a
same-host consumer maps them once (:meth:`Engine.remote_memory`, CUDA IPC of their
allocations) and copies what it needs straight out of them with its own kernels, then tells
the producer it is done (:meth:`Engine.read_done`), which completes the producer's
:meth:`Engine.expose` handle for that transfer id. This is what NIXL's READ does for vLLM's
NixlConnector: one copy, from the producer's blocks into the consumer's, nothing staged.

Regions are only served to sessions of this host, only when CUDA IPC is used between the two
engines. A consumer maps whole allocations of the producer (CUDA IPC shares allocations), so
it could read more than the registered tensors: register only memory a same-host peer may see.

What is checked, and what is not: the reader checks every region a producer describes (its
handle, dtype, shape and strides must lie inside the allocation, whose real size the driver
reports once it is mapped), maps only what it asked for, and never caches an unsolicited
description. ``read_done`` completes an :meth:`Engine.expose` handle only from a session that
could have read the memory (a CUDA engine of this host); which of those peers reads which
transfer is not known to the producer, so a same-host CUDA peer can complete another reader's
handle (name the reader in the transfer id, or use the push path, where that matters).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from .. import _tensors as T
from .. import _trace
from ..control.messages import MAX_HEADER_BYTES, encode
from ..errors import (InvalidKey, InvalidTensor, P2pkvError, PeerLost, ProtocolError, TransferAborted,
                      TransferTimeout, TransportError)
from ..keys import TransferKey

if TYPE_CHECKING:
    from ..engine import Engine
    from .state import _Peer, _Session

log = logging.getLogger("p2pkv")

__all__ = ["Regions", "ExposeHandle", "MAX_REGIONS"]

MAX_REGIONS = 256  # per engine: all of them travel in one control message (64 KiB)
_MAX_EXPOSED = 65536
_HANDLE_BYTES = 64  # a cudaIpcMemHandle_t
# The regions as described to readers, one ``mr`` message for all of them (a list, not a map: a control
# map holds at most 64 entries and vLLM registers one KV cache per layer): ``[name, IPC handle, offset in
# its allocation, allocation size, dtype, shape, strides]`` each. Their names are what can make it
# outgrow one message: a registration that would is refused.
_DESCRIBE_LIMIT = MAX_HEADER_BYTES - 1024

RegionSpec = tuple[bytes, int, int, torch.dtype, tuple[int, ...], tuple[int, ...]]


class ExposeHandle:
    """The producer's handle of one transfer readable by peers (:meth:`Engine.expose`).

    ``wait()`` returns once a peer reported it read it; ``done()``, ``error``.
    """

    __slots__ = ("transfer_id", "deadline", "_event", "_error", "t_start", "readers")

    def __init__(self, transfer_id: str, timeout: float):
        self.transfer_id = transfer_id
        self.t_start = time.monotonic()
        self.deadline = self.t_start + timeout
        self._event = threading.Event()
        self._error: P2pkvError | None = None
        self.readers: list[str] = []

    @property
    def error(self) -> P2pkvError | None:
        return self._error

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until a peer read the transfer (or it failed: its error is raised).

        Raises
        ------
        TransferTimeout, TransferAborted, EngineClosed
        """
        if not self._event.wait(timeout):
            raise TransferTimeout(f"no peer reported reading {self.transfer_id} within {timeout:.3g}s",
                                  key=self.transfer_id)
        if self._error is not None:
            raise self._error

    def _finish(self, err: P2pkvError | None = None) -> bool:
        if self._event.is_set():
            return False
        self._error = err
        self._event.set()
        return True

    def __repr__(self) -> str:
        state = "pending" if not self.done() else "failed" if self._error else "done"
        return f"<ExposeHandle {self.transfer_id} {state}>"


class _Region:
    __slots__ = ("tensor", "handle", "alloc_off", "alloc_size")

    def __init__(self, tensor: torch.Tensor, handle: bytes, alloc_off: int, alloc_size: int):
        self.tensor = tensor
        self.handle = handle
        self.alloc_off = alloc_off
        self.alloc_size = alloc_size


class Regions:
    """Registered memory (producer), remote views (consumer) and read notifications of one engine."""

    def __init__(self, eng: Engine):
        self._eng = eng
        self._lock = threading.Lock()
        self._mine: dict[str, _Region] = {}
        self._exposed: dict[str, ExposeHandle] = {}
        self._waiters: dict[str, list[Any]] = {}      # peer addr -> callers waiting for its regions
        self._remote: dict[str, dict[str, torch.Tensor]] = {}  # peer addr -> name -> view
        self._maps: dict[str, dict[bytes, Any]] = {}   # peer addr -> allocation handle -> mapping
        # Held while a caller queues copies from a peer's views (:meth:`reading`); mappings leave
        # ``_maps`` only under it, and are unmapped after a device synchronize: a copy queued from a view
        # then always runs before its memory is unmapped (one queued after would fault and kill the
        # CUDA context).
        self._use = threading.Lock()

    # ------------------------------------------------------------------ producer
    def register(self, name: str, tensor: torch.Tensor) -> None:
        eng = self._eng
        TransferKey("x", name)  # validates the name
        if not isinstance(tensor, torch.Tensor):
            raise InvalidTensor(f"register_memory({name!r}) needs a torch.Tensor, got {type(tensor).__name__}")
        if not eng._cuda:
            raise InvalidTensor(f"register_memory({name!r}): this engine is on {eng._device}; one-sided reads "
                                "serve the memory of CUDA engines to CUDA engines of the same host only")
        # (a strided view of one allocation, e.g. a KV cache's layer, may be registered as it is)
        t = T.check_tensor(tensor, f"register_memory({name!r})") if tensor.is_contiguous() else tensor
        if t.device != eng._device:
            raise InvalidTensor(f"register_memory({name!r}): a tensor on this engine's CUDA device ({eng._device}) "
                                f"is needed, got {t.device}")
        T.dtype_name(t.dtype)
        from ..transport import cudadrv

        try:
            import cupy

            cudadrv.use_device(eng._device)
            base, size = cudadrv.address_range(t.data_ptr())
            handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(base))
        except Exception as exc:  # expandable segments, no CuPy, a driver that refuses
            raise TransportError(f"register_memory({name!r}): its allocation cannot be shared through CUDA IPC "
                                 f"({type(exc).__name__}: {exc}); allocate it without expandable segments") from None
        with self._lock:
            if name not in self._mine and len(self._mine) >= MAX_REGIONS:
                raise InvalidKey(f"at most {MAX_REGIONS} registered regions per engine")
            old = self._mine.get(name)
            self._mine[name] = _Region(t, handle, t.data_ptr() - base, size)
            nbytes = len(encode("mr", r=self._describe_locked()))
            if nbytes > _DESCRIBE_LIMIT:  # readers get every region in one message
                if old is None:
                    del self._mine[name]
                else:
                    self._mine[name] = old
                raise InvalidKey(f"register_memory({name!r}): {len(self._mine) + (old is None)} regions take "
                                 f"{nbytes} bytes to describe, over {_DESCRIBE_LIMIT}; register fewer, larger "
                                 "tensors (e.g. one KV cache holding every layer)")

    def unregister(self, name: str) -> None:
        with self._lock:
            self._mine.pop(name, None)

    def describe(self) -> list[list[Any]]:
        """What a same-host reader needs to map every region (sent on its session only):
        ``[name, IPC handle, offset in its allocation, allocation size, dtype, shape, strides]`` each."""
        with self._lock:
            return self._describe_locked()

    def _describe_locked(self) -> list[list[Any]]:
        return [[name, r.handle, r.alloc_off, r.alloc_size, T.dtype_name(r.tensor.dtype), list(r.tensor.shape),
                 list(r.tensor.stride())] for name, r in self._mine.items()]

    def expose(self, tid: str, timeout: float) -> ExposeHandle:
        h = ExposeHandle(tid, timeout)
        with self._lock:
            old = self._exposed.get(tid)
            if old is not None and not old.done():
                from ..errors import DuplicateKey

                raise DuplicateKey("this transfer is exposed already and not yet read", key=tid)
            if len(self._exposed) >= _MAX_EXPOSED:
                self._expire_locked(time.monotonic(), force=True)
            self._exposed[tid] = h
        return h

    def on_read_done(self, sess: _Session, tid: str) -> None:
        """A peer says it read ``tid`` (I/O thread): only a peer that could have read our memory (a CUDA
        engine of this host, to which regions are served) completes a handle."""
        eng = self._eng
        caps = sess.caps
        if not (eng._cuda and isinstance(caps, dict) and caps.get("host") == eng._host and caps.get("cuda") is True):
            eng._stats.add("reads_refused")
            log.warning("read_done for %s from %s ignored: it cannot have read this engine's memory", tid, sess)
            return
        with self._lock:
            h = self._exposed.pop(tid, None)
        _trace.mark("save.read_done", tid)
        if h is not None:
            h.readers.append(sess.eid)
            if h._finish():
                self._eng._stats.add("reads_done")

    def abort(self, tid: str, reason: str) -> None:
        with self._lock:
            h = self._exposed.pop(tid, None)
        if h is not None:
            h._finish(TransferAborted(reason, key=tid))

    def _expire_locked(self, now: float, force: bool = False) -> list[ExposeHandle]:
        late = [h for h in self._exposed.values() if h.deadline < now or (force and h.done())]
        for h in late:
            self._exposed.pop(h.transfer_id, None)
        return late

    def tick(self, now: float) -> None:
        with self._lock:
            late = self._expire_locked(now)
        for h in late:
            h._finish(TransferTimeout("no peer reported reading the transfer before its deadline",
                                      key=h.transfer_id))

    # ------------------------------------------------------------------ consumer
    def on_regions(self, peer: _Peer, msg: dict[str, Any]) -> None:
        """The producer's answer to ``mq`` (I/O thread): map what it registered."""
        with self._lock:
            asked = bool(self._waiters.get(peer.addr))
        if not asked:  # nobody asked: mapping it would map more of the peer's memory here each time
            self._eng._stats.add("protocol_errors")
            log.warning("memory regions from %s that nobody asked for: ignored", peer.addr)
            return
        err: P2pkvError | None = None
        views: dict[str, torch.Tensor] = {}
        try:
            if isinstance(msg.get("no"), str):
                raise TransportError(f"the peer serves no memory regions: {msg['no'][:200]}", peer=peer.addr)
            views = self._map(peer, self.parse(msg.get("r")))
        except ProtocolError as exc:
            err = ProtocolError(exc.message, peer=peer.addr)
        except P2pkvError as exc:
            err = exc
        except Exception as exc:  # a driver error mapping the peer's memory
            err = TransportError(f"cannot map the peer's memory: {type(exc).__name__}: {exc}", peer=peer.addr)
        with self._lock:
            if err is None:
                self._remote[peer.addr] = views
            waiters = self._waiters.pop(peer.addr, [])
        for w in waiters:
            w.error = err
            w.event.set()

    @staticmethod
    def parse(r: Any) -> dict[str, RegionSpec]:
        """Check a region description (see :meth:`describe`) without mapping anything:
        ``{name: (handle, offset, allocation size, dtype, shape, strides)}``.

        Raises
        ------
        ProtocolError
            Anything malformed, or a view that would reach outside its allocation.
        """
        if not isinstance(r, list) or len(r) > MAX_REGIONS:
            raise ProtocolError("malformed memory regions")
        out: dict[str, RegionSpec] = {}
        for e in r:
            if not isinstance(e, list) or len(e) != 7:
                raise ProtocolError("memory regions are [name, handle, offset, size, dtype, shape, strides]")
            name, h, off, size, dt, sh, st = e
            try:
                if not isinstance(name, str):
                    raise InvalidKey("a region name must be a str")
                TransferKey("x", name)
                if name in out:
                    raise InvalidKey(f"memory region {name!r:.60} is described twice")
                if not isinstance(h, bytes) or len(h) != _HANDLE_BYTES:
                    raise InvalidKey(f"memory region {name!r:.60} has a malformed handle")
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in (off, size)) \
                        or not 0 <= off < 2**62 or not 0 <= size < 2**62:
                    raise InvalidKey(f"memory region {name!r:.60} has a bad offset or size")
                dtype = T.dtype_from_name(dt)
                shape = T.check_shape(sh)
                stride = T.check_shape(st)
            except (InvalidKey, InvalidTensor) as exc:
                raise ProtocolError(f"malformed memory region: {exc.message}") from None
            if len(stride) != len(shape):
                raise ProtocolError(f"memory region {name!r:.60}: strides do not match its shape")
            esize = torch.empty((), dtype=dtype).element_size()
            span = (sum((s - 1) * k for s, k in zip(shape, stride, strict=True)) + 1) * esize if all(shape) else 0
            if off % esize or off + span > size:
                raise ProtocolError(f"memory region {name!r:.60} lies outside its allocation")
            out[name] = (h, off, size, dtype, shape, stride)
        return out

    def _map(self, peer: _Peer, regs: dict[str, RegionSpec]) -> dict[str, torch.Tensor]:
        eng = self._eng
        local = self._local_regions(peer)
        if local is not None:
            return {n: r.tensor for n, r in local.items() if n in regs}
        if not eng._cuda:
            raise TransportError("reading a peer's memory needs a CUDA engine", peer=peer.addr)
        from ..transport import cudadrv
        from ..transport.cuda import IpcMapping

        cudadrv.use_device(eng._device)
        maps = self._maps.setdefault(peer.addr, {})
        need: dict[bytes, int] = {}
        for h, _, size, _, _, _ in regs.values():
            need[h] = max(need.get(h, 0), size)
        opened: list[bytes] = []
        try:
            for h, size in need.items():
                m = maps.get(h)
                if m is None:
                    m = maps[h] = IpcMapping(h, size, eng._device)
                    opened.append(h)
                    base, real = cudadrv.address_range(m.ptr)
                    if base != m.ptr or real < size:  # views past the mapping would fault
                        raise ProtocolError(f"a memory region claims an allocation of {size} bytes; the driver "
                                            f"mapped {real}", peer=peer.addr)
                elif m.nbytes < size:
                    raise ProtocolError("a memory region claims more of an allocation than before", peer=peer.addr)
            views = {}
            for name, (h, off, _, dtype, shape, stride) in regs.items():
                esize = torch.empty((), dtype=dtype).element_size()
                span = (sum((s - 1) * k for s, k in zip(shape, stride, strict=True)) + 1) * esize if all(shape) else 0
                if not span:
                    views[name] = torch.empty(shape, dtype=dtype, device=eng._device)
                    continue
                raw = maps[h].view(off, span)
                views[name] = torch.as_strided(raw.view(dtype), shape, stride)
            return views
        except BaseException:
            for h in opened:
                m = maps.pop(h, None)
                if m is not None:
                    m.close()
            raise

    def _local_regions(self, peer: _Peer) -> dict[str, _Region] | None:
        """An engine of this very process: its registered tensors, read directly (CUDA IPC cannot open a
        handle of its own process)."""
        from .state import _LOCAL_ENGINES

        other = _LOCAL_ENGINES.get(peer.eid) if peer.eid else None
        if other is None or not self._eng._is_local_peer(peer):
            return None
        with other._regions._lock:
            return dict(other._regions._mine)

    def views(self, peer: str) -> dict[str, torch.Tensor] | None:
        with self._lock:
            return self._remote.get(peer)

    @contextlib.contextmanager
    def reading(self, peer: str) -> Iterator[dict[str, torch.Tensor] | None]:
        """``peer``'s views (None when not mapped), which stay mapped while the block runs: copies queued
        from them inside it finish before their memory is unmapped. Keep the block short (it holds off
        the I/O thread's unmapping of a lost peer)."""
        with self._use:
            yield self.views(peer)

    def add_waiter(self, peer: str, w: Any) -> bool:
        """Queue a caller for ``peer``'s regions; True if a request must be sent."""
        with self._lock:
            lst = self._waiters.setdefault(peer, [])
            lst.append(w)
            return len(lst) == 1

    def peer_lost(self, peer: _Peer, err: P2pkvError) -> None:
        with self._use, self._lock:  # no copy is being queued from these views now, nor later
            self._remote.pop(peer.addr, None)
            maps = self._maps.pop(peer.addr, {})
            waiters = self._waiters.pop(peer.addr, [])
        for m in maps.values():
            m.close()
        for w in waiters:
            w.error = err
            w.event.set()

    def close(self) -> None:
        with self._use, self._lock:  # no copy is being queued from the views now, nor later
            exposed, self._exposed = list(self._exposed.values()), {}
            maps, self._maps = list(self._maps.values()), {}
            self._remote.clear()
            self._mine.clear()
        for h in exposed:
            from ..errors import EngineClosed

            h._finish(EngineClosed("engine closed", key=h.transfer_id))
        for per_peer in maps:
            for m in per_peer.values():
                m.close()


def peer_lost_error(addr: str) -> P2pkvError:
    return PeerLost("connection to the peer closed", peer=addr)
