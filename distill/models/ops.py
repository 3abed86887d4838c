"""Building blocks shared by backbones and heads, chosen to export to ONNX with dynamic shapes.

Everything here depends on the input's *runtime* size only through torch ops, so a model traced at
one resolution computes the right thing at any other (the legacy ONNX tracer bakes Python ints and
``nn.AdaptiveAvgPool2d(k>1)`` kernels into the graph).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def make_divisible(value: float, divisor: int = 8, minimum: int | None = None) -> int:
    """``value`` rounded to the nearest multiple of ``divisor``; at least ``minimum`` or divisor."""
    minimum = divisor if minimum is None else minimum
    return max(minimum, int(value / divisor + 0.5) * divisor)


def _adaptive_pool_matrix(size: int | Tensor, bins: int, like: Tensor) -> Tensor:
    """(bins, size) matrix whose row i averages [floor(i*size/bins), ceil((i+1)*size/bins)).

    These are exactly the windows of ``F.adaptive_avg_pool2d``. ``size`` may be a traced size, so
    the arithmetic stays in int64 tensor ops rather than Python ints.
    """
    idx = torch.arange(bins, device=like.device, dtype=torch.long)
    start = torch.div(idx * size, bins, rounding_mode="floor")
    end = torch.div((idx + 1) * size + bins - 1, bins, rounding_mode="floor")
    pos = torch.arange(size, device=like.device, dtype=torch.long)
    inside = (pos.unsqueeze(0) >= start.unsqueeze(1)) & (pos.unsqueeze(0) < end.unsqueeze(1))
    return inside.to(like.dtype) / (end - start).to(like.dtype).unsqueeze(1)


def adaptive_avg_pool2d_exact(x: Tensor, bins: int) -> Tensor:
    """``F.adaptive_avg_pool2d(x, bins)`` as ``P_h @ x @ P_w^T``: exports with dynamic H and W."""
    if bins == 1:
        return x.mean(dim=(2, 3), keepdim=True)
    pool_h = _adaptive_pool_matrix(x.shape[-2], bins, x)
    pool_w = _adaptive_pool_matrix(x.shape[-1], bins, x)
    return pool_h @ x @ pool_w.transpose(0, 1)


def resize_to(x: Tensor, ref: Tensor) -> Tensor:
    """Bilinear resize of ``x`` to ``ref``'s runtime spatial size (align_corners=False)."""
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    """conv (no bias) -> BatchNorm -> ReLU, the unit every head is built from."""

    def __init__(
        self, in_channels: int, out_channels: int, *, kernel_size: int = 1, dilation: int = 1
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding,
                      dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
