"""Seeded student/teacher tensors for loss tests: every tap a loss may read, at small sizes."""
from __future__ import annotations

import torch

from distill.losses import DistillInputs, LossContext

CTX = LossContext(student_channels=(8, 8, 16, 16), teacher_channels=(8, 16, 16, 32),
                  student_reductions=(4, 8, 8, 8), teacher_reductions=(4, 8, 8, 8),
                  student_decoder_channels=16, teacher_decoder_channels=24, num_classes=5,
                  ignore_index=255)

def distill_inputs() -> DistillInputs:
    """Logits (2, 5, 64, 64), 4 stages per model, decoder maps at stride 8, a target with ignore."""
    g = torch.Generator().manual_seed(1234)
    b, size = 2, 64

    def stages(channels):
        return [torch.randn(b, c, size // r, size // r, generator=g)
                for c, r in zip(channels, CTX.student_reductions)]

    target = torch.randint(0, CTX.num_classes, (b, size, size), generator=g)
    target[:, :4] = CTX.ignore_index
    return DistillInputs(
        student_logits=torch.randn(b, CTX.num_classes, size, size, generator=g),
        teacher_logits=torch.randn(b, CTX.num_classes, size, size, generator=g) * 2,
        student_feats=stages(CTX.student_channels), teacher_feats=stages(CTX.teacher_channels),
        target=target, progress=0.25,
        student_decoder=torch.randn(b, CTX.student_decoder_channels, 8, 8, generator=g),
        teacher_decoder=torch.randn(b, CTX.teacher_decoder_channels, 8, 8, generator=g),
        epoch=1, epochs=4)


# Detectors: backbone stages at strides 4..32, FPN P3..P5 with different channel counts (so the
# FPN adapters are exercised), one prior per location, GFL distributions with reg_max 4.
DET_CTX = LossContext(student_channels=(8, 8, 16, 16), teacher_channels=(8, 16, 16, 32),
                      student_reductions=(4, 8, 16, 32), teacher_reductions=(4, 8, 16, 32),
                      num_classes=5, student_fpn_channels=16, teacher_fpn_channels=24, reg_max=4)
DET_FPN_STRIDES = (8, 16, 32)


def det_priors(size: tuple[int, int], strides: tuple[int, ...] = DET_FPN_STRIDES,
               scale: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """GFL-style priors: one square box of side ``scale``·stride centred on each location,
    level by level, row-major (the order of the flattened [B, N, C] logits); and their strides."""
    boxes, per_prior = [], []
    for s in strides:
        h, w = -(-size[0] // s), -(-size[1] // s)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        cx, cy = (xs.flatten() + 0.5) * s, (ys.flatten() + 0.5) * s
        half = scale * s / 2
        boxes.append(torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1))
        per_prior.append(torch.full((h * w,), float(s)))
    return torch.cat(boxes).float(), torch.cat(per_prior)


def det_distill_inputs(size: tuple[int, int] = (128, 128), batch: int = 2, gfl: bool = True,
                       ctx: LossContext = DET_CTX, seed: int = 4321) -> DistillInputs:
    """Seeded detector taps: per-prior logits (mostly background, like a trained head), 4 stages,
    3 FPN levels, GFL distributions (None when ``gfl`` is False: RetinaNet), priors, GT boxes."""
    g = torch.Generator().manual_seed(seed)
    h, w = size

    def maps(channels, strides):
        return [torch.randn(batch, c, -(-h // s), -(-w // s), generator=g)
                for c, s in zip(channels, strides)]

    priors, strides = det_priors(size)
    n, c, bins = priors.shape[0], ctx.num_classes, ctx.reg_max + 1
    targets = [{"boxes": torch.tensor([[8.0, 12.0, 60.0, 50.0], [70.0, 64.0, 120.0, 126.0]]),
                "labels": torch.tensor([1, 3])} for _ in range(batch)]
    return DistillInputs(
        student_logits=torch.randn(batch, n, c, generator=g) - 3.0,
        teacher_logits=torch.randn(batch, n, c, generator=g) * 1.5 - 4.0,
        student_feats=maps(ctx.student_channels, ctx.student_reductions),
        teacher_feats=maps(ctx.teacher_channels, ctx.teacher_reductions),
        target=None, progress=0.25, epoch=1, epochs=4, input_size=size,
        student_fpn=maps([ctx.student_fpn_channels] * 3, DET_FPN_STRIDES),
        teacher_fpn=maps([ctx.teacher_fpn_channels] * 3, DET_FPN_STRIDES),
        student_reg=torch.randn(batch, n, 4, bins, generator=g) * 2 if gfl else None,
        teacher_reg=torch.randn(batch, n, 4, bins, generator=g) * 3 if gfl else None,
        priors=priors, strides=strides, det_targets=targets)
