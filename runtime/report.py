"""The run report: ``report.json`` (documented, versioned schema), report.md and report.html.

report.html (one self-contained page with the latency, accuracy-vs-latency and example-mask
figures) is drawn by :mod:`runtime.report_html`.

Schema (``schema_version`` 3; later versions add fields and rows, never rename):

* ``schema``: ``"bckd.report"``; ``schema_version``: int; ``created``: ISO-8601 UTC;
  ``bckd_version``; ``host``: machine, processor, cpu_count, python, system.
* ``versions``: {package: version, or null when not installed} of the packages that produced
  the figures (numpy, onnx, onnxruntime, openvino, torch, pillow), read from the installed
  distributions' metadata. Added in version 1; absent from reports written before.
* ``dataset``: name, root, splits used, classes, fingerprint.
* ``config``: the full run configuration as plain data.
* ``wall_seconds``: wall-clock time of the whole run, in seconds (``bckd run`` only);
  ``stage_seconds``: [{stage, kind, seconds}] of each stage; ``provenance``: the command line,
  quick or not, task, config file, input size, threads and machine (version 3).
* ``results``: a list of rows, one per (model, method, backend, precision):

  ==============  ==========================================================================
  model           role of the network: ``teacher`` or ``student``
  method          how it was trained: ``none`` (supervised only), ``kd``, ...
  arch            architecture string, e.g. ``resnet18-pspnet-w0.25``
  backend         runtime that produced the figures, e.g. ``onnxruntime``
  precision       ``fp32``, ``fp16``, ``int8`` ...
  device          ``cpu``, ``cuda:0`` ...
  threads         intra-op threads used for the latency figures
  input_size      [H, W] fed to the network
  miou            mean IoU on the validation split, **in percent** (0-100)
  pixel_acc       pixel accuracy, in percent
  boundary_f      boundary F-score against the ground truth (3 px tolerance), in percent
  boundary_iou    boundary IoU (3 px band), in percent
  lhd             local Hausdorff distance to the ground-truth boundaries (r = 5), in pixels
  per_class_iou   {class: IoU in percent, or null when the class is absent}
  latency_ms      {p50, p90, p95, p99, mean, std, min, max} in milliseconds, batch ``batch``
                  (p95 since version 3)
  latency_histogram {edges_ms, counts}: every timed call binned over [min, max] (none
                  dropped), the distribution behind ``latency_ms``. Added in version 2.
  fps             images per second from the mean latency; ``fps_method`` says so. Added in 3.
  latency_cv      std / mean of the timed calls; ``latency_stable`` false when over the
                  profiler's threshold (flagged in every table). Added in version 3.
  speedup_vs_fp32 p50 of the same network's ONNX Runtime FP32 row / this row's p50, and
  delta_<metric>_vs_fp32 the metric minus that row's (deployed rows only). Added in version 3.
  stages_ms       {preprocess, inference, postprocess, end_to_end: {p50, p90, mean}} in ms:
                  decoded validation images resized and normalised, run, and turned into label
                  maps, each stage timed in the same iterations (means add up, percentiles do
                  not). Added in version 2.
  size_mb         artifact size on disk in MiB (10^6 bytes would be MB; we use 2^20)
  params          parameter count of the network
  artifact        path of the artifact measured, relative to the report
  parity          torch vs backend check recorded at export (max_abs_diff, argmax_agreement)
  ==============  ==========================================================================
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Any

from importlib import metadata

from runtime import __version__
from runtime.files import atomic_write_json, atomic_write_text

REPORT_SCHEMA = "bckd.report"
REPORT_SCHEMA_VERSION = 3
ROW_REQUIRED = ("model", "method", "backend", "precision", "latency_ms", "fps")
LATENCY_KEYS = ("p50", "p90", "p99")
VERSIONED_PACKAGES = ("numpy", "onnx", "onnxruntime", "openvino", "torch", "pillow")


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux), or what platform knows."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def host_info() -> dict[str, Any]:
    return {"machine": platform.machine(), "processor": cpu_name(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "system": platform.system()}


def package_versions(names: tuple[str, ...] = VERSIONED_PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution, None where it is missing; imports nothing."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def new_report(config: dict[str, Any], dataset: dict[str, Any]) -> dict[str, Any]:
    """An empty report with the header filled in."""
    return {"schema": REPORT_SCHEMA, "schema_version": REPORT_SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "bckd_version": __version__, "host": host_info(),
            "versions": package_versions(), "dataset": dataset,
            "config": config, "results": []}


def validate_row(row: dict[str, Any]) -> None:
    """Raise ValueError if a result row lacks a field the schema promises."""
    missing = [k for k in ROW_REQUIRED if k not in row]
    metric = row_task(row).metric
    if metric not in row:
        missing.append(metric)
    missing += [f"latency_ms.{k}" for k in LATENCY_KEYS if k not in row.get("latency_ms", {})]
    if missing:
        raise ValueError(f"report row is missing {', '.join(missing)}")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


# What each column means; report.md and report.html print it under the table.
GLOSSARY = (
    ("mIoU %", "mean intersection over union of the classes on the validation split"),
    ("bF %", "boundary F-score: precision/recall of predicted vs true class boundaries within "
             "3 px"),
    ("LHD px", "local Hausdorff distance between predicted and true boundaries (radius 5), "
               "lower is better"),
    ("box AP / mask AP", "COCO AP@[.50:.95] of boxes / masks (pycocotools' protocol), in points"),
    ("Δ", "the metric minus that of the same network's ONNX Runtime FP32 row, in points"),
    ("p50 / p95 / p99 ms", "percentiles of single-stream latency of the network alone, batch 1"),
    ("cv", "std / mean of the timed calls; UNSTABLE when above the profiler's threshold "
           "(other load, clocks): such a row's latency is not to be trusted"),
    ("FPS", "batch × 1000 / mean latency, one stream (not a throughput measurement)"),
    ("speed-up", "p50 of the same network's ONNX Runtime FP32 row / this row's p50"),
    ("e2e p50 ms", "decoded image to prediction: resize, normalise, network, postprocess"),
)


def glossary_lines() -> list[str]:
    return [f"- **{name}**: {text}" for name, text in GLOSSARY]


def provenance_lines(report: dict[str, Any]) -> list[str]:
    p = report.get("provenance")
    if not p:
        return []
    size = "x".join(map(str, p.get("input_size") or [])) or "?"
    return [f"- produced by: `{p.get('command')}`" + (" (quick)" if p.get("quick") else ""),
            f"- input size {size}, {p.get('threads')} threads",
            f"- measured on: {measured_on(report)}"]


def measured_on(report: dict[str, Any]) -> str:
    """Where the rows' figures were measured: this host, or a target board with its versions."""
    t = report.get("target")
    if t:
        v = ", ".join(f"{k} {x}" for k, x in (t.get("versions") or {}).items()
                      if k in ("onnxruntime", "openvino", "tensorrt"))
        return (f"target '{t.get('name')}' ({t.get('url')}, board {t.get('hostname')} "
                f"{t.get('machine')}, {v}); distilled and exported on this host; "
                f"{t.get('bytes_sent', 0)} bytes sent, {t.get('objects_sent', 0)} files, "
                f"{t.get('objects_skipped', 0)} already there")
    host = report.get("host") or {}
    return f"this host ({host.get('processor') or host.get('machine')})"


