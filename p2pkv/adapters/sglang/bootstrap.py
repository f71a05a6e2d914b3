"""The bootstrap server (an HTTP registry of the prefill ranks) and the prefill ranks' registration.

SGLang starts :class:`P2pkvBootstrapServer` in the prefill server's main
process at ``--disaggregation-bootstrap-port``. Each prefill rank registers
its p2pkv address and KV layout there (``PUT /register``) from a background
thread (:class:`Registrar`), which keeps trying while the server is away and
registers again after the server restarted; decode ranks read every
registration (``GET /route``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

from ...engine import parse_address
from ...errors import InvalidAddress, P2pkvError
from ._compat import BaseKVBootstrapServer
from ._wire import MAX_RANKS, META_VERSION

__all__ = ["P2pkvBootstrapServer", "Registrar", "http_json", "check_registration"]

log = logging.getLogger("p2pkv.sglang")

MAX_BODY = 1 << 20
MAX_REGISTRATIONS = 65536


def http_json(method: str, url: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    """One JSON call to the bootstrap server.

    Raises
    ------
    OSError
        Unreachable, timed out or an HTTP error status.
    ValueError
        The answer is not a JSON object.
    """
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read(MAX_BODY * 64 + 1)
    except urllib.error.HTTPError as exc:
        # an error status: its body holds the connection open until closed (else a ResourceWarning)
        with exc:
            try:
                why = "".join(c if c.isprintable() else "?" for c in exc.read(300).decode("utf-8", "replace")).strip()
            except (OSError, ValueError):
                why = ""
        raise OSError(f"{method} {url}: HTTP {exc.code} {exc.reason}" + (f": {why}" if why else "")) from None
    if len(raw) > MAX_BODY * 64:
        raise ValueError(f"answer of {url} is larger than {MAX_BODY * 64} bytes")
    obj = json.loads(raw.decode() or "{}")
    if not isinstance(obj, dict):
        raise ValueError(f"answer of {url} is not a JSON object")
    return obj


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def check_registration(info: Any) -> dict[str, Any]:
    """Check one prefill rank's registration (from the rank, or read back by a decode rank).

    Raises
    ------
    ValueError
        A field is missing, of the wrong type or out of range (the message names it).
    """
    if not isinstance(info, dict):
        raise ValueError("registration is not a JSON object")
    if info.get("v") != META_VERSION:
        raise ValueError(f"registration of version {info.get('v')!r:.20}, expected {META_VERSION}")
    for f, lo, hi in (("dp_size", 1, MAX_RANKS), ("tp_size", 1, MAX_RANKS), ("page_size", 1, 1 << 20),
                      ("kv_head_num", 1, 1 << 20), ("total_kv_head_num", 1, 1 << 20)):
        if not _is_int(info.get(f), lo, hi):
            raise ValueError(f"{f}={info.get(f)!r:.40} is not an int in [{lo}, {hi}]")
    if not _is_int(info.get("dp_rank"), 0, info["dp_size"] - 1):
        raise ValueError(f"dp_rank={info.get('dp_rank')!r:.40} is not in [0, dp_size={info['dp_size']})")
    if not _is_int(info.get("tp_rank"), 0, info["tp_size"] - 1):
        raise ValueError(f"tp_rank={info.get('tp_rank')!r:.40} is not in [0, tp_size={info['tp_size']})")
    try:
        parse_address(info.get("address"))
    except InvalidAddress as e:
        raise ValueError(str(e)) from None
    for f in ("item_lens", "aux_item_lens"):
        v = info.get(f)
        if not isinstance(v, list) or len(v) > 1 << 16 or not all(_is_int(x, 1, 1 << 40) for x in v):
            raise ValueError(f"{f} is not a list of positive ints")
    if not info["item_lens"]:
        raise ValueError("item_lens is empty")
    if not isinstance(info.get("is_mla"), bool):
        raise ValueError("is_mla is not a bool")
    if not isinstance(info.get("instance"), str) or not 0 < len(info["instance"]) <= 64:
        raise ValueError("instance is not a short str")
    return info


class P2pkvBootstrapServer(BaseKVBootstrapServer):
    """HTTP registry of the prefill ranks' p2pkv addresses (SGLang starts it on
    the prefill host at ``--disaggregation-bootstrap-port``).

    ``PUT /register`` (one rank's registration, checked by
    :func:`check_registration`), ``GET /route`` (every registration) and
    ``GET /health``. A registration replaces the rank's earlier one; one from
    a new prefill instance with another DP/TP shape drops the old shape's
    ranks. Serving starts in the constructor (as SGLang expects) on a daemon
    thread; :meth:`close` stops it.

    Raises
    ------
    P2pkvError
        The port cannot be bound.
    """

    def __init__(self, host: str, port: int, **_ignored: Any):
        self.host, self.port = host, int(port)
        self._lock = threading.Lock()
        self._ranks: dict[int, dict[int, dict[str, Any]]] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10.0  # a client that connects and goes quiet does not hold a thread for ever

            def log_message(self, format: str, *args: Any) -> None:  # quiet: debug only
                log.debug("bootstrap %s: " + format, self.address_string(), *args)

            def _reply(self, code: int, obj: dict[str, Any]) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = urlparse(self.path).path
                if path == "/health":
                    self._reply(200, {"ok": True})
                elif path == "/route":
                    with server._lock:
                        ranks = {str(d): {str(t): i for t, i in r.items()} for d, r in server._ranks.items()}
                    self._reply(200, {"ranks": ranks})
                else:
                    self._reply(404, {"error": f"no route {path[:100]}"})

            def do_PUT(self) -> None:
                if urlparse(self.path).path != "/register":
                    self._reply(404, {"error": "no such route"})
                    return
                try:
                    n = int(self.headers.get("content-length", "0"))
                    if not 0 < n <= MAX_BODY:
                        raise ValueError(f"body of {n} bytes (1 to {MAX_BODY})")
                    info = check_registration(json.loads(self.rfile.read(n).decode()))
                except (ValueError, UnicodeDecodeError) as e:
                    self._reply(400, {"error": f"bad registration: {e}"})
                    return
                if not server._store(info):
                    self._reply(507, {"error": f"more than {MAX_REGISTRATIONS} registrations"})
                    return
                self._reply(200, {"ok": True})

            do_POST = do_PUT

        try:
            self._httpd: ThreadingHTTPServer | None = ThreadingHTTPServer((host, self.port), Handler)
        except OSError as e:
            raise P2pkvError(f"bootstrap server cannot listen on {host}:{port}: {e}") from None
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="p2pkv-sglang-bootstrap",
                                        daemon=True)
        self._thread.start()

    def _store(self, info: dict[str, Any]) -> bool:
        d, t = info["dp_rank"], info["tp_rank"]
        with self._lock:
            # a prefill restarted with another shape: its old ranks are gone
            for dd in list(self._ranks):
                for tt, old in list(self._ranks[dd].items()):
                    if (old["dp_size"], old["tp_size"]) != (info["dp_size"], info["tp_size"]):
                        del self._ranks[dd][tt]
                if not self._ranks[dd]:
                    del self._ranks[dd]
            if t not in self._ranks.get(d, {}) and sum(len(r) for r in self._ranks.values()) >= MAX_REGISTRATIONS:
                return False
            self._ranks.setdefault(d, {})[t] = info
        return True

    @property
    def address(self) -> str:
        """``host:port`` the server listens on."""
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()

    def __enter__(self) -> P2pkvBootstrapServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Registrar:
    """Registers one prefill rank with the bootstrap server, in the background.

    The first attempt is made before :meth:`start` returns only if it succeeds
    quickly; otherwise a daemon thread keeps trying (1 s apart, backing off to
    5 s) and logs a warning once after ``warn_s`` without success: a prefill
    server is never taken down because its bootstrap server is away. Once
    registered it checks every ``refresh_s`` that the server still knows this
    rank and registers again if not (the bootstrap server restarted).
    """

    def __init__(self, url: str, registration: Callable[[], dict[str, Any]], *, http_timeout_s: float,
                 warn_s: float, refresh_s: float = 5.0):
        self.url = url.rstrip("/")
        self._registration = registration
        self._http_timeout_s = http_timeout_s
        self._warn_s = warn_s
        self._refresh_s = refresh_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.registered = threading.Event()
        self.last_error: str | None = None

    def register_once(self) -> bool:
        """One attempt (never raises); True when the server accepted the registration."""
        try:
            http_json("PUT", self.url + "/register", self._registration(), self._http_timeout_s)
        except (OSError, ValueError) as e:
            self.last_error = f"{type(e).__name__}: {e}"
            return False
        self.last_error = None
        self.registered.set()
        return True

    def _known(self) -> bool:
        reg = self._registration()
        try:
            data = http_json("GET", self.url + "/route", None, self._http_timeout_s)
        except (OSError, ValueError):
            return True  # away: nothing to repair until it answers again
        ranks = data.get("ranks")
        if not isinstance(ranks, dict):
            return False
        mine = (ranks.get(str(reg["dp_rank"])) or {}).get(str(reg["tp_rank"]))
        return isinstance(mine, dict) and mine.get("instance") == reg["instance"] and mine.get(
            "address") == reg["address"]

    def start(self) -> None:
        """Try once (a quick, local call), then keep going on a daemon thread."""
        self.register_once()
        self._thread = threading.Thread(target=self._run, name="p2pkv-sglang-register", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        warned = False
        delay = 1.0
        while not self._stop.is_set():
            if not self.registered.is_set():
                if self.register_once():
                    if warned:
                        log.warning("p2pkv: registered with the SGLang bootstrap server at %s after %.0fs",
                                    self.url, time.monotonic() - t0)
                    continue
                if not warned and time.monotonic() - t0 >= self._warn_s:
                    warned = True
                    log.warning("p2pkv: this prefill rank could not register with the SGLang bootstrap server at "
                                "%s for %.0fs (%s); decode servers cannot reach it until it does. Still trying.",
                                self.url, time.monotonic() - t0, self.last_error)
                wait = delay if warned else min(delay, max(0.05, self._warn_s - (time.monotonic() - t0)))
                self._stop.wait(wait)
                delay = min(5.0, delay * 1.5)
            else:
                if self._stop.wait(self._refresh_s):
                    return
                if not self._known():
                    log.warning("p2pkv: the SGLang bootstrap server at %s lost this prefill rank's registration "
                                "(restarted?); registering again", self.url)
                    self.registered.clear()
                    t0, warned, delay = time.monotonic(), False, 1.0

    def close(self) -> None:
        """Stop the background thread (it exits within one HTTP timeout). Idempotent."""
        self._stop.set()
