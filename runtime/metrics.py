"""Streaming semantic-segmentation metrics built on one confusion matrix.

Predictions are accumulated image by image into a KxK count matrix, so memory is O(K^2) however
many images are scored, and partial results (per worker, per shard) combine with :meth:`merge`.
All scores are fractions in [0, 1]; reports multiply by 100.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class ConfusionMatrix:
    """KxK pixel counts; rows are ground-truth classes, columns are predicted classes."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def reset(self) -> None:
        self.matrix[:] = 0

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        """Add one prediction / ground-truth pair of any (matching) shape of integer class indices.

        Pixels whose target is ``ignore_index`` are skipped.
        """
        pred, target = np.asarray(pred), np.asarray(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {pred.shape} does not match target shape {target.shape}")
        for name, arr in (("prediction", pred), ("target", target)):
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype} "
                                 "(take the argmax of the logits first)")
        if pred.size == 0:
            return
        k = self.num_classes
        self._check_range("prediction", pred)
        valid = target != self.ignore_index
        t = target[valid].astype(np.int64)
        p = pred[valid].astype(np.int64)
        self._check_range("target", t)
        self.matrix += np.bincount(k * t + p, minlength=k * k).reshape(k, k)

    def _check_range(self, name: str, arr: np.ndarray) -> None:
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_classes):
            raise ValueError(
                f"{name} holds class {int(arr.min()) if arr.min() < 0 else int(arr.max())}, outside "
                f"[0, {self.num_classes}) (ignore_index {self.ignore_index} is only allowed in targets)"
            )

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add ``other``'s counts into this matrix (in place) and return self."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) into a "
                f"{self.num_classes}-class one (ignore {self.ignore_index})"
            )
        self.matrix += other.matrix
        return self

    def iou(self) -> np.ndarray:
        """Per-class intersection over union; NaN for a class absent from both predictions and targets."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(axis=0) + self.matrix.sum(axis=1) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        """Mean IoU over classes that occur (NaN classes skipped); NaN if nothing was counted."""
        iou = self.iou()
        present = ~np.isnan(iou)
        return float(iou[present].mean()) if present.any() else float("nan")

    def pixel_accuracy(self) -> float:
        """Fraction of counted (non-ignored) pixels predicted correctly; NaN if nothing was counted."""
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready scores in [0, 1]: ``miou``, ``pixel_acc`` and ``per_class_iou`` by class name.

        NaN (a class never seen, or no pixels at all) becomes None, since JSON has no NaN.
        """
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"got {len(names)} class names for a {self.num_classes}-class matrix")
        return {
            "miou": _none_if_nan(self.miou()),
            "pixel_acc": _none_if_nan(self.pixel_accuracy()),
            "per_class_iou": {n: _none_if_nan(v) for n, v in zip(names, self.iou())},
        }


def _none_if_nan(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
