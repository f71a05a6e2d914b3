"""The consumer's handle of one whole request (from :meth:`p2pkv.Engine.recv_request`).

One call takes the whole request; its tensors are then waited for together (``wait``) or one
by one, stream-ordered (``wait_layer``): for a same-host producer the caller's CUDA stream
waits for that tensor's landing flag (``cuStreamWaitValue64``), with no host wake-up and no
per-tensor Python on the critical path. The tensors stay in the engine's pool (zero-copy
views) until :meth:`RecvRequest.release`, or are copied into the caller's ``outs``.

A same-host request arrives as one record (whatever its number of tensors); whether all of
it has landed is one vectorized comparison of its flags. Requests from other transports
(TCP, NCCL) are taken tensor by tensor from the engine's inbox as they land.

States: ``WAITING`` (nothing known of the request yet) -> ``ARRIVING`` (its layout is known,
tensors are landing) -> ``LANDED`` (every tensor is in memory) -> ``RELEASED``; or ``FAILED``
(``error`` says why; the handle still has to be released).
"""

from __future__ import annotations

import enum
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

import torch

from . import _tensors as T
from . import _trace
from .errors import (EngineClosed, InvalidKey, InvalidTensor, P2pkvError, ShapeMismatch, TransferAborted,
                     TransferTimeout)
from .keys import TransferKey, names_note, validate_transfer_id

if TYPE_CHECKING:
    from .mailbox import Slot
    from .request import ItemSpec

__all__ = ["RecvRequest", "RecvState"]

_SLEEP_S = 50e-6  # poll step once the spin budget is spent (about 0.1 ms in practice)
_CHECK_EVERY = 64  # spin iterations between checks of errors, channels and the clock


class RecvState(enum.Enum):
    """Life of one whole-request receive."""

    WAITING = "waiting"      # nothing is known of the request yet
    ARRIVING = "arriving"    # its layout is known; tensors are landing
    LANDED = "landed"        # every tensor is in memory
    FAILED = "failed"        # see .error
    RELEASED = "released"    # the buffers went back to the pool

    @property
    def finished(self) -> bool:
        return self in (RecvState.LANDED, RecvState.FAILED, RecvState.RELEASED)


class _Unref:
    """Releases a same-host record (for the engine's release-after-the-stream machinery)."""

    __slots__ = ("rec",)

    def __init__(self, rec: Any):
        self.rec = rec

    def release(self) -> None:
        self.rec.unref()


