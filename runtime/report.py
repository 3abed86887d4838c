"""The run report: ``report.json`` (documented, versioned schema), report.md and report.html.

report.html (one self-contained page with the latency, accuracy-vs-latency and example-mask
figures) is drawn by :mod:`runtime.report_html`.

Schema (``schema_version`` 2; later versions add fields and rows, never rename):

* ``schema``: ``"bckd.report"``; ``schema_version``: int; ``created``: ISO-8601 UTC;
  ``bckd_version``; ``host``: machine, processor, cpu_count, python, system.
* ``versions``: {package: version, or null when not installed} of the packages that produced
  the figures (numpy, onnx, onnxruntime, openvino, torch, pillow), read from the installed
  distributions' metadata. Added in version 1; absent from reports written before.
* ``dataset``: name, root, splits used, classes, fingerprint.
* ``config``: the full run configuration as plain data.
* ``wall_seconds``: wall-clock time of the whole run, in seconds (``bckd run`` only).
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
  latency_ms      {p50, p90, p99, mean, std, min, max} in milliseconds, batch ``batch``
  latency_histogram {edges_ms, counts}: every timed call binned over [min, max] (none
                  dropped), the distribution behind ``latency_ms``. Added in version 2.
  fps             images per second from the mean latency
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
REPORT_SCHEMA_VERSION = 2
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
TAIL_COLUMNS = (
    ("p50 ms", "p50", lambda r: r["latency_ms"]["p50"]),
    ("p99 ms", "p99", lambda r: r["latency_ms"]["p99"]),
    ("FPS", "fps", lambda r: r["fps"]),
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
    return HEAD_COLUMNS + metric_columns(task) + TAIL_COLUMNS


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
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


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
    lines += ["| " + " | ".join(b) + " |" for b in body]
    lines += ["", "mIoU in percent on the validation split; latency is single-stream, batch 1, "
              "with the thread count recorded per row in report.json. p50/p99 time the network "
              "alone; e2e p50 is decoded image to label map (resize, normalise, network, argmax; "
              "each stage in report.json's stages_ms).",
              "Latency distributions, accuracy against latency and example masks: "
              "[report.html](report.html).", ""]
    return "\n".join(lines)


def write_report(out_dir: str | os.PathLike, report: dict[str, Any],
                 examples: Any = None) -> tuple[Path, Path, Path]:
    """Validate the rows and write report.json, report.md and report.html atomically.

    ``examples`` (a :class:`runtime.report_html.MaskExamples`) adds the example-mask figure.
    """
    from runtime.report_html import render_html

    for row in report["results"]:
        validate_row(row)
    out_dir = Path(out_dir)
    return (atomic_write_json(out_dir / "report.json", report),
            atomic_write_text(out_dir / "report.md", render_markdown(report)),
            atomic_write_text(out_dir / "report.html", render_html(report, examples)))
