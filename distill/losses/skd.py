"""Pair-wise structural distillation (SKD; Liu et al., CVPR 2019), method.md §4.4."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses.base import LOSSES, DistillInputs
from distill.losses.functional import (as_float, check_choice, check_positive, check_positive_int,
                                       full_precision, require, resize_like)


@LOSSES.register("skd")
class PairWiseKD(nn.Module):
    """(1/B) Σ_b (1/N'²) Σ_ij (a^T_ij − a^S_ij)², a_ij the cosine of node vectors i and j.

    The decoder's pre-classifier map (the last feature map, as in SKD) of each model is max-pooled
    into N' nodes; each node vector is divided by its L2 norm, detached, + 1e-8 (as in the source);
    a^M = f̂ᵀf̂ within each model, so the channel counts may differ and nothing is trained.
    Normalisation: per pair — a mean over the N'² node pairs and the B images; no temperature.
    A teacher map at another stride is resized to the student's first.

    * ``mode="scale"`` (default, SKD's CriterionPairWiseforWholeFeatAfterPool): kernel = stride =
      (⌊β·h⌋, ⌊β·w⌋), ceil mode, β = ``pool_scale`` (default 0.5) → about 2×2 nodes. λ_pa = 1.
      Source: irfanICMLL/structure_knowledge_distillation ``utils/criterion.py``,
      ``utils/utils.py``.
    * ``mode="window"`` (CIRKD's re-implementation, ``losses/skd.py``): ``window``×``window``
      max-pool windows (default 2), ceil mode → N' = N/4 nodes, computed with the exact C×C
      Gram identity Σ_ij(a^T−a^S)² = ‖F̂_TF̂_Tᵀ‖² − 2‖F̂_TF̂_Sᵀ‖² + ‖F̂_SF̂_Sᵀ‖² (cost O(N'C²), no
      N'×N' matrix).
      CIRKD normalises without the detach; this loss uses SKD's detached norm in both modes.

    Computed in fp32 (fp64 inputs stay fp64) with autocast off; the teacher is detached.
    """

    default_weight = 1.0
    needs_features = True

    def __init__(self, *, mode: str = "scale", pool_scale: float | None = None,
                 window: int | None = None) -> None:
        super().__init__()
        check_choice("mode", mode, ("scale", "window"), "skd")
        if mode == "scale" and window is not None:
            raise ValueError("skd option 'window' applies to mode='window' only")
        if mode == "window" and pool_scale is not None:
            raise ValueError("skd option 'pool_scale' applies to mode='scale' only")
        self.mode = mode
        self.pool_scale = 0.5 if pool_scale is None else pool_scale
        self.window = 2 if window is None else window
        check_positive("pool_scale", self.pool_scale, "skd")
        if self.pool_scale > 1:
            raise ValueError(f"skd option 'pool_scale' must be in (0, 1], got {self.pool_scale}")
        check_positive_int("window", self.window, "skd")

    def forward(self, inputs: DistillInputs) -> torch.Tensor:
        s = require(inputs.student_decoder, "the student's decoder features", "skd")
        t = require(inputs.teacher_decoder, "the teacher's decoder features", "skd")
        with full_precision(s):
            s = as_float(s)
            t = resize_like(as_float(t.detach()), s)
            kernel = self._kernel(s.shape[-2:])
            s, t = (F.max_pool2d(x, kernel, kernel, ceil_mode=True) for x in (s, t))
            if self.mode == "window":
                return pairwise_gram(s, t)
            return pairwise_explicit(s, t)

    def _kernel(self, size: torch.Size) -> tuple[int, int]:
        if self.mode == "window":
            return (self.window, self.window)
        return tuple(max(1, int(self.pool_scale * n)) for n in size)


def unit_nodes(x: torch.Tensor) -> torch.Tensor:
    """(B, C, N) node vectors divided by their detached L2 norm + 1e-8 (SKD's ``similarity``)."""
    x = x.flatten(2)
    return x / (x.norm(dim=1, keepdim=True).detach() + 1e-8)


def pairwise_explicit(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The loss from the two (B, N', N') cosine matrices of (B, C, h', w') node maps."""
    fs, ft = unit_nodes(student), unit_nodes(teacher.detach())
    a_s, a_t = fs.transpose(1, 2) @ fs, ft.transpose(1, 2) @ ft
    return (a_t - a_s).pow(2).mean()


def pairwise_gram(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The same value as :func:`pairwise_explicit` from C×C Gram products."""
    fs, ft = unit_nodes(student), unit_nodes(teacher.detach())
    b, n = fs.shape[0], fs.shape[2]

    def sq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x @ y.transpose(1, 2)).pow(2).sum()

    return (sq(ft, ft) - 2 * sq(ft, fs) + sq(fs, fs)) / (b * n * n)
