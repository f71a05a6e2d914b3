"""Against the real vLLM 0.33.0 (skipped without it; CI stage 2 installs it in its own venv): P2pkvConnector
as a drop-in for NixlConnector deployments, and what vLLM's own connector tests expect.

Two real vLLM Schedulers (built by vLLM's KVConnectorFactory from a --kv-transfer-config, as `vllm serve`
does) with CPU KV caches serve OpenAI /v1/completions bodies (turned into SamplingParams by vLLM's own
CompletionRequest); a router that behaves exactly like vLLM's example proxy for NixlConnector
(toy_proxy_server.py) sits in front of them. See tests/vllm_instance.py.
"""

import logging
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

from p2pkv import new_transfer_id  # noqa: E402

from .vllm_instance import FAST, Instance, ToyProxy, free_port, p2pkv_ktc  # noqa: E402

PROMPT = list(range(1, 71))  # 70 tokens: 5 blocks of 16


def _nixl_style(mode="pull", **extra):
    """The only lines of a NixlConnector deployment's --kv-transfer-config that change: the connector, its
    module and p2pkv's port (plus the mode); NIXL deployments use kv_role kv_both on both sides."""
    return p2pkv_ktc("kv_both", dict(FAST, port=free_port(), mode=mode, **extra))


class _VllmLog(logging.Handler):
    """vLLM's own loggers do not propagate to the root logger: listen to them directly."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("vllm").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("vllm").removeHandler(self)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("prefill_mode", ["pull", "push"])
def test_nixl_style_router_on_real_schedulers(prefill_mode, caplog):
    """vLLM's example proxy, unchanged, in front of two p2pkv instances: the prefill engine names the
    transfer, returns everything the decode engine needs, and the decode engine loads it bit-exact
    (a push-mode prefill engine, given no decode address, hands off in pull mode and says so once)."""
    caplog.set_level(logging.WARNING, logger="p2pkv.vllm")
    pre, dec = Instance(_nixl_style(prefill_mode)), Instance(_nixl_style("pull"))
    try:
        proxy = ToyProxy(pre, dec)
        tids = []
        for i in range(2):
            body = {"model": "tiny", "prompt": [t + i for t in PROMPT], "max_tokens": 4, "temperature": 0}
            resp = proxy.completions(body)
            params = proxy.prefill_response["kv_transfer_params"]
            tid = params["transfer_id"]
            assert tid.startswith("xfer-") and tid not in tids
            assert pre.last_request.request_id.split("-")[1] not in tid  # never derived from vLLM's id
            tids.append(tid)
            assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
            assert params["mode"] == "pull" and params["remote_port"] == pre.workers[0].engine.port
            assert dec.last_request.kv_transfer_params["transfer_id"] == tid
            assert resp["finish_reason"] == "length"
            rid = dec.last_request.request_id
            assert dec.check_loaded(rid, len(PROMPT)) == 2 * 5
            # the decode instance computed only the last prompt token (vLLM recomputes it) and the new tokens
            assert dec.computed[rid] <= 1 + body["max_tokens"]
            pre.drain()
        fallback = [r for r in caplog.records if "without the decode engine's address" in r.getMessage()]
        assert len(fallback) == (1 if prefill_mode == "push" else 0)
        loaded = sum(s.data.get("transfers_loaded", 0) for s in dec.stats)
        assert loaded == 2
    finally:
        pre.close()
        dec.close()


@pytest.mark.timeout(300)
def test_decode_request_without_a_p2pkv_prefill_fails_loudly():
    """A decode request whose params came from something else (a NixlConnector prefill: no transfer_id)
    asked for a remote prefill it cannot get: the load fails (vLLM's kv_load_failure_policy "fail": the
    request ends with an error) and says why, never a silent local recompute."""
    dec = Instance(_nixl_style("pull"), policy="fail")
    try:
        nixl_params = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [1, 2, 3],
                       "remote_engine_id": "e1", "remote_request_id": "cmpl-x-1", "remote_host": "127.0.0.1",
                       "remote_port": 5600, "tp_size": 1}
        with _VllmLog():
            resp = dec.serve({"model": "tiny", "prompt": PROMPT, "max_tokens": 4,
                              "kv_transfer_params": nixl_params}, "nixl-1")
        assert resp["finish_reason"] == "error"
        assert not dec.loaded
    finally:
        dec.close()


@pytest.mark.timeout(300)
def test_failed_load_reports_its_blocks_in_the_same_pass():
    """vLLM 0.33's get_transfer_results path: the failed request in failed_recving AND its blocks from
    get_block_ids_with_load_errors in the same pass (as NixlConnector does), so vLLM's scheduler runs its
    "Failing N request(s) due to KV load failure" handling."""
    dec = Instance(_nixl_style("pull"), policy="fail")
    try:
        dead = {"transfer_id": new_transfer_id(), "do_remote_prefill": True, "remote_host": "127.0.0.1",
                "remote_port": free_port(), "mode": "pull"}
        req = dec.add({"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "kv_transfer_params": dead}, "dead-1")
        out = dec.sched.schedule()
        (load,) = out.kv_connector_metadata.loads
        w = dec.workers[0]
        w.bind_connector_metadata(out.kv_connector_metadata)
        w.start_load_kv(None)
        w.clear_connector_metadata()
        deadline = time.monotonic() + 20
        while True:
            res = w.get_transfer_results(set())
            blocks = w.get_block_ids_with_load_errors()
            if res.failed_recving:
                break
            assert not blocks, "block ids reported before the request"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert res.failed_recving == {req.request_id} and blocks == set(load.block_ids[0]) and blocks
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        with _VllmLog() as vlog:
            dec.sched.update_from_output(out, ModelRunnerOutput(
                req_ids=[], req_id_to_index={}, sampled_token_ids=[],
                kv_connector_output=KVConnectorOutput(finished_recving=res.finished_recving,
                                                      failed_recving=res.failed_recving, invalid_block_ids=blocks)))
        assert any("Failing 1 request(s) due to KV load failure" in ln for ln in vlog.lines), vlog.lines
        assert str(req.status) == "RequestStatus.FINISHED_ERROR" or req.is_finished()
    finally:
        dec.close()


@pytest.mark.timeout(300)
def test_decode_request_cancelled_before_it_was_scheduled_frees_the_prefill_copy():
    """The decode request goes away (client disconnect) before vLLM ever scheduled it: the decode side
    tells the prefill side to free the parked KV now, not at ttl_s (as NixlConnector does)."""
    from vllm.v1.request import RequestStatus

    pre = Instance(_nixl_style("pull", ttl_s=300.0))
    dec = Instance(_nixl_style("pull"))
    try:
        resp = pre.serve({"model": "tiny", "prompt": PROMPT, "max_tokens": 1,
                          "kv_transfer_params": {"do_remote_decode": True}}, "rel-1")
        params = resp["kv_transfer_params"]
        eng = pre.workers[0].engine
        deadline = time.monotonic() + 20
        while eng.stats()["outbox"]["held"] < 2:  # the prompt's KV is parked for the decode side
            assert time.monotonic() < deadline
            pre.step()
        req = dec.add({"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "kv_transfer_params": params}, "rel-1")
        dec.sched.finish_requests(req.request_id, RequestStatus.FINISHED_ABORTED)  # before any schedule()
        dec.step()  # the next step carries the release to the decode workers
        deadline = time.monotonic() + 20
        while eng.stats()["outbox"]["held"]:
            assert time.monotonic() < deadline, "the prefill side still holds the transfer"
            time.sleep(0.02)
    finally:
        pre.close()
        dec.close()


# ----------------------------------------------------------------------------- MultiConnector
def _multi(extra):
    return {"kv_connector": "MultiConnector", "kv_role": "kv_both", "kv_connector_extra_config": {"connectors": [
        {"kv_connector": "P2pkvConnector", "kv_connector_module_path": "p2pkv.adapters.vllm", "kv_role": "kv_both",
         "kv_connector_extra_config": extra},
        {"kv_connector": "NoopCacheConnector", "kv_connector_module_path": "tests.vllm_noop_connector",
         "kv_role": "kv_both"}]}}


@pytest.mark.timeout(300)
def test_inside_multiconnector_the_transfer_and_vllms_stats_work():
    """p2pkv beside a cache connector in vLLM's MultiConnector: the transfer is bit-exact, and vLLM's stats
    logger and Prometheus metrics rebuild p2pkv's stats by its registered name (was: ValueError
    "Connector 'P2pkvConnector' is not registered", which ends the async engine's output handler)."""
    import functools

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging
    from vllm.distributed.kv_transfer.kv_connector.v1.multi_connector import MultiConnector

    from p2pkv.adapters.vllm import P2pkvConnector

    assert KVConnectorFactory.get_connector_class_by_name("P2pkvConnector") is P2pkvConnector
    pre = Instance(_multi(dict(FAST, port=free_port(), mode="pull")))
    dec = Instance(_multi(dict(FAST, port=free_port(), mode="pull")))
    try:
        assert isinstance(dec.workers[0], MultiConnector)
        ToyProxy(pre, dec).completions({"model": "tiny", "prompt": PROMPT, "max_tokens": 3})
        assert dec.check_loaded(dec.last_request.request_id, len(PROMPT)) == 2 * 5
        stats = [s for s in dec.stats if "P2pkvConnector" in s.data]
        assert stats, "MultiConnector handed over no p2pkv stats"
        logging_ = KVConnectorLogging(dec.vllm_config.kv_transfer_config)
        for s in stats:
            logging_.observe(s.to_dict())  # what vLLM's stats logger does with each step's payload
        lines = []
        logging_.log(lambda fmt, *a: lines.append(fmt % a))
        assert lines and "transfers_loaded" in lines[0], lines
        reg = CollectorRegistry()  # vLLM's stat logger clears its own registry; a test has its own
        types = {t: functools.partial(t, registry=reg) for t in (Gauge, Counter, Histogram)}
        prom = MultiConnector.build_prom_metrics(dec.vllm_config, types, ["model_name", "engine"],
                                                 {0: ["tiny-multi", "0"]})
        for s in stats:
            prom.observe(s.to_dict(), 0)
        assert reg.get_sample_value("vllm:p2pkv_transfers_loaded_total",
                                    {"model_name": "tiny-multi", "engine": "0"}) == 1
    finally:
        pre.close()
        dec.close()


def test_registration_is_safe_to_repeat_and_importing_touches_nothing():
    code = r"""
import importlib, json, threading
import vllm.distributed.kv_transfer.kv_connector.factory as f
assert "P2pkvConnector" not in f.KVConnectorFactory._registry
before = threading.active_count()
import p2pkv.adapters.vllm as a
importlib.reload(a)  # a second import path / reload: no "already registered" error
from p2pkv.adapters.vllm import register_with_vllm
assert register_with_vllm() and register_with_vllm()
cls = f.KVConnectorFactory.get_connector_class_by_name("P2pkvConnector")
print(json.dumps({"threads": threading.active_count() - before, "name": cls.__name__}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == '{"threads": 0, "name": "P2pkvConnector"}'
