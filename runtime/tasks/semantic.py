"""Semantic segmentation: one (B, K, H, W) logits output, argmax, mIoU and boundary metrics.

Predictions are label maps at the network's input size, the size every metric is computed at;
targets are the dataset's masks resized there with nearest neighbour (the one preprocessing
path). This is the behaviour bckd had before tasks existed, moved here unchanged.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from runtime.errors import BckdError
from runtime.tasks import register
from runtime.tasks.base import Meter, Sample, Task


def argmax_agreement(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """Fraction of pixels whose class (argmax over axis 1, NCHW logits) agrees; None if no class axis."""
    if reference.ndim < 2:
        return None
    same = reference.argmax(axis=1) == candidate.argmax(axis=1)
    return float(same.mean())


def compare_output(
    reference: np.ndarray, candidate: np.ndarray, tol: float, min_agreement: float | None = None
) -> dict:
    """Differences of one output; ``ok`` when shapes agree, max |diff| <= tol (NaN fails) and,
    with ``min_agreement``, the argmax agreement is at least that fraction."""
    if reference.shape != candidate.shape:
        return {
            "ok": False, "tol": tol, "error": "shape mismatch",
            "reference_shape": list(reference.shape), "candidate_shape": list(candidate.shape),
        }
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    agreement = argmax_agreement(reference, candidate)
    agrees = min_agreement is None or agreement is None or agreement >= min_agreement
    return {
        "max_abs_diff": max_abs,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "argmax_agreement": agreement,
        "tol": tol,
        "ok": bool(max_abs <= tol and agrees),  # False for NaN, which compares unequal to everything
    }


class SemanticMeter(Meter):
    """mIoU, pixel accuracy, per-class IoU and boundary metrics (:class:`runtime.predictions.Scores`)."""

    def __init__(self, classes: list[str], preprocess: Any) -> None:
        from runtime.predictions import Scores

        self.preprocess = preprocess
        self.scores = Scores(classes, preprocess.ignore_index)

    def update(self, indices: Sequence[int], predictions: Sequence[np.ndarray],
               samples: Sequence[Sample]) -> None:
        target = np.stack([self.preprocess.mask(m) for _, m in samples])
        self.scores.update(np.stack(predictions), target)

    def summary(self) -> dict[str, Any]:
        return self.scores.summary()


def _pct(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 2)


class SemanticTask(Task):
    name = "semantic"
    dataset_format = "folder"
    metric = "miou"
    budget_metric = "miou"
    columns = (("miou", "mIoU %", "{:.2f}"), ("boundary_f", "boundary F %", "{:.2f}"),
               ("lhd", "LHD px", "{:.3f}"))

    def postprocess(self, outputs: dict[str, np.ndarray], card: dict[str, Any] | None,
                    preprocess: Any, samples: Sequence[Sample]) -> list[np.ndarray]:
        logits = next(iter(outputs.values()))
        labels = np.argmax(logits, axis=1)
        size = tuple(getattr(preprocess, "size", labels.shape[1:]))
        if labels.shape[1:] != size:  # a model whose logits are at a stride (bare models)
            rows = (np.arange(size[0]) * labels.shape[1]) // size[0]
            cols = (np.arange(size[1]) * labels.shape[2]) // size[1]
            labels = labels[:, rows[:, None], cols[None, :]]  # nearest neighbour
        return list(labels)

    def meter(self, dataset: Any, preprocess: Any, card: dict[str, Any] | None) -> Meter:
        classes = list((card or {}).get("classes") or dataset.classes)
        return SemanticMeter(classes, preprocess)

    def compare(self, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                card: dict[str, Any] | None, tol: float = 1e-4,
                min_agreement: float | None = None) -> dict[str, Any]:
        name = next(iter(reference))
        if name not in candidate and len(candidate) == 1:
            candidate = {name: next(iter(candidate.values()))}
        if name not in candidate:
            return {"ok": False, "tol": tol, "error": "missing from the candidate"}
        return compare_output(reference[name], candidate[name], tol, min_agreement)

    def writer(self, folder: Any, manifest: dict[str, Any], force: bool = False) -> Any:
        from runtime.predictions import PredictionWriter

        return PredictionWriter(folder, manifest, force=force)

    def row(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {
            "miou": round(100 * summary["miou"], 2),
            "pixel_acc": round(100 * summary["pixel_acc"], 2),
            "boundary_f": _pct(summary["boundary_f"]), "boundary_iou": _pct(summary["boundary_iou"]),
            "lhd": None if summary["lhd"] is None else round(summary["lhd"], 3),
            "per_class_iou": {k: (None if v is None else round(100 * v, 2))
                              for k, v in summary["per_class_iou"].items()},
        }

    def check_dataset(self, dataset: Any, card: dict[str, Any] | None, model: Any) -> None:
        classes = list((card or {}).get("classes") or [])
        if classes and list(dataset.classes) != classes:
            raise BckdError(f"{model} predicts classes {classes} but the dataset has "
                            f"{list(dataset.classes)}; evaluate on the dataset the model was "
                            "trained for")


register(SemanticTask())
