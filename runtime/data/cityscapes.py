"""Cityscapes fine annotations, mapped to the 19 official training classes.

Layout::

    root/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png
    root/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png

The ``labelIds`` files are always read and mapped to trainIds here with the official table
(cityscapesScripts ``labels.py``); ids without a trainId become 255 (ignore). A
``_gtFine_labelTrainIds.png`` made by ``createTrainIdLabelImgs`` is not used even when present, so
the mapping can never depend on how (or whether) someone converted the data.
"""
from __future__ import annotations

import os

from runtime.data import DATASETS
from runtime.data.standard import (
    LabelMap,
    Spec,
    StandardDataset,
    check_root,
    find_layout,
    pair,
    scan,
    split_error,
    subdirs,
)

FORMAT = "cityscapes"
IMAGE_SUFFIX = "_leftImg8bit.png"
MASK_SUFFIX = "_gtFine_labelIds.png"
# name, labelId, colour of the 19 evaluated classes, in trainId order
_TRAIN_CLASSES = (
    ("road", 7, (128, 64, 128)),
    ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)),
    ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)),
    ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
)
SPEC = Spec("cityscapes", FORMAT, tuple(c[0] for c in _TRAIN_CLASSES), [c[2] for c in _TRAIN_CLASSES])
LABEL_TO_TRAIN = {label_id: train_id for train_id, (_, label_id, _) in enumerate(_TRAIN_CLASSES)}
LABELS = LabelMap(LABEL_TO_TRAIN, range(34), "Cityscapes labelIds 0-33")


@DATASETS.register(FORMAT)
def open_cityscapes(root: str | os.PathLike, split: str) -> StandardDataset:
    """Split ``split`` (``train``, ``val``, ...: a folder of ``leftImg8bit/``) of Cityscapes gtFine."""
    root = check_root(root, FORMAT)
    find_layout(root, FORMAT, [root], ["leftImg8bit", "gtFine"])
    image_root, mask_root = root / "leftImg8bit" / split, root / "gtFine" / split
    if not image_root.is_dir():
        raise split_error(split, root, image_root, subdirs(root / "leftImg8bit"))
    images, masks = {}, {}
    for city in subdirs(image_root):
        images.update(scan(image_root / city, IMAGE_SUFFIX))
        masks.update(scan(mask_root / city, MASK_SUFFIX))
    ids = sorted(images)
    samples = pair(ids, images, masks, lambda i: images[i],
                   lambda i: mask_root / images[i].parent.name / f"{i}{MASK_SUFFIX}",
                   "add the missing gtFine labelIds files or remove those images")
    return StandardDataset(SPEC, root, split, samples, LABELS, "leftImg8bit + gtFine labelIds -> trainIds")
