"""The proxy's instance registry and the checks on what registrants and instances send.

Every check raises a typed ``p2pkv.errors`` exception with a message fit for a 400
(``ConfigError``, ``InvalidAddress``) or 409 (``RegistrationConflict``) answer, or
``UpstreamError`` (502) for an instance's reply. ``p2pkv.proxy`` re-exports the public names.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError, InvalidAddress, P2pkvError

log = logging.getLogger("p2pkv.proxy")

__all__ = ["ROLES", "Instance", "RegistrationConflict", "Registry", "UpstreamError", "normalize_url",
           "parse_host_port", "passed_params"]

ROLES = ("prefill", "decode")
#: Keys of the prefill engine's ``kv_transfer_params`` passed on to the decode request, with
#: their checks; anything else is dropped (an instance cannot smuggle fields to another one).
_PASSED_PARAMS = ("remote_host", "remote_port", "remote_tp_size", "mode", "remote_block_size", "decode_tp_size",
                  "remote_block_ids")
_MAX_BLOCK_IDS = 1 << 20  # as many producer block ids as the vLLM connector takes (mode 'read')
_MAX_BLOCK_SIZE = 1 << 16

_PORT_RE = re.compile(r"[0-9]{1,5}", re.ASCII)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}\.?$){_LABEL}(?:\.{_LABEL})*\.?", re.ASCII)
_PATH_RE = re.compile(r"[A-Za-z0-9._~/-]*", re.ASCII)


class RegistrationConflict(P2pkvError):
    """A registration that would change an existing instance's role or p2pkv address."""


