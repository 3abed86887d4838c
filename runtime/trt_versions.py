"""TensorRT versions and what each one offers: the single place that dispatches on the version.

Every API difference the builder, the trtexec path and the runner care about is a field of
:class:`Capabilities`, computed from the version alone (pure, so it is unit-tested for 8.5, 8.6,
10.0, 10.12 and 11.x without TensorRT installed). Facts and sources: shared/design/trt-jetson.md
(§1.1 API table, §1.3 network flags, §1.4 precision flags, §1.7 calibrators, §1.9 DLA, §3.1 trtexec).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from runtime.errors import BckdError

MIN_BUILD_VERSION = (8, 5)  # JetPack 5.1: first with the name-based I/O API (§1.1)

_DOTTED = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?(?:\.(\d+))?")
_TOKEN = re.compile(r"^v?(\d{4,6})$")


class TrtVersion(NamedTuple):
    """A TensorRT version; ``build`` is the fourth component (e.g. 30 in 10.3.0.30), 0 if unknown."""

    major: int
    minor: int
    patch: int = 0
    build: int = 0

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @property
    def release(self) -> tuple[int, int, int]:
        """(major, minor, patch): what must match for an engine to load (build numbers may differ)."""
        return (self.major, self.minor, self.patch)


def parse_version(text: str | int) -> TrtVersion:
    """Parse '10.3.0.30', '8.5.2', 'v100300' / '8001' (trtexec's integer token) into a version.

    The integer token is major*10000+minor*100+patch from 10.0 on (``v100200`` = 10.2.0) and
    major*1000+minor*100+patch before (``v8400`` = 8.4.0) (trt-jetson.md §3.2).
    """
    s = str(text).strip()
    if m := _TOKEN.match(s):
        n = int(m.group(1))
        if n >= 100000:
            return TrtVersion(n // 10000, n % 10000 // 100, n % 100)
        return TrtVersion(n // 1000, n % 1000 // 100, n % 100)
    if m := _DOTTED.match(s):
        return TrtVersion(*(int(g) if g else 0 for g in m.groups()))
    raise BckdError(f"cannot read a TensorRT version from {s!r}; "
                    "expected e.g. '10.3.0' or 'v100300'")


def tensorrt_version() -> TrtVersion:
    """The version of the installed ``tensorrt`` Python package (a BckdError if it is missing)."""
    from runtime.lazy import require

    return parse_version(require("tensorrt", "building or running TensorRT engines").__version__)


@dataclass(frozen=True)
class Capabilities:
    """Which API path bckd uses for one TensorRT version (True = available and used)."""

    version: str
    build_supported: bool           # bckd builds engines from 8.5 on
    name_based_io: bool             # set_input_shape / set_tensor_address / execute_async_v3 (8.5+)
    explicit_batch_flag: bool       # EXPLICIT_BATCH needed (8.x/9.x); ignored in 10, gone in 11
    strongly_typed_flag: bool       # NetworkDefinitionCreationFlag.STRONGLY_TYPED (9.0+)
    strongly_typed_always: bool     # 11.x: precision comes from the ONNX types, flag ignored
    precision_flags: bool           # BuilderFlag.FP16 / INT8 exist (removed in 11.0)
    precision_flags_deprecated: bool  # 10.12 - 10.x: still work, superseded by strong typing
    legacy_calibrator: bool         # IInt8EntropyCalibrator2 / MinMax (removed in 11.0)
    legacy_calibrator_deprecated: bool  # 10.1+
    memory_pool_limit: bool         # IBuilderConfig.set_memory_pool_limit (8.4+)
    builder_optimization_level: bool  # IBuilderConfig.builder_optimization_level (8.6+)
    dla: bool                       # DLA exists in the API: <= 10.x and 11.4+ (absent 11.0-11.3)
    trtexec_build_only_flag: str    # --buildOnly (8.5) / --skipInference (8.6+)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def capabilities(version: TrtVersion | str) -> Capabilities:
    """The API path for ``version`` (pure: no TensorRT import)."""
    v = version if isinstance(version, TrtVersion) else parse_version(version)
    mm = (v.major, v.minor)
    return Capabilities(
        version=str(v),
        build_supported=mm >= MIN_BUILD_VERSION,
        name_based_io=mm >= (8, 5),
        explicit_batch_flag=v.major < 10,
        strongly_typed_flag=v.major >= 9,
        strongly_typed_always=v.major >= 11,
        precision_flags=v.major < 11,
        precision_flags_deprecated=(10, 12) <= mm < (11, 0),
        legacy_calibrator=v.major < 11,
        legacy_calibrator_deprecated=(10, 1) <= mm < (11, 0),
        memory_pool_limit=mm >= (8, 4),
        builder_optimization_level=mm >= (8, 6),  # [UNCONFIRMED in trt-jetson.md; 8.6 release notes]
        dla=v.major < 11 or mm >= (11, 4),
        # 8.5's flag is an [UNCONFIRMED] guess: --buildOnly exists there (perhaps as a deprecated
        # alias); --skipInference is what 8.6.1 scripts use.
        trtexec_build_only_flag="--skipInference" if mm >= (8, 6) else "--buildOnly",
    )


def require_buildable(caps: Capabilities) -> None:
    """Refuse versions bckd does not build with (before 8.5: JetPack 4.x and 5.0.2)."""
    if not caps.build_supported:
        raise BckdError(
            f"TensorRT {caps.version} is too old: bckd builds engines with TensorRT 8.5 or newer "
            "(JetPack 5.1+ ships 8.5.2); upgrade JetPack or install a newer TensorRT"
        )
