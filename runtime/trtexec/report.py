"""Read what a ``trtexec`` inference run printed: performance summary, banner, GPU and options.

The summary format is ``printEpilog`` in TensorRT's ``samples/common/sampleReporting.cpp``
(trt-jetson.md §3.2): after ``=== Performance summary ===`` come ``Throughput: X qps``, then the
metric lines ``Latency``, (8.0/8.2 only) ``End-to-End Host Latency``, ``Enqueue Time``,
``H2D Latency``, ``GPU Compute Time``, ``D2H Latency``, each ``min = X ms, max = X ms, mean = X ms,
median = X ms`` plus one ``percentile(P%) = X ms`` per requested percentile (a single one up to 8.4,
a list from 8.5), then ``Total Host Walltime``, ``Total GPU Compute Time`` and ``[W] *`` warnings.

The options trtexec echoes (``=== Inference Options ===``) matter as much as the numbers: TensorRT
11 turned H2D/D2H copies off and CUDA graphs and spin-wait on by default (§3.1), so an 11.x
"Latency" is GPU compute only unless ``--includeDataTransfers`` was given.
:attr:`TrtexecLog.notes` says what a reader comparing runs must know. Nothing missing is filled
in: an absent value stays ``None``, and a summary without one of the lines every 8.0-11.x version
prints is a :class:`BckdError`.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from runtime.cuda import DeviceInfo
from runtime.errors import BckdError
from runtime.trt_versions import TrtVersion
from runtime.trtexec.tool import last_error, parse_trtexec_device, parse_trtexec_version

SUMMARY_HEADER = "=== Performance summary ==="
Line = tuple[str | None, str]  # (severity letter I/W/E/V/F or None, message) of one log line
_NUM = r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|inf|nan)"

# Logger prefix ``[10/03/2024-10:47:59] [I] `` (the timestamp is absent in some tools' logs).
_PREFIX = re.compile(r"^\s*(?:\[\d\d/\d\d/\d{4}-\d\d:\d\d:\d\d\]\s*)?\[([VIWEF])\] ?(.*)$")
_STATS = re.compile(rf"^min = ({_NUM}) ms, max = ({_NUM}) ms, mean = ({_NUM}) ms, "
                    rf"median = ({_NUM}) ms((?:, percentile\({_NUM}%\) = {_NUM} ms)*)\s*$")
_PERCENTILE = re.compile(rf"percentile\(({_NUM})%\) = ({_NUM}) ms")
_QPS, _SECONDS = re.compile(rf"^({_NUM}) qps\s*$"), re.compile(rf"^({_NUM}) s\s*$")
_SCALARS = {"Throughput": ("throughput_qps", _QPS),
            "Total Host Walltime": ("total_host_walltime_s", _SECONDS),
            "Total GPU Compute Time": ("total_gpu_compute_time_s", _SECONDS)}
METRICS = {"Latency": "latency", "End-to-End Host Latency": "end_to_end_host_latency",
           "Enqueue Time": "enqueue_time", "H2D Latency": "h2d_latency",
           "GPU Compute Time": "gpu_compute_time", "D2H Latency": "d2h_latency"}
OPTIONAL_LINES = ("End-to-End Host Latency",)  # 7.x-8.2 only
REQUIRED_LINES = tuple(k for k in (*_SCALARS, *METRICS) if k not in OPTIONAL_LINES)

_WARMUP = re.compile(rf"Warmup completed (\d+) queries over ({_NUM}) ms")
_TRACE = re.compile(rf"Timing trace has (\d+) queries over ({_NUM}) s")
_DURATION = re.compile(rf"^({_NUM})s \(\+ ({_NUM})ms warm up\)$")
_COV = re.compile(rf"coefficient of variance = ({_NUM})%")
_FOOTER = re.compile(r"&&&& (PASSED|FAILED|WAIVED) TensorRT\.trtexec")


def pct_key(p: float) -> str:
    """'p90' for 90, 'p99_9' for 99.9: percentile keys as in the runtime's latency stats."""
    return f"p{float(p):g}".replace(".", "_")


