"""XpYd disaggregation proxy for OpenAI-compatible servers (vLLM), built on aiohttp.

``python -m p2pkv.proxy [--host 127.0.0.1] --port 8000 [--prefill URL[,P2PKV_HOST:PORT]]
[--decode URL,P2PKV_HOST:PORT]``

For every ``/v1/completions`` or ``/v1/chat/completions`` request the proxy
allocates ONE canonical ``transfer_id`` and hands it to both sides in
``kv_transfer_params``: the prefill request (``max_tokens=1``, not streamed)
carries ``do_remote_decode`` and the decode engine's p2pkv address (push mode);
the decode request carries ``do_remote_prefill`` plus the fields the prefill
engine returned in its ``kv_transfer_params`` (the producer's address, for pull
and read modes; its block ids, for read mode), checked and filtered to the known
keys: a client's own ``kv_transfer_params`` never reach the decode engine. The decode response is passed
back, streamed if the client asked.

Instances are given on the command line (*static*: never dropped; one that
refuses a connection is skipped for a growing back-off and then retried) or
register themselves with ``POST /register {"role": "prefill"|"decode", "url":
..., "p2pkv": "host:port"}`` and ``Authorization: Bearer <token>`` and keep
registering as a heartbeat (*dynamic*: dropped after ``--instance-ttl`` seconds
of silence, or at once when they refuse a connection). Registration needs the
shared secret of ``--register-token`` (or ``$P2PKV_PROXY_REGISTER_TOKEN``);
without one it is refused unless ``--allow-unauthenticated-register`` is given
(trusted networks only). Prefill and decode instances are each picked
round-robin among the healthy ones.

Endpoints: ``GET /health`` (200 when at least one prefill and one decode
instance are healthy, else 503; JSON with the counts), ``GET /healthz``
(liveness: always 200), ``GET /instances`` (needs the token when one is set).

The proxy listens on 127.0.0.1 unless ``--host`` says otherwise, caps its client
connections (the oldest connection that has not sent a whole request is closed
to make room), closes connections that do not send a request head within
``--header-timeout`` or a body within ``--body-timeout``, and bounds its
connection pool to the instances. It never forwards the client's headers, the
registration token or cookies to an instance.

Every request it sends carries ``X-P2pkv-Proxy-Id``: the ids of the proxies the request went
through, its own last. A request that arrives with the proxy's own id in it (an instance URL that
leads back to it, directly or through other proxies) or that went through ``MAX_HOPS`` proxies is
answered 508, and a request that came from another proxy gets one try per leg (no retries), so
one client request fans out to a handful of upstream requests at most, whatever is registered.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from . import __version__
from ._proxy_registry import (
    Instance,
    RegistrationConflict,
    Registry,
    UpstreamError,
    format_host,
    normalize_url,
    parse_host_port,
    passed_params,
)
from .errors import ConfigError, InvalidAddress, P2pkvError
from .keys import new_transfer_id

log = logging.getLogger("p2pkv.proxy")

__all__ = [
    "Instance",
    "ProxyLimits",
    "RegistrationConflict",
    "Registry",
    "RunningProxy",
    "main",
    "make_app",
    "normalize_url",
    "parse_host_port",
    "start_proxy",
]

TOKEN_ENV = "P2PKV_PROXY_REGISTER_TOKEN"
#: Header carrying the ids of the proxies a request went through (comma-separated, oldest first).
#: A proxy passes it on with its own id appended; a request that arrives with the proxy's own id
#: in it is a loop (an instance URL that leads back to this proxy, also through other proxies),
#: and one that went through ``MAX_HOPS`` proxies is refused: both with 508.
HOP_HEADER = "X-P2pkv-Proxy-Id"
MAX_HOPS = 3
_HOP_ID = re.compile(r"[0-9a-f]{16}", re.ASCII)
# ------------------------------------------------------------------ limits and connection guard
@dataclass(frozen=True)
class ProxyLimits:
    """Resource limits of the proxy (all enforced by aiohttp or the connection guard).

    Attributes
    ----------
    max_connections : int
        Client connections held at once; a new one beyond closes the oldest connection
        that has not sent a whole request (or, if none, is answered 503 and closed).
    header_timeout_s : float
        A connection must send a complete request head within this long of opening (or of
        its previous response); also the keep-alive idle timeout.
    body_timeout_s : float
        Time to receive a request's body.
    max_body_bytes : int
        Largest request body (413 beyond).
    timeout_s : float
        Total time of one request to an instance (the decode request includes the generation).
    connect_timeout_s : float
        Time to connect to an instance.
    upstream_connections, upstream_connections_per_host : int
        The proxy's client pool to the instances: total and per instance.
    max_upstream_json_bytes : int
        Largest prefill reply read.
    """

    max_connections: int = 1024
    header_timeout_s: float = 15.0
    body_timeout_s: float = 30.0
    max_body_bytes: int = 16 << 20
    timeout_s: float = 600.0
    connect_timeout_s: float = 5.0
    upstream_connections: int = 1024
    upstream_connections_per_host: int = 512
    max_upstream_json_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_body_bytes", "upstream_connections", "upstream_connections_per_host",
                     "max_upstream_json_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"ProxyLimits.{name} must be a positive int, got {v!r}")
        for name in ("header_timeout_s", "body_timeout_s", "timeout_s", "connect_timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v < 1e6:
                raise ConfigError(f"ProxyLimits.{name} must be a positive number of seconds, got {v!r}")


_REFUSED_BODY = b'{"error":{"message":"proxy connection limit reached","code":503}}'
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY))


class _ConnectionGuard:
    """Caps the client connections of an aiohttp server.

    Connections are in one of three phases: *idle* (no request head yet: slowloris lives
    here), *body* (a handler reads the request body) and *work* (the request is being
    served). When a new connection goes over the cap, the oldest idle connection is
    closed, else the oldest one still in *body*; a connection in *work* is never closed
    for another (if all are, the new one is answered 503 and closed). Honest clients
    send their request head with the connection, so they are the youngest idle ones.
    """

    def __init__(self, max_connections: int):
        self.max_connections = max_connections
        self._server: Any = None
        self._phase: dict[Any, str] = {}
        self._evicted: set[Any] = set()  # closed by us, until aiohttp forgets them
        self.evictions = 0
        self.refusals = 0

    def attach(self, server: Any) -> None:
        """Watch ``server`` (an ``aiohttp.web.Server``): every handler reports ``connection_made`` to it."""
        self._server = server
        made = server.connection_made

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self._admit(handler, transport)

        # aiohttp has no connection limit of its own; its Server is told of every new
        # connection (in accept order), which is where the cap is enforced.
        server.connection_made = connection_made

    def _admit(self, new: Any, transport: asyncio.Transport) -> None:
        everyone = self._server.connections
        self._evicted.intersection_update(everyone)
        conns = [c for c in everyone if c not in self._evicted]
        if len(conns) <= self.max_connections:
            return
        victim = (next((c for c in conns if c is not new and c not in self._phase), None)
                  or next((c for c in conns if c is not new and self._phase.get(c) == "body"), None))
        if victim is None:
            self.refusals += 1
            transport.write(_REFUSED)
            victim = new
        else:
            self.evictions += 1
        self._evicted.add(victim)
        self._phase.pop(victim, None)
        victim.force_close()

    def begin(self, proto: Any) -> None:
        self._phase[proto] = "body"

    def working(self, proto: Any) -> None:
        if proto in self._phase:
            self._phase[proto] = "work"

    def end(self, proto: Any) -> None:
        self._phase.pop(proto, None)


@dataclass
class _State:
    registry: Registry
    limits: ProxyLimits
    token: bytes | None
    allow_unauthenticated: bool
    guard: _ConnectionGuard
    proxy_id: str = field(default_factory=lambda: secrets.token_hex(8))
    listen: tuple[str, int] | None = None
    session: Any = None


def _local_names() -> set[str]:
    names = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"}
    try:
        names.add(socket.gethostname().lower())
    except OSError:  # pragma: no cover
        pass
    return names


def is_own_url(url: str, listen: tuple[str, int] | None) -> bool:
    """Whether ``url`` (normalized) obviously points at the proxy listening on ``listen``.

    Loopback addresses, ``localhost``, this host's name and the listening host with the
    listening port count; other aliases are caught at request time by the loop header.
    """
    if listen is None:
        return False
    parts = urlsplit(url)
    if parts.port != listen[1]:
        return False
    host = (parts.hostname or "").lower()
    if host in _local_names() or host == listen[0].lower():
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------ the app
def make_app(registry: Registry, timeout_s: float | None = None, *, register_token: str | None = None,
             allow_unauthenticated_register: bool = False, limits: ProxyLimits | None = None) -> Any:
    """The proxy as an ``aiohttp.web.Application``.

    Parameters
    ----------
    registry : Registry
        The instances.
    timeout_s : float, optional
        Total time of one request to an instance (overrides ``limits.timeout_s``).
    register_token : str, optional
        Shared secret ``POST /register`` and ``GET /instances`` must present as
        ``Authorization: Bearer <token>`` (compared in constant time).
    allow_unauthenticated_register : bool
        Without a token, accept registrations from anyone who can reach the proxy
        (trusted networks only). Without a token and without this, ``/register`` is 403.
    limits : ProxyLimits, optional
        Connection, body and upstream limits. The connection cap and header timeout
        apply when the app is served with ``start_proxy``.

    Raises
    ------
    ConfigError
        An empty ``register_token``.
    """
    from aiohttp import (
        ClientConnectionError,
        ClientError,
        ClientSession,
        ClientTimeout,
        DummyCookieJar,
        TCPConnector,
        web,
    )

    limits = limits or ProxyLimits()
    if timeout_s is not None:
        limits = dataclasses.replace(limits, timeout_s=timeout_s)
    if register_token is not None and (not isinstance(register_token, str) or not register_token):
        raise ConfigError("register_token must be a non-empty string")
    state = _State(registry, limits, register_token.encode() if register_token else None,
                   allow_unauthenticated_register, _ConnectionGuard(limits.max_connections))
    app = web.Application(client_max_size=limits.max_body_bytes, middlewares=[])

    def error(status: int, message: str, **headers: str) -> web.Response:
        return web.json_response({"error": {"message": message, "code": status}}, status=status,
                                 headers=headers or None)

    @web.middleware
    async def phases(request: web.Request, handler: Any) -> web.StreamResponse:
        proto = request.protocol
        state.guard.begin(proto)
        try:
            resp: web.StreamResponse = await handler(request)
            return resp
        finally:
            state.guard.end(proto)

    app.middlewares.append(phases)

    async def read_json(request: web.Request) -> Any:
        """The request body as JSON.

        Raises
        ------
        _ClientBodyError
            408 (not received within ``body_timeout_s``), 413 (over ``max_body_bytes``) or 400 (not JSON).
        """
        try:
            raw = await asyncio.wait_for(request.read(), limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise _ClientBodyError(408, f"request body not received within {limits.body_timeout_s:g}s") from None
        except web.HTTPRequestEntityTooLarge:
            raise _ClientBodyError(413, f"request body larger than {limits.max_body_bytes} bytes") from None
        state.guard.working(request.protocol)
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise _ClientBodyError(400, f"bad request body: {exc}"[:300]) from None

    def authorized(request: web.Request) -> web.Response | None:
        if state.token is None:
            if state.allow_unauthenticated:
                return None
            return error(403, "registration is disabled: the proxy has no --register-token "
                              f"(or ${TOKEN_ENV}) and was not started with --allow-unauthenticated-register")
        got = request.headers.get("Authorization", "")
        scheme, _, given = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                                 state.token):
            return error(401, "missing or wrong registration token (Authorization: Bearer <token>)",
                         **{"WWW-Authenticate": 'Bearer realm="p2pkv-proxy"'})
        return None

    async def on_startup(app: web.Application) -> None:
        state.session = ClientSession(
            connector=TCPConnector(limit=limits.upstream_connections,
                                   limit_per_host=limits.upstream_connections_per_host),
            timeout=ClientTimeout(total=limits.timeout_s, sock_connect=limits.connect_timeout_s),
            cookie_jar=DummyCookieJar(),  # an instance's cookies must not travel to another one
            trust_env=False)

    async def on_cleanup(app: web.Application) -> None:
        if state.session is not None:
            await state.session.close()

    async def register(request: web.Request) -> web.Response:
        denied = authorized(request)
        if denied is not None:
            return denied
        try:
            body = await read_json(request)
        except _ClientBodyError as exc:
            return error(exc.status, exc.message)
        if not isinstance(body, dict):
            return error(400, "the body must be a JSON object {role, url, p2pkv}")
        try:
            url = normalize_url(body.get("url"))
            if is_own_url(url, state.listen):
                return error(400, f"{url} is this proxy's own address")
            inst = registry.register(body.get("role"), url, body.get("p2pkv"))
        except RegistrationConflict as exc:
            return error(409, str(exc))
        except (ConfigError, InvalidAddress) as exc:
            return error(400, str(exc))
        return web.json_response({"ok": True, "role": inst.role, "url": inst.url, "ttl_s": registry.ttl_s})

    async def instances(request: web.Request) -> web.Response:
        if state.token is not None:
            denied = authorized(request)
            if denied is not None:
                return denied
        return web.json_response(registry.snapshot())

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def health(request: web.Request) -> web.Response:
        counts = registry.counts()
        ok = counts["prefill"]["healthy"] > 0 and counts["decode"]["healthy"] > 0
        return web.json_response({"status": "ok" if ok else "unavailable", **counts}, status=200 if ok else 503)

    async def read_bounded(r: Any, limit: int) -> bytes | None:
        """At most ``limit`` bytes of an upstream body, or None if it is larger."""
        buf = bytearray()
        async for chunk in r.content.iter_chunked(1 << 16):
            buf += chunk
            if len(buf) > limit:
                return None
        return bytes(buf)

    def hops_of(request: web.Request) -> list[str] | None:
        """The proxies the request went through (None: a malformed header)."""
        hops = [h.strip() for v in request.headers.getall(HOP_HEADER, []) for h in v.split(",")]
        if len(hops) > 2 * MAX_HOPS or not all(_HOP_ID.fullmatch(h) for h in hops):
            return None
        return hops

    def is_loop(r: Any) -> bool:
        """A 508 from a proxy that found this proxy's id among the hops: our instance leads back here."""
        if r.status != 508:
            return False
        return state.proxy_id in [h.strip() for v in r.headers.getall(HOP_HEADER, []) for h in v.split(",")]

    async def forward(request: web.Request) -> web.StreamResponse:
        hops = hops_of(request)
        if hops is None:
            return error(400, f"malformed {HOP_HEADER} header: comma-separated 16-hex-digit proxy ids")
        if state.proxy_id in hops:
            return error(508, "request loop: an instance URL leads back to this proxy",
                         **{HOP_HEADER: ",".join(hops)})
        if len(hops) >= MAX_HOPS:
            return error(508, f"request went through {len(hops)} proxies (at most {MAX_HOPS} hops)",
                         **{HOP_HEADER: ",".join(hops)})
        hop = {HOP_HEADER: ",".join([*hops, state.proxy_id])}
        # A request from another proxy gets one try per leg: retries at every hop would multiply.
        attempts = 8 if not hops else 1
        try:
            body = await read_json(request)
        except _ClientBodyError as exc:
            return error(exc.status, exc.message)
        if not isinstance(body, dict):
            return error(400, "bad request body: the request body must be a JSON object")
        session: ClientSession = state.session
        path = request.path
        tid = new_transfer_id()
        # ---- prefill: one token, no streaming, told where the decode engine listens
        for _ in range(attempts):
            pre, dec = registry.pick("prefill"), registry.pick("decode")
            if pre is None or dec is None:
                return error(503, "no healthy prefill or decode instance")
            host, port = dec.p2pkv_host_port()
            pbody = dict(body, max_tokens=1, stream=False)
            if "max_completion_tokens" in body:
                pbody["max_completion_tokens"] = 1
            pbody.pop("stream_options", None)
            pbody["kv_transfer_params"] = {"transfer_id": tid, "do_remote_decode": True, "do_remote_prefill": False,
                                           "remote_host": host, "remote_port": port}
            try:
                async with session.post(pre.url + path, json=pbody, headers=hop) as r:
                    if is_loop(r):
                        registry.failed(pre, "its URL leads back to this proxy")
                        continue
                    registry.succeeded(pre)
                    if r.status != 200:
                        text = (await read_bounded(r, 4096) or b"").decode("utf-8", "replace")
                        return error(r.status if 400 <= r.status < 600 else 502,
                                     f"prefill failed ({r.status}): {text[:500]}")
                    raw = await read_bounded(r, limits.max_upstream_json_bytes)
                break
            except ClientConnectionError as exc:
                registry.failed(pre, f"connection failed: {exc!r}"[:300])
            except asyncio.TimeoutError:
                return error(504, f"prefill instance {pre.url} did not answer within {limits.timeout_s:g}s")
            except ClientError as exc:
                return error(502, f"prefill instance {pre.url} failed: {exc!r}"[:300])
        else:
            return error(503, "prefill instances unreachable")
        who = f"prefill instance {pre.url}"
        try:
            if raw is None:
                raise UpstreamError(f"{who} returned more than {limits.max_upstream_json_bytes} bytes")
            try:
                pre_resp = json.loads(raw)
            except (ValueError, RecursionError):
                raise UpstreamError(f"{who} returned a body that is not JSON") from None
            if not isinstance(pre_resp, dict):
                raise UpstreamError(f"{who} returned JSON that is not an object")
            params = passed_params(pre_resp.get("kv_transfer_params"), who)
        except UpstreamError as exc:
            log.warning("%s", exc)
            return error(502, str(exc))
        params.update({"transfer_id": tid, "do_remote_prefill": True, "do_remote_decode": False})
        dbody = dict(body, kv_transfer_params=params)
        # ---- decode: the client's request, streamed back as it comes
        try:
            async with session.post(dec.url + path, json=dbody, headers=hop) as r:
                if is_loop(r):
                    registry.failed(dec, "its URL leads back to this proxy")
                    return error(502, "decode instance URL leads back to this proxy")
                registry.succeeded(dec)
                resp = web.StreamResponse(status=r.status, headers={
                    "Content-Type": r.headers.get("Content-Type", "application/json"), "X-P2pkv-Transfer-Id": tid})
                await resp.prepare(request)
                try:
                    async for chunk in r.content.iter_any():
                        await resp.write(chunk)
                    await resp.write_eof()
                except (ClientError, asyncio.TimeoutError) as exc:  # headers are out: all we can do is cut it short
                    log.warning("decode instance %s broke off transfer %s: %r", dec.url, tid, exc)
                    request.protocol.force_close()
                return resp
        except ClientConnectionError as exc:
            registry.failed(dec, f"connection failed: {exc!r}"[:300])
            return error(503, f"decode instance unreachable: {exc}"[:300])
        except asyncio.TimeoutError:
            return error(504, f"decode instance {dec.url} did not answer within {limits.timeout_s:g}s")
        except ClientError as exc:
            return error(502, f"decode instance {dec.url} failed: {exc!r}"[:300])

    app[_state_key()] = state
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/register", register)
    app.router.add_get("/instances", instances)
    app.router.add_get("/health", health)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/completions", forward)
    app.router.add_post("/v1/chat/completions", forward)
    return app


