"""INT8 explicit Q/DQ ONNX from real calibration images, with ONNX Runtime's static quantizer.

The output is the one INT8 artifact every backend consumes: QuantizeLinear/DequantizeLinear pairs
with signed int8, zero point 0 (symmetric) activations, per-channel symmetric int8 weights and float
biases — TensorRT's explicit quantization rejects int32 bias dequantization, OpenVINO reads the
pairs as FakeQuantize, and ONNX Runtime fuses them into integer kernels on the CPU.

Calibration runs once per :func:`calibrate` (one batch per collection step, so the histogram
calibrators never hold more than one batch of activations) and its tensor ranges are reused for
every quantization made from it — :mod:`calib.sensitivity` quantizes the same graph many times with
different nodes kept in float. onnxruntime and onnx are imported lazily (architecture.md rule 6).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from calib.reader import CalibrationReader
from runtime.card import (load_onnx_graph, new_card, read_card_or_none, tool_versions,
                          write_card)
from runtime.data.preprocess import Preprocess
from runtime.errors import BckdError
from runtime.files import atomic_path, refuse_existing, sha256_file
from runtime.lazy import require
from runtime.registry import unknown_name_message

# bckd method name -> onnxruntime.quantization.CalibrationMethod member
METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
# Histogram sizes: 2048 bins folded to 128 is TensorRT's entropy calibrator; ORT's entropy default
# (128 bins) leaves the KL search a single candidate, i.e. plain min/max.
DEFAULT_NUM_BINS = {"entropy": 2048, "percentile": 2048}
DEFAULT_PERCENTILE = 99.999
# Operators that carry weights: the layers the accuracy-aware fallback can keep in float.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QDQ_OPTIONS = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}
# Activation encodings: "int8" (symmetric, zero point 0) is the portable form TensorRT requires;
# "uint8" (asymmetric) is ONNX Runtime's fast U8S8 path on x86 CPUs (VNNI), and ORT only.
ACTIVATIONS = {"int8": ("QInt8", True), "uint8": ("QUInt8", False)}
_CARD_HEADER = ("card_version", "kind", "created", "host")
# Fields of the FP32 card that describe the FP32 file and its making, not the INT8 one.
_NOT_INHERITED = ("parity", "simplified", "simplifier", "simplify_error", "sha256", "tools",
                  "source", "precision", "calibration", "quantization", "sensitivity")


def _quant() -> Any:
    q = require("onnxruntime.quantization", "INT8 calibration")
    if "calibration_cache_path" not in inspect.signature(q.quantize_static).parameters:
        ort = require("onnxruntime", "INT8 calibration")
        raise BckdError(
            f"onnxruntime {ort.__version__} cannot reuse calibration ranges "
            "(quantize_static has no calibration_cache_path); upgrade with: pip install -U onnxruntime"
        )
    return q


def check_activations(activations: str) -> str:
    """``activations`` if it is a known activation encoding, else a BckdError."""
    if activations not in ACTIVATIONS:
        raise BckdError(unknown_name_message("activation encoding", activations, list(ACTIVATIONS)))
    return activations


def check_method(method: str) -> str:
    """``method`` if it is a known calibration method, else a BckdError naming the valid ones."""
    if method not in METHODS:
        raise BckdError(unknown_name_message("calibration method", method, list(METHODS)))
    return method


def calibrator_options(method: str, num_bins: int | None, percentile: float) -> dict[str, Any]:
    """``create_calibrator`` extra options for ``method`` (symmetric ranges, histogram size)."""
    opts: dict[str, Any] = {"symmetric": True}
    if method in DEFAULT_NUM_BINS:
        opts["num_bins"] = int(num_bins or DEFAULT_NUM_BINS[method])
    if method == "percentile":
        if not 0 < percentile <= 100:
            raise BckdError(f"percentile must be in (0, 100], got {percentile}")
        opts["percentile"] = float(percentile)
    return opts


class _OneBatch:
    """An ORT reader over one feed: each ``collect_data`` call then holds one batch of activations."""

    def __init__(self, feed: dict[str, Any]) -> None:
        self._feed: dict[str, Any] | None = feed

    def get_next(self) -> dict[str, Any] | None:
        feed, self._feed = self._feed, None
        return feed


class Calibration:
    """An FP32 graph prepared for quantization and its activation ranges, computed once.

    Valid inside the :func:`calibrate` block that made it (its files live in a temporary folder).
    ``info`` is what the card records about the calibration run.
    """

    def __init__(self, model: Path, cache: Path, method: str, info: dict[str, Any],
                 keep_tail: bool = False) -> None:
        self.model, self.cache, self.method, self.info = model, cache, method, info
        onnx = require("onnx", "INT8 calibration")
        graph = onnx.load(str(model)).graph
        # node name -> op type, in graph order (unnamed nodes cannot be named for exclusion)
        self.op_types = {n.name: n.op_type for n in graph.node if n.name}
        # Nodes always kept in float (the detector's postprocess), not candidates for the search.
        self.tail = float_tail(graph) if keep_tail else []
        if keep_tail:
            self.info = dict(info, float_tail={"rule": "no weighted layer downstream",
                                               "nodes": len(self.tail)})

    def nodes(self, op_types: Sequence[str] | None = WEIGHTED_OPS) -> list[str]:
        """Names of the graph's nodes (of ``op_types``; all with None), in graph order."""
        return [name for name, op in self.op_types.items() if op_types is None or op in op_types]

    def quantize(self, out: str | os.PathLike, nodes_to_exclude: Sequence[str] = (),
                 activations: str = "int8") -> None:
        """Write the Q/DQ model to ``out`` with ``nodes_to_exclude`` left in float (no recalibration)."""
        self._check_nodes(nodes_to_exclude)
        dtype, symmetric = ACTIVATIONS[check_activations(activations)]
        q = _quant()
        options = dict(QDQ_OPTIONS, ActivationSymmetric=symmetric)
        if self.tail:  # a weighted layer's output is quantized only where a quantized op reads it
            options["OpTypesToExcludeOutputQuantization"] = list(WEIGHTED_OPS)
        with contextlib.redirect_stdout(io.StringIO()), _quiet_root_logger():
            q.quantize_static(
                str(self.model), str(out), None, quant_format=q.QuantFormat.QDQ, per_channel=True,
                activation_type=getattr(q.QuantType, dtype), weight_type=q.QuantType.QInt8,
                nodes_to_exclude=list(dict.fromkeys([*nodes_to_exclude, *self.tail])),
                calibrate_method=getattr(q.CalibrationMethod, METHODS[self.method]),
                extra_options=options,
                calibration_cache_path=str(self.cache),
            )
        _drop_unused_opsets(Path(out))

    def _check_nodes(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.op_types:
                raise BckdError(unknown_name_message("node to keep in float", name,
                                                     self.nodes()) + " (names of the prepared graph)")


def float_tail(graph: Any, weighted: Sequence[str] = WEIGHTED_OPS) -> list[str]:
    """Names of the nodes of ``graph`` (onnx GraphProto, topologically sorted) that have no
    weighted layer (``weighted`` op types) downstream of them, in graph order."""
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    feeds_weighted = [False] * len(graph.node)
    for i in range(len(graph.node) - 1, -1, -1):  # reverse topological order
        feeds_weighted[i] = any(graph.node[j].op_type in weighted or feeds_weighted[j]
                                for out in graph.node[i].output for j in consumers.get(out, ()))
    return [n.name for n, f in zip(graph.node, feeds_weighted)
            if not f and n.op_type not in weighted]


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ORT's quantizer logs progress (stdout) and, per GroupNorm affine constant of rank 1, an
    'Axis 1 is out-of-range' warning (it then quantizes that constant per tensor, as intended);
    neither is for the user."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def calibrate(onnx_path: str | os.PathLike, reader: CalibrationReader, *, method: str = "minmax",
              num_bins: int | None = None, percentile: float = DEFAULT_PERCENTILE,
              optimize: bool = True, keep_tail: bool = False) -> Iterator[Calibration]:
    """Prepare ``onnx_path`` and compute its activation ranges over ``reader``'s images.

    With ``optimize`` the graph first goes through ``quant_pre_process`` (shape inference and ONNX
    Runtime's basic graph optimizations); if that fails the original graph is used and the
    reason is recorded. Temporary files (prepared and augmented models, the range cache) are
    removed when the block exits. With ``keep_tail`` the graph's :func:`float_tail` is never
    quantized.
    """
    check_method(method)
    opts = calibrator_options(method, num_bins, percentile)
    with tempfile.TemporaryDirectory(prefix="bckd-calib.") as tmp:
        model, prepared = prepare_graph(Path(onnx_path), Path(tmp), optimize)
        batch = _calibration_batch(model, reader)
        start = time.perf_counter()
        ranges = _collect_ranges(model, reader, method, opts, batch, Path(tmp))
        cache = Path(tmp) / "ranges.json"
        require("onnxruntime.quantization.calibrate").save_tensors_data(ranges, cache)
        info = {"method": method, "options": opts, "batch_size": batch, **prepared,
                "seconds": round(time.perf_counter() - start, 3)}
        yield Calibration(model, cache, method, info, keep_tail)


