"""Tests for the detectors: FPN + GFL / RetinaNet heads (+ YOLACT masks), their losses, assigners,
box coders, a tiny overfit, ONNX parity at another size and batch, and bf16 autocast.

Tests are parametrised over :data:`DETECTION_HEADS`, so a new head is tested by default.
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch

from distill.losses.det_task import (IGNORED, NEGATIVE, atss_assign, bbox2distance, box_centers,
                                     box_iou, delta_decode, delta_encode, distance2bbox,
                                     distribution_focal_loss, giou_loss, max_iou_assign,
                                     proto_mask_loss, quality_focal_loss, sigmoid_focal_loss)
from distill.models import BACKBONES, DETECTION_HEADS, build_detector, detector_from_arch
from runtime.errors import BckdError

HEADS = DETECTION_HEADS.names()
TINY = dict(width=0.25, fpn_channels=16, num_convs=1, num_protos=4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors gain nothing from threads, and on a shared 2-core box OpenMP threads that
    # wait for each other make every op many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def detector(head: str, masks: bool = False, num_classes: int = 3, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector("resnet18", head, num_classes=num_classes, masks=masks, **{**TINY, **kw})


def scene(size: tuple[int, int] = (64, 64), masks: bool = True) -> tuple[torch.Tensor, list[dict]]:
    """Two images: one with two bright rectangles (labels 0, 1), one empty (no GT)."""
    g = torch.Generator().manual_seed(0)
    h, w = size
    x = torch.randn(2, 3, h, w, generator=g)
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [34.0, 20.0, 60.0, 58.0]])
    gt_masks = torch.zeros(2, h, w, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        gt_masks[i, y1:y2, x1:x2] = 1
        x[0, :, y1:y2, x1:x2] += 2.0 * (i + 1)
    empty = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
                 masks=torch.zeros(0, h, w, dtype=torch.uint8) if masks else None)
    full = dict(boxes=boxes, labels=torch.tensor([0, 1]), masks=gt_masks if masks else None)
    return x, [full, empty]


def total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(terms.values())  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Model shapes and construction


@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("head", HEADS)
def test_outputs_and_taps_shapes(head, masks):
    model = detector(head, masks).eval()
    x = torch.randn(2, 3, 64, 96)
    anchors = model.head.num_anchors
    n = (8 * 12 + 4 * 6 + 2 * 3) * anchors
    with torch.no_grad():
        out = model(x)
        taps = model.forward_taps(x)
    expected = {"boxes": (2, n, 4), "scores": (2, n, 3)}
    if masks:
        expected.update(mask_coeffs=(2, n, 4), proto=(2, 4, 16, 24))
    assert model.output_names == tuple(expected)
    assert [tuple(o.shape) for o in out] == list(expected.values())
    assert all(o.dtype == torch.float32 for o in out)
    assert [tuple(s.shape[-2:]) for s in taps["stages"]] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [tuple(p.shape) for p in taps["fpn"]] == [(2, 16, 8, 12), (2, 16, 4, 6), (2, 16, 2, 3)]
    reg = (2, n, 4, model.reg_max + 1) if model.reg_max else (2, n, 4)
    assert tuple(taps["reg"].shape) == reg and tuple(taps["cls_logits"].shape) == (2, n, 3)
    assert tuple(taps["priors"].shape) == (n, 4) and tuple(taps["strides"].shape) == (n,)
    assert torch.allclose(taps["scores"], taps["cls_logits"].sigmoid())
    boxes = out[0]
    assert boxes.min() >= 0 and (boxes[..., 0::2] <= 96).all() and (boxes[..., 1::2] <= 64).all()
    assert model.task == ("instance" if masks else "detect")
    assert model.fpn_channels == 16 and model.num_classes == 3


@pytest.mark.parametrize("num_convs", [0, 1, 3])
@pytest.mark.parametrize("head", HEADS)
def test_eval_towers_fused_equal_the_two_towers(head, num_convs):
    model = detector(head, masks=True, num_convs=num_convs)
    with torch.no_grad():  # distinct towers, norms that are not the identity
        for p in model.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    feats = [torch.randn(2, 16, 8, 12), torch.randn(2, 16, 4, 6), torch.randn(2, 16, 2, 3)]
    with torch.no_grad():
        two = model.head.train()(feats)
        one = model.head.eval()(feats)
    for key in ("cls_logits", "reg", "mask_coeffs"):
        torch.testing.assert_close(one[key], two[key], rtol=0, atol=1e-5)
    for key in ("cls_feats", "reg_feats"):
        for a, b in zip(one[key], two[key]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_export_has_one_fused_tower_of_constant_weights():
    onnx = pytest.importorskip("onnx")
    model = exportable("gfl")  # num_convs 1: per level one tower conv, 3 output convs
    graph = onnx.load_from_string(export_onnx(model)).graph
    consts = {i.name for i in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert all(n.input[1] in consts for n in convs)  # weights folded, quantizable
    backbone = sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d)) - (
        sum(1 for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)))
    per_level = 1 + 3  # fused tower + cls_out, reg_out, coeff_out; unfused it would be 2 + 3
    assert len(convs) == backbone + 3 * per_level


def test_gfl_priors_and_strides():
    model = detector("gfl")
    with torch.no_grad():
        taps = model.forward_taps(torch.randn(1, 3, 64, 64))
    assert model.reg_max == 16
    centers, strides = box_centers(taps["priors"]), taps["strides"]
    assert strides.tolist() == [8.0] * 64 + [16.0] * 16 + [32.0] * 4
    assert centers[:2].tolist() == [[4.0, 4.0], [12.0, 4.0]]  # row-major, offset 0.5
    assert centers[8].tolist() == [4.0, 12.0]
    sides = taps["priors"][:, 2:] - taps["priors"][:, :2]
    assert torch.equal(sides, 8 * strides[:, None].expand(-1, 2))  # octave_base_scale 8


def test_retinanet_anchors_follow_mmdet():
    head = detector("retinanet").head
    anchors = head.base_anchors(8)
    assert anchors.shape == (9, 4)
    wh = anchors[:, 2:] - anchors[:, :2]
    scales = 8 * 4 * 2 ** (torch.arange(3) / 3)
    torch.testing.assert_close(wh.prod(-1).sqrt(), scales.repeat(3))  # area = (scale*stride)^2
    ratios = torch.tensor([0.5, 1.0, 2.0]).repeat_interleave(3)  # h / w, ratio-major
    torch.testing.assert_close(wh[:, 1] / wh[:, 0], ratios)
    assert torch.equal(box_centers(anchors), torch.zeros(9, 2))


def test_arch_round_trip_and_torchvision_backbone_keys():
    model = detector("gfl", masks=True)
    rebuilt = detector_from_arch(model.arch)
    assert rebuilt.arch == model.arch
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    backbone_keys = [k for k in model.state_dict() if k.startswith("backbone.")]
    resnet = BACKBONES.get("resnet18")(width=0.25, output_stride=32)
    assert backbone_keys == [f"backbone.{k}" for k in resnet.state_dict()]
    assert {k.split(".")[0] for k in model.state_dict()} == {"backbone", "neck", "head", "proto"}
    assert model.arch == dict(backbone="resnet18", head="gfl", num_classes=3, width=0.25,
                              fpn_channels=16, num_convs=1, masks=True, num_protos=4)


def test_build_errors_are_user_errors():
    with pytest.raises(BckdError, match="did you mean 'gfl'"):
        build_detector("resnet18", "gfll", num_classes=3, width=0.25)
    with pytest.raises(BckdError, match="unknown detector arch key 'fpn_chanels'"):
        detector_from_arch(dict(num_classes=3, fpn_chanels=16))
    with pytest.raises(BckdError, match="num_classes"):
        build_detector("resnet18", "gfl", num_classes=0, width=0.25)
    with pytest.raises(BckdError, match="num_protos"):
        build_detector("resnet18", "gfl", num_classes=3, width=0.25, masks=True, num_protos=0)


def test_default_fpn_width_scales_with_backbone():
    model = build_detector("resnet18", "gfl", num_classes=2, width=0.25, num_convs=0)
    assert model.fpn_channels == 64 and model.arch["fpn_channels"] == 64


# --------------------------------------------------------------------------------------------
# Box coders and assigners


def test_delta_and_distance_round_trips():
    g = torch.Generator().manual_seed(0)
    anchors = torch.tensor([[0.0, 0.0, 32.0, 16.0], [10.0, 20.0, 26.0, 84.0]])
    boxes = torch.tensor([[3.0, -2.0, 40.0, 21.0], [12.0, 30.0, 20.0, 60.0]])
    torch.testing.assert_close(delta_decode(anchors, delta_encode(anchors, boxes)), boxes)
    deltas = torch.randn(2, 4, generator=g)
    torch.testing.assert_close(delta_encode(anchors, delta_decode(anchors, deltas)), deltas)
    points = box_centers(boxes)
    torch.testing.assert_close(distance2bbox(points, bbox2distance(points, boxes)), boxes)
    assert bbox2distance(points, boxes, max_dis=4).max() <= 4 - 0.01


def test_atss_positives_have_centres_inside_their_gt():
    head = detector("gfl").head
    feats = [torch.zeros(1, 1, 64 // s, 64 // s) for s in head.strides]
    priors, _ = head.priors(feats)
    gts = torch.tensor([[5.0, 7.0, 29.0, 35.0], [12.0, 10.0, 60.0, 50.0]])  # overlapping
    counts = head.num_level_priors(feats)
    assigned = atss_assign(priors, counts, gts, topk=9)
    pos = assigned >= 0
    assert set(assigned[pos].tolist()) == {0, 1}
    c, gt = box_centers(priors[pos]), gts[assigned[pos]]
    assert ((c > gt[:, :2]) & (c < gt[:, 2:])).all()
    assert pos.sum() <= 2 * 9 * 3 and (assigned[~pos] == NEGATIVE).all()
    # Each GT's positives do not depend on the other GT; a prior claimed by both goes to the one
    # it overlaps more.
    alone = [atss_assign(priors, counts, gts[j:j + 1]) >= 0 for j in range(2)]
    both = (alone[0] & alone[1]).nonzero()[:, 0]
    assert len(both) > 0
    assert torch.equal(assigned[both], box_iou(priors[both], gts).argmax(1))
    assert torch.equal(pos, alone[0] | alone[1])
    empty = atss_assign(priors, head.num_level_priors(feats), torch.zeros(0, 4))
    assert (empty == NEGATIVE).all()


def test_max_iou_assign_thresholds_and_best_anchor():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    priors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],      # IoU 1    -> GT 0
        [0.0, 0.0, 10.0, 6.0],       # IoU 0.6  -> GT 0
        [0.0, 0.0, 10.0, 4.5],       # IoU 0.45 -> ignored
        [0.0, 0.0, 10.0, 3.0],       # IoU 0.3  -> negative
        [100.0, 100.0, 110.0, 103.0],  # IoU 0.3 with GT 1, but its best anchor -> GT 1
        [50.0, 50.0, 60.0, 60.0],    # no overlap -> negative
    ])
    assigned = max_iou_assign(priors, gts, pos_iou=0.5, neg_iou=0.4)
    assert assigned.tolist() == [0, 0, IGNORED, NEGATIVE, 1, NEGATIVE]
    assert (max_iou_assign(priors, torch.zeros(0, 4)) == NEGATIVE).all()


# --------------------------------------------------------------------------------------------
# Loss values against hand computation


def test_quality_focal_loss_hand_values():
    ln2, logit = math.log(2), math.log(3.0)  # sigmoid(ln 3) = 0.75
    got = quality_focal_loss(torch.tensor([0.0, 0.0, 0.0, logit]),
                             torch.tensor([0.0, 0.5, 1.0, 1.0]))
    expected = [0.25 * ln2, 0.0, 0.25 * ln2, 0.0625 * -math.log(0.75)]
    torch.testing.assert_close(got, torch.tensor(expected))


def test_distribution_focal_loss_hand_values():
    uniform = distribution_focal_loss(torch.zeros(1, 3), torch.tensor([0.3]))
    torch.testing.assert_close(uniform, torch.tensor([math.log(3)]))
    peaked = distribution_focal_loss(torch.tensor([[0.0, math.log(2), 0.0]]), torch.tensor([0.25]))
    # probs (0.25, 0.5, 0.25); bins 0 and 1 weighted 0.75 and 0.25
    torch.testing.assert_close(peaked, torch.tensor([0.75 * math.log(4) + 0.25 * math.log(2)]))


def test_giou_loss_hand_value():
    got = giou_loss(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 1.0, 3.0, 3.0]]))
    torch.testing.assert_close(got, torch.tensor([1 - (1 / 7 - 2 / 9)]))
    same = giou_loss(torch.tensor([[1.0, 2.0, 5.0, 9.0]]), torch.tensor([[1.0, 2.0, 5.0, 9.0]]))
    torch.testing.assert_close(same, torch.zeros(1), atol=1e-6, rtol=0)


def test_sigmoid_focal_loss_hand_values():
    got = sigmoid_focal_loss(torch.zeros(2), torch.tensor([1.0, 0.0]), gamma=2.0, alpha=0.25)
    ln2 = math.log(2)
    torch.testing.assert_close(got, torch.tensor([0.25 * 0.25 * ln2, 0.75 * 0.25 * ln2]))


def test_mask_loss_is_box_cropped_and_per_positive():
    # One positive, 1 prototype: logits 0 inside the GT box -> BCE ln 2 whatever the target;
    # huge logits outside it must not count.
    proto = torch.full((1, 1, 8, 8), 50.0)
    proto[0, 0, 2:6, 1:4] = 0.0  # the GT box (8..24, 4..16) at stride 4
    masks = torch.zeros(1, 32, 32)
    masks[0, 10:20, 6:14] = 1
    target = dict(boxes=torch.tensor([[4.0, 8.0, 16.0, 24.0]]), labels=torch.tensor([0]),
                  masks=masks)
    assigned = [torch.tensor([NEGATIVE, 0, NEGATIVE])]
    loss = proto_mask_loss(torch.ones(1, 3, 1), proto, assigned, [target], (32, 32))
    torch.testing.assert_close(loss, torch.tensor(math.log(2)))
    with pytest.raises(BckdError, match="no masks"):
        proto_mask_loss(torch.ones(1, 3, 1), proto, assigned, [{**target, "masks": None}], (32, 32))


# --------------------------------------------------------------------------------------------
# Batch losses: empty images, normalisation, training, autocast


@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("head", HEADS)
def test_losses_finite_with_an_image_without_gt(head, masks):
    model = detector(head, masks)
    x, targets = scene(masks=masks)
    terms = model.loss(model.forward_taps(x), targets)
    expected = {"gfl": {"qfl", "dfl", "giou"}, "retinanet": {"focal", "l1"}}.get(head)
    if expected is not None:
        assert set(terms) == expected | ({"mask"} if masks else set())
    assert all(t.dim() == 0 and torch.isfinite(t) and t > 0 for t in terms.values())
    total(terms).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("head", HEADS)
def test_batch_without_any_gt_gives_zero_box_terms(head):
    model = detector(head, masks=True)
    x, targets = scene()
    terms = model.loss(model.forward_taps(x), [targets[1], targets[1]])
    cls_term = {"gfl": "qfl", "retinanet": "focal"}.get(head)
    for name, value in terms.items():
        assert torch.isfinite(value)
        if name != cls_term:
            assert value == 0, name
    total(terms).backward()
    assert all(p.grad is not None for p in model.parameters())  # DDP needs every grad


@pytest.mark.parametrize("head", HEADS)
def test_losses_are_normalised_per_positive_not_per_image(head):
    model = detector(head, masks=True).eval()  # eval: BN statistics must not depend on batch
    x, targets = scene()
    with torch.no_grad():
        # Scores ~0.5, so GFL's score-weight sum is above its clamp at 1 (mmdet's avg_factor).
        model.head.cls_out.bias.zero_()
        one = model.loss(model.forward_taps(x[:1]), targets[:1])
        two = model.loss(model.forward_taps(torch.cat([x[:1], x[:1]])), [targets[0], targets[0]])
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", HEADS)
def test_overfit_one_tiny_batch(head):
    model = detector(head, masks=True, width=0.25, fpn_channels=32, num_convs=2, num_protos=8)
    x, targets = scene()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = total(model.loss(model.forward_taps(x), targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # GFL's loss first rises: its box terms are weighted by the (initially ~0.01) class scores.
    assert losses[-1] < 0.5 * max(losses[:5]), losses
    model.eval()
    with torch.no_grad():
        boxes, scores, *_ = model(x)
    for gt, label in zip(targets[0]["boxes"], targets[0]["labels"]):
        best = scores[0, :, label].argmax()
        assert scores[0, best, label] > 0.3
        assert box_iou(boxes[0, best][None], gt[None]) > 0.6


@pytest.mark.parametrize("head", HEADS)
def test_backward_under_bf16_autocast(head):
    model = detector(head, masks=True)
    x, targets = scene()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        taps = model.forward_taps(x)
        terms = model.loss(taps, targets)
    assert taps["cls_logits"].dtype == torch.float32 and taps["proto"].dtype == torch.float32
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms.values())
    total(terms).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --------------------------------------------------------------------------------------------
# ONNX export: traced at 64x64, run at 96x128 and batch 2


def export_onnx(model: torch.nn.Module) -> bytes:
    """``model`` traced at 1x3x64x64 with dynamic batch/height/width (legacy tracer, opset 17)."""
    names = list(model.output_names)
    axes = {"input": {0: "batch", 2: "height", 3: "width"},
            **{n: {0: "batch", 1: "priors"} for n in names[:3]},
            "proto": {0: "batch", 2: "proto_height", 3: "proto_width"}}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notices
        torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=names, dynamic_axes=axes)
    return buf.getvalue()


def exportable(head: str) -> torch.nn.Module:
    model = detector(head, masks=True).eval()
    with torch.no_grad():  # non-trivial outputs: the init puts every score near 0.01
        for p in model.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


RUN_INPUT = 2 * torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
TOL = {"boxes": 1e-3, "scores": 1e-5, "mask_coeffs": 1e-4, "proto": 1e-4}


def check_outputs(model: torch.nn.Module, got: list[np.ndarray]) -> None:
    with torch.no_grad():
        ref = model(RUN_INPUT)
    for name, g, r in zip(model.output_names, got, ref):
        np.testing.assert_allclose(g, r.numpy(), atol=TOL[name], rtol=0, err_msg=name)


@pytest.mark.parametrize("head", HEADS)
def test_onnx_export_runs_at_another_size(head):
    ort = pytest.importorskip("onnxruntime")
    model = exportable(head)
    session = ort.InferenceSession(export_onnx(model), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": RUN_INPUT.numpy()})
    n = (12 * 16 + 6 * 8 + 3 * 4) * model.head.num_anchors
    assert [g.shape for g in got] == [(2, n, 4), (2, n, 3), (2, n, 4), (2, 4, 24, 32)]
    check_outputs(model, got)
    assert got[0].max() > 64  # boxes clamped to the run size, not the traced one


def test_onnx_export_runs_on_openvino(tmp_path):
    ov = pytest.importorskip("openvino")
    model = exportable("gfl")
    path = tmp_path / "det.onnx"
    path.write_bytes(export_onnx(model))
    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(RUN_INPUT.numpy())
    check_outputs(model, [result[i] for i in range(len(model.output_names))])