class _ClientBodyError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


_STATE_KEYS: list[Any] = []


def _state_key() -> Any:
    """The app key of the proxy's state (made on first use: importing this module needs no aiohttp)."""
    if not _STATE_KEYS:
        from aiohttp import web

        _STATE_KEYS.append(web.AppKey("p2pkv_proxy_state", _State))
    return _STATE_KEYS[0]


# ------------------------------------------------------------------ serving
class RunningProxy:
    """A proxy served by ``start_proxy``; ``await close()`` stops it."""

    def __init__(self, runner: Any, host: str, port: int, guard: _ConnectionGuard):
        self._runner: Any = runner
        self.host = host
        self.port = port
        self.guard = guard

    @property
    def url(self) -> str:
        return f"http://{format_host(self.host)}:{self.port}"

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


async def start_proxy(app: Any, host: str = "127.0.0.1", port: int = 0) -> RunningProxy:
    """Serve ``app`` (from ``make_app``) with its limits: header timeout, connection cap.

    Parameters
    ----------
    app : aiohttp.web.Application
        The proxy.
    host : str
        Address to listen on (loopback by default; ``0.0.0.0`` to expose it).
    port : int
        Port; 0 picks a free one (see ``RunningProxy.port``).

    Raises
    ------
    OSError
        The address cannot be bound.
    """
    from aiohttp import web

    state: _State = app[_state_key()]
    lim = state.limits
    # lingering_time: after an early answer (408, 413) aiohttp reads and discards the rest of the
    # body this long before closing; a slow body must not buy another 10 s (its default).
    # keepalive_timeout in aiohttp starts when a connection opens (and after each response) and
    # closes it if no complete request head has arrived by then: the header timeout.
    runner = web.AppRunner(app, keepalive_timeout=lim.header_timeout_s, handler_cancellation=True,
                           shutdown_timeout=5.0, lingering_time=min(2.0, lim.body_timeout_s),
                           max_line_size=8190, max_field_size=8190, max_headers=100)
    await runner.setup()
    state.guard.attach(runner.server)
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=min(lim.max_connections, 4096))
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    state.listen = (host, bound)
    return RunningProxy(runner, host, bound, state.guard)


