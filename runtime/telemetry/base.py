"""What every telemetry source shares: the timed-window protocol, energy integration, the result.

A source is a context manager around the timed window: ``__enter__`` starts it (and returns once it
is measuring), ``__exit__`` stops it, and ``result(frames=N)`` returns a JSON-ready dict with the
same keys for every source (:data:`RESULT_KEYS`). A value that could not be measured is ``None``
and ``missing[key]`` says why: telemetry is never reported as zero because it was absent.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np

RESULT_KEYS = ("source", "samples", "window_s", "frames", "energy_j", "mean_power_w",
               "energy_per_frame_j", "fps_per_watt", "temperatures", "throttling", "nvpmodel",
               "clocks", "notes", "missing")
_OPTIONAL = ("temperatures", "throttling", "nvpmodel", "clocks")


class Telemetry(ABC):
    """A measurement source around one timed window (use as ``with source: ...``)."""

    source = ""

    def __init__(self) -> None:
        self.t_start: float | None = None  # time.monotonic() when the window opened
        self.t_stop: float | None = None
        self.notes: list[str] = []

    def __enter__(self) -> "Telemetry":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @abstractmethod
    def start(self) -> None:
        """Begin measuring; the window opens (``t_start``) when this returns."""

    @abstractmethod
    def stop(self) -> None:
        """Close the window (``t_stop``) and release the source."""

    @abstractmethod
    def result(self, frames: int | None = None) -> dict[str, Any]:
        """The JSON-ready summary of the window; ``frames`` run in it give per-frame figures."""

    @property
    def window_s(self) -> float:
        """Length of the closed window in seconds."""
        if self.t_start is None or self.t_stop is None:
            raise RuntimeError("the telemetry window is not closed: call result() after the "
                               "`with` block (or after start() and stop())")
        return self.t_stop - self.t_start


def integrate_power(times: Sequence[float], watts: Sequence[float], t0: float,
                    t1: float) -> tuple[float, float]:
    """Energy in joules over ``[t0, t1]`` and the seconds of it no sample brackets.

    Trapezoid rule over the piecewise-linear power between samples, clipped to the window (the
    boundary values are interpolated). Before the first or after the last sample the nearest value
    is held; the returned uncovered seconds say how much of the window that was.
    """
    t = np.asarray(times, dtype=float)
    w = np.asarray(watts, dtype=float)
    grid = np.concatenate(([t0], t[(t > t0) & (t < t1)], [t1]))
    values = np.interp(grid, t, w)
    energy = float(np.sum((values[1:] + values[:-1]) * np.diff(grid)) / 2)
    uncovered = max(0.0, t[0] - t0) + max(0.0, t1 - t[-1])
    return energy, min(uncovered, t1 - t0)


def check_frames(frames: int | None) -> None:
    if frames is not None and (not isinstance(frames, int) or frames < 0):
        raise ValueError(f"frames must be a non-negative int or None, got {frames!r}")


def _per_frame(energy_j: float | None, frames: int | None,
               missing: dict[str, str]) -> tuple[float | None, float | None]:
    if energy_j is None:
        reason = "energy_j is missing"
    elif frames is None:
        reason = "no frame count was given to result(frames=...)"
    elif frames == 0:
        reason = "no frames were run in the window"
    elif energy_j <= 0:
        reason = f"measured energy is {energy_j} J"
    else:
        return energy_j / frames, frames / energy_j  # fps / W = (frames / s) / (J / s)
    missing.setdefault("energy_per_frame_j", reason)
    missing.setdefault("fps_per_watt", reason)
    return None, None


def summarise(source: str, window_s: float, energy_j: float | None, frames: int | None, *,
              samples: int, missing: dict[str, str], notes: Sequence[str] = (),
              **fields: Any) -> dict[str, Any]:
    """The result dict shared by all sources; ``fields`` adds or overrides keys.

    ``missing`` must already hold the reason for ``energy_j`` when it is None; reasons for the
    derived figures and for optional keys a source does not measure are filled in here.
    """
    check_frames(frames)
    missing = dict(missing)
    if energy_j is None:
        missing.setdefault("energy_j", "not measured")
    mean_w = energy_j / window_s if energy_j is not None and window_s > 0 else None
    if mean_w is None:
        missing.setdefault("mean_power_w", "energy_j is missing" if energy_j is None
                           else "the window has zero length")
    per_frame, fps_per_watt = _per_frame(energy_j, frames, missing)
    result: dict[str, Any] = {
        "source": source, "samples": samples, "window_s": window_s, "energy_j": energy_j,
        "mean_power_w": mean_w, "energy_per_frame_j": per_frame, "fps_per_watt": fps_per_watt,
        "frames": frames, "notes": list(notes),
    }
    for key in _OPTIONAL:
        if fields.get(key) is None:
            missing.setdefault(key, f"not measured by the {source} source")
    result.update({key: None for key in _OPTIONAL}, **fields)
    result["missing"] = missing
    return result


class NullTelemetry(Telemetry):
    """No measurement: the window is still timed and every figure is missing with ``reason``."""

    source = "none"

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason

    def start(self) -> None:
        self.t_start = time.monotonic()

    def stop(self) -> None:
        self.t_stop = time.monotonic()

    def result(self, frames: int | None = None) -> dict[str, Any]:
        missing = {key: "no telemetry source (see missing['energy_j'])" for key in _OPTIONAL}
        missing["energy_j"] = self.reason
        return summarise(self.source, self.window_s, None, frames, samples=0, missing=missing,
                         notes=self.notes)


class CombinedTelemetry(Telemetry):
    """Several host sources over one window (e.g. RAPL for the CPU plus NVML for the GPU).

    ``energy_j`` is the sum of the parts, and missing if any part's is; each part's own result is
    kept under ``parts``.
    """

    def __init__(self, parts: Sequence[Telemetry]) -> None:
        super().__init__()
        self.parts = list(parts)
        self.source = "+".join(part.source for part in self.parts)

    def start(self) -> None:
        started: list[Telemetry] = []
        try:
            for part in self.parts:
                part.start()
                started.append(part)
        except BaseException:
            for part in reversed(started):  # leave no sampler running behind a failed start
                part.stop()
            raise
        self.t_start = time.monotonic()

    def stop(self) -> None:
        self.t_stop = time.monotonic()
        for part in reversed(self.parts):
            part.stop()

    def result(self, frames: int | None = None) -> dict[str, Any]:
        parts = {part.source: part.result(frames) for part in self.parts}
        lacking = {name: r["missing"]["energy_j"] for name, r in parts.items()
                   if r["energy_j"] is None}
        energy = None if lacking else sum(r["energy_j"] for r in parts.values())
        missing = {"energy_j": "; ".join(f"{n}: {why}" for n, why in lacking.items())}
        temps = {f"{n}.{k}": v for n, r in parts.items()
                 for k, v in (r["temperatures"] or {}).items()}
        throttling = {n: r["throttling"] for n, r in parts.items() if r["throttling"] is not None}
        return summarise(self.source, self.window_s, energy, frames,
                         samples=sum(r["samples"] for r in parts.values()),
                         missing=missing if lacking else {},
                         notes=self.notes, temperatures=temps or None,
                         throttling=throttling or None, parts=parts)
