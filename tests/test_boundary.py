"""Boundary F, boundary IoU and LHD: hand-computed cases, brute-force oracles, ignore, merging."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.boundary import (
    BoundaryMeter,
    boundary_f_score,
    boundary_iou,
    boundary_map,
    distance_within,
    local_hausdorff,
    resolve_tolerance,
)


ROOT = Path(__file__).resolve().parents[1]


def test_imports_with_numpy_alone() -> None:
    code = ("import sys; sys.modules['torch'] = None; sys.modules['scipy'] = None\n"
            "import runtime.boundary\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def _edge_map(edge_col: int, *, h: int = 4, w: int = 10) -> np.ndarray:
    """Class 0 left of ``edge_col``, class 1 from it on: a vertical edge, boundary cols edge-1, edge."""
    labels = np.zeros((h, w), dtype=np.int64)
    labels[:, edge_col:] = 1
    return labels


def _random_blobs(rng: np.random.Generator, shape: tuple[int, int], k: int) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.int64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for c in range(1, k):
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        r = rng.integers(2, max(3, min(shape) // 2))
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = c
    return labels


def _points(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).astype(np.float64)


def _nearest(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Brute force: for each point of ``src``, the distance to the nearest point of ``dst``."""
    if len(dst) == 0:
        return np.full(len(src), np.inf)
    return np.sqrt(((src[:, None, :] - dst[None, :, :]) ** 2).sum(-1)).min(axis=1)


# -- boundary_map -----------------------------------------------------------------------------


def test_boundary_map_marks_both_sides_of_a_label_change_and_not_the_image_border() -> None:
    edge = boundary_map(_edge_map(5))
    expected = np.zeros((4, 10), dtype=bool)
    expected[:, 4:6] = True
    np.testing.assert_array_equal(edge, expected)
    assert not boundary_map(np.full((3, 3), 7)).any()


def test_boundary_map_uses_4_neighbours_only() -> None:
    labels = np.zeros((3, 3), dtype=np.int64)
    labels[1, 1] = 1
    expected = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)  # corners touch only diagonally
    np.testing.assert_array_equal(boundary_map(labels), expected)


