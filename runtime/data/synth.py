"""Procedural scene generator: the built-in demo / test dataset, written in the ``bckd-folder`` format.

Each image is a textured background with a few overlapping objects. Classes differ by *shape* and
*texture family*, never by colour: every instance draws its two texture colours from the same
distribution, and some instances get a plain speckle texture so shape alone must decide them. Thin
wires (1-3 px) cross and pass under objects, rings have holes, and random draw order makes objects
occlude and split each other, so boundary completeness and region connectivity — what BCKD
targets — decide the score. Small "unlabelled" blobs carry the ignore label. It is a demo and test
set, never evidence for claims about real datasets (architecture.md, Data).

Image ``k`` of split ``s`` depends only on ``(seed, s, k)`` (its own ``numpy`` generator), so the
output is byte-identical for the same seed whatever the number of worker processes.

For the detection tasks (``task="detect"`` or ``"instance"``) the same scenes are also written as
COCO instances, ``annotations/instances_{split}.json`` (see :func:`scene_annotations`). Painting
then keeps an instance-id map beside the class map and draws no extra random numbers, so the
pixels stay byte-identical to the semantic dataset of the same seed.
"""
from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from runtime.data.folder import write_dataset_meta
from runtime.errors import BckdError
from runtime.files import staged_dir
from runtime.lazy import require
from runtime.registry import unknown_name_message

GENERATOR_NAME = "bckd-synth"
# Bump whenever a change alters the pixels written for a given (spec, seed).
GENERATOR_VERSION = 1

CLASSES = ("background", "disc", "box", "triangle", "ring", "wire", "cross")
BACKGROUND, DISC, BOX, TRIANGLE, RING, WIRE, CROSS = range(len(CLASSES))
SOLID_CLASSES = (DISC, BOX, TRIANGLE, RING, CROSS)
PALETTE = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
)
IGNORE_INDEX = 255
IGNORE_COLOUR = (255, 255, 255)
SPLITS = ("train", "val")

TASKS = ("semantic", "detect", "instance")
# COCO category id == class index: 1..6 = disc, box, triangle, ring, wire, cross (no background).
CATEGORIES = tuple({"id": c, "name": CLASSES[c], "supercategory": "shape"} for c in range(1, len(CLASSES)))
# Instances (and ignore blobs) whose visible part is smaller than this many pixels are left out of
# the COCO annotations: a sliver of 1-3 px peeking out under an occluder has no recoverable box.
# Their pixels keep their class in the semantic mask.
MIN_INSTANCE_AREA = 4

