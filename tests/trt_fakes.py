"""Small stand-ins for the ``tensorrt`` module and a CUDA binding, per TensorRT version.

They model what trt-jetson.md says each version exposes (§1.1-§1.7): the enum members that exist
(EXPLICIT_BATCH gone and STRONGLY_TYPED renumbered in 11.x, FP16/INT8 flags and calibrators gone in
11.x), the name-based I/O API from 8.5 and the binding API before 10.0. A "device" is a dict of
numpy byte buffers; the fake engine computes ``output = 2 * input`` so a runner can be checked
end to end. Calls are recorded on the objects for assertions.
"""
from __future__ import annotations

import enum
import json
import types
from typing import Any

import numpy as np

from runtime.cuda import DeviceInfo
from runtime.trt_versions import parse_version

ORIN = DeviceInfo(name="Orin", compute_capability="8.7", total_memory_mib=30536, api="fake")


class FakeCuda:
    """A :class:`runtime.cuda.CudaApi` over host memory."""

    name = "fake"

    def __init__(self, device: DeviceInfo = ORIN) -> None:
        self.mem: dict[int, np.ndarray] = {}
        self._next = 0x1000
        self.device = device
        self.freed: list[int] = []
        self.events = 0

    def device_info(self, device: int = 0) -> DeviceInfo:
        return self.device

    def malloc(self, nbytes: int) -> int:
        ptr, self._next = self._next, self._next + nbytes + 256
        self.mem[ptr] = np.zeros(nbytes, np.uint8)
        return ptr

    def free(self, ptr: int) -> None:
        self.freed.append(ptr)
        del self.mem[ptr]

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.empty(shape, dtype)

    def htod(self, ptr: int, host: np.ndarray, stream: Any = None) -> None:
        self.mem[ptr][: host.nbytes] = np.frombuffer(host.tobytes(), np.uint8)

    def dtoh(self, host: np.ndarray, ptr: int, stream: Any = None) -> None:
        host[...] = self.mem[ptr][: host.nbytes].view(host.dtype).reshape(host.shape)

    def create_stream(self) -> Any:
        return "stream"

    def stream_handle(self, stream: Any) -> int:
        return 7

    def synchronize(self, stream: Any) -> None:
        pass

    def destroy_stream(self, stream: Any) -> None:
        pass

    def create_event(self) -> Any:
        self.events += 1
        return object()

    def record(self, event: Any, stream: Any) -> None:
        pass

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return 1.25

    def destroy_event(self, event: Any) -> None:
        pass


# -- the tensorrt module ----------------------------------------------------------------------
class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    Severity = Severity

    def __init__(self) -> None:
        pass


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BF16 = 7


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
       DataType.INT32: np.int32}
_FROM_ONNX = {1: DataType.FLOAT, 10: DataType.HALF}


def nptype(dt: DataType) -> type:
    if dt not in _NP:
        raise TypeError(f"no numpy type for {dt}")
    return _NP[dt]


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class FakeTensor:
    def __init__(self, name: str, shape: list[int], dtype: DataType) -> None:
        self.name, self.shape, self.dtype = name, shape, dtype


class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[FakeTensor] = []
        self.outputs: list[FakeTensor] = []

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i: int) -> FakeTensor:
        return self.inputs[i]

    def get_output(self, i: int) -> FakeTensor:
        return self.outputs[i]


class ParserError:
    def __init__(self, desc: str) -> None:
        self._desc = desc

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return 3

    def node_name(self) -> str:
        return "Conv_3"


class OnnxParser:
    """Fills the network from the ONNX bytes with onnx (records what it was given)."""

    def __init__(self, network: FakeNetwork, logger: Any) -> None:
        self.network, self.errors = network, []

    def parse(self, data: bytes, path: str | None = None) -> bool:
        import onnx

        self.parsed = (data, path)
        try:
            model = onnx.load_model_from_string(data)
        except Exception:
            self.errors = [ParserError("Failed to parse ONNX model from the given buffer")]
            return False
        if any(n.op_type == "Unsupported" for n in model.graph.node):
            self.errors = [ParserError("No importer registered for op: Unsupported")]
            return False
        self.network.inputs = [_tensor(v) for v in model.graph.input]
        self.network.outputs = [_tensor(v) for v in model.graph.output]
        return True

    num_errors = property(lambda self: len(self.errors))

    def get_error(self, i: int) -> ParserError:
        return self.errors[i]


