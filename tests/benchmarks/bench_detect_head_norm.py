"""What GroupNorm in the detection head costs OpenVINO INT8: latency of a detect student as is and
with its GroupNorms swapped for BatchNorms (which fold into the convolutions), f32 vs NNCF INT8.

Latency only: the swapped model is not trained (its BatchNorms carry the GroupNorms' affine
parameters over unit running statistics), so its detections mean nothing; what it measures is
the graph a BN-headed student would deploy as. Both variants go through the same steps as a
``bckd run``: ``export_onnx`` (onnxsim), ``convert_to_openvino``, ``quantize_openvino`` (NNCF
performance preset, the run's float tail) on ``--calib-images`` images of the run's training
split, then ``bckd profile`` per model in its own process, ``--rounds`` rounds rotated::

    python tests/benchmarks/bench_detect_head_norm.py --run /tmp/bench-det/run-detect \\
        --work /tmp/head-norm --threads 1 2

Prints one JSON object (``--out`` writes it too).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_int8_sizes import emit, sweep  # noqa: E402


def swap_group_norms(module) -> int:
    """Replace every GroupNorm under ``module`` by an eval-mode BatchNorm2d; returns how many."""
    from torch import nn

    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.GroupNorm):
            bn = nn.BatchNorm2d(child.num_channels).eval()
            bn.weight.data.copy_(child.weight.data)
            bn.bias.data.copy_(child.bias.data)
            setattr(module, name, bn)
            count += 1
        else:
            count += swap_group_norms(child)
    return count


def build(run: Path, student: str, work: Path, variant: str, calib_images: int) -> dict:
    from calib.nncf_ptq import quantize_openvino
    from calib.reader import CalibrationReader
    from distill.checkpoint import load_student
    from export.onnx_export import export_onnx
    from export.openvino_export import convert_to_openvino

    model, card = load_student(run / "checkpoints" / f"{student}.pt")
    card = {k: v for k, v in card.items() if k not in ("history", "sha256")}
    swapped = swap_group_norms(model) if variant == "bn" else 0
    out = work / variant
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    size = tuple(card["preprocess"]["size"])
    export_onnx(model, out / "m.onnx", size, card=card, parity_backends=())
    convert_to_openvino(out / "m.onnx", out / "m.xml")
    fmt = json.loads((run / "report.json").read_text())["config"]["data"]["format"]
    reader = CalibrationReader.for_model(out / "m.onnx", run / "data", "train", format=fmt,
                                         num_images=calib_images)
    quantize_openvino(out / "m.xml", out / "m.int8.xml", reader)
    return {"f32": out / "m.xml", "int8": out / "m.int8.xml", "group_norms_swapped": swapped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a bckd run --task detect|instance folder")
    ap.add_argument("--student", default="student-bckd")
    ap.add_argument("--work", required=True, help="folder for the exported variants")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128])
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--out")
    args = ap.parse_args()
    run, work = Path(args.run), Path(args.work)
    if not (run / "checkpoints" / f"{args.student}.pt").is_file():
        sys.exit(f"{run}/checkpoints/{args.student}.pt is missing: pass a detect run folder")
    built = {v: build(run, args.student, work, v, args.calib_images) for v in ("gn", "bn")}
    models = {f"{v}_{p}": (built[v][p], None) for v in built for p in ("f32", "int8")}
    result = {"run": str(run), "student": args.student, "rounds": args.rounds,
              "group_norms_swapped": built["bn"]["group_norms_swapped"], "rows": {}}
    ratios = {f"{v}_int8_over_f32": (f"{v}_int8", f"{v}_f32") for v in built}
    for size, threads, row in sweep(models, args, ratios):
        result["rows"][f"{size}/t{threads}"] = row
    emit(result, args.out)


if __name__ == "__main__":
    main()
