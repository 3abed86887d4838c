"""Torch -> ONNX export: trace, check, simplify, verify parity, and write the ONNX file with its card.

Simplification tries onnxsim, then onnxslim (:data:`SIMPLIFIERS`); the card records which one ran
or why none did. Parity compares torch with the written file under ONNX Runtime and OpenVINO (f32
inference precision, set explicitly) at a size and batch other than the traced ones; a backend that
is not installed is recorded as skipped, not failed.

The sidecar card stays the primary one; a copy is embedded in the ONNX ``metadata_props`` (key
``bckd.card``, plus a few flat keys) so a file separated from its sidecar still says what it is.
The copy excludes the file's own ``sha256``, which cannot be known before the file is written. It
is added after the parity run, and only the metadata changes: parity ran on the same graph.

This is the only place in ``export/`` that touches torch, and it imports torch inside the functions
that need it, so ``import export`` (and :func:`check_onnx_file`, :func:`read_onnx_card`) work on a
torch-free device.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from export.parity import (DEFAULT_TOL, MIN_ARGMAX_AGREEMENT, ModelFn, check_parity, combine_parity,
                           describe_failure, skipped_parity)
from runtime.backends import BACKENDS, open_runner
from runtime.card import EMBEDDED_CARD_KEY, embedded_card, new_card, tool_versions, write_card
from runtime.errors import BckdError
from runtime.files import atomic_path, refuse_existing, sha256_file
from runtime.lazy import require

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 17  # first opset with LayerNormalization; older ones split it into many small ops
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}
_CARD_HEADER = ("card_version", "kind", "created", "host")
# Backends the exported file is compared on, and the options that make the comparison exact.
PARITY_BACKENDS = ("onnxruntime", "openvino")
_PARITY_OPTIONS: dict[str, dict[str, Any]] = {"openvino": {"device": "CPU", "precision": "f32"}}
_BACKEND_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}
# ONNX metadata_props: the whole card (minus its sha256) and flat copies of the fields tools show.
METADATA_CARD_KEY = EMBEDDED_CARD_KEY
METADATA_PREFIX = "bckd."
METADATA_FLAT_FIELDS = ("kind", "arch", "task", "classes", "input_size", "preprocess", "precision")
METADATA_EXCLUDED = ("sha256",)  # the file's own hash: unknown until the file is written


class ExportWarning(UserWarning):
    """An export step degraded (simplification skipped, parity out of tolerance)."""


def export_onnx(
    model: Any,
    out_path: str | os.PathLike,
    input_size: tuple[int, int],
    *,
    card: dict | None = None,
    opset: int = 17,
    dynamic: bool = True,
    simplify: bool = True,
    parity_size: tuple[int, int] | None = None,
    parity_tol: float = DEFAULT_TOL,
    parity_agreement: float = MIN_ARGMAX_AGREEMENT,
    parity_backends: Sequence[str] = PARITY_BACKENDS,
    force: bool = False,
    nms: str = "host",
) -> dict:
    """Export ``model`` (NCHW float32 image -> (B, K, H, W) logits) to ONNX and return its card.

    The model is traced at batch 1 x ``input_size``; with ``dynamic`` the batch, height and width
    stay symbolic. Parity against each of ``parity_backends`` runs at ``parity_size`` (default: a
    different size and batch 2 when dynamic, the traced shape when static) and passes when
    max |Δlogit| <= ``parity_tol`` and the argmax agrees on >= ``parity_agreement`` of the pixels.
    A failure warns and is recorded in the card, and the artifact is still written so it can be
    inspected.

    A detector (card task ``detect`` / ``instance``; the model has ``output_names``) exports its
    raw head outputs; ``nms="graph"`` appends NMS in standard ONNX ops
    (:func:`export.nms_graph.append_nms`) with the card's ``postprocess`` settings, ``"host"``
    leaves it to the runtime. Its parity compares detections after NMS (the task's comparison).
    """
    out_path = Path(out_path)
    input_size = _size_pair(input_size, "input_size")
    parity_size, parity_batch = _parity_shape(input_size, parity_size, dynamic)
    _check_opset(opset)
    for backend in parity_backends:
        BACKENDS.get(backend)  # an unknown name fails now, not after tracing
    refuse_existing(out_path, "ONNX file", force)
    onnx = require("onnx", "exporting to ONNX")
    with _eval_mode(model):
        detector = hasattr(model, "output_names")
        if detector:
            card = _with_postprocess(dict(card or {}), nms)
            proto = _trace(model, input_size, opset, dynamic, tuple(model.output_names))
        else:
            traced_out = _traced_output_shape(model, input_size)
            proto = _trace(model, input_size, opset, dynamic)
            _pin_static_output_dims(proto, traced_out, dynamic)
        _check_proto(proto, "the traced model")
        proto, simp = simplify_model(proto) if simplify else (proto, _simplify_disabled())
        if detector and nms == "graph":
            proto = _append_nms(proto, card)
        with atomic_path(out_path) as tmp:
            onnx.save_model(proto, tmp, format="protobuf")
            parity = _parity(model, tmp, parity_size, parity_batch,
                             (parity_tol, parity_agreement), parity_backends,
                             card if detector else None)
            result = _build_card(card or {}, proto, opset, dynamic, input_size, simp, parity)
            embed_card(proto, result)
            onnx.save_model(proto, tmp, format="protobuf")
            result["sha256"] = sha256_file(tmp)
    write_card(out_path, result)
    if not parity["ok"]:
        warnings.warn(
            f"ONNX parity check failed for {out_path} ({describe_failure(parity)}); the file was "
            "written and its card records parity.ok = false", ExportWarning, stacklevel=2,
        )
    return result


def check_onnx_file(path: str | os.PathLike) -> Any:
    """Load ``path`` and run the full ONNX checker; a broken file is a user error."""
    onnx = require("onnx", "checking ONNX files")
    path = Path(path)
    if not path.is_file():
        raise BckdError(f"ONNX file {path} not found; check the path")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, but other parse failures vary by version
        raise BckdError(f"{path} is not a valid ONNX model ({_first_line(exc)}); re-export it") from exc
    try:
        _check_proto(proto, str(path))
    except BckdError as exc:
        reason = _first_line(exc.__cause__ or exc)
        raise BckdError(f"{path} is not a valid ONNX model ({reason}); re-export it") from exc
    return proto


def embed_card(proto: Any, card: dict) -> None:
    """Store ``card`` (minus :data:`METADATA_EXCLUDED`) in ``proto.metadata_props``.

    Earlier ``bckd.*`` entries are replaced; other producers' entries are kept.
    """
    kept = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    entries = {METADATA_CARD_KEY: {k: v for k, v in card.items() if k not in METADATA_EXCLUDED}}
    entries.update({METADATA_PREFIX + k: card[k] for k in METADATA_FLAT_FIELDS if k in card})
    del proto.metadata_props[:]
    for key, value in kept:
        proto.metadata_props.add(key=key, value=value)
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=json.dumps(value, sort_keys=False))


def read_onnx_card(source: str | os.PathLike | Any) -> dict | None:
    """The card embedded in an ONNX file or ModelProto, or None if it has none.

    It lacks the file's ``sha256`` (see :data:`METADATA_EXCLUDED`); the sidecar card has it.
    """
    return embedded_card(source)


# -- argument checks -------------------------------------------------------------------------------
def _size_pair(size: Any, what: str) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError) as exc:
        raise BckdError(f"{what} must be (height, width), got {size!r}") from exc
    if h < 1 or w < 1:
        raise BckdError(f"{what} must be positive, got {h}x{w}")
    return h, w


def _parity_shape(
    input_size: tuple[int, int], parity_size: tuple[int, int] | None, dynamic: bool
) -> tuple[tuple[int, int], int]:
    """Parity size and batch: a new size and batch 2 test the dynamic axes; static is fixed."""
    h, w = input_size
    if not dynamic:
        if parity_size is not None and _size_pair(parity_size, "parity_size") != input_size:
            raise BckdError(
                f"parity_size {parity_size} differs from the static input size {h}x{w}; "
                "export with dynamic axes or drop parity_size"
            )
        return input_size, 1
    if parity_size is None:
        return (h + 32, w + 64), 2  # +32 keeps divisibility by typical output strides
    return _size_pair(parity_size, "parity_size"), 2


def _check_opset(opset: int) -> None:
    high = _max_torchscript_opset()
    if not MIN_OPSET <= opset <= high:
        raise BckdError(
            f"opset {opset} is not supported; bckd exports opsets {MIN_OPSET} to {high} "
            f"(the highest the installed torch's TorchScript exporter supports); use --opset {MIN_OPSET}"
        )


def _max_torchscript_opset() -> int:
    torch = require("torch", "exporting to ONNX")
    # A private constant; 20 is its value in torch 2.x when it is absent.
    constants = getattr(torch.onnx, "_constants", None)
    return int(getattr(constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))


# -- tracing ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Put ``model`` in eval mode and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device(model: Any) -> Any:
    torch = require("torch", "exporting to ONNX")
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _traced_output_shape(model: Any, input_size: tuple[int, int]) -> list[int]:
    """Run the model once at the traced shape and check it returns full-resolution logits."""
    torch = require("torch", "exporting to ONNX")
    with torch.inference_mode():
        y = model(torch.zeros(1, 3, *input_size, device=_device(model)))
    if not isinstance(y, torch.Tensor) or y.ndim != 4 or tuple(y.shape[2:]) != input_size:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise BckdError(
            f"the model must return one (B, K, H, W) logits tensor at the input size "
            f"{input_size[0]}x{input_size[1]}, got {got}; upsample the logits inside forward()"
        )
    return list(y.shape)


def _with_postprocess(card: dict, nms: str) -> dict:
    """The card with its detector postprocess section: where NMS runs and its settings."""
    from runtime.tasks.nms import NMSSettings

    if nms not in ("host", "graph"):
        raise BckdError(f"nms must be 'host' or 'graph', got '{nms}'")
    post = dict(card.get("postprocess") or {})
    post.pop("nms", None)
    card["postprocess"] = {"nms": nms, **NMSSettings.from_dict(post).to_dict()}
    return card


def _append_nms(proto: Any, card: dict) -> Any:
    from export.nms_graph import append_nms
    from runtime.tasks.nms import NMSSettings

    post = {k: v for k, v in card["postprocess"].items() if k != "nms"}
    names = [o.name for o in proto.graph.output]
    masks = "mask_coeffs" in names
    out = append_nms(proto, NMSSettings.from_dict(post),
                     mask_coeffs="mask_coeffs" if masks else None, proto="proto" if masks else None)
    _check_proto(out, "the graph with NMS")
    return out


# Dynamic axes of a detector's raw outputs: priors grow with the input size.
DETECTOR_AXES = {"boxes": {0: "batch", 1: "priors"}, "scores": {0: "batch", 1: "priors"},
                 "mask_coeffs": {0: "batch", 1: "priors"},
                 "proto": {0: "batch", 2: "proto_height", 3: "proto_width"}}


def _trace(model: Any, input_size: tuple[int, int], opset: int, dynamic: bool,
           output_names: tuple[str, ...] = (OUTPUT_NAME,)) -> Any:
    """Trace with the TorchScript exporter (named dynamic axes) and return the ModelProto."""
    torch = require("torch", "exporting to ONNX")
    onnx = require("onnx", "exporting to ONNX")
    dummy = torch.randn(1, 3, *input_size, device=_device(model))
    axes = None
    if dynamic:
        axes = {INPUT_NAME: DYNAMIC_AXES,
                **{n: DETECTOR_AXES.get(n, DYNAMIC_AXES) for n in output_names}}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # The legacy exporter is a deliberate choice; its deprecation notice is noise here.
            warnings.simplefilter("ignore", DeprecationWarning)
            # GroupNorm's batch-size check reads a shape as a Python bool while tracing; the
            # graph does not depend on it, and parity at another size and batch checks that.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning,
                                    message="Converting a tensor to a Python boolean")
            torch.onnx.export(
                model, (dummy,), buf, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=list(output_names), dynamic_axes=axes,
                do_constant_folding=True,
            )
    except torch.onnx.OnnxExporterError as exc:
        raise BckdError(
            f"torch.onnx.export failed at opset {opset} ({_first_line(exc)}); replace the "
            "unsupported operation in the model or try a higher opset"
        ) from exc
    return onnx.load_model_from_string(buf.getvalue())


def _pin_static_output_dims(proto: Any, traced_shape: list[int], dynamic: bool) -> None:
    """Write traced sizes into non-dynamic output dims left symbolic by the exporter.

    The TorchScript exporter names the class axis after a Resize (e.g. 'Resizelogits_dim_1')
    instead of giving K, which hides the class count from every later tool.
    """
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    for axis, dim in enumerate(dims):
        if dynamic and axis in DYNAMIC_AXES:
            continue
        if not dim.HasField("dim_value"):
            dim.dim_value = traced_shape[axis]


def _check_proto(proto: Any, what: str) -> None:
    """Run the full ONNX checker (with shape inference) on an in-memory model."""
    onnx = require("onnx", "checking ONNX files")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BckdError(f"{what} fails the ONNX checker ({_first_line(exc)})") from exc


# -- simplification --------------------------------------------------------------------------------
def _onnxsim(proto: Any) -> Any:
    onnxsim = require("onnxsim", "simplifying ONNX graphs")
    # No input shapes are passed, so dynamic axes stay symbolic.
    simplified, check_ok = onnxsim.simplify(proto)
    if not check_ok:
        raise RuntimeError("onnxsim's output check failed")
    return simplified


def _onnxslim(proto: Any) -> Any:
    onnxslim = require("onnxslim", "simplifying ONNX graphs")
    # Without model_check / input shapes onnxslim only folds and fuses; dynamic axes stay symbolic.
    return onnxslim.slim(proto)


# Tried in order until one succeeds: onnxsim, then onnxslim when onnxsim is missing or fails.
SIMPLIFIERS: list[tuple[str, Callable[[Any], Any]]] = [("onnxsim", _onnxsim), ("onnxslim", _onnxslim)]


def simplify_model(proto: Any) -> tuple[Any, dict]:
    """Simplify with the first working entry of :data:`SIMPLIFIERS`; keep ``proto`` if none works.

    Returns the graph to write and the card fields ``simplified``, ``simplifier`` (the one that
    ran, or None), ``simplify_error`` (the failures met on the way, or None) and
    ``simplify_skipped`` (None here; set when simplification was turned off).
    """
    errors = []
    for name, simplifier in SIMPLIFIERS:
        try:
            # A copy, because simplifiers may edit their input and the original is the fallback.
            candidate = simplifier(copy.deepcopy(proto))
            _check_proto(candidate, f"the {name} output")
            _same_io(proto, candidate)
        except Exception as exc:  # any failure of an optional optimisation keeps the checked graph
            errors.append(f"{name}: {_first_line(exc)}")
            continue
        return candidate, {"simplified": True, "simplifier": name,
                           "simplify_error": "; ".join(errors) or None, "simplify_skipped": None}
    warnings.warn(
        f"could not simplify the ONNX graph ({'; '.join(errors)}); keeping the unsimplified graph",
        ExportWarning, stacklevel=3,
    )
    return proto, _not_simplified("; ".join(errors))


def _not_simplified(error: str) -> dict:
    return {"simplified": False, "simplifier": None, "simplify_error": error,
            "simplify_skipped": None}


def _simplify_disabled() -> dict:
    return {"simplified": False, "simplifier": None, "simplify_error": None,
            "simplify_skipped": "turned off by the caller (simplify=False)"}


def _same_io(before: Any, after: Any) -> None:
    """A simplifier must keep the graph's input and output names and ranks."""
    def io_of(p: Any) -> list[tuple[str, int]]:
        values = list(p.graph.input) + list(p.graph.output)
        return [(v.name, len(v.type.tensor_type.shape.dim)) for v in values]

    if io_of(before) != io_of(after):
        raise RuntimeError(f"changed the graph inputs/outputs {io_of(before)} -> {io_of(after)}")


# -- parity and card -------------------------------------------------------------------------------
def _parity(
    model: Any, onnx_path: Path, size: tuple[int, int], batch: int,
    limits: tuple[float, float], backends: Sequence[str], detector_card: dict | None = None,
) -> dict:
    """Compare the torch model with the written ONNX file on each backend (the card's ``parity``).

    A detector (``detector_card`` given) is compared on its detections after NMS: torch's raw
    outputs through host NMS against the backend's outputs (raw, or NMS in the graph).
    """
    reference = _torch_reference(model)
    results = {b: _backend_parity(b, reference, onnx_path, size, batch, limits, detector_card)
               for b in backends}
    return combine_parity(results, reference="torch")


def _detection_parity(reference: ModelFn, runner: Any, size: tuple[int, int], batch: int,
                      card: dict, backend: str) -> dict:
    from export.parity import PARITY_SEED, random_input
    from runtime.tasks import get_task

    x = random_input(batch, 3, size, PARITY_SEED)
    head = {"backend": backend, "size": list(size), "batch": batch, "seed": PARITY_SEED}
    try:
        candidate = runner.run(x)
    except Exception as exc:  # an artifact that cannot run at this shape fails parity
        return {**head, "ok": False, "error": f"the candidate failed to run: {_first_line(exc)}"}
    result = get_task(card).compare(reference(x), candidate, card)
    if not result["ok"] and "error" not in result:
        result["error"] = (f"detections agree on {result['detection_agreement']:.4%} / "
                           f"{result['reverse_agreement']:.4%} (need "
                           f"{result['min_detection_agreement']:.1%})")
    return {**head, **result}


def _torch_reference(model: Any) -> ModelFn:
    """The torch side of parity; it runs once and is reused for every backend (same input)."""
    torch = require("torch", "exporting to ONNX")
    device = _device(model)
    cache: dict[bytes, dict] = {}

    def reference(x: np.ndarray) -> dict:
        key = repr(x.shape).encode() + x.tobytes()
        if key not in cache:
            cache.clear()
            with torch.inference_mode():
                y = model(torch.from_numpy(x).to(device))
            names = getattr(model, "output_names", None)
            cache[key] = ({n: t.float().cpu().numpy() for n, t in zip(names, y)} if names
                          else {OUTPUT_NAME: y.float().cpu().numpy()})
        return cache[key]

    return reference


def _backend_parity(
    backend: str, reference: ModelFn, onnx_path: Path, size: tuple[int, int], batch: int,
    limits: tuple[float, float], detector_card: dict | None = None,
) -> dict:
    """One backend's parity result; skipped when its package is not installed."""
    try:
        require(_BACKEND_MODULES.get(backend, backend), f"{backend} parity")
    except BckdError as exc:
        return skipped_parity(backend, str(exc))
    # card={} because the temporary file has no sidecar yet.
    runner = open_runner(backend, onnx_path, card={}, **_PARITY_OPTIONS.get(backend, {}))
    try:
        runner.activate()
    except BckdError as exc:  # a backend that cannot load the file fails parity, with the reason
        return {"backend": backend, "ok": False, "error": f"could not load the model: {exc}"}
    with runner:
        if detector_card is not None:
            result = _detection_parity(reference, runner, size, batch, detector_card, backend)
        else:
            result = check_parity(reference, lambda x: {OUTPUT_NAME: runner.infer(x)}, size=size,
                                  batch=batch, tol=limits[0], min_agreement=limits[1],
                                  backend=backend)
        result["runner"] = {k: v for k, v in runner.describe().items() if k != "artifact"}
    return result


def _dynamic_axes(proto: Any) -> dict[str, dict[str, str]]:
    """Per graph input/output, its symbolic dims (index -> name); a segmentor's logits share
    the input's batch/height/width names."""
    axes = {str(a): n for a, n in DYNAMIC_AXES.items()}
    result = {INPUT_NAME: axes}
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        result[out.name] = axes if out.name == OUTPUT_NAME else {
            str(i): d.dim_param for i, d in enumerate(dims) if d.dim_param}
    return result


def _build_card(
    base: dict, proto: Any, opset: int, dynamic: bool,
    input_size: tuple[int, int], simp: dict, parity: dict,
) -> dict:
    """The ONNX card (without its ``sha256``): the training card's fields plus this export."""
    fields = {k: v for k, v in base.items() if k not in _CARD_HEADER}
    card = new_card("onnx", **fields)
    card.setdefault("input_size", list(input_size))
    card["onnx"] = {
        "opset": opset,
        "dynamic_axes": _dynamic_axes(proto) if dynamic else {},
        "input_name": INPUT_NAME,
        "output_name": proto.graph.output[0].name,
        "output_names": [o.name for o in proto.graph.output],
        "input_shape": _graph_shape(proto.graph.input[0]),
        "output_shape": _graph_shape(proto.graph.output[0]),
        "traced_size": list(input_size),
    }
    card.update(simp)
    card["precision"] = "fp32"
    source = _source_entry(base.get("source"))
    if source is not None:
        card["source"] = source
    card["tools"] = tool_versions("torch", "onnx", "onnxruntime", "onnxsim", "onnxslim", "openvino")
    card["parity"] = parity
    return card


def _graph_shape(value: Any) -> list[int | str]:
    """A graph input/output shape with symbolic dims as their names."""
    return [d.dim_value if d.HasField("dim_value") else d.dim_param
            for d in value.type.tensor_type.shape.dim]


def _source_entry(source: Any) -> dict | None:
    """``{path, sha256}`` of the checkpoint the model came from, hashing it if no hash is given."""
    if source is None:
        return None
    entry = {"path": str(source)} if isinstance(source, (str, os.PathLike)) else dict(source)
    if entry.get("sha256"):
        return entry
    path = Path(entry.get("path", ""))
    if not path.is_file():
        raise BckdError(
            f"the card's source {str(path)!r} is not a file and carries no sha256; pass the "
            "checkpoint's path (or its sha256) in card['source']"
        )
    entry["sha256"] = sha256_file(path)
    return entry


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