def _tensor(value: Any) -> FakeTensor:
    tt = value.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
    return FakeTensor(value.name, shape, _FROM_ONNX.get(tt.elem_type, DataType.FLOAT))


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"+timed"


class FakeConfig:
    def __init__(self) -> None:
        self.flags_set: list[str] = []
        self.flags_cleared: list[str] = []
        self.pools: dict[Any, int] = {}
        self.profiles: list[FakeProfile] = []
        self.calibration_profile: FakeProfile | None = None
        self.int8_calibrator: Any = None
        self.timing_cache: FakeTimingCache | None = None

    def set_flag(self, flag: Any) -> None:
        self.flags_set.append(flag.name)

    def clear_flag(self, flag: Any) -> None:
        self.flags_cleared.append(flag.name)

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.pools[pool.name] = size

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_calibration_profile(self, profile: FakeProfile) -> None:
        self.calibration_profile = profile

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        return FakeTimingCache(bytes(data))

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        self.timing_cache = cache
        return cache.data != b"other-gpu"

    def get_timing_cache(self) -> FakeTimingCache:
        assert self.timing_cache is not None
        return self.timing_cache


class Builder:
    """Records the network and config; 'builds' an engine that describes its I/O as JSON."""

    last: Builder | None = None
    num_DLA_cores = 2

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        Builder.last = self

    def create_network(self, flags: int = 0) -> FakeNetwork:
        self.network = FakeNetwork(flags)
        return self.network

    def create_builder_config(self) -> FakeConfig:
        self.config = FakeConfig()
        return self.config

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> bytes | None:
        if config.int8_calibrator is not None:
            self._calibrate(config.int8_calibrator, network.inputs[0].name)
        if getattr(self, "fail", False):
            self.logger.log(Severity.ERROR, "Internal error: could not find any implementation")
            return None
        io = {"inputs": [[t.name, t.shape, int(t.dtype)] for t in network.inputs],
              "outputs": [[t.name, t.shape, int(t.dtype)] for t in network.outputs],
              "profile": [p.shapes for p in config.profiles][:1]}
        return b"fake-engine" + json.dumps(io).encode()

    def _calibrate(self, calibrator: Any, name: str) -> None:
        self.batches_seen = 0
        calibrator.get_batch_size()
        if calibrator.read_calibration_cache():
            return
        while calibrator.get_batch([name]):
            self.batches_seen += 1
        calibrator.write_calibration_cache(b"TRT-8600-EntropyCalibration2\ninput: 3c010a14\n")


class Runtime:
    deserialized = 0

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.DLA_core = -1

    def deserialize_cuda_engine(self, data: bytes) -> Any:
        Runtime.deserialized += 1
        if not data.startswith(b"fake-engine"):
            self.logger.log(Severity.ERROR, "Serialization assertion magicTagRead == kMAGIC_TAG failed")
            return None
        return FakeEngine(json.loads(data[len(b"fake-engine"):]), self._trt)


class FakeEngine:
    def __init__(self, io: dict[str, Any], trt: Any) -> None:
        self.trt = trt
        self.io = [(n, s, DataType(d), True) for n, s, d in io["inputs"]]
        self.io += [(n, s, DataType(d), False) for n, s, d in io["outputs"]]
        self.profile = io["profile"][0] if io["profile"] else {}

    # name-based API (8.5+)
    num_io_tensors = property(lambda self: len(self.io))

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0]

    def _find(self, name: str) -> tuple:
        return next(t for t in self.io if t[0] == name)

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if self._find(name)[3] else TensorIOMode.OUTPUT

    def get_tensor_shape(self, name: str) -> list[int]:
        return self._find(name)[1]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._find(name)[2]

    def get_tensor_profile_shape(self, name: str, index: int) -> list:
        return [list(s) for s in self.profile[name]]

    # binding API (< 10.0)
    num_bindings = property(lambda self: len(self.io))

    def get_binding_name(self, i: int) -> str:
        return self.io[i][0]

    def binding_is_input(self, i: int) -> bool:
        return self.io[i][3]

    def get_binding_shape(self, i: int) -> list[int]:
        return self.io[i][1]

    def get_binding_dtype(self, i: int) -> DataType:
        return self.io[i][2]

    def get_profile_shape(self, profile: int, i: int) -> list:
        return [list(s) for s in self.profile[self.io[i][0]]]

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self)


