"""Progress of long steps (evaluating a split, calibrating) on stderr, torch-free.

On a terminal it is a live bar — tqdm's when tqdm is installed (it is not a dependency), else a
one-line bar of its own redrawn in place. Anywhere else (a log file, CI, a captured pipe) it
writes a few plain lines: one every ``every`` seconds while the step runs and one at the end, so
logs stay short. stdout is left to results.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from typing import Any, TextIO

BAR_WIDTH = 24


class Progress:
    """Progress of one step of ``total`` units; a context manager, and a ``(done, total)`` callback.

    Use ``update(n)`` to add ``n`` done units, or call the object with the count done so far (the
    ``progress`` hook of :func:`runtime.evaluate.evaluate_runner`).
    """

    def __init__(self, label: str, total: int, *, unit: str = "img", stream: TextIO | None = None,
                 live: bool | None = None, every: float = 10.0) -> None:
        self.label, self.total, self.unit = label, max(int(total), 0), unit
        self.stream = stream if stream is not None else sys.stderr
        self.live = _is_tty(self.stream) if live is None else live
        self.every = every
        self.done = 0
        self.start = self._last = time.perf_counter()
        self._bar = _tqdm_bar(label, self.total, unit, self.stream) if self.live else None
        self._closed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(failed=exc[0] is not None)

    def __call__(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = int(total)
        self.update(int(done) - self.done)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.live:
            self._write("\r" + self._line())
        elif time.perf_counter() - self._last >= self.every and self.done < self.total:
            self._write(self._line() + "\n")

    def close(self, failed: bool = False) -> None:
        """End the bar; a plain-line log gets its final line (not when the step failed)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.live:
            self._write("\r" + self._line() + "\n")
        elif not failed:
            self._write(self._line() + "\n")

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.start
        frac = self.done / self.total if self.total else 1.0
        fill = int(round(BAR_WIDTH * min(frac, 1.0)))
        bar = f" [{'#' * fill}{'.' * (BAR_WIDTH - fill)}]" if self.live else ""
        return (f"{self.label}{bar} {self.done}/{self.total} {self.unit} "
                f"({100 * frac:.0f}%, {elapsed:.1f} s)")

    def _write(self, text: str) -> None:
        self._last = time.perf_counter()
        self.stream.write(text)
        self.stream.flush()


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _tqdm_bar(label: str, total: int, unit: str, stream: TextIO) -> Any:
    """A tqdm bar when tqdm is installed, else None (the built-in bar is drawn instead)."""
    if importlib.util.find_spec("tqdm") is None:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit=unit, file=stream, leave=True, dynamic_ncols=True)
