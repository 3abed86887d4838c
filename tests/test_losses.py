"""Distillation losses: definitions checked against independent numpy computations."""
import numpy as np
import pytest
import torch

from distill.losses import LOSSES, build_loss, build_losses
from distill.losses.logit_kd import logit_kd
from loss_inputs import CTX, distill_inputs
from runtime.errors import BckdError


def _numpy_kd(zs, zt, tau):
    def log_softmax(z):
        z = z / tau
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    lps, lpt = log_softmax(zs), log_softmax(zt)
    kl = (np.exp(lpt) * (lpt - lps)).sum(axis=1)  # (B, H, W)
    return kl.mean() * tau * tau


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_logit_kd_matches_definition(tau):
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    zt = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    got = logit_kd(zs, zt, tau).item()
    assert got == pytest.approx(_numpy_kd(zs.numpy(), zt.numpy(), tau), rel=1e-6)


def test_logit_kd_zero_for_identical_and_grad_only_to_student():
    zs = torch.randn(1, 4, 2, 2, requires_grad=True)
    zt = zs.detach().clone().requires_grad_(True)
    loss = logit_kd(zs, zt, 2.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss = logit_kd(zs, zt + torch.randn_like(zt), 2.0)
    loss.backward()
    assert zs.grad is not None and zt.grad is None


def test_kd_per_pixel_mean_is_resolution_invariant():
    zs, zt = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    big_s = zs.repeat_interleave(2, 2).repeat_interleave(2, 3)
    big_t = zt.repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert logit_kd(zs, zt, 1.0).item() == pytest.approx(logit_kd(big_s, big_t, 1.0).item(), rel=1e-5)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_runs_on_inputs(name):
    """Finite fp32 scalar under bf16 autocast; gradient reaches the student, never the teacher."""
    loss = build_loss(name, CTX).train()
    inputs = distill_inputs()
    student = [inputs.student_logits, inputs.student_decoder, *inputs.student_feats]
    teacher = [inputs.teacher_logits, inputs.teacher_decoder, *inputs.teacher_feats]
    for t in student + teacher:
        t.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(inputs)
    assert out.ndim == 0 and out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert any(t.grad is not None and t.grad.abs().sum() > 0 for t in student)
    assert all(t.grad is None or not t.grad.any() for t in teacher)


def test_bad_kd_args():
    with pytest.raises(BckdError, match="method 'kd': kd temperature must be positive"):
        build_loss("kd", tau=0.0)
    with pytest.raises(BckdError, match="unknown option 'ta' for distillation method 'kd'; did you mean 'tau'"):
        build_loss("kd", ta=1.0)
    with pytest.raises(BckdError, match="not part of method"):
        build_losses("kd", {"cwd": {}})
    with pytest.raises(BckdError, match="names a loss twice"):
        build_losses("kd+kd")
    with pytest.raises(BckdError, match="unknown distillation method 'kdd'"):
        build_losses("kdd")
    with pytest.raises(ValueError, match="differ in shape"):
        logit_kd(torch.randn(1, 3, 2, 2), torch.randn(1, 4, 2, 2), 1.0)