# ------------------------------------------------------------------ validation
def _check_host(host: Any, what: str) -> str:
    """Return ``host`` (an IP address or a DNS name, lower-cased) or raise ``InvalidAddress``."""
    if not isinstance(host, str) or not host:
        raise InvalidAddress(f"{what}: the host must be a non-empty string, got {host!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME_RE.fullmatch(host):
            raise InvalidAddress(f"{what}: {host!r} is neither an IP address nor a DNS host name") from None
        return host.lower().rstrip(".")
    if ip.is_unspecified or ip.is_multicast:
        raise InvalidAddress(f"{what}: {host!r} is not an address one can connect to")
    return str(ip)


def _check_port(port: Any, what: str) -> int:
    """Return ``port`` as an int in 1..65535; strings must be ASCII digits (``"²"`` is refused)."""
    if isinstance(port, str):
        if not _PORT_RE.fullmatch(port):
            raise InvalidAddress(f"{what}: the port must be 1 to 5 ASCII digits, got {port!r}")
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidAddress(f"{what}: the port must be an integer in 1..65535, got {port!r}")
    return port


def parse_host_port(spec: Any, what: str = "p2pkv address") -> tuple[str, int]:
    """Parse ``"host:port"`` or ``"[ipv6]:port"``.

    Parameters
    ----------
    spec : Any
        The address, as a registrant sent it.
    what : str
        What the address is, for the error message.

    Returns
    -------
    tuple[str, int]
        The host (IPv6 without brackets) and the port.

    Raises
    ------
    InvalidAddress
        ``spec`` is not a string, the host is not an IP address or DNS name (or is
        ``0.0.0.0``/``::``), or the port is not an integer in 1..65535.
    """
    if not isinstance(spec, str) or len(spec) > 300 or not spec.isascii():
        raise InvalidAddress(f"{what} must be an ASCII string 'host:port', got {spec!r}")
    if spec.startswith("["):
        host, sep, port = spec[1:].partition("]:")
        if not sep or ":" not in host:
            raise InvalidAddress(f"{what} must be '[ipv6]:port', got {spec!r}")
    else:
        host, sep, port = spec.rpartition(":")
        if not sep or ":" in host:
            raise InvalidAddress(f"{what} must be 'host:port' (IPv6 in brackets), got {spec!r}")
    return _check_host(host, what), _check_port(port, what)


def format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def normalize_url(url: Any) -> str:
    """Check an instance's base URL and return it as ``scheme://host:port[/path]``.

    Raises
    ------
    InvalidAddress
        Not an ``http``/``https`` URL with a valid host and port, or it has user
        info, a query, a fragment or an odd path.
    """
    if not isinstance(url, str) or len(url) > 2048 or not url.isascii():
        raise InvalidAddress(f"url must be an ASCII http(s) URL, got {url!r}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise InvalidAddress(f"url {url!r} cannot be parsed: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidAddress(f"url must be an http(s) URL, got {url!r}")
    if "@" in parts.netloc or parts.query or parts.fragment or url.endswith(("?", "#")):
        raise InvalidAddress(f"url must have no user info, query or fragment, got {url!r}")
    if not _PATH_RE.fullmatch(parts.path) or "//" in parts.path or "/." in parts.path:
        raise InvalidAddress(f"url has an unsupported path: {url!r}")
    netloc = parts.netloc
    if netloc.startswith("["):
        host, sep, rest = netloc[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise InvalidAddress(f"url has a bad IPv6 host: {url!r}")
        port: Any = rest[1:] if rest else None
    else:
        host, sep, port = netloc.partition(":")
        if not sep:
            port = None
    host = _check_host(host, "url")
    port = (443 if parts.scheme == "https" else 80) if port is None else _check_port(port, "url")
    return f"{parts.scheme}://{format_host(host)}:{port}{parts.path.rstrip('/')}"


def _check_role(role: Any) -> str:
    if not isinstance(role, str) or role not in ROLES:
        raise ConfigError(f"role must be 'prefill' or 'decode', got {role!r}"[:200])
    return role


def passed_params(params: Any, who: str) -> dict[str, Any]:
    """The checked subset of a prefill reply's ``kv_transfer_params`` given to the decode request.

    Raises
    ------
    UpstreamError
        The params are not an object, or a known key has the wrong type (the proxy answers 502).
    """
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise UpstreamError(f"{who} returned kv_transfer_params that are not a JSON object")
    out: dict[str, Any] = {}
    try:
        if params.get("remote_host") is not None:
            out["remote_host"] = _check_host(params["remote_host"], "remote_host")
        if params.get("remote_port") is not None:
            p = params["remote_port"]
            if isinstance(p, str):
                raise InvalidAddress(f"remote_port must be a JSON integer, got {p!r}")
            out["remote_port"] = _check_port(p, "remote_port")
    except InvalidAddress as exc:
        raise UpstreamError(f"{who} returned bad kv_transfer_params: {exc}") from None
    tp = params.get("remote_tp_size")
    if tp is not None:
        if isinstance(tp, bool) or not isinstance(tp, int) or not 1 <= tp <= 65536:
            raise UpstreamError(f"{who} returned bad kv_transfer_params: remote_tp_size={tp!r}"[:300])
        out["remote_tp_size"] = tp
    for name, most in (("remote_block_size", _MAX_BLOCK_SIZE), ("decode_tp_size", 65536)):
        v = params.get(name)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= most:
                raise UpstreamError(f"{who} returned bad kv_transfer_params: {name}={v!r}"[:300])
            out[name] = v
    mode = params.get("mode")
    if mode is not None:
        if mode not in ("push", "pull", "read"):
            raise UpstreamError(f"{who} returned bad kv_transfer_params: mode={mode!r}"[:300])
        out["mode"] = mode
    ids = params.get("remote_block_ids")
    if ids is not None:  # mode 'read': the producer's blocks the decode engine copies from
        out["remote_block_ids"] = _block_ids(ids, who)
    dropped = sorted(str(k)[:40] for k in params if k not in _PASSED_PARAMS
                     and k not in ("transfer_id", "do_remote_prefill", "do_remote_decode"))
    if dropped:
        log.warning("%s: dropped unknown kv_transfer_params keys %s", who, dropped[:10])
    return out


def _block_ids(ids: Any, who: str) -> list[list[int]]:
    """``remote_block_ids``: one list of non-negative ints per KV-cache group, at most ``_MAX_BLOCK_IDS`` in all."""
    if not isinstance(ids, list) or not all(isinstance(g, list) for g in ids):
        raise UpstreamError(f"{who} returned bad kv_transfer_params: remote_block_ids must be a list of lists of "
                            "block ids (one per KV-cache group)")
    if sum(len(g) for g in ids) > _MAX_BLOCK_IDS:
        raise UpstreamError(f"{who} returned bad kv_transfer_params: remote_block_ids names more than "
                            f"{_MAX_BLOCK_IDS} blocks")
    for g in ids:
        # plain ints, no bools, none negative; at C speed (a long prompt names thousands of blocks)
        if g and (not set(map(type, g)) <= {int} or min(g) < 0 or max(g) >= 2**63):
            raise UpstreamError(f"{who} returned bad kv_transfer_params: remote_block_ids must be block ids "
                                "(integers in 0..2**63-1)")
    return ids


class UpstreamError(P2pkvError):
    """An instance answered with something the proxy cannot use (-> 502)."""


# ------------------------------------------------------------------ registry
@dataclass
class Instance:
    """One prefill or decode instance.

    ``static`` instances come from the command line and are never dropped; after a
    failed connection they are skipped until ``unhealthy_until`` (a back-off that
    doubles per consecutive failure) and then tried again.
    """

    role: str
    url: str
    p2pkv: str | None = None
    last_seen: float = field(default_factory=time.monotonic)
    static: bool = False
    failures: int = 0
    unhealthy_until: float = 0.0

    def p2pkv_host_port(self) -> tuple[str | None, int | None]:
        if not self.p2pkv:
            return None, None
        return parse_host_port(self.p2pkv)

    def healthy(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.unhealthy_until


class Registry:
    """Prefill and decode instances, with heartbeat expiry, back-off and round-robin choice.

    Parameters
    ----------
    ttl_s : float
        Dynamic instances silent this long are dropped.
    backoff_s, max_backoff_s : float
        A static instance that failed ``n`` times in a row is skipped for
        ``min(backoff_s * 2**(n-1), max_backoff_s)`` seconds.
    max_instances : int
        At most this many instances per role (registrations beyond are refused).

    Rules for ``register`` (a heartbeat is a repeated registration):

    * the URL is normalized (``scheme://host:port[/path]``), so spellings of one URL are one instance;
    * one URL has one role; registering it under the other role is a ``RegistrationConflict``;
    * the p2pkv address of a registered instance is fixed: a registration with another
      address is a ``RegistrationConflict`` (for a dynamic instance, until it has expired);
      one without an address keeps the old one;
    * a dynamic registration of a static instance's URL only refreshes it.
    """

    def __init__(self, ttl_s: float = 10.0, *, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 max_instances: int = 256):
        if not ttl_s > 0 or not backoff_s > 0 or not max_backoff_s >= backoff_s or max_instances < 1:
            raise ConfigError("Registry: ttl_s and backoff_s must be > 0, max_backoff_s >= backoff_s, "
                              "max_instances >= 1")
        self.ttl_s = ttl_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_instances = max_instances
        self._by_role: dict[str, dict[str, Instance]] = {r: {} for r in ROLES}
        self._rr = {r: itertools.count() for r in ROLES}

    def register(self, role: Any, url: Any, p2pkv: Any = None, static: bool = False) -> Instance:
        """Add or refresh an instance.

        Raises
        ------
        ConfigError
            ``role`` is not ``"prefill"``/``"decode"`` or the role already has ``max_instances``.
        InvalidAddress
            ``url`` or ``p2pkv`` is malformed (see ``normalize_url``, ``parse_host_port``).
        RegistrationConflict
            The URL is registered under the other role or with another p2pkv address.
        """
        role = _check_role(role)
        url = normalize_url(url)
        if p2pkv is not None:
            host, port = parse_host_port(p2pkv)
            p2pkv = f"{format_host(host)}:{port}"
        self.expire()
        other = "decode" if role == "prefill" else "prefill"
        if url in self._by_role[other]:
            raise RegistrationConflict(f"{url} is already registered as a {other} instance")
        inst = self._by_role[role].get(url)
        if inst is None:
            if len(self._by_role[role]) >= self.max_instances:
                raise ConfigError(f"too many {role} instances (max_instances={self.max_instances})")
            inst = self._by_role[role][url] = Instance(role, url, p2pkv, static=static)
            log.info("registered %s instance %s (p2pkv %s%s)", role, url, p2pkv, ", static" if static else "")
        elif p2pkv is not None and p2pkv != inst.p2pkv:
            raise RegistrationConflict(
                f"{role} instance {url} is registered with p2pkv address {inst.p2pkv}; it cannot be changed to "
                f"{p2pkv}" + ("" if inst.static else f" before the old registration expires ({self.ttl_s:g}s)"))
        inst.last_seen = time.monotonic()
        return inst

    def drop(self, inst: Instance, why: str) -> None:
        """Remove a dynamic instance (static ones are only marked unhealthy; see ``failed``)."""
        if inst.static:
            self.failed(inst, why)
            return
        if self._by_role[inst.role].pop(inst.url, None) is not None:
            log.warning("dropped %s instance %s: %s", inst.role, inst.url, why)

    def failed(self, inst: Instance, why: str) -> None:
        """A connection to ``inst`` failed: drop a dynamic instance, back a static one off."""
        if not inst.static:
            self.drop(inst, why)
            return
        inst.failures += 1
        wait = min(self.backoff_s * 2 ** min(inst.failures - 1, 30), self.max_backoff_s)
        inst.unhealthy_until = time.monotonic() + wait
        log.warning("%s instance %s unhealthy for %.1fs (failure %d): %s", inst.role, inst.url, wait,
                    inst.failures, why)

    def succeeded(self, inst: Instance) -> None:
        """A request to ``inst`` got an answer: clear its back-off."""
        if inst.failures:
            log.info("%s instance %s is healthy again", inst.role, inst.url)
        inst.failures = 0
        inst.unhealthy_until = 0.0

    def expire(self) -> None:
        now = time.monotonic()
        for role in self._by_role:
            for inst in list(self._by_role[role].values()):
                if not inst.static and now - inst.last_seen > self.ttl_s:
                    self.drop(inst, f"no heartbeat for {now - inst.last_seen:.1f}s")

    def pick(self, role: str) -> Instance | None:
        """The next healthy instance of ``role`` (round-robin), or None."""
        self.expire()
        now = time.monotonic()
        live = [i for i in self._by_role[role].values() if i.healthy(now)]
        if not live:
            return None
        return live[next(self._rr[role]) % len(live)]

    def counts(self) -> dict[str, dict[str, int]]:
        """Per role: ``{"healthy": n, "total": m}``."""
        self.expire()
        now = time.monotonic()
        return {role: {"healthy": sum(i.healthy(now) for i in insts.values()), "total": len(insts)}
                for role, insts in self._by_role.items()}

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        self.expire()
        now = time.monotonic()
        return {role: [{"url": i.url, "p2pkv": i.p2pkv, "static": i.static, "healthy": i.healthy(now)}
                       for i in insts.values()]
                for role, insts in self._by_role.items()}
