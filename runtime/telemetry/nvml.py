"""NVIDIA GPU energy, temperature and clock-event reasons through NVML (``pynvml``, loaded lazily).

Energy comes from ``nvmlDeviceGetTotalEnergyConsumption`` (a cumulative mJ counter) read at the
window's ends where the GPU supports it; otherwise from ``nvmlDeviceGetPowerUsage`` (mW) samples
taken every ``poll_s`` seconds and integrated with the trapezoid rule, clipped to the window. The
driver may itself average the power reading, so the fallback smooths short bursts.

The same polling thread records the GPU temperature (its peak is reported) and the clock event /
throttle reason bitmask, OR-ed over the window and decoded into the names pynvml defines (e.g.
``SwPowerCap``, ``HwSlowdown``, ``SwThermalSlowdown``, and ``GpuIdle``, which is not throttling).

Scope: the GPU board as NVML reports it, not the host CPU or the rest of the machine. Without
``pynvml`` (``pip install nvidia-ml-py``) or a GPU the source is unavailable, with the reason.
"""
from __future__ import annotations

import threading
import time
from types import ModuleType
from typing import Any, Callable

from runtime.errors import BckdError
from runtime.lazy import require
from runtime.telemetry.base import Telemetry, integrate_power, summarise

_THROTTLE_FUNCTIONS = ("nvmlDeviceGetCurrentClocksEventReasons",
                       "nvmlDeviceGetCurrentClocksThrottleReasons")  # new name, then old
_REASON_PREFIXES = ("nvmlClocksEventReason", "nvmlClocksThrottleReason")


def load_pynvml(module: ModuleType | None = None) -> ModuleType:
    """``module`` if given (tests), else ``pynvml`` through :func:`runtime.lazy.require`."""
    return module if module is not None else require("pynvml", "GPU power telemetry (NVML)")


def nvml_unavailable(module: ModuleType | None = None, device_index: int = 0) -> str | None:
    """None when NVML can open GPU ``device_index``, else why not."""
    try:
        nv = load_pynvml(module)
    except BckdError as exc:
        return str(exc)
    try:
        nv.nvmlInit()
    except nv.NVMLError as exc:
        return f"NVML could not initialise (no NVIDIA driver or GPU?): {exc}"
    try:
        count = nv.nvmlDeviceGetCount()
    finally:
        nv.nvmlShutdown()
    if device_index >= count:
        return f"NVML sees {count} GPU(s); there is no device {device_index}"
    return None


def reason_names(nv: ModuleType, mask: int) -> list[str]:
    """The pynvml names of the single-bit clock event / throttle reasons set in ``mask``."""
    names: dict[int, str] = {}
    for attr in sorted(dir(nv)):
        prefix = next((p for p in _REASON_PREFIXES if attr.startswith(p)), None)
        value = getattr(nv, attr) if prefix else None
        if isinstance(value, int) and value > 0 and value & (value - 1) == 0:
            names.setdefault(value, attr[len(prefix):])
    return sorted(name for bit, name in names.items() if mask & bit)


class NvmlMeter(Telemetry):
    """NVML energy of one GPU over the window; see the module docstring."""

    source = "nvml"

    def __init__(self, *, device_index: int = 0, poll_s: float = 0.05,
                 module: ModuleType | None = None) -> None:
        super().__init__()
        self.nv = load_pynvml(module)
        self.device_index, self.poll_s = device_index, poll_s
        self.device_name: str | None = None
        self.failures: dict[str, str] = {}  # metric -> first reason it could not be read
        self.trace: list[tuple[float, float | None, float | None, int | None]] = []
        self._energy_mj: list[int | None] = [None, None]
        self._handle: Any = None
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._throttle_fn = next((f for f in _THROTTLE_FUNCTIONS if hasattr(self.nv, f)),
                                 _THROTTLE_FUNCTIONS[-1])

    def _call(self, metric: str, name: str, *args: Any) -> Any:
        fn: Callable | None = getattr(self.nv, name, None)
        if fn is None:
            self.failures.setdefault(metric, f"this pynvml has no {name}")
            return None
        try:
            return fn(self._handle, *args)
        except self.nv.NVMLError as exc:
            self.failures.setdefault(metric, f"{name}: {exc}")
            return None

    def start(self) -> None:
        nv = self.nv
        try:
            nv.nvmlInit()
            self._handle = nv.nvmlDeviceGetHandleByIndex(self.device_index)
        except nv.NVMLError as exc:
            raise BckdError(f"NVML cannot open GPU {self.device_index}: {exc}; check the NVIDIA "
                            "driver or use telemetry 'none'") from exc
        name = nv.nvmlDeviceGetName(self._handle)
        self.device_name = name.decode() if isinstance(name, bytes) else str(name)
        self._energy_mj[0] = self._call("energy_counter", "nvmlDeviceGetTotalEnergyConsumption")
        self._sample()  # one sample before the window opens, to bracket it
        self._thread = threading.Thread(target=self._poll, name="nvml-poll", daemon=True)
        self._thread.start()
        self.t_start = time.monotonic()

    def _sample(self) -> None:
        t = time.monotonic()
        milliwatts = self._call("power", "nvmlDeviceGetPowerUsage")
        temp = self._call("temperature", "nvmlDeviceGetTemperature", self.nv.NVML_TEMPERATURE_GPU)
        mask = self._call("throttling", self._throttle_fn)
        self.trace.append((t, None if milliwatts is None else milliwatts / 1000, temp, mask))

    def _poll(self) -> None:
        while not self._halt.wait(self.poll_s):
            self._sample()

    def stop(self) -> None:
        self.t_stop = time.monotonic()
        self._energy_mj[1] = self._call("energy_counter", "nvmlDeviceGetTotalEnergyConsumption")
        self._halt.set()
        self._thread.join()
        self._sample()  # one sample after the window closes
        self.nv.nvmlShutdown()

    def _energy(self) -> tuple[float | None, str, str | None]:
        """(joules, method, reason it is missing)."""
        first, last = self._energy_mj
        if first is not None and last is not None:
            return (last - first) / 1000, "nvmlDeviceGetTotalEnergyConsumption counter", None
        power = [(t, w) for t, w, _, _ in self.trace if w is not None]
        if power:
            energy, _ = integrate_power(*zip(*power), self.t_start, self.t_stop)
            return energy, "nvmlDeviceGetPowerUsage samples, trapezoid rule", None
        why = [self.failures[k] for k in ("energy_counter", "power") if k in self.failures]
        return None, "", "; ".join(why) or "no power samples"

    def _throttling(self, missing: dict[str, str]) -> dict[str, Any] | None:
        masks = [m for _, _, _, m in self.trace if m is not None]
        if not masks:
            missing["throttling"] = self.failures.get("throttling", "no clock event samples")
            return None
        mask = 0
        for m in masks:
            mask |= m
        return {"reasons_mask": mask, "reasons": reason_names(self.nv, mask)}

    def result(self, frames: int | None = None) -> dict[str, Any]:
        window = self.window_s
        energy, method, reason = self._energy()
        missing = {"energy_j": reason} if reason else {}
        temps = [c for _, _, c, _ in self.trace if c is not None]
        if not temps:
            missing["temperatures"] = self.failures.get("temperature", "no temperature samples")
        throttling = self._throttling(missing)
        return summarise(self.source, window, energy, frames, samples=len(self.trace),
                         missing=missing, notes=self.notes, throttling=throttling,
                         temperatures={f"gpu{self.device_index}": max(temps)} if temps else None,
                         device=self.device_name, power={"method": method})
