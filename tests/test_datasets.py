"""Loaders for the standard datasets (VOC + SBD, Cityscapes, ADE20K, COCO-Stuff 10K).

Each test writes a tiny fixture in the dataset's real on-disk layout (16x24 images, palette PNGs,
MATLAB files through scipy) and checks the exact training ids the loader produces.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.data import DATASETS, StandardDataset, open_dataset
from runtime.errors import BckdError

savemat = pytest.importorskip("scipy.io").savemat

H, W = 16, 24
STANDARD = ("voc", "cityscapes", "ade20k", "cocostuff10k")


def write_image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)


def write_png(path: Path, labels: np.ndarray, palette: bool = False) -> None:
    """A class-index PNG: mode L, or mode P with a full 256-entry palette (as VOC ships them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(labels.astype(np.uint8))
    if palette:  # putpalette turns the L image into P, keeping the indices
        img.putpalette([(7 * i) % 256 for i in range(3 * 256)])
        assert img.mode == "P"
    img.save(path)


def write_mat(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), content)


def labels_with(*values: int, fill: int = 0) -> np.ndarray:
    """An HxW label map with ``values`` on the first pixels of row 0 and ``fill`` elsewhere."""
    labels = np.full((H, W), fill, dtype=np.uint16)
    labels[0, : len(values)] = values
    return labels


def load_mask(ds: StandardDataset, sample_id: str) -> np.ndarray:
    img, mask = ds.load(ds.ids.index(sample_id))
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    assert mask.shape == (H, W) and mask.dtype == np.uint8
    return mask


# --- Pascal VOC + SBD --------------------------------------------------------------------------


def make_voc(root: Path) -> Path:
    """VOCdevkit/VOC2012 with train = a, b and val = c; returns the VOC2012 folder."""
    voc = root / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for name, ids in {"train": ["a", "b"], "val": ["c"], "trainval": ["a", "b", "c"]}.items():
        (sets / f"{name}.txt").write_text("\n".join(ids) + "\n")
    for n, sample_id in enumerate("abc"):
        write_image(voc / "JPEGImages" / f"{sample_id}.jpg", n)
        write_png(voc / "SegmentationClass" / f"{sample_id}.png", labels_with(255, 15, 20, n), palette=True)
    return voc


@pytest.mark.parametrize("level", ["root", "VOCdevkit", "VOC2012"])
def test_voc_reads_palette_indices(tmp_path: Path, level: str) -> None:
    voc = make_voc(tmp_path)
    root = {"root": tmp_path, "VOCdevkit": voc.parent, "VOC2012": voc}[level]
    ds = open_dataset(root, "train", format="voc")
    assert ds.ids == ["a", "b"] and ds.num_classes == 21 and ds.ignore_index == 255
    assert ds.classes[0] == "background" and ds.classes[15] == "person" and ds.classes[20] == "tvmonitor"
    assert ds.palette[1] == [128, 0, 0] and ds.meta["name"] == "voc2012" and "layout" in ds.meta
    np.testing.assert_array_equal(load_mask(ds, "b")[0, :4], [255, 15, 20, 1])
    assert len(open_dataset(root, "trainval", format="voc")) == 3


def test_voc_train_aug_from_converted_pngs(tmp_path: Path) -> None:
    voc = make_voc(tmp_path)
    for n, sample_id in enumerate(["b", "c", "d"]):  # SBD covers b (also VOC train) and c (VOC val)
        write_png(voc / "SegmentationClassAug" / f"{sample_id}.png", labels_with(7 + n))
    write_image(voc / "JPEGImages" / "d.jpg")
    ds = open_dataset(tmp_path, "train_aug", format="voc")
    assert ds.ids == ["a", "b", "d"]  # VOC train ∪ SBD minus VOC val
    assert load_mask(ds, "b")[0, 0] == 255  # VOC's own annotation wins over SBD's
    assert load_mask(ds, "d")[0, 0] == 9
    (voc / "ImageSets" / "Segmentation" / "trainaug.txt").write_text("d\na\n")
    assert open_dataset(tmp_path, "trainaug", format="voc").ids == ["d", "a"]  # a list file wins


