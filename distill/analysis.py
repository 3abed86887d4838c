"""Analyses of trained models that are not training losses: MFS (manifold stability).

MFS follows method.md §5.1 [RECON] (the paper's Eqs. 22-23 with their constants stripped):

    Lip^l_M = sup_{x, 0<‖δ‖₂≤ε} ‖f^l_M(x+δ) − f^l_M(x)‖₂ / ‖δ‖₂      M ∈ {student, teacher}
    MFS     = (1/L) Σ_l  Lip^l_S / max(Lip^l_T, η)

over the L backbone stages that ``forward_with_features`` returns. The sup is estimated from
below: the max over the given images and ``directions`` random unit directions, optionally
tightened by ``ascent_steps`` of gradient ascent. Norms are per image, over all input (or all
feature) elements; δ = ε·u with ‖u‖₂ = 1, so ‖δ‖₂ = ε exactly.

Random directions see only a small part of a network's sensitivity: on tiny ResNet-18 students,
one ascent step raised the per-stage estimates several-fold and moved MFS by a third, so a report
must state ``ascent_steps`` with the number (it is in ``settings``). Features are differenced in
the models' own precision; with float32 and ε far below 1e-4 the differences lose digits.

Which way is better is ambiguous in the paper: its prose says values close to 1 mean a
well-preserved manifold, its tables treat higher as better (teacher 1.00, students 0.45-1.49).
This module only reports the value; it does not rank.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn


def manifold_stability(
    student: nn.Module, teacher: nn.Module, images: Iterable[Tensor], *, epsilon: float = 1e-3,
    eta: float = 1e-6, directions: int = 8, ascent_steps: int = 0, batch_size: int = 8, seed: int = 0,
) -> dict[str, Any]:
    """MFS of ``student`` against ``teacher`` on ``images`` (normalised (B, 3, H, W) batches).

    Both models see the same perturbations (one ``torch.Generator`` seeded with ``seed``, drawn on
    the CPU), so a model against itself gives exactly 1. Batches are re-split into chunks of at
    most ``batch_size`` images; each chunk costs (1 + ``directions``) forwards per model, plus
    ``ascent_steps`` forward-backward passes per stage per model when ascent is on.

    Returns ``mfs``, per-stage ``lip_student`` / ``lip_teacher`` / ``ratio`` lists, ``layers``
    (stage names) and ``settings`` (ε, η, directions, ascent_steps, seed, batch_size, images
    scored), so a report can state how the number was obtained; batch_size is there because it
    decides which directions each image draws. Both models are put in eval mode and restored after.
    """
    _check_settings(epsilon, eta, directions, ascent_steps, batch_size)
    generator = torch.Generator().manual_seed(seed)
    lip_s: list[float] | None = None
    lip_t: list[float] | None = None
    count = 0
    with _eval_mode(student), _eval_mode(teacher):
        for batch in images:
            for x in torch.split(_check_batch(batch), batch_size):
                deltas = [epsilon * _unit_like(x, generator) for _ in range(directions)]
                lip_s = _running_max(lip_s, _chunk_lipschitz(student, x, deltas, epsilon, ascent_steps))
                lip_t = _running_max(lip_t, _chunk_lipschitz(teacher, x, deltas, epsilon, ascent_steps))
                if len(lip_s) != len(lip_t):
                    raise ValueError(f"the student returns {len(lip_s)} stage features and the teacher "
                                     f"{len(lip_t)}; MFS compares stage by stage, so they must match")
                count += x.shape[0]
    if lip_s is None or lip_t is None:
        raise ValueError("manifold_stability got no images; pass at least one (B, 3, H, W) batch")
    ratios = [s / max(t, eta) for s, t in zip(lip_s, lip_t)]
    return {
        "mfs": sum(ratios) / len(ratios),
        "layers": _layer_names(student, len(ratios)),
        "lip_student": lip_s,
        "lip_teacher": lip_t,
        "ratio": ratios,
        "settings": dict(epsilon=epsilon, eta=eta, directions=directions, ascent_steps=ascent_steps,
                         seed=seed, batch_size=batch_size, images=count),
    }


def _chunk_lipschitz(
    model: nn.Module, x: Tensor, deltas: list[Tensor], epsilon: float, ascent_steps: int
) -> list[float]:
    """Per stage, the largest ‖f(x+δ) − f(x)‖/‖δ‖ over the chunk's images and the given δ.

    With ascent, each stage's search starts, per image, from the δ that scored best for that stage.
    """
    device = _device_of(model)
    x = x.to(device)
    with torch.no_grad():
        clean = model.forward_with_features(x)[1]
        best = [torch.zeros(x.shape[0], device=device) for _ in clean]
        start: list[Tensor | None] = [None] * len(clean)
        for delta in deltas:
            delta = delta.to(device)
            for k, ratio in enumerate(_ratios(model, x, delta, clean)):
                better = ratio > best[k]
                best[k] = torch.where(better, ratio, best[k])
                pick = better.view(-1, *[1] * (x.dim() - 1))
                start[k] = delta if start[k] is None else torch.where(pick, delta, start[k])
    for k in range(len(clean) if ascent_steps else 0):
        best[k] = _ascend(model, x, start[k], clean[k], k, epsilon, ascent_steps, best[k])
    return [float(b.max()) for b in best]


def _ascend(
    model: nn.Module, x: Tensor, delta: Tensor, clean: Tensor, layer: int, epsilon: float,
    steps: int, best: Tensor,
) -> Tensor:
    """Projected gradient ascent of stage ``layer``'s ratio on the ε-sphere, per image.

    Each step replaces δ by ε·∇/‖∇‖ of ½‖f(x+δ) − f(x)‖² (an infinite step projected back onto the
    sphere): in the linear regime that is power iteration on JᵀJ, which converges to the top
    singular direction. The running max is kept, so steps never lower the estimate. The starting
    δ has been scored already; each later one is scored in the pass that takes its gradient.
    """
    for step in range(steps):
        delta = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            diff = model.forward_with_features(x + delta)[1][layer] - clean
            grad, = torch.autograd.grad(0.5 * diff.pow(2).sum(), delta)
        if step:
            best = torch.maximum(best, _ratio(diff.detach(), delta.detach()))
        delta = epsilon * _normalise(grad)
    with torch.no_grad():
        diff = model.forward_with_features(x + delta)[1][layer] - clean
        return torch.maximum(best, _ratio(diff, delta))


def _ratios(model: nn.Module, x: Tensor, delta: Tensor, clean: list[Tensor]) -> list[Tensor]:
    """Per stage, (B,) ‖f(x+δ) − f(x)‖₂ / ‖δ‖₂."""
    feats = model.forward_with_features(x + delta)[1]
    return [_ratio(f - c, delta) for f, c in zip(feats, clean)]


def _ratio(diff: Tensor, delta: Tensor) -> Tensor:
    """(B,) ‖diff‖₂ / ‖δ‖₂, each norm per image over all its elements."""
    return diff.flatten(1).norm(dim=1) / delta.flatten(1).norm(dim=1)


def _unit_like(x: Tensor, generator: torch.Generator) -> Tensor:
    """Gaussian directions shaped like ``x``, each image's scaled to unit L2 norm (drawn on CPU)."""
    u = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return _normalise(u).to(dtype=x.dtype)


