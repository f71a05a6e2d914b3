"""SGLang prefill/decode disaggregation transfer backend on top of :class:`p2pkv.Engine`.

With p2pkv installed (its ``sglang.srt.plugins`` entry point registers the
backend in every SGLang 0.5.23 process), pass
``--disaggregation-transfer-backend p2pkv`` to both the prefill and the decode
server: ``python -m sglang.launch_server ... --disaggregation-mode prefill
--disaggregation-transfer-backend p2pkv``. ``docs/sglang.md`` describes the
protocol, the deadlines and what is not supported.

The parts: :class:`P2pkvBootstrapServer` (``bootstrap``: the prefill ranks'
registry), :class:`P2pkvKVManager` (``manager``: one engine per scheduler
rank), :class:`P2pkvKVSender` (``sender``: prefill side of a request),
:class:`P2pkvKVReceiver` (``receiver``: decode side), :func:`install`
(``_register``: what is patched into SGLang), the wire format (``_wire``) and
the buffer layout (``_layout``).

Importing this package needs neither sglang nor a GPU and opens no socket or
thread: with sglang installed the classes subclass its real base classes,
without it they subclass stand-ins with the same surface.
"""

from ._compat import HAVE_SGLANG, KVArgs, KVPoll
from ._layout import head_start, heads_per_rank, plan_sources, wrap_buffer
from ._register import BACKEND_NAME, install, installed, plugin, uninstall
from ._settings import SglangSettings
from ._wire import attempt_transfer_id, transfer_id_for_room
from .bootstrap import P2pkvBootstrapServer
from .manager import P2pkvKVManager, PrefillInfo
from .receiver import P2pkvKVReceiver
from .sender import P2pkvKVSender

__all__ = ["HAVE_SGLANG", "BACKEND_NAME", "KVPoll", "KVArgs", "SglangSettings", "PrefillInfo",
           "P2pkvBootstrapServer", "P2pkvKVManager", "P2pkvKVSender", "P2pkvKVReceiver", "install", "uninstall",
           "installed", "plugin", "transfer_id_for_room", "attempt_transfer_id", "wrap_buffer", "plan_sources",
           "head_start", "heads_per_rank"]
