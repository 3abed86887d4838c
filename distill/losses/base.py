"""The loss registry and the inputs every distillation loss receives."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from runtime.registry import Registry

LOSSES: Registry = Registry("distillation method")


@dataclass
class DistillInputs:
    """What a distillation loss may look at for one batch.

    Logits are (B, K, H, W); features are the 4 backbone stage outputs of each model; ``target``
    is the (B, H, W) label map (for GT-aware methods). Teacher tensors carry no gradient.
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    student_feats: list[torch.Tensor] = field(default_factory=list)
    teacher_feats: list[torch.Tensor] = field(default_factory=list)
    target: torch.Tensor | None = None
    progress: float = 0.0  # fraction of training done, in [0, 1)


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build the distillation loss registered as ``name`` with its keyword arguments."""
    return LOSSES.get(name)(**kwargs)
