"""report.html: self-contained, with the three figures; the Pareto front; the progress helper."""
from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest

from runtime.report import new_report, validate_row, write_report
from runtime.report_html import (
    FirstMaps,
    MaskExamples,
    boundary_errors,
    nice_ticks,
    pareto_front,
    render_html,
)
from runtime.progress import Progress

PALETTE = [[0, 0, 0], [230, 25, 75], [60, 180, 75]]
K = 3

VOID = {"meta", "img", "br", "hr", "link", "input", "source"}


def make_row(model, method, backend, precision, miou, p50):
    lat = {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.3, "mean": p50 * 1.05,
           "std": p50 * 0.05, "min": p50 * 0.9, "max": p50 * 1.5}
    hist = {"edges_ms": [p50 * (0.9 + 0.12 * k) for k in range(6)], "counts": [3, 30, 10, 0, 1]}
    return {"model": model, "method": method, "arch": "resnet18-pspnet-w0.25", "backend": backend,
            "precision": precision, "miou": miou, "boundary_f": 50.0, "lhd": 1.2,
            "latency_ms": lat, "latency_histogram": hist, "fps": 1000 / lat["mean"],
            "size_mb": 1.0}


ROWS = [make_row("teacher", "none", "onnxruntime", "fp32", 70.0, 20.0),
        make_row("student", "none", "onnxruntime", "fp32", 55.0, 5.0),
        make_row("student", "kd", "onnxruntime", "fp32", 58.0, 5.0),
        make_row("student", "bckd", "onnxruntime", "fp32", 62.0, 5.1),
        make_row("student", "bckd", "openvino", "fp32", 62.0, 3.0),
        make_row("student", "bckd", "onnxruntime", "int8", 61.0, 4.0),
        make_row("student", "bckd", "openvino", "int8", 61.5, 2.0)]


class FakeDataset:
    """Three 16x16 images: two vertical stripes of classes 1 and 2, an ignore pixel in one."""

    palette = PALETTE
    ids = ["a", "b", "c", "d"]

    def __len__(self):
        return len(self.ids)

    def load(self, i):
        mask = np.ones((16, 16), dtype=np.uint8)
        mask[:, 8 + i % 3:] = 2
        mask[0, 0] = 255
        img = np.full((16, 16, 3), 40 * i, dtype=np.uint8)
        return img, mask


class FakePre:
    size = (16, 16)
    ignore_index = 255

    def mask(self, m):
        return m.astype(np.int64)


def make_examples(rows=ROWS, k=K):
    ex = MaskExamples(k)
    ds = FakeDataset()
    for j, row in enumerate(rows):
        keep = ex.writer()  # as in the pipeline: the writer comes first, then load()
        ex.load(ds, FakePre())
        for i in range(len(ds)):  # evaluate_runner writes every image; only k are kept
            pred = ds.load(i)[1].astype(np.int64)
            pred[pred == 255] = 1
            pred[:, j % 4] = 2  # a spurious stripe, different per row
            keep.write(ds.ids[i], pred)
        keep.close()
        ex.add(row, keep)
    return ex


class TagCollector(HTMLParser):
    """Every start tag with its attributes; fails on mismatched closing tags."""

    def __init__(self):
        super().__init__()
        self.tags, self.stack = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()


def parse(page: str) -> TagCollector:
    p = TagCollector()
    p.feed(page)
    p.close()
    assert p.stack == []
    return p


def classes(attrs):
    return set((attrs.get("class") or "").split())


# -- Pareto ------------------------------------------------------------------------------------
def test_pareto_front_hand_made():
    pts = [(10, 70), (5, 60), (20, 75), (12, 65), (5, 55), (30, 75), (20, 75)]
    # (12,65) loses to (10,70); (5,55) to (5,60); (30,75) to (20,75); equal points both stay.
    assert pareto_front(pts) == [1, 0, 2, 6]
    assert pareto_front([]) == []
    assert pareto_front([(3.0, 1.0)]) == [0]
    assert pareto_front([(1, 50), (2, 40), (3, 30)]) == [0]  # one point dominates all
    assert pareto_front([(1, 10), (2, 20), (3, 30)]) == [0, 1, 2]


def test_pareto_front_of_rows():
    front = pareto_front([(r["latency_ms"]["p50"], r["miou"]) for r in ROWS])
    # openvino int8 fastest, openvino fp32 better and slower, teacher most accurate
    assert front == [6, 4, 0]


