"""BCKD: IRNet paths, each term against its definition, gradchecks, chunking, Gram shortcut, state."""
from __future__ import annotations

import math

import pytest
import torch

from distill.losses import DistillInputs, LossContext, build_loss
from distill.losses.bckd import balanced_pair_bce
from distill.losses.bckd_ops import context_kl, context_mse, irnet_paths, pairwise_boundary
from distill.losses.cwd import channel_wise_kl as spatial_kl
from distill.models import build_segmentor, count_parameters
from loss_inputs import DET_CTX
from runtime.errors import BckdError

CTX = LossContext(student_channels=(4, 8, 8, 16), teacher_channels=(8, 8, 16, 16),
                  student_reductions=(4, 8, 8, 8), teacher_reductions=(4, 8, 8, 8))


def _inputs(ctx=CTX, batch=2, size=64, dtype=torch.float32, seed=0, epoch=0, epochs=4):
    g = torch.Generator().manual_seed(seed)

    def feats(channels):
        return [torch.randn(batch, c, size // r, size // r, generator=g, dtype=dtype)
                for c, r in zip(channels, ctx.student_reductions)]

    logits = torch.randn(batch, ctx.num_classes, size, size, generator=g, dtype=dtype)
    return DistillInputs(logits, logits.clone(), feats(ctx.student_channels),
                         feats(ctx.teacher_channels), None, 0.0, None, None, epoch, epochs)


@pytest.mark.parametrize("radius, k, longest", [(5, 34, 11), (10, 152, 22)])
def test_irnet_offsets_match_the_paper_counts(radius, k, longest):
    paths = irnet_paths(radius)
    assert len(paths) == k and max(len(p) for p in paths) <= longest
    for path in paths:
        dy, dx = path[-1]
        assert path[0] == (0, 0) and dy * dy + dx * dx < radius * radius
        assert (dy, dx) != (0, 0) and (dy > 0 or dx > 0)
    # each unordered pair once: no offset is the negation of another
    ends = {p[-1] for p in paths}
    assert not any((-dy, -dx) in ends for dy, dx in ends)
    assert irnet_paths(5)[0] == ((0, 0), (0, 1))


def test_pairwise_boundary_is_the_line_max():
    torch.manual_seed(0)
    b = torch.rand(2, 1, 12, 15, dtype=torch.float64)
    radius = 4
    out = pairwise_boundary(b, radius)
    r1 = radius - 1
    assert out.shape == (2, len(irnet_paths(radius)), 12 - r1, 15 - 2 * r1)
    for k, path in enumerate(irnet_paths(radius)):
        for y, x in [(0, 0), (5, 4), (8, 8)]:
            expect = max(b[1, 0, y + py, r1 + x + px] for py, px in path)
            assert out[1, k, y, x] == expect
    padded = pairwise_boundary(b, radius, pairs="pad")
    assert padded.shape[-2:] == b.shape[-2:]
    assert torch.equal(padded[..., :12 - r1, r1:15 - r1], out)
    with pytest.raises(ValueError, match="too small for boundary radius 10"):
        pairwise_boundary(b, 10)


def _kl_rows_reference(xs, xt, tau):
    """The §2.5 C-KL straight from its definition, in float64 loops over images."""
    total = 0.0
    for b in range(xs.shape[0]):
        rs = torch.softmax(xs[b] @ xs[b].T / (math.sqrt(xs.shape[-1]) * tau), dim=-1)
        rt = torch.softmax(xt[b] @ xt[b].T / (math.sqrt(xt.shape[-1]) * tau), dim=-1)
        total += (rt * (rt.log() - rs.log())).sum().item()
    return total / (xs.shape[0] * xs.shape[1]) * tau * tau


def test_context_kl_matches_definition_and_chunking_is_exact():
    torch.manual_seed(1)
    xs = torch.randn(2, 50, 6, dtype=torch.float64, requires_grad=True)
    xt = torch.randn(2, 50, 9, dtype=torch.float64)
    full = context_kl(xs, xt, 1.7)
    assert full.item() == pytest.approx(_kl_rows_reference(xs.detach(), xt, 1.7), rel=1e-12)
    grad_full, = torch.autograd.grad(full, xs)
    for chunk in (1, 7, 49):
        chunked = context_kl(xs, xt, 1.7, chunk=chunk)
        assert abs(chunked.item() - full.item()) <= 1e-6 * abs(full.item())
        grad, = torch.autograd.grad(chunked, xs)
        assert torch.allclose(grad, grad_full, rtol=1e-9, atol=1e-12)


def test_context_kl_chunked_fp32_within_1e6():
    torch.manual_seed(2)
    xs, xt = torch.randn(2, 256, 32), torch.randn(2, 256, 32)
    full, chunked = context_kl(xs, xt, 1.0), context_kl(xs, xt, 1.0, chunk=64)
    assert abs(chunked.item() - full.item()) <= 1e-6 * abs(full.item())


def test_gram_shortcut_equals_explicit_relation_mse():
    torch.manual_seed(3)
    xs = torch.randn(3, 40, 5, dtype=torch.float64)
    xt = torch.randn(3, 40, 7, dtype=torch.float64)
    explicit, shortcut = context_mse(xs, xt, gram=False), context_mse(xs, xt, gram=True)
    assert abs(explicit.item() - shortcut.item()) <= 1e-10 * abs(explicit.item())
    direct = sum(((xt[b] @ xt[b].T / 7 - xs[b] @ xs[b].T / 5) ** 2).sum() for b in range(3))
    assert explicit.item() == pytest.approx(direct.item() / (3 * 40 * 40), rel=1e-12)


def test_spatial_kl_matches_definition():
    torch.manual_seed(4)
    s, t = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5, dtype=torch.float64)
    tau = 2.0
    ps = torch.softmax(s.flatten(2) / tau, -1)
    pt = torch.softmax(t.flatten(2) / tau, -1)
    expect = (pt * (pt.log() - ps.log())).sum(-1).mean() * tau * tau
    assert spatial_kl(s, t, tau).item() == pytest.approx(expect.item(), rel=1e-12)
    assert spatial_kl(s, s, tau).item() == pytest.approx(0.0, abs=1e-12)


