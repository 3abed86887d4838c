"""The loss registry, the inputs every distillation loss receives, and how losses are built.

A loss is an ``nn.Module`` registered under a method name. Its constructor takes keyword-only
options (validated here: an unknown option names the closest valid one) plus, when it declares a
``ctx`` parameter, the :class:`LossContext` describing the two models. Class attributes tell the
task what the loss needs:

* ``default_weight``: its weight in the total loss unless the config gives ``weight``;
* ``needs_features``: whether it reads stage / decoder features (else logits only).

Trainable parts of a loss (adapters, projections) live inside the loss module, so they are
optimised with the student, kept in the full training state, and never saved with the student.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from runtime.errors import BckdError
from runtime.registry import Registry, check_known

LOSSES: Registry = Registry("distillation method")
# Detectors (detect and instance tasks) have their own methods: 'kd' there is logit KD on the
# classification head, 'cwd' works on FPN levels, and so on (distill.losses.det_kd).
DETECT_LOSSES: Registry = Registry("detection distillation method")
REGISTRIES = {"semantic": LOSSES, "detect": DETECT_LOSSES, "instance": DETECT_LOSSES}


def loss_registry(task: str = "semantic") -> Registry:
    """The loss registry of ``task`` ('semantic', 'detect' or 'instance')."""
    if task not in REGISTRIES:
        raise BckdError(f"unknown task '{task}' (valid: {', '.join(REGISTRIES)})")
    return REGISTRIES[task]


@dataclass
class DistillInputs:
    """What a distillation loss may look at for one batch.

    Logits are (B, K, H, W) at the input size; ``*_feats`` are the 4 backbone stage outputs (C2..C5)
    of each model; ``*_decoder`` the head's pre-classifier map; ``target`` the (B, H, W) label map
    (for GT-aware methods). Teacher tensors carry no gradient. ``epoch`` is 0-indexed, so the
    paper's 1-indexed t is ``epoch + 1``.
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    student_feats: list[torch.Tensor] = field(default_factory=list)
    teacher_feats: list[torch.Tensor] = field(default_factory=list)
    target: torch.Tensor | None = None
    progress: float = 0.0  # fraction of training iterations done, in [0, 1)
    student_decoder: torch.Tensor | None = None
    teacher_decoder: torch.Tensor | None = None
    epoch: int = 0
    epochs: int = 1
    # Detectors (task 'detect' / 'instance'); logits above are then the flattened per-prior
    # classification logits [B, N, C] and target is None.
    input_size: tuple[int, int] | None = None  # (H, W) of the network input
    student_fpn: list[torch.Tensor] = field(default_factory=list)  # FPN levels P3..
    teacher_fpn: list[torch.Tensor] = field(default_factory=list)
    student_reg: torch.Tensor | None = None  # GFL: [B, N, 4, reg_max + 1] distribution logits
    teacher_reg: torch.Tensor | None = None
    priors: torch.Tensor | None = None  # [N, 4] xyxy prior boxes in input pixels
    strides: torch.Tensor | None = None  # [N] stride of each prior
    det_targets: list[dict[str, Any]] | None = None  # per image {"boxes", "labels", "masks"}


