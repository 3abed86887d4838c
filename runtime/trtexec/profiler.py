"""Time an engine (or an ONNX file) with ``trtexec`` alone: ``bckd profile --backend trtexec``.

On a board with only JetPack's tools there is no TensorRT Python binding to time with, but
``trtexec`` is there. :func:`profile_trtexec` asks it for its version, builds the inference command
line that version understands (trt-jetson.md §3.1), runs it, parses the summary
(:mod:`~runtime.trtexec.report`) and the per-query ``--exportTimes`` file
(:mod:`~runtime.trtexec.times`), and returns a JSON-ready dict shaped like the runtime's latency
stats (n, mean, std, min, max, p50/p90/p95/p99, fps, in ms) with trtexec's own summary beside it.

Per version: ``--percentile`` takes one value up to 8.4 (the highest requested is passed) and a
list from 8.5; TensorRT 11 times without H2D/D2H copies, with CUDA graphs and spin-wait by default,
so ``include_data_transfers=True`` adds ``--includeDataTransfers`` there (and nothing on <= 10,
where copies are timed by default), and the CUDA-graph / spin-wait switches use ``--useX`` on
<= 10 and ``--noX`` on 11. A flag a version lacks is never passed.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from runtime.errors import BckdError
from runtime.trt_versions import TrtVersion
from runtime.trtexec.report import TrtexecLog, parse_trtexec_log
from runtime.trtexec.times import (PERCENTILE_METHOD, IterationTimes, coefficient_of_variation_pct,
                                   drop_warmups, latency_stats, read_export_times)
from runtime.trtexec.tool import find_trtexec, run_trtexec, shape_spec, trtexec_version

DEFAULT_PERCENTILES = (50.0, 90.0, 95.0, 99.0)
MIN_PROFILE_VERSION = (8, 0)
ENGINE_TIMEOUT_S = 600.0
ONNX_TIMEOUT_S = 3600.0  # trtexec builds the engine first
# Flags profile_trtexec sets itself -> what to use instead.
MANAGED_FLAGS = {
    "--loadEngine": "the engine_or_onnx argument", "--onnx": "the engine_or_onnx argument",
    "--shapes": "shapes=", "--iterations": "iterations=", "--duration": "duration=",
    "--warmUp": "warmup_ms=", "--percentile": "percentiles=",
    "--exportTimes": "nothing (bckd always exports the per-query times itself)",
    "--includeDataTransfers": "include_data_transfers=",
    "--noDataTransfers": "include_data_transfers=",
    "--useCudaGraph": "use_cuda_graph=", "--noCudaGraph": "use_cuda_graph=",
    "--useSpinWait": "spin_wait=", "--noSpinWait": "spin_wait=",
}
REMOVED_IN_11 = ("--fp16", "--bf16", "--int8", "--fp8", "--int4", "--best", "--calib")


@dataclass(frozen=True)
class InferenceRun:
    """What to time and how; checked on construction. Durations are whole numbers because trtexec
    before 10.x parses ``--duration`` and ``--warmUp`` as integers."""

    model: Path
    shapes: Mapping[str, Sequence[int]] | None = None
    iterations: int = 100
    duration_s: int = 3
    warmup_ms: int = 1000
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    include_data_transfers: bool = True
    use_cuda_graph: bool | None = None          # None: the version's default (off <= 10, on 11)
    spin_wait: bool | None = None               # None: the version's default (off <= 10, on 11)
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check_counts(self.iterations, self.duration_s, self.warmup_ms)
        if not self.percentiles or any(not 0 <= float(p) <= 100 for p in self.percentiles):
            raise BckdError(f"percentiles must be in [0, 100] (got {list(self.percentiles)})")
        _check_extra_args(self.extra_args)

    @property
    def is_onnx(self) -> bool:
        return self.model.suffix.lower() == ".onnx"

    @property
    def batch(self) -> int | None:
        """The first input's leading dimension, when shapes are given."""
        first = next(iter(self.shapes.values()), None) if self.shapes else None
        return int(first[0]) if first else None


