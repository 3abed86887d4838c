"""TensorRT backend: runs a serialized engine built on this device, with its card checked first.

Engines are not portable across TensorRT versions or GPUs (trt-jetson.md §1.11), and a mismatched
engine fails deep inside TensorRT. So before deserializing, :func:`check_engine_card` compares the
engine's card (TensorRT version, GPU name, compute capability) with this device and fails with one
line that says how to rebuild. A card-less engine (e.g. from a bare trtexec run) is loaded as is.

I/O uses the name-based API where it exists (8.5+: ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``; §1.1, §1.5) and the binding API (``execute_async_v2``) only before that
(JetPack 4.6 / 5.0.2). Device memory, streams and CUDA-event timing go through
:mod:`runtime.cuda` (cuda-python or pycuda). tensorrt is imported only when the runner activates.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from runtime import cuda
from runtime.backends.base import BACKENDS, InputSpec, Runner
from runtime.errors import BckdError
from runtime.lazy import require
from runtime.trt_versions import Capabilities, TrtVersion, capabilities, parse_version

ENGINE_KIND = "tensorrt-engine"
log = logging.getLogger("bckd.tensorrt")


# -- shared with the builder -----------------------------------------------------------------------
def make_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that forwards to Python logging and keeps error messages."""

    class BckdLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error(msg)
            elif level == int(trt.ILogger.Severity.WARNING):
                log.warning(msg)
            else:
                log.debug(msg)

    return BckdLogger()


def numpy_dtype(trt: Any, dtype: Any) -> np.dtype | None:
    """numpy's dtype for a TensorRT dtype; None for those numpy lacks (bf16, fp8, int4)."""
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        return None


def rebuild_hint(card: dict[str, Any] | None) -> str:
    source = ((card or {}).get("source") or {}).get("path") or "model.onnx"
    return f"rebuild it here with `bckd export {source} --format tensorrt`"


# -- card checks (pure) ----------------------------------------------------------------------------
def check_engine_card(card: dict[str, Any], version: TrtVersion, device: cuda.DeviceInfo, *,
                      artifact: str = "the engine", allow_other_gpu: bool = False) -> None:
    """Raise unless the engine's card matches this TensorRT version and GPU."""
    if card.get("kind") != ENGINE_KIND:
        raise BckdError(f"the card of {artifact} is a '{card.get('kind')}' card, not a TensorRT "
                        f"engine card; {rebuild_hint(card)}")
    built, dev = card.get("tensorrt") or {}, card.get("device") or {}
    if not built.get("version") or not dev.get("compute_capability"):
        raise BckdError(f"the card of {artifact} lacks the TensorRT version or GPU it was built "
                        f"for; {rebuild_hint(card)}")
    built_version = parse_version(built["version"])
    same_build = (built_version.release == version.release
                  and dev["compute_capability"] == device.compute_capability)
    if same_build and (dev.get("name") == device.name or allow_other_gpu):
        return
    sm = "sm_" + str(dev["compute_capability"]).replace(".", "")
    other = "; or pass allow_other_gpu=True to try it on this GPU of the same architecture"
    raise BckdError(
        f"engine {artifact} was built with TensorRT {built_version} on {dev.get('name')} ({sm}); "
        f"this device has TensorRT {version} on {device.name} ({device.sm}): "
        f"{rebuild_hint(card)}{other if same_build else ''}"
    )


def check_in_profile(shape: Sequence[int], profile: Sequence[Sequence[int]] | None,
                     artifact: str) -> None:
    """Raise if ``shape`` is outside the engine's [min, max] optimization profile."""
    if profile is None:
        return
    lo, _, hi = (tuple(int(d) for d in s) for s in profile)
    if all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
        return
    raise BckdError(
        f"input shape {_dims(shape)} is outside the profile of {artifact} (min {_dims(lo)}, "
        f"max {_dims(hi)}); resize the input or rebuild the engine with a profile that covers it"
    )