def _stage(row: dict[str, Any], stage: str, key: str) -> Any:
    """A per-stage figure of a row, or None (rows of schema version 1 have no stages)."""
    return ((row.get("stages_ms") or {}).get(stage) or {}).get(key)


def row_task(row: dict[str, Any]) -> Any:
    """The task of a result row (rows written before tasks existed are semantic)."""
    from runtime.tasks import get_task

    return get_task(row.get("task") or "semantic")


HEAD_COLUMNS = (
    ("model", "model", lambda r: r["model"]),
    ("method", "method", lambda r: r["method"]),
    ("arch", "arch", lambda r: r.get("arch")),
    ("backend", "backend", lambda r: r["backend"]),
    ("precision", "precision", lambda r: r["precision"]),
)
# The semantic task's columns, as the table had them before tasks existed.
METRIC_COLUMNS = {
    "semantic": (("mIoU %", "miou", lambda r: r["miou"]),
                 ("bF %", "boundary_f", lambda r: r.get("boundary_f")),
                 ("LHD px", "lhd", lambda r: r.get("lhd"))),
}
def _stability(row: dict[str, Any]) -> str | None:
    """The timings' cv, flagged when the profiler called them unstable (rows since v2.1)."""
    cv = row.get("latency_cv")
    if cv is None:
        return None
    return f"{cv:.3f}" + ("" if row.get("latency_stable", True) else " UNSTABLE")


TAIL_COLUMNS = (
    ("p50 ms", "p50", lambda r: r["latency_ms"]["p50"]),
    ("p95 ms", "p95", lambda r: r["latency_ms"].get("p95")),
    ("p99 ms", "p99", lambda r: r["latency_ms"]["p99"]),
    ("cv", "cv", _stability),
    ("FPS", "fps", lambda r: r["fps"]),
    ("speed-up", "speedup", lambda r: r.get("speedup_vs_fp32")),
    ("e2e p50 ms", "e2e_p50", lambda r: _stage(r, "end_to_end", "p50")),
    ("size MiB", "size_mb", lambda r: r.get("size_mb")),
)


