"""Latency measurement: time a callable honestly and summarise the distribution.

The protocol follows MLPerf single-stream (trt-jetson.md §5.1): untimed warm-up calls first, then
back-to-back timed calls until *both* a minimum count and a minimum duration are reached, capped by
a maximum duration. Every sample is kept (no outlier trimming) and percentiles use linear
interpolation. The callable must block until its result is ready (synchronise GPU work inside it).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from runtime.errors import BckdError

if TYPE_CHECKING:  # only for the annotation; the backends package is not needed to time a callable
    from runtime.backends.base import Runner


@dataclass
class LatencyStats:
    """Summary of per-call latencies in milliseconds; ``fps`` counts images (calls x batch)."""

    n: int
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    fps: float
    total_s: float
    warmup: int
    batch: int
    context: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_times(
        cls, times_s: list[float], *, total_s: float, warmup: int, batch: int,
        context: dict[str, Any] | None = None,
    ) -> LatencyStats:
        """Statistics of per-call durations given in seconds."""
        ms = np.asarray(times_s, dtype=np.float64) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99], method="linear")
        mean = float(ms.mean())
        return cls(
            n=len(ms), mean_ms=mean,
            std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,  # sample std
            min_ms=float(ms.min()), max_ms=float(ms.max()),
            p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99),
            fps=1e3 / mean * batch if mean > 0 else float("inf"),
            total_s=total_s, warmup=warmup, batch=batch, context=dict(context or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary; latency keys (mean, p50, ...) are in milliseconds."""
        d = asdict(self)
        out: dict[str, Any] = {k.removesuffix("_ms"): v for k, v in d.items() if k != "context"}
        out["unit"] = "ms"
        out.update(d["context"])
        return out


def profile_latency(
    fn: Callable[[], Any],
    *,
    warmup: int = 10,
    iters: int = 50,
    min_seconds: float = 1.0,
    max_seconds: float = 60.0,
    batch: int = 1,
) -> LatencyStats:
    """Time ``fn()`` after ``warmup`` untimed calls until ``iters`` calls and ``min_seconds`` pass.

    ``max_seconds`` caps the timed phase, so ``n`` can fall short of ``iters`` for a slow model.
    """
    _check_args(warmup, iters, min_seconds, max_seconds, batch)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        elapsed = t1 - start
        if (len(times) >= iters and elapsed >= min_seconds) or elapsed >= max_seconds:
            break
    return LatencyStats.from_times(times, total_s=elapsed, warmup=warmup, batch=batch)


def _check_args(warmup: int, iters: int, min_seconds: float, max_seconds: float, batch: int) -> None:
    if warmup < 0 or iters < 1 or batch < 1:
        raise BckdError(
            f"need warmup >= 0, iters >= 1 and batch >= 1 (got warmup={warmup}, iters={iters}, "
            f"batch={batch})"
        )
    if min_seconds < 0 or max_seconds <= 0 or min_seconds > max_seconds:
        raise BckdError(
            f"need 0 <= min_seconds <= max_seconds and max_seconds > 0 (got min_seconds="
            f"{min_seconds}, max_seconds={max_seconds})"
        )


def profile_runner(runner: Runner, x: np.ndarray, **kw: Any) -> LatencyStats:
    """Profile ``runner.infer(x)``; the input is checked once, outside the timed loop.

    The runner's description (backend, device, precision, threads, artifact) and the input shape
    are recorded in the stats' ``context``. An inactive runner is activated for the measurement.
    """
    if not runner.active:
        with runner:
            return profile_runner(runner, x, **kw)
    runner.check_input(x)
    kw.setdefault("batch", int(x.shape[0]))
    stats = profile_latency(lambda: runner.infer(x, check=False), **kw)
    stats.context.update(runner.describe(), input_shape=list(x.shape))
    return stats
