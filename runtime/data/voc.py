"""Pascal VOC 2012 segmentation, with the SBD augmentation as split ``train_aug``.

Layout (``root`` may also point at ``VOCdevkit`` or at ``VOC2012`` itself)::

    root/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    root/VOCdevkit/VOC2012/SegmentationClass/<id>.png           palette PNG; the index is the class
    root/VOCdevkit/VOC2012/ImageSets/Segmentation/<split>.txt   train, val, trainval

``train_aug`` (alias ``trainaug``) is VOC train ∪ SBD train ∪ SBD val minus VOC val, the 10,582
images of the usual augmented set. SBD masks come from either

* ``VOC2012/SegmentationClassAug/<id>.png`` (the common converted form), or
* the raw SBD release ``benchmark_RELEASE/dataset/{cls/<id>.mat, img/<id>.jpg, train.txt, val.txt}``
  (or ``SBD/dataset/...``, ``SBD/...``) next to ``VOCdevkit`` or under ``root``;
  each ``.mat`` holds the labels in ``GTcls.Segmentation``.

``ImageSets/Segmentation/train_aug.txt`` (or ``trainaug.txt``), when present, gives the ids.
Where an image has both a VOC and an SBD mask, VOC's own annotation (with its 255 border) wins.
Labels: 0 background, 1-20 the classes, 255 ignore.
"""
from __future__ import annotations

import os
from pathlib import Path

from runtime.data import DATASETS
from runtime.data.folder import default_palette
from runtime.data.standard import (
    LabelMap,
    Spec,
    StandardDataset,
    check_root,
    find_layout,
    pair,
    read_id_list,
    scan,
    split_error,
    txt_stems,
)
from runtime.errors import BckdError

FORMAT = "voc"
CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
SPEC = Spec("voc2012", FORMAT, CLASSES, default_palette(len(CLASSES)))  # the VOC colour map
LABELS = LabelMap.identity(len(CLASSES), "VOC class indices 0-20 and 255")
AUG_SPLITS = ("train_aug", "trainaug")
SBD_KEY = "GTcls.Segmentation"
_SBD_DIRS = ("benchmark_RELEASE/dataset", "SBD/dataset", "SBD")


def voc_dir(root: Path) -> Path:
    """The ``VOC2012`` folder under (or at) ``root``."""
    candidates = [root / "VOCdevkit" / "VOC2012", root / "VOC2012", root]
    return find_layout(root, FORMAT, candidates, ["JPEGImages"])


def sbd_dir(root: Path, voc: Path) -> Path | None:
    """The raw SBD ``dataset`` folder (holding ``cls/``) under ``root`` or next to ``VOCdevkit``."""
    for base in dict.fromkeys([root, voc.parent, voc.parent.parent]):
        for sub in _SBD_DIRS:
            if (base / sub / "cls").is_dir():
                return base / sub
    return None


def _sbd_missing(root: Path, voc: Path) -> BckdError:
    return BckdError(f"split 'train_aug' needs the SBD augmentation, but neither "
                     f"{voc / 'SegmentationClassAug'} (converted PNGs) nor {root / _SBD_DIRS[0] / 'cls'} "
                     "(raw SBD .mat files) exists; add one of them or use split 'train'")


def _aug_masks(root: Path, voc: Path) -> tuple[dict[str, Path], list[str], Path, str]:
    """SBD masks by id, the SBD ids, the folder they are in, and a layout note."""
    converted = voc / "SegmentationClassAug"
    if converted.is_dir():
        masks = scan(converted, ".png")
        return masks, sorted(masks), converted, "VOC2012 + SBD (SegmentationClassAug PNGs)"
    sbd = sbd_dir(root, voc)
    if sbd is None:
        raise _sbd_missing(root, voc)
    ids = read_id_list(sbd / "train.txt") + read_id_list(sbd / "val.txt")
    return scan(sbd / "cls", ".mat"), ids, sbd / "cls", f"VOC2012 + SBD ({sbd} .mat files)"


def _train_aug(root: Path, voc: Path, sets: Path) -> StandardDataset:
    aug_masks, aug_ids, aug_folder, layout = _aug_masks(root, voc)
    listed = [sets / f"{name}.txt" for name in AUG_SPLITS if (sets / f"{name}.txt").is_file()]
    if listed:
        ids = read_id_list(listed[0])
    else:
        voc_val = set(read_id_list(sets / "val.txt"))
        ids = sorted((set(read_id_list(sets / "train.txt")) | set(aug_ids)) - voc_val)
    masks = {**aug_masks, **scan(voc / "SegmentationClass", ".png")}  # VOC's own mask wins
    images = scan(voc / "JPEGImages", ".jpg")
    sbd = sbd_dir(root, voc)
    if sbd is not None:
        images = {**scan(sbd / "img", ".jpg"), **images}
    ext = ".mat" if aug_folder.name == "cls" else ".png"
    samples = pair(ids, images, masks, lambda i: voc / "JPEGImages" / f"{i}.jpg",
                   lambda i: aug_folder / f"{i}{ext}",
                   "add the missing files or remove those ids from the train_aug list")
    return StandardDataset(SPEC, root, "train_aug", samples, LABELS, layout, mat_key=SBD_KEY)


def _aug_available(root: Path, voc: Path) -> bool:
    return (voc / "SegmentationClassAug").is_dir() or sbd_dir(root, voc) is not None


@DATASETS.register(FORMAT)
def open_voc(root: str | os.PathLike, split: str) -> StandardDataset:
    """Split ``split`` of Pascal VOC 2012 (``train``, ``val``, ``trainval``, ``train_aug``, ...)."""
    root = check_root(root, FORMAT)
    voc = voc_dir(root)
    sets = voc / "ImageSets" / "Segmentation"
    if split in AUG_SPLITS:
        return _train_aug(root, voc, sets)
    path = sets / f"{split}.txt"
    if not path.is_file():
        extra = [AUG_SPLITS[0]] if _aug_available(root, voc) else []
        raise split_error(split, root, path, [s for s in txt_stems(sets) if s not in AUG_SPLITS] + extra)
    ids = read_id_list(path)
    samples = pair(ids, scan(voc / "JPEGImages", ".jpg"), scan(voc / "SegmentationClass", ".png"),
                   lambda i: voc / "JPEGImages" / f"{i}.jpg",
                   lambda i: voc / "SegmentationClass" / f"{i}.png",
                   f"add the missing files or remove those ids from {path}")
    return StandardDataset(SPEC, root, split, samples, LABELS, "VOC2012 (SegmentationClass palette PNGs)")
