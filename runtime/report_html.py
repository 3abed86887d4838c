"""report.html: one self-contained page people read — summary, results, plots and example masks.

Nothing in the page is fetched: the CSS is inline, the plots are SVG drawn here (no plotting
library), and the mask images are PNG ``data:`` URIs (Pillow). It holds

* the run summary (host, package versions, dataset, wall time) and the results table of report.md;
* ``#latency-plot``: per row (backend / precision) a box-and-whisker lane on one shared ms axis —
  whiskers min to max, box p50 to p90, a p99 tick, the mean as a dot with ±std;
* ``#pareto-plot``: mIoU against p50 latency, every row a labelled point, the Pareto front
  (no other row is both faster and at least as accurate) drawn as a staircase;
* ``#masks``: for the first few validation images, the input, the ground truth and the
  prediction of each (model, method, precision) in the palette of the dataset, with boundary
  errors on top: magenta where a predicted boundary has no ground-truth boundary within the
  tolerance (spurious), cyan where a ground-truth boundary has no predicted one (missed).

The masks live only in memory (:class:`MaskExamples`, filled during evaluation); rendered from
report.json alone the page says so instead of showing them.
"""
from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Sequence

import numpy as np

from runtime.boundary import boundary_f_score, boundary_map, distance_within
from runtime.lazy import require

