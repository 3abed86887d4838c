"""Torch-free CUDA helpers for TensorRT: device info, device buffers, streams and event timing.

Two bindings are supported (trt-jetson.md §2.1-2.2): NVIDIA's cuda-python (what TensorRT's own
samples use from 8.6 on; imported as ``cuda.bindings.runtime`` from 12.6.1, as ``cuda.cudart``
before, the old name being gone in 13.0) and pycuda (what JetPack 5 era code uses). Both are
imported lazily; :func:`cuda_api` picks the first that imports. Every call goes through the small
:class:`CudaApi` surface so the TensorRT runner and calibrator can be tested with a fake.

:func:`device_info` is the one function the builder and the runner call to learn the GPU's name
and compute capability; tests replace it with ``monkeypatch.setattr(runtime.cuda, "device_info", ...)``.
"""
from __future__ import annotations

import ctypes
import importlib
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime.errors import BckdError

NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU an engine is built for or run on; ``l4t`` is the Jetson Linux release, if any."""

    name: str
    compute_capability: str  # "8.7"
    total_memory_mib: int | None = None
    api: str = ""
    l4t: str | None = None

    @property
    def sm(self) -> str:
        """'sm_87' for compute capability 8.7."""
        return "sm_" + self.compute_capability.replace(".", "")

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), sm=self.sm)


class CudaApi(Protocol):
    """What the TensorRT code needs from a CUDA binding; pointers and handles are Python ints."""

    name: str

    def device_info(self, device: int = 0) -> DeviceInfo: ...
    def malloc(self, nbytes: int) -> int: ...
    def free(self, ptr: int) -> None: ...
    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray: ...
    def htod(self, ptr: int, host: np.ndarray, stream: Any = None) -> None: ...
    def dtoh(self, host: np.ndarray, ptr: int, stream: Any = None) -> None: ...
    def create_stream(self) -> Any: ...
    def stream_handle(self, stream: Any) -> int: ...
    def synchronize(self, stream: Any) -> None: ...
    def destroy_stream(self, stream: Any) -> None: ...
    def create_event(self) -> Any: ...
    def record(self, event: Any, stream: Any) -> None: ...
    def elapsed_ms(self, start: Any, end: Any) -> float: ...
    def destroy_event(self, event: Any) -> None: ...


def l4t_release(path: Path = NV_TEGRA_RELEASE) -> str | None:
    """'36.4.3' from '# R36 (release), REVISION: 4.3, ...' on a Jetson; None elsewhere."""
    try:
        head = path.read_text(encoding="utf-8", errors="replace").split(",")
    except OSError:
        return None
    major = head[0].strip().lstrip("#").strip().split(" ")[0].lstrip("R")
    revision = next((p.split(":", 1)[1].strip() for p in head if "REVISION" in p), "")
    return f"{major}.{revision}" if major.isdigit() and revision else None


# -- cuda-python -----------------------------------------------------------------------------------
def _import_cudart() -> Any:
    """cuda-python's runtime module under its >= 12.6.1 name, else the old one (removed in 13.0)."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("neither cuda.bindings.runtime nor cuda.cudart imports")


class CudaPython:
    """:class:`CudaApi` over cuda-python (every call returns ``(err, *results)``)."""

    name = "cuda-python"

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart

    def _call(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(getattr(err, "value", err)) != 0:
            raise RuntimeError(f"CUDA runtime error: {err}")
        return rest[0] if len(rest) == 1 else (tuple(rest) or None)

    def device_info(self, device: int = 0) -> DeviceInfo:
        props = self._call(self.rt.cudaGetDeviceProperties(device))
        name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
        return DeviceInfo(name=name, compute_capability=f"{props.major}.{props.minor}",
                          total_memory_mib=int(props.totalGlobalMem) >> 20, api=self.name,
                          l4t=l4t_release())

    def malloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(max(nbytes, 1))))

    def free(self, ptr: int) -> None:
        self._call(self.rt.cudaFree(ptr))

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        ptr = int(self._call(self.rt.cudaMallocHost(nbytes)))
        raw = (ctypes.c_uint8 * nbytes).from_address(ptr)
        weakref.finalize(raw, self.rt.cudaFreeHost, ptr)  # freed when the last view is gone
        flat = np.frombuffer(raw, dtype=np.uint8)
        return flat[: int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def htod(self, ptr: int, host: np.ndarray, stream: Any = None) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        if stream is None:
            self._call(self.rt.cudaMemcpy(ptr, host.ctypes.data, host.nbytes, kind))
        else:
            self._call(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, stream))

    def dtoh(self, host: np.ndarray, ptr: int, stream: Any = None) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if stream is None:
            self._call(self.rt.cudaMemcpy(host.ctypes.data, ptr, host.nbytes, kind))
        else:
            self._call(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, stream))

    def create_stream(self) -> Any:
        return self._call(self.rt.cudaStreamCreate())

    def stream_handle(self, stream: Any) -> int:
        # int(cuda_obj) is deprecated in cuda-bindings 13 in favour of get_cuda_native_handle (§2.2).
        try:
            utils = importlib.import_module("cuda.bindings.utils")
            return int(utils.get_cuda_native_handle(stream))
        except (ImportError, AttributeError):
            return int(stream)

    def synchronize(self, stream: Any) -> None:
        self._call(self.rt.cudaStreamSynchronize(stream))

    def destroy_stream(self, stream: Any) -> None:
        self._call(self.rt.cudaStreamDestroy(stream))

    def create_event(self) -> Any:
        return self._call(self.rt.cudaEventCreate())

    def record(self, event: Any, stream: Any) -> None:
        self._call(self.rt.cudaEventRecord(event, stream))

    def elapsed_ms(self, start: Any, end: Any) -> float:
        self._call(self.rt.cudaEventSynchronize(end))
        return float(self._call(self.rt.cudaEventElapsedTime(start, end)))

    def destroy_event(self, event: Any) -> None:
        self._call(self.rt.cudaEventDestroy(event))