class FakeContext:
    """Output k = (2 + k) * the input's first channel, twice, computed in the fake device
    memory (a one-output engine: 2 * input)."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.shapes, self.addresses, self.calls = engine, {}, {}, []

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        (shape,) = self.shapes.values()
        return shape[:1] + (2,) + shape[2:]

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        self.calls.append(("execute_async_v3", stream))
        inp, *outs = (t[0] for t in self.engine.io)
        return all(self._compute(self.addresses[inp], self.addresses[o], self.shapes[inp], 2 + k)
                   for k, o in enumerate(outs))

    def set_binding_shape(self, index: int, shape: tuple) -> bool:
        self.shapes[index] = tuple(shape)
        return True

    def get_binding_shape(self, index: int) -> tuple:
        return self.get_tensor_shape("")

    def execute_async_v2(self, bindings: list[int], stream: int) -> bool:
        self.calls.append(("execute_async_v2", stream))
        return all(self._compute(bindings[0], b, self.shapes[0], 2 + k)
                   for k, b in enumerate(bindings[1:]))

    def _compute(self, src: int, dst: int, shape: tuple, factor: float = 2) -> bool:
        mem = self.engine.trt.cuda.mem
        n = int(np.prod(shape))
        x = mem[src][: n * 4].view(np.float32).reshape(shape)
        y = np.concatenate([factor * x[:, :1]] * 2, axis=1).astype(np.float32)
        mem[dst][: y.nbytes] = np.frombuffer(y.tobytes(), np.uint8)
        return True


def fake_tensorrt(version: str, cuda: FakeCuda | None = None) -> types.ModuleType:
    """A fake ``tensorrt`` module with the API surface of ``version``."""
    v = parse_version(version)
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.cuda = cuda or FakeCuda()
    trt.ILogger = ILogger
    trt.Logger = type("Logger", (ILogger,), {"WARNING": Severity.WARNING})
    trt.DataType, trt.TensorIOMode, trt.nptype = DataType, TensorIOMode, nptype
    trt.NetworkDefinitionCreationFlag = _network_flags(v.major)
    trt.BuilderFlag = _builder_flags(v.major)
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE DLA_MANAGED_SRAM")
    trt.DeviceType = enum.Enum("DeviceType", "GPU DLA")
    trt.OnnxParser = OnnxParser
    trt.Builder = type("Builder", (Builder,), {})
    trt.Runtime = type("Runtime", (Runtime,), {"_trt": trt})
    if v.major < 11:
        trt.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (), {"__init__": lambda s: None})
        trt.IInt8MinMaxCalibrator = type("IInt8MinMaxCalibrator", (), {"__init__": lambda s: None})
    return trt


def _network_flags(major: int) -> type[enum.IntEnum]:
    if major >= 11:  # EXPLICIT_BATCH removed, values renumbered (§1.3)
        return enum.IntEnum("NetworkDefinitionCreationFlag",
                            {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1,
                             "PREFER_AOT_PYTHON_PLUGINS": 2})
    members = {"EXPLICIT_BATCH": 0}
    if major >= 9:
        members.update(STRONGLY_TYPED=1)
    if major >= 10:
        members.update(PREFER_JIT_PYTHON_PLUGINS=2, PREFER_AOT_PYTHON_PLUGINS=3)
    return enum.IntEnum("NetworkDefinitionCreationFlag", members)


def _builder_flags(major: int) -> type[enum.Enum]:
    names = ["TF32", "GPU_FALLBACK", "REFIT", "DIRECT_IO"]
    if major < 11:
        names += ["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"]
    return enum.Enum("BuilderFlag", " ".join(names))
