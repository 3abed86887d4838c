"""Build engines with NVIDIA's ``trtexec`` instead of the Python API.

:func:`trtexec_command` turns the same :class:`~export.trt.plan.BuildPlan` the Python builder
applies into trtexec flags, per version (trt-jetson.md §3.1): ``--fp16`` / ``--int8`` only while
precision flags exist (removed in 11.x, where the ONNX types decide), ``--stronglyTyped`` for a
strongly typed 10.x build (a no-op on 11.x, so not passed there), ``--memPoolSize=workspace:N``
(MiB; ``--workspace`` is gone in 10.x), ``--builderOptimizationLevel`` from 8.6, ``--calib`` for a
legacy calibration cache. ``--best`` is never used: it enables more precisions than the Python
path's 'best' (FP16 + INT8), and the two paths must build the same thing.

Finding trtexec, reading its version and GPU from its banner, and running it are shared with the
device-side profiler, so they live in :mod:`runtime.trtexec.tool` (``runtime/`` never imports
``export/``) and are re-exported here. Parsing of the inference summary is
:mod:`runtime.trtexec.report`.
"""
from __future__ import annotations

from pathlib import Path

from export.trt.plan import BuildPlan, ShapeProfile
from runtime.errors import BckdError
from runtime.trtexec.tool import (JETSON_TRTEXEC, VERSION_TIMEOUT_S, find_trtexec,
                                  parse_trtexec_device, parse_trtexec_version, run_trtexec,
                                  shape_spec, trtexec_version)

__all__ = ["JETSON_TRTEXEC", "VERSION_TIMEOUT_S", "find_trtexec", "parse_trtexec_device",
           "parse_trtexec_version", "run_trtexec", "shape_spec", "trtexec_command",
           "trtexec_version"]


def trtexec_command(exe: str, plan: BuildPlan, onnx: Path, engine: Path, input_name: str) -> list[str]:
    """The trtexec command line that builds ``plan`` (without running inference)."""
    cmd = [exe, f"--onnx={onnx}", f"--saveEngine={engine}"]
    cmd += _shape_args(plan.profile, input_name)
    cmd += _precision_args(plan)
    cmd += _option_args(plan)
    cmd.append(plan.caps.trtexec_build_only_flag)
    return cmd


def _shape_args(profile: ShapeProfile | None, name: str) -> list[str]:
    if profile is None:
        return []
    return [f"--minShapes={shape_spec(name, profile.min)}",
            f"--optShapes={shape_spec(name, profile.opt)}",
            f"--maxShapes={shape_spec(name, profile.max)}"]


def _precision_args(plan: BuildPlan) -> list[str]:
    if plan.quantization == "calibrator":
        raise BckdError("trtexec cannot run bckd's calibrator; build with builder='python' (it also "
                        "writes calib_cache for reuse), or pass only an existing calib_cache")
    args = []
    if plan.strongly_typed and not plan.caps.strongly_typed_always:
        args.append("--stronglyTyped")
    args += [f"--{flag.lower()}" for flag in plan.builder_flags if flag in ("FP16", "INT8")]
    if plan.quantization == "calib_cache":
        args.append(f"--calib={plan.options.calib_cache}")
    if "TF32" in plan.cleared_flags:
        args.append("--noTF32")
    return args


def _option_args(plan: BuildPlan) -> list[str]:
    opts = plan.options
    args = []
    if opts.workspace_mib is not None:
        args.append(f"--memPoolSize=workspace:{opts.workspace_mib}")  # MiB without a suffix
    if opts.optimization_level is not None:
        args.append(f"--builderOptimizationLevel={opts.optimization_level}")
    if opts.timing_cache is not None:
        args.append(f"--timingCacheFile={opts.timing_cache}")  # loaded if present, then saved
    if opts.dla_core is not None:
        args.append(f"--useDLACore={opts.dla_core}")
        if opts.gpu_fallback:
            args.append("--allowGPUFallback")
    return args
