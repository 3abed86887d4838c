"""Segmentation decode heads (PSPNet, DeepLabV3+, SegFormer) over the four backbone stages C2..C5.

Every head is built from the same keywords (``in_channels``, ``num_classes``, ``channels``,
``output_stride``) and maps the list of stage features to logits at the head's own stride.
All spatial ops follow the input's runtime size, so the heads export to ONNX with dynamic H/W.
Every head also exposes ``decode(feats)`` (the pre-classifier feature map, a distillation tap) and
``channels`` (its width), so distillation losses never reach into a head's internals.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from distill.models.ops import ConvBNReLU, adaptive_avg_pool2d_exact, resize_to
from runtime.errors import BckdError
from runtime.registry import Registry

HEADS: Registry[Callable[..., nn.Module]] = Registry("head")


def _check_in_channels(in_channels: Sequence[int]) -> None:
    if len(in_channels) != 4:
        raise BckdError(f"heads expect 4 stage channel counts (C2..C5), got {list(in_channels)}")


class PyramidPooling(nn.Module):
    """PSPNet pyramid pooling: per bin, pool -> 1x1 ConvBNReLU -> upsample; concat with input."""

    def __init__(
        self, in_channels: int, channels: int, *, bins: Sequence[int] = (1, 2, 3, 6)
    ) -> None:
        super().__init__()
        self.bins = tuple(bins)
        self.branches = nn.ModuleList(ConvBNReLU(in_channels, channels) for _ in self.bins)

    def forward(self, x: Tensor) -> Tensor:
        pooled = [resize_to(branch(adaptive_avg_pool2d_exact(x, b)), x)
                  for b, branch in zip(self.bins, self.branches)]
        return torch.cat([x, *pooled], dim=1)


@HEADS.register("pspnet")
class PSPHead(nn.Module):
    """PSPNet head on C5 (mmseg layout): pyramid pooling, 3x3 bottleneck, dropout, 1x1 classifier.

    Logits come out at the backbone's output stride. ``output_stride`` is accepted for a uniform
    head interface and unused: the pyramid bins are relative to the feature map.
    """

    default_channels = 512

    def __init__(
        self, *, in_channels: Sequence[int], num_classes: int, channels: int = default_channels,
        output_stride: int = 8, bins: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
    ) -> None:
        super().__init__()
        _check_in_channels(in_channels)
        c5 = in_channels[-1]
        self.ppm = PyramidPooling(c5, channels, bins=bins)
        self.bottleneck = ConvBNReLU(c5 + len(bins) * channels, channels, kernel_size=3)
        self.dropout = nn.Dropout2d(dropout)
        self.channels = channels
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def decode(self, feats: list[Tensor]) -> Tensor:
        """The pre-classifier feature map (B, channels, h, w), a distillation tap."""
        return self.bottleneck(self.ppm(feats[-1]))

    def forward(self, feats: list[Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.decode(feats)))


def aspp_dilations(output_stride: int) -> tuple[int, int, int]:
    """ASPP rates (6, 12, 18) at stride 16, scaled so the receptive field is the same at 8 or 32."""
    return tuple(max(1, r * 16 // output_stride) for r in (6, 12, 18))  # type: ignore[return-value]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3, image pooling; 1x1 projection."""

    def __init__(self, in_channels: int, channels: int, *, dilations: Sequence[int]) -> None:
        super().__init__()
        self.image_pool = ConvBNReLU(in_channels, channels)
        self.branches = nn.ModuleList(
            [ConvBNReLU(in_channels, channels)]
            + [ConvBNReLU(in_channels, channels, kernel_size=3, dilation=d) for d in dilations]
        )
        self.project = ConvBNReLU((len(dilations) + 2) * channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        pooled = resize_to(self.image_pool(x.mean(dim=(2, 3), keepdim=True)), x)
        return self.project(torch.cat([pooled, *(b(x) for b in self.branches)], dim=1))


@HEADS.register("deeplabv3plus")
class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+ head: ASPP on C5, decoder fusing C2 (1x1 to 48 ch), two 3x3 convs, classifier.

    Logits come out at C2's stride (4). ASPP rates follow ``output_stride`` (see
    :func:`aspp_dilations`) unless ``dilations`` is given.
    """

    default_channels = 256

    def __init__(
        self, *, in_channels: Sequence[int], num_classes: int, channels: int = default_channels,
        output_stride: int = 8, dilations: Sequence[int] | None = None,
        low_level_channels: int = 48, dropout: float = 0.1,
    ) -> None:
        super().__init__()
        _check_in_channels(in_channels)
        rates = aspp_dilations(output_stride) if dilations is None else tuple(dilations)
        self.aspp = ASPP(in_channels[-1], channels, dilations=rates)
        self.low_level = ConvBNReLU(in_channels[0], low_level_channels)
        self.fuse = nn.Sequential(
            ConvBNReLU(channels + low_level_channels, channels, kernel_size=3),
            ConvBNReLU(channels, channels, kernel_size=3),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.channels = channels
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def decode(self, feats: list[Tensor]) -> Tensor:
        """The pre-classifier feature map (B, channels, h, w), a distillation tap."""
        low = self.low_level(feats[0])
        context = resize_to(self.aspp(feats[-1]), low)
        return self.fuse(torch.cat([context, low], dim=1))

    def forward(self, feats: list[Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.decode(feats)))


@HEADS.register("segformer")
class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder (NVlabs ``SegFormerHead``), on any backbone.

    Per stage a linear layer (a 1x1 conv with bias) to ``channels``, bilinear upsampling to C2's
    size, concatenation (C5, C4, C3, C2: NVlabs' order), a 1x1 ConvBNReLU fuse, dropout and a 1x1
    classifier. Logits come out at C2's stride (4). ``output_stride`` is accepted for a uniform
    head interface and unused.
    """

    default_channels = 256

    def __init__(
        self, *, in_channels: Sequence[int], num_classes: int, channels: int = default_channels,
        output_stride: int = 8, dropout: float = 0.1,
    ) -> None:
        super().__init__()
        _check_in_channels(in_channels)
        self.linear = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = ConvBNReLU(len(in_channels) * channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.channels = channels
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def decode(self, feats: list[Tensor]) -> Tensor:
        """The pre-classifier feature map (B, channels, h, w) at C2's size, a distillation tap."""
        # Project first, then upsample: the linear layers run at each stage's own resolution.
        c2 = self.linear[0](feats[0])
        upsampled = [resize_to(linear(f), c2) for linear, f in zip(self.linear[1:], feats[1:])]
        return self.fuse(torch.cat([*upsampled[::-1], c2], dim=1))

    def forward(self, feats: list[Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.decode(feats)))
