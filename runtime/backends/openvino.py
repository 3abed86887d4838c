"""OpenVINO backend: runs an OpenVINO IR (.xml + .bin) or an ONNX file through ``openvino.Core``.

The inference precision is always set explicitly (``INFERENCE_PRECISION_HINT``): OpenVINO's CPU
plugin otherwise runs FP32 models in bf16 on CPUs with bf16 units (Zen 4, Sapphire Rapids), and a
measurement would be mislabelled. After compiling, the precision, thread count and request count
the compiled model actually uses are read back; those are what :meth:`describe` records, and a
device that runs another precision than the one asked for (the CPU runs an ``f16`` request as
bf16) is an error rather than a silent substitution.

An INT8 model (NNCF IR, or Q/DQ ONNX, both FakeQuantize inside OpenVINO) runs the same way; the
precision hint then applies to its non-quantized parts, and the runner reports ``int8``.
openvino is imported only when the runner is activated (architecture.md rule 6).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from runtime.backends.base import BACKENDS, Feed, InputSpec, Runner
from runtime.errors import BckdError
from runtime.lazy import require
from runtime.registry import unknown_name_message

# accepted spelling -> OpenVINO element type name of INFERENCE_PRECISION_HINT
PRECISIONS = {"f32": "f32", "fp32": "f32", "bf16": "bf16", "f16": "f16", "fp16": "f16"}
# OpenVINO type name -> the precision label used in cards and reports
REPORT_PRECISION = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
DEVICES = ("CPU", "GPU", "NPU")


@BACKENDS.register("openvino")
class OpenVinoRunner(Runner):
    """Runs an IR or ONNX model (one or several inputs and outputs) with OpenVINO on one device."""

    backend = "openvino"

    def __init__(
        self,
        artifact: str | os.PathLike,
        *,
        device: str = "CPU",
        precision: str = "f32",
        hint: str = "latency",
        threads: int | None = None,
        num_requests: int | None = None,
        shapes: dict[str, Sequence[int]] | None = None,
        card: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(artifact, card=card)
        # Static shapes to compile for, by input name (OpenVINO's reshape, benchmark_app's
        # -shape): a dynamic model compiled static runs the static kernels.
        self.shapes = {str(k): tuple(int(d) for d in v) for k, v in (shapes or {}).items()}
        self.device = _check_device(device)
        self.requested_precision = _check_precision(precision)
        self.hint = _check_hint(hint)
        self.requested_threads = _check_positive("threads", threads)
        self.num_requests = _check_positive("num_requests", num_requests)
        self.card_int8 = str((self.card or {}).get("precision", "")) == "int8"
        self.precision = _report_precision(self.requested_precision, self.card_int8)
        self.threads = threads
        self.inference_precision: str | None = None  # read back from the compiled model
        self.quantized: bool | None = None  # FakeQuantize ops found in the model
        self.optimal_requests: int | None = None
        self._compiled: Any = None
        self._request: Any = None
        self._tensor: Any = None  # openvino.Tensor, bound while active
        self._held: tuple | None = None  # the last input Tensor and the array it wraps
        self._queue: Any = None
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
        ov = require("openvino", "the openvino backend")
        core = ov.Core()
        self._check_device_available(core)
        model = self._read(core)
        if self.shapes:
            self._reshape(model)
        self._inputs = _inputs_of(model, self.artifact.name)
        self._outputs = _output_names(model)
        self.quantized = any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
        self._compiled = self._compile(core, model)
        self._read_back()
        self._request = self._compiled.create_infer_request()
        self._tensor = ov.Tensor

    def _check_device_available(self, core: Any) -> None:
        available = list(core.available_devices)  # e.g. ['CPU', 'GPU.0', 'GPU.1']
        if self.device not in available and self.device not in {d.split(".")[0] for d in available}:
            raise BckdError(
                f"OpenVINO device {self.device} is not available here (available: "
                f"{', '.join(available)}); install its driver and plugin or use device='CPU'"
            )

    def _read(self, core: Any) -> Any:
        """Read the IR or ONNX file (OpenVINO picks the frontend from the file's content)."""
        weights = self.artifact.with_suffix(".bin")
        if self.artifact.suffix == ".xml" and not weights.is_file():
            raise BckdError(
                f"OpenVINO IR {self.artifact} has no weights file {weights.name} next to it; "
                "copy the .bin with the .xml or re-convert the model"
            )
        try:
            return core.read_model(str(self.artifact))
        except RuntimeError as exc:
            raise BckdError(
                f"openvino could not read {self.artifact} ({error_reason(exc)}); check that it is a "
                "complete IR (.xml + .bin) or ONNX file, or re-export it"
            ) from exc

    def _compile(self, core: Any, model: Any) -> Any:
        try:
            return core.compile_model(model, self.device, self._config())
        except RuntimeError as exc:
            raise BckdError(
                f"openvino could not compile {self.artifact.name} for {self.device} with "
                f"{self._config()} ({error_reason(exc)}); try another precision or device"
            ) from exc

    def _config(self) -> dict[str, Any]:
        """Compile properties; the precision is always explicit (see the module docstring)."""
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": self.requested_precision,
            "PERFORMANCE_HINT": HINTS[self.hint],
        }
        if self.requested_threads is not None:
            config["INFERENCE_NUM_THREADS"] = self.requested_threads
        if self.num_requests is not None and self.hint == "throughput":
            config["PERFORMANCE_HINT_NUM_REQUESTS"] = self.num_requests
        return config

    def _read_back(self) -> None:
        """Record what the compiled model really uses; refuse a silently changed precision."""
        used = _property(self._compiled, "INFERENCE_PRECISION_HINT")
        self.inference_precision = used.get_type_name() if used is not None else None
        if self.inference_precision not in (None, self.requested_precision):
            raise BckdError(
                f"OpenVINO {self.device} runs {self.artifact.name} in {self.inference_precision} "
                f"when asked for {self.requested_precision} (the device lacks that precision); "
                f"ask for precision='{self.inference_precision}' or 'f32'"
            )
        self.threads = _property(self._compiled, "INFERENCE_NUM_THREADS")
        self.optimal_requests = _property(self._compiled, "OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        self.precision = _report_precision(self.requested_precision,
                                           self.card_int8 or bool(self.quantized))

    def _release(self) -> None:
        self._queue = None
        self._request = None
        self._held = None
        self._tensor = None
        self._compiled = None
        self._inputs = []

    def _reshape(self, model: Any) -> None:
        names = {n for port in model.inputs for n in port.get_names()}
        unknown = sorted(set(self.shapes) - names)
        if unknown:
            raise BckdError(f"{self.artifact.name} has no input {', '.join(unknown)} to reshape "
                            f"(its inputs: {', '.join(sorted(names))})")
        try:
            model.reshape({name: list(dims) for name, dims in self.shapes.items()})
        except RuntimeError as exc:
            raise BckdError(f"openvino could not reshape {self.artifact.name} to {self.shapes} "
                            f"({error_reason(exc)}); check the --shape values") from exc

    def _run(self, x: Feed) -> np.ndarray:
        if isinstance(x, dict):  # several inputs: OpenVINO copies them in
            self._held = None
            self._request.infer({k: np.ascontiguousarray(v) for k, v in x.items()})
            return self._request.get_output_tensor(0).data.copy()
        # The input is wrapped, not copied (~2 % less per call than ``infer({0: x})``, which
        # copies it and builds a dict; bench_runtime.py). A shared Tensor does not own its array,
        # and the request keeps pointing at it after the call: both stay referenced here until
        # the next call replaces them, or OpenVINO reads freed memory (seen as heap corruption).
        # The output is copied, since the next call overwrites the request's buffer.
        x = np.ascontiguousarray(x)
        tensor = self._tensor(x, shared_memory=True)
        self._held = (tensor, x)
        self._request.set_input_tensor(tensor)
        self._request.infer()
        return self._request.get_output_tensor(0).data.copy()

    def _output_names(self) -> list[str]:
        return self._outputs

    def _run_named(self, x: Feed) -> dict[str, np.ndarray]:
        first = self._run(x)  # keeps the input referenced as _run explains
        rest = {name: self._request.get_output_tensor(i).data.copy()
                for i, name in enumerate(self._outputs) if i}
        return {self._outputs[0]: first, **rest}

    def infer_async(self, batches: Sequence[np.ndarray], *, check: bool = True) -> list[np.ndarray]:
        """Run ``batches`` concurrently on an ``AsyncInferQueue``; the outputs in input order.

        The queue has ``num_requests`` jobs, or the compiled model's optimal number of requests
        (more with the throughput hint, which runs several streams). It is made on first use.
        """
        self._require_active()
        if check:
            for x in batches:
                self.check_input(x)
        queue = self.async_queue()
        results: list[Any] = [None] * len(batches)

        def done(request: Any, index: int) -> None:
            results[index] = request.get_output_tensor(0).data.copy()  # the request is reused

        queue.set_callback(done)
        for i, x in enumerate(batches):
            feed = ({k: np.ascontiguousarray(v) for k, v in x.items()} if isinstance(x, dict)
                    else {0: np.ascontiguousarray(x)})
            queue.start_async(feed, userdata=i)
        queue.wait_all()
        return results

    def async_queue(self, jobs: int | None = None) -> Any:
        """The ``AsyncInferQueue`` of ``jobs`` requests (default :attr:`jobs`), made on first use.

        For callers that drive requests themselves, such as the throughput profiler; a different
        ``jobs`` replaces the cached queue.
        """
        self._require_active()
        jobs = jobs or self.jobs
        if self._queue is None or len(self._queue) != jobs:
            ov = require("openvino", "the openvino backend")
            self._queue = ov.AsyncInferQueue(self._compiled, jobs)
        return self._queue

    @property
    def jobs(self) -> int:
        """Infer requests used by :meth:`infer_async`."""
        return self.num_requests or self.optimal_requests or 1

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update({
            "hint": self.hint,
            "inference_precision": self.inference_precision,
            "requested_precision": self.requested_precision,
            "num_requests": self.jobs if self.active else self.num_requests,
        })
        return info


