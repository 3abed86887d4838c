"""Detect and instance end to end on the quick built-in run: train, export, eval, score, report.

One shrunken run per task (a few seconds of training); the figures are not the point, the
shape of every artifact and row is: task-dispatched evaluation, COCO AP fields, prediction files
that `bckd score` reads back to the same numbers, and the in-graph NMS agreeing with the host.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("pycocotools")

from runtime.cli import main  # noqa: E402
from runtime.config import task_config  # noqa: E402
from runtime.pipeline import run_pipeline  # noqa: E402


@pytest.fixture(scope="module", params=["detect", "instance"])
def run(request, tmp_path_factory):
    cfg = task_config(request.param, quick=True)
    cfg.methods = ("none", "bckd")
    cfg.deploy.int8 = False
    folder = tmp_path_factory.mktemp(request.param)
    cfg.cache_dir = str(folder / "cache")
    report = run_pipeline(cfg, folder / "run", log=lambda _: None)
    return request.param, folder / "run", report


def test_rows_carry_the_task_and_coco_ap(run) -> None:
    task, folder, report = run
    assert report["task"] == task
    rows = report["results"]
    assert [r["model"] for r in rows[:3]] == ["teacher", "student", "student"]
    for row in rows:
        assert row["task"] == task and "miou" not in row
        assert 0.0 <= row["box_ap"] <= 100.0 and 0.0 <= row["box_ap50"] <= 100.0
        if task == "instance":
            assert 0.0 <= row["mask_ap"] <= 100.0 and "boundary_ap" in row
        assert row["latency_ms"]["p50"] > 0
    assert any(r["backend"] == "openvino" for r in rows)
    text = (folder / "report.md").read_text()
    assert "box AP" in text and "mIoU" not in text.split("\n\n")[1]


def test_eval_save_predictions_then_score_gives_the_same_ap(run, capsys) -> None:
    task, folder, _ = run
    onnx = folder / "onnx" / "student-bckd.onnx"
    preds = folder / "preds"
    assert main(["eval", str(onnx), "--data", str(folder / "data"), "--batch", "4",
                 "--save-predictions", str(preds), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert (preds / "results_bbox.json").is_file()
    assert main(["score", str(preds), "--data", str(folder / "data"), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["box_ap"] == pytest.approx(evaluated["box_ap"], abs=1e-12)


def test_graph_nms_matches_host_nms_on_validation_images(run) -> None:
    from export.api import export_checkpoint
    from runtime.backends import open_runner
    from runtime.data import open_dataset
    from runtime.data.preprocess import Preprocess
    from runtime.tasks import get_task

    task, folder, _ = run
    out = folder / "graph-nms.onnx"
    card = export_checkpoint(folder / "checkpoints" / "student-bckd.pt", out, nms="graph")
    assert card["postprocess"]["nms"] == "graph"
    host = folder / "onnx" / "student-bckd.onnx"
    pre = Preprocess.from_dict(card["preprocess"])
    val = open_dataset(folder / "data", "val", format="coco")
    x = pre.batch([val.load(i)[0] for i in range(8)])
    with open_runner("onnxruntime", out) as r:
        graph = r.run(x)
    with open_runner("onnxruntime", host) as r:
        raw = r.run(x)
    assert list(graph)[:4] == ["num_dets", "boxes", "scores", "labels"]
    result = get_task(task).compare(raw, graph, card)
    assert result["ok"], result
    assert np.array_equal(graph["num_dets"][:, 0],
                          get_task(task).stage_postprocess(card)(raw)["num_dets"][:, 0])


def test_an_instance_model_refuses_a_dataset_without_masks(run, tmp_path, capsys) -> None:
    task, folder, _ = run
    if task != "instance":
        pytest.skip("instance only")
    from runtime.data.synth import synthesize

    synthesize(tmp_path / "boxes", n_train=4, n_val=4, size=(64, 64), task="detect")
    assert main(["eval", str(folder / "onnx" / "student-bckd.onnx"), "--data",
                 str(tmp_path / "boxes")]) == 1
    assert "no instance masks" in capsys.readouterr().err


def test_int8_keeps_the_postprocess_in_float_and_budgets_in_ap(run, capsys) -> None:
    import onnx

    task, folder, _ = run
    onnx_path = folder / "onnx" / "student-bckd.onnx"
    out = folder / "int8-budget.onnx"
    # a budget the full INT8 model meets at once: the search scores in the task's AP and stops
    assert main(["calib", str(onnx_path), "--data", str(folder / "data"), "--images", "16",
                 "--budget", "100", "--heldout-images", "8", "--out", str(out)]) == 0
    capsys.readouterr()
    card = json.loads(out.with_name(out.name + ".card.json").read_text())
    assert card["sensitivity"]["metric"] == ("mask_ap" if task == "instance" else "box_ap")
    assert card["sensitivity"]["within_budget"] and card["quantization"]["float_tail"]["nodes"] > 5
    graph = onnx.load(str(out)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    tail_ops = [n for n in graph.node if n.op_type in ("Sigmoid", "Softmax", "ReduceSum")]
    assert tail_ops and all(producer.get(i) != "DequantizeLinear"
                            for n in tail_ops for i in n.input)
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 10  # the body is INT8


def test_nncf_int8_ir_keeps_the_tail_out_of_its_scope(run) -> None:
    pytest.importorskip("nncf")
    from calib.nncf_ptq import quantize_openvino
    from calib.reader import CalibrationReader

    task, folder, _ = run
    onnx_path = folder / "onnx" / "student-bckd.onnx"
    reader = CalibrationReader.for_model(onnx_path, folder / "data", "train", num_images=8,
                                         format="coco")
    card = quantize_openvino(onnx_path, folder / "nncf.xml", reader)
    assert card["quantization"]["float_tail"]["nodes"] > 5
    assert main(["eval", str(folder / "nncf.xml"), "--backend", "openvino", "--data",
                 str(folder / "data")]) == 0
