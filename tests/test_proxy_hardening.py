"""The proxy against hostile clients, registrants and instances (issue 12 item 4/11, issue 14).

Every adversary is a real client on loopback (aiohttp or raw sockets), bounded in count
and time; the instances are stub OpenAI-compatible servers over real HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import resource
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from p2pkv import proxy as proxy_mod  # noqa: E402
from p2pkv.proxy import ProxyLimits, Registry, make_app, start_proxy  # noqa: E402

TOKEN = "s3cret-register-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ------------------------------------------------------------------ helpers
def stub(name: str, seen: list, reply: Any = None) -> web.Application:
    """An OpenAI-compatible stub; ``reply(body) -> web.Response`` overrides the prefill answer."""

    async def completions(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        seen.append((name, request.path, body, dict(request.headers), raw))
        if reply is not None and body.get("kv_transfer_params", {}).get("do_remote_decode"):
            return reply(body)
        out: dict[str, Any] = {"id": "x", "choices": [{"text": f"{name}-out"}]}
        if body.get("kv_transfer_params", {}).get("do_remote_decode"):
            out["kv_transfer_params"] = {"remote_host": "10.0.0.9", "remote_port": 14500, "mode": "pull"}
        return web.json_response(out)

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    return app


async def serve(app: web.Application, port: int = 0) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
    await site.start()
    got = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{got}"


class Env:
    """Stubs P (prefill) and D (decode) and one proxy, all in this event loop."""

    def __init__(self) -> None:
        self.seen: list = []
        self.runners: list = []
        self.urls: dict[str, str] = {}
        self.proxy: Any = None
        self.reg: Registry | None = None

    async def start(self, *, reply: Any = None, register: bool = True, token: str | None = TOKEN,
                    limits: ProxyLimits | None = None, **reg_kw: Any) -> Env:
        for name in ("P", "D"):
            r, u = await serve(stub(name, self.seen, reply if name == "P" else None))
            self.runners.append(r)
            self.urls[name] = u
        self.reg = Registry(**reg_kw)
        self.proxy = await start_proxy(make_app(self.reg, register_token=token, limits=limits))
        if register:
            self.reg.register("prefill", self.urls["P"])
            self.reg.register("decode", self.urls["D"], "127.0.0.1:14600")
        return self

    @property
    def url(self) -> str:
        return self.proxy.url

    async def close(self) -> None:
        await self.proxy.close()
        for r in self.runners:
            await r.cleanup()


def run(coro_fn: Any) -> Any:
    return asyncio.run(coro_fn())


COMPLETION = {"model": "m", "prompt": "hi", "max_tokens": 5}


async def post(s: Any, url: str, **kw: Any) -> tuple[int, Any]:
    async with s.post(url, **kw) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


# ------------------------------------------------------------------ /register authentication
@pytest.mark.timeout(60)
def test_register_refused_without_configured_token_unless_explicitly_allowed() -> None:
    async def scenario() -> None:
        reg = Registry()
        closed = await start_proxy(make_app(reg))
        opened = await start_proxy(make_app(Registry(), allow_unauthenticated_register=True))
        body = {"role": "prefill", "url": "http://127.0.0.1:9"}
        async with aiohttp.ClientSession() as s:
            st, js = await post(s, closed.url + "/register", json=body)
            assert st == 403 and "--allow-unauthenticated-register" in js["error"]["message"]
            st, _ = await post(s, closed.url + "/register", json=body, headers={"Authorization": "Bearer x"})
            assert st == 403
            assert reg.snapshot() == {"prefill": [], "decode": []}
            st, _ = await post(s, opened.url + "/register", json=body)
            assert st == 200
        await closed.close()
        await opened.close()

    run(scenario)


@pytest.mark.timeout(60)
def test_register_token_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(proxy_mod.hmac, "compare_digest", spy)

    async def scenario() -> None:
        env = await Env().start(register=False)
        body = {"role": "prefill", "url": env.urls["P"]}
        async with aiohttp.ClientSession() as s:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                            {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"},
                            {"Authorization": f"Bearer {TOKEN[:-1]}"}):
                st, js = await post(s, env.url + "/register", json=body, headers=headers)
                assert st == 401, headers
                assert js["error"]["code"] == 401
            assert env.reg is not None and env.reg.snapshot()["prefill"] == []
            async with s.get(env.url + "/instances") as r:  # the instance list needs the token too
                assert r.status == 401
            st, _ = await post(s, env.url + "/register", json=body, headers=AUTH)
            assert st == 200
            async with s.get(env.url + "/instances", headers=AUTH) as r:
                assert r.status == 200 and [i["url"] for i in (await r.json())["prefill"]] == [env.urls["P"]]
        assert any(b == TOKEN.encode() for _, b in calls)
        await env.close()

    run(scenario)


# ------------------------------------------------------------------ /register validation
BAD_REGISTRATIONS = [
    {"role": ["prefill"], "url": "http://127.0.0.1:8100"},
    {"role": {"x": 1}, "url": "http://127.0.0.1:8100"},
    {"role": None, "url": "http://127.0.0.1:8100"},
    {"role": "Prefill", "url": "http://127.0.0.1:8100"},
    {"role": "decode", "url": "http://127.0.0.1:8100", "p2pkv": "127.0.0.1:\u00b2"},
    {"role": "decode", "url": "http://127.0.0.1:8100", "p2pkv": "127.0.0.1:\u0661\u0662"},
    {"role": "decode", "url": "http://127.0.0.1:8100", "p2pkv": "127.0.0.1:0"},
    {"role": "decode", "url": "http://127.0.0.1:8100", "p2pkv": "127.0.0.1:65536"},
    {"role": "decode", "url": "http://127.0.0.1:8100", "p2pkv": "127.0.0.1:-1"},
    {"role": "decode", "url": "http://127.0.0.1:8100", "p2pkv": "127.0.0.1: 80"},
    {"role": "decode", "url": "http://127.0.0.1:8100", "p2pkv": 14600},
    {"role": "decode", "url": "http://127.0.0.1:8100", "p2pkv": ["127.0.0.1", 1]},
    {"role": "decode", "url": "http://127.0.0.1:8100", "p2pkv": "0.0.0.0:14600"},
    {"role": "decode", "url": "http://127.0.0.1:8100", "p2pkv": "bad host:14600"},
    {"role": "decode", "url": "http://127.0.0.1:8100", "p2pkv": "a_b:14600"},
    {"role": "decode", "url": "http://127.0.0.1:8100", "p2pkv": ":14600"},
    {"role": "decode", "url": "http://127.0.0.1:8100", "p2pkv": "::1:14600"},
    {"role": "decode", "url": "http://127.0.0.1:8100", "p2pkv": "x" * 300 + ":1"},
    {"role": "prefill", "url": "http://127.0.0.1:\u00b2"},
    {"role": "prefill", "url": "http://127.0.0.1:0"},
    {"role": "prefill", "url": "ftp://127.0.0.1:8100"},
    {"role": "prefill", "url": "http://user:pw@127.0.0.1:8100"},
    {"role": "prefill", "url": "http://127.0.0.1:8100/?a=1"},
    {"role": "prefill", "url": "http://127.0.0.1:8100/#x"},
    {"role": "prefill", "url": "http://[::1:8100"},
    {"role": "prefill", "url": "http://0.0.0.0:8100"},
    {"role": "prefill", "url": 5},
    {"role": "prefill"},
    ["prefill", "http://127.0.0.1:8100"],
    "prefill",
]


@pytest.mark.timeout(60)
def test_register_validates_role_url_host_and_port_without_500s() -> None:
    async def scenario() -> None:
        env = await Env().start()
        async with aiohttp.ClientSession(headers=AUTH) as s:
            for bad in BAD_REGISTRATIONS:
                st, js = await post(s, env.url + "/register", json=bad)
                assert st == 400, (bad, st, js)
                assert isinstance(js["error"]["message"], str)
            st, _ = await post(s, env.url + "/register", data=b"{not json")
            assert st == 400
            assert env.reg is not None
            snap = env.reg.snapshot()
            assert [i["url"] for i in snap["prefill"]] == [env.urls["P"]]
            assert [i["url"] for i in snap["decode"]] == [env.urls["D"]]
            for _ in range(4):  # nothing bad stayed registered: every request is served
                st, js = await post(s, env.url + "/v1/completions", json=COMPLETION)
                assert st == 200 and js["choices"][0]["text"] == "D-out"
        await env.close()

    run(scenario)


@pytest.mark.timeout(60)
def test_register_refuses_the_proxys_own_url() -> None:
    async def scenario() -> None:
        env = await Env().start()
        port = env.proxy.port
        async with aiohttp.ClientSession(headers=AUTH) as s:
            for url in (env.url, f"http://localhost:{port}", f"http://127.0.0.1:{port}/",
                        f"http://127.0.0.2:{port}", f"http://[::1]:{port}", f"http://LOCALHOST:{port}/v1"):
                for role in ("prefill", "decode"):
                    st, js = await post(s, env.url + "/register", json={"role": role, "url": url,
                                                                        "p2pkv": "127.0.0.1:14600"})
                    assert st == 400 and "own address" in js["error"]["message"], (url, st, js)
        await env.close()

    run(scenario)


@pytest.mark.timeout(60)
def test_reregistering_cannot_redirect_an_instances_p2pkv_address() -> None:
    async def scenario() -> None:
        env = await Env().start(register=False)
        d = env.urls["D"]
        async with aiohttp.ClientSession(headers=AUTH) as s:
            assert (await post(s, env.url + "/register", json={"role": "prefill", "url": env.urls["P"]}))[0] == 200
            st, _ = await post(s, env.url + "/register", json={"role": "decode", "url": d, "p2pkv": "127.0.0.1:14600"})
            assert st == 200
            for url in (d, d + "/"):
                st, js = await post(s, env.url + "/register",
                                    json={"role": "decode", "url": url, "p2pkv": "10.6.6.6:14600"})
                assert st == 409 and "cannot be changed" in js["error"]["message"], (url, st, js)
            # the same URL under the other role is refused too
            st, _ = await post(s, env.url + "/register", json={"role": "prefill", "url": d})
            assert st == 409
            # a heartbeat with the same address (or none) is fine
            for p2 in ("127.0.0.1:14600", None):
                st, _ = await post(s, env.url + "/register", json={"role": "decode", "url": d + "/", "p2pkv": p2})
                assert st == 200
            st, js = await post(s, env.url + "/v1/completions", json=COMPLETION)
            assert st == 200
            pre = [b for n, _, b, _, _ in env.seen if n == "P"]
            assert pre[-1]["kv_transfer_params"]["remote_host"] == "127.0.0.1"
            assert pre[-1]["kv_transfer_params"]["remote_port"] == 14600
            async with s.get(env.url + "/instances") as r:
                assert [i["p2pkv"] for i in (await r.json())["decode"]] == ["127.0.0.1:14600"]
        await env.close()

    run(scenario)


@pytest.mark.timeout(60)
def test_too_many_instances_refused() -> None:
    async def scenario() -> None:
        env = await Env().start(register=False, max_instances=3)
        async with aiohttp.ClientSession(headers=AUTH) as s:
            codes = [(await post(s, env.url + "/register",
                                 json={"role": "prefill", "url": f"http://127.0.0.1:{9000 + i}"}))[0] for i in range(5)]
        assert codes == [200, 200, 200, 400, 400]
        await env.close()

    run(scenario)


# ------------------------------------------------------------------ the loop and the connection pool
@pytest.mark.timeout(90)
def test_an_instance_url_that_is_the_proxy_cannot_exhaust_its_pool() -> None:
    """An alias of the proxy's URL the static check cannot see (here: put into the registry
    directly) is cut by the loop header at the first hop; honest requests keep working."""

    async def scenario() -> None:
        lim = ProxyLimits(upstream_connections=8, upstream_connections_per_host=4, timeout_s=5.0)
        env = await Env().start(register=False, limits=lim)
        assert env.reg is not None
        env.reg.register("prefill", env.url)  # as if registered under an alias the check cannot know
        env.reg.register("decode", env.urls["D"], "127.0.0.1:14600")
        t0 = time.monotonic()
        async with aiohttp.ClientSession() as s:
            results = await asyncio.gather(*(post(s, env.url + "/v1/completions", json=COMPLETION)
                                             for _ in range(50)))
            assert all(st in (502, 503) and "error" in js for st, js in results), results[:3]
            assert env.reg.snapshot()["prefill"] == []  # every alias was found out and dropped
            env.reg.register("prefill", env.urls["P"])
            for _ in range(5):
                st, js = await post(s, env.url + "/v1/completions", json=COMPLETION)
                assert st == 200 and js["choices"][0]["text"] == "D-out"
        assert time.monotonic() - t0 < 15
        await env.close()

    run(scenario)


# ------------------------------------------------------------------ static instances: back-off and retry
@pytest.mark.timeout(60)
def test_static_instances_are_backed_off_and_retried_not_dropped() -> None:
    async def scenario() -> None:
        seen: list = []
        p_runner, p_url = await serve(stub("P", seen))
        d_runner, d_url = await serve(stub("D", seen))
        port = int(p_url.rsplit(":", 1)[1])
        reg = Registry(ttl_s=0.3, backoff_s=0.3, max_backoff_s=0.6)
        reg.register("prefill", p_url, static=True)
        reg.register("decode", d_url, "127.0.0.1:14600", static=True)
        proxy = await start_proxy(make_app(reg, register_token=TOKEN))
        async with aiohttp.ClientSession(headers=AUTH) as s:
            assert (await post(s, proxy.url + "/v1/completions", json=COMPLETION))[0] == 200
            await p_runner.cleanup()  # the prefill instance goes away: refused connections
            st, js = await post(s, proxy.url + "/v1/completions", json=COMPLETION)
            assert st == 503
            async with s.get(proxy.url + "/health") as r:
                assert r.status == 503
                assert (await r.json())["prefill"] == {"healthy": 0, "total": 1}
            await asyncio.sleep(1.0)  # longer than the TTL: static instances do not expire
            async with s.get(proxy.url + "/instances") as r:
                snap = await r.json()
            assert [i["url"] for i in snap["prefill"]] == [p_url] and snap["prefill"][0]["static"]
            p_runner, _ = await serve(stub("P", seen), port)  # it comes back on the same address
            deadline = time.monotonic() + 5
            while True:
                st, js = await post(s, proxy.url + "/v1/completions", json=COMPLETION)
                if st == 200:
                    break
                assert st == 503 and time.monotonic() < deadline, (st, js)
                await asyncio.sleep(0.1)
            async with s.get(proxy.url + "/health") as r:
                assert r.status == 200
        await proxy.close()
        await p_runner.cleanup()
        await d_runner.cleanup()

    run(scenario)


# ------------------------------------------------------------------ upstream bodies
def _raw(body: bytes, ctype: str = "application/json") -> Any:
    return lambda req: web.Response(body=body, content_type=ctype)


BAD_PREFILL_REPLIES = [
    _raw(b"<html>oops</html>", "text/html"),
    _raw(b"not json at all"),
    _raw(b"[1, 2, 3]"),
    _raw(b"\"str\""),
    _raw(b"[" * 100000),
    _raw(json.dumps({"kv_transfer_params": "host:1"}).encode()),
    _raw(json.dumps({"kv_transfer_params": [1, 2]}).encode()),
    _raw(json.dumps({"kv_transfer_params": {"remote_port": "\u00b2"}}).encode()),
    _raw(json.dumps({"kv_transfer_params": {"remote_port": "14500"}}).encode()),
    _raw(json.dumps({"kv_transfer_params": {"remote_port": 70000}}).encode()),
    _raw(json.dumps({"kv_transfer_params": {"remote_port": True}}).encode()),
    _raw(json.dumps({"kv_transfer_params": {"remote_host": ["a"]}}).encode()),
    _raw(json.dumps({"kv_transfer_params": {"remote_host": "bad host"}}).encode()),
    _raw(json.dumps({"kv_transfer_params": {"remote_tp_size": "2"}}).encode()),
    _raw(json.dumps({"kv_transfer_params": {"mode": ["push"]}}).encode()),
    _raw(json.dumps({"kv_transfer_params": {"mode": "evil"}}).encode()),
]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("i", range(len(BAD_PREFILL_REPLIES)))
def test_bad_prefill_replies_give_a_502_json_error(i: int) -> None:
    async def scenario() -> None:
        env = await Env().start(reply=BAD_PREFILL_REPLIES[i])
        async with aiohttp.ClientSession() as s:
            st, js = await post(s, env.url + "/v1/completions", json=COMPLETION)
            assert st == 502, (st, js)
            assert "prefill instance" in js["error"]["message"]
        assert not [n for n, *_ in env.seen if n == "D"]  # nothing half-checked went to decode
        await env.close()

    run(scenario)


@pytest.mark.timeout(60)
def test_oversized_prefill_reply_is_refused() -> None:
    async def scenario() -> None:
        big = _raw(json.dumps({"pad": "x" * 200_000}).encode())
        env = await Env().start(reply=big, limits=ProxyLimits(max_upstream_json_bytes=100_000))
        async with aiohttp.ClientSession() as s:
            st, js = await post(s, env.url + "/v1/completions", json=COMPLETION)
            assert st == 502 and "more than" in js["error"]["message"]
        await env.close()

    run(scenario)


# ------------------------------------------------------------------ secrets
@pytest.mark.timeout(60)
def test_no_secret_reaches_an_instance() -> None:
    """Neither the registration token, the client's credentials and cookies, nor fields an
    instance adds to kv_transfer_params (an engine auth token) are forwarded."""

    def leaky(body: dict) -> Any:
        resp = web.json_response({"choices": [{"text": "P"}], "kv_transfer_params": {
            "remote_host": "10.0.0.9", "remote_port": 14500, "mode": "pull", "auth_token": "ENGINE-TOKEN-XYZ",
            "transfer_id": "spoofed"}})
        resp.set_cookie("session", "COOKIE-FROM-PREFILL")
        return resp

    async def scenario() -> None:
        env = await Env().start(reply=leaky)
        async with aiohttp.ClientSession() as s:
            body = dict(COMPLETION, kv_transfer_params={"auth_token": "CLIENT-PARAM-SECRET",
                                                        "remote_host": "10.6.6.6", "remote_port": 1})
            for _ in range(2):
                st, _ = await post(s, env.url + "/v1/completions", json=body,
                                    headers={"Authorization": "Bearer CLIENT-API-KEY", "Cookie": "c=CLIENT-COOKIE",
                                             "X-Api-Key": "CLIENT-X-KEY"})
                assert st == 200
            async with s.post(env.url + "/register", headers=AUTH,
                              json={"role": "prefill", "url": env.urls["P"]}) as r:
                assert r.status == 200
            assert (await post(s, env.url + "/v1/completions", json=COMPLETION))[0] == 200
        assert env.seen
        for name, _, _body, headers, raw in env.seen:
            blob = raw.decode() + json.dumps(headers)
            for secret in (TOKEN, "ENGINE-TOKEN-XYZ", "COOKIE-FROM-PREFILL", "CLIENT-PARAM-SECRET", "CLIENT-API-KEY",
                           "CLIENT-COOKIE", "CLIENT-X-KEY", "10.6.6.6"):
                assert secret not in blob, (name, secret)
            assert "Authorization" not in headers and "Cookie" not in headers
        dec = [b for n, _, b, _, _ in env.seen if n == "D"]
        assert dec[0]["kv_transfer_params"]["remote_host"] == "10.0.0.9"
        assert dec[0]["kv_transfer_params"]["transfer_id"] != "spoofed"
        await env.close()

    run(scenario)


# ------------------------------------------------------------------ /health
@pytest.mark.timeout(60)
def test_health_reports_counts_and_503_without_healthy_instances() -> None:
    async def scenario() -> None:
        env = await Env().start(register=False)
        assert env.reg is not None
        async with aiohttp.ClientSession() as s:
            async with s.get(env.url + "/health") as r:
                assert r.status == 503
                assert await r.json() == {"status": "unavailable", "prefill": {"healthy": 0, "total": 0},
                                          "decode": {"healthy": 0, "total": 0}}
            env.reg.register("prefill", env.urls["P"])
            async with s.get(env.url + "/health") as r:
                assert r.status == 503 and (await r.json())["prefill"] == {"healthy": 1, "total": 1}
            env.reg.register("decode", env.urls["D"], "127.0.0.1:14600")
            async with s.get(env.url + "/health") as r:
                assert r.status == 200
                assert await r.json() == {"status": "ok", "prefill": {"healthy": 1, "total": 1},
                                          "decode": {"healthy": 1, "total": 1}}
            async with s.get(env.url + "/healthz") as r:
                assert r.status == 200
        await env.close()

    run(scenario)


# ------------------------------------------------------------------ slowloris, in process
def _half_open(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        socks.append(c)
    return socks


@pytest.mark.timeout(90)
def test_slowloris_connections_cannot_lock_out_an_honest_client() -> None:
    async def scenario() -> None:
        env = await Env().start(limits=ProxyLimits(max_connections=100, header_timeout_s=30.0))
        loop = asyncio.get_running_loop()
        socks = await loop.run_in_executor(None, _half_open, env.proxy.port, 200)
        try:
            async with aiohttp.ClientSession() as s:
                for _ in range(3):
                    t0 = time.monotonic()
                    st, _ = await asyncio.wait_for(post(s, env.url + "/v1/completions", json=COMPLETION), 10)
                    assert st == 200 and time.monotonic() - t0 < 5
            assert env.proxy.guard.evictions >= 100
        finally:
            for c in socks:
                c.close()
        await env.close()

    run(scenario)


@pytest.mark.timeout(60)
def test_half_sent_request_heads_and_bodies_time_out() -> None:
    async def scenario() -> None:
        env = await Env().start(limits=ProxyLimits(header_timeout_s=1.0, body_timeout_s=1.0))
        loop = asyncio.get_running_loop()

        def probe(extra: bytes) -> float:
            c = socket.create_connection(("127.0.0.1", env.proxy.port), timeout=10)
            c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + extra)
            t0 = time.monotonic()
            try:
                while c.recv(4096):
                    pass
            finally:
                c.close()
            return time.monotonic() - t0

        head = await loop.run_in_executor(None, probe, b"Content-Type: application/json\r\n")
        body = await loop.run_in_executor(None, probe, b"Content-Length: 100\r\n\r\n{\"model\"")
        assert head < 4 and body < 4, (head, body)
        await env.close()

    run(scenario)


@pytest.mark.timeout(60)
def test_oversized_request_body_is_413() -> None:
    async def scenario() -> None:
        env = await Env().start(limits=ProxyLimits(max_body_bytes=10_000))
        async with aiohttp.ClientSession() as s:
            st, js = await post(s, env.url + "/v1/completions", json=dict(COMPLETION, prompt="x" * 20_000))
            assert st == 413 and js["error"]["code"] == 413
        await env.close()

    run(scenario)


# ------------------------------------------------------------------ the command line, as a real process
def _spawn(args: list[str], nofile: int | None = None, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    p = subprocess.Popen([sys.executable, "-m", "p2pkv.proxy", "--port", "0", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=limit,
                         env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 30
    assert p.stdout is not None
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        if "listening on" in line:
            return p, line.strip().rsplit(" ", 1)[1]
    p.kill()
    raise AssertionError(f"proxy did not start: {p.communicate(timeout=10)}")


@contextlib.contextmanager
def _proc(args: list[str], **kw: Any) -> Any:
    p, url = _spawn(args, **kw)
    try:
        yield url
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


@pytest.mark.timeout(60)
def test_cli_listens_on_loopback_by_default_and_serves_health() -> None:
    with _proc([]) as url:
        assert url.startswith("http://127.0.0.1:")

        async def scenario() -> None:
            async with aiohttp.ClientSession() as s:
                async with s.get(url + "/health") as r:
                    assert r.status == 503 and (await r.json())["status"] == "unavailable"
                async with s.post(url + "/register", json={"role": "prefill", "url": "http://127.0.0.1:9"}) as r:
                    assert r.status == 403  # no token configured: registration off

        run(scenario)


@pytest.mark.timeout(60)
def test_cli_takes_the_token_from_the_environment_and_refuses_its_own_url() -> None:
    with _proc([], env={proxy_mod.TOKEN_ENV: TOKEN}) as url:
        async def scenario() -> None:
            async with aiohttp.ClientSession() as s:
                st, _ = await post(s, url + "/register", json={"role": "prefill", "url": "http://127.0.0.1:9"})
                assert st == 401
                st, _ = await post(s, url + "/register", headers=AUTH,
                                   json={"role": "prefill", "url": "http://127.0.0.1:9"})
                assert st == 200
                st, _ = await post(s, url + "/register", headers=AUTH, json={"role": "decode", "url": url})
                assert st == 400

        run(scenario)
    r = subprocess.run([sys.executable, "-m", "p2pkv.proxy", "--port", "18123", "--prefill", "http://localhost:18123"],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 2 and "own address" in r.stderr
    r = subprocess.run([sys.executable, "-m", "p2pkv.proxy", "--decode", "http://127.0.0.1:\u00b2"],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "url must be" in r.stderr, r.stderr


@pytest.mark.timeout(120)
def test_cli_slowloris_with_few_descriptors_keeps_answering() -> None:
    """200 half-sent requests against a proxy process with 128 descriptors: without a cap,
    accept() fails with EMFILE and every honest client stalls; with it, they are answered."""

    async def scenario() -> None:
        seen: list = []
        pr, p_url = await serve(stub("P", seen))
        dr, d_url = await serve(stub("D", seen))
        p, url = _spawn(["--prefill", p_url, "--decode", f"{d_url},127.0.0.1:14600", "--upstream-connections", "8",
                         "--header-timeout", "60"], nofile=128)
        port = int(url.rsplit(":", 1)[1])
        loop = asyncio.get_running_loop()
        socks = await loop.run_in_executor(None, _half_open, port, 200)
        try:
            async with aiohttp.ClientSession() as s:
                for _ in range(3):
                    t0 = time.monotonic()
                    st, js = await asyncio.wait_for(post(s, url + "/v1/completions", json=COMPLETION), 10)
                    assert st == 200 and js["choices"][0]["text"] == "D-out"
                    assert time.monotonic() - t0 < 5
        finally:
            for c in socks:
                c.close()
            p.terminate()
            p.communicate(timeout=10)
            await pr.cleanup()
            await dr.cleanup()

    run(scenario)


# ------------------------------------------------------------------ two proxies in a loop (issue 20 item 10)
def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.hostile2
@pytest.mark.timeout(90)
def test_two_proxies_registered_as_each_others_prefill_do_not_loop() -> None:
    """Any token holder can register two proxies as each other's prefill instance. A request is
    answered at once with an error naming the loop; the fan-out stays a handful of connections,
    none held after the client leaves; honest requests keep working."""

    async def scenario() -> None:
        lim = ProxyLimits(timeout_s=5.0)
        a, b = await Env().start(register=False, limits=lim), await Env().start(register=False, limits=lim)
        for env in (a, b):
            assert env.reg is not None
            env.reg.register("decode", env.urls["D"], "127.0.0.1:14600")
        async with aiohttp.ClientSession() as s:
            for me, other in ((a, b), (b, a)):  # through the API, as a registrant would
                st, js = await post(s, me.url + "/register", headers=AUTH,
                                    json={"role": "prefill", "url": other.url, "p2pkv": "127.0.0.1:14700"})
                assert st == 200, js
            base = _fds()
            peak = [base]
            done = asyncio.Event()

            async def watch() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], _fds())
                    await asyncio.sleep(0.005)

            watcher = asyncio.create_task(watch())
            t0 = time.monotonic()
            st, js = await asyncio.wait_for(post(s, a.url + "/v1/completions", json=COMPLETION), 30)
            took = time.monotonic() - t0
            # and a client that leaves at once: nothing it started stays behind
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(post(s, b.url + "/v1/completions", json=COMPLETION), 0.05)
            await asyncio.sleep(1.0)
            done.set()
            await watcher
            after = _fds()
            print(f"item 10: answered {st} in {took * 1000:.0f} ms; descriptors +{peak[0] - base} at the peak, "
                  f"+{after - base} after")
            assert st in (502, 503, 508) and "error" in js, (st, js)
            assert took < 3, f"the loop took {took:.1f}s to be refused"
            assert peak[0] - base < 64, f"{peak[0] - base} descriptors for one looping request"
            assert after - base < 16
            # the loop is cut; once a real prefill instance is there, requests work again
            for env in (a, b):
                assert env.reg is not None
                env.reg.register("prefill", env.urls["P"])
            ok = 0
            for _ in range(6):
                st, js = await post(s, a.url + "/v1/completions", json=COMPLETION)
                ok += st == 200 and js["choices"][0]["text"] == "D-out"
            assert ok >= 3, "honest requests fail after the loop"
        await a.close()
        await b.close()

    run(scenario)


@pytest.mark.hostile2
@pytest.mark.timeout(60)
def test_the_hop_header_is_checked_and_bounded() -> None:
    async def scenario() -> None:
        env = await Env().start()
        hop = proxy_mod.HOP_HEADER
        async with aiohttp.ClientSession() as s:
            st, js = await post(s, env.url + "/v1/completions", json=COMPLETION,
                                headers={hop: ",".join(f"{i:016x}" for i in range(proxy_mod.MAX_HOPS))})
            assert st == 508 and "hops" in js["error"]["message"], js
            st, js = await post(s, env.url + "/v1/completions", json=COMPLETION, headers={hop: "not an id!"})
            assert st == 400, js
            st, js = await post(s, env.url + "/v1/completions", json=COMPLETION, headers={hop: "00000000000000aa"})
            assert st == 200, js  # one proxy in front of this one is fine
            # the instances see the hops so far, this proxy's id last
            sent = [h for n, _, _, h, _ in env.seen if n == "P"][-1]
            assert sent[hop].split(",")[0] == "00000000000000aa" and len(sent[hop].split(",")) == 2
        await env.close()

    run(scenario)


def test_cli_help_states_each_default_once(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """issue 23: ``--help`` printed "(default ...)" twice for three options and "(default: None)" for flags."""
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exc:
        proxy_mod.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    entries: dict[str, str] = {}
    opt = None
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            opt = line.split()[0].rstrip(",")
            entries[opt] = line
        elif opt is not None:
            entries[opt] += " " + line.strip()
    assert {"--host", "--port", "--instance-ttl", "--timeout", "--max-instances"} <= set(entries), entries
    for entry in entries.values():
        assert entry.count("default") <= 1, entry
        assert "(default: None)" not in entry and "default: False" not in entry and "default: []" not in entry, entry
    for name in ("--host", "--port", "--instance-ttl", "--timeout", "--connect-timeout", "--header-timeout",
                 "--body-timeout", "--max-body-bytes", "--max-connections", "--upstream-connections",
                 "--upstream-connections-per-host", "--max-instances"):
        assert "default: " in entries[name], entries[name]
    assert "default: 127.0.0.1" in entries["--host"] and "default: 8000" in entries["--port"]