def _dims(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


# -- I/O APIs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """One engine I/O tensor; ``index`` is its binding index (binding API only)."""

    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: np.dtype
    index: int = -1


class NamedIo:
    """The name-based I/O API of TensorRT 8.5+ (§1.5)."""

    def __init__(self, trt: Any, engine: Any) -> None:
        self.trt, self.engine = trt, engine

    def tensors(self) -> list[TensorInfo]:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        return [self._info(n) for n in names]

    def _info(self, name: str) -> TensorInfo:
        e = self.engine
        return TensorInfo(name, e.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT,
                          tuple(int(d) for d in e.get_tensor_shape(name)),
                          _dtype(self.trt, e.get_tensor_dtype(name), name))

    def profile(self, t: TensorInfo) -> Any:
        return self.engine.get_tensor_profile_shape(t.name, 0) if -1 in t.shape else None

    def prepare(self, context: Any, inp: TensorInfo, outs: Sequence[TensorInfo],
                shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Set the input shape; return the output shapes it implies."""
        if not context.set_input_shape(inp.name, shape):
            raise BckdError(f"TensorRT rejected input shape {shape} for '{inp.name}'")
        return [tuple(int(d) for d in context.get_tensor_shape(o.name)) for o in outs]

    def execute(self, context: Any, addresses: dict[str, int], stream: int) -> bool:
        for name, ptr in addresses.items():
            context.set_tensor_address(name, ptr)
        return bool(context.execute_async_v3(stream))


class BindingIo:
    """The binding-index API of TensorRT < 8.5 (removed in 10.0; §1.6)."""

    def __init__(self, trt: Any, engine: Any) -> None:
        self.trt, self.engine = trt, engine
        self._tensors: list[TensorInfo] | None = None

    def tensors(self) -> list[TensorInfo]:
        if self._tensors is None:
            self._tensors = self._read_tensors()
        return self._tensors

    def _read_tensors(self) -> list[TensorInfo]:
        e = self.engine
        return [TensorInfo(e.get_binding_name(i), bool(e.binding_is_input(i)),
                           tuple(int(d) for d in e.get_binding_shape(i)),
                           _dtype(self.trt, e.get_binding_dtype(i), e.get_binding_name(i)), i)
                for i in range(e.num_bindings)]

    def profile(self, t: TensorInfo) -> Any:
        return self.engine.get_profile_shape(0, t.index) if -1 in t.shape else None

    def prepare(self, context: Any, inp: TensorInfo, outs: Sequence[TensorInfo],
                shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        if not context.set_binding_shape(inp.index, shape):
            raise BckdError(f"TensorRT rejected input shape {shape} for '{inp.name}'")
        return [tuple(int(d) for d in context.get_binding_shape(o.index)) for o in outs]

    def execute(self, context: Any, addresses: dict[str, int], stream: int) -> bool:
        tensors = self.tensors()
        bindings = [0] * len(tensors)
        for t in tensors:
            bindings[t.index] = addresses[t.name]
        return bool(context.execute_async_v2(bindings, stream))


def io_api(caps: Capabilities) -> type[NamedIo] | type[BindingIo]:
    return NamedIo if caps.name_based_io else BindingIo


def _dtype(trt: Any, dtype: Any, name: str) -> np.dtype:
    np_dtype = numpy_dtype(trt, dtype)
    if np_dtype is None:
        raise BckdError(f"engine tensor '{name}' has type {dtype}, which numpy cannot hold; "
                        "rebuild with float32/float16 I/O")
    return np_dtype


# -- buffers ---------------------------------------------------------------------------------------
class _Slot:
    """A pinned host array and a device buffer for one tensor; device memory only grows."""

    def __init__(self, api: cuda.CudaApi, dtype: np.dtype) -> None:
        self.api, self.dtype = api, dtype
        self.host: np.ndarray | None = None
        self.ptr: int | None = None
        self.capacity = 0

    def ensure(self, shape: tuple[int, ...]) -> None:
        if self.host is None or self.host.shape != shape:
            self.host = self.api.pinned(shape, self.dtype)
        if self.host.nbytes > self.capacity:
            self.free()
            self.ptr, self.capacity = self.api.malloc(self.host.nbytes), self.host.nbytes

    def free(self) -> None:
        if self.ptr is not None:
            self.api.free(self.ptr)
        self.ptr, self.capacity = None, 0


# -- runner ----------------------------------------------------------------------------------------
@BACKENDS.register("tensorrt")
class TensorRTRunner(Runner):
    """Runs a single-input TensorRT engine on CUDA device 0 (or its DLA core); every output is
    returned by name (a detector's boxes, scores, ... or its NMS layout).

    ``cuda_events=True`` times each inference's GPU work (H2D, compute, D2H excluded) with CUDA
    events on the inference stream and keeps it in :attr:`last_gpu_ms`.
    """

    backend = "tensorrt"

    def __init__(self, artifact: str | os.PathLike, *, allow_other_gpu: bool = False,
                 cuda_events: bool = False, card: dict[str, Any] | None = None) -> None:
        super().__init__(artifact, card=card)
        self.allow_other_gpu = allow_other_gpu
        self.cuda_events = cuda_events
        self.dla_core: int | None = ((self.card or {}).get("device") or {}).get("dla_core")
        self.device = f"dla:{self.dla_core}" if self.dla_core is not None else "cuda:0"
        self.last_gpu_ms: float | None = None
        self._state: dict[str, Any] = {}
        self._input: TensorInfo | None = None
        self._outputs: list[TensorInfo] = []

    @property
    def input_spec(self) -> InputSpec:
        self._require_active()
        assert self._input is not None
        shape = tuple(d if d >= 0 else None for d in self._input.shape)
        return InputSpec(self._input.name, shape, self._input.dtype)

    def _load(self) -> None:
        trt = require("tensorrt", "the tensorrt backend")
        version = parse_version(trt.__version__)
        if self.card:  # before deserializing: a mismatch would fail inside TensorRT
            check_engine_card(self.card, version, cuda.device_info(), artifact=self.artifact.name,
                              allow_other_gpu=self.allow_other_gpu)
        api = cuda.cuda_api()
        runtime, engine = self._deserialize(trt)
        io = io_api(capabilities(version))(trt, engine)
        self._input, self._outputs = _engine_io(io.tensors(), self.artifact.name)
        context = engine.create_execution_context()
        if context is None:
            raise BckdError(f"TensorRT could not create an execution context for {self.artifact} "
                            "(out of device memory?); close other GPU programs and retry")
        self._state = {
            "trt": trt, "runtime": runtime, "engine": engine, "io": io, "context": context,
            "api": api, "stream": api.create_stream(), "profile": io.profile(self._input),
            "slots": (_Slot(api, self._input.dtype),
                      [_Slot(api, o.dtype) for o in self._outputs]),
            "timer": cuda.EventTimer(api) if self.cuda_events else None,
        }

    def _deserialize(self, trt: Any) -> tuple[Any, Any]:
        logger = make_logger(trt)
        runtime = trt.Runtime(logger)
        if self.dla_core is not None:
            runtime.DLA_core = int(self.dla_core)  # must be set before deserializing (§1.5)
        engine = runtime.deserialize_cuda_engine(self.artifact.read_bytes())
        if engine is None:
            why = logger.errors[-1] if logger.errors else "no error reported"
            raise BckdError(f"TensorRT could not load engine {self.artifact} ({why}); engines load "
                            f"only with the TensorRT version and GPU that built them: "
                            f"{rebuild_hint(self.card)}")
        return runtime, engine  # the runtime must outlive the engine

    def _release(self) -> None:
        s = self._state
        if s:
            for slot in (s["slots"][0], *s["slots"][1]):
                slot.free()
            if s["timer"] is not None:
                s["timer"].close()
            s["api"].destroy_stream(s["stream"])
        self._state = {}  # drops context, engine, runtime in that order of references
        self._input, self._outputs = None, []

    def _output_names(self) -> Sequence[str]:
        return [o.name for o in self._outputs]

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._run_named(x)[self._outputs[0].name]

    def _run_named(self, x: np.ndarray) -> dict[str, np.ndarray]:
        s = self._state
        assert self._input is not None and self._outputs
        x = np.ascontiguousarray(x)
        check_in_profile(x.shape, s["profile"], self.artifact.name)
        shapes = s["io"].prepare(s["context"], self._input, self._outputs, tuple(x.shape))
        src, dsts = s["slots"]
        src.ensure(tuple(x.shape))
        for dst, shape in zip(dsts, shapes):
            dst.ensure(shape)
        src.host[...] = x
        self._enqueue(s, src, dsts)
        # copies: the pinned buffers are reused by the next call
        return {o.name: dst.host.copy() for o, dst in zip(self._outputs, dsts)}

    def _enqueue(self, s: dict[str, Any], src: _Slot, dsts: Sequence[_Slot]) -> None:
        api, stream, timer = s["api"], s["stream"], s["timer"]
        assert self._input is not None and self._outputs
        api.htod(src.ptr, src.host, stream)
        if timer is not None:
            timer.start(stream)
        addresses = {self._input.name: src.ptr}
        addresses.update((o.name, dst.ptr) for o, dst in zip(self._outputs, dsts))
        ok = s["io"].execute(s["context"], addresses, api.stream_handle(stream))
        if timer is not None:
            timer.stop(stream)
        for dst in dsts:
            api.dtoh(dst.host, dst.ptr, stream)
        api.synchronize(stream)
        if not ok:
            raise RuntimeError(f"TensorRT failed to enqueue inference for {self.artifact.name}")
        if timer is not None:
            self.last_gpu_ms = timer.elapsed_ms()


def _engine_io(tensors: list[TensorInfo], name: str) -> tuple[TensorInfo, list[TensorInfo]]:
    """The one input and the outputs (in engine order) of an engine."""
    inputs = [t for t in tensors if t.is_input]
    outputs = [t for t in tensors if not t.is_input]
    if len(inputs) != 1 or not outputs:
        raise BckdError(f"{name} has {len(inputs)} inputs and {len(outputs)} outputs; bckd runs "
                        "single-input image engines with at least one output")
    return inputs[0], outputs
