"""Start SGLang's server with p2pkv registered as a transfer backend.

Usage (the arguments are those of ``python -m sglang.launch_server``)::

    python -m p2pkv.adapters.sglang.launch --model-path M --disaggregation-mode prefill \\
        --disaggregation-transfer-backend p2pkv ...

:func:`p2pkv.adapters.sglang.install` runs at this module's top level, so it
also runs in every scheduler process SGLang starts with ``spawn``: those
re-import the launching module (as ``__mp_main__``) before they run.
"""

from __future__ import annotations

import runpy
import sys

from . import install

install()

if __name__ == "__main__":
    sys.argv[0] = "sglang.launch_server"
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
