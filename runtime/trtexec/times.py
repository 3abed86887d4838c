"""Per-query timings from ``trtexec --exportTimes`` and the statistics bckd computes from them.

The file is a JSON array with one object per query (trt-jetson.md §3.3): ``startEnqMs``,
``endEnqMs``, ``startH2dMs`` ... ``endD2hMs`` (times since the run began) and the durations
``h2dMs``, ``computeMs``, ``d2hMs``, ``latencyMs`` (8.2 adds ``endToEndMs``). Up to 8.4 the
warm-up queries are exported too; :func:`drop_warmups` removes them with trtexec's own rule.

bckd's percentiles here are numpy's linear interpolation, the method the runtime's own latency
profiler uses, so a trtexec row and an ONNX Runtime row are summarised the same way. trtexec's
printed percentiles use a different rule (§3.2: the sorted value at index
``max(N - 1 - int((1 - p/100) * N), 0)``, no interpolation; its median averages the two middle
values); :func:`trtexec_percentile` reproduces it, for cross-checks.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from runtime.errors import BckdError
from runtime.trtexec.report import pct_key

PERCENTILE_METHOD = "linear"  # numpy's default, as in runtime.profile.LatencyStats
# key in the file -> field of IterationTimes
_FIELDS = {"startEnqMs": "start_enq_ms", "endEnqMs": "end_enq_ms", "startH2dMs": "start_h2d_ms",
           "startComputeMs": "start_compute_ms", "endD2hMs": "end_d2h_ms", "h2dMs": "h2d_ms",
           "computeMs": "compute_ms", "d2hMs": "d2h_ms", "latencyMs": "latency_ms"}


@dataclass(frozen=True)
class IterationTimes:
    """One array per exported field, in ms, one entry per query in run order."""

    start_enq_ms: np.ndarray
    end_enq_ms: np.ndarray
    start_h2d_ms: np.ndarray
    start_compute_ms: np.ndarray
    end_d2h_ms: np.ndarray
    h2d_ms: np.ndarray
    compute_ms: np.ndarray
    d2h_ms: np.ndarray
    latency_ms: np.ndarray

    @property
    def n(self) -> int:
        return len(self.latency_ms)

    @property
    def enqueue_ms(self) -> np.ndarray:
        return self.end_enq_ms - self.start_enq_ms

    @property
    def walltime_s(self) -> float:
        """First H2D start to last D2H end: trtexec's 'Total Host Walltime'."""
        return float(self.end_d2h_ms[-1] - self.start_h2d_ms[0]) / 1e3

    def sliced(self, start: int) -> IterationTimes:
        return replace(self, **{f: getattr(self, f)[start:] for f in _FIELDS.values()})


def read_export_times(path: str | Path) -> IterationTimes:
    """Parse a ``--exportTimes`` file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise BckdError(f"cannot read trtexec's --exportTimes file {path} ({exc.strerror}); "
                        "check that trtexec ran inference") from exc
    return parse_export_times(text, source=str(path))


def parse_export_times(text: str, source: str = "--exportTimes output") -> IterationTimes:
    """Parse the JSON array trtexec writes; an empty or malformed file is a :class:`BckdError`."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BckdError(f"trtexec's --exportTimes file {source} is not valid JSON ({exc}); "
                        "the run was probably interrupted") from exc
    if not isinstance(records, list) or not records:
        raise BckdError(f"trtexec's --exportTimes file {source} holds no timed queries; "
                        "check the trtexec log")
    columns = {f: _column(records, key, source) for key, f in _FIELDS.items()}
    return IterationTimes(**columns)


def _column(records: list[Any], key: str, source: str) -> np.ndarray:
    try:
        values = np.array([float(r[key]) for r in records], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise BckdError(f"trtexec's --exportTimes file {source} lacks a number '{key}' in some "
                        f"query ({exc!r}); is it from trtexec --exportTimes?") from exc
    if not np.all(np.isfinite(values)):
        raise BckdError(f"trtexec's --exportTimes file {source} has non-finite '{key}' values")
    return values


def drop_warmups(times: IterationTimes, warmup_ms: float) -> IterationTimes:
    """Drop warm-up queries as trtexec does: keep from the first one whose compute starts at or
    after ``warmup_ms`` (only needed for files from TensorRT 8.4 and earlier)."""
    late = np.flatnonzero(times.start_compute_ms >= warmup_ms)
    if late.size == 0:
        raise BckdError(f"every exported query started within the {warmup_ms:g} ms warm-up; "
                        "run longer (--duration / --iterations)")
    return times.sliced(int(late[0]))


def linear_percentiles(values: Sequence[float] | np.ndarray,
                       percentiles: Iterable[float]) -> dict[str, float]:
    """``{'p90': ...}`` with linear interpolation (the runtime profiler's method)."""
    ps = [float(p) for p in percentiles]
    got = np.percentile(np.asarray(values, dtype=np.float64), ps, method=PERCENTILE_METHOD)
    return {pct_key(p): float(v) for p, v in zip(ps, np.atleast_1d(got))}


def trtexec_percentile(values: Sequence[float] | np.ndarray, p: float) -> float:
    """trtexec's ``findPercentile`` (§3.2): ``sorted[max(N - 1 - int((1 - p/100) * N), 0)]``.

    The arithmetic is float32 as in the C++ (it decides ties: p90 of 10 samples is the 9th).
    """
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    n = len(ordered)
    f32 = np.float32
    exclude = int((f32(1) - f32(p) / f32(100)) * f32(n))
    return float(ordered[max(n - 1 - exclude, 0)])


def trtexec_median(values: Sequence[float] | np.ndarray) -> float:
    """trtexec's ``findMedian``: the middle value, or the mean of the two middle values."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    m = len(ordered) // 2
    return float(ordered[m]) if len(ordered) % 2 else float((ordered[m - 1] + ordered[m]) / 2)


def latency_stats(values_ms: np.ndarray, percentiles: Iterable[float]) -> dict[str, Any]:
    """n, mean, std (sample; None below 2 values), cv = std / mean, min, max, percentiles (ms)."""
    ms = np.asarray(values_ms, dtype=np.float64)
    mean = float(ms.mean())
    std = float(ms.std(ddof=1)) if ms.size > 1 else None
    out: dict[str, Any] = {"n": int(ms.size), "mean": mean, "std": std,
                           "cv": std / mean if std is not None and mean > 0 else None,
                           "min": float(ms.min()), "max": float(ms.max())}
    out.update(linear_percentiles(ms, percentiles))
    return out


def coefficient_of_variation_pct(values_ms: np.ndarray) -> float | None:
    """Population std / mean x 100, trtexec's 'coefficient of variance' (None for a zero mean)."""
    ms = np.asarray(values_ms, dtype=np.float64)
    mean = float(ms.mean())
    return float(ms.std(ddof=0) / mean * 100) if mean > 0 and math.isfinite(mean) else None
