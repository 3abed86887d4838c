"""trtexec on the device: the summary parser on the verbatim 8.x / 10.x examples of trt-jetson.md
§3,
the echoed options (which decide what "Latency" means on 11.x), ``--exportTimes`` and its
statistics, and :func:`profile_trtexec` against a stand-in trtexec per version.

Verbatim logs live in ``tests/trtexec_logs.py``; the stand-in is ``tests/trtexec_fake.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import BckdError
from runtime.trt_versions import TrtVersion
from runtime.trtexec import (InferenceRun, inference_command, parse_export_times, parse_trtexec_log,
                             profile_trtexec, read_trtexec_log, trtexec_median, trtexec_percentile)
from runtime.trtexec.report import parse_metric
from runtime.trtexec.times import drop_warmups, latency_stats, linear_percentiles
from trtexec_fake import write_fake_trtexec
from trtexec_logs import (DEVICE_ORIN, HEADER_102, LINES_82, SUMMARY_10X, SUMMARY_84,
                          TRACE_AVERAGE_10X, WARNINGS_10X, options_echo)


# -- the 10.x summary, one test per field (NVIDIA/TensorRT #4177) ---------------------------------
@pytest.fixture(scope="module")
def summary_10x() -> dict:
    return parse_trtexec_log(SUMMARY_10X).summary.to_dict()


@pytest.mark.parametrize("metric, values", [
    ("latency", (5.38672, 13.3664, 7.60628, 7.16092, 10.2996, 10.8698, 12.9675)),
    ("enqueue_time", (2.72876, 15.0201, 7.63062, 7.86694, 10.1792, 11.7217, 14.1848)),
    ("h2d_latency", (0.0065918, 0.0698242, 0.0122212, 0.00814819, 0.0253906, 0.0270996, 0.0515137)),
    ("gpu_compute_time", (5.34595, 13.3388, 7.58404, 7.14139, 10.2881, 10.8175, 12.9485)),
    ("d2h_latency", (0.00390625, 0.110596, 0.0100141, 0.00439453, 0.0254517, 0.0319824, 0.0994873)),
])
@pytest.mark.parametrize("i, field", list(enumerate(["min", "max", "mean", "median", "p90", "p95",
                                                     "p99"])))
def test_10x_metric_fields(summary_10x: dict, metric: str, values: tuple, i: int,
                           field: str) -> None:
    assert summary_10x[metric][field] == values[i]


@pytest.mark.parametrize("field, value", [
    ("throughput_qps", 130.298), ("total_host_walltime_s", 3.00082),
    ("total_gpu_compute_time_s", 2.96536), ("enqueue_bound", False), ("transfer_bound", False),
    ("gpu_compute_cov_pct", None), ("warnings", []),
])
def test_10x_scalar_fields(summary_10x: dict, field: str, value: object) -> None:
    assert summary_10x[field] == value


def test_10x_has_no_end_to_end_line_and_only_the_printed_percentiles(summary_10x: dict) -> None:
    assert "end_to_end_host_latency" not in summary_10x
    assert sorted(summary_10x["latency"]) == ["max", "mean", "median", "min", "p90", "p95", "p99"]


def test_10x_without_options_echo_says_it_cannot_tell_about_transfers() -> None:
    log = parse_trtexec_log(SUMMARY_10X)
    assert log.version is None and log.device is None and log.passed is None
    assert log.latency_includes_data_transfers is None
    assert any("does not say whether data transfers" in n for n in log.notes)


# -- 8.4 and 8.2 forms ---------------------------------------------------------------------------
def test_84_single_percentile_footer_and_version() -> None:
    log = parse_trtexec_log(SUMMARY_84)
    s = log.summary
    assert s.throughput_qps == 41087.7
    assert s.metrics["latency"].percentiles == {99.0: 0.420288}
    assert s.metrics["gpu_compute_time"].median == 0.388443
    assert s.metrics["d2h_latency"].to_dict() == {"min": 0.00195312, "max": 0.00537109,
                                                  "mean": 0.00360451, "median": 0.00366211,
                                                  "p99": 0.00488281}
    assert (s.total_host_walltime_s, s.total_gpu_compute_time_s) == (3.00119, 2.99202)
    assert log.passed is True and log.version == TrtVersion(8, 4, 0)


def test_82_lines_parse_including_end_to_end() -> None:
    (_, lat), (_, e2e) = (ln.split("[I] ", 1)[1].split(": ", 1) for ln in LINES_82.splitlines())
    assert parse_metric("Latency", lat).to_dict() == {
        "min": 0.564209, "max": 0.593018, "mean": 0.573891, "median": 0.572998, "p99": 0.587769}
    assert parse_metric("End-to-End Host Latency", e2e).percentiles == {99.0: 0.601685}


def test_82_summary_with_end_to_end_line() -> None:
    # The 8.4 block with its Latency line replaced by the two verbatim 8.2 lines (composed).
    lines = SUMMARY_84.splitlines(keepends=True)
    log = parse_trtexec_log("".join(lines[:2]) + LINES_82 + "".join(lines[3:]))
    e2e = log.summary.metrics["end_to_end_host_latency"]
    assert (e2e.min, e2e.max, e2e.mean) == (0.574707, 0.606201, 0.586663)
    assert log.summary.metrics["latency"].median == 0.572998


def test_header_banner_and_trace_averages_do_not_confuse_the_parser() -> None:
    log = parse_trtexec_log(HEADER_102 + DEVICE_ORIN + TRACE_AVERAGE_10X + SUMMARY_10X)
    assert log.version == TrtVersion(10, 2, 0)
    assert (log.device.name, log.device.compute_capability) == ("Orin", "8.7")
    assert log.summary.metrics["latency"].mean == 7.60628


def test_warnings_enqueue_bound_and_unstable() -> None:
    s = parse_trtexec_log(SUMMARY_10X + WARNINGS_10X).summary
    assert s.enqueue_bound and not s.transfer_bound
    assert s.gpu_compute_cov_pct == 16.4497
    assert s.warnings[0].endswith("--useCudaGraph (utilize CUDA graphs where possible) may "
                                  "increase the throughput.")
    assert len(s.warnings) == 2


def test_scientific_notation_and_unprefixed_lines() -> None:
    text = SUMMARY_10X.replace("130.298 qps", "1.29477e+08 qps")
    text = text.replace("[10/03/2024-10:47:59] [I] ", "")
    assert parse_trtexec_log(text).summary.throughput_qps == 1.29477e08


def test_last_summary_block_wins() -> None:
    second = SUMMARY_10X.replace("130.298", "99.5")
    assert parse_trtexec_log(SUMMARY_10X + second).summary.throughput_qps == 99.5


# -- options echo and comparability -------------------------------------------------------------
def test_10x_options_echo() -> None:
    echo = options_echo(10, 3, transfers=True, spin=False, graph=False,
                        shapes={"input:0": "1x3x512x512"}, iterations=50, duration=5, warmup=500,
                        export_times="/tmp/t.json")
    o = parse_trtexec_log(echo + SUMMARY_10X).options
    assert o.shapes == {"input:0": "1x3x512x512"} and o.batch == "Explicit"
    assert (o.iterations, o.duration_s, o.warmup_ms, o.streams) == (50, 5.0, 500.0, 1)
    assert (o.data_transfers, o.spin_wait, o.cuda_graph) == (True, False, False)
    assert o.percentiles == (90.0, 95.0, 99.0) and o.export_times == "/tmp/t.json"


def test_11x_defaults_are_flagged_as_not_comparable() -> None:
    echo = options_echo(11, 1, transfers=False, spin=True, graph=True)
    log = parse_trtexec_log(echo + SUMMARY_10X)
    assert log.latency_includes_data_transfers is False
    notes = " | ".join(log.notes)
    assert "Latency excludes H2D/D2H" in notes and "CUDA graph" in notes and "spin-wait" in notes


def test_84_options_echo_single_percentile_and_implicit_batch() -> None:
    echo = options_echo(8, 4, transfers=True, spin=False, graph=False, percentiles="99", batch="16")
    o = parse_trtexec_log(echo + SUMMARY_84).options
    assert o.percentiles == (99.0,) and o.implicit_batch == 16 and o.shapes == {}
    assert parse_trtexec_log(echo + SUMMARY_84).notes == []


# -- malformed or missing output ------------------------------------------------------------------
def test_missing_summary_names_the_log() -> None:
    match = r"no '=== Performance summary ===' in /x/run\.log; .*check the log"
    with pytest.raises(BckdError, match=match):
        parse_trtexec_log(HEADER_102 + DEVICE_ORIN, source="/x/run.log")


def test_failed_run_quotes_its_error() -> None:
    text = HEADER_102 + "[E] Error[1]: engine plan incompatible\n&&&& FAILED TensorRT.trtexec\n"
    with pytest.raises(BckdError, match="trtexec failed: .*engine plan incompatible"):
        parse_trtexec_log(text)


@pytest.mark.parametrize("line", ["D2H Latency", "Total GPU Compute Time", "Throughput"])
def test_missing_line_is_named(line: str) -> None:
    text = "".join(ln for ln in SUMMARY_10X.splitlines(keepends=True) if f"] {line}:" not in ln)
    with pytest.raises(BckdError, match=f"has no {line} line; .*check the log"):
        parse_trtexec_log(text, source="run.log")


def test_malformed_stats_and_infinite_values() -> None:
    with pytest.raises(BckdError, match="cannot read trtexec's 'Latency' line in run.log"):
        parse_trtexec_log(SUMMARY_10X.replace("median = 7.16092 ms", "median 7.16092"), "run.log")
    with pytest.raises(BckdError, match="GPU Compute Time min = inf .*timed no queries"):
        parse_trtexec_log(SUMMARY_10X.replace("min = 5.34595 ms", "min = inf ms"))


def test_read_missing_log_file(tmp_path: Path) -> None:
    with pytest.raises(BckdError, match="cannot read trtexec log .*nope.log"):
        read_trtexec_log(tmp_path / "nope.log")
    (tmp_path / "ok.log").write_text(SUMMARY_84)
    assert read_trtexec_log(tmp_path / "ok.log").source == str(tmp_path / "ok.log")


# -- --exportTimes ---------------------------------------------------------------------------------
def _times_json(latencies: list[float], start: float = 0.0) -> str:
    rows, t = [], start
    for lat in latencies:
        rows.append({"startEnqMs": t, "endEnqMs": t + 0.1, "startH2dMs": t, "endH2dMs": t + 0.1,
                     "startComputeMs": t + 0.1, "endComputeMs": t + lat - 0.1,
                     "startD2hMs": t + lat - 0.1, "endD2hMs": t + lat, "h2dMs": 0.1,
                     "computeMs": lat - 0.2, "d2hMs": 0.1, "latencyMs": lat})
        t += lat
    return json.dumps(rows)


def test_export_times_columns_and_walltime() -> None:
    times = parse_export_times(_times_json([1.0, 2.0, 3.0]))
    assert times.n == 3 and list(times.latency_ms) == [1.0, 2.0, 3.0]
    assert np.allclose(times.compute_ms, [0.8, 1.8, 2.8]) and np.allclose(times.enqueue_ms, 0.1)
    assert times.walltime_s == pytest.approx(0.006)


@pytest.mark.parametrize("text, match", [
    ("[]", "holds no timed queries"), ("[{", "is not valid JSON"),
    ('[{"latencyMs": 1}]', "lacks a number 'startEnqMs'"),
])
def test_bad_export_times(text: str, match: str) -> None:
    with pytest.raises(BckdError, match=match):
        parse_export_times(text, source="t.json")


def test_drop_warmups_uses_trtexecs_rule() -> None:
    times = parse_export_times(_times_json([4.0] * 10))  # compute starts at 0.1, 4.1, 8.1, ...
    assert drop_warmups(times, 8.0).n == 8
    with pytest.raises(BckdError, match="within the 100 ms warm-up"):
        drop_warmups(times, 100.0)


def test_trtexec_percentile_algorithm_differs_from_linear() -> None:
    values = [float(v) for v in range(1, 11)]  # 1..10
    assert trtexec_percentile(values, 90) == 9.0     # float32: int((1 - 0.9f) * 10) = 1 excluded
    assert trtexec_percentile(values, 99) == 10.0    # int(0.01 * 10) = 0 excluded
    assert trtexec_percentile(values, 0) == 1.0      # clamped at index 0
    assert linear_percentiles(values, [90, 99]) == {"p90": pytest.approx(9.1),
                                                    "p99": pytest.approx(9.91)}
    assert trtexec_median(values) == 5.5 and trtexec_median(values[:9]) == 5.0


def test_latency_stats_shape() -> None:
    stats = latency_stats(np.array([1.0, 2.0, 3.0, 4.0]), [50, 99.9])
    assert stats["n"] == 4 and stats["mean"] == 2.5 and stats["p50"] == 2.5 and "p99_9" in stats
    assert stats["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert latency_stats(np.array([1.0]), [50])["std"] is None  # not 0: undefined for one sample


# -- command lines per version -----------------------------------------------------------------
def _cmd(version: str, **kw: object) -> list[str]:
    run = InferenceRun(model=Path("/m/model.engine"), **kw)
    trt = TrtVersion(*map(int, version.split(".")))
    return inference_command("trtexec", trt, run, Path("/t.json"))


@pytest.mark.parametrize("version, toggles, percentile", [
    ("8.2.1", [], "--percentile=99"),
    ("8.4.1", [], "--percentile=99"),
    ("8.5.2", [], "--percentile=50,90,95,99"),
    ("10.3.0", [], "--percentile=50,90,95,99"),
    ("11.1.0", ["--includeDataTransfers"], "--percentile=50,90,95,99"),
])
def test_command_per_version(version: str, toggles: list, percentile: str) -> None:
    cmd = _cmd(version, shapes={"input:0": (2, 3, 64, 96)}, iterations=37, duration_s=0,
               warmup_ms=20)
    assert cmd == ["trtexec", "--loadEngine=/m/model.engine", "--shapes='input:0':2x3x64x96",
                   "--iterations=37", "--duration=0", "--warmUp=20", percentile, *toggles,
                   "--exportTimes=/t.json"]


@pytest.mark.parametrize("version, kw, expected", [
    ("10.3.0", {"include_data_transfers": False}, ["--noDataTransfers"]),
    ("10.3.0", {"use_cuda_graph": True, "spin_wait": True}, ["--useCudaGraph", "--useSpinWait"]),
    ("10.3.0", {"use_cuda_graph": False, "spin_wait": False}, []),
    ("11.1.0", {"include_data_transfers": False}, []),
    ("11.1.0", {"use_cuda_graph": False, "spin_wait": False},
     ["--includeDataTransfers", "--noCudaGraph", "--noSpinWait"]),
    ("11.1.0", {"use_cuda_graph": True, "spin_wait": True}, ["--includeDataTransfers"]),
])
def test_toggles_only_move_away_from_the_versions_default(version: str, kw: dict,
                                                          expected: list) -> None:
    cmd = _cmd(version, **kw)
    assert cmd[cmd.index("--percentile=50,90,95,99") + 1:-1] == expected


def test_single_percentile_versions_get_the_highest_asked_for() -> None:
    assert "--percentile=99.9" in _cmd("8.4.1", percentiles=(50, 99.9, 90))
    assert "--percentile=50,99.9,90" in _cmd("8.5.2", percentiles=(50, 99.9, 90))


def test_onnx_input_and_extra_args() -> None:
    run = InferenceRun(model=Path("m.onnx"), extra_args=("--fp16",))
    cmd = inference_command("trtexec", TrtVersion(10, 3), run, Path("t.json"))
    assert cmd[1] == "--onnx=m.onnx" and cmd[-1] == "--fp16"
    assert not any("--shapes" in a for a in cmd)


@pytest.mark.parametrize("kw, match", [
    ({"extra_args": ("--percentile=90",)}, "clashes with a setting bckd makes; use percentiles="),
    ({"extra_args": ("--exportTimes=x",)}, "clashes"),
    ({"iterations": 0}, "iterations must be a whole number >= 1"),
    ({"duration_s": 1.5}, "duration must be a whole number"),
    ({"warmup_ms": -1}, "warmup_ms must be a whole number >= 0"),
    ({"percentiles": (101,)}, r"percentiles must be in \[0, 100\]"),
])
def test_bad_settings(kw: dict, match: str) -> None:
    with pytest.raises(BckdError, match=match):
        InferenceRun(model=Path("m.engine"), **kw)


# -- profile_trtexec against the stand-in ----------------------------------------------------------
@pytest.fixture()
def engine(tmp_path: Path) -> Path:
    path = tmp_path / "model.engine"
    path.write_bytes(b"plan")
    return path


def _profile(tmp_path: Path, engine: Path, version: str, **kw: object) -> dict:
    exe = write_fake_trtexec(tmp_path, version)
    kw = {"shapes": {"input": (1, 3, 64, 96)}, "iterations": 37, "duration": 0, "warmup_ms": 20,
          **kw}
    return profile_trtexec(engine, trtexec=exe, **kw)


@pytest.mark.parametrize("version", ["8.2.1", "8.4.1", "8.5.2", "10.3.0", "11.1.0"])
def test_profile_per_version(tmp_path: Path, engine: Path, version: str) -> None:
    result = _profile(tmp_path, engine, version)
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv == result["command"][1:]
    assert ("--includeDataTransfers" in argv) == version.startswith("11.")
    assert result["n"] == 37 == result["trtexec"]["timed_queries"]  # warm-ups dropped on <= 8.4
    assert result["trtexec"]["version"] == version
    assert result["latency_includes_data_transfers"] is True
    r = result
    assert r["min"] <= r["p50"] <= r["p90"] <= r["p95"] <= r["p99"] <= r["max"]
    assert result["fps"] == pytest.approx(1000 / result["mean"]) and result["batch"] == 1
    assert result["unit"] == "ms" and result["percentile_method"] == "linear"
    json.dumps(result, allow_nan=False)  # JSON-ready


@pytest.mark.parametrize("version", ["8.4.1", "10.3.0", "11.1.0"])
def test_profile_samples_reproduce_trtexecs_own_summary(tmp_path: Path, engine: Path,
                                                        version: str) -> None:
    """trtexec's percentile rule over the exported samples gives back the printed numbers."""
    exe = write_fake_trtexec(tmp_path, version)
    log = tmp_path / "run.log"
    result = profile_trtexec(engine, trtexec=exe, iterations=41, duration=0, warmup_ms=20,
                             log_path=log)
    printed = result["trtexec"]["summary"]["latency"]
    lat = _exported_latencies(tmp_path, version)
    assert trtexec_median(lat) == pytest.approx(printed["median"], rel=1e-5)
    assert trtexec_percentile(lat, 99) == pytest.approx(printed["p99"], rel=1e-5)
    assert result["mean"] == pytest.approx(printed["mean"], rel=1e-5)
    assert result["trtexec"]["log"] == str(log) and "=== Performance summary ===" in log.read_text()