def _raise_fd_limit(want: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``want`` (within the hard limit); return the soft limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover
        return want
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # pragma: no cover
            pass
    return int(soft) if soft != resource.RLIM_INFINITY else want


def _parse_instance(spec: str) -> tuple[str, str | None]:
    url, _, p2 = spec.partition(",")
    return url, (p2 or None)


def _positive(kind: type) -> Any:
    def conv(s: str) -> Any:
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
        if not 0 < v < 1e9:
            raise argparse.ArgumentTypeError(f"must be > 0: {s!r}")
        return v
    return conv


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (``python -m p2pkv.proxy`` / ``p2pkv-proxy``)."""
    d = ProxyLimits()
    # Each help string states its own default (argparse's ArgumentDefaultsHelpFormatter would add a
    # second "(default: ...)" to those that already say it, and "(default: None)" to the flags).
    ap = argparse.ArgumentParser(prog="p2pkv-proxy", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: %(default)s; 0.0.0.0 exposes the proxy on every interface)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port; default: %(default)s)")
    ap.add_argument("--prefill", action="append", default=[], help="URL[,P2PKV_HOST:PORT] (repeatable; static)")
    ap.add_argument("--decode", action="append", default=[], help="URL,P2PKV_HOST:PORT (repeatable; static)")
    ap.add_argument("--instance-ttl", type=_positive(float), default=10.0,
                    help="drop registered instances silent this long (s; default: %(default)s)")
    ap.add_argument("--register-token", default=None,
                    help=f"shared secret for POST /register (default: ${TOKEN_ENV}; prefer the variable, a flag "
                         "is visible in ps)")
    ap.add_argument("--allow-unauthenticated-register", action="store_true",
                    help="without a token, let anyone who reaches the proxy register instances (trusted networks "
                         "only)")
    ap.add_argument("--timeout", type=_positive(float), default=d.timeout_s,
                    help="total time of one request to an instance (s; default: %(default)s)")
    ap.add_argument("--connect-timeout", type=_positive(float), default=d.connect_timeout_s,
                    help="time to connect to an instance (s; default: %(default)s)")
    ap.add_argument("--header-timeout", type=_positive(float), default=d.header_timeout_s,
                    help="a client must send a request head within this long (s; default: %(default)s)")
    ap.add_argument("--body-timeout", type=_positive(float), default=d.body_timeout_s,
                    help="a client must send the request body within this long (s; default: %(default)s)")
    ap.add_argument("--max-body-bytes", type=_positive(int), default=d.max_body_bytes,
                    help="largest request body (bytes; default: %(default)s)")
    ap.add_argument("--max-connections", type=_positive(int), default=d.max_connections,
                    help="client connections held at once (default: %(default)s, lowered to fit the file descriptor "
                         "limit)")
    ap.add_argument("--upstream-connections", type=_positive(int), default=d.upstream_connections,
                    help="connections to all instances together (default: %(default)s)")
    ap.add_argument("--upstream-connections-per-host", type=_positive(int), default=d.upstream_connections_per_host,
                    help="connections to one instance (default: %(default)s)")
    ap.add_argument("--max-instances", type=_positive(int), default=256,
                    help="registered instances per role (default: %(default)s)")
    a = ap.parse_args(argv)
    if a.register_token is None:  # read here, not as the default: --help must never print the secret
        a.register_token = os.environ.get(TOKEN_ENV) or None
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print("p2pkv-proxy: error: the proxy needs aiohttp: pip install 'p2pkv[proxy]'", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 <= a.port <= 65535:
        ap.error(f"--port must be in 0..65535, got {a.port}")
    # Every client and upstream connection is a descriptor: keep both caps below the limit so
    # that accept() never fails with EMFILE (which would stall every client, honest ones included).
    fds = _raise_fd_limit(a.max_connections + a.upstream_connections + 64)
    avail = fds - 64
    if avail < 16:
        print(f"p2pkv-proxy: error: the file descriptor limit ({fds}) leaves no room for connections; "
              "raise `ulimit -n`", file=sys.stderr)
        return 2
    upstream = a.upstream_connections
    max_conn = a.max_connections
    if max_conn + upstream > avail:
        upstream = max(4, min(upstream, avail // 2))
        max_conn = min(max_conn, avail - upstream)
        log.warning("connection caps lowered to fit the file descriptor limit %d: --max-connections %d, "
                    "--upstream-connections %d", fds, max_conn, upstream)
    try:
        limits = ProxyLimits(max_connections=max_conn, header_timeout_s=a.header_timeout,
                             body_timeout_s=a.body_timeout, max_body_bytes=a.max_body_bytes, timeout_s=a.timeout,
                             connect_timeout_s=a.connect_timeout, upstream_connections=upstream,
                             upstream_connections_per_host=min(a.upstream_connections_per_host, upstream))
        reg = Registry(a.instance_ttl, max_instances=a.max_instances)
        for role, specs in (("prefill", a.prefill), ("decode", a.decode)):
            for spec in specs:
                url, p2 = _parse_instance(spec)
                if a.port and is_own_url(normalize_url(url), (a.host, a.port)):
                    raise ConfigError(f"--{role} {url} is this proxy's own address")
                if role == "decode" and p2 is None:
                    log.warning("--decode %s has no p2pkv address (URL,P2PKV_HOST:PORT): push-mode requests "
                                "cannot reach it, only pull mode works", url)
                reg.register(role, url, p2, static=True)
        app = make_app(reg, register_token=a.register_token,
                       allow_unauthenticated_register=a.allow_unauthenticated_register, limits=limits)
    except P2pkvError as exc:
        print(f"p2pkv-proxy: error: {exc}", file=sys.stderr)
        return 2
    if a.register_token is not None and len(a.register_token) < 16:
        log.warning("the registration token is short (%d characters); use at least 16 random ones",
                    len(a.register_token))
    if a.register_token is None and not a.allow_unauthenticated_register:
        log.info("POST /register is disabled (no --register-token / $%s); only static instances are used",
                 TOKEN_ENV)
    elif a.register_token is None:
        log.warning("POST /register accepts anyone (--allow-unauthenticated-register): trusted networks only")
    try:
        asyncio.run(_serve_forever(app, a.host, a.port))
    except OSError as exc:
        print(f"p2pkv-proxy: error: cannot listen on {a.host}:{a.port}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve_forever(app: Any, host: str, port: int) -> None:
    proxy = await start_proxy(app, host, port)
    print(f"p2pkv-proxy listening on {proxy.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover
            pass
    try:
        await stop.wait()
    finally:
        await proxy.close()


if __name__ == "__main__":
    raise SystemExit(main())
