"""NCCL transport: p2pkv's own communicator manager.

Binding: NVIDIA's ``nccl4py`` (PyPI ``nccl4py``, module ``nccl.core``), imported
lazily. It is chosen over CuPy's ``cupy.cuda.nccl`` because it offers
*non-blocking* initialisation (``NCCLConfig(blocking=False)``), async-error
polling and ``abort()`` — together they let p2pkv put a deadline on
communicator set-up and tear down a communicator whose peer vanished, which a
blocking ``ncclCommInitRank`` cannot do (it would hang the caller until the
peer joins). The hot path (``ncclSend``/``ncclRecv`` on raw pointers) goes
through nccl4py's low-level ``nccl.bindings.nccl`` to keep per-layer host cost
small.

Blocking vs non-blocking: the communicator is *created* non-blocking (so set-up
has a deadline), then split once into a blocking child that carries the data:
on a non-blocking communicator every ``ncclSend``/``ncclRecv`` may return
``ncclInProgress`` with its kernel not yet enqueued, and waiting for that on
every layer cost about 100 us of host time per operation on an H100; the
blocking child enqueues synchronously. If the split is refused, the parent is
used and each operation is settled before it counts as issued.

Each :class:`Comm` joins exactly two engines (or one engine with itself, one
rank) and carries traffic in ONE direction: a push communicator (the
connecting engine sends) and a pull communicator (the listening engine sends)
are separate, so two engines pushing to each other can never deadlock on
interleaved sends. Operations are issued on each side in the order of the
control messages that announce them (the sender's sequence numbers), which
is the order NCCL requires.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from typing import Any

import torch

from ..errors import TransportError

log = logging.getLogger("p2pkv")

__all__ = ["nccl_available", "new_unique_id", "Comm", "CommState", "nccl_version"]


class CommState(str, enum.Enum):
    """Life of a :class:`Comm`: INIT -> READY, or FAILED; CLOSED after abort/destroy.

    A ``str`` enum, so a state compares equal to its lower-case name.
    """

    INIT = "init"        # non-blocking init (or the split into the data communicator) in progress
    READY = "ready"      # both ranks joined: operations may be posted
    FAILED = "failed"    # init failed, missed its deadline, or an operation failed (see Comm.error)
    CLOSED = "closed"    # aborted or destroyed locally


def nccl_available() -> bool:
    try:
        import nccl.core  # noqa: F401
    except Exception:
        return False
    return True


def nccl_version() -> str:
    try:
        import nccl.core as nc

        return str(nc.get_version())
    except Exception as exc:  # pragma: no cover
        return f"unavailable ({exc})"


def new_unique_id() -> bytes:
    import nccl.core as nc

    return bytes(nc.get_unique_id())


class Comm:
    """One NCCL communicator (2 ranks, or 1 rank for an engine talking to itself).

    Created non-blocking: :meth:`poll` reports ``"init"`` until both ranks have
    joined, then ``"ready"``; a failure or a missed ``deadline`` aborts it
    (``"failed"``, with :attr:`error`).
    """

    def __init__(self, nranks: int, rank: int, uid: bytes, device: torch.device, *, deadline: float,
                 min_ctas: int = 0, max_ctas: int = 0, buffsize: int = 0):
        import nccl.core as nc
        from nccl.bindings import nccl as nb

        if nranks not in (1, 2) or not 0 <= rank < nranks:
            raise TransportError(f"bad NCCL rank {rank} of {nranks}")
        self._nc = nc
        self._nb = nb
        self.nranks = nranks
        self.rank = rank
        self.peer = 0 if nranks == 1 else 1 - rank
        self.device = device
        self.deadline = deadline
        self.state = CommState.INIT
        self.error: str | None = None
        self.stream = torch.cuda.Stream(device)
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # p2p never needs NVLink multicast
        if buffsize:
            os.environ["NCCL_BUFFSIZE"] = str(buffsize)
        cfg: dict[str, Any] = {"blocking": False}
        if min_ctas:
            cfg["min_ctas"] = min_ctas
        if max_ctas:
            cfg["max_ctas"] = max_ctas
        try:
            torch.cuda.set_device(device)
            uid_obj = nc.UniqueId.from_bytes(uid)
            self.comm = nc.Communicator.init(nranks, rank, uid_obj, config=nc.NCCLConfig(**cfg))
        except Exception as exc:
            self.state = CommState.FAILED
            self.error = f"NCCL init failed: {exc}"
            self.comm = None
            raise TransportError(self.error) from None
        self.child: Any = None
        self._data: Any = None   # the communicator carrying data (blocking child, or the parent)
        self._raw: Any = None
        self._needs_settle = True
        self._uint8 = int(nc.UINT8)
        self.poll()

    # ------------------------------------------------------------------ state
    def poll(self) -> CommState:
        """Advance initialisation; returns the state (``init``, ``ready``, ``failed`` or ``closed``)."""
        if self.state is not CommState.INIT:
            return self.state
        try:
            res = self.comm.get_async_error()
            if res == self._nb.Result.Success and self.child is not None:
                res = self.child.get_async_error()
        except Exception as exc:
            self._fail(f"NCCL error while initialising: {exc}")
            return self.state
        if res == self._nb.Result.Success:
            if self.child is None:
                self._start_split()
            else:
                self._use(self.child, settle=False)
        elif res == self._nb.Result.InProgress:
            if time.monotonic() > self.deadline:
                self._fail("NCCL communicator init timed out: the peer never joined")
        else:
            self._fail(f"NCCL init failed: {res!r}")
        return self.state

    def _start_split(self) -> None:
        """Both ranks split the ready parent into a blocking child (a collective call)."""
        try:
            self.child = self.comm.split(color=0, key=self.rank, config=self._nc.NCCLConfig(blocking=True))
        except Exception as exc:  # pragma: no cover - depends on the NCCL build
            log.info("NCCL split into a blocking communicator refused (%s); using the non-blocking one", exc)
            self.child = None
            self._use(self.comm, settle=True)

    def _use(self, comm: Any, settle: bool) -> None:
        self._data = comm
        self._raw = getattr(comm, "_comm", None)
        self._needs_settle = settle
        self.state = CommState.READY

    def _fail(self, msg: str) -> None:
        self.error = msg
        self.state = CommState.FAILED
        self.abort()

    def _settle(self, what: str, timeout: float = 10.0) -> None:
        """Non-blocking comms may answer ncclInProgress; wait until the call has settled."""
        end = time.monotonic() + timeout
        while True:
            res = self._data.get_async_error()
            if res == self._nb.Result.Success:
                return
            if res != self._nb.Result.InProgress:
                raise TransportError(f"NCCL {what} failed: {res!r}")
            if time.monotonic() > end:
                raise TransportError(f"NCCL {what} did not settle within {timeout}s")
            time.sleep(0)

    # ------------------------------------------------------------------ data
    def _check_ready(self) -> None:
        if self.state is not CommState.READY:
            raise TransportError(f"NCCL communicator is {self.state.value}" + (f": {self.error}" if self.error else ""))

    def _op(self, fn: Any, t: torch.Tensor, stream: torch.cuda.Stream) -> None:
        n = t.numel() * t.element_size()
        if self._raw is not None:
            fn(t.data_ptr(), n, self._uint8, self.peer, self._raw, stream.cuda_stream)
        else:  # pragma: no cover - other nccl4py layouts
            name = "send" if fn is self._nb.send else "recv"
            getattr(self._data, name)(t.view(torch.uint8).reshape(-1), self.peer, stream=stream.cuda_stream)

    def _run(self, what: str, ops: list[tuple[Any, torch.Tensor]], stream: torch.cuda.Stream | None) -> None:
        self._check_ready()
        s = stream or self.stream
        try:
            if len(ops) > 1:
                self._nb.group_start()
                try:
                    for fn, t in ops:
                        self._op(fn, t, s)
                finally:
                    self._nb.group_end()
            else:
                self._op(ops[0][0], ops[0][1], s)
        except TransportError:
            raise
        except Exception as exc:
            if "InProgress" not in repr(exc):
                self._fail(f"NCCL {what} failed: {exc}")
                raise TransportError(self.error or f"NCCL {what} failed: {exc}") from None
        if self._needs_settle:
            self._settle(what)

    def send(self, t: torch.Tensor, stream: torch.cuda.Stream | None = None) -> None:
        """Post a send of ``t``'s bytes to the peer on ``stream`` (default: this comm's)."""
        self._run("send", [(self._nb.send, t)], stream)

    def recv(self, t: torch.Tensor, stream: torch.cuda.Stream | None = None) -> None:
        self._run("recv", [(self._nb.recv, t)], stream)

    def send_recv(self, src: torch.Tensor, dst: torch.Tensor, stream: torch.cuda.Stream | None = None) -> None:
        """Grouped send + recv (the only legal way for a one-rank communicator to send to itself)."""
        self._run("send/recv", [(self._nb.send, src), (self._nb.recv, dst)], stream)

    # ------------------------------------------------------------------ teardown
    def abort(self) -> None:
        """Local, immediate and idempotent: in-flight operations are terminated."""
        comms = [c for c in (self.child, self.comm) if c is not None]
        self.child = self.comm = self._data = self._raw = None
        if self.state is not CommState.FAILED:
            self.state = CommState.CLOSED
        for comm in comms:
            try:
                comm.abort()
            except Exception as exc:  # pragma: no cover
                log.warning("NCCL abort failed: %s", exc)

    def destroy(self) -> None:
        """Orderly teardown (collective for 2 ranks: both sides must call it); prefer abort on errors."""
        comms = [c for c in (self.child, self.comm) if c is not None]
        self.child = self.comm = self._data = self._raw = None
        self.state = CommState.CLOSED
        for comm in comms:
            try:
                comm.destroy()
            except Exception as exc:  # pragma: no cover
                log.warning("NCCL destroy failed: %s", exc)

    def __repr__(self) -> str:
        return f"<NCCL Comm rank {self.rank}/{self.nranks} {self.state.value} on {self.device}>"
