"""Accuracy of any backend over a dataset split, accumulated as it streams.

Images are read, preprocessed with the model card's preprocessing (the one path in
:mod:`runtime.data.preprocess`), run, turned into predictions and scored by the card's task
(:mod:`runtime.tasks`) one batch at a time, so memory stays bounded whatever the split size.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from runtime.data.preprocess import Preprocess
from runtime.tasks import get_task
from runtime.tasks.base import Task


def evaluate_runner(runner, dataset, preprocess: Preprocess, classes: list[str] | None = None,
                    batch_size: int = 1,
                    progress: Callable[[int, int], None] | None = None,
                    writer: Any | None = None, task: Task | None = None,
                    card: dict[str, Any] | None = None) -> dict[str, Any]:
    """The task's scores of ``runner`` on ``dataset`` (the runner's card decides the task).

    Semantic: mIoU, pixel accuracy, per-class IoU and boundary metrics (fractions, except
    ``lhd`` in pixels). Detect / instance: COCO box (and mask, boundary) AP. A model calibrated
    on any image of ``dataset`` is refused (architecture.md rule 5). With ``writer`` each
    prediction is also saved, for scoring elsewhere (:mod:`runtime.predictions`). ``card``
    stands in for the runner's own card (a runner opened on a bare file has none).
    """
    _refuse_calibration_images(runner, dataset)
    card = dict(card if card is not None else (getattr(runner, "card", None) or {}))
    if classes is not None:
        card["classes"] = list(classes)
    task = task or get_task(card)
    meter = task.meter(dataset, preprocess, card)
    start = time.perf_counter()
    n = len(dataset)
    for lo in range(0, n, batch_size):
        idx = range(lo, min(lo + batch_size, n))
        samples = [dataset.load(i) for i in idx]
        x = preprocess.batch([img for img, _ in samples])
        predictions = task.postprocess(runner.run(x), card, preprocess, samples)
        meter.update(idx, predictions, samples)
        if writer is not None:
            for i, p in zip(idx, predictions):
                writer.write(str(dataset.ids[i]), p)
        if progress:
            progress(idx[-1] + 1, n)
    if writer is not None:
        writer.close()
    return dict(meter.summary(), seconds=round(time.perf_counter() - start, 3))


def _refuse_calibration_images(runner, dataset) -> None:
    """Raise a BckdError if the runner's card (or its source chain) was calibrated on ``dataset``."""
    card = getattr(runner, "card", None)
    if card:
        from calib.card import check_disjoint  # torch-free; only INT8 cards carry calibration

        check_disjoint(card, dataset, artifact=getattr(runner, "artifact", None))