def _exported_latencies(folder: Path, version: str) -> list[float]:
    """The stand-in's copy of the samples it exported (the profiler's scratch copy is gone)."""
    parsed = parse_export_times((folder / "exported.json").read_text())
    if version.startswith("8.4"):
        parsed = drop_warmups(parsed, 20)
    return list(parsed.latency_ms)


def test_profile_11x_without_transfers_is_flagged(tmp_path: Path, engine: Path) -> None:
    result = _profile(tmp_path, engine, "11.1.0", include_data_transfers=False,
                      use_cuda_graph=False)
    assert "--includeDataTransfers" not in result["command"]
    assert "--noCudaGraph" in result["command"]
    assert result["latency_includes_data_transfers"] is False
    assert result["metric"].startswith("latency (GPU compute only")
    assert any("Latency excludes H2D/D2H" in n for n in result["comparability"])
    assert not any("CUDA graph" in n for n in result["comparability"])


def test_profile_failure_keeps_the_log(tmp_path: Path, engine: Path) -> None:
    exe = write_fake_trtexec(tmp_path, "10.3.0", fail=True)
    match = r"trtexec failed \(exit 1\): .*incompatible.*; full log in (\S+)"
    with pytest.raises(BckdError, match=match) as err:
        profile_trtexec(engine, trtexec=exe)
    log = Path(str(err.value).rsplit("full log in ", 1)[1])
    assert "engine plan file is incompatible" in log.read_text()
    assert not (log.parent / "times.json").exists()
    log.unlink()
    log.parent.rmdir()


