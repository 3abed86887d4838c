"""Boundary-quality metrics for label maps: boundary F-score, boundary IoU and LHD.

All three start from :func:`boundary_map` (which pixels lie on a label boundary). Boundary F and
LHD then need the distance from one boundary to the other, truncated at a few pixels:
:func:`distance_within`, an exact Euclidean transform in O(H·W·R) for radius R. Boundary IoU needs
each pixel's distance to the contour of its *own* class, found in one pass per offset of the disk
of radius R (O(H·W·R²), every class at once). Numpy only, no scipy.

Conventions shared by every function here (method.md §5.2):

* A pixel is a *boundary* pixel when one of its 4-neighbours holds a different label. Both sides of
  a label change are boundary, so a straight edge gives a 2-pixel-wide boundary. The image border
  is not a boundary.
* ``ignore_index`` pixels are never boundary, and a label change *into* an ignore pixel does not
  make its neighbour a boundary: void regions are not edges of the classes around them. When
  scoring against a target with ignore pixels, the same pixels are first set to ignore in the
  prediction too, so both maps are judged on the same valid area.
* "Within distance d" means Euclidean distance <= d between pixel centres; d may be fractional
  and is not rounded.

:class:`BoundaryMeter` streams all three over a dataset, like
:class:`runtime.metrics.ConfusionMatrix`: ``update(pred, target)`` per image, ``merge``,
``summary``. Scores are fractions in [0, 1], except LHD, which is in pixels.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

_AGGREGATES = ("mean", "max")
_TOLERANCE_UNITS = ("px", "diag")
_FAR = np.iinfo(np.int32).max  # squared distance meaning "no set pixel within the radius"


def boundary_map(labels: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """Bool map of pixels with a 4-neighbour of a different label (see the module conventions).

    With ``ignore_index`` set, ignore pixels are not boundary and a neighbour that is ignore does
    not count as a different label.
    """
    labels = _as_label_map("labels", labels)
    valid = np.ones(labels.shape, dtype=bool) if ignore_index is None else labels != ignore_index
    out = np.zeros(labels.shape, dtype=bool)
    for axis in (0, 1):
        a = [slice(None)] * 2
        b = [slice(None)] * 2
        a[axis], b[axis] = slice(None, -1), slice(1, None)
        a, b = tuple(a), tuple(b)
        change = (labels[a] != labels[b]) & valid[a] & valid[b]
        out[a] |= change
        out[b] |= change
    return out


def distance_within(mask: np.ndarray, radius: float) -> np.ndarray:
    """Euclidean distance from each pixel to the nearest True pixel of ``mask``, ``inf`` beyond ``radius``.

    Exact: it equals ``scipy.ndimage.distance_transform_edt(~mask)`` wherever that is <= radius.
    """
    d2 = _squared_distance(mask, radius)
    out = np.sqrt(d2, dtype=np.float64)
    out[d2 == _FAR] = np.inf
    return out


def _squared_distance(mask: np.ndarray, radius: float) -> np.ndarray:
    """Squared distance to the nearest True pixel (int32), or ``_FAR`` where none is within ``radius``.

    Separable: a vertical pass finds, per column, the distance g to the nearest set pixel in that
    column (capped just past the radius); a horizontal pass takes min over |dx| <= radius of
    dx² + g², since any set pixel within the radius is at most ``radius`` rows and columns away.
    Cost O(H·W·radius), all in whole-array shifts.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if not radius >= 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    radius = min(float(radius), math.hypot(*mask.shape))  # no distance exceeds the diagonal
    reach = int(math.floor(radius))
    vertical = _column_distance(mask, reach)
    best = vertical * vertical
    columns = best.copy()
    for dx in range(1, min(reach, mask.shape[1] - 1) + 1):
        step = columns + dx * dx
        np.minimum(best[:, dx:], step[:, :-dx], out=best[:, dx:])
        np.minimum(best[:, :-dx], step[:, dx:], out=best[:, :-dx])
    best[best > radius * radius] = _FAR
    return best