def _check_counts(iterations: int, duration_s: int, warmup_ms: int) -> None:
    for name, value, low in (("iterations", iterations, 1), ("duration", duration_s, 0),
                             ("warmup_ms", warmup_ms, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BckdError(f"{name} must be a whole number >= {low} (got {value!r})")


def _check_extra_args(extra_args: Sequence[str]) -> None:
    for arg in extra_args:
        name = arg.split("=", 1)[0]
        if name in MANAGED_FLAGS:
            raise BckdError(f"extra trtexec argument {arg} clashes with a setting bckd makes; "
                            f"use {MANAGED_FLAGS[name]} instead")


def require_profilable(version: TrtVersion, extra_args: Sequence[str] = ()) -> None:
    """Refuse trtexec versions and flags whose command line bckd does not know."""
    if (version.major, version.minor) < MIN_PROFILE_VERSION:
        raise BckdError(f"trtexec {version} is too old: bckd profiles with TensorRT 8.0 or newer "
                        "(JetPack 4.6+); upgrade JetPack or use another backend")
    removed = [a for a in extra_args if version.major >= 11 and a.split("=", 1)[0] in REMOVED_IN_11]
    if removed:
        raise BckdError(f"trtexec {version} has no {', '.join(removed)} (removed in TensorRT 11: "
                        "precision comes from the ONNX types); drop them")


def inference_command(exe: str, version: TrtVersion, run: InferenceRun,
                      times_path: Path) -> list[str]:
    """The trtexec command line that times ``run`` on ``version``."""
    model_flag = "--onnx" if run.is_onnx else "--loadEngine"
    cmd = [exe, f"{model_flag}={run.model}"]
    if run.shapes:
        cmd.append("--shapes=" + ",".join(shape_spec(n, s) for n, s in run.shapes.items()))
    cmd += [f"--iterations={run.iterations}", f"--duration={run.duration_s}",
            f"--warmUp={run.warmup_ms}", percentile_arg(version, run.percentiles)]
    cmd += toggle_args(version, run)
    cmd.append(f"--exportTimes={times_path}")
    return cmd + list(run.extra_args)


def percentile_arg(version: TrtVersion, percentiles: Sequence[float]) -> str:
    """``--percentile=90,95,99`` from 8.5; one value (the highest asked for) before."""
    if (version.major, version.minor) >= (8, 5):
        return "--percentile=" + ",".join(f"{float(p):g}" for p in percentiles)
    return f"--percentile={max(float(p) for p in percentiles):g}"


def timing_defaults(version: TrtVersion) -> dict[str, tuple[bool, str]]:
    """Per setting: (the version's default, the flag that turns it the other way) (§3.1).

    TensorRT 11 turned all three defaults around and kept only the flag that undoes its new
    default; the older flags (``--noDataTransfers``, ``--useCudaGraph``, ``--useSpinWait``) are
    deprecated no-ops there, and the 10.3 help lists none of the 11.x forms.
    """
    if version.major >= 11:
        return {"include_data_transfers": (False, "--includeDataTransfers"),
                "use_cuda_graph": (True, "--noCudaGraph"), "spin_wait": (True, "--noSpinWait")}
    return {"include_data_transfers": (True, "--noDataTransfers"),
            "use_cuda_graph": (False, "--useCudaGraph"), "spin_wait": (False, "--useSpinWait")}


def toggle_args(version: TrtVersion, run: InferenceRun) -> list[str]:
    """Flags for the settings ``run`` wants away from ``version``'s default (None = default)."""
    args = []
    for setting, (default, flag) in timing_defaults(version).items():
        wanted = getattr(run, setting)
        if wanted is not None and wanted != default:
            args.append(flag)
    return args


# -- running -------------------------------------------------------------------------------------
def profile_trtexec(
    engine_or_onnx: str | os.PathLike,
    *,
    trtexec: str | os.PathLike | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    iterations: int = 100,
    duration: int = 3,
    warmup_ms: int = 1000,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    include_data_transfers: bool = True,
    use_cuda_graph: bool | None = None,
    spin_wait: bool | None = None,
    extra_args: Sequence[str] = (),
    log_path: str | os.PathLike | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Time ``engine_or_onnx`` with trtexec; a JSON-ready dict of latency stats (ms) and summary.

    trtexec runs at least ``iterations`` queries and ``duration`` seconds after ``warmup_ms`` of
    warm-up. ``shapes`` maps input names to shapes (needed for dynamic engines). With
    ``log_path`` the full output is kept there; otherwise it is kept only when the run fails (the
    error names it). ``timeout_s`` defaults to 10 minutes for an engine and an hour for ONNX
    (which trtexec builds first). trtexec's own percentiles are in ``result['trtexec']``; the
    top-level ones are bckd's (linear interpolation over the ``--exportTimes`` samples).
    """
    run = InferenceRun(model=_existing(engine_or_onnx), shapes=shapes, iterations=iterations,
                       duration_s=duration, warmup_ms=warmup_ms,
                       percentiles=tuple(float(p) for p in percentiles),
                       include_data_transfers=include_data_transfers,
                       use_cuda_graph=use_cuda_graph, spin_wait=spin_wait,
                       extra_args=tuple(extra_args))
    exe = find_trtexec(trtexec)
    version = trtexec_version(exe)
    require_profilable(version, run.extra_args)
    work = Path(tempfile.mkdtemp(prefix="bckd-trtexec-"))
    log = Path(log_path) if log_path is not None else work / "trtexec.log"
    try:
        cmd = inference_command(exe, version, run, work / "times.json")
        output = run_trtexec(cmd, log, timeout_s or _default_timeout(run))
        parsed = parse_trtexec_log(output, source=str(log))
        times = load_times(work / "times.json", parsed.version or version, parsed, run.warmup_ms)
    except BaseException:  # a failed or interrupted run keeps the log its error names
        _cleanup(work, keep=log)
        raise
    _cleanup(work, keep=None)
    return profile_result(run, cmd, parsed, times, log=log if log_path is not None else None)


def _existing(path: str | os.PathLike) -> Path:
    model = Path(path)
    if not model.is_file():
        raise BckdError(f"{model} is not a file; pass a TensorRT engine or an ONNX model")
    return model.resolve()


def _default_timeout(run: InferenceRun) -> float:
    base = ONNX_TIMEOUT_S if run.is_onnx else ENGINE_TIMEOUT_S
    return base + run.duration_s + run.warmup_ms / 1e3


def _cleanup(work: Path, keep: Path | None) -> None:
    """Remove the scratch folder, unless it holds the log a failure message points at."""
    if keep is not None and keep.parent == work and keep.exists():
        (work / "times.json").unlink(missing_ok=True)
        return
    shutil.rmtree(work, ignore_errors=True)


def load_times(path: Path, version: TrtVersion, parsed: TrtexecLog,
               warmup_ms: float | None = None) -> IterationTimes:
    """The ``--exportTimes`` samples without warm-ups (exported too up to TensorRT 8.4, §3.3)."""
    times = read_export_times(path)
    if (version.major, version.minor) >= (8, 5):
        return times
    warmup = parsed.options.warmup_ms if parsed.options.warmup_ms is not None else warmup_ms
    if warmup is None:
        raise BckdError(f"trtexec {version} exports warm-up queries too, and {parsed.source} does "
                        "not say how long the warm-up was ('Duration: ... warm up'); pass the "
                        "full log")
    return drop_warmups(times, warmup)


def profile_result(run: InferenceRun, cmd: list[str], parsed: TrtexecLog, times: IterationTimes,
                   log: Path | None = None) -> dict[str, Any]:
    """The runtime-shaped stats dict: bckd's numbers at the top, trtexec's under 'trtexec'."""
    wanted = sorted(set(DEFAULT_PERCENTILES) | set(run.percentiles))
    stats = latency_stats(times.latency_ms, wanted)
    batch = run.batch or _batch_from_log(parsed)
    qps = 1e3 / stats["mean"] if stats["mean"] > 0 else None
    includes = _includes_transfers(run, parsed)
    return {
        **stats, "unit": "ms", "mode": "latency", "backend": "trtexec", "artifact": str(run.model),
        "metric": "latency (H2D + GPU compute + D2H)" if includes
                  else "latency (GPU compute only: no data transfers)",
        "qps": qps, "batch": batch, "fps": qps * batch if qps and batch else None,
        "total_s": parsed.summary.total_host_walltime_s, "warmup": parsed.warmup_queries,
        "warmup_ms": run.warmup_ms, "percentile_method": PERCENTILE_METHOD,
        "latency_includes_data_transfers": includes,
        "gpu_compute": {**latency_stats(times.compute_ms, wanted),
                        "cov_pct": coefficient_of_variation_pct(times.compute_ms)},
        "warnings": list(parsed.summary.warnings), "comparability": _notes(run, parsed, times),
        "command": cmd, "trtexec": {**parsed.to_dict(), "log": str(log) if log else None},
    }


def _batch_from_log(parsed: TrtexecLog) -> int | None:
    """Images per query: implicit batch N, else the first echoed inference shape's leading dim."""
    if parsed.options.implicit_batch:
        return parsed.options.implicit_batch
    first = next(iter(parsed.options.shapes.values()), "")
    head = first.split("x", 1)[0]
    return int(head) if head.isdigit() else None


def _includes_transfers(run: InferenceRun, parsed: TrtexecLog) -> bool:
    """What trtexec says it did, else (a log without the option echo) what was asked for."""
    said = parsed.latency_includes_data_transfers
    return run.include_data_transfers if said is None else said


def _notes(run: InferenceRun, parsed: TrtexecLog, times: IterationTimes) -> list[str]:
    said = parsed.latency_includes_data_transfers
    notes = [n for n in parsed.notes if said is not None or "data transfers were timed" not in n]
    if said is None:
        notes.append("trtexec did not echo its 'Data transfers:' setting; assuming the requested "
                     f"include_data_transfers={run.include_data_transfers}")
    elif said != run.include_data_transfers:
        notes.append(f"asked for include_data_transfers={run.include_data_transfers} but trtexec "
                     f"reports 'Data transfers: {'Enabled' if said else 'Disabled'}'")
    if run.is_onnx:
        notes.append("trtexec built the engine from ONNX with its own defaults (FP32/TF32 up to "
                     "10.x unless extra_args add precision flags; the ONNX types on 11.x), which "
                     "need not match the engine bckd would build")
    if parsed.options.implicit_batch is None and parsed.timed_queries not in (None, times.n):
        notes.append(f"trtexec timed {parsed.timed_queries} queries but exported {times.n}")
    notes.append("mean/std/percentiles: linear interpolation over the --exportTimes samples; "
                 "trtexec's own percentiles (under 'trtexec') take one sample without "
                 "interpolation (nearest rank), so the two can differ by up to one sample gap")
    return notes