def test_gradcheck_each_bckd_term_in_float64():
    torch.manual_seed(5)
    edge = torch.randn(1, 1, 7, 9, dtype=torch.float64, requires_grad=True)
    edge_t = torch.randn(1, 1, 7, 9, dtype=torch.float64)

    def boundary(e):
        bt = pairwise_boundary(torch.sigmoid(edge_t), 3)
        return spatial_kl(pairwise_boundary(torch.sigmoid(e), 3), bt, 1.3)

    assert torch.autograd.gradcheck(boundary, (edge,))
    xs = torch.randn(2, 10, 4, dtype=torch.float64, requires_grad=True)
    xt = torch.randn(2, 10, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: context_kl(a, xt, 1.5), (xs,))
    assert torch.autograd.gradcheck(lambda a: context_kl(a, xt, 1.5, chunk=3), (xs,))
    assert torch.autograd.gradcheck(lambda a: context_mse(a, xt), (xs,))


def test_gradcheck_whole_loss_through_student_features_in_float64():
    torch.manual_seed(6)
    ctx = LossContext(student_channels=(2, 2, 2, 2), teacher_channels=(2, 2, 2, 2))
    loss = build_loss("bckd", ctx, channels=8, radius=3).double()
    inputs = _inputs(ctx, batch=1, dtype=torch.float64, size=48)
    c5 = inputs.student_feats[3].requires_grad_()

    def f(last):
        inputs.student_feats[3] = last
        return loss(inputs)

    loss.tau_bd.adapt = loss.tau_cd.adapt = False  # the τ update is a side effect, not a function
    assert torch.autograd.gradcheck(f, (c5,), atol=1e-6)


def test_loss_terms_weights_decay_and_teacher_gets_no_gradient():
    torch.manual_seed(7)
    loss = build_loss("bckd", CTX, channels=16, teacher_boundary="soft").train()
    inputs = _inputs(epoch=1, epochs=4)
    for t in inputs.teacher_feats:
        t.requires_grad_()
    value = loss(inputs)
    terms = loss.log_scalars()
    assert terms["decay"] == pytest.approx(0.75)  # r(t=2) = 1 - (2-1)/4
    assert (loss.boundary_weight, loss.context_weight) == (10.0, 5.0)
    expect = 0.75 * (10 * terms["boundary"] + 5 * terms["context"])
    assert value.item() == pytest.approx(expect, rel=1e-5)
    value.backward()
    assert all(t.grad is None for t in inputs.teacher_feats)
    assert all(p.grad is None for p in loss.teacher_side.parameters())
    assert loss.student_fusion.convs[0][0].weight.grad is not None
    assert loss.align[0].weight.grad is not None


