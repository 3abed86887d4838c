"""Detection distillation losses: definitions, hand-checked values, gradients, adapters, errors."""
from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch

from distill.losses import DETECT_LOSSES, LOSSES, DistillInputs, build_loss, build_losses
from distill.losses.bckd import BCKDLoss
from distill.losses.cwd import channel_wise_kl
from distill.losses.det_kd import localization_kd, pearson_mse, sigmoid_kd
from loss_inputs import CTX, DET_CTX, det_distill_inputs, distill_inputs
from runtime.errors import BckdError

SAME_CTX = dataclasses.replace(DET_CTX, teacher_channels=DET_CTX.student_channels,
                               teacher_fpn_channels=DET_CTX.student_fpn_channels)
STUDENT = ("student_logits", "student_reg")
TEACHER = ("teacher_logits", "teacher_reg")


def _build(name, ctx=DET_CTX, **options):
    torch.manual_seed(0)
    return build_loss(name, ctx, task="detect", **options).train()


def _tensors(inputs, side):
    names = STUDENT if side == "student" else TEACHER
    tensors = [getattr(inputs, n) for n in names if getattr(inputs, n) is not None]
    return tensors + list(getattr(inputs, f"{side}_feats")) + list(getattr(inputs, f"{side}_fpn"))


def _mirror(inputs):
    """The inputs with the teacher replaced by a copy of the student."""
    return dataclasses.replace(
        inputs, teacher_logits=inputs.student_logits.clone(),
        teacher_reg=None if inputs.student_reg is None else inputs.student_reg.clone(),
        teacher_feats=[x.clone() for x in inputs.student_feats],
        teacher_fpn=[x.clone() for x in inputs.student_fpn])


@pytest.mark.parametrize("name", DETECT_LOSSES.names())
def test_every_detection_loss_runs_under_bf16_and_only_the_student_gets_gradient(name):
    loss = _build(name)
    inputs = det_distill_inputs()
    for t in _tensors(inputs, "student") + _tensors(inputs, "teacher"):
        t.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(inputs)
    assert out.ndim == 0 and out.dtype == torch.float32 and torch.isfinite(out) and out > 0
    out.backward()
    assert any(t.grad is not None and t.grad.abs().sum() > 0 for t in _tensors(inputs, "student"))
    assert all(t.grad is None or not t.grad.any() for t in _tensors(inputs, "teacher"))
    cls = DETECT_LOSSES.get(name)
    assert isinstance(cls.default_weight, float) and isinstance(cls.needs_features, bool)
    assert "Normalisation" in (cls.__doc__ or "") + (sys.modules[cls.__module__].__doc__ or "")


@pytest.mark.parametrize("name, options", [("kd", {}), ("kd", {"beta": 0.0}),
                                           ("kd", {"normalize": "priors", "tau": 3.0}),
                                           ("cwd", {}), ("pkd", {}), ("ld", {})])
def test_zero_when_student_equals_teacher_and_positive_otherwise(name, options):
    loss = _build(name, SAME_CTX, **options)
    inputs = det_distill_inputs(ctx=SAME_CTX)
    assert float(loss(_mirror(inputs))) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(inputs)) > 1e-3


def test_kd_hand_checked_values():
    f64 = {"dtype": torch.float64}
    s, t = torch.zeros(1, 1, 1, **f64), torch.full((1, 1, 1), math.log(3.0), **f64)  # 0.5, 0.75
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(sigmoid_kd(s, t, 1.0, 0.0, "priors")) == pytest.approx(kl, rel=1e-6)
    # β = 1: BCE(0.5; 0.75) = ln 2, times |0.5 − 0.75|
    assert float(sigmoid_kd(s, t, 1.0, 1.0, "priors")) == pytest.approx(math.log(2) * 0.25,
                                                                       rel=1e-6)
    # 'teacher' divides by the teacher's soft foreground count: here 2 priors scoring 0.75 each
    s2, t2 = torch.zeros(1, 2, 1, **f64), torch.full((1, 2, 1), math.log(3.0), **f64)
    assert float(sigmoid_kd(s2, t2, 1.0, 0.0, "teacher")) == pytest.approx(2 * kl / 1.5, rel=1e-6)
    # τ = 2: p = σ(z/2), times τ²
    pt = 1 / (1 + 3 ** -0.5)
    kl2 = pt * math.log(pt / 0.5) + (1 - pt) * math.log((1 - pt) / 0.5)
    assert float(sigmoid_kd(s, t, 2.0, 0.0, "priors")) == pytest.approx(4 * kl2, rel=1e-6)


