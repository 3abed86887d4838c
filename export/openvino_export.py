"""ONNX -> OpenVINO IR conversion: ``openvino.convert_model`` + ``openvino.save_model`` with a card.

The IR is two files (``.xml`` graph, ``.bin`` weights) that ``benchmark_app`` and any OpenVINO
application load as they are. Both are written into a temporary folder next to the destination,
read back with ``Core.read_model``, and only then moved into place: the ``.bin`` first and the
``.xml`` last, so an ``.xml`` never stands next to a missing or stale ``.bin``. Weights stay FP32
unless ``compress_fp16`` is asked for (``save_model`` compresses to FP16 by default, so the choice
is always passed explicitly).

The card carries the ONNX card's fields (classes, preprocessing, input size, ...). An ONNX file
without a sidecar still converts: its embedded ``bckd.card`` metadata is used when present, and
the card notes that the model's metadata is unknown otherwise. Torch-free.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

from export.onnx_export import ExportWarning, check_onnx_file, read_onnx_card
from runtime.backends.base import load_card_if_any
from runtime.backends.openvino import error_reason
from runtime.card import card_path, new_card, tool_versions, write_card
from runtime.errors import BckdError
from runtime.files import refuse_existing, sha256_file
from runtime.lazy import require

IR_KIND = "openvino-ir"
# Fields of the ONNX card that describe the ONNX step itself, not the model.
_ONNX_ONLY = ("card_version", "kind", "created", "host", "sha256", "tools", "parity", "onnx",
              "simplified", "simplifier", "simplify_error", "simplify_skipped", "source", "notes")


def convert_to_openvino(
    onnx_path: str | os.PathLike,
    out_xml: str | os.PathLike,
    *,
    compress_fp16: bool = False,
    input_shape: Sequence[int] | None = None,
    force: bool = False,
) -> dict:
    """Convert ``onnx_path`` to an OpenVINO IR at ``out_xml`` (+ ``.bin``) and return its card.

    ``compress_fp16`` stores float weights as FP16 (inference precision is chosen at run time).
    ``input_shape`` (e.g. ``(1, 3, 512, 512)``) fixes the input shape, for devices such as NPUs
    that need static shapes; by default the ONNX file's dynamic axes stay dynamic.
    """
    onnx_path, out_xml = Path(onnx_path), Path(out_xml)
    out_bin = _check_outputs(out_xml, force)
    check_onnx_file(onnx_path)
    onnx_sha = sha256_file(onnx_path)
    base, notes = _input_card(onnx_path, onnx_sha)
    ov = require("openvino", "converting to OpenVINO IR")
    model = _convert(ov, onnx_path, input_shape)
    with _staged_ir(out_xml) as (tmp_xml, tmp_bin):
        ov.save_model(model, str(tmp_xml), compress_to_fp16=compress_fp16)
        ir_info = _verify_ir(ov, tmp_xml)
        card = _build_card(base, notes, (onnx_path, onnx_sha), ir_info, compress_fp16, input_shape)
        card["sha256"], card["bin_sha256"] = sha256_file(tmp_xml), sha256_file(tmp_bin)
        _install(tmp_xml, tmp_bin, out_xml, out_bin)
    write_card(out_xml, card)
    return card


def _check_outputs(out_xml: Path, force: bool) -> Path:
    """The ``.bin`` path for ``out_xml``; existing outputs are refused unless ``force``."""
    if out_xml.suffix != ".xml":
        raise BckdError(f"an OpenVINO IR path must end in .xml, got {out_xml}; "
                        f"use {out_xml.with_suffix('.xml')}")
    out_bin = out_xml.with_suffix(".bin")
    refuse_existing(out_xml, "OpenVINO IR", force)
    refuse_existing(out_bin, "OpenVINO IR weights", force)
    return out_bin


def _input_card(onnx_path: Path, onnx_sha: str) -> tuple[dict, list[str]]:
    """The ONNX file's card (sidecar, else embedded metadata) and notes about where it came from."""
    card = load_card_if_any(onnx_path)
    if card is not None:
        _check_card_hash(onnx_path, card, onnx_sha)
        return card, []
    card = read_onnx_card(onnx_path)
    if card is not None:
        return card, [f"no sidecar card next to {onnx_path.name}; fields taken from the card "
                      "embedded in its ONNX metadata (bckd.card)"]
    note = (f"{onnx_path.name} is a bare ONNX file (no bckd card): classes, preprocessing and "
            "input size are unknown; later commands take them from flags (--shape or --size, "
            "--mean / --std or --preprocess)")
    warnings.warn(note, ExportWarning, stacklevel=3)
    from runtime.bare import bare_card, graph_io

    bare = bare_card(onnx_path, *graph_io(onnx_path))
    return {k: bare[k] for k in ("bare", "inputs", "outputs")}, [note]


