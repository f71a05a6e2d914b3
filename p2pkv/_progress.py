"""A dependency-free progress bar for the demo and the benchmark (stderr)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "", stream=None, width: int = 30, every_step: bool = False):
        self.every_step = every_step
        self.total = max(1, total)
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.n = 0
        self.t0 = time.monotonic()
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_pct = -1

    def update(self, n: int = 1, note: str = "") -> None:
        self.n = min(self.total, self.n + n)
        pct = int(100 * self.n / self.total)
        if self._tty:
            fill = int(self.width * self.n / self.total)
            bar = "#" * fill + "-" * (self.width - fill)
            el = time.monotonic() - self.t0
            self.stream.write(f"\r{self.label} [{bar}] {pct:3d}% {self.n}/{self.total} {el:5.1f}s {note}")
            self.stream.flush()
        elif self.every_step or pct // 25 != self._last_pct // 25 or self.n == self.total:
            self.stream.write(f"{self.label} {pct:3d}% ({self.n}/{self.total}) {note}\n")
            self.stream.flush()
        self._last_pct = pct

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
