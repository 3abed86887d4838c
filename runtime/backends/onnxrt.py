"""ONNX Runtime backend: runs an ONNX file through an ``InferenceSession``.

onnxruntime is imported only when the runner is activated (architecture.md rule 6). A provider the
installed onnxruntime does not offer, or one it silently drops at session creation, is an error:
ONNX Runtime would otherwise fall back to the CPU and the measurement would be mislabelled.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from runtime.backends.base import BACKENDS, Feed, InputSpec, Runner
from runtime.errors import BckdError
from runtime.lazy import require
from runtime.registry import unknown_name_message

# user-facing level name -> onnxruntime.GraphOptimizationLevel member
GRAPH_OPTIMIZATION_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

# ONNX tensor element type string (as ORT reports it) -> numpy dtype
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


@BACKENDS.register("onnxruntime")
class OnnxRuntimeRunner(Runner):
    """Runs an ONNX model (one or several inputs and outputs) with ONNX Runtime."""

    backend = "onnxruntime"
    concurrent_infer = True  # InferenceSession.run is thread-safe and releases the GIL

    def __init__(
        self,
        artifact: str | os.PathLike,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        graph_optimization: str = "all",
        provider_options: Sequence[dict[str, Any]] | None = None,
        card: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(artifact, card=card)
        if graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise BckdError(
                unknown_name_message("graph optimization level", graph_optimization,
                                     list(GRAPH_OPTIMIZATION_LEVELS))
            )
        if threads is not None and threads < 1:
            raise BckdError(f"threads must be a positive integer, got {threads}")
        self.providers = list(providers or DEFAULT_PROVIDERS)
        if provider_options is not None and len(provider_options) != len(self.providers):
            raise BckdError(
                f"got {len(provider_options)} provider_options for {len(self.providers)} providers "
                f"{self.providers}; pass one options dict per provider"
            )
        self.provider_options = list(provider_options) if provider_options is not None else None
        self.graph_optimization = graph_optimization
        self.requested_threads = threads
        # ORT picks its own intra-op pool size when unset; os.cpu_count() is what we record then.
        self.threads = threads if threads is not None else os.cpu_count()
        self.device = _device_name(self.providers[0], (self.provider_options or [{}])[0])
        self._session: Any = None
        self._inputs: list[InputSpec] = []
        self._outputs: list[str] = []

    @property
    def input_spec(self) -> InputSpec:
        self._require_active()
        return self._inputs[0]

    @property
    def input_specs(self) -> list[InputSpec]:
        self._require_active()
        return list(self._inputs)

    def _load(self) -> None:
        ort = require("onnxruntime", "the onnxruntime backend")
        self._check_providers_available(ort)
        self._session = self._create_session(ort)
        self._check_providers_active()
        self._inputs, self._outputs = _io(self._session, self.artifact.name)

    def _create_session(self, ort: Any) -> Any:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION_LEVELS[self.graph_optimization]
        )
        if self.requested_threads is not None:
            opts.intra_op_num_threads = self.requested_threads
        try:
            return ort.InferenceSession(
                str(self.artifact), sess_options=opts, providers=self.providers,
                provider_options=self.provider_options,
            )
        except _ort_load_errors() as exc:
            raise BckdError(
                f"onnxruntime could not load {self.artifact} ({_load_reason(exc)}); "
                "check that it is a complete ONNX file, or re-export it"
            ) from exc

    def _check_providers_available(self, ort: Any) -> None:
        available = ort.get_available_providers()
        for name in self.providers:
            if name in available:
                continue
            if name in ort.get_all_providers():  # a real provider this onnxruntime build lacks
                raise BckdError(
                    f"onnxruntime execution provider {name} is not in this onnxruntime build "
                    f"(available: {', '.join(available)}); install the onnxruntime package that "
                    "provides it (e.g. onnxruntime-gpu for CUDA/TensorRT)"
                )
            raise BckdError(unknown_name_message("onnxruntime execution provider", name,
                                                 ort.get_all_providers()))

    def _check_providers_active(self) -> None:
        # ORT logs and falls back to CPU when a requested provider fails to initialise.
        active = self._session.get_providers()
        missing = [p for p in self.providers if p not in active]
        if missing:
            raise BckdError(
                f"onnxruntime did not enable {', '.join(missing)} for {self.artifact.name} "
                f"(running on {', '.join(active)}); check the provider's libraries and options"
            )

    def _release(self) -> None:
        self._session = None
        self._inputs = []

    def _output_names(self) -> list[str]:
        return self._outputs

    def _feed(self, x: Feed) -> dict[str, np.ndarray]:
        if isinstance(x, dict):
            return {k: np.ascontiguousarray(v) for k, v in x.items()}
        return {self._inputs[0].name: np.ascontiguousarray(x)}

    def _run(self, x: Feed) -> np.ndarray:
        return self._session.run(self._outputs[:1], self._feed(x))[0]

    def _run_named(self, x: Feed) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self._session.run(self._outputs, self._feed(x))))


def _ort_load_errors() -> tuple[type[BaseException], ...]:
    """ORT's load-time exception classes (they do not derive from RuntimeError)."""
    state = require("onnxruntime.capi.onnxruntime_pybind11_state", "the onnxruntime backend")
    names = ("InvalidProtobuf", "Fail", "NoSuchFile", "InvalidGraph", "InvalidArgument",
             "NotImplemented")
    return tuple(getattr(state, n) for n in names if hasattr(state, n)) + (RuntimeError,)


def _load_reason(exc: BaseException) -> str:
    """The useful part of an ORT load error: its first line after '... failed:'."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line.split("failed:", 1)[1].strip() if "failed:" in line else line


def _io(session: Any, artifact_name: str) -> tuple[list[InputSpec], list[str]]:
    """The input specs and the output names of a session."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if not inputs or not outputs:
        raise BckdError(f"{artifact_name} has {len(inputs)} inputs and {len(outputs)} outputs; "
                        "a model needs at least one of each")
    specs = []
    for inp in inputs:
        if inp.type not in _ORT_DTYPES:
            raise BckdError(f"{artifact_name} input '{inp.name}' has unsupported type {inp.type}")
        # ORT reports symbolic dims as strings (or None when unnamed).
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in inp.shape)
        specs.append(InputSpec(inp.name, shape, np.dtype(_ORT_DTYPES[inp.type])))
    return specs, [o.name for o in outputs]


def _device_name(provider: str, options: dict[str, Any]) -> str:
    """A short device label for the first (preferred) provider."""
    short = provider.removesuffix("ExecutionProvider").lower()
    if short == "cpu":
        return "cpu"
    device_id = options.get("device_id")
    return f"{short}:{device_id}" if device_id is not None else short