# -- pycuda ----------------------------------------------------------------------------------------
class PyCuda:
    """:class:`CudaApi` over pycuda (the primary context is made current on first use)."""

    name = "pycuda"

    def __init__(self, driver: Any) -> None:
        self.drv = driver
        self._allocs: dict[int, Any] = {}

    def device_info(self, device: int = 0) -> DeviceInfo:
        self.drv.init()
        dev = self.drv.Device(device)
        major, minor = dev.compute_capability()
        return DeviceInfo(name=str(dev.name()), compute_capability=f"{major}.{minor}",
                          total_memory_mib=int(dev.total_memory()) >> 20, api=self.name,
                          l4t=l4t_release())

    def malloc(self, nbytes: int) -> int:
        alloc = self.drv.mem_alloc(max(nbytes, 1))
        self._allocs[int(alloc)] = alloc  # pycuda frees when the DeviceAllocation is dropped
        return int(alloc)

    def free(self, ptr: int) -> None:
        alloc = self._allocs.pop(ptr, None)
        if alloc is not None:
            alloc.free()

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return self.drv.pagelocked_empty(shape, dtype)

    def htod(self, ptr: int, host: np.ndarray, stream: Any = None) -> None:
        if stream is None:
            self.drv.memcpy_htod(ptr, host)
        else:
            self.drv.memcpy_htod_async(ptr, host, stream)

    def dtoh(self, host: np.ndarray, ptr: int, stream: Any = None) -> None:
        if stream is None:
            self.drv.memcpy_dtoh(host, ptr)
        else:
            self.drv.memcpy_dtoh_async(host, ptr, stream)

    def create_stream(self) -> Any:
        return self.drv.Stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def destroy_stream(self, stream: Any) -> None:
        pass  # released with the Python object

    def create_event(self) -> Any:
        return self.drv.Event()

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(start.time_till(end))

    def destroy_event(self, event: Any) -> None:
        pass


def _load_pycuda() -> PyCuda:
    driver = importlib.import_module("pycuda.driver")
    try:  # TensorRT 8.5's samples: the primary context if this pycuda has it (§2.1)
        importlib.import_module("pycuda.autoprimaryctx")
    except ImportError:
        importlib.import_module("pycuda.autoinit")
    return PyCuda(driver)


_API: CudaApi | None = None


def cuda_api() -> CudaApi:
    """The CUDA binding to use: cuda-python if it imports, else pycuda; a BckdError if neither."""
    global _API
    if _API is None:
        errors = []
        for load in (lambda: CudaPython(_import_cudart()), _load_pycuda):
            try:
                _API = load()
                break
            except ImportError as exc:
                errors.append(str(exc))
        else:
            raise BckdError(
                f"TensorRT needs cuda-python or pycuda for device memory, and neither imports "
                f"({'; '.join(errors)}); install one: pip install cuda-python (or: pip install pycuda)"
            )
    return _API


def device_info(device: int = 0) -> DeviceInfo:
    """Name, compute capability and memory of CUDA device ``device`` (mockable in tests)."""
    return cuda_api().device_info(device)


class EventTimer:
    """GPU time between two points on a stream, measured with CUDA events (trt-jetson.md §2.5).

    Events are recorded on the inference stream itself (not the legacy default stream), so the
    time covers exactly the work queued between :meth:`start` and :meth:`stop`.
    """

    def __init__(self, api: CudaApi) -> None:
        self.api = api
        self._start = api.create_event()
        self._end = api.create_event()

    def start(self, stream: Any) -> None:
        self.api.record(self._start, stream)

    def stop(self, stream: Any) -> None:
        self.api.record(self._end, stream)

    def elapsed_ms(self) -> float:
        """Milliseconds between the last start and stop (waits for the stop event)."""
        return self.api.elapsed_ms(self._start, self._end)

    def close(self) -> None:
        for event in (self._start, self._end):
            self.api.destroy_event(event)
