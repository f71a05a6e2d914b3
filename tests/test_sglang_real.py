"""p2pkv's SGLang backend against the real sglang 0.5.23 package (skipped without it).

CI installs sglang in its own venv (see .ci/run). The in-process behaviours of tests/test_sglang.py
and its prefill-killed two-process flow run here again with SGLang's real ``KVArgs``/``KVPoll`` and
base classes (the flow takes the backend's classes from SGLang's own ``get_kv_class`` after
:func:`p2pkv.adapters.sglang.install`); the registration itself goes through SGLang's plugin loader
(p2pkv's ``sglang.srt.plugins`` entry point). The ordinary and abort flows are left to the e2e test,
tests/test_sglang_e2e.py, which is the real thing (each spawned flow costs over a minute of sglang
imports on the CI machine): real servers, started with plain ``python -m sglang.launch_server``
(SGLang's launcher loads the plugin before it parses its arguments).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.sglang
pytest.importorskip("sglang")

from p2pkv.adapters import sglang as sg  # noqa: E402

from . import test_sglang as flows  # noqa: E402

# The in-process behaviours of tests/test_sglang.py once more, collected here (marker sglang) so that they run
# where the backend's classes subclass SGLang's real base classes and KVArgs is SGLang's own class.
from .test_sglang import (  # noqa: E402, F401
    test_decode_giving_up_fails_the_prefill_sender_at_once,
    test_decode_kvargs_without_head_counts_learn_them_from_the_prefill,
    test_default_engine_settings_move_a_request, test_plugin_entry_point_is_declared_and_never_raises,
    test_prefill_restarted_first_request_after_works, test_retry_with_the_same_room_works,
    test_send_queues_the_work_and_returns)

REPO = Path(__file__).resolve().parent.parent


def test_backend_subclasses_sglangs_real_base_classes():
    from sglang.srt.disaggregation.base import conn

    assert sg.HAVE_SGLANG
    assert sg.KVPoll is conn.KVPoll and sg.KVArgs is conn.KVArgs
    assert issubclass(sg.P2pkvKVManager, conn.BaseKVManager)
    assert issubclass(sg.P2pkvKVSender, conn.BaseKVSender)
    assert issubclass(sg.P2pkvKVReceiver, conn.BaseKVReceiver)
    assert issubclass(sg.P2pkvBootstrapServer, conn.BaseKVBootstrapServer)
    for cls in (sg.P2pkvKVManager, sg.P2pkvKVSender, sg.P2pkvKVReceiver, sg.P2pkvBootstrapServer):
        assert not getattr(cls, "__abstractmethods__", None), (cls, cls.__abstractmethods__)


def test_install_registers_and_uninstall_restores():
    from sglang.srt.arg_groups import choices
    from sglang.srt.disaggregation import utils
    from sglang.srt.managers import disagg_service  # imported BEFORE install: its binding must be patched too

    sg.uninstall()
    original = utils.get_kv_class
    try:
        sg.install()
        sg.install()  # idempotent
        tb = utils.TransferBackend("p2pkv")
        assert tb is utils.TransferBackend.P2PKV and tb in list(utils.TransferBackend)
        K = utils.KVClassType
        for get in (utils.get_kv_class, disagg_service.get_kv_class):
            assert get(tb, K.MANAGER) is sg.P2pkvKVManager
            assert get(tb, K.SENDER) is sg.P2pkvKVSender
            assert get(tb, K.RECEIVER) is sg.P2pkvKVReceiver
            assert get(tb, K.BOOTSTRAP_SERVER) is sg.P2pkvBootstrapServer
            assert get(tb, K.KVARGS) is sg.KVArgs
            # other backends are untouched
            from sglang.srt.disaggregation.fake import FakeKVSender

            assert get(utils.TransferBackend.FAKE, K.SENDER) is FakeKVSender
        assert "p2pkv" in choices.DISAGG_TRANSFER_BACKEND_CHOICES
        # SGLang's rust-server path asks whether the backend brings its own bootstrap server: it does
        assert disagg_service.rust_server_serves_kv_bootstrap("p2pkv") is False
    finally:
        sg.uninstall()
    assert utils.get_kv_class is original and disagg_service.get_kv_class is original
    assert "p2pkv" not in choices.DISAGG_TRANSFER_BACKEND_CHOICES
    with pytest.raises(ValueError, match="p2pkv"):
        utils.TransferBackend("p2pkv")
    sg.install()  # leave it installed for the flows below (they install in their own processes too)


@pytest.mark.timeout(300)
def test_sglangs_plugin_loader_registers_the_backend_in_a_spawned_process(tmp_path):
    """SGLang spawns its schedulers; each calls sglang.srt.plugins.load_plugins(), which must register p2pkv."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent("""
        import multiprocessing as mp

        def child(q):
            from sglang.srt.plugins import load_plugins
            load_plugins()  # what run_scheduler_process does first
            from sglang.srt.disaggregation.utils import KVClassType, TransferBackend, get_kv_class
            q.put(get_kv_class(TransferBackend("p2pkv"), KVClassType.SENDER).__name__)

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            p = ctx.Process(target=child, args=(q,))
            p.start()
            print(q.get(timeout=250))
            p.join(30)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=290, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "P2pkvKVSender"


def test_bootstrap_server_through_get_kv_class():
    from sglang.srt.disaggregation.utils import KVClassType, TransferBackend, get_kv_class

    sg.install()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = get_kv_class(TransferBackend("p2pkv"), KVClassType.BOOTSTRAP_SERVER)(host="127.0.0.1", port=port)
    try:
        assert server.address == f"127.0.0.1:{port}"
    finally:
        server.close()


@pytest.mark.timeout(180)
def test_real_prefill_killed_midway_fails_decode_fast():
    flows.run_kill(True)
