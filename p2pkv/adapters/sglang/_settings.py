"""Deadlines and buffer placement of the SGLang backend (:class:`SglangSettings`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ...errors import ConfigError

__all__ = ["SglangSettings"]


def _env_float(environ: Mapping[str, str], names: Sequence[str], default: float) -> float:
    for name in names:
        raw = environ.get(name)
        if raw is not None and raw != "":
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a number") from None
            if not 0 < value < 1e6:
                raise ConfigError(f"{name}={raw!r} must be > 0 and < 1e6 seconds")
            return value
    return default


@dataclass(frozen=True)
class SglangSettings:
    """Deadlines and buffer placement of the SGLang backend.

    Parameters
    ----------
    bootstrap_timeout_s:
        Longest wait for the bootstrap lookup (decode) and for every decode
        rank's metadata (prefill).
    waiting_timeout_s:
        Longest wait for the scheduler's first ``send``/``send_metadata``
        after ``init`` and for the next chunk of a chunked prefill.
    http_timeout_s:
        Deadline of one HTTP call to the bootstrap server.
    register_warn_s:
        A prefill rank that could not register with the bootstrap server for
        this long logs a warning (and keeps trying in the background).
    buffer_device:
        ``auto`` (CUDA when available), ``cuda`` or ``cpu``: where the raw
        ``KVArgs`` pointers live.

    Raises
    ------
    ConfigError
        A value is out of range.
    """

    bootstrap_timeout_s: float = 300.0
    waiting_timeout_s: float = 300.0
    http_timeout_s: float = 2.0
    register_warn_s: float = 15.0
    buffer_device: str = "auto"

    def __post_init__(self) -> None:
        for f in ("bootstrap_timeout_s", "waiting_timeout_s", "http_timeout_s", "register_warn_s"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e6:
                raise ConfigError(f"SglangSettings.{f} must be a number of seconds in (0, 1e6), got {v!r}")
        if self.buffer_device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"SglangSettings.buffer_device must be auto, cuda or cpu, got {self.buffer_device!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SglangSettings:
        """Read ``P2PKV_SGLANG_BOOTSTRAP_TIMEOUT_S`` (else SGLang's
        ``SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT``), ``P2PKV_SGLANG_WAITING_TIMEOUT_S``
        (else ``SGLANG_DISAGGREGATION_WAITING_TIMEOUT``), ``P2PKV_SGLANG_HTTP_TIMEOUT_S``,
        ``P2PKV_SGLANG_REGISTER_WARN_S`` and ``P2PKV_SGLANG_BUFFER_DEVICE``.

        Raises
        ------
        ConfigError
        """
        env = os.environ if environ is None else environ
        return cls(
            bootstrap_timeout_s=_env_float(env, ("P2PKV_SGLANG_BOOTSTRAP_TIMEOUT_S",
                                                 "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT"), 300.0),
            waiting_timeout_s=_env_float(env, ("P2PKV_SGLANG_WAITING_TIMEOUT_S",
                                               "SGLANG_DISAGGREGATION_WAITING_TIMEOUT"), 300.0),
            http_timeout_s=_env_float(env, ("P2PKV_SGLANG_HTTP_TIMEOUT_S",), 2.0),
            register_warn_s=_env_float(env, ("P2PKV_SGLANG_REGISTER_WARN_S",), 15.0),
            buffer_device=env.get("P2PKV_SGLANG_BUFFER_DEVICE", "auto") or "auto",
        )
