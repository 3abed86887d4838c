"""Latency profiling: warm-up settling, stopping rule, statistics, throughput and stage timing.

The protocol's logic is tested with an injected fake clock and callables that advance it by chosen
durations, so nothing here depends on how fast or loaded the machine is; the few real-clock tests
check only structure (ordering, counts, recorded context).
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from runtime.backends.base import InputSpec, Runner
from runtime.errors import BckdError
from runtime.profile import (STAGES, LatencyStats, Protocol, WarmupPolicy, label_map,
                             profile_latency, profile_pipeline, profile_runner, profile_throughput,
                             warm_up)

SLEEP_S = 0.002


class FakeClock:
    """A nanosecond clock that only moves when a fake call advances it."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: float) -> None:
        self.now += round(ms * 1e6)

    def taking(self, duration_ms: Callable[[int], float]) -> Callable[[], None]:
        """A callable whose i-th call (from 0, warm-up included) takes ``duration_ms(i)``."""
        calls = itertools.count()
        return lambda: self.advance(duration_ms(next(calls)))


def sleeper() -> None:
    time.sleep(SLEEP_S)


@pytest.fixture(scope="module")
def sleep_stats() -> LatencyStats:
    return profile_latency(sleeper, warmup=3, iters=20, min_seconds=0.3, batch=4)


def test_runs_until_both_iters_and_min_seconds(sleep_stats: LatencyStats) -> None:
    # ~2 ms calls: 20 iterations take ~40 ms, so min_seconds decides.
    assert sleep_stats.n >= 20
    assert sleep_stats.total_s >= 0.3
    assert sleep_stats.warmup >= 3 and sleep_stats.batch == 4  # at least 3: then until settled


def test_percentiles_are_sensible(sleep_stats: LatencyStats) -> None:
    s = sleep_stats
    # sleep never returns early; a loaded 2-core CI box can stretch it, hence the wide upper band.
    assert SLEEP_S * 1e3 <= s.p50_ms < 20 * SLEEP_S * 1e3
    assert s.min_ms <= s.p50_ms <= s.p90_ms <= s.p99_ms <= s.max_ms
    assert s.min_ms <= s.mean_ms <= s.max_ms and s.std_ms >= 0


def test_fps_counts_images(sleep_stats: LatencyStats) -> None:
    assert sleep_stats.fps == pytest.approx(1000.0 / sleep_stats.mean_ms * 4)


def test_iters_decides_when_min_seconds_is_short() -> None:
    stats = profile_latency(lambda: None, warmup=0, iters=37, min_seconds=0.0)
    assert stats.n == 37


def test_max_seconds_caps_a_slow_call() -> None:
    clock = FakeClock()
    stats = profile_latency(clock.taking(lambda i: 20.0), warmup=0, iters=1000, min_seconds=0.0,
                            max_seconds=0.1, clock=clock)
    assert stats.n == 5 and stats.total_s == pytest.approx(0.1)  # 5 x 20 ms reach the cap
    assert any("stopped the run after 5 of 1000" in w for w in stats.warnings)


def test_stats_use_linear_percentiles_without_trimming() -> None:
    times = [0.001 * k for k in range(1, 11)] + [1.0]  # one outlier of 1 s stays in
    s = LatencyStats.from_times(times, total_s=sum(times), warmup=0, batch=1)
    ms = np.array(times) * 1e3
    assert s.max_ms == pytest.approx(1000.0)
    assert s.mean_ms == pytest.approx(ms.mean())
    assert s.p90_ms == pytest.approx(np.percentile(ms, 90))
    assert s.p50_ms == pytest.approx(6.0)


def test_to_dict_keys() -> None:
    d = LatencyStats.from_times([0.001, 0.002], total_s=0.003, warmup=1, batch=2,
                                context={"backend": "x"}).to_dict()
    assert {"n", "mean", "std", "min", "max", "p50", "p90", "p99", "fps", "total_s", "warmup",
            "batch"} <= d.keys()
    assert {"p95", "p99_9", "p99_9_note", "cv", "stable", "warnings", "mode", "warmup_settled",
            "warmup_s", "protocol", "histogram"} <= d.keys()
    assert d["mode"] == "latency" and d["protocol"]["trimming"] == "none"
    assert d["mean"] == pytest.approx(1.5) and d["unit"] == "ms" and d["backend"] == "x"


