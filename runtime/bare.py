"""Models bckd did not make: their inputs read from the graph, shapes from flags, preprocessing from
flags or a small YAML (torch-free).

A bare model has no card. What the device-side commands need of it comes from three places:

* **the graph**: input names, dtypes and ranks, static dims, output names
  (:func:`graph_io`; ONNX from its protobuf, IR through OpenVINO's reader);
* **shapes**: ``--shape NAME:1x3x224x224`` per input (repeatable; the name may be left out for a
  single-input model), or ``--size HxW`` and ``--batch`` for an image input, fill the dynamic
  dims (:func:`resolve_shapes`); a dim still unknown is one clear line naming the flag to give;
* **preprocessing** for calibration and evaluation: ``--mean``, ``--std``, ``--layout``,
  ``--size`` or ``--preprocess FILE.yaml`` (:func:`preprocess_from`).

The layout of a 4-D input is NHWC when its last dim is a static 1, 3 or 4 and its second is not,
else NCHW (:func:`layout_of`); ``--layout`` overrides it. A card written for a bare model
(:func:`bare_card`) records all of this, so no later command finds a hole in it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from runtime.backends.base import InputSpec
from runtime.errors import BckdError

LAYOUTS = ("NCHW", "NHWC")


def graph_io(path: str | os.PathLike) -> tuple[list[InputSpec], list[str]]:
    """The inputs (name, shape with None for dynamic dims, dtype) and output names of an ONNX
    file or OpenVINO IR, read from the graph without compiling it."""
    path = Path(path)
    if not path.is_file():
        raise BckdError(f"model file {path} not found; check the path")
    if path.suffix.lower() == ".xml":
        return _ir_io(path)
    return _onnx_io(path)


def _onnx_io(path: Path) -> tuple[list[InputSpec], list[str]]:
    from runtime.card import load_onnx_graph
    from runtime.lazy import require

    onnx = require("onnx", "reading ONNX files")
    graph = load_onnx_graph(path).graph
    weights = {t.name for t in graph.initializer}
    specs = []
    for value in graph.input:
        if value.name in weights:  # old exporters list initializers as inputs
            continue
        tensor = value.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        except (KeyError, TypeError, ValueError) as exc:
            raise BckdError(f"{path.name} input '{value.name}' has an unsupported element type "
                            f"{tensor.elem_type}") from exc
        if not tensor.HasField("shape"):
            raise BckdError(f"{path.name} input '{value.name}' has an unknown rank; re-export it "
                            "with a fixed rank")
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in tensor.shape.dim)
        specs.append(InputSpec(value.name, dims, dtype))
    outputs = [o.name for o in graph.output]
    if not specs or not outputs:
        raise BckdError(f"{path.name} has {len(specs)} inputs and {len(outputs)} outputs; a model "
                        "needs at least one of each")
    return specs, outputs


def _ir_io(path: Path) -> tuple[list[InputSpec], list[str]]:
    from runtime.backends.openvino import _inputs_of, _output_names, error_reason
    from runtime.lazy import require

    ov = require("openvino", "reading OpenVINO IR")
    if not path.with_suffix(".bin").is_file():
        raise BckdError(f"OpenVINO IR {path} has no weights file {path.with_suffix('.bin').name} "
                        "next to it; copy the .bin with the .xml or re-convert the model")
    try:
        model = ov.Core().read_model(str(path))
    except RuntimeError as exc:
        raise BckdError(f"openvino could not read {path} ({error_reason(exc)}); check that it is "
                        "a complete IR (.xml + .bin)") from exc
    return _inputs_of(model, path.name), _output_names(model)


def output_dims(path: str | os.PathLike) -> dict[str, tuple[int | None, ...] | None]:
    """Each output's dims (None where dynamic; None for an unknown rank) from the graph."""
    path = Path(path)
    if path.suffix.lower() == ".xml":
        from runtime.lazy import require

        model = require("openvino", "reading OpenVINO IR").Core().read_model(str(path))
        out: dict[str, tuple[int | None, ...] | None] = {}
        for i, port in enumerate(model.outputs):
            shape = port.partial_shape
            name = next(iter(port.get_names()), f"output{i}")
            out[name] = (None if shape.rank.is_dynamic else
                         tuple(d.get_length() if d.is_static else None for d in shape))
        return out
    from runtime.card import load_onnx_graph

    out = {}
    for value in load_onnx_graph(path).graph.output:
        tensor = value.type.tensor_type
        out[value.name] = (tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                                 else None for d in tensor.shape.dim)
                           if tensor.HasField("shape") else None)
    return out


