"""Sample Jetson power and temperature with tegrastats over a timed window.

:class:`TegrastatsSampler` runs ``tegrastats --interval MS`` as a child process and reads its
stdout line by line (no ``--logfile``), stamping each line with ``time.monotonic()`` when it
arrives. It waits for one sample before opening the window and for one after closing it, so
samples bracket the window; energy is the trapezoid integral of the *instantaneous* total power
(:func:`runtime.telemetry.tegrastats.total_power`, never tegrastats' or jtop's running averages,
trt-jetson.md §4.2) clipped to the window.

Stopping: the child gets SIGTERM, then SIGKILL if it is still alive after ``stop_timeout_s``.
``tegrastats --stop`` is not used: it is for a daemon started with ``--start`` (§4.1, unconfirmed)
and would also end other users' tegrastats (jtop's, for instance), whereas ours is a plain child.

Checks that keep the figures honest:

* host arrival times only date the samples if tegrastats writes each line as it is produced (jtop
  relies on the same); lines arriving in bursts (median gap under a quarter of the interval) make
  the energy missing rather than wrong;
* tegrastats prints no throttling flag (§4.1 defines none), so ``throttling`` is missing and the
  observed clock ranges are reported under ``freq_mhz`` for the reader to compare with the mode;
* ``PMIC@100C`` (Nano/TX2/Xavier) is a fixed placeholder, not a reading (jtop skips it,
  jetson_stats ``core/temperature.py``), so it is left out of the peaks, with the reason;
* offline sensors (-256C) are missing, never 0.

The nvpmodel mode and ``jetson_clocks --show`` are recorded before the window (§4.3). Run with
sudo on older JetPacks to get every field (§4.1).
"""
from __future__ import annotations

import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from runtime.errors import BckdError
from runtime.telemetry.base import Telemetry, integrate_power, summarise
from runtime.telemetry.jetson import Query, clock_state, nvpmodel_mode
from runtime.telemetry.tegrastats import TegraSample, parse_line, total_power

DEFAULT_INTERVAL_MS = 100
BURST_FRACTION = 0.25  # median gap below this fraction of the interval: output was buffered
PLACEHOLDER_SENSORS = {"PMIC": "PMIC@100C is a fixed placeholder, not a reading "
                               "(jtop skips it: jetson_stats core/temperature.py)"}
THROTTLING_REASON = ("tegrastats prints no throttling flag (trt-jetson.md §4.1); compare the "
                     "observed clocks in freq_mhz with the nvpmodel mode")

Timed = Sequence[tuple[float, TegraSample]]


@dataclass
class EnergyEstimate:
    """Energy over the window from the total-power samples, or None with the reason."""

    energy_j: float | None
    rails: tuple[str, ...] = ()
    method: str = ""
    reason: str | None = None
    notes: list[str] = field(default_factory=list)


def find_tegrastats(path: str) -> str:
    """The tegrastats executable for ``path`` (a name on PATH or a file), or a BckdError."""
    exe = shutil.which(path)
    if exe is None:
        raise BckdError(f"tegrastats not found: {path!r} is not an executable file or on PATH; "
                        "run on a Jetson, pass tegrastats_path=..., or use telemetry 'none'")
    return exe


def _bursty(times: Sequence[float], interval_s: float) -> str | None:
    gaps = np.diff(times)
    if len(gaps) < 3 or np.median(gaps) >= BURST_FRACTION * interval_s:
        return None
    return (f"tegrastats lines arrived in bursts (median gap {np.median(gaps) * 1e3:.1f} ms at "
            f"--interval {interval_s * 1e3:g} ms): its output was buffered, so arrival times "
            "cannot date the samples")


def estimate_energy(samples: Timed, t0: float, t1: float, interval_s: float) -> EnergyEstimate:
    """Integrate the total board power of ``samples`` over ``[t0, t1]``."""
    if not samples:
        return EnergyEstimate(None, reason="tegrastats printed no samples")
    totals = [(t, total_power(s)) for t, s in samples]
    usable = [(t, p) for t, p in totals if p.watts is not None]
    if not usable:
        return EnergyEstimate(None, reason=totals[0][1].reason)
    times = [t for t, _ in usable]
    if reason := _bursty(times, interval_s):
        return EnergyEstimate(None, reason=reason)
    energy, uncovered = integrate_power(times, [p.watts for _, p in usable], t0, t1)
    first = usable[0][1]
    estimate = EnergyEstimate(energy, first.rails, first.method)
    if uncovered > 0:
        estimate.notes.append(f"power held at the nearest sample over {uncovered:.3f} s of the "
                              f"{t1 - t0:.3f} s window that no sample brackets")
    if len({p.rails for _, p in usable}) > 1:
        estimate.notes.append("the rails making up total power changed during the window")
    return estimate


def peak_temperatures(samples: Timed, missing: dict[str, str]) -> dict[str, float | None]:
    """Highest reading per sensor; offline and placeholder sensors go to ``missing``."""
    peaks: dict[str, float | None] = {}
    for _, sample in samples:
        for name, temp in sample.temperatures.items():
            if name in PLACEHOLDER_SENSORS:
                missing[f"temperatures.{name}"] = PLACEHOLDER_SENSORS[name]
                continue
            readings = [v for v in (peaks.get(name), temp.current_c) if v is not None]
            peaks[name] = max(readings) if readings else None
    for name, peak in peaks.items():
        if peak is None:
            missing[f"temperatures.{name}"] = "sensor offline (-256C) in every sample"
    return peaks