@pytest.mark.parametrize(
    "kw", [{"iters": 0}, {"warmup": -1}, {"batch": 0}, {"min_seconds": 5.0, "max_seconds": 1.0}]
)
def test_bad_arguments_are_user_errors(kw: dict) -> None:
    with pytest.raises(BckdError):
        profile_latency(lambda: None, **kw)


def test_profile_runner_records_the_runner(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from export import export_onnx
    from runtime.backends import open_runner

    model = torch.nn.Conv2d(3, 2, 1)
    export_onnx(model, tmp_path / "m.onnx", (16, 16), simplify=False)
    x = np.zeros((2, 3, 16, 16), np.float32)
    runner = open_runner("onnxruntime", tmp_path / "m.onnx", threads=1)
    stats = profile_runner(runner, x, warmup=2, iters=10, min_seconds=0.0)
    assert not runner.active  # it activated the runner only for the measurement
    d = stats.to_dict()
    assert d["n"] >= 10 and d["batch"] == 2 and d["input_shape"] == [2, 3, 16, 16]
    assert d["backend"] == "onnxruntime" and d["threads"] == 1 and d["precision"] == "fp32"
    with pytest.raises(BckdError, match="channels"):
        profile_runner(runner, np.zeros((1, 4, 16, 16), np.float32))


# -- warm-up until settled (fake clock) ----------------------------------------------------------
def test_warmup_settles_only_after_the_slow_calls() -> None:
    k, clock = 30, FakeClock()
    # lazy-init shape: the first k calls get faster step by step, then every call takes 1 ms
    fn = clock.taking(lambda i: 1.0 + (k - i) if i < k else 1.0)
    stats = profile_latency(fn, warmup=WarmupPolicy(min_calls=0, window=5), iters=20,
                            min_seconds=0.0, clock=clock)
    assert stats.warmup >= k and stats.warmup_settled is True and stats.warnings == []
    # the timed phase saw only settled calls: every sample is exactly 1 ms
    assert stats.min_ms == stats.max_ms == stats.p50_ms == 1.0 and stats.cv == 0.0 and stats.stable


def test_warmup_that_never_settles_hits_the_call_cap_and_warns() -> None:
    clock = FakeClock()
    fn = clock.taking(lambda i: 1.0 * 1.1 ** min(i, 200))  # 10 % slower every call
    policy = WarmupPolicy(min_calls=0, window=5, max_calls=60)
    stats = profile_latency(fn, warmup=policy, iters=3, min_seconds=0.0, clock=clock,
                            cv_threshold=10.0)
    assert stats.warmup == 60 and stats.warmup_settled is False
    assert len(stats.warnings) == 1 and "did not settle" in stats.warnings[0]


def test_warmup_time_cap() -> None:
    clock = FakeClock()
    fn = clock.taking(lambda i: 100.0 * (1 + i % 2))  # alternating 100 / 200 ms never settles
    w = warm_up(fn, WarmupPolicy(min_calls=0, window=3, max_seconds=1.0), clock)
    assert w.settled is False and 1.0 <= w.seconds < 1.0 + 3 * 0.2  # checked between windows
    assert w.calls < 1000


def test_fixed_warmup_and_minimum_calls() -> None:
    clock = FakeClock()
    fixed = warm_up(clock.taking(lambda i: 1.0), WarmupPolicy(min_calls=7, settle=False), clock)
    assert fixed.calls == 7 and fixed.settled is None
    steady = warm_up(clock.taking(lambda i: 1.0), WarmupPolicy(min_calls=23, window=5), clock)
    assert steady.calls == 23 and steady.settled is True  # min_calls first, then the check


@pytest.mark.parametrize("kw", [{"window": 0}, {"tolerance": 0.0}, {"min_calls": -1},
                                {"max_calls": 5, "window": 5}, {"max_seconds": 0.0}])
def test_bad_warmup_policy_is_a_user_error(kw: dict) -> None:
    with pytest.raises(BckdError, match="warm-up"):
        WarmupPolicy(**kw)


# -- timed phase and statistics ------------------------------------------------------------------
def test_stopping_rule_with_a_fake_clock() -> None:
    clock = FakeClock()
    stats = profile_latency(clock.taking(lambda i: 10.0), warmup=0, iters=5, min_seconds=0.2,
                            clock=clock)
    assert stats.n == 20 and stats.total_s == pytest.approx(0.2)  # min_seconds decides
    stats = profile_latency(clock.taking(lambda i: 10.0), warmup=0, iters=30, min_seconds=0.2,
                            clock=clock)
    assert stats.n == 30  # iters decides


def test_an_outlier_is_kept_not_trimmed() -> None:
    clock = FakeClock()
    warm = 10  # the constant warm-up settles after exactly two windows of 5
    fn = clock.taking(lambda i: 1000.0 if i == warm + 500 else 1.0)
    stats = profile_latency(fn, warmup=0, iters=1000, min_seconds=0.0, clock=clock)
    assert stats.warmup == warm and stats.n == 1000
    assert stats.max_ms == 1000.0 and stats.mean_ms == pytest.approx((999 + 1000) / 1000)
    assert stats.p50_ms == 1.0 and not stats.stable  # one 1 s call in 1000 makes cv ~ 16
    hist = stats.histogram  # the outlier is in the distribution too, in the last bin
    assert sum(hist["counts"]) == 1000 and len(hist["counts"]) == 40
    assert hist["counts"][0] == 999 and hist["counts"][-1] == 1
    assert hist["edges_ms"][0] == 1.0 and hist["edges_ms"][-1] == 1000.0


def test_histogram_bins_scale_with_the_samples() -> None:
    s = LatencyStats.from_times([0.001, 0.002, 0.002], total_s=0.005)
    assert len(s.histogram["counts"]) == 5 and sum(s.histogram["counts"]) == 3
    flat = LatencyStats.from_times([0.002] * 4, total_s=0.008).histogram  # zero spread
    assert sum(flat["counts"]) == 4 and flat["edges_ms"][0] == 2.0


def test_p99_9_needs_a_thousand_samples() -> None:
    few = LatencyStats.from_times([0.001] * 999, total_s=1.0)
    assert few.p99_9_ms is None and "1000" in few.p99_9_note and "999" in few.p99_9_note
    times = np.linspace(0.001, 0.002, 1000)
    many = LatencyStats.from_times(times, total_s=1.0)
    assert many.p99_9_note is None
    assert many.p99_9_ms == pytest.approx(np.percentile(times * 1e3, 99.9, method="linear"))
    assert many.p99_ms <= many.p99_9_ms <= many.max_ms


def test_p95_and_cv() -> None:
    times = [0.001, 0.003] * 50
    s = LatencyStats.from_times(times, total_s=0.2)
    ms = np.array(times) * 1e3
    assert s.p95_ms == pytest.approx(np.percentile(ms, 95))
    assert s.cv == pytest.approx(ms.std(ddof=1) / ms.mean())


def test_high_cv_is_flagged_unstable() -> None:
    times = [0.001, 0.003] * 50  # cv ~ 0.5
    noisy = LatencyStats.from_times(times, total_s=0.2)
    assert not noisy.stable and len(noisy.warnings) == 1 and "unstable" in noisy.warnings[0]
    lenient = LatencyStats.from_times(times, total_s=0.2, protocol=Protocol(cv_threshold=1.0))
    assert lenient.stable and lenient.warnings == []
    quiet = LatencyStats.from_times([0.001, 0.00101] * 50, total_s=0.2)
    assert quiet.stable and quiet.warnings == []


def test_cv_threshold_is_configurable_and_recorded() -> None:
    clock = FakeClock()
    fn = clock.taking(lambda i: 1.0 + (i % 2))  # 1 / 2 ms alternating: cv ~ 0.33
    strict = profile_latency(fn, warmup=0, iters=10, min_seconds=0.0, clock=clock)
    assert not strict.stable and strict.protocol["cv_threshold"] == 0.1
    loose = profile_latency(fn, warmup=0, iters=10, min_seconds=0.0, clock=clock,
                            cv_threshold=0.5)
    assert loose.stable and loose.protocol["cv_threshold"] == 0.5


def test_one_sample_has_no_spread_estimate() -> None:
    s = LatencyStats.from_times([0.001], total_s=0.001)
    assert s.cv is None and not s.stable and "no spread" in s.warnings[0]


def test_protocol_is_recorded() -> None:
    clock = FakeClock()
    d = profile_latency(clock.taking(lambda i: 1.0), warmup=4, iters=10, min_seconds=0.0,
                        max_seconds=5.0, clock=clock).to_dict()
    assert d["protocol"]["iters"] == 10 and d["protocol"]["max_seconds"] == 5.0
    assert d["protocol"]["warmup"]["min_calls"] == 4 and d["protocol"]["warmup"]["settle"]
    assert "linear" in d["protocol"]["percentiles"] and d["warmup_settled"] is True


# -- runners: tiny ONNX model built with onnx.helper (no torch) ----------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((4, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4, "H", "W"])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("profile") / "tiny.onnx"
    onnx.save_model(model, str(path))
    return path


QUICK = {"warmup": WarmupPolicy(min_calls=2, window=2, max_calls=20), "iters": 12,
         "min_seconds": 0.0}


@pytest.mark.parametrize("requests", [None, 2])
def test_throughput_on_onnxruntime(tiny_model: Path, requests: int | None) -> None:
    pytest.importorskip("onnxruntime")
    from runtime.backends import open_runner

    x = np.zeros((2, 3, 16, 16), np.float32)
    runner = open_runner("onnxruntime", tiny_model, threads=1)
    d = profile_throughput(runner, x, requests=requests, **QUICK).to_dict()
    assert not runner.active
    assert d["mode"] == "throughput" and d["n"] >= 12 and d["batch"] == 2
    assert d["requests"] == (requests or 1) and d["concurrency"] == "threads"
    assert d["images"] == 2 * d["n"] and d["fps"] == pytest.approx(d["images"] / d["total_s"])
    assert d["backend"] == "onnxruntime" and d["threads"] == 1
    assert d["input_shape"] == [2, 3, 16, 16]
    assert d["min"] <= d["p50"] <= d["p99"] <= d["max"]


def test_throughput_on_openvino(tiny_model: Path) -> None:
    pytest.importorskip("openvino")
    from runtime.backends import open_runner

    x = np.zeros((1, 3, 16, 16), np.float32)
    with open_runner("openvino", tiny_model, hint="throughput", threads=1) as runner:
        stats = profile_throughput(runner, x, requests=3, **QUICK)
        # the queue is still usable by infer_async afterwards (its callback was reset)
        out = runner.infer_async([x, x])
    d = stats.to_dict()
    assert d["mode"] == "throughput" and d["n"] >= 12 and d["requests"] == 3
    assert d["concurrency"] == "openvino AsyncInferQueue" and d["images"] == d["n"]
    assert d["backend"] == "openvino" and d["precision"] == "fp32" and d["hint"] == "throughput"
    assert d["fps"] > 0 and d["min"] <= d["p50"] <= d["max"]
    assert len(out) == 2 and out[0].shape == (1, 4, 16, 16)


class FakeRunner(Runner):
    """A runner whose inference advances a fake clock by a fixed time."""

    backend = "fake"

    def __init__(self, artifact: Path, clock: FakeClock, infer_ms: float = 5.0) -> None:
        super().__init__(artifact, card={})
        self.clock, self.infer_ms = clock, infer_ms

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec("input", (None, 3, None, None), np.dtype(np.float32))

    def _load(self) -> None:
        pass

    def _release(self) -> None:
        pass

    def _run(self, x: np.ndarray) -> np.ndarray:
        self.clock.advance(self.infer_ms)
        return np.zeros((x.shape[0], 2, *x.shape[2:]), np.float32)


@pytest.fixture
def fake_runner(tmp_path: Path) -> FakeRunner:
    (tmp_path / "fake.bin").write_bytes(b"")
    return FakeRunner(tmp_path / "fake.bin", FakeClock())


def test_serial_runner_refuses_concurrent_requests(fake_runner: FakeRunner) -> None:
    x = np.zeros((1, 3, 4, 4), np.float32)
    with pytest.raises(BckdError, match="one request at a time"):
        profile_throughput(fake_runner, x, requests=2)
    with pytest.raises(BckdError, match="positive integer"):
        profile_throughput(fake_runner, x, requests=0)


def test_throughput_counts_images_over_the_window(fake_runner: FakeRunner) -> None:
    x = np.zeros((4, 3, 4, 4), np.float32)
    s = profile_throughput(fake_runner, x, warmup=0, iters=10, min_seconds=0.0,
                           clock=fake_runner.clock)
    assert s.mode == "throughput" and s.n == 10 and s.p50_ms == 5.0
    assert s.fps == pytest.approx(4 / 0.005)  # 4 images every 5 ms


# -- stage timing --------------------------------------------------------------------------------
def test_pipeline_times_each_stage(fake_runner: FakeRunner) -> None:
    clock = fake_runner.clock

    def pre(imgs: list[np.ndarray]) -> np.ndarray:
        clock.advance(1.0)
        return np.zeros((len(imgs), 3, 4, 4), np.float32)

    def post(y: np.ndarray) -> Any:
        clock.advance(2.0)
        return label_map(y)

    images = [np.zeros((8, 8, 3), np.uint8)] * 3
    result = profile_pipeline(fake_runner, images, pre, post, batch=2, warmup=0, iters=20,
                              min_seconds=0.0, clock=clock)
    p50 = {name: s.p50_ms for name, s in result.stages.items()}
    assert p50 == {"preprocess": 1.0, "inference": 5.0, "postprocess": 2.0, "end_to_end": 8.0}
    d = result.to_dict()
    assert d["mode"] == "latency" and d["backend"] == "fake" and d["input_shape"] == [2, 3, 4, 4]
    assert set(d["stages"]) == set(STAGES) and d["stages"]["end_to_end"]["fps"] == 250.0
    assert all(s["n"] == 20 and s["warmup"] == 10 and s["backend"] == "fake"
               for s in d["stages"].values())  # every figure carries what it was measured on


def test_pipeline_on_onnxruntime_with_real_preprocessing(tiny_model: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("PIL")
    from runtime.backends import open_runner
    from runtime.data.preprocess import Preprocess

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 56), (20, 20)]]
    runner = open_runner("onnxruntime", tiny_model, threads=1)
    result = profile_pipeline(runner, images, Preprocess(size=(16, 16)), **QUICK)
    s = result.stages
    parts = [s["preprocess"], s["inference"], s["postprocess"]]
    e2e = s["end_to_end"]
    # every iteration's end to end is the sum of its stages, so these hold exactly
    assert e2e.n == parts[0].n >= 12
    assert e2e.mean_ms == pytest.approx(sum(p.mean_ms for p in parts), rel=1e-9)
    assert sum(p.min_ms for p in parts) <= e2e.min_ms + 1e-9
    assert e2e.max_ms <= sum(p.max_ms for p in parts) + 1e-9
    d = result.to_dict()
    assert d["backend"] == "onnxruntime" and d["threads"] == 1 and d["images"] == 2
    assert d["input_shape"] == [1, 3, 16, 16]


def test_pipeline_checks_the_preprocessed_input_once(tiny_model: Path) -> None:
    pytest.importorskip("onnxruntime")
    from runtime.backends import open_runner

    runner = open_runner("onnxruntime", tiny_model, threads=1)
    wrong = lambda imgs: np.zeros((1, 4, 16, 16), np.float32)  # noqa: E731
    with pytest.raises(BckdError, match="channels"):
        profile_pipeline(runner, [np.zeros((16, 16, 3), np.uint8)], wrong)
    with pytest.raises(BckdError, match="at least one image"):
        profile_pipeline(runner, [], wrong)