def test_nice_ticks_cover_range():
    ticks = nice_ticks(0, 23.7)
    assert ticks[0] == 0 and ticks[-1] >= 23.7 and len(ticks) <= 8
    assert nice_ticks(5, 5)[-1] > 5


# -- the page ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def page():
    report = new_report({"methods": ["none", "kd", "bckd"]},
                        {"name": "fake <data>", "val_split": "val", "val_images": 4,
                         "classes": ["bg", "a", "b"]})
    report["results"] = ROWS
    report["wall_seconds"] = 12.3
    return render_html(report, make_examples())


def test_page_is_self_contained_and_parses(page):
    tags = parse(page).tags
    for tag, attrs in tags:
        for key in ("src", "href", "xlink:href"):
            value = attrs.get(key) or ""
            assert not re.match(r"\s*(https?:)?//", value), (tag, key, value[:60])
        assert tag not in ("script", "link", "iframe"), tag
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,")
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page)  # no CSS fetch either
    assert "@import" not in page
    assert "fake &lt;data&gt;" in page  # user text is escaped


def test_page_has_the_three_figures(page):
    tags = parse(page).tags
    svg_ids = [a.get("id") for t, a in tags if t == "svg"]
    assert svg_ids == ["latency-plot", "pareto-plot"]
    lanes = [a for t, a in tags if t == "g" and "latency-row" in classes(a)]
    assert len(lanes) == len(ROWS)
    bars = [a for t, a in tags if t == "rect" and "hist-bar" in classes(a)]
    assert len(bars) == 4 * len(ROWS)  # the empty bin draws nothing
    points = [a for t, a in tags if t == "g" and "point" in classes(a)]
    assert len(points) == len(ROWS)
    assert sum("on-front" in classes(a) for a in points) == 3
    assert [t for t, a in tags if "pareto-front" in classes(a)] == ["polyline"]
    for svg in re.findall(r"<svg.*?</svg>", page, flags=re.S):
        ET.fromstring(svg)  # each plot is well-formed XML
    assert "BCKD INT8 · openvino" in page  # points and lanes are labelled
    # masks: K images x (input + ground truth + teacher, no-KD, KD, BCKD, BCKD INT8)
    assert [a.get("id") for t, a in tags if t == "figure"] == ["masks"]
    imgs = [a for t, a in tags if t == "img" and "mask-image" in classes(a)]
    assert len(imgs) == K * (2 + 5)
    heads = re.search(r'<table class="masks"><thead>(.*?)</thead>', page).group(1)
    assert re.findall(r"<th>([^<]+)</th>", heads) == [
        "input", "ground truth", "teacher", "no-KD", "KD", "BCKD", "BCKD INT8"]


def test_page_without_examples_says_so():
    report = new_report({}, {"name": "x"})
    report["results"] = ROWS[:2]
    page = render_html(report)
    parse(page)
    assert 'id="masks"' in page and "<img" not in page
    assert 'id="latency-plot"' in page and 'id="pareto-plot"' in page


def test_write_report_writes_html_and_valid_json(tmp_path):
    report = new_report({}, {"name": "x", "val_split": "val", "val_images": 4})
    report["results"] = ROWS
    paths = write_report(tmp_path, report, make_examples(k=2))
    assert [p.name for p in paths] == ["report.json", "report.md", "report.html"]
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["schema"] == "bckd.report" and data["schema_version"] == 3
    assert "numpy" in data["versions"] and data["versions"]["numpy"]
    for row in data["results"]:
        validate_row(row)
    html = (tmp_path / "report.html").read_text()
    assert html.count('class="mask-image"') == 2 * 7


# -- masks -------------------------------------------------------------------------------------
def test_boundary_errors_mark_spurious_and_missed():
    target = np.zeros((20, 20), dtype=np.int64)
    target[:, 10:] = 1
    spurious, missed = boundary_errors(target.copy(), target, 255)
    assert not spurious.any() and not missed.any()
    pred = np.zeros_like(target)
    pred[:, 16:] = 1  # the edge 6 px off: beyond the 3 px tolerance both ways
    spurious, missed = boundary_errors(pred, target, 255)
    assert spurious[:, 15:17].all() and not spurious[:, :15].any()
    assert missed[:, 9:11].all() and not missed[:, 11:].any()
    near = np.zeros_like(target)
    near[:, 12:] = 1  # 2 px off: within tolerance
    assert not any(m.any() for m in boundary_errors(near, target, 255))


