"""bckd export stage: turn a trained student into deployable artifacts with their model cards.

Importing this package is torch-free: only the torch -> ONNX step (:func:`export_onnx`) imports
torch, inside the functions that trace the model, so ONNX checking and the later ONNX -> OpenVINO /
TensorRT conversions run on a device without torch.
"""
from __future__ import annotations

from export.onnx_export import (SIMPLIFIERS, ExportWarning, check_onnx_file, export_onnx,
                                read_onnx_card, simplify_model)
from export.openvino_export import convert_to_openvino
from export.parity import check_parity, combine_parity, compare_output

__all__ = [
    "SIMPLIFIERS",
    "ExportWarning",
    "check_onnx_file",
    "check_parity",
    "combine_parity",
    "compare_output",
    "convert_to_openvino",
    "export_onnx",
    "read_onnx_card",
    "simplify_model",
]
