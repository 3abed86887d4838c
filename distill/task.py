"""The distillation task object: student, frozen teacher, losses and weights.

It owns the setup (style.md): the teacher stays in eval mode, outside the gradient (and outside
DDP when training is distributed), and one call returns a dict of named loss terms, so logs and
tests see each term. With no teacher it is plain supervised training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import DistillInputs


class DistillTask(nn.Module):
    """Computes ``{"task": CE, <method>: weighted term, ..., "total": sum}`` for one batch."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None,
                 losses: dict[str, tuple[nn.Module, float]] | None = None,
                 ignore_index: int = 255) -> None:
        super().__init__()
        self.student = student
        self.losses = nn.ModuleDict({k: m for k, (m, _) in (losses or {}).items()})
        self.weights = {k: w for k, (_, w) in (losses or {}).items()}
        if self.losses and teacher is None:
            raise ValueError(f"distillation losses {list(self.losses)} need a teacher")
        # A plain attribute, not a submodule: the teacher is never optimised, saved with the
        # student, or wrapped by DDP.
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False) if teacher else None
        self.ignore_index = ignore_index
        self.needs_features = any(getattr(m, "needs_features", False) for m in self.losses.values())

    def train(self, mode: bool = True) -> "DistillTask":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen BN statistics whatever the task's mode
        return self

    def _run(self, model: nn.Module, x: torch.Tensor) -> dict:
        if self.needs_features:
            return model.forward_taps(x)
        return {"logits": model(x), "stages": [], "decoder": None}

    def forward(self, images: torch.Tensor, target: torch.Tensor, progress: float = 0.0,
                epoch: int = 0, epochs: int = 1) -> dict[str, torch.Tensor]:
        s = self._run(self.student, images)
        terms = {"task": F.cross_entropy(s["logits"].float(), target,
                                         ignore_index=self.ignore_index)}
        if self.losses:
            with torch.no_grad():
                t = self._run(self.teacher, images)
            inputs = DistillInputs(s["logits"], t["logits"], s["stages"], t["stages"], target,
                                   progress, s["decoder"], t["decoder"], epoch, epochs)
            for name, loss in self.losses.items():
                terms[name] = self.weights[name] * loss(inputs)
        terms["total"] = sum(terms.values())
        return terms
