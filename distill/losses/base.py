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

    @classmethod
    def from_models(cls, student: nn.Module, teacher: nn.Module, ignore_index: int = 255
                    ) -> "LossContext":
        """The context of two :class:`~distill.models.Segmentor` s."""
        return cls(
            student_channels=tuple(i["num_chs"] for i in student.feature_info),
            teacher_channels=tuple(i["num_chs"] for i in teacher.feature_info),
            student_reductions=tuple(i["reduction"] for i in student.feature_info),
            teacher_reductions=tuple(i["reduction"] for i in teacher.feature_info),
            student_decoder_channels=student.decoder_channels,
            teacher_decoder_channels=teacher.decoder_channels,
            num_classes=student.arch["num_classes"], ignore_index=ignore_index)


def loss_options(name: str) -> list[str]:
    """The option names the loss ``name`` accepts (``weight`` included)."""
    params = inspect.signature(LOSSES.get(name)).parameters
    return ["weight", *(p for p in params if p != "ctx")]


def build_loss(name: str, ctx: LossContext | None = None, **options: Any) -> nn.Module:
    """Build the loss registered as ``name``; a misspelt option is a one-line user error."""
    cls = LOSSES.get(name)
    params = inspect.signature(cls).parameters
    check_known(options, [p for p in params if p != "ctx"], "option",
                f" for distillation method '{name}'")
    if "ctx" in params:
        options["ctx"] = ctx or LossContext()
    try:
        return cls(**options)
    except (ValueError, TypeError) as exc:
        raise BckdError(f"distillation method '{name}': {exc}") from exc


def method_names(method: str, options: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """The loss names of ``method`` ('none', one name, or names joined by '+'), checked.

    Unknown names, repeated names, options for a loss the method lacks and misspelt option names
    are one-line user errors, raised before any model is built.
    """
    names = [] if method == "none" else [n.strip() for n in method.split("+")]
    if len(set(names)) != len(names):
        raise BckdError(f"method '{method}' names a loss twice; list each once")
    for name in names:
        LOSSES.get(name)
    for key, opts in (options or {}).items():
        if key not in names:
            raise BckdError(f"kd.options has settings for '{key}', which is not part of method "
                            f"'{method}'; add it to the method or remove its options")
        check_known(opts or {}, loss_options(key), "option", f" for distillation method '{key}'")
    return names


def build_losses(method: str, options: dict[str, dict[str, Any]] | None = None,
                 ctx: LossContext | None = None) -> dict[str, tuple[nn.Module, float]]:
    """The named, weighted losses of ``method`` ('none', one name, or names joined by '+')."""
    options = dict(options or {})
    names = method_names(method, options)
    losses = {}
    for name in names:
        opts = dict(options.get(name) or {})
        weight = float(opts.pop("weight", getattr(LOSSES.get(name), "default_weight", 1.0)))
        losses[name] = (build_loss(name, ctx, **opts), weight)
    return losses
