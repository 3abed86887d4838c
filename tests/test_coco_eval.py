"""CocoMeter and detection predictions folders against pycocotools / faster-coco-eval run directly.

The fixture is a tiny COCO ground truth built here (non-contiguous category ids, crowd regions,
small/medium/large objects, RLE and polygon masks, an image without objects) and detections made
from it: jittered true positives, duplicates, misses and false positives. Every reference number
comes from the toolkit's own COCOeval on a results list built independently of runtime.tasks.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("pycocotools")
pytest.importorskip("faster_coco_eval")

import pycocotools.mask as mask_util  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from runtime.errors import BckdError  # noqa: E402
from runtime.tasks.coco_eval import (CocoMeter, ImageDetections, encode_masks,  # noqa: E402
                                     write_results_json)
from runtime.tasks.det_predictions import (DetectionWriter, read_detections,  # noqa: E402
                                           score_detections)

CATEGORY_IDS = [1, 3, 7]
CLASSES = ["disc", "box", "ring"]
SIZES = {11: (240, 320), 12: (180, 200), 13: (120, 160), 14: (64, 64)}  # id -> (h, w)
BACKENDS = ("faster_coco_eval", "pycocotools")


# --------------------------------------------------------------------------------------------
# fixture: ground truth and detections


def quiet():
    return contextlib.redirect_stdout(io.StringIO())  # pycocotools prints its progress


def _shape(kind: str, h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    d = np.hypot(yy - cy, xx - cx)
    if kind == "disc":
        m = d <= r
    elif kind == "ring":
        m = (d <= r) & (d >= r * 0.55)
    else:
        m = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r * 0.8)
    return m.astype(np.uint8)


def _rle(m: np.ndarray) -> dict:
    r = mask_util.encode(np.asfortranarray(m[:, :, None]))[0]
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


# (image, category, kind, cy, cx, r, iscrowd): radii give small (< 32²), medium and large areas.
_OBJECTS = [
    (11, 1, "disc", 60, 70, 8, 0), (11, 3, "box", 150, 200, 30, 0),
    (11, 7, "ring", 120, 90, 72, 0),
    (11, 1, "disc", 200, 280, 14, 0), (11, 3, "box", 40, 260, 22, 1),
    (12, 7, "ring", 90, 100, 40, 0), (12, 1, "disc", 30, 30, 6, 0), (12, 1, "disc", 140, 160, 25, 0),
    (12, 3, "box", 100, 40, 12, 0),
    (13, 3, "box", 50, 60, 10, 0), (13, 1, "disc", 80, 120, 9, 0), (13, 1, "disc", 60, 120, 30, 1),
]


def gt_dict() -> dict:
    """The ground truth in annotation-file form; one annotation is a polygon, crowds are RLE."""
    images = [{"id": i, "height": h, "width": w, "file_name": f"{i}.png"}
              for i, (h, w) in SIZES.items()]
    anns = []
    for n, (img, cat, kind, cy, cx, r, crowd) in enumerate(_OBJECTS, 1):
        h, w = SIZES[img]
        m = _shape(kind, h, w, cy, cx, r)
        rle = _rle(m)
        anns.append({"id": n, "image_id": img, "category_id": cat, "iscrowd": crowd,
                     "segmentation": rle, "area": float(mask_util.area(rle)),
                     "bbox": [float(v) for v in mask_util.toBbox(rle)]})
    box = anns[1]["bbox"]  # the 'box' object as a polygon, as COCO stores most instances
    x, y, bw, bh = box
    anns[1]["segmentation"] = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
    cats = [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, CLASSES)]
    return {"info": {"description": "bckd test"}, "images": images, "annotations": anns,
            "categories": cats}


def load_gt(tmp_path, name: str = "gt.json", lib=COCO):
    path = tmp_path / name
    if not path.exists():
        path.write_text(json.dumps(gt_dict()))
    with quiet():
        return lib(str(path))


def make_detections(seed: int = 0) -> dict[int, dict]:
    """Per image: xyxy boxes, scores, contiguous labels and uint8 masks [K, h, w]."""
    rng = np.random.default_rng(seed)
    out = {}
    for img, (h, w) in SIZES.items():
        boxes, scores, labels, masks = [], [], [], []

        def add(m, label, score):
            ys, xs = np.nonzero(m)
            if len(ys) == 0:
                return
            boxes.append([xs.min() + rng.normal(0, 0.7), ys.min() + rng.normal(0, 0.7),
                          xs.max() + 1 + rng.normal(0, 0.7), ys.max() + 1 + rng.normal(0, 0.7)])
            scores.append(score)
            labels.append(label)
            masks.append(m)

        for k, (i, cat, kind, cy, cx, r, crowd) in enumerate(_OBJECTS):
            if i != img or k % 5 == 3:  # every fifth object is missed
                continue
            shift = rng.integers(-2, 3, size=2)
            m = _shape(kind, h, w, cy + shift[0], cx + shift[1], r * rng.uniform(0.85, 1.1))
            label = CATEGORY_IDS.index(cat)
            add(m, label, float(rng.uniform(0.3, 1.0)))
            if k % 3 == 0:  # a duplicate with a lower score
                add(m, label, scores[-1] * 0.5)
        for _ in range(3):  # false positives, one of them in the object-free image 14
            kind = ["disc", "box", "ring"][int(rng.integers(3))]
            m = _shape(kind, h, w, rng.uniform(10, h - 10), rng.uniform(10, w - 10),
                       rng.uniform(4, min(h, w) / 3))
            add(m, int(rng.integers(3)), float(rng.uniform(0.05, 0.9)))
        scores[0] = scores[-1] if len(scores) > 1 else scores[0]  # a tie: order must be kept
        out[img] = {"boxes": np.array(boxes, np.float32).reshape(-1, 4),
                    "scores": np.array(scores, np.float32),
                    "labels": np.array(labels, np.int64),
                    "masks": np.array(masks, np.uint8).reshape(-1, h, w)}
    return out


def reference_results(dets: dict[int, dict], iou_type: str, img_ids=None) -> list[dict]:
    """A COCO results list built by hand, one mask at a time (independent of runtime.tasks)."""
    res = []
    for img, d in dets.items():
        if img_ids is not None and img not in img_ids:
            continue
        for k in range(len(d["scores"])):
            x1, y1, x2, y2 = (float(v) for v in d["boxes"][k])
            entry = {"image_id": img, "category_id": CATEGORY_IDS[int(d["labels"][k])],
                     "score": float(d["scores"][k])}
            if iou_type == "bbox":
                entry["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            else:
                entry["segmentation"] = _rle(d["masks"][k])
            res.append(entry)
    return res


def reference_stats(tmp_path, results, iou_type, img_ids, lib: str) -> np.ndarray:
    """COCOeval's stats from the named toolkit itself, on a freshly loaded ground truth."""
    import faster_coco_eval

    with quiet():
        if lib == "pycocotools":
            gt = load_gt(tmp_path, "ref_gt.json")
            ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
        else:
            gt = load_gt(tmp_path, "ref_gt.json", faster_coco_eval.COCO)
            ev = faster_coco_eval.COCOeval_faster(gt, gt.loadRes(copy.deepcopy(results)), iou_type,
                                                  print_function=lambda *a: None)
        ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats[:12], dtype=np.float64)


