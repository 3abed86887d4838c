"""MobileNetV2 backbone for dense prediction: dilated to output stride 8/16/32, slimmable.

State-dict keys are exactly torchvision's ``mobilenet_v2`` ``features.0`` ... ``features.17``.
torchvision's last layer, the 1x1 conv to 1280 channels (``features.18``), and the classifier are
not built: they only serve ImageNet classification (mmseg's MobileNetV2 drops that conv too), and
the 1280-channel conv alone would add 412,160 parameters at width 1. Loading a torchvision ImageNet
checkpoint drops ``features.18.*`` and ``classifier.*`` (:attr:`checkpoint_ignore_prefixes`).

The four stages (distillation taps) end after the last block of each resolution:

=========== ======== ========= =========================
cut after   channels reduction torchvision blocks
=========== ======== ========= =========================
features.3  24       4         1..3   (t=1 c=16, t=6 c=24)
features.6  32       8         4..6   (c=32)
features.13 96       16        7..13  (c=64, c=96)
features.17 320      32        14..17 (c=160, c=320)
=========== ======== ========= =========================

(mmseg's ``out_indices=(1, 2, 4, 6)``.) Channels are at width 1; ``width`` is torchvision's
``width_mult`` with its rounding to multiples of 8. For output stride 16 or 8 the stride-2 blocks
``features.14`` (and ``features.7``) run at stride 1 and the blocks after them are dilated, by the
atrous rule of DeepLab's MobileNetV2 and torchvision's ResNet ``replace_stride_with_dilation``: the
block that loses its stride keeps the dilation it had, every later block doubles it. (mmseg instead
dilates a whole stage, including its first block.)
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from distill.models.resnet import BACKBONES
from runtime.errors import BckdError

# torchvision's inverted_residual_setting: expand ratio t, channels c, blocks n, first stride s.
_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))
_STAGE_ENDS = (3, 6, 13, 17)  # index in ``features`` of each stage's last block
_OUTPUT_STRIDES = (8, 16, 32)


def make_divisible_tv(value: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: nearest multiple of ``divisor``, never 10% below value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNReLU6(nn.Sequential):
    """conv (no bias) -> BN -> ReLU6, torchvision's ``Conv2dNormActivation`` layout (0, 1, 2)."""

    def __init__(
        self, in_chs: int, out_chs: int, *, kernel_size: int = 3, stride: int = 1,
        dilation: int = 1, groups: int = 1,
    ) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding,
                      dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1x1 expand (if t > 1) -> 3x3 depthwise (strided, dilated) -> 1x1 linear projection."""

    def __init__(
        self, in_chs: int, out_chs: int, *, stride: int, expand_ratio: int, dilation: int = 1
    ) -> None:
        super().__init__()
        hidden = int(round(in_chs * expand_ratio))
        self.use_res_connect = stride == 1 and in_chs == out_chs
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_chs, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, dilation=dilation, groups=hidden),
            nn.Conv2d(hidden, out_chs, 1, bias=False),
            nn.BatchNorm2d(out_chs),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 feature extractor: ``forward_features`` returns the four stage outputs."""

    checkpoint_ignore_prefixes = ("features.18.", "classifier.")  # not built here
    checkpoint_description = "a torchvision mobilenet_v2 state dict"

    def __init__(self, *, width: float = 1.0, output_stride: int = 8, in_chans: int = 3) -> None:
        super().__init__()
        if output_stride not in _OUTPUT_STRIDES:
            raise BckdError(f"output_stride {output_stride} is not supported by mobilenetv2; "
                            "use 8, 16 or 32")
        if not width > 0:
            raise BckdError(f"backbone width must be > 0, got {width}")
        self.width = width
        self.output_stride = output_stride
        stem_chs = make_divisible_tv(32 * width)
        layers: list[nn.Module] = [ConvBNReLU6(in_chans, stem_chs, stride=2)]
        self.feature_info: list[dict[str, Any]] = []
        self._build_blocks(layers, stem_chs)
        self.features = nn.Sequential(*layers)
        self._init_weights()

    def _build_blocks(self, layers: list[nn.Module], in_chs: int) -> None:
        reduction, dilation = 2, 1
        for t, c, n, s in _SETTING:
            out_chs = make_divisible_tv(c * self.width)
            for i in range(n):
                stride, block_dilation = (s if i == 0 else 1), dilation
                if reduction * stride > self.output_stride:  # atrous: trade stride for dilation
                    dilation, stride = dilation * stride, 1
                reduction *= stride
                layers.append(InvertedResidual(in_chs, out_chs, stride=stride, expand_ratio=t,
                                               dilation=block_dilation))
                in_chs = out_chs
                if len(layers) - 1 in _STAGE_ENDS:
                    self.feature_info.append(dict(num_chs=out_chs, reduction=reduction,
                                                  module=f"features.{len(layers) - 1}"))

    def _init_weights(self) -> None:  # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def out_channels(self) -> list[int]:
        """Channels of the four stages."""
        return [info["num_chs"] for info in self.feature_info]

    def forward_features(self, x: Tensor) -> list[Tensor]:
        feats = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _STAGE_ENDS:
                feats.append(x)
        return feats

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_features(x)


@BACKBONES.register("mobilenetv2")
def mobilenetv2(*, width: float = 1.0, output_stride: int = 8, in_chans: int = 3) -> MobileNetV2:
    """MobileNetV2 (torchvision ``features.0-17`` keys), stages at features.3/6/13/17."""
    return MobileNetV2(width=width, output_stride=output_stride, in_chans=in_chans)