def test_default_teacher_boundary_is_fitted_for_segmentation_only():
    torch.manual_seed(7)
    loss = build_loss("bckd", CTX, channels=16).train()
    assert loss.teacher_boundary == "fitted"
    value = loss(_inputs(epoch=1, epochs=4))
    terms = loss.log_scalars()
    # the fit loss trains the teacher's boundary conv only: added neither decayed nor weighted
    expect = 0.75 * (10 * terms["boundary"] + 5 * terms["context"]) + terms["boundary_fit"]
    assert value.item() == pytest.approx(expect, rel=1e-5)
    # 'fitted' needs per-pixel teacher classes and a frozen F^T: detectors and the other
    # teacher sides get the frozen conv's sigmoid
    assert build_loss("bckd", DET_CTX, channels=16).teacher_boundary == "soft"
    for side in ("free", "trained"):
        assert build_loss("bckd", CTX, channels=16,
                          teacher_adapters=side).teacher_boundary == "soft"


@pytest.mark.parametrize("decay, epoch, progress, expect", [
    ("epoch", 0, 0.0, 1.0), ("epoch", 3, 0.9, 0.25), ("iter", 3, 0.9, 0.1), ("none", 3, 0.9, 1.0)])
def test_decay_schedules(decay, epoch, progress, expect):
    loss = build_loss("bckd", CTX, channels=16, decay=decay)
    inputs = _inputs(epoch=epoch, epochs=4)
    inputs.progress = progress
    assert loss.decay_factor(inputs) == pytest.approx(expect)


def test_temperature_grows_by_the_range_rule_and_is_in_the_state():
    loss = build_loss("bckd", CTX, channels=16, tau_bound=0.05).train()
    before = loss.state_dict()
    assert before["tau_bd.tau"].item() == 1.0 and before["tau_cd.tau"].item() == 1.0
    loss(_inputs())
    assert loss.tau_bd.value == pytest.approx(1.05) and loss.tau_cd.value == pytest.approx(1.05)
    loss.eval()(_inputs())  # no update outside training
    assert loss.tau_bd.value == pytest.approx(1.05)
    fresh = build_loss("bckd", CTX, channels=16)
    fresh.load_state_dict(loss.state_dict())
    assert fresh.tau_bd.value == pytest.approx(1.05)
    fixed = build_loss("bckd", CTX, channels=16, adapt_tau=False).train()
    fixed(_inputs())
    assert fixed.tau_bd.value == 1.0


def test_mse_context_keeps_its_temperature_fixed():
    loss = build_loss("bckd", CTX, channels=16, context="mse", tau_bound=0.05).train()
    loss(_inputs())
    assert loss.tau_cd.value == 1.0 and loss.tau_bd.value == pytest.approx(1.05)


@pytest.mark.parametrize("mode, trainable", [("frozen", False), ("trained", True), ("free", None)])
def test_teacher_adapter_modes(mode, trainable):
    # the soft boundary: 'fitted' (the segmentation default) trains the frozen side's edge conv
    loss = build_loss("bckd", CTX, channels=16, teacher_adapters=mode, teacher_boundary="soft")
    params = list(loss.teacher_side.parameters())
    if trainable is None:
        assert params == []
    else:
        assert params and all(p.requires_grad == trainable for p in params)
    value = loss(_inputs())
    assert torch.isfinite(value)
    value.backward()
    # trained adapters learn from the loss (both terms reach them); frozen ones never change
    assert all((p.grad is not None and p.grad.abs().sum() > 0) == bool(trainable)
               for p in params)


@pytest.mark.parametrize("context", ["kl", "mse"])
def test_trained_teacher_adapters_change_training(context):
    """'trained' must not be 'frozen' under another name: the teacher side gets a gradient."""
    grads = {}
    for mode in ("frozen", "trained"):
        loss = build_loss("bckd", CTX, channels=16, teacher_adapters=mode, context=context,
                          teacher_boundary="soft")
        loss(_inputs()).backward()
        grads[mode] = sum(float(p.grad.abs().sum()) for p in loss.teacher_side.parameters()
                          if p.grad is not None)
    assert grads["frozen"] == 0.0 and grads["trained"] > 0.0


