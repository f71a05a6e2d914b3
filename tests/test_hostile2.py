"""Hostile peers, round two (issue 20): each attacker is a raw ZMQ socket, a raw TCP socket speaking
ZMTP, or a real process, on loopback, bounded in count and time. Run alone with ``-m hostile2``.

Items 1-7 attack the whole-request protocol and credit as the wire has them today; they are
expected to fail until the data plane is rewritten (``xfail``, not strict). Items 8-13 are fixed.
"""

from __future__ import annotations

import time

import pytest
import torch

from p2pkv import Engine, P2pkvError, TransferAborted, TransferKey
from p2pkv.control.messages import decode, encode

from .conftest import FAST
from .test_wire_robustness import Raw, still_serves

pytestmark = pytest.mark.hostile2

K = TransferKey


def _sync(raw: Raw, timeout: float = 20.0) -> None:
    """Wait until the engine handled everything ``raw`` sent before (its pong comes after)."""
    raw.send(encode("ping"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if raw.s.poll(200) and decode(raw.s.recv_multipart()[0])["t"] == "pong":
            return
    raise AssertionError("the engine did not answer a ping")


def _outcome(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except P2pkvError as exc:
        return exc


# ----------------------------------------------------------------------------- item 8: abort records
@pytest.mark.timeout(90)
def test_item8_abort_records_of_one_peer_survive_other_sessions_aborts():
    with Engine(**FAST) as e, Engine(**FAST) as honest, Engine(**FAST) as late:
        t = torch.ones(4)
        honest.send(e.address, K("warm", "0"), t).wait(5)  # honest has a session at e
        e.recv(K("warm", "0"), timeout=5)
        honest.abort("T")  # ...and aborts T: e keeps a record of it, budgeted to that session
        deadline = time.monotonic() + 5
        while not isinstance(_outcome(e.recv, K("T", "probe"), timeout=0.05), TransferAborted):
            assert time.monotonic() < deadline, "e never learnt of the abort"
        raws = []
        try:
            for i in range(64):  # 64 other sessions each abort one junk id
                raw = Raw(e.address)
                raws.append(raw)
                raw.hello()
                raw.send(encode("abort", tid=f"junk-{i}"))
            for raw in raws:
                _sync(raw)
        finally:
            for raw in raws:
                raw.close()
        # T's record survived: late data for T is refused, a late recv is told why
        h = late.send(e.address, K("T", "late"), t)
        with pytest.raises(TransferAborted):
            h.wait(5)
        assert isinstance(_outcome(e.recv, K("T", "late"), timeout=0.5), TransferAborted)
        assert e.stats()["inbox"]["held"] == 0
        still_serves(e, honest, "abort8")


def test_item8_peer_abort_budgets_are_never_spent_by_others():
    from p2pkv._aborts import PeerTombs

    def make():
        return TransferAborted("x")

    tombs = PeerTombs(cap=100, per_src=10)
    tombs.put("honest", "T", 60, make)
    for i in range(50):  # a peer with many records only pushes out its own beyond its budget
        tombs.put("greedy", f"g{i}", 60, make)
    assert tombs.count("greedy") == 10 and tombs.get("g49") is not None and tombs.get("g0") is None
    for i in range(10_000):  # many sessions with one junk record each, far beyond the cap
        tombs.put(("junk", i), f"j{i}", 60, make)
    # the heaviest peer paid for the flood; the honest one, holding fewer, kept its record
    assert tombs.get("T") is not None and len(tombs) <= 100 and tombs.count("greedy") <= 1
    tombs.expire(time.monotonic() + 61)
    assert len(tombs) == 0 and tombs.peers() == 0 and tombs.get("T") is None
