"""The state that the parts of the engine share, declared once (types only; set in ``Engine.__init__``)."""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    import zmq

    from ..config import EngineConfig
    from .fastplane import FastPlane
    from .regions import Regions
    from ..mailbox import Mailbox
    from ..pool import Buffer, BufferPool
    from ..request import Incoming
    from ..stats import Stats
    from .pull import _ParkedPulls
    from .state import _Peer, _Session


class _EngineBase:
    """Attributes of :class:`p2pkv.Engine` used across its parts."""

    # configuration and identity
    _cfg: EngineConfig
    _device: torch.device
    _cuda: bool
    eid: str
    address: str
    port: int
    _host: str
    _closed: bool
    _stats: Stats
    # memory
    _pool: BufferPool
    _pinned: BufferPool | None
    _arena_owner: Any
    _inbox: Mailbox
    _outbox: Mailbox
    _scratch: torch.Tensor | None
    # sockets and the loop
    _ctx: zmq.Context
    _router: zmq.Socket
    _poller: zmq.Poller
    _thread: threading.Thread | None
    _cmds: deque[tuple]
    _wake_r: int
    _wake_w: int
    _wake_sent: bool
    _mem_dirty: bool
    _want_mem: bool
    _starved_t: float  # when credit or an offer last waited for pool room (idle credit is then revoked)
    _io_admit_s: float  # I/O-thread time _admit charged to the sessions it admitted for (see _IO_SHARE)
    _next_expire: float
    _next_tick: float
    # peers we dial, sessions of peers that dial us
    _peers: dict[str, _Peer]
    _peer_by_sock: dict[zmq.Socket, _Peer]
    _peer_by_mon: dict[zmq.Socket, _Peer]
    _sessions: dict[bytes, _Session]
    _parked: _ParkedPulls  # (a property of _PullPath; Engine.__init__ assigns a list, converted)
    _pending_acks: dict[bytes, list[int]]
    _tracked: list[tuple[zmq.MessageTracker, Buffer]]
    _lent: dict[tuple[bytes, int], tuple[Buffer, float]]
    _retry_parked: bool
    # whole requests coming in
    _incoming: dict[tuple[bytes, int], Incoming]
    _incoming_keys: set
    # GPU plane
    _ipc_handle: bytes | None
    _nccl_ok: bool
    _completer: Any
    _copy_stream: Any
    _loop_comm: Any
    _release_watcher: Any
    # the same-host fast path (leases, channels, doorbell, the request index)
    _fast: FastPlane
    _regions: Regions
    _shm_arena: torch.Tensor | None
    _shm_loc: dict[str, Any] | None
    _shm_fd: int
