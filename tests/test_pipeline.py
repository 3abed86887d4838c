"""End to end: `bckd run --quick`, then each stage command on its files."""
import importlib.util
import json

import pytest

from runtime.card import read_card
from runtime.cli import main
from runtime.report import LATENCY_KEYS, ROW_REQUIRED


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("quick")
    out, cache = base / "run", base / "cache"
    assert main(["run", "--quick", "--out", str(out), "--cache-dir", str(cache)]) == 0
    return out, cache


def test_report_schema_and_rows(quick_run):
    out, _ = quick_run
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "bckd.report" and report["schema_version"] == 3
    rows = report["results"]
    ov = importlib.util.find_spec("openvino") is not None
    expected = [("teacher", "none", "onnxruntime", "fp32"), ("student", "none", "onnxruntime", "fp32"),
                ("student", "kd", "onnxruntime", "fp32"), ("student", "bckd", "onnxruntime", "fp32")]
    expected += [("student", "bckd", "openvino", "fp32")] if ov else []
    expected += [("student", "bckd", "onnxruntime", "int8")]
    expected += [("student", "bckd", "openvino", "int8")] if ov else []
    assert [(r["model"], r["method"], r["backend"], r["precision"]) for r in rows] == expected
    for row in rows:
        for key in ROW_REQUIRED:
            assert key in row
        for key in LATENCY_KEYS:
            assert row["latency_ms"][key] > 0
        assert row["latency_ms"]["p50"] <= row["latency_ms"]["p90"] <= row["latency_ms"]["p99"]
        assert 0 <= row["miou"] <= 100 and row["fps"] > 0
        stages = row["stages_ms"]
        assert set(stages) == {"preprocess", "inference", "postprocess", "end_to_end"}
        parts = sum(stages[s]["mean"] for s in ("preprocess", "inference", "postprocess"))
        assert parts == pytest.approx(stages["end_to_end"]["mean"], abs=0.01)  # rounding only
        if row["precision"] == "fp32":
            assert row["parity"]["ok"], row["parity"]
        assert (out / row["artifact"]).is_file()
    int8 = read_card(out / rows[len(expected) - 1]["artifact"])
    assert int8["calibration"]["split"] == "train" and int8["precision"] == "int8"
    # ONNX Runtime's row runs the U8S8 form (x86), OpenVINO's the symmetric one; one calibration
    ort8 = read_card(out / rows[5 if ov else 4]["artifact"])
    assert ort8["quantization"]["activations"]["dtype"] == "uint8"
    assert "x86" in ort8["quantization"]["intended_for"][0]
    assert int8["quantization"]["activations"]["dtype"] == "int8"
    assert "tensorrt" in int8["quantization"]["intended_for"]
    assert ort8["calibration"]["sha256"] == int8["calibration"]["sha256"]
    teacher, student = rows[0], rows[1]
    assert teacher["params"] > student["params"]
    md = (out / "report.md").read_text()
    assert "e2e p50 ms" in md and "| teacher | none |" in md and "| student | kd |" in md and "| student | bckd |" in md
    # deployed rows compare with their ONNX Runtime FP32 row; every row states its stability
    bckd_fp32 = rows[3]
    for row in rows[4:]:
        assert row["speedup_vs_fp32"] == pytest.approx(
            bckd_fp32["latency_ms"]["p50"] / row["latency_ms"]["p50"], abs=0.01)
        assert row["delta_miou_vs_fp32"] == pytest.approx(row["miou"] - bckd_fp32["miou"],
                                                          abs=0.011)
    assert all("speedup_vs_fp32" not in r for r in rows[:4])
    assert all(r["latency_ms"]["p50"] <= r["latency_ms"]["p95"] <= r["latency_ms"]["p99"]
               and isinstance(r["latency_stable"], bool) and r["latency_cv"] >= 0 for r in rows)
    prov = report["provenance"]
    assert prov["quick"] and prov["command"].startswith("bckd") and prov["input_size"]
    assert [s["kind"] for s in report["stage_seconds"]].count("student") == 3
    assert "Δ miou" in md and "speed-up" in md and "p95 ms" in md and "produced by" in md
    assert "**LHD px**" in md
    # the distilled students are exactly the plain student: adapters never reach the artifact
    assert rows[1]["params"] == rows[2]["params"] == rows[3]["params"]


def test_report_html_written(quick_run):
    out, _ = quick_run
    page = (out / "report.html").read_text()
    rows = json.loads((out / "report.json").read_text())["results"]
    assert page.startswith("<!DOCTYPE html>") and "http://" not in page and "https://" not in page
    assert page.count('class="latency-row"') == len(rows)
    assert 'id="pareto-plot"' in page and 'class="pareto-front"' in page
    # 4 val images x (input, ground truth, teacher, no-KD, KD, BCKD, BCKD INT8)
    assert page.count('class="mask-image"') == 4 * 7
    assert "(report.html)" in (out / "report.md").read_text()


def test_no_partial_dirs_left(quick_run):
    out, _ = quick_run
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]


