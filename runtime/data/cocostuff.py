"""COCO-Stuff 10K (v1.1), mapped to the 171 classes used in the literature.

Layout of the release::

    root/images/<id>.jpg
    root/annotations/<id>.mat          key ``S``: 0 unlabelled, 1-182 COCO-Stuff ids
    root/imageLists/{train,test,all}.txt

or mmsegmentation's converted form (``tools/dataset_converters/coco_stuff10k.py``)::

    root/images/{train2014,test2014}/<id>.jpg
    root/annotations/{train2014,test2014}/<id>_labelTrainIds.png    0 unlabelled, 1-171 the classes

Of the 182 ids, 11 thing ids are never used (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91); the other
171 map in order to 0-170 and 0 to 255 (ignore), which is what mmsegmentation's converter followed
by ``reduce_zero_label`` gives. Split ``val`` is an alias of ``test``.
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
    layout_error,
    pair,
    read_id_list,
    scan,
    split_error,
    subdirs,
    txt_stems,
)

FORMAT = "cocostuff10k"
UNUSED_IDS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91})
COCO_IDS = tuple(i for i in range(1, 183) if i not in UNUSED_IDS)  # raw id of each class, in order
CLASSES = (
    # things, COCO ids 1-90
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
    # stuff, ids 92-182
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter",
    "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other",
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
# Colours are only for viewing; the VOC colour map stands in for a COCO-Stuff one.
SPEC = Spec("cocostuff10k", FORMAT, CLASSES, default_palette(len(CLASSES)))
MAT_LABELS = LabelMap({raw: t for t, raw in enumerate(COCO_IDS)}, range(183), "COCO-Stuff ids 0-182")
PNG_LABELS = LabelMap.reduce_zero(len(CLASSES), "COCO-Stuff 10K trainIds 0-171")
MAT_KEY = "S"
SPLIT_ALIASES = {"val": "test"}
PNG_SUFFIX = "_labelTrainIds.png"


def _with_alias(names: list[str]) -> list[str]:
    return names + [alias for alias, name in SPLIT_ALIASES.items() if name in names]


def _open_mat(root: Path, split: str, name: str) -> StandardDataset:
    find_layout(root, FORMAT, [root], ["images", "annotations", "imageLists"])
    path = root / "imageLists" / f"{name}.txt"
    if not path.is_file():
        raise split_error(split, root, path, _with_alias(txt_stems(root / "imageLists")))
    image_dir, mask_dir = root / "images", root / "annotations"
    samples = pair(read_id_list(path), scan(image_dir, ".jpg"), scan(mask_dir, ".mat"),
                   lambda i: image_dir / f"{i}.jpg", lambda i: mask_dir / f"{i}.mat",
                   f"add the missing files or remove those ids from {path}")
    return StandardDataset(SPEC, root, split, samples, MAT_LABELS, "COCO-Stuff 10K .mat (S)", mat_key=MAT_KEY)


def _open_png(root: Path, split: str, name: str) -> StandardDataset:
    image_dir, mask_dir = root / "images" / f"{name}2014", root / "annotations" / f"{name}2014"
    if not mask_dir.is_dir():
        found = [d[:-4] for d in subdirs(root / "annotations") if d.endswith("2014")]
        raise split_error(split, root, mask_dir, _with_alias(found))
    images = scan(image_dir, ".jpg")
    samples = pair(sorted(images), images, scan(mask_dir, PNG_SUFFIX), lambda i: image_dir / f"{i}.jpg",
                   lambda i: mask_dir / f"{i}{PNG_SUFFIX}", "add the missing masks or remove those images")
    layout = "COCO-Stuff 10K converted labelTrainIds PNGs"
    return StandardDataset(SPEC, root, split, samples, PNG_LABELS, layout)


@DATASETS.register(FORMAT)
def open_cocostuff10k(root: str | os.PathLike, split: str) -> StandardDataset:
    """Split ``train`` or ``test`` (alias ``val``) of COCO-Stuff 10K, release or converted form."""
    root = check_root(root, FORMAT)
    name = SPLIT_ALIASES.get(split, split)
    if (root / "imageLists").is_dir():
        return _open_mat(root, split, name)
    if any(d.endswith("2014") for d in subdirs(root / "annotations")):
        return _open_png(root, split, name)
    raise layout_error(root, FORMAT, f"{root / 'imageLists'} with images/ and annotations/ (the .mat "
                                     f"release) or {root / 'annotations' / 'train2014'} (converted PNGs)")