Range = tuple[float, float]
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class SynthSpec:
    """The generator's knobs; stored in dataset.json with the seed so a dataset can be re-made.

    Lengths are in pixels at 128x128 and scale with the shorter image side.
    """

    size: tuple[int, int] = (128, 128)
    n_train: int = 800
    n_val: int = 200
    objects: tuple[int, int] = (5, 10)  # solid objects per image, inclusive
    stains: tuple[int, int] = (0, 3)  # untextured background blobs per image, inclusive
    wires: tuple[int, int] = (1, 3)  # wires per image, inclusive
    wire_width: Range = (1.0, 3.0)  # px, not scaled: wires stay thin at any size
    plain_texture_prob: float = 0.15  # share of objects with a class-agnostic texture
    contrast: Range = (35.0, 120.0)  # distance between an instance's two texture colours
    ignore_blob_prob: float = 0.3  # chance an image has unlabelled (ignore) blobs
    blur_prob: float = 0.5
    noise_std: Range = (2.0, 8.0)

    def __post_init__(self) -> None:
        h, w = self.size
        if min(h, w) < 32:
            raise ValueError(f"size must be at least 32x32, got {self.size}")
        if self.n_train < 1 or self.n_val < 1:
            raise ValueError(f"n_train and n_val must be >= 1, got {self.n_train} and {self.n_val}")
        for name in ("objects", "stains", "wires", "wire_width", "contrast", "noise_std"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be a (low, high) range with 0 <= low <= high, got {(lo, hi)}")
        for name in ("plain_texture_prob", "ignore_blob_prob", "blur_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "val": self.n_val}

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ---------------------------------------------------------------------------------------------
# Textures: each maps local object coordinates (u, v) to a mix factor t in [0, 1] between the
# instance's two colours. Every class has its own family; parameters are random per instance.


def _square_wave(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sharpen a sine into a soft square wave with random edge sharpness."""
    return np.clip(wave * rng.uniform(1.5, 4.0), -1.0, 1.0) * 0.5 + 0.5


def _rotate(u: np.ndarray, v: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return u * c + v * s, v * c - u * s


def _tex_dots(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    period = rng.uniform(5.0, 9.0)
    radius = rng.uniform(0.22, 0.38) * period
    a, b = _rotate(u, v, rng.uniform(0, math.pi))
    da = ((a / period + rng.random()) % 1.0 - 0.5) * period
    db = ((b / period + rng.random()) % 1.0 - 0.5) * period
    return (da * da + db * db <= radius * radius).astype(np.float32)


def _tex_checker(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    period = rng.uniform(3.5, 7.0)
    cells = np.floor(u / period + rng.random()) + np.floor(v / period + rng.random())
    return (cells % 2).astype(np.float32)


def _tex_stripes(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    a, _ = _rotate(u, v, rng.uniform(0, math.pi))
    return _square_wave(np.sin(a * (2 * math.pi / rng.uniform(3.5, 7.0)) + rng.uniform(0, 2 * math.pi)), rng)


def _tex_spokes(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    spokes = int(rng.integers(6, 17))
    return _square_wave(np.sin(np.arctan2(v, u) * spokes + rng.uniform(0, 2 * math.pi)), rng)


def _tex_hatch(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    period = rng.uniform(3.5, 6.0)
    width = rng.uniform(0.25, 0.45)
    # diagonal to the object's own axes, with some jitter
    a, b = _rotate(u, v, math.pi / 4 + rng.uniform(-0.3, 0.3))
    lines = ((a / period + rng.random()) % 1.0 < width) | ((b / period + rng.random()) % 1.0 < width)
    return lines.astype(np.float32)


def _tex_speckle(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return rng.random(np.broadcast_shapes(u.shape, v.shape), dtype=np.float32)


Texture = Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]
CLASS_TEXTURES: dict[int, Texture] = {
    DISC: _tex_dots,
    BOX: _tex_checker,
    TRIANGLE: _tex_stripes,
    RING: _tex_spokes,
    CROSS: _tex_hatch,
}

# ---------------------------------------------------------------------------------------------
# Shapes: each draws its parameters and returns (bounding radius, inside-test on (u, v)).

ShapeTest = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _shape_disc(rng: np.random.Generator, s: float) -> tuple[float, ShapeTest]:
    a = rng.uniform(8, 22) * s
    b = a * rng.uniform(0.8, 1.0)
    return a, lambda u, v: (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _shape_box(rng: np.random.Generator, s: float) -> tuple[float, ShapeTest]:
    a, b = rng.uniform(6, 20, size=2) * s
    return math.hypot(a, b), lambda u, v: (np.abs(u) <= a) & (np.abs(v) <= b)


def _shape_triangle(rng: np.random.Generator, s: float) -> tuple[float, ShapeTest]:
    radius = rng.uniform(10, 25) * s
    angles = np.arange(3) * (2 * math.pi / 3) + rng.uniform(-0.35, 0.35, size=3)
    px, py = radius * np.cos(angles), radius * np.sin(angles)

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        # counter-clockwise vertices: inside = left of every edge
        out = np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
        for i in range(3):
            j = (i + 1) % 3
            out &= (px[j] - px[i]) * (v - py[i]) - (py[j] - py[i]) * (u - px[i]) >= 0
        return out

    return radius, inside


def _shape_ring(rng: np.random.Generator, s: float) -> tuple[float, ShapeTest]:
    outer = rng.uniform(10, 24) * s
    inner = outer - rng.uniform(2.5, 6.0) * s

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        r2 = u * u + v * v
        return (r2 <= outer * outer) & (r2 >= inner * inner)

    return outer, inside


def _shape_cross(rng: np.random.Generator, s: float) -> tuple[float, ShapeTest]:
    half_width = rng.uniform(1.5, 3.5) * s
    la, lb = rng.uniform(9, 22, size=2) * s

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        au, av = np.abs(u), np.abs(v)
        return ((au <= half_width) & (av <= la)) | ((av <= half_width) & (au <= lb))

    return math.hypot(max(la, lb), half_width), inside


SHAPES: dict[int, Callable[[np.random.Generator, float], tuple[float, ShapeTest]]] = {
    DISC: _shape_disc,
    BOX: _shape_box,
    TRIANGLE: _shape_triangle,
    RING: _shape_ring,
    CROSS: _shape_cross,
}

# ---------------------------------------------------------------------------------------------
# Painting


@dataclass
class _Canvas:
    img: np.ndarray  # float32 HxWx3, 0-255
    label: np.ndarray  # uint8 HxW
    # Bookkeeping for the detection tasks only (None: not tracked). Every painted layer other than
    # a background stain is one instance; ``owners[i - 1]`` is the class of instance id ``i``.
    instances: np.ndarray | None = None  # uint16 HxW, 0 = no instance
    owners: list[int] = field(default_factory=list)

    def paint(self, box: tuple[int, int, int, int], mask: np.ndarray, colour: np.ndarray, cls: int) -> None:
        """Overwrite pixels under ``mask`` (over ``box`` = y0, y1, x0, x1): later layers occlude earlier ones."""
        y0, y1, x0, x1 = box
        self.img[y0:y1, x0:x1][mask] = colour[mask]
        self.label[y0:y1, x0:x1][mask] = cls
        if self.instances is not None:
            self.instances[y0:y1, x0:x1][mask] = self._new_instance(cls)

    def _new_instance(self, cls: int) -> int:
        if cls == BACKGROUND:
            return 0
        self.owners.append(int(cls))
        return len(self.owners)


def _colour_pair(rng: np.random.Generator, contrast: Range) -> tuple[np.ndarray, np.ndarray]:
    """Two colours from the one distribution every class shares, ``contrast`` apart (before clipping)."""
    c1 = rng.uniform(20, 235, size=3)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-9
    c2 = np.clip(c1 + direction * rng.uniform(*contrast), 0, 255)
    return c1.astype(np.float32), c2.astype(np.float32)


def _mix(t: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    return c1 + t[..., None] * (c2 - c1)


def _local_frame(
    rng: np.random.Generator, size: tuple[int, int], radius: float
) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray] | None:
    """Random centre (possibly partly off-image) and rotation; (box, u, v) over the clipped bounding box."""
    h, w = size
    cy, cx = rng.uniform(-0.05 * h, 1.05 * h), rng.uniform(-0.05 * w, 1.05 * w)
    angle = rng.uniform(0, 2 * math.pi)
    y0, y1 = max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, h)
    x0, x1 = max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, w)
    if y0 >= y1 or x0 >= x1:
        return None
    yy = (np.arange(y0, y1, dtype=np.float32) - np.float32(cy))[:, None]
    xx = (np.arange(x0, x1, dtype=np.float32) - np.float32(cx))[None, :]
    u, v = _rotate(xx, yy, angle)
    return (y0, y1, x0, x1), u, v


def _paint_object(canvas: _Canvas, cls: int, rng: np.random.Generator, spec: SynthSpec) -> None:
    scale = min(spec.size) / 128.0
    radius, inside = SHAPES[cls](rng, scale)
    texture = _tex_speckle if rng.random() < spec.plain_texture_prob else CLASS_TEXTURES[cls]
    c1, c2 = _colour_pair(rng, spec.contrast)
    frame = _local_frame(rng, spec.size, radius)
    if frame is None:
        return
    box, u, v = frame
    mask = inside(u, v)
    if mask.any():
        canvas.paint(box, mask, _mix(texture(rng, u, v), c1, c2), cls)


def _bezier(rng: np.random.Generator, size: tuple[int, int], n: int = 17) -> np.ndarray:
    """(n, 2) points (y, x) along a random quadratic Bezier curve spanning much of the image."""
    h, w = size
    centre = rng.uniform([0.1 * h, 0.1 * w], [0.9 * h, 0.9 * w])
    angle = rng.uniform(0, math.pi)
    length = rng.uniform(0.5, 1.3) * max(h, w)
    along = np.array([math.sin(angle), math.cos(angle)])
    normal = np.array([along[1], -along[0]])
    p0, p2 = centre - along * length / 2, centre + along * length / 2
    p1 = centre + normal * rng.uniform(-0.4, 0.4) * length
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _polyline_mask(points: np.ndarray, half_width: float, size: tuple[int, int]) -> np.ndarray:
    """HxW mask of pixel centres within ``half_width`` of the polyline through ``points`` (y, x).

    Each segment is only tested inside its own padded bounding box: a wire crosses the image but
    touches few pixels, so this is far cheaper than a full distance field.
    """
    h, w = size
    mask = np.zeros((h, w), dtype=bool)
    pad = half_width + 1
    for (ay, ax), (by, bx) in zip(points[:-1], points[1:]):
        y0, y1 = max(int(min(ay, by) - pad), 0), min(int(max(ay, by) + pad) + 1, h)
        x0, x1 = max(int(min(ax, bx) - pad), 0), min(int(max(ax, bx) + pad) + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(ay)
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(ax)
        dy, dx = by - ay, bx - ax
        t = np.clip((yy * dy + xx * dx) / max(dy * dy + dx * dx, 1e-9), 0.0, 1.0)
        mask[y0:y1, x0:x1] |= (yy - t * dy) ** 2 + (xx - t * dx) ** 2 <= half_width * half_width
    return mask


def _paint_wire(canvas: _Canvas, rng: np.random.Generator, spec: SynthSpec) -> None:
    half_width = rng.uniform(*spec.wire_width) / 2
    c1, c2 = _colour_pair(rng, (10.0, 40.0))  # faint texture: a wire is told apart by its shape
    mask = _polyline_mask(_bezier(rng, spec.size), half_width, spec.size)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size:
        box = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
        mask = mask[box[0] : box[1], box[2] : box[3]]
        canvas.paint(box, mask, _mix(rng.random(mask.shape, dtype=np.float32), c1, c2), WIRE)


def _tex_gradient(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A smooth linear ramp: an untextured surface with shading."""
    a, _ = _rotate(u, v, rng.uniform(0, 2 * math.pi))
    span = max(float(np.ptp(a)), 1.0)
    return ((a - a.min()) / span).astype(np.float32)


def _paint_blob(
    canvas: _Canvas, rng: np.random.Generator, spec: SynthSpec, radius: Range, texture: Texture, label: int
) -> None:
    """An irregular lobed blob of ``radius`` (px at 128x128) with ``texture``, labelled ``label``."""
    r0 = rng.uniform(*radius) * min(spec.size) / 128.0
    lobes, phase, wobble = int(rng.integers(2, 5)), rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.35)
    c1, c2 = _colour_pair(rng, spec.contrast)
    frame = _local_frame(rng, spec.size, r0 * (1 + wobble))
    if frame is None:
        return
    box, u, v = frame
    mask = np.hypot(u, v) <= r0 * (1 + wobble * np.sin(np.arctan2(v, u) * lobes + phase))
    if mask.any():
        canvas.paint(box, mask, _mix(texture(rng, u, v), c1, c2), label)


@functools.lru_cache(maxsize=64)
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights, to upsample a coarse grid by matrix products."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), lo] = 1 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def _background(rng: np.random.Generator, spec: SynthSpec) -> np.ndarray:
    """Low-frequency two-colour noise (value noise on a coarse grid, bilinearly upsampled) plus speckle."""
    h, w = spec.size
    gh, gw = rng.integers(3, 8, size=2)
    coarse = rng.random((gh, gw), dtype=np.float32)
    t = _interp_matrix(h, int(gh)) @ coarse @ _interp_matrix(w, int(gw)).T
    t = np.clip(t + rng.uniform(0.0, 0.15) * (rng.random((h, w), dtype=np.float32) - 0.5), 0, 1)
    c1, c2 = _colour_pair(rng, spec.contrast)
    return _mix(t, c1, c2)


def _blur121(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge padding (a mild lens blur)."""
    p = np.pad(img, ((1, 1), (0, 0), (0, 0)), mode="edge")
    img = (p[:-2] + 2 * p[1:-1] + p[2:]) * 0.25
    p = np.pad(img, ((0, 0), (1, 1), (0, 0)), mode="edge")
    return (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) * 0.25


def _finish(img: np.ndarray, rng: np.random.Generator, spec: SynthSpec) -> np.ndarray:
    """Camera-like degradations so classes are not trivially separable, then quantise to uint8."""
    if rng.random() < spec.blur_prob:
        img = _blur121(img)
    img = (img - 128.0) * rng.uniform(0.85, 1.15) + 128.0 + rng.uniform(-12, 12)
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(*spec.noise_std)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Scene:
    """One rendered scene with its instance bookkeeping.

    ``instances`` holds, per pixel, the id of the instance visible there (0: none); instance ``i``
    has class ``owners[i - 1]``, ``IGNORE_INDEX`` for an unlabelled blob. Since later layers
    overwrite earlier ones, an instance's visible mask is ``instances == i``: it may be split into
    several parts, or be empty when fully occluded.
    """

    image: np.ndarray  # uint8 HxWx3 RGB
    label: np.ndarray  # uint8 HxW class-index mask
    instances: np.ndarray  # uint16 HxW
    owners: tuple[int, ...]


def render_sample(spec: SynthSpec, seed: int, split: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``k`` of ``split``: (uint8 HxWx3 RGB image, uint8 HxW mask), a function of (spec, seed, split, k) only."""
    canvas, img = _render(spec, seed, split, k, track=False)
    return img, canvas.label


def render_scene(spec: SynthSpec, seed: int, split: str, k: int) -> Scene:
    """Like :func:`render_sample` (the same pixels), plus the instance-id map."""
    canvas, img = _render(spec, seed, split, k, track=True)
    assert canvas.instances is not None
    return Scene(img, canvas.label, canvas.instances, tuple(canvas.owners))


def _render(spec: SynthSpec, seed: int, split: str, k: int, track: bool) -> tuple[_Canvas, np.ndarray]:
    """Paint the scene; ``track`` only adds bookkeeping and draws no random numbers, so pixels never depend on it."""
    rng = np.random.default_rng([seed, SPLITS.index(split), k])
    instances = np.zeros(spec.size, dtype=np.uint16) if track else None
    canvas = _Canvas(_background(rng, spec), np.zeros(spec.size, dtype=np.uint8), instances)
    # smooth sharp-edged stains that are still background: an edge alone does not make an object
    for _ in range(int(rng.integers(spec.stains[0], spec.stains[1] + 1))):
        _paint_blob(canvas, rng, spec, (8, 22), _tex_gradient, BACKGROUND)
    n_objects = int(rng.integers(spec.objects[0], spec.objects[1] + 1))
    n_wires = int(rng.integers(spec.wires[0], spec.wires[1] + 1))
    layers = np.concatenate([rng.choice(SOLID_CLASSES, size=n_objects), np.full(n_wires, WIRE)])
    # random draw order: wires pass both over and under objects, objects occlude each other
    for cls in rng.permutation(layers):
        if cls == WIRE:
            _paint_wire(canvas, rng, spec)
        else:
            _paint_object(canvas, int(cls), rng, spec)
    if rng.random() < spec.ignore_blob_prob:
        # 'unlabelled' regions the loss and the metrics must skip
        for _ in range(int(rng.integers(1, 3))):
            _paint_blob(canvas, rng, spec, (3, 7), _tex_speckle, IGNORE_INDEX)
    return canvas, _finish(canvas.img, rng, spec)


# ---------------------------------------------------------------------------------------------
# COCO instances of a scene


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE ``{"size": [h, w], "counts": str}`` of a HxW 0/1 mask.

    The same string ``pycocotools.mask.encode`` gives (runs in column-major order, starting with a
    run of zeros; each count as 5-bit groups, deltas against the count two back after the third),
    written here so that ``bckd data synth`` does not need pycocotools.
    """
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)
    return {"size": [int(h), int(w)], "counts": _rle_string(counts)}


def _rle_string(counts: list[int]) -> str:
    chars = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: negative deltas end at -1
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr((c | 0x20 if more else c) + 48))
    return "".join(chars)


def scene_annotations(scene: Scene, task: str) -> list[dict[str, Any]]:
    """COCO annotations of ``scene``'s visible instances, without ``id`` and ``image_id``.

    Objects and wires first, in paint order, with ``iscrowd`` 0; then each unlabelled blob as one
    ``iscrowd`` 1 region per category, since 'don't care' holds for every class. ``bbox`` (x, y,
    w, h in pixel edges) and ``area`` (pixel count) come from the visible mask; parts smaller than
    :data:`MIN_INSTANCE_AREA` are left out. ``task="instance"`` adds the compressed-RLE mask as
    ``segmentation``; ``"detect"`` writes none.
    """
    areas = np.bincount(scene.instances.ravel(), minlength=len(scene.owners) + 1)
    solid, crowd = [], []
    for inst, cls in enumerate(scene.owners, 1):
        if areas[inst] < MIN_INSTANCE_AREA:
            continue
        mask = scene.instances == inst
        ann: dict[str, Any] = {"bbox": _mask_bbox(mask), "area": int(areas[inst])}
        if task == "instance":
            ann["segmentation"] = rle_encode(mask)
        if cls == IGNORE_INDEX:
            crowd.extend({"category_id": c["id"], "iscrowd": 1, **ann} for c in CATEGORIES)
        else:
            solid.append({"category_id": cls, "iscrowd": 0, **ann})
    return solid + crowd


def _mask_bbox(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def coco_instances(
    split: str, size: tuple[int, int], per_image: list[list[dict[str, Any]]], info: dict[str, Any]
) -> dict[str, Any]:
    """The COCO json of one split: image ``k`` has id ``k + 1``, annotations are numbered from 1 in image order."""
    h, w = size
    images = [{"id": k + 1, "file_name": sample_id(split, k) + ".png", "height": h, "width": w}
              for k in range(len(per_image))]
    pairs = [(k + 1, ann) for k, anns in enumerate(per_image) for ann in anns]
    annotations = [{"id": n, "image_id": image_id, **ann} for n, (image_id, ann) in enumerate(pairs, 1)]
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": [dict(c) for c in CATEGORIES]}


# ---------------------------------------------------------------------------------------------
# Writing the dataset


def sample_id(split: str, k: int) -> str:
    return f"{split}_{k:05d}"


def _mask_palette() -> list[int]:
    flat = [0] * (256 * 3)
    for i, rgb in enumerate(PALETTE):
        flat[3 * i : 3 * i + 3] = rgb
    flat[3 * IGNORE_INDEX : 3 * IGNORE_INDEX + 3] = IGNORE_COLOUR
    return flat


Job = tuple[SynthSpec, int, str, str, int, str]
Annotated = tuple[str, int, list[dict[str, Any]] | None]


def _write_sample(job: Job) -> Annotated:
    """Write image ``k`` of ``split`` and its mask; return its COCO annotations (None for ``semantic``)."""
    spec, seed, root, split, k, task = job
    Image = require("PIL.Image", "writing the synthetic dataset")
    anns = None
    if task == "semantic":
        img, mask = render_sample(spec, seed, split, k)
    else:
        scene = render_scene(spec, seed, split, k)
        img, mask, anns = scene.image, scene.label, scene_annotations(scene, task)
    name = sample_id(split, k) + ".png"
    Image.fromarray(img).save(os.path.join(root, "images", name), format="PNG")
    # palette PNG: the stored indices are the classes, the palette only makes it viewable
    mask_img = Image.fromarray(mask)
    mask_img.putpalette(_mask_palette())
    mask_img.save(os.path.join(root, "masks", name), format="PNG")
    return split, k, anns


def _default_workers(n: int) -> int:
    # a pool only pays for its start-up on larger sets
    return min(2, os.cpu_count() or 1) if n >= 200 else 1


def _render_all(jobs: list[Job], workers: int, progress: ProgressFn | None) -> dict[tuple[str, int], Any]:
    """Write every job's files; returns (split, k) -> annotations, so their order never depends on the workers."""
    if workers <= 1:
        return _collect(map(_write_sample, jobs), len(jobs), progress)
    with multiprocessing.get_context().Pool(workers) as pool:
        return _collect(pool.imap_unordered(_write_sample, jobs, chunksize=16), len(jobs), progress)


def _collect(done: Iterator[Annotated], total: int, progress: ProgressFn | None) -> dict[tuple[str, int], Any]:
    results: dict[tuple[str, int], Any] = {}
    for n_done, (split, k, anns) in enumerate(done, 1):
        results[split, k] = anns
        if progress:
            progress(n_done, total)
    return results


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise BckdError(unknown_name_message("synthetic dataset task", task, list(TASKS)))


def _write_annotations(root: Path, spec: SynthSpec, seed: int, task: str, results: dict) -> None:
    """``annotations/instances_{split}.json`` for each split, images and annotations in (split, k) order."""
    (root / "annotations").mkdir()
    for split, n in spec.split_sizes().items():
        info = {"description": f"{GENERATOR_NAME} procedural scenes, split {split}",
                "version": str(GENERATOR_VERSION), "seed": int(seed), "task": task,
                "min_instance_area": MIN_INSTANCE_AREA}
        coco = coco_instances(split, spec.size, [results[split, k] for k in range(n)], info)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps(coco, separators=(",", ":")), encoding="utf-8")


def write_synth(
    out_dir: str | os.PathLike,
    spec: SynthSpec,
    *,
    seed: int = 0,
    force: bool = False,
    progress: ProgressFn | None = None,
    workers: int | None = None,
    task: str = "semantic",
) -> Path:
    """Generate the dataset described by ``spec`` into ``out_dir`` (atomically; existing dir refused unless ``force``).

    ``task="semantic"`` writes the folder dataset (images, masks, splits, dataset.json);
    ``"detect"`` and ``"instance"`` write the same files (the same image and mask bytes) plus
    ``annotations/instances_{split}.json`` (COCO boxes; ``instance`` adds RLE masks), and record
    the task in dataset.json's ``generator``.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise BckdError(f"seed must be a non-negative integer, got {seed!r}")
    _check_task(task)
    sizes = spec.split_sizes()
    with staged_dir(out_dir, force) as tmp:
        for sub in ("images", "masks", "splits"):
            (tmp / sub).mkdir()
        jobs = [(spec, int(seed), str(tmp), split, k, task) for split, n in sizes.items() for k in range(n)]
        results = _render_all(jobs, workers or _default_workers(len(jobs)), progress)
        for split, n in sizes.items():
            (tmp / "splits" / f"{split}.txt").write_text("".join(sample_id(split, k) + "\n" for k in range(n)))
        generator = {"name": GENERATOR_NAME, "version": GENERATOR_VERSION, "seed": int(seed), "spec": spec.to_dict()}
        if task != "semantic":
            _write_annotations(tmp, spec, int(seed), task, results)
            generator.update(task=task, min_instance_area=MIN_INSTANCE_AREA)
        write_dataset_meta(tmp, "synth", CLASSES, PALETTE, IGNORE_INDEX, generator=generator)
    return Path(out_dir)


def synthesize(
    out_dir: str | os.PathLike,
    *,
    n_train: int = 800,
    n_val: int = 200,
    size: tuple[int, int] = (128, 128),
    seed: int = 0,
    force: bool = False,
    progress: ProgressFn | None = None,
    workers: int | None = None,
    task: str = "semantic",
) -> Path:
    """Write the default synthetic dataset (splits ``train`` and ``val``) to ``out_dir``; returns its path.

    ``task`` is ``"semantic"``, ``"detect"`` or ``"instance"`` (see :func:`write_synth`).
    """
    _check_task(task)
    try:
        spec = SynthSpec(size=(int(size[0]), int(size[1])), n_train=int(n_train), n_val=int(n_val))
    except ValueError as exc:
        raise BckdError(f"invalid synthetic dataset settings: {exc}") from exc
    return write_synth(out_dir, spec, seed=seed, force=force, progress=progress, workers=workers, task=task)
