"""ADE20K scene parsing (the ``ADEChallengeData2016`` release, 150 classes).

Layout (``root`` may also point at ``ADEChallengeData2016`` itself)::

    root/ADEChallengeData2016/images/{training,validation}/<id>.jpg
    root/ADEChallengeData2016/annotations/{training,validation}/<id>.png

Splits ``train`` and ``val`` (or the folder names). Annotations hold 0 for "other" and 1-150 for
the classes; they are reduced as in mmsegmentation (``reduce_zero_label``): 0 -> 255 (ignore),
k -> k - 1, so class names follow mmsegmentation's order (wall, building, sky, ...).
"""
from __future__ import annotations

import os

from runtime.data import DATASETS
from runtime.data.folder import default_palette
from runtime.data.standard import (
    LabelMap,
    Spec,
    StandardDataset,
    check_root,
    find_layout,
    pair,
    scan,
    split_error,
)

FORMAT = "ade20k"
CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)
# Colours are only for viewing; the VOC colour map stands in for the ADE20K one.
SPEC = Spec("ade20k", FORMAT, CLASSES, default_palette(len(CLASSES)))
LABELS = LabelMap.reduce_zero(len(CLASSES), "ADE20K labels 0-150")
SPLIT_DIRS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


@DATASETS.register(FORMAT)
def open_ade20k(root: str | os.PathLike, split: str) -> StandardDataset:
    """Split ``train`` or ``val`` of ADE20K (SceneParsing / ADEChallengeData2016)."""
    root = check_root(root, FORMAT)
    base = find_layout(root, FORMAT, [root / "ADEChallengeData2016", root], ["images", "annotations"])
    sub = SPLIT_DIRS.get(split, split)
    image_dir, mask_dir = base / "images" / sub, base / "annotations" / sub
    if split not in SPLIT_DIRS or not image_dir.is_dir():
        available = [name for name in ("train", "val") if (base / "images" / SPLIT_DIRS[name]).is_dir()]
        raise split_error(split, root, image_dir, available)
    images = scan(image_dir, ".jpg")
    samples = pair(sorted(images), images, scan(mask_dir, ".png"), lambda i: image_dir / f"{i}.jpg",
                   lambda i: mask_dir / f"{i}.png", "add the missing annotations or remove those images")
    return StandardDataset(SPEC, root, split, samples, LABELS, "ADEChallengeData2016 (0 -> ignore, k -> k-1)")
