"""CPU package energy on an x86 Linux host from the RAPL powercap counters (Intel; AMD Zen too).

The kernel exposes each RAPL zone as ``/sys/class/powercap/intel-rapl:N`` (a package) and
``intel-rapl:N:M`` (its sub-zones: core, uncore, dram) with ``name``, ``energy_uj`` (a cumulative
counter in µJ) and ``max_energy_range_uj`` (where the counter wraps back to 0). AMD processors are
served by the same ``intel_rapl`` driver and zone names.

Energy is the counter difference between the window's ends. A wrap between two reads is folded in
by adding ``max_energy_range_uj``; only one wrap per read is detectable, so a background thread
reads every ``poll_s`` seconds (the default 1 s is far below a wrap period: 2^32 µJ lasts 43 s at
100 W). ``energy_j`` is the sum of the package zones; sub-zones and other top-level zones (psys,
dram) are listed per zone but not summed, since they overlap the packages or each other.

Scope: the CPU packages only (cores, caches, uncore, integrated GPU), not DRAM, a discrete GPU or
the rest of the machine. Since Linux 5.10 ``energy_uj`` is readable by root only; that is reported
as missing with the reason, not as zero.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import BckdError
from runtime.telemetry.base import Telemetry, summarise

DEFAULT_ROOT = Path("/sys/class/powercap")
SCOPE = "CPU package(s) via RAPL: cores, caches, uncore; not DRAM, discrete GPUs or the board"
_ZONE_DIR = re.compile(r"intel-rapl:\d+(?::\d+)?$")


@dataclass
class Zone:
    """One RAPL counter and the energy it has accumulated since the window opened."""

    key: str  # "package-0", or "package-0/dram" for a sub-zone
    energy_file: Path
    max_uj: int
    last_uj: int = 0
    total_uj: int = 0

    @property
    def is_package(self) -> bool:
        return "/" not in self.key and self.key.startswith("package")

    def read(self) -> int:
        return int(self.energy_file.read_text())

    def reset(self) -> None:
        self.last_uj, self.total_uj = self.read(), 0

    def update(self) -> None:
        """Add the energy since the last read; a smaller value means the counter wrapped."""
        value = self.read()
        delta = value - self.last_uj
        self.total_uj += delta if delta >= 0 else delta + self.max_uj
        self.last_uj = value


def find_zones(root: Path = DEFAULT_ROOT) -> list[Zone]:
    """Every ``intel-rapl:*`` zone under ``root`` (OSError if a zone's files cannot be read)."""
    dirs = sorted(p for p in Path(root).glob("intel-rapl:*") if _ZONE_DIR.match(p.name))
    names = {d.name: (d / "name").read_text().strip() for d in dirs}
    zones = []
    for d in dirs:
        parent = d.name.rsplit(":", 1)[0]  # "intel-rapl" for a package, "intel-rapl:N" below
        key = names[d.name]
        if parent != "intel-rapl":
            key = f"{names.get(parent, parent)}/{key}"
        zones.append(Zone(key, d / "energy_uj", int((d / "max_energy_range_uj").read_text())))
    return zones


def rapl_unavailable(root: Path = DEFAULT_ROOT) -> str | None:
    """None when the package counters can be read, else why not."""
    try:
        zones = find_zones(root)
        packages = [z for z in zones if z.is_package]
        for zone in packages:
            zone.read()
    except PermissionError as exc:
        return (f"permission denied reading {exc.filename} (root-only since Linux 5.10); "
                "run as root or make energy_uj readable")
    except (OSError, ValueError) as exc:
        return f"cannot read the RAPL zones under {root}: {exc}"
    if not zones:
        return (f"no RAPL zones under {root} (not an Intel/AMD Linux host, or the intel_rapl "
                "driver is not loaded)")
    if not packages:
        return f"no RAPL package zone under {root} (zones: {', '.join(z.key for z in zones)})"
    return None


class RaplMeter(Telemetry):
    """RAPL package energy over the window; see the module docstring."""

    source = "rapl"

    def __init__(self, *, root: Path = DEFAULT_ROOT, poll_s: float = 1.0) -> None:
        super().__init__()
        if reason := rapl_unavailable(root):
            raise BckdError(f"RAPL energy cannot be measured: {reason}")
        self.root, self.poll_s = Path(root), poll_s
        self.zones: list[Zone] = []
        self.reads = 0
        self.error: str | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.zones = find_zones(self.root)
        for zone in self.zones:
            zone.reset()
        self._thread = threading.Thread(target=self._poll, name="rapl-poll", daemon=True)
        self._thread.start()
        self.t_start = time.monotonic()

    def sample(self, *, final: bool = False) -> None:
        """Read every counter now (folds in wraps); ``final`` closes the window's accounting."""
        with self._lock:
            if self._closed:
                return
            try:
                for zone in self.zones:
                    zone.update()
                self.reads += 1
            except (OSError, ValueError) as exc:
                self.error = self.error or f"reading a RAPL counter failed during the window: {exc}"
            self._closed = final

    def _poll(self) -> None:
        while not self._halt.wait(self.poll_s):
            self.sample()

    def stop(self) -> None:
        self.t_stop = time.monotonic()
        self.sample(final=True)
        self._halt.set()
        self._thread.join()

    def result(self, frames: int | None = None) -> dict[str, Any]:
        window = self.window_s
        energy = None if self.error else sum(z.total_uj for z in self.zones if z.is_package) / 1e6
        missing = {"energy_j": self.error} if self.error else {}
        zones = {z.key: z.total_uj / 1e6 for z in self.zones}
        return summarise(self.source, window, energy, frames, samples=self.reads, missing=missing,
                         notes=self.notes, zones_energy_j=zones, scope=SCOPE)
