"""A stand-in ``trtexec`` for the profiler tests, pretending to be one TensorRT version.

:func:`write_fake_trtexec` writes an executable that runs :func:`main` here. Like the real tool it
prints the ``&&&& RUNNING`` banner, the device block, ``TensorRT version:``, the echoed options,
the prolog, trace averages, the performance summary and its warnings, and writes
``--exportTimes``; per version (trt-jetson.md §3.1-§3.3) it accepts only the flags that version
has (an unknown flag fails the run), takes one ``--percentile`` up to 8.4 and a list from 8.5,
prints ``End-to-End Host Latency`` up to 8.3, exports warm-up queries up to 8.4, and applies the
11.x defaults (no data transfers, spin-wait and CUDA graph on). The timings are synthetic and
seeded; the summary is computed from them with trtexec's own percentile and median rules.
"""
from __future__ import annotations

import json
import random
import stat
import sys
from pathlib import Path

import numpy as np

from trtexec_logs import DEVICE_ORIN, STAMP, options_echo

HERE = Path(__file__).resolve().parent
FLAGS_8_10 = {"--loadEngine", "--onnx", "--shapes", "--iterations", "--duration", "--warmUp",
              "--percentile", "--exportTimes", "--noDataTransfers", "--useCudaGraph",
              "--useSpinWait", "--verbose", "--avgRuns", "--batch", "--fp16", "--int8", "--best",
              "--calib", "--separateProfileRun", "--infStreams", "--streams"}
ADDED_11 = {"--includeDataTransfers", "--noCudaGraph", "--noSpinWait"}
REMOVED_11 = {"--fp16", "--bf16", "--int8", "--fp8", "--int4", "--best", "--calib"}


def write_fake_trtexec(folder: Path, version: str, *, fail: bool = False) -> Path:
    """An executable ``trtexec`` in ``folder``; each run saves its argv to ``folder/argv.json`` and
    a copy of its ``--exportTimes`` file to ``folder/exported.json``."""
    script = folder / "trtexec"
    script.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(HERE)!r})\n"
                      f"from trtexec_fake import main\n"
                      f"sys.exit(main({version!r}, {str(folder / 'argv.json')!r}, sys.argv, "
                      f"fail={fail!r}))\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def version_token(v: tuple[int, int, int]) -> int:
    return v[0] * (10000 if v[0] >= 10 else 1000) + v[1] * 100 + v[2]


def main(version: str, record: str, argv: list[str], fail: bool = False) -> int:
    v = tuple(int(x) for x in version.split("."))
    footer = f"TensorRT.trtexec [TensorRT v{version_token(v)}] # {' '.join(argv)}"
    print(f"&&&& RUNNING {footer}")
    args = argv[1:]
    if args == ["--version"]:
        return _failed("Model missing or format not recognized", footer)
    Path(record).write_text(json.dumps(args))
    opts = dict(a.split("=", 1) if "=" in a else (a, "") for a in args)
    if error := _check_flags(v, opts):
        return _failed(error, footer)
    if fail:
        return _failed("Error[1]: [runtime.cpp::deserializeCudaEngine] engine plan file is "
                       "incompatible with this version of TensorRT", footer)
    _run(v, opts, Path(record).with_name("exported.json"))
    print(f"&&&& PASSED {footer}")
    return 0


def _failed(message: str, footer: str) -> int:
    print(f"{STAMP}[E] {message}")
    print(f"&&&& FAILED {footer}")
    return 1


def _check_flags(v: tuple[int, ...], opts: dict[str, str]) -> str | None:
    known = (FLAGS_8_10 | ADDED_11) - REMOVED_11 if v[0] >= 11 else FLAGS_8_10
    for flag in opts:
        if flag not in known:
            return f"Unknown option: {flag}"
    if v[:2] < (8, 5) and "," in opts.get("--percentile", ""):
        return f"Invalid percentile {opts['--percentile']}"
    return None


def _settings(v: tuple[int, ...], opts: dict[str, str]) -> dict[str, bool]:
    if v[0] >= 11:
        return {"transfers": "--includeDataTransfers" in opts, "graph": "--noCudaGraph" not in opts,
                "spin": "--noSpinWait" not in opts}
    return {"transfers": "--noDataTransfers" not in opts, "graph": "--useCudaGraph" in opts,
            "spin": "--useSpinWait" in opts}


def _shapes(spec: str) -> dict[str, str]:
    out = {}
    for item in filter(None, spec.split(",")):
        name, _, dims = item.rpartition(":")
        out[name.strip("'")] = dims
    return out


def _trace(iterations: int, duration_ms: float, warmup_ms: float, transfers: bool) -> list[dict]:
    """Back-to-back queries: warm-ups until ``warmup_ms``, then until both limits are met."""
    rng = random.Random(7)
    t, trace, timed_start = 0.0, [], None
    while True:
        h2d = 0.12 + 0.02 * rng.random() if transfers else 0.0
        compute = 2.0 + 0.3 * rng.random() + (3.0 if rng.random() < 0.05 else 0.0)
        d2h = 0.05 + 0.01 * rng.random() if transfers else 0.0
        q = {"startEnqMs": t, "endEnqMs": t + 0.4 + 0.1 * rng.random(), "startH2dMs": t,
             "endH2dMs": t + h2d, "startComputeMs": t + h2d, "endComputeMs": t + h2d + compute,
             "startD2hMs": t + h2d + compute, "endD2hMs": t + h2d + compute + d2h,
             "h2dMs": h2d, "computeMs": compute, "d2hMs": d2h, "latencyMs": h2d + compute + d2h}
        trace.append(q)
        t = q["endD2hMs"]
        if timed_start is None and q["startComputeMs"] >= warmup_ms:
            timed_start = len(trace) - 1
        timed = 0 if timed_start is None else len(trace) - timed_start
        if timed >= iterations and t - trace[timed_start]["startH2dMs"] >= duration_ms:
            return trace[:timed_start], trace[timed_start:]


