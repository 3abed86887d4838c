"""Datasets and the one preprocessing path, torch-free (architecture.md rules 1 and 2).

Dataset loaders register in :data:`DATASETS` by format name and are opened with
:func:`open_dataset`; each returns an object with ``ids``, ``classes``, ``num_classes``,
``ignore_index``, ``palette``, ``meta``, ``__len__`` and ``load(i) -> (uint8 HxWx3 RGB, uint8 HxW mask)``.
Formats: ``folder`` (:mod:`.folder`) and the standard datasets ``voc``, ``cityscapes``, ``ade20k``
and ``cocostuff10k`` (:mod:`.standard` and one module each).

Detection / instance segmentation: format ``coco`` (:mod:`.coco`), whose ``load(i)`` returns
``(uint8 HxWx3 RGB, target dict)`` with boxes, labels, iscrowd, area and optional masks.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from runtime.registry import Registry

# Defined before the loader modules are imported, because they register themselves into it.
DATASETS: Registry[Callable[[str | os.PathLike, str], Any]] = Registry("dataset format")

from runtime.data.preprocess import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    BoxTransform,
    Preprocess,
    read_image,
    read_mask,
    resize_image,
    resize_mask,
)
from runtime.data.folder import FolderDataset, list_splits, write_dataset_meta  # noqa: E402
from runtime.data.standard import StandardDataset  # noqa: E402
# Importing a loader module registers its format(s).
from runtime.data import ade20k, cityscapes, coco, cocostuff, images, voc  # noqa: E402
from runtime.data.coco import CocoDataset  # noqa: E402


def open_dataset(root: str | os.PathLike, split: str, format: str = "folder") -> Any:
    """Open ``split`` of the dataset at ``root`` with the loader registered for ``format``."""
    return DATASETS.get(format)(root, split)


__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BoxTransform",
    "CocoDataset",
    "FolderDataset",
    "Preprocess",
    "StandardDataset",
    "ade20k",
    "cityscapes",
    "coco",
    "cocostuff",
    "list_splits",
    "open_dataset",
    "read_image",
    "read_mask",
    "resize_image",
    "resize_mask",
    "voc",
    "write_dataset_meta",
]