def prepare_graph(onnx_path: Path, folder: Path, optimize: bool) -> tuple[Path, dict[str, Any]]:
    """The graph to calibrate: ``quant_pre_process``'d into ``folder``, or ``onnx_path`` as is."""
    if not onnx_path.is_file():
        raise BckdError(f"ONNX file {onnx_path} not found; check the path")
    info: dict[str, Any] = {"graph_optimized": False, "optimize_error": None}
    out = folder / "prepared.onnx"
    if optimize:
        try:
            _quant().quant_pre_process(str(onnx_path), str(out))
            info["graph_optimized"] = True
        except Exception as exc:  # an optional optimisation: the unoptimised graph still quantizes
            info["optimize_error"] = _first_line(exc)
    source = out if info["graph_optimized"] else onnx_path
    return (_name_nodes(source, out) or source), info


def _name_nodes(source: Path, out: Path) -> Path | None:
    """Give unnamed nodes a name (``bckd_<op>_<index>``), so every node can be kept in float;
    the named graph is written to ``out``. None when every node already has a name."""
    onnx = require("onnx", "INT8 calibration")
    model = onnx.load(str(source))
    taken = {n.name for n in model.graph.node}
    unnamed = [(i, n) for i, n in enumerate(model.graph.node) if not n.name]
    if not unnamed:
        return None
    for i, node in unnamed:
        name = f"bckd_{node.op_type}_{i}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)
    onnx.save_model(model, str(out))
    return out


