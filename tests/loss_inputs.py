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
