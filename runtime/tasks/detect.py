"""Object detection and instance segmentation: the ``detect`` and ``instance`` tasks.

Network outputs are either the raw head (``boxes`` [B,N,4] xyxy in input pixels, ``scores``
[B,N,C] after sigmoid, + ``mask_coeffs`` [B,N,k] and ``proto`` [B,k,h,w] for instance) or, when
NMS was put in the graph at export, the fixed layout ``num_dets``, ``boxes``, ``scores``,
``labels`` (+ ``masks``) of :mod:`runtime.tasks.nms`. The card's ``postprocess`` section says
which (``nms``: ``graph`` | ``host``) and holds the NMS settings; raw outputs go through the same
algorithm on the host (numpy), so both forms give the same detections.

A prediction is one image's detections in ORIGINAL image pixels (the box transform of the card's
preprocessing undone), with binary masks at the original size for instance: what COCO scores.
Masks are assembled at proto resolution, resampled bilinearly to the original image, cropped to
their box and thresholded at 0.5, on the host (never in the graph: detection.md §7.4).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from runtime.errors import BckdError
from runtime.tasks import register
from runtime.tasks.base import Meter, Sample, Task
from runtime.tasks.nms import NMSSettings, host_nms, unpad

MASK_THRESHOLD = 0.5
# Detections agree in parity when their IoU is at least this and their labels are equal.
MATCH_IOU = 0.99
DETECTION_AGREEMENT = 0.999


def nms_settings(card: dict[str, Any] | None) -> tuple[str, NMSSettings]:
    """(where NMS runs, its settings) from the card's ``postprocess`` section."""
    post = dict((card or {}).get("postprocess") or {})
    where = post.pop("nms", "host")
    if where not in ("host", "graph"):
        raise BckdError(f"the card's postprocess.nms is '{where}'; expected 'host' or 'graph'")
    return where, NMSSettings.from_dict(post)


def to_layout(outputs: dict[str, np.ndarray], card: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """The fixed detection layout of a batch, running host NMS on raw outputs."""
    if "num_dets" in outputs:  # NMS ran in the graph
        return outputs
    if "boxes" not in outputs or "scores" not in outputs:
        raise BckdError(f"a detector must output 'boxes' and 'scores' (or the NMS layout), got "
                        f"{', '.join(outputs)}; export it with bckd export")
    _, settings = nms_settings(card)
    return host_nms(outputs["boxes"], outputs["scores"], settings,
                    outputs.get("mask_coeffs"), outputs.get("proto"))


def _interp_matrix(n_out: int, n_in: int, scale: float, offset: float) -> np.ndarray:
    """(n_out, n_in) bilinear weights sampling a grid of n_in cells at output pixel centres
    mapped by ``in = (out + 0.5) * scale + offset - 0.5`` (edge-clamped)."""
    pos = np.clip((np.arange(n_out) + 0.5) * scale + offset - 0.5, 0, n_in - 1)
    lo = np.minimum(np.floor(pos).astype(int), max(n_in - 2, 0))
    frac = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), lo] = 1 - frac
    if n_in > 1:
        m[np.arange(n_out), lo + 1] += frac
    return m


def paste_masks(probs: np.ndarray, boxes: np.ndarray, transform: Any, input_size: Sequence[int],
                size: tuple[int, int]) -> np.ndarray:
    """Mask probabilities [K,h,w] over the network input -> binary masks [K,h0,w0] at the
    original size, cropped to their (original-pixel) boxes."""
    h0, w0 = size
    k, h, w = probs.shape
    if k == 0:
        return np.zeros((0, h0, w0), np.uint8)
    # original pixel -> input pixel -> proto cell: proto = (orig * s + p) * (h / H)
    ry, rx = h / input_size[0], w / input_size[1]
    my = _interp_matrix(h0, h, transform.sy * ry, transform.py * ry)
    mx = _interp_matrix(w0, w, transform.sx * rx, transform.px * rx)
    full = np.einsum("yh,khw,xw->kyx", my, probs.astype(np.float32), mx, optimize=True)
    ys, xs = np.arange(h0)[None, :, None] + 0.5, np.arange(w0)[None, None, :] + 0.5
    b = boxes[:, :, None, None]
    inside = (xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys >= b[:, 1]) & (ys <= b[:, 3])
    return ((full > MASK_THRESHOLD) & inside).astype(np.uint8)


def _image_size(target: Any) -> tuple[int, int]:
    return int(target["size"][0]), int(target["size"][1])


class DetectMeter(Meter):
    """COCO AP through :class:`runtime.tasks.coco_eval.CocoMeter` (compact results only)."""

    def __init__(self, dataset: Any, task: str) -> None:
        from runtime.tasks.coco_eval import CocoMeter, default_iou_types

        self.meter = CocoMeter(dataset.coco, dataset.category_ids, default_iou_types(task))

    def update(self, indices: Sequence[int], predictions: Sequence[dict],
               samples: Sequence[Sample]) -> None:
        for p in predictions:
            self.meter.update(p["image_id"], p["boxes"], p["scores"], p["labels"], p.get("masks"))

    def summary(self) -> dict[str, Any]:
        return self.meter.summary()


