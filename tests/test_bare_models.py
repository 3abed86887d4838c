"""Models bckd did not make (issue 12 item 1): written here with onnx.helper, no card anywhere.

profile / export / calib / eval read the inputs from the graph; dynamic dims come from --shape or
--size, preprocessing from flags or a YAML; NHWC, uint8 and multi-input models work; what is
missing is one line naming the flag.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime.bare import layout_of, parse_shapes, resolve_shapes
from runtime.backends.base import InputSpec
from runtime.cli import main
from runtime.data.preprocess import Preprocess
from runtime.errors import BckdError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

FAST = ["--warmup", "1", "--iters", "5", "--min-seconds", "0.05", "--max-seconds", "2", "--json"]


def _save(path: Path, nodes, inputs, outputs, weights) -> Path:
    graph = helper.make_graph(nodes, "third_party", inputs, outputs,
                              [numpy_helper.from_array(w, n) for n, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _conv_weights(classes: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w1": (0.2 * rng.standard_normal((16, 3, 3, 3))).astype(np.float32),
            "b1": np.zeros(16, np.float32),
            "w2": (0.1 * rng.standard_normal((classes, 16, 3, 3))).astype(np.float32),
            "b2": np.zeros(classes, np.float32)}


def two_output_model(path: Path, classes: int = 7) -> Path:
    """NCHW float input with dynamic N, H, W; outputs logits [N, classes, H, W] and a pooled vector."""
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["logits"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["r1"], ["pooled"])]
    return _save(path, nodes,
                 [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                 [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes, "H", "W"]),
                  helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 16, 1, 1])],
                 _conv_weights(classes))


def nhwc_uint8_model(path: Path) -> Path:
    """uint8 NHWC pixels in (the model casts, scales and transposes itself), logits out."""
    w = _conv_weights(4)
    w["scale"] = np.array(1 / 255, np.float32)
    nodes = [helper.make_node("Cast", ["pixels"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["f", "scale"], ["s"]),
             helper.make_node("Transpose", ["s"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["nchw", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["out"], pads=[1, 1, 1, 1])]
    return _save(path, nodes,
                 [helper.make_tensor_value_info("pixels", TensorProto.UINT8, [1, "H", "W", 3])],
                 [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, "H", "W"])], w)


def two_input_model(path: Path) -> Path:
    """An image and a per-channel gain [N, 16, 1, 1]; the gain multiplies the features."""
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c1", "gain"], ["g"]),
             helper.make_node("Relu", ["g"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["logits"], pads=[1, 1, 1, 1])]
    return _save(path, nodes,
                 [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"]),
                  helper.make_tensor_value_info("gain", TensorProto.FLOAT, ["N", 16, 1, 1])],
                 [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4, "H", "W"])],
                 _conv_weights(4))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 56, 3), dtype=np.uint8)).save(
            folder / f"{i:02d}.png")
    return folder


def _json(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def _one_line(capsys, *needles: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1] if err else ""
    assert "Traceback" not in "\n".join(err) and last.startswith("bckd: error:"), err
    for needle in needles:
        assert needle in last, last


def test_a_third_party_model_goes_through_profile_ir_calib_and_int8_profile(
        tmp_path, images, capsys) -> None:
    """The issue's number: dynamic dims, two outputs, every step rc 0."""
    model = two_output_model(tmp_path / "third.onnx")
    assert main(["profile", str(model), "--size", "48x64", *FAST]) == 0
    assert _json(capsys)["input_shapes"] == {"image": [1, 3, 48, 64]}
    assert main(["export", str(model), "--format", "openvino", "--out",
                 str(tmp_path / "third.xml")]) == 0
    ir_card = json.loads((tmp_path / "third.xml.card.json").read_text())
    assert ir_card["bare"] and [i["name"] for i in ir_card["inputs"]] == ["image"]
    assert ir_card["outputs"] == ["logits", "pooled"]
    capsys.readouterr()
    assert main(["profile", str(tmp_path / "third.xml"), "--shape", "image:2x3x32x32",
                 *FAST]) == 0
    assert _json(capsys)["input_shapes"] == {"image": [2, 3, 32, 32]}
    assert main(["calib", str(model), "--data", str(images), "--size", "48x64",
                 "--out", str(tmp_path / "third.int8.onnx")]) == 0
    card = json.loads((tmp_path / "third.int8.onnx.card.json").read_text())
    assert card["precision"] == "int8" and card["preprocess"]["size"] == [48, 64]
    assert card["calibration"]["num_images"] == 6
    capsys.readouterr()
    assert main(["profile", str(tmp_path / "third.int8.onnx"), "--size", "48x64", *FAST]) == 0
    assert _json(capsys)["precision"] == "int8"
    assert main(["calib", str(tmp_path / "third.xml"), "--quantizer", "nncf", "--data", str(images),
                 "--size", "48x64", "--mean", "0,0,0", "--std", "255,255,255",
                 "--out", str(tmp_path / "third.int8.xml")]) == 0
    card = json.loads((tmp_path / "third.int8.xml.card.json").read_text())
    assert card["preprocess"]["std"] == [255.0, 255.0, 255.0]
    capsys.readouterr()
    assert main(["profile", str(tmp_path / "third.int8.xml"), "--size", "48x64", *FAST]) == 0
    assert _json(capsys)["precision"] == "int8"