EXAMPLE_IMAGES = 4
BOUNDARY_TOLERANCE = 3.0  # px, the boundary F tolerance of the report rows
SPURIOUS = (255, 0, 255)
MISSED = (0, 255, 255)
IGNORE_COLOUR = (255, 255, 255)
DIM = 0.55  # predictions are darkened so that the error colours stand out on any palette
SERIES = ("#6b6b6b", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
METHOD_NAMES = {"none": "no-KD"}


# -- labels ----------------------------------------------------------------------------------
def short_label(row: dict[str, Any]) -> str:
    """'teacher', 'no-KD', 'KD', 'BCKD', with the precision when it is not fp32."""
    name = "teacher" if row["model"] == "teacher" else METHOD_NAMES.get(
        row["method"], row["method"].upper())
    return name if row["precision"] == "fp32" else f"{name} {row['precision'].upper()}"


def row_label(row: dict[str, Any]) -> str:
    """The short label plus the backend: one name per report row."""
    return f"{short_label(row)} · {row['backend']}"


def _series(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One colour per (model, method), in order of first appearance."""
    keys: dict[tuple[str, str], str] = {}
    for r in rows:
        keys.setdefault((r["model"], r["method"]), SERIES[len(keys) % len(SERIES)])
    return [keys[(r["model"], r["method"])] for r in rows]


# -- Pareto front ----------------------------------------------------------------------------
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, accuracy) points no other point dominates, fastest first.

    A point dominates another when it is no slower and no less accurate, and better in one of
    the two. Equal points do not dominate each other, so both stay on the front.
    """
    def dominated(i: int) -> bool:
        lat, acc = points[i]
        return any(l2 <= lat and a2 >= acc and (l2 < lat or a2 > acc) for l2, a2 in points)

    front = [i for i in range(len(points)) if not dominated(i)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


# -- SVG helpers -----------------------------------------------------------------------------
def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    n = int(math.ceil((hi - first) / step - 1e-9))
    return [round(first + k * step, 10) for k in range(n + 1)]


def _num(v: float) -> str:
    return f"{v:.1f}"


def _tick(v: float) -> str:
    return f"{v:g}"


def _seg(cls: str, x1: float, y1: float, x2: float, y2: float) -> str:
    return (f'<line class="{cls}" x1="{_num(x1)}" y1="{_num(y1)}" '
            f'x2="{_num(x2)}" y2="{_num(y2)}"/>')


class _Scale:
    """Maps data values in [lo, hi] onto pixels [a, b]."""

    def __init__(self, lo: float, hi: float, a: float, b: float) -> None:
        self.lo, self.hi, self.a, self.b = lo, hi, a, b

    def __call__(self, v: float) -> float:
        return self.a + (v - self.lo) / (self.hi - self.lo) * (self.b - self.a)


def _x_axis(ticks: list[float], sx: _Scale, y: float, top: float, label: str) -> list[str]:
    out = [_seg("axis", sx.a, y, sx.b, y)]
    for t in ticks:
        out.append(_seg("grid", sx(t), top, sx(t), y))
        out.append(f'<text class="tick" x="{_num(sx(t))}" y="{_num(y + 14)}" '
                   f'text-anchor="middle">{_tick(t)}</text>')
    out.append(f'<text class="axis-label" x="{_num((sx.a + sx.b) / 2)}" y="{_num(y + 30)}" '
               f'text-anchor="middle">{html.escape(label)}</text>')
    return out


def _latency_range(rows: Sequence[dict[str, Any]]) -> tuple[float, float]:
    lat = [r["latency_ms"] for r in rows]
    hi = max(max(v for k, v in s.items() if k in ("max", "p99", "mean") and v is not None)
             for s in lat)
    return 0.0, hi * 1.02


# -- latency plot ----------------------------------------------------------------------------
def latency_svg(rows: Sequence[dict[str, Any]], width: int = 820) -> str:
    """Box-and-whisker lanes of every row's latency statistics on one shared ms axis."""
    if not rows:
        return '<svg id="latency-plot" class="plot" width="0" height="0"></svg>'
    lane, left, right, top = 30, 220, 20, 10
    height = top + lane * len(rows) + 44
    lo, hi = _latency_range(rows)
    ticks = nice_ticks(lo, hi)
    sx = _Scale(ticks[0], ticks[-1], left, width - right)
    bottom = top + lane * len(rows)
    parts = [f'<svg id="latency-plot" class="plot" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="latency distribution per backend and precision">']
    parts += _x_axis(ticks, sx, bottom, top, "latency per call (ms), batch as in the table")
    for i, (row, colour) in enumerate(zip(rows, _series(rows))):
        parts.append(_latency_lane(row, colour, sx, top + lane * i + lane / 2, left))
    parts.append("</svg>")
    return "\n".join(parts)


def _latency_lane(row: dict[str, Any], colour: str, sx: _Scale, y: float, left: int) -> str:
    s = row["latency_ms"]
    p50, p90, p99 = s["p50"], s["p90"], s["p99"]
    lo, hi = s.get("min", p50), s.get("max", p99)
    tip = ", ".join(f"{k} {s[k]:.3f}" for k in ("min", "p50", "p90", "p99", "max", "mean", "std")
                    if s.get(k) is not None)
    e = [f'<g class="latency-row" data-label="{html.escape(row_label(row))}">',
         f"<title>{html.escape(row_label(row))}: {tip} ms</title>",
         f'<text class="lane-label" x="{left - 8}" y="{_num(y + 4)}" text-anchor="end">'
         f"{html.escape(row_label(row))}</text>",
         *_histogram_bars(row.get("latency_histogram"), colour, sx, y),
         _seg("whisker", sx(lo), y, sx(hi), y)]
    e += [_seg("whisker", sx(v), y - 5, sx(v), y + 5) for v in (lo, hi)]
    e.append(f'<rect class="box" x="{_num(sx(p50))}" y="{_num(y - 7)}" '
             f'width="{_num(max(sx(p90) - sx(p50), 1))}" height="14" fill="{colour}"/>')
    e.append(_seg("median", sx(p50), y - 8, sx(p50), y + 8))
    e.append(_seg("p99", sx(p99), y - 8, sx(p99), y + 8))
    if s.get("mean") is not None:
        std = s.get("std") or 0.0
        e.append(_seg("std", sx(max(s["mean"] - std, 0)), y + 10, sx(s["mean"] + std), y + 10))
        e.append(f'<circle class="mean" cx="{_num(sx(s["mean"]))}" cy="{_num(y + 10)}" r="2.5"/>')
    e.append("</g>")
    return "\n".join(e)


def _histogram_bars(hist: dict[str, list] | None, colour: str, sx: _Scale, y: float,
                    half: float = 12.0) -> list[str]:
    """The row's sample histogram as a violin-like strip behind its box (tallest bin: ±half)."""
    if not hist or not hist.get("counts"):
        return []
    edges, counts = hist["edges_ms"], hist["counts"]
    top = max(counts) or 1
    bars = []
    for a, b, c in zip(edges, edges[1:], counts):
        if c:
            h = max(half * c / top, 0.75)
            bars.append(f'<rect class="hist-bar" x="{_num(sx(a))}" y="{_num(y - h)}" '
                        f'width="{_num(max(sx(b) - sx(a), 0.5))}" height="{_num(2 * h)}" '
                        f'fill="{colour}"><title>{a:.3f}-{b:.3f} ms: {c} calls</title></rect>')
    return bars


# -- accuracy vs latency ---------------------------------------------------------------------
def _metric(row: dict[str, Any]) -> tuple[str, str]:
    """The headline metric of a row's task: (row key, display name)."""
    from runtime.report import row_task

    task = row_task(row)
    return task.metric, {"miou": "mIoU", "box_ap": "box AP"}.get(task.metric, task.metric)


def pareto_svg(rows: Sequence[dict[str, Any]], width: int = 620, height: int = 380) -> str:
    """mIoU against p50 latency, points labelled, the Pareto front as a staircase."""
    if not rows:
        return '<svg id="pareto-plot" class="plot" width="0" height="0"></svg>'
    left, right, top, bottom = 56, 150, 14, 46
    metric, name = _metric(rows[0])
    pts = [(r["latency_ms"]["p50"], r[metric]) for r in rows]
    xt = nice_ticks(0.0, max(p[0] for p in pts) * 1.05)
    ys = [p[1] for p in pts]
    yt = nice_ticks(max(min(ys) - 2, 0.0), min(max(ys) + 2, 100.0), 5)
    sx = _Scale(xt[0], xt[-1], left, width - right)
    sy = _Scale(yt[0], yt[-1], height - bottom, top)
    parts = [f'<svg id="pareto-plot" class="plot" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{name} against p50 latency with the Pareto front">']
    parts += _x_axis(xt, sx, height - bottom, top, "p50 latency (ms)")
    parts += _y_axis(yt, sy, sx, f"{name} (%)")
    front = pareto_front(pts)
    parts.append(_staircase([(sx(pts[i][0]), sy(pts[i][1])) for i in front]))
    xy = [(sx(x), sy(y)) for x, y in pts]
    spots = _label_spots(xy, [row_label(r) for r in rows], (0, 0, width, height))
    for i, (row, colour) in enumerate(zip(rows, _series(rows))):
        parts.append(_point(row, colour, xy[i], spots[i], i in front))
    parts.append("</svg>")
    return "\n".join(parts)


def _y_axis(ticks: list[float], sy: _Scale, sx: _Scale, label: str) -> list[str]:
    out = [_seg("axis", sx.a, sy.a, sx.a, sy.b)]
    for t in ticks:
        out.append(_seg("grid", sx.a, sy(t), sx.b, sy(t)))
        out.append(f'<text class="tick" x="{_num(sx.a - 6)}" y="{_num(sy(t))}" text-anchor="end" '
                   f'dominant-baseline="middle">{_tick(t)}</text>')
    mid = (sy.a + sy.b) / 2
    out.append(f'<text class="axis-label" x="14" y="{_num(mid)}" text-anchor="middle" '
               f'transform="rotate(-90 14 {_num(mid)})">{html.escape(label)}</text>')
    return out


def _staircase(xy: list[tuple[float, float]]) -> str:
    """The front from the fastest point: across to the next point's latency, then up to it."""
    path = [xy[0]]
    for (x0, y0), (x1, y1) in zip(xy, xy[1:]):
        path += [(x1, y0), (x1, y1)]
    points = " ".join(f"{_num(x)},{_num(y)}" for x, y in path)
    return f'<polyline class="pareto-front" points="{points}"/>'


def _point(row: dict[str, Any], colour: str, xy: tuple[float, float],
           spot: tuple[float, float, str], on_front: bool) -> str:
    (x, y), (lx, ly, anchor) = xy, spot
    cls = "point on-front" if on_front else "point"
    label = html.escape(row_label(row))
    if row["precision"] != "fp32":  # reduced precision: a square
        mark = f'<rect x="{_num(x - 4)}" y="{_num(y - 4)}" width="8" height="8" fill="{colour}"/>'
    else:
        mark = f'<circle cx="{_num(x)}" cy="{_num(y)}" r="4.5" fill="{colour}"/>'
    # a label moved off its point gets a leader line back to it
    leader = "" if abs(ly - 4 - y) < 1 else _seg("leader", x, y, lx, ly - 4)
    metric, name = _metric(row)
    return (f'<g class="{cls}"><title>{label}: {name} {row[metric]:.2f} %, p50 '
            f'{row["latency_ms"]["p50"]:.3f} ms</title>{leader}{mark}'
            f'<text class="point-label" x="{_num(lx)}" y="{_num(ly)}" '
            f'text-anchor="{anchor}">{label}</text></g>')


CHAR_PX = 6.3  # rough advance of an 11 px sans-serif character, for label placement


def _label_spots(xy: list[tuple[float, float]], labels: list[str],
                 bounds: tuple[float, float, float, float]) -> list[tuple[float, float, str]]:
    """Where each point's label goes: greedily the first spot (right or left of the point, then
    further down / up) whose box clears the labels placed so far, every marker, and the edges."""
    markers = [(x - 5, y - 5, x + 5, y + 5) for x, y in xy]
    boxes: list[tuple[float, float, float, float]] = []
    spots = []
    for (x, y), text in zip(xy, labels):
        w = CHAR_PX * len(text)
        options = [(x + 8, y + 4 + dy, "start", (x + 8, y - 5 + dy, x + 8 + w, y + 5 + dy))
                   for dy in (0, 12, -12, 24, -24, 36, -36)]
        options[1:1] = [(x - 8, y + 4, "end", (x - 8 - w, y - 5, x - 8, y + 5))]
        fits = [o for o in options if _inside(o[3], bounds)
                and not any(_overlap(o[3], b) for b in boxes + markers)]
        lx, ly, anchor, box = (fits or options)[0]
        boxes.append(box)
        spots.append((lx, ly, anchor))
    return spots


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _inside(a: tuple[float, ...], bounds: tuple[float, ...]) -> bool:
    return a[0] >= bounds[0] and a[1] >= bounds[1] and a[2] <= bounds[2] and a[3] <= bounds[3]


# -- masks -----------------------------------------------------------------------------------
class FirstMaps:
    """Keeps the first ``k`` predicted label maps of an evaluation, in memory.

    It has the writer interface of :func:`runtime.evaluate.evaluate_runner` (``write``, ``close``),
    so the maps come from the evaluation pass itself, at no extra inference.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.maps: list[np.ndarray] = []

    def write(self, image_id: str, pred: np.ndarray) -> None:
        if len(self.maps) < self.k:
            self.maps.append(np.asarray(pred).astype(np.uint8 if pred.max(initial=0) < 256
                                                     else np.int32))

    def close(self) -> None:
        pass


class MaskExamples:
    """The first ``k`` validation images at the network input size, their ground truth, and the
    predictions of each measured row, kept in memory for the #masks figure.

    ``entries`` holds (report row, label maps) in the order the rows were measured; the images
    are read on the first :meth:`load`.
    """

    def __init__(self, k: int = EXAMPLE_IMAGES) -> None:
        self.k = k
        self.images: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.ids: list[str] = []
        self.palette: list[list[int]] = []
        self.ignore_index = 255
        self.entries: list[tuple[dict[str, Any], list[np.ndarray]]] = []

    def load(self, dataset: Any, preprocess: Any) -> None:
        """Read the first ``k`` images of ``dataset`` as the network sees them (once)."""
        from runtime.data.preprocess import resize_image

        if self.images:
            return
        pairs = [dataset.load(i) for i in range(min(self.k, len(dataset)))]
        self.images = [resize_image(img, preprocess.size) for img, _ in pairs]
        self.targets = [preprocess.mask(m) for _, m in pairs]
        self.ids = [str(dataset.ids[i]) for i in range(len(pairs))]
        self.palette = [list(c) for c in dataset.palette]
        self.ignore_index = int(preprocess.ignore_index)

    def writer(self) -> FirstMaps:
        """A writer for one evaluation; it may start before :meth:`load` has read the images."""
        return FirstMaps(self.k)

    def add(self, row: dict[str, Any], maps: FirstMaps | list[np.ndarray]) -> None:
        self.entries.append((row, list(getattr(maps, "maps", maps))))

    def columns(self) -> list[tuple[str, list[np.ndarray]]]:
        """One column per (model, method, precision): the first backend measured stands for it."""
        seen: dict[tuple[str, str, str], tuple[str, list[np.ndarray]]] = {}
        for row, maps in self.entries:
            key = (row["model"], row["method"], row["precision"])
            if key not in seen and self._fits(maps):
                seen[key] = (short_label(row), maps)
        return list(seen.values())

    def _fits(self, maps: list[Any]) -> bool:
        """A row's predictions cover every example image (label maps at the targets' size)."""
        return len(maps) == len(self.targets) and all(
            m.shape == t.shape for m, t in zip(maps, self.targets))

    def html(self) -> str:
        """The #masks figure of these examples."""
        return masks_html(self)


def colourize(labels: np.ndarray, palette: Sequence[Sequence[int]],
              ignore_index: int) -> np.ndarray:
    """uint8 HxWx3 picture of a label map; ignore (and unknown) labels are white."""
    lut = np.tile(np.array(IGNORE_COLOUR, dtype=np.uint8), (max(256, len(palette)), 1))
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    lut[ignore_index % len(lut)] = IGNORE_COLOUR
    return lut[np.clip(labels, 0, len(lut) - 1)]


def boundary_errors(pred: np.ndarray, target: np.ndarray, ignore_index: int,
                    tolerance: float = BOUNDARY_TOLERANCE) -> tuple[np.ndarray, np.ndarray]:
    """(spurious, missed) bool maps: predicted boundary pixels with no ground-truth boundary within
    ``tolerance`` px, and ground-truth boundary pixels with no predicted one (runtime.boundary
    conventions: ignore pixels of the target are ignore in the prediction too)."""
    pred = np.where(target == ignore_index, ignore_index, pred)
    bp, bt = boundary_map(pred, ignore_index), boundary_map(target, ignore_index)
    spurious = bp & ~(distance_within(bt, tolerance) <= tolerance)
    missed = bt & ~(distance_within(bp, tolerance) <= tolerance)
    return spurious, missed


def error_picture(pred: np.ndarray, target: np.ndarray, palette: Sequence[Sequence[int]],
                  ignore_index: int) -> np.ndarray:
    """The prediction in the palette, darkened, with spurious and missed boundaries on top."""
    rgb = (colourize(pred, palette, ignore_index) * DIM).astype(np.uint8)
    spurious, missed = boundary_errors(pred, target, ignore_index)
    rgb[missed] = MISSED
    rgb[spurious] = SPURIOUS
    return rgb


def png_data_uri(rgb: np.ndarray) -> str:
    Image = require("PIL.Image", "the images of report.html")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG",
                                                                    optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(rgb: np.ndarray, alt: str, cls: str = "mask-image") -> str:
    return f'<img class="{cls}" src="{png_data_uri(rgb)}" alt="{html.escape(alt)}">'


def masks_html(examples: MaskExamples | None) -> str:
    """The #masks figure: one row per image; input, ground truth, then each prediction."""
    if examples is None or not examples.images:
        return ('<p id="masks" class="note">No example masks: this page was rendered from '
                "report.json alone (they are kept in memory during <code>bckd run</code>).</p>")
    cols = examples.columns()
    titles = ["input", "ground truth"] + [label for label, _ in cols]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in titles)
    body = []
    for i, (img, tgt) in enumerate(zip(examples.images, examples.targets)):
        name = examples.ids[i] if i < len(examples.ids) else str(i)
        gt = colourize(tgt, examples.palette, examples.ignore_index)
        cells = [_img(img, f"{name} input"), _img(gt, f"{name} ground truth")]
        for label, maps in cols:
            f = boundary_f_score(maps[i], tgt, tolerance=BOUNDARY_TOLERANCE,
                                 ignore_index=examples.ignore_index)["f"]
            pic = error_picture(maps[i], tgt, examples.palette, examples.ignore_index)
            cells.append(_img(pic, f"{name} {label}") + f'<div class="cap">bF {100 * f:.1f}%</div>')
        body.append(f"<tr><th class=\"img-id\">{html.escape(name)}</th>"
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (f'<figure id="masks"><table class="masks"><thead><tr><th></th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table><figcaption>Predictions are darkened; '
            f'<span class="sw" style="background:rgb{SPURIOUS}"></span> spurious boundary (no '
            f"ground-truth boundary within {BOUNDARY_TOLERANCE:g} px), "
            f'<span class="sw" style="background:rgb{MISSED}"></span> missed ground-truth '
            "boundary. "
            "White is the ignore label. bF: this image's boundary F-score "
            f"({BOUNDARY_TOLERANCE:g} px).</figcaption></figure>")


# -- detections ------------------------------------------------------------------------------
DRAW_SCORE = 0.3  # detections drawn in the #masks figure: score at least this
DRAW_SCALE = 2  # the original image is drawn this many times larger (nearest), boxes on top
MASK_ALPHA = 0.45


class FirstDetections:
    """Keeps the detections scoring >= :data:`DRAW_SCORE` of the first ``k`` images of an
    evaluation (the writer interface of :func:`runtime.evaluate.evaluate_runner`)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.maps: list[dict[str, Any]] = []

    def write(self, image_id: str, pred: dict[str, Any]) -> None:
        if len(self.maps) < self.k:
            keep = np.asarray(pred["scores"]) >= DRAW_SCORE
            self.maps.append({k: np.asarray(v)[keep] for k, v in pred.items()
                              if k in ("boxes", "scores", "labels", "masks") and v is not None})

    def close(self) -> None:
        pass


class DetectionExamples(MaskExamples):
    """The first ``k`` validation images at their original size, their ground-truth boxes (and
    masks), and each measured row's detections, for the #masks figure of detect / instance."""

    def load(self, dataset: Any, preprocess: Any) -> None:
        if self.images:
            return
        pairs = [dataset.load(i) for i in range(min(self.k, len(dataset)))]
        self.images = [img for img, _ in pairs]
        self.targets = [{k: t[k] for k in ("boxes", "labels", "masks", "iscrowd")}
                        for _, t in pairs]
        self.ids = [str(dataset.ids[i]) for i in range(len(pairs))]
        self.palette = [list(c) for c in dataset.palette]
        self.classes = list(dataset.classes)

    def writer(self) -> FirstDetections:  # type: ignore[override]
        return FirstDetections(self.k)

    def _fits(self, dets: list[Any]) -> bool:
        return len(dets) == len(self.images)

    def html(self) -> str:
        if not self.images:
            return masks_html(None)
        cols = self.columns()
        titles = ["input", "ground truth"] + [label for label, _ in cols]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in titles)
        body = []
        for i, (img, tgt) in enumerate(zip(self.images, self.targets)):
            name = self.ids[i]
            real = ~np.asarray(tgt["iscrowd"], bool)
            gt = {"boxes": tgt["boxes"][real], "labels": tgt["labels"][real],
                  "masks": None if tgt["masks"] is None else tgt["masks"][real]}
            cells = [_det_img(draw_detections(img, {}, self.palette), f"{name} input"),
                     _det_img(draw_detections(img, gt, self.palette), f"{name} ground truth")
                     + f'<div class="cap">{len(gt["boxes"])} objects</div>']
            for label, dets in cols:
                d = dets[i]
                cells.append(_det_img(draw_detections(img, d, self.palette), f"{name} {label}")
                             + f'<div class="cap">{len(d.get("boxes", ()))} detections</div>')
            body.append(f"<tr><th class=\"img-id\">{html.escape(name)}</th>"
                        + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        legend = " ".join(
            f'<span class="sw" style="background:rgb{tuple(self.palette[c])}"></span> '
            f"{html.escape(n)}" for c, n in enumerate(self.classes) if c < len(self.palette))
        return (f'<figure id="masks"><table class="masks"><thead><tr><th></th>{head}</tr>'
                f'</thead><tbody>{"".join(body)}</tbody></table><figcaption>Boxes (and masks, '
                f"filled at {MASK_ALPHA:g} opacity) in the colour of their class: {legend}. "
                f"Detections with score &ge; {DRAW_SCORE:g}; crowd regions are not drawn. Images "
                f"drawn {DRAW_SCALE}&times; their size.</figcaption></figure>")


def draw_detections(image: np.ndarray, dets: dict[str, Any],
                    palette: Sequence[Sequence[int]], scale: int = DRAW_SCALE) -> np.ndarray:
    """uint8 RGB picture: ``image`` enlarged ``scale`` times (nearest), each mask filled and each
    box outlined in its label's palette colour (boxes in original pixels, xyxy)."""
    Image = require("PIL.Image", "the images of report.html")
    ImageDraw = require("PIL.ImageDraw", "the images of report.html")
    rgb = np.repeat(np.repeat(np.asarray(image, np.uint8), scale, 0), scale, 1).astype(np.float32)
    colours = np.asarray(palette, np.float32).reshape(-1, 3)
    labels = np.asarray(dets.get("labels", ()), int)
    masks = dets.get("masks")
    if masks is not None:
        for m, c in zip(masks, labels):
            big = np.repeat(np.repeat(np.asarray(m, bool), scale, 0), scale, 1)
            rgb[big] = (1 - MASK_ALPHA) * rgb[big] + MASK_ALPHA * colours[c % len(colours)]
    pic = Image.fromarray(rgb.round().astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    for box, c in zip(np.asarray(dets.get("boxes", np.zeros((0, 4))), float), labels):
        x1, y1, x2, y2 = (box * scale).tolist()
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)],
                       outline=tuple(int(v) for v in colours[c % len(colours)]), width=scale)
    return np.asarray(pic)


