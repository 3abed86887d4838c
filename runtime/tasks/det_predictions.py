"""Detections saved on the device, scored on the host (the detection twin of runtime.predictions).

A detections folder holds:

* ``detections.jsonl``: one line per evaluated image, in evaluation order, written as the run
  streams: ``{"image_id", "boxes" (xyxy, original pixels), "scores", "category_ids"[, "masks"
  (compressed COCO RLE, one per box)]}`` (:class:`runtime.tasks.coco_eval.ImageDetections`).
  Images without detections have a line too: their ground truth still counts.
* ``results_bbox.json`` (and ``results_segm.json`` for instance segmentation): the same
  detections as COCO results lists, so ``COCO.loadRes`` and any COCO tool can read them directly.
* ``predictions.json`` (the manifest, written last, so a folder without one is an interrupted
  run): format "bckd-detections", the image ids, task, class names, COCO category ids, the model's
  card hash, the dataset split and the preprocessing.

The manifest file has the same name as a semantic predictions folder's, so ``bckd score`` can read
it and dispatch on its ``format``. Writing and scoring stream one image at a time and keep only
compact detections (RLE masks, never dense ones), so memory stays bounded whatever the split size.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from runtime.errors import BckdError
from runtime.files import atomic_write_json, refuse_existing
from runtime.tasks.coco_eval import (CocoMeter, ImageDetections, default_iou_types,
                                     write_results_json)

MANIFEST = "predictions.json"
FORMAT = "bckd-detections"
DETECTIONS = "detections.jsonl"
RESULTS = {"bbox": "results_bbox.json", "segm": "results_segm.json"}
_OURS = (MANIFEST, DETECTIONS, *RESULTS.values())


class DetectionWriter:
    """Streams per-image detections to ``detections.jsonl``; on close writes the COCO results files
    and then the manifest. A non-empty folder is refused unless ``force``.

    ``manifest`` must hold ``task`` ("detect" or "instance"), ``classes`` and ``category_ids``
    (contiguous label k is ``category_ids[k]``); other keys (model_sha256, split, preprocess) are
    kept as given.
    """

    def __init__(self, folder: str | os.PathLike, manifest: dict[str, Any],
                 force: bool = False) -> None:
        missing = [k for k in ("task", "classes", "category_ids") if k not in manifest]
        if missing:
            raise ValueError(f"a detections manifest needs {', '.join(missing)}")
        default_iou_types(manifest["task"])  # refuses a task without COCO AP
        self.folder = Path(folder)
        if self.folder.exists() and any(self.folder.iterdir()):
            refuse_existing(self.folder, "predictions folder", force)
            for name in _OURS:  # forced: no stale file of an earlier run may survive
                (self.folder / name).unlink(missing_ok=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.category_ids = [int(c) for c in manifest["category_ids"]]
        self.masks = manifest["task"] == "instance"
        self.manifest = dict(manifest, format=FORMAT, ids=[], detections=0,
                             files={"detections": DETECTIONS, **self._results_files()})
        self._file = open(self.folder / DETECTIONS, "w", encoding="utf-8")

    def _results_files(self) -> dict[str, str]:
        return {k: v for k, v in RESULTS.items() if k == "bbox" or self.masks}

    def write(self, image_id: int, boxes: Any, scores: Any, labels: Any,
              masks: np.ndarray | None = None) -> ImageDetections:
        """Convert (as :meth:`CocoMeter.update` does) and save one image's detections."""
        det = ImageDetections.from_arrays(image_id, boxes, scores, labels, self.category_ids,
                                          masks if self.masks else None)
        self.add(det)
        return det

    def add(self, det: ImageDetections) -> None:
        """Save one image's already-converted detections (the same object a CocoMeter can add)."""
        if self.masks and det.masks is None:
            if len(det):
                raise BckdError(f"image {det.image_id}: instance detections need masks")
            det = ImageDetections(det.image_id, det.boxes, det.scores, det.category_ids, [])
        elif not self.masks:
            det = ImageDetections(det.image_id, det.boxes, det.scores, det.category_ids, None)
        self._file.write(json.dumps(det.to_json()) + "\n")
        self.manifest["ids"].append(str(det.image_id))
        self.manifest["detections"] += len(det)

    def close(self) -> Path:
        """Finish the detections file, write the COCO results files, then the manifest."""
        self._file.close()
        for iou_type, name in self._results_files().items():
            write_results_json(self.folder / name, _iter_results(self.folder, iou_type))
        return atomic_write_json(self.folder / MANIFEST, self.manifest)

    def __enter__(self) -> "DetectionWriter":
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # an interrupted run leaves no manifest, so it can never be scored
            self._file.close()


