"""What the TensorRT builder needs to know about an ONNX file, read with onnx (no TensorRT).

:func:`read_onnx_facts` reports the graph's inputs and outputs, whether it is explicitly quantized
(QuantizeLinear / DequantizeLinear nodes) or already carries FP16 types, its sha256 and its card.

:func:`fp16_onnx_bytes` makes the FP16 ONNX that a strongly typed network (TensorRT 11, or 10.x
with ``strongly_typed=True``) needs for an FP16 engine, since there the precision comes from the
ONNX types and the FP16 builder flag is gone (trt-jetson.md §1.4). It uses onnxconverter-common's
``convert_float_to_float16`` with ``keep_io_types=True`` (float32 inputs/outputs, so callers keep
feeding float32). NVIDIA's own route is ModelOpt AutoCast, run offline; its output is an FP16-typed
ONNX that is built as it is.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.card import card_path, read_card
from runtime.errors import BckdError
from runtime.files import sha256_file
from runtime.lazy import require

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_FLOAT16 = 10  # onnx.TensorProto.FLOAT16


@dataclass(frozen=True)
class TensorFacts:
    """A graph input or output: symbolic dims keep their names (e.g. 'batch')."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    @property
    def dynamic_axes(self) -> tuple[int, ...]:
        return tuple(i for i, d in enumerate(self.shape) if not isinstance(d, int) or d <= 0)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class OnnxFacts:
    """Facts about one ONNX file that decide how it is built."""

    path: Path
    sha256: str
    inputs: tuple[TensorFacts, ...]
    outputs: tuple[TensorFacts, ...]
    has_qdq: bool
    has_fp16: bool
    uint8_qdq: bool = False  # a QuantizeLinear with a uint8 zero point (asymmetric activations)
    card: dict[str, Any] | None = None

    @property
    def input(self) -> TensorFacts:
        """The single image input (bckd models are image -> logits)."""
        if len(self.inputs) != 1:
            names = ", ".join(t.name for t in self.inputs)
            raise BckdError(
                f"{self.path.name} has {len(self.inputs)} inputs ({names}); bckd builds "
                "single-input models (NCHW image -> logits)"
            )
        return self.inputs[0]

    def io_dict(self) -> dict[str, list[dict[str, Any]]]:
        return {"inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}


def read_onnx_facts(path: str | os.PathLike) -> OnnxFacts:
    """Read ``path``'s I/O, Q/DQ and FP16 facts, sha256 and card (None when it has no card)."""
    path = Path(path)
    proto = _load(path)
    graph = proto.graph
    initializer_names = {t.name for t in graph.initializer}
    inputs = tuple(_tensor(v) for v in graph.input if v.name not in initializer_names)
    return OnnxFacts(
        path=path, sha256=sha256_file(path), inputs=inputs,
        outputs=tuple(_tensor(v) for v in graph.output),
        has_qdq=any(n.op_type in QDQ_OPS for n in graph.node),
        has_fp16=_has_fp16(graph),
        uint8_qdq=_has_uint8_quantize(graph),
        card=read_card(path) if card_path(path).is_file() else None,
    )


def _has_uint8_quantize(graph: Any) -> bool:
    """Whether some QuantizeLinear quantizes to uint8 (its zero point initializer is UINT8)."""
    uint8 = 2  # onnx.TensorProto.UINT8
    zero_points = {t.name: t.data_type for t in graph.initializer}
    return any(n.op_type == "QuantizeLinear" and len(n.input) > 2
               and zero_points.get(n.input[2]) == uint8 for n in graph.node)


def _load(path: Path) -> Any:
    onnx = require("onnx", "reading ONNX files")
    if not path.is_file():
        raise BckdError(f"ONNX file {path} not found; check the path")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends vary by version
        raise BckdError(f"{path} is not a valid ONNX model ({_first_line(exc)}); re-export it") from exc


def _tensor(value: Any) -> TensorFacts:
    onnx = require("onnx", "reading ONNX files")
    ttype = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                 for d in ttype.shape.dim)
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type).name
    except (KeyError, ValueError, TypeError):
        dtype = onnx.TensorProto.DataType.Name(ttype.elem_type).lower()
    return TensorFacts(value.name, dims, dtype)


def _has_fp16(graph: Any) -> bool:
    """Whether the graph already carries FP16 weights, I/O or casts."""
    if any(t.data_type == _FLOAT16 for t in graph.initializer):
        return True
    values = list(graph.input) + list(graph.output) + list(graph.value_info)
    if any(v.type.tensor_type.elem_type == _FLOAT16 for v in values):
        return True
    return any(n.op_type == "Cast" and any(a.name == "to" and a.i == _FLOAT16 for a in n.attribute)
               for n in graph.node)


def fp16_help(onnx_path: Path, why: str) -> str:
    """The one-line 'what to do' for a float32 ONNX where an FP16-typed one is needed."""
    out = onnx_path.with_name(onnx_path.stem + "_fp16.onnx")
    return (
        f"{why}, and {onnx_path.name} is float32: make an FP16 ONNX with NVIDIA ModelOpt "
        f"(python -m modelopt.onnx.autocast --onnx_path {onnx_path} --output_path {out}) and build "
        "that, or install onnxconverter-common (pip install onnxconverter-common) so bckd converts it"
    )


def fp16_onnx_bytes(onnx_path: Path, why: str) -> tuple[bytes, dict[str, Any]]:
    """``onnx_path`` converted to FP16 (float32 I/O kept) and a card entry saying how."""
    onnx = require("onnx", "converting ONNX to FP16")
    try:
        float16 = importlib.import_module("onnxconverter_common.float16")
    except ImportError as exc:
        raise BckdError(fp16_help(onnx_path, why)) from exc
    converted = float16.convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    package = importlib.import_module("onnxconverter_common")
    info = {"converter": "onnxconverter_common.float16.convert_float_to_float16",
            "version": str(getattr(package, "__version__", "unknown")), "keep_io_types": True}
    return converted.SerializeToString(), info


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
