"""Power, energy and temperature over a timed window, from whichever source the machine has.

One entry point, :func:`open_telemetry`, returns a context manager around the timed window::

    with open_telemetry("auto") as telemetry:
        for _ in range(frames):
            runner.infer(batch)
    power = telemetry.result(frames=frames)   # JSON-ready dict, same keys for every source

Kinds:

* ``tegrastats``: Jetson board power, temperatures, clocks, nvpmodel mode and jetson_clocks state
  (:mod:`.sampler`, parser in :mod:`.tegrastats`).
* ``rapl``: CPU package energy on x86 Linux (:mod:`.rapl`).
* ``nvml``: NVIDIA GPU energy, temperature and clock-event reasons via pynvml (:mod:`.nvml`).
* ``none``: the window is timed, every figure is missing with the reason.
* ``auto``: tegrastats on a Jetson (``/etc/nv_tegra_release`` exists or tegrastats is on PATH);
  otherwise RAPL if readable plus NVML if available (combined: energies summed, each part kept
  under ``parts``); otherwise ``none``. Sources it skipped are listed in ``notes`` with the reason.

Every result has :data:`RESULT_KEYS`; a figure that could not be measured is None and
``missing[key]`` says why (never 0).

Not used, on purpose: jtop (jetson-stats), because its ``avg`` is a running EMA, not a mean
(trt-jetson.md §4.2), it needs the jtop service, it is AGPL-3.0, and its power figures come from
the same INA monitors tegrastats prints; and the INA3221 sysfs files (§4.4), which would need
per-JetPack driver handling for the same numbers.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Callable

from runtime.errors import BckdError
from runtime.registry import check_known, unknown_name_message
from runtime.telemetry import rapl
from runtime.telemetry.base import (RESULT_KEYS, CombinedTelemetry, NullTelemetry, Telemetry,
                                    integrate_power)
from runtime.telemetry.jetson import NV_TEGRA_RELEASE, is_jetson
from runtime.telemetry.nvml import NvmlMeter, nvml_unavailable
from runtime.telemetry.rapl import RaplMeter, rapl_unavailable
from runtime.telemetry.sampler import DEFAULT_INTERVAL_MS, TegrastatsSampler
from runtime.telemetry.tegrastats import TegraSample, parse_line, total_power

__all__ = ["KINDS", "RESULT_KEYS", "Telemetry", "TelemetryOptions", "open_telemetry",
           "TegrastatsSampler", "RaplMeter", "NvmlMeter", "NullTelemetry", "CombinedTelemetry",
           "TegraSample", "parse_line", "total_power", "integrate_power"]


@dataclass(frozen=True)
class TelemetryOptions:
    """Keyword options of :func:`open_telemetry`; each source reads the ones it needs."""

    interval_ms: int = DEFAULT_INTERVAL_MS  # tegrastats --interval
    tegrastats_path: str = "tegrastats"
    nvpmodel_path: str = "nvpmodel"
    jetson_clocks_path: str = "jetson_clocks"
    nv_tegra_release: Path = NV_TEGRA_RELEASE
    rapl_root: Path = rapl.DEFAULT_ROOT
    rapl_poll_s: float = 1.0
    nvml_device: int = 0
    nvml_poll_s: float = 0.05
    nvml_module: ModuleType | None = None  # a stand-in for pynvml (tests)


def _tegrastats(o: TelemetryOptions) -> Telemetry:
    return TegrastatsSampler(interval_ms=o.interval_ms, path=o.tegrastats_path,
                             nvpmodel_path=o.nvpmodel_path, jetson_clocks_path=o.jetson_clocks_path)


def _rapl(o: TelemetryOptions) -> Telemetry:
    return RaplMeter(root=o.rapl_root, poll_s=o.rapl_poll_s)


def _nvml(o: TelemetryOptions) -> Telemetry:
    if reason := nvml_unavailable(o.nvml_module, o.nvml_device):
        raise BckdError(f"NVML telemetry cannot be used: {reason}")
    return NvmlMeter(device_index=o.nvml_device, poll_s=o.nvml_poll_s, module=o.nvml_module)


def _none(o: TelemetryOptions) -> Telemetry:
    return NullTelemetry("telemetry is off (kind 'none')")


def _auto(o: TelemetryOptions) -> Telemetry:
    if shutil.which(o.tegrastats_path):
        return _tegrastats(o)
    skipped = []
    if is_jetson(o.nv_tegra_release):
        skipped.append(f"tegrastats: {o.nv_tegra_release} exists but {o.tegrastats_path!r} "
                       "was not found")
    probes = (("rapl", lambda: rapl_unavailable(o.rapl_root), _rapl),
              ("nvml", lambda: nvml_unavailable(o.nvml_module, o.nvml_device), _nvml))
    parts = []
    for name, probe, build in probes:
        reason = probe()
        if reason:
            skipped.append(f"{name}: {reason}")
        else:
            parts.append(build(o))
    if not parts:
        return NullTelemetry("no telemetry source on this machine: " + "; ".join(skipped))
    telemetry = parts[0] if len(parts) == 1 else CombinedTelemetry(parts)
    telemetry.notes.extend(f"auto skipped {s}" for s in skipped)
    return telemetry


_BUILDERS: dict[str, Callable[[TelemetryOptions], Telemetry]] = {
    "auto": _auto, "tegrastats": _tegrastats, "rapl": _rapl, "nvml": _nvml, "none": _none}
KINDS = tuple(_BUILDERS)


def open_telemetry(kind: str = "auto", **opts: object) -> Telemetry:
    """A telemetry source of ``kind`` (see :data:`KINDS`) configured by :class:`TelemetryOptions`.

    An explicitly named source that this machine lacks is a BckdError saying why; ``auto`` never
    fails, it falls back to ``none`` with the reasons.
    """
    if kind not in _BUILDERS:
        raise BckdError(unknown_name_message("telemetry kind", kind, list(KINDS)))
    check_known(opts, [f.name for f in fields(TelemetryOptions)], "telemetry option")
    return _BUILDERS[kind](TelemetryOptions(**opts))
