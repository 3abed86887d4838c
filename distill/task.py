"""The distillation task object: student, frozen teacher, losses and weights.

It owns the setup (style.md): the teacher stays in eval mode, outside the gradient (and outside
DDP when training is distributed), and one call returns a dict of named loss terms, so logs and
tests see each term. With no teacher it is plain supervised training.
"""
from __future__ import annotations

import torch
from torch import nn

from distill.tasks import TaskSpec, get_spec


class DistillTask(nn.Module):
    """Computes ``{<task terms>, <method>: weighted term, ..., "total": sum}`` for one batch.

    The task terms come from the task's spec (:mod:`distill.tasks`): ``task`` (cross-entropy)
    for semantic segmentation, the detector's own named terms (e.g. qfl, dfl, giou) otherwise.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None,
                 losses: dict[str, tuple[nn.Module, float]] | None = None,
                 ignore_index: int = 255, spec: TaskSpec | str = "semantic") -> None:
        super().__init__()
        self.spec = get_spec(spec) if isinstance(spec, str) else spec
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
        return self.spec.taps(model, x, self.needs_features)

    def forward(self, images: torch.Tensor, target, progress: float = 0.0,
                epoch: int = 0, epochs: int = 1) -> dict[str, torch.Tensor]:
        s = self._run(self.student, images)
        terms = dict(self.spec.task_loss(self.student, s, target, self.ignore_index))
        if self.losses:
            with torch.no_grad():
                t = self._run(self.teacher, images)
            inputs = self.spec.distill_inputs(s, t, target, progress=progress, epoch=epoch,
                                              epochs=epochs, size=images.shape[-2:])
            for name, loss in self.losses.items():
                terms[name] = self.weights[name] * loss(inputs)
        terms["total"] = sum(terms.values())
        return terms