def test_existing_out_is_refused_and_untouched(quick_run, capsys):
    out, cache = quick_run
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["run", "--quick", "--out", str(out), "--cache-dir", str(cache)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before


def test_teacher_is_cached(quick_run):
    _, cache = quick_run
    assert len(list((cache / "teachers").glob("*/teacher.pt"))) == 1


def test_a_rerun_reuses_students_and_exports_byte_for_byte(quick_run, tmp_path, capsys):
    out, cache = quick_run
    again = tmp_path / "again"
    assert main(["run", "--quick", "--out", str(again), "--cache-dir", str(cache)]) == 0
    log = capsys.readouterr().out
    assert log.count("reusing cached student") == 3 and "[student] training" not in log
    for onnx in sorted((out / "onnx").glob("*.onnx")):
        assert (again / "onnx" / onnx.name).read_bytes() == onnx.read_bytes(), onnx.name
    a = json.loads((out / "report.json").read_text())["results"]
    b = json.loads((again / "report.json").read_text())["results"]
    assert [r["miou"] for r in a] == [r["miou"] for r in b]
    assert len(list((cache / "students").glob("*/student.pt"))) == 3


def test_reuse_students_off_trains_again(quick_run, tmp_path):
    from runtime.config import quick_config
    from runtime.pipeline import run_pipeline

    _, cache = quick_run
    cfg = quick_config()
    cfg.cache_dir, cfg.reuse_students, cfg.methods = str(cache), False, ("none",)
    cfg.deploy.students = ("none",)
    lines: list[str] = []
    run_pipeline(cfg, tmp_path / "fresh", log=lines.append, example_images=0)
    assert any(line.startswith("[student] training") for line in lines)
    assert not any("reusing cached student" in line for line in lines)


def test_stage_commands_on_run_outputs(quick_run, tmp_path, capsys):
    out, _ = quick_run
    data, ckpt = out / "data", out / "checkpoints" / "student-kd.pt"
    onnx = tmp_path / "s.onnx"
    assert main(["export", str(ckpt), "--out", str(onnx)]) == 0
    assert (tmp_path / "s.onnx.card.json").is_file()
    assert main(["eval", str(onnx), "--data", str(data), "--out", str(tmp_path / "e.json")]) == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert ev["miou"] * 100 == pytest.approx(report["results"][2]["miou"], abs=0.01)
    assert main(["profile", str(onnx), "--iters", "5", "--min-seconds", "0.1"]) == 0
    # the same export again is refused, the static export rejects other sizes
    assert main(["export", str(ckpt), "--out", str(onnx)]) == 1
    static = tmp_path / "static.onnx"
    assert main(["export", str(ckpt), "--out", str(static), "--static"]) == 0
    capsys.readouterr()
    assert main(["profile", str(static), "--size", "48", "--iters", "2"]) == 1
    assert "does not fit the static input" in capsys.readouterr().err


def test_distill_resume_continues_from_state(quick_run, tmp_path):
    out, _ = quick_run
    ckpt = tmp_path / "s.pt"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  width: 0.125\ntrain:\n  batch_size: 8\n")
    args = ["distill", "--data", str(out / "data"), "--out", str(ckpt), "--input-size", "64",
            "--config", str(cfg)]
    assert main(args + ["--epochs", "2"]) == 0
    assert main(args + ["--epochs", "2"]) == 1  # exists and no --resume: refused
    ckpt.unlink()  # as if killed before the end: only the state is left
    (tmp_path / "s.pt.card.json").unlink()
    assert main(args + ["--epochs", "2"]) == 1  # a stale state is not overwritten silently
    assert main(args + ["--epochs", "3", "--resume"]) == 1  # another schedule: refused
    assert main(args + ["--epochs", "2", "--resume"]) == 0
    card = json.loads((tmp_path / "s.pt.card.json").read_text())
    assert [h["epoch"] for h in card["history"]] == [1, 2]


def test_analyze_mfs_on_run_outputs(quick_run, tmp_path, capsys):
    out, cache = quick_run
    teacher = next((cache / "teachers").glob("*/teacher.pt"))
    student = out / "checkpoints" / "student-bckd.pt"
    result = tmp_path / "mfs.json"
    args = ["analyze", "mfs", "--student", str(student), "--teacher", str(teacher),
            "--data", str(out / "data"), "--images", "4", "--directions", "2", "--out", str(result)]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("MFS ")
    mfs = json.loads(result.read_text())
    assert len(mfs["ratio"]) == 4 and mfs["mfs"] > 0
    assert mfs["settings"]["images"] == 4 and mfs["settings"]["ascent_steps"] == 1
    assert main(args) == 1  # the result exists: refused, untouched
    assert "already exists" in capsys.readouterr().err
    assert main(args[:-2] + ["--epsilon", "-1"]) == 1
    assert capsys.readouterr().err.startswith("bckd: error: MFS:")


def test_distill_with_bckd_options_from_config(quick_run, tmp_path, capsys):
    out, cache = quick_run
    teacher = next((cache / "teachers").glob("*/teacher.pt"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  width: 0.125\nkd:\n  method: bckd+cwd\n  options:\n"
                   "    bckd: {context: mse, weight: 0.5}\n    cwd: {tau: 2.0}\n")
    ckpt = tmp_path / "s.pt"
    args = ["distill", "--data", str(out / "data"), "--out", str(ckpt), "--input-size", "64",
            "--config", str(cfg), "--teacher", str(teacher), "--epochs", "1"]
    assert main(args) == 0
    card = json.loads((tmp_path / "s.pt.card.json").read_text())
    assert card["method"] == "bckd+cwd"
    cfg.write_text("kd:\n  method: bckd\n  options:\n    bckd: {contxt: mse}\n")
    capsys.readouterr()
    assert main(args[:-2] + ["--force"]) == 1
    assert "unknown option 'contxt' for distillation method 'bckd'; did you mean 'context'" in \
        capsys.readouterr().err
