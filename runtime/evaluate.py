"""Accuracy of any backend over a dataset split, accumulated as it streams.

Images are read, preprocessed with the model card's preprocessing (the one path in
:mod:`runtime.data.preprocess`) and scored into a confusion matrix one batch at a time, so memory
stays bounded whatever the split size.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from runtime.data.preprocess import Preprocess
from runtime.predictions import PredictionWriter, Scores


def evaluate_runner(runner, dataset, preprocess: Preprocess, classes: list[str],
                    batch_size: int = 1,
                    progress: Callable[[int, int], None] | None = None,
                    writer: PredictionWriter | None = None) -> dict[str, Any]:
    """mIoU, pixel accuracy, per-class IoU and boundary metrics of ``runner`` on ``dataset``.

    Scores are fractions, except ``lhd`` (pixels); the boundary metrics (boundary F, boundary IoU,
    LHD, against the ground truth) are those of :class:`runtime.boundary.BoundaryMeter`. A model
    calibrated on any image of ``dataset`` is refused (architecture.md rule 5). With ``writer``
    each predicted label map is also saved, for scoring elsewhere (:mod:`runtime.predictions`).
    """
    _refuse_calibration_images(runner, dataset)
    scores = Scores(classes, preprocess.ignore_index)
    start = time.perf_counter()
    n = len(dataset)
    for lo in range(0, n, batch_size):
        idx = range(lo, min(lo + batch_size, n))
        pairs = [dataset.load(i) for i in idx]
        x = preprocess.batch([img for img, _ in pairs])
        pred = np.argmax(runner.infer(x), axis=1)
        scores.update(pred, np.stack([preprocess.mask(m) for _, m in pairs]))
        if writer is not None:
            for i, p in zip(idx, pred):
                writer.write(str(dataset.ids[i]), p)
        if progress:
            progress(idx[-1] + 1, n)
    if writer is not None:
        writer.close()
    return dict(scores.summary(), seconds=round(time.perf_counter() - start, 3))


def _refuse_calibration_images(runner, dataset) -> None:
    """Raise a BckdError if the runner's card (or its source chain) was calibrated on ``dataset``."""
    card = getattr(runner, "card", None)
    if card:
        from calib.card import check_disjoint  # torch-free; only INT8 cards carry calibration

        check_disjoint(card, dataset, artifact=getattr(runner, "artifact", None))