def fill(meter: CocoMeter, dets: dict[int, dict], img_ids=None, masks: bool = True) -> CocoMeter:
    for img, d in dets.items():
        if img_ids is None or img in img_ids:
            meter.update(img, d["boxes"], d["scores"], d["labels"], d["masks"] if masks else None)
    return meter


def assert_stats_equal(got: list, want: np.ndarray) -> None:
    assert len(got) == 12
    for g, w in zip(got, want):
        if w < 0:
            assert g is None
        else:
            assert g is not None and abs(g - w) <= 1e-9, (got, want)


# --------------------------------------------------------------------------------------------
# equality with the toolkits


@pytest.mark.parametrize("backend", BACKENDS)
def test_box_and_mask_ap_equal_pycocotools(tmp_path, backend):
    dets = make_detections()
    meter = fill(CocoMeter(load_gt(tmp_path), CATEGORY_IDS, ("bbox", "segm"), backend), dets)
    summary = meter.summary()
    for iou_type in ("bbox", "segm"):
        want = reference_stats(tmp_path, reference_results(dets, iou_type), iou_type, SIZES,
                               "pycocotools")
        assert_stats_equal(summary["stats"][iou_type], want)
        assert 0.1 < want[0] < 0.95  # the fixture is neither trivial nor hopeless
        assert min(want[3:6]) >= 0  # and has small, medium and large objects
    assert summary["box_ap"] == summary["stats"]["bbox"][0]
    assert summary["mask_apl"] == summary["stats"]["segm"][5]
    assert summary["box_ar100"] == summary["stats"]["bbox"][8]
    assert summary["images"] == 4 and summary["backend"] == backend
    assert summary["detections"] == sum(len(d["scores"]) for d in dets.values())
    assert summary["box_ap"] != summary["mask_ap"]


