"""The XpYd proxy over real HTTP against two stub OpenAI-compatible servers."""

import asyncio
import json

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from p2pkv.proxy import Registry, make_app  # noqa: E402


def stub(name: str, seen: list):
    async def completions(request):
        body = await request.json()
        seen.append((name, request.path, body))
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(3):
                await resp.write(f"data: {json.dumps({'choices': [{'text': f'tok{i}'}]})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp
        out = {"id": "x", "choices": [{"text": f"{name}-out"}]}
        if body.get("kv_transfer_params", {}).get("do_remote_decode"):
            out["kv_transfer_params"] = {"remote_host": "10.0.0.9", "remote_port": 14500, "mode": "pull"}
        return web.json_response(out)

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    return app


async def _serve(app):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.mark.timeout(60)
def test_proxy_routes_with_one_transfer_id_and_drops_dead_instances():
    async def scenario():
        seen: list = []
        runners = []
        urls = {}
        for name in ("P1", "P2", "D1"):
            r, u = await _serve(stub(name, seen))
            runners.append(r)
            urls[name] = u
        reg = Registry(ttl_s=0.5)
        proxy_runner, purl = await _serve(make_app(reg, register_token="t0ken-for-tests"))
        runners.append(proxy_runner)
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer t0ken-for-tests"}) as s:
            regs = (("P1", "prefill", None), ("P2", "prefill", None), ("D1", "decode", "127.0.0.1:14600"))
            for name, role, p2 in regs:
                async with s.post(purl + "/register", json={"role": role, "url": urls[name], "p2pkv": p2}) as r:
                    assert r.status == 200
            async with s.post(purl + "/register", json={"role": "oops", "url": "x"}) as r:
                assert r.status == 400
            # completions, non-streamed
            for _ in range(2):
                async with s.post(purl + "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 5}) as r:
                    assert r.status == 200
                    assert (await r.json())["choices"][0]["text"] == "D1-out"
                    tid = r.headers["X-P2pkv-Transfer-Id"]
                pre = [b for n, _, b in seen if n.startswith("P") and b["kv_transfer_params"]["transfer_id"] == tid]
                dec = [b for n, _, b in seen if n == "D1" and b["kv_transfer_params"]["transfer_id"] == tid]
                assert len(pre) == 1 and len(dec) == 1
                assert pre[0]["max_tokens"] == 1 and pre[0]["stream"] is False
                assert pre[0]["kv_transfer_params"]["do_remote_decode"] is True
                assert pre[0]["kv_transfer_params"]["remote_port"] == 14600
                assert dec[0]["max_tokens"] == 5 and dec[0]["kv_transfer_params"]["do_remote_prefill"] is True
                assert dec[0]["kv_transfer_params"]["remote_port"] == 14500  # what the prefill returned
            assert {n for n, _, b in seen if n.startswith("P")} == {"P1", "P2"}  # round-robin
            # chat, streamed back chunk by chunk
            async with s.post(purl + "/v1/chat/completions",
                              json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                                    "max_completion_tokens": 9}) as r:
                text = (await r.read()).decode()
                assert r.status == 200 and text.count("data:") == 4 and "[DONE]" in text
            chat_pre = [b for n, p, b in seen if n.startswith("P") and p == "/v1/chat/completions"]
            assert chat_pre[-1]["max_completion_tokens"] == 1 and chat_pre[-1]["stream"] is False
            # a prefill instance that dies is dropped on the first refused connection
            await runners[0].cleanup()
            for _ in range(3):
                async with s.post(purl + "/v1/completions", json={"model": "m", "prompt": "x"}) as r:
                    assert r.status == 200
            async with s.get(purl + "/instances") as r:
                inst = await r.json()
            assert [i["url"] for i in inst["prefill"]] == [urls["P2"]]
            # instances that stop heart-beating expire
            await asyncio.sleep(0.7)
            async with s.get(purl + "/instances") as r:
                assert await r.json() == {"prefill": [], "decode": []}
            async with s.post(purl + "/v1/completions", json={"model": "m", "prompt": "x"}) as r:
                assert r.status == 503
            async with s.post(purl + "/v1/completions", data=b"not json") as r:
                assert r.status == 400
        for r in runners[1:]:
            await r.cleanup()

    asyncio.run(scenario())