def _normalise(t: Tensor) -> Tensor:
    norm = t.flatten(1).norm(dim=1).clamp_min(torch.finfo(t.dtype).tiny)
    return t / norm.view(-1, *[1] * (t.dim() - 1))


def _running_max(acc: list[float] | None, new: list[float]) -> list[float]:
    return list(new) if acc is None else [max(a, b) for a, b in zip(acc, new, strict=True)]


def _layer_names(model: nn.Module, n: int) -> list[str]:
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and len(info) == n and all("module" in i for i in info):
        return [str(i["module"]) for i in info]
    return [f"stage{i + 1}" for i in range(n)]


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_batch(batch: Tensor) -> Tensor:
    if not (isinstance(batch, Tensor) and batch.dim() == 4 and batch.is_floating_point()):
        got = (f"shape {tuple(batch.shape)}, dtype {batch.dtype}" if isinstance(batch, Tensor)
               else type(batch).__name__)
        raise ValueError(f"manifold_stability takes float (B, 3, H, W) image batches, got {got}")
    return batch


def _check_settings(epsilon: float, eta: float, directions: int, ascent_steps: int, batch_size: int) -> None:
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if not eta > 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    if directions < 1:
        raise ValueError(f"directions must be >= 1, got {directions}")
    if ascent_steps < 0:
        raise ValueError(f"ascent_steps must be >= 0, got {ascent_steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block, then restore every submodule's own flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag
