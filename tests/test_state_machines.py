"""State machines of the engine's parts, tested without sockets or threads."""

import pytest
import torch

from p2pkv import InvalidKey, InvalidTensor, PeerLost, ProtocolError, TransferKey, TransferTimeout
from p2pkv.mailbox import Mailbox
from p2pkv.pool import BufferPool
from p2pkv.request import Incoming, ItemSpec, RequestHandle, RequestState, parse_layout, wire_items
from p2pkv.transport.nccl import CommState


class _NoEngine:
    def _request_send(self, req, i, t):
        self.sent = (req, i, t)


def test_request_states_are_final_once_finished():
    specs = parse_layout("t", [("a", torch.zeros(4)), ("b", torch.float16, (2, 2))], 1 << 20)
    req = RequestHandle(_NoEngine(), "h:1", "t", specs, 5.0)
    assert req.state is RequestState.OFFERED and not req.done()
    assert req._set(RequestState.GRANTED)
    assert req._set(RequestState.DONE) and req.done() and req.latency_s >= 0
    assert not req._set(RequestState.FAILED, TransferTimeout("late"))  # final
    assert req.state is RequestState.DONE and req.error is None
    req.wait(0)
    failed = RequestHandle(_NoEngine(), "h:1", "t", specs, 5.0)
    failed._set(RequestState.FAILED, PeerLost("gone"))
    with pytest.raises(PeerLost):
        failed.wait(0)
    with pytest.raises(TransferTimeout):
        RequestHandle(_NoEngine(), "h:1", "t", specs, 5.0).wait(0.01)
    assert [s.finished for s in RequestState] == [False, False, True, True, True]


def test_request_send_checks_name_dtype_shape_before_the_engine():
    eng = _NoEngine()
    req = RequestHandle(eng, "h:1", "t", parse_layout("t", [("a", torch.float32, (4,))], 1 << 20), 5.0)
    with pytest.raises(InvalidKey):
        req.send("zz", torch.zeros(4))
    with pytest.raises(InvalidTensor):
        req.send("a", torch.zeros(3))
    req.send("a", torch.zeros(4))
    assert eng.sent[1] == 0


def test_layout_and_wire_items_validation():
    specs = parse_layout("t", {"x": (torch.bfloat16, (2, 3)), "y": torch.zeros(5, dtype=torch.uint8)}, 1 << 20)
    assert [(s.name, s.nbytes) for s in specs] == [("x", 12), ("y", 5)]
    assert [s.to_wire() for s in wire_items([s.to_wire() for s in specs], 1 << 20)] == [s.to_wire() for s in specs]
    with pytest.raises(InvalidTensor):
        parse_layout("t", [("x", torch.zeros(1 << 10))], 100)  # over max_message_bytes
    for bad in ([], [["x", "float32", [4], 15]], [["x", "float32", [4], 16]] * 2, [["x", "nope", [1], 1]],
                [[1, "float32", [1], 4]], [["x", "float32", [1], True]]):
        with pytest.raises((ProtocolError, InvalidTensor)):
            wire_items(bad, 1 << 20)


def test_incoming_tracks_landings():
    inc = Incoming(object(), 3, "t", [ItemSpec("a", torch.uint8, (4,)), ItemSpec("b", torch.uint8, (4,))], "tcp",
                   1e18, None)
    assert not inc.admitted and not inc.all_landed() and inc.nbytes == 8
    inc.landed[0] = True
    assert not inc.all_landed()
    inc.landed[1] = True
    assert inc.all_landed() and inc.keys == [TransferKey("t", "a"), TransferKey("t", "b")]


def test_mailbox_expect_and_fail_transfer():
    pool = BufferPool(1 << 16)
    box = Mailbox(ttl_s=10)
    box.expect("t", "src")
    assert box.source_lost("src", lambda: PeerLost("lost")) == ["t"]
    with pytest.raises(PeerLost):
        box.claim(TransferKey("t", "a"), 1.0)
    buf = pool.try_alloc(4)
    assert box.deliver(TransferKey("u", "a"), buf, torch.uint8, (4,), src="s") is None
    assert box.has(TransferKey("u", "a"))
    box.fail_transfer("u", lambda: TransferTimeout("deadline"))
    assert box.claim(TransferKey("u", "a"), 1.0).buf is buf  # what arrived stays claimable
    with pytest.raises(TransferTimeout):
        box.claim(TransferKey("u", "b"), 1.0)
    buf.release()
    pool.close()


def test_comm_state_is_a_str_enum():
    assert CommState.READY == "ready" and CommState("init") is CommState.INIT
    assert {s.value for s in CommState} == {"init", "ready", "failed", "closed"}