def _check_device(device: str) -> str:
    name = str(device).upper()
    if name.split(".")[0] not in DEVICES:
        raise BckdError(unknown_name_message("OpenVINO device", device, list(DEVICES)))
    return name


def _check_precision(precision: str) -> str:
    """OpenVINO's type name for ``precision`` (``fp32``/``fp16`` are accepted aliases)."""
    key = str(precision).lower()
    if key not in PRECISIONS:
        raise BckdError(unknown_name_message("OpenVINO precision", precision,
                                             list(REPORT_PRECISION)))
    return PRECISIONS[key]


def _check_hint(hint: str) -> str:
    key = str(hint).lower()
    if key not in HINTS:
        raise BckdError(unknown_name_message("OpenVINO performance hint", hint, list(HINTS)))
    return key


def _check_positive(what: str, value: int | None) -> int | None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise BckdError(f"{what} must be a positive integer, got {value!r}")
    return value


def _report_precision(inference_precision: str, int8: bool) -> str:
    return "int8" if int8 else REPORT_PRECISION[inference_precision]


def _property(compiled: Any, name: str) -> Any:
    """A compiled-model property, or None where the device does not report it."""
    try:
        return compiled.get_property(name)
    except RuntimeError:
        return None


def _inputs_of(model: Any, artifact_name: str) -> list[InputSpec]:
    """The input specs of a model, in order."""
    if not model.inputs or not model.outputs:
        raise BckdError(f"{artifact_name} has {len(model.inputs)} inputs and "
                        f"{len(model.outputs)} outputs; a model needs at least one of each")
    specs = []
    for port in model.inputs:
        shape = port.partial_shape
        if shape.rank.is_dynamic:
            raise BckdError(f"{artifact_name} input '{port.any_name}' has an unknown rank; "
                            "re-export it with a fixed rank")
        dims = tuple(d.get_length() if d.is_static else None for d in shape)
        specs.append(InputSpec(port.any_name, dims, np.dtype(port.element_type.to_dtype())))
    return specs


def _output_names(model: Any) -> list[str]:
    """Output names in order; an unnamed output is called output<i>."""
    names = []
    for i, port in enumerate(model.outputs):
        try:
            names.append(port.get_any_name())
        except RuntimeError:  # OpenVINO raises when a port has no name
            names.append(f"output{i}")
    return names


def error_reason(exc: BaseException) -> str:
    """The message of an OpenVINO error without its C++ source locations (its last real line)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from", "Check '"))]
    return (useful or lines or [type(exc).__name__])[-1]
