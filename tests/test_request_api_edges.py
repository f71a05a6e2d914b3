"""The request API as a newcomer uses it from the README, at its edges: a RequestLayout that stays what it
was, errors that name the tensor and the request they are about, and same-host one-sided reads asked of a
CPU engine (a typed error, never an AttributeError)."""

import pytest
import torch

from p2pkv import InvalidTensor, RequestLayout
from p2pkv.synthetic import same_bits


def _layers(n=3):
    return [(f"layer{i}", torch.arange(64, dtype=torch.float32).reshape(2, 4, 8) + i) for i in range(n)]


@pytest.mark.timeout(60)
def test_a_request_layout_cannot_be_deleted_from_or_given_its_shared_form(tcp_shm_pair):
    """Setting was refused already; deleting an attribute, or setting the shared-memory form a layout builds
    for itself (an internal that used to be a public, settable name: a bad value crashed send_request with an
    AttributeError), is refused too, and the layout's requests go on unchanged."""
    prod, cons = tcp_shm_pair
    data = _layers()
    lay = RequestLayout([(n, t.dtype, tuple(t.shape)) for n, t in data])
    changes = [lambda: delattr(lay, "names"), lambda: delattr(lay, "specs"), lambda: delattr(lay, "index"),
               lambda: delattr(lay.specs[0], "shape"), lambda: delattr(lay.specs[0], "nbytes"),
               lambda: setattr(lay, "fast", 123), lambda: delattr(lay, "_fast")]
    for k in range(3):  # before and after its shared form was built, and reused
        for change in changes:
            with pytest.raises(AttributeError):
                change()
        assert lay.names == tuple(n for n, _ in data) and lay.specs[0].shape == (2, 4, 8)
        req = prod.send_request(cons.address, f"edges-lay-{k}", lay)
        req.send_all([t for _, t in data])
        req.wait(20)
        with cons.recv_request(f"edges-lay-{k}") as h:
            got = h.wait(20)
            assert all(same_bits(got[n], t) for n, t in data)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["send", "send_many", "send_all"])
def test_a_refused_tensor_is_named_with_its_request(tcp_shm_pair, call):
    """A non-contiguous (or otherwise unusable) tensor handed to a request names which tensor of which request
    it was (the message used to say only 'tensor must be contiguous'); nothing is sent, and the request
    still completes once good tensors are given."""
    prod, cons = tcp_shm_pair
    data = _layers()
    tid = f"edges-named-{call}"
    req = prod.send_request(cons.address, tid, data)
    bad = torch.zeros(2, 8, 4).transpose(1, 2)  # right shape and dtype, not contiguous
    attempt = {"send": lambda: req.send("layer1", bad),
               "send_many": lambda: req.send_many({"layer0": data[0][1], "layer1": bad}),
               "send_all": lambda: req.send_all([data[0][1], bad, data[2][1]])}[call]
    with pytest.raises(InvalidTensor, match="'layer1' must be contiguous") as info:
        attempt()
    assert info.value.key == tid
    with pytest.raises(InvalidTensor, match=r"'layer2' must be a torch\.Tensor") as info:
        req.send("layer2", [1.0])
    assert info.value.key == tid
    req.send_all([t for _, t in data])
    req.wait(20)
    with cons.recv_request(tid) as h:
        got = h.wait(20)
        assert all(same_bits(got[n], t) for n, t in data)


@pytest.mark.timeout(60)
def test_register_memory_refuses_what_it_cannot_serve_with_a_typed_error(pair):
    """register_memory is for CUDA engines: a CPU engine is told so (the message used to read 'a tensor on this
    engine's CUDA device (cpu) is needed, got cpu'), and a non-tensor is an InvalidTensor (it used to be an
    AttributeError from .is_contiguous())."""
    a, _ = pair
    for bad in (None, [1, 2], "kv", 3):
        with pytest.raises(InvalidTensor, match=r"needs a torch\.Tensor"):
            a.register_memory("kv", bad)
    for t in (torch.zeros(4, 4), torch.zeros(4, 4).t()):
        with pytest.raises(InvalidTensor, match="this engine is on cpu; one-sided reads"):
            a.register_memory("kv", t)


@pytest.mark.timeout(120)
def test_a_handle_for_single_sends_times_out_naming_them(tcp_shm_pair):
    """recv_request on a transfer whose tensors came as single sends (no request layout) cannot complete;
    its timeout says which tensors wait there and how to take them, and they stay claimable."""
    import time

    from p2pkv import TransferKey, TransferTimeout

    prod, cons = tcp_shm_pair
    prod.send(cons.address, TransferKey("loose-1", "x"), torch.arange(4.0)).wait(30)
    end = time.monotonic() + 30
    while "x" not in cons._inbox.names_of("loose-1"):
        assert time.monotonic() < end
        time.sleep(0.01)
    h = cons.recv_request("loose-1")
    with pytest.raises(TransferTimeout, match=r"single tensors \('x'\).*recv\(key\)"):
        h.wait(0.5)
    h.release()
    assert same_bits(cons.recv(TransferKey("loose-1", "x"), timeout=10), torch.arange(4.0))