def test_profile_refuses_removed_flags_on_11x_before_running(tmp_path: Path, engine: Path) -> None:
    with pytest.raises(BckdError, match=r"trtexec 11\.1\.0 has no --fp16 \(removed in TensorRT 11"):
        _profile(tmp_path, engine, "11.1.0", extra_args=["--fp16"])
    assert not (tmp_path / "argv.json").exists()


def test_profile_refuses_old_trtexec_and_missing_model(tmp_path: Path, engine: Path) -> None:
    with pytest.raises(BckdError, match="trtexec 7.1.3 is too old"):
        _profile(tmp_path, engine, "7.1.3")
    with pytest.raises(BckdError, match="nope.engine is not a file"):
        profile_trtexec(tmp_path / "nope.engine", trtexec=write_fake_trtexec(tmp_path, "10.3.0"))


def test_profile_timeout_keeps_the_partial_log(tmp_path: Path, engine: Path) -> None:
    exe = tmp_path / "slow-trtexec"
    exe.write_text("#!/bin/sh\necho '&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # x'\n"
                   "[ \"$1\" = --version ] && exit 1\nexec sleep 30\n")
    exe.chmod(0o755)
    log = tmp_path / "slow.log"
    with pytest.raises(BckdError, match=r"did not finish within 1 s; .*partial log in .*slow\.log"):
        profile_trtexec(engine, trtexec=exe, log_path=log, timeout_s=1)
    assert "--loadEngine=" in log.read_text()


def test_profile_onnx_is_built_by_trtexec_and_says_so(tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    result = _profile(tmp_path, onnx, "10.3.0")
    assert result["command"][1] == f"--onnx={onnx}"
    assert any("built the engine from ONNX" in n for n in result["comparability"])
