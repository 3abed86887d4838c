"""Bad inputs to the device-side commands: one clear line on stderr, exit 1, nothing written.

Each case is checked before any long work (calibration, evaluation, timing) starts.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from runtime.cli import main  # noqa: E402
from test_calib import work  # noqa: E402,F401  (fixture: synthetic data + a tiny FP32 ONNX)

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_calib_on_a_corrupt_onnx(work: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes((work / "fp32.onnx").read_bytes()[:200])
    shutil.copy(str(work / "fp32.onnx") + ".card.json", str(bad) + ".card.json")
    out = tmp_path / "bad.int8.onnx"
    assert main(["calib", str(bad), "--data", str(work / "data"), "--out", str(out)]) == 1
    one_line_error(capsys, "is not a readable ONNX model", "re-export")
    assert not out.exists()


def _ir(work: Path, folder: Path) -> Path:
    pytest.importorskip("openvino")
    xml = folder / "m.xml"
    assert main(["export", str(work / "fp32.onnx"), "--out", str(xml)]) == 0
    return xml


def test_nncf_calib_on_an_ir_without_its_bin_or_with_a_truncated_one(work, tmp_path, capsys):
    xml = _ir(work, tmp_path)
    weights = xml.with_suffix(".bin")
    data = weights.read_bytes()
    out = tmp_path / "q.xml"
    weights.unlink()
    assert main(["calib", str(xml), "--quantizer", "nncf", "--data", str(work / "data"),
                 "--out", str(out)]) == 1
    one_line_error(capsys, "has no weights file m.bin")
    weights.write_bytes(data[: len(data) // 3])
    assert main(["calib", str(xml), "--quantizer", "nncf", "--data", str(work / "data"),
                 "--out", str(out)]) == 1
    one_line_error(capsys, "OpenVINO cannot read", "Incorrect weights")
    assert not out.exists() and not out.with_suffix(".bin").exists()


@pytest.mark.parametrize("argv", [
    ["eval", "MODEL", "--data", "DATA", "--batch", "0"],
    ["profile", "MODEL", "--batch", "-1"],
    ["calib", "MODEL", "--data", "DATA", "--out", "OUT", "--images", "0"],
])
def test_non_positive_counts_are_usage_errors(work: Path, tmp_path: Path, argv, capsys) -> None:
    argv = [{"MODEL": str(work / "fp32.onnx"), "DATA": str(work / "data"),
             "OUT": str(tmp_path / "o.onnx")}.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1  # bckd usage errors exit 1, like every user error
    assert "must be a positive integer" in capsys.readouterr().err


def test_profile_refuses_an_input_it_cannot_allocate(work: Path, capsys) -> None:
    assert main(["profile", str(work / "fp32.onnx"), "--size", "100000x100000"]) == 1
    one_line_error(capsys, "1x3x100000x100000 float32 needs", "GiB", "smaller --size")


@pytest.mark.parametrize("command", ["eval", "profile"])
def test_an_existing_out_is_refused_before_the_work(work, tmp_path, command, capsys,
                                                    monkeypatch) -> None:
    import runtime.evaluate
    import runtime.profile

    def never(*a, **k):
        raise AssertionError("the work started before --out was checked")

    monkeypatch.setattr(runtime.evaluate, "evaluate_runner", never)
    monkeypatch.setattr(runtime.profile, "profile_runner", never)
    out = tmp_path / "result.json"
    out.write_text("{}")
    argv = [command, str(work / "fp32.onnx"), "--out", str(out)]
    if command == "eval":
        argv += ["--data", str(work / "data")]
    assert main(argv) == 1
    one_line_error(capsys, "already exists", "--force")
    assert out.read_text() == "{}"


def test_calib_default_image_count_is_capped_to_the_split(work, tmp_path, capsys) -> None:
    out = tmp_path / "q.onnx"
    assert main(["calib", str(work / "fp32.onnx"), "--data", str(work / "data"),
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "holds 24 images, fewer than the default 300; calibrating on all of them" in err
    # asked for explicitly, too many is still an error
    assert main(["calib", str(work / "fp32.onnx"), "--data", str(work / "data"), "--images",
                 "500", "--out", str(tmp_path / "r.onnx")]) == 1
    one_line_error(capsys, "asked for 500 calibration images")


@pytest.mark.parametrize("argv", [
    ["distill", "--data", "d", "--out", "x.pt"],
    ["export", "model.pt", "--out", "x.onnx"],
    ["run", "--quick", "--out", "runs/x"],
    ["analyze", "mfs", "--student", "s.pt", "--teacher", "t.pt", "--data", "d"],
])
def test_host_commands_without_torch_say_so(tmp_path: Path, argv) -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "from runtime.cli import main\nsys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"bckd {argv[0]} needs torch" in err and "pip install" in err


def test_an_onnx_whose_sidecar_was_lost_reads_its_embedded_card(work, tmp_path, capsys) -> None:
    import onnx

    from export.onnx_export import embed_card
    from runtime.card import read_card
    from runtime.files import sha256_file

    card = read_card(work / "fp32.onnx")
    proto = onnx.load(str(work / "fp32.onnx"))
    embed_card(proto, card)
    lone = tmp_path / "lone.onnx"
    onnx.save_model(proto, str(lone))
    got = read_card(lone)
    assert got["classes"] == card["classes"] and got["preprocess"] == card["preprocess"]
    assert got["sha256"] == sha256_file(lone) and "embedded" in got["card_source"]
    assert main(["eval", str(lone), "--data", str(work / "data")]) == 0
    assert main(["calib", str(lone), "--data", str(work / "data"), "--images", "4",
                 "--out", str(tmp_path / "lone.int8.onnx")]) == 0
    capsys.readouterr()
    bare = tmp_path / "bare.onnx"  # no sidecar and nothing embedded: eval asks for the task
    shutil.copy(work / "fp32.onnx", bare)
    assert main(["eval", str(bare), "--data", str(work / "data")]) == 1
    one_line_error(capsys, "no bckd card", "--task semantic", "--size")


def test_the_runtime_follows_the_suffix_unless_named() -> None:
    from runtime.cli import build_parser, runtime_for

    assert [runtime_for(p) for p in ("m.onnx", "m.xml", "M.ENGINE", "m.plan", "m")] == [
        "onnxruntime", "openvino", "tensorrt", "tensorrt", "onnxruntime"]
    args = build_parser().parse_args(["profile", "m.xml", "--backend", "onnxruntime"])
    assert args.backend == "onnxruntime"


def test_version_flag(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("bckd ")
