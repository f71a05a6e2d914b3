"""Engine configuration: one frozen, self-validating dataclass.

Build it directly, from a plain dict (the shape of vLLM's
``kv_connector_extra_config``) with :meth:`EngineConfig.from_dict`, or from
``P2PKV_*`` environment variables with :meth:`EngineConfig.from_env`.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError

log = logging.getLogger("p2pkv")

__all__ = ["MAX_TIMEOUT_S", "EngineConfig", "parse_size", "pool_memory_error"]

MAX_TIMEOUT_S = 1e6  # about 11.6 days: a longer deadline is a bug (and overflows the OS's timers)

_TRANSPORTS = ("auto", "tcp", "ipc", "nccl", "shm")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(value: Any, what: str = "size") -> int:
    """Parse ``1024``, ``"64MiB"``, ``"1.5GB"`` into a byte count."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a byte count, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ConfigError(f"{what} must be a byte count such as 1048576 or '64MiB', got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one :class:`~p2pkv.Engine`.

    Attributes
    ----------
    host, port:
        Where the engine's control socket listens. ``port=0`` picks a free port.
    advertise_host:
        Host name peers should use to reach this engine (default: ``host``, or
        ``127.0.0.1`` when ``host`` is ``0.0.0.0``).
    device:
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``: where received tensors and the
        buffer pool live.
    timeout_s:
        Default deadline of every wait (recv, pull, send completion, handshake).
    peer_timeout_s:
        A peer silent for this long is declared lost; its pending transfers fail
        with :class:`~p2pkv.PeerLost`. Must be <= ``timeout_s``; default
        ``min(5, timeout_s)``. A closed TCP connection is noticed at once.
    heartbeat_s:
        Interval of liveness pings to connected peers; default
        ``min(0.5, peer_timeout_s / 4)``.
    ttl_s:
        Unclaimed received or published data is evicted after this long.
    pool_bytes:
        Size of the receive/publish buffer pool (one arena on ``device``).
    credit_bytes:
        The most pool bytes one sending peer may hold in flight (its credit
        window); 0 (default) means ``pool_bytes // 2``.
    pinned_bytes:
        Size of a pinned host staging tier for GPU tensors sent over TCP
        (0 disables; staging then uses pageable memory).
    max_message_bytes:
        Largest tensor accepted in one message; larger frames are refused.
    auth_token:
        Optional shared secret; peers that do not present it are refused in the
        ZMQ handshake (ZMQ PLAIN mechanism: the token travels in clear text, so
        use it on trusted networks only). PLAIN does not authenticate the server:
        the engine hands the token to every address it dials, so any server it is
        made to dial learns it. Beyond one trusted host use CURVE
        (``curve_secret_key``; see docs/security.md). Never shown by ``repr``.
    curve_secret_key:
        This engine's ZMQ CURVE secret key (Z85, 40 characters; make a pair with
        ``zmq.curve_keypair()``). Turns on the strong mode: every connection is
        authenticated at both ends and encrypted (CurveZMQ). Never shown by ``repr``.
    curve_server_key:
        The CURVE public key of the engines this one dials (default: this
        engine's own public key, i.e. one key pair shared by the cluster).
    curve_allowed_keys:
        CURVE public keys of the clients allowed to connect (a list, or a
        comma-separated str); default: this engine's own public key.
    max_pending_connections:
        The most TCP connections into this engine opened within the handshake
        interval (``min(peer_timeout_s, 5)``: those not yet authenticated are among
        them); newer ones beyond it are shut down at once. Bounds the descriptors
        an unauthenticated flood of idle connections can take.
    max_sessions_per_peer:
        The most sessions (connections whose ``hello`` was taken) one peer may
        hold with this engine at once; a further ``hello`` is refused with
        :class:`~p2pkv.errors.SessionRefused`. A peer is a remote address and, with
        CURVE, the client key it authenticated with: engines on one host count
        together. The sessions of one peer also share one share (20%) of this
        engine's I/O thread for their requests.
    transport:
        ``"auto"`` (CUDA IPC on one host, NCCL across, TCP for CPU tensors),
        or force ``"tcp"``, ``"ipc"`` or ``"nccl"``. ``"shm"`` (CPU engines):
        the pool lives in shared memory and whole requests between engines of
        one host take the same-host fast path (TCP otherwise).
    spin_s:
        How long a waiting ``recv_request`` handle spins on the CPU after the
        last sign of progress before it polls every ~0.1 ms instead (0 never
        spins). Spinning is what lets a consumer notice a landing within
        microseconds; it costs one core only while data is arriving.
    nccl_init_timeout_s, nccl_min_ctas, nccl_max_ctas, nccl_buffsize:
        NCCL communicator settings (``ncclConfig_t`` fields / ``NCCL_BUFFSIZE``);
        0 leaves NCCL's default.
    eager_requests:
        Let a whole request (:meth:`~p2pkv.Engine.send_request`) over NCCL or TCP
        move before its grant when the receiver has already granted this
        engine enough credit (pool room reserved for it): the offer/grant round
        trip then leaves the critical path. ``False`` always waits for the grant.
    """

    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    device: str = "cpu"
    timeout_s: float = 30.0
    peer_timeout_s: float | None = None
    heartbeat_s: float | None = None
    ttl_s: float = 120.0
    pool_bytes: int = 512 * 2**20
    credit_bytes: int = 0
    pinned_bytes: int = 0
    max_message_bytes: int = 2**31
    auth_token: str | None = dataclasses.field(default=None, repr=False)
    max_pending_connections: int = 256
    max_sessions_per_peer: int = 64
    curve_secret_key: str | None = dataclasses.field(default=None, repr=False)
    curve_server_key: str | None = None
    curve_allowed_keys: tuple[str, ...] | None = None
    transport: str = "auto"
    nccl_init_timeout_s: float = 30.0
    nccl_min_ctas: int = 0
    nccl_max_ctas: int = 0
    nccl_buffsize: int = 0
    eager_requests: bool = True
    spin_s: float = 0.02

    def __new__(cls, *args: Any, **kwargs: Any) -> EngineConfig:
        # Before the generated __init__ binds the arguments: a misspelt or extra one is a ConfigError
        # naming it (as from_dict does), not a bare TypeError.
        names = cls.field_names()
        unknown = sorted(k for k in kwargs if k not in names)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys are {list(names)}")
        if len(args) > len(names):
            raise ConfigError(f"EngineConfig takes at most {len(names)} positional settings, got {len(args)}")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        set_ = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731
        if not isinstance(self.host, str) or not self.host or any(c in self.host for c in " /\t\n"):
            raise ConfigError(f"host must be a host name or IP address, got {self.host!r}")
        if self.advertise_host is not None and (not isinstance(self.advertise_host, str) or not self.advertise_host):
            raise ConfigError(f"advertise_host must be a non-empty str or None, got {self.advertise_host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be an int in 0..65535, got {self.port!r}")
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for name in ("timeout_s", "peer_timeout_s", "heartbeat_s", "ttl_s", "nccl_init_timeout_s"):
            v = getattr(self, name)
            if v is None and name in ("peer_timeout_s", "heartbeat_s"):
                continue  # derived: see the effective_* properties
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= MAX_TIMEOUT_S:
                raise ConfigError(f"{name} must be a positive number of seconds, at most 1e6 (about 11.6 days), "
                                  f"got {v!r}")
            set_(name, float(v))
        if self.effective_heartbeat_s >= self.effective_peer_timeout_s:
            raise ConfigError(f"heartbeat_s ({self.effective_heartbeat_s}) must be smaller than peer_timeout_s "
                              f"({self.effective_peer_timeout_s})")
        if self.effective_peer_timeout_s > self.timeout_s:
            raise ConfigError(f"peer_timeout_s ({self.peer_timeout_s}) must not exceed timeout_s ({self.timeout_s}): "
                              "a lost peer must be detected within the wait deadline")
        for name in ("pool_bytes", "credit_bytes", "pinned_bytes", "max_message_bytes", "nccl_buffsize"):
            v = parse_size(getattr(self, name), name)
            if v < 0:
                raise ConfigError(f"{name} must be >= 0, got {v}")
            set_(name, v)
        if self.pool_bytes <= 0:
            raise ConfigError(f"pool_bytes must be > 0, got {self.pool_bytes}")
        if self.max_message_bytes <= 0:
            raise ConfigError(f"max_message_bytes must be > 0, got {self.max_message_bytes}")
        if self.credit_bytes > self.pool_bytes:
            raise ConfigError(f"credit_bytes ({self.credit_bytes}) must not exceed pool_bytes ({self.pool_bytes})")
        if self.auth_token is not None and (not isinstance(self.auth_token, str) or not self.auth_token):
            raise ConfigError("auth_token must be a non-empty str or None")
        if self.transport not in _TRANSPORTS:
            raise ConfigError(f"transport must be one of {_TRANSPORTS}, got {self.transport!r}")
        if isinstance(self.spin_s, bool) or not isinstance(self.spin_s, (int, float)) or not 0 <= self.spin_s <= 1:
            raise ConfigError(f"spin_s must be a number of seconds in 0..1, got {self.spin_s!r}")
        if not isinstance(self.eager_requests, bool):
            raise ConfigError(f"eager_requests must be True or False, got {self.eager_requests!r}")
        if isinstance(self.max_pending_connections, bool) or not isinstance(self.max_pending_connections, int) \
                or self.max_pending_connections < 1:
            raise ConfigError(f"max_pending_connections must be an int >= 1, got {self.max_pending_connections!r}")
        if isinstance(self.max_sessions_per_peer, bool) or not isinstance(self.max_sessions_per_peer, int) \
                or self.max_sessions_per_peer < 1:
            raise ConfigError(f"max_sessions_per_peer must be an int >= 1, got {self.max_sessions_per_peer!r}")
        self._check_curve(set_)
        for name in ("nccl_min_ctas", "nccl_max_ctas"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be an int >= 0, got {v!r}")

    def _check_curve(self, set_: Any) -> None:
        def key(v: Any, name: str) -> str:
            if not isinstance(v, str) or len(v) != 40:
                raise ConfigError(f"{name} must be a Z85-encoded CURVE key of 40 characters")
            try:
                from zmq.utils import z85

                if len(z85.decode(v)) != 32:
                    raise ValueError
            except Exception:
                raise ConfigError(f"{name} is not a valid Z85-encoded CURVE key") from None
            return v

        if self.curve_secret_key is None:
            if self.curve_server_key is not None or self.curve_allowed_keys is not None:
                raise ConfigError("curve_server_key / curve_allowed_keys need curve_secret_key")
            return
        import zmq

        if not zmq.has("curve"):
            raise ConfigError("curve_secret_key is set but this libzmq has no CURVE support")
        key(self.curve_secret_key, "curve_secret_key")
        if self.curve_server_key is not None:
            key(self.curve_server_key, "curve_server_key")
        allowed = self.curve_allowed_keys
        if isinstance(allowed, str):
            allowed = [k.strip() for k in allowed.split(",") if k.strip()]
        if allowed is not None:
            if not isinstance(allowed, (list, tuple)) or not allowed:
                raise ConfigError("curve_allowed_keys must be a non-empty list of public keys")
            set_("curve_allowed_keys", tuple(key(k, "curve_allowed_keys entry") for k in allowed))

    @property
    def curve_public_key(self) -> str | None:
        """This engine's CURVE public key (derived from ``curve_secret_key``), or None."""
        if self.curve_secret_key is None:
            return None
        import zmq

        return zmq.curve_public(self.curve_secret_key.encode()).decode()

    # ------------------------------------------------------------------ derived values
    @property
    def effective_peer_timeout_s(self) -> float:
        return min(5.0, self.timeout_s) if self.peer_timeout_s is None else self.peer_timeout_s

    @property
    def effective_heartbeat_s(self) -> float:
        return min(0.5, self.effective_peer_timeout_s / 4) if self.heartbeat_s is None else self.heartbeat_s

    @property
    def effective_credit_bytes(self) -> int:
        return self.credit_bytes or max(1, self.pool_bytes // 2)

    # ------------------------------------------------------------------ builders
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None = None, **overrides: Any) -> EngineConfig:
        """Build from a plain mapping; unknown keys raise :class:`ConfigError`.

        String values are converted to the field's type, so the same mapping
        can come from JSON, CLI flags or environment variables.
        """
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
        merged = dict(data or {})
        merged.update(overrides)
        known = cls.field_names()
        unknown = sorted(k for k in merged if k not in known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys are {list(known)}")
        types = {f.name: f.type for f in fields(cls)}
        kwargs = {k: _coerce(k, v, str(types[k])) for k, v in merged.items()}
        return cls(**kwargs)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, prefix: str = "P2PKV_",
                 **overrides: Any) -> EngineConfig:
        """Build from ``P2PKV_<FIELD>`` variables (e.g. ``P2PKV_TIMEOUT_S=5``)."""
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        names = cls.field_names()
        for name in names:
            key = prefix + name.upper()
            if key in env:
                data[name] = env[key]
        # A misspelt variable (P2PKV_TIMEOUT for P2PKV_TIMEOUT_S) would be ignored without a word. Other
        # P2PKV_* variables (the proxy's, SGLang's, CI's) are no setting of the engine, so only a near-miss
        # of a setting's name is reported.
        for key in env:
            name = key[len(prefix):].lower()
            if key.startswith(prefix) and name not in names:
                near = [n for n in (name + "_s", name + "_bytes") if n in names] \
                    or difflib.get_close_matches(name, names, n=1, cutoff=0.8)
                if near:
                    log.warning("%s is not an engine setting and is ignored; did you mean %s%s?", key, prefix,
                                near[0].upper())
        data.update(overrides)
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for secret in ("auth_token", "curve_secret_key"):
            if d.get(secret):
                d[secret] = "***"
        return d


def _coerce(name: str, value: Any, typ: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if typ.startswith("int"):
            return parse_size(value, name) if name.endswith("bytes") or name == "nccl_buffsize" else int(value)
        if typ.startswith("float"):
            return float(value)
        if typ.startswith("bool"):
            if value.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if value.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if "None" in typ and value.lower() in ("", "none", "null"):
            return None
    except ValueError as exc:
        raise ConfigError(f"{name}: cannot convert {value!r} to {typ.split(' ')[0]}") from exc
    return value


def pool_memory_error(pool_bytes: int, device: Any, exc: BaseException) -> ConfigError | None:
    """The :class:`ConfigError` for a pool of ``pool_bytes`` that ``device`` could not allocate
    (``exc``: what the allocator raised), naming the size and what is free; ``None`` when ``exc``
    is not an out-of-memory failure (the caller re-raises it)."""
    text = str(exc)
    if not (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "out of memory" in text.lower() or "can't allocate memory" in text.lower()):
        return None
    free = _free_bytes(device)
    cuda = str(device).startswith("cuda")
    where = "" if free is None else f"; {free / 1e9:.1f} GB {f'free on {device}' if cuda else 'of memory available'}"
    return ConfigError(f"pool_bytes={pool_bytes} ({pool_bytes / 1e9:.1f} GB) cannot be allocated on {device}{where}: "
                       "lower pool_bytes")


def _free_bytes(device: Any) -> int | None:
    try:
        if str(device).startswith("cuda"):
            import torch

            return int(torch.cuda.mem_get_info(device)[0])
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except Exception:
        pass
    return None
