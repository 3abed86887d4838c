"""Per-pixel logit KD (Hinton form), method.md §4.1."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses.base import LOSSES, DistillInputs


@LOSSES.register("kd")
class LogitKD(nn.Module):
    """τ² · mean over pixels of KL(softmax(z_T/τ) ‖ softmax(z_S/τ)) across classes.

    Normalisation: a per-pixel mean over all B·H·W positions (CIRKD's batchmean over flattened
    pixels), *not* MMRazor's per-image sum; multiplied by τ² so gradient scale is τ-independent.
    Pixels whose target is ``ignore_index`` are kept: the teacher's soft labels are defined there.
    Computed in fp32 whatever the autocast dtype.
    """

    default_weight = 1.0
    needs_features = False

    def __init__(self, *, tau: float = 1.0) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"kd temperature must be positive, got {tau}")
        self.tau = tau

    def forward(self, inputs: DistillInputs) -> torch.Tensor:
        return logit_kd(inputs.student_logits, inputs.teacher_logits, self.tau)


def logit_kd(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """The §4.1 loss on (B, K, ...) logits; see :class:`LogitKD`."""
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits "
                         f"{tuple(teacher.shape)} differ in shape")
    log_ps = F.log_softmax(student.float() / tau, dim=1)
    log_pt = F.log_softmax(teacher.detach().float() / tau, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    return kl.mean() * tau * tau