def test_kd_teacher_normalisation_ignores_easy_background_priors():
    inputs = det_distill_inputs()
    pad = torch.full((2, 500, DET_CTX.num_classes), -30.0)
    padded = dataclasses.replace(
        inputs, priors=None, student_logits=torch.cat([inputs.student_logits, pad], 1),
        teacher_logits=torch.cat([inputs.teacher_logits, pad], 1))
    teacher, priors = _build("kd"), _build("kd", normalize="priors")
    assert float(teacher(padded)) == pytest.approx(float(teacher(inputs)), rel=1e-5)
    n = inputs.student_logits.shape[1]
    assert float(priors(padded)) == pytest.approx(float(priors(inputs)) * n / (n + 500), rel=1e-5)


def test_ld_hand_checked_value_region_and_weighting():
    # 2 bins (reg_max 1), τ = 1: teacher softmax (0.25, 0.75), student (0.5, 0.5) on every side
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    t_reg = torch.tensor([0.0, math.log(3.0)]).expand(1, 3, 4, 2).clone()
    s_reg = torch.zeros(1, 3, 4, 2)
    s_reg[0, 1] = t_reg[0, 1]  # prior 1 agrees with the teacher
    t_cls = torch.tensor([math.log(3.0), 0.0, -3.0]).view(1, 3, 1)  # scores 0.75, 0.5, 0.047
    inputs = DistillInputs(torch.zeros(1, 3, 1), t_cls, student_reg=s_reg, teacher_reg=t_reg)
    two_bins = dataclasses.replace(DET_CTX, reg_max=1)
    loss = _build("ld", two_bins, tau=1.0)
    assert float(loss(inputs)) == pytest.approx(0.75 * kl / (0.75 + 0.5), rel=1e-6)
    # prior 2 is below the score threshold: what the student predicts there does not count
    s_reg[0, 2] = torch.randn(4, 2) * 5
    assert float(loss(inputs)) == pytest.approx(0.75 * kl / 1.25, rel=1e-6)
    # τ = 10 and τ²: the same formula at the softened distributions
    e = 3.0 ** 0.1  # softmax((0, ln 3)/10) = (1, e) / (1 + e)
    pt = (1 / (1 + e), e / (1 + e))
    kl10 = sum(p * math.log(p / 0.5) for p in pt)
    assert float(_build("ld", two_bins)(inputs)) == pytest.approx(100 * 0.75 * kl10 / 1.25,
                                                                  rel=2e-5)


def test_ld_empty_region_is_zero_with_a_graph():
    inputs = det_distill_inputs()
    inputs.teacher_logits = torch.full_like(inputs.teacher_logits, -10.0)
    inputs.student_reg.requires_grad_()
    out = _build("ld")(inputs)
    assert float(out.detach()) == 0.0
    out.backward()
    assert inputs.student_reg.grad is not None and not inputs.student_reg.grad.any()


def test_ld_needs_a_gfl_head():
    with pytest.raises(ValueError, match="^ld needs a GFL head"):
        _build("ld")(det_distill_inputs(gfl=False))
    retina = dataclasses.replace(DET_CTX, reg_max=0)
    with pytest.raises(BckdError, match="method 'ld': ld needs a GFL head"):
        build_loss("ld", retina, task="detect")
    with pytest.raises(ValueError, match="5 bins but the loss was built for reg_max 7"):
        _build("ld", dataclasses.replace(DET_CTX, reg_max=7))(det_distill_inputs())