@dataclass(frozen=True)
class MetricStats:
    """One summary metric in ms; ``percentiles`` maps P to trtexec's own P-th percentile."""

    min: float
    max: float
    mean: float
    median: float
    percentiles: dict[float, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float]:
        out = {"min": self.min, "max": self.max, "mean": self.mean, "median": self.median}
        out.update({pct_key(p): v for p, v in self.percentiles.items()})
        return out


@dataclass(frozen=True)
class PerformanceSummary:
    """The ``=== Performance summary ===`` block; metric keys are :data:`METRICS` values."""

    throughput_qps: float
    metrics: dict[str, MetricStats]
    total_host_walltime_s: float
    total_gpu_compute_time_s: float
    warnings: tuple[str, ...] = ()

    @property
    def enqueue_bound(self) -> bool:
        """trtexec's own test: median enqueue > 0.8 x median GPU compute (§5.2)."""
        return any(w.startswith("* Throughput may be bound by Enqueue Time") for w in self.warnings)

    @property
    def transfer_bound(self) -> bool:
        """Median H2D or D2H >= median GPU compute."""
        return any(w.startswith("* Throughput may be bound by") and "-to-" in w
                   for w in self.warnings)

    @property
    def gpu_compute_cov_pct(self) -> float | None:
        """The coefficient of variance trtexec prints when it exceeds 1 % (8.4+), else None."""
        for w in self.warnings:
            if m := _COV.search(w):
                return float(m.group(1))
        return None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"throughput_qps": self.throughput_qps}
        out.update({k: v.to_dict() for k, v in self.metrics.items()})
        out.update(total_host_walltime_s=self.total_host_walltime_s,
                   total_gpu_compute_time_s=self.total_gpu_compute_time_s,
                   enqueue_bound=self.enqueue_bound, transfer_bound=self.transfer_bound,
                   gpu_compute_cov_pct=self.gpu_compute_cov_pct, warnings=list(self.warnings))
        return out


@dataclass(frozen=True)
class InferenceOptions:
    """What trtexec says it ran with (its Inference/Reporting Options echo); None: not printed."""

    batch: str | None = None                    # 'Explicit', or N for an implicit-batch engine
    shapes: dict[str, str] = field(default_factory=dict)  # name -> '1x3x512x512'; {} = model's
    iterations: int | None = None
    duration_s: float | None = None
    warmup_ms: float | None = None
    streams: int | None = None
    data_transfers: bool | None = None          # False: Latency excludes H2D/D2H
    spin_wait: bool | None = None
    cuda_graph: bool | None = None
    separate_profiling: bool | None = None
    percentiles: tuple[float, ...] | None = None
    export_times: str | None = None

    @property
    def implicit_batch(self) -> int | None:
        """N for ``Batch: N`` (implicit-batch engines, 8.x), None for explicit batch."""
        return int(self.batch) if self.batch and self.batch.isdigit() else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrtexecLog:
    """Everything bckd reads from one trtexec inference run's output."""

    summary: PerformanceSummary
    options: InferenceOptions
    version: TrtVersion | None = None
    device: DeviceInfo | None = None
    passed: bool | None = None                  # the '&&&& PASSED/FAILED' footer, if present
    warmup_queries: int | None = None           # prolog; multiplied by N for implicit batch N
    timed_queries: int | None = None
    source: str = "trtexec output"

    @property
    def latency_includes_data_transfers(self) -> bool | None:
        """Whether 'Latency' counts H2D + D2H copies (None: the log does not say)."""
        return self.options.data_transfers

    @property
    def notes(self) -> list[str]:
        """What differs from a plain, comparable run (TensorRT <= 10 defaults)."""
        return comparability_notes(self.options)

    def to_dict(self) -> dict[str, Any]:
        return {"version": str(self.version) if self.version else None,
                "device": self.device.to_dict() if self.device else None,
                "passed": self.passed, "options": self.options.to_dict(),
                "warmup_queries": self.warmup_queries, "timed_queries": self.timed_queries,
                "summary": self.summary.to_dict(),
                "latency_includes_data_transfers": self.latency_includes_data_transfers,
                "notes": self.notes, "log": self.source}


