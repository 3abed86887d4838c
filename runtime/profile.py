"""Latency and throughput measurement with a protocol that can be defended.

Single-stream latency follows MLPerf (trt-jetson.md §5.1): each call starts as soon as the previous
one returns. The protocol:

* **Warm-up until settled.** Untimed calls run in windows of ``window`` calls until the median of
  the last window is within ``tolerance`` of the previous window's, after at least ``min_calls``
  calls and capped at ``max_calls`` calls or ``max_seconds``; a warm-up that hits the cap is
  recorded as not settled, with a warning.
* **Timed phase.** Back-to-back calls until *both* ``iters`` calls and ``min_seconds`` have passed,
  capped at ``max_seconds`` (then ``n`` can fall short of ``iters``, with a warning).
* **Statistics.** Every sample is kept: there is no outlier trimming, ever. Percentiles use linear
  interpolation between order statistics (numpy's ``method="linear"``, Hyndman & Fan type 7);
  p99.9 is reported only from :data:`P999_MIN_SAMPLES` samples on (else ``None`` with the reason).
  ``std`` is the sample standard deviation (ddof=1) and ``cv = std / mean``; a cv above the
  threshold marks the figure unstable, with a warning.

The timed loop is lean so that profiling costs next to nothing against a bare loop: integer
``perf_counter_ns`` stamps, one list append and the stop test per call, the input checked once
before the loop. The callable must block until its result is ready (synchronise GPU work in it).

Throughput mode (:func:`profile_throughput`, in :mod:`runtime.throughput`) and per-stage timing
(:func:`profile_pipeline`) use the same protocol and statistics; every result records its ``mode``,
the warm-up outcome, the protocol and, for a runner, ``runner.describe()`` (backend, device,
precision, threads, ...) and the input shape.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from runtime.errors import BckdError

if TYPE_CHECKING:  # only for the annotation; the backends package is not needed to time a callable
    from runtime.backends.base import Runner
    from runtime.data.preprocess import Preprocess

Clock = Callable[[], int]
"""A monotonic clock in integer nanoseconds (``time.perf_counter_ns``; tests inject fakes)."""

MAX_WARMUP_CALLS = 1000
P999_MIN_SAMPLES = 1000  # p99.9 from fewer samples would be (close to) the maximum
DEFAULT_CV_THRESHOLD = 0.1
PERCENTILES = (50, 90, 95, 99)
HISTOGRAM_BINS = 40
STAGES = ("preprocess", "inference", "postprocess", "end_to_end")


@dataclass(frozen=True)
class WarmupPolicy:
    """How long to warm up: until two consecutive windows' medians agree, within caps.

    ``settle=False`` runs exactly ``min_calls`` calls (the old fixed warm-up).
    """

    min_calls: int = 10
    window: int = 5
    tolerance: float = 0.05
    max_calls: int = MAX_WARMUP_CALLS
    max_seconds: float = 30.0
    settle: bool = True

    def __post_init__(self) -> None:
        if self.min_calls < 0 or self.window < 1 or not 0 < self.tolerance < 1:
            raise BckdError(
                f"need warm-up min_calls >= 0, window >= 1 and 0 < tolerance < 1 (got min_calls="
                f"{self.min_calls}, window={self.window}, tolerance={self.tolerance})"
            )
        if self.max_calls < max(self.min_calls, 2 * self.window) or self.max_seconds <= 0:
            raise BckdError(
                f"need warm-up max_calls >= max(min_calls, 2 x window) and max_seconds > 0 (got "
                f"max_calls={self.max_calls}, max_seconds={self.max_seconds})"
            )

    @classmethod
    def of(cls, warmup: int | WarmupPolicy) -> WarmupPolicy:
        """An int is the minimum number of warm-up calls (the settle rule still applies)."""
        if isinstance(warmup, WarmupPolicy):
            return warmup
        if warmup < 0:
            raise BckdError(f"need warmup >= 0 (got warmup={warmup})")
        return cls(min_calls=warmup, max_calls=max(MAX_WARMUP_CALLS, warmup))


@dataclass(frozen=True)
class Warmup:
    """What the warm-up did: calls run, seconds spent, whether the timings settled."""

    calls: int = 0
    seconds: float = 0.0
    settled: bool | None = None  # None: no settle rule was applied

    def warnings(self, policy: WarmupPolicy) -> list[str]:
        if self.settled is not False:
            return []
        return [
            f"warm-up did not settle within its cap ({self.calls} calls, {self.seconds:.1f} s; "
            f"window medians still differ by more than {policy.tolerance:.0%}); the timings may "
            "include warm-up effects: raise the warm-up cap or check the clocks / power mode"
        ]


@dataclass(frozen=True)
class Protocol:
    """The measurement settings, recorded with every figure."""

    iters: int = 50
    min_seconds: float = 1.0
    max_seconds: float = 60.0
    cv_threshold: float = DEFAULT_CV_THRESHOLD
    warmup: WarmupPolicy = field(default_factory=WarmupPolicy)

    def __post_init__(self) -> None:
        if self.iters < 1:
            raise BckdError(f"need iters >= 1 (got iters={self.iters})")
        if self.min_seconds < 0 or self.max_seconds <= 0 or self.min_seconds > self.max_seconds:
            raise BckdError(
                f"need 0 <= min_seconds <= max_seconds and max_seconds > 0 (got min_seconds="
                f"{self.min_seconds}, max_seconds={self.max_seconds})"
            )
        if self.cv_threshold <= 0:
            raise BckdError(f"need cv_threshold > 0 (got {self.cv_threshold})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(percentiles="linear interpolation (numpy method='linear')", trimming="none")
        return d

    def deadlines(self, start_ns: int) -> tuple[int, int]:
        """The clock readings at which ``min_seconds`` and ``max_seconds`` have passed."""
        return start_ns + round(self.min_seconds * 1e9), start_ns + round(self.max_seconds * 1e9)

    def cut_short(self, n: int) -> list[str]:
        """A warning when ``max_seconds`` stopped the timed phase before ``iters`` calls."""
        if n >= self.iters:
            return []
        return [f"max_seconds={self.max_seconds:g} stopped the run after {n} of {self.iters} "
                "calls; percentiles rest on few samples"]


@dataclass
class LatencyStats:
    """Summary of per-call latencies in milliseconds, with how they were measured.

    ``fps`` counts images per second: in ``latency`` mode ``batch x 1000 / mean`` (single stream),
    in ``throughput`` mode the images completed over the measured window.
    """

    n: int
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    p99_9_ms: float | None
    p99_9_note: str | None
    cv: float | None
    stable: bool
    fps: float
    total_s: float
    warmup: int
    batch: int
    mode: str = "latency"
    warmup_settled: bool | None = None
    warmup_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    protocol: dict[str, Any] = field(default_factory=dict)
    histogram: dict[str, list] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_times(cls, times_s: Sequence[float], **kw: Any) -> LatencyStats:
        """Statistics of per-call durations in seconds (keywords as :meth:`from_ms`)."""
        return cls.from_ms(np.asarray(times_s, dtype=np.float64) * 1e3, **kw)

    @classmethod
    def from_ns(cls, times_ns: Sequence[int], **kw: Any) -> LatencyStats:
        """Statistics of per-call durations in integer nanoseconds (keywords as :meth:`from_ms`)."""
        return cls.from_ms(np.asarray(times_ns, dtype=np.float64) / 1e6, **kw)

    @classmethod
    def from_ms(
        cls, ms: np.ndarray, *, total_s: float, batch: int = 1, warmup: int | Warmup = 0,
        mode: str = "latency", fps: float | None = None, protocol: Protocol | None = None,
        warnings: Sequence[str] = (), context: dict[str, Any] | None = None,
    ) -> LatencyStats:
        """Statistics of every sample (none trimmed); ``fps`` overrides ``batch x 1000 / mean``."""
        if len(ms) == 0:
            raise BckdError("no timings to summarise; the measurement ran zero calls")
        proto = protocol or Protocol()
        warm = warmup if isinstance(warmup, Warmup) else Warmup(calls=warmup)
        mean = float(ms.mean())
        std = float(ms.std(ddof=1)) if len(ms) > 1 else 0.0  # sample std
        cv, stable, cv_warnings = _stability(mean, std, len(ms), proto.cv_threshold)
        p999, p999_note = _p999(ms)
        p50, p90, p95, p99 = np.percentile(ms, PERCENTILES, method="linear")
        return cls(
            n=len(ms), mean_ms=mean, std_ms=std, min_ms=float(ms.min()), max_ms=float(ms.max()),
            p50_ms=float(p50), p90_ms=float(p90), p95_ms=float(p95), p99_ms=float(p99),
            p99_9_ms=p999, p99_9_note=p999_note, cv=cv, stable=stable,
            fps=fps if fps is not None else (1e3 / mean * batch if mean > 0 else float("inf")),
            total_s=total_s, warmup=warm.calls, batch=batch, mode=mode,
            warmup_settled=warm.settled, warmup_s=warm.seconds,
            warnings=warm.warnings(proto.warmup) + list(warnings) + cv_warnings,
            protocol=proto.to_dict(), histogram=histogram(ms), context=dict(context or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary; latency keys (mean, p50, ...) are in milliseconds."""
        d = asdict(self)
        out: dict[str, Any] = {k.removesuffix("_ms"): v for k, v in d.items() if k != "context"}
        out["unit"] = "ms"
        out.update(d["context"])
        return out


