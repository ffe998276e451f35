"""Progress of a long loop: a tqdm bar on a terminal, a plain line every N items in a log.

Evaluation (and training, cache building) can run for many minutes without output. On a
terminal a bar is best; in a log (a DVC stage, ``> log 2>&1``) a bar's carriage-return updates
become hundreds of lines, so there it prints one line every ``every`` items instead, e.g.
``evaluate: 120/500 images, 3.2 img/s, ~2 min left``.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

#: lines a log gets over a whole loop when the caller does not choose ``every``
LOG_LINES = 10


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _amount(n: float, unit: str) -> str:
    """Bytes in human units (``3.2 GB``); anything else as a plain count."""
    if unit != "B":
        return f"{n:.0f}" if float(n).is_integer() else f"{n:.1f}"
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.0f} {prefix}B" if not prefix else f"{n:.1f} {prefix}B"
        n /= 1000
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class Progress:
    """``with Progress(total, "evaluate", unit="images") as p: ... p.update(n)``.

    ``every``: items between two log lines (default: about ``LOG_LINES`` lines in all, plus
    the last); ``rate_unit``: the unit of the rate (``img/s``), default ``unit``.
    ``enabled=False`` prints nothing. ``stream`` defaults to stderr, so stdout keeps only a
    tool's results. ``min_interval``: seconds between two log lines (the
    start counts as one), so a loop faster than that logs nothing. ``unit="B"`` counts bytes
    (shown as kB/MB/GB); ``initial`` is where a resumed loop starts."""

    def __init__(self, total: int, desc: str, unit: str = "items", every: int | None = None,
                 rate_unit: str | None = None, enabled: bool = True, stream: TextIO | None = None,
                 min_interval: float = 0.0, initial: int = 0):
        self.total, self.desc, self.unit, self.enabled = int(total), desc, unit, enabled
        self.rate_unit = rate_unit or unit
        self.stream = stream if stream is not None else sys.stderr
        self.every = max(1, int(every) if every else -(-self.total // LOG_LINES))
        self.initial = self.done = int(initial)
        self._next_line, self._start = self.done + self.every, time.monotonic()
        self.min_interval, self._last_line = float(min_interval), self._start
        self._bar = None
        if enabled and _is_tty(self.stream):
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, initial=self.initial, desc=desc, unit=self.rate_unit,
                             unit_scale=unit == "B", file=self.stream, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last_line >= self.min_interval and (
                self.done == self.total or self.done >= self._next_line):
            self._line()
            self._last_line = time.monotonic()
            while self._next_line <= self.done:
                self._next_line += self.every

    def _line(self) -> None:
        elapsed = time.monotonic() - self._start
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else float("inf")
        if self.unit == "B":
            of = f" of {_amount(self.total, 'B')}" if self.total > 0 else ""
            text = f"{self.desc}: {_amount(self.done, 'B')}{of}, {_amount(rate, 'B')}/s"
        else:
            text = f"{self.desc}: {self.done}/{self.total} {self.unit}, {rate:.1f} {self.rate_unit}/s"
        if 0 < self.done < self.total and rate > 0:
            text += f", ~{_duration((self.total - self.done) / rate)} left"
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
