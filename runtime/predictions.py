"""Predictions saved on the device, scored on the host.

``bckd eval --save-predictions DIR`` writes each predicted label map as ``DIR/<id>.png`` (8-bit,
at the network's input size, the size every metric is computed at) plus ``DIR/predictions.json``
(the model's card hash, the dataset split, the preprocessing and the class names). ``bckd score
DIR --data ROOT`` then computes the same metrics on another machine from those files and the
ground truth: the device needs no dataset labels and the host no runtime. Both stream one image
at a time, so memory stays bounded whatever the split size.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from runtime.boundary import BoundaryMeter
from runtime.data.preprocess import Preprocess
from runtime.errors import BckdError
from runtime.files import atomic_path, atomic_write_json, refuse_existing
from runtime.metrics import ConfusionMatrix

MANIFEST = "predictions.json"
FORMAT = "bckd-predictions"


class Scores:
    """Streaming mIoU, per-class IoU, pixel accuracy and boundary metrics."""

    def __init__(self, classes: list[str], ignore_index: int) -> None:
        self.classes = list(classes)
        self.cm = ConfusionMatrix(len(classes), ignore_index)
        self.edges = BoundaryMeter(len(classes), ignore_index)
        self.images = 0

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        """Add a (B, H, W) batch of predictions (or one (H, W) map) and its targets."""
        if pred.ndim == 2:
            pred, target = pred[None], target[None]
        self.cm.update(pred, target)
        for p, t in zip(pred, target):
            self.edges.update(p, t)
        self.images += len(pred)

    def summary(self) -> dict[str, Any]:
        out = self.cm.summary(self.classes)
        b = self.edges.summary()
        out.update(boundary_f=b["boundary_f"], boundary_iou=b["boundary_iou"], lhd=b["lhd"],
                   images=self.images)
        return out


class PredictionWriter:
    """Writes label maps as PNG files and, on close, the manifest; refuses a non-empty folder."""

    def __init__(self, folder: str | os.PathLike, manifest: dict[str, Any],
                 force: bool = False) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and any(self.folder.iterdir()):
            refuse_existing(self.folder, "predictions folder", force)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest = dict(manifest, format=FORMAT, ids=[])

    def write(self, image_id: str, pred: np.ndarray) -> None:
        from PIL import Image

        if pred.max(initial=0) > 255:
            raise BckdError("predictions with more than 256 classes cannot be saved as 8-bit PNG")
        path = self.folder / f"{image_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Image.fromarray(pred.astype(np.uint8), mode="L").save(tmp, format="PNG")
        self.manifest["ids"].append(str(image_id))

    def close(self) -> Path:
        """Write the manifest last: a folder without one is an interrupted run."""
        return atomic_write_json(self.folder / MANIFEST, self.manifest)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BckdError(f"{folder} has no {MANIFEST}; it is not a finished 'bckd eval "
                        "--save-predictions' folder (re-run the evaluation)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise BckdError(f"{path} is not a bckd predictions manifest")
    return manifest


def iter_predictions(folder: Path, ids: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
    from PIL import Image

    for image_id in ids:
        path = folder / f"{image_id}.png"
        if not path.is_file():
            raise BckdError(f"prediction {path} is missing; re-run the evaluation on the device")
        with Image.open(path) as im:
            yield image_id, np.asarray(im, dtype=np.uint8)


def score_predictions(folder: str | os.PathLike, dataset: Any,
                      progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Metrics of the saved predictions in ``folder`` against ``dataset``'s ground truth.

    ``progress(done, total)`` is called after each prediction is scored.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if list(dataset.classes) != list(manifest["classes"]):
        raise BckdError(f"the predictions are over classes {manifest['classes']} but the dataset "
                        f"has {list(dataset.classes)}; score against the dataset they came from")
    pre = Preprocess.from_dict(manifest["preprocess"])
    index = {str(i): k for k, i in enumerate(dataset.ids)}
    missing = [i for i in manifest["ids"] if i not in index]
    if missing:
        raise BckdError(f"{len(missing)} predicted ids (e.g. '{missing[0]}') are not in split "
                        f"'{getattr(dataset, 'split', '?')}'; pass the split that was evaluated "
                        f"('{manifest.get('split')}')")
    scores = Scores(manifest["classes"], pre.ignore_index)
    total = len(manifest["ids"])
    for done, (image_id, pred) in enumerate(iter_predictions(folder, manifest["ids"]), 1):
        target = pre.mask(dataset.load(index[image_id])[1])
        if pred.shape != target.shape:
            raise BckdError(f"prediction {image_id} is {pred.shape} but the target at the "
                            f"manifest's input size is {target.shape}")
        scores.update(pred, target)
        if progress:
            progress(done, total)
    return dict(scores.summary(), model_sha256=manifest.get("model_sha256"))