def _check_card_hash(onnx_path: Path, card: dict, onnx_sha: str) -> None:
    """A sidecar that records another file's hash does not describe this file."""
    recorded = card.get("sha256")
    if recorded and recorded != onnx_sha:
        raise BckdError(
            f"the card {card_path(onnx_path).name} records sha256 {recorded[:12]}... but "
            f"{onnx_path.name} hashes to {onnx_sha[:12]}...; the file changed after its card was "
            "written: re-export it, or delete the stale card to convert it as a bare ONNX file"
        )


def _nms_adapted(onnx_path: Path) -> Any:
    """The ONNX graph to convert: with bckd's NMS stage, the copy whose IoU threshold is moved
    one float32 step up, since OpenVINO suppresses at IoU >= threshold where ONNX Runtime (and
    the host NMS) suppress at > (export.nms_graph.for_openvino)."""
    onnx = require("onnx", "converting to OpenVINO")
    proto = onnx.load(str(onnx_path))
    if not any(n.op_type == "NonMaxSuppression" for n in proto.graph.node):
        return None
    from export.nms_graph import for_openvino

    return for_openvino(proto)


def _convert(ov: Any, onnx_path: Path, input_shape: Sequence[int] | None) -> Any:
    adapted = _nms_adapted(onnx_path)
    if adapted is not None:  # OpenVINO converts files only; its ONNX reader copies the weights
        onnx = require("onnx", "converting to OpenVINO")
        with tempfile.TemporaryDirectory(prefix="bckd-ov.") as tmp:
            path = Path(tmp) / onnx_path.name
            onnx.save_model(adapted, str(path))
            return _convert_file(ov, path, input_shape)
    return _convert_file(ov, onnx_path, input_shape)


def _convert_file(ov: Any, onnx_path: Path, input_shape: Sequence[int] | None) -> Any:
    try:
        model = ov.convert_model(str(onnx_path))
        if input_shape is not None:
            model.reshape([int(d) for d in input_shape])
    except Exception as exc:  # the frontend's failure classes derive from Exception directly
        raise BckdError(
            f"openvino could not convert {onnx_path} ({error_reason(exc)}); check that the ONNX model "
            "uses operators OpenVINO supports, or re-export it with another opset"
        ) from exc
    return model


@contextlib.contextmanager
def _staged_ir(out_xml: Path) -> Iterator[tuple[Path, Path]]:
    """Temporary ``.xml``/``.bin`` paths in a folder next to ``out_xml``, removed afterwards."""
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{out_xml.name}.", suffix=".partial",
                                   dir=out_xml.parent))
    try:
        tmp_xml = folder / out_xml.name  # save_model names the .bin after the .xml
        yield tmp_xml, tmp_xml.with_suffix(".bin")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _verify_ir(ov: Any, xml: Path) -> dict:
    """Read the written IR back; return its input/output description for the card."""
    try:
        model = ov.Core().read_model(str(xml))
    except RuntimeError as exc:
        raise BckdError(f"the IR written for {xml.name} does not load back ({error_reason(exc)}); "
                        "this is a bug, please report it with the ONNX file") from exc
    port_in, port_out = model.inputs[0], model.outputs[0]
    return {
        "input_name": port_in.any_name,
        "input_shape": _shape(port_in.partial_shape),
        "output_name": port_out.any_name,
        "output_shape": _shape(port_out.partial_shape),
        "fake_quantize_ops": sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops()),
    }


def _install(tmp_xml: Path, tmp_bin: Path, out_xml: Path, out_bin: Path) -> None:
    """Move the IR into place: the old card and .xml go first, the new .xml comes last."""
    for stale in (card_path(out_xml), out_xml):
        stale.unlink(missing_ok=True)  # only reachable with force (refused otherwise)
    os.replace(tmp_bin, out_bin)
    os.replace(tmp_xml, out_xml)


def _build_card(
    base: dict, notes: list[str], source: tuple[Path, str], ir_info: dict, compress_fp16: bool,
    input_shape: Sequence[int] | None,
) -> dict:
    """The IR card: the model fields of the ONNX card plus what this conversion did."""
    card = new_card(IR_KIND, **{k: v for k, v in base.items() if k not in _ONNX_ONLY})
    # Q/DQ ONNX becomes FakeQuantize in the IR: int8 even when a bare file says nothing.
    card["precision"] = "int8" if ir_info["fake_quantize_ops"] else str(base.get("precision", "fp32"))
    # Float weights as stored in the .bin; compute precision is a run-time choice.
    card["weights_precision"] = "fp16" if compress_fp16 else "fp32"
    card["openvino"] = {**ir_info, "compress_to_fp16": compress_fp16,
                        "static_input_shape": list(input_shape) if input_shape else None}
    card["source"] = {"path": str(source[0]), "sha256": source[1], "kind": base.get("kind")}
    card["tools"] = tool_versions("openvino", "onnx")
    card["notes"] = notes
    return card


def _shape(partial_shape: Any) -> list[int | None] | None:
    """A partial shape as a list with None for dynamic dims (None for a dynamic rank)."""
    if partial_shape.rank.is_dynamic:
        return None
    return [d.get_length() if d.is_static else None for d in partial_shape]