def test_boundary_ap_equals_faster_coco_eval(tmp_path):
    dets = make_detections(seed=1)
    meter = fill(CocoMeter(load_gt(tmp_path), CATEGORY_IDS, ("bbox", "segm", "boundary")), dets)
    summary = meter.summary()
    results = reference_results(dets, "segm")
    want = reference_stats(tmp_path, results, "boundary", SIZES, "faster_coco_eval")
    assert_stats_equal(summary["stats"]["boundary"], want)
    assert summary["boundary_ap"] == pytest.approx(want[0], abs=1e-12)
    assert summary["boundary_ap"] < summary["mask_ap"]  # min(mask, boundary IoU) is stricter
    assert {"boundary_ap50", "boundary_ap75"} <= set(summary)


def test_boundary_is_the_papers_definition():
    """faster-coco-eval's C++ boundary = mask minus its erosion by round(0.02 * diagonal) 3x3 steps,
    with the image border counting as outside (Boundary IoU paper, boundary-iou-api)."""
    from faster_coco_eval.core.mask import decode, rleToBoundary

    h, w = SIZES[11]
    dilation = max(1, int(round(0.02 * np.hypot(h, w))))
    for kind, cy, cx, r in (("ring", 120, 90, 62), ("box", 5, 300, 30), ("disc", 100, 100, 3)):
        m = _shape(kind, h, w, cy, cx, r)
        eroded = np.pad(m, 1)
        for _ in range(dilation):
            p = np.pad(eroded, 1)
            eroded = np.min([p[dy:dy + h + 2, dx:dx + w + 2] for dy in range(3) for dx in range(3)],
                            axis=0)
        want = m - eroded[1:-1, 1:-1]
        got = decode([rleToBoundary(_rle(m), 0.02)])[:, :, 0]
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_split_is_scored_on_itself(tmp_path, backend):
    dets = make_detections()
    meter = fill(CocoMeter(load_gt(tmp_path), CATEGORY_IDS, ("bbox",), backend), dets, {13, 14})
    stats = meter.summary()["stats"]["bbox"]
    want = reference_stats(tmp_path, reference_results(dets, "bbox", {13, 14}), "bbox", [13, 14],
                           "pycocotools")
    assert_stats_equal(stats, want)
    assert stats[5] is None  # no large object in images 13 and 14: COCO's -1 becomes None


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_detections_score_zero(tmp_path, backend):
    meter = CocoMeter(load_gt(tmp_path), CATEGORY_IDS, ("bbox", "segm"), backend)
    for img, (h, w) in SIZES.items():
        meter.update(img, np.zeros((0, 4)), [], [], np.zeros((0, h, w), np.uint8))
    s = meter.summary()
    for key in ("box_ap", "box_ap50", "box_aps", "box_apm", "box_apl", "box_ar100", "mask_ap"):
        assert s[key] == 0.0
    assert s["detections"] == 0 and meter.results("bbox") == []
    none = CocoMeter(load_gt(tmp_path), CATEGORY_IDS, ("bbox",), backend).summary()
    assert none["images"] == 0 and none["box_ap"] is None


def test_results_load_with_pycocotools(tmp_path):
    dets = make_detections()
    gt = load_gt(tmp_path)
    meter = fill(CocoMeter(gt, CATEGORY_IDS, ("bbox", "segm"), "pycocotools"), dets)
    for iou_type in ("bbox", "segm"):
        path = write_results_json(tmp_path / f"{iou_type}.json", meter.results(iou_type))
        loaded = json.loads(path.read_text())
        assert loaded == reference_results(dets, iou_type)
        assert "bbox" not in loaded[0] if iou_type == "segm" else len(loaded[0]["bbox"]) == 4
        with quiet():
            res = gt.loadRes(str(path))
        assert len(res.anns) == len(loaded)
    assert json.loads(write_results_json(tmp_path / "e.json", []).read_text()) == []