def test_frozen_teacher_adapters_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(0)
    a = build_loss("bckd", CTX, channels=16)
    after_a = torch.rand(1)
    torch.manual_seed(0)
    b = build_loss("bckd", CTX, channels=16)
    assert torch.equal(torch.rand(1), after_a)
    for pa, pb in zip(a.teacher_side.parameters(), b.teacher_side.parameters()):
        assert torch.equal(pa, pb)


def test_feature_stride_4_uses_radius_10_and_hard_teacher_boundary():
    loss = build_loss("bckd", CTX, channels=16, feature_stride=4, teacher_boundary="hard")
    assert loss.pair_radius(32, 32) == 10 and loss.pair_radius(16, 16) == 8
    assert build_loss("bckd", CTX).pair_radius(8, 8) == 4
    fs, ft, es, et = loss.features(_inputs(size=64))
    assert fs.shape[-2:] == (16, 16) and ft.shape[-2:] == (16, 16)
    assert torch.isfinite(loss(_inputs(size=64)))


def test_bad_options_are_one_line_errors():
    with pytest.raises(BckdError, match="bckd option 'context' must be one of kl, mse; got 'l2'"):
        build_loss("bckd", CTX, context="l2")
    with pytest.raises(BckdError, match="unknown option 'radious'.*did you mean 'radius'"):
        build_loss("bckd", CTX, radious=3)
    with pytest.raises(BckdError, match="feature_stride must be 4, 8, 16 or 32"):
        build_loss("bckd", CTX, feature_stride=6)


def test_adapters_never_reach_the_student():
    student = build_segmentor("resnet18", "pspnet", num_classes=7, width=0.125)
    teacher = build_segmentor("resnet18", "pspnet", num_classes=7, width=0.25)
    plain = count_parameters(student)
    loss = build_loss("bckd", LossContext.from_models(student, teacher))
    assert count_parameters(loss) > 0
    assert count_parameters(student) == plain
    assert not any(k.startswith(("student_fusion", "align")) for k in student.state_dict())


def test_embed_norm_bounds_the_relation_and_can_be_switched_off():
    from distill.losses.bckd import _rescale

    x = torch.randn(2, 10, 16) * 100
    assert torch.allclose(_rescale(x).norm(dim=-1), torch.full((2, 10), 4.0), rtol=1e-5)
    inputs = _inputs()
    for f in inputs.student_feats:
        f.mul_(1000)  # huge student activations: the l2 relation does not care
    big = build_loss("bckd", CTX, channels=16, boundary_weight=0.0).eval()
    torch.manual_seed(0)
    plain = build_loss("bckd", CTX, channels=16, boundary_weight=0.0, embed_norm="none").eval()
    assert big(inputs).item() < plain(inputs).item()
    with pytest.raises(BckdError, match="embed_norm"):
        build_loss("bckd", CTX, embed_norm="l1")


def test_affinity_boundary_is_one_across_classes_and_zero_within():
    from distill.losses.bckd_ops import pairwise_affinity_boundary

    labels = torch.zeros(1, 12, 16, dtype=torch.long)
    labels[..., 8:] = 1  # a vertical edge between columns 7 and 8
    p = torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).double()
    b = pairwise_affinity_boundary(p, 3)
    ends = [path[-1] for path in irnet_paths(3)]
    assert b.shape == pairwise_boundary(p[:, :1], 3).shape == (1, len(ends), 10, 12)
    r1 = 2
    for k, (dy, dx) in enumerate(ends):
        for y in range(10):
            for x in range(12):
                across = (x + r1 < 8) != (x + r1 + dx < 8)
                assert b[0, k, y, x].item() == (1.0 if across else 0.0)
    soft = torch.softmax(torch.randn(2, 3, 9, 11, dtype=torch.float64), dim=1)
    got = pairwise_affinity_boundary(soft, 3, "pad")
    assert got.shape[-2:] == (9, 11) and got.min() >= 0 and got.max() <= 1


