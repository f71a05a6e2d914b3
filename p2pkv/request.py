"""Whole-request transfers: one offer, one grant, the data, one completion.

The unit of control is the *request* (all the KV tensors of one prompt), not
the tensor. The producer names every tensor of the request up front in one
``offer`` (names, dtypes, shapes, in the order it will send them); the
consumer reserves pool space for all of them at once and answers with one
``grant`` (for CUDA IPC: where in its arena each tensor goes); the producer
then moves each tensor as soon as it is ready, on the caller's thread where
the transport allows it, and the consumer answers with one ``odone`` when
every tensor has landed. No per-tensor header, credit request or ack.

Per transport, what happens per tensor:

* NCCL: the consumer posts every ``ncclRecv`` of the request into its pool at
  grant time, in the offer's order; the producer's ``RequestHandle.send``
  makes the communicator's stream wait on the caller's stream and posts the
  ``ncclSend`` right there, on the caller's thread. Nothing crosses a Python
  thread on the data path; the consumer learns of each landing from a
  watcher thread that blocks (GIL released) on the per-tensor CUDA event.
* CUDA IPC: the producer copies straight into the consumer's pool (its arena
  is mapped once per peer): one copy, no staging. An interprocess CUDA event
  recorded after the copy tells the consumer, through a small ``opost``
  message, when to wait.
* TCP: one ``odata`` frame pair per tensor, sent by the I/O thread.

Ordering: NCCL matches sends and receives in posting order per
communicator, so every party posts in one global order: requests in offer
order (FIFO per peer on both sides), tensors in the offer's order. A request
that gives up after its grant (abort, deadline) still "sends" its missing
tensors from scratch memory so the consumer's posted receives complete and
the communicator stays in step; the consumer discards them.

This module holds the state of both sides; the wire work is in
:mod:`p2pkv.engine`.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from typing import Any
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import torch

from . import _tensors as T
from . import _trace
from .errors import InvalidTensor, P2pkvError, ShapeMismatch, TransferTimeout
from .keys import TransferKey, validate_transfer_id
from .pool import BufferPool

log = logging.getLogger("p2pkv")

__all__ = ["RequestState", "RequestHandle", "RequestLayout", "ItemSpec", "parse_layout", "Watcher", "MAX_ITEMS"]

MAX_ITEMS = 2048  # tensors in one request (the offer is one control message)


class RequestState(enum.Enum):
    """Life of one whole-request send."""

    OFFERED = "offered"    # offer queued or sent; no grant yet
    GRANTED = "granted"    # the receiver reserved room; tensors move as they are sent
    DONE = "done"          # the receiver holds every tensor
    FAILED = "failed"      # see .error
    ABORTED = "aborted"    # its transfer id was aborted

    @property
    def finished(self) -> bool:
        return self in (RequestState.DONE, RequestState.FAILED, RequestState.ABORTED)


class ItemSpec:
    """One tensor of a request: its name, dtype, shape and size in bytes."""

    __slots__ = ("name", "dtype", "shape", "nbytes")

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int

    def __init__(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]):
        # read-only: a request's room and copies are sized from its specs once, on both sides
        put = object.__setattr__
        put(self, "name", name)
        put(self, "dtype", dtype)
        put(self, "shape", shape)
        put(self, "nbytes", T.nbytes_of(dtype, shape))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"ItemSpec is read-only (setting {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"ItemSpec is read-only (deleting {name!r})")

    def to_wire(self) -> list[Any]:
        return [self.name, T.dtype_name(self.dtype), list(self.shape), self.nbytes]

    def __repr__(self) -> str:
        return f"ItemSpec({self.name!r}, {self.dtype}, {self.shape})"


class RequestLayout:
    """A request's tensors (names, dtypes, shapes), checked once and reused by many
    :meth:`~p2pkv.Engine.send_request` calls (as NIXL prepares its descriptor lists once):
    a request then costs O(1) checks on both sides, whatever its number of tensors.

    ``RequestLayout([(name, tensor), ...])`` or ``[(name, dtype, shape), ...]`` (or a dict).

    It is read-only (``specs`` and ``names`` are tuples, ``index`` a read-only mapping): its requests
    share what it computed once, and a producer sizes its copies by it. Build a new one for another
    layout.

    Raises
    ------
    InvalidKey, InvalidTensor
    """

    __slots__ = ("_specs", "specs", "names", "max_nbytes", "_fast", "_index", "index", "nbytes", "_sealed")

    def __init__(self, layout: Any):
        specs = _parse_specs("layout", layout, 2**62)
        self._specs = specs  # shared by its requests; never handed out
        self.specs: tuple[ItemSpec, ...] = tuple(specs)
        self.names: tuple[str, ...] = tuple(s.name for s in specs)
        self.max_nbytes = max(s.nbytes for s in specs)
        self._index = {s.name: i for i, s in enumerate(specs)}  # shared by its requests
        self.index: Mapping[str, int] = MappingProxyType(self._index)
        self.nbytes = sum(s.nbytes for s in specs)
        self._fast: Any = None  # its shared-memory form, built on first use (p2pkv._engine.fastpath)
        self._sealed = True

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "_fast" and getattr(self, "_sealed", False):
            raise AttributeError(f"RequestLayout is read-only (setting {name!r}); build a new one")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"RequestLayout is read-only (deleting {name!r}); build a new one")

    def __len__(self) -> int:
        return len(self.specs)

    def __repr__(self) -> str:
        return f"RequestLayout({len(self.specs)} tensors, {sum(s.nbytes for s in self.specs)} bytes)"


def parse_layout(transfer_id: str, layout: Any, max_bytes: int) -> list[ItemSpec]:
    """Validate a request layout: a :class:`RequestLayout`, ``[(name, tensor)]`` or ``[(name, dtype, shape)]``
    (or a dict of either).

    Raises
    ------
    InvalidKey, InvalidTensor
    """
    validate_transfer_id(transfer_id)
    if isinstance(layout, RequestLayout):
        if layout.max_nbytes > max_bytes:
            raise InvalidTensor(f"a tensor of the layout is {layout.max_nbytes} bytes; max_message_bytes={max_bytes}")
        return layout._specs
    return _parse_specs(transfer_id, layout, max_bytes)


def _parse_specs(transfer_id: str, layout: Any, max_bytes: int) -> list[ItemSpec]:
    if isinstance(layout, dict):
        layout = [(k, *(v if isinstance(v, tuple) else (v,))) for k, v in layout.items()]
    if not isinstance(layout, (list, tuple)) or not layout:
        raise InvalidTensor("layout must be a non-empty list of (name, tensor) or (name, dtype, shape)")
    if len(layout) > MAX_ITEMS:
        raise InvalidTensor(f"a request holds at most {MAX_ITEMS} tensors, got {len(layout)}")
    specs: list[ItemSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(layout):
        if not isinstance(entry, (list, tuple)) or len(entry) not in (2, 3):
            raise InvalidTensor(f"layout[{i}] must be (name, tensor) or (name, dtype, shape), got {entry!r:.80}")
        name = entry[0]
        TransferKey("x", name)  # validates the name
        if name in seen:
            raise InvalidTensor(f"layout names {name!r} twice")
        seen.add(name)
        if len(entry) == 2:
            t = T.check_tensor(entry[1], f"layout[{i}]")
            dtype, shape = t.dtype, tuple(t.shape)
        else:
            dtype, shape = entry[1], entry[2]
            if not isinstance(dtype, torch.dtype):
                raise InvalidTensor(f"layout[{i}]: dtype must be a torch.dtype, got {dtype!r:.40}")
            T.dtype_name(dtype)
            shape = T.check_shape(list(shape) if isinstance(shape, (tuple, list, torch.Size)) else shape)
        spec = ItemSpec(name, dtype, tuple(shape))
        if spec.nbytes > max_bytes:
            raise InvalidTensor(f"layout[{i}] ({name!r}) is {spec.nbytes} bytes; max_message_bytes={max_bytes}")
        specs.append(spec)
    return specs


class RequestHandle:
    """The producer's handle of one whole-request send (from :meth:`Engine.send_request`).

    ``send(name, tensor)`` hands one tensor over as soon as it is ready (in
    any order; it moves in the layout's order). It never blocks on the GPU:
    the tensor is read after the work already queued on the caller's current
    CUDA stream. Do not modify a sent tensor until the handle is finished.
    ``wait()`` returns once the receiver holds every tensor.
    """

    __slots__ = ("transfer_id", "peer", "specs", "index", "nbytes", "deadline", "timeout", "_engine", "_state",
                 "_error", "_event", "lock", "pending", "next_post", "posted_events", "seq", "x", "offs", "t_start",
                 "t_done", "sent", "granted", "acked", "comm", "_p", "last_event", "keep", "offered", "_fast", "flag0",
                 "layout", "__weakref__")

    def __init__(self, engine: Any, peer: str, transfer_id: str, specs: list[ItemSpec], timeout: float,
                 layout: RequestLayout | None = None):
        self._engine = engine
        self.transfer_id = transfer_id
        self.peer = peer
        self.specs = specs
        if layout is not None:  # checked once for every request of the layout
            self.index = layout._index
            self.nbytes = layout.nbytes
        else:
            self.index = {s.name: i for i, s in enumerate(specs)}
            self.nbytes = sum(s.nbytes for s in specs)
        self.timeout = timeout
        self.t_start = time.monotonic()
        self.deadline = self.t_start + timeout
        self.t_done: float | None = None
        self._state = RequestState.OFFERED
        self._error: P2pkvError | None = None
        self._event = threading.Event()
        self.offered = threading.Event()  # set once the offer went out (or could not)
        self.lock = threading.Lock()
        self.pending: dict[int, tuple[torch.Tensor, Any]] = {}  # index -> (tensor, ready event)
        self.sent: set[int] = set()   # indices handed over by the caller
        self.next_post = 0            # the next index to move (the layout's order)
        self.posted_events: list[Any] = []  # GPU work reading the caller's tensors (kept until it ends)
        self.seq = -1
        self.x = ""
        self.offs: list[int] | None = None
        self.granted = False          # the receiver posted/reserved for this request (ogrant seen)
        self.acked = False            # the receiver confirmed our give-up (oerr after oabort)
        self.comm: Any = None         # the NCCL communicator carrying it
        self._p: Any = None           # the engine's peer object
        self.last_event: Any = None   # the last GPU work reading the caller's tensors
        self.keep: list[torch.Tensor] = []  # tensors still read by posted GPU work
        self._fast: Any = None        # FastTx when it went by the same-host fast path
        self.flag0 = -1               # its first flag slot there
        self.layout: Any = None       # its FastLayout there (shared by requests of one RequestLayout)

    # ------------------------------------------------------------------ public
    @property
    def state(self) -> RequestState:
        if self._fast is not None and not self._state.finished:
            self._fast.poll(self)  # same-host path: copies and verdict are read when asked, no thread hop
        return self._state

    @property
    def error(self) -> P2pkvError | None:
        return self._error

    def done(self) -> bool:
        if self._fast is not None and not self._state.finished:
            self._fast.poll(self)
        return self._state.finished

    def send(self, name: str, tensor: torch.Tensor) -> None:
        """Hand over the tensor named ``name`` in the layout.

        Raises
        ------
        InvalidKey
            ``name`` is not in the layout, or was sent already.
        InvalidTensor, ShapeMismatch
            The tensor is not contiguous, or not on the engine's device, or its
            dtype/shape differ from the layout.
        P2pkvError
            The request already failed (its error), or the engine is closed.
        """
        _trace.mark("send.enter", f"{self.transfer_id}/{name}")
        i, t = self._check_item(name, tensor)
        self._engine._request_send(self, i, t)
        _trace.mark("send.ret", f"{self.transfer_id}/{name}")

    def send_many(self, tensors: Any) -> None:
        """Hand over several tensors at once: ``{name: tensor}`` or ``[(name, tensor), ...]``.

        Same as :meth:`send` for each, but on the same-host fast path they move in ONE copy
        launch (a whole request's 32 layers cost one launch instead of 32).

        Raises
        ------
        InvalidKey, InvalidTensor, ShapeMismatch, P2pkvError
            As :meth:`send`; nothing is sent when any of them is refused.
        """
        if isinstance(tensors, dict):
            pairs = list(tensors.items())
        elif isinstance(tensors, (str, bytes, torch.Tensor)) or not hasattr(tensors, "__iter__"):
            raise InvalidTensor(f"send_many takes {{name: tensor}} or (name, tensor) pairs, got "
                                f"{type(tensors).__name__}", key=self.transfer_id)
        else:
            pairs = list(tensors)
        idxs, ts = [], []
        for entry in pairs:
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise InvalidTensor(f"send_many takes (name, tensor) pairs, got {entry!r:.80}", key=self.transfer_id)
            i, t = self._check_item(entry[0], entry[1])
            if i in idxs:
                from .errors import InvalidKey

                raise InvalidKey(f"{entry[0]!r} is given twice", key=self.transfer_id)
            idxs.append(i)
            ts.append(t)
        if idxs:
            self._engine._request_send_many(self, idxs, ts)

    def send_all(self, tensors: Sequence[torch.Tensor]) -> None:
        """Hand over every tensor at once, in the layout's order (the cheapest call: one check per
        tensor and, on the same-host fast path, one copy launch).

        Raises
        ------
        InvalidTensor, ShapeMismatch, P2pkvError
            As :meth:`send`; nothing is sent when any of them is refused.
        """
        if not isinstance(tensors, (list, tuple)) or len(tensors) != len(self.specs):
            raise InvalidTensor(f"send_all takes a list of {len(self.specs)} tensors in the layout's order",
                                key=self.transfer_id)
        eng = self._engine
        idx = eng._one_launch_device(self)  # the same-host CUDA path: also check devices, take addresses
        ts = []
        ptrs: list[int] = []
        for spec, t in zip(self.specs, tensors, strict=True):
            if not isinstance(t, torch.Tensor) or t.dtype != spec.dtype or t.shape != spec.shape \
                    or not t.is_contiguous() or t.requires_grad or t.is_neg():
                _, t = self._check_item(spec.name, t)  # the precise error (or a tensor it detaches)
            if idx is not None:
                if not t.is_cuda or t.get_device() != idx:
                    raise InvalidTensor(f"tensor {spec.name!r} is on {t.device}; this engine sends requests from "
                                        f"{eng._device}", key=self.transfer_id)
                ptrs.append(t.data_ptr())
            ts.append(t)
        if idx is None:
            eng._request_send_many(self, list(range(len(ts))), ts)
        else:
            eng._request_send_all(self, ts, ptrs)

    def _check_item(self, name: Any, tensor: Any) -> tuple[int, torch.Tensor]:
        from .errors import InvalidKey

        i = self.index.get(name) if isinstance(name, str) else None
        if i is None:
            raise InvalidKey(f"{name!r:.80} is not a tensor of this request's layout", key=self.transfer_id)
        spec = self.specs[i]
        try:
            t = T.check_tensor(tensor, f"tensor {name!r:.80}")
        except InvalidTensor as exc:  # name the request too
            raise type(exc)(exc.message, key=self.transfer_id) from None
        if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
            raise ShapeMismatch(f"{name!r}: tensor is {t.dtype} {tuple(t.shape)}, the layout says "
                                f"{spec.dtype} {spec.shape}", key=self.transfer_id)
        return i, t

    def wait(self, timeout: float | None = None) -> None:
        """Block until the receiver holds every tensor; raise the request's error if it failed.

        Raises
        ------
        TransferTimeout
            Still unfinished after ``timeout`` seconds (the request goes on until its own deadline).
        PeerLost, TransferAborted, PoolExhausted, TransferTimeout, ...
            The error the request failed with.
        """
        if self._fast is not None:
            end = None if timeout is None else time.monotonic() + timeout
            while not self.done():  # polls its copies and the consumer's verdict
                if end is not None and time.monotonic() >= end:
                    break
                self._event.wait(2e-4)
        if not self._event.wait(timeout if self._fast is None else 0):
            raise TransferTimeout(f"request still {self._state.value} after waiting {timeout:.3g}s",
                                  key=self.transfer_id, peer=self.peer)
        if self._error is not None:
            raise self._error

    @property
    def latency_s(self) -> float | None:
        return None if self.t_done is None else self.t_done - self.t_start

    def __repr__(self) -> str:
        err = f" error={self._error!r}" if self._error else ""
        return (f"<RequestHandle {self.transfer_id} -> {self.peer} {len(self.specs)} tensors {self.nbytes}B "
                f"{self._state.value}{err}>")

    # ------------------------------------------------------------------ engine side
    def _set(self, state: RequestState, error: P2pkvError | None = None) -> bool:
        """Move to ``state``; finished states are final. Returns False if already finished."""
        with self.lock:
            if self._state.finished:
                return False
            self._state = state
            if state.finished:
                self._error = error
                self.t_done = time.monotonic()
                self.pending.clear()
        if state.finished:
            self._event.set()
            self.offered.set()
        return True

    def done_polled(self) -> bool:
        """Finished (without polling the same-host path again)."""
        return self._state.finished

    def key(self, i: int) -> TransferKey:
        return TransferKey(self.transfer_id, self.specs[i].name)


class Incoming:
    """The consumer's side of one granted (or waiting) request from one session."""

    __slots__ = ("sess", "seq", "transfer_id", "specs", "x", "deadline", "bufs", "landed", "events", "failed",
                 "keys", "nbytes", "t_arrived", "evs", "done_sent", "lock", "posted", "quarantine", "comm", "eager",
                 "refusal", "need", "sizes", "record", "filling", "fill_left")

    def __init__(self, sess: Any, seq: int, transfer_id: str, specs: list[ItemSpec], x: str, deadline: float,
                 evs: list[bytes] | None, keys: list[TransferKey] | None = None):
        self.sess = sess
        self.seq = seq
        self.transfer_id = transfer_id
        self.specs = specs
        self.x = x
        self.deadline = deadline
        self.bufs: list[Any] = []          # pool buffers, one per item, once admitted
        self.landed = [False] * len(specs)
        self.events: list[Any] = []
        self.failed = False
        self.keys = keys if keys is not None else [TransferKey(transfer_id, s.name) for s in specs]
        self.nbytes = sum(s.nbytes for s in specs)
        self.t_arrived = time.monotonic()
        self.evs = evs or []               # the producer's interprocess event handles (IPC)
        self.done_sent = False
        self.lock = threading.Lock()
        self.posted = [False] * len(specs)  # a GPU landing is pending for the item (owned by the watcher)
        self.quarantine = False            # failed IPC request: unposted buffers wait for the producer's ofin
        self.comm: Any = None
        self.eager = False                 # paid from credit: must be admitted, its data already moves
        self.refusal: Any = None           # an eager offer refused: drained in its turn, then answered
        self.need = sum(BufferPool.footprint(s.nbytes) for s in specs)  # pool bytes it takes once admitted
        self.sizes: list[int] = [s.nbytes for s in specs]  # (a refused eager offer has sizes, no specs)
        self.record: Any = None            # its layout, listed for recv_request until taken or failed
        # admitted, its buffers taken a slice at a time (so one large request cannot hold the I/O thread):
        # those taken so far (None when not being filled), and the pool bytes still to take
        self.filling: list[Any] | None = None
        self.fill_left = 0

    @property
    def admitted(self) -> bool:
        return bool(self.bufs)

    def all_landed(self) -> bool:
        return all(self.landed)

    def __repr__(self) -> str:
        return f"<Incoming {self.transfer_id} seq={self.seq} {len(self.specs)} items x={self.x}>"


class Watcher:
    """A thread that waits for CUDA events in order, blocking (GIL released), and runs callbacks.

    Each callback runs on this thread right after its event completes. Used
    for work that always completes: copies, and NCCL operations whose
    communicator is aborted on any failure or deadline (an aborted NCCL kernel
    ends, so its event completes).
    """

    def __init__(self, device: torch.device, name: str):
        self._device = device
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    def add(self, event: Any, callback: Callable[[], None]) -> None:
        self._q.put((event, callback))

    def _run(self) -> None:
        torch.cuda.set_device(self._device)
        while True:
            item = self._q.get()
            if item is None:
                return
            event, callback = item
            try:
                if event is not None:
                    event.synchronize()
            except Exception as exc:  # pragma: no cover - a CUDA error: the callback sees the comm state
                log.warning("waiting for a CUDA event failed: %s", exc)
            try:
                callback()
            except Exception:  # pragma: no cover - a bug must not stop the watcher
                log.exception("request landing callback failed")

    def close(self, join: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        self._q.put(None)
        if join and self._thread is not threading.current_thread():
            self._thread.join(10)


def offer_sizes(msg_items: Any, max_bytes: int) -> list[int]:
    """The byte size of each item of an ``offer``, checked in one cheap pass (no object is built per
    item): enough to refuse an offer that can never fit, or that the sender has no room for, before
    :func:`wire_items` parses it in full.

    Raises
    ------
    ProtocolError, InvalidTensor
    """
    from .errors import ProtocolError

    if not isinstance(msg_items, list) or not 0 < len(msg_items) <= MAX_ITEMS:
        got = len(msg_items) if isinstance(msg_items, list) else type(msg_items).__name__
        raise ProtocolError(f"an offer holds 1..{MAX_ITEMS} items, got {got}")
    sizes = []
    for it in msg_items:
        n = it[3] if isinstance(it, list) and len(it) == 4 else None
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ProtocolError("offer items are [name, dtype, shape, nbytes], nbytes an int >= 0")
        if n > max_bytes:
            raise InvalidTensor(f"offer item of {n} bytes exceeds max_message_bytes={max_bytes}")
        sizes.append(n)
    return sizes


def wire_items(msg_items: Sequence[Any], max_bytes: int) -> list[ItemSpec]:
    """Decode and check the items of an ``offer`` message.

    Raises
    ------
    ProtocolError, InvalidTensor, InvalidKey
    """
    from .errors import ProtocolError

    if len(msg_items) > MAX_ITEMS or not msg_items:
        raise ProtocolError(f"an offer holds 1..{MAX_ITEMS} items, got {len(msg_items)}")
    specs = []
    seen = set()
    for it in msg_items:
        if not isinstance(it, list) or len(it) != 4:
            raise ProtocolError("offer items are [name, dtype, shape, nbytes]")
        name, dt, sh, n = it
        if not isinstance(name, str) or name in seen:
            raise ProtocolError(f"offer item name {name!r:.60} is not a unique str")
        seen.add(name)
        spec = ItemSpec(name, T.dtype_from_name(dt), T.check_shape(sh))
        if isinstance(n, bool) or not isinstance(n, int) or n != spec.nbytes:
            raise ProtocolError(f"offer item {name!r:.60}: nbytes {n!r:.20} does not match dtype and shape")
        if n > max_bytes:
            raise InvalidTensor(f"offer item {name!r:.60} of {n} bytes exceeds max_message_bytes={max_bytes}")
        specs.append(spec)
    return specs