def _within(d2: np.ndarray, tol: float) -> np.ndarray:
    """Which squared distances (from :func:`_squared_distance`) are <= ``tol``."""
    return d2 <= min(tol * tol, _FAR - 1)


def _clipped(d2: np.ndarray, radius: float) -> np.ndarray:
    """Distances min(d, radius) from squared distances, ``_FAR`` counting as beyond the radius."""
    return np.where(d2 == _FAR, radius, np.minimum(np.sqrt(d2), radius))


def _column_distance(mask: np.ndarray, reach: int) -> np.ndarray:
    """|y - y'| to the nearest set pixel y' in its column, or reach + 1 if none is within reach (int32).

    Counted as the number of k in 0..reach whose vertical k-neighbourhood holds no set pixel.
    """
    near = mask.copy()
    far = (~near).astype(np.int32)
    for dy in range(1, min(reach, mask.shape[0] - 1) + 1):
        near[dy:] |= mask[:-dy]
        near[:-dy] |= mask[dy:]
        far += ~near
    if reach >= mask.shape[0]:  # rows ran out: what is still not near never will be
        far += (reach + 1 - mask.shape[0]) * (~near)
    return far


def resolve_tolerance(tolerance: float, unit: str, shape: tuple[int, ...]) -> float:
    """Tolerance in pixels: ``tolerance`` itself for unit "px", ``tolerance`` x image diagonal for "diag"."""
    if unit not in _TOLERANCE_UNITS:
        raise ValueError(f"unknown tolerance unit '{unit}' (valid: {', '.join(_TOLERANCE_UNITS)})")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    return float(tolerance) if unit == "px" else float(tolerance) * math.hypot(*shape[:2])


# ---------------------------------------------------------------------------------------------
# Per-image metrics. Each takes the two label maps; BoundaryMeter shares the work between them.


def boundary_f_score(
    pred: np.ndarray, target: np.ndarray, *, tolerance: float = 3.0, tolerance_unit: str = "px",
    ignore_index: int | None = None,
) -> dict[str, float]:
    """Boundary precision, recall and F of one image (Perazzi et al. 2016 / DAVIS "F").

    Precision is the fraction of predicted boundary pixels within ``tolerance`` of a target boundary
    pixel, recall the converse, F = 2PR / (P + R). With no predicted boundary, P = 1; with no target
    boundary, R = 1 (the DAVIS rule), so both empty gives F = 1 and exactly one empty gives F = 0.
    """
    pair = _Pair(pred, target, ignore_index)
    tol = resolve_tolerance(tolerance, tolerance_unit, pair.shape)
    counts = _match_counts(pair, tol)
    return _prf(*counts)


def boundary_iou(
    pred: np.ndarray, target: np.ndarray, num_classes: int, *, tolerance: float = 3.0,
    tolerance_unit: str = "px", ignore_index: int | None = None,
) -> float:
    """Boundary IoU of one image (Cheng et al. 2021), mean over classes present; NaN if none is.

    Per class c, with M_d = the pixels of mask M within ``tolerance`` of M's contour,
    IoU_c = |G_d ∩ P_d| / |G_d ∪ P_d|, G and P the target and predicted masks of c. A class is
    present when that union is non-empty. Unlike the reference implementation (a d-fold 3x3 erosion
    of a zero-padded mask), distances are Euclidean, the band includes the contour itself (so
    tolerance 0 gives the contour), and the image border is not a contour.
    """
    pair = _Pair(pred, target, ignore_index)
    tol = resolve_tolerance(tolerance, tolerance_unit, pair.shape)
    inter, union = _iou_counts(pair, num_classes, tol)
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else float("nan")