def _model_input(model: Path) -> Any:
    onnx = require("onnx", "INT8 calibration")
    graph = onnx.load(str(model), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise BckdError(f"{model.name} has {len(inputs)} inputs; bckd calibrates single-input "
                        "image models")
    return inputs[0]


def _calibration_batch(model: Path, reader: CalibrationReader) -> int:
    """The reader's batch size, or the model's own if its batch dimension is fixed."""
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in _model_input(model).type.tensor_type.shape.dim]
    if len(dims) == 4 and None not in dims[2:] and tuple(dims[2:]) != reader.preprocess.size:
        h, w = reader.preprocess.size
        raise BckdError(f"the model input is {dims[2]}x{dims[3]} but calibration images are "
                        f"preprocessed to {h}x{w}; calibrate the model its card describes")
    fixed = dims[0] if dims and dims[0] else None
    if fixed and len(reader.ids) % fixed:
        raise BckdError(f"the model has a fixed batch size of {fixed} but {len(reader.ids)} "
                        f"calibration images do not fill whole batches; use a multiple of {fixed}")
    return fixed or reader.batch_size


def _collect_ranges(model: Path, reader: CalibrationReader, method: str, opts: dict[str, Any],
                    batch: int, folder: Path) -> Any:
    """Run ORT's calibrator over the reader one batch at a time; returns its TensorsData."""
    q = _quant()
    name = _model_input(model).name
    registry = require("onnxruntime.quantization.registry", "INT8 calibration")
    ops = sorted(set(registry.QLinearOpsRegistry) | set(registry.QDQRegistry))
    calibrator = q.create_calibrator(
        model, ops, augmented_model_path=str(folder / "augmented.onnx"),
        calibrate_method=getattr(q.CalibrationMethod, METHODS[method]), extra_options=opts,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # ORT prints progress to stdout
        for x in reader.batches(batch):
            calibrator.collect_data(_OneBatch({name: x}))
        return calibrator.compute_data()


def _drop_unused_opsets(path: Path) -> None:
    """Remove opset imports no node uses (ORT's optimizer adds its own domains to every model)."""
    onnx = require("onnx", "INT8 calibration")
    model = onnx.load(str(path))
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used]
    if len(keep) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(keep)
        onnx.save_model(model, str(path))