@pytest.mark.parametrize("pairs", ["crop", "pad"])
def test_class_change_is_the_affinity_boundary_of_one_hot_classes(pairs):
    from distill.losses.bckd_ops import pairwise_affinity_boundary, pairwise_class_change

    labels = torch.randint(0, 4, (2, 1, 9, 13), generator=torch.Generator().manual_seed(5))
    onehot = torch.nn.functional.one_hot(labels[:, 0], 4).permute(0, 3, 1, 2).float()
    got = pairwise_class_change(labels, 4, pairs)
    assert torch.equal(got, pairwise_affinity_boundary(onehot, 4, pairs))
    assert 0 < got.mean() < 1


def test_semantic_teacher_boundary_uses_the_teachers_classes():
    torch.manual_seed(3)
    loss = build_loss("bckd", CTX, channels=16, teacher_boundary="semantic").train()
    a = _inputs(seed=1)
    value = loss(a)
    assert torch.isfinite(value)
    value.backward()
    assert loss.student_edge.weight.grad is not None and loss.student_edge.weight.grad.abs().sum() > 0
    # the teacher's boundary is its class posteriors' pair affinity: new teacher logits, new loss
    b = _inputs(seed=1)
    b.teacher_logits = torch.randn_like(b.teacher_logits) * 5
    assert loss(b).item() != pytest.approx(loss(_inputs(seed=1)).item())
    with pytest.raises(BckdError):
        build_loss("bckd", CTX, teacher_boundary="edges")


def test_balanced_pair_bce_by_hand():
    boundary = torch.tensor([0.1, 0.2, 0.9, 0.6], dtype=torch.float64)
    different = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    want = 0.5 * (-(math.log(0.9 + 1e-5) + math.log(0.8 + 1e-5)) / 2
                  - (math.log(0.9 + 1e-5) + math.log(0.6 + 1e-5)) / 2)
    assert balanced_pair_bce(boundary, different).item() == pytest.approx(want, rel=1e-12)
    # one side empty: that side contributes 0
    assert balanced_pair_bce(boundary[:2], different[:2]).item() == pytest.approx(
        0.5 * -(math.log(0.9 + 1e-5) + math.log(0.8 + 1e-5)) / 2, rel=1e-12)


def test_fitted_teacher_boundary_trains_only_the_teachers_boundary_conv():
    torch.manual_seed(3)
    loss = build_loss("bckd", CTX, channels=16, teacher_boundary="fitted").train()
    side = loss.teacher_side
    assert side.edge.weight.requires_grad
    assert not any(p.requires_grad for p in side.fusion.parameters())
    a = _inputs(seed=1)
    value = loss(a)
    assert "boundary_fit" in loss.log_scalars() and loss.log_scalars()["boundary_fit"] > 0
    # the distillation parts reach the student side only: the teacher's boundary is a target
    loss.last_parts["boundary"].backward(retain_graph=True)
    assert side.edge.weight.grad is None
    assert loss.student_edge.weight.grad.abs().sum() > 0
    value.backward()
    assert side.edge.weight.grad.abs().sum() > 0
    # the fit learns the teacher's class boundary: two regions split at a column, with the same
    # step in every teacher stage
    step = (torch.arange(64) >= 40).float()
    a.teacher_logits = 8.0 * torch.stack([1 - step, step]).view(1, 2, 1, 64).expand(2, 2, 64, 64)
    a.teacher_feats = [(torch.nn.functional.interpolate(step.expand(1, 1, 64, 64), size=t.shape[-2:])
                        * 2 - 1).expand_as(t) + 0.05 * t for t in a.teacher_feats]
    opt = torch.optim.Adam(side.edge.parameters(), lr=0.05)
    fits = []
    for _ in range(60):
        opt.zero_grad()
        _, _, _, edge_t = loss.features(a)
        fit = loss.boundary_fit(edge_t, a.teacher_logits)[0]
        fits.append(fit.item())
        fit.backward()
        opt.step()
    assert fits[-1] < 0.5 * fits[0]
    with torch.no_grad():
        b = torch.sigmoid(loss.features(a)[3])[0, 0].mean(0)  # boundary score per column
    assert b[4:6].mean() > b[:2].mean() + 0.2  # the columns around x = 40 / 8 = 5
    with pytest.raises(BckdError):
        build_loss("bckd", CTX, teacher_boundary="fitted", teacher_adapters="free")

