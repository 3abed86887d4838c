"""Detection postprocess: host NMS (runtime/tasks/nms.py) against the NMS graph
(export/nms_graph.py) under ONNX Runtime and OpenVINO (CPU, f32), on crafted edge cases and
realistic random heads.

ORT's NonMaxSuppression is the reference the host reproduces exactly; OpenVINO runs the
``for_openvino`` copy (its NMS suppresses at IoU >= threshold, see the module docstrings).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import BckdError
from runtime.tasks.nms import NMSSettings, host_nms, output_names, sigmoid, unpad

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
ov = pytest.importorskip("openvino",
                         reason="openvino is not installed (pip install 'bckd[openvino]')")
from onnx import TensorProto as T  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

from export.nms_graph import (IOU_OPENVINO, append_nms, for_openvino,  # noqa: E402
                              nms_output_names)

ROOT = Path(__file__).resolve().parents[1]
SMALL = NMSSettings(score_threshold=0.05, iou_threshold=0.6, pre_top_k=8, max_dets=5)
OV_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}  # the CPU otherwise runs bf16 where it can


# -- raw detector graphs ---------------------------------------------------------------------------
def slice_model(num_classes: int, num_protos: int = 0, opset: int = 17) -> onnx.ModelProto:
    """Raw heads read straight from the input: x [B, N, 4 + C] -> boxes, scores (+ mask inputs)."""
    C = num_classes
    consts = {"b0": [0], "b1": [4], "s1": [4 + C], "ax": [2]}
    nodes = [helper.make_node("Slice", ["x", "b0", "b1", "ax"], ["boxes"]),
             helper.make_node("Slice", ["x", "b1", "s1", "ax"], ["scores"])]
    inputs = [helper.make_tensor_value_info("x", T.FLOAT, ["batch", "n", 4 + C])]
    outputs = [helper.make_tensor_value_info("boxes", T.FLOAT, ["batch", "n", 4]),
               helper.make_tensor_value_info("scores", T.FLOAT, ["batch", "n", C])]
    if num_protos:
        k = num_protos
        nodes += [helper.make_node("Identity", ["c"], ["mask_coeffs"]),
                  helper.make_node("Identity", ["p"], ["proto"])]
        inputs += [helper.make_tensor_value_info("c", T.FLOAT, ["batch", "n", k]),
                   helper.make_tensor_value_info("p", T.FLOAT, ["batch", k, "h", "w"])]
        outputs += [helper.make_tensor_value_info("mask_coeffs", T.FLOAT, ["batch", "n", k]),
                    helper.make_tensor_value_info("proto", T.FLOAT, ["batch", k, "h", "w"])]
    inits = [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in consts.items()]
    graph = helper.make_graph(nodes, "raw", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def image_model(num_classes: int, num_protos: int) -> onnx.ModelProto:
    """A tiny image -> raw heads graph: one candidate per 8x8 cell, so N follows the input size.

    It also has an extra output ("features") that append_nms must drop.
    """
    rng = np.random.default_rng(7)
    w = {"w_cls": rng.normal(0, 2, (3, num_classes)), "b_cls": np.full(num_classes, -3.0),
         "w_ctr": rng.normal(0, 40, (3, 2)), "b_ctr": np.array([64.0, 48.0]),
         "w_half": rng.normal(0, 8, (3, 2)), "b_half": np.array([12.0, 10.0]),
         "w_coef": rng.normal(0, 1, (3, num_protos)),
         "w_proto": rng.normal(0, 1, (num_protos, 3, 1, 1)),
         "flat": np.array([0, 3, -1]), "perm": None}
    inits = [numpy_helper.from_array(np.asarray(v, np.int64 if k == "flat" else np.float32), k)
             for k, v in w.items() if v is not None]
    n = helper.make_node
    nodes = [
        n("AveragePool", ["input"], ["cells"], kernel_shape=[8, 8], strides=[8, 8]),
        n("Reshape", ["cells", "flat"], ["cells_flat"]),
        n("Transpose", ["cells_flat"], ["feat"], perm=[0, 2, 1]),  # [B, N, 3]
        n("MatMul", ["feat", "w_cls"], ["cls"]), n("Add", ["cls", "b_cls"], ["logits"]),
        n("Sigmoid", ["logits"], ["scores"]),
        n("MatMul", ["feat", "w_ctr"], ["ctr0"]), n("Add", ["ctr0", "b_ctr"], ["ctr"]),
        n("MatMul", ["feat", "w_half"], ["half0"]), n("Abs", ["half0"], ["half1"]),
        n("Add", ["half1", "b_half"], ["half"]),
        n("Sub", ["ctr", "half"], ["lo"]), n("Add", ["ctr", "half"], ["hi"]),
        n("Concat", ["lo", "hi"], ["boxes"], axis=2),
        n("MatMul", ["feat", "w_coef"], ["mask_coeffs"]),
        n("AveragePool", ["input"], ["quarter"], kernel_shape=[4, 4], strides=[4, 4]),
        n("Conv", ["quarter", "w_proto"], ["proto"]),
        n("Identity", ["cells"], ["features"]),
    ]
    vi = helper.make_tensor_value_info
    outputs = [vi("boxes", T.FLOAT, ["batch", "n", 4]), vi("features", T.FLOAT, None),
               vi("scores", T.FLOAT, ["batch", "n", num_classes]),
               vi("mask_coeffs", T.FLOAT, ["batch", "n", num_protos]),
               vi("proto", T.FLOAT, ["batch", num_protos, "h4", "w4"])]
    graph = helper.make_graph(nodes, "raw_image", [vi("input", T.FLOAT, ["batch", 3, "h", "w"])],
                              outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class Engines:
    """A raw model's NMS graph under ONNX Runtime, OpenVINO (for_openvino) and plain OpenVINO."""

    def __init__(self, model: onnx.ModelProto, folder: Path) -> None:
        onnx.checker.check_model(model, full_check=True)
        folder.mkdir(parents=True, exist_ok=True)
        onnx.save(model, folder / "nms.onnx")
        onnx.save(for_openvino(model), folder / "nms_ov.onnx")
        self.session = ort.InferenceSession(str(folder / "nms.onnx"),
                                            providers=["CPUExecutionProvider"])
        core = ov.Core()
        self.compiled = {name: core.compile_model(str(folder / f"{name}.onnx"), "CPU", OV_CONFIG)
                         for name in ("nms_ov", "nms")}

    def ort(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(None, feeds)))

    def openvino(self, feeds: dict[str, np.ndarray], adapted: bool = True) -> dict[str, np.ndarray]:
        result = self.compiled["nms_ov" if adapted else "nms"](feeds)
        return {port.get_any_name(): value for port, value in result.items()}


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory):
    """Engines per (classes, protos, settings), built once per module."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("nms")

    def get(num_classes: int, settings: NMSSettings = SMALL, num_protos: int = 0) -> Engines:
        key = (num_classes, num_protos, settings)
        if key not in cache:
            masks = {"mask_coeffs": "mask_coeffs", "proto": "proto"} if num_protos else {}
            model = append_nms(slice_model(num_classes, num_protos), settings, **masks)
            cache[key] = Engines(model, root / f"m{len(cache)}")
        return cache[key]

    return get


# -- comparison helpers ----------------------------------------------------------------------------
def as_arrays(boxes, scores) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(boxes, np.float32), np.asarray(scores, np.float32)


def feeds_of(boxes: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": np.concatenate([boxes, scores], axis=2)}


def row_agreement(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    """Fraction of rows (all images, all K) that are the same detection (or both padding)."""
    same = ((ref["labels"] == got["labels"])
            & (np.abs(ref["scores"] - got["scores"]) <= 1e-6)
            & (np.abs(ref["boxes"] - got["boxes"]) <= 1e-4).all(axis=-1))
    return float(same.mean())


def assert_layout(layout: dict[str, np.ndarray], batch: int, k: int, masks: bool = False) -> None:
    assert list(layout) == list(output_names(masks))
    assert layout["num_dets"].shape == (batch, 1) and layout["num_dets"].dtype == np.int32
    assert layout["boxes"].shape == (batch, k, 4) and layout["boxes"].dtype == np.float32
    assert layout["scores"].shape == (batch, k) and layout["scores"].dtype == np.float32
    assert layout["labels"].shape == (batch, k) and layout["labels"].dtype == np.int32
    for b in range(batch):
        n = int(layout["num_dets"][b, 0])
        assert (layout["labels"][b, n:] == -1).all() and (layout["labels"][b, :n] >= 0).all()
        assert (layout["scores"][b, n:] == 0).all() and (layout["boxes"][b, n:] == 0).all()
        assert (np.diff(layout["scores"][b, :n]) <= 0).all()  # best first
        if masks:
            assert (layout["masks"][b, n:] == 0).all()


def check_all(engines, boxes, scores, settings: NMSSettings = SMALL, openvino: bool = True) -> dict:
    """host_nms, checked for layout, and equal to ORT (and OpenVINO) on every row."""
    boxes, scores = as_arrays(boxes, scores)
    host = host_nms(boxes, scores, settings)
    assert_layout(host, boxes.shape[0], settings.max_dets)
    eng = engines(scores.shape[2], settings)
    backends = [eng.ort(feeds_of(boxes, scores))]
    if openvino:
        backends.append(eng.openvino(feeds_of(boxes, scores)))
    for got in backends:
        assert np.array_equal(got["num_dets"], host["num_dets"])
        assert row_agreement(host, got) == 1.0
    return host


def realistic_heads(rng: np.random.Generator, batch: int, n: int, num_classes: int,
                    size: float = 640.0) -> tuple[np.ndarray, np.ndarray]:
    """Decoded-looking heads: sigmoid of low background logits, plus clusters of overlapping boxes
    around a few objects whose class logits are raised (what a dense detector emits)."""
    boxes = np.zeros((batch, n, 4), np.float32)
    logits = rng.normal(-6.0, 1.5, (batch, n, num_classes))
    for b in range(batch):
        ctr, wh = rng.uniform(0, size, (n, 2)), rng.uniform(8, 200, (n, 2))
        for obj in rng.integers(0, n, rng.integers(3, 20)):
            members = rng.choice(n, 30)
            ctr[members] = ctr[obj] + rng.normal(0, 6, (30, 2))
            wh[members] = wh[obj] * rng.uniform(0.8, 1.2, (30, 2))
            logits[b, members, rng.integers(num_classes)] += rng.uniform(3, 9, 30)
        boxes[b] = np.clip(np.concatenate([ctr - wh / 2, ctr + wh / 2], axis=1), 0, size)
    return boxes, sigmoid(logits.astype(np.float32))


# -- settings --------------------------------------------------------------------------------------
def test_settings_defaults_and_round_trip() -> None:
    s = NMSSettings()
    assert s.to_dict() == {"score_threshold": 0.05, "iou_threshold": 0.6, "pre_top_k": 1000,
                           "max_dets": 100}
    assert NMSSettings.from_dict(s.to_dict()) == s
    assert NMSSettings.from_dict({"score_threshold": 0, "max_dets": 10}).score_threshold == 0.0


@pytest.mark.parametrize("kwargs", [
    {"score_threshold": -0.01}, {"score_threshold": 1.5}, {"iou_threshold": 1.01},
    {"iou_threshold": "0.5"}, {"pre_top_k": 0}, {"pre_top_k": 5000}, {"max_dets": 2.0},
    {"max_dets": True}, {"pre_top_k": 50, "max_dets": 100},
])
def test_settings_reject(kwargs: dict) -> None:
    with pytest.raises(BckdError, match="NMS"):
        NMSSettings(**kwargs)


def test_settings_unknown_key() -> None:
    with pytest.raises(BckdError, match="unknown NMS setting 'iou_thresh'.*'iou_threshold'"):
        NMSSettings.from_dict({"iou_thresh": 0.5})
    with pytest.raises(BckdError, match="unknown NMS setting 'nms'"):
        NMSSettings.from_dict({"nms": "graph", **NMSSettings().to_dict()})


# -- crafted cases: expected values, and the same on ORT and OpenVINO ------------------------------
def test_overlapping_same_class_suppressed_other_class_kept(engines) -> None:
    # IoU(a, b) = 81 / 119 = 0.68 > 0.6; c is a's box in another class.
    boxes = [[[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10]]]
    scores = [[[0.9, 0.0], [0.8, 0.0], [0.0, 0.7]]]
    host = check_all(engines, boxes, scores)
    assert host["num_dets"].tolist() == [[2]]
    assert host["labels"][0, :2].tolist() == [0, 1]
    np.testing.assert_array_equal(host["scores"][0, :2], np.float32([0.9, 0.7]))
    np.testing.assert_array_equal(host["boxes"][0, :2], [[0, 0, 10, 10], [0, 0, 10, 10]])


def test_one_box_in_two_classes_gives_two_rows(engines) -> None:
    host = check_all(engines, [[[5, 5, 20, 30]]], [[[0.3, 0.6]]])
    assert host["labels"][0, :2].tolist() == [1, 0]
    np.testing.assert_array_equal(host["scores"][0, :2], np.float32([0.6, 0.3]))


def test_all_below_threshold_gives_padding(engines) -> None:
    host = check_all(engines, [[[0, 0, 10, 10]] * 3], [[[0.01, 0.05]] * 3])  # 0.05: not > 0.05
    assert host["num_dets"].tolist() == [[0]]
    assert (host["labels"] == -1).all() and not host["scores"].any() and not host["boxes"].any()


def test_score_equal_to_threshold_is_dropped(engines) -> None:
    host = check_all(engines, [[[0, 0, 10, 10], [20, 0, 30, 10]]],
                     [[[0.05, 0.0], [np.nextafter(np.float32(0.05), np.float32(1)), 0.0]]])
    assert host["num_dets"].tolist() == [[1]]
    np.testing.assert_array_equal(host["boxes"][0, 0], [20, 0, 30, 10])


def test_iou_equal_to_threshold_is_kept(engines) -> None:
    # IoU([0,0,10,10], [0,0,10,6]) = 60 / 100, float32(0.6) exactly: ORT suppresses only above it.
    boxes, scores = as_arrays([[[0, 0, 10, 10], [0, 0, 10, 6]]], [[[0.9, 0.0], [0.8, 0.0]]])
    host = check_all(engines, boxes, scores)  # ORT and for_openvino's OpenVINO agree
    assert host["num_dets"].tolist() == [[2]]
    plain_openvino = engines(2).openvino(feeds_of(boxes, scores), adapted=False)
    assert plain_openvino["num_dets"].tolist() == [[1]], (
        "OpenVINO's NMS no longer suppresses at IoU == threshold; drop for_openvino's adjustment")


def test_more_than_max_dets_keeps_the_best(engines) -> None:
    n = 150
    x = np.arange(n, dtype=np.float32) * 20  # disjoint boxes
    boxes = np.stack([x, np.zeros(n), x + 10, np.full(n, 10)], axis=1)[None]
    scores = np.linspace(0.1, 0.9, n, dtype=np.float32)[None, :, None]
    settings = NMSSettings(pre_top_k=200, max_dets=100)
    host = check_all(engines, boxes, scores, settings)
    assert host["num_dets"].tolist() == [[100]]
    np.testing.assert_array_equal(host["scores"][0], scores[0, ::-1, 0][:100])
    np.testing.assert_array_equal(host["boxes"][0], boxes[0, ::-1][:100])


def test_per_class_limit_is_max_dets(engines) -> None:
    # 8 disjoint boxes in class 0 and one better box in class 1: class 0 stops at max_dets = 5.
    x = np.arange(8, dtype=np.float32) * 20
    boxes = np.stack([x, np.zeros(8), x + 10, np.full(8, 10)], axis=1)[None]
    scores = np.zeros((1, 8, 2), np.float32)
    scores[0, :, 0] = np.linspace(0.2, 0.5, 8)
    scores[0, 7, 1] = 0.95
    host = check_all(engines, boxes, scores)
    assert host["labels"][0].tolist() == [1, 0, 0, 0, 0]


def test_pre_top_k_cuts_by_max_class_score(engines) -> None:
    # pre_top_k = 2: only the two best candidates by max-class score reach NMS.
    settings = NMSSettings(pre_top_k=2, max_dets=2)
    boxes = [[[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]]]
    scores = [[[0.3, 0.0], [0.0, 0.9], [0.5, 0.6]]]
    host = check_all(engines, boxes, scores, settings)
    assert host["labels"][0].tolist() == [1, 1]
    np.testing.assert_array_equal(host["boxes"][0], [[20, 0, 30, 10], [40, 0, 50, 10]])


@pytest.mark.parametrize("n", [0, 1, 3])
def test_fewer_candidates_than_pre_top_k(engines, n: int) -> None:
    shift = np.arange(n, dtype=np.float32)[None, :, None] * 30  # disjoint boxes
    boxes = np.tile(np.float32([[0, 0, 10, 10]]), (1, n, 1)) + shift
    scores = np.linspace(0.2, 0.9, 2 * n, dtype=np.float32).reshape(1, n, 2)  # no ties
    host = check_all(engines, boxes.reshape(1, n, 4), scores, NMSSettings())
    assert host["num_dets"].tolist() == [[min(2 * n, 100)]]


def test_batch_two_with_different_counts(engines) -> None:
    boxes = [[[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]],
             [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 1, 1]]]
    scores = [[[0.9, 0.0], [0.8, 0.0], [0.0, 0.7]],
              [[0.9, 0.0], [0.8, 0.0], [0.01, 0.0]]]
    host = check_all(engines, boxes, scores)
    assert host["num_dets"].tolist() == [[3], [1]]
    assert host["labels"].tolist() == [[0, 0, 1, -1, -1], [0, -1, -1, -1, -1]]


def test_degenerate_boxes_neither_suppress_nor_are_suppressed(engines) -> None:
    # A zero-width and a zero-size box inside a real one, and two identical points: all kept.
    boxes = [[[0, 0, 10, 10], [0, 0, 0, 10], [5, 5, 5, 5], [5, 5, 5, 5]]]
    scores = [[[0.6, 0.0], [0.9, 0.0], [0.8, 0.0], [0.7, 0.0]]]
    host = check_all(engines, boxes, scores)
    assert host["num_dets"].tolist() == [[4]]
    np.testing.assert_array_equal(host["boxes"][0, :4], np.float32(boxes[0])[[1, 2, 3, 0]])


def test_flipped_corners_are_the_same_box(engines) -> None:
    # (x2, y2, x1, y1) is another diagonal pair of [0, 0, 10, 10]; the row keeps the input order.
    host = check_all(engines, [[[10, 10, 0, 0], [0, 0, 10, 10], [10, 0, 0, 10]]],
                     [[[0.9, 0.0], [0.8, 0.0], [0.7, 0.0]]])
    assert host["num_dets"].tolist() == [[1]]
    np.testing.assert_array_equal(host["boxes"][0, 0], [10, 10, 0, 0])


def test_touching_boxes_do_not_suppress(engines) -> None:
    host = check_all(engines, [[[0, 0, 10, 10], [10, 0, 20, 10]]], [[[0.9, 0.0], [0.8, 0.0]]],
                     NMSSettings(iou_threshold=0.0, pre_top_k=8, max_dets=5))
    assert host["num_dets"].tolist() == [[2]]


def test_score_ties_go_to_the_lower_index(engines) -> None:
    # Overlapping boxes with equal scores: the lower index survives; equal scores in the output
    # order by class then candidate. OpenVINO's TopK is not stable, so only ORT is compared.
    boxes = [[[0, 0, 10, 10], [1, 0, 11, 10], [50, 0, 60, 10], [80, 0, 90, 10]]]
    scores = [[[0.5, 0.0], [0.5, 0.0], [0.0, 0.7], [0.7, 0.0]]]
    host = check_all(engines, boxes, scores, openvino=False)
    assert host["labels"][0, :3].tolist() == [0, 1, 0]
    np.testing.assert_array_equal(host["boxes"][0, :3], [[80, 0, 90, 10], [50, 0, 60, 10],
                                                         [0, 0, 10, 10]])


# -- realistic random heads ------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [6, 80])
def test_random_heads_match_ort_and_openvino(engines, num_classes: int) -> None:
    settings = NMSSettings()
    eng = engines(num_classes, settings)
    rng = np.random.default_rng(num_classes)
    hosts, ort_out, ov_out, ov_plain = [], [], [], []
    for n in (400, 2000):
        boxes, scores = realistic_heads(rng, 2, n, num_classes)
        feeds = feeds_of(boxes, scores)
        hosts.append(host_nms(boxes, scores, settings))
        ort_out.append(eng.ort(feeds))
        ov_out.append(eng.openvino(feeds))
        ov_plain.append(eng.openvino(feeds, adapted=False))
        assert_layout(hosts[-1], 2, settings.max_dets)
    for got in (ort_out, ov_out, ov_plain):
        agreement = np.mean([row_agreement(h, g) for h, g in zip(hosts, got)])
        assert agreement >= 0.999
        assert all(np.array_equal(h["num_dets"], g["num_dets"]) for h, g in zip(hosts, got))
    assert any((h["num_dets"] > 0).all() for h in hosts)


def test_integer_boxes_match_with_for_openvino(engines) -> None:
    # Integer coordinates make float32 IoUs equal to the threshold likely (e.g. 3/5 = 0.6).
    rng = np.random.default_rng(3)
    boxes, scores = realistic_heads(rng, 2, 1500, 1)
    boxes = np.round(boxes / 4) * 4
    settings = NMSSettings()
    host = host_nms(boxes, scores, settings)
    eng = engines(1, settings)
    assert row_agreement(host, eng.ort(feeds_of(boxes, scores))) == 1.0
    assert row_agreement(host, eng.openvino(feeds_of(boxes, scores))) == 1.0


def test_many_candidates_per_class_span_several_windows(engines) -> None:
    # ~1200 candidates per class at threshold 0: the host decides them in rank windows, with
    # boxes kept in earlier windows suppressing later ones, and stops each class at max_dets.
    rng = np.random.default_rng(8)
    ctr = rng.uniform(0, 300, (2, 1200, 2))
    half = rng.uniform(5, 40, (2, 1200, 2))
    boxes = np.concatenate([ctr - half, ctr + half], axis=2).astype(np.float32)
    scores = rng.uniform(0, 1, (2, 1200, 2)).astype(np.float32)
    settings = NMSSettings(score_threshold=0.0, iou_threshold=0.3, pre_top_k=1200, max_dets=300)
    host = check_all(engines, boxes, scores, settings)
    assert (host["num_dets"] > 128).all()  # more than one window's worth kept


# -- masks -----------------------------------------------------------------------------------------
def test_masks_crafted(engines) -> None:
    boxes = np.float32([[[0, 0, 10, 10], [1, 1, 11, 11], [30, 0, 40, 10]]])
    scores = np.float32([[[0.9], [0.8], [0.3]]])
    coeffs = np.float32([[[1, 0], [5, 5], [0, -2]]])
    proto = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4) / 10 - 1
    host = host_nms(boxes, scores, SMALL, coeffs, proto)
    assert_layout(host, 1, SMALL.max_dets, masks=True)
    expected = sigmoid(np.einsum("nk,khw->nhw", coeffs[0, [0, 2]], proto[0]))
    np.testing.assert_allclose(host["masks"][0, :2], expected, rtol=0, atol=1e-6)
    eng = engines(1, SMALL, num_protos=2)
    feeds = {**feeds_of(boxes, scores), "c": coeffs, "p": proto}
    for got in (eng.ort(feeds), eng.openvino(feeds)):
        np.testing.assert_allclose(got["masks"], host["masks"], rtol=0, atol=1e-5)


def test_masks_random(engines) -> None:
    settings = NMSSettings(pre_top_k=300, max_dets=50)
    rng = np.random.default_rng(11)
    boxes, scores = realistic_heads(rng, 2, 600, 6)
    coeffs = rng.normal(0, 1, (2, 600, 8)).astype(np.float32)
    proto = rng.normal(0, 1, (2, 8, 16, 20)).astype(np.float32)
    host = host_nms(boxes, scores, settings, coeffs, proto)
    assert_layout(host, 2, settings.max_dets, masks=True)
    eng = engines(6, settings, num_protos=8)
    feeds = {**feeds_of(boxes, scores), "c": coeffs, "p": proto}
    for got in (eng.ort(feeds), eng.openvino(feeds)):
        assert list(got) == list(nms_output_names(True))
        assert got["masks"].shape == (2, 50, 16, 20)
        assert row_agreement(host, got) == 1.0
        np.testing.assert_allclose(got["masks"], host["masks"], rtol=0, atol=1e-5)


# -- a graph made from a raw image model, run at two input sizes -----------------------------------
def test_image_model_at_two_sizes(tmp_path: Path) -> None:
    settings = NMSSettings(score_threshold=0.3, iou_threshold=0.5, pre_top_k=200, max_dets=30)
    raw = image_model(num_classes=3, num_protos=4)
    model = append_nms(raw, settings, mask_coeffs="mask_coeffs", proto="proto")
    assert [o.name for o in model.graph.output] == list(nms_output_names(True))
    assert not any("features" in out for node in model.graph.node for out in node.output)
    eng = Engines(model, tmp_path)
    raw_session = ort.InferenceSession(raw.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    for batch, (h, w) in ((2, (64, 96)), (1, (128, 160))):  # N = 96 and 320 candidates
        cells = rng.uniform(-1, 1, (batch, 3, h // 8, w // 8))  # varies per cell, so do the heads
        image = np.repeat(np.repeat(cells, 8, axis=2), 8, axis=3).astype(np.float32)
        image += rng.normal(0, 0.1, image.shape).astype(np.float32)
        heads = dict(zip([o.name for o in raw_session.get_outputs()],
                         raw_session.run(None, {"input": image})))
        assert heads["boxes"].shape == (batch, h * w // 64, 4)
        host = host_nms(heads["boxes"], heads["scores"], settings, heads["mask_coeffs"],
                        heads["proto"])
        assert (host["num_dets"] > 0).all()
        for got in (eng.ort({"input": image}), eng.openvino({"input": image})):
            assert got["masks"].shape == (batch, 30, h // 4, w // 4)
            assert np.array_equal(got["num_dets"], host["num_dets"])
            assert row_agreement(host, got) == 1.0
            np.testing.assert_allclose(got["masks"], host["masks"], rtol=0, atol=1e-5)


# -- graph structure and errors --------------------------------------------------------------------
@pytest.mark.parametrize("opset", [13, 17, 18])
def test_graph_structure(opset: int) -> None:
    settings = NMSSettings(pre_top_k=300, max_dets=40)
    model = append_nms(slice_model(4, opset=opset), settings)
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import] == [opset]
    outputs = {o.name: o.type.tensor_type for o in model.graph.output}
    assert list(outputs) == list(nms_output_names(False))
    assert [outputs[n].elem_type for n in outputs] == [T.INT32, T.FLOAT, T.FLOAT, T.INT32]
    dims = [[d.dim_param or d.dim_value for d in outputs[n].shape.dim] for n in outputs]
    assert dims == [["batch", 1], ["batch", 40, 4], ["batch", 40], ["batch", 40]]
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)  # no custom ops
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    topk_k = [inits[node.input[1]].tolist() for node in model.graph.node if node.op_type == "TopK"]
    assert topk_k == [[300], [40]]  # constant initializers (TensorRT needs that)
    (nms,) = [node for node in model.graph.node if node.op_type == "NonMaxSuppression"]
    assert all(name in inits for name in nms.input[2:])
    assert not {"NonZero", "Loop", "If", "Mod"} & {node.op_type for node in model.graph.node}
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.zeros((3, 7, 8), np.float32)})
    assert [a.shape for a in out] == [(3, 1), (3, 40, 4), (3, 40), (3, 40)]


def test_append_nms_errors() -> None:
    raw = slice_model(2)
    with pytest.raises(BckdError, match="no output 'logits'"):
        append_nms(raw, boxes="logits")
    with pytest.raises(BckdError, match="opset >= 13"):
        append_nms(slice_model(2, opset=12))
    with pytest.raises(BckdError, match="both mask_coeffs and proto"):
        append_nms(raw, mask_coeffs="mask_coeffs")
    with pytest.raises(BckdError, match="appended to it before"):
        append_nms(append_nms(raw, boxes="boxes"), boxes="boxes", scores="scores")
    passthrough = slice_model(2)
    passthrough.graph.output.append(helper.make_tensor_value_info("x", T.FLOAT, None))
    with pytest.raises(BckdError, match="also a graph input"):
        append_nms(passthrough, boxes="x")


def test_append_nms_leaves_the_raw_model_alone() -> None:
    raw = slice_model(2)
    before = raw.SerializeToString()
    append_nms(raw)
    assert raw.SerializeToString() == before


def test_for_openvino_bumps_the_threshold_once() -> None:
    model = append_nms(slice_model(2), NMSSettings(iou_threshold=0.6))
    adapted = for_openvino(model)
    inits = {t.name: numpy_helper.to_array(t) for t in adapted.graph.initializer}
    assert inits[IOU_OPENVINO][0] == np.nextafter(np.float32(0.6), np.float32(1))
    assert for_openvino(adapted).SerializeToString() == adapted.SerializeToString()
    with pytest.raises(BckdError, match="no bckd NMS stage"):
        for_openvino(slice_model(2))


# -- host API --------------------------------------------------------------------------------------
def test_unpad() -> None:
    boxes = np.float32([[[0, 0, 10, 10], [20, 0, 30, 10]], [[0, 0, 1, 1], [5, 5, 6, 6]]])
    scores = np.float32([[[0.9], [0.8]], [[0.01], [0.7]]])
    coeffs = np.ones((2, 2, 3), np.float32)
    proto = np.zeros((2, 3, 4, 4), np.float32)
    layout = host_nms(boxes, scores, SMALL, coeffs, proto)
    b1_boxes, b1_scores, b1_labels, b1_masks = unpad(layout, 1)
    np.testing.assert_array_equal(b1_boxes, [[5, 5, 6, 6]])
    assert b1_scores.tolist() == [np.float32(0.7)] and b1_labels.tolist() == [0]
    np.testing.assert_array_equal(b1_masks, np.full((1, 4, 4), 0.5, np.float32))
    assert len(unpad(host_nms(boxes, scores, SMALL), 0)) == 3
    with pytest.raises(BckdError, match="out of range"):
        unpad(layout, 2)


@pytest.mark.parametrize("args", [
    (np.zeros((1, 3, 5)), np.zeros((1, 3, 2))),
    (np.zeros((1, 3, 4)), np.zeros((1, 4, 2))),
    (np.zeros((1, 3, 4)), np.zeros((1, 3, 2)), np.zeros((1, 3, 2)), None),
    (np.zeros((1, 3, 4)), np.zeros((1, 3, 2)), np.zeros((1, 3, 2)), np.zeros((1, 3, 4, 4))),
])
def test_host_nms_rejects_bad_shapes(args: tuple) -> None:
    boxes, scores, *masks = args
    coeffs, proto = masks or (None, None)
    with pytest.raises(BckdError):
        host_nms(boxes, scores, SMALL, coeffs, proto)


def test_host_nms_and_graph_module_import_without_heavy_packages() -> None:
    code = ("import sys, runtime.tasks.nms, export.nms_graph; "
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'openvino') "
            "if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
