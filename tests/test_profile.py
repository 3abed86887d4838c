"""Latency profiling: stopping rule, percentiles, FPS, argument checks and runner profiling."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import BckdError
from runtime.profile import LatencyStats, profile_latency, profile_runner

SLEEP_S = 0.002


def sleeper() -> None:
    time.sleep(SLEEP_S)


@pytest.fixture(scope="module")
def sleep_stats() -> LatencyStats:
    return profile_latency(sleeper, warmup=3, iters=20, min_seconds=0.3, batch=4)


def test_runs_until_both_iters_and_min_seconds(sleep_stats: LatencyStats) -> None:
    # ~2 ms calls: 20 iterations take ~40 ms, so min_seconds decides.
    assert sleep_stats.n >= 20
    assert sleep_stats.total_s >= 0.3
    assert sleep_stats.warmup == 3 and sleep_stats.batch == 4


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
    stats = profile_latency(lambda: time.sleep(0.02), warmup=0, iters=1000, min_seconds=0.0,
                            max_seconds=0.1)
    assert 1 <= stats.n < 1000 and stats.total_s < 0.5


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
