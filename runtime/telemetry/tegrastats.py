"""Parse one line of Jetson ``tegrastats`` output into a typed :class:`TegraSample`.

Covers every line format in shared/design/trt-jetson.md §4.1, JetPack 4 to 7 (Nano, TX2, AGX
Xavier, Xavier NX, Orin NX/Nano, AGX Orin, Thor); the verbatim lines are pinned in
``tests/data/tegrastats_examples.txt``. What varies between them (§4.1 "format rules"):

* an optional leading ``MM-DD-YYYY HH:MM:SS`` timestamp (JetPack 5+);
* runs of several spaces between fields;
* ``GR3D_FREQ`` as ``N%``, ``N%@F``, ``N%@[F]``, ``N%@[F,F]`` or ``@[F,F,F]`` (Thor, no load);
  ``EMC_FREQ`` as ``N%``, ``N%@F`` or ``@F``; other engines as ``off``, ``F``, ``N%@F`` or ``@F``;
* CPUs as ``[X%@F,...]`` or ``[X%,Y%,off]@F``, with ``off`` for parked cores;
* temperatures as ``name@XC`` or ``name@XC/YC`` (JetPack 7); ``-256C`` means the sensor is offline
  and is parsed as ``None``;
* power rails as ``NAME cur/avg`` (JetPack 4, mW implied), ``NAME curmW/avgmW`` (JetPack 5/6) or
  ``NAME curmW/avgmW/maxmW`` (JetPack 7); ``NC`` (not connected) placeholders are dropped.

Anything the parser does not recognise is kept, token by token, in :attr:`TegraSample.unparsed`
instead of being dropped silently.

Total board power (:func:`total_power`) uses the instantaneous value of one rail per module, or
the sum of all rails where the module has no total-input rail (trt-jetson.md §4.1, "Total board
power"):

| Module         | Rails in the §4.1 sample                        | Total        | Source         |
|----------------|-------------------------------------------------|--------------|----------------|
| Nano / TX1     | POM_5V_IN, POM_5V_GPU, POM_5V_CPU               | POM_5V_IN    | forum in js#51 |
| TX2            | VDD_IN, VDD_SYS_{GPU,SOC,CPU,DDR}, VDD_4V0_WIFI | VDD_IN       | §4.1 rule      |
| Xavier NX      | VDD_IN, VDD_CPU_GPU_CV, VDD_SOC                 | VDD_IN       | §4.1: subsets  |
| Orin NX / Nano | VDD_IN, VDD_CPU_GPU_CV, VDD_SOC (mW)            | VDD_IN       | §4.1: subsets  |
| AGX Xavier     | GPU, CPU, SOC, CV, VDDRQ, SYS5V                 | sum of rails | jtop power.py  |
| AGX Orin       | VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0,           | sum of rails | jtop power.py  |
|                | VDDQ_VDD2_1V8AO (NC placeholders dropped)       |              |                |
| Thor           | VDD_GPU, VDD_CPU_SOC_MSS, VIN_SYS_5V0, VIN      | VIN          | js PR #900     |

(js = rbonghi/jetson_stats; "forum in js#51": "POM_5V_IN measures the overall 5V input ... You
don't need to add POM_5V_GPU and POM_5V_CPU"; "subsets": VDD_CPU_GPU_CV and VDD_SOC are subsets
of VDD_IN.) AGX Xavier and AGX Orin have no total-input rail, so their total is the sum of every
rail printed, as jtop's ``total_power`` does. Thor's ``VIN`` is the carrier-board input (INA238);
a Thor line without it falls back to the sum. A summed total covers only the rails tegrastats
prints (module rails): carrier-board consumers and regulator losses are not in it, so it reads low
against wall power; :class:`TotalPower` names the rails and the method so reports can say so.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

OFFLINE_C = -256.0  # "If offline show -256" (jtop docs, trt-jetson.md §4.1)
TOTAL_RAILS = ("VIN", "POM_5V_IN", "VDD_IN")  # checked in this order; see the module table
_TO_MB = {"kB": 1 / 1024, "MB": 1.0, "GB": 1024.0}


@dataclass(frozen=True)
class Ram:
    """``RAM used/totalMB (lfb NxSMB)``: lfb = N free blocks of the largest free size S."""

    used_mb: float
    total_mb: float
    lfb_blocks: int
    lfb_block_mb: float


@dataclass(frozen=True)
class Swap:
    """``SWAP used/totalMB (cached CMB)``."""

    used_mb: float
    total_mb: float
    cached_mb: float


@dataclass(frozen=True)
class Iram:
    """``IRAM used/totalkB(lfb LkB)``: memory local to the video engines."""

    used_kb: float
    total_kb: float
    lfb_kb: float


@dataclass(frozen=True)
class CpuCore:
    """One core: load (percent) and clock (MHz), or ``online=False`` for a parked core (``off``)."""

    online: bool
    load_percent: int | None = None
    freq_mhz: int | None = None


@dataclass(frozen=True)
class Engine:
    """An engine (EMC, GR3D, VIC, APE, ...): ``off``, a load, and zero or more clocks in MHz.

    ``freq_mhz`` has one entry per GPC where tegrastats prints a bracketed list (Orin, Thor);
    ``load_percent`` is None where the line prints no load (Thor idle ``@[F,F,F]``, ``APE 25``).
    """

    online: bool = True
    load_percent: int | None = None
    freq_mhz: tuple[int, ...] = ()


@dataclass(frozen=True)
class Temperature:
    """``name@XC`` or ``name@XC/YC``; None where the sensor is offline (-256C).

    ``max_c`` is the JetPack 7 second value. §4.1 does not name it; it is read as the running
    maximum because in the Thor samples it is never below the first value, also while heating up.
    """

    current_c: float | None
    max_c: float | None = None


@dataclass(frozen=True)
class Rail:
    """A power rail in mW: instantaneous, tegrastats' running average, and max (JetPack 7)."""

    current_mw: int
    average_mw: int
    max_mw: int | None = None