class RecvRequest:
    """A whole request being received (see the module docstring). Not thread-safe: one consumer thread."""

    def __init__(self, engine: Any, transfer_id: str, names: list[str] | None,
                 outs: dict[str, torch.Tensor] | None, timeout: float):
        self._eng = engine
        self.transfer_id = transfer_id
        self.timeout = timeout
        self.t_start = time.monotonic()
        self.deadline = self.t_start + timeout
        self._names = names                  # what the caller asked for (None: the request's layout)
        self._specs: dict[str, ItemSpec] = {}
        self._order: list[str] = list(names) if names is not None else []
        self._slots: dict[str, Slot] = {}    # tensors taken from the inbox (TCP, NCCL, plain sends)
        self._fast: Any = None               # the FastIncoming record of a same-host request
        self._fast_idx: dict[str, int] = {}
        self._fast_all = False               # we took the record whole
        self._offer: Any = None              # the layout record of a TCP/NCCL request we took
        self._views: dict[str, torch.Tensor] = {}
        self._outs = outs
        self._copied: set[str] = set()
        self._state = RecvState.WAITING
        self._error: P2pkvError | None = None
        self._lock = threading.Lock()
        self.t_landed: float | None = None

    # ------------------------------------------------------------------ public
    @property
    def state(self) -> RecvState:
        return self._state

    @property
    def error(self) -> P2pkvError | None:
        return self._error

    @property
    def names(self) -> list[str] | None:
        """The tensors' names in the request's order, once known (``None`` before)."""
        return list(self._order) if self._order else None

    def done(self) -> bool:
        return self._state.finished

    def wait(self, timeout: float | None = None) -> RecvRequest:
        """Block until every tensor has landed (and, with ``outs``, was copied there on the current stream).

        Raises
        ------
        TransferTimeout
            Not complete within ``timeout`` (default: what is left of the request's own timeout).
        PeerLost, TransferAborted, TransferEvicted, ProtocolError, ...
            The request failed (it stays failed; release the handle).
        """
        deadline = self._wait_deadline(timeout)
        self._until(self._complete, deadline, "every tensor")
        err = self._eng._inbox.tid_error(self.transfer_id)
        rec = self._fast  # (None once released by another thread)
        if rec is not None and rec.error is not None:
            err = rec.error  # a flag written by our own watchdog (deadline, lost peer), not by the data
        if isinstance(err, TransferAborted) or (err is not None and rec is not None and
                                                 err is rec.error):  # its data is not to be used
            self._fail(err)
            raise err
        if self._state is RecvState.ARRIVING:
            self._state = RecvState.LANDED
            self.t_landed = time.monotonic()
        if self._outs is not None:
            self._copy_out([n for n in self._order if n not in self._copied], None)
        return self

    def wait_layer(self, name: str, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
        """Make ``stream`` (default: the current one) wait for tensor ``name``; return it (a pool view,
        or its ``out``, valid once ``stream`` reaches this point).

        For a tensor a same-host producer writes straight into our pool this queues a wait on
        the stream and returns at once: no host wake-up per tensor. Otherwise (TCP, NCCL, a CPU
        engine) the host waits for the tensor first. The wait is released, and the request
        failed, if the tensor does not land by the request's deadline: check :attr:`error`
        (or call :meth:`wait`) before trusting the bytes.
        """
        self._check_name(name)
        self._until(lambda: self._bound(name), self.deadline, f"tensor {name!r}")
        dev = self._eng._device
        i = self._fast_idx.get(name)
        s = stream
        if i is not None and dev.type == "cuda":
            rec = self._record()
            if not rec.landed(i):
                from ._engine.fastpath import FLAG_SHIFT
                from .transport import cudadrv

                s = stream if stream is not None else torch.cuda.current_stream(dev)
                cudadrv.use_device(dev)
                rx = rec.rx
                rx.chan.register_cuda()
                value = (rec.seq << FLAG_SHIFT) | (i + 1)
                rx.add_wait(rec.flag0 + i, value, rec.deadline, rec)
                cudadrv.wait_value64(s, rx.chan.flag_dev_addr(rec.flag0 + i), value)
        else:
            self._until(lambda: self._landed(name), self.deadline, f"tensor {name!r}")
        if self._outs is not None and name in self._outs:
            self._copy_out([name], s)
            return self._outs[name]
        return self._view(name)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` once it has landed (the host waits for it): a view of the pool, or its ``out``."""
        self._check_name(name)
        self._until(lambda: self._bound(name) and self._landed(name), self.deadline, f"tensor {name!r}")
        if self._outs is not None and name in self._outs:
            self._copy_out([name], None)
            return self._outs[name]
        return self._view(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensor(name)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by name, in the request's order (waits for all of them)."""
        self.wait()
        return {n: self.tensor(n) for n in self._order}

    def release(self) -> None:
        """Give the pool room back (for CUDA: once the work queued on the current stream is done).
        Idempotent; views returned before are invalid afterwards."""
        with self._lock:
            if self._state is RecvState.RELEASED:
                return
            slots, self._slots = list(self._slots.values()), {}
            rec, self._fast = self._fast, None
            self._views = {}
            self._state = RecvState.RELEASED
        for slot in slots:
            self._eng._release_after_caller(slot.buf)
        if rec is not None:
            self._eng._release_after_caller(_Unref(rec))

    def __enter__(self) -> RecvRequest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if getattr(self, "_slots", None) or getattr(self, "_fast", None) is not None:
            warnings.warn(f"p2pkv RecvRequest {self.transfer_id} was not released", ResourceWarning, stacklevel=2)
            try:
                for s in list(self._slots.values()):
                    s.buf.release()
                self._slots = {}
                if self._fast is not None:
                    rec, self._fast = self._fast, None
                    rec.unref()
            except Exception:  # pragma: no cover - interpreter shutdown
                pass

    def __repr__(self) -> str:
        err = f" error={self._error!r}" if self._error else ""
        n = len(self._order) if self._order else "?"
        return f"<RecvRequest {self.transfer_id} {n} tensors {self._state.value}{err}>"

    # ------------------------------------------------------------------ internals
    def _wait_deadline(self, timeout: float | None) -> float:
        if timeout is None:
            return self.deadline
        return time.monotonic() + self._eng._timeout(timeout)

    def _check_name(self, name: Any) -> None:
        if not isinstance(name, str):
            raise InvalidKey(f"tensor name must be a str, got {type(name).__name__}", key=self.transfer_id)
        if self._order and name not in self._specs and name not in self._order:
            raise InvalidKey(f"{name!r:.80} is not a tensor of this request", key=self.transfer_id)

    def _fail(self, err: P2pkvError) -> None:
        if self._state not in (RecvState.FAILED, RecvState.RELEASED):
            self._state = RecvState.FAILED
            self._error = err
            self._eng._stats.add("recv_requests_failed")
            self._give_back()

    def _give_back(self) -> None:
        """A failed handle (its deadline, names the request lacks, outs that do not fit) returns what it took
        from the inbox and did not hand out (no view, no copy) at once, for a later ``recv`` or ``recv_request``:
        its failure loses no delivered data (the inbox's ``ttl_s`` bounds how long it stays). An aborted
        request's data, or a closed engine's, is dropped."""
        if isinstance(self._error, (TransferAborted, EngineClosed)):
            return
        with self._lock:
            used = set(self._views) | self._copied
            back = [s for n, s in self._slots.items() if n not in used]
            for s in back:
                if self._eng._inbox.put_back(s):
                    del self._slots[s.key.name]
            plane = self._eng._fast
            rec = self._fast
            if rec is not None:
                rest = [n for n in self._fast_idx if n not in used]
                # the caller used part of a same-host record: the rest goes back (a later recv or
                # recv_request by name takes it), the handle keeps its reference for the views it gave
                if rest and plane.give_back(rec, rest, keep_ref=bool(used)):
                    if used:
                        for n in rest:
                            del self._fast_idx[n]
                    else:
                        self._fast = None  # (its reference went back with it)
                        self._fast_idx = {}
                    self._fast_all = False
            if used:
                return  # (the layout lists what the caller holds: a later taker by name gets the rest)
            if self._offer is not None and plane.give_back(self._offer, []):  # its layout, for a later taker
                self._offer = None

    def _released(self) -> bool:
        return self._state is RecvState.RELEASED

    def _record(self) -> Any:
        """The same-host record this handle took (it is gone once the handle is released)."""
        rec = self._fast
        if rec is None:
            raise P2pkvError("request handle used after release", key=self.transfer_id)
        return rec

    def _until(self, cond: Any, deadline: float, what: str) -> None:
        """Spin (then poll) until ``cond()``; raise the request's error or a timeout."""
        if self._state is RecvState.RELEASED:
            raise P2pkvError("request handle used after release", key=self.transfer_id)
        if self._error is not None:
            raise self._error
        if (self._progress() and cond()) or cond():
            if self._error is not None:  # binding it just now found it cannot be taken (e.g. its outs)
                raise self._error
            return
        eng = self._eng
        # a CPU producer copies with the CPU: spinning here would take a core from it
        spin_s = eng._cfg.spin_s if eng._cuda else min(eng._cfg.spin_s, 2e-4)
        plane = eng._fast
        last = time.monotonic()
        spinning = spin_s > 0
        if spinning:
            plane.spin(1)
        try:
            n = 0
            while not cond():
                n += 1
                if spinning and n % _CHECK_EVERY:
                    continue  # spinning: the data is on its way
                now = time.monotonic()
                if self._released():  # by another thread
                    raise P2pkvError("request handle released while waiting", key=self.transfer_id)
                if self._progress():
                    if self._error is not None:
                        raise self._error
                    last = now
                    if not spinning and spin_s > 0:
                        spinning = True
                        plane.spin(1)
                    continue
                err = self._failure()
                if err is not None:
                    self._fail(err)
                    raise err
                if now > deadline:
                    err = TransferTimeout(f"{what} of request {self.transfer_id} did not arrive within the deadline "
                                          f"({self._state.value}{self._missing_note()})", key=self.transfer_id)
                    if deadline >= self.deadline:
                        self._fail(err)
                    raise err
                if spinning and now - last >= spin_s:
                    spinning = False
                    plane.spin(-1)
                    plane.poll()  # one last look: a producer may have skipped our doorbell just now
                if not spinning:
                    time.sleep(_SLEEP_S)
        finally:
            if spinning:
                plane.spin(-1)
        if self._error is not None:  # failed while it landed (bound with outs that do not fit)
            raise self._error

    def _progress(self) -> bool:
        """Read the channels, bind the request, claim arrived tensors; True if anything changed."""
        if self._fast is not None:
            return False  # bound to a same-host record: its flags say the rest
        if self._error is not None:
            return True  # failed (e.g. binding found names the request lacks): take nothing more
        eng = self._eng
        eng._fast_poll()
        changed = False
        if not self._specs:
            changed = self._bind()
            if self._fast is not None or self._error is not None:
                return True
        for name in self._order:
            if name not in self._slots:
                slot = eng._inbox.take_nowait(TransferKey(self.transfer_id, name))
                if slot is not None:
                    self._take(name, slot)
                    changed = True
        return changed

    def _bind(self) -> bool:
        """Learn the request's layout (and take a same-host request at once)."""
        try:
            got = self._eng._rx_take_record(self.transfer_id, self._names)
        except InvalidKey as err:  # names lists a tensor the request does not hold
            self._fail(err)
            return True
        if got is None:
            return False
        rec, taken = got
        from ._engine.fastpath import FastIncoming

        specs = rec.specs
        if isinstance(rec, FastIncoming):
            with self._lock:
                if self._state is RecvState.RELEASED:  # released by another thread meanwhile
                    rec.unref()
                    return False
                self._fast = rec
            idx = rec.layout.index
            self._order = list(taken)
            self._fast_idx = {n: idx[n] for n in taken}
            self._fast_all = len(taken) == rec.layout.n
            for n in taken:
                self._specs[n] = specs[idx[n]]
        else:
            self._offer = rec
            if self._names is None:
                self._order = [s.name for s in specs]
            for s in specs:
                if self._names is None or s.name in self._names:
                    self._specs[s.name] = s
        _trace.mark("rx.header", self.transfer_id)
        with self._lock:
            if self._state is RecvState.RELEASED:
                return False
            self._state = RecvState.ARRIVING
        if self._outs is not None:
            for name, out in self._outs.items():
                spec = self._specs.get(name)
                if spec is None:
                    self._fail(InvalidKey(f"outs names {name!r:.80}, which the request does not hold",
                                          key=self.transfer_id))
                    return True
                try:
                    T.check_out(out, self._eng._device, spec.dtype, spec.shape)
                except InvalidTensor as exc:
                    self._fail(ShapeMismatch(f"outs[{name!r}]: {exc.message}", key=self.transfer_id))
                    return True
        return True

    def _take(self, name: str, slot: Slot) -> None:
        with self._lock:
            if self._state is RecvState.RELEASED:
                slot.buf.release()
                return
            self._slots[name] = slot
            if self._state is RecvState.WAITING:
                self._state = RecvState.ARRIVING

    def _bound(self, name: str) -> bool:
        if name in self._slots or name in self._copied or name in self._fast_idx:
            return True
        if self._specs and name not in self._specs:
            raise InvalidKey(f"{name!r:.80} is not a tensor of this request", key=self.transfer_id)
        return False

    def _landed(self, name: str, fail: bool = True) -> bool:
        """Whether tensor ``name`` is in memory; a broken landing raises (and, with ``fail``, fails the handle)."""
        if name in self._copied:
            return True
        i = self._fast_idx.get(name)
        if i is not None:
            rec = self._fast
            return rec is not None and bool(rec.landed(i))
        slot = self._slots.get(name)
        if slot is None:
            return False
        if slot.ready is None:
            return True
        try:
            return slot.ready()
        except P2pkvError as err:
            if fail:
                self._fail(err)
            raise

    def _missing_note(self) -> str:
        """``"; not arrived: 'x', ..."`` for a timeout message: the tensors still missing, when known."""
        missing = []
        for name in self._order:
            try:
                landed = self._landed(name, fail=False)
            except P2pkvError:
                landed = False
            if not landed:
                missing.append(name)
        if missing:
            return f"; not arrived: {names_note(missing)}"
        if not self._order:  # no layout came for this handle: say what the inbox holds of the transfer
            loose = sorted(self._eng._inbox.names_of(self.transfer_id))
            if loose:
                return (f"; no request layout came for it, but {len(loose)} tensor(s) of this transfer are "
                        f"waiting as single tensors ({names_note(loose)}): take them with recv(key) or "
                        f"recv_request(transfer_id, names=[...])")
        return ""

    def _complete(self) -> bool:
        if self._fast_all:
            rec = self._fast
            return rec is not None and bool(rec.all_landed())
        if not self._order:
            return False
        return all(self._landed(name) for name in self._order)

    def _view(self, name: str) -> torch.Tensor:
        v = self._views.get(name)
        if v is None:
            i = self._fast_idx.get(name)
            if i is not None:
                v = self._record().view(i)
            else:
                slot = self._slots.get(name)
                if slot is None:
                    raise P2pkvError("request handle used after release", key=self.transfer_id)
                v = slot.tensor()
            self._views[name] = v
        return v

    def _failure(self) -> P2pkvError | None:
        """Why the request cannot complete, if it cannot."""
        eng = self._eng
        if eng._closed:
            return EngineClosed(f"engine {eng.address} closed while waiting", key=self.transfer_id)
        rec = self._fast
        if rec is not None:
            err = rec.failed() or eng._inbox.tid_error(self.transfer_id)
            if err is None and time.monotonic() > rec.deadline and not self._complete():
                err = rec.error = TransferTimeout("the producer's deadline passed before every tensor landed",
                                                  key=self.transfer_id)
            return err
        if not self._order:
            return eng._inbox.tid_error(self.transfer_id)
        for name in self._order:
            err = eng._inbox.error_for(TransferKey(self.transfer_id, name))
            if err is not None and (name not in self._slots or isinstance(err, TransferAborted)):
                return err
        return None

    def _copy_out(self, names: list[str], stream: torch.cuda.Stream | None) -> None:
        """Copy landed tensors into their ``outs`` (one batched launch on CUDA); free the slots they came in."""
        outs = self._outs
        assert outs is not None
        todo = [n for n in names if n in outs and n not in self._copied]
        if not todo:
            return
        eng = self._eng
        dev = eng._device
        srcs = [self._view(n) for n in todo]
        if dev.type == "cuda":
            from .kernels.batch import copier_for

            s = stream if stream is not None else torch.cuda.current_stream(dev)
            copier_for(dev).copy([(v.data_ptr(), outs[n].data_ptr(), v.numel() * v.element_size())
                                  for n, v in zip(todo, srcs, strict=True)], s)
            with torch.cuda.stream(s):
                for n in todo:
                    slot = self._slots.pop(n, None)
                    if slot is not None:
                        eng._release_after_caller(slot.buf)
        else:
            for n, v in zip(todo, srcs, strict=True):
                outs[n].copy_(v)
                slot = self._slots.pop(n, None)
                if slot is not None:
                    slot.buf.release()
        for n in todo:
            self._views.pop(n, None)
        self._copied.update(todo)


def validate_names(transfer_id: str, names: Any) -> list[str] | None:
    """Check the optional list of tensor names of :meth:`Engine.recv_request`."""
    validate_transfer_id(transfer_id)
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise InvalidKey("names must be a non-empty list of tensor names", key=transfer_id)
    out = []
    for n in names:
        TransferKey(transfer_id, n)
        out.append(n)
    if len(set(out)) != len(out):
        raise InvalidKey("names lists a tensor twice", key=transfer_id)
    return out