def test_first_maps_keep_k_and_columns_dedupe():
    keep = FirstMaps(2)
    for i in range(5):
        keep.write(str(i), np.full((4, 4), i))
    assert [int(m[0, 0]) for m in keep.maps] == [0, 1] and keep.maps[0].dtype == np.uint8
    ex = make_examples()
    assert [label for label, _ in ex.columns()] == ["teacher", "no-KD", "KD", "BCKD", "BCKD INT8"]
    ex.add(make_row("student", "dkd", "onnxruntime", "fp32", 1, 1), [np.zeros((8, 8))] * K)
    assert len(ex.columns()) == 5  # maps of another size are left out, not mis-drawn


# -- progress ----------------------------------------------------------------------------------
def test_progress_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    with Progress("[eval] x", 16, stream=out, every=3600) as bar:
        for done in (8, 16):
            bar(done, 16)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[eval] x 16/16 img (100%")
    assert "\r" not in out.getvalue()


def test_progress_live_bar_redraws_in_place(monkeypatch):
    import runtime.progress as progress

    monkeypatch.setattr(progress, "_tqdm_bar", lambda *a: None)  # the built-in bar
    out = io.StringIO()
    with Progress("[calib]", 4, stream=out, live=True) as bar:
        bar.update(2)
        bar.update(2)
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and "[####" in text


def test_progress_failed_step_writes_no_final_line():
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with Progress("x", 4, stream=out):
            raise RuntimeError
    assert out.getvalue() == ""


def test_draw_detections_outlines_boxes_and_fills_masks_in_class_colours():
    from runtime.report_html import draw_detections

    img = np.zeros((10, 12, 3), np.uint8)
    mask = np.zeros((1, 10, 12), np.uint8)
    mask[0, 6:9, 1:4] = 1
    dets = {"boxes": np.array([[2.0, 1.0, 6.0, 4.0]]), "labels": np.array([1]), "masks": None}
    pic = draw_detections(img, dets, PALETTE, scale=2)
    assert pic.shape == (20, 24, 3)
    assert tuple(pic[2, 4]) == tuple(PALETTE[1]) and tuple(pic[7, 11]) == tuple(PALETTE[1])
    assert tuple(pic[4, 6]) == (0, 0, 0)  # inside the box, not on its outline
    filled = draw_detections(img, {"boxes": np.zeros((0, 4)), "labels": np.array([2]),
                                   "masks": mask}, PALETTE, scale=1)
    assert tuple(filled[7, 2]) == tuple(round(0.45 * c) for c in PALETTE[2])
    assert tuple(filled[0, 0]) == (0, 0, 0)


def test_detection_examples_page_draws_each_row_and_ground_truth():
    from runtime.report_html import DetectionExamples

    class Coco:
        ids = ["a", "b"]
        palette = PALETTE
        classes = ["background", "disc", "box"]

        def __len__(self):
            return 2

        def load(self, i):
            t = {"boxes": np.array([[1, 1, 8, 8], [0, 0, 16, 16]], np.float32),
                 "labels": np.array([1, 2]), "masks": None,
                 "iscrowd": np.array([False, True])}
            return np.full((16, 16, 3), 90, np.uint8), t

    ex = DetectionExamples(2)
    rows = ROWS[:2]
    for j, row in enumerate(rows):
        keep = ex.writer()
        ex.load(Coco(), None)
        for i in range(2):
            keep.write(str(i), {"boxes": np.array([[1, 1, 8, 8], [2, 2, 4, 4]], np.float32),
                                "scores": np.array([0.9, 0.1]), "labels": np.array([1, 2]),
                                "masks": None, "image_id": i})
        ex.add(row, keep)
    assert [len(d["boxes"]) for d in ex.entries[0][1]] == [1, 1]  # below DRAW_SCORE dropped
    report = new_report({}, {"name": "x", "val_split": "val", "val_images": 2})
    report["task"] = "detect"
    report["results"] = [dict(r, task="detect", box_ap=10.0, box_ap50=20.0) for r in rows]
    page = render_html(report, ex)
    imgs = [a for t, a in parse(page).tags if t == "img"]
    assert len(imgs) == 2 * (2 + len(ex.columns()))
    assert "1 objects" in page and "1 detections" in page and "COCO AP" in page