def test_missing_shapes_and_preprocessing_name_the_flag(tmp_path, images, capsys) -> None:
    model = two_output_model(tmp_path / "third.onnx")
    assert main(["profile", str(model), *FAST]) == 1
    _one_line(capsys, "input 'image'", "dynamic dims (N, 3, H, W)", "--shape image:1x3x224x224",
              "--size")
    assert main(["profile", str(model), "--shape", "other:1x3x8x8", *FAST]) == 1
    _one_line(capsys, "not an input", "image")
    assert main(["profile", str(model), "--shape", "image:1x4x8x8", *FAST]) == 1
    _one_line(capsys, "does not fit the input (N, 3, H, W)")
    assert main(["calib", str(model), "--data", str(images), "--out",
                 str(tmp_path / "x.onnx")]) == 1
    _one_line(capsys, "dynamic H and W", "--size")
    assert not (tmp_path / "x.onnx").exists()
    assert main(["eval", str(model), "--data", str(images)]) == 1
    _one_line(capsys, "no bckd card", "--task semantic")


def test_nhwc_uint8_input(tmp_path, images, capsys) -> None:
    model = nhwc_uint8_model(tmp_path / "nhwc.onnx")
    assert main(["profile", str(model), "--size", "32x40", *FAST]) == 0
    assert _json(capsys)["input_shapes"] == {"pixels": [1, 32, 40, 3]}
    assert main(["calib", str(model), "--data", str(images), "--size", "32x40", "--out",
                 str(tmp_path / "nhwc.int8.onnx")]) == 0
    pre = json.loads((tmp_path / "nhwc.int8.onnx.card.json").read_text())["preprocess"]
    assert pre["layout"] == "NHWC" and pre["dtype"] == "uint8"
    assert main(["profile", str(tmp_path / "nhwc.int8.onnx"), "--size", "32x40", *FAST]) == 0


def test_multi_input_model_profiles_with_a_shape_per_input(tmp_path, capsys) -> None:
    model = two_input_model(tmp_path / "two.onnx")
    assert main(["profile", str(model), *FAST]) == 1
    _one_line(capsys, "input 'image'", "--shape image:1x3x224x224")
    for backend in ("onnxruntime", "openvino"):  # --size is the image's; the gain has N only
        assert main(["profile", str(model), "--backend", backend, "--size", "32x32",
                     "--batch", "2", *FAST]) == 0
        assert _json(capsys)["input_shapes"] == {"image": [2, 3, 32, 32], "gain": [2, 16, 1, 1]}
    assert main(["profile", str(model), "--shape", "image:1x3x16x16", "--shape",
                 "gain:1x16x1x1", *FAST]) == 0
    assert _json(capsys)["input_shapes"] == {"image": [1, 3, 16, 16], "gain": [1, 16, 1, 1]}
    assert main(["calib", str(model), "--data", str(tmp_path), "--size", "32x32",
                 "--out", str(tmp_path / "two.int8.onnx")]) == 1
    _one_line(capsys, "2 inputs", "one image input")


