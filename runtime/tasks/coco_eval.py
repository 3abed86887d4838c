"""COCO box, mask and Boundary AP of detections, accumulated one image at a time.

:class:`CocoMeter` is the detection counterpart of :class:`runtime.predictions.Scores`: the
evaluation loop calls ``update`` once per image with that image's detections in *original* image
pixels, and ``summary`` scores them with the COCO protocol (detection.md §3) through one of two
backends that give the same numbers: ``faster_coco_eval`` (C++, preferred, and the only one with
Boundary AP) or ``pycocotools`` (the reference). Both are imported lazily.

What is kept per image is compact (:class:`ImageDetections`): boxes, scores and category ids as
small arrays and each mask as a compressed RLE string, encoded as soon as it arrives. Dense masks
are never stored, so memory grows with the number of detections, not with the image sizes.

Conventions:

* Only the images passed to ``update`` are evaluated (``params.imgIds`` = those ids), so a partial
  split is scored on itself, not penalised for the images it never saw. An image with no
  detections must still be passed (with empty arrays) so that its ground truth counts.
* Every ground-truth category is evaluated (COCO's default ``params.catIds``); labels are the
  contiguous indices 0..C-1 of ``category_ids``.
* Scores are fractions. COCO's -1 ("no ground truth in this area range") becomes None. An empty
  result list is scored as "nothing detected" (AP 0 where there is ground truth) instead of
  crashing pycocotools' ``loadRes``; with no images at all every metric is None.
* Mask results carry no ``bbox`` field: with one, ``loadRes`` would take the box area as the
  instance area and change the small/medium/large split of mask AP.
* Boundary AP is faster-coco-eval's ``iouType="boundary"`` (dilation ratio 0.02): the IoU of a
  pair is min(mask IoU, boundary IoU), crowd ground truth using mask IoU alone.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from runtime.errors import BckdError
from runtime.files import atomic_path
from runtime.lazy import require
from runtime.registry import Registry, check_known

IOU_TYPES = ("bbox", "segm", "boundary")
BOUNDARY_DILATION = 0.02

# Summary key prefix per IoU type, and which of COCOeval's 12 stats each type reports.
_PREFIX = {"bbox": "box", "segm": "mask", "boundary": "boundary"}
_STAT_INDEX = {"ap": 0, "ap50": 1, "ap75": 2, "aps": 3, "apm": 4, "apl": 5, "ar1": 6, "ar10": 7,
               "ar100": 8, "ars": 9, "arm": 10, "arl": 11}
_REPORTED = {"bbox": ("ap", "ap50", "ap75", "aps", "apm", "apl", "ar100"),
             "segm": ("ap", "ap50", "ap75", "aps", "apm", "apl", "ar100"),
             "boundary": ("ap", "ap50", "ap75")}


def default_iou_types(task: str) -> tuple[str, ...]:
    """The IoU types a task is scored with: boxes ("detect"), plus masks and boundaries ("instance")."""
    if task == "detect":
        return ("bbox",)
    if task == "instance":
        return IOU_TYPES
    raise BckdError(f"COCO AP is defined for the 'detect' and 'instance' tasks, not '{task}'")


# ---------------------------------------------------------------------------------------------
# Per-image detections in their compact form


def _mask_api() -> Any:
    """pycocotools.mask, or faster-coco-eval's identical encoder on a device that has only that."""
    if importlib.util.find_spec("pycocotools") is None and \
            importlib.util.find_spec("faster_coco_eval") is not None:
        return require("faster_coco_eval.core.mask", "encoding masks as COCO RLE")
    return require("pycocotools.mask", "encoding masks as COCO RLE")


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """Compressed COCO RLE (``{"size": [h, w], "counts": str}``) of each binary mask of [K, h, w]."""
    if masks.ndim != 3:
        raise BckdError(f"masks must be [K, h, w], got shape {tuple(masks.shape)}")
    if np.issubdtype(masks.dtype, np.floating):
        raise BckdError("masks must be binary (uint8 or bool); threshold the mask probabilities "
                        "before scoring them")
    if len(masks) == 0:
        return []
    binary = masks.view(np.uint8) if masks.dtype == np.bool_ else masks
    if binary.dtype != np.uint8 or binary.max() > 1:  # the encoder needs exactly 0 and 1
        binary = (masks != 0).view(np.uint8)
    # The encoder wants [h, w, K] uint8 in Fortran order (COCO RLE runs down the columns): one
    # transposed copy, made C-contiguous as [K, w, h] and viewed back.
    fortran = np.ascontiguousarray(binary.transpose(0, 2, 1)).transpose(2, 1, 0)
    rles = _mask_api().encode(fortran)
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}
            for r in rles]


