"""MFS (manifold stability): self-comparison, known scaling, ascent, recorded settings."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from distill.analysis import manifold_stability
from distill.models import build_segmentor


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions gain nothing from threads, and lose a lot on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_segmentor(backbone="resnet18", head="pspnet", num_classes=3, width=0.125)


def _images(n_batches: int = 2, batch: int = 2, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(n_batches)]


class _Scaled(nn.Module):
    """Wraps a segmentor and multiplies every stage feature by ``factor``."""

    def __init__(self, inner: nn.Module, factor: float) -> None:
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        logits, feats = self.inner.forward_with_features(x)
        return logits, [self.factor * f for f in feats]


def test_a_model_against_itself_is_exactly_one() -> None:
    model = _tiny()
    out = manifold_stability(model, model, _images(), directions=3)
    assert out["mfs"] == 1.0
    assert out["ratio"] == [1.0] * 4
    assert out["lip_student"] == out["lip_teacher"]
    assert all(v > 0 for v in out["lip_student"])
    assert out["layers"] == ["layer1", "layer2", "layer3", "layer4"]


def test_doubled_stage_features_double_every_ratio() -> None:
    teacher = _tiny()
    out = manifold_stability(_Scaled(teacher, 2.0), teacher, _images(), directions=2)
    assert out["ratio"] == pytest.approx([2.0] * 4, rel=1e-6)
    assert out["mfs"] == pytest.approx(2.0, rel=1e-6)


def test_gradient_ascent_never_lowers_the_estimate() -> None:
    model, images = _tiny(1), _images(1)
    plain = manifold_stability(model, model, images, directions=2, seed=5)
    tight = manifold_stability(model, model, images, directions=2, ascent_steps=2, seed=5)
    for before, after in zip(plain["lip_student"], tight["lip_student"]):
        assert after >= before
    assert sum(tight["lip_student"]) > sum(plain["lip_student"])  # random directions are far from the sup


def test_settings_are_recorded_and_modes_restored() -> None:
    student, teacher = _tiny(0), _tiny(1)
    student.train()
    out = manifold_stability(student, teacher, _images(2, batch=3), epsilon=1e-2, eta=1e-5,
                             directions=2, batch_size=2, seed=9)
    assert out["settings"] == dict(epsilon=1e-2, eta=1e-5, directions=2, ascent_steps=0, seed=9,
                                   batch_size=2, images=6)
    assert student.training and all(m.training for m in student.modules())
    assert teacher.training  # built in train mode, so restored to it


def test_the_seed_fixes_the_result() -> None:
    student, teacher = _tiny(0), _tiny(1)
    images = _images(1, batch=4)
    a = manifold_stability(student, teacher, images, directions=2, batch_size=4, seed=3)
    b = manifold_stability(student, teacher, images, directions=2, batch_size=4, seed=3)
    assert a == b
    c = manifold_stability(student, teacher, images, directions=2, batch_size=4, seed=4)
    assert c["lip_student"] != a["lip_student"]


def test_bad_arguments_are_rejected() -> None:
    model = _tiny()
    with pytest.raises(ValueError, match="no images"):
        manifold_stability(model, model, [])
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        manifold_stability(model, model, _images(), epsilon=0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        manifold_stability(model, model, [torch.zeros(3, 32, 32)])
