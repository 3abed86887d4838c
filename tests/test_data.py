"""The folder dataset format and the one preprocessing path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.data import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FolderDataset,
    Preprocess,
    list_splits,
    open_dataset,
    read_image,
    read_mask,
    resize_image,
    resize_mask,
    write_dataset_meta,
)
from runtime.errors import BckdError

CLASSES = ["background", "thing", "stuff"]
PALETTE = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]


def _write_sample(root: Path, sample_id: str, size: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    mask = rng.integers(0, len(CLASSES), size=size, dtype=np.uint8)
    mask[0, 0] = 255  # one ignore pixel
    Image.fromarray(img).save(root / "images" / f"{sample_id}.png")
    m = Image.fromarray(mask)
    # a full 256-entry palette: with a short one Pillow writes fewer bits per pixel and 255 wraps
    m.putpalette([c for rgb in PALETTE for c in rgb] + [255] * (3 * (256 - len(PALETTE))))
    m.save(root / "masks" / f"{sample_id}.png")
    return img, mask


def make_dataset(root: Path, splits: dict[str, list[str]] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A tiny folder dataset: 3 train + 2 val samples of 6x8 pixels."""
    splits = splits or {"train": ["a", "b", "c"], "val": ["d", "e"]}
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    samples = {}
    for split, ids in splits.items():
        (root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n\n")
        for n, sample_id in enumerate(ids):
            samples[sample_id] = _write_sample(root, sample_id, (6, 8), seed=hash(sample_id) % 1000 + n)
    write_dataset_meta(root, "tiny", CLASSES, PALETTE, extra_note="kept")
    return samples


# --- folder dataset ----------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    samples = make_dataset(tmp_path)
    ds = open_dataset(tmp_path, "train")
    assert isinstance(ds, FolderDataset)
    assert ds.ids == ["a", "b", "c"] and len(ds) == 3
    assert ds.classes == CLASSES and ds.num_classes == 3 and ds.ignore_index == 255
    assert ds.palette == PALETTE and ds.meta["extra_note"] == "kept"
    assert ds.image_path(1).name == "b.png" and ds.mask_path(1).name == "b.png"
    for i, sample_id in enumerate(ds.ids):
        img, mask = ds.load(i)
        np.testing.assert_array_equal(img, samples[sample_id][0])
        np.testing.assert_array_equal(mask, samples[sample_id][1])  # palette indices, not colours
        assert img.dtype == np.uint8 and mask.dtype == np.uint8
    assert list_splits(tmp_path) == ["train", "val"]
    assert "folder" in DATASETS


def test_jpeg_images_are_found(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    img = read_image(tmp_path / "images" / "a.png")
    (tmp_path / "images" / "a.png").unlink()
    Image.fromarray(img).save(tmp_path / "images" / "a.jpg", quality=95)
    ds = FolderDataset(tmp_path, "train")
    assert ds.image_path(0).name == "a.jpg"
    assert ds.load(0)[0].shape == (6, 8, 3)


def test_unknown_split_lists_available(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    with pytest.raises(BckdError, match=r"split 'test' not found.*available splits: train, val"):
        FolderDataset(tmp_path, "test")


def test_unknown_format_names_the_registry(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    with pytest.raises(BckdError, match="unknown dataset format 'foldr'; did you mean 'folder'"):
        open_dataset(tmp_path, "train", format="foldr")


def test_missing_dataset_json(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    (tmp_path / "dataset.json").unlink()
    with pytest.raises(BckdError, match="dataset.json not found"):
        FolderDataset(tmp_path, "train")


def test_dataset_json_missing_key(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text('{"format": "bckd-folder", "version": 1, "name": "x"}')
    with pytest.raises(BckdError, match="missing key.*classes"):
        FolderDataset(tmp_path, "train")


def test_missing_mask_names_file_and_count(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    (tmp_path / "masks" / "b.png").unlink()
    (tmp_path / "masks" / "c.png").unlink()
    with pytest.raises(BckdError, match=r"masks[/\\]b\.png not found \(2 of 3"):
        FolderDataset(tmp_path, "train")


def test_missing_image(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    (tmp_path / "images" / "e.png").unlink()
    with pytest.raises(BckdError, match=r"image .*e\.png not found \(1 of 2"):
        FolderDataset(tmp_path, "val")


def test_corrupt_png_names_the_file(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    path = tmp_path / "images" / "a.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated: header is fine, pixel data is not
    ds = FolderDataset(tmp_path, "train")
    with pytest.raises(BckdError, match=r"cannot decode image .*a\.png"):
        ds.load(0)
    path.write_bytes(b"not a png at all")
    with pytest.raises(BckdError, match=r"a\.png"):
        read_image(path)


def test_rgb_mask_is_refused(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    Image.new("RGB", (8, 6), (255, 0, 0)).save(tmp_path / "masks" / "a.png")
    ds = FolderDataset(tmp_path, "train")
    with pytest.raises(BckdError, match=r"a\.png has mode RGB; masks must be single-channel class-index PNGs"):
        ds.load(0)


def test_out_of_range_mask_value(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    mask = np.zeros((6, 8), np.uint8)
    mask[2, 3] = 7
    mask[0, 0] = 255  # ignore stays legal
    Image.fromarray(mask).save(tmp_path / "masks" / "b.png")
    ds = FolderDataset(tmp_path, "train")
    ds.load(0)
    with pytest.raises(BckdError, match=r"b\.png holds label 7, but the dataset has 3 classes"):
        ds.load(1)


def test_mask_image_size_mismatch(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    Image.fromarray(np.zeros((5, 8), np.uint8)).save(tmp_path / "masks" / "c.png")
    with pytest.raises(BckdError, match=r"c\.png is 8x5 but image .*c\.png is 8x6"):
        FolderDataset(tmp_path, "train").load(2)


def test_read_image_converts_modes(tmp_path: Path) -> None:
    Image.new("L", (4, 3), 77).save(tmp_path / "grey.png")
    Image.new("RGBA", (4, 3), (10, 20, 30, 40)).save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "grey.png").shape == (3, 4, 3)
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png")[0, 0], [10, 20, 30])
    with pytest.raises(BckdError, match=r"nope\.png not found"):
        read_image(tmp_path / "nope.png")


def test_read_mask_l_mode(tmp_path: Path) -> None:
    Image.fromarray(np.full((2, 3), 2, np.uint8)).save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png")
    assert mask.shape == (2, 3) and mask.dtype == np.uint8 and (mask == 2).all()


# --- preprocessing -----------------------------------------------------------------------------


def test_normalize_by_hand() -> None:
    pre = Preprocess(size=(2, 2), mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 5.0))
    img = np.array(
        [[[10, 20, 30], [12, 24, 35]],
         [[0, 0, 0], [255, 100, 40]]], dtype=np.uint8
    )
    out = pre.normalize(img)
    assert out.dtype == np.float32 and out.shape == (3, 2, 2)
    np.testing.assert_allclose(out[0], [[0.0, 1.0], [-5.0, 122.5]], rtol=1e-6)  # R: (x - 10) / 2
    np.testing.assert_allclose(out[1], [[0.0, 1.0], [-5.0, 20.0]], rtol=1e-6)  # G: (x - 20) / 4
    np.testing.assert_allclose(out[2], [[0.0, 1.0], [-6.0, 2.0]], rtol=1e-6)  # B: (x - 30) / 5


def test_default_normalisation_is_imagenet_rgb() -> None:
    pre = Preprocess(size=(1, 1))
    img = np.array([[[124, 116, 104]]], np.uint8)
    expected = (np.array([124, 116, 104]) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(pre.normalize(img)[:, 0, 0], expected, rtol=0, atol=1e-6)


def test_resize_sizes() -> None:
    img = np.zeros((6, 8, 3), np.uint8)
    assert resize_image(img, (3, 5)).shape == (3, 5, 3)
    assert resize_image(img, (6, 8)) is img  # already at size: no work
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    up = resize_mask(mask, (4, 4))
    assert up.shape == (4, 4) and set(np.unique(up)) == {0, 1, 2, 255}  # nearest: no new labels
    pre = Preprocess(size=(4, 6))
    assert pre.image(img).shape == (3, 4, 6)
    target = pre.mask(mask)
    assert target.shape == (4, 6) and target.dtype == np.int64
    batch = pre.batch([img, np.zeros((10, 10, 3), np.uint8)])
    assert batch.shape == (2, 3, 4, 6) and batch.dtype == np.float32


def test_preprocess_dict_round_trip() -> None:
    pre = Preprocess(size=(64, 96), mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0), ignore_index=250)
    d = pre.to_dict()
    assert d == {"size": [64, 96], "mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0], "ignore_index": 250}
    assert Preprocess.from_dict(d) == pre


def test_preprocess_from_dict_rejects_unknown_and_missing_keys() -> None:
    d = Preprocess(size=(8, 8)).to_dict()
    with pytest.raises(BckdError, match="unknown key.*colour_order"):
        Preprocess.from_dict({**d, "colour_order": "BGR"})
    del d["std"]
    with pytest.raises(BckdError, match="missing key.*std"):
        Preprocess.from_dict(d)


def test_preprocess_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="std"):
        Preprocess(size=(8, 8), std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="size"):
        Preprocess(size=(8, 0))
    with pytest.raises(BckdError, match="mean"):
        Preprocess.from_dict({"size": [8, 8], "mean": [1, 2], "std": [1, 1, 1], "ignore_index": 255})