def histogram(ms: np.ndarray, max_bins: int = HISTOGRAM_BINS) -> dict[str, list]:
    """Every sample binned over [min, max] (none dropped): ``edges_ms`` (bins + 1) and ``counts``.

    The distribution travels with the figures (report.html draws it) at a fixed, small size;
    about ten samples per bin, 5 to ``max_bins`` bins.
    """
    bins = int(min(max_bins, max(5, len(ms) // 10)))
    lo, hi = float(ms.min()), float(ms.max())
    if hi <= lo:
        hi = lo + 1e-6
    counts, edges = np.histogram(ms, bins=bins, range=(lo, hi))
    return {"edges_ms": [round(float(e), 6) for e in edges], "counts": counts.tolist()}


def _stability(mean: float, std: float, n: int,
               threshold: float) -> tuple[float | None, bool, list[str]]:
    """Coefficient of variation, whether it is under ``threshold``, and the warning if not."""
    if n < 2 or mean <= 0:
        return None, False, [f"{n} sample(s): no spread estimate; measure more calls"]
    cv = std / mean
    if cv <= threshold:
        return cv, True, []
    return cv, False, [
        f"unstable timings: cv {cv:.3f} > {threshold:g} (std {std:.3f} ms on a mean of "
        f"{mean:.3f} ms); stop other load, fix the clocks / power mode, or measure longer"
    ]


def _p999(ms: np.ndarray) -> tuple[float | None, str | None]:
    if len(ms) < P999_MIN_SAMPLES:
        return None, f"p99.9 needs >= {P999_MIN_SAMPLES} samples, got {len(ms)}"
    return float(np.percentile(ms, 99.9, method="linear")), None


# -- the protocol's two phases -------------------------------------------------------------------
def warm_up(fn: Callable[[], Any], policy: WarmupPolicy,
            clock: Clock = time.perf_counter_ns) -> Warmup:
    """Call ``fn`` until its timings settle or a cap is hit; these calls stay out of the stats.

    The caps are checked between windows, so a slow call can overrun ``max_seconds`` by a window.
    """
    start = clock()
    times = [_time_call(fn, clock) for _ in range(policy.min_calls)]
    if not policy.settle:
        return Warmup(calls=len(times), seconds=(clock() - start) / 1e9)
    w, cap_ns = policy.window, policy.max_seconds * 1e9
    while True:
        if len(times) >= 2 * w and _windows_agree(times, w, policy.tolerance):
            return Warmup(calls=len(times), seconds=(clock() - start) / 1e9, settled=True)
        if len(times) >= policy.max_calls or clock() - start >= cap_ns:
            return Warmup(calls=len(times), seconds=(clock() - start) / 1e9, settled=False)
        for _ in range(min(w, policy.max_calls - len(times))):
            times.append(_time_call(fn, clock))


def _time_call(fn: Callable[[], Any], clock: Clock) -> int:
    t0 = clock()
    fn()
    return clock() - t0


def _windows_agree(times: list[int], window: int, tolerance: float) -> bool:
    last = float(np.median(times[-window:]))
    prev = float(np.median(times[-2 * window:-window]))
    return abs(last - prev) <= tolerance * prev


def timed_loop(fn: Callable[[], Any], protocol: Protocol, clock: Clock = time.perf_counter_ns,
               ) -> tuple[list[int], int]:
    """Per-call durations (ns) and the phase's total (ns); nothing but the stop test per call."""
    times: list[int] = []
    append = times.append  # amortised O(1), as fast as writing into a preallocated list
    iters = protocol.iters
    start = clock()
    min_end, max_end = protocol.deadlines(start)
    while True:
        t0 = clock()
        fn()
        t1 = clock()
        append(t1 - t0)
        if t1 >= max_end or (t1 >= min_end and len(times) >= iters):
            return times, t1 - start


# -- public entry points -------------------------------------------------------------------------
@contextlib.contextmanager
def activated(runner: Runner) -> Iterator[Runner]:
    """``runner`` active for the block; one that was inactive is released again afterwards."""
    if runner.active:
        yield runner
    else:
        with runner:
            yield runner


def profile_latency(
    fn: Callable[[], Any],
    *,
    warmup: int | WarmupPolicy = 10,
    iters: int = 50,
    min_seconds: float = 1.0,
    max_seconds: float = 60.0,
    batch: int = 1,
    cv_threshold: float = DEFAULT_CV_THRESHOLD,
    clock: Clock = time.perf_counter_ns,
    telemetry: Any = None,
) -> LatencyStats:
    """Single-stream latency of ``fn()``: warm up until settled, then time it (module docstring).

    ``warmup`` is the minimum number of warm-up calls, or a full :class:`WarmupPolicy`.
    ``telemetry`` (from :func:`runtime.telemetry.open_telemetry`) is entered around the timed
    phase only, and its result (energy per frame, FPS per watt, temperatures, ...) is recorded
    as the stats' ``power``.
    """
    if batch < 1:
        raise BckdError(f"need batch >= 1 (got batch={batch})")
    proto = Protocol(iters=iters, min_seconds=min_seconds, max_seconds=max_seconds,
                     cv_threshold=cv_threshold, warmup=WarmupPolicy.of(warmup))
    warm = warm_up(fn, proto.warmup, clock)
    with telemetry if telemetry is not None else contextlib.nullcontext():
        times, total_ns = timed_loop(fn, proto, clock)
    stats = LatencyStats.from_ns(times, total_s=total_ns / 1e9, batch=batch, warmup=warm,
                                 protocol=proto, warnings=proto.cut_short(len(times)))
    if telemetry is not None:
        stats.context["power"] = telemetry.result(frames=len(times) * batch)
    return stats


def profile_runner(runner: Runner, x: np.ndarray, **kw: Any) -> LatencyStats:
    """Single-stream latency of ``runner.infer(x)``; the input is checked once, outside the loop.

    Keywords are those of :func:`profile_latency`. The runner's description (backend, device,
    precision, threads, artifact) and the input shape are recorded in the stats' ``context``. An
    inactive runner is activated for the measurement.
    """
    first = next(iter(x.values())) if isinstance(x, dict) else x
    kw.setdefault("batch", int(first.shape[0]))
    with activated(runner):
        runner.check_input(x)
        stats = profile_latency(lambda: runner.infer(x, check=False), **kw)
        stats.context.update(runner.describe(), input_shape=list(first.shape))
        if isinstance(x, dict):
            stats.context["input_shapes"] = {k: list(v.shape) for k, v in x.items()}
    return stats


def profile_throughput(runner: Runner, x: np.ndarray, **kw: Any) -> LatencyStats:
    """Throughput (images/s) with several requests in flight; see :mod:`runtime.throughput`."""
    from runtime.throughput import profile_throughput as measure  # it builds on this module

    return measure(runner, x, **kw)


# -- per-stage timing ----------------------------------------------------------------------------
def label_map(logits: np.ndarray) -> np.ndarray:
    """The default postprocess: NCHW logits -> NHW class-index map (argmax over classes)."""
    return np.argmax(logits, axis=1)


@dataclass
class PipelineStats:
    """Single-stream latency of each stage (preprocess, inference, postprocess) and end to end.

    All four come from the same iterations and timestamps, so each iteration's end-to-end time is
    exactly the sum of its three stages (percentiles do not add up, means do).
    """

    stages: dict[str, LatencyStats]
    context: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": "latency", "unit": "ms",
                "stages": {name: s.to_dict() for name, s in self.stages.items()}, **self.context}


def profile_pipeline(
    runner: Runner,
    images: Sequence[np.ndarray],
    preprocess: Preprocess | Callable[[Sequence[np.ndarray]], np.ndarray],
    postprocess: Callable[[np.ndarray], Any] = label_map,
    *,
    batch: int = 1,
    warmup: int | WarmupPolicy = 10,
    iters: int = 50,
    min_seconds: float = 1.0,
    max_seconds: float = 60.0,
    cv_threshold: float = DEFAULT_CV_THRESHOLD,
    clock: Clock = time.perf_counter_ns,
    named: bool = False,
) -> PipelineStats:
    """Time raw uint8 HxWx3 ``images`` -> ``preprocess`` -> inference -> ``postprocess``.

    ``postprocess`` takes the first output, or with ``named`` every output by name (detectors).

    Each iteration takes the next ``batch`` images (cycling through ``images``). ``preprocess`` is a
    :class:`~runtime.data.preprocess.Preprocess` (its ``batch``) or any callable from a list of
    images to an NCHW array; its first output is checked against the model once, before timing.
    """
    proto = Protocol(iters=iters, min_seconds=min_seconds, max_seconds=max_seconds,
                     cv_threshold=cv_threshold, warmup=WarmupPolicy.of(warmup))
    pre = _batch_preprocess(preprocess)
    groups = _image_batches(images, batch)
    with activated(runner):
        x = pre(groups[0])
        runner.check_input(x)
        infer = ((lambda x: runner.run(x, check=False)) if named  # noqa: E731
                 else (lambda x: runner.infer(x, check=False)))
        warm = warm_up(_cycling_step(groups, pre, infer, postprocess), proto.warmup, clock)
        marks, total_ns = _pipeline_loop(groups, pre, infer, postprocess, proto, clock)
        context = {**runner.describe(), "input_shape": list(x.shape), "images": len(images)}
    return PipelineStats(_stage_stats(marks, total_ns, batch, warm, proto, context), context)


def _batch_preprocess(preprocess: Preprocess | Callable,
                      ) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    from runtime.data.preprocess import Preprocess  # numpy-only; Pillow loads when it resizes

    return preprocess.batch if isinstance(preprocess, Preprocess) else preprocess


def _image_batches(images: Sequence[np.ndarray], batch: int) -> list[list[np.ndarray]]:
    """``len(images)`` batches of ``batch`` images, starting at successive offsets (cyclic)."""
    if len(images) == 0 or batch < 1:
        raise BckdError(f"need at least one image and batch >= 1 (got {len(images)} images, "
                        f"batch={batch})")
    n = len(images)
    return [[images[(i * batch + k) % n] for k in range(batch)] for i in range(n)]


def _cycling_step(groups: list[list[np.ndarray]], pre: Callable, infer: Callable,
                  post: Callable) -> Callable[[], Any]:
    batches = itertools.cycle(groups)
    return lambda: post(infer(pre(next(batches))))


def _pipeline_loop(groups: list[list[np.ndarray]], pre: Callable, infer: Callable, post: Callable,
                   protocol: Protocol, clock: Clock) -> tuple[np.ndarray, int]:
    """(n, 4) stamps per iteration: before preprocess, inference, postprocess, and after."""
    marks: list[tuple[int, int, int, int]] = []
    append, n_groups, iters = marks.append, len(groups), protocol.iters
    start = clock()
    min_end, max_end = protocol.deadlines(start)
    while True:
        raw = groups[len(marks) % n_groups]
        t0 = clock()
        x = pre(raw)
        t1 = clock()
        y = infer(x)
        t2 = clock()
        post(y)
        t3 = clock()
        append((t0, t1, t2, t3))
        if t3 >= max_end or (t3 >= min_end and len(marks) >= iters):
            return np.asarray(marks, dtype=np.int64), t3 - start


def _stage_stats(marks: np.ndarray, total_ns: int, batch: int, warm: Warmup, proto: Protocol,
                 context: dict[str, Any]) -> dict[str, LatencyStats]:
    durations = np.diff(marks, axis=1)  # preprocess, inference, postprocess
    columns = [*durations.T, marks[:, 3] - marks[:, 0]]
    extra = proto.cut_short(len(marks))
    return {name: LatencyStats.from_ns(col, total_s=total_ns / 1e9, batch=batch, warmup=warm,
                                       protocol=proto, warnings=extra, context=context)
            for name, col in zip(STAGES, columns)}