def layout_of(spec: InputSpec, override: str | None = None) -> str | None:
    """'NCHW' or 'NHWC' for a 4-D input (``override`` wins), None for other ranks."""
    if override:
        layout = override.upper()
        if layout not in LAYOUTS:
            raise BckdError(f"--layout must be one of {', '.join(LAYOUTS)}, got '{override}'")
        return layout if len(spec.shape) == 4 else None
    if len(spec.shape) != 4:
        return None
    last, second = spec.shape[3], spec.shape[1]
    return "NHWC" if last in (1, 3, 4) and second not in (1, 3, 4) else "NCHW"


def render(spec: InputSpec, layout: str | None = None) -> str:
    """The input's shape with dynamic dims as letters of its layout, e.g. '(N, 3, H, W)'."""
    letters = layout or layout_of(spec) or ""  # a layout's name spells its dims
    dims = [str(d) if d is not None else (letters[i] if i < len(letters) else "?")
            for i, d in enumerate(spec.shape)]
    return "(" + ", ".join(dims) + ")"


def parse_shapes(items: Iterable[str] | None) -> dict[str, tuple[int, ...]]:
    """``--shape`` values ``NAME:1x3x224x224`` (or ``1x3x224x224``, key '') by input name."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items or []:
        name, sep, dims = item.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not shape or any(d < 1 for d in shape):
            raise BckdError(f"--shape takes NAME:DxDx... with positive dims (e.g. "
                            f"input:1x3x224x224), got '{item}'")
        if name in out:
            raise BckdError(f"--shape gives input '{name or '(unnamed)'}' twice")
        out[name if sep else ""] = shape
    return out


def resolve_shapes(specs: Sequence[InputSpec], model: str | os.PathLike, *,
                   shapes: dict[str, tuple[int, ...]] | None = None,
                   size: tuple[int, int] | None = None, batch: int | None = None,
                   layout: str | None = None) -> dict[str, tuple[int, ...]]:
    """A static shape per input: ``shapes`` (by name) first, then ``batch`` for a dynamic first dim
    and ``size`` for the dynamic H, W of an image input; one line naming the flag when a dim is
    still unknown, or when a given shape contradicts a static dim."""
    name = Path(model).name
    shapes = dict(shapes or {})
    if "" in shapes:
        if len(specs) != 1:
            raise BckdError(f"{name} has {len(specs)} inputs ({', '.join(s.name for s in specs)}); "
                            "name the input in --shape NAME:DxDx...")
        shapes[specs[0].name] = shapes.pop("")
    unknown = sorted(set(shapes) - {s.name for s in specs})
    if unknown:
        raise BckdError(f"--shape names {', '.join(unknown)}, not an input of {name} (its inputs: "
                        f"{', '.join(s.name for s in specs)})")
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        lay = layout_of(spec, layout)
        if spec.name in shapes:
            given = shapes[spec.name]
            clash = len(given) != len(spec.shape) or any(
                d is not None and d != g for d, g in zip(spec.shape, given))
            if clash:
                raise BckdError(f"--shape {spec.name}:{'x'.join(map(str, given))} does not fit the "
                                f"input {render(spec, lay)} of {name}")
            out[spec.name] = given
            continue
        dims = list(spec.shape)
        if dims and dims[0] is None and batch:
            dims[0] = batch
        hw = (1, 2) if lay == "NHWC" else (2, 3)
        # --size fills an image input's dynamic H, W; of several inputs, a static one is left be
        if lay and size and (len(specs) == 1 or any(dims[a] is None for a in hw)):
            for axis, value in zip(hw, size):
                if dims[axis] is None:
                    dims[axis] = value
                elif dims[axis] != value:
                    raise BckdError(f"--size {size[0]}x{size[1]} does not fit the static input "
                                    f"{render(spec, lay)} of {name}; drop --size or re-export "
                                    "the model with dynamic H and W")
        if None in dims:
            example = "x".join(str(d) if d is not None else ("224" if i else "1")
                               for i, d in enumerate(dims))
            hint = " (or --size HxW)" if lay else ""
            raise BckdError(f"input '{spec.name}' of {name} has dynamic dims "
                            f"{render(spec, lay)}; give --shape {spec.name}:{example}{hint}")
        out[spec.name] = tuple(int(d) for d in dims)
    return out


def check_allocatable(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype]) -> None:
    """Refuse, in one line, inputs that need over half of this machine's memory."""
    nbytes = sum(int(np.prod(s, dtype=np.float64)) * np.dtype(dtypes[n]).itemsize
                 for n, s in shapes.items())
    total = physical_memory()
    if total and nbytes > total // 2:
        what = ", ".join(f"{'x'.join(map(str, s))} {np.dtype(dtypes[n])}"
                         for n, s in shapes.items())
        raise BckdError(f"an input of {what} needs {nbytes / 2**30:.1f} GiB, over half of this "
                        f"machine's {total / 2**30:.1f} GiB; choose a smaller --size or --batch "
                        "(or --shape)")


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def random_feed(specs: Sequence[InputSpec], shapes: dict[str, tuple[int, ...]],
                seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded input per model input: normal floats, uint8/int8 pixels, ones for other integers
    (masks and counts, where zeros could mean 'nothing to do')."""
    check_allocatable(shapes, {s.name: s.dtype for s in specs})
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        shape = shapes[spec.name]
        try:
            if spec.dtype.kind == "f":
                feed[spec.name] = rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype)
            elif spec.dtype in (np.uint8, np.int8):
                info = np.iinfo(spec.dtype)
                feed[spec.name] = rng.integers(info.min, info.max, shape, dtype=spec.dtype,
                                               endpoint=True)
            else:
                feed[spec.name] = np.ones(shape, dtype=spec.dtype)
        except MemoryError as exc:
            raise BckdError(f"cannot allocate input '{spec.name}' of {'x'.join(map(str, shape))}; "
                            "choose a smaller --size, --shape or --batch") from exc
    return feed


# -- preprocessing of a bare model -------------------------------------------------------------
PREPROCESS_KEYS = ("size", "mean", "std", "layout", "resize")


def preprocess_from(model: str | os.PathLike, spec: InputSpec, *, yaml_file: str | None = None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    layout: str | None = None, size: tuple[int, int] | None = None
                    ) -> dict[str, Any]:
    """The preprocess dict of a bare image model: ``yaml_file``'s keys, then the flags over them.

    mean / std are per channel on the 0–255 scale (ImageNet's defaults when neither file nor flag
    gives them, said by the caller); the size is the flag's, the file's, or the input's static
    H, W. A uint8 input takes raw pixels (no normalisation): its model does its own.
    """
    from runtime.data.preprocess import IMAGENET_MEAN, IMAGENET_STD

    name = Path(model).name
    base: dict[str, Any] = {}
    if yaml_file:
        base = _read_yaml(yaml_file)
    lay = layout_of(spec, layout or base.get("layout"))
    if lay is None:
        raise BckdError(f"input '{spec.name}' of {name} is {render(spec)}, not a 4-D image batch; "
                        "calibration and evaluation feed images (NCHW or NHWC)")
    hw = (spec.shape[1:3] if lay == "NHWC" else spec.shape[2:4])
    chosen = size or base.get("size") or (tuple(hw) if None not in hw else None)
    if chosen is None:
        raise BckdError(f"input '{spec.name}' of {name} has dynamic H and W {render(spec, lay)}; "
                        "give --size HxW (or size: [H, W] in the --preprocess YAML)")
    chosen = _pair(chosen, "size")
    for axis, value in zip((1, 2) if lay == "NHWC" else (2, 3), chosen):
        if spec.shape[axis] is not None and spec.shape[axis] != value:
            raise BckdError(f"size {chosen[0]}x{chosen[1]} does not fit the static input "
                            f"{render(spec, lay)} of {name}")
    if np.dtype(spec.dtype) not in (np.float32, np.uint8):
        raise BckdError(f"input '{spec.name}' of {name} takes {np.dtype(spec.dtype)}; bckd feeds "
                        "images as float32 (normalised) or uint8 (raw pixels)")
    raw = np.dtype(spec.dtype) == np.uint8
    out = {
        "size": list(chosen),
        "mean": [0.0, 0.0, 0.0] if raw else _triple(mean or base.get("mean") or IMAGENET_MEAN,
                                                     "mean"),
        "std": [1.0, 1.0, 1.0] if raw else _triple(std or base.get("std") or IMAGENET_STD, "std"),
        "ignore_index": 255,
        "resize": str(base.get("resize", "stretch")),
        "layout": lay,
        "dtype": "uint8" if raw else "float32",
    }
    if any(s <= 0 for s in out["std"]):
        raise BckdError(f"std must be positive per channel, got {out['std']}")
    return out


def read_preprocess_yaml(path: str) -> dict[str, Any]:
    """The --preprocess YAML as a dict (its preprocessing keys plus task and classes)."""
    return _read_yaml(path, keep_extra=True)


def _read_yaml(path: str, keep_extra: bool = False) -> dict[str, Any]:
    from runtime.lazy import require

    yaml = require("yaml", "reading a --preprocess YAML file")
    if not Path(path).is_file():
        raise BckdError(f"preprocess file {path} not found; check the path")
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise BckdError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise BckdError(f"{path} must hold a mapping of {', '.join(PREPROCESS_KEYS)}")
    data = data.get("preprocess", data)
    unknown = sorted(set(data) - set(PREPROCESS_KEYS) - {"task", "classes", "num_classes"})
    if unknown:
        raise BckdError(f"{path}: unknown key(s) {', '.join(unknown)} (valid: "
                        f"{', '.join(PREPROCESS_KEYS)}, task, classes)")
    return data if keep_extra else {k: v for k, v in data.items() if k in PREPROCESS_KEYS}


def _triple(values: Any, what: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        out = []
    if len(out) != 3:
        raise BckdError(f"{what} takes 3 numbers (one per channel, 0-255 scale), got {values!r}")
    return out


def _pair(values: Any, what: str) -> tuple[int, int]:
    if isinstance(values, int):
        return values, values
    try:
        h, w = (int(v) for v in values)
    except (TypeError, ValueError):
        raise BckdError(f"{what} takes H and W, got {values!r}") from None
    return h, w


def bare_card(model: str | os.PathLike, specs: Sequence[InputSpec], outputs: Sequence[str], *,
              preprocess: dict[str, Any] | None = None, source: str = "") -> dict[str, Any]:
    """The card of a model bckd did not make: its I/O from the graph, and a preprocess section
    only when one was given; every reader checks ``bare`` before it asks for classes or a task."""
    from runtime.card import new_card

    card = new_card("bare", bare=True, inputs=[
        {"name": s.name, "shape": [d for d in s.shape], "dtype": str(np.dtype(s.dtype)),
         "layout": layout_of(s)} for s in specs], outputs=list(outputs),
        precision="fp32", source=source or str(model))
    if preprocess:
        card["preprocess"] = dict(preprocess)
        card["input_size"] = list(preprocess["size"])
    return card


def is_bare(card: dict[str, Any] | None) -> bool:
    """True for no card, or a card without the preprocessing bckd's own models carry."""
    return card is None or bool(card.get("bare")) or "preprocess" not in card
