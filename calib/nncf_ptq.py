"""NNCF post-training INT8 quantization for OpenVINO: an alternative to the Q/DQ ONNX route.

The FP32 model (ONNX, or OpenVINO IR ``.xml``) is read with OpenVINO, quantized by
``nncf.quantize`` over the calibration reader's images — one image per NNCF sample, so
``subset_size`` is the number of images — and saved as IR with weights kept in full precision
(``compress_to_fp16=False``: the INT8 model's float parts stay FP32). The IR gets the same
calibration card as :func:`calib.quantize.quantize_onnx`, so evaluation refuses the calibration
images. Detectors keep their float tail (every op with no weighted op downstream: box decoding,
sigmoid, the DFL integral, NMS) out of NNCF's reach through its ignored scope, as the Q/DQ route
does. openvino and nncf are imported lazily (architecture.md rule 6).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from calib.quantize import int8_card, keeps_float_tail, source_card
from calib.reader import CalibrationReader
from runtime.card import tool_versions, write_card
from runtime.errors import BckdError
from runtime.files import refuse_existing, sha256_file
from runtime.lazy import require
from runtime.registry import unknown_name_message

# bckd preset name -> nncf.QuantizationPreset member. "performance": symmetric weights and
# activations; "mixed": symmetric weights, asymmetric activations (better for non-ReLU nets).
PRESETS = {"performance": "PERFORMANCE", "mixed": "MIXED"}


def _check_out(out: Path, force: bool) -> None:
    if out.suffix != ".xml":
        raise BckdError(f"OpenVINO IR output must be an .xml path (its weights go next to it as "
                        f".bin), got {out}")
    refuse_existing(out, "OpenVINO IR", force)
    refuse_existing(out.with_suffix(".bin"), "OpenVINO IR weights", force)


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """Keep NNCF's log lines and progress bar off stdout (the CLI prints results there)."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logger.setLevel(level)


def _ignored_scope(nncf: Any, names: Sequence[str], tail: Sequence[str] = ()) -> Any:
    # validate=True: a name that matches no node is an error, not a silently ignored typo. The
    # tail names come from the model itself; NNCF's graph may omit some (shape subgraphs).
    if tail:
        return nncf.IgnoredScope(names=list(dict.fromkeys([*names, *tail])), validate=False)
    return nncf.IgnoredScope(names=list(names), validate=True) if names else None


# OpenVINO op types carrying weights (the counterpart of calib.quantize.WEIGHTED_OPS)
OV_WEIGHTED = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul")
_NOT_OPS = ("Parameter", "Result", "Constant")


def ov_float_tail(model: Any) -> list[str]:
    """Friendly names of the ops of an ov.Model with no weighted op downstream, in order."""
    ops = list(model.get_ordered_ops())
    feeds: dict[str, bool] = {}  # friendly name -> a weighted op is downstream
    for op in reversed(ops):
        hit = False
        for out in op.outputs():
            for target in out.get_target_inputs():
                node = target.get_node()
                if node.get_type_name() in OV_WEIGHTED or feeds.get(node.get_friendly_name()):
                    hit = True
        feeds[op.get_friendly_name()] = hit
    return [op.get_friendly_name() for op in ops
            if not feeds[op.get_friendly_name()] and op.get_type_name() not in OV_WEIGHTED + _NOT_OPS]


def _check_names(model: Any, names: Sequence[str]) -> None:
    known = {op.get_friendly_name() for op in model.get_ordered_ops()}
    for name in names:
        if name not in known:
            raise BckdError(unknown_name_message("node to keep in float", name, sorted(known)))


def _quantize(model: Any, reader: CalibrationReader, preset: str, ignored: Sequence[str],
              tail: Sequence[str] = ()) -> Any:
    nncf = require("nncf", "NNCF quantization for OpenVINO")
    dataset = nncf.Dataset(_OneImageItems(reader))
    if tail:
        _check_names(model, ignored)
    try:
        with _quiet_nncf():
            return nncf.quantize(
                model, dataset, preset=getattr(nncf.QuantizationPreset, PRESETS[preset]),
                subset_size=len(reader.ids), ignored_scope=_ignored_scope(nncf, ignored, tail),
            )
    except nncf.ValidationError as exc:  # e.g. an ignored_scope name that matches no node
        raise BckdError(f"NNCF refused the quantization settings ({_first_line(exc)}); "
                        "check the ignored_scope node names") from exc


class _OneImageItems:
    """The reader's images one per item, as NNCF counts samples; re-iterable."""

    def __init__(self, reader: CalibrationReader) -> None:
        self.reader = reader

    def __iter__(self) -> Iterator[Any]:
        return self.reader.batches(1)

    def __len__(self) -> int:
        return len(self.reader.ids)


def _save_ir(model: Any, out: Path) -> None:
    """Save ``model`` as IR next to ``out`` in a temporary folder, then move .bin and .xml in place."""
    ov = require("openvino", "saving OpenVINO IR")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.stem}.", suffix=".partial", dir=out.parent))
    try:
        ov.save_model(model, str(tmp / out.name), compress_to_fp16=False)
        os.replace(tmp / out.with_suffix(".bin").name, out.with_suffix(".bin"))
        os.replace(tmp / out.name, out)  # last: an .xml is only ever there with its .bin
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quantize_openvino(model_path: str | os.PathLike, out: str | os.PathLike,
                      reader: CalibrationReader, *, preset: str = "performance",
                      ignored_scope: Sequence[str] = (), force: bool = False) -> dict[str, Any]:
    """Quantize an FP32 ONNX or IR (with its card) to INT8 OpenVINO IR at ``out`` (.xml); returns its card.

    ``ignored_scope`` names nodes NNCF leaves in float (OpenVINO node names, which for an ONNX
    model are the ONNX node names).
    """
    if preset not in PRESETS:
        raise BckdError(unknown_name_message("NNCF preset", preset, list(PRESETS)))
    out = Path(out)
    _check_out(out, force)
    base = source_card(model_path, reader)
    ov = require("openvino", "NNCF quantization for OpenVINO")
    start = time.perf_counter()
    model = ov.Core().read_model(str(model_path))
    tail = ov_float_tail(model) if keeps_float_tail(base) else []
    quantized = _quantize(model, reader, preset, ignored_scope, tail)
    seconds = round(time.perf_counter() - start, 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_ir(quantized, out)
    quantization = {"format": "openvino-ir", "tool": "nncf.quantize", "preset": preset,
                    "subset_size": len(reader.ids), "ignored_scope": list(ignored_scope),
                    "compress_to_fp16": False}
    if tail:
        quantization["float_tail"] = {"rule": "no weighted layer downstream", "nodes": len(tail)}
    card = int8_card("openvino-ir", base, model_path, reader, quantization,
                     {"method": f"nncf-{preset}", "batch_size": 1, "seconds": seconds})
    card["tools"] = tool_versions("openvino", "nncf", "numpy")
    card["sha256"] = sha256_file(out)
    card["weights_sha256"] = sha256_file(out.with_suffix(".bin"))
    write_card(out, card)
    return card


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
