"""What a TensorRT build will do, decided before TensorRT is touched (pure, unit-tested).

:class:`BuildOptions` holds the user's choices, validated once. :func:`plan_build` combines them
with the TensorRT version's :class:`~runtime.trt_versions.Capabilities` and the ONNX file's facts
into a :class:`BuildPlan`: network-creation flags, builder flags, where INT8 scales come from and
whether an FP16 ONNX is needed. The Python builder and the trtexec command line both apply the same
plan, so the two paths cannot drift apart, and every refusal happens here with one clear line.

Precision per version (trt-jetson.md §1.3, §1.4, §1.7):

=========  ==============================  ===============================================
precision  TensorRT 8.5 - 10.x (weak)      strongly typed (11.x, or 10.x strongly_typed)
=========  ==============================  ===============================================
fp32       no flag                         float32 ONNX
fp16       FP16 flag                       FP16-typed ONNX (given, or converted)
int8       INT8 flag + Q/DQ ONNX, or the   Q/DQ ONNX only
           legacy calibrator / its cache
best       FP16 + INT8 flags (as int8)     refused: the ONNX types decide
=========  ==============================  ===============================================
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from export.trt.onnx_model import OnnxFacts, TensorFacts
from runtime.errors import BckdError
from runtime.registry import unknown_name_message
from runtime.trt_versions import Capabilities, require_buildable

PRECISIONS = ("fp32", "fp16", "int8", "best")
CALIB_ALGORITHMS = ("entropy", "minmax")
DEFAULT_MAX_BATCH = 8  # the derived profile's batch range is 1..8 (opt 1)


# -- shapes ----------------------------------------------------------------------------------------
def parse_shape(value: str | Sequence[int]) -> tuple[int, ...]:
    """'1x3x512x512' or a sequence of ints -> a shape tuple."""
    try:
        dims = value.lower().split("x") if isinstance(value, str) else list(value)
        return tuple(int(d) for d in dims)
    except (TypeError, ValueError) as exc:
        raise BckdError(f"shape {value!r} is not like 1x3x512x512") from exc


@dataclass(frozen=True)
class ShapeProfile:
    """An optimization profile for the (single) input: min <= opt <= max, dim by dim."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise BckdError(f"profile shapes {self.render()} must all have the same rank")
        if not all(0 < a <= b <= c for a, b, c in zip(self.min, self.opt, self.max)):
            raise BckdError(f"profile shapes {self.render()} must satisfy 0 < min <= opt <= max "
                            "in every dim")

    @classmethod
    def parse(cls, value: ShapeProfile | Mapping[str, Any] | Sequence[Any]) -> ShapeProfile:
        """From a ShapeProfile, {'min','opt','max'} or (min, opt, max) of '1x3x64x64' or int lists."""
        if isinstance(value, ShapeProfile):
            return value
        if isinstance(value, Mapping):
            if set(value) != {"min", "opt", "max"}:
                raise BckdError(f"a profile needs exactly the keys min, opt, max; got {sorted(value)}")
            value = (value["min"], value["opt"], value["max"])
        if isinstance(value, str) or len(value) != 3:
            raise BckdError(f"a profile is (min, opt, max) shapes, got {value!r}")
        return cls(*(parse_shape(v) for v in value))

    @classmethod
    def static(cls, shape: Sequence[int]) -> ShapeProfile:
        s = tuple(int(d) for d in shape)
        return cls(s, s, s)

    @property
    def is_static(self) -> bool:
        return self.min == self.opt == self.max

    def render(self) -> str:
        return " / ".join("x".join(map(str, s)) for s in (self.min, self.opt, self.max))

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def card_input_size(card: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """(H, W) from a model card's ``input_size`` or ``preprocess.size``."""
    card = card or {}
    size = card.get("input_size") or (card.get("preprocess") or {}).get("size")
    return (int(size[0]), int(size[1])) if size else None


def resolve_profile(inp: TensorFacts, user: Any, card: Mapping[str, Any] | None, *,
                    dla: bool) -> ShapeProfile | None:
    """The profile to build with: the user's (checked), or derived; None for a fully static input."""
    if user is not None:
        return _check_user_profile(inp, ShapeProfile.parse(user), dla)
    if not inp.dynamic_axes:
        return None
    return _derive_profile(inp, card_input_size(card), dla)


def _check_user_profile(inp: TensorFacts, prof: ShapeProfile, dla: bool) -> ShapeProfile:
    if len(prof.min) != len(inp.shape):
        raise BckdError(f"profile {prof.render()} has rank {len(prof.min)} but input '{inp.name}' "
                        f"{_render(inp.shape)} has rank {len(inp.shape)}")
    for axis, dim in enumerate(inp.shape):
        if axis not in inp.dynamic_axes and {prof.min[axis], prof.max[axis]} != {dim}:
            raise BckdError(f"profile {prof.render()} changes dim {axis} of input '{inp.name}' "
                            f"{_render(inp.shape)}, which is fixed at {dim} in the ONNX")
    if dla and not prof.is_static:
        raise BckdError(f"DLA has no dynamic shapes: profile {prof.render()} must have "
                        "min = opt = max (trt-jetson.md §1.9)")
    return prof


def _derive_profile(inp: TensorFacts, size: tuple[int, int] | None, dla: bool) -> ShapeProfile:
    lo, opt, hi = [], [], []
    for axis, dim in enumerate(inp.shape):
        if axis not in inp.dynamic_axes:
            rng = (dim, dim, dim)
        elif axis == 0:
            rng = (1, 1, 1 if dla else DEFAULT_MAX_BATCH)
        elif axis in (2, 3) and len(inp.shape) == 4 and size is not None:
            rng = (size[axis - 2],) * 3
        else:
            raise BckdError(
                f"input '{inp.name}' {_render(inp.shape)} has dynamic dim {axis} and no card input "
                "size to fix it; pass a profile (min/opt/max shapes, e.g. 1x3x512x512)"
            )
        for out, value in zip((lo, opt, hi), rng):
            out.append(value)
    return ShapeProfile(tuple(lo), tuple(opt), tuple(hi))


def _render(shape: Sequence[int | str]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


# -- options ---------------------------------------------------------------------------------------
def _optional_path(value: str | os.PathLike | None) -> Path | None:
    return Path(value) if value is not None else None


@dataclass(frozen=True)
class BuildOptions:
    """The user's build choices; invalid values are BckdErrors at construction."""

    precision: str = "fp16"
    profile: ShapeProfile | None = None
    workspace_mib: int | None = None       # None: TensorRT's default (all device memory)
    timing_cache: Path | None = None       # loaded if present, saved after the build
    dla_core: int | None = None
    gpu_fallback: bool = True              # layers DLA cannot run go to the GPU
    optimization_level: int | None = None  # builder optimization level 0-5 (TensorRT 8.6+)
    tf32: bool = True                      # TensorRT's default; False for strict FP32
    strongly_typed: bool | None = None     # None: the version's default (weak <= 10.x, strong on 11)
    calib_cache: Path | None = None
    calib_algorithm: str = "entropy"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BckdError(unknown_name_message("TensorRT precision", self.precision, PRECISIONS))
        if self.calib_algorithm not in CALIB_ALGORITHMS:
            raise BckdError(unknown_name_message("calibration algorithm", self.calib_algorithm,
                                                 CALIB_ALGORITHMS))
        _positive("workspace_mib", self.workspace_mib)
        if self.dla_core is not None and self.dla_core < 0:
            raise BckdError(f"dla_core must be 0 or more, got {self.dla_core}")
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise BckdError(f"optimization_level must be 0 to 5 (TensorRT's default is 3), "
                            f"got {self.optimization_level}")
        for name in ("timing_cache", "calib_cache"):
            object.__setattr__(self, name, _optional_path(getattr(self, name)))
        if self.profile is not None:
            object.__setattr__(self, "profile", ShapeProfile.parse(self.profile))

    def to_card(self) -> dict[str, Any]:
        return {
            "precision": self.precision, "workspace_mib": self.workspace_mib,
            "timing_cache": _str(self.timing_cache), "dla_core": self.dla_core,
            "gpu_fallback": self.gpu_fallback if self.dla_core is not None else None,
            "optimization_level": self.optimization_level, "tf32": self.tf32,
            "strongly_typed": self.strongly_typed, "calib_cache": _str(self.calib_cache),
            "calib_algorithm": self.calib_algorithm,
        }


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise BckdError(f"{name} must be a positive number of MiB, got {value}")


def _str(path: Path | None) -> str | None:
    return str(path) if path is not None else None


# -- the plan --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildPlan:
    """How one ONNX file is built with one TensorRT version (flags are enum member names)."""

    caps: Capabilities
    options: BuildOptions
    profile: ShapeProfile | None
    strongly_typed: bool
    network_flags: tuple[str, ...]
    builder_flags: tuple[str, ...]
    cleared_flags: tuple[str, ...]
    quantization: str          # none | qdq | calibrator | calib_cache
    fp16_onnx: str | None      # None | typed (the ONNX is FP16 already) | convert
    notes: tuple[str, ...] = field(default=())

    def to_card(self) -> dict[str, Any]:
        return {
            "network": "strongly_typed" if self.strongly_typed else "weakly_typed",
            "network_flags": list(self.network_flags), "builder_flags": list(self.builder_flags),
            "cleared_flags": list(self.cleared_flags), "quantization": self.quantization,
            "fp16_onnx": self.fp16_onnx, "notes": list(self.notes),
        }


def plan_build(options: BuildOptions, caps: Capabilities, facts: OnnxFacts, *,
               has_calib_data: bool = False) -> BuildPlan:
    """Decide flags, typing and INT8 source for ``facts`` under ``caps``; refuse what cannot work."""
    require_buildable(caps)
    strong = _strongly_typed(options, caps)
    _check_version_options(options, caps)
    profile = resolve_profile(facts.input, options.profile, facts.card,
                              dla=options.dla_core is not None)
    quant = _quantization(options, caps, facts, strong, has_calib_data)
    _check_dla(options, caps, quant)
    fp16_onnx = _fp16_source(options, facts, strong)
    return BuildPlan(
        caps=caps, options=options, profile=profile, strongly_typed=strong,
        network_flags=_network_flags(caps, strong),
        builder_flags=_builder_flags(options, strong),
        cleared_flags=() if options.tf32 else ("TF32",),
        quantization=quant, fp16_onnx=fp16_onnx, notes=_notes(caps, strong, quant),
    )


def _strongly_typed(options: BuildOptions, caps: Capabilities) -> bool:
    if caps.strongly_typed_always:
        if options.strongly_typed is False:
            raise BckdError(f"TensorRT {caps.version} networks are always strongly typed; "
                            "drop strongly_typed=False")
        return True
    if options.strongly_typed and not caps.strongly_typed_flag:
        raise BckdError(f"strongly typed networks need TensorRT 9.0+, this is {caps.version}; "
                        "drop strongly_typed")
    return bool(options.strongly_typed)


def _check_version_options(options: BuildOptions, caps: Capabilities) -> None:
    if options.optimization_level is not None and not caps.builder_optimization_level:
        raise BckdError(f"builder optimization levels need TensorRT 8.6+, this is {caps.version}; "
                        "drop optimization_level")


def _network_flags(caps: Capabilities, strong: bool) -> tuple[str, ...]:
    # Computed from enum names, never bit values: 11.x renumbered the enum (§1.3).
    if caps.explicit_batch_flag:
        return ("EXPLICIT_BATCH",)
    return ("STRONGLY_TYPED",) if strong and not caps.strongly_typed_always else ()


def _builder_flags(options: BuildOptions, strong: bool) -> tuple[str, ...]:
    flags = []
    if not strong and options.precision in ("fp16", "best"):
        flags.append("FP16")
    if not strong and options.precision in ("int8", "best"):
        flags.append("INT8")
    if options.dla_core is not None and options.gpu_fallback:
        flags.append("GPU_FALLBACK")
    return tuple(flags)


def _quantization(options: BuildOptions, caps: Capabilities, facts: OnnxFacts, strong: bool,
                  has_data: bool) -> str:
    """Where INT8 scales come from: none, qdq (the ONNX), calibrator (data) or calib_cache."""
    legacy = has_data or options.calib_cache is not None
    name = facts.path.name
    if options.precision not in ("int8", "best"):
        if facts.has_qdq:
            raise BckdError(f"{name} has Q/DQ nodes (explicit INT8); build it with precision='int8'")
        if legacy:
            raise BckdError(f"calibration data or a calibration cache was given for a "
                            f"{options.precision} build; pass precision='int8' or drop them")
        return "none"
    if strong and options.precision == "best":
        raise BckdError("precision 'best' needs builder precision flags, which a strongly typed "
                        "network has not: the ONNX types decide; pass precision='int8' with a Q/DQ ONNX")
    if facts.has_qdq:
        if legacy:
            raise BckdError(f"{name} has Q/DQ nodes, which carry their own INT8 scales; drop the "
                            "calibration data / calibration cache")
        return "qdq"
    return _legacy_source(options, caps, strong, has_data, name)


def _legacy_source(options: BuildOptions, caps: Capabilities, strong: bool, has_data: bool,
                   name: str) -> str:
    qdq_hint = "quantize it to a Q/DQ ONNX first (bckd calib) and build that"
    if not caps.legacy_calibrator:
        raise BckdError(f"TensorRT {caps.version} removed implicit INT8 calibration (calibrators and "
                        f"calibration caches) and {name} has no Q/DQ nodes; {qdq_hint}")
    if strong:
        raise BckdError(f"a strongly typed network takes INT8 only from Q/DQ nodes and {name} has "
                        f"none; {qdq_hint}, or drop strongly_typed to use the legacy calibrator")
    if has_data:
        return "calibrator"
    if options.calib_cache is not None and options.calib_cache.is_file():
        return "calib_cache"
    missing = f" ({options.calib_cache} does not exist)" if options.calib_cache else ""
    raise BckdError(f"INT8 needs scales and {name} has no Q/DQ nodes{missing}; {qdq_hint}, or give "
                    "calibration batches (calibrator=...) or an existing calib_cache")


def _check_dla(options: BuildOptions, caps: Capabilities, quant: str) -> None:
    if options.dla_core is None:
        return
    if not caps.dla:
        raise BckdError(f"TensorRT {caps.version} has no DLA support (absent in 11.0-11.3); build "
                        "without dla_core or use TensorRT 10.x (JetPack 6 / 7.2) or 11.4+")
    if options.precision == "fp32":
        raise BckdError("DLA runs FP16 or INT8 only; pass precision='fp16' or 'int8' with dla_core")
    if quant == "qdq" and not caps.strongly_typed_always:
        raise BckdError(f"DLA on TensorRT {caps.version} takes INT8 only from implicit calibration, "
                        "not Q/DQ nodes (trt-jetson.md §1.9); build the float ONNX with "
                        "calibrator=... or calib_cache=..., or drop dla_core")


def _fp16_source(options: BuildOptions, facts: OnnxFacts, strong: bool) -> str | None:
    if not strong:
        return None
    if options.precision == "fp16":
        return "typed" if facts.has_fp16 else "convert"
    if options.precision == "fp32" and facts.has_fp16:
        raise BckdError(f"{facts.path.name} carries FP16 types, which a strongly typed network "
                        "builds as typed; pass precision='fp16' or give a float32 ONNX")
    return None


def _notes(caps: Capabilities, strong: bool, quant: str) -> tuple[str, ...]:
    notes = []
    if caps.precision_flags_deprecated and not strong:
        notes.append(f"precision builder flags are deprecated in TensorRT {caps.version} "
                     "(superseded by strong typing)")
    if quant in ("calibrator", "calib_cache") and caps.legacy_calibrator_deprecated:
        notes.append(f"implicit INT8 calibration is deprecated in TensorRT {caps.version} "
                     "(superseded by Q/DQ)")
    return tuple(notes)