def read_trtexec_log(path: str | Path) -> TrtexecLog:
    """Parse a saved trtexec log file."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise BckdError(f"cannot read trtexec log {path} ({exc.strerror}); check the path") from exc
    return parse_trtexec_log(text, source=str(path))


def parse_trtexec_log(text: str, source: str = "trtexec output") -> TrtexecLog:
    """Parse trtexec's stdout/stderr; ``source`` (the log's path) is named in every error."""
    lines = [_split_prefix(ln) for ln in text.splitlines()]
    warmup, trace = _WARMUP.search(text), _TRACE.search(text)
    footer = _FOOTER.findall(text)
    return TrtexecLog(
        summary=parse_summary(lines, source, text),
        options=parse_options(lines),
        version=parse_trtexec_version(text), device=parse_trtexec_device(text),
        passed={"PASSED": True, "FAILED": False}.get(footer[-1]) if footer else None,
        warmup_queries=int(warmup.group(1)) if warmup else None,
        timed_queries=int(trace.group(1)) if trace else None, source=source)


def _split_prefix(line: str) -> tuple[str | None, str]:
    """(severity letter or None, message) of one log line."""
    if m := _PREFIX.match(line):
        return m.group(1), m.group(2).rstrip()
    return None, line.rstrip()


# -- the performance summary ---------------------------------------------------------------------
def parse_summary(lines: list[Line], source: str, text: str = "") -> PerformanceSummary:
    """The last ``=== Performance summary ===`` block of a split log."""
    block = _summary_block(lines, source, text)
    values: dict[str, Any] = {}
    metrics: dict[str, MetricStats] = {}
    for label, rest in _labelled(block):
        if label in METRICS:
            metrics[METRICS[label]] = parse_metric(label, rest, source)
        elif label in _SCALARS:
            values[_SCALARS[label][0]] = _scalar(label, rest, source)
    seen = ({k for k, v in METRICS.items() if v in metrics}
            | {k for k, (v, _) in _SCALARS.items() if v in values})
    if missing := [k for k in REQUIRED_LINES if k not in seen]:
        raise BckdError(f"trtexec's performance summary in {source} has no {', '.join(missing)} "
                        "line; the log looks truncated or comes from an unknown trtexec version - "
                        "check the log")
    return PerformanceSummary(metrics=metrics, warnings=tuple(_warnings(block)), **values)


def _summary_block(lines: list[Line], source: str, text: str) -> list[Line]:
    starts = [i for i, (_, msg) in enumerate(lines) if msg.strip() == SUMMARY_HEADER]
    if not starts:
        failed = f" (trtexec failed: {last_error(text)})" if "&&&& FAILED" in text else ""
        raise BckdError(f"no '{SUMMARY_HEADER}' in {source}{failed}; trtexec did not finish an "
                        "inference run (built only, crashed or was stopped) - check the log")
    block = []
    for sev, msg in lines[starts[-1] + 1:]:
        if msg.startswith(("Explanations of the performance metrics", "===", "&&&&")):
            break
        if sev != "V":
            block.append((sev, msg))
    return block


def _is_warning(sev: str | None, msg: str) -> bool:
    return sev == "W" or (sev is None and msg.lstrip().startswith("* "))


def _labelled(block: Iterable[Line]) -> Iterable[tuple[str, str]]:
    for sev, msg in block:
        if not _is_warning(sev, msg) and ": " in msg:
            label, rest = msg.split(": ", 1)
            yield label.strip(), rest.strip()


def parse_metric(label: str, stats: str, source: str = "trtexec output") -> MetricStats:
    """``min = X ms, max = X ms, mean = X ms, median = X ms[, percentile(P%) = X ms]...``."""
    m = _STATS.match(stats)
    if m is None:
        raise BckdError(f"cannot read trtexec's '{label}' line in {source}: {stats!r}; expected "
                        "'min = X ms, max = X ms, mean = X ms, median = X ms"
                        "[, percentile(P%) = X ms]...'")
    names = ("min", "max", "mean", "median")
    values = {n: _finite(label, n, m.group(i + 1), source) for i, n in enumerate(names)}
    pcts = {float(p): _finite(label, f"percentile({p}%)", v, source)
            for p, v in _PERCENTILE.findall(m.group(5))}
    return MetricStats(percentiles=pcts, **values)


def _scalar(label: str, rest: str, source: str) -> float:
    m = _SCALARS[label][1].match(rest)
    if m is None:
        raise BckdError(f"cannot read trtexec's '{label}' line in {source}: {rest!r}; "
                        "check the log")
    return _finite(label, "value", m.group(1), source)


def _finite(label: str, name: str, text: str, source: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BckdError(f"trtexec printed {label} {name} = {text} in {source}: it timed no "
                        "queries; check the log")
    return value


def _warnings(block: list[Line]) -> list[str]:
    """``[W] * ...`` lines, each joined with its indented ``[W]   ...`` continuation lines."""
    out: list[str] = []
    for sev, msg in block:
        if not _is_warning(sev, msg):
            continue
        if msg.lstrip().startswith("*") or not out:
            out.append(msg.strip())
        else:
            out[-1] += " " + msg.strip()
    return out


# -- the echoed options ---------------------------------------------------------------------------
def parse_options(lines: list[Line]) -> InferenceOptions:
    """The inference and reporting options trtexec printed before running (all None if absent)."""
    inf, shapes = _section(lines, "Inference Options")
    rep, _ = _section(lines, "Reporting Options")
    duration = _DURATION.match(inf.get("Duration", ""))
    percentiles = rep.get("Percentiles", rep.get("Percentile"))  # 'Percentile: 99' up to 8.4
    return InferenceOptions(
        batch=inf.get("Batch"), shapes=shapes, iterations=_int(inf.get("Iterations")),
        duration_s=float(duration.group(1)) if duration else None,
        warmup_ms=float(duration.group(2)) if duration else None,
        streams=_int(inf.get("Inference Streams", inf.get("Streams"))),
        data_transfers=_enabled(inf.get("Data transfers")),
        spin_wait=_enabled(inf.get("Spin-wait")), cuda_graph=_enabled(inf.get("CUDA Graph")),
        separate_profiling=_enabled(inf.get("Separate profiling")),
        percentiles=_floats(percentiles) if percentiles else None,
        export_times=rep.get("Export timing to JSON file") or None)


def _section(lines: list[Line], title: str) -> tuple[dict[str, str], dict[str, str]]:
    """``key: value`` pairs of one ``=== title ===`` section, and its inference shapes."""
    header = f"=== {title} ==="
    starts = [i for i, (_, msg) in enumerate(lines) if msg.strip() == header]
    pairs: dict[str, str] = {}
    shapes: dict[str, str] = {}
    for _, msg in lines[starts[-1] + 1:] if starts else []:
        if msg.startswith("==="):
            break
        key, sep, value = msg.partition(":")
        if not sep:
            continue
        if key.startswith("Input inference shape") and "=" in value:
            # 'Input inference shape: x=1x3x8x8' (8.x) / 'Input inference shape : x=...' (10.x)
            name, _, dims = value.strip().rpartition("=")
            shapes[name] = dims
        else:
            pairs.setdefault(key.strip(), value.strip())
    return pairs, shapes


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.strip().lstrip("-").isdigit() else None


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(p) for p in text.split(",") if p.strip())


def _enabled(text: str | None) -> bool | None:
    return {"Enabled": True, "Disabled": False}.get((text or "").strip())


def comparability_notes(options: InferenceOptions) -> list[str]:
    """Notes on settings that make this run's numbers differ from a default TensorRT <= 10 run."""
    notes = []
    if options.data_transfers is False:
        notes.append("Latency excludes H2D/D2H copies (data transfers off: the TensorRT 11 "
                     "default, or --noDataTransfers); compare only with runs that also exclude "
                     "them")
    elif options.data_transfers is None:
        notes.append("the log does not say whether data transfers were timed (no 'Data transfers:' "
                     "option line), so Latency may or may not include H2D/D2H copies")
    if options.cuda_graph:
        notes.append("CUDA graph launch was on (the TensorRT 11 default, or --useCudaGraph): less "
                     "enqueue overhead than a plain execute call")
    if options.spin_wait:
        notes.append("spin-wait synchronisation was on (the TensorRT 11 default, or "
                     "--useSpinWait): lower sync latency, more CPU load and power")
    if options.streams is not None and options.streams > 1:
        notes.append(f"{options.streams} inference streams: per-query latencies overlap; compare "
                     "throughput, not latency")
    return notes