def local_hausdorff(
    pred: np.ndarray, reference: np.ndarray, *, radius: float = 5.0, aggregate: str = "mean",
    ignore_index: int | None = None,
) -> float:
    """Local Hausdorff distance (method.md §5.2 [RECON]) of one image, in pixels.

    d_G(p) = min(distance from p to the nearest reference-boundary pixel, ``radius``), and d_P
    likewise. ``aggregate="mean"`` gives ½[mean_{p∈∂P} d_G(p) + mean_{q∈∂G} d_P(q)]; ``"max"``
    gives the larger of the two directed means. Both boundaries empty gives 0; exactly one empty
    gives ``radius`` (every point of the other is "not found").

    ``reference`` is whatever the caller compares against. The paper's tables list the teacher at
    0.00, which implies the teacher's prediction is the reference there; ground truth is the other
    choice. Ignore pixels of ``reference`` (if ``ignore_index`` is set) are masked in both maps.
    """
    _check_aggregate(aggregate)
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    pair = _Pair(pred, reference, ignore_index)
    return _lhd(pair, float(radius), aggregate)


class _Pair:
    """A prediction and a target of one image with their boundaries, and distance maps on demand."""

    def __init__(self, pred: np.ndarray, target: np.ndarray, ignore_index: int | None) -> None:
        pred, target = _as_label_map("prediction", pred), _as_label_map("target", target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {pred.shape} does not match target shape {target.shape}")
        if ignore_index is not None:
            void = target == ignore_index
            if np.any((pred == ignore_index) & ~void):
                raise ValueError(f"prediction holds ignore_index {ignore_index} outside the target's "
                                 "ignore pixels; only targets may hold it")
            pred = np.where(void, ignore_index, pred)
        self.pred, self.target, self.ignore_index = pred, target, ignore_index
        self.shape = pred.shape
        self.pred_edge = boundary_map(pred, ignore_index)
        self.target_edge = boundary_map(target, ignore_index)
        self._d2: dict[str, tuple[float, np.ndarray]] = {}

    def squared_gaps(self, src: str, dst: str, radius: float) -> np.ndarray:
        """Squared distance from each boundary pixel of ``src`` to the nearest of ``dst`` ("pred" or
        "target"), ``_FAR`` where none is within ``radius``."""
        cached = self._d2.get(dst)
        if cached is None or cached[0] < radius:  # a map made for a wider radius serves a narrower one
            cached = (radius, _squared_distance(self._edge(dst), radius))
            self._d2[dst] = cached
        return cached[1][self._edge(src)]

    def _edge(self, which: str) -> np.ndarray:
        return self.pred_edge if which == "pred" else self.target_edge


def _match_counts(pair: _Pair, tol: float) -> tuple[int, int, int, int]:
    """(pred boundary pixels matched, pred boundary pixels, target matched, target boundary pixels)."""
    to_target = pair.squared_gaps("pred", "target", tol)
    to_pred = pair.squared_gaps("target", "pred", tol)
    return (int(np.count_nonzero(_within(to_target, tol))), int(to_target.size),
            int(np.count_nonzero(_within(to_pred, tol))), int(to_pred.size))


def _prf(pred_hit: int, pred_total: int, target_hit: int, target_total: int) -> dict[str, float]:
    precision = pred_hit / pred_total if pred_total else 1.0
    recall = target_hit / target_total if target_total else 1.0
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f": f}


def _lhd(pair: _Pair, radius: float, aggregate: str) -> float:
    n_pred, n_target = int(pair.pred_edge.sum()), int(pair.target_edge.sum())
    if n_pred == 0 and n_target == 0:
        return 0.0
    if n_pred == 0 or n_target == 0:
        return radius
    to_target = _clipped(pair.squared_gaps("pred", "target", radius), radius).mean()
    to_pred = _clipped(pair.squared_gaps("target", "pred", radius), radius).mean()
    return float(max(to_target, to_pred) if aggregate == "max" else 0.5 * (to_target + to_pred))


def _iou_counts(pair: _Pair, num_classes: int, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-class boundary-band intersection and union pixel counts (int64, length num_classes).

    The bands of all classes are disjoint (each pixel belongs to its own label's mask), so one
    class-agnostic band map per label map gives every class's band at once.
    """
    _check_classes(pair, num_classes)
    band_t = _own_class_band(pair.target, pair.target_edge, tol)
    band_p = _own_class_band(pair.pred, pair.pred_edge, tol)
    both = band_t & band_p & (pair.target == pair.pred)
    inter = np.bincount(pair.target[both], minlength=num_classes)
    size_t = np.bincount(pair.target[band_t], minlength=num_classes)
    size_p = np.bincount(pair.pred[band_p], minlength=num_classes)
    return inter, size_t + size_p - inter


def _own_class_band(labels: np.ndarray, edge: np.ndarray, tol: float) -> np.ndarray:
    """Pixels within ``tol`` of a boundary pixel of their own label, i.e. of their mask's contour.

    Ignore pixels are never in it: they are not boundary, and no boundary pixel holds their label.
    One pass per integer offset in the disk of radius ``tol``: O(H·W·tol²), fast for a few pixels.
    """
    h, w = labels.shape
    fits_byte = labels.size > 0 and labels.min() >= 0 and labels.max() <= 255
    compact = labels.astype(np.uint8) if fits_byte else labels  # cheaper comparisons
    reach = int(math.floor(min(tol, max(h, w))))
    padded, padded_edge = np.pad(compact, reach), np.pad(edge, reach)
    out = edge.copy()
    for dy in range(-min(reach, h - 1), min(reach, h - 1) + 1):
        for dx in range(-min(reach, w - 1), min(reach, w - 1) + 1):
            if (dy or dx) and dy * dy + dx * dx <= tol * tol:
                window = (slice(reach + dy, reach + dy + h), slice(reach + dx, reach + dx + w))
                out |= padded_edge[window] & (padded[window] == compact)
    return out


def _check_classes(pair: _Pair, num_classes: int) -> None:
    """Both maps may hold classes in [0, num_classes) only, or the ignore index where the target does."""
    valid = pair.target != pair.ignore_index if pair.ignore_index is not None else True
    for labels in (pair.pred, pair.target):
        bad = ((labels < 0) | (labels >= num_classes)) & valid
        if bad.any():
            raise ValueError(f"label maps hold class {int(labels[bad][0])}, outside [0, {num_classes}) "
                             f"(ignore_index {pair.ignore_index} is the only other value allowed)")


def _as_label_map(name: str, arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D label map (H, W), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype} "
                         "(take the argmax of the logits first)")
    return arr


def _check_aggregate(aggregate: str) -> None:
    if aggregate not in _AGGREGATES:
        raise ValueError(f"unknown LHD aggregate '{aggregate}' (valid: {', '.join(_AGGREGATES)})")


# ---------------------------------------------------------------------------------------------


class BoundaryMeter:
    """Streaming boundary F, boundary IoU and LHD over a dataset.

    * ``boundary_f`` (headline), ``boundary_precision``, ``boundary_recall``: from boundary-pixel
      match counts summed over all images, so large images weigh more; ``boundary_f_image_mean`` is
      the mean of per-image F (the DAVIS-style number) for comparison.
    * ``boundary_iou``: per-class band intersections and unions summed over images, then the mean
      over classes whose union is non-empty (like mIoU from a confusion matrix).
    * ``lhd``: mean over images of the per-image LHD, in pixels (method.md §5.2).

    ``tolerance`` (F and boundary IoU) is in pixels, or a fraction of each image's diagonal with
    ``tolerance_unit="diag"`` (e.g. 0.0075). ``lhd_radius`` is r of the LHD, in pixels.
    """

    def __init__(
        self, num_classes: int, ignore_index: int = 255, tolerance: float = 3.0, lhd_radius: float = 5.0,
        *, tolerance_unit: str = "px", lhd_aggregate: str = "mean",
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        resolve_tolerance(tolerance, tolerance_unit, (1, 1))  # validates both
        if not lhd_radius > 0:
            raise ValueError(f"lhd_radius must be > 0, got {lhd_radius}")
        _check_aggregate(lhd_aggregate)
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.tolerance, self.tolerance_unit = float(tolerance), tolerance_unit
        self.lhd_radius, self.lhd_aggregate = float(lhd_radius), lhd_aggregate
        self.reset()

    def reset(self) -> None:
        self.match = np.zeros(4, dtype=np.int64)  # pred hit, pred total, target hit, target total
        self.inter = np.zeros(self.num_classes, dtype=np.int64)
        self.union = np.zeros(self.num_classes, dtype=np.int64)
        self.f_sum = 0.0
        self.lhd_sum = 0.0
        self.images = 0

    def update(self, pred: np.ndarray, target: np.ndarray, reference: np.ndarray | None = None) -> None:
        """Score one image: 2-D integer label maps of the same shape.

        ``target`` (ground truth, may hold ``ignore_index``) is the reference of all three metrics,
        unless ``reference`` is given (e.g. the teacher's prediction): then LHD is measured against
        ``reference`` instead, with the target's ignore pixels masked in both.
        """
        pair = _Pair(pred, target, self.ignore_index)
        tol = resolve_tolerance(self.tolerance, self.tolerance_unit, pair.shape)
        if reference is None:
            wide = max(tol, self.lhd_radius)  # one transform per boundary serves F and LHD
            pair.squared_gaps("pred", "target", wide)
            pair.squared_gaps("target", "pred", wide)
            lhd_pair = pair
        else:
            lhd_pair = self._reference_pair(pair, reference)
        counts = _match_counts(pair, tol)
        inter, union = _iou_counts(pair, self.num_classes, tol)
        lhd = _lhd(lhd_pair, self.lhd_radius, self.lhd_aggregate)
        self.match += counts
        self.f_sum += _prf(*counts)["f"]
        self.inter += inter
        self.union += union
        self.lhd_sum += lhd
        self.images += 1

    def _reference_pair(self, pair: _Pair, reference: np.ndarray) -> _Pair:
        """The prediction against ``reference``, both with the target's ignore pixels masked."""
        reference = _as_label_map("reference", reference)
        if reference.shape != pair.shape:
            raise ValueError(f"reference shape {reference.shape} does not match target shape {pair.shape}")
        void = pair.target == self.ignore_index
        return _Pair(pair.pred, np.where(void, self.ignore_index, reference), self.ignore_index)

    def merge(self, other: "BoundaryMeter") -> "BoundaryMeter":
        """Add ``other``'s counts into this meter (in place) and return self; settings must match."""
        if other._settings() != self._settings():
            raise ValueError(f"cannot merge a meter with settings {other._settings()} into one with "
                             f"{self._settings()}")
        self.match += other.match
        self.inter += other.inter
        self.union += other.union
        self.f_sum += other.f_sum
        self.lhd_sum += other.lhd_sum
        self.images += other.images
        return self

    def _settings(self) -> dict[str, Any]:
        return dict(num_classes=self.num_classes, ignore_index=self.ignore_index,
                    tolerance=self.tolerance, tolerance_unit=self.tolerance_unit,
                    lhd_radius=self.lhd_radius, lhd_aggregate=self.lhd_aggregate)

    def summary(self) -> dict[str, Any]:
        """JSON-ready scores (None where nothing was scored) and the settings that produced them."""
        if not self.images:
            scores: dict[str, Any] = dict.fromkeys(
                ("boundary_f", "boundary_precision", "boundary_recall", "boundary_f_image_mean",
                 "boundary_iou", "lhd"))
            return {**scores, "images": 0, "settings": self._settings()}
        prf = _prf(*(int(v) for v in self.match))
        present = self.union > 0
        biou = float((self.inter[present] / self.union[present]).mean()) if present.any() else None
        return {
            "boundary_f": prf["f"],
            "boundary_precision": prf["precision"],
            "boundary_recall": prf["recall"],
            "boundary_f_image_mean": self.f_sum / self.images,
            "boundary_iou": biou,
            "lhd": self.lhd_sum / self.images,
            "images": self.images,
            "settings": self._settings(),
        }
