"""Format ``images``: a plain folder of images with no labels, for calibrating and timing models
bckd did not make (torch-free).

``root/<split>/`` when that folder exists, else ``root/`` itself; every image file below it
(recursively, sorted by relative path) is a sample whose id is that path without its suffix.
``load(i)`` returns ``(uint8 HxWx3 RGB, None)``: there is nothing to score, only to feed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from runtime.data import DATASETS
from runtime.data.folder import IMAGE_EXTS
from runtime.data.preprocess import read_image
from runtime.errors import BckdError


class ImageFolder:
    """The image files under one folder (see the module docstring)."""

    classes: list[str] = []
    num_classes = 0
    ignore_index = 255
    palette: list[list[int]] = []

    def __init__(self, root: str | os.PathLike, split: str) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise BckdError(f"image folder {self.root} not found; check --data")
        folder = self.root / split if (self.root / split).is_dir() else self.root
        self.split = split if folder != self.root else ""
        exts = {e.lower() for e in IMAGE_EXTS}
        self._paths = sorted(p for p in folder.rglob("*")
                             if p.is_file() and p.suffix.lower() in exts)
        if not self._paths:
            raise BckdError(f"no images ({', '.join(sorted(exts))}) under {folder}; point --data "
                            "at a folder of images")
        self.ids = [str(p.relative_to(folder).with_suffix("")) for p in self._paths]
        self.meta: dict[str, Any] = {"name": self.root.name, "format": "images",
                                     "images": len(self.ids)}

    def __len__(self) -> int:
        return len(self._paths)

    def image_path(self, i: int) -> Path:
        return self._paths[i]

    def load(self, i: int) -> tuple[np.ndarray, None]:
        return read_image(self._paths[i]), None


@DATASETS.register("images")
def open_images(root: str | os.PathLike, split: str) -> ImageFolder:
    return ImageFolder(root, split)
