"""Hostile peers, round three (issue 20's remaining gaps): what one session or many together can
do beyond items 1-13. Attackers are raw ZMQ sockets on loopback, bounded in count and time; each
test also checks that honest peers keep being served. Run alone with ``-m hostile2``.
"""

from __future__ import annotations


import pytest
import torch

from p2pkv import Engine, InvalidTensor, P2pkvError, RequestState, TransferKey

from .conftest import FAST

pytestmark = pytest.mark.hostile2

K = TransferKey
MiB = 2**20


def _outcome(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except P2pkvError as exc:
        return exc


# ----------------------------------------------------------------------------- a tensor over the peer's max message
@pytest.mark.timeout(90)
@pytest.mark.parametrize("eager", [True, False])
def test_a_request_tensor_over_the_receivers_max_message_is_refused_and_the_connection_survives(eager):
    """A tensor bigger than the receiver's ``max_message_bytes`` (smaller than ours) used to go out as
    one message the receiver's ZMQ refuses by dropping the connection (and everything on it)."""
    with Engine(**dict(FAST, max_message_bytes=MiB)) as consumer, \
            Engine(**dict(FAST, eager_requests=eager)) as producer:
        big = torch.ones(2 * MiB // 4)
        # a first request to a peer not met yet: refused once its limit is known, before it is offered
        req = producer.send_request(consumer.address, "first", [("a", big)])
        err = _outcome(req.send_all, [big]) or _outcome(req.wait, 10)
        assert isinstance(err, InvalidTensor) and str(2 * MiB) in str(err), err
        warm = torch.arange(16, dtype=torch.float32)
        producer.send(consumer.address, K("warm", "0"), warm).wait(10)  # the session is up
        assert torch.equal(consumer.recv(K("warm", "0"), timeout=10), warm)
        before = consumer.stats(), producer.stats()
        for i in range(3):
            try:
                req = producer.send_request(consumer.address, f"big{i}", [("a", big), ("b", torch.ones(4))])
            except InvalidTensor as exc:  # refused at the API boundary
                err = exc
            else:
                err = _outcome(req.send_all, [big, torch.ones(4)]) or _outcome(req.wait, 10)
                assert req.state is RequestState.FAILED, req.state
            assert isinstance(err, InvalidTensor), err
            assert str(2 * MiB) in str(err) and str(MiB) in str(err), err  # names the size and the limit
        # the connection and the session survived: a small request and a push go through at once
        req = producer.send_request(consumer.address, "small", [("a", torch.ones(8))])
        req.send_all([torch.ones(8)])
        req.wait(10)
        assert torch.equal(consumer.recv(K("small", "a"), timeout=10), torch.ones(8))
        producer.send(consumer.address, K("after", "0"), warm).wait(10)
        assert torch.equal(consumer.recv(K("after", "0"), timeout=10), warm)
        after = consumer.stats(), producer.stats()
        print("consumer", {k: (before[0][k], after[0][k]) for k in ("connections", "sessions", "sessions_lost")},
              "producer", {k: (before[1][k], after[1][k]) for k in ("peers", "peers_lost", "requests_eager")})
        for k in ("connections", "sessions", "sessions_lost"):
            assert after[0][k] == before[0][k], k
        assert after[1]["peers_lost"] == before[1]["peers_lost"]
