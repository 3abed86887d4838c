"""Progress where people wait (issue 12 item 4): standalone calib, profile's timed window, and
bckd run's per-stage times with an estimate of what remains."""
from __future__ import annotations

from test_bare_models import FAST, two_output_model
from test_calib import work  # noqa: F401  (fixture: synthetic data + a tiny FP32 ONNX)

from runtime.cli import main
from runtime.pipeline import StageClock


def test_calib_and_profile_say_what_they_are_doing(work, tmp_path, capsys) -> None:
    for extra in ([], ["--quantizer", "nncf"]):
        out = tmp_path / ("m.int8.xml" if extra else "m.int8.onnx")
        model = work / "fp32.onnx"
        assert main(["calib", str(model), "--data", str(work / "data"), "--images", "6",
                     "--out", str(out), *extra]) == 0
        err = capsys.readouterr().err
        assert "[calib] fp32.onnx: reading 6 images 6/6 img (100%" in err, err
    bare = two_output_model(tmp_path / "bare.onnx")
    assert main(["profile", str(bare), "--size", "16", *FAST]) == 0
    err = capsys.readouterr().err
    assert "[profile] bare.onnx (onnxruntime): warm-up" in err and "at least 5 calls" in err


def test_stage_clock_estimates_from_the_stages_done() -> None:
    lines: list[str] = []
    clock = StageClock(lines.append, {"teacher": 1, "student": 3})
    ticks = iter([0.0, 10.0, 14.0, 18.0, 22.0])
    clock._t0 = clock.start = 0.0
    import runtime.pipeline as pipeline

    real = pipeline.time.perf_counter
    pipeline.time.perf_counter = lambda: next(ticks)
    try:
        next(ticks)
        clock.done("teacher", "teacher")
        clock.done("student", "student 'none'")
        clock.done("student", "student 'kd'")
    finally:
        pipeline.time.perf_counter = real
    assert lines[0] == ("[run] teacher done in 10 s (10 s so far; no estimate of what remains "
                        "until a stage of each kind has run)")
    assert lines[1] == "[run] student 'none' done in 4 s (14 s so far; about 8 s left)"
    assert lines[2] == "[run] student 'kd' done in 4 s (18 s so far; about 4 s left)"
    assert [r["seconds"] for r in clock.record()] == [10.0, 4.0, 4.0]