TABLE_COLUMNS = HEAD_COLUMNS + METRIC_COLUMNS["semantic"] + TAIL_COLUMNS


def metric_columns(task: Any) -> tuple:
    """A task's metric columns: its own ``columns`` (key, header) read from the row."""
    if task.name in METRIC_COLUMNS:
        return METRIC_COLUMNS[task.name]
    return tuple((header, key, lambda r, k=key: r.get(k)) for key, header, _ in task.columns)


def table_columns(report: dict[str, Any]) -> tuple:
    rows = report["results"]
    task = row_task(rows[0] if rows else {"task": report.get("task")})
    delta = (f"Δ {task.metric}", "delta", lambda r: r.get(f"delta_{task.metric}_vs_fp32"))
    return HEAD_COLUMNS + metric_columns(task) + (delta,) + TAIL_COLUMNS


def add_fp32_comparisons(rows: list[dict[str, Any]]) -> None:
    """Each deployed row (another backend or precision) gets ``speedup_vs_fp32`` (p50 of the
    same network's ONNX Runtime FP32 row / its own p50) and ``delta_<metric>_vs_fp32`` (its
    metric minus that row's, in points); the FP32 rows themselves get none."""
    ref = {(r["model"], r["method"]): r for r in rows
           if r["backend"] == "onnxruntime" and r["precision"] == "fp32"}
    for row in rows:
        base = ref.get((row["model"], row["method"]))
        if base is None or base is row:
            continue
        metric = row_task(row).metric
        p50 = row["latency_ms"]["p50"]
        if p50:
            row["speedup_vs_fp32"] = round(base["latency_ms"]["p50"] / p50, 2)
        if row.get(metric) is not None and base.get(metric) is not None:
            row[f"delta_{metric}_vs_fp32"] = round(row[metric] - base[metric], 2)


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    columns = table_columns(report)
    header = [c[0] for c in columns]
    body = [[_fmt(get(row)) for _, _, get in columns] for row in report["results"]]
    return header, body


def render_text(report: dict[str, Any]) -> str:
    """A plain, aligned console table of the results."""
    header, body = table_rows(report)
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    text = "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])
    unstable = sum(r.get("latency_stable") is False for r in report["results"])
    if unstable:
        text += (f"\n{unstable} row(s) have UNSTABLE timings (cv column): rerun on a quiet "
                 "machine before trusting their latency.")
    return text


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: a header with host and data, then the results table."""
    header, body = table_rows(report)
    host = report["host"]
    lines = [
        "# bckd report", "",
        f"- created: {report['created']} (bckd {report['bckd_version']})",
        f"- host: {host['machine']} {host['processor']}, {host['cpu_count']} cores, "
        f"Python {host['python']}",
        f"- dataset: {report['dataset'].get('name')} "
        f"(validation split `{report['dataset'].get('val_split')}`, "
        f"{report['dataset'].get('val_images')} images)", "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines[4:4] = provenance_lines(report)
    lines += ["| " + " | ".join(b) + " |" for b in body]
    unstable = [r for r in report["results"] if r.get("latency_stable") is False]
    if unstable:
        lines += ["", f"**{len(unstable)} row(s) have UNSTABLE timings** (cv above the "
                  "threshold): their latency, FPS and speed-up are not to be trusted; rerun on "
                  "a quiet machine."]
    lines += ["", "mIoU in percent on the validation split; latency is single-stream, batch 1, "
              "with the thread count recorded per row in report.json. p50/p99 time the network "
              "alone; e2e p50 is decoded image to label map (resize, normalise, network, argmax; "
              "each stage in report.json's stages_ms).",
              "Latency distributions, accuracy against latency and example masks: "
              "[report.html](report.html).", "", "What the columns mean:", ""]
    lines += glossary_lines() + [""]
    return "\n".join(lines)


def write_report(out_dir: str | os.PathLike, report: dict[str, Any],
                 examples: Any = None) -> tuple[Path, Path, Path]:
    """Validate the rows and write report.json, report.md and report.html atomically.

    ``examples`` (a :class:`runtime.report_html.MaskExamples`) adds the example-mask figure.
    """
    from runtime.report_html import render_html

    for row in report["results"]:
        validate_row(row)
    add_fp32_comparisons(report["results"])
    out_dir = Path(out_dir)
    return (atomic_write_json(out_dir / "report.json", report),
            atomic_write_text(out_dir / "report.md", render_markdown(report)),
            atomic_write_text(out_dir / "report.html", render_html(report, examples)))
