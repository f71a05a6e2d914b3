"""Hostile peers, round two (issue 20): each attacker is a raw ZMQ socket, a raw TCP socket speaking
ZMTP, or a real process, on loopback, bounded in count and time. Run alone with ``-m hostile2``.

Items 1-7 attack the whole-request protocol (offers) and credit; items 8-13 the rest. Every case
failed before its fix and is a regression test now.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq

from p2pkv import Engine, P2pkvError, TransferAborted, TransferKey
from p2pkv.control.messages import decode, encode

from .conftest import FAST, outcome
from .test_wire_robustness import Raw, still_serves

pytestmark = pytest.mark.hostile2

K = TransferKey


def _sync(raw: Raw, timeout: float = 20.0) -> list[dict]:
    """Wait until the engine handled everything ``raw`` sent before (its pong comes after); return
    the other replies that came meanwhile."""
    raw.send(encode("ping"))
    deadline = time.monotonic() + timeout
    replies = []
    while time.monotonic() < deadline:
        if raw.s.poll(200):
            rep = decode(raw.s.recv_multipart()[0])
            if rep["t"] == "pong":
                return replies
            if rep["t"] == "err" and rep["code"] == "no_session":
                raise AssertionError(f"the engine dropped the session: {replies[-3:]}")
            replies.append(rep)
    raise AssertionError("the engine did not answer a ping")


# ----------------------------------------------------------------------------- item 8: abort records
@pytest.mark.timeout(90)
def test_item8_abort_records_of_one_peer_survive_other_sessions_aborts():
    # 64 raw sessions stay alive on a loaded box; with the honest ones, 66 from loopback (one peer)
    slow = dict(FAST, timeout_s=20.0, peer_timeout_s=10.0, max_sessions_per_peer=80)
    with Engine(**slow) as e, Engine(**FAST) as honest, Engine(**FAST) as late:
        t = torch.ones(4)
        honest.send(e.address, K("warm", "0"), t).wait(5)  # honest has a session at e
        e.recv(K("warm", "0"), timeout=5)
        honest.abort("T")  # ...and aborts T: e keeps a record of it, budgeted to that session
        deadline = time.monotonic() + 5
        while not isinstance(outcome(e.recv, K("T", "probe"), timeout=0.05), TransferAborted):
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
        assert isinstance(outcome(e.recv, K("T", "late"), timeout=0.5), TransferAborted)
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


# ----------------------------------------------------------------------------- item 9: the `local` proof
class _Listener:
    """A raw ROUTER that answers an engine's hello as a (hostile) engine would, and keeps it."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.ROUTER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.address = f"127.0.0.1:{self.s.bind_to_random_port('tcp://127.0.0.1')}"
        self.hello: dict = {}
        self.ident = b""

    def answer(self, eid: str, caps: dict, timeout: float = 5.0) -> None:
        assert self.s.poll(int(timeout * 1000)), "no hello"
        frames = self.s.recv_multipart()
        self.ident, self.hello = frames[0], decode(frames[1])
        assert self.hello["t"] == "hello"
        self.s.send_multipart([self.ident, encode("hok", eid=eid, align=256, window=2**30, maxmsg=2**31,
                                                  pool=2**30, caps=caps)])

    def close(self) -> None:
        self.s.close(0)
        self.ctx.term()


def _dial(e: Engine, listener: _Listener, eid: str, caps: dict) -> None:
    th = threading.Thread(target=listener.answer, args=(eid, caps), daemon=True)
    th.start()
    e.connect(listener.address, timeout=5)
    th.join(5)