@pytest.mark.parametrize("name", ["kd", "cwd", "pkd", "bckd"])
def test_retinanet_inputs_without_distributions(name):
    assert torch.isfinite(_build(name)(det_distill_inputs(gfl=False)))


def test_pkd_is_one_minus_pearson_and_affine_invariant():
    torch.manual_seed(0)
    s, t = (torch.randn(2, 3, 5, 6, dtype=torch.float64) for _ in range(2))
    r = torch.stack([torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
                     for a, b in zip(s.flatten(0, 1), t.flatten(0, 1))])
    assert float(pearson_mse(s, t, eps=0.0)) == pytest.approx(float((1 - r).mean()), rel=1e-10)
    scaled = s * torch.rand(2, 3, 1, 1, dtype=torch.float64).add(0.5) + 7.0
    assert float(pearson_mse(scaled, t, eps=0.0)) == pytest.approx(float(pearson_mse(s, t, 0.0)))


def test_cwd_is_the_level_mean_of_channel_wise_kl():
    inputs = det_distill_inputs(ctx=SAME_CTX)
    expect = sum(float(channel_wise_kl(s, t, 4.0)) for s, t in
                 zip(inputs.student_fpn, inputs.teacher_fpn)) / 3
    assert float(_build("cwd", SAME_CTX)(inputs)) == pytest.approx(expect, rel=1e-6)


@pytest.mark.parametrize("name", ["cwd", "pkd"])
def test_channel_mismatch_adapter_is_trained_and_checked(name):
    assert not list(_build(name, SAME_CTX).parameters())
    loss = _build(name)
    (conv,) = list(loss.parameters())
    assert conv.shape == (DET_CTX.teacher_fpn_channels, DET_CTX.student_fpn_channels, 1, 1)
    loss(det_distill_inputs()).backward()
    assert conv.grad is not None and conv.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="built for 16 -> 24"):
        loss(det_distill_inputs(ctx=SAME_CTX))
    with pytest.raises(ValueError, match="student_fpn_channels / teacher_fpn_channels are 16 / 24"):
        build_loss(name, task="detect")(det_distill_inputs())


def _shape_errors():
    inputs = det_distill_inputs()
    n = inputs.student_logits.shape[1]
    return [
        (dataclasses.replace(inputs, teacher_logits=inputs.teacher_logits[:, :n - 16]),
         "same prior layout"),
        (dataclasses.replace(inputs, student_logits=inputs.student_logits[..., None]),
         r"per-prior \[B, N, C\]"),
        (dataclasses.replace(inputs, priors=inputs.priors[:10]), "10 in inputs.priors"),
    ]


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("name", ["kd", "ld"])
def test_logit_shape_errors_are_clear(name, case):
    inputs, message = _shape_errors()[case]
    with pytest.raises(ValueError, match=message):
        _build(name)(inputs)


@pytest.mark.parametrize("name", ["cwd", "pkd"])
def test_fpn_shape_errors_are_clear(name):
    inputs = det_distill_inputs()
    loss = _build(name)
    with pytest.raises(ValueError, match="3 FPN levels and the teacher 2"):
        loss(dataclasses.replace(inputs, teacher_fpn=inputs.teacher_fpn[:2]))
    with pytest.raises(ValueError, match="FPN level 1 is"):
        loss(dataclasses.replace(inputs, teacher_fpn=[inputs.teacher_fpn[0],
                                                      inputs.teacher_fpn[1][..., :4],
                                                      inputs.teacher_fpn[2]]))
    with pytest.raises(ValueError, match="needs the FPN levels"):
        loss(dataclasses.replace(inputs, student_fpn=[]))


def test_ld_distribution_shape_errors_are_clear():
    inputs = det_distill_inputs()
    with pytest.raises(ValueError, match="ld: student distributions"):
        _build("ld")(dataclasses.replace(inputs, teacher_reg=inputs.teacher_reg[:, :, :2]))
    with pytest.raises(ValueError, match=r"with the logits' \(B, N\)"):
        _build("ld")(dataclasses.replace(inputs, student_reg=inputs.student_reg[:, :7],
                                         teacher_reg=inputs.teacher_reg[:, :7]))