def test_eval_of_a_bare_segmentor_takes_task_and_preprocessing(tmp_path, capsys) -> None:
    from runtime.data.synth import synthesize

    data = synthesize(tmp_path / "data", n_train=2, n_val=4, size=(32, 32), seed=0)
    classes = json.loads((data / "dataset.json").read_text())["classes"]
    model = two_output_model(tmp_path / "seg.onnx", classes=len(classes))
    (tmp_path / "pre.yaml").write_text("task: semantic\nsize: [32, 32]\n")
    assert main(["eval", str(model), "--data", str(data), "--preprocess",
                 str(tmp_path / "pre.yaml"), "--json"]) == 0
    result = _json(capsys)
    assert 0 <= result["miou"] <= 1 and set(result["per_class_iou"]) == set(classes)
    assert main(["eval", str(model), "--data", str(data), "--task", "semantic", "--size", "32",
                 "--classes", "a,b"]) == 1
    _one_line(capsys, "--classes a,b differ")
    wrong = two_output_model(tmp_path / "wrong.onnx", classes=len(classes) + 1)
    assert main(["eval", str(wrong), "--data", str(data), "--task", "semantic", "--size",
                 "32"]) == 1
    _one_line(capsys, "not logits", f"{len(classes)} classes")


def test_shape_parsing_and_resolution() -> None:
    assert parse_shapes(["x:1x3x8x8", "2x3"]) == {"x": (1, 3, 8, 8), "": (2, 3)}
    for bad in ("x:1x0x8", "x:axb", "x:"):
        with pytest.raises(BckdError, match="--shape takes"):
            parse_shapes([bad])
    nchw = InputSpec("x", (None, 3, None, None), np.dtype(np.float32))
    nhwc = InputSpec("y", (1, None, None, 3), np.dtype(np.uint8))
    assert layout_of(nchw) == "NCHW" and layout_of(nhwc) == "NHWC"
    assert resolve_shapes([nchw], "m.onnx", size=(5, 7), batch=2) == {"x": (2, 3, 5, 7)}
    assert resolve_shapes([nhwc], "m.onnx", size=(5, 7), batch=2) == {"y": (1, 5, 7, 3)}
    assert resolve_shapes([nchw], "m.onnx", shapes={"": (1, 3, 4, 4)}) == {"x": (1, 3, 4, 4)}
    with pytest.raises(BckdError, match="static input"):
        resolve_shapes([InputSpec("z", (1, 3, 8, 8), np.dtype(np.float32))], "m.onnx",
                       size=(4, 4))


def test_preprocess_layout_and_dtype() -> None:
    img = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    nchw = Preprocess(size=(6, 8))
    nhwc = Preprocess(size=(6, 8), layout="NHWC")
    raw = Preprocess(size=(6, 8), layout="NHWC", dtype="uint8")
    np.testing.assert_array_equal(nhwc.batch([img]), nchw.batch([img]).transpose(0, 2, 3, 1))
    assert raw.batch([img]).dtype == np.uint8
    np.testing.assert_array_equal(raw.batch([img])[0], img)
    assert "layout" not in nchw.to_dict() and "dtype" not in nchw.to_dict()
    assert Preprocess.from_dict(raw.to_dict()) == raw


def test_profile_and_eval_print_a_table_for_people(tmp_path, capsys) -> None:
    from runtime.data.synth import synthesize

    data = synthesize(tmp_path / "data", n_train=2, n_val=3, size=(32, 32), seed=0)
    classes = json.loads((data / "dataset.json").read_text())["classes"]
    model = two_output_model(tmp_path / "seg.onnx", classes=len(classes))
    fast = [a for a in FAST if a != "--json"]
    assert main(["profile", str(model), "--size", "32", *fast]) == 0
    out = capsys.readouterr().out
    for needle in ("onnxruntime fp32 on cpu", "image 1x3x32x32", "p50 ", "p95 ", "p99 ",
                   "mean ± std", "FPS", "batch × 1000 / mean latency"):
        assert needle in out, out
    assert "{" not in out
    assert main(["eval", str(model), "--data", str(data), "--task", "semantic", "--size",
                 "32", "--out", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "eval.json").read_text())  # --out keeps the whole JSON
    assert f"mIoU  {100 * saved['miou']:.2f}%".replace("  ", " ") in " ".join(out.split())
    assert classes[1] in out and "LHD" in out
