"""Shared machinery of the loaders for standard datasets (VOC, Cityscapes, ADE20K, COCO-Stuff).

A format module only says where its files live and how its raw label ids map to training ids.
This module pairs images with masks, reads split lists and ``.mat`` labels, remaps labels through
a 256-entry uint8 lookup table, and reports layout problems as one-line :class:`BckdError`
messages when the dataset is opened, not halfway through a training run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from runtime.data import DATASETS
from runtime.data.preprocess import read_image, read_mask
from runtime.errors import BckdError
from runtime.lazy import require

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Spec:
    """What a format's training ids mean: dataset name, registry name, class names and colours."""

    name: str
    format: str
    classes: tuple[str, ...]
    palette: Sequence[Sequence[int]]


@dataclass(frozen=True)
class Sample:
    """One image and the file holding its raw labels (a class-index PNG or a ``.mat``)."""

    id: str
    image: Path
    mask: Path


class LabelMap:
    """Raw label id -> training id through a 256-entry uint8 lookup table.

    Raw ids outside ``valid`` mean the file is not what the format expects (for instance trainIds
    where labelIds belong), so they are reported instead of silently becoming ``ignore``.
    """

    def __init__(self, pairs: Mapping[int, int], valid: Iterable[int], describe: str) -> None:
        self.lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        for raw, train_id in pairs.items():
            self.lut[raw] = train_id
        self.valid = np.zeros(256, dtype=bool)
        self.valid[list(valid)] = True
        self.describe = describe

    @classmethod
    def identity(cls, num_classes: int, describe: str) -> "LabelMap":
        """Labels already are training ids 0..num_classes-1, with 255 for ignore."""
        return cls({k: k for k in range(num_classes)}, [*range(num_classes), IGNORE_INDEX], describe)

    @classmethod
    def reduce_zero(cls, num_classes: int, describe: str) -> "LabelMap":
        """0 ('unlabelled') -> ignore, k -> k - 1 for k in 1..num_classes (mmseg's reduce_zero_label)."""
        return cls({k: k - 1 for k in range(1, num_classes + 1)}, range(num_classes + 1), describe)

    def apply(self, raw: np.ndarray, source: Path) -> np.ndarray:
        """Training-id mask (uint8 HxW) of the raw label array read from ``source``."""
        labels = _as_uint8(raw, source)
        present = np.bincount(labels.ravel(), minlength=256) > 0
        bad = np.flatnonzero(present & ~self.valid)
        if bad.size:
            raise BckdError(f"label file {source} holds label {int(bad[0])}, which is not one of the "
                            f"{self.describe}; the file does not belong to this dataset format")
        return self.lut[labels]


def _as_uint8(raw: np.ndarray, source: Path) -> np.ndarray:
    if raw.dtype == np.uint8:
        return raw
    ok = np.issubdtype(raw.dtype, np.number) and not np.issubdtype(raw.dtype, np.complexfloating)
    ints = raw.astype(np.int64) if ok else None
    if ints is None or (raw.size and (np.any(ints != raw) or ints.min() < 0 or ints.max() > 255)):
        raise BckdError(f"label file {source} does not hold integer labels in 0-255 (dtype "
                        f"{raw.dtype}); it is not a label map of this dataset format")
    return ints.astype(np.uint8)


# --- finding the files ---------------------------------------------------------------------------


def check_root(root: str | os.PathLike, fmt: str) -> Path:
    """``root`` as a Path, if it is an existing folder."""
    path = Path(root)
    if not path.is_dir():
        raise BckdError(f"dataset root {path} does not exist or is not a folder; pass the folder "
                        f"that holds the '{fmt}' data")
    return path


def layout_error(root: Path, fmt: str, expected: str) -> BckdError:
    formats = ", ".join(DATASETS.names())
    return BckdError(f"{root} is not laid out in the '{fmt}' format: expected {expected}; point the "
                     f"root at the dataset or choose the format that matches it ({formats})")


def find_layout(root: Path, fmt: str, candidates: Sequence[Path], markers: Sequence[str]) -> Path:
    """The first of ``candidates`` that holds every sub-folder in ``markers``."""
    for base in candidates:
        if all((base / m).is_dir() for m in markers):
            return base
    raise layout_error(root, fmt, " and ".join(str(candidates[0] / m) for m in markers))