@pytest.mark.parametrize("size", [(128, 128), (256, 320), (96, 160)])
def test_bckd_fuses_stride_32_stages_at_stride_8_of_the_input_size(size):
    loss = _build("bckd")
    inputs = det_distill_inputs(size=size)
    assert inputs.student_feats[-1].shape[-2:] == (-(-size[0] // 32), -(-size[1] // 32))
    fs, ft, edge_s, edge_t = loss.features(inputs)
    expect = (2, 256, -(-size[0] // 8), -(-size[1] // 8))
    assert fs.shape == ft.shape == expect and edge_s.shape == edge_t.shape == (2, 1, *expect[2:])
    assert torch.isfinite(loss(inputs))
    assert loss.pair_radius(*expect[2:]) == 5


def test_bckd_is_the_same_class_and_segmentation_is_unchanged():
    assert DETECT_LOSSES.get("bckd") is LOSSES.get("bckd") is BCKDLoss
    inputs = distill_inputs()
    torch.manual_seed(0)
    plain = build_loss("bckd", CTX).train()(inputs).detach()
    torch.manual_seed(0)
    sized = build_loss("bckd", CTX).train()(dataclasses.replace(inputs, input_size=(64, 64)))
    assert torch.equal(plain, sized.detach())
    with pytest.raises(ValueError, match="set DistillInputs.input_size"):
        _build("bckd")(dataclasses.replace(det_distill_inputs(), input_size=None))


def test_composition_builds_through_the_detect_registry():
    losses = build_losses("bckd+ld", {"ld": {"tau": 5.0}}, DET_CTX, task="detect")
    assert list(losses) == ["bckd", "ld"]
    assert losses["ld"][1] == 0.25 and losses["ld"][0].tau == 5.0 and losses["bckd"][1] == 1.0
    inputs = det_distill_inputs()
    total = sum(w * m.train()(inputs) for m, w in losses.values())
    assert torch.isfinite(total) and total > 0
    every = build_losses("kd+cwd+pkd+ld+bckd", None, DET_CTX, task="detect")
    assert {k: w for k, (_, w) in every.items()} == {"kd": 1.0, "cwd": 30.0, "pkd": 30.0,
                                                    "ld": 0.25, "bckd": 1.0}
    assert list(build_losses("bckd+kd", None, DET_CTX, task="instance")) == ["bckd", "kd"]
    with pytest.raises(BckdError, match="unknown detection distillation method 'pk'"):
        build_losses("bckd+pk", task="detect")
    with pytest.raises(BckdError, match="unknown option 'tua' for distillation method 'kd'"):
        build_losses("kd", {"kd": {"tua": 2.0}}, task="detect")


@pytest.mark.parametrize("name, options, message", [
    ("kd", {"tau": 0.0}, "'tau' must be a positive number"),
    ("kd", {"beta": -1.0}, "'beta' must be a number >= 0"),
    ("kd", {"normalize": "batch"}, "'normalize' must be one of teacher, priors"),
    ("cwd", {"tau": -1.0}, "'tau' must be a positive number"),
    ("ld", {"score_threshold": 1.0}, r"'score_threshold' must be in \[0, 1\)"),
])
def test_bad_options_are_one_line_errors(name, options, message):
    with pytest.raises(BckdError, match=message):
        build_loss(name, DET_CTX, task="detect", **options)


def test_gradcheck_kd_and_ld_in_float64():
    torch.manual_seed(0)
    s, t = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True), torch.randn(1, 4, 3)
    for beta in (0.0, 1.0):
        assert torch.autograd.gradcheck(
            lambda x: sigmoid_kd(x, t.double(), 2.0, beta, "teacher"), (s,))
    rs = torch.randn(1, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    rt, w = torch.randn(1, 4, 4, 5, dtype=torch.float64), torch.rand(1, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: localization_kd(x, rt, w, 3.0), (rs,))
