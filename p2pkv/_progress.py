"""Progress reporting for the demo and the benchmark, on stderr.

On a terminal this is a `tqdm <https://tqdm.github.io>`_ bar (the progress bar
vLLM, Hugging Face and PyTorch's tooling already use). Anywhere else (CI logs,
pipes, files) a bar's carriage returns would be noise, so plain lines are
written instead: one per step with ``every_step``, else at every quarter.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
    """A progress report of ``total`` steps.

    Parameters
    ----------
    total:
        Number of steps (at least 1 is assumed).
    label:
        What is progressing, printed before the bar or line.
    stream:
        Where to write; default ``sys.stderr``.
    every_step:
        When not on a terminal, write a line for every step instead of every quarter.
    unit:
        What one step is, for the bar's rate (``request/s``).
    """

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None, every_step: bool = False,
                 unit: str = "step") -> None:
        self.total = max(1, total)
        self.label = label
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.every_step = every_step
        self.n = 0
        self._last_quarter = -1
        isatty = getattr(self.stream, "isatty", None)
        self._bar: tqdm | None = None
        if isatty is not None and isatty():
            self._bar = tqdm(total=self.total, desc=label, file=self.stream, dynamic_ncols=True, leave=True, unit=unit)

    def update(self, n: int = 1, note: str = "") -> None:
        """Advance by ``n`` steps; ``note`` says what was just done."""
        self.n = min(self.total, self.n + n)
        if self._bar is not None:
            self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
            return
        pct = 100 * self.n // self.total
        quarter = pct // 25
        if self.every_step or quarter != self._last_quarter or self.n == self.total:
            self.stream.write(f"{self.label} {pct:3d}% ({self.n}/{self.total}) {note}".rstrip() + "\n")
            self.stream.flush()
        self._last_quarter = quarter

    def close(self) -> None:
        """Finish the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