def _percentile(values: list[float], p: float) -> float:
    s, f32 = sorted(values), np.float32  # float32 arithmetic, as in sampleReporting.cpp
    return s[max(len(s) - 1 - int((f32(1) - f32(p) / f32(100)) * f32(len(s))), 0)]


def _median(values: list[float]) -> float:
    s, m = sorted(values), len(values) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def _stat_line(values: list[float], percentiles: list[float]) -> str:
    mean = sum(values) / len(values)
    text = (f"min = {min(values):g} ms, max = {max(values):g} ms, mean = {mean:g} ms, "
            f"median = {_median(values):g} ms")
    return text + "".join(f", percentile({p:g}%) = {_percentile(values, p):g} ms"
                          for p in percentiles)


def _run(v: tuple[int, ...], opts: dict[str, str], copy: Path) -> None:
    s = _settings(v, opts)
    iterations, duration = int(opts.get("--iterations", 10)), float(opts.get("--duration", 3))
    warmup = float(opts.get("--warmUp", 200))
    default = "90,95,99" if v[:2] >= (8, 5) else "99"
    percentiles = [float(p) for p in opts.get("--percentile", default).split(",")]
    warmups, timed = _trace(iterations, duration * 1000, warmup, s["transfers"])
    print(DEVICE_ORIN + f"{STAMP}[I] TensorRT version: {'.'.join(map(str, v))}")
    print(options_echo(v[0], v[1], transfers=s["transfers"], spin=s["spin"], graph=s["graph"],
                       shapes=_shapes(opts.get("--shapes", "")), iterations=iterations,
                       duration=duration, warmup=warmup,
                       percentiles=",".join(f"{p:g}" for p in percentiles),
                       export_times=opts.get("--exportTimes", "")), end="")
    _print_report(v, warmups, timed, percentiles, warmup)
    if "--exportTimes" in opts:
        exported = timed if v[:2] >= (8, 5) else warmups + timed
        for path in (Path(opts["--exportTimes"]), copy):  # the copy outlives the scratch folder
            _export(path, exported, end_to_end=v[:2] < (8, 4))


def _print_report(v: tuple[int, ...], warmups: list[dict], timed: list[dict],
                  percentiles: list[float], warmup_ms: float) -> None:
    walltime = timed[-1]["endD2hMs"] - timed[0]["startH2dMs"]
    col = {k: [q[k] for q in timed] for k in timed[0]}
    enqueue = [q["endEnqMs"] - q["startEnqMs"] for q in timed]
    info = [f"Warmup completed {len(warmups)} queries over {warmup_ms:g} ms",
            f"Timing trace has {len(timed)} queries over {walltime / 1000:g} s", "",
            "=== Trace details ===", "Trace averages of 10 runs:"]
    for i in range(0, len(timed) - 9, 10):
        g = [sum(c[i:i + 10]) / 10 for c in (col["computeMs"], col["latencyMs"], enqueue)]
        info.append(f"Average on 10 runs - GPU latency: {g[0]:g} ms - Host latency: {g[1]:g} ms "
                    f"(enqueue {g[2]:g} ms)")
    info += ["", "=== Performance summary ===",
             f"Throughput: {len(timed) / walltime * 1000:g} qps",
             f"Latency: {_stat_line(col['latencyMs'], percentiles)}"]
    if v[:2] < (8, 4):
        info.append(f"End-to-End Host Latency: {_stat_line(col['latencyMs'], percentiles)}")
    info += [f"Enqueue Time: {_stat_line(enqueue, percentiles)}",
             f"H2D Latency: {_stat_line(col['h2dMs'], percentiles)}",
             f"GPU Compute Time: {_stat_line(col['computeMs'], percentiles)}",
             f"D2H Latency: {_stat_line(col['d2hMs'], percentiles)}",
             f"Total Host Walltime: {walltime / 1000:g} s",
             f"Total GPU Compute Time: {sum(col['computeMs']) / 1000:g} s"]
    print("".join(f"{STAMP}[I] {ln}\n" for ln in info), end="")
    for line in _warnings(v, col["computeMs"]):
        print(f"{STAMP}[W] {line}")
    print(f"{STAMP}[I] Explanations of the performance metrics are printed in the verbose logs.")


def _warnings(v: tuple[int, ...], compute: list[float]) -> list[str]:
    mean = sum(compute) / len(compute)
    cov = (sum((c - mean) ** 2 for c in compute) / len(compute)) ** 0.5 / mean * 100
    if v[:2] < (8, 4) or cov <= 1.0:
        return []
    return [f"* GPU compute time is unstable, with coefficient of variance = {cov:g}%.",
            "  If not already in use, locking GPU clock frequency or adding --useSpinWait may "
            "improve the stability."]


def _export(path: Path, queries: list[dict], end_to_end: bool) -> None:
    rows = []
    for q in queries:
        row = dict(q, endToEndMs=q["latencyMs"]) if end_to_end else q
        rows.append("{ " + ", ".join(f'"{k}" : {val:g}' for k, val in row.items()) + " }")
    path.write_text("[\n  " + "\n, ".join(rows) + "\n]\n")
