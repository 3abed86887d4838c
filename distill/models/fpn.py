"""Feature pyramid neck (Lin et al. 2017, mmdet ``FPN`` layout) for the dense detectors.

C3..C5 (strides 8, 16, 32) become P3..P5 with one channel count: a 1x1 lateral conv per level, a
nearest-neighbour top-down pathway added into each lateral, and a 3x3 output conv per level. No
norm and no activation, as mmdet's default. Upsampling follows the runtime size of the finer
level, so the neck exports to ONNX with dynamic H/W and also handles sizes not divisible by 32.
Module names (``lateral_convs.i``, ``fpn_convs.i``) match mmdet's, which FGD/PKD hook by path.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from runtime.errors import BckdError


class FPN(nn.Module):
    """Top-down pyramid: ``forward([C3, C4, C5])`` -> ``[P3, P4, P5]``, each ``out_channels``."""

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        if out_channels < 1 or not in_channels:
            raise BckdError(f"FPN needs >= 1 input level and out_channels >= 1, got "
                            f"in_channels={list(in_channels)}, out_channels={out_channels}")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # mmdet's FPN init
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        if len(feats) != len(self.lateral_convs):
            raise ValueError(f"FPN built for {len(self.lateral_convs)} levels got {len(feats)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            coarse = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + coarse
        return [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)]
