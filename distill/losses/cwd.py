"""Channel-wise distillation (CWD; Shu et al., ICCV 2021), method.md §4.2."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses.base import LOSSES, DistillInputs, LossContext
from distill.losses.functional import (as_float, check_choice, check_positive, check_positive_int,
                                       full_precision, require, resize_like, to_stride)


@LOSSES.register("cwd")
class ChannelWiseKD(nn.Module):
    """τ²/(B·C) · Σ_b Σ_c KL(softmax_hw(Y^T_bc/τ) ‖ softmax_hw(Y^S_bc/τ)).

    Each channel map is turned into a distribution over its h·w positions (spatial softmax).
    Normalisation: per channel map — KL summed over positions, averaged over the B·C maps;
    multiplied by τ², the official code's convention. Source: irfanICMLL/TorchDistiller
    ``SemSeg-distill`` CriterionCWD (norm "channel", KL; λ = 3, τ = 4 on logits).

    * ``on="logits"`` (default): the input-size logits of both models are area-downsampled to
      stride ``logit_stride`` (default 8, the decoder's output stride of the D8 models, where the
      source codebases apply CWD); ``logit_stride=1`` uses them as given.
    * ``on="decoder"``: the heads' pre-classifier maps. When the channel counts differ a 1×1 conv
      (no bias, trained with the student) maps the student to the teacher's channels (CIRKD's
      variant); a teacher map at another stride is resized to the student's.

    Computed in fp32 (fp64 inputs stay fp64) with autocast off; the teacher is detached.
    """

    default_weight = 3.0
    needs_features = False

    def __init__(self, ctx: LossContext, *, on: str = "logits", tau: float = 4.0,
                 logit_stride: int | None = None) -> None:
        super().__init__()
        check_choice("on", on, ("logits", "decoder"), "cwd")
        check_positive("tau", tau, "cwd")
        if on == "decoder" and logit_stride is not None:
            raise ValueError("cwd option 'logit_stride' applies to on='logits' only; remove it or "
                             "set on: logits")
        logit_stride = 8 if logit_stride is None else logit_stride
        check_positive_int("logit_stride", logit_stride, "cwd")
        self.on, self.tau, self.logit_stride = on, float(tau), logit_stride
        self.needs_features = on == "decoder"
        c_s, c_t = ctx.student_decoder_channels, ctx.teacher_decoder_channels
        self.align = (nn.Conv2d(c_s, c_t, 1, bias=False) if on == "decoder" and c_s != c_t
                      else nn.Identity())

    def forward(self, inputs: DistillInputs) -> torch.Tensor:
        with full_precision(inputs.student_logits):
            if self.on == "logits":
                student = to_stride(as_float(inputs.student_logits), self.logit_stride)
                teacher = to_stride(as_float(inputs.teacher_logits.detach()), self.logit_stride)
            else:
                s = require(inputs.student_decoder, "the student's decoder features", "cwd")
                t = require(inputs.teacher_decoder, "the teacher's decoder features", "cwd")
                student = self.align(as_float(s))
                teacher = resize_like(as_float(t.detach()), student)
            return channel_wise_kl(student, teacher, self.tau)


def channel_wise_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float,
                    detach_teacher: bool = True) -> torch.Tensor:
    """The §4.2 loss on (B, C, h, w) maps of equal shape; see :class:`ChannelWiseKD`.

    ``detach_teacher=False`` lets the gradient reach the teacher side (BCKD's trained teacher
    adapters); the teacher network itself is detached by the caller either way.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"cwd: student map {tuple(student.shape)} and teacher map "
                         f"{tuple(teacher.shape)} differ in shape")
    b, c = student.shape[:2]
    log_qs = F.log_softmax(student.flatten(2) / tau, dim=2)
    teacher = teacher.detach() if detach_teacher else teacher
    log_qt = F.log_softmax(teacher.flatten(2) / tau, dim=2)
    kl = (log_qt.exp() * (log_qt - log_qs)).sum()
    return kl * (tau * tau / (b * c))
