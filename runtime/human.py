"""What ``bckd eval``, ``bckd score`` and ``bckd profile`` print for people (``--json`` prints the
JSON instead; ``--out`` always writes the JSON). Torch-free, plain text, no colours.

Accuracy is in percent everywhere (mIoU, pixel accuracy, boundary F / IoU, COCO AP), as in the
report; LHD stays in pixels. Latency is in milliseconds; FPS says how it was computed.
"""
from __future__ import annotations

from typing import Any

# (key, label, scale, unit) of the metrics a result may hold, in print order.
METRICS = (
    ("miou", "mIoU", 100, "%"), ("pixel_acc", "pixel accuracy", 100, "%"),
    ("boundary_f", "boundary F (3 px)", 100, "%"), ("boundary_iou", "boundary IoU", 100, "%"),
    ("lhd", "LHD (local Hausdorff)", 1, " px"),
    ("box_ap", "box AP", 100, ""), ("box_ap50", "box AP50", 100, ""),
    ("box_ap75", "box AP75", 100, ""), ("box_aps", "box AP small", 100, ""),
    ("box_apm", "box AP medium", 100, ""), ("box_apl", "box AP large", 100, ""),
    ("mask_ap", "mask AP", 100, ""), ("mask_ap50", "mask AP50", 100, ""),
    ("mask_ap75", "mask AP75", 100, ""), ("boundary_ap", "Boundary AP", 100, ""),
)


def _rows(pairs: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in pairs)


def _run_on(obj: dict[str, Any]) -> str:
    parts = [str(obj.get("backend") or "?"), str(obj.get("precision") or "")]
    on = f" on {obj['device']}" if obj.get("device") else ""
    threads = f", {obj['threads']} threads" if obj.get("threads") else ""
    return " ".join(p for p in parts if p) + on + threads


def eval_text(obj: dict[str, Any]) -> str:
    """A short table of an eval / score result: what was run on what, then the metrics."""
    head = [("model", str(obj.get("model") or obj.get("predictions") or "?"))]
    if obj.get("backend"):
        head.append(("runtime", _run_on(obj)))
    head.append(("data", f"{obj.get('data')} split '{obj.get('split')}'"
                 + (f", {obj['images']} images" if obj.get("images") else "")))
    metrics = [(label, f"{scale * obj[key]:.2f}{unit}" if scale != 1 else f"{obj[key]:.3f}{unit}")
               for key, label, scale, unit in METRICS if isinstance(obj.get(key), (int, float))]
    text = _rows(head + metrics)
    per_class = obj.get("per_class_iou")
    if isinstance(per_class, dict) and per_class:
        width = max(len(str(c)) for c in per_class)
        lines = [f"  {'class':<{width}}  IoU %"]
        for name, iou in per_class.items():
            value = "-" if iou is None else f"{100 * iou:.2f}" if iou <= 1 else f"{iou:.2f}"
            lines.append(f"  {name:<{width}}  {value:>5}")
        text += "\n\n" + "\n".join(lines)
    if obj.get("seconds") is not None:
        text += f"\n\n  ({obj['seconds']:.1f} s; --json for every field)"
    return text


def profile_text(obj: dict[str, Any]) -> str:
    """A short table of a profile result: model, runtime, shapes, percentiles, mean ± std, FPS."""
    lat = obj.get("latency_ms") or {}
    shapes = obj.get("input_shapes") or ({"input": obj["input_shape"]}
                                          if obj.get("input_shape") else {})
    head = [("model", str(obj.get("model"))), ("runtime", _run_on(obj))]
    if shapes:
        head.append(("input", ", ".join(f"{n} {'x'.join(map(str, s))}"
                                         for n, s in shapes.items())))
    if "stages" in lat:  # --mode pipeline: one line per stage
        rows = head + [(f"{name}", _latency(stage)) for name, stage in lat["stages"].items()]
        return _rows(rows) + "\n\n  (--json for every field)"
    rows = head + [("latency ms", _latency(lat))]
    if lat.get("mean") is not None:
        rows.append(("mean ± std", f"{lat['mean']:.3f} ± {lat.get('std', 0.0):.3f} ms over "
                     f"{lat.get('n')} calls" + (f", cv {lat['cv']:.3f}" if lat.get("cv") is not
                                                None else "")
                     + ("" if lat.get("stable", True) else "  UNSTABLE")))
    if lat.get("fps") is not None:
        how = ("images completed over the timed window" if lat.get("mode") == "throughput"
               else "batch × 1000 / mean latency, one stream")
        rows.append(("FPS", f"{lat['fps']:.1f} ({how})"))
    power = lat.get("power")
    if isinstance(power, dict):
        items = [f"{k} {v:.4g}" for k, v in power.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if items:
            rows.append(("power", ", ".join(items[:6])))
    return _rows(rows) + "\n\n  (--json for every field)"


def _latency(lat: dict[str, Any]) -> str:
    keys = [k for k in ("p50", "p90", "p95", "p99") if lat.get(k) is not None]
    return "  ".join(f"{k} {lat[k]:.3f}" for k in keys) or "-"
