"""COCO-style detection and instance-segmentation ground truth (dataset format ``coco``), torch-free.

Two layouts are read, tried in this order::

    root/annotations/instances_{split}2017.json  + root/{split}2017/<file_name>   (COCO 2017)
    root/annotations/instances_{split}.json      + root/images/<file_name>       (bckd data synth --task ...)

The annotation file is checked when the dataset is opened, before any long work: a missing or
corrupt file, images missing on disk or whose size disagrees with the file's header, boxes outside
the image (by more than :data:`BOX_TOLERANCE_PX`) or of non-positive size, unknown category ids
and duplicate ids are each one :class:`BckdError` line. Zero-size boxes whose ``area`` is 0 too are
skipped instead (COCO train2017 holds two such defects, cocodataset/cocoapi#355); they count in
``meta["skipped_degenerate"]``.

Classes are the category names in ascending category-id order; label ``k`` is
``category_ids[k]``. Masks are decoded with ``pycocotools.mask`` (polygons and RLE, as
``COCO.annToMask`` does) and :attr:`CocoDataset.coco` is a pycocotools ``COCO`` over the file's
content as given, for standard COCO evaluation; pycocotools is imported only when needed.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime.data import DATASETS
from runtime.data.folder import default_palette
from runtime.data.preprocess import read_image
from runtime.data.standard import check_root
from runtime.errors import BckdError
from runtime.lazy import require

FORMAT = "coco"
IGNORE_INDEX = 255  # kept for the dataset interface; boxes and masks have no ignore label
# A box may overshoot the image by this much (pixels) on any side: COCO's float boxes, taken
# from polygons, sometimes end a fraction of a pixel past the border.
BOX_TOLERANCE_PX = 1.0
# (annotation file, image folder, layout name); {split} is the split name
LAYOUTS = (
    ("instances_{split}2017.json", "{split}2017", "coco2017"),
    ("instances_{split}.json", "images", "bckd-synth"),
    ("instances_{split}.json", "{split}", "coco"),
)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def find_layout(root: Path, split: str) -> tuple[Path, Path, str]:
    """(annotation file, image folder, layout name) of ``split`` under ``root``."""
    ann_dir = root / "annotations"
    for ann_pattern, image_pattern, layout in LAYOUTS:
        ann = ann_dir / ann_pattern.format(split=split)
        images = root / image_pattern.format(split=split)
        if ann.is_file() and images.is_dir():
            return ann, images, layout
    for ann_pattern, image_pattern, _ in LAYOUTS:
        if (ann_dir / ann_pattern.format(split=split)).is_file():
            raise BckdError(f"{ann_dir / ann_pattern.format(split=split)} has no image folder: expected "
                            f"{root / image_pattern.format(split=split)}; put the images there")
    found = sorted(p.name for p in ann_dir.glob("instances_*.json")) if ann_dir.is_dir() else []
    real, synth = (ann_dir / LAYOUTS[n][0].format(split=split) for n in (0, 1))
    raise BckdError(f"split '{split}' not found in {root}: expected {real} (COCO 2017) or {synth} (bckd "
                    f"synthetic); annotation files there: {', '.join(found) or 'none'}")


def read_annotation_file(path: Path) -> dict[str, Any]:
    """The parsed json of a COCO annotation file, with its three lists present."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BckdError(f"COCO annotation file {path} is not valid JSON ({exc}); re-download or "
                        "re-create it") from exc
    if not isinstance(data, dict):
        raise BckdError(f"COCO annotation file {path} holds a {type(data).__name__}, not a JSON object "
                        "with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise BckdError(f"COCO annotation file {path} has no '{key}' list (a COCO instances file "
                            "has images, annotations and categories)")
    return data


class _Checker:
    """Checks one annotation file's entries; every problem is one BckdError naming the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, what: str, fix: str = "fix or remove it") -> BckdError:
        return BckdError(f"COCO annotation file {self.path}: {what}; {fix}")

    def unique_ids(self, entries: list[Any], kind: str, keys: Sequence[str]) -> None:
        """Every entry is an object with ``keys`` and an int ``id`` no other entry has."""
        seen: set[int] = set()
        for n, entry in enumerate(entries):
            missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
            if missing:
                raise self.fail(f"{kind} #{n} lacks {', '.join(missing)} (required: {', '.join(keys)})")
            if not _is_int(entry["id"]):
                raise self.fail(f"{kind} #{n} has id {entry['id']!r}, not an integer")
            if entry["id"] in seen:
                raise self.fail(f"{kind} id {entry['id']} is used twice", f"give every {kind} its own id")
            seen.add(entry["id"])

    def categories(self, cats: list[Any]) -> list[dict[str, Any]]:
        self.unique_ids(cats, "category", ("id", "name"))
        if not cats:
            raise self.fail("'categories' is empty", "list the categories the annotations use")
        return sorted(cats, key=lambda c: c["id"])

    def images(self, images: list[Any]) -> list[dict[str, Any]]:
        self.unique_ids(images, "image", ("id", "file_name", "height", "width"))
        for img in images:
            if not isinstance(img["file_name"], str) or not img["file_name"]:
                raise self.fail(f"image {img['id']} has file_name {img['file_name']!r}, not a file name")
            h, w = img["height"], img["width"]
            if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
                raise self.fail(f"image {img['id']} records size {img['width']!r}x{img['height']!r}, "
                                "not two positive integers")
        return sorted(images, key=lambda i: i["id"])

    def box(self, ann: dict[str, Any], img: dict[str, Any]) -> bool:
        """Whether ``ann``'s box is usable: False for a zero-size, zero-area defect; raises when wrong."""
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise self.fail(f"annotation {ann['id']} has bbox {bbox!r}, not [x, y, width, height]")
        x, y, w, h = bbox
        if (w == 0 or h == 0) and ann.get("area", 0) == 0:
            return False
        if w <= 0 or h <= 0:
            raise self.fail(f"annotation {ann['id']} (image {img['id']}) has a box of non-positive size "
                            f"{w}x{h} (bbox {bbox})")
        tol, iw, ih = BOX_TOLERANCE_PX, img["width"], img["height"]
        if x < -tol or y < -tol or x + w > iw + tol or y + h > ih + tol:
            raise self.fail(f"annotation {ann['id']} has box {bbox} (x, y, w, h), outside image {img['id']} "
                            f"of {iw}x{ih} by more than {tol:g} px")
        return True

    def segmentation(self, ann: dict[str, Any], img: dict[str, Any]) -> None:
        segm = ann["segmentation"]
        if isinstance(segm, list):
            if not all(isinstance(poly, list) for poly in segm):
                raise self.fail(f"annotation {ann['id']} has a segmentation list that is not a list of "
                                "polygons")
        elif isinstance(segm, dict):
            if "counts" not in segm or segm.get("size") != [img["height"], img["width"]]:
                raise self.fail(f"annotation {ann['id']} has an RLE segmentation of size "
                                f"{segm.get('size')!r} (needs counts and size [{img['height']}, "
                                f"{img['width']}], its image's)")
        else:
            raise self.fail(f"annotation {ann['id']} has a segmentation that is neither polygons nor RLE")

    def annotations(self, anns: list[Any], images: dict[int, dict],
                    cat_ids: set[int]) -> tuple[dict[int, list[dict]], int, bool]:
        """(image id -> its usable annotations, number skipped as degenerate, whether they carry masks)."""
        self.unique_ids(anns, "annotation", ("id", "image_id", "category_id", "bbox"))
        by_image: dict[int, list[dict[str, Any]]] = {i: [] for i in images}
        skipped = with_segm = 0
        for ann in anns:
            img = images.get(ann["image_id"])
            if img is None:
                raise self.fail(f"annotation {ann['id']} refers to image {ann['image_id']!r}, which 'images' "
                                "does not list")
            if ann["category_id"] not in cat_ids:
                raise self.fail(f"annotation {ann['id']} has category {ann['category_id']!r}, not one of the "
                                f"categories ({', '.join(map(str, sorted(cat_ids)))})")
            if ann.get("iscrowd", 0) not in (0, 1):
                raise self.fail(f"annotation {ann['id']} has iscrowd {ann['iscrowd']!r}, not 0 or 1")
            if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
                raise self.fail(f"annotation {ann['id']} has area {ann['area']!r}, not a number >= 0")
            if ann.get("segmentation"):
                self.segmentation(ann, img)
                with_segm += 1
            if self.box(ann, img):
                by_image[img["id"]].append(ann)
            else:
                skipped += 1
        if 0 < with_segm < len(anns):
            raise self.fail(f"{len(anns) - with_segm} of {len(anns)} annotations have no segmentation",
                            "give every annotation a mask, or drop all masks for a box-only dataset")
        return by_image, skipped, with_segm > 0


def check_image_files(images: list[dict[str, Any]], folder: Path, ann_file: Path) -> list[Path]:
    """The files of ``images`` under ``folder``; each must exist and have the size the json records.

    Only the headers are read (Pillow opens lazily), so this is cheap next to decoding.
    """
    Image = require("PIL.Image", "reading image headers")
    present = set(os.listdir(folder))
    paths = [folder / img["file_name"] for img in images]
    missing = [p for img, p in zip(images, paths) if img["file_name"] not in present and not p.is_file()]
    if missing:
        raise BckdError(f"{len(missing)} of {len(images)} images listed in {ann_file} are missing, e.g. "
                        f"{missing[0]}; add the images or use the annotation file that belongs to them")
    for img, path in zip(images, paths):
        try:
            with Image.open(path) as f:
                w, h = f.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise BckdError(f"cannot read image {path} ({exc}); the file is corrupt, re-create or "
                            "remove it") from exc
        if (h, w) != (img["height"], img["width"]):
            raise BckdError(f"image {path} is {w}x{h} but {ann_file} records {img['width']}x{img['height']} "
                            f"for image {img['id']}; the annotations do not belong to this image")
    return paths


class CocoDataset:
    """One split of a COCO-style dataset, checked when opened.

    ``load(i)`` gives ``(uint8 HxWx3 RGB image, target)``; ``target`` holds ``image_id``, ``size``
    (h, w), ``boxes`` (float32 [M, 4] xyxy, original pixels), ``labels`` (int64 [M], contiguous),
    ``iscrowd`` (bool [M]), ``area`` (float32 [M], the file's ``area``) and ``masks`` (uint8
    [M, h, w] 0/1, or None when the dataset has no segmentation). Images are in ascending id order.
    """

    def __init__(self, root: str | os.PathLike, split: str) -> None:
        self.root, self.split = check_root(root, FORMAT), split
        self.ann_file, self.image_dir, layout = find_layout(self.root, split)
        self._data = read_annotation_file(self.ann_file)
        check = _Checker(self.ann_file)
        cats = check.categories(self._data["categories"])
        images = check.images(self._data["images"])
        self.category_ids: list[int] = [c["id"] for c in cats]
        self._anns, skipped, has_masks = check.annotations(
            self._data["annotations"], {img["id"]: img for img in images}, set(self.category_ids))
        self._paths = check_image_files(images, self.image_dir, self.ann_file)
        self._images = images
        self.image_ids: list[int] = [img["id"] for img in images]
        self.ids = [str(i) for i in self.image_ids]
        self.classes: list[str] = [str(c["name"]) for c in cats]
        self.num_classes = len(self.classes)
        self._label = {cid: k for k, cid in enumerate(self.category_ids)}
        self.task = "instance" if has_masks else "detect"
        self.ignore_index = IGNORE_INDEX
        self.palette = default_palette(self.num_classes)
        self.meta: dict[str, Any] = {
            "name": _dataset_name(self.root, layout), "format": FORMAT, "task": self.task,
            "classes": self.classes, "category_ids": self.category_ids, "layout": layout,
            "annotations": str(self.ann_file), "skipped_degenerate": skipped,
        }
        self._coco: Any = None

    def __len__(self) -> int:
        return len(self._images)

    def __repr__(self) -> str:
        return (f"CocoDataset(root={str(self.root)!r}, split={self.split!r}, task={self.task!r}, "
                f"n={len(self)})")

    def image_path(self, i: int) -> Path:
        return self._paths[i]

    def image_size(self, i: int) -> tuple[int, int]:
        """(height, width) of image ``i`` as the annotation file records it (checked against the file)."""
        return self._images[i]["height"], self._images[i]["width"]

    @property
    def coco(self) -> Any:
        """A pycocotools ``COCO`` over the annotation file's content, built on first use."""
        if self._coco is None:
            COCO = require("pycocotools.coco", "COCO ground truth and evaluation").COCO
            # COCO() prints progress lines; the data is already parsed and checked, so reuse it
            with contextlib.redirect_stdout(io.StringIO()):
                coco = COCO()
                coco.dataset = self._data
                coco.createIndex()
            self._coco = coco
        return self._coco

    def load(self, i: int) -> tuple[np.ndarray, dict[str, Any]]:
        """(uint8 HxWx3 RGB image, target dict) of image ``i``."""
        img = read_image(self._paths[i])
        h, w = self.image_size(i)
        if img.shape[:2] != (h, w):
            raise BckdError(f"image {self._paths[i]} decodes to {img.shape[1]}x{img.shape[0]} but "
                            f"{self.ann_file} records {w}x{h}; the annotations do not belong to this image")
        return img, self.target(i)

    def target(self, i: int) -> dict[str, Any]:
        """The ground truth of image ``i`` without decoding the image."""
        h, w = self.image_size(i)
        anns = self._anns[self.image_ids[i]]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        # within the tolerance the checks allow; clipped so boxes stay on the image
        boxes = np.clip(boxes, 0.0, [w, h, w, h]).astype(np.float32)
        area = [a["area"] if "area" in a else a["bbox"][2] * a["bbox"][3] for a in anns]
        return {
            "image_id": self.image_ids[i],
            "size": (h, w),
            "boxes": boxes,
            "labels": np.array([self._label[a["category_id"]] for a in anns], dtype=np.int64),
            "iscrowd": np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
            "area": np.array(area, dtype=np.float32),
            "masks": self._masks(anns, h, w) if self.task == "instance" else None,
        }

    def _masks(self, anns: list[dict[str, Any]], h: int, w: int) -> np.ndarray:
        if not anns:
            return np.zeros((0, h, w), dtype=np.uint8)
        mask_api = require("pycocotools.mask", "decoding COCO instance masks")
        decoded = mask_api.decode([segmentation_rle(a["segmentation"], h, w) for a in anns])  # h, w, M
        return np.ascontiguousarray(decoded.transpose(2, 0, 1), dtype=np.uint8)


def segmentation_rle(segm: Any, h: int, w: int) -> dict[str, Any]:
    """Compressed RLE of a COCO segmentation (polygons, or RLE either way), as ``COCO.annToRLE`` gives it."""
    mask_api = require("pycocotools.mask", "decoding COCO instance masks")
    if isinstance(segm, list):
        return mask_api.merge(mask_api.frPyObjects(segm, h, w))
    if isinstance(segm["counts"], list):
        return mask_api.frPyObjects(segm, h, w)
    return segm


def _dataset_name(root: Path, layout: str) -> str:
    if layout == "coco2017":
        return "coco2017"
    meta = root / "dataset.json"  # the synthetic layout sits inside a bckd-folder dataset
    try:
        return str(json.loads(meta.read_text(encoding="utf-8"))["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return root.name


@DATASETS.register(FORMAT)
def open_coco(root: str | os.PathLike, split: str) -> CocoDataset:
    """Loader for COCO-style instance annotations (COCO 2017 and the synthetic detection sets)."""
    return CocoDataset(root, split)
