"""ResNet-18/34/50/101 backbones for dense prediction: dilated to output stride 8/16/32, slimmable.

State-dict keys are exactly torchvision's minus ``fc.*``, so torchvision ImageNet weights load
offline with :func:`distill.models.weights.load_backbone_weights`. Unlike torchvision,
``BasicBlock`` accepts dilation (on both 3x3 convs), so ResNet-18/34 can run at output stride 8
too. :data:`BACKBONES` lives here for historical reasons; every backbone module registers in it.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import Tensor, nn

from distill.models.ops import make_divisible
from distill.models.weights import load_backbone_weights
from runtime.errors import BckdError
from runtime.registry import Registry

# load_backbone_weights is re-exported: it lived here before MobileNetV2 and MiT shared it.
__all__ = ["BACKBONES", "BasicBlock", "Bottleneck", "ResNet", "load_backbone_weights"]

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")

# Which of layer2..layer4 trade stride for dilation (torchvision's replace_stride_with_dilation).
_DILATE_FOR_STRIDE = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=dilation, dilation=dilation,
                     bias=False)


def _conv1x1(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; both convs dilated (torchvision refuses dilation here)."""

    expansion = 1

    def __init__(
        self, in_chs: int, planes: int, *, stride: int = 1, dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_chs, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, dilated) -> 1x1 x4, torchvision's ResNet v1.5 layout."""

    expansion = 4

    def __init__(
        self, in_chs: int, planes: int, *, stride: int = 1, dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_chs, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """ResNet feature extractor: ``forward_features`` returns the four stage outputs C2..C5."""

    checkpoint_ignore_prefixes = ("fc.",)  # the ImageNet classifier
    checkpoint_description = "a torchvision ResNet state dict of the same depth"

    def __init__(
        self, block: Block, layers: Sequence[int], *, width: float = 1.0, output_stride: int = 8,
        in_chans: int = 3, zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if output_stride not in _DILATE_FOR_STRIDE:
            raise BckdError(f"output_stride {output_stride} is not supported; use 8, 16 or 32")
        if not width > 0:
            raise BckdError(f"backbone width must be > 0, got {width}")
        self.width = width
        self.output_stride = output_stride
        stem_chs = make_divisible(64 * width)
        self.conv1 = nn.Conv2d(in_chans, stem_chs, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.feature_info: list[dict[str, Any]] = []
        self._build_stages(block, layers, stem_chs, _DILATE_FOR_STRIDE[output_stride])
        self._init_weights(zero_init_residual)

    def _build_stages(
        self, block: Block, layers: Sequence[int], in_chs: int, dilate: Sequence[bool]
    ) -> None:
        reduction, dilation = 4, 1
        for k, (blocks, use_dilation) in enumerate(zip(layers, (False, *dilate)), start=1):
            planes = make_divisible(64 * 2 ** (k - 1) * self.width)
            stride = 1 if k == 1 else 2
            # torchvision: the first block of a dilated stage keeps the previous dilation.
            first_dilation = dilation
            if use_dilation:
                dilation, stride = dilation * stride, 1
            reduction *= stride
            layer = _make_layer(block, in_chs, planes, blocks, stride, first_dilation, dilation)
            self.add_module(f"layer{k}", layer)
            in_chs = planes * block.expansion
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"layer{k}"))

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each block starts as identity, which helps some training recipes
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    @property
    def out_channels(self) -> list[int]:
        """Channels of C2..C5."""
        return [info["num_chs"] for info in self.feature_info]

    def forward_features(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for info in self.feature_info:
            x = getattr(self, info["module"])(x)
            feats.append(x)
        return feats

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_features(x)


def _make_layer(
    block: Block, in_chs: int, planes: int, blocks: int, stride: int, first_dilation: int,
    dilation: int,
) -> nn.Sequential:
    out_chs = planes * block.expansion
    downsample = None
    if stride != 1 or in_chs != out_chs:
        downsample = nn.Sequential(_conv1x1(in_chs, out_chs, stride), nn.BatchNorm2d(out_chs))
    layers = [block(in_chs, planes, stride=stride, dilation=first_dilation, downsample=downsample)]
    layers += [block(out_chs, planes, dilation=dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def _register(name: str, block: Block, layers: tuple[int, int, int, int]) -> None:
    def build(
        *, width: float = 1.0, output_stride: int = 8, in_chans: int = 3,
        zero_init_residual: bool = False,
    ) -> ResNet:
        return ResNet(block, layers, width=width, output_stride=output_stride, in_chans=in_chans,
                      zero_init_residual=zero_init_residual)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{name}: {block.__name__} x {layers}, torchvision-compatible keys."
    BACKBONES.register(name)(build)


_register("resnet18", BasicBlock, (2, 2, 2, 2))
_register("resnet34", BasicBlock, (3, 4, 6, 3))
_register("resnet50", Bottleneck, (3, 4, 6, 3))
_register("resnet101", Bottleneck, (3, 4, 23, 3))
