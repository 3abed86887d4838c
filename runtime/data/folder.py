"""The plain folder dataset format (``bckd-folder``): reader, validator and metadata writer.

Layout::

    root/dataset.json        {"format": "bckd-folder", "version": 1, "name", "classes",
                              "ignore_index", "palette", optional "generator"}
    root/images/<id>.png     (or .jpg / .jpeg), RGB
    root/masks/<id>.png      class-index PNG, mode L or P
    root/splits/<split>.txt  one id per line

The procedural generator writes this format, and users can bring their own data in it. Problems
are reported when the dataset is opened, not halfway through a training run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime.data import DATASETS
from runtime.data.preprocess import read_image, read_mask
from runtime.data.standard import read_id_list, split_error
from runtime.errors import BckdError
from runtime.files import atomic_write_json

FORMAT = "bckd-folder"
FORMAT_VERSION = 1
META_FILE = "dataset.json"
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
_REQUIRED_KEYS = ("format", "version", "name", "classes")


def default_palette(num_classes: int) -> list[list[int]]:
    """The Pascal VOC colour map (bit-interleaved), used when a dataset stores no palette."""
    palette = []
    for label in range(num_classes):
        rgb = [0, 0, 0]
        c = label
        for shift in range(7, -1, -1):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << shift
            c >>= 3
        palette.append(rgb)
    return palette


def write_dataset_meta(
    root: str | os.PathLike,
    name: str,
    classes: Sequence[str],
    palette: Sequence[Sequence[int]],
    ignore_index: int = 255,
    **extra: Any,
) -> Path:
    """Write ``root/dataset.json`` atomically; ``extra`` keys (e.g. ``generator``) are stored as given."""
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": name,
        "classes": list(classes),
        "ignore_index": int(ignore_index),
        "palette": [[int(c) for c in rgb] for rgb in palette],
    }
    meta.update(extra)
    _validate_meta(meta, Path(root) / META_FILE)
    return atomic_write_json(Path(root) / META_FILE, meta)


def _validate_meta(meta: Any, path: Path) -> None:
    """Raise a BckdError naming ``path`` if ``meta`` is not a valid dataset description."""
    def bad(why: str) -> BckdError:
        return BckdError(f"dataset description {path} is invalid: {why}")

    if not isinstance(meta, dict):
        raise bad("expected a JSON object")
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise bad(f"missing key(s) {', '.join(missing)} (required: {', '.join(_REQUIRED_KEYS)})")
    if meta["format"] != FORMAT or meta["version"] != FORMAT_VERSION:
        raise bad(f"format {meta['format']!r} version {meta['version']!r}; this reader handles "
                  f"{FORMAT!r} version {FORMAT_VERSION}")
    classes = meta["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise bad("'classes' must be a non-empty list of class names")
    ignore = meta.get("ignore_index", 255)
    if not isinstance(ignore, int) or not 0 <= ignore <= 255 or ignore < len(classes):
        raise bad(f"'ignore_index' must be an int in [{len(classes)}, 255], got {ignore!r}")
    palette = meta.get("palette")
    if palette is not None and (
        len(palette) != len(classes) or any(len(rgb) != 3 for rgb in palette)
    ):
        raise bad(f"'palette' must hold one [r, g, b] per class ({len(classes)})")


def read_dataset_meta(root: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``root/dataset.json``."""
    path = Path(root) / META_FILE
    if not path.is_file():
        raise BckdError(f"{path} not found; {root} is not a {FORMAT} dataset "
                        "(create it with `bckd data synth` or write dataset.json by hand)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BckdError(f"dataset description {path} is not valid JSON ({exc}); fix or re-create it") from exc
    _validate_meta(meta, path)
    return meta


def list_splits(root: str | os.PathLike) -> list[str]:
    """Names of the splits defined under ``root/splits/`` (sorted)."""
    split_dir = Path(root) / "splits"
    if not split_dir.is_dir():
        return []
    return sorted(p.stem for p in split_dir.glob("*.txt") if p.is_file())


def _read_split(root: Path, split: str) -> list[str]:
    path = root / "splits" / f"{split}.txt"
    if not path.is_file():
        raise split_error(split, root, path, list_splits(root))
    return read_id_list(path)


def _index_files(folder: Path, exts: Sequence[str]) -> dict[str, Path]:
    """Map id -> file for files in ``folder`` with one of ``exts`` (one directory scan, not one stat per id)."""
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for entry in os.scandir(folder):
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() in exts and stem not in found:
            found[stem] = Path(entry.path)
    return found


def _resolve(ids: list[str], index: dict[str, Path], folder: Path, kind: str, ext_hint: str) -> list[Path]:
    missing = [i for i in ids if i not in index]
    if missing:
        raise BckdError(
            f"{kind} {folder / (missing[0] + ext_hint)} not found ({len(missing)} of {len(ids)} "
            f"listed {kind}s are missing); add the files or remove their ids from the split file"
        )
    return [index[i] for i in ids]


class FolderDataset:
    """One split of a ``bckd-folder`` dataset, validated when opened."""

    def __init__(self, root: str | os.PathLike, split: str) -> None:
        self.root = Path(root)
        self.split = split
        self.meta = read_dataset_meta(self.root)
        self.classes: list[str] = list(self.meta["classes"])
        self.num_classes = len(self.classes)
        self.ignore_index: int = int(self.meta.get("ignore_index", 255))
        self.palette: list[list[int]] = self.meta.get("palette") or default_palette(self.num_classes)
        self.ids = _read_split(self.root, split)
        images, masks = self.root / "images", self.root / "masks"
        self._images = _resolve(self.ids, _index_files(images, IMAGE_EXTS), images, "image", ".png")
        self._masks = _resolve(self.ids, _index_files(masks, (".png",)), masks, "mask", ".png")

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"FolderDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"

    def image_path(self, i: int) -> Path:
        return self._images[i]

    def mask_path(self, i: int) -> Path:
        return self._masks[i]

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 HxWx3 RGB image, uint8 HxW class-index mask) of sample ``i``, checked for consistency."""
        img, mask = read_image(self._images[i]), read_mask(self._masks[i])
        if img.shape[:2] != mask.shape:
            raise BckdError(
                f"mask {self._masks[i]} is {mask.shape[1]}x{mask.shape[0]} but image {self._images[i]} "
                f"is {img.shape[1]}x{img.shape[0]}; masks must match their image's size"
            )
        self._check_labels(mask, i)
        return img, mask

    def _check_labels(self, mask: np.ndarray, i: int) -> None:
        values = np.unique(mask)
        bad = values[(values >= self.num_classes) & (values != self.ignore_index)]
        if bad.size:
            raise BckdError(
                f"mask {self._masks[i]} holds label {int(bad[0])}, but the dataset has "
                f"{self.num_classes} classes (0-{self.num_classes - 1}) and ignore_index "
                f"{self.ignore_index}; fix the mask or the class list in {META_FILE}"
            )


@DATASETS.register("folder")
def open_folder(root: str | os.PathLike, split: str) -> FolderDataset:
    """Loader for the ``bckd-folder`` format."""
    return FolderDataset(root, split)
