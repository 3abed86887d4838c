"""Telemetry: the tegrastats parser on every documented line, the sampler end to end with a
stand-in tegrastats, RAPL on a fake sysfs tree, NVML with a fake pynvml, and open_telemetry."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from datetime import datetime
from pathlib import Path

import pytest

from runtime.errors import BckdError
from runtime.telemetry import KINDS, RESULT_KEYS, open_telemetry
from runtime.telemetry.base import CombinedTelemetry, NullTelemetry, integrate_power, summarise
from runtime.telemetry.nvml import NvmlMeter, nvml_unavailable, reason_names
from runtime.telemetry.rapl import RaplMeter, Zone, rapl_unavailable
from runtime.telemetry.sampler import (TegrastatsSampler, clock_ranges, estimate_energy,
                                       peak_temperatures)
from runtime.telemetry.tegrastats import (CpuCore, Engine, Iram, Mts, Rail, Ram, Swap,
                                          TegraSample, Temperature, engine_value, parse_line,
                                          total_power)

HERE = Path(__file__).parent
EXAMPLES_FILE = HERE / "data" / "tegrastats_examples.txt"
DESIGN_DOC = HERE.parents[1] / "shared" / "design" / "trt-jetson.md"


def load_examples() -> dict[str, str]:
    """name -> verbatim line, from the fixture copied out of trt-jetson.md §4.1."""
    examples, name = {}, None
    for line in EXAMPLES_FILE.read_text().splitlines():
        if line.startswith("## "):
            name = line[3:].split(":")[0]
        elif line and not line.startswith("#"):
            examples[name] = line
    return examples


EXAMPLES = load_examples()


# ---- expected values, written out by hand from the lines ---------------------------------------

def on(load: int, mhz: int) -> CpuCore:
    return CpuCore(True, load, mhz)


OFF_CORE = CpuCore(False)
OFF = Engine(online=False)


def E(load: int | None, *mhz: int) -> Engine:
    return Engine(True, load, tuple(mhz))


def T(current: float | None, peak: float | None = None) -> Temperature:
    return Temperature(current, peak)


def R(current: int, average: int, peak: int | None = None) -> Rail:
    return Rail(current, average, peak)


EXPECTED: dict[str, TegraSample] = {
    "nano_jp4": TegraSample(
        ram=Ram(534, 3964, 98, 4), swap=Swap(5, 1982, 1), iram=Iram(0, 252, 252),
        cpus=(on(16, 204), on(9, 204), on(0, 204), on(0, 204)), emc=E(0, 204), gr3d=E(0, 76),
        engines={"APE": E(None, 25)},
        temperatures={"PLL": T(34), "CPU": T(36.5), "PMIC": T(100), "GPU": T(36), "AO": T(39.5),
                      "thermal": T(36.25)},
        rails={"POM_5V_IN": R(1022, 1022), "POM_5V_GPU": R(0, 0), "POM_5V_CPU": R(204, 204)}),
    "tx2_jp4": TegraSample(
        ram=Ram(2344, 7852, 1154, 4), swap=Swap(0, 3926, 0),
        cpus=(on(1, 345), OFF_CORE, OFF_CORE, on(1, 345), on(0, 345), on(2, 345)),
        emc=E(4, 1600), gr3d=E(0, 624), engines={"APE": E(None, 150)},
        temperatures={"PLL": T(37.5), "MCPU": T(37.5), "PMIC": T(100), "Tboard": T(32),
                      "GPU": T(35), "BCPU": T(37.5), "thermal": T(36.5), "Tdiode": T(34.25)},
        rails={"VDD_SYS_GPU": R(152, 152), "VDD_SYS_SOC": R(687, 687), "VDD_4V0_WIFI": R(0, 0),
               "VDD_IN": R(3056, 3056), "VDD_SYS_CPU": R(152, 152), "VDD_SYS_DDR": R(883, 883)}),
    "agx_xavier_jp4": TegraSample(
        ram=Ram(721, 31927, 7291, 4), swap=Swap(0, 15963, 0),
        cpus=(on(2, 1190), on(0, 1190), on(0, 1190), on(0, 1190)) + (OFF_CORE,) * 4,
        emc=E(0, 665), gr3d=E(0, 318), engines={"APE": E(None, 150)}, mts=Mts(0, 0),
        temperatures={"AO": T(37.5), "GPU": T(37.5), "Tdiode": T(40), "PMIC": T(100),
                      "AUX": T(36), "CPU": T(37.5), "thermal": T(36.9), "Tboard": T(37)},
        rails={"GPU": R(0, 0), "CPU": R(311, 311), "SOC": R(932, 932), "CV": R(0, 0),
               "VDDRQ": R(621, 621), "SYS5V": R(1482, 1482)}),
    "agx_xavier_nosudo_jp42": TegraSample(
        ram=Ram(14700, 15692, 3, 2), swap=Swap(898, 8192, 23), cpus=(on(0, 1190),) * 8,
        emc=E(0), gr3d=E(0),
        temperatures={"AO": T(30), "GPU": T(30.5), "Tboard": T(31), "Tdiode": T(32),
                      "AUX": T(30.5), "CPU": T(31.5), "thermal": T(30.8), "PMIC": T(100)},
        rails={"GPU": R(463, 463), "CPU": R(618, 618), "SOC": R(2936, 2936), "CV": R(0, 0),
               "VDDRQ": R(309, 309), "SYS5V": R(3306, 3306)}),
    "xavier_nx_jp4": TegraSample(
        ram=Ram(4412, 7772, 237, 4), swap=Swap(139, 3886, 2),
        cpus=(on(9, 1190), on(6, 1190), on(6, 1190), on(5, 1190), on(4, 1190), on(8, 1267)),
        emc=E(10, 1600), gr3d=E(62, 306), engines={"APE": E(None, 150)}, mts=Mts(0, 0),
        temperatures={"AO": T(41.5), "GPU": T(43), "PMIC": T(100), "AUX": T(41.5),
                      "CPU": T(43.5), "thermal": T(42.55)},
        rails={"VDD_IN": R(4067, 4067), "VDD_CPU_GPU_CV": R(738, 738), "VDD_SOC": R(1353, 1353)}),
    "orin_nx16_jp5": TegraSample(
        ram=Ram(6334, 15388, 1770, 4), swap=Swap(491, 7694, 0),
        cpus=(on(6, 729), on(9, 729), on(5, 729), on(16, 729)) + (OFF_CORE,) * 4,
        emc=E(0, 2133), gr3d=E(0, 611), engines={"VIC": E(None, 729), "APE": E(None, 174)},
        temperatures={"CV0": T(45.812), "CPU": T(47.937), "SOC2": T(46.093), "SOC0": T(46.968),
                      "CV1": T(46.406), "GPU": T(45.875), "tj": T(48.875), "SOC1": T(48.875),
                      "CV2": T(45.75)},
        rails={"VDD_IN": R(5299, 5299), "VDD_CPU_GPU_CV": R(773, 773), "VDD_SOC": R(1424, 1424)}),
    "orin_nx8_2025": TegraSample(
        timestamp=datetime(2025, 5, 15, 18, 30, 28),
        ram=Ram(6982, 7620, 5, 1), swap=Swap(2640, 16384, 202),
        cpus=(on(97, 1984), on(95, 1984), on(95, 1984), on(91, 1984), on(88, 1984), on(93, 247)),
        emc=E(18, 3199), gr3d=E(84, 713),
        engines={"NVENC": E(1, 115), "NVDEC": E(40, 115), "NVJPG": OFF, "NVJPG1": OFF,
                 "VIC": E(31, 115), "OFA": OFF, "NVDLA0": OFF, "PVA0": OFF, "APE": E(None, 174)},
        temperatures={"cv0": T(63.031), "cpu": T(65.562), "soc2": T(64.156), "soc0": T(63.031),
                      "cv1": T(62.937), "gpu": T(63.5), "tj": T(65.562), "soc1": T(64.718),
                      "cv2": T(60.875)},
        rails={"VDD_IN": R(17946, 15710), "VDD_CPU_GPU_CV": R(8896, 7585),
               "VDD_SOC": R(3923, 3515)}),
    "agx_orin_2025": TegraSample(
        timestamp=datetime(2025, 4, 11, 10, 36, 27),
        ram=Ram(4321, 62801, 1759, 4), swap=Swap(19, 31400, 0), cpus=(on(0, 729),) * 12,
        emc=E(0, 2133), gr3d=E(0, 0, 0), engines={"VIC": E(None, 729), "APE": E(None, 174)},
        temperatures={"CV0": T(None), "CPU": T(44.562), "Tboard": T(32), "SOC2": T(40.093),
                      "Tdiode": T(33), "SOC0": T(41.093), "CV1": T(None), "GPU": T(None),
                      "tj": T(44.343), "SOC1": T(41.25), "CV2": T(None)},
        rails={"VDD_GPU_SOC": R(2340, 2340), "VDD_CPU_CV": R(390, 390),
               "VIN_SYS_5V0": R(4025, 4025), "VDDQ_VDD2_1V8AO": R(301, 301)}),
    "agx_orin_jp72": TegraSample(
        timestamp=datetime(2026, 7, 25, 9, 8, 28), ram=Ram(20642, 62817, 1, 2),
        cpus=tuple(on(x, 2201) for x in (23, 10, 4, 14, 30, 18, 10, 10, 33, 7, 5, 27)),
        emc=E(3, 3199), gr3d=E(12, 1300, 1300),
        engines={**{n: OFF for n in ("NVENC0", "NVDEC0", "NVJPG0", "NVJPG1", "VIC", "OFA",
                                     "NVDLA0", "NVDLA1", "PVA0")}, "APE": E(None, 174)},
        temperatures={"cpu": T(52.968, 52.968), "soc2": T(48.406, 48.406),
                      "soc0": T(49.531, 49.531), "gpu": T(47.625, 47.625)},
        rails={"VDD_GPU_SOC": R(5139, 5139, 5139), "VDD_CPU_CV": R(3268, 3268, 3268),
               "VIN_SYS_5V0": R(5500, 5500, 5500)}),
    "thor_idle_r39": TegraSample(
        timestamp=datetime(2026, 8, 8, 20, 58, 23), ram=Ram(3429, 125749, 120, 4),
        cpus=(on(0, 2601), on(5, 2601), OFF_CORE), emc=E(None, 4266),
        gr3d=E(None, 1574, 1574, 1574),
        temperatures={"cpu": T(49.75, 49.75), "tj": T(51.218, 51.218), "gpu": T(51.218, 51.218)},
        rails={"VDD_GPU": R(6330, 6330, 6330), "VIN": R(28906, 14453, 28906)}),
    "thor_load_r39": TegraSample(
        timestamp=datetime(2026, 8, 8, 21, 0, 39), ram=Ram(8353, 125749, 31, 4),
        cpus=(on(90, 2601), on(75, 2601), OFF_CORE, on(7, 2601)), emc=E(34, 4266),
        gr3d=E(87, 1574, 1574, 1574), engines={"NVENC0": E(None, 1691), "VIC": OFF},
        temperatures={"cpu": T(58.25, 61.75), "tj": T(66.625, 66.625), "gpu": T(56.937, 66.625),
                      "soc012": T(55.375, 58.781), "soc345": T(55.812, 60.031)},
        rails={"VDD_GPU": R(37939, 8660, 37939), "VDD_CPU_SOC_MSS": R(30059, 12281, 30059),
               "VIN_SYS_5V0": R(15486, 7424, 15486), "VIN": R(124486, 36487, 124486)}),
}

XAVIER_RAILS = ("GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V")
EXPECTED_TOTAL: dict[str, tuple[float, tuple[str, ...]]] = {
    "nano_jp4": (1.022, ("POM_5V_IN",)),
    "tx2_jp4": (3.056, ("VDD_IN",)),
    "agx_xavier_jp4": (3.346, XAVIER_RAILS),
    "agx_xavier_nosudo_jp42": (7.632, XAVIER_RAILS),
    "xavier_nx_jp4": (4.067, ("VDD_IN",)),
    "orin_nx16_jp5": (5.299, ("VDD_IN",)),
    "orin_nx8_2025": (17.946, ("VDD_IN",)),
    "agx_orin_2025": (7.056, ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO")),
    "agx_orin_jp72": (13.907, ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")),
    "thor_idle_r39": (28.906, ("VIN",)),
    "thor_load_r39": (124.486, ("VIN",)),
}


# ---- parser -------------------------------------------------------------------------------------

def test_every_documented_line_has_expectations():
    assert len(EXAMPLES) == 11
    assert set(EXAMPLES) == set(EXPECTED) == set(EXPECTED_TOTAL)


@pytest.mark.skipif(not DESIGN_DOC.exists(), reason="shared/design/trt-jetson.md not checked out")
def test_fixture_lines_are_verbatim_from_the_design_doc():
    doc = DESIGN_DOC.read_text()
    for name, line in EXAMPLES.items():
        assert f"\n{line}\n" in doc, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parse_documented_line(name):
    sample = parse_line(EXAMPLES[name])
    assert sample.unparsed == ()
    assert sample.is_stats_line
    assert sample == EXPECTED[name]  # every field, including the empty/None ones


@pytest.mark.parametrize("name", sorted(EXPECTED_TOTAL))
def test_total_power_per_module(name):
    watts, rails = EXPECTED_TOTAL[name]
    total = total_power(parse_line(EXAMPLES[name]))
    assert total.watts == pytest.approx(watts, abs=1e-9)
    assert total.rails == rails
    assert total.reason is None
    assert ("sum of module rails" in total.method) == (len(rails) > 1)


def test_runs_of_spaces_and_second_gpc_field():
    # datadog's r36Sample has runs of spaces; older Orin printed GR3D2_FREQ (trt-jetson.md §4.1)
    line = ("RAM 4722/7844MB (lfb 1x512kB) CPU [1%@729,off] EMC_FREQ 2%@1866  GR3D_FREQ 10%@1300 "
            "GR3D2_FREQ 9%@1300 NVENC      off  NVDEC    off  VDD_IN 5000mW/4000mW  ")
    sample = parse_line(line)
    assert sample.unparsed == ()
    assert sample.ram == Ram(4722, 7844, 1, 0.5)
    assert sample.cpus == (on(1, 729), OFF_CORE)
    assert sample.gr3d == E(10, 1300)
    assert sample.engines == {"GR3D2": E(9, 1300), "NVENC": OFF, "NVDEC": OFF}
    assert sample.rails == {"VDD_IN": R(5000, 4000)}


@pytest.mark.parametrize("text, expected", [
    ("off", OFF), ("25", E(None, 25)), ("0%", E(0)), ("0%@76", E(0, 76)), ("@4266", E(None, 4266)),
    ("84%@[713]", E(84, 713)), ("0%@[0,0]", E(0, 0, 0)),
    ("@[1574,1574,1574]", E(None, 1574, 1574, 1574)),
])
def test_engine_value_variants(text, expected):
    assert engine_value(text) == expected


def test_unknown_tokens_and_non_stats_lines_are_kept_not_dropped():
    sample = parse_line("RAM 1/2MB (lfb 1x1MB) FUTURE_FIELD 1/2/3/4 zzz")
    assert sample.unparsed == ("FUTURE_FIELD", "1/2/3/4", "zzz")
    error = parse_line("Error: tegrastats must be run as root")
    assert not error.is_stats_line
    assert error.unparsed == ("Error:", "tegrastats", "must", "be", "run", "as", "root")


def test_no_rails_means_missing_total_power_not_zero():
    total = total_power(parse_line("RAM 1/2MB (lfb 1x1MB) CPU [1%@100]"))
    assert total.watts is None and "no power rails" in total.reason


# ---- energy integration and summaries -----------------------------------------------------------

def test_integrate_power_clips_to_the_window_with_interpolated_edges():
    energy, uncovered = integrate_power([0.0, 1.0, 2.0], [0.0, 10.0, 0.0], 0.5, 1.5)
    assert energy == pytest.approx(7.5) and uncovered == 0.0


def test_integrate_power_holds_the_nearest_sample_and_says_for_how_long():
    energy, uncovered = integrate_power([1.0, 2.0], [4.0, 4.0], 0.0, 3.0)
    assert energy == pytest.approx(12.0) and uncovered == pytest.approx(2.0)


def test_summarise_derives_per_frame_figures_and_reasons():
    r = summarise("x", 2.0, 10.0, 40, samples=3, missing={})
    assert (r["mean_power_w"], r["energy_per_frame_j"], r["fps_per_watt"]) == (5.0, 0.25, 4.0)
    assert set(RESULT_KEYS) <= set(r)
    none = summarise("x", 2.0, 10.0, None, samples=3, missing={})
    assert none["fps_per_watt"] is None and "frame count" in none["missing"]["fps_per_watt"]
    zero = summarise("x", 2.0, 10.0, 0, samples=3, missing={})
    assert zero["energy_per_frame_j"] is None
    assert "no frames" in zero["missing"]["energy_per_frame_j"]
    gone = summarise("x", 2.0, None, 5, samples=0, missing={"energy_j": "why"})
    assert gone["mean_power_w"] is None and gone["missing"]["energy_j"] == "why"
    assert gone["missing"]["mean_power_w"] == "energy_j is missing"
    with pytest.raises(ValueError):
        summarise("x", 2.0, 1.0, -1, samples=0, missing={})


def _timed(*pairs: tuple[float, str]) -> list[tuple[float, TegraSample]]:
    return [(t, parse_line(line)) for t, line in pairs]


def test_energy_is_missing_when_lines_arrive_in_bursts():
    line = EXAMPLES["orin_nx16_jp5"]
    burst = _timed(*[(1.0 + i * 1e-4, line) for i in range(6)])
    estimate = estimate_energy(burst, 1.0, 1.5, interval_s=0.1)
    assert estimate.energy_j is None and "bursts" in estimate.reason


def test_peak_temperatures_skip_offline_and_placeholder_sensors():
    samples = _timed((0.0, EXAMPLES["agx_orin_2025"]), (0.1, EXAMPLES["nano_jp4"]),
                     (0.2, "RAM 1/2MB (lfb 1x1MB) CPU@50C GPU@-256C"))
    missing: dict[str, str] = {}
    peaks = peak_temperatures(samples, missing)
    assert peaks["CPU"] == 50.0 and peaks["tj"] == 44.343 and peaks["GPU"] == 36.0
    assert peaks["CV0"] is None and "offline" in missing["temperatures.CV0"]
    assert "PMIC" not in peaks and "placeholder" in missing["temperatures.PMIC"]


def test_clock_ranges_cover_every_gpc_and_online_core():
    samples = _timed((0.0, EXAMPLES["thor_idle_r39"]), (0.1, EXAMPLES["agx_orin_2025"]))
    assert clock_ranges(samples) == {"gr3d": [0, 1574], "emc": [2133, 4266], "cpu": [729, 2601]}


# ---- the sampler, end to end with a stand-in tegrastats -----------------------------------------

def _script(path: Path, body: str) -> str:
    path.write_text(f"#!{sys.executable} -S\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def standin_tegrastats(tmp_path: Path, lines: list[str], *, ignore_term: bool = False,
                       exit_code: int | None = None) -> str:
    """A fake tegrastats: records its argv, prints ``lines`` cyclically every --interval ms."""
    return _script(tmp_path / "tegrastats", f"""
        import signal, sys, time
        args = sys.argv[1:]
        open({str(tmp_path / "argv.txt")!r}, "w").write(" ".join(args))
        if {ignore_term!r}:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        interval = int(args[args.index("--interval") + 1]) / 1000
        lines, exit_code = {lines!r}, {exit_code!r}
        if exit_code is not None:
            print(lines[0], flush=True)
            sys.exit(exit_code)
        i = 0
        while True:
            print(lines[i % len(lines)], flush=True)
            i += 1
            time.sleep(interval)
        """)


CONSTANT_5W = ("RAM 1000/7620MB (lfb 5x1MB) CPU [10%@1984] GR3D_FREQ 50%@[713] cpu@50.5C "
               "VDD_IN 5000mW/5000mW")
NO_TOOLS = {"nvpmodel_path": "/nonexistent/nvpmodel",
            "jetson_clocks_path": "/nonexistent/jetson_clocks"}


def _run_window(telemetry, seconds: float = 0.2):
    import time
    with telemetry:
        time.sleep(seconds)
    return telemetry


def test_sampler_integrates_constant_power_over_the_window(tmp_path):
    tool = standin_tegrastats(tmp_path, [CONSTANT_5W])
    tel = _run_window(open_telemetry("tegrastats", tegrastats_path=tool, interval_ms=20,
                                     **NO_TOOLS))
    r = tel.result(frames=10)
    assert (tmp_path / "argv.txt").read_text() == "--interval 20"
    assert r["source"] == "tegrastats" and r["samples"] >= 2
    assert r["window_s"] >= 0.2
    assert r["energy_j"] == pytest.approx(5.0 * r["window_s"], rel=1e-9)
    assert r["mean_power_w"] == pytest.approx(5.0, rel=1e-9)
    assert r["energy_per_frame_j"] == pytest.approx(r["energy_j"] / 10)
    assert r["fps_per_watt"] == pytest.approx(10 / r["energy_j"])
    assert r["power"] == {"rails": ["VDD_IN"], "method": "rail VDD_IN"}
    assert r["temperatures"] == {"cpu": 50.5}
    assert r["freq_mhz"] == {"gr3d": [713, 713], "cpu": [1984, 1984]}
    assert r["throttling"] is None and "no throttling flag" in r["missing"]["throttling"]
    assert r["nvpmodel"] is None and "not found" in r["missing"]["nvpmodel"]
    assert r["clocks"] is None and "not found" in r["missing"]["clocks"]
    assert not any("held" in note for note in r["notes"])  # samples bracket the window
    assert "tegrastats terminated" in r["notes"]
    assert set(RESULT_KEYS) <= set(r)


def test_sampler_picks_the_module_rail_from_real_lines(tmp_path):
    tool = standin_tegrastats(tmp_path, [EXAMPLES["nano_jp4"]])
    r = _run_window(open_telemetry("tegrastats", tegrastats_path=tool, interval_ms=20,
                                   **NO_TOOLS), 0.1).result()
    assert r["energy_j"] == pytest.approx(1.022 * r["window_s"], rel=1e-9)
    assert r["power"]["rails"] == ["POM_5V_IN"]
    assert "PMIC" not in r["temperatures"] and "temperatures.PMIC" in r["missing"]
    assert r["fps_per_watt"] is None and "frame count" in r["missing"]["fps_per_watt"]


def test_sampler_records_nvpmodel_and_jetson_clocks(tmp_path):
    tool = standin_tegrastats(tmp_path, [CONSTANT_5W])
    nvpmodel = _script(tmp_path / "nvpmodel", """
        import sys
        assert sys.argv[1:] == ["-q"]
        print("NV Fan Mode:quiet")
        print("NV Power Mode: MAXN")
        print("0")
        """)
    clocks = _script(tmp_path / "jetson_clocks", """
        import sys
        print("Error: must be run as root")
        sys.exit(1)
        """)
    r = _run_window(TegrastatsSampler(path=tool, interval_ms=20, nvpmodel_path=nvpmodel,
                                      jetson_clocks_path=clocks), 0.05).result()
    assert r["nvpmodel"]["name"] == "MAXN" and r["nvpmodel"]["id"] == 0
    assert "NV Power Mode: MAXN" in r["nvpmodel"]["raw"]
    assert r["clocks"] is None
    assert r["missing"]["clocks"].endswith("exited with status 1: Error: must be run as root")


def test_sampler_kills_a_tegrastats_that_ignores_sigterm(tmp_path):
    tool = standin_tegrastats(tmp_path, [CONSTANT_5W], ignore_term=True)
    sampler = TegrastatsSampler(path=tool, interval_ms=20, stop_timeout_s=0.2,
                                nvpmodel_path="/nonexistent", jetson_clocks_path="/nonexistent")
    notes = _run_window(sampler, 0.05).result()["notes"]
    assert any(note.startswith("tegrastats killed after ignoring SIGTERM") for note in notes)


def test_sampler_reports_a_failing_tegrastats_as_missing(tmp_path):
    tool = standin_tegrastats(tmp_path, ["tegrastats: permission denied"], exit_code=1)
    r = _run_window(open_telemetry("tegrastats", tegrastats_path=tool, interval_ms=20,
                                   **NO_TOOLS), 0.05).result(frames=5)
    assert r["samples"] == 0 and r["energy_j"] is None
    reason = r["missing"]["energy_j"]
    assert "no samples" in reason and "status 1" in reason and "permission denied" in reason


def test_explicit_tegrastats_that_does_not_exist_is_a_user_error(tmp_path):
    with pytest.raises(BckdError, match="tegrastats not found"):
        open_telemetry("tegrastats", tegrastats_path=str(tmp_path / "nope"))
    with pytest.raises(BckdError, match="interval"):
        open_telemetry("tegrastats", tegrastats_path=sys.executable, interval_ms=0)


# ---- RAPL on a fake sysfs tree ------------------------------------------------------------------

def fake_rapl(root: Path, zones: dict[str, tuple[str, int, int]]) -> Path:
    """zones: directory name -> (name, energy_uj, max_energy_range_uj)."""
    root.mkdir(parents=True, exist_ok=True)
    for directory, (name, energy, max_range) in zones.items():
        write_rapl(root, directory, energy)
        (root / directory / "name").write_text(name + "\n")
        (root / directory / "max_energy_range_uj").write_text(f"{max_range}\n")
    return root


def write_rapl(root: Path, directory: str, energy_uj: int) -> None:
    (root / directory).mkdir(exist_ok=True)
    (root / directory / "energy_uj").write_text(f"{energy_uj}\n")


def test_rapl_sums_packages_and_lists_every_zone(tmp_path):
    root = fake_rapl(tmp_path / "powercap", {
        "intel-rapl:0": ("package-0", 1_000_000, 10**12), "intel-rapl:0:0": ("core", 0, 10**12),
        "intel-rapl:0:2": ("dram", 0, 10**12), "intel-rapl:1": ("package-1", 0, 10**12),
        "intel-rapl:2": ("psys", 0, 10**12), "intel-rapl-mmio:0": ("package-0", 0, 10**12)})
    meter = open_telemetry("rapl", rapl_root=root, rapl_poll_s=3600)
    with meter:
        write_rapl(root, "intel-rapl:0", 4_000_000)
        write_rapl(root, "intel-rapl:0:0", 2_000_000)
        write_rapl(root, "intel-rapl:0:2", 500_000)
        write_rapl(root, "intel-rapl:1", 1_500_000)
        write_rapl(root, "intel-rapl:2", 9_000_000)
    r = meter.result(frames=9)
    assert r["source"] == "rapl"
    assert r["energy_j"] == pytest.approx(4.5)  # 3 J + 1.5 J; sub-zones and psys not summed
    assert r["zones_energy_j"] == {"package-0": 3.0, "package-0/core": 2.0, "package-0/dram": 0.5,
                                   "package-1": 1.5, "psys": 9.0}
    assert r["fps_per_watt"] == pytest.approx(2.0)
    assert r["temperatures"] is None and "rapl" in r["missing"]["temperatures"]


def test_rapl_folds_counter_wraparound(tmp_path):
    root = fake_rapl(tmp_path, {"intel-rapl:0": ("package-0", 900_000, 1_000_000)})
    meter = RaplMeter(root=root, poll_s=3600)
    with meter:
        write_rapl(root, "intel-rapl:0", 100_000)  # wrapped: +200_000
        meter.sample()
        write_rapl(root, "intel-rapl:0", 50_000)  # wrapped again: +950_000
        meter.sample()
        write_rapl(root, "intel-rapl:0", 60_000)  # +10_000
    assert meter.result()["energy_j"] == pytest.approx(1.16)


def test_rapl_permission_denied_is_missing_with_the_reason(tmp_path, monkeypatch):
    root = fake_rapl(tmp_path, {"intel-rapl:0": ("package-0", 1, 100)})

    def denied(zone: Zone) -> int:
        raise PermissionError(13, "Permission denied", str(zone.energy_file))
    monkeypatch.setattr(Zone, "read", denied)
    reason = rapl_unavailable(root)
    assert "permission denied" in reason and "energy_uj" in reason and "root" in reason
    with pytest.raises(BckdError, match="permission denied"):
        open_telemetry("rapl", rapl_root=root)


def test_rapl_without_zones_or_packages(tmp_path):
    assert "no RAPL zones" in rapl_unavailable(tmp_path / "empty")
    root = fake_rapl(tmp_path / "p", {"intel-rapl:0": ("psys", 1, 100)})
    assert "no RAPL package zone" in rapl_unavailable(root) and "psys" in rapl_unavailable(root)


def test_rapl_read_failure_during_the_window_is_missing(tmp_path):
    root = fake_rapl(tmp_path, {"intel-rapl:0": ("package-0", 1, 100)})
    meter = RaplMeter(root=root, poll_s=3600)
    with meter:
        (root / "intel-rapl:0" / "energy_uj").write_text("garbage")
    r = meter.result(frames=1)
    assert r["energy_j"] is None and "failed during the window" in r["missing"]["energy_j"]


# ---- NVML with a fake pynvml --------------------------------------------------------------------

def fake_pynvml(*, energy_counter: bool = True, gpus: int = 1, init_error: bool = False,
                power_mw: int = 50_000) -> types.ModuleType:
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    counter = {"mj": 1000}

    def total_energy(handle):
        if not energy_counter:
            raise NVMLError("Not Supported")
        counter["mj"] += 250  # each read 250 mJ later
        return counter["mj"]

    def init():
        if init_error:
            raise NVMLError("Driver Not Loaded")

    def handle(index):
        if index >= gpus:
            raise NVMLError("Invalid Argument")
        return ("gpu", index)

    nv.NVMLError = NVMLError
    nv.NVML_TEMPERATURE_GPU = 0
    nv.nvmlClocksThrottleReasonGpuIdle = 0x1
    nv.nvmlClocksThrottleReasonSwPowerCap = 0x4
    nv.nvmlClocksThrottleReasonHwSlowdown = 0x8
    nv.nvmlClocksThrottleReasonAll = 0xF  # not a single reason: never decoded
    nv.nvmlClocksThrottleReasonNone = 0
    nv.nvmlInit, nv.nvmlShutdown = init, lambda: None
    nv.nvmlDeviceGetCount = lambda: gpus
    nv.nvmlDeviceGetHandleByIndex = handle
    nv.nvmlDeviceGetName = lambda h: b"Fake GPU"
    nv.nvmlDeviceGetTotalEnergyConsumption = total_energy
    nv.nvmlDeviceGetPowerUsage = lambda h: power_mw
    nv.nvmlDeviceGetTemperature = lambda h, sensor: 61
    nv.nvmlDeviceGetCurrentClocksThrottleReasons = lambda h: 0x4
    return nv


def test_nvml_uses_the_energy_counter(tmp_path):
    meter = _run_window(open_telemetry("nvml", nvml_module=fake_pynvml(), nvml_poll_s=0.01), 0.05)
    r = meter.result(frames=5)
    assert r["energy_j"] == pytest.approx(0.25)  # counter read once at each end of the window
    assert r["power"]["method"].startswith("nvmlDeviceGetTotalEnergyConsumption")
    assert r["device"] == "Fake GPU" and r["temperatures"] == {"gpu0": 61}
    assert r["throttling"] == {"reasons_mask": 4, "reasons": ["SwPowerCap"]}
    assert r["samples"] >= 2


def test_nvml_falls_back_to_integrating_power_samples():
    meter = NvmlMeter(module=fake_pynvml(energy_counter=False), poll_s=0.01)
    r = _run_window(meter, 0.05).result()
    assert r["energy_j"] == pytest.approx(50.0 * r["window_s"], rel=1e-9)
    assert r["power"]["method"].startswith("nvmlDeviceGetPowerUsage")


def test_nvml_unavailable_reasons(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if not installed
    assert "nvidia-ml-py" in nvml_unavailable()
    assert "no device 0" in nvml_unavailable(fake_pynvml(gpus=0))
    assert "Driver Not Loaded" in nvml_unavailable(fake_pynvml(init_error=True))
    with pytest.raises(BckdError, match="nvidia-ml-py"):
        open_telemetry("nvml")


def test_reason_names_decode_single_bits_only():
    nv = fake_pynvml()
    assert reason_names(nv, 0xD) == ["GpuIdle", "HwSlowdown", "SwPowerCap"]


# ---- open_telemetry -----------------------------------------------------------------------------

def test_kinds_and_option_errors():
    assert KINDS == ("auto", "tegrastats", "rapl", "nvml", "none")
    with pytest.raises(BckdError, match="did you mean 'rapl'"):
        open_telemetry("rappl")
    with pytest.raises(BckdError, match="unknown telemetry option 'interval'"):
        open_telemetry("none", interval=5)


def test_none_times_the_window_and_reports_everything_missing():
    tel = _run_window(open_telemetry("none"), 0.01)
    r = tel.result(frames=3)
    assert isinstance(tel, NullTelemetry) and r["window_s"] >= 0.01
    assert all(r[k] is None for k in ("energy_j", "mean_power_w", "fps_per_watt", "nvpmodel"))
    assert r["missing"]["energy_j"] == "telemetry is off (kind 'none')"


def test_auto_prefers_tegrastats(tmp_path):
    tool = standin_tegrastats(tmp_path, [CONSTANT_5W])
    tel = open_telemetry("auto", tegrastats_path=tool, **NO_TOOLS)
    assert isinstance(tel, TegrastatsSampler)


def test_auto_combines_rapl_and_nvml_on_a_host(tmp_path):
    root = fake_rapl(tmp_path / "powercap", {"intel-rapl:0": ("package-0", 0, 10**12)})
    tel = open_telemetry("auto", tegrastats_path="/nonexistent/tegrastats", rapl_root=root,
                         rapl_poll_s=3600, nvml_module=fake_pynvml(), nvml_poll_s=0.01,
                         nv_tegra_release=tmp_path / "absent")
    assert isinstance(tel, CombinedTelemetry)
    with tel:
        write_rapl(root, "intel-rapl:0", 2_000_000)
    r = tel.result(frames=10)
    assert r["source"] == "rapl+nvml"
    assert r["energy_j"] == pytest.approx(2.25)  # 2 J CPU package + 0.25 J GPU counter
    assert set(r["parts"]) == {"rapl", "nvml"}
    assert r["temperatures"] == {"nvml.gpu0": 61}
    assert r["throttling"] == {"nvml": {"reasons_mask": 4, "reasons": ["SwPowerCap"]}}


def test_auto_falls_back_to_none_with_every_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.3\n")
    tel = open_telemetry("auto", tegrastats_path="/nonexistent/tegrastats",
                         nv_tegra_release=release, rapl_root=tmp_path / "no-powercap")
    reason = _run_window(tel, 0.0).result()["missing"]["energy_j"]
    assert isinstance(tel, NullTelemetry)
    assert "exists but '/nonexistent/tegrastats' was not found" in reason
    assert "rapl: no RAPL zones" in reason and "nvml: pynvml is needed" in reason


def test_auto_notes_the_sources_it_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    root = fake_rapl(tmp_path, {"intel-rapl:0": ("package-0", 0, 10**12)})
    tel = open_telemetry("auto", tegrastats_path="/nonexistent/tegrastats", rapl_root=root,
                         nv_tegra_release=tmp_path / "absent")
    assert isinstance(tel, RaplMeter)
    assert tel.notes and tel.notes[0].startswith("auto skipped nvml: pynvml is needed")


def test_result_before_the_window_closes_is_an_error():
    with pytest.raises(RuntimeError, match="not closed"):
        NullTelemetry("x").result()


def test_telemetry_imports_without_torch():
    code = ("import sys, runtime.telemetry, runtime.telemetry.sampler, runtime.telemetry.rapl, "
            "runtime.telemetry.nvml; assert 'torch' not in sys.modules; "
            "assert 'pynvml' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=HERE.parent,
                   env={**os.environ, "PYTHONPATH": str(HERE.parent)})
