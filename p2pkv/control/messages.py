"""Control messages: msgpack maps with a protocol version and a type.

Every header frame is a msgpack map ``{"v": PROTOCOL_VERSION, "t": TYPE, ...}``.
:func:`decode` checks the version, the type and every field's type before the
engine looks at it, so a malformed message becomes a :class:`ProtocolError`
(answered with an ``err`` message), never an exception inside the engine.

Requests travel from a peer's DEALER to our ROUTER; replies go back on the
same connection.

====== ========================================= ==================================
type   fields                                    meaning
====== ========================================= ==================================
hello  eid, tok?, host, pid, dev, caps           open a session (auth token optional)
data   seq, key, dt, sh, n, x, ipc?              one tensor (payload frame follows for x=tcp)
creq   need, want                                ask for credit (bytes of pool space)
cret   n                                         give back unused credit
pull   seq, key, to, dt?, sh?, x                 ask for a published tensor
pdone  seq                                       an IPC pull finished copying
abort  tid                                       drop every key of a transfer id
ping   -                                         liveness
bye    -                                         orderly close of a session
nccl   uid, dir                                  join an NCCL communicator (dir: push or pull)
hok    eid, align, window, maxmsg, pool, caps    session accepted
ack    seq                                       data stored
acks   seqs                                      several data stored (coalesced acks)
nack   seq, code, msg                            data refused (typed error code)
grant  n                                         credit granted
crev   n                                         give back up to n bytes of unused credit (answered by cret)
pdata  seq, key, dt, sh, n, x, ipc?              pulled tensor (payload follows for x=tcp)
perr   seq, code, msg                            pull failed
pong   -                                         liveness answer
err    code, msg, seq?                           a request was refused
nok    dir                                       NCCL communicator being joined
offer  seq, tid, items, x, to, evs?, eager?      a whole request: [name, dtype, shape, nbytes] per tensor
                                                 (eager: paid from credit, its data already moves)
oabort seq, msg, code?, end?                     the producer gave up on an offer (end: its communicator ended)
ofin   seq                                       the producer's writes of a failed IPC offer are over
odata  seq, idx, n                               one tensor of a granted offer (payload frame follows, tcp)
opost  seq, idx, ev                              one tensor of an IPC offer is written once event ``ev`` completes
ogrant seq, offs?                                room reserved for the offer (offs: where, for IPC)
oerr   seq, code, msg, drain?                    the offer failed (drain: its receives were posted anyway)
odone  seq                                       every tensor of the offer landed
fq     -                                         a same-host producer asks for the fast path (at its first request)
fo     chan?, lease?, bell?, no?                 the fast path offered: channel locator, lease [offset, size],
                                                 doorbell; or ``no``: why not
fast   ok, msg, bell?                            the producer took (or refused) the fast path offered
mq     -                                         a same-host reader asks for our registered memory regions
mr     r?, no?                                   the regions: [name, IPC handle, offset, allocation size, dtype, shape,
                                                 strides] each; or why not
rdone  tid                                       the reader is done reading transfer ``tid`` (completes expose())
ferr   seq, code, msg                            a fast-path request (header seq) was refused
====== ========================================= ==================================
"""

from __future__ import annotations

from typing import Any

import msgpack

from ..errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024

_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_LIST = (list,)
_MAP = (dict,)
_OPT_STR = (str, type(None))