@dataclass(frozen=True)
class Mts:
    """``MTS fg X% bg Y%``: time in foreground / background tasks (Xavier, JetPack 4)."""

    fg_percent: int
    bg_percent: int


@dataclass(frozen=True)
class TegraSample:
    """Everything one tegrastats line says. Fields the line does not print are None or empty."""

    timestamp: datetime | None = None
    ram: Ram | None = None
    swap: Swap | None = None
    iram: Iram | None = None
    cpus: tuple[CpuCore, ...] = ()
    emc: Engine | None = None
    gr3d: Engine | None = None
    engines: dict[str, Engine] = field(default_factory=dict)
    mts: Mts | None = None
    temperatures: dict[str, Temperature] = field(default_factory=dict)
    rails: dict[str, Rail] = field(default_factory=dict)
    unparsed: tuple[str, ...] = ()

    @property
    def is_stats_line(self) -> bool:
        """Every tegrastats format prints RAM; a line without it is something else (an error)."""
        return self.ram is not None


@dataclass(frozen=True)
class TotalPower:
    """Total board power of one sample and how it was obtained (see the module table)."""

    watts: float | None
    rails: tuple[str, ...] = ()
    method: str = ""
    reason: str | None = None


def total_power(sample: TegraSample) -> TotalPower:
    """Instantaneous total power: the module's total-input rail, else the sum of all rails."""
    for name in TOTAL_RAILS:
        if name in sample.rails:
            return TotalPower(sample.rails[name].current_mw / 1000, (name,), f"rail {name}")
    if not sample.rails:
        return TotalPower(None, reason="the tegrastats line has no power rails "
                                       "(module without INA monitors, or not run with sudo)")
    names = tuple(sample.rails)
    watts = sum(rail.current_mw for rail in sample.rails.values()) / 1000
    return TotalPower(watts, names, "sum of module rails (no total-input rail; excludes the "
                                    "carrier board and regulator losses)")


_UNIT = r"(kB|MB|GB)"
_NUM = r"-?\d+(?:\.\d+)?"
_FREQS = r"(?:\d+|\[\d+(?:,\d+)*\])"
_END = r"(?!\S)"
Handler = Callable[[re.Match, dict[str, Any]], None]


def _mb(value: str, unit: str) -> float:
    return int(value) * _TO_MB[unit]


def _kb(value: str, unit: str) -> float:
    return _mb(value, unit) * 1024


def _timestamp(m: re.Match, out: dict[str, Any]) -> None:
    month, day, year, hour, minute, second = (int(g) for g in m.groups())
    out["timestamp"] = datetime(year, month, day, hour, minute, second)


def _ram(m: re.Match, out: dict[str, Any]) -> None:
    used, total, unit, blocks, size, size_unit = m.groups()
    out["ram"] = Ram(_mb(used, unit), _mb(total, unit), int(blocks), _mb(size, size_unit))


def _swap(m: re.Match, out: dict[str, Any]) -> None:
    used, total, unit, cached, cached_unit = m.groups()
    out["swap"] = Swap(_mb(used, unit), _mb(total, unit), _mb(cached, cached_unit))


