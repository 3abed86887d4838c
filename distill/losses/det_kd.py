"""Distillation losses for detectors (tasks 'detect' and 'instance'), registered in DETECT_LOSSES.

What a detector hands a loss (:class:`~distill.losses.base.DistillInputs`): ``*_logits`` are the
per-prior classification logits [B, N, C] before the sigmoid; the teacher has the same N because
both detectors share one prior layout (same strides, same anchors per location), and a mismatch
is a ValueError. ``*_feats`` are the 4 backbone stages C2..C5 (strides 4..32), ``*_fpn`` the FPN
levels (equal count and sizes; channels ``LossContext.student_fpn_channels`` /
``teacher_fpn_channels``), ``*_reg`` the GFL distribution logits [B, N, 4, reg_max + 1] (None for
RetinaNet), ``priors`` [N, 4], ``strides`` [N], ``det_targets`` the ground truth and
``input_size`` (H, W). Teacher tensors are detached here whatever the caller did; every loss
computes in fp32 with autocast off (fp64 stays fp64), so bf16 autocast changes nothing but its
inputs. Trainable adapters belong to the loss and are trained with the student.

* ``kd``: logit KD for sigmoid heads, CrossKD's KDQFL form (the GFL student's own QFL with the
  teacher's scores as soft labels), β = 0 giving plain binary KL; τ², summed over priors and
  classes and divided by the teacher's soft foreground count (:class:`SigmoidKD`).
* ``cwd``: channel-wise distillation on every FPN level (:class:`FpnChannelWiseKD`).
* ``pkd``: PKD, per-channel standardisation then MSE on every FPN level (:class:`FpnPKD`).
* ``ld``: localisation distillation of the GFL distributions on the teacher's main localisation
  region (:class:`LocalizationKD`); needs a GFL head.
* ``bckd``: :class:`~distill.losses.bckd.BCKDLoss` itself, on the backbone stages.

BCKD on detectors. The paper (arXiv 2401.13174, Table V) applies BCKD to GFL, RetinaNet and
Cascade Mask R-CNN "following" CrossKD and structured KD, with "the hierarchical features
extracted from the backbone", λ1 = 10, λ2 = 50 "as in segmentation", and no FPN or head term
(detection.md §4). So the registry entry is the segmentation class, unchanged:

* carried over from method.md §2 unchanged: the 4 backbone stages C2..C5 (not the FPN), each
  through a 3×3 conv to C/4 = 64 channels + ReLU and resized bilinearly to 1/8 of the input
  (r_s = 8), concatenated (§2.1); the IRNet line-max boundary with radius 5 and the spatial-softmax
  KL L_bd (§2.3–2.4); the SERE-style row-KL context term L_cd with the aligner A (§2.5);
  r(t) = 1 − (t−1)/t_max per epoch (detection schedules are epoch based: 1× = 12 epochs), the
  τ range rule (§2.6–2.7); frozen fixed-seed teacher adapters, no BN in the adapters, embeddings
  rescaled to norm √C (the repo's segmentation defaults, for the same reasons); the weights
  λ1 = 10, λ2 = 5 (the repo's calibration of the paper's 50 for this per-row C-KL, which the
  paper says carries over from segmentation). L_task is the detector's own loss (QFL + DFL +
  GIoU, or focal + L1), never decayed.
* new for detectors: the fusion size comes from ``inputs.input_size`` (the logits are per prior
  now), ⌈H/8⌉ × ⌈W/8⌉. Detection backbones are not dilated, so C4 and C5 arrive at strides 16
  and 32 (the segmentation backbones keep stride 8); their 3×3 convs run at their own resolution
  and are upsampled 2× and 4× afterwards, while C2 is downsampled before its conv (the fusion's
  "conv at the smaller size" rule). 128×128 inputs give a 16×16 fused map (N = 256, C5 is 4×4),
  256×320 give 32×40 (N = 1280), COCO's 800×1333 about 100×167 (N ≈ 16.7k: the automatic
  ``context_chunk`` keeps each C-KL block at 16 MiB). Radius 5 needs a map of ≥ 5 × 9 (inputs
  larger than 32 × 64 px); smaller maps shrink it, as in segmentation. The paper's detection schedule
  (AdamW, layer-wise decay, drop path) is stripped, so the trainer's optimiser settings apply.
  Head-level terms are not part of the paper; ``bckd+ld`` or ``bckd+kd`` adds them through '+'.
* the built-in detect run (``runtime.config.DETECT_BCKD``) overrides two of these defaults, chosen
  over 3 seeds among 9 variants and read on a held-out split (docs/detection.md): the
  parameter-free teacher side (``teacher_adapters: free``, method.md §2.9 option 2) and
  λ1 = 2, λ2 = 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.base import DETECT_LOSSES, DistillInputs, LossContext
from distill.losses.cwd import channel_wise_kl
from distill.losses.functional import (as_float, check_choice, check_non_negative, check_positive,
                                       full_precision)

GFL_HINT = "ld needs a GFL head"


# --------------------------------------------------------------------------------------------
# Input checks shared by the detection losses
# --------------------------------------------------------------------------------------------

def prior_logits(inputs: DistillInputs, method: str) -> tuple[Tensor, Tensor]:
    """The per-prior classification logits (B, N, C) of both models, checked to match."""
    s, t = inputs.student_logits, inputs.teacher_logits
    if s.ndim != 3 or t.ndim != 3:
        raise ValueError(f"{method}: detector logits must be per-prior [B, N, C]; got student "
                         f"{tuple(s.shape)} and teacher {tuple(t.shape)}")
    if s.shape != t.shape:
        raise ValueError(f"{method}: student logits {tuple(s.shape)} and teacher logits "
                         f"{tuple(t.shape)} differ; both detectors must use the same prior layout "
                         f"(same strides and anchors per location) and the same classes")
    if inputs.priors is not None and inputs.priors.shape[0] != s.shape[1]:
        raise ValueError(f"{method}: {s.shape[1]} priors in the logits but "
                         f"{inputs.priors.shape[0]} in inputs.priors")
    return s, t


def fpn_levels(inputs: DistillInputs, method: str) -> list[tuple[Tensor, Tensor]]:
    """(student, teacher) FPN level pairs, checked for equal count and spatial size."""
    s, t = inputs.student_fpn, inputs.teacher_fpn
    if not s or not t:
        raise ValueError(f"{method} needs the FPN levels of both models; the inputs have "
                         f"{len(s)} student and {len(t)} teacher levels")
    if len(s) != len(t):
        raise ValueError(f"{method}: the student has {len(s)} FPN levels and the teacher {len(t)}; "
                         f"both must have the same levels")
    for i, (a, b) in enumerate(zip(s, t)):
        if a.ndim != 4 or b.ndim != 4 or a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
            raise ValueError(f"{method}: FPN level {i} is {tuple(a.shape)} in the student and "
                             f"{tuple(b.shape)} in the teacher; batch and spatial size must match")
    return list(zip(s, t))


class FpnAdapter(nn.Module):
    """A 1×1 conv (no bias) mapping student FPN channels to the teacher's, when they differ.

    One adapter for all levels: the FPN levels share one channel space (a detector's head is
    shared across levels), and the level count is not known when the loss is built. No bias:
    both CWD's spatial softmax and PKD's standardisation cancel a per-channel constant.
    """

    def __init__(self, ctx: LossContext, method: str) -> None:
        super().__init__()
        self.method = method
        c_s, c_t = ctx.student_fpn_channels, ctx.teacher_fpn_channels
        self.channels = (c_s, c_t)
        self.conv = nn.Conv2d(c_s, c_t, 1, bias=False) if c_s and c_t and c_s != c_t else None

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        c_s, c_t = student.shape[1], teacher.shape[1]
        if self.conv is None and c_s == c_t:
            return student
        if self.conv is None or (c_s, c_t) != self.channels:
            raise ValueError(f"{self.method}: student FPN levels have {c_s} channels and the "
                             f"teacher's {c_t}, but the loss was built for {self.channels[0]} -> "
                             f"{self.channels[1]}; build it with a LossContext whose "
                             f"student_fpn_channels / teacher_fpn_channels are {c_s} / {c_t}")
        return self.conv(student)


# --------------------------------------------------------------------------------------------
# kd: sigmoid logit KD on the classification head
# --------------------------------------------------------------------------------------------

@DETECT_LOSSES.register("kd")
class SigmoidKD(nn.Module):
    """Logit KD for sigmoid classification heads, per prior and class (CrossKD's KDQFL form).

    With p_S = σ(z_S/τ) and p_T = σ(z_T/τ) per prior n and class c:

        ℓ = BCE(p_S; p_T) · |p_S − p_T|^β          (β > 0: QFL with the teacher's score as label)
        ℓ = KL(Bern(p_T) ‖ Bern(p_S))               (β = 0: Hinton's KD for a sigmoid head)
        L = τ² · Σ_{b,n,c} ℓ / Z

    β = 0 is the BCE less the teacher's entropy, which has no gradient, so agreement gives 0 in
    both forms. The default β = 1, τ = 1 and weight 1 are CrossKD's ``KDQualityFocalLoss`` (β = 1,
    w = 1; configs crosskd_r18_gflv1_r50 and the RetinaNet one, detection.md §4): it is the GFL
    student's own classification loss with soft labels, and its focal factor keeps the ~99 %
    easy background priors (both scores ≈ 0) from drowning the signal, while priors where the
    student fires against the teacher (false positives) keep their full weight.

    Normalisation (``normalize``): every prior counts, the sum runs over all B·N priors and C
    classes, and Z is
    * 'teacher' (default): the teacher's soft foreground count max(1, Σ_{b,n} max_c σ(z_T)), at
      τ = 1 and detached. CrossKD divides by the number of assigner positives (like QFL itself);
      this loss has no assigner, and a trained teacher's summed top score plays that role, so
      the value stays per object, independent of the input size and the prior count;
    * 'priors': B·N, a plain mean per prior (smaller by about N / #foreground priors).
    τ² is Hinton's convention (for β = 0 it keeps the gradient scale about τ-independent at
    high τ; the focal factor of β > 0 adds a further 1/τ^β).
    """

    default_weight = 1.0
    needs_features = False

    def __init__(self, *, tau: float = 1.0, beta: float = 1.0, normalize: str = "teacher") -> None:
        super().__init__()
        check_positive("tau", tau, "kd")
        check_non_negative("beta", beta, "kd")
        check_choice("normalize", normalize, ("teacher", "priors"), "kd")
        self.tau, self.beta, self.normalize = float(tau), float(beta), normalize

    def forward(self, inputs: DistillInputs) -> Tensor:
        student, teacher = prior_logits(inputs, "kd")
        with full_precision(student):
            return sigmoid_kd(as_float(student), as_float(teacher.detach()), self.tau, self.beta,
                              self.normalize)


def sigmoid_kd(student: Tensor, teacher: Tensor, tau: float, beta: float, normalize: str) -> Tensor:
    """The :class:`SigmoidKD` loss on (B, N, C) logits."""
    zs, zt = student / tau, teacher.detach() / tau
    pt = torch.sigmoid(zt)
    bce = F.binary_cross_entropy_with_logits(zs, pt, reduction="none")
    if beta == 0:
        elem = bce - F.binary_cross_entropy_with_logits(zt, pt, reduction="none")
    else:
        elem = bce * (torch.sigmoid(zs) - pt).abs().pow(beta)
    if normalize == "teacher":
        z = torch.sigmoid(teacher.detach()).amax(dim=-1).sum().clamp_min(1.0)
    else:
        z = student.shape[0] * student.shape[1]
    return elem.sum() * (tau * tau) / z


# --------------------------------------------------------------------------------------------
# cwd and pkd: FPN feature distillation
# --------------------------------------------------------------------------------------------

@DETECT_LOSSES.register("cwd")
class FpnChannelWiseKD(nn.Module):
    """Channel-wise distillation (Shu et al., ICCV 2021) on every FPN level.

    Per level l: L_l = τ²/(B·C) Σ_b Σ_c KL(softmax_hw(P^T_bc/τ) ‖ softmax_hw(A(P^S)_bc/τ)), the
    semantic ``cwd``'s spatial softmax per channel map. Normalisation: KL summed over positions,
    averaged over the B·C channel maps and then over the levels (so the value does not depend on
    the level count); τ² as in the official code. A is the shared 1×1 :class:`FpnAdapter` when
    the FPN channel counts differ, else identity.

    Reference config: MMRazor ``cwd_fpn_retina_r101_retina_r50_1x_coco`` (ChannelWiseDivergence
    on every ``neck`` output, loss_weight 10 per level, summed, τ = 1). τ defaults to 4, CWD's
    official dense-prediction temperature (TorchDistiller, method.md §4.2), whose τ² factor
    offsets the smaller gradients of the softer distributions (how close that brings the value
    to MMRazor's τ = 1 scale is not measured); the weight 30 is MMRazor's 10 per level times our
    3 levels (P3–P5), since this loss averages the levels instead of summing them.
    """

    default_weight = 30.0
    needs_features = True

    def __init__(self, ctx: LossContext, *, tau: float = 4.0) -> None:
        super().__init__()
        check_positive("tau", tau, "cwd")
        self.tau = float(tau)
        self.adapter = FpnAdapter(ctx, "cwd")

    def forward(self, inputs: DistillInputs) -> Tensor:
        levels = fpn_levels(inputs, "cwd")
        with full_precision(levels[0][0]):
            terms = [channel_wise_kl(self.adapter(as_float(s), t), as_float(t.detach()), self.tau)
                     for s, t in levels]
        return torch.stack(terms).mean()


@DETECT_LOSSES.register("pkd")
class FpnPKD(nn.Module):
    """PKD (Cao et al., NeurIPS 2022, arXiv 2207.02039) on every FPN level.

    Each channel map of each image is standardised over its h·w positions, x̂ = (x − μ)/√(σ² + ε)
    with the population variance and ε = 1e-6, for the teacher and the (adapted) student; then
    L_l = 1/(2·B·C·h·w) Σ (x̂_S − x̂_T)², which equals the mean over channel maps of 1 − r, r the
    Pearson correlation of the two maps (so the value lies in [0, 2]).

    Normalisation: a mean per element of each level (= per channel map of 1 − r), halved as in
    MMRazor, then averaged over the levels. No temperature, so no τ² factor.

    Reference config: MMRazor ``pkd_fpn_retina_x101_retina_r50_2x_coco`` (PKDLoss on 4 FPN
    levels, loss_weight 10 each, summed; its loss is MSE/2 as here). Differences, chosen:
    * standardisation per image rather than over the batch (MMRazor pools N·h·w): the value of
      one image does not depend on the others in its batch or on the batch size (DDP vs one GPU);
      a 1×1 level then carries no signal and contributes 0;
    * levels are averaged, so the default weight is MMRazor's 10 per level times our 3 levels;
    * a shared 1×1 :class:`FpnAdapter` when the channel counts differ (MMRazor's configs have
      256 on both sides; PKD's heterogeneous teachers are its use case).
    """

    default_weight = 30.0
    needs_features = True

    def __init__(self, ctx: LossContext, *, eps: float = 1e-6) -> None:
        super().__init__()
        check_positive("eps", eps, "pkd")
        self.eps = float(eps)
        self.adapter = FpnAdapter(ctx, "pkd")

    def forward(self, inputs: DistillInputs) -> Tensor:
        levels = fpn_levels(inputs, "pkd")
        with full_precision(levels[0][0]):
            terms = [pearson_mse(self.adapter(as_float(s), t), as_float(t.detach()), self.eps)
                     for s, t in levels]
        return torch.stack(terms).mean()


def standardize(x: Tensor, eps: float) -> Tensor:
    """Each (b, c) map of a (B, C, h, w) tensor at zero mean and unit (population) variance."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = x.var(dim=(2, 3), keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps)


def pearson_mse(student: Tensor, teacher: Tensor, eps: float = 1e-6) -> Tensor:
    """½·MSE of the standardised maps (= mean of 1 − Pearson r per map); see :class:`FpnPKD`."""
    if student.shape != teacher.shape:
        raise ValueError(f"pkd: student map {tuple(student.shape)} and teacher map "
                         f"{tuple(teacher.shape)} differ in shape")
    diff = standardize(student, eps) - standardize(teacher.detach(), eps)
    return diff.pow(2).mean() / 2


# --------------------------------------------------------------------------------------------
# ld: localisation distillation on the GFL distributions
# --------------------------------------------------------------------------------------------

@DETECT_LOSSES.register("ld")
class LocalizationKD(nn.Module):
    """LD (Zheng et al., CVPR 2022, arXiv 2102.12252): KL of the GFL box-side distributions.

    Per prior n and side k (left, top, right, bottom), with the reg_max + 1 bin logits r:

        KL_nk = KL(softmax(r^T_nk/τ) ‖ softmax(r^S_nk/τ)),   τ = 10
        L = τ² · Σ_n w_n · (1/4) Σ_k KL_nk / Σ_n w_n

    Region: LD distils the "main localisation region", the detector's positives. This loss has
    no assigner, so the region is the priors the teacher itself scores: w_n = max_c σ(z^T_nc)
    where that is ≥ ``score_threshold`` (default 0.3, above the background of a trained GFL,
    whose QFL scores estimate the IoU), else 0. Weighting by the score follows LD/GFL, which
    weight the DFL and LD terms of each positive by a score (the student's there; the teacher's
    here, since it says how reliable the target is). An empty region gives 0.

    Normalisation: a score-weighted mean over the region's priors and their 4 sides, exactly the
    GFL DFL's (sum weighted by the score, /4 per prior, divided by the summed score), so LD's
    ``loss_weight = 0.25`` (= DFL's) is the default weight. mmdet's LD sums over the positives
    without that division and averages over the bins instead of summing the KL; the two scales
    coincide when the summed scores equal reg_max + 1 (17), the order of a COCO batch of two
    images, so 0.25 is a starting point rather than an exact match.
    """

    default_weight = 0.25
    needs_features = True

    def __init__(self, ctx: LossContext, *, tau: float = 10.0,
                 score_threshold: float = 0.3) -> None:
        super().__init__()
        check_positive("tau", tau, "ld")
        if not 0.0 <= score_threshold < 1.0:
            raise ValueError(f"ld option 'score_threshold' must be in [0, 1), "
                             f"got {score_threshold!r}")
        if ctx.student_fpn_channels and not ctx.reg_max:
            raise ValueError(f"{GFL_HINT} (distribution regression, reg_max > 0); this student "
                             f"has none (RetinaNet regresses box deltas)")
        self.tau, self.score_threshold = float(tau), float(score_threshold)
        self.bins = ctx.reg_max + 1  # 1: unknown (a context without a detector), not checked

    def forward(self, inputs: DistillInputs) -> Tensor:
        _, teacher_logits = prior_logits(inputs, "ld")
        student, teacher = self._distributions(inputs, teacher_logits.shape[:2])
        with full_precision(student):
            score = torch.sigmoid(as_float(teacher_logits.detach())).amax(dim=-1)
            weight = score * (score >= self.score_threshold)
            return localization_kd(as_float(student), as_float(teacher.detach()), weight, self.tau)

    def _distributions(self, inputs: DistillInputs, priors: torch.Size) -> tuple[Tensor, Tensor]:
        s, t = inputs.student_reg, inputs.teacher_reg
        if s is None or t is None or s.ndim != 4 or t.ndim != 4:
            raise ValueError(f"{GFL_HINT}: the inputs carry no [B, N, 4, reg_max + 1] "
                             f"distributions (RetinaNet regresses box deltas)")
        if s.shape != t.shape or s.shape[:2] != priors or s.shape[2] != 4:
            raise ValueError(f"ld: student distributions {tuple(s.shape)} and teacher "
                             f"{tuple(t.shape)} must both be [B, N, 4, bins] with the logits' "
                             f"(B, N) = {tuple(priors)}")
        if self.bins > 1 and s.shape[3] != self.bins:
            raise ValueError(f"ld: distributions have {s.shape[3]} bins but the loss was built "
                             f"for reg_max {self.bins - 1} ({self.bins} bins)")
        return s, t


def localization_kd(student: Tensor, teacher: Tensor, weight: Tensor, tau: float) -> Tensor:
    """The :class:`LocalizationKD` loss on (B, N, 4, bins) logits with (B, N) prior weights."""
    log_ps = F.log_softmax(student / tau, dim=-1)
    log_pt = F.log_softmax(teacher.detach() / tau, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1).mean(dim=-1)  # (B, N), mean over sides
    weight = weight.detach().to(kl.dtype)
    return (weight * kl).sum() * (tau * tau) / weight.sum().clamp_min(1e-12)