def test_ignore_pixels_and_changes_into_them_are_not_boundary() -> None:
    labels = np.array([[0, 0, 255, 255, 1, 1]])
    assert not boundary_map(labels, ignore_index=255).any()
    # without ignore handling the void region is a class like any other
    np.testing.assert_array_equal(boundary_map(labels), [[0, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(boundary_map(np.array([[0, 1, 255]]), ignore_index=255), [[1, 1, 0]])


# -- distance_within --------------------------------------------------------------------------


@pytest.mark.parametrize("radius", [0, 1, 1.5, 2.9, 3, 5, 7.3, 10])
def test_distance_within_matches_scipy_edt(radius: float) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(int(radius * 10))
    for _ in range(10):
        h, w = rng.integers(1, 48, size=2)
        mask = rng.random((h, w)) < rng.choice([0.0, 0.005, 0.03, 0.3])
        exact = ndimage.distance_transform_edt(~mask) if mask.any() else np.full(mask.shape, np.inf)
        expected = np.where(exact <= radius, exact, np.inf)
        np.testing.assert_array_equal(distance_within(mask, radius), expected)


def test_radii_beyond_the_image_are_exact() -> None:
    mask = np.zeros((4, 6), dtype=bool)
    mask[1, 2] = True
    far = distance_within(mask, math.inf)
    assert far[3, 5] == pytest.approx(math.sqrt(13)) and np.isfinite(far).all()
    assert np.isinf(distance_within(np.zeros((4, 6), dtype=bool), 1e9)).all()
    # a huge tolerance puts every mask pixel in the band: boundary IoU becomes plain IoU over the
    # classes that have a contour
    target, pred = _edge_map(5), _edge_map(6)
    assert boundary_iou(pred, target, 2, tolerance=1e6) == pytest.approx((5 / 6 + 4 / 5) / 2)
    assert local_hausdorff(np.zeros((3, 3), dtype=int), _edge_map(1, h=3, w=3), radius=1e3) == 1e3


def test_distance_within_is_euclidean() -> None:
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, 0] = True
    d = distance_within(mask, 3)
    assert d[1, 1] == pytest.approx(math.sqrt(2))
    assert d[2, 2] == pytest.approx(math.sqrt(8))
    assert d[0, 3] == 3.0
    assert d[2, 3] == np.inf  # sqrt(13) > 3


# -- hand-computed cases ----------------------------------------------------------------------


def test_one_pixel_edge_shift_hand_computed() -> None:
    target, pred = _edge_map(5), _edge_map(6)
    # boundary columns: target {4, 5}, pred {5, 6}; col 5 is shared, cols 4 and 6 are 1 px away
    exact = boundary_f_score(pred, target, tolerance=0)
    assert exact == pytest.approx({"precision": 0.5, "recall": 0.5, "f": 0.5})
    assert boundary_f_score(pred, target, tolerance=1)["f"] == 1.0
    # d_G over pred boundary: (0 + 1) / 2; d_P over target boundary: (1 + 0) / 2
    assert local_hausdorff(pred, target) == pytest.approx(0.5)
    assert local_hausdorff(pred, target, aggregate="max") == pytest.approx(0.5)
    assert local_hausdorff(_edge_map(7), target) == pytest.approx(1.5)  # {6, 7} vs {4, 5}: 2 and 1 px


def test_edge_shift_boundary_iou_hand_computed() -> None:
    target, pred = _edge_map(5), _edge_map(6)
    # tolerance 1: class 0 bands are cols {3, 4} vs {4, 5}, class 1 bands {5, 6} vs {6, 7}: 1/3 each
    assert boundary_iou(pred, target, 2, tolerance=1) == pytest.approx(1 / 3)
    # tolerance 0: the bands are the contours themselves, disjoint
    assert boundary_iou(pred, target, 2, tolerance=0) == 0.0


def test_lhd_is_truncated_at_the_radius() -> None:
    target, pred = _edge_map(2, w=30), _edge_map(20, w=30)  # boundaries 18 px apart
    assert local_hausdorff(pred, target, radius=5) == 5.0
    assert local_hausdorff(pred, target, radius=3) == 3.0


def test_identical_maps_are_perfect() -> None:
    labels = _random_blobs(np.random.default_rng(0), (40, 50), 5)
    assert boundary_f_score(labels, labels) == {"precision": 1.0, "recall": 1.0, "f": 1.0}
    assert boundary_iou(labels, labels, 5) == 1.0
    assert local_hausdorff(labels, labels) == 0.0


def test_empty_boundary_edge_cases() -> None:
    flat, edged = np.zeros((6, 6), dtype=np.int64), _edge_map(3, h=6, w=6)
    assert local_hausdorff(flat, flat) == 0.0
    assert local_hausdorff(flat, edged, radius=5) == 5.0
    assert local_hausdorff(edged, flat, radius=4, aggregate="max") == 4.0
    assert boundary_f_score(flat, flat)["f"] == 1.0
    assert boundary_f_score(flat, edged) == {"precision": 1.0, "recall": 0.0, "f": 0.0}
    assert boundary_f_score(edged, flat) == {"precision": 0.0, "recall": 1.0, "f": 0.0}
    assert math.isnan(boundary_iou(flat, flat, 2))


# -- brute-force oracles on random maps -------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_metrics_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    target = _random_blobs(rng, (24, 30), 4)
    pred = np.roll(_random_blobs(rng, (24, 30), 4) if seed % 2 else target, rng.integers(-3, 4), axis=1)
    bp, bg = _points(boundary_map(pred)), _points(boundary_map(target))
    tol, r = 2.0, 5.0
    prf = boundary_f_score(pred, target, tolerance=tol)
    if len(bp) and len(bg):
        assert prf["precision"] == pytest.approx((_nearest(bp, bg) <= tol).mean())
        assert prf["recall"] == pytest.approx((_nearest(bg, bp) <= tol).mean())
        dg, dp = np.minimum(_nearest(bp, bg), r).mean(), np.minimum(_nearest(bg, bp), r).mean()
        assert local_hausdorff(pred, target, radius=r) == pytest.approx(0.5 * (dg + dp))
        assert local_hausdorff(pred, target, radius=r, aggregate="max") == pytest.approx(max(dg, dp))
    ious = []
    for c in range(4):
        bands = []
        for labels in (target, pred):
            mask = labels == c
            contour = _points(boundary_map(labels) & mask)
            near = _nearest(_points(np.ones(mask.shape, dtype=bool)), contour).reshape(mask.shape) <= tol
            bands.append(mask & near)
        union = (bands[0] | bands[1]).sum()
        if union:
            ious.append((bands[0] & bands[1]).sum() / union)
    assert boundary_iou(pred, target, 4, tolerance=tol) == pytest.approx(np.mean(ious))


def test_lhd_is_symmetric() -> None:
    rng = np.random.default_rng(3)
    a, b = _random_blobs(rng, (32, 32), 4), _random_blobs(rng, (32, 32), 4)
    for aggregate in ("mean", "max"):
        assert local_hausdorff(a, b, aggregate=aggregate) == pytest.approx(
            local_hausdorff(b, a, aggregate=aggregate))
    assert boundary_f_score(a, b)["f"] == pytest.approx(boundary_f_score(b, a)["f"])
    assert boundary_iou(a, b, 4) == pytest.approx(boundary_iou(b, a, 4))


# -- ignore handling --------------------------------------------------------------------------


def test_prediction_edges_inside_void_are_not_scored() -> None:
    target = _edge_map(5, w=12)
    target[:, 7:10] = 255
    pred = target.copy()
    pred[:, 7:10] = [0, 1, 0]  # noise inside the void region, and edges against it
    assert boundary_f_score(pred, target, ignore_index=255)["f"] == 1.0
    assert local_hausdorff(pred, target, ignore_index=255) == 0.0
    assert boundary_iou(pred, target, 2, ignore_index=255) == 1.0
    assert boundary_f_score(pred, target, tolerance=0)["f"] < 1.0  # without ignore, void is a class


def test_prediction_may_not_hold_the_ignore_index() -> None:
    target = _edge_map(5)
    with pytest.raises(ValueError, match="ignore_index 255"):
        boundary_f_score(np.full_like(target, 255), target, ignore_index=255)


# -- tolerance and validation -----------------------------------------------------------------


def test_tolerance_as_a_fraction_of_the_diagonal() -> None:
    assert resolve_tolerance(0.0075, "diag", (1024, 2048)) == pytest.approx(0.0075 * math.hypot(1024, 2048))
    assert resolve_tolerance(3, "px", (1024, 2048)) == 3.0
    target, pred = _edge_map(5, w=400), _edge_map(7, w=400)  # diagonal ~400, 1-2 px apart
    assert boundary_f_score(pred, target, tolerance=0.005, tolerance_unit="diag")["f"] == 1.0
    assert boundary_f_score(pred, target, tolerance=0.001, tolerance_unit="diag")["f"] < 1.0
    with pytest.raises(ValueError, match="valid: px, diag"):
        resolve_tolerance(1, "percent", (4, 4))


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="integer class indices"):
        boundary_f_score(np.zeros((4, 4)), np.zeros((4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="does not match"):
        local_hausdorff(np.zeros((4, 4), dtype=int), np.zeros((4, 5), dtype=int))
    with pytest.raises(ValueError, match="2-D"):
        boundary_map(np.zeros((2, 4, 4), dtype=int))
    with pytest.raises(ValueError, match=r"class 3, outside \[0, 3\)"):
        boundary_iou(_edge_map(5) * 3, _edge_map(5), 3)
    with pytest.raises(ValueError, match="valid: mean, max"):
        local_hausdorff(_edge_map(5), _edge_map(5), aggregate="median")


# -- BoundaryMeter ----------------------------------------------------------------------------


def test_meter_sums_counts_over_images() -> None:
    meter = BoundaryMeter(2, tolerance=0)
    meter.update(_edge_map(6), _edge_map(5))  # 4 of 8 pred boundary pixels match, 4 of 8 target
    meter.update(_edge_map(5), _edge_map(5))  # all 8 of 8 match
    s = meter.summary()
    assert s["images"] == 2
    assert s["boundary_precision"] == pytest.approx(12 / 16)
    assert s["boundary_recall"] == pytest.approx(12 / 16)
    assert s["boundary_f"] == pytest.approx(0.75)
    assert s["boundary_f_image_mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["lhd"] == pytest.approx((0.5 + 0.0) / 2)
    # per class: band intersections summed over images (0 + 4), unions (8 + 4)
    assert s["boundary_iou"] == pytest.approx(4 / 12)


def test_meter_matches_the_per_image_functions_and_takes_a_separate_lhd_reference() -> None:
    rng = np.random.default_rng(7)
    target = _random_blobs(rng, (30, 30), 4)
    target[:5] = 255
    pred, teacher = _random_blobs(rng, (30, 30), 4), _random_blobs(rng, (30, 30), 4)
    meter = BoundaryMeter(4, tolerance=2, lhd_radius=4)
    meter.update(pred, target, reference=teacher)
    s = meter.summary()
    per_image = boundary_f_score(pred, target, tolerance=2, ignore_index=255)
    assert s["boundary_f"] == pytest.approx(per_image["f"])
    assert s["boundary_iou"] == pytest.approx(boundary_iou(pred, target, 4, tolerance=2, ignore_index=255))
    masked_teacher = np.where(target == 255, 255, teacher)
    assert s["lhd"] == pytest.approx(local_hausdorff(pred, masked_teacher, radius=4, ignore_index=255))


def test_merge_equals_a_single_pass() -> None:
    rng = np.random.default_rng(11)
    pairs = [(_random_blobs(rng, (20, 24), 3), _random_blobs(rng, (20, 24), 3)) for _ in range(6)]
    whole, first, second = (BoundaryMeter(3) for _ in range(3))
    for i, (pred, target) in enumerate(pairs):
        whole.update(pred, target)
        (first if i < 2 else second).update(pred, target)
    merged, single = first.merge(second).summary(), whole.summary()
    assert merged.pop("settings") == single.pop("settings")
    assert merged == pytest.approx(single)
    with pytest.raises(ValueError, match="cannot merge"):
        whole.merge(BoundaryMeter(3, tolerance=2))


def test_empty_meter_summary() -> None:
    s = BoundaryMeter(3).summary()
    assert s["images"] == 0 and s["boundary_f"] is None and s["lhd"] is None
