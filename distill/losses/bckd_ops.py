"""The tensor math of BCKD, as plain functions (method.md §2.3–2.5, §3).

Kept apart from the loss module so each term can be tested on its own: float64 gradcheck, the
chunked context KL against the unchunked one, the Gram shortcut against the explicit N×N form.
Every function computes in the dtype it is given (callers pass fp32, tests pass float64).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


# --------------------------------------------------------------------------------------------
# Boundary (§2.3, §3): IRNet path offsets and the line-max pairwise boundary
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def irnet_paths(radius: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """IRNet's half-neighbourhood offsets and, for each, the pixels on its path.

    Offsets: (0, dx) for dx in 1..r-1, then (dy, dx) for dy in 1..r-1, |dx| <= r-1 with
    dx² + dy² < r², so every unordered pair appears once (K = 34 for r = 5, 152 for r = 10).
    A path holds every integer point of the offset's bounding box whose perpendicular distance to
    the segment's line is < 1, both endpoints included. Returned as one tuple of (y, x) points
    per offset, the offset itself last.
    """
    if radius < 2:
        raise ValueError(f"boundary radius must be >= 2, got {radius}")
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius)
                if dx * dx + dy * dy < radius * radius]
    paths = []
    for dy, dx in offsets:
        length_sq = dy * dy + dx * dx
        points = [(y, x) for y in range(min(0, dy), max(0, dy) + 1)
                  for x in range(min(0, dx), max(0, dx) + 1)
                  if (dy * x - dx * y) ** 2 < length_sq]
        points.sort(key=lambda p: (abs(p[0]) + abs(p[1]), p))
        paths.append(tuple(points))
    return tuple(paths)


@lru_cache(maxsize=None)
def _path_index(radius: int) -> tuple[tuple[tuple[int, int], ...], Tensor]:
    """Unique path points and a (K, L_max) index into them (short paths repeat their origin)."""
    paths = irnet_paths(radius)
    points = sorted({p for path in paths for p in path})
    where = {p: i for i, p in enumerate(points)}
    longest = max(len(path) for path in paths)
    index = [[where[p] for p in path] + [where[path[0]]] * (longest - len(path)) for path in paths]
    return tuple(points), torch.tensor(index, dtype=torch.long)


def _pair_layout(x: Tensor, radius: int, pairs: str, fill: float) -> tuple[Tensor, int, int]:
    """The map padded for ``pairs='pad'`` (with ``fill`` on the left, right and bottom), and the
    H'', W'' of the source pixels whose every pair partner lies inside it."""
    r1 = radius - 1
    if pairs == "pad":
        x = F.pad(x, (r1, r1, 0, r1), value=fill)
    elif pairs != "crop":
        raise ValueError(f"pairs must be 'crop' or 'pad', got '{pairs}'")
    height, width = x.shape[-2] - r1, x.shape[-1] - 2 * r1
    if height < 1 or width < 1:
        raise ValueError(f"a {x.shape[-2]}x{x.shape[-1]} feature map is too small for boundary "
                         f"radius {radius}; lower the radius or use pairs='pad'")
    return x, height, width


def pairwise_boundary(b: Tensor, radius: int, pairs: str = "crop") -> Tensor:
    """B_ij = max over the path from i to j of the boundary map ``b`` (B, 1, H, W) -> (B, K, H'', W'').

    ``pairs='crop'`` keeps the source pixels whose every path lies inside the map (IRNet's
    training layout: H'' = H − (r−1), W'' = W − 2(r−1)); ``'pad'`` pads the map with boundary
    value 1 on the left, right and bottom (IRNet's inference layout) and keeps H'' × W'' = H × W.
    """
    b, height, width = _pair_layout(b, radius, pairs, fill=1.0)
    r1 = radius - 1
    points, index = _path_index(radius)
    shifted = torch.cat([b[:, :, y:y + height, r1 + x:r1 + x + width] for y, x in points], dim=1)
    gathered = shifted[:, index.to(b.device)]  # (B, K, L, H'', W'')
    return gathered.amax(dim=2)


def _pair_ends(x: Tensor, radius: int, pairs: str, fill: float):
    """Per IRNet offset, the (source, partner) views of the map ``x`` in the pair layout."""
    x, height, width = _pair_layout(x, radius, pairs, fill)
    r1 = radius - 1
    source = x[:, :, :height, r1:r1 + width]
    for path in irnet_paths(radius):
        dy, dx = path[-1]
        yield source, x[:, :, dy:dy + height, r1 + dx:r1 + dx + width]


def pairwise_affinity_boundary(p: Tensor, radius: int, pairs: str = "crop") -> Tensor:
    """B_ij = 1 − p_i·p_j for IRNet's offsets: (B, C, H, W) class posteriors -> (B, K, H'', W'').

    The probability that pixels i and j belong to different classes: AffinityNet's pair
    boundary ("1 if the two pixels belong to different classes, 0 if they share one", method.md
    §2.3), soft. Same offsets and layout as :func:`pairwise_boundary` ('pad' pads with zero
    posteriors, i.e. boundary 1 outside the map).
    """
    return torch.stack([1.0 - (i * j).sum(1) for i, j in _pair_ends(p, radius, pairs, 0.0)],
                       dim=1)


def pairwise_class_change(labels: Tensor, radius: int, pairs: str = "crop") -> Tensor:
    """1 where a pair's two pixels carry different labels, else 0: (B, 1, H, W) integer class
    maps -> (B, K, H'', W''), the hard case of :func:`pairwise_affinity_boundary` (one-hot
    posteriors) at one comparison per offset ('pad': outside the map counts as a change)."""
    return torch.cat([i != j for i, j in _pair_ends(labels.float(), radius, pairs, -1.0)],
                     dim=1).float()


# --------------------------------------------------------------------------------------------
# Context (§2.5): C-KL (row-softmax self-relation, chunked) and C-MSE (Gram shortcut)
# --------------------------------------------------------------------------------------------

def _relation_kl_rows(xs_rows: Tensor, xt_rows: Tensor, xs: Tensor, xt: Tensor,
                      scale_s: Tensor, scale_t: Tensor) -> Tensor:
    """Σ over the given rows of KL(softmax(x_t,i·X_tᵀ·scale_t) ‖ softmax(x_s,i·X_sᵀ·scale_s))."""
    log_ps = F.log_softmax(xs_rows @ xs.transpose(1, 2) * scale_s, dim=-1)
    log_pt = F.log_softmax(xt_rows @ xt.transpose(1, 2) * scale_t, dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum()


def context_kl(xs: Tensor, xt: Tensor, tau: float | Tensor, chunk: int = 0,
               detach_teacher: bool = True) -> Tensor:
    """C-KL: τ²/(B·N) Σ_b Σ_i KL(R^T_bi ‖ R^S_bi), R = softmax_row(X Xᵀ / (√C·τ)).

    ``xs`` (B, N, C_s) and ``xt`` (B, N, C_t) are pixel embeddings (each side scaled by its own √C).
    ``chunk`` > 0 processes that many rows at a time under activation checkpointing: exact, with
    O(B·chunk·N) memory instead of O(B·N²), at the cost of recomputing each block in backward.
    ``detach_teacher=False`` also differentiates through ``xt`` (trained teacher adapters).
    """
    xt = xt.detach() if detach_teacher else xt
    n = xs.shape[1]
    scale_s = xs.new_tensor(1.0) / (xs.shape[-1] ** 0.5 * tau)
    scale_t = xt.new_tensor(1.0) / (xt.shape[-1] ** 0.5 * tau)
    if chunk <= 0 or chunk >= n:
        total = _relation_kl_rows(xs, xt, xs, xt, scale_s, scale_t)
    else:
        total = xs.new_zeros(())
        for i in range(0, n, chunk):
            total = total + checkpoint(_relation_kl_rows, xs[:, i:i + chunk], xt[:, i:i + chunk],
                                       xs, xt, scale_s, scale_t, use_reentrant=False)
    return total / (xs.shape[0] * n) * tau * tau


def context_mse(xs: Tensor, xt: Tensor, gram: bool = True, detach_teacher: bool = True) -> Tensor:
    """C-MSE: 1/(B·N²) Σ_b ‖R^T_b − R^S_b‖²_F with R = X Xᵀ / C (each side by its own C).

    With ``gram`` the N×N matrices are never formed:
    ‖A Aᵀ/c_a − B Bᵀ/c_b‖²_F = ‖AᵀA‖²/c_a² − 2‖AᵀB‖²/(c_a·c_b) + ‖BᵀB‖²/c_b², all C×C products,
    so time is O(N·C²) and memory O(C²). Without it, the explicit form (for tests and tiny N).
    ``detach_teacher=False`` also differentiates through ``xt`` (trained teacher adapters).
    """
    xt = xt.detach() if detach_teacher else xt
    b, n = xs.shape[:2]
    cs, ct = xs.shape[-1], xt.shape[-1]
    if not gram:
        rs = xs @ xs.transpose(1, 2) / cs
        rt = xt @ xt.transpose(1, 2) / ct
        return (rt - rs).pow(2).sum() / (b * n * n)
    tt = (xt.transpose(1, 2) @ xt).pow(2).sum() / (ct * ct)
    ts = (xt.transpose(1, 2) @ xs).pow(2).sum() / (ct * cs)
    ss = (xs.transpose(1, 2) @ xs).pow(2).sum() / (cs * cs)
    return (tt - 2 * ts + ss) / (b * n * n)