# field -> (accepted types, required)
_SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "hello": {"eid": (_STR, True), "tok": (_OPT_STR, False), "host": (_STR, True), "pid": (_INT, True),
              "dev": (_STR, True), "caps": (_MAP, True)},
    "data": {"seq": (_INT, True), "key": (_LIST, True), "dt": (_STR, True), "sh": (_LIST, True),
             "n": (_INT, True), "x": (_STR, True), "ipc": (_MAP, False)},
    "creq": {"need": (_INT, True), "want": (_INT, True)},
    "cret": {"n": (_INT, True)},
    "pull": {"seq": (_INT, True), "key": (_LIST, True), "to": (_NUM, True), "dt": (_OPT_STR, False),
             "sh": ((list, type(None)), False), "x": (_STR, True)},
    "pdone": {"seq": (_INT, True)},
    "abort": {"tid": (_STR, True)},
    "ping": {},
    "bye": {},
    "nccl": {"uid": ((bytes,), True), "dir": (_STR, True)},
    "nok": {"dir": (_STR, True)},
    "hok": {"eid": (_STR, True), "align": (_INT, True), "window": (_INT, True), "maxmsg": (_INT, True),
            "pool": (_INT, True), "caps": (_MAP, True)},
    "fq": {},
    "mq": {},
    "mr": {"r": (_LIST, False), "no": (_STR, False)},
    "rdone": {"tid": (_STR, True)},
    "fo": {"chan": (_MAP, False), "lease": (_LIST, False), "bell": (_STR, False), "no": (_STR, False)},
    "fast": {"ok": ((bool,), True), "msg": (_STR, True), "bell": (_STR, False)},
    "ferr": {"seq": (_INT, True), "code": (_STR, True), "msg": (_STR, True)},
    "ack": {"seq": (_INT, True)},
    "acks": {"seqs": (_LIST, True)},
    "nack": {"seq": (_INT, True), "code": (_STR, True), "msg": (_STR, True)},
    "grant": {"n": (_INT, True)},
    "crev": {"n": (_INT, True)},
    "pdata": {"seq": (_INT, True), "key": (_LIST, True), "dt": (_STR, True), "sh": (_LIST, True),
              "n": (_INT, True), "x": (_STR, True), "ipc": (_MAP, False)},
    "perr": {"seq": (_INT, True), "code": (_STR, True), "msg": (_STR, True)},
    "pong": {},
    "err": {"code": (_STR, True), "msg": (_STR, True), "seq": ((int, type(None)), False)},
    "offer": {"seq": (_INT, True), "tid": (_STR, True), "items": (_LIST, True), "x": (_STR, True),
              "to": (_NUM, True), "evs": (_LIST, False), "eager": ((bool,), False)},
    "oabort": {"seq": (_INT, True), "msg": (_STR, True), "end": ((bool,), False), "code": (_STR, False)},
    "ofin": {"seq": (_INT, True)},
    "odata": {"seq": (_INT, True), "idx": (_INT, True), "n": (_INT, True)},
    "opost": {"seq": (_INT, True), "idx": (_INT, True), "ev": (_INT, True)},
    "ogrant": {"seq": (_INT, True), "offs": (_LIST, False)},
    "oerr": {"seq": (_INT, True), "code": (_STR, True), "msg": (_STR, True), "drain": ((bool,), False)},
    "odone": {"seq": (_INT, True)},
}
REQUEST_TYPES = frozenset({"hello", "data", "creq", "cret", "pull", "pdone", "abort", "ping", "bye", "nccl",
                           "offer", "oabort", "ofin", "odata", "opost", "fast", "fq", "mq", "rdone"})
REPLY_TYPES = frozenset({"hok", "ack", "acks", "nack", "grant", "crev", "pdata", "perr", "pong", "err", "abort", "nok",
                         "ogrant", "oerr", "odone", "ferr", "fo", "mr"})
TYPES = frozenset(_SCHEMA)
_NONNEG_INTS = ("seq", "n", "need", "want", "pid", "align", "window", "maxmsg", "pool", "idx", "ev")


def encode(mtype: str, **fields: Any) -> bytes:
    """Encode one header; the caller's fields must follow the schema."""
    msg = {"v": PROTOCOL_VERSION, "t": mtype}
    msg.update(fields)
    return msgpack.packb(msg, use_bin_type=True)


def decode(frame: bytes | memoryview, allowed: frozenset[str] = TYPES) -> dict[str, Any]:
    """Decode and validate a header frame.

    Raises
    ------
    ProtocolError
        If the frame is not a msgpack map, is too large, has another protocol
        version, an unknown or unexpected type, or a field of the wrong type.
    """
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header frame of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True,
                              max_array_len=4096, max_map_len=64, max_str_len=8192, max_bin_len=8192)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(msg).__name__}")
    v = msg.get("v")
    if v != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {v!r:.20}; this engine speaks {PROTOCOL_VERSION}")
    t = msg.get("t")
    if not isinstance(t, str) or t not in TYPES:
        raise ProtocolError(f"unknown message type {t!r:.40}")
    if t not in allowed:
        raise ProtocolError(f"message type {t!r} is not valid in this direction")
    schema = _SCHEMA[t]
    for name, (types, required) in schema.items():
        if name not in msg:
            if required:
                raise ProtocolError(f"{t!r} message lacks field {name!r}")
            continue
        val = msg[name]
        if (isinstance(val, bool) and bool not in types) or not isinstance(val, types):
            raise ProtocolError(f"{t!r} field {name!r} has type {type(val).__name__}")
        if name in _NONNEG_INTS and isinstance(val, int) and not 0 <= val < 2**63:
            raise ProtocolError(f"{t!r} field {name!r} out of range: {val}")
    return msg
