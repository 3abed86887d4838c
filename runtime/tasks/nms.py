"""Host-side NMS for dense detectors (numpy only), bit-compatible with the ONNX NMS graph.

:func:`host_nms` runs the one postprocess algorithm of bckd (contract §4) that
``export/nms_graph.py`` builds from standard ONNX ops, so a raw-head engine plus host NMS and an
engine with NMS in the graph give the same detections:

1. ``m`` = max over classes of ``scores`` [B, N]. ``pre_top_k`` dummy candidates (box 0, score 0)
   are appended so there are always at least ``pre_top_k``; the top ``pre_top_k`` by ``m``
   (descending, ties to the lower index) are gathered.
2. Per-class NMS with ONNX Runtime's ``NonMaxSuppression`` semantics (below), at most
   ``max_dets`` boxes per class.
3. The selected (class, candidate) pairs compete for ``max_dets`` rows by score (ties to the lower
   flat index ``class * pre_top_k + candidate``).
4. The fixed layout :data:`DETECTION_OUTPUTS` (+ ``masks``): ``num_dets [B,1] int32``,
   ``boxes [B,K,4] float32``, ``scores [B,K] float32``, ``labels [B,K] int32``; padding rows are
   box 0, score 0, label -1; ``masks [B,K,h,w] float32`` = sigmoid(coeffs . proto), 0 on padding.

ONNX Runtime's CPU ``NonMaxSuppression`` (``core/providers/cpu/object_detection/
non_max_suppression.cc``; probed against onnxruntime 1.32), reproduced here exactly:

* A box is a candidate of a class only if its score is **strictly greater** than
  ``score_threshold`` (the ONNX spec text says "less than ... removed"; ORT and OpenVINO both drop
  a score equal to the threshold). So the dummy candidates (score 0) are never selected when the
  threshold is >= 0, which :class:`NMSSettings` enforces.
* Candidates are visited by score, descending, **ties to the lower box index**.
* A candidate is suppressed only if its IoU with an already selected box of the class is
  **strictly greater** than ``iou_threshold``. IoU is float32: each box is first normalised to
  (min, max) per axis, so any diagonal corner pair works (flipped corners are the same box);
  boxes that merely touch (intersection width or height <= 0) never suppress each other, so a
  degenerate (zero-area) box can be selected but never suppresses or is suppressed;
  union = (area_candidate + area_selected) - intersection.
* Selection stops at ``max_output_boxes_per_class`` boxes per class.

OpenVINO's CPU NMS differs in one respect: it suppresses at IoU **>=** the threshold, so a pair
whose float32 IoU equals the threshold exactly is kept by ORT and here, suppressed by OpenVINO
(``export.nms_graph.for_openvino`` compensates by one float32 step in the threshold).
OpenVINO's TopK is also not stable for equal values, so exactly tied scores may order (and, at the
``pre_top_k`` / ``max_dets`` cut-offs, select) differently there.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from runtime.errors import BckdError
from runtime.registry import check_known

DETECTION_OUTPUTS = ("num_dets", "boxes", "scores", "labels")
MASK_OUTPUT = "masks"
# TensorRT's TopK takes K <= 3840 (detection.md §1.5.3); the graph's two TopKs use these settings.
MAX_TOP_K = 3840
# Pair IoUs computed per block in :func:`_pairs_within`, which bounds host memory.
_PAIR_BLOCK = 1 << 20
# Ranks per class decided together in :func:`_per_class_nms`: one window for typical heads, and
# few when low thresholds leave hundreds of candidates per class (a class stops at max_dets).
_WINDOW = 128


@dataclasses.dataclass(frozen=True)
class NMSSettings:
    """Thresholds and sizes of the postprocess; recorded in the card under ``postprocess``.

    ``score_threshold``: a class score must exceed it (strictly) to be a candidate; in [0, 1].
    ``iou_threshold``: a box whose IoU with a kept box of its class exceeds it is dropped; [0, 1].
    ``pre_top_k``: candidates kept by max-class score before NMS. ``max_dets``: rows per image (K),
    also the per-class NMS limit.
    """

    score_threshold: float = 0.05
    iou_threshold: float = 0.6
    pre_top_k: int = 1000
    max_dets: int = 100

    def __post_init__(self) -> None:
        for name in ("score_threshold", "iou_threshold"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= float(value) <= 1.0:
                raise BckdError(f"NMS {name} must be a number in [0, 1], got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("pre_top_k", "max_dets"):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= MAX_TOP_K:
                raise BckdError(f"NMS {name} must be an integer in [1, {MAX_TOP_K}] (TensorRT's "
                                f"TopK limit), got {value!r}")
        if self.max_dets > self.pre_top_k:
            raise BckdError(f"NMS max_dets ({self.max_dets}) must not exceed pre_top_k "
                            f"({self.pre_top_k}); raise pre_top_k or lower max_dets")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NMSSettings":
        """Settings from :meth:`to_dict` output; unknown keys are errors (drop the card's "nms")."""
        if not isinstance(data, dict):
            raise BckdError(f"NMS settings must be a mapping, got {type(data).__name__}")
        check_known(data, [f.name for f in dataclasses.fields(cls)], "NMS setting")
        return cls(**data)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def output_names(with_masks: bool = False) -> tuple[str, ...]:
    """The layout's keys (and the NMS graph's output names), in order."""
    return DETECTION_OUTPUTS + ((MASK_OUTPUT,) if with_masks else ())


# -- the algorithm ---------------------------------------------------------------------------------
def host_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    settings: NMSSettings | None = None,
    mask_coeffs: np.ndarray | None = None,
    proto: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Raw head outputs -> the fixed detection layout (module docstring), one image at a time.

    ``boxes`` [B, N, 4] corner pairs (xyxy in input pixels), ``scores`` [B, N, C] after sigmoid;
    for masks also ``mask_coeffs`` [B, N, k] and ``proto`` [B, k, h, w].
    """
    settings = settings or NMSSettings()
    boxes, scores, mask_coeffs, proto = _check_inputs(boxes, scores, mask_coeffs, proto)
    rows = [_image_nms(boxes[b], scores[b], settings) for b in range(boxes.shape[0])]
    layout = _layout(boxes, scores, rows, settings.max_dets)
    if mask_coeffs is not None:
        layout[MASK_OUTPUT] = _masks(mask_coeffs, proto, rows, settings.max_dets)
    return layout


def unpad(layout: dict[str, np.ndarray], b: int) -> tuple[np.ndarray, ...]:
    """Image ``b``'s real rows: (boxes [n,4], scores [n], labels [n]) (+ masks [n,h,w])."""
    num = layout["num_dets"]
    if not 0 <= b < num.shape[0]:
        raise BckdError(f"image index {b} is out of range for a batch of {num.shape[0]}")
    n = int(num[b, 0])
    names = [name for name in output_names(MASK_OUTPUT in layout) if name != "num_dets"]
    return tuple(layout[name][b, :n] for name in names)


def _check_inputs(
    boxes: np.ndarray, scores: np.ndarray, coeffs: np.ndarray | None, proto: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if boxes.ndim != 3 or boxes.shape[2] != 4:
        raise BckdError(f"NMS boxes must be [B, N, 4], got shape {boxes.shape}")
    if scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2] or scores.shape[2] < 1:
        raise BckdError(f"NMS scores must be [B, N, C] with B, N of boxes {boxes.shape[:2]}, "
                        f"got shape {scores.shape}")
    if (coeffs is None) != (proto is None):
        raise BckdError("NMS masks need both mask_coeffs and proto; pass both or neither")
    if coeffs is None:
        return boxes, scores, None, None
    coeffs = np.asarray(coeffs, dtype=np.float32)
    proto = np.asarray(proto, dtype=np.float32)
    if coeffs.ndim != 3 or coeffs.shape[:2] != boxes.shape[:2]:
        raise BckdError(f"mask_coeffs must be [B, N, k] with B, N of boxes {boxes.shape[:2]}, "
                        f"got shape {coeffs.shape}")
    if proto.ndim != 4 or proto.shape[:2] != (boxes.shape[0], coeffs.shape[2]):
        raise BckdError(f"proto must be [B, k, h, w] with B={boxes.shape[0]}, "
                        f"k={coeffs.shape[2]}, got shape {proto.shape}")
    return boxes, scores, coeffs, proto


def _image_nms(
    boxes: np.ndarray, scores: np.ndarray, settings: NMSSettings
) -> dict[str, np.ndarray]:
    """Steps 1-3 for one image: candidate index, label and score of each kept row, best first."""
    P = settings.pre_top_k
    cand = _pre_top_k(scores.max(axis=1), P)  # [P] indices into N + P (>= N: dummies)
    real = cand < boxes.shape[0]
    cand_boxes = np.zeros((P, 4), np.float32)
    cand_boxes[real] = boxes[cand[real]]
    cand_scores = np.zeros((P, scores.shape[1]), np.float32)
    cand_scores[real] = scores[cand[real]]
    cls, pos = _per_class_nms(cand_boxes, cand_scores, settings)
    score = cand_scores[pos, cls]
    flat = cls.astype(np.int64) * P + pos
    best = np.lexsort((flat, -score))[:settings.max_dets]  # TopK over [C*P]: ties to lower index
    return {"source": cand[pos[best]], "box": cand_boxes[pos[best]], "label": cls[best],
            "score": score[best]}


def _pre_top_k(m: np.ndarray, k: int) -> np.ndarray:
    """The top ``k`` indices of ``m`` padded with ``k`` zeros: descending, ties to lower index."""
    padded = np.concatenate([m, np.zeros(k, np.float32)])
    return np.argsort(-padded, kind="stable")[:k]


def _per_class_nms(
    boxes: np.ndarray, scores: np.ndarray, settings: NMSSettings
) -> tuple[np.ndarray, np.ndarray]:
    """ORT NonMaxSuppression over every class at once: (class, candidate) of the selected boxes.

    Candidates of all classes are sorted by (class, score descending, index) and decided in
    windows of :data:`_WINDOW` ranks per class, all classes together. In a window, a candidate
    suppressed by a box kept earlier is out; the rest follow "kept iff no kept earlier candidate
    of the window suppresses it", whose unique solution (the greedy pass) is reached by iterating
    from "all kept": after i rounds the first i of every class are final. A class stops at
    ``max_dets`` kept boxes, as ORT does; that bounds the work when thresholds are low (and
    changes no output: a class's boxes past its first max_dets never make the final top max_dets).
    """
    pos, cls = np.nonzero(scores > np.float32(settings.score_threshold))
    order = np.lexsort((pos, -scores[pos, cls], cls))
    pos, cls = pos[order], cls[order]
    corners = _corner_extents(boxes[pos])
    iou_threshold = np.float32(settings.iou_threshold)
    rank = np.arange(len(cls)) - np.searchsorted(cls, cls, side="left")
    kept = np.zeros(len(cls), bool)
    count = np.zeros(scores.shape[1], np.int64)  # boxes kept so far per class
    for start in range(0, len(cls), _WINDOW):
        window = np.flatnonzero((rank >= start) & (rank < start + _WINDOW)
                                & (count[cls] < settings.max_dets))
        if not len(window):
            break  # no class has candidates left at this rank
        earlier = np.flatnonzero(kept)
        out = _suppressed_by(corners, cls, earlier, window, iou_threshold)
        keep = _greedy_window(corners, cls[window], window, out, iou_threshold)
        keep &= _rank_in_class(keep, cls[window]) + count[cls[window]] < settings.max_dets
        kept[window[keep]] = True
        count += np.bincount(cls[window[keep]], minlength=len(count))
    return cls[kept], pos[kept]


def _suppressed_by(
    corners: tuple[np.ndarray, ...], cls: np.ndarray, earlier: np.ndarray, window: np.ndarray,
    iou_threshold: np.float32,
) -> np.ndarray:
    """For each window candidate: does a kept box of an earlier window of its class suppress it?"""
    kept_cls = cls[earlier]  # sorted, like every index list here
    first = np.searchsorted(kept_cls, cls[window], side="left")
    counts = np.searchsorted(kept_cls, cls[window], side="right") - first
    out = np.zeros(len(window), bool)
    j_local = np.repeat(np.arange(len(window)), counts)
    i = earlier[np.repeat(first, counts) + _ragged_arange(counts)]
    hit = _iou_exceeds(corners, i, window[j_local], iou_threshold)
    out[j_local[hit]] = True
    return out


def _greedy_window(
    corners: tuple[np.ndarray, ...], cls: np.ndarray, window: np.ndarray, out: np.ndarray,
    iou_threshold: np.float32,
) -> np.ndarray:
    """The greedy pass over one window, given the candidates already suppressed (``out``)."""
    first, later = [], []
    for a, b in _pairs_within(cls):
        hit = _iou_exceeds(corners, window[a], window[b], iou_threshold)
        first.append(a[hit])
        later.append(b[hit])
    first = np.concatenate(first) if first else np.zeros(0, np.int64)
    later = np.concatenate(later) if later else np.zeros(0, np.int64)
    keep = ~out
    while True:
        suppressed = out.copy()
        suppressed[later[keep[first]]] = True
        if np.array_equal(~suppressed, keep):
            return keep
        keep = ~suppressed


def _pairs_within(cls: np.ndarray):
    """Blocks of index pairs (a, b), a < b, of the same class (``cls`` is sorted)."""
    n = len(cls)
    partners = np.searchsorted(cls, cls, side="right") - np.arange(n) - 1
    bounds = np.searchsorted(np.cumsum(partners), np.arange(0, partners.sum(), _PAIR_BLOCK))
    for start, stop in zip(bounds, list(bounds[1:]) + [n]):
        counts = partners[start:stop]
        a = np.repeat(np.arange(start, stop), counts)
        yield a, a + 1 + _ragged_arange(counts)


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(c)`` for each c in ``counts``."""
    return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


def _rank_in_class(keep: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """How many kept candidates of the same class come before each one (``cls`` is sorted)."""
    kept_before = np.cumsum(keep) - keep
    first_of_class = np.searchsorted(cls, cls, side="left")
    return kept_before - kept_before[first_of_class]


def _corner_extents(boxes: np.ndarray) -> tuple[np.ndarray, ...]:
    """(x_min, y_min, x_max, y_max, area) of corner-pair boxes, as ORT normalises them."""
    x_min, x_max = np.minimum(boxes[:, 0], boxes[:, 2]), np.maximum(boxes[:, 0], boxes[:, 2])
    y_min, y_max = np.minimum(boxes[:, 1], boxes[:, 3]), np.maximum(boxes[:, 1], boxes[:, 3])
    return x_min, y_min, x_max, y_max, (x_max - x_min) * (y_max - y_min)


def _iou_exceeds(
    corners: tuple[np.ndarray, ...], i: np.ndarray, j: np.ndarray, iou_threshold: np.float32
) -> np.ndarray:
    """Which pairs (i, j) ORT's SuppressByIOU suppresses: float32, in its operation order.

    Pairs leave as soon as an axis does not overlap (most do
    not), which is also ORT's early exit; a float difference is > 0 exactly when max > min.
    """
    x_min, y_min, x_max, y_max, area = corners
    hit = np.zeros(len(i), bool)
    extent_x = np.minimum(x_max[i], x_max[j]) - np.maximum(x_min[i], x_min[j])
    rows = np.flatnonzero(extent_x > 0)
    i, j = i[rows], j[rows]
    extent_y = np.minimum(y_max[i], y_max[j]) - np.maximum(y_min[i], y_min[j])
    overlap = extent_y > 0
    rows, i, j = rows[overlap], i[overlap], j[overlap]
    inter = extent_x[rows] * extent_y[overlap]
    union = (area[i] + area[j]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        hit[rows] = (inter > 0) & (inter / union > iou_threshold)
    return hit


# -- the layout ------------------------------------------------------------------------------------
def _layout(
    boxes: np.ndarray, scores: np.ndarray, rows: list[dict[str, np.ndarray]], k: int
) -> dict[str, np.ndarray]:
    B = boxes.shape[0]
    out = {
        "num_dets": np.zeros((B, 1), np.int32),
        "boxes": np.zeros((B, k, 4), np.float32),
        "scores": np.zeros((B, k), np.float32),
        "labels": np.full((B, k), -1, np.int32),
    }
    for b, row in enumerate(rows):
        n = len(row["label"])
        out["num_dets"][b, 0] = n
        out["boxes"][b, :n] = row["box"]
        out["scores"][b, :n] = row["score"]
        out["labels"][b, :n] = row["label"]
    return out


def _masks(
    coeffs: np.ndarray, proto: np.ndarray, rows: list[dict[str, np.ndarray]], k: int
) -> np.ndarray:
    B, num_protos, h, w = proto.shape
    masks = np.zeros((B, k, h, w), np.float32)
    for b, row in enumerate(rows):
        n = len(row["source"])
        logits = coeffs[b, row["source"]] @ proto[b].reshape(num_protos, h * w)
        masks[b, :n] = sigmoid(logits).reshape(n, h, w)
    return masks


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function in float32; large negative inputs give 0 without overflow warnings."""
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