@dataclass(frozen=True)
class LossContext:
    """What a loss needs to size its adapters: channel counts and strides of both models."""

    student_channels: tuple[int, ...] = (64, 128, 256, 512)
    teacher_channels: tuple[int, ...] = (64, 128, 256, 512)
    student_reductions: tuple[int, ...] = (4, 8, 8, 8)
    teacher_reductions: tuple[int, ...] = (4, 8, 8, 8)
    student_decoder_channels: int = 128
    teacher_decoder_channels: int = 128
    num_classes: int = 7
    ignore_index: int = 255
    student_fpn_channels: int = 0  # detectors: channels of every FPN level (0: not a detector)
    teacher_fpn_channels: int = 0
    reg_max: int = 0  # GFL: bins - 1 of the distribution head (0: none)

    @classmethod
    def from_models(cls, student: nn.Module, teacher: nn.Module, ignore_index: int = 255
                    ) -> "LossContext":
        """The context of two :class:`~distill.models.Segmentor` s (or two detectors)."""
        if hasattr(student, "fpn_channels"):
            return cls(
                student_channels=tuple(i["num_chs"] for i in student.feature_info),
                teacher_channels=tuple(i["num_chs"] for i in teacher.feature_info),
                student_reductions=tuple(i["reduction"] for i in student.feature_info),
                teacher_reductions=tuple(i["reduction"] for i in teacher.feature_info),
                num_classes=student.num_classes, ignore_index=ignore_index,
                student_fpn_channels=student.fpn_channels,
                teacher_fpn_channels=teacher.fpn_channels,
                reg_max=int(getattr(student, "reg_max", 0) or 0))
        return cls(
            student_channels=tuple(i["num_chs"] for i in student.feature_info),
            teacher_channels=tuple(i["num_chs"] for i in teacher.feature_info),
            student_reductions=tuple(i["reduction"] for i in student.feature_info),
            teacher_reductions=tuple(i["reduction"] for i in teacher.feature_info),
            student_decoder_channels=student.decoder_channels,
            teacher_decoder_channels=teacher.decoder_channels,
            num_classes=student.arch["num_classes"], ignore_index=ignore_index)


def loss_options(name: str, task: str = "semantic") -> list[str]:
    """The option names the loss ``name`` of ``task`` accepts (``weight`` included)."""
    params = inspect.signature(loss_registry(task).get(name)).parameters
    return ["weight", *(p for p in params if p != "ctx")]


def build_loss(name: str, ctx: LossContext | None = None, *, task: str = "semantic",
               **options: Any) -> nn.Module:
    """Build the loss registered as ``name`` for ``task``; a misspelt option is a user error."""
    cls = loss_registry(task).get(name)
    params = inspect.signature(cls).parameters
    check_known(options, [p for p in params if p != "ctx"], "option",
                f" for distillation method '{name}'")
    if "ctx" in params:
        options["ctx"] = ctx or LossContext()
    try:
        return cls(**options)
    except (ValueError, TypeError) as exc:
        raise BckdError(f"distillation method '{name}': {exc}") from exc


def method_names(method: str, options: dict[str, dict[str, Any]] | None = None,
                 task: str = "semantic") -> list[str]:
    """The loss names of ``method`` ('none', one name, or names joined by '+'), checked.

    Unknown names, repeated names, options for a loss the method lacks and misspelt option names
    are one-line user errors, raised before any model is built.
    """
    names = [] if method == "none" else [n.strip() for n in method.split("+")]
    if len(set(names)) != len(names):
        raise BckdError(f"method '{method}' names a loss twice; list each once")
    registry = loss_registry(task)
    for name in names:
        registry.get(name)
    for key, opts in (options or {}).items():
        if key not in names:
            raise BckdError(f"kd.options has settings for '{key}', which is not part of method "
                            f"'{method}'; add it to the method or remove its options")
        check_known(opts or {}, loss_options(key, task), "option",
                    f" for distillation method '{key}'")
    return names


def build_losses(method: str, options: dict[str, dict[str, Any]] | None = None,
                 ctx: LossContext | None = None, task: str = "semantic",
                 ) -> dict[str, tuple[nn.Module, float]]:
    """The named, weighted losses of ``method`` ('none', one name, or names joined by '+')."""
    options = dict(options or {})
    names = method_names(method, options, task)
    registry = loss_registry(task)
    losses = {}
    for name in names:
        opts = dict(options.get(name) or {})
        weight = float(opts.pop("weight", getattr(registry.get(name), "default_weight", 1.0)))
        losses[name] = (build_loss(name, ctx, task=task, **opts), weight)
    return losses
