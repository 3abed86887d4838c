"""The deployment commands end to end: bckd export --format, bckd calib, eval on other backends.

Runs on the tiny three-conv ONNX model of test_calib (no torch) and a 32x32 synthetic dataset.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime.quantization")

from runtime.card import read_card  # noqa: E402
from runtime.cli import main  # noqa: E402
# The module-scoped fixture `work` (a synthetic dataset and a tiny FP32 ONNX with its card) is
# test_calib's; this module gets its own instance.
from test_calib import work  # noqa: E402,F401

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
HAS_NNCF = importlib.util.find_spec("nncf") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed "
                                    "(pip install -e '.[openvino]')")


def run_ok(argv: list[str], capsys) -> str:
    """stdout of a successful command (eval / profile: their --json form)."""
    argv = [str(a) for a in argv] + (["--json"] if argv[0] in ("eval", "profile") else [])
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def user_error(argv: list[str], capsys, needle: str) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    return err


def test_calib_then_eval_refuses_calibration_images(work, capsys):
    out = work / "int8.onnx"
    text = run_ok(["calib", work / "fp32.onnx", "--data", work / "data", "--images", 10,
                   "--out", out], capsys)
    assert "percentile on 10 images of split 'train'" in text
    card = read_card(out)
    assert card["precision"] == "int8" and card["calibration"]["split"] == "train"
    user_error(["eval", out, "--data", work / "data", "--split", "train"], capsys,
               "calibrated on")
    result = json.loads(run_ok(["eval", out, "--data", work / "data", "--split", "val"], capsys))
    assert 0.0 <= result["miou"] <= 1.0
    before = out.read_bytes()
    user_error(["calib", work / "fp32.onnx", "--data", work / "data", "--images", 10,
                "--out", out], capsys, "exists")
    assert out.read_bytes() == before


def test_calib_accuracy_aware_from_the_cli(work, capsys):
    out = work / "aware.onnx"
    text = run_ok(["calib", work / "fp32.onnx", "--data", work / "data", "--images", 10,
                   "--calibration", "minmax", "--budget", 0, "--heldout-images", 6, "--out", out],
                  capsys)
    assert "budget" in text
    s = read_card(out)["sensitivity"]
    assert s["backend"] == "onnxruntime" and s["heldout"]["num_images"] == 6


def test_calib_uint8_activations_for_onnxruntime(work, capsys):
    out = work / "u8.onnx"
    run_ok(["calib", work / "fp32.onnx", "--data", work / "data", "--images", 10,
            "--activations", "uint8", "--out", out], capsys)
    q = read_card(out)["quantization"]["activations"]
    assert q == {"dtype": "uint8", "symmetric": False, "granularity": "per-tensor"}
    json.loads(run_ok(["eval", out, "--data", work / "data", "--split", "val"], capsys))
    user_error(["calib", work / "fp32.onnx", "--data", work / "data", "--activations", "uint8",
                "--budget", 1, "--out", work / "u8b.onnx"], capsys, "plain Q/DQ ONNX only")
    from export.trt import build_engine
    from runtime.errors import BckdError

    with pytest.raises(BckdError, match="uint8"):  # refused before TensorRT is even imported
        build_engine(out, work / "u8.engine", precision="int8")


def test_calib_budget_with_nncf_is_refused(work, capsys):
    user_error(["calib", work / "fp32.onnx", "--data", work / "data", "--quantizer", "nncf",
                "--budget", 1, "--out", work / "x.xml"], capsys, "Q/DQ ONNX")


@pytest.mark.skipif(not (HAS_OPENVINO and HAS_NNCF), reason="openvino and nncf are not installed")
def test_calib_nncf_writes_an_ir_that_runs(work, capsys):
    out = work / "nncf.xml"
    run_ok(["calib", work / "fp32.onnx", "--data", work / "data", "--images", 8,
            "--quantizer", "nncf", "--out", out], capsys)
    assert out.with_suffix(".bin").is_file() and read_card(out)["precision"] == "int8"
    result = json.loads(run_ok(["eval", out, "--backend", "openvino", "--data", work / "data",
                                "--split", "val"], capsys))
    assert 0.0 <= result["miou"] <= 1.0


@needs_openvino
def test_export_openvino_then_eval_and_profile(work, capsys):
    xml = work / "fp32.xml"
    run_ok(["export", work / "fp32.onnx", "--out", xml], capsys)  # the format from the suffix
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    ort_result = json.loads(run_ok(["eval", work / "fp32.onnx", "--data", work / "data"], capsys))
    ov_result = json.loads(run_ok(["eval", xml, "--backend", "openvino", "--precision", "fp32",
                                   "--data", work / "data"], capsys))
    assert ov_result["miou"] == pytest.approx(ort_result["miou"], abs=1e-6)
    # bf16 where the CPU has bf16 units; elsewhere OpenVINO would run f32 and bf16 is refused
    import openvino as ov

    bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    precision = "bf16" if bf16 else "f32"
    prof = json.loads(run_ok(["profile", xml, "--backend", "openvino", "--precision", precision,
                              "--threads", 1, "--iters", 5, "--min-seconds", 0], capsys))
    assert prof["backend"] == "openvino" and prof["precision"] == ("bf16" if bf16 else "fp32")
    if not bf16:
        user_error(["profile", xml, "--backend", "openvino", "--precision", "bf16"], capsys,
                   "when asked for bf16")
    user_error(["export", work / "fp32.onnx", "--format", "openvino", "--out", xml], capsys,
               "exists")


@needs_openvino
def test_zero_copy_inputs_stay_valid_after_the_caller_drops_them(work) -> None:
    """The runner wraps each input without copying it, and OpenVINO's shared Tensor does not own
    the array. A runner that dropped the Tensor before ``infer`` corrupted the heap: the eval parity
    check in the test above caught it (this loop did not, on this machine). This pins the
    contract: fresh arrays of changing shapes, dropped and collected at once, and outputs the
    caller owns."""
    import gc

    import numpy as np
    import openvino as ov

    from runtime.backends import open_runner

    core = ov.Core()
    plain = core.compile_model(core.read_model(str(work / "fp32.onnx")), "CPU",
                               {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    rng = np.random.default_rng(1)
    with open_runner("openvino", work / "fp32.onnx") as runner:
        for i in range(30):
            x = rng.standard_normal((1 + i % 2, 3, 64 + 8 * (i % 3), 96), dtype=np.float32)
            want = plain.infer({0: x})[0].copy()
            got = runner.infer(x.copy())  # the only reference to its input is the runner's
            gc.collect()
            np.testing.assert_array_equal(got, want)
            got[...] = 0  # the result is the caller's own copy, not the request's buffer
            assert np.array_equal(runner.infer(x), want)


def test_export_errors_are_one_line(work, capsys):
    user_error(["export", work / "fp32.onnx", "--out", work / "again.onnx"], capsys,
               "already ONNX")
    user_error(["export", work / "student.pt", "--format", "openvino", "--out", work / "a.xml"],
               capsys, "converts an ONNX file")
    user_error(["export", work / "student.pt", "--out", work / "a.xml"], capsys,
               "converts an ONNX file")
    user_error(["export", work / "fp32.onnx", "--out", work / "a.bin"], capsys,
               "cannot tell the format")
    user_error(["profile", work / "fp32.onnx", "--backend", "onnxruntime", "--precision", "fp32"],
               capsys, "precision")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="tensorrt is installed: the missing-package error cannot happen")
def test_export_tensorrt_without_tensorrt_is_one_line(work, capsys):
    user_error(["export", work / "fp32.onnx", "--format", "tensorrt", "--out",
                work / "m.engine"], capsys, "tensorrt")
    assert not (work / "m.engine").exists()


def test_export_tensorrt_runs_without_torch(work):
    """ONNX -> TensorRT must not import torch: with torch blocked, only TensorRT is missing."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, %r)\n"
            "from runtime.cli import main\n"
            "sys.exit(main(['export', %r, '--format', 'tensorrt', '--out', %r]))"
            % (str(root), str(work / "fp32.onnx"), str(work / "nt.engine")))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    if importlib.util.find_spec("tensorrt") is None:
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "tensorrt" in proc.stderr and "torch" not in proc.stderr, proc.stderr
    assert "import of torch halted" not in proc.stderr
