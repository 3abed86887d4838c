"""COCO ground truth: the ``coco`` loader, synthetic detect/instance data, letterbox and box transforms."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_api  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from runtime.data import CocoDataset, Preprocess, open_dataset, resize_image  # noqa: E402
from runtime.data.synth import (  # noqa: E402
    CLASSES,
    IGNORE_INDEX,
    MIN_INSTANCE_AREA,
    SynthSpec,
    render_sample,
    render_scene,
    rle_encode,
    scene_annotations,
    synthesize,
)
from runtime.errors import BckdError  # noqa: E402
from runtime.files import sha256_file  # noqa: E402

# pycocotools' single-mask decode trips a numpy 2 deprecation inside pycocotools itself
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

# --- a tiny dataset in the real COCO 2017 layout -----------------------------------------------

# category ids are sparse and listed out of order, as in COCO
CATEGORIES = [{"id": 18, "name": "dog", "supercategory": "animal"},
              {"id": 1, "name": "person", "supercategory": "person"},
              {"id": 3, "name": "car", "supercategory": "vehicle"}]
SIZES = {285: (30, 40), 139: (24, 32), 632: (20, 20)}  # image id -> (h, w); listed 285 first


def _blob(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """uint8 mask: an L-shape inside box (y0, y1, x0, x1), so it is not its own bounding box."""
    m = np.zeros((h, w), np.uint8)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x0 + 3] = 1
    m[y1 - 2:y1, x0:x1] = 1
    return m


def _uncompressed_rle(m: np.ndarray) -> dict:
    flat = m.T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:
        counts.insert(0, 0)
    return {"size": list(m.shape), "counts": counts}


RLE_MASK = _blob(30, 40, (4, 20, 22, 35))
CROWD_MASK = _blob(24, 32, (10, 22, 2, 30))
RLE_BOX_XYXY = [22, 4, 35, 20]


def _ann(ann_id: int, image_id: int, cat: int, bbox: list, area: float, segm, crowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": area,
            "iscrowd": crowd, "segmentation": segm}


def coco_json() -> dict:
    rle = mask_api.encode(np.asfortranarray(RLE_MASK))
    rle["counts"] = rle["counts"].decode()
    anns = [
        # two polygon parts: one object split by an occluder
        _ann(7, 285, 18, [2.0, 3.0, 16.0, 12.0], 120.5,
             [[2, 3, 10, 3, 10, 15, 2, 15], [12, 3, 18, 3, 18, 9, 12, 9]]),
        _ann(9, 285, 1, mask_api.toBbox(rle).tolist(), float(RLE_MASK.sum()), rle),
        _ann(11, 139, 3, mask_api.toBbox(mask_api.encode(np.asfortranarray(CROWD_MASK))).tolist(),
             float(CROWD_MASK.sum()), _uncompressed_rle(CROWD_MASK), crowd=1),
        _ann(12, 139, 1, [0.0, 0.0, 32.5, 8.0], 100.0, [[0, 0, 32.5, 0, 32.5, 8, 0, 8]]),  # 0.5 px over
    ]
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": h, "width": w} for i, (h, w) in SIZES.items()]
    return {"info": {"description": "test"}, "images": images, "annotations": anns, "categories": CATEGORIES}


def write_coco(root: Path, data: dict | None = None, split: str = "val") -> Path:
    """Write the fixture (or ``data``) as ``root/annotations/instances_{split}2017.json`` + ``root/{split}2017/``."""
    data = coco_json() if data is None else data
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(exist_ok=True)
    for img in data["images"]:
        path = root / f"{split}2017" / img["file_name"]
        if not path.exists():
            h, w = SIZES.get(img["id"], (img["height"], img["width"]))
            Image.fromarray(np.full((h, w, 3), img["id"] % 251, np.uint8)).save(path, quality=95)
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return root


@pytest.fixture()
def coco_root(tmp_path: Path) -> Path:
    return write_coco(tmp_path / "coco")


def test_loader_reads_boxes_labels_masks_areas(coco_root: Path) -> None:
    ds = open_dataset(coco_root, "val", format="coco")
    assert isinstance(ds, CocoDataset) and ds.task == "instance" and ds.meta["format"] == "coco"
    assert ds.image_ids == [139, 285, 632] and ds.ids == ["139", "285", "632"]  # ascending ids
    assert ds.classes == ["person", "car", "dog"] and ds.category_ids == [1, 3, 18] and ds.num_classes == 3
    assert ds.ann_file == coco_root / "annotations" / "instances_val2017.json"
    assert ds.image_path(1) == coco_root / "val2017" / "000000000285.jpg" and ds.image_size(1) == (30, 40)

    img, t = ds.load(1)  # image 285: polygons (dog) and a compressed RLE (person)
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8
    assert t["image_id"] == 285 and t["size"] == (30, 40)
    np.testing.assert_allclose(t["boxes"], [[2, 3, 18, 15], RLE_BOX_XYXY], atol=1e-6)
    assert t["boxes"].dtype == np.float32 and t["labels"].tolist() == [2, 0] and t["labels"].dtype == np.int64
    assert t["iscrowd"].tolist() == [False, False] and t["area"].tolist() == [120.5, RLE_MASK.sum()]
    assert t["masks"].shape == (2, 30, 40) and t["masks"].dtype == np.uint8
    np.testing.assert_array_equal(t["masks"][1], RLE_MASK)
    gt = ds.coco  # the pycocotools COCO of the file, as evaluation uses it
    np.testing.assert_array_equal(t["masks"][0], gt.annToMask(gt.anns[7]))
    assert t["masks"][0, 3:9, 12:18].all() and not t["masks"][0, 12, 11]  # both parts, the gap stays empty

    _, t = ds.load(0)  # image 139: crowd with uncompressed RLE, and a box 0.5 px over the border
    assert t["iscrowd"].tolist() == [True, False] and t["labels"].tolist() == [1, 0]
    np.testing.assert_array_equal(t["masks"][0], CROWD_MASK)
    assert t["boxes"][1].tolist() == [0, 0, 32, 8]  # within the 1 px tolerance, clipped to the image

    _, t = ds.load(2)  # no annotations
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, 20, 20)
    assert sorted(gt.getImgIds()) == [139, 285, 632] and len(gt.getAnnIds()) == 4


def test_box_only_file_is_a_detect_dataset(tmp_path: Path) -> None:
    data = coco_json()
    for ann in data["annotations"]:
        del ann["segmentation"]
    ds = open_dataset(write_coco(tmp_path, data), "val", format="coco")
    assert ds.task == "detect" and ds.meta["task"] == "detect"
    _, t = ds.load(1)
    assert t["masks"] is None and t["boxes"].shape == (2, 4)


def _mutate(fn):
    def apply(data: dict) -> dict:
        data = copy.deepcopy(data)
        fn(data)
        return data
    return apply


def _ann_of(data: dict, ann_id: int) -> dict:
    return next(a for a in data["annotations"] if a["id"] == ann_id)


BAD_JSON = {
    "box outside": (_mutate(lambda d: _ann_of(d, 7).update(bbox=[30.0, 3.0, 12.0, 5.0])),
                    r"annotation 7 has box \[30.0, 3.0, 12.0, 5.0\].*outside image 285 of 40x30 by more than 1 px"),
    "negative width": (_mutate(lambda d: _ann_of(d, 7).update(bbox=[2.0, 3.0, -4.0, 5.0])),
                       r"annotation 7 \(image 285\) has a box of non-positive size -4.0x5.0"),
    "zero height, positive area": (_mutate(lambda d: _ann_of(d, 7).update(bbox=[2.0, 3.0, 4.0, 0.0])),
                                   r"non-positive size 4.0x0.0"),
    "unknown category": (_mutate(lambda d: _ann_of(d, 9).update(category_id=2)),
                         r"annotation 9 has category 2, not one of the categories \(1, 3, 18\)"),
    "duplicate image id": (_mutate(lambda d: d["images"][2].update(id=139)),
                           r"image id 139 is used twice"),
    "duplicate annotation id": (_mutate(lambda d: _ann_of(d, 9).update(id=7)), r"annotation id 7 is used twice"),
    "unknown image": (_mutate(lambda d: _ann_of(d, 9).update(image_id=5)),
                      r"annotation 9 refers to image 5, which 'images' does not list"),
    "rle of another size": (_mutate(lambda d: _ann_of(d, 9)["segmentation"].update(size=[40, 30])),
                            r"annotation 9 has an RLE segmentation of size \[40, 30\]"),
    "masks on some only": (_mutate(lambda d: _ann_of(d, 12).pop("segmentation")),
                           r"1 of 4 annotations have no segmentation"),
    "no categories key": (_mutate(lambda d: d.pop("categories")), r"has no 'categories' list"),
    "wrong recorded size": (_mutate(lambda d: d["images"][2].update(width=21)),
                            r"000000000632\.jpg is 20x20 but .*instances_val2017\.json records 21x20 for image 632"),
    "missing image file": (_mutate(lambda d: d["images"].append(
                               {"id": 700, "file_name": "gone.jpg", "height": 5, "width": 5})),
                           r"1 of 4 images listed in .*instances_val2017\.json are missing, "
                           r"e\.g\. .*val2017/gone\.jpg"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_bad_annotation_files_fail_when_opened(tmp_path: Path, case: str) -> None:
    mutate, message = BAD_JSON[case]
    root = write_coco(tmp_path)  # the images of the good file
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(mutate(coco_json())))
    with pytest.raises(BckdError, match=message) as err:
        open_dataset(root, "val", format="coco")
    assert "\n" not in str(err.value)


def test_missing_and_corrupt_annotation_files(coco_root: Path) -> None:
    with pytest.raises(BckdError, match=r"split 'train' not found .*instances_train2017\.json \(COCO 2017\) or "
                                        r".*instances_train\.json \(bckd synthetic\); annotation files there: "
                                        r"instances_val2017\.json"):
        open_dataset(coco_root, "train", format="coco")
    ann = coco_root / "annotations" / "instances_val2017.json"
    ann.write_text(ann.read_text()[:100])
    with pytest.raises(BckdError, match=r"instances_val2017\.json is not valid JSON"):
        open_dataset(coco_root, "val", format="coco")
    ann.write_text("[1, 2]")
    with pytest.raises(BckdError, match=r"holds a list, not a JSON object"):
        open_dataset(coco_root, "val", format="coco")
    (coco_root / "val2017" / "000000000139.jpg").write_bytes(b"not a jpeg")
    write_coco(coco_root)
    with pytest.raises(BckdError, match=r"cannot read image .*000000000139\.jpg"):
        open_dataset(coco_root, "val", format="coco")


def test_zero_size_zero_area_boxes_are_skipped(tmp_path: Path) -> None:
    # COCO train2017 holds two annotations like this (cocodataset/cocoapi#355)
    data = coco_json()
    data["annotations"].append(_ann(40, 632, 3, [4.0, 5.0, 3.0, 0.0], 0.0, [[4, 5, 7, 5, 7, 5, 4, 5]]))
    ds = open_dataset(write_coco(tmp_path, data), "val", format="coco")
    assert ds.meta["skipped_degenerate"] == 1 and ds.load(2)[1]["boxes"].shape == (0, 4)
    assert len(ds.coco.getAnnIds()) == 5  # evaluation sees the file as it is


# --- synthetic detect / instance data ----------------------------------------------------------

SMALL = dict(n_train=6, n_val=12, size=(64, 64))


def _hashes(root: Path, under: str) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted((root / under).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("synth")
    return {task: synthesize(base / task, seed=5, task=task, workers=1, **SMALL)
            for task in ("semantic", "detect", "instance")}


def test_synthetic_pixels_are_the_semantic_ones(synth_roots: dict[str, Path]) -> None:
    sem = synth_roots["semantic"]
    assert not (sem / "annotations").exists()
    for task in ("detect", "instance"):
        root = synth_roots[task]
        for under in ("images", "masks", "splits"):
            assert _hashes(root, under) == _hashes(sem, under)
        meta, sem_meta = (json.loads((r / "dataset.json").read_text()) for r in (root, sem))
        assert "task" not in sem_meta["generator"] and meta["generator"]["task"] == task
        assert {k: v for k, v in meta["generator"].items() if k not in ("task", "min_instance_area")} \
            == sem_meta["generator"]
        assert sorted(p.name for p in (root / "annotations").iterdir()) == ["instances_train.json",
                                                                             "instances_val.json"]
    spec = SynthSpec(size=(64, 64))
    scene, (img, mask) = render_scene(spec, 5, "val", 3), render_sample(spec, 5, "val", 3)
    np.testing.assert_array_equal(scene.image, img)
    np.testing.assert_array_equal(scene.label, mask)


def test_synthetic_instances_match_their_masks(synth_roots: dict[str, Path]) -> None:
    root = synth_roots["instance"]
    gt = COCO(str(root / "annotations" / "instances_val.json"))
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == list(CLASSES[1:])
    assert gt.getImgIds() == list(range(1, 13))
    assert [a["id"] for a in gt.dataset["annotations"]] == list(range(1, len(gt.anns) + 1))
    crowd_images = split_instances = 0
    for img in gt.dataset["images"]:
        label = np.asarray(Image.open(root / "masks" / img["file_name"]))
        assert img["file_name"] == f"val_{img['id'] - 1:05d}.png" and (root / "images" / img["file_name"]).is_file()
        anns = gt.loadAnns(gt.getAnnIds(imgIds=img["id"]))
        solid = np.zeros(label.shape, np.int32)
        for a in anns:
            m = gt.annToMask(a)
            assert a["area"] == m.sum() >= MIN_INSTANCE_AREA
            assert mask_api.toBbox(a["segmentation"]).tolist() == a["bbox"]
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            # each mask lies on its own class in the semantic mask (category id == class index)
            assert (label[m > 0] == (IGNORE_INDEX if a["iscrowd"] else a["category_id"])).all()
            if not a["iscrowd"]:
                solid += m
                split_instances += ndimage.label(m)[1] > 1
        assert solid.max() <= 1  # visible masks of different instances never overlap
        crowd = [a for a in anns if a["iscrowd"]]
        assert len(crowd) % 6 == 0
        assert sorted({a["category_id"] for a in crowd}) == ([1, 2, 3, 4, 5, 6] if crowd else [])
        crowd_images += bool(crowd)
        if (label == IGNORE_INDEX).sum() >= MIN_INSTANCE_AREA:
            assert crowd  # an ignore blob is 'don't care' for every class
    assert crowd_images > 0 and split_instances > 0  # both cases exercised


def test_detect_annotations_are_instance_ones_without_masks(synth_roots: dict[str, Path]) -> None:
    for split in ("train", "val"):
        det, ins = (json.loads((synth_roots[t] / "annotations" / f"instances_{split}.json").read_text())
                    for t in ("detect", "instance"))
        assert det["images"] == ins["images"] and det["categories"] == ins["categories"]
        assert all("segmentation" not in a for a in det["annotations"])
        assert det["annotations"] == [{k: v for k, v in a.items() if k != "segmentation"} for a in ins["annotations"]]
        assert det["info"]["task"] == "detect" and ins["info"]["task"] == "instance"


def test_coco_loader_reads_the_synthetic_layout(synth_roots: dict[str, Path]) -> None:
    ds = open_dataset(synth_roots["instance"], "val", format="coco")
    assert ds.task == "instance" and ds.meta["layout"] == "bckd-synth" and ds.classes == list(CLASSES[1:])
    assert ds.image_path(4).name == "val_00004.png" and len(ds) == 12
    scene = render_scene(SynthSpec(size=(64, 64)), 5, "val", 4)
    img, t = ds.load(4)
    np.testing.assert_array_equal(img, scene.image)
    solid = ~t["iscrowd"]
    expected = [i for i, c in enumerate(scene.owners, 1)
                if c != IGNORE_INDEX and (scene.instances == i).sum() >= MIN_INSTANCE_AREA]
    assert t["labels"][solid].tolist() == [scene.owners[i - 1] - 1 for i in expected]
    for m, i in zip(t["masks"][solid], expected):
        np.testing.assert_array_equal(m, scene.instances == i)
    assert open_dataset(synth_roots["detect"], "train", format="coco").task == "detect"


def test_worker_count_does_not_change_annotations(tmp_path: Path, synth_roots: dict[str, Path]) -> None:
    two = synthesize(tmp_path / "two", seed=5, task="instance", workers=2, **SMALL)
    assert _hashes(two, "annotations") == _hashes(synth_roots["instance"], "annotations")


def test_unknown_task_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(BckdError, match=r"unknown synthetic dataset task 'instances'; did you mean 'instance'"):
        synthesize(tmp_path / "x", task="instances", **SMALL)
    assert not (tmp_path / "x").exists()


def test_rle_encoder_matches_pycocotools() -> None:
    rng = np.random.default_rng(0)
    for n in range(60):
        h, w = (int(v) for v in rng.integers(1, 30, size=2))
        m = (rng.random((h, w)) < [0.0, 1.0, 0.5, 0.05][n % 4]).astype(np.uint8)
        ref = mask_api.encode(np.asfortranarray(m))
        assert rle_encode(m) == {"size": [h, w], "counts": ref["counts"].decode()}


def test_scene_annotations_leave_out_slivers() -> None:
    scene = render_scene(SynthSpec(size=(64, 64)), 0, "train", 0)
    areas = np.bincount(scene.instances.ravel(), minlength=len(scene.owners) + 1)[1:]
    anns = scene_annotations(scene, "detect")
    kept = [i for i, a in enumerate(areas) if a >= MIN_INSTANCE_AREA and scene.owners[i] != IGNORE_INDEX]
    assert [a["area"] for a in anns if not a["iscrowd"]] == [int(areas[i]) for i in kept]


# --- letterbox and box transforms --------------------------------------------------------------

MEAN, STD = (10.0, 20.0, 30.0), (2.0, 4.0, 5.0)


def test_letterbox_keeps_aspect_and_pads_to_zero() -> None:
    pre = Preprocess(size=(64, 96), mean=MEAN, std=STD, resize="letterbox")
    img = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    assert pre.content_shape((30, 20)) == (64, 43)  # scale min(64/30, 96/20)
    x = pre.image(img)
    assert x.shape == (3, 64, 96) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, :, :43], pre.normalize(resize_image(img, (64, 43))))
    assert not x[:, :, 43:].any()  # the mean colour, exactly 0 after normalising
    mask = pre.mask(np.ones((30, 20), np.uint8))
    assert (mask[:, :43] == 1).all() and (mask[:, 43:] == 255).all() and mask.dtype == np.int64
    inst = pre.instance_masks(np.ones((2, 30, 20), np.uint8))
    assert inst.shape == (2, 64, 96) and inst[:, :, :43].all() and not inst[:, :, 43:].any()
    stretch = Preprocess(size=(64, 96), mean=MEAN, std=STD)
    np.testing.assert_array_equal(stretch.image(img), stretch.normalize(resize_image(img, (64, 96))))


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_box_transform_round_trip_follows_the_pixels(resize: str) -> None:
    pre = Preprocess(size=(64, 96), resize=resize)
    h0, w0 = 45, 37
    t = pre.box_transform((h0, w0))
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, [w0, h0], size=(20, 2, 2))
    boxes = np.concatenate([xy.min(1), xy.max(1)], axis=1).astype(np.float32)
    np.testing.assert_allclose(t.to_original(t.to_input(boxes), clip_hw=(h0, w0)), boxes, atol=1e-4)
    ch, cw = pre.content_shape((h0, w0))
    np.testing.assert_allclose(t.to_input(np.array([0, 0, w0, h0])), [0, 0, cw, ch], atol=1e-4)
    if resize == "stretch":
        assert (t.sx, t.sy) == (96 / 37, 64 / 45)
    # a box drawn on the padding is clipped back onto the original image
    np.testing.assert_allclose(t.to_original(np.array([[-5, -5, 96, 64]]), clip_hw=(h0, w0)), [[0, 0, w0, h0]])
    # the box of a pixel block lands on the block after resizing (nearest), within a pixel
    m = np.zeros((1, h0, w0), np.uint8)
    m[0, 10:30, 5:21] = 1
    ys, xs = np.nonzero(pre.instance_masks(m)[0])
    np.testing.assert_allclose(t.to_input(np.array([5, 10, 21, 30])),
                               [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.0)


def test_resize_is_in_the_card_only_when_not_stretch() -> None:
    stretch = Preprocess(size=(8, 8), ignore_index=250)
    assert "resize" not in stretch.to_dict()  # semantic cards stay exactly as before
    assert Preprocess.from_dict(stretch.to_dict()) == stretch
    lb = Preprocess(size=(8, 16), resize="letterbox")
    assert lb.to_dict()["resize"] == "letterbox" and Preprocess.from_dict(lb.to_dict()) == lb
    assert Preprocess.from_dict({**lb.to_dict(), "resize": "stretch"}) == Preprocess(size=(8, 16))
    with pytest.raises(BckdError, match=r"resize must be one of stretch, letterbox, got 'pad'"):
        Preprocess.from_dict({**lb.to_dict(), "resize": "pad"})
    with pytest.raises(BckdError, match=r"unknown key\(s\) keep_ratio"):
        Preprocess.from_dict({**lb.to_dict(), "keep_ratio": True})
    with pytest.raises(ValueError, match="resize"):
        Preprocess(size=(8, 8), resize="crop")
