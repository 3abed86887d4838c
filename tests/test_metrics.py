"""Streaming confusion-matrix metrics: hand-computed numbers, ignore handling, merging."""
from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.metrics import ConfusionMatrix


def test_hand_computed_confusion_and_scores() -> None:
    target = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    # rows = ground truth, columns = prediction
    np.testing.assert_array_equal(cm.matrix, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    # IoU: class 0: 1 / (2 + 2 - 1); class 1: 2 / (2 + 3 - 2); class 2: 1 / (2 + 1 - 1)
    np.testing.assert_allclose(cm.iou(), [1 / 3, 2 / 3, 1 / 2])
    assert cm.miou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert cm.pixel_accuracy() == pytest.approx(4 / 6)
    s = cm.summary(["a", "b", "c"])
    assert s["miou"] == pytest.approx(0.5)
    assert s["per_class_iou"] == pytest.approx({"a": 1 / 3, "b": 2 / 3, "c": 0.5})


def test_ignore_pixels_are_skipped() -> None:
    target = np.array([0, 255, 1, 255])
    pred = np.array([0, 1, 1, 0])
    cm = ConfusionMatrix(2, ignore_index=255)
    cm.update(pred, target)
    np.testing.assert_array_equal(cm.matrix, [[1, 0], [0, 1]])
    assert cm.pixel_accuracy() == 1.0


def test_absent_class_is_nan_and_left_out_of_miou() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1, 1]), np.array([0, 1, 0]))
    iou = cm.iou()
    assert math.isnan(iou[2])
    assert cm.miou() == pytest.approx((0.5 + 0.5) / 2)
    assert cm.summary(["x", "y", "z"])["per_class_iou"]["z"] is None


def test_merge_equals_single_pass() -> None:
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 4, size=(5, 7)) for _ in range(3)]
    targets = [np.where(rng.random((5, 7)) < 0.1, 255, rng.integers(0, 4, size=(5, 7))) for _ in range(3)]
    whole = ConfusionMatrix(4)
    whole.update(np.stack(preds), np.stack(targets))
    parts = [ConfusionMatrix(4) for _ in range(3)]
    for cm, p, t in zip(parts, preds, targets):
        cm.update(p, t)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    np.testing.assert_array_equal(merged.matrix, whole.matrix)
    assert merged.miou() == pytest.approx(whole.miou())


def test_perfect_prediction_scores_one() -> None:
    target = np.random.default_rng(1).integers(0, 5, size=(2, 16, 16)).astype(np.uint8)
    cm = ConfusionMatrix(5)
    cm.update(target.astype(np.int64), target)
    assert cm.miou() == 1.0
    assert cm.pixel_accuracy() == 1.0


def test_memory_stays_k_squared() -> None:
    cm = ConfusionMatrix(3)
    for _ in range(20):
        cm.update(np.zeros((64, 64), np.int64), np.zeros((64, 64), np.uint8))
    assert cm.matrix.shape == (3, 3) and cm.matrix[0, 0] == 20 * 64 * 64


@pytest.mark.parametrize(
    "pred, target, match",
    [
        (np.array([0, 3]), np.array([0, 1]), "prediction holds class 3"),
        (np.array([0, -1]), np.array([0, 1]), "prediction holds class -1"),
        (np.array([0, 255]), np.array([0, 255]), "prediction holds class 255"),
        (np.array([0, 1]), np.array([0, 7]), "target holds class 7"),
        (np.array([0, 1, 2]), np.array([0, 1]), "does not match"),
        (np.array([0.0, 1.0]), np.array([0, 1]), "integer class indices"),
    ],
)
def test_invalid_inputs_raise_value_error(pred: np.ndarray, target: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ConfusionMatrix(3).update(pred, target)


def test_merge_refuses_different_class_counts() -> None:
    with pytest.raises(ValueError, match="cannot merge"):
        ConfusionMatrix(3).merge(ConfusionMatrix(4))


def test_empty_matrix_summary_is_none() -> None:
    s = ConfusionMatrix(2).summary(["a", "b"])
    assert s == {"miou": None, "pixel_acc": None, "per_class_iou": {"a": None, "b": None}}