class _WriterAdapter:
    """evaluate_runner's ``write(id, prediction)`` onto a DetectionWriter."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def write(self, image_id: str, p: dict) -> None:
        self.writer.write(p["image_id"], p["boxes"], p["scores"], p["labels"], p.get("masks"))

    def close(self) -> Any:
        return self.writer.close()


def match_detections(ref: tuple[np.ndarray, ...], cand: tuple[np.ndarray, ...],
                     iou: float = MATCH_IOU) -> int:
    """How many reference detections have a same-label candidate with IoU >= ``iou`` (greedy,
    by reference order, each candidate used once)."""
    rb, _, rl = ref[:3]
    cb, _, cl = cand[:3]
    if len(rb) == 0 or len(cb) == 0:
        return 0
    x1 = np.maximum(rb[:, None, 0], cb[None, :, 0])
    y1 = np.maximum(rb[:, None, 1], cb[None, :, 1])
    x2 = np.minimum(rb[:, None, 2], cb[None, :, 2])
    y2 = np.minimum(rb[:, None, 3], cb[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    union = area(rb)[:, None] + area(cb)[None, :] - inter
    ious = np.where(union > 0, inter / np.maximum(union, 1e-12), (inter == 0) * 1.0)
    ok = (ious >= iou) & (rl[:, None] == cl[None, :])
    used = np.zeros(len(cb), bool)
    matched = 0
    for i in range(len(rb)):
        free = np.flatnonzero(ok[i] & ~used)
        if free.size:
            used[free[np.argmax(ious[i, free])]] = True
            matched += 1
    return matched


class DetectTask(Task):
    name = "detect"
    dataset_format = "coco"
    metric = "box_ap"
    budget_metric = "box_ap"
    masks = False
    int8_float_tail = True  # box decode, sigmoid, DFL integral, NMS (detection.md: INT8 traps)
    columns = (("box_ap", "box AP", "{:.2f}"), ("box_ap50", "AP50", "{:.2f}"))

    def postprocess(self, outputs: dict[str, np.ndarray], card: dict[str, Any] | None,
                    preprocess: Any, samples: Sequence[Sample]) -> list[dict]:
        layout = to_layout(outputs, card)
        predictions = []
        for b, (_, target) in enumerate(samples):
            rows = unpad(layout, b)
            size = _image_size(target)
            transform = preprocess.box_transform(size)
            pred = {"image_id": int(target["image_id"]), "scores": rows[1], "labels": rows[2],
                    "boxes": transform.to_original(rows[0], size)}
            if self.masks:
                pred["masks"] = paste_masks(rows[3], pred["boxes"], transform, preprocess.size,
                                            size)
            predictions.append(pred)
        return predictions

    def meter(self, dataset: Any, preprocess: Any, card: dict[str, Any] | None) -> Meter:
        return DetectMeter(dataset, self.name)

    def stage_postprocess(self, card: dict[str, Any] | None) -> Any:
        """NMS (host, or already in the graph) to the detection layout; masks stay at proto
        resolution, pasting to each image is part of scoring."""
        return lambda outputs: to_layout(outputs, card)

    def compare(self, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                card: dict[str, Any] | None) -> dict[str, Any]:
        """Detections after NMS: the share of reference detections the candidate reproduces
        (same label, IoU >= 0.99), both ways, and the score and box differences of the raw
        outputs when both sides have them."""
        try:
            ref, cand = to_layout(reference, card), to_layout(candidate, card)
        except BckdError as exc:
            return {"ok": False, "error": str(exc)}
        total = matched = back = extra = 0
        for b in range(ref["num_dets"].shape[0]):
            r, c = unpad(ref, b), unpad(cand, b)
            total += len(r[0])
            extra += len(c[0])
            matched += match_detections(r, c)
            back += match_detections(c, r)
        agreement = 1.0 if total == 0 and extra == 0 else matched / max(total, 1)
        reverse = 1.0 if extra == 0 and total == 0 else back / max(extra, 1)
        result = {"detections": total, "candidate_detections": extra, "matched": matched,
                  "detection_agreement": agreement, "reverse_agreement": reverse,
                  "min_detection_agreement": DETECTION_AGREEMENT}
        for name in ("boxes", "scores"):
            if "num_dets" not in reference and "num_dets" not in candidate and \
                    reference[name].shape == candidate[name].shape:
                result[f"max_abs_diff_{name}"] = float(np.abs(
                    reference[name].astype(np.float64) - candidate[name]).max(initial=0.0))
        result["ok"] = bool(min(agreement, reverse) >= DETECTION_AGREEMENT)
        return result

    def writer(self, folder: Any, manifest: dict[str, Any], force: bool = False) -> Any:
        from runtime.tasks.det_predictions import DetectionWriter

        return _WriterAdapter(DetectionWriter(folder, dict(manifest, task=self.name), force))

    def row(self, summary: dict[str, Any]) -> dict[str, Any]:
        keys = [k for k in summary if k.startswith(("box_", "mask_", "boundary_"))]
        return {k: (None if summary[k] is None else round(100 * summary[k], 2)) for k in keys}

    def check_dataset(self, dataset: Any, card: dict[str, Any] | None, model: Any) -> None:
        if not hasattr(dataset, "coco"):
            raise BckdError(f"a '{self.name}' model is evaluated on COCO-format data (boxes"
                            f"{' and masks' if self.masks else ''}); open the dataset with "
                            "--format coco")
        if self.masks and getattr(dataset, "task", "instance") != "instance":
            raise BckdError("the dataset has no instance masks (its annotations carry no "
                            "segmentation); an instance model needs them")
        classes = list((card or {}).get("classes") or [])
        if classes and list(dataset.classes) != classes:
            raise BckdError(f"{model} predicts classes {classes} but the dataset has "
                            f"{list(dataset.classes)}; evaluate on the dataset the model was "
                            "trained for")


class InstanceTask(DetectTask):
    name = "instance"
    masks = True
    budget_metric = "mask_ap"
    columns = DetectTask.columns + (("mask_ap", "mask AP", "{:.2f}"),
                                    ("boundary_ap", "boundary AP", "{:.2f}"))


register(DetectTask())
register(InstanceTask())
