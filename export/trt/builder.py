"""Build a serialized TensorRT engine from ONNX bytes with TensorRT's Python API.

This module applies a :class:`~export.trt.plan.BuildPlan` to TensorRT objects and nothing more:
every version decision was made in the plan. Flags are looked up by enum *name* on the installed
``tensorrt`` module, so a flag the version lacks is a loud error rather than a silently skipped
``hasattr`` check (the FP32-instead-of-FP16 trap of trt-jetson.md §1.4). APIs used: §1.2 (builder,
parser, profiles, memory pools, timing cache), §1.3 (network flags), §1.7 (calibrator), §1.9 (DLA).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from export.trt.calibrator import BatchFeed, CalibrationCache, calibration_card, make_calibrator
from export.trt.onnx_model import OnnxFacts
from export.trt.plan import BuildPlan
from runtime.backends.tensorrt import make_logger, numpy_dtype
from runtime.errors import BckdError
from runtime.files import atomic_write_bytes


def network_flag_mask(trt: Any, names: Iterable[str]) -> int:
    """The ``create_network`` bitmask for flag names, computed from the installed enum (§1.3)."""
    mask = 0
    for name in names:
        mask |= 1 << int(_enum(trt.NetworkDefinitionCreationFlag, name, "network creation flag"))
    return mask


def _enum(enum: Any, name: str, what: str) -> Any:
    try:
        return getattr(enum, name)
    except AttributeError as exc:
        # A plan that names a member the installed version lacks is a bckd bug, not a user error.
        raise RuntimeError(f"this TensorRT has no {what} {name}; the build plan does not fit the "
                           "installed version") from exc


def build_serialized(trt: Any, plan: BuildPlan, facts: OnnxFacts, onnx_bytes: bytes,
                     batches: Iterable[np.ndarray] | None = None,
                     cuda: Any = None) -> tuple[bytes, dict[str, Any]]:
    """Parse ``onnx_bytes``, configure per ``plan``, build; returns engine bytes and card fields."""
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flag_mask(trt, plan.network_flags))
    parser = trt.OnnxParser(network, logger)
    _parse(parser, onnx_bytes, facts.path)
    config = builder.create_builder_config()
    configure(trt, builder, config, plan, facts.input.name)
    cache = attach_timing_cache(config, plan.options.timing_cache)
    calibrator = _attach_calibrator(trt, builder, config, plan, facts, batches, cuda)
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.feed.close()
    _check_built(serialized, calibrator, logger, facts.path)
    if cache is not None:
        save_timing_cache(config, plan.options.timing_cache)
    extra = {"io": network_io(trt, network)}
    if calibrator is not None:
        extra["calibration"] = calibration_card(calibrator, plan.quantization)
    return bytes(serialized), extra


def _parse(parser: Any, data: bytes, path: Path) -> None:
    # path lets the parser find external weight files next to the ONNX.
    if parser.parse(data, str(path)):
        return
    errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    first = errors[0] if errors else "no error reported"
    raise BckdError(f"TensorRT's ONNX parser rejected {path.name}: {first}{more}; simplify or "
                    "re-export the model, or replace the unsupported operation")


def _parser_error(err: Any) -> str:
    node = err.node_name() if hasattr(err, "node_name") else err.node()
    return f"{err.desc()} (node {node})"


def configure(trt: Any, builder: Any, config: Any, plan: BuildPlan, input_name: str) -> None:
    """Flags, memory pool, optimization level, DLA and the optimization profile."""
    for name in plan.builder_flags:
        config.set_flag(_enum(trt.BuilderFlag, name, "builder flag"))
    for name in plan.cleared_flags:
        config.clear_flag(_enum(trt.BuilderFlag, name, "builder flag"))
    opts = plan.options
    if opts.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
    if opts.optimization_level is not None:
        config.builder_optimization_level = opts.optimization_level
    if opts.dla_core is not None:
        _use_dla(trt, builder, config, opts.dla_core)
    if plan.profile is not None:
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, plan.profile.min, plan.profile.opt, plan.profile.max)
        config.add_optimization_profile(profile)


def _use_dla(trt: Any, builder: Any, config: Any, core: int) -> None:
    cores = int(builder.num_DLA_cores)
    if core >= cores:
        raise BckdError(f"DLA core {core} does not exist: this device has {cores} DLA core(s) "
                        "(Orin Nano and Thor have none); pass a smaller dla_core or drop it")
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = core


def attach_timing_cache(config: Any, path: Path | None) -> Any:
    """Load the timing cache at ``path`` (a new one if absent) into ``config``; None without path."""
    if path is None:
        return None
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):  # ignore_mismatch=False: refuse another GPU's cache
        raise BckdError(f"timing cache {path} was made on another GPU or TensorRT version; delete "
                        "it or pass another timing_cache path")
    return cache  # must outlive the build


def save_timing_cache(config: Any, path: Path) -> None:
    atomic_write_bytes(path, bytes(config.get_timing_cache().serialize()))


def _attach_calibrator(trt: Any, builder: Any, config: Any, plan: BuildPlan, facts: OnnxFacts,
                       batches: Iterable[np.ndarray] | None, cuda: Any) -> Any:
    if plan.quantization not in ("calibrator", "calib_cache"):
        return None
    if cuda is None:
        from runtime.cuda import cuda_api

        cuda = cuda_api()
    feed = BatchFeed(batches if plan.quantization == "calibrator" else (), cuda)
    calibrator = make_calibrator(trt, feed, CalibrationCache(plan.options.calib_cache),
                                 plan.options.calib_algorithm)
    config.int8_calibrator = calibrator
    if plan.profile is not None:
        _set_calibration_profile(builder, config, plan, facts.input.name, feed.shape)
    elif feed.shape is not None and feed.shape != facts.input.shape:
        raise BckdError(f"calibration batches of shape {feed.shape} do not match the static input "
                        f"'{facts.input.name}' {facts.input.shape}; batch and resize them to it")
    return calibrator


def _set_calibration_profile(builder: Any, config: Any, plan: BuildPlan, name: str,
                             shape: tuple[int, ...] | None) -> None:
    """Calibration runs at one shape: the batches' own, or the profile's opt (§1.7)."""
    assert plan.profile is not None
    shape = shape or plan.profile.opt
    if not all(lo <= s <= hi for lo, s, hi in zip(plan.profile.min, shape, plan.profile.max)):
        raise BckdError(f"calibration batches of shape {shape} are outside the profile "
                        f"{plan.profile.render()}; resize them or widen the profile")
    profile = builder.create_optimization_profile()
    profile.set_shape(name, shape, shape, shape)
    config.set_calibration_profile(profile)


def _check_built(serialized: Any, calibrator: Any, logger: Any, path: Path) -> None:
    if calibrator is not None and calibrator.error is not None:
        raise calibrator.error
    if serialized is None:
        why = logger.errors[-1] if logger.errors else "no error reported"
        raise BckdError(f"TensorRT could not build an engine from {path.name}: {why}; check the "
                        "precision, profile and workspace options")


def network_io(trt: Any, network: Any) -> dict[str, list[dict[str, Any]]]:
    """Names, shapes (-1 = dynamic) and dtypes of the network's inputs and outputs."""
    def entry(t: Any) -> dict[str, Any]:
        return {"name": t.name, "shape": [int(d) for d in t.shape], "dtype": dtype_name(trt, t.dtype)}

    return {"inputs": [entry(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [entry(network.get_output(i)) for i in range(network.num_outputs)]}


def dtype_name(trt: Any, dtype: Any) -> str:
    """numpy's name for a TensorRT dtype ('float32'), or TensorRT's for those numpy lacks (bf16)."""
    np_dtype = numpy_dtype(trt, dtype)
    return np_dtype.name if np_dtype is not None else str(dtype).rsplit(".", 1)[-1].lower()