def _as_rows(name: str, value: Any, shape_tail: tuple[int, ...], dtype: Any,
             image_id: int) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.size == 0:
        arr = arr.reshape((0,) + shape_tail)
    if arr.shape[1:] != shape_tail or arr.ndim != 1 + len(shape_tail):
        want = "[K" + "".join(f", {n}" for n in shape_tail) + "]"
        raise BckdError(f"image {image_id}: {name} must be {want}, got shape {tuple(arr.shape)}")
    return arr


@dataclass
class ImageDetections:
    """One image's detections, compact: xyxy boxes in original pixels, scores, COCO category ids
    and (instance segmentation) one compressed RLE per detection, or None for boxes only."""

    image_id: int
    boxes: np.ndarray  # float64 [K, 4] xyxy
    scores: np.ndarray  # float64 [K]
    category_ids: np.ndarray  # int64 [K]
    masks: list[dict[str, Any]] | None = None

    @classmethod
    def from_arrays(cls, image_id: int, boxes: Any, scores: Any, labels: Any,
                    category_ids: Sequence[int],
                    masks: np.ndarray | None = None) -> "ImageDetections":
        """Check and convert one image's network outputs; labels index ``category_ids``.

        Rows with label -1 (the padding of the NMS output layout) are dropped; masks are [K, h, w]
        binary at the original image size and are encoded to RLE at once.
        """
        image_id = int(image_id)
        boxes = _as_rows("boxes", boxes, (4,), np.float64, image_id)
        scores = _as_rows("scores", scores, (), np.float64, image_id)
        labels = _as_rows("labels", labels, (), np.int64, image_id)
        if not len(boxes) == len(scores) == len(labels):
            raise BckdError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores and "
                            f"{len(labels)} labels; they must be one per detection")
        if masks is not None and len(masks) != len(boxes):
            raise BckdError(f"image {image_id}: {len(masks)} masks for {len(boxes)} boxes")
        keep = labels >= 0
        if np.any(labels[keep] >= len(category_ids)):
            raise BckdError(f"image {image_id}: label {int(labels.max())} is out of range for "
                            f"{len(category_ids)} classes")
        if not (np.isfinite(boxes[keep]).all() and np.isfinite(scores[keep]).all()):
            raise BckdError(f"image {image_id}: the detections hold non-finite boxes or scores; "
                            "the model's output is broken (check the engine/precision)")
        cats = np.asarray(category_ids, dtype=np.int64)[labels[keep]]
        if masks is not None:
            masks = np.asarray(masks)
            masks = masks if keep.all() else masks[keep]  # no copy of the masks unless padded
        rles = None if masks is None else encode_masks(masks)
        return cls(image_id, boxes[keep], scores[keep], cats, rles)

    def __len__(self) -> int:
        return len(self.scores)

    def results(self, iou_type: str) -> list[dict[str, Any]]:
        """This image's entries of a COCO results list (``loadRes`` format) for ``iou_type``."""
        if iou_type == "bbox":
            wh = self.boxes[:, 2:] - self.boxes[:, :2]
            xywh = np.concatenate([self.boxes[:, :2], wh], axis=1)
            return [{"image_id": self.image_id, "category_id": int(c), "bbox": b.tolist(),
                     "score": float(s)} for b, s, c in zip(xywh, self.scores, self.category_ids)]
        if self.masks is None:
            raise BckdError(f"image {self.image_id} has no masks; '{iou_type}' AP needs instance "
                            "segmentation detections")
        return [{"image_id": self.image_id, "category_id": int(c), "segmentation": dict(m),
                 "score": float(s)} for m, s, c in zip(self.masks, self.scores, self.category_ids)]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (floats are written exactly, so :meth:`from_json` round-trips)."""
        out = {"image_id": self.image_id, "boxes": self.boxes.tolist(),
               "scores": self.scores.tolist(), "category_ids": self.category_ids.tolist()}
        if self.masks is not None:
            out["masks"] = self.masks
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ImageDetections":
        image_id = int(d["image_id"])
        return cls(image_id,
                   _as_rows("boxes", d["boxes"], (4,), np.float64, image_id),
                   _as_rows("scores", d["scores"], (), np.float64, image_id),
                   _as_rows("category_ids", d["category_ids"], (), np.int64, image_id),
                   d.get("masks"))


# ---------------------------------------------------------------------------------------------
# Backends: the same COCOeval protocol through faster-coco-eval or pycocotools


class _Backend:
    """How one COCO toolkit builds COCO objects and runs COCOeval; subclasses name the modules."""

    name = ""
    iou_types: tuple[str, ...] = ()

    def coco_class(self) -> type:
        raise NotImplementedError

    def make_eval(self, gt: Any, dt: Any, iou_type: str) -> Any:
        raise NotImplementedError

    def coco(self, dataset: dict[str, Any]) -> Any:
        """A COCO object over ``dataset`` (a dict in the annotation-file format)."""
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = self.coco_class()()
            coco.dataset = dataset
            coco.createIndex()
        return coco

    def stats(self, gt: Any, results: list[dict[str, Any]], iou_type: str,
              img_ids: list[int]) -> np.ndarray:
        """COCOeval's 12 summary stats of ``results`` on ``img_ids`` (-1 where undefined)."""
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(results) if results else self.coco(_empty_results(gt))
            ev = self.make_eval(gt, dt, iou_type)
            ev.params.imgIds = list(img_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return np.asarray(ev.stats[:12], dtype=np.float64)


BACKENDS: Registry[type[_Backend]] = Registry("COCO evaluation backend")


@BACKENDS.register("faster_coco_eval")
class _FasterCocoEval(_Backend):
    name = "faster_coco_eval"
    iou_types = IOU_TYPES

    def coco_class(self) -> type:
        return require("faster_coco_eval", "COCO evaluation").COCO

    def make_eval(self, gt: Any, dt: Any, iou_type: str) -> Any:
        fce = require("faster_coco_eval", "COCO evaluation")
        return fce.COCOeval_faster(gt, dt, iou_type, print_function=lambda *a, **k: None,
                                   boundary_dilation_ratio=BOUNDARY_DILATION)


@BACKENDS.register("pycocotools")
class _Pycocotools(_Backend):
    name = "pycocotools"
    iou_types = ("bbox", "segm")

    def coco_class(self) -> type:
        return require("pycocotools.coco", "COCO evaluation").COCO

    def make_eval(self, gt: Any, dt: Any, iou_type: str) -> Any:
        return require("pycocotools.cocoeval", "COCO evaluation").COCOeval(gt, dt, iou_type)


def resolve_backend(backend: str, iou_types: Sequence[str]) -> _Backend:
    """The backend called ``backend``; "auto": faster-coco-eval when installed, else pycocotools."""
    if backend == "auto":
        have_faster = importlib.util.find_spec("faster_coco_eval") is not None
        if not have_faster and "boundary" in iou_types:
            require("faster_coco_eval", "Boundary AP")  # raises, naming the install command
        backend = "faster_coco_eval" if have_faster else "pycocotools"
    chosen = BACKENDS.get(backend)()
    unsupported = [t for t in iou_types if t not in chosen.iou_types]
    if unsupported:
        raise BckdError(f"the {backend} backend cannot compute {unsupported[0]} AP; use "
                        "backend 'faster_coco_eval' (pip install faster-coco-eval)")
    return chosen


def _empty_results(gt: Any) -> dict[str, Any]:
    # What loadRes would build from an empty list, had pycocotools not crashed on it.
    return {"info": gt.dataset.get("info", {}), "images": list(gt.dataset["images"]),
            "categories": list(gt.dataset["categories"]), "annotations": []}


def _gt_subset(gt: Any, img_ids: list[int]) -> dict[str, Any]:
    """The ground truth of ``img_ids``, with each annotation dict copied (shallowly).

    COCOeval writes into the ground-truth annotations (``ignore``, polygons turned into RLE, cached
    RLE and boundaries); the copies keep the caller's COCO object as it was.
    """
    anns = [dict(a) for i in img_ids for a in gt.imgToAnns.get(i, ())]
    return {"info": gt.dataset.get("info", {}), "images": [gt.imgs[i] for i in img_ids],
            "categories": list(gt.dataset["categories"]), "annotations": anns}


def _fraction(value: float) -> float | None:
    return None if value < 0 else float(value)  # COCOeval's -1: no ground truth to score against


# ---------------------------------------------------------------------------------------------


class CocoMeter:
    """Streaming COCO AP over the images passed to :meth:`update` (see the module docstring).

    ``gt`` is the ground truth as a COCO object (pycocotools or faster-coco-eval API), e.g. a
    detection dataset's ``coco``; ``category_ids[k]`` is the COCO id of contiguous label ``k``.
    """

    def __init__(self, gt: Any, category_ids: Sequence[int],
                 iou_types: Sequence[str] = ("bbox",), backend: str = "auto") -> None:
        iou_types = tuple(iou_types)
        if not iou_types:
            raise BckdError(f"choose at least one IoU type of {', '.join(IOU_TYPES)}")
        check_known(iou_types, IOU_TYPES, "IoU type")
        self.iou_types = iou_types
        self.backend = resolve_backend(backend, iou_types)
        self.gt = gt
        self.category_ids = [int(c) for c in category_ids]
        unknown = [c for c in self.category_ids if c not in gt.cats]
        if unknown:
            raise BckdError(f"category id {unknown[0]} is not in the ground truth (its ids: "
                            f"{sorted(gt.cats)}); pass the dataset's category_ids")
        if 0 in gt.anns:  # COCOeval marks "unmatched" with id 0: a match to it would count as FP
            raise BckdError("the ground truth has an annotation with id 0, which COCOeval cannot "
                            "match; number annotation ids from 1")
        self._dets: dict[int, ImageDetections] = {}

    @property
    def needs_masks(self) -> bool:
        return "segm" in self.iou_types or "boundary" in self.iou_types

    @property
    def images(self) -> int:
        return len(self._dets)

    @property
    def detections(self) -> int:
        return sum(len(d) for d in self._dets.values())

    def update(self, image_id: int, boxes: Any, scores: Any, labels: Any,
               masks: np.ndarray | None = None) -> None:
        """Add one image's detections: xyxy boxes in original pixels, scores, contiguous labels and,
        for mask/boundary AP, binary masks [K, h0, w0] at the original size."""
        masks = masks if self.needs_masks else None  # boxes only: skip the encoding
        self.add(ImageDetections.from_arrays(image_id, boxes, scores, labels, self.category_ids,
                                             masks))

    def add(self, det: ImageDetections) -> None:
        """Add one image's already-converted detections (e.g. read back from a folder)."""
        image_id = det.image_id
        if image_id not in self.gt.imgs:
            raise BckdError(f"image id {image_id} is not in the ground truth; score detections "
                            "against the annotation file of the split they came from")
        if image_id in self._dets:
            raise BckdError(f"image id {image_id} was given twice; pass each image once")
        if self.needs_masks:
            det = self._check_masks(det)
        elif det.masks is not None:  # boxes only: do not keep masks nobody will score
            det = ImageDetections(image_id, det.boxes, det.scores, det.category_ids, None)
        self._dets[image_id] = det

    def _check_masks(self, det: ImageDetections) -> ImageDetections:
        if det.masks is None:
            if len(det):
                raise BckdError(f"image {det.image_id}: mask AP needs masks with the detections")
            return ImageDetections(det.image_id, det.boxes, det.scores, det.category_ids, [])
        if len(det.masks) != len(det):
            raise BckdError(f"image {det.image_id}: {len(det.masks)} masks for {len(det)} boxes")
        img = self.gt.imgs[det.image_id]
        want = [int(img["height"]), int(img["width"])]
        for m in det.masks:
            if list(m["size"]) != want:
                raise BckdError(f"image {det.image_id}: a mask is {m['size'][0]}x{m['size'][1]} "
                                f"but the image is {want[0]}x{want[1]}; paste masks at the "
                                "original image size")
        return det

    def results(self, iou_type: str = "bbox") -> list[dict[str, Any]]:
        """The COCO results list (``COCO.loadRes`` format) of ``iou_type`` ("boundary": "segm")."""
        check_known([iou_type], IOU_TYPES, "IoU type")
        kind = "bbox" if iou_type == "bbox" else "segm"
        return [r for det in self._dets.values() for r in det.results(kind)]

    def stats(self, iou_type: str) -> list[float | None]:
        """COCOeval's 12 summary stats for ``iou_type`` as fractions (None for COCO's -1)."""
        img_ids = sorted(self._dets)
        if not img_ids:
            return [None] * 12
        gt = self.backend.coco(_gt_subset(self.gt, img_ids))
        raw = self.backend.stats(gt, self.results(iou_type), iou_type, img_ids)
        return [_fraction(v) for v in raw]

    def summary(self) -> dict[str, Any]:
        """box_ap, box_ap50, ... (mask_*, boundary_*), images, detections, backend and the full
        12 COCO stats per IoU type under ``stats``."""
        out: dict[str, Any] = {}
        all_stats = {}
        for iou_type in self.iou_types:
            stats = all_stats[iou_type] = self.stats(iou_type)
            for key in _REPORTED[iou_type]:
                out[f"{_PREFIX[iou_type]}_{key}"] = stats[_STAT_INDEX[key]]
        out.update(images=self.images, detections=self.detections, backend=self.backend.name,
                   stats=all_stats)
        return out


def write_results_json(path: str | os.PathLike, results: Iterable[dict[str, Any]]) -> Path:
    """Write a COCO results list to ``path`` atomically, one entry at a time (any iterable works,
    so a large split never has to be held as one list)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("[")
        for n, r in enumerate(results):
            f.write(",\n" if n else "\n")
            f.write(json.dumps(r))
        f.write("\n]\n")
    return Path(path)
