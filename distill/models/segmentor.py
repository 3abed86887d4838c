"""Segmentor = backbone + decode head, built by name from the registries.

``Segmentor.arch`` holds the exact keyword arguments of :func:`build_segmentor` that rebuild the
architecture; checkpoints and model cards store it, and :func:`model_from_arch` rebuilds from it.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

from torch import Tensor, nn

from distill.models.heads import HEADS
from distill.models.ops import make_divisible, resize_to
from distill.models.resnet import BACKBONES, load_backbone_weights
from runtime.errors import BckdError
from runtime.registry import check_known


class Segmentor(nn.Module):
    """Backbone + head; logits are upsampled bilinearly to the input size."""

    def __init__(self, *, backbone: nn.Module, head: nn.Module, arch: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.arch = dict(arch)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """The backbone's stage description (num_chs, reduction, module), C2..C5."""
        return self.backbone.feature_info

    @property
    def decoder_channels(self) -> int:
        """Channels of the head's pre-classifier feature map (the ``decoder`` tap)."""
        return self.head.channels

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits (B, K, H, W) and the four backbone stage outputs from the same pass."""
        taps = self.forward_taps(x)
        return taps["logits"], taps["stages"]

    def forward_taps(self, x: Tensor) -> dict[str, Any]:
        """Everything distillation taps, from one pass.

        ``logits``: (B, K, H, W) at the input size; ``stages``: the four backbone stage outputs
        (C2..C5); ``decoder``: the head's pre-classifier feature map at the head's stride.
        """
        stages = self.backbone.forward_features(x)
        decoder = self.head.decode(stages)
        logits = self.head.classifier(self.head.dropout(decoder))
        return {"logits": resize_to(logits, x), "stages": stages, "decoder": decoder}

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_features(x)[0]


def _head_channels(head_cls: Any, width: float) -> int:
    """The head's default width scaled like the backbone, so slim students get slim heads."""
    return make_divisible(head_cls.default_channels * width, 8, minimum=16)


def build_segmentor(
    backbone: str = "resnet18", head: str = "pspnet", *, num_classes: int, width: float = 1.0,
    output_stride: int = 8, head_channels: int | None = None,
    pretrained_backbone: str | None = None,
) -> Segmentor:
    """Build a segmentor by registry names; ``pretrained_backbone`` is a torchvision-format .pth.

    ``head_channels=None`` means the head's default scaled by ``width`` (multiple of 8, >= 16).
    The resulting ``arch`` records the resolved head width and no weight path: weights travel in
    checkpoints, the architecture in ``arch``.
    """
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise BckdError(f"num_classes must be a positive integer, got {num_classes!r}")
    head_cls = HEADS.get(head)
    net = BACKBONES.get(backbone)(width=width, output_stride=output_stride)
    channels = _head_channels(head_cls, width) if head_channels is None else head_channels
    if channels < 1:
        raise BckdError(f"head_channels must be >= 1, got {channels}; or leave it unset")
    decode = head_cls(in_channels=net.out_channels, num_classes=num_classes, channels=channels,
                      output_stride=output_stride)
    if pretrained_backbone is not None:
        load_backbone_weights(net, pretrained_backbone)
    arch = dict(backbone=backbone, head=head, num_classes=num_classes, width=width,
                output_stride=output_stride, head_channels=channels)
    return Segmentor(backbone=net, head=decode, arch=arch)


def _arch_keys() -> list[str]:
    return [k for k in inspect.signature(build_segmentor).parameters if k != "pretrained_backbone"]


def model_from_arch(arch: Mapping[str, Any]) -> Segmentor:
    """Rebuild a segmentor from its ``arch`` dict; unknown or missing keys are user errors."""
    check_known(arch, _arch_keys(), "model arch key")
    if "num_classes" not in arch:
        raise BckdError("model arch has no 'num_classes'; add it (the number of output classes)")
    return build_segmentor(**arch)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