def _iter_lines(folder: Path) -> Iterator[ImageDetections]:
    path = folder / DETECTIONS
    if not path.is_file():
        raise BckdError(f"{path} is missing; re-run the evaluation on the device")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                yield ImageDetections.from_json(json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                raise BckdError(f"{path} line {n} is not a detections record ({exc}); re-run the "
                                "evaluation on the device") from exc


def _iter_results(folder: Path, iou_type: str) -> Iterator[dict[str, Any]]:
    for det in _iter_lines(folder):
        yield from det.results(iou_type)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a finished detections folder (a BckdError for anything else)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BckdError(f"{folder} has no {MANIFEST}; it is not a finished 'bckd eval "
                        "--save-predictions' folder (re-run the evaluation)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise BckdError(f"{path} is not valid JSON ({exc}); re-run the evaluation") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BckdError(f"{path} is not a bckd detections manifest (format '{FORMAT}')")
    return manifest


def read_detections(folder: str | os.PathLike) -> Iterator[ImageDetections]:
    """The saved detections, one image at a time, checked against the manifest's ids."""
    folder = Path(folder)
    ids = read_manifest(folder)["ids"]
    n = 0
    for n, det in enumerate(_iter_lines(folder), 1):
        if n > len(ids) or str(det.image_id) != ids[n - 1]:
            raise BckdError(f"{folder / DETECTIONS} line {n} is image {det.image_id} but the "
                            "manifest lists another; the folder is mixed up, re-run the evaluation")
        yield det
    if n != len(ids):
        raise BckdError(f"{folder / DETECTIONS} holds {n} images but the manifest lists "
                        f"{len(ids)}; the file is truncated, re-run the evaluation")


def _check_matches(manifest: dict[str, Any], dataset: Any) -> None:
    split = getattr(dataset, "split", "?")
    if list(dataset.classes) != list(manifest["classes"]):
        raise BckdError(f"the detections are over classes {manifest['classes']} but the dataset "
                        f"has {list(dataset.classes)}; score against the dataset they came from")
    if [int(c) for c in dataset.category_ids] != [int(c) for c in manifest["category_ids"]]:
        raise BckdError(f"the detections use category ids {manifest['category_ids']} but the "
                        f"dataset has {list(dataset.category_ids)}; score against the dataset "
                        "they came from")
    known = {str(i) for i in dataset.ids}
    missing = [i for i in manifest["ids"] if i not in known]
    if missing:
        raise BckdError(f"{len(missing)} predicted ids (e.g. '{missing[0]}') are not in split "
                        f"'{split}'; pass the split that was evaluated ('{manifest.get('split')}')")


def score_detections(folder: str | os.PathLike, dataset: Any,
                     progress: Callable[[int, int], None] | None = None,
                     iou_types: Sequence[str] | None = None,
                     backend: str = "auto") -> dict[str, Any]:
    """COCO AP of the detections saved in ``folder`` against ``dataset``'s ground truth.

    ``dataset`` is a detection dataset (``coco``, ``ids``, ``classes``, ``category_ids``,
    ``split``). ``iou_types`` defaults to the manifest task's (:func:`default_iou_types`); only the
    saved images are scored (see :class:`CocoMeter`). ``progress(done, total)`` is called after
    each image.
    """
    manifest = read_manifest(folder)
    _check_matches(manifest, dataset)
    meter = CocoMeter(dataset.coco, dataset.category_ids,
                      iou_types or default_iou_types(manifest["task"]), backend)
    total = len(manifest["ids"])
    for done, det in enumerate(read_detections(folder), 1):
        meter.add(det)
        if progress:
            progress(done, total)
    return dict(meter.summary(), model_sha256=manifest.get("model_sha256"))
