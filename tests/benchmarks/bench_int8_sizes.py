"""Where INT8 pays on this CPU: FP32 vs INT8 single-stream p50 of a run's deployed student, by
input size.

A ``bckd run`` folder holds the deployed student as ONNX (FP32), its ONNX Runtime INT8 form
(U8S8 Q/DQ), its OpenVINO IR (f32) and the symmetric Q/DQ model OpenVINO runs as INT8, and
where the run made one (``deploy.openvino_int8: nncf``, the detect / instance default) the NNCF
INT8 IR. A run without the f32 IR has its ONNX profiled on OpenVINO instead (the same graph).
This profiles each with ``bckd profile`` (the CLI, each in its own process, dynamic H/W compiled
at each ``--sizes`` value) at each ``--threads`` count, ``--rounds`` rounds with the order
rotated, and prints the INT8/FP32 ratio of the medians per runtime, size and thread count::

    python tests/benchmarks/bench_int8_sizes.py --run /tmp/q1 --sizes 128 256 512
    python tests/benchmarks/bench_int8_sizes.py --run /tmp/bench-det/run-detect --threads 1 2

Prints one JSON object (``--out`` writes it too).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]


def p50(model: Path, size: int, threads: int, seconds: float, backend: str | None) -> float:
    argv = [sys.executable, "-m", "runtime.cli", "profile", str(model), "--size",
            f"{size}x{size}", "--threads", str(threads), "--min-seconds", str(seconds), "--json"]
    if backend:
        argv += ["--backend", backend]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"profile of {model} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)["latency_ms"]["p50"]


def rotated_medians(models: dict[str, tuple[Path, str | None]], size: int, threads: int,
                    rounds: int, seconds: float) -> dict[str, float]:
    """Median p50 of each (path, backend) over ``rounds`` rounds, the order rotated each round."""
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            path, backend = models[name]
            times[name].append(p50(path, size, threads, seconds, backend))
    return {k: statistics.median(v) for k, v in times.items()}


def sweep(models: dict[str, tuple[Path, str | None]], args: argparse.Namespace,
          ratios: dict[str, tuple[str, str]]) -> Iterator[tuple[int, int, dict]]:
    """(size, threads, row) over ``args.sizes`` x ``args.threads``: each row holds the medians and
    the named ratios (numerator, denominator model), and is printed as it comes."""
    for size in args.sizes:
        for threads in args.threads:
            med = rotated_medians(models, size, threads, args.rounds, args.seconds)
            row = {"p50_ms": {k: round(v, 3) for k, v in med.items()},
                   **{name: round(med[a] / med[b], 3) for name, (a, b) in ratios.items()}}
            print(f"{size}/t{threads}", row, flush=True)
            yield size, threads, row


def emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a bckd run folder")
    ap.add_argument("--student", default="student-bckd", help="deployed student's file stem")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--out")
    args = ap.parse_args()
    run, s = Path(args.run), args.student
    models = {"ort_fp32": (run / "onnx" / f"{s}.onnx", None),
              "ort_int8": (run / "int8" / f"{s}.int8-u8s8.onnx", None),
              "ov_fp32": (run / "openvino" / f"{s}.xml", None),
              "ov_int8": (run / "int8" / f"{s}.int8.onnx", "openvino")}
    if not models["ort_int8"][0].is_file():  # a run with deploy.ort_int8_activations: int8
        models["ort_int8"] = (models["ov_int8"][0], None)
    if not models["ov_fp32"][0].is_file():
        models["ov_fp32"] = (models["ort_fp32"][0], "openvino")
    if (run / "int8" / f"{s}.int8.xml").is_file():
        models["ov_nncf_int8"] = (run / "int8" / f"{s}.int8.xml", None)
    for name, (path, _) in models.items():
        if not path.is_file():
            sys.exit(f"{path} is missing: pass a bckd run folder whose deployed student is {s}")
    result = {"run": str(run), "threads": args.threads, "rounds": args.rounds,
              "models": {k: str(v[0]) for k, v in models.items()}, "sizes": {}}
    ratios = {"ort_int8_over_fp32": ("ort_int8", "ort_fp32"),
              "ov_int8_over_fp32": ("ov_int8", "ov_fp32")}
    if "ov_nncf_int8" in models:
        ratios["ov_nncf_int8_over_fp32"] = ("ov_nncf_int8", "ov_fp32")
    for size, threads, row in sweep(models, args, ratios):
        # one thread count keeps the earlier layout: sizes -> row
        result["sizes"][str(size) if len(args.threads) == 1 else f"{size}/t{threads}"] = row
    emit(result, args.out)


if __name__ == "__main__":
    main()
