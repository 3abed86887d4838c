"""Small tensor helpers shared by the distillation losses (precision, resizing, input checks)."""
from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least fp32: fp16/bf16 become fp32, fp32/fp64 are kept (gradcheck, goldens)."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def full_precision(x: torch.Tensor) -> AbstractContextManager:
    """A region where autocast is off on ``x``'s device, so matmuls and convs run in fp32/fp64.

    Losses are called inside the trainer's autocast; casting inputs is not enough there, because
    autocast would run every matmul (relations, Gram products) and conv (projections) in 16 bit.
    """
    return torch.autocast(x.device.type, enabled=False)


def to_stride(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Area-downsample a (B, C, H, W) map to (⌈H/stride⌉, ⌈W/stride⌉); stride 1 returns ``x``.

    Used to bring input-size logits back to the decoder's output stride, the resolution at which
    the source codebases distil them. Area (block mean) matches the AvgPool BPKD uses for its mask.
    """
    if stride == 1:
        return x
    h, w = x.shape[-2:]
    return F.adaptive_avg_pool2d(x, (math.ceil(h / stride), math.ceil(w / stride)))


def resize_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` at ``ref``'s spatial size: area when shrinking both sides, bilinear otherwise.

    Lets a stride-4 teacher decoder (DeepLabV3+) meet a stride-8 student decoder (PSPNet).
    """
    size = tuple(ref.shape[-2:])
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def require(value: torch.Tensor | None, what: str, method: str) -> torch.Tensor:
    """``value``, or a ValueError saying the method ``method`` needs ``what``."""
    if value is None:
        raise ValueError(f"distillation method '{method}' needs {what}, which the inputs lack")
    return value


def check_positive(name: str, value: float, method: str) -> None:
    """ValueError unless ``value`` is a positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{method} option '{name}' must be a positive number, got {value!r}")


def check_non_negative(name: str, value: float, method: str) -> None:
    """ValueError unless ``value`` is a number >= 0 (0 switches a weighted part off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{method} option '{name}' must be a number >= 0, got {value!r}")


def check_positive_int(name: str, value: int, method: str) -> None:
    """ValueError unless ``value`` is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{method} option '{name}' must be a positive integer, got {value!r}")


def check_choice(name: str, value: str, choices: tuple[str, ...], method: str) -> None:
    """ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{method} option '{name}' must be one of {', '.join(choices)}; "
                         f"got {value!r}")