@pytest.mark.parametrize("sbd_dir", ["benchmark_RELEASE/dataset", "SBD"])
def test_voc_train_aug_from_raw_sbd(tmp_path: Path, sbd_dir: str) -> None:
    make_voc(tmp_path)
    sbd = tmp_path / sbd_dir
    for n, sample_id in enumerate(["b", "c", "d", "e"]):
        seg = labels_with(3 + n).astype(np.uint8)
        write_mat(sbd / "cls" / f"{sample_id}.mat",
                  {"GTcls": {"Segmentation": seg, "Boundaries": np.zeros((1, 1)), "CategoriesPresent": 3 + n}})
    write_image(sbd / "img" / "d.jpg")  # not in JPEGImages: taken from SBD's own images
    write_image(sbd / "img" / "e.jpg")
    (sbd / "train.txt").write_text("b\nd\n")
    (sbd / "val.txt").write_text("c\ne\n")
    ds = open_dataset(tmp_path, "train_aug", format="voc")
    assert ds.ids == ["a", "b", "d", "e"]
    assert ds.mask_path(ds.ids.index("d")).suffix == ".mat"
    assert load_mask(ds, "b")[0, 0] == 255
    np.testing.assert_array_equal(load_mask(ds, "e")[0, :2], [6, 0])


