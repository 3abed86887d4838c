"""bckd profile: latency and throughput modes, protocol fields, warnings, trtexec backend."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.cli import main
from test_calib import work  # noqa: F401  (fixture: synthetic data + a tiny FP32 ONNX)
from trtexec_fake import write_fake_trtexec


def run_json(argv: list, capsys) -> dict:
    rc = main([str(a) for a in argv] + ["--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


def test_latency_mode_records_the_protocol(work, capsys):
    out = run_json(["profile", work / "fp32.onnx", "--threads", 1, "--iters", 20,
                    "--min-seconds", 0], capsys)
    lat = out["latency_ms"]
    assert lat["mode"] == "latency" and lat["n"] >= 20
    assert lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"]
    assert lat["p99_9"] is None and "1000" in lat["p99_9_note"]  # too few samples for p99.9
    assert lat["protocol"]["trimming"] == "none" and lat["cv"] >= 0
    assert out["threads"] == 1 and out["precision"] == "fp32"


def test_throughput_mode(work, capsys):
    out = run_json(["profile", work / "fp32.onnx", "--mode", "throughput", "--requests", 2,
                    "--batch", 2, "--iters", 10, "--min-seconds", 0], capsys)
    assert out["latency_ms"]["mode"] == "throughput" and out["latency_ms"]["fps"] > 0


def test_profile_refuses_mismatched_options(work, capsys):
    for argv, needle in ((["--requests", 2], "--mode throughput"),
                         (["--mode", "throughput", "--telemetry", "rapl"], "--telemetry")):
        rc = main(["profile", str(work / "fp32.onnx"), *[str(a) for a in argv]])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and len(err.splitlines()) == 1 and needle in err, err


def test_unstable_timings_are_warned_on_stderr(work, capsys):
    rc = main(["profile", str(work / "fp32.onnx"), "--iters", "20", "--min-seconds", "0",
               "--cv-threshold", "1e-9"])
    captured = capsys.readouterr()
    assert rc == 0 and "bckd: warning:" in captured.err


def test_trtexec_backend_with_a_stand_in(work, tmp_path: Path, capsys):
    exe = write_fake_trtexec(tmp_path, "10.3.0")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not a real engine: the stand-in only reads the path")
    out = run_json(["profile", engine, "--backend", "trtexec", "--trtexec", exe, "--size", "32",
                    "--iters", 50, "--min-seconds", 1], capsys)
    lat = out["latency_ms"]
    assert out["backend"] == "trtexec" and lat["n"] >= 50 and lat["p50"] > 0
    assert lat["latency_includes_data_transfers"] is True


def test_predictions_saved_on_the_device_score_the_same_on_the_host(work, tmp_path, capsys):
    preds = tmp_path / "preds"
    on_device = run_json(["eval", work / "fp32.onnx", "--data", work / "data", "--split", "val",
                          "--save-predictions", preds], capsys)
    on_host = run_json(["score", preds, "--data", work / "data"], capsys)
    for key in ("miou", "pixel_acc", "boundary_f", "boundary_iou", "lhd", "images"):
        assert on_host[key] == on_device[key], key
    assert on_host["split"] == "val" and len(list(preds.glob("*.png"))) == on_device["images"]
    rc = main(["eval", str(work / "fp32.onnx"), "--data", str(work / "data"), "--split", "val",
               "--save-predictions", str(preds)])
    assert rc == 1 and "exists" in capsys.readouterr().err  # never overwritten silently
    (preds / "predictions.json").unlink()  # an interrupted evaluation
    rc = main(["score", str(preds), "--data", str(work / "data")])
    assert rc == 1 and "predictions.json" in capsys.readouterr().err


def test_eval_and_score_show_progress_on_stderr_only(work, tmp_path, capsys):
    preds = tmp_path / "preds"
    rc = main(["eval", str(work / "fp32.onnx"), "--data", str(work / "data"),
               "--save-predictions", str(preds), "--json"])
    captured = capsys.readouterr()
    n = json.loads(captured.out)["images"]  # stdout stays pure JSON
    assert rc == 0 and f"[eval] fp32.onnx (onnxruntime) {n}/{n} img (100%" in captured.err
    rc = main(["score", str(preds), "--data", str(work / "data"), "--json"])
    captured = capsys.readouterr()
    assert rc == 0 and f"[score] preds {n}/{n} img (100%" in captured.err
    json.loads(captured.out)


def test_pipeline_mode_times_each_stage_on_real_images(work, capsys):
    out = run_json(["profile", work / "fp32.onnx", "--mode", "pipeline", "--data", work / "data",
                    "--images", 3, "--threads", 1, "--iters", 12, "--min-seconds", 0], capsys)
    stages = out["latency_ms"]["stages"]
    assert list(stages) == ["preprocess", "inference", "postprocess", "end_to_end"]
    for stage in stages.values():
        assert stage["n"] >= 12 and 0 < stage["p50"] <= stage["p99"]
    parts = sum(stages[s]["mean"] for s in ("preprocess", "inference", "postprocess"))
    assert parts == pytest.approx(stages["end_to_end"]["mean"], rel=1e-6)
    assert out["backend"] == "onnxruntime" and out["threads"] == 1 and out["split"] == "val"


def test_pipeline_mode_needs_data_and_data_needs_pipeline_mode(work, capsys):
    for argv, needle in ((["--mode", "pipeline"], "--data"),
                         (["--data", str(work / "data")], "--mode pipeline"),
                         (["--mode", "pipeline", "--data", str(work / "data"), "--images", "0"],
                          "--images")):
        try:
            rc = main(["profile", str(work / "fp32.onnx"), *argv])
        except SystemExit as exc:  # --images 0 is refused by the argument parser itself
            rc = exc.code
        err = capsys.readouterr().err.strip()
        assert rc == 1 and len(err.splitlines()) == 1 and needle in err, err


def test_onnxruntime_providers_and_their_options(work, capsys):
    out = run_json(["profile", work / "fp32.onnx", "--providers", "cpu", "--iters", 5,
                    "--min-seconds", 0], capsys)
    assert out["device"] == "cpu"
    for argv, needle in (
        (["--providers", "cuda"], "CUDAExecutionProvider"),  # not in this CPU build of ORT
        (["--ep-option", "device_id=0"], "name the providers too"),
        (["--providers", "cpu", "--ep-option", "device_id"], "KEY=VALUE"),
        (["--backend", "openvino", "--providers", "cpu"], "--backend onnxruntime"),
    ):
        try:
            rc = main(["profile", str(work / "fp32.onnx"), *argv])
        except SystemExit as exc:  # --images 0 is refused by the argument parser itself
            rc = exc.code
        err = capsys.readouterr().err.strip()
        assert rc == 1 and len(err.splitlines()) == 1 and needle in err, err