def check_qdq_model(path: str | os.PathLike) -> None:
    """Run the full ONNX checker on a written Q/DQ model; a failure is a bug worth reporting."""
    onnx = require("onnx", "INT8 calibration")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BckdError(f"the quantized model fails the ONNX checker ({_first_line(exc)}); "
                        "report this with the FP32 model attached") from exc


def check_model_file(path: str | os.PathLike) -> None:
    """One clear line for a model file that cannot be read, before any calibration work: a
    missing file, a corrupt or truncated ONNX, an IR without its .bin or with a truncated one."""
    p = Path(path)
    if not p.is_file():
        raise BckdError(f"model file {p} not found; check the path")
    if p.suffix.lower() == ".xml":
        weights = p.with_suffix(".bin")
        if not weights.is_file():
            raise BckdError(f"{p} has no weights file {weights.name} beside it; an OpenVINO IR is "
                            "the .xml and its .bin: copy both")
        ov = require("openvino", "reading an OpenVINO IR")
        try:
            ov.Core().read_model(str(p))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            why = lines[-1] if lines else type(exc).__name__  # OpenVINO puts the reason last
            raise BckdError(f"OpenVINO cannot read {p} ({why}); the IR is truncated or corrupt: "
                            "re-export it") from exc
        return
    load_onnx_graph(p)


def source_card(onnx_path: str | os.PathLike, reader: CalibrationReader) -> dict[str, Any]:
    """The FP32 model's card, checked against the reader's preprocessing (one path, rule 2)."""
    from runtime.bare import bare_card, graph_io, is_bare

    card = read_card_or_none(onnx_path)
    if is_bare(card):  # a model bckd did not make: its I/O and the preprocessing calibrated with
        made = bare_card(onnx_path, *graph_io(onnx_path), preprocess=reader.preprocess.to_dict())
        return {**made, **(card or {}), "preprocess": made["preprocess"],
                "input_size": made["input_size"]}
    expected = Preprocess.from_dict(card["preprocess"])
    if expected != reader.preprocess:
        raise BckdError(
            f"the calibration reader preprocesses with {reader.preprocess.to_dict()} but {onnx_path} "
            f"expects {expected.to_dict()}; build the reader with CalibrationReader.for_model"
        )
    return card


def keeps_float_tail(card: dict[str, Any]) -> bool:
    """Whether the card's task keeps its postprocess tail in float under INT8 (detectors)."""
    from runtime.tasks import get_task

    return bool(get_task(card).int8_float_tail)


def int8_card(kind: str, base: dict[str, Any], source: str | os.PathLike, reader: CalibrationReader,
              quantization: dict[str, Any], calibration: dict[str, Any]) -> dict[str, Any]:
    """The card of an INT8 artifact made from ``source``: its FP32 card plus what calibration did."""
    fields = {k: v for k, v in base.items() if k not in _CARD_HEADER + _NOT_INHERITED}
    card = new_card(kind, **fields)
    card["precision"] = "int8"
    card["quantization"] = quantization
    card["calibration"] = {**reader.describe(), **calibration}
    card["source"] = {"path": str(Path(source).resolve()), "sha256": sha256_file(source)}
    return card