def _det_img(rgb: np.ndarray, alt: str) -> str:
    return _img(rgb, alt, "det-image")


EXAMPLES = {"semantic": MaskExamples, "detect": DetectionExamples,
            "instance": DetectionExamples}


def make_examples(task: str, k: int = EXAMPLE_IMAGES) -> MaskExamples:
    """The example figure's collector for ``task``'s predictions."""
    return EXAMPLES.get(task, MaskExamples)(k)


# -- page ------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1100px;
color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table.results{border-collapse:collapse;font-variant-numeric:tabular-nums}
table.results th,table.results td{border:1px solid #ccc;padding:3px 7px;text-align:right}
table.results td:nth-child(-n+5),table.results th:nth-child(-n+5){text-align:left}
dl.summary{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px}
dl.summary dt{font-weight:600}dl.summary dd{margin:0}
.plot text{font-size:11px;fill:#333}.plot .axis-label{font-size:12px}
.plot .point-label,.plot .lane-label{paint-order:stroke;stroke:#fff;stroke-width:3px}
.plot .axis{stroke:#333}.plot .grid{stroke:#e4e4e4}
.plot .hist-bar{opacity:.28}.plot .whisker{stroke:#555;stroke-width:1.2}.plot .box{opacity:.75;stroke:#333}
.plot .median{stroke:#000;stroke-width:2.2}.plot .p99{stroke:#c00;stroke-width:2}
.plot .std{stroke:#777;stroke-width:1}.plot .mean{fill:#000}
.plot .leader{stroke:#999;stroke-width:.8}
.plot .pareto-front{fill:none;stroke:#c00;stroke-width:1.5;stroke-dasharray:5 3}
.plot .on-front circle,.plot .on-front rect{stroke:#c00;stroke-width:2}
table.masks{border-collapse:collapse}table.masks td,table.masks th{padding:2px 4px;
text-align:center;font-weight:normal;font-size:12px;vertical-align:top}
img.mask-image{width:128px;height:auto;image-rendering:pixelated;display:block}
img.det-image{width:192px;height:auto;display:block}
.cap{font-size:11px;color:#555}
.sw{display:inline-block;width:10px;height:10px;border:1px solid #999}
.note{color:#666}
.warn{color:#b00;font-weight:bold}
"""


def _summary(report: dict[str, Any]) -> str:
    host, data = report.get("host", {}), report.get("dataset", {})
    versions = ", ".join(f"{k} {v}" for k, v in (report.get("versions") or {}).items() if v)
    wall = report.get("wall_seconds")
    items = [
        ("created", f"{report.get('created')} (bckd {report.get('bckd_version')})"),
        ("host", f"{host.get('machine')} {host.get('processor')}, {host.get('cpu_count')} cores, "
                 f"{host.get('system', '')} Python {host.get('python')}"),
        ("versions", versions or "-"),
        ("dataset", f"{data.get('name')} — validation split '{data.get('val_split')}', "
                    f"{data.get('val_images')} images, {len(data.get('classes') or [])} classes"),
        ("wall time", "-" if wall is None else f"{wall:.0f} s"),
    ]
    prov = report.get("provenance") or {}
    if prov:
        size = "x".join(map(str, prov.get("input_size") or [])) or "?"
        items.insert(0, ("produced by", f"{prov.get('command')}"
                         + (" (quick)" if prov.get("quick") else "")
                         + f"; input {size}, {prov.get('threads')} threads"))
    if prov:
        from runtime.report import measured_on

        items.insert(1, ("measured on", measured_on(report)))
    rows = "".join(f"<dt>{k}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items)
    return f'<dl class="summary">{rows}</dl>'


def _results_table(report: dict[str, Any]) -> str:
    from runtime.report import table_rows

    header, body = table_rows(report)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
                   for cells in body)
    return f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _glossary(report: dict[str, Any]) -> str:
    from runtime.report import GLOSSARY

    unstable = [r for r in report["results"] if r.get("latency_stable") is False]
    warn = (f'<p class="warn">{len(unstable)} row(s) have UNSTABLE timings (cv above the '
            "threshold): their latency, FPS and speed-up are not to be trusted.</p>"
            if unstable else "")
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in GLOSSARY)
    return warn + f'<dl class="summary">{items}</dl>'


def _metric_note(report: dict[str, Any]) -> str:
    if report.get("task", "semantic") in ("detect", "instance"):
        return ("COCO AP (IoU 0.50:0.95, AP50 at 0.50) in percent on the validation split, "
                "scored in original image pixels")
    return "mIoU, bF in percent on the validation split"


def render_html(report: dict[str, Any], examples: MaskExamples | None = None) -> str:
    """The whole page as one string; needs no network and no file next to it."""
    rows = report["results"]
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>bckd report</title>", f"<style>{CSS}</style></head><body>",
        "<h1>bckd report</h1>", _summary(report),
        "<h2>Results</h2>", _results_table(report),
        f'<p class="note">{_metric_note(report)}; latency single-stream, '
        "threads per row in report.json.</p>", _glossary(report),
        "<h2>Latency per backend and precision</h2>", latency_svg(rows),
        '<p class="note">Whiskers: min to max; box: p50 (black) to p90; red tick: p99; '
        "dot and line below: mean ± std.</p>",
        "<h2>Accuracy against latency</h2>", pareto_svg(rows),
        '<p class="note">Red dashed staircase: the Pareto front (no other row is both faster and '
        "at least as accurate); squares are reduced precision.</p>",
        "<h2>Example predictions</h2>",
        masks_html(None) if examples is None else examples.html(),
        "</body></html>", ""])
