"""Distillation losses: definitions checked against independent numpy computations."""
import numpy as np
import pytest
import torch

from distill.losses import LOSSES, DistillInputs, build_loss
from distill.losses import build_losses
from distill.losses.logit_kd import logit_kd
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
    loss = build_loss(name)
    zs = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = loss(DistillInputs(zs, torch.randn(2, 4, 8, 8)))
    assert out.ndim == 0 and torch.isfinite(out)
    out.backward()
    assert zs.grad.abs().sum() > 0


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