def _session_of(e: Engine, eid: str, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for sess in list(e._sessions.values()):
            if sess.eid == eid:
                return sess
        time.sleep(0.01)
    raise AssertionError(f"no session claiming {eid}")


@pytest.mark.timeout(60)
def test_item9_what_an_engine_tells_a_peer_cannot_be_replayed_to_it():
    from p2pkv._engine.state import _LOCAL_ARENAS, _local_arena

    with Engine(**FAST) as v:
        _LOCAL_ARENAS[v.eid] = torch.zeros(16, dtype=torch.uint8)  # as a CUDA engine has
        spy, fake = _Listener(), _Listener()
        raw = Raw(v.address)
        try:
            _dial(v, spy, "spy", {})  # v dials a peer: its hello is all that peer learns
            seen = spy.hello["caps"]
            # replayed to v as a dialer claiming v's id: no direct access to v's arena
            raw.send(encode("hello", eid=v.eid, host=spy.hello["host"], pid=spy.hello["pid"], dev="cpu", caps=seen))
            assert raw.reply()["t"] == "hok"
            sess = _session_of(v, v.eid)
            assert _local_arena(sess.eid, sess.caps) is None
            # replayed as a server's answer: v does not take the fake server for itself
            _dial(v, fake, v.eid, seen)
            p = v._peers[fake.address]
            assert p.eid == v.eid and not v._is_self(p) and _local_arena(p.eid, p.caps) is None
        finally:
            raw.close()
            spy.close()
            fake.close()
            del _LOCAL_ARENAS[v.eid]


@pytest.mark.timeout(60)
def test_item9_a_peer_in_the_middle_cannot_relay_two_local_engines_handshakes():
    from p2pkv._engine.state import _LOCAL_ARENAS, _local_arena

    with Engine(**FAST) as v, Engine(**FAST) as w:
        _LOCAL_ARENAS[v.eid] = torch.zeros(16, dtype=torch.uint8)
        _LOCAL_ARENAS[w.eid] = torch.zeros(16, dtype=torch.uint8)
        mitm = _Listener()
        ctx = zmq.Context()
        d = ctx.socket(zmq.DEALER)
        try:
            # w dials the attacker, which answers as v; the attacker dials v as w, with w's routing id
            _dial(w, mitm, v.eid, {"transports": ["tcp"], "pid": mitm.hello.get("pid", 0)})
            d.setsockopt(zmq.LINGER, 0)
            d.setsockopt(zmq.ROUTING_ID, mitm.ident)
            d.connect(f"tcp://{v.address}")
            h = mitm.hello
            d.send(encode("hello", eid=w.eid, host=h["host"], pid=h["pid"], dev=h["dev"], caps=h["caps"]))
            assert d.poll(5000) and decode(d.recv())["t"] == "hok"
            sess = _session_of(v, w.eid)
            time.sleep(0.2)
            assert _local_arena(w.eid, sess.caps) is None  # v does not read w's arena for the attacker
            p = w._peers[mitm.address]
            assert _local_arena(v.eid, p.caps) is None  # nor does w write into v's for it
            # the real thing still works: v dials w directly, and itself
            v.connect(w.address, timeout=5)
            assert _local_arena(w.eid, v._peers[w.address].caps) is not None
            deadline = time.monotonic() + 5
            while True:
                sess = [s for s in w._sessions.values() if s.eid == v.eid]
                if sess and _local_arena(v.eid, sess[0].caps) is not None:
                    break
                assert time.monotonic() < deadline, "w never found v's session local"
                time.sleep(0.01)
            v.connect(v.address, timeout=5)
            assert v._is_self(v._peers[v.address])
        finally:
            d.close(0)
            mitm.close()
            ctx.term()
            del _LOCAL_ARENAS[v.eid], _LOCAL_ARENAS[w.eid]


# ----------------------------------------------------------------------------- item 11: parked pulls
def _push_ms(sender: Engine, receiver: Engine, tag: str, n: int = 30) -> float:
    """Median milliseconds of an honest push (send until acknowledged); every one is delivered."""
    t = torch.arange(256, dtype=torch.float32)
    sender.send(receiver.address, K(f"{tag}-warm", "0"), t, timeout=10).wait(10)
    receiver.recv(K(f"{tag}-warm", "0"), timeout=10)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        sender.send(receiver.address, K(f"{tag}-{i}", "0"), t, timeout=10).wait(10)
        times.append(time.perf_counter() - t0)
        assert torch.equal(receiver.recv(K(f"{tag}-{i}", "0"), timeout=10), t)
    times.sort()
    return 1000 * times[len(times) // 2]


def _within_twice(base_ms: float, attacked_ms: float, what: str = "") -> None:
    """Reports the honest latency during an attack. Tests assert behaviour, not speed (every honest push
    was delivered within its deadline: ``_push_ms`` raises otherwise); the latency goal ("within 2x its
    normal latency") is measured by ``benchmarks/io_attack_profile.py`` (victim, honest sender and attacker
    each in a process of its own) and recorded in docs/security.md."""
    print(f"{what}: honest push median {base_ms:.2f} ms, {attacked_ms:.2f} ms under attack")


@pytest.mark.timeout(120)
def test_item11_parked_pulls_are_capped_per_session():
    from p2pkv._engine import pull

    cap = getattr(pull, "MAX_PARKED_PER_SESSION", 1024)
    with Engine(**dict(FAST, timeout_s=10.0, peer_timeout_s=8.0)) as e, Engine(**FAST) as honest:
        base = _push_ms(honest, e, "base")
        raw = Raw(e.address)
        try:
            raw.hello()
            n = 50_000
            replies = []
            for i in range(n):  # keys nobody will publish, each pull waiting as long as it may
                raw.send(encode("pull", seq=i + 1, key=["parked", str(i)], to=60.0, x="tcp"))
                while i % 256 == 0 and raw.s.poll(0):  # (read as it goes: the engine drops replies
                    replies.append(decode(raw.s.recv_multipart()[0]))  # beyond 10,000 unread ones)
            replies += _sync(raw, timeout=60)
            refused = sum(rep["t"] == "perr" and rep["code"] == "pool_exhausted" for rep in replies)
            attacked = _push_ms(honest, e, "attacked")
            print(f"item 11: {refused} of {n} pulls refused; {len(e._parked)} parked; honest push "
                  f"{base:.2f} -> {attacked:.2f} ms")
            assert refused == n - cap, refused  # the rest were told at once, typed
            assert len(e._parked) == cap
            e.publish(K("parked", "7"), torch.ones(2))  # a parked pull is still served
            deadline = time.monotonic() + 5
            got = None
            while got is None and time.monotonic() < deadline:
                if raw.s.poll(200):
                    frames = raw.s.recv_multipart()
                    rep = decode(frames[0])
                    if rep["t"] == "pdata":
                        got = rep
            assert got is not None and got["seq"] == 8
        finally:
            raw.close()
        deadline = time.monotonic() + 5
        while len(e._parked) and time.monotonic() < deadline:  # its session ended: its pulls went with it
            time.sleep(0.05)
        assert len(e._parked) == 0
        _within_twice(base, attacked, "item 11")


# ----------------------------------------------------------------------------- a raw ZMTP peer
class Zmtp:
    """A peer speaking ZMTP 3.0 over a plain TCP socket (one descriptor, no ZMQ): it can do what
    libzmq never does, e.g. send a message whose frames never end."""

    def __init__(self, address: str, token: str | None = None, source: str | None = None,
                 rid: bytes = b"", timeout: float = 5.0) -> None:
        import socket

        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        mech = b"PLAIN" if token is not None else b"NULL"
        self.sock.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + mech.ljust(20, b"\0") + b"\0" * 32)
        self._exact(64)
        props = self._prop(b"Socket-Type", b"DEALER") + self._prop(b"Identity", rid)
        if token is not None:
            tok = token.encode()
            self._command(b"\x05HELLO" + b"\x05p2pkv" + bytes([len(tok)]) + tok)
            assert self._frame()[1].startswith(b"\x07WELCOME")
            self._command(b"\x08INITIATE" + props)
        else:
            self._command(b"\x05READY" + props)
        assert self._frame()[1].startswith(b"\x05READY")

    @staticmethod
    def _prop(name: bytes, value: bytes) -> bytes:
        return bytes([len(name)]) + name + len(value).to_bytes(4, "big") + value

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed by the engine")
            buf += chunk
        return buf

    def _frame(self) -> tuple[int, bytes]:
        flags = self._exact(1)[0]
        size = int.from_bytes(self._exact(8 if flags & 2 else 1), "big")
        return flags, self._exact(size)

    def _command(self, body: bytes) -> None:
        self.sock.sendall(self._head(0x04, len(body)) + body)

    @staticmethod
    def _head(flags: int, size: int) -> bytes:
        return bytes([flags | 0x02]) + size.to_bytes(8, "big") if size > 255 else bytes([flags, size])

    def send(self, *frames: bytes, more: bool = False) -> None:
        """One message of ``frames`` (``more``: its last frame says more will follow)."""
        for i, f in enumerate(frames):
            self.sock.sendall(self._head(1 if more or i < len(frames) - 1 else 0, len(f)) + f)

    def recv(self, timeout: float = 5.0) -> list[bytes]:
        """The next message (ZMTP commands such as PING are answered or skipped)."""
        self.sock.settimeout(timeout)
        parts = []
        while True:
            flags, body = self._frame()
            if flags & 0x04:
                if body.startswith(b"\x04PING"):
                    ctx = body[7:]
                    self._command(b"\x04PONG" + ctx)
                continue
            parts.append(body)
            if not flags & 1:
                return parts

    def hello(self, token: str | None = None) -> dict:
        fields = dict(eid="zmtp", host="h", pid=1, dev="cpu", caps={})
        if token is not None:
            fields["tok"] = token
        self.send(encode("hello", **fields))
        return decode(self.recv()[0])

    def close(self) -> None:
        self.sock.close()


# ----------------------------------------------------------------------------- item 12: descriptors
_FD_CHILD = r"""
import resource, sys, torch
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from p2pkv import Engine, TransferKey as K
e = Engine(timeout_s=120.0, peer_timeout_s=120.0, heartbeat_s=1.0, pool_bytes=8 * 2**20, auth_token=sys.argv[1])
print(e.address, flush=True)
for rnd in range(2):
    t, src = e.recv(K(f"fd{rnd}", "in"), timeout=60), sys.stdin.readline().strip()
    e.send(src, K(f"fd{rnd}", "out"), t * 2).wait(20)  # a fresh dial out: there are descriptors left
    print("OK", rnd, flush=True)
print("SHED", e.stats().get("connections_shed", 0), flush=True)
e.close()
"""


def _open_idle(address: str, token: str, source: str, n: int) -> list:
    """``n`` authenticated connections that then sit idle (kept open whatever the engine does)."""
    idle: list = []
    failed = 0
    for _ in range(n):
        try:
            z = Zmtp(address, token=token, source=source, timeout=1)
            idle.append(z)
            z.hello(token)
            failed = 0
        except (OSError, AssertionError, ConnectionError):
            failed += 1
            if failed >= 3:  # it takes no more (full, or shedding): stop early
                break
    return idle


def _alive(idle: list) -> int:
    n = 0
    for z in idle:
        try:
            z.send(encode("ping"))
            n += decode(z.recv(timeout=3)[0])["t"] == "pong"
        except (OSError, ConnectionError):
            pass
    return n


@pytest.mark.timeout(180)
def test_item12_idle_authenticated_connections_cannot_take_every_descriptor():
    import subprocess
    import sys

    from p2pkv._engine import state

    per_host = getattr(state, "_MAX_CONNS_PER_HOST", 128)
    tok = "fd-test-token"
    cfg = dict(FAST, timeout_s=20.0, peer_timeout_s=10.0, auth_token=tok)
    with Engine(**cfg) as first, Engine(**cfg) as second:
        child = subprocess.Popen([sys.executable, "-c", _FD_CHILD, tok], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        idle: list = []
        try:
            address = child.stdout.readline().strip()
            assert address, "the child engine did not start"
            # one hostile address opens 300 idle authenticated connections (its limit is 256 fds)...
            idle += _open_idle(address, tok, "127.0.0.2", 300)
            t = torch.arange(1024, dtype=torch.float32)
            first.send(address, K("fd0", "in"), t).wait(20)  # ...and an honest peer connects and pushes
            child.stdin.write(first.address + "\n")
            child.stdin.flush()
            assert torch.equal(first.recv(K("fd0", "out"), timeout=20), t * 2)
            assert child.stdout.readline().split() == ["OK", "0"]
            held = _alive(idle)
            print(f"item 12: {held} of 300 idle connections from one address held")
            assert held <= per_host
            # ten more hostile addresses fill the rest; an honest newcomer still gets in
            for i in range(3, 13):
                idle += _open_idle(address, tok, f"127.0.0.{i}", 30)
            second.send(address, K("fd1", "in"), t).wait(20)
            child.stdin.write(second.address + "\n")
            child.stdin.flush()
            assert torch.equal(second.recv(K("fd1", "out"), timeout=20), t * 2)
            assert child.stdout.readline().split() == ["OK", "1"]
            shed = child.stdout.readline().split()
            assert shed[0] == "SHED" and int(shed[1]) > 0, shed
            assert child.wait(20) == 0
        finally:
            for z in idle:
                z.close()
            if child.poll() is None:
                child.kill()
                child.wait(5)


# ----------------------------------------------------------------------------- item 13: endless message
def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _send_ms(sender: Engine, address: str, tag: str, n: int = 20) -> float:
    """Median milliseconds of honest pushes to ``address`` (until acknowledged: delivered)."""
    t = torch.arange(256, dtype=torch.float32)
    sender.send(address, K(f"{tag}-warm", "0"), t, timeout=10).wait(10)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        sender.send(address, K(f"{tag}-{i}", "0"), t, timeout=10).wait(10)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * times[len(times) // 2]


@pytest.mark.timeout(120)
def test_item13_an_endless_message_after_authentication_is_cut_off():
    from p2pkv.testing import RemoteEngine

    tok = "endless-token"
    cfg = dict(FAST, auth_token=tok, pool_bytes=16 * 2**20, max_message_bytes=2**20, ttl_s=60.0)
    with RemoteEngine(**cfg) as r, Engine(**dict(FAST, auth_token=tok)) as honest:
        base = _send_ms(honest, r.address, "base")
        time.sleep(0.5)
        rss0 = _rss_mib(r.proc.pid)
        cap = 200 * 2**20  # per connection; two connections, as in the issue
        sent = [0, 0]
        socks: list = []

        def attack(i: int) -> None:
            z = Zmtp(r.address, token=tok)
            socks.append(z)
            assert z.hello(tok)["t"] == "hok"
            frame = b"\7" * 2**20  # each frame within max_message_bytes; the message never ends
            deadline = time.monotonic() + 20
            try:
                while sent[i] < cap and time.monotonic() < deadline:
                    z.send(frame, more=True)
                    sent[i] += len(frame)
            except OSError:
                pass  # the engine cut the connection

        threads = [threading.Thread(target=attack, args=(i,), daemon=True) for i in range(2)]
        for th in threads:
            th.start()
        attacked = _send_ms(honest, r.address, "attacked")  # honest pushes while it goes on
        for th in threads:
            th.join(30)
        time.sleep(0.5)
        grown = _rss_mib(r.proc.pid) - rss0  # the attack's sockets are still open
        st = r.call("stats")
        for z in socks:
            z.close()
        print(f"item 13: {sent[0] >> 20} + {sent[1] >> 20} MiB sent in endless messages; engine RSS "
              f"+{grown:.0f} MiB; honest push {base:.2f} -> {attacked:.2f} ms")
        assert max(sent) < cap, "the engine kept buffering an endless message"
        assert grown < 120, f"engine RSS grew {grown:.0f} MiB"
        assert st.get("connections_overbuffered", 0) == 2
        # Behaviour, not speed: every honest push during the attack was delivered in time (_send_ms
        # raises otherwise). While the attack lasts the engine takes its bytes at loopback speed
        # (0.5 -> 4-25 ms on a loaded 2-core box), until the bound above cuts it off.
        _send_ms(honest, r.address, "after", n=5)  # and after it, too


class _ZmtpServer:
    """A listening peer speaking ZMTP 3.0 (NULL security) over a plain TCP socket."""

    def __init__(self) -> None:
        import socket

        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(4)
        self.address = f"127.0.0.1:{self.lsock.getsockname()[1]}"

    def accept(self, timeout: float = 5.0) -> Zmtp:
        self.lsock.settimeout(timeout)
        sock, _ = self.lsock.accept()
        sock.settimeout(timeout)
        z = Zmtp.__new__(Zmtp)
        z.sock = sock
        z.sock.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + b"\1" + b"\0" * 31)
        z._exact(64)
        z._command(b"\x05READY" + Zmtp._prop(b"Socket-Type", b"ROUTER"))
        assert z._frame()[1].startswith(b"\x05READY")
        return z

    def close(self) -> None:
        self.lsock.close()


@pytest.mark.timeout(60)
def test_item13_an_endless_reply_from_a_peer_we_dialed_is_cut_off():
    with Engine(**dict(FAST, max_message_bytes=2**20, timeout_s=10.0)) as e:
        server = _ZmtpServer()
        got: list = []
        puller = threading.Thread(target=lambda: got.append(outcome(e.pull, server.address, K("endless", "0"),
                                                                     timeout=8)), daemon=True)
        puller.start()
        z = server.accept()
        sent = 0
        try:
            hello = decode(z.recv()[0])
            assert hello["t"] == "hello"
            z.send(encode("hok", eid="evil", align=256, window=2**20, maxmsg=2**20, pool=2**20, caps={}))
            frame = b"\7" * 2**20
            deadline = time.monotonic() + 10
            while sent < 300 * 2**20 and time.monotonic() < deadline:
                z.send(frame, more=True)
                sent += len(frame)
        except OSError:
            pass  # the engine cut the connection
        finally:
            z.close()
            server.close()
        puller.join(15)
        print(f"item 13: {sent >> 20} MiB of an endless reply sent")
        assert sent < 300 * 2**20, "the engine kept buffering an endless reply"
        assert got and isinstance(got[0], P2pkvError), got
        assert e.stats().get("connections_overbuffered", 0) == 1


# ============================================================================= items 1-7: offers and credit
# Each attack also checks that the engine keeps serving honest peers meanwhile.
MiB = 2**20


def _await(raw: Raw, types: tuple[str, ...], timeout: float) -> dict | None:
    """The next reply of one of ``types`` (others are skipped), or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not raw.s.poll(int(left * 1000)):
            return None
        rep = decode(raw.s.recv_multipart()[0])
        if rep["t"] in types:
            return rep


def _push(raw: Raw, seq: int, key: list[str], n: int) -> None:
    raw.send(encode("data", seq=seq, key=key, dt="uint8", sh=[n], n=n, x="tcp"), b"\1" * n)


def _granted(raw: Raw, n: int, timeout: float = 1.0) -> int:
    """Ask for ``n`` bytes of credit; the bytes granted (0: none within ``timeout``)."""
    raw.send(encode("creq", need=n, want=n))
    rep = _await(raw, ("grant", "err"), timeout)
    return rep["n"] if rep is not None and rep["t"] == "grant" else 0


class _Pusher:
    """A raw session pushing pieces as an honest sender would: within the credit it was granted."""

    def __init__(self, raw: Raw) -> None:
        self.raw, self.credit, self.seq, self.pushed = raw, 0, 0, 0

    def push(self, key: list[str], n: int, timeout: float = 1.0) -> bool:
        fp = -(-n // 256) * 256
        if self.credit < fp:
            self.credit += _granted(self.raw, fp - self.credit, timeout)
            if self.credit < fp:
                return False
        self.credit -= fp
        self.seq += 1
        _push(self.raw, self.seq, key, n)
        self.pushed += n
        return True


def _honest_sends(sender: Engine, address: str, tag: str, n: int = 5, nbytes: int = MiB,
                  timeout: float = 3.0, claim: Engine | None = None) -> int:
    """How many of ``n`` honest pushes of ``nbytes`` got through (each within ``timeout``); with
    ``claim`` (the receiver), each is claimed there as an honest consumer does (unclaimed data counts
    against its sender's credit window)."""
    ok = 0
    for i in range(n):
        try:
            t = torch.full((nbytes,), i, dtype=torch.uint8)
            sender.send(address, K(f"{tag}-{i}", "0"), t, timeout=timeout).wait(timeout + 2)
            if claim is not None:
                assert torch.equal(claim.recv(K(f"{tag}-{i}", "0"), timeout=timeout), t)
            ok += 1
        except P2pkvError:
            pass
    return ok


class _KeepAlive:
    """Pings from a raw session in the background, so the engine never finds it silent."""

    def __init__(self, raw: Raw) -> None:
        self.raw, self.stop = raw, threading.Event()
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            self.raw.send(encode("ping"))

    def close(self) -> None:
        self.stop.set()
        self.th.join(2)


def _items(n: int, size: int) -> list:
    return [[f"t{i}", "uint8", [size], size] for i in range(n)]


@pytest.mark.timeout(90)
def test_item1_allocations_outside_the_pool_stay_bounded():
    with Engine(**dict(FAST, pool_bytes=16 * MiB)) as e:
        raw = Raw(e.address)
        try:
            raw.hello()
            p = _Pusher(raw)
            for i in range(512):  # fill the pool with 64 KiB pieces of two transfers, alternating
                if not p.push(["A" if i % 2 else "B", str(i)], 64 * 1024):
                    break
            raw.send(encode("abort", tid="A"))  # half the pool is free again, in 64 KiB holes
            _sync(raw)
            for j in range(48):  # then 1 MiB pieces: none fits a hole
                if not p.push(["C", str(j)], MiB):
                    break
            _sync(raw)
            pool = e.stats()["pool"]
        finally:
            raw.close()
        print(f"item 1: {pool['overflow_in_use'] / MiB:.0f} MiB held outside a {pool['capacity'] / MiB:.0f} MiB pool")
        assert pool["in_use"] + pool["overflow_in_use"] <= pool["capacity"], pool


@pytest.mark.timeout(120)
def test_item1_overflow_buffers_use_up_the_room_credit_is_granted_from():
    """As above with three sessions, so that no one session's window bounds what it finds: two fill
    the pool in 64 KiB pieces of two transfers each and abort one of them (half the pool is free in
    64 KiB holes), then all three push 1 MiB pieces (none fits a hole: overflow buffers)."""
    with Engine(**dict(FAST, pool_bytes=16 * MiB, timeout_s=10.0, peer_timeout_s=10.0)) as e:  # (raws wait their turn)
        raws = [Raw(e.address) for _ in range(3)]
        try:
            pushers = []
            for raw in raws:
                raw.hello()
                pushers.append(_Pusher(raw))
            for n, p in enumerate(pushers[:2]):
                for i in range(128):  # 8 MiB each (its credit window): 16 MiB in all
                    if not p.push([f"{n}{'A' if i % 2 else 'B'}", str(i)], 64 * 1024):
                        break
            for n, raw in enumerate(raws[:2]):
                raw.send(encode("abort", tid=f"{n}A"))
                _sync(raw)
            before = e.stats()["pool"]
            for n, p in enumerate(pushers):
                for j in range(16):
                    if not p.push([f"{n}C", str(j)], MiB):
                        break
            for raw in raws:
                _sync(raw)
            pool = e.stats()["pool"]
        finally:
            for raw in raws:
                raw.close()
        print(f"item 1b: {before['in_use'] / MiB:.0f} MiB in the pool after the aborts; then "
              f"{pool['overflow_in_use'] / MiB:.0f} MiB held outside it, {pool['in_use'] / MiB:.0f} MiB in it")
        # the attack took place as described (the second session may hold a fair share only, a third of
        # the pool while the first holds something: 8 + 5.3 MiB filled, half of each aborted)
        assert before["in_use"] >= 6 * MiB, before
        assert pool["overflow_in_use"] > 0, pool  # fragmentation is covered by overflow buffers...
        assert pool["in_use"] + pool["overflow_in_use"] <= pool["capacity"], pool  # ...within the pool's size


@pytest.mark.timeout(60)
def test_item2_a_third_peer_cannot_fill_a_key_of_a_granted_request():
    from p2pkv import RequestState

    with Engine(**FAST) as consumer, Engine(**FAST) as producer:
        req = producer.send_request(consumer.address, "inj", [("l0", torch.float32, (4,)), ("l1", torch.float32, (4,))])
        deadline = time.monotonic() + 5
        while req.state is not RequestState.GRANTED:
            assert time.monotonic() < deadline and not req.done(), req.state
            time.sleep(0.005)
        raw = Raw(consumer.address)
        try:
            raw.hello()
            assert _granted(raw, 256)
            raw.send(encode("data", seq=1, key=["inj", "l1"], dt="float32", sh=[4], n=16, x="tcp"),
                     torch.full((4,), 666.0).numpy().tobytes())
            injected = _await(raw, ("ack", "acks", "nack"), 3)
        finally:
            raw.close()
        req.send("l0", torch.zeros(4))
        req.send("l1", torch.ones(4))
        result = outcome(req.wait, 5)
        got = outcome(consumer.recv, K("inj", "l1"), timeout=3)
        print(f"item 2: the injected data was answered {injected and injected['t']}; the request "
              f"{'failed' if result is not None else 'is done'}; the consumer got {got}")
        assert isinstance(got, torch.Tensor) and torch.equal(got, torch.ones(4)), got
        assert result is None and injected is not None and injected["t"] == "nack", (result, injected)


@pytest.mark.timeout(90)
def test_item3_revoked_credit_comes_back_whatever_the_holder_answers():
    with Engine(**dict(FAST, pool_bytes=16 * MiB)) as e, Engine(**FAST) as honest:
        raws = [Raw(e.address) for _ in range(2)]
        stop = threading.Event()

        def hold(raw: Raw) -> None:  # answer every revocation with a zero return
            while not stop.is_set():
                rep = _await(raw, ("crev",), 0.2)
                if rep is not None:
                    raw.send(encode("cret", n=0))
                else:
                    raw.send(encode("ping"))

        try:
            for i, raw in enumerate(raws):
                raw.hello()
                # the first may hold its window; the second a fair share (a third of the pool, one more
                # third being kept for a newcomer: see _limit)
                assert _granted(raw, 8 * MiB - 4096 if i == 0 else 5 * MiB)
            holders = [threading.Thread(target=hold, args=(raw,), daemon=True) for raw in raws]
            for th in holders:
                th.start()
            ok = _honest_sends(honest, e.address, "crev3")
        finally:
            stop.set()
            time.sleep(0.3)
            for raw in raws:
                raw.close()
        print(f"item 3: {ok}/5 honest sends got through")
        assert ok == 5


@pytest.mark.timeout(90)
def test_item4_unclaimed_data_counts_against_its_senders_window():
    with Engine(**dict(FAST, pool_bytes=16 * MiB, ttl_s=60.0)) as e, Engine(**FAST) as honest:
        raw = Raw(e.address)
        try:
            raw.hello()
            p = _Pusher(raw)
            for i in range(64):  # credit + push under keys nobody will claim, as long as it is granted
                if not p.push(["unclaimed", str(i)], MiB - 4096):
                    break
            held = p.pushed
            _sync(raw)
            ok = _honest_sends(honest, e.address, "unclaimed4")
        finally:
            raw.close()
        print(f"item 4: one session holds {held / MiB:.0f} MiB unclaimed (window 8 MiB); {ok}/5 honest sends")
        assert ok == 5


@pytest.mark.timeout(90)
def test_item5_offers_cannot_reserve_the_pool():
    with Engine(**dict(FAST, pool_bytes=16 * MiB)) as e, Engine(**FAST) as honest:
        raw = Raw(e.address)
        try:
            raw.hello()
            # an offer it never fills, then credit (granted as if nothing were reserved), then an eager offer
            raw.send(encode("offer", seq=1, tid="res5", items=_items(8, MiB - 4096), x="tcp", to=60.0))
            assert _await(raw, ("ogrant",), 3) is not None
            granted = _granted(raw, 8 * MiB - 4096)
            if granted:
                raw.send(encode("offer", seq=2, tid="res5b", items=_items(7, MiB - 4096), x="tcp", to=60.0,
                                eager=True))
            _sync(raw)
            pool = e.stats()["pool"]
            alive = _KeepAlive(raw)
            # 10 MiB in all: more than the 8 MiB the attacker left, so the consumer claims them
            ok = _honest_sends(honest, e.address, "res5", nbytes=2 * MiB, claim=e)
            alive.close()
        finally:
            raw.close()
        print(f"item 5: one session reserved {pool['in_use'] / MiB:.1f} of {pool['capacity'] / MiB:.0f} MiB "
              f"(credit granted on top: {granted}); {ok}/5 honest sends")
        assert ok == 5


@pytest.mark.timeout(120)
def test_item6_queued_offers_cost_bounded_memory():
    from p2pkv.testing import RemoteEngine

    with RemoteEngine(**dict(FAST, pool_bytes=16 * MiB, timeout_s=30.0, peer_timeout_s=10.0)) as r, \
            Engine(**FAST) as honest:
        raw = Raw(r.address)
        try:
            raw.hello()
            raw.send(encode("offer", seq=1, tid="q6", items=_items(8, MiB - 4096), x="tcp", to=120.0))
            assert _await(raw, ("ogrant",), 5) is not None  # the window is reserved: the rest queue
            _sync(raw)
            time.sleep(0.3)
            rss0 = _rss_mib(r.proc.pid)
            n = 200
            for i in range(n):  # offers of 2,048 tiny tensors each, queued behind it
                raw.send(encode("offer", seq=i + 2, tid=f"q6-{i}", items=_items(2048, 4), x="tcp", to=120.0))
            _sync(raw, timeout=60)
            grown = _rss_mib(r.proc.pid) - rss0
            ok = _honest_sends(honest, r.address, "q6", n=6, nbytes=4096)
        finally:
            raw.close()
        print(f"item 6: {n} queued offers of 2,048 tensors: engine RSS +{grown:.0f} MiB; {ok}/6 honest sends")
        assert grown < 40 and ok == 6


@pytest.mark.timeout(120)
def test_item7_one_peer_cannot_stall_the_io_thread_with_refused_offers():
    with Engine(**dict(FAST, pool_bytes=16 * MiB, timeout_s=5.0)) as e, Engine(**FAST) as honest, \
            Engine(**FAST) as consumer:
        base = _push_ms(honest, e, "base7", n=10)
        raw = Raw(e.address)
        stop = threading.Event()
        big = _items(2048, 16 * 1024)  # 32 MiB: never fits, refused after every item was checked

        def stream() -> None:
            i = 0
            while not stop.is_set() and i < 400:
                i += 1
                raw.send(encode("offer", seq=i, tid=f"stall-{i}", items=big, x="tcp", to=5.0))
                time.sleep(0.01)

        try:
            raw.hello()
            th = threading.Thread(target=stream, daemon=True)
            th.start()
            time.sleep(0.5)
            ok = _honest_sends(honest, e.address, "stall7", n=6, nbytes=4096, timeout=2.0)
            own = 0  # and the victim's own pushes to a healthy consumer
            for i in range(3):
                try:
                    e.send(consumer.address, K(f"own7-{i}", "0"), torch.ones(4), timeout=2.0).wait(4)
                    own += 1
                except P2pkvError:
                    pass
            t0 = time.perf_counter()
            e.send(consumer.address, K("own7-timed", "0"), torch.ones(4), timeout=5.0).wait(8)
            took = time.perf_counter() - t0
        finally:
            stop.set()
            th.join(5)
            raw.close()
        print(f"item 7: {ok}/6 honest pushes, {own}/3 of the victim's own pushes; one took {took * 1000:.0f} ms "
              f"(honest push {base:.2f} ms before)")
        assert ok == 6 and own == 3
        _within_twice(base, 1000 * took, "item 7")


@pytest.mark.timeout(120)
def test_item7_offering_and_aborting_many_tensor_requests_is_bounded_per_peer():
    """Offers that are taken (each of 2,048 tensors: parsed, admitted, then aborted by their sender)
    cost the I/O thread far more than refused ones: one peer may offer only so many tensors a second.
    (The victim runs in its own process, as it would: its I/O thread then holds no lock of ours.)"""
    from p2pkv.testing import RemoteEngine

    items = _items(2048, 4)
    msgs = [(encode("offer", seq=i, tid=f"cyc-{i}", items=items, x="tcp", to=5.0),
             encode("oabort", seq=i, msg="given up")) for i in range(1, 401)]
    with RemoteEngine(**dict(FAST, pool_bytes=16 * MiB, timeout_s=5.0)) as r, Engine(**FAST) as honest:
        base = _send_ms(honest, r.address, "base7c", n=20)
        raw = Raw(r.address)
        stop = threading.Event()

        def cycle() -> None:
            for offer, abort in msgs:
                if stop.is_set():
                    return
                raw.send(offer)
                raw.send(abort)
                time.sleep(0.02)

        try:
            raw.hello()
            th = threading.Thread(target=cycle, daemon=True)
            th.start()
            time.sleep(1.0)  # (past the burst the budget allows at first)
            attacked = _send_ms(honest, r.address, "cyc7c", n=30)  # each one delivered (it raises otherwise)
        finally:
            stop.set()
            th.join(10)
            raw.close()
        st = r.call("stats")
        print(f"item 7c: {st.get('requests_failed_rx', 0)} requests taken and aborted, "
              f"{st.get('offers_over_budget', 0)} refused over the peer's budget")
        _within_twice(base, attacked, "item 7c")
        assert st.get("offers_over_budget", 0) > 0


@pytest.mark.timeout(120)
def test_a_peer_that_floods_then_disconnects_cannot_abort_the_engine():
    """With ZMQ heartbeats on, libzmq 4.3 aborted the process when a connection whose input the
    receive high-water mark had stopped was closed (``Assertion failed: !_io_error``): a peer that
    queued more requests than the engine had handled, then hung up, killed it."""
    from p2pkv.testing import RemoteEngine

    items = _items(2048, 4)
    msgs = []
    for i in range(1, 1201):  # more than the 1,000 requests the engine queues per connection
        msgs += [encode("offer", seq=i, tid=f"flood-{i}", items=items, x="tcp", to=5.0),
                 encode("oabort", seq=i, msg="given up")]
    with RemoteEngine(**dict(FAST, pool_bytes=16 * MiB)) as r, Engine(**FAST) as honest:
        for rnd in range(2):
            raw = Raw(r.address)
            raw.s.setsockopt(zmq.SNDHWM, 0)  # queue them all here, never wait
            try:
                raw.hello()
                for m in msgs:
                    raw.send(m)
                time.sleep(0.5)
            finally:
                raw.close()
            time.sleep(1.0)  # (the heartbeat timer fired several times)
            assert r.proc.is_alive(), f"the engine process died (exit code {r.proc.exitcode})"
            t = torch.arange(64, dtype=torch.float32)
            honest.send(r.address, K(f"alive-{rnd}", "0"), t).wait(10)


@pytest.mark.timeout(60)
def test_eager_offers_beyond_credit_drop_the_session_like_data_does():
    with Engine(**dict(FAST, pool_bytes=16 * MiB)) as e, Engine(**FAST) as honest:
        raw = Raw(e.address)
        try:
            raw.hello()
            for i in range(2000):  # never asked for credit
                raw.send(encode("offer", seq=i + 1, tid=f"eager-{i}", items=_items(1, MiB), x="tcp", to=5.0,
                                eager=True))
            raw.send(encode("ping"))
            dropped = False
            while True:  # until its session is dropped, or the pong after every offer was handled
                rep = _await(raw, ("err", "pong"), 30)
                if rep is None or rep["t"] == "pong":
                    break
                if "session dropped" in rep["msg"] or rep["code"] == "no_session":
                    dropped = True
                    break
        finally:
            raw.close()
        print(f"item 7b: 2,000 eager offers beyond credit; session dropped: {dropped}")
        assert dropped
        still_serves(e, honest, "eager7b")