def clock_ranges(samples: Timed) -> dict[str, list[int]]:
    """Observed ``[min, max]`` MHz of the GPU (every GPC), EMC and online CPU cores."""
    seen: dict[str, list[int]] = {"gr3d": [], "emc": [], "cpu": []}
    for _, s in samples:
        seen["gr3d"] += s.gr3d.freq_mhz if s.gr3d else ()
        seen["emc"] += s.emc.freq_mhz if s.emc else ()
        seen["cpu"] += [c.freq_mhz for c in s.cpus if c.freq_mhz is not None]
    return {name: [min(v), max(v)] for name, v in seen.items() if v}


def stop_process(proc: subprocess.Popen, timeout_s: float) -> str:
    """SIGTERM, then SIGKILL after ``timeout_s``; says how the process ended."""
    if proc.poll() is not None:
        return f"exited by itself with status {proc.returncode}"
    proc.terminate()
    try:
        proc.wait(timeout_s)
        return "terminated"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return f"killed after ignoring SIGTERM for {timeout_s:g} s"


class TegrastatsSampler(Telemetry):
    """tegrastats in a child process over the window; see the module docstring."""

    source = "tegrastats"

    def __init__(self, *, interval_ms: int = DEFAULT_INTERVAL_MS, path: str = "tegrastats",
                 nvpmodel_path: str = "nvpmodel", jetson_clocks_path: str = "jetson_clocks",
                 start_timeout_s: float = 5.0, stop_timeout_s: float = 2.0) -> None:
        super().__init__()
        if int(interval_ms) <= 0:
            raise BckdError(f"tegrastats interval must be a positive number of ms, got "
                            f"{interval_ms}; pass e.g. interval_ms=100")
        self.path = find_tegrastats(path)
        self.interval_ms = int(interval_ms)
        self.tool_paths = (nvpmodel_path, jetson_clocks_path)
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self.nvpmodel: Query = (None, "not queried")
        self.clocks: Query = (None, "not queried")
        self.ended = "not started"
        self._lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._eof = False
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self.nvpmodel = nvpmodel_mode(self.tool_paths[0])
        self.clocks = clock_state(self.tool_paths[1])
        command = [self.path, "--interval", str(self.interval_ms)]
        try:
            self._proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, text=True, errors="replace")
        except OSError as exc:
            raise BckdError(f"cannot start {' '.join(command)}: {exc}") from exc
        self._reader = threading.Thread(target=self._read, name="tegrastats-reader", daemon=True)
        self._reader.start()
        if not self._wait_for_line_after(None, self.start_timeout_s):
            self.notes.append(f"tegrastats printed nothing within {self.start_timeout_s:g} s of "
                              "starting; the window opened without a sample before it")
        self.t_start = time.monotonic()

    def stop(self) -> None:
        if self._proc is None:
            raise RuntimeError("TegrastatsSampler.stop() called before start()")
        self.t_stop = time.monotonic()
        self._wait_for_line_after(self.t_stop, 3 * self.interval_ms / 1000 + 1.0)
        self.ended = stop_process(self._proc, self.stop_timeout_s)
        self._reader.join(self.stop_timeout_s)

    def _read(self) -> None:
        for line in self._proc.stdout:
            arrived = time.monotonic()
            with self._cond:
                self._lines.append((arrived, line.rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _wait_for_line_after(self, t: float | None, timeout_s: float) -> bool:
        def ready() -> bool:
            return bool(self._lines) and (t is None or self._lines[-1][0] > t)
        with self._cond:
            return self._cond.wait_for(lambda: ready() or self._eof, timeout_s) and ready()

    def lines(self) -> list[tuple[float, str]]:
        """Every line read so far with its arrival time (``time.monotonic()``)."""
        with self._cond:
            return list(self._lines)

    def result(self, frames: int | None = None) -> dict[str, Any]:
        window = self.window_s
        records = [(t, line, parse_line(line)) for t, line in self.lines()]
        samples = [(t, s) for t, _, s in records if s.is_stats_line]
        others = [line for _, line, s in records if not s.is_stats_line]
        estimate = estimate_energy(samples, self.t_start, self.t_stop, self.interval_ms / 1000)
        missing = self._missing(estimate, others)
        temps = peak_temperatures(samples, missing)
        notes = [*self.notes, *estimate.notes, f"tegrastats {self.ended}"]
        return summarise(self.source, window, estimate.energy_j, frames, samples=len(samples),
                         missing=missing, notes=notes, temperatures=temps or None,
                         nvpmodel=self.nvpmodel[0], clocks=self.clocks[0],
                         power={"rails": list(estimate.rails), "method": estimate.method},
                         freq_mhz=clock_ranges(samples), interval_ms=self.interval_ms,
                         tool=self.path)

    def _missing(self, estimate: EnergyEstimate, others: list[str]) -> dict[str, str]:
        missing = {"throttling": THROTTLING_REASON}
        if estimate.energy_j is None:
            said = f"; it printed: {others[0]!r}" if others else ""
            missing["energy_j"] = f"{estimate.reason} (tegrastats {self.ended}{said})"
        for key, (value, reason) in (("nvpmodel", self.nvpmodel), ("clocks", self.clocks)):
            if value is None:
                missing[key] = reason
        return missing
