"""The one preprocessing path: decoding, resizing and normalisation of images and label masks.

Training (through a thin torch wrapper), INT8 calibration and on-device evaluation all call these
functions, so host and device can never disagree on channel order, resize mode, mean/std or the
ignore label (architecture.md rule 2). Everything here is numpy + Pillow; Pillow is imported
lazily so ``import runtime.data`` works with numpy alone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import numpy as np

from runtime.errors import BckdError
from runtime.lazy import require

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255 units
IMAGENET_STD = (58.395, 57.12, 57.375)

# Pillow modes that already hold one class index per pixel.
_INDEX_MASK_MODES = ("L", "P", "1")


def _pil_image() -> Any:
    return require("PIL.Image", "reading and resizing images")


def _open_decoded(path: str | os.PathLike, what: str) -> Any:
    """Open ``path`` with Pillow and force a full decode, so truncated files fail here, not later."""
    Image = _pil_image()
    if not os.path.isfile(path):
        raise BckdError(f"{what} file {path} not found; check the dataset folder")
    try:
        img = Image.open(path)
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BckdError(
            f"cannot decode {what} {path} ({exc}); the file is corrupt or truncated, re-create or remove it"
        ) from exc
    return img


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to uint8 HxWx3 RGB (grey, palette and RGBA images are converted)."""
    img = _open_decoded(path, "image")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Decode a class-index mask PNG (mode L or P) to uint8 HxW.

    For palette ('P') masks the stored indices are the classes; the palette colours are only for
    viewing, so they are ignored.
    """
    img = _open_decoded(path, "mask")
    if img.mode not in _INDEX_MASK_MODES:
        raise BckdError(
            f"mask {path} has mode {img.mode}; masks must be single-channel class-index PNGs "
            "(mode L or P), not colour images — convert the colours to class indices first"
        )
    if img.mode == "1":
        img = img.convert("L").point(lambda v: 1 if v else 0)
    return np.asarray(img, dtype=np.uint8)


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) != s or s <= 0 for s in size):
        raise ValueError(f"size must be (height, width) with two positive ints, got {tuple(size)}")
    return int(size[0]), int(size[1])


def _resize(arr: np.ndarray, size: Sequence[int], resample: int) -> np.ndarray:
    h, w = _check_size(size)
    if arr.shape[:2] == (h, w):
        return arr
    Image = _pil_image()
    # PIL takes (width, height)
    return np.asarray(Image.fromarray(arr).resize((w, h), resample=resample))


def resize_image(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize a uint8 HxWx3 image to ``size`` = (H, W) with Pillow's bilinear filter."""
    return _resize(img, size, _pil_image().Resampling.BILINEAR)


def resize_mask(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize a uint8 HxW class-index mask to ``size`` = (H, W) with nearest neighbour (no new labels)."""
    return _resize(mask, size, _pil_image().Resampling.NEAREST)


def _check_triple(name: str, values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {tuple(values)}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


@dataclass(frozen=True)
class Preprocess:
    """Network input preprocessing: resize to ``size`` = (H, W), then (img - mean) / std per RGB channel.

    ``mean`` and ``std`` are in 0-255 units. Masks are resized with nearest neighbour and keep
    ``ignore_index`` for unlabelled pixels.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    ignore_index: int = 255
    # (x - mean) / std == x * scale + offset; precomputed once, as float32 (3, 1, 1) for CHW.
    _scale: np.ndarray = field(init=False, repr=False, compare=False)
    _offset: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _check_size(self.size))
        object.__setattr__(self, "mean", _check_triple("mean", self.mean))
        object.__setattr__(self, "std", _check_triple("std", self.std))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std}")
        if not 0 <= int(self.ignore_index) <= 255:
            raise ValueError(f"ignore_index must be in [0, 255] (uint8 masks), got {self.ignore_index}")
        std = np.asarray(self.std, dtype=np.float64)
        mean = np.asarray(self.mean, dtype=np.float64)
        object.__setattr__(self, "_scale", (1.0 / std).astype(np.float32).reshape(3, 1, 1))
        object.__setattr__(self, "_offset", (-mean / std).astype(np.float32).reshape(3, 1, 1))

    def normalize(self, img: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 RGB -> float32 3xHxW, (img - mean) / std, without resizing."""
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 RGB image, got shape {img.shape}")
        chw = img.transpose(2, 0, 1).astype(np.float32)
        chw *= self._scale
        chw += self._offset
        return chw

    def image(self, img: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 RGB at any size -> float32 3xHxW network input at ``size``."""
        return self.normalize(resize_image(img, self.size))

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """uint8 HxW class-index mask at any size -> int64 HxW target at ``size``."""
        if mask.ndim != 2:
            raise ValueError(f"expected an HxW class-index mask, got shape {mask.shape}")
        return resize_mask(mask, self.size).astype(np.int64)

    def batch(self, imgs: Sequence[np.ndarray]) -> np.ndarray:
        """A sequence of uint8 HxWx3 images -> float32 Nx3xHxW network input."""
        if len(imgs) == 0:
            raise ValueError("cannot build a batch from zero images")
        return np.stack([self.image(img) for img in imgs])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in model cards."""
        return {
            "size": list(self.size),
            "mean": list(self.mean),
            "std": list(self.std),
            "ignore_index": int(self.ignore_index),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        """Inverse of :meth:`to_dict`; every key is required so a card can never fall back to defaults."""
        keys = [f.name for f in fields(cls) if f.init]
        unknown = sorted(set(d) - set(keys))
        missing = [k for k in keys if k not in d]
        if unknown or missing:
            problems = []
            if unknown:
                problems.append(f"unknown key(s) {', '.join(unknown)}")
            if missing:
                problems.append(f"missing key(s) {', '.join(missing)}")
            raise BckdError(
                f"invalid preprocessing settings: {'; '.join(problems)} (expected exactly: {', '.join(keys)})"
            )
        try:
            return cls(
                size=tuple(d["size"]),
                mean=tuple(d["mean"]),
                std=tuple(d["std"]),
                ignore_index=int(d["ignore_index"]),
            )
        except (TypeError, ValueError) as exc:
            raise BckdError(f"invalid preprocessing settings: {exc}") from exc