def subdirs(folder: Path) -> list[str]:
    """Names of the sub-folders of ``folder`` (sorted; none if it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def txt_stems(folder: Path) -> list[str]:
    """Names of the ``*.txt`` split lists in ``folder`` (sorted)."""
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.txt") if p.is_file())


def split_error(split: str, root: Path, expected: Path, available: Iterable[str]) -> BckdError:
    listed = ", ".join(sorted(set(available))) or "none"
    return BckdError(f"split '{split}' not found in {root} (no {expected}); available splits: {listed}")


def read_id_list(path: Path) -> list[str]:
    """Ids listed one per line in ``path`` (blank lines skipped)."""
    if not path.is_file():
        raise BckdError(f"id list {path} not found; restore it from the dataset's archive")
    ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    ids = [i for i in ids if i]
    if not ids:
        raise BckdError(f"id list {path} lists no ids; add one id per line")
    return ids


def scan(folder: Path, suffix: str) -> dict[str, Path]:
    """Map id -> file for the files in ``folder`` named ``<id><suffix>`` (one directory scan)."""
    if not folder.is_dir():
        return {}
    cut = len(suffix)
    return {e.name[:-cut]: Path(e.path) for e in os.scandir(folder)
            if e.name.endswith(suffix) and len(e.name) > cut and e.is_file()}


def _match(ids: Sequence[str], index: Mapping[str, Path], kind: str,
           expected: Callable[[str], Path], fix: str) -> list[Path]:
    missing = [i for i in ids if i not in index]
    if missing:
        raise BckdError(f"no {kind} for '{missing[0]}': {expected(missing[0])} not found "
                        f"({len(missing)} of {len(ids)} samples lack one); {fix}")
    return [index[i] for i in ids]


def pair(ids: Sequence[str], images: Mapping[str, Path], masks: Mapping[str, Path],
         expect_image: Callable[[str], Path], expect_mask: Callable[[str], Path], fix: str) -> list[Sample]:
    """Samples for ``ids``; a missing image or mask is reported with the path it was expected at."""
    image_paths = _match(ids, images, "image", expect_image, fix)
    mask_paths = _match(ids, masks, "mask", expect_mask, fix)
    return [Sample(i, img, mask) for i, img, mask in zip(ids, image_paths, mask_paths)]


# --- reading labels ----------------------------------------------------------------------------


def read_mat_labels(path: Path, key: str) -> np.ndarray:
    """The 2-D label array under ``key`` of a MATLAB file; ``"GTcls.Segmentation"`` walks a struct."""
    sio = require("scipy.io", "reading .mat label files")
    try:
        value: Any = sio.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    # scipy reports corrupt files with any of these (a truncated header raises IndexError)
    except (OSError, EOFError, ValueError, TypeError, IndexError, NotImplementedError,
            sio.matlab.MatReadError) as exc:
        raise BckdError(f"cannot read label file {path} ({exc}); it is corrupt, truncated or not a "
                        "MATLAB v5 file, re-create or remove it") from exc
    for part in key.split("."):
        names = list(value) if isinstance(value, dict) else list(getattr(value, "_fieldnames", []))
        if part not in names:
            found = ", ".join(n for n in names if not n.startswith("__")) or "nothing"
            raise BckdError(f"label file {path} has no '{key}' (it holds: {found}); it is not a label "
                            "file of this dataset, replace or remove it")
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    labels = np.asarray(value)
    if labels.ndim != 2:
        raise BckdError(f"label file {path}: '{key}' has shape {labels.shape}, not a 2-D label map; "
                        "replace or remove the file")
    return labels


class StandardDataset:
    """One split of a standard dataset: paired files, labels remapped to training ids when loaded.

    Same interface as :class:`runtime.data.folder.FolderDataset`: ``ids``, ``classes``,
    ``num_classes``, ``ignore_index``, ``palette``, ``meta``, ``len()``, ``image_path(i)``,
    ``mask_path(i)`` and ``load(i) -> (uint8 HxWx3 RGB, uint8 HxW training-id mask)``.
    """

    def __init__(self, spec: Spec, root: Path, split: str, samples: Sequence[Sample],
                 labels: LabelMap, layout: str, mat_key: str = "") -> None:
        if not samples:
            raise BckdError(f"split '{split}' of the '{spec.format}' dataset at {root} holds no "
                            f"images ({layout}); check the folder")
        self.root, self.split = root, split
        self.ids = [s.id for s in samples]
        self.classes = list(spec.classes)
        self.num_classes = len(self.classes)
        self.ignore_index = IGNORE_INDEX
        self.palette = [[int(c) for c in rgb] for rgb in spec.palette]
        self.meta: dict[str, Any] = {
            "name": spec.name, "format": spec.format, "classes": self.classes,
            "ignore_index": self.ignore_index, "palette": self.palette, "layout": layout,
            "labels": labels.describe,
        }
        self._samples = list(samples)
        self._labels = labels
        self._mat_key = mat_key

    def __len__(self) -> int:
        return len(self._samples)

    def __repr__(self) -> str:
        return (f"StandardDataset(format={self.meta['format']!r}, root={str(self.root)!r}, "
                f"split={self.split!r}, n={len(self)})")

    def image_path(self, i: int) -> Path:
        return self._samples[i].image

    def mask_path(self, i: int) -> Path:
        """The file holding sample ``i``'s raw labels (a PNG, or a ``.mat`` for SBD / COCO-Stuff)."""
        return self._samples[i].mask

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 HxWx3 RGB image, uint8 HxW training-id mask, ignore = 255) of sample ``i``."""
        sample = self._samples[i]
        img = read_image(sample.image)
        if sample.mask.suffix == ".mat":
            raw = read_mat_labels(sample.mask, self._mat_key)
        else:
            raw = read_mask(sample.mask)  # class indices as stored; palette colours are never used
        if img.shape[:2] != raw.shape:
            raise BckdError(f"mask {sample.mask} is {raw.shape[1]}x{raw.shape[0]} but image "
                            f"{sample.image} is {img.shape[1]}x{img.shape[0]}; masks must match their "
                            "image's size")
        return img, self._labels.apply(raw, sample.mask)
