"""Start SGLang's server with p2pkv registered as a transfer backend (kept for older set-ups).

Plain ``python -m sglang.launch_server ... --disaggregation-transfer-backend p2pkv``
works once p2pkv is installed (SGLang loads p2pkv's plugin entry point in every
process); this launcher does the same registration first, then runs
``sglang.launch_server`` with the same arguments::

    python -m p2pkv.adapters.sglang.launch --model-path M --disaggregation-mode prefill \\
        --disaggregation-transfer-backend p2pkv ...

Without sglang it prints how to install it and exits with status 2.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys

HINT = ("p2pkv.adapters.sglang.launch: sglang is not installed in this Python environment; "
        "install it with: pip install 'sglang==0.5.23'")


def main(argv: list[str] | None = None) -> int:
    """Register p2pkv with SGLang and run ``sglang.launch_server`` with ``argv``.

    Returns 2 (after a one-line hint on stderr) when sglang is not installed.
    """
    if importlib.util.find_spec("sglang") is None:
        print(HINT, file=sys.stderr)
        return 2
    from . import install

    install()
    sys.argv = ["sglang.launch_server", *(sys.argv[1:] if argv is None else argv)]
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
