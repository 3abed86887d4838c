"""BCKD: boundary and context knowledge distillation (arXiv 2401.13174), method.md §2.

The paper's equations are lost; this follows the specification in method.md, and every choice it
marks [RECON] is a named option here with the spec's default:

* ``channels`` (C = 256), ``feature_stride`` (8; 4 is the alternative): the concatenated
  hierarchical features, each backbone stage through a 3×3 conv to C/4 channels + BN + ReLU,
  resized bilinearly to 1/``feature_stride`` of the input and concatenated (§2.1);
* ``radius`` (0: 5 at stride 8, 10 at stride 4, shrunk when the map is narrower than the
  neighbourhood, e.g. 64-px inputs), ``pairs`` ('crop' | 'pad'), ``teacher_boundary``
  ('auto', the default: 'fitted' for segmentation with frozen teacher adapters, else 'soft' |
  'soft' sigmoid of the frozen conv | 'hard' binarised at 0.5 | 'fitted': the teacher's C→1
  conv trained by IRNet's pair loss on the teacher's own classes, the student matching it, so
  B^T is the paper's "explicit object-level boundary" | 'semantic': the teacher's pair boundary
  is 1 − p_i·p_j of its class posteriors, AffinityNet's "different classes" boundary, soft):
  the IRNet line-max pairwise boundary from a 1×1 conv C→1 + sigmoid, compared by a τ-scaled
  spatial-softmax KL per offset (§2.3–2.4, §3). 'fitted' beat 'soft' on each of 5 seeds, on
  validation and held-out (docs/distillation.md); detectors have no class map per pixel, so
  'auto' gives them 'soft';
* ``context`` ('kl': row-softmax self-relation with a row KL, SERE-style; 'mse': Gram relation
  X Xᵀ/C with an MSE and the exact C×C shortcut), ``context_chunk`` (rows per block of the exact
  chunked C-KL; 0 = automatic, blocks of at most 2²² relation entries, 16 MiB in fp32); the student's features pass through the aligner A (1×1 conv +
  BN + ReLU) first (§2.5);
* ``boundary_weight`` λ1 = 10, ``context_weight`` λ2 = 5 (the paper's 50 in its own, unknown
  normalisation; with this module's per-row C-KL, 50 made the context term ~25× the
  cross-entropy and the student fell below the no-KD one, while 5 beat it: see the README's
  distillation benchmark), and ``decay`` of both terms by
  r(t) = 1 − (t−1)/t_max per epoch ('epoch'), 1 − iter/max_iter ('iter') or not at all ('none')
  (§2.6);
* ``tau_init`` 1, ``tau_factor`` 1.05, ``tau_bound`` 0.5, ``adapt_tau``: one temperature per
  term, multiplied by the factor after a training step whose teacher softmax inputs (divided by
  the current τ) span more than the bound (§2.7). The temperatures are buffers, so they are saved
  in the training state and restored on resume;
* ``embed_norm`` ('l2' | 'none'): each pixel embedding entering the self-relation is rescaled to
  norm √C (what unit-variance channels give), so relation logits stay within ±√C/τ and the
  C-MSE relation within ±1. Without it the un-normalised adapters let the student grow its
  embeddings to sharpen its relation, and C-KL diverged to NaN within 20 iterations at the
  default learning rate (measured); 'l2' is the default;
* ``adapter_norm`` ('none' | 'bn'): whether the adapters (stage convs, aligner A) carry BatchNorm.
  The spec's units are conv + BN + ReLU, but a normalisation layer makes both terms invariant to
  the scale of the student's backbone features, so every SGD step along the (orthogonal)
  gradient inflates them: with 'bn', C-KL drove the default student's C5 activations from ~6 to
  ~5000 within one epoch, which broke fp32 ONNX parity and would ruin INT8 ranges. 'none'
  (conv + bias + ReLU) keeps them at their supervised scale, so it is the default;
* ``teacher_adapters`` ('frozen' at a fixed-seed random init, the spec's recommendation;
  'trained' like MMRazor connectors, which admits the collapse of §2.9; 'free': no teacher-side
  parameters, raw resized stage features and their channel mean as the boundary logit).

Normalisation: L_bd is τ²/(B·K) Σ KL over spatial softmaxes (a mean per image and offset), L_cd
is τ²/(B·N) Σ_i KL(R^T_i ‖ R^S_i) (a mean per pixel row) or 1/(B·N²)‖R^T − R^S‖²_F (a mean per
pair); the returned value is r(t)·(λ1·L_bd + λ2·L_cd), computed in fp32 (float64 stays float64).
All adapters belong to this module: they are trained with the student and never saved with it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.base import DETECT_LOSSES, LOSSES, DistillInputs, LossContext
from distill.losses.bckd_ops import (context_kl, context_mse, pairwise_affinity_boundary,
                                     pairwise_boundary, pairwise_class_change)
from distill.losses.cwd import channel_wise_kl
from distill.losses.functional import as_float, check_choice, full_precision

TEACHER_ADAPTERS = ("frozen", "trained", "free")
TEACHER_BOUNDARIES = ("auto", "soft", "hard", "semantic", "fitted")
CHUNK_ELEMENTS = 1 << 22  # relation entries per C-KL block when context_chunk is automatic


def conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int, norm: str) -> nn.Sequential:
    """An adapter unit: conv, then BatchNorm (batch statistics, no running buffers: adapters only
    run in training) when ``norm == 'bn'``, then ReLU."""
    if norm == "bn":
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels, track_running_stats=False), nn.ReLU(inplace=True))
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size,
                                   padding=kernel_size // 2), nn.ReLU(inplace=True))


class StageFusion(nn.Module):
    """Per-stage 3×3 conv (c_l → C/4) (+ BN) + ReLU and a bilinear resize to one size, concatenated.

    A stage larger than the target is resized *before* its conv and a smaller one after, so every
    conv runs at the smaller of the two resolutions (the paper only says "convolution and
    up-/down-sampling"; this order keeps the stride-4 stage from dominating the adapters' cost).
    """

    def __init__(self, in_channels: tuple[int, ...], channels: int, norm: str = "none") -> None:
        super().__init__()
        per_stage = channels // len(in_channels)
        self.convs = nn.ModuleList(conv_norm_relu(c, per_stage, 3, norm) for c in in_channels)

    def forward(self, stages: list[Tensor], size: tuple[int, int]) -> Tensor:
        out = []
        for conv, x in zip(self.convs, stages):
            if x.shape[-2] * x.shape[-1] > size[0] * size[1]:
                out.append(conv(_resize(x, size)))
            else:
                out.append(_resize(conv(x), size))
        return torch.cat(out, dim=1)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class TeacherSide(nn.Module):
    """The teacher's F^T and boundary logit; frozen, trained or parameter-free (§2.9)."""

    def __init__(self, in_channels: tuple[int, ...], channels: int, mode: str, seed: int,
                 norm: str = "none") -> None:
        super().__init__()
        self.mode = mode
        if mode == "free":
            self.fusion, self.edge = None, None
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the same frozen projection in every run and process
            self.fusion = StageFusion(in_channels, channels, norm)
            self.edge = nn.Conv2d(channels, 1, 1)
        self.requires_grad_(mode == "trained")

    def forward(self, stages: list[Tensor], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        if self.fusion is None:
            feats = torch.cat([_resize(x, size) for x in stages], dim=1)
            return feats, feats.mean(dim=1, keepdim=True)
        feats = self.fusion(stages, size)
        return feats, self.edge(feats)


class AdaptiveTemperature(nn.Module):
    """τ as a buffer, raised by ``factor`` when the teacher's softmax inputs span > ``bound``."""

    def __init__(self, init: float, factor: float, bound: float, adapt: bool) -> None:
        super().__init__()
        if init <= 0 or factor < 1 or bound <= 0:
            raise ValueError(f"temperature needs tau_init > 0, tau_factor >= 1 and tau_bound > 0 "
                             f"(got {init}, {factor}, {bound})")
        self.register_buffer("tau", torch.tensor(float(init), dtype=torch.float64))
        self.factor, self.bound, self.adapt = factor, bound, adapt

    @property
    def value(self) -> float:
        return float(self.tau)

    @torch.no_grad()
    def update(self, teacher_inputs: Tensor) -> None:
        """One step of the range rule on the teacher's logits (before division by τ)."""
        if not (self.adapt and self.training):
            return
        span = (teacher_inputs.max() - teacher_inputs.min()).double() / self.tau
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(span, op=torch.distributed.ReduceOp.MAX)
        if span > self.bound:
            self.tau.mul_(self.factor)


# The same loss serves detectors, on their backbone stages (distill.losses.det_kd documents
# what carries over to them).
@DETECT_LOSSES.register("bckd")
@LOSSES.register("bckd")
class BCKDLoss(nn.Module):
    """r(t)·(λ1·L_bd + λ2·L_cd) on the concatenated backbone features; see the module docstring."""

    default_weight = 1.0
    needs_features = True

    def __init__(self, *, ctx: LossContext, channels: int = 256, feature_stride: int = 8,
                 radius: int = 0, pairs: str = "crop", teacher_boundary: str = "auto",
                 context: str = "kl", context_chunk: int = 0, boundary_weight: float = 10.0,
                 context_weight: float = 5.0, decay: str = "epoch", tau_init: float = 1.0,
                 tau_factor: float = 1.05, tau_bound: float = 0.5, adapt_tau: bool = True,
                 teacher_adapters: str = "frozen", adapter_norm: str = "none",
                 embed_norm: str = "l2", seed: int = 0) -> None:
        super().__init__()
        check_choice("context", context, ("kl", "mse"), "bckd")
        check_choice("decay", decay, ("epoch", "iter", "none"), "bckd")
        check_choice("teacher_adapters", teacher_adapters, TEACHER_ADAPTERS, "bckd")
        check_choice("teacher_boundary", teacher_boundary, TEACHER_BOUNDARIES, "bckd")
        if teacher_boundary == "auto":  # 'fitted' needs per-pixel classes and a frozen F^T
            segmentation = not ctx.student_fpn_channels
            teacher_boundary = ("fitted" if segmentation and teacher_adapters == "frozen"
                                else "soft")
        if teacher_boundary == "fitted" and teacher_adapters != "frozen":
            raise ValueError("teacher_boundary 'fitted' trains the teacher's boundary conv on "
                             "frozen teacher adapters: use teacher_adapters 'frozen' with it")
        check_choice("pairs", pairs, ("crop", "pad"), "bckd")
        check_choice("adapter_norm", adapter_norm, ("none", "bn"), "bckd")
        check_choice("embed_norm", embed_norm, ("l2", "none"), "bckd")
        self.embed_norm = embed_norm
        if feature_stride not in (4, 8, 16, 32):
            raise ValueError(f"feature_stride must be 4, 8, 16 or 32, got {feature_stride}")
        if channels < 4 or channels % 4:
            raise ValueError(f"channels must be a positive multiple of 4, got {channels}")
        self.feature_stride, self.pairs = feature_stride, pairs
        self.radius = radius
        self.teacher_boundary, self.context, self.chunk = teacher_boundary, context, context_chunk
        self.boundary_weight, self.context_weight, self.decay = boundary_weight, context_weight, decay
        self.student_fusion = StageFusion(ctx.student_channels, channels, adapter_norm)
        self.student_edge = nn.Conv2d(channels, 1, 1)
        self.align = conv_norm_relu(channels, channels, 1, adapter_norm)
        self.teacher_side = TeacherSide(ctx.teacher_channels, channels, teacher_adapters, seed,
                                        adapter_norm)
        if teacher_boundary == "fitted":  # only the C→1 boundary conv learns, from the fit loss
            self.teacher_side.edge.requires_grad_(True)
        self.tau_bd = AdaptiveTemperature(tau_init, tau_factor, tau_bound, adapt_tau)
        self.tau_cd = AdaptiveTemperature(tau_init, tau_factor, tau_bound,
                                          adapt_tau and context == "kl")
        self.last_terms: dict[str, float] = {}
        self.last_parts: dict[str, Tensor] = {}

    def decay_factor(self, inputs: DistillInputs) -> float:
        """r(t): 1 − (t−1)/t_max with the 1-indexed epoch t = epoch + 1 (or per iteration)."""
        if self.decay == "epoch":
            return max(1.0 - inputs.epoch / max(inputs.epochs, 1), 0.0)
        if self.decay == "iter":
            return max(1.0 - inputs.progress, 0.0)
        return 1.0

    def features(self, inputs: DistillInputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """F^S, F^T and the boundary logits of both at 1/feature_stride of the input."""
        h, w = self.input_size(inputs)
        size = (-(-h // self.feature_stride), -(-w // self.feature_stride))
        fs = self.student_fusion(inputs.student_feats, size)
        # grad where teacher-side parameters learn: all of them ('trained'), or the boundary conv
        # alone ('fitted': the frozen fusion records no graph, so F^T stays a constant)
        learns = self.teacher_side.mode == "trained" or self.teacher_boundary == "fitted"
        with torch.set_grad_enabled(learns and torch.is_grad_enabled()):
            ft, edge_t = self.teacher_side([t.detach() for t in inputs.teacher_feats], size)
        return fs, ft, self.student_edge(fs), edge_t

    @staticmethod
    def input_size(inputs: DistillInputs) -> tuple[int, int]:
        """(H, W) of the network input: ``inputs.input_size`` when set (detectors, whose logits
        are per prior), else the spatial size of the (B, K, H, W) segmentation logits."""
        if inputs.input_size is not None:
            return int(inputs.input_size[0]), int(inputs.input_size[1])
        if inputs.student_logits.ndim != 4:
            raise ValueError(f"bckd needs the input size: set DistillInputs.input_size for logits "
                             f"of shape {tuple(inputs.student_logits.shape)}")
        h, w = inputs.student_logits.shape[-2:]
        return int(h), int(w)

    @property
    def _detach_teacher(self) -> bool:
        """Trained teacher adapters learn from both terms; otherwise the teacher side is a target."""
        return self.teacher_side.mode != "trained"

    def pair_radius(self, height: int, width: int) -> int:
        """The set radius, or the spec's (5 at stride 8, 10 at stride 4) shrunk to fit the map."""
        if self.radius:
            return self.radius
        default = 10 if self.feature_stride <= 4 else 5
        if self.pairs == "pad":
            return default
        return max(2, min(default, height, (width - 1) // 2 + 1))

    def boundary_loss(self, edge_s: Tensor, edge_t: Tensor,
                      pairs_t: Tensor | None = None) -> Tensor:
        """L_bd between the pairwise boundaries of the two boundary logit maps (``pairs_t``:
        B^T when already computed, as for the fit loss)."""
        radius = self.pair_radius(*edge_s.shape[-2:])
        with full_precision(edge_s):
            return self._boundary_kl(edge_s, edge_t, radius, pairs_t)

    def teacher_pairs(self, edge_t: Tensor, radius: int) -> Tensor:
        """B^T: the teacher's pair boundary from its boundary logits (class posteriors for
        'semantic'), graph attached where teacher-side parameters learn."""
        if self.teacher_boundary == "semantic":  # edge_t holds the teacher's class posteriors
            return pairwise_affinity_boundary(as_float(edge_t).detach(), radius, self.pairs)
        prob_t = torch.sigmoid(as_float(edge_t))
        if self.teacher_boundary == "hard":
            prob_t = (prob_t > 0.5).to(prob_t.dtype)
        return pairwise_boundary(prob_t, radius, self.pairs)

    def _boundary_kl(self, edge_s: Tensor, edge_t: Tensor, radius: int,
                     pairs_t: Tensor | None = None) -> Tensor:
        bs = pairwise_boundary(torch.sigmoid(as_float(edge_s)), radius, self.pairs)
        bt = self.teacher_pairs(edge_t, radius) if pairs_t is None else pairs_t
        if self.teacher_boundary == "fitted":  # a target: the fit loss trains the conv
            bt = bt.detach()
        self.tau_bd.update(bt)
        # L_bd is CWD's spatial-softmax KL with each offset as a channel (method.md §2.4)
        return channel_wise_kl(bs, bt, self.tau_bd.tau.to(bs.dtype), self._detach_teacher)

    def context_loss(self, fs: Tensor, ft: Tensor) -> Tensor:
        """L_cd between the self-relations of A(F^S) and F^T."""
        xs = as_float(self.align(fs)).flatten(2).transpose(1, 2)
        xt = as_float(ft).flatten(2).transpose(1, 2)
        with full_precision(xs):
            if self.embed_norm == "l2":
                xs, xt = _rescale(xs), _rescale(xt)
            return self._relation_loss(xs, xt)

    def _relation_loss(self, xs: Tensor, xt: Tensor) -> Tensor:
        if self.context == "mse":
            return context_mse(xs, xt, detach_teacher=self._detach_teacher)
        tau = self.tau_cd.tau.to(xs.dtype)
        b, n = xs.shape[:2]
        chunk = self.chunk or max(1, CHUNK_ELEMENTS // (b * n))
        loss = context_kl(xs, xt, tau, chunk, self._detach_teacher)
        self.tau_cd.update(_relation_range_sample(xt))
        return loss

    def forward(self, inputs: DistillInputs) -> Tensor:
        fs, ft, edge_s, edge_t = self.features(inputs)
        if self.teacher_boundary == "semantic":  # the teacher's class posteriors at F's size
            edge_t = _posteriors(inputs.teacher_logits, edge_s.shape[-2:])
        l_fit = pairs_t = None
        if self.teacher_boundary == "fitted" and self.boundary_weight:  # B^T once, for both
            l_fit, pairs_t = self.boundary_fit(edge_t, inputs.teacher_logits)
        l_bd = (self.boundary_loss(edge_s, edge_t, pairs_t) if self.boundary_weight
                else fs.new_zeros(()))
        l_cd = self.context_loss(fs, ft) if self.context_weight else fs.new_zeros(())
        r = self.decay_factor(inputs)
        self.last_terms = {"boundary": float(l_bd.detach()), "context": float(l_cd.detach()),
                           "decay": r}
        if l_fit is not None:  # teacher-side parameters only, so not decayed and not weighted
            self.last_terms["boundary_fit"] = float(l_fit.detach())
        # the applied parts, graph attached, for the trainer's gradient probe
        self.last_parts = {"boundary": r * self.boundary_weight * as_float(l_bd),
                           "context": r * self.context_weight * as_float(l_cd)}
        total = r * (self.boundary_weight * as_float(l_bd) + self.context_weight * as_float(l_cd))
        return total if l_fit is None else total + l_fit

    def boundary_fit(self, edge_t: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """IRNet's pair loss fitting the teacher's boundary conv to the teacher's own classes,
        and the B^T it scored (graph attached), which L_bd reuses detached.

        The pair labels are the teacher's argmax classes at F's size (area-averaged posteriors):
        a pair is negative ("boundary") when its two pixels differ. IRNet's loss on the pair
        boundary B^T_ij (path max of the sigmoid map): −log(1 − B) on same-class pairs and
        −log B on different-class pairs, the two means weighted ½ each (IRNet further splits the
        same-class pairs into foreground and background; here the classes are not split). Only
        the conv learns from it: F^T is detached.
        """
        radius = self.pair_radius(*edge_t.shape[-2:])
        with full_precision(edge_t):
            different = self.different_classes(teacher_logits, edge_t.shape[-2:], radius)
            pairs_t = self.teacher_pairs(edge_t, radius)
            return balanced_pair_bce(pairs_t, different), pairs_t

    def different_classes(self, teacher_logits: Tensor, size: tuple[int, int],
                          radius: int) -> Tensor:
        """1 where a pair's two pixels have different teacher argmax classes at ``size``, else 0,
        in the pair layout of :meth:`teacher_pairs`."""
        labels = _posteriors(teacher_logits, size).argmax(1, keepdim=True)
        return pairwise_class_change(labels, radius, self.pairs)

    def log_scalars(self) -> dict[str, Any]:
        """Unweighted terms, r(t) and both temperatures, for TensorBoard."""
        return {**self.last_terms, "tau_boundary": self.tau_bd.value,
                "tau_context": self.tau_cd.value}


def balanced_pair_bce(boundary: Tensor, different: Tensor, eps: float = 1e-5) -> Tensor:
    """½·mean(−log(1 − B)) over same-class pairs + ½·mean(−log B) over different-class pairs
    (a class with no pair in the batch contributes 0)."""
    neg = different > 0.5
    pos_loss = -torch.log(1.0 - boundary + eps)
    neg_loss = -torch.log(boundary + eps)
    zero = boundary.new_zeros(())
    pos = pos_loss[~neg].mean() if (~neg).any() else zero
    negm = neg_loss[neg].mean() if neg.any() else zero
    return 0.5 * (pos + negm)


def _posteriors(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Softmax class posteriors of (B, K, H, W) segmentation logits, area-averaged to ``size``."""
    if logits.ndim != 4:
        raise ValueError("teacher_boundary 'semantic' and 'fitted' need (B, K, H, W) "
                         "segmentation logits; "
                         f"got {tuple(logits.shape)} (detectors: use 'soft' or 'hard')")
    p = torch.softmax(as_float(logits).detach(), dim=1)
    return F.adaptive_avg_pool2d(p, tuple(int(v) for v in size))


def _rescale(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Each pixel embedding (last axis) rescaled to norm √C, the norm of unit-variance channels."""
    return x * (x.shape[-1] ** 0.5 / (x.norm(dim=-1, keepdim=True) + eps))


def _relation_range_sample(xt: Tensor, rows: int = 256) -> Tensor:
    """The extremes of the teacher's relation logits X Xᵀ/√C, for the τ range rule.

    The maximum is exact without the N×N matrix: x_i·x_j ≤ ‖x_i‖‖x_j‖ ≤ max‖x‖², attained at
    i = j. The minimum comes from a strided subset of ``rows`` rows against all columns, which
    bounds the cost (the range is then at most slightly under-estimated).
    """
    step = max(1, xt.shape[1] // rows)
    low = (xt[:, ::step] @ xt.transpose(1, 2)).amin()
    high = xt.pow(2).sum(-1).amax()
    return torch.stack([low, high]) / xt.shape[-1] ** 0.5
