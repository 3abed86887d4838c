"""ONNX -> TensorRT engines for TensorRT 8.5+, 10.x and 11.x, with the Python API or trtexec.

Modules: :mod:`~export.trt.plan` (what a build does per version; pure), :mod:`~export.trt.builder`
(the Python API), :mod:`~export.trt.trtexec` (the trtexec command line), :mod:`~export.trt.calibrator`
(legacy INT8 calibration), :mod:`~export.trt.onnx_model` (ONNX facts, FP16 conversion),
:mod:`~export.trt.card` (the engine card) and :mod:`~export.trt.api` (:func:`build_engine`).
Version parsing and capabilities live in :mod:`runtime.trt_versions`, shared with the runner.
Nothing here imports tensorrt (or torch) at import time.
"""
from __future__ import annotations

from export.trt.api import BUILDERS, build_engine
from export.trt.plan import (CALIB_ALGORITHMS, PRECISIONS, BuildOptions, BuildPlan, ShapeProfile,
                             plan_build)
from export.trt.trtexec import trtexec_command
from runtime.trt_versions import Capabilities, TrtVersion, capabilities, parse_version, tensorrt_version

__all__ = [
    "BUILDERS", "CALIB_ALGORITHMS", "PRECISIONS", "BuildOptions", "BuildPlan", "Capabilities",
    "ShapeProfile", "TrtVersion", "build_engine", "capabilities", "parse_version", "plan_build",
    "tensorrt_version", "trtexec_command",
]