def quantize_onnx(onnx_path: str | os.PathLike, out: str | os.PathLike, reader: CalibrationReader,
                  *, method: str = "minmax", nodes_to_exclude: Sequence[str] = (),
                  num_bins: int | None = None, percentile: float = DEFAULT_PERCENTILE,
                  optimize: bool = True, activations: str = "int8",
                  force: bool = False) -> dict[str, Any]:
    """Quantize an FP32 ONNX (with its card) to a Q/DQ INT8 ONNX at ``out``; returns the new card.

    ``activations`` 'int8' (symmetric; TensorRT, OpenVINO, ORT) or 'uint8' (asymmetric; ONNX
    Runtime's faster kernels on x86 CPUs; TensorRT rejects it).

    ``nodes_to_exclude`` names nodes of the prepared graph to keep in float (see
    :mod:`calib.sensitivity`). ``out`` is written atomically and never replaces an existing file
    unless ``force``.
    """
    out = Path(out)
    refuse_existing(out, "INT8 ONNX file", force)
    check_activations(activations)
    base = source_card(onnx_path, reader)
    with calibrate(onnx_path, reader, method=method, num_bins=num_bins, percentile=percentile,
                   optimize=optimize, keep_tail=keeps_float_tail(base)) as cal:
        return write_qdq(cal, out, base, onnx_path, reader, nodes_to_exclude,
                         activations=activations)


# Which runtimes each Q/DQ activation form is fast (or valid) on; recorded in the card.
INTENDED_FOR = {"uint8": ["onnxruntime on x86 CPUs (U8S8 kernels)"],
                "int8": ["tensorrt", "openvino", "onnxruntime on ARM and GPUs"]}


def quantize_onnx_forms(onnx_path: str | os.PathLike, outs: dict[str, str | os.PathLike],
                        reader: CalibrationReader, *, method: str = "minmax",
                        force: bool = False) -> dict[str, dict[str, Any]]:
    """One calibration, one Q/DQ ONNX per activation form in ``outs`` ({'uint8': path,
    'int8': path}): U8S8 for ONNX Runtime on x86, symmetric S8S8 for TensorRT and OpenVINO.
    Returns the cards by form; each records the runtimes its form is for."""
    for out in outs.values():
        refuse_existing(Path(out), "INT8 ONNX file", force)
    for form in outs:
        check_activations(form)
    base = source_card(onnx_path, reader)
    cards = {}
    with calibrate(onnx_path, reader, method=method, keep_tail=keeps_float_tail(base)) as cal:
        for form, out in outs.items():
            cards[form] = write_qdq(cal, Path(out), base, onnx_path, reader, (),
                                    activations=form)
    return cards


def write_qdq(cal: Calibration, out: Path, base: dict[str, Any], onnx_path: str | os.PathLike,
              reader: CalibrationReader, nodes_to_exclude: Sequence[str],
              extra: dict[str, Any] | None = None, activations: str = "int8") -> dict[str, Any]:
    """Quantize with ``cal`` into ``out`` atomically, check it, and write its card (plus ``extra``)."""
    with atomic_path(out) as tmp:
        cal.quantize(tmp, nodes_to_exclude, activations)
        check_qdq_model(tmp)
        card = int8_card("onnx", base, onnx_path, reader,
                         qdq_description(nodes_to_exclude, cal.info, activations), cal.info)
        card["onnx"] = {**base.get("onnx", {}), "opset": _opset(tmp)}
        card.update(extra or {})
        card["tools"] = tool_versions("onnx", "onnxruntime", "numpy")
        card["sha256"] = sha256_file(tmp)
    write_card(out, card)
    return card


def qdq_description(excluded: Sequence[str], info: dict[str, Any],
                    activations: str = "int8") -> dict[str, Any]:
    """The card's ``quantization`` section for a Q/DQ ONNX."""
    return {
        "format": "qdq", "tool": "onnxruntime.quantization.quantize_static",
        "activations": {"dtype": activations, "symmetric": ACTIVATIONS[activations][1],
                        "granularity": "per-tensor"},
        "weights": {"dtype": "int8", "symmetric": True, "granularity": "per-channel"},
        "bias": "float", "excluded_nodes": list(excluded),
        "intended_for": INTENDED_FOR[activations],
        "float_tail": info.get("float_tail"),
        "graph_optimized": info.get("graph_optimized"),
    }


def _opset(path: Path) -> int:
    onnx = require("onnx", "INT8 calibration")
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
