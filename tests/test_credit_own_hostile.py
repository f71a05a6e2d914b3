"""The receiver's revocation of a session's own unused credit (``crev`` for an offer that only that
credit keeps out; see tests/test_credit_own.py), attacked as a hostile peer would: one that never
answers while it keeps offering and asking for credit, one that answers wrongly or twice, one that
makes the receiver revoke and grant in a loop. Each gets at most one ``crev`` per grant, never more
than its window, and honest senders beside it go on."""

from __future__ import annotations

import threading
import time

import pytest

from p2pkv import Engine
from p2pkv.control.messages import decode, encode

from .conftest import FAST
from .test_hostile2 import _await, _honest_sends, _items, _sync
from .test_wire_robustness import Raw

pytestmark = pytest.mark.timeout(120)

MiB = 2**20
CFG = dict(FAST, pool_bytes=16 * MiB, timeout_s=10.0)  # window: 8 MiB
WINDOW = 8 * MiB


def _assert_accounts(e: Engine) -> None:
    """Every session's charge is within its window and no part of it is negative (read once the
    engine is quiet: no session sends any more)."""
    out = []
    for s in list(e._sessions.values()):
        parts = dict(outstanding=s.outstanding, revoked=s.revoked, eager_held=s.eager_held,
                     reserved=s.reserved, filling=s.filling)
        out.append((parts, e._charge(s)))
    for parts, charge in out:
        assert all(v >= 0 for v in parts.values()), parts
        assert charge <= WINDOW, (charge, parts)


class _Hostile:
    """A raw session that offers requests its credit keeps out, asks for credit again after every
    grant, and answers ``crev`` as told (never, twice, with a wrong amount)."""

    def __init__(self, address: str, answer: str, gap: float = 0.05) -> None:
        self.raw = Raw(address)
        self.answer = answer
        self.gap = gap  # between two offers
        self.grants = self.crevs = self.ogrants = self.oerrs = 0
        self.max_credit = 0  # what it was granted and did not give back, at most
        self.credit = 0
        self.seq = 0
        self.stop = threading.Event()
        self.th = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.raw.hello()
        self.raw.send(encode("creq", need=MiB, want=MiB))
        self.th.start()

    def _offer(self) -> None:
        self.seq += 1
        # fits the window only without the credit it holds (at least a quarter of the window)
        self.raw.send(encode("offer", seq=self.seq, tid=f"own-{self.seq}", items=_items(7, MiB - 4096), x="tcp",
                             to=30.0))

    def _run(self) -> None:
        last = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now - last > self.gap:
                last = now
                self._offer()
                self.raw.send(encode("ping"))
            if not self.raw.s.poll(20):
                continue
            rep = decode(self.raw.s.recv_multipart()[0])
            t = rep["t"]
            if t == "grant":
                self.grants += 1
                self.credit += rep["n"]
                self.max_credit = max(self.max_credit, self.credit)
                self.raw.send(encode("creq", need=MiB, want=MiB))
            elif t == "crev":
                self.crevs += 1
                if self.answer == "never":
                    continue
                n = {"right": min(rep["n"], self.credit), "huge": 2**62, "zero": 0}.get(self.answer, 0)
                self.credit -= min(n, self.credit)
                self.raw.send(encode("cret", n=n))
                if self.answer == "twice":
                    self.raw.send(encode("cret", n=2**62))
            elif t == "ogrant":
                self.ogrants += 1
                self.raw.send(encode("oabort", seq=rep["seq"], msg="again"))  # and again: a grant-revoke loop
            elif t == "oerr":
                self.oerrs += 1

    def close(self) -> None:
        self.stop.set()
        self.th.join(5)
        self.raw.close()


@pytest.mark.parametrize("answer", ["never", "right", "huge", "zero", "twice"])
def test_a_hostile_session_gets_one_revocation_per_grant_and_never_more_than_its_window(answer):
    with Engine(**CFG) as e, Engine(**CFG) as honest:
        h = _Hostile(e.address, answer)
        h.start()
        try:
            ok = _honest_sends(honest, e.address, f"own-{answer}", n=5, nbytes=MiB, timeout=8.0, claim=e)
            time.sleep(2 * CFG["peer_timeout_s"])  # revocations left unanswered time out meanwhile
        finally:
            h.close()
        print(f"{answer}: {h.grants} grants, {h.crevs} crevs, {h.ogrants} offers granted, {h.oerrs} refused; "
              f"{ok}/5 honest sends")
        assert ok == 5
        assert h.crevs <= h.grants, (h.crevs, h.grants)
        assert h.crevs >= 1  # the attack reached the revocation
        raw = Raw(e.address)  # the engine still answers
        try:
            raw.hello()
            _sync(raw)
        finally:
            raw.close()
        _assert_accounts(e)
        st = e.stats()
        assert all(v >= 0 for v in st.values() if isinstance(v, int)), st


def test_an_unanswered_revocation_holds_back_only_its_own_sessions_offers():
    with Engine(**dict(CFG, peer_timeout_s=4.0)) as e:
        h = Raw(e.address)
        other = Raw(e.address)
        try:
            h.hello()
            other.hello()
            h.send(encode("creq", need=MiB, want=MiB))
            g = _await(h, ("grant",), 5)
            assert g is not None and g["n"] >= MiB
            h.send(encode("offer", seq=1, tid="held", items=_items(7, MiB - 4096), x="tcp", to=30.0))
            crev = _await(h, ("crev",), 5)
            assert crev is not None and crev["n"] == g["n"]  # taken back at once, never answered
            t0 = time.monotonic()
            # another session's offer (within its fair share) is not held back by it
            other.send(encode("offer", seq=1, tid="free", items=_items(4, MiB - 4096), x="tcp", to=30.0))
            rep = _await(other, ("ogrant", "oerr"), 5)
            assert rep is not None and rep["t"] == "ogrant", rep
            assert time.monotonic() - t0 < 3.0
            # its own offer waits until the revocation times out (no second crev meanwhile)
            for _ in range(10):
                h.send(encode("ping"))
                time.sleep(0.2)
            reps = _sync(h)
            assert not [r for r in reps if r["t"] in ("crev", "ogrant")], reps
            other.send(encode("oabort", seq=1, msg="done"))
            deadline = time.monotonic() + 10
            got = None
            while got is None and time.monotonic() < deadline:
                h.send(encode("ping"))
                got = _await(h, ("ogrant", "crev"), 0.3)
            assert got is not None and got["t"] == "ogrant", got
        finally:
            h.close()
            other.close()
        _assert_accounts(e)