def test_meter_leaves_the_callers_ground_truth_alone(tmp_path):
    gt = load_gt(tmp_path)
    before = copy.deepcopy(gt.dataset["annotations"])
    fill(CocoMeter(gt, CATEGORY_IDS, ("bbox", "segm", "boundary")), make_detections()).summary()
    fill(CocoMeter(gt, CATEGORY_IDS, ("segm",), "pycocotools"), make_detections()).summary()
    assert gt.dataset["annotations"] == before


# --------------------------------------------------------------------------------------------
# input checks and memory


def test_update_checks_inputs(tmp_path):
    gt = load_gt(tmp_path)
    meter = CocoMeter(gt, CATEGORY_IDS, ("bbox", "segm"), "pycocotools")
    box, one = [[1.0, 2.0, 10.0, 12.0]], np.ones((1, 64, 64), np.uint8)
    with pytest.raises(BckdError, match="not in the ground truth"):
        meter.update(99, box, [0.5], [0], one)
    with pytest.raises(BckdError, match="out of range"):
        meter.update(14, box, [0.5], [3], one)
    with pytest.raises(BckdError, match="original image size"):
        meter.update(14, box, [0.5], [0], np.ones((1, 32, 64), np.uint8))
    with pytest.raises(BckdError, match="needs masks"):
        meter.update(14, box, [0.5], [0])
    for same in (one * 255, one.astype(bool), one.astype(np.int32)):  # any nonzero value is "on"
        assert encode_masks(same) == encode_masks(one) == [_rle(one[0])]
    with pytest.raises(BckdError, match="threshold"):
        meter.update(14, box, [0.5], [0], one.astype(np.float32))
    with pytest.raises(BckdError, match=r"\[K, 4\]"):
        meter.update(14, [1.0, 2.0, 3.0, 4.0], [0.5], [0], one)
    # label -1 rows are the NMS layout's padding: dropped with their masks
    meter.update(14, box + [[0, 0, 0, 0]], [0.5, 0.0], [2, -1], np.concatenate([one, 0 * one]))
    assert meter.detections == 1 and meter.results("segm")[0]["category_id"] == 7
    with pytest.raises(BckdError, match="twice"):
        meter.update(14, box, [0.5], [0], one)
    with pytest.raises(BckdError, match="cannot compute boundary"):
        CocoMeter(gt, CATEGORY_IDS, ("bbox", "boundary"), "pycocotools")
    with pytest.raises(BckdError, match="did you mean 'segm'"):
        CocoMeter(gt, CATEGORY_IDS, ("seg",))
    with pytest.raises(BckdError, match="category id 2"):
        CocoMeter(gt, [1, 2], ("bbox",))
    with pytest.raises(BckdError, match="unknown COCO evaluation backend"):
        CocoMeter(gt, CATEGORY_IDS, backend="detectron2")
    d = gt_dict()
    d["annotations"][0]["id"] = 0
    (tmp_path / "zero.json").write_text(json.dumps(d))
    with pytest.raises(BckdError, match="id 0"):
        CocoMeter(load_gt(tmp_path, "zero.json"), CATEGORY_IDS)


def test_meter_keeps_no_dense_masks(tmp_path):
    dets = make_detections()
    meter = fill(CocoMeter(load_gt(tmp_path), CATEGORY_IDS, ("bbox", "segm")), dets)
    dense = sum(d["masks"].nbytes for d in dets.values())
    kept = 0
    for det in meter._dets.values():
        assert isinstance(det, ImageDetections)
        for arr in (det.boxes, det.scores, det.category_ids):
            assert isinstance(arr, np.ndarray) and arr.size <= 4 * len(det)
            kept += arr.nbytes
        assert all(isinstance(m["counts"], str) for m in det.masks)
        kept += sum(len(m["counts"]) for m in det.masks)
    assert kept * 10 < dense
    # a boxes-only meter drops masks it was given
    box_only = fill(CocoMeter(load_gt(tmp_path), CATEGORY_IDS), dets)
    assert all(d.masks is None for d in box_only._dets.values())


# --------------------------------------------------------------------------------------------
# predictions folder: write on the device, score on the host


def _dataset(tmp_path, ids=None, classes=CLASSES, category_ids=CATEGORY_IDS):
    image_ids = sorted(SIZES) if ids is None else ids
    return SimpleNamespace(coco=load_gt(tmp_path), ids=[str(i) for i in image_ids],
                           image_ids=image_ids, classes=list(classes),
                           category_ids=list(category_ids), split="val")