def _iram(m: re.Match, out: dict[str, Any]) -> None:
    used, total, unit, lfb, lfb_unit = m.groups()
    out["iram"] = Iram(_kb(used, unit), _kb(total, unit), _kb(lfb, lfb_unit))


def _core(item: str, shared_mhz: int | None) -> CpuCore:
    if item == "off":
        return CpuCore(online=False)
    load, _, freq = item.partition("@")
    return CpuCore(True, int(load.rstrip("%")), int(freq) if freq else shared_mhz)


def _cpus(m: re.Match, out: dict[str, Any]) -> None:
    shared = int(m.group(2)) if m.group(2) else None  # Thor: "[a%,b%,off]@F"
    out["cpus"] = tuple(_core(item, shared) for item in m.group(1).split(",") if item)


def _mts(m: re.Match, out: dict[str, Any]) -> None:
    out["mts"] = Mts(int(m.group(1)), int(m.group(2)))


def _celsius(text: str | None) -> float | None:
    if text is None or float(text) == OFFLINE_C:
        return None
    return float(text)


def _temperature(m: re.Match, out: dict[str, Any]) -> None:
    out["temperatures"][m.group(1)] = Temperature(_celsius(m.group(2)), _celsius(m.group(3)))


def _rail(m: re.Match, out: dict[str, Any]) -> None:
    name, current, average, peak = m.groups()
    if name == "NC":  # unconnected INA channel (AGX Orin); jtop skips these too
        return
    if name in out["rails"]:
        out["unparsed"].append(m.group(0))
        return
    out["rails"][name] = Rail(int(current), int(average), int(peak) if peak else None)


def engine_value(text: str) -> Engine:
    """``off`` | ``F`` | ``N%`` | ``N%@F`` | ``N%@[F,...]`` | ``@F`` | ``@[F,...]`` as an Engine."""
    if text == "off":
        return Engine(online=False)
    if "@" not in text and not text.endswith("%"):
        return Engine(freq_mhz=(int(text),))  # "APE 25", "VIC_FREQ 729": a clock in MHz
    load, _, freqs = text.partition("@")
    clocks = tuple(int(f) for f in freqs.strip("[]").split(",")) if freqs else ()
    return Engine(load_percent=int(load[:-1]) if load else None, freq_mhz=clocks)


def _engine(m: re.Match, out: dict[str, Any]) -> None:
    name = m.group(1).removesuffix("_FREQ")
    value = engine_value(m.group(2))
    if name in ("EMC", "GR3D"):
        out[name.lower()] = value
    else:
        out["engines"][name] = value


_RULES: tuple[tuple[re.Pattern, Handler], ...] = (
    (re.compile(rf"(\d\d)-(\d\d)-(\d{{4}}) (\d\d):(\d\d):(\d\d){_END}"), _timestamp),
    (re.compile(rf"RAM (\d+)/(\d+){_UNIT} *\(lfb (\d+)x(\d+){_UNIT}\)"), _ram),
    (re.compile(rf"SWAP (\d+)/(\d+){_UNIT} *\(cached (\d+){_UNIT}\)"), _swap),
    (re.compile(rf"IRAM (\d+)/(\d+){_UNIT} *\(lfb (\d+){_UNIT}\)"), _iram),
    (re.compile(r"CPU \[([^\]]*)\](?:@(\d+))?"), _cpus),
    (re.compile(r"MTS fg (\d+)% bg (\d+)%"), _mts),
    (re.compile(rf"(\w+)@({_NUM})C(?:/({_NUM})C)?{_END}"), _temperature),
    (re.compile(rf"(\w+) +(\d+)(?:mW)?/(\d+)(?:mW)?(?:/(\d+)(?:mW)?)?{_END}"), _rail),
    (re.compile(rf"([A-Z][A-Z0-9_]*) +(off|\d+%?(?:@{_FREQS})?|@{_FREQS}){_END}"), _engine),
)
_SPACE = re.compile(r"\s*")
_WORD = re.compile(r"\S+")


def parse_line(line: str) -> TegraSample:
    """Parse one tegrastats line; unrecognised tokens land in ``unparsed``."""
    out: dict[str, Any] = {"engines": {}, "temperatures": {}, "rails": {}, "unparsed": []}
    pos = _SPACE.match(line).end()
    while pos < len(line):
        for pattern, handle in _RULES:
            if m := pattern.match(line, pos):
                handle(m, out)
                break
        else:
            m = _WORD.match(line, pos)
            out["unparsed"].append(m.group())
        pos = _SPACE.match(line, m.end()).end()
    out["unparsed"] = tuple(out["unparsed"])
    return TegraSample(**out)
