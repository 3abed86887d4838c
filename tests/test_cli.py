"""CLI hygiene: every --help runs without torch, and user errors are one line with exit 1."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.cli import main

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = [[], ["run"], ["score"], ["data"], ["data", "synth"], ["distill"], ["export"], ["eval"],
               ["profile"], ["calib"], ["analyze"]]


def _run_blocking_torch(code: str) -> subprocess.CompletedProcess:
    prelude = "import sys; sys.modules['torch'] = None; sys.path.insert(0, %r)\n" % str(ROOT)
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_device_side_imports_without_torch():
    code = ("import pkgutil, importlib, runtime, calib\n"
            "for pkg in (runtime, calib):\n"
            "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
            "        importlib.import_module(m.name)\n"
            "import export\nprint('ok')")
    proc = _run_blocking_torch(code)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=lambda w: " ".join(w) or "bckd")
def test_help_runs_without_torch(words):
    proc = _run_blocking_torch(
        f"from runtime.cli import main\ntry:\n    main({words + ['--help']!r})\n"
        "except SystemExit as e:\n    sys.exit(e.code)")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def _expect_user_error(capsys, argv, needle):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert needle in err, err


def test_bad_arguments_exit_1(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "synth", "--out", "x", "--size", "big"])
    assert exc.value.code == 1
    assert "size must be" in capsys.readouterr().err


def _broken_model(tmp_path, content: bytes):
    """An ONNX path with valid card but ``content`` as the model bytes."""
    model = tmp_path / "m.onnx"
    model.write_bytes(content)
    card = {"kind": "onnx", "classes": ["a", "b"],
            "preprocess": {"size": [8, 8], "mean": [0, 0, 0], "std": [1, 1, 1],
                           "ignore_index": 255}}
    (tmp_path / "m.onnx.card.json").write_text(json.dumps(card))
    return model


def test_missing_dataset_is_one_line(tmp_path, capsys):
    model = _broken_model(tmp_path, b"not an onnx model")
    _expect_user_error(capsys, ["eval", str(model), "--data", str(tmp_path / "nodata")],
                       "nodata")


def test_corrupt_onnx_is_one_line(tmp_path, capsys):
    model = _broken_model(tmp_path, b"\x08\x07garbage")
    _expect_user_error(capsys, ["profile", str(model)], "m.onnx")


def test_missing_card_is_one_line(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    _expect_user_error(capsys, ["profile", str(model)], "card")


def test_existing_synth_output_refused_and_untouched(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _expect_user_error(capsys, ["data", "synth", "--out", str(out), "--n-train", "2",
                                "--n-val", "1"], "already exists")
    assert os.listdir(out) == ["keep.txt"]