def _write(folder, dets, task="instance", force=False):
    manifest = {"task": task, "classes": CLASSES, "category_ids": CATEGORY_IDS,
                "model_sha256": "ab" * 32, "split": "val", "preprocess": {"size": [64, 64]}}
    with DetectionWriter(folder, manifest, force=force) as writer:
        for img, d in dets.items():
            writer.write(img, d["boxes"], d["scores"], d["labels"],
                         d["masks"] if task == "instance" else None)
    return folder


def test_round_trip_equals_direct_metering(tmp_path):
    dets = make_detections()
    folder = _write(tmp_path / "preds", dets)
    seen = []
    scored = score_detections(folder, _dataset(tmp_path), progress=lambda d, t: seen.append((d, t)))
    direct = fill(CocoMeter(load_gt(tmp_path), CATEGORY_IDS, ("bbox", "segm", "boundary")),
                  dets).summary()
    assert scored.pop("model_sha256") == "ab" * 32
    assert scored == direct
    assert seen[-1] == (4, 4)
    manifest = json.loads((folder / "predictions.json").read_text())
    assert manifest["format"] == "bckd-detections" and manifest["ids"] == ["11", "12", "13", "14"]
    assert [d.image_id for d in read_detections(folder)] == [11, 12, 13, 14]
    gt = load_gt(tmp_path)
    for iou_type in ("bbox", "segm"):
        with quiet():
            res = gt.loadRes(str(folder / f"results_{iou_type}.json"))
        assert len(res.anns) == direct["detections"]


def test_detect_folder_has_boxes_only(tmp_path):
    dets = make_detections()
    folder = _write(tmp_path / "preds", dets, task="detect")
    assert not (folder / "results_segm.json").exists()
    scored = score_detections(folder, _dataset(tmp_path), backend="pycocotools")
    direct = fill(CocoMeter(load_gt(tmp_path), CATEGORY_IDS, backend="pycocotools"), dets)
    assert scored["box_ap"] == direct.summary()["box_ap"] and "mask_ap" not in scored


def test_bad_folders_are_one_line_errors(tmp_path):
    dets = make_detections()
    folder = _write(tmp_path / "preds", dets)
    with pytest.raises(BckdError, match="not in split 'val'"):
        score_detections(folder, _dataset(tmp_path, ids=[11, 12]))
    with pytest.raises(BckdError, match="classes"):
        score_detections(folder, _dataset(tmp_path, classes=["a", "b", "c"]))
    with pytest.raises(BckdError, match="category ids"):
        score_detections(folder, _dataset(tmp_path, category_ids=[1, 3, 8]))
    with pytest.raises(BckdError, match="already exists"):
        _write(folder, dets)
    with pytest.raises(BckdError, match="no predictions.json"):
        score_detections(tmp_path / "nowhere", _dataset(tmp_path))
    lines = (folder / "detections.jsonl").read_text().splitlines()
    (folder / "detections.jsonl").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(BckdError, match="truncated"):
        score_detections(folder, _dataset(tmp_path))
    manifest = json.loads((folder / "predictions.json").read_text())
    (folder / "predictions.json").write_text(json.dumps(dict(manifest, format="bckd-predictions")))
    with pytest.raises(BckdError, match="not a bckd detections manifest"):
        score_detections(folder, _dataset(tmp_path))
    # forced rewrite of a detect run over an instance one: no stale segm results survive
    _write(folder, dets, task="detect", force=True)
    assert not (folder / "results_segm.json").exists()
    assert score_detections(folder, _dataset(tmp_path))["images"] == 4


def test_interrupted_write_leaves_no_manifest(tmp_path):
    dets = make_detections()
    manifest = {"task": "detect", "classes": CLASSES, "category_ids": CATEGORY_IDS}
    with pytest.raises(RuntimeError):
        with DetectionWriter(tmp_path / "p", manifest) as writer:
            d = dets[11]
            writer.write(11, d["boxes"], d["scores"], d["labels"])
            raise RuntimeError("device lost")
    assert not (tmp_path / "p" / "predictions.json").exists()
    with pytest.raises(BckdError, match="not a finished"):
        score_detections(tmp_path / "p", _dataset(tmp_path))
