"""One word per meaning across subcommands, old spellings with a one-line note, --help with
defaults and examples (issue 12 item 3)."""
from __future__ import annotations

import pytest

from runtime.cli import EXAMPLES, build_parser, main

COMMANDS = ["run", "data synth", "distill", "analyze mfs", "export", "calib", "eval", "score",
            "profile"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_defaults_and_an_example(command, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(command.split() + ["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and EXAMPLES[f"bckd {command}"].splitlines()[0] in out
    if command in ("calib", "profile", "eval"):
        assert "(default: " in out


def test_calib_flags_name_the_quantizer_and_the_range_estimator(capsys) -> None:
    args = build_parser().parse_args(["calib", "m.onnx", "--data", "d", "--out", "o.onnx",
                                      "--quantizer", "nncf", "--calibration", "minmax",
                                      "--data-format", "coco"])
    assert (args.quantizer, args.calibration, args.format) == ("nncf", "minmax", "coco")
    old = build_parser().parse_args(["calib", "m.onnx", "--data", "d", "--out", "o.onnx",
                                     "--backend", "nncf", "--method", "entropy", "--format",
                                     "folder"])
    assert (old.quantizer, old.calibration, old.format) == ("nncf", "entropy", "folder")
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 3 and all(n.startswith("bckd: note:") for n in notes)
    assert "--backend is now --quantizer" in notes[0]
    assert "--method is now --calibration" in notes[1]
    assert "--format is now --data-format" in notes[2]


def test_export_keeps_format_for_the_artifact_format() -> None:
    args = build_parser().parse_args(["export", "m.onnx", "--out", "m.xml", "--format",
                                      "openvino"])
    assert args.format == "openvino"


def test_old_openvino_precision_spelling_is_noted(tmp_path, capsys) -> None:
    from test_bare_models import FAST, two_output_model

    model = two_output_model(tmp_path / "m.onnx")
    assert main(["profile", str(model), "--backend", "openvino", "--precision", "f32",
                 "--size", "16", *FAST]) == 0
    err = capsys.readouterr().err
    assert "--precision f32 is now fp32" in err
