"""The one preprocessing path: decoding, resizing and normalisation of images and label masks.

Training (through a thin torch wrapper), INT8 calibration and on-device evaluation all call these
functions, so host and device can never disagree on channel order, resize mode, mean/std or the
ignore label (architecture.md rule 2). Everything here is numpy + Pillow; Pillow is imported
lazily so ``import runtime.data`` works with numpy alone.

Two resize modes: ``stretch`` (resize to the input size, the semantic default) and ``letterbox``
(keep the aspect ratio, image at the top-left, padding that normalises to 0), with
:class:`BoxTransform` mapping boxes between original and network-input pixels.
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

# Preprocess.from_dict keys that may be absent, with the meaning of their absence: cards from
# before letterbox existed resized by stretching.
# Keys a card may leave out (cards written before they existed mean these values).
_OPTIONAL_KEYS = {"resize": "stretch", "layout": "NCHW", "dtype": "float32"}
INPUT_LAYOUTS = ("NCHW", "NHWC")
# float32: (img - mean) / std; uint8: raw resized pixels (a model that normalises inside).
INPUT_DTYPES = ("float32", "uint8")

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


RESIZE_MODES = ("stretch", "letterbox")


@dataclass(frozen=True)
class BoxTransform:
    """Original-image pixels -> network-input pixels: ``input = orig * s + p`` per axis.

    Boxes are xyxy in continuous pixel coordinates (pixel ``i`` covers ``[i, i + 1)``), the
    convention Pillow's resize keeps, so a box around a set of pixels still surrounds them after
    the transform.
    """

    sx: float
    sy: float
    px: float = 0.0
    py: float = 0.0

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        s = np.array([self.sx, self.sy, self.sx, self.sy], dtype=np.float64)
        p = np.array([self.px, self.py, self.px, self.py], dtype=np.float64)
        return s, p

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """float32 [..., 4] xyxy boxes in original pixels -> network-input pixels."""
        s, p = self._arrays()
        return (_as_boxes(boxes) * s + p).astype(np.float32)

    def to_original(self, boxes: np.ndarray, clip_hw: Sequence[int] | None = None) -> np.ndarray:
        """float32 [..., 4] xyxy boxes in network-input pixels -> original pixels.

        With ``clip_hw`` = (h0, w0) they are clipped to the original image: a box reaching into
        the letterbox padding lands outside it, and clipping pulls it back onto the border.
        """
        s, p = self._arrays()
        out = (_as_boxes(boxes) - p) / s
        if clip_hw is not None:
            h0, w0 = clip_hw
            out = np.clip(out, 0.0, np.array([w0, h0, w0, h0], dtype=np.float64))
        return out.astype(np.float32)

    def to_dict(self) -> dict[str, float]:
        return {"sx": float(self.sx), "sy": float(self.sy), "px": float(self.px), "py": float(self.py)}


def _as_boxes(boxes: np.ndarray) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.shape[-1:] != (4,):
        raise ValueError(f"expected boxes of shape [..., 4] (x1, y1, x2, y2), got {arr.shape}")
    return arr


def _check_triple(name: str, values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {tuple(values)}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


@dataclass(frozen=True)
class Preprocess:
    """Network input preprocessing: resize to ``size`` = (H, W), then (img - mean) / std per RGB channel.

    ``mean`` and ``std`` are in 0-255 units. Masks are resized with nearest neighbour and keep
    ``ignore_index`` for unlabelled pixels.

    ``resize="stretch"`` resizes straight to (H, W). ``"letterbox"`` keeps the aspect ratio: an
    h0 x w0 image is scaled by ``min(H / h0, W / w0)`` to ``content_shape((h0, w0))``, placed at
    the top-left (so boxes need no offset) and padded with the mean colour, i.e. exactly 0 after
    normalisation; class masks are padded with ``ignore_index``, instance masks with 0.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    ignore_index: int = 255
    resize: str = "stretch"
    layout: str = "NCHW"  # of the network input batch (third-party models may take NHWC)
    dtype: str = "float32"
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
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.layout not in INPUT_LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(INPUT_LAYOUTS)}, got {self.layout!r}")
        if self.dtype not in INPUT_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(INPUT_DTYPES)}, got {self.dtype!r}")
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

    def content_shape(self, hw: Sequence[int]) -> tuple[int, int]:
        """(h, w) the image content of an ``hw`` = (h0, w0) image covers in the network input."""
        h0, w0 = _check_size(hw)
        if self.resize == "stretch":
            return self.size
        h, w = self.size
        scale = min(h / h0, w / w0)
        # rounded, then capped: the content never spills over the input
        return min(max(round(h0 * scale), 1), h), min(max(round(w0 * scale), 1), w)

    def box_transform(self, hw: Sequence[int]) -> BoxTransform:
        """The map from an ``hw`` = (h0, w0) image's pixels to network-input pixels.

        The scales are those of the resize actually done (rounded content size / original size),
        so boxes follow the pixels exactly.
        """
        h0, w0 = _check_size(hw)
        ch, cw = self.content_shape((h0, w0))
        return BoxTransform(sx=cw / w0, sy=ch / h0)

    def image(self, img: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 RGB at any size -> float32 3xHxW network input at ``size``."""
        if self.resize == "stretch":
            return self.normalize(resize_image(img, self.size))
        content = self.normalize(resize_image(img, self.content_shape(img.shape[:2])))
        # padding after normalising: the mean colour is 0 exactly, not a rounded uint8 colour
        return self._pad(content, 0.0)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """uint8 HxW class-index mask at any size -> int64 HxW target at ``size``.

        Letterbox padding is ``ignore_index``: it is no class.
        """
        if mask.ndim != 2:
            raise ValueError(f"expected an HxW class-index mask, got shape {mask.shape}")
        resized = resize_mask(mask, self.content_shape(mask.shape)).astype(np.int64)
        return self._pad(resized, self.ignore_index)

    def instance_masks(self, masks: np.ndarray) -> np.ndarray:
        """uint8 [M, h0, w0] 0/1 instance masks -> uint8 [M, H, W] at ``size``.

        Nearest-neighbour resize, like class masks; letterbox padding is 0 (outside every instance).
        """
        if masks.ndim != 3:
            raise ValueError(f"expected instance masks of shape [M, H, W], got {masks.shape}")
        ch, cw = self.content_shape(masks.shape[1:])
        resized = np.zeros((0, ch, cw), dtype=np.uint8)
        if len(masks):
            resized = np.stack([resize_mask(m, (ch, cw)) for m in masks.astype(np.uint8, copy=False)])
        return self._pad(resized, 0)

    def _pad(self, arr: np.ndarray, value: float) -> np.ndarray:
        """Pad the last two axes of ``arr`` (content at the top-left) to ``size`` with ``value``."""
        h, w = self.size
        ch, cw = arr.shape[-2:]
        if (ch, cw) == (h, w):
            return arr
        out = np.full(arr.shape[:-2] + (h, w), value, dtype=arr.dtype)
        out[..., :ch, :cw] = arr
        return out

    def raw_image(self, img: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 RGB -> uint8 3xHxW at ``size``, not normalised (letterbox pads with 0)."""
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 RGB image, got shape {img.shape}")
        return self._pad(resize_image(img, self.content_shape(img.shape[:2])).transpose(2, 0, 1), 0)

    def batch(self, imgs: Sequence[np.ndarray]) -> np.ndarray:
        """A sequence of uint8 HxWx3 images -> float32 Nx3xHxW network input (``layout`` NHWC:
        NxHxWx3; ``dtype`` uint8: raw pixels)."""
        if len(imgs) == 0:
            raise ValueError("cannot build a batch from zero images")
        one = self.raw_image if self.dtype == "uint8" else self.image
        out = np.stack([one(img) for img in imgs])
        return np.ascontiguousarray(out.transpose(0, 2, 3, 1)) if self.layout == "NHWC" else out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in model cards.

        ``resize`` is written only when it is not ``"stretch"``: cards written before the key
        existed mean stretch, and semantic cards stay exactly as they were.
        """
        d: dict[str, Any] = {
            "size": list(self.size),
            "mean": list(self.mean),
            "std": list(self.std),
            "ignore_index": int(self.ignore_index),
        }
        for key in ("resize", "layout", "dtype"):  # written when not the default only
            if getattr(self, key) != _OPTIONAL_KEYS[key]:
                d[key] = getattr(self, key)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        """Inverse of :meth:`to_dict`; every key but ``resize`` is required, so a card never falls back to defaults."""
        keys = [f.name for f in fields(cls) if f.init]
        unknown = sorted(set(d) - set(keys))
        missing = [k for k in keys if k not in d and k not in _OPTIONAL_KEYS]
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
                resize=d.get("resize", _OPTIONAL_KEYS["resize"]),
                layout=d.get("layout", _OPTIONAL_KEYS["layout"]),
                dtype=d.get("dtype", _OPTIONAL_KEYS["dtype"]),
            )
        except (TypeError, ValueError) as exc:
            raise BckdError(f"invalid preprocessing settings: {exc}") from exc
