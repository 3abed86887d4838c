"""The task interface every stage dispatches on (see :mod:`runtime.tasks`)."""
from __future__ import annotations

import abc
from typing import Any, Sequence

import numpy as np

# One sample as a dataset's ``load(i)`` returns it: (uint8 HxWx3 image, ground truth).
Sample = tuple[np.ndarray, Any]


class Meter(abc.ABC):
    """Accumulates a metric over predictions, one batch at a time, in bounded memory."""

    @abc.abstractmethod
    def update(self, indices: Sequence[int], predictions: Sequence[Any],
               samples: Sequence[Sample]) -> None:
        """Score the predictions of dataset items ``indices`` against their samples."""

    @abc.abstractmethod
    def summary(self) -> dict[str, Any]:
        """Scores as fractions (lhd and counts excepted), JSON-ready."""


class Task(abc.ABC):
    """What a kind of prediction means to evaluation, parity, prediction files and reports."""

    name: str = ""
    # The dataset format of the built-in data for this task, and the headline metric's key.
    dataset_format: str = "folder"
    metric: str = ""
    # Report columns: (row key, header, format); values are already in report units.
    columns: tuple[tuple[str, str, str], ...] = ()
    # INT8: keep every node after the last weighted layer (postprocess in the graph) in float.
    int8_float_tail: bool = False
    # The summary key an accuracy budget (``bckd calib --budget``, in points) is measured on.
    budget_metric: str = ""

    @abc.abstractmethod
    def postprocess(self, outputs: dict[str, np.ndarray], card: dict[str, Any] | None,
                    preprocess: Any, samples: Sequence[Sample]) -> list[Any]:
        """Raw network outputs of one batch -> one prediction per sample, in the frame the
        metric scores it in (label maps at the input size; detections in original pixels)."""

    @abc.abstractmethod
    def meter(self, dataset: Any, preprocess: Any, card: dict[str, Any] | None) -> Meter:
        """A fresh meter for ``dataset``."""

    @abc.abstractmethod
    def compare(self, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                card: dict[str, Any] | None) -> dict[str, Any]:
        """Parity of a candidate's outputs against the reference's on the same input."""

    @abc.abstractmethod
    def writer(self, folder: Any, manifest: dict[str, Any], force: bool = False) -> Any:
        """A prediction writer (``write(image_id, prediction)``, ``close()``) for ``folder``."""

    @abc.abstractmethod
    def row(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The report-row fields of an evaluation summary, in report units (percent)."""

    def stage_postprocess(self, card: dict[str, Any] | None) -> Any:
        """What per-stage timing calls after inference (on the first output, or on all of them
        by name for tasks other than semantic)."""
        from runtime.profile import label_map

        return label_map

    def check_dataset(self, dataset: Any, card: dict[str, Any] | None, model: Any) -> None:
        """Raise a BckdError when ``dataset`` cannot be scored with this model."""
