"""ONNX -> TensorRT engine + card: :func:`build_engine`, with the Python API or with trtexec.

Torch-free: a Jetson with numpy, onnx, tensorrt and cuda-python (or pycuda) runs it. The engine
is written through a temporary file and renamed into place; an existing engine is refused unless
``force``. Both builders apply the same :class:`~export.trt.plan.BuildPlan` and write the same card.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from export.trt.card import engine_card
from export.trt.onnx_model import OnnxFacts, fp16_onnx_bytes, read_onnx_facts
from export.trt.plan import BuildOptions, BuildPlan, plan_build
from runtime import cuda
from runtime.card import write_card
from runtime.errors import BckdError
from runtime.files import atomic_path, refuse_existing
from runtime.lazy import require
from runtime.registry import unknown_name_message
from runtime.trt_versions import capabilities, parse_version

BUILDERS = ("python", "trtexec")


def build_engine(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    precision: str = "fp16",
    profile: Any = None,
    workspace_mib: int | None = None,
    timing_cache: str | os.PathLike | None = None,
    dla_core: int | None = None,
    gpu_fallback: bool = True,
    optimization_level: int | None = None,
    tf32: bool = True,
    strongly_typed: bool | None = None,
    calibrator: Iterable[np.ndarray] | None = None,
    calib_cache: str | os.PathLike | None = None,
    calib_algorithm: str = "entropy",
    builder: str = "python",
    trtexec: str | os.PathLike | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Build a TensorRT engine from ``onnx_path`` into ``out_path``; returns the engine card.

    ``profile`` is (min, opt, max) NCHW shapes (or a dict / :class:`ShapeProfile`); without it a
    dynamic input gets batch 1..8 (opt 1) at the ONNX card's input size. ``calibrator`` is any
    iterable of NCHW float32 batches for the legacy INT8 calibrator (TensorRT <= 10.x), with
    ``calib_cache`` read if present and written after; a Q/DQ ONNX needs neither. ``builder``
    is 'python' (TensorRT's Python API) or 'trtexec' (``trtexec`` from PATH or the given path).
    """
    options = BuildOptions(
        precision=precision, profile=profile, workspace_mib=workspace_mib,
        timing_cache=timing_cache, dla_core=dla_core, gpu_fallback=gpu_fallback,
        optimization_level=optimization_level, tf32=tf32, strongly_typed=strongly_typed,
        calib_cache=calib_cache, calib_algorithm=calib_algorithm,
    )
    if builder not in BUILDERS:
        raise BckdError(unknown_name_message("TensorRT builder", builder, BUILDERS))
    out_path = Path(out_path)
    refuse_existing(out_path, "TensorRT engine", force)
    facts = read_onnx_facts(onnx_path)
    if facts.uint8_qdq:
        raise BckdError(f"{facts.path.name} quantizes activations to uint8, which TensorRT's "
                        "explicit quantization rejects; recalibrate with 'bckd calib ... "
                        "--activations int8' (the default)")
    if builder == "python":
        card = _build_python(facts, options, out_path, calibrator)
    else:
        card = _build_trtexec(facts, options, out_path, calibrator, trtexec)
    write_card(out_path, card)
    return card


def _build_python(facts: OnnxFacts, options: BuildOptions, out: Path,
                  batches: Iterable[np.ndarray] | None) -> dict[str, Any]:
    from export.trt.builder import build_serialized

    trt = require("tensorrt", "building TensorRT engines")
    version = parse_version(trt.__version__)
    plan = plan_build(options, capabilities(version), facts, has_calib_data=batches is not None)
    device = cuda.device_info()
    data, fp16 = _onnx_bytes(plan, facts)
    engine, extra = build_serialized(trt, plan, facts, data, batches)
    with atomic_path(out) as tmp:
        tmp.write_bytes(engine)
        return engine_card(facts=facts, plan=plan, device=device, version=version,
                           version_text=str(trt.__version__), builder="python", engine_file=tmp,
                           io=extra.pop("io"), extra=dict(extra, fp16_onnx=fp16))


def _onnx_bytes(plan: BuildPlan, facts: OnnxFacts) -> tuple[bytes, dict[str, Any] | None]:
    if plan.fp16_onnx == "convert":
        return fp16_onnx_bytes(facts.path, _fp16_why(plan))
    return facts.path.read_bytes(), None


def _fp16_why(plan: BuildPlan) -> str:
    return (f"a strongly typed TensorRT {plan.caps.version} network takes FP16 from the ONNX types "
            "(no FP16 builder flag)")


def _build_trtexec(facts: OnnxFacts, options: BuildOptions, out: Path,
                   batches: Iterable[np.ndarray] | None,
                   exe: str | os.PathLike | None) -> dict[str, Any]:
    from export.trt import trtexec as tx

    exe = tx.find_trtexec(exe)
    version = tx.trtexec_version(exe)
    plan = plan_build(options, capabilities(version), facts, has_calib_data=batches is not None)
    log_path = out.with_name(out.name + ".trtexec.log")
    with _onnx_file(plan, facts, out) as (onnx_file, fp16), atomic_path(out) as tmp:
        cmd = tx.trtexec_command(exe, plan, onnx_file, tmp, facts.input.name)
        output = tx.run_trtexec(cmd, log_path)
        if tmp.stat().st_size == 0:
            raise BckdError(f"trtexec reported success but wrote no engine; see {log_path}")
        built = tx.parse_trtexec_version(output) or version
        device = tx.parse_trtexec_device(output) or cuda.device_info()
        return engine_card(facts=facts, plan=plan, device=device, version=built,
                           version_text=str(built), builder="trtexec", engine_file=tmp,
                           io=facts.io_dict(), extra={"fp16_onnx": fp16, "trtexec": {
                               "path": exe, "command": _portable(cmd, tmp, out), "log": str(log_path)}})


@contextlib.contextmanager
def _onnx_file(plan: BuildPlan, facts: OnnxFacts, out: Path) -> Iterator[tuple[Path, dict | None]]:
    """The ONNX file trtexec reads: the original, or a temporary FP16 conversion."""
    if plan.fp16_onnx != "convert":
        yield facts.path, None
        return
    data, info = fp16_onnx_bytes(facts.path, _fp16_why(plan))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".fp16.onnx", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.write_bytes(data)
        yield tmp, info
    finally:  # only a build input: nothing is kept
        tmp.unlink(missing_ok=True)


def _portable(cmd: list[str], tmp: Path, out: Path) -> list[str]:
    """The command as recorded: the engine's final path instead of its temporary name."""
    return [c.replace(str(tmp), str(out)) for c in cmd]