def test_voc_errors(tmp_path: Path) -> None:
    voc = make_voc(tmp_path)
    with pytest.raises(BckdError, match=r"split 'test' not found.*available splits: train, trainval, val$"):
        open_dataset(tmp_path, "test", format="voc")
    with pytest.raises(BckdError, match=r"train_aug' needs the SBD augmentation.*SegmentationClassAug"):
        open_dataset(tmp_path, "train_aug", format="voc")
    (voc / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(BckdError, match=r"no mask for 'b': .*SegmentationClass[/\\]b\.png not found \(1 of 2"):
        open_dataset(tmp_path, "train", format="voc")
    with pytest.raises(BckdError, match=r"not laid out in the 'voc' format: expected .*VOC2012[/\\]JPEGImages.*"
                                        r"\(ade20k, cityscapes, coco, cocostuff10k, folder, images, voc\)"):
        open_dataset(tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets", "train", format="voc")


def test_voc_unknown_label_is_reported(tmp_path: Path) -> None:
    voc = make_voc(tmp_path)
    write_png(voc / "SegmentationClass" / "a.png", labels_with(21), palette=True)
    with pytest.raises(BckdError, match=r"a\.png holds label 21, which is not one of the VOC class indices"):
        open_dataset(tmp_path, "train", format="voc").load(0)


# --- Cityscapes --------------------------------------------------------------------------------


def make_cityscapes(root: Path) -> None:
    for split, frames in {"train": ["aachen_000000_000019", "bremen_000001_000019"],
                          "val": ["lindau_000000_000019"]}.items():
        for n, stem in enumerate(frames):
            city = stem.split("_")[0]
            write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", n)
            gt = root / "gtFine" / split / city
            write_png(gt / f"{stem}_gtFine_labelIds.png", labels_with(26, 0, 7, 33, 6, 31, fill=23))
            write_png(gt / f"{stem}_gtFine_labelTrainIds.png", labels_with(99))  # never read


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path: Path) -> None:
    make_cityscapes(tmp_path)
    ds = open_dataset(tmp_path, "train", format="cityscapes")
    assert ds.ids == ["aachen_000000_000019", "bremen_000001_000019"]
    assert ds.num_classes == 19 and ds.classes[13] == "car" and ds.palette[13] == [0, 0, 142]
    mask = load_mask(ds, "bremen_000001_000019")
    np.testing.assert_array_equal(mask[0, :6], [13, 255, 0, 18, 255, 16])  # 26 car, 0 unlabeled, ...
    assert mask[5, 5] == 10  # 23 sky
    assert open_dataset(tmp_path, "val", format="cityscapes").ids == ["lindau_000000_000019"]


def test_cityscapes_errors(tmp_path: Path) -> None:
    make_cityscapes(tmp_path)
    with pytest.raises(BckdError, match=r"split 'test' not found .*available splits: train, val$"):
        open_dataset(tmp_path, "test", format="cityscapes")
    (tmp_path / "gtFine" / "train" / "bremen" / "bremen_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(BckdError, match=r"no mask for 'bremen_000001_000019': .*gtFine[/\\]train[/\\]bremen"
                                        r"[/\\]bremen_000001_000019_gtFine_labelIds\.png not found"):
        open_dataset(tmp_path, "train", format="cityscapes")
    write_png(tmp_path / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png", labels_with(40))
    with pytest.raises(BckdError, match=r"holds label 40, which is not one of the Cityscapes labelIds 0-33"):
        open_dataset(tmp_path, "val", format="cityscapes").load(0)
    with pytest.raises(BckdError, match=r"expected .*gtFine.*; point the root at the dataset"):
        open_dataset(tmp_path / "leftImg8bit", "train", format="cityscapes")


# --- ADE20K ------------------------------------------------------------------------------------


def make_ade(root: Path) -> Path:
    base = root / "ADEChallengeData2016"
    for folder, ids in {"training": ["ADE_train_00000001", "ADE_train_00000002"],
                        "validation": ["ADE_val_00000001"]}.items():
        for n, sample_id in enumerate(ids):
            write_image(base / "images" / folder / f"{sample_id}.jpg", n)
            write_png(base / "annotations" / folder / f"{sample_id}.png", labels_with(0, 1, 150, 13, fill=3))
    return base


@pytest.mark.parametrize("at_release", [False, True])
def test_ade20k_reduces_zero_label(tmp_path: Path, at_release: bool) -> None:
    base = make_ade(tmp_path)
    ds = open_dataset(base if at_release else tmp_path, "train", format="ade20k")
    assert ds.ids == ["ADE_train_00000001", "ADE_train_00000002"]
    assert ds.num_classes == 150 and ds.classes[:3] == ["wall", "building", "sky"] and ds.classes[-1] == "flag"
    assert ds.classes[12] == "person"  # raw label 13
    mask = load_mask(ds, "ADE_train_00000002")
    np.testing.assert_array_equal(mask[0, :4], [255, 0, 149, 12])
    assert mask[8, 8] == 2
    assert open_dataset(tmp_path, "val", format="ade20k").ids == ["ADE_val_00000001"]


def test_ade20k_errors(tmp_path: Path) -> None:
    base = make_ade(tmp_path)
    with pytest.raises(BckdError, match=r"split 'test' not found .*available splits: train, val$"):
        open_dataset(tmp_path, "test", format="ade20k")
    (base / "annotations" / "validation" / "ADE_val_00000001.png").unlink()
    with pytest.raises(BckdError, match=r"no mask for 'ADE_val_00000001': .*validation[/\\]ADE_val_00000001"
                                        r"\.png not found \(1 of 1"):
        open_dataset(tmp_path, "val", format="ade20k")
    with pytest.raises(BckdError, match=r"expected .*ADEChallengeData2016[/\\]images and"):
        open_dataset(base / "images", "train", format="ade20k")


# --- COCO-Stuff 10K ----------------------------------------------------------------------------

# raw COCO-Stuff id -> 171-class id: 0 unlabeled, 1 person, 11 fire hydrant, 13 stop sign (after the
# unused 12), 90 toothbrush, 92 banner (after the unused 91), 182 wood
COCO_RAW = (0, 1, 11, 13, 90, 92, 182)
COCO_TRAIN = (255, 0, 10, 11, 79, 80, 170)


def make_cocostuff(root: Path) -> None:
    lists = {"train": ["COCO_train2014_000000000077", "COCO_train2014_000000000078"],
             "test": ["COCO_train2014_000000000079"]}
    (root / "imageLists").mkdir(parents=True)
    for split, ids in lists.items():
        (root / "imageLists" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for n, sample_id in enumerate(ids):
            write_image(root / "images" / f"{sample_id}.jpg", n)
            write_mat(root / "annotations" / f"{sample_id}.mat",
                      {"S": labels_with(*COCO_RAW, fill=149), "names": np.array(["x"], dtype=object)})
    (root / "imageLists" / "all.txt").write_text("\n".join(lists["train"] + lists["test"]) + "\n")


def test_cocostuff10k_mat_release(tmp_path: Path) -> None:
    make_cocostuff(tmp_path)
    ds = open_dataset(tmp_path, "train", format="cocostuff10k")
    assert ds.ids == ["COCO_train2014_000000000077", "COCO_train2014_000000000078"]
    assert ds.num_classes == 171 and ds.classes[11] == "stop sign" and ds.classes[80] == "banner"
    assert ds.classes[-1] == "wood"
    mask = load_mask(ds, "COCO_train2014_000000000078")
    np.testing.assert_array_equal(mask[0, : len(COCO_RAW)], COCO_TRAIN)
    assert mask[9, 9] == 137 and ds.classes[137] == "road"  # raw 149
    assert open_dataset(tmp_path, "val", format="cocostuff10k").ids == ["COCO_train2014_000000000079"]
    assert len(open_dataset(tmp_path, "all", format="cocostuff10k")) == 3


def test_cocostuff10k_converted_pngs(tmp_path: Path) -> None:
    for split in ("train", "test"):
        write_image(tmp_path / "images" / f"{split}2014" / f"COCO_{split}.jpg")
        write_png(tmp_path / "annotations" / f"{split}2014" / f"COCO_{split}_labelTrainIds.png",
                  labels_with(0, 1, 12, 171))
    ds = open_dataset(tmp_path, "val", format="cocostuff10k")
    assert ds.ids == ["COCO_test"]
    np.testing.assert_array_equal(load_mask(ds, "COCO_test")[0, :4], [255, 0, 11, 170])
    with pytest.raises(BckdError, match=r"split 'extra' not found .*available splits: test, train, val$"):
        open_dataset(tmp_path, "extra", format="cocostuff10k")


def test_cocostuff10k_errors(tmp_path: Path) -> None:
    make_cocostuff(tmp_path)
    with pytest.raises(BckdError, match=r"split 'minival' not found .*available splits: all, test, train, val$"):
        open_dataset(tmp_path, "minival", format="cocostuff10k")
    ann = tmp_path / "annotations"
    write_mat(ann / "COCO_train2014_000000000077.mat", {"labels": labels_with(1)})
    (ann / "COCO_train2014_000000000078.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    ds = open_dataset(tmp_path, "train", format="cocostuff10k")
    with pytest.raises(BckdError, match=r"000077\.mat has no 'S' \(it holds: labels\)"):
        ds.load(0)
    with pytest.raises(BckdError, match=r"cannot read label file .*000078\.mat"):
        ds.load(1)
    write_mat(ann / "COCO_train2014_000000000079.mat", {"S": labels_with(183)})
    with pytest.raises(BckdError, match=r"holds label 183, which is not one of the COCO-Stuff ids 0-182"):
        open_dataset(tmp_path, "test", format="cocostuff10k").load(0)
    (tmp_path / "images" / "COCO_train2014_000000000079.jpg").unlink()
    with pytest.raises(BckdError, match=r"no image for 'COCO_train2014_000000000079'"):
        open_dataset(tmp_path, "test", format="cocostuff10k")
    with pytest.raises(BckdError, match=r"expected .*imageLists.*\(the \.mat release\) or .*train2014"):
        open_dataset(tmp_path / "images", "train", format="cocostuff10k")


# --- all formats -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", STANDARD)
def test_missing_root(tmp_path: Path, fmt: str) -> None:
    assert fmt in DATASETS
    with pytest.raises(BckdError, match=rf"dataset root .*nowhere does not exist .*the '{fmt}' data"):
        open_dataset(tmp_path / "nowhere", "train", format=fmt)


def test_mask_size_mismatch(tmp_path: Path) -> None:
    base = make_ade(tmp_path)
    write_png(base / "annotations" / "validation" / "ADE_val_00000001.png", np.zeros((H, W - 1)))
    with pytest.raises(BckdError, match=r"ADE_val_00000001\.png is 23x16 but image .* is 24x16"):
        open_dataset(tmp_path, "val", format="ade20k").load(0)


def test_import_stays_light() -> None:
    code = ("import sys, runtime.data; "
            "assert not {'torch', 'scipy'} & set(sys.modules), sorted({'torch', 'scipy'} & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
