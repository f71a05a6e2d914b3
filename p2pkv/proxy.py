"""XpYd disaggregation proxy for OpenAI-compatible servers (vLLM), built on aiohttp.

``python -m p2pkv.proxy --port 8000 [--prefill URL[,P2PKV_HOST:PORT]] [--decode URL,P2PKV_HOST:PORT]``

For every ``/v1/completions`` or ``/v1/chat/completions`` request the proxy
allocates ONE canonical ``transfer_id`` and hands it to both sides in
``kv_transfer_params``: the prefill request (``max_tokens=1``, not streamed)
carries ``do_remote_decode`` and the decode engine's p2pkv address (push mode);
the decode request carries ``do_remote_prefill`` plus whatever the prefill
engine returned in its ``kv_transfer_params`` (the producer's address, for pull
mode). The decode response is passed back, streamed if the client asked.

Instances are given on the command line or register themselves with
``POST /register {"role": "prefill"|"decode", "url": ..., "p2pkv": "host:port"}``
and keep registering as a heartbeat; one silent for ``--instance-ttl`` seconds,
or one that refuses a connection, is dropped. Prefill and decode instances are
each picked round-robin. ``GET /instances`` lists them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .keys import new_transfer_id

log = logging.getLogger("p2pkv.proxy")

__all__ = ["Instance", "Registry", "make_app", "main"]


@dataclass
class Instance:
    role: str
    url: str
    p2pkv: str | None = None
    last_seen: float = field(default_factory=time.monotonic)
    static: bool = False

    def p2pkv_host_port(self) -> tuple[str | None, int | None]:
        if not self.p2pkv:
            return None, None
        host, _, port = self.p2pkv.rpartition(":")
        return host.strip("[]"), int(port)


class Registry:
    """Prefill and decode instances, with heartbeat expiry and round-robin choice."""

    def __init__(self, ttl_s: float = 10.0):
        self.ttl_s = ttl_s
        self._by_role: dict[str, dict[str, Instance]] = {"prefill": {}, "decode": {}}
        self._rr = {"prefill": itertools.count(), "decode": itertools.count()}

    def register(self, role: str, url: str, p2pkv: str | None = None, static: bool = False) -> Instance:
        if role not in self._by_role:
            raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be an http(s) URL, got {url!r}")
        if p2pkv is not None and (not isinstance(p2pkv, str) or ":" not in p2pkv
                                  or not p2pkv.rpartition(":")[2].isdigit()):
            raise ValueError(f"p2pkv must be 'host:port', got {p2pkv!r}")
        inst = self._by_role[role].get(url)
        if inst is None:
            inst = self._by_role[role][url] = Instance(role, url.rstrip("/"), p2pkv, static=static)
            log.info("registered %s instance %s (p2pkv %s)", role, url, p2pkv)
        inst.last_seen = time.monotonic()
        inst.p2pkv = p2pkv or inst.p2pkv
        return inst

    def drop(self, inst: Instance, why: str) -> None:
        if self._by_role[inst.role].pop(inst.url, None) is not None:
            log.warning("dropped %s instance %s: %s", inst.role, inst.url, why)

    def expire(self) -> None:
        now = time.monotonic()
        for role in self._by_role:
            for inst in list(self._by_role[role].values()):
                if not inst.static and now - inst.last_seen > self.ttl_s:
                    self.drop(inst, f"no heartbeat for {now - inst.last_seen:.1f}s")

    def pick(self, role: str) -> Instance | None:
        self.expire()
        live = list(self._by_role[role].values())
        if not live:
            return None
        return live[next(self._rr[role]) % len(live)]

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        self.expire()
        return {role: [{"url": i.url, "p2pkv": i.p2pkv, "static": i.static} for i in insts.values()]
                for role, insts in self._by_role.items()}


def make_app(registry: Registry, timeout_s: float = 600.0):
    """The proxy as an ``aiohttp.web.Application``."""
    from aiohttp import ClientConnectionError, ClientSession, ClientTimeout, web

    session_key = web.AppKey("p2pkv_session", ClientSession)

    async def on_startup(app: web.Application) -> None:
        app[session_key] = ClientSession(timeout=ClientTimeout(total=timeout_s))

    async def on_cleanup(app: web.Application) -> None:
        await app[session_key].close()

    async def register(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            inst = registry.register(body.get("role"), body.get("url"), body.get("p2pkv"))
        except (ValueError, json.JSONDecodeError, AttributeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True, "role": inst.role, "url": inst.url, "ttl_s": registry.ttl_s})

    async def instances(request: web.Request) -> web.Response:
        return web.json_response(registry.snapshot())

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def forward(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the request body must be a JSON object")
        except (ValueError, json.JSONDecodeError) as exc:
            return web.json_response({"error": {"message": f"bad request body: {exc}"}}, status=400)
        session: ClientSession = request.app[session_key]
        path = request.path
        tid = new_transfer_id()
        # ---- prefill: one token, no streaming, told where the decode engine listens
        for _ in range(8):
            pre, dec = registry.pick("prefill"), registry.pick("decode")
            if pre is None or dec is None:
                return web.json_response({"error": {"message": "no live prefill or decode instance"}}, status=503)
            host, port = dec.p2pkv_host_port()
            pbody = dict(body, max_tokens=1, stream=False)
            if "max_completion_tokens" in body:
                pbody["max_completion_tokens"] = 1
            pbody.pop("stream_options", None)
            pbody["kv_transfer_params"] = {"transfer_id": tid, "do_remote_decode": True, "do_remote_prefill": False,
                                           "remote_host": host, "remote_port": port}
            try:
                async with session.post(pre.url + path, json=pbody) as r:
                    if r.status != 200:
                        text = await r.text()
                        return web.json_response({"error": {"message": f"prefill failed: {text[:500]}"}},
                                                 status=r.status)
                    pre_resp = await r.json()
                break
            except ClientConnectionError as exc:
                registry.drop(pre, f"connection failed: {exc}")
        else:
            return web.json_response({"error": {"message": "prefill instances unreachable"}}, status=503)
        params = dict(pre_resp.get("kv_transfer_params") or {})
        params.update({"transfer_id": tid, "do_remote_prefill": True, "do_remote_decode": False})
        dbody = dict(body, kv_transfer_params=params)
        # ---- decode: the client's request, streamed back as it comes
        try:
            async with session.post(dec.url + path, json=dbody) as r:
                resp = web.StreamResponse(status=r.status, headers={
                    "Content-Type": r.headers.get("Content-Type", "application/json"), "X-P2pkv-Transfer-Id": tid})
                await resp.prepare(request)
                async for chunk in r.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except ClientConnectionError as exc:
            registry.drop(dec, f"connection failed: {exc}")
            return web.json_response({"error": {"message": f"decode instance unreachable: {exc}"}}, status=503)

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/register", register)
    app.router.add_get("/instances", instances)
    app.router.add_get("/healthz", health)
    app.router.add_post("/v1/completions", forward)
    app.router.add_post("/v1/chat/completions", forward)
    return app


def _parse_instance(spec: str) -> tuple[str, str | None]:
    url, _, p2 = spec.partition(",")
    return url, (p2 or None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m p2pkv.proxy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--prefill", action="append", default=[], help="URL[,P2PKV_HOST:PORT] (repeatable)")
    ap.add_argument("--decode", action="append", default=[], help="URL,P2PKV_HOST:PORT (repeatable)")
    ap.add_argument("--instance-ttl", type=float, default=10.0, help="drop instances silent this long (s)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from aiohttp import web

    reg = Registry(a.instance_ttl)
    for spec in a.prefill:
        reg.register("prefill", *_parse_instance(spec), static=True)
    for spec in a.decode:
        reg.register("decode", *_parse_instance(spec), static=True)
    web.run_app(make_app(reg), host=a.host, port=a.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
