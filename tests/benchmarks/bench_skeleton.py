"""Benchmark for the walking skeleton (issue 2): run times, teacher gap, ONNX parity, test time.

    python tests/benchmarks/bench_skeleton.py --out /tmp/bench            # quick run + parity
    python tests/benchmarks/bench_skeleton.py --out /tmp/bench --full     # + cold default run
    python tests/benchmarks/bench_skeleton.py --out /tmp/bench --tests    # + time the test suite

Prints one JSON object with every figure, named after the host and library versions. The full
run uses a fresh teacher cache, so its time includes training the teacher (a cold run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def timed(cmd: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, **kw)
    if proc.returncode not in (0,):
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    return time.perf_counter() - start, proc


def bckd_run(out: Path, *extra: str) -> float:
    seconds, proc = timed([sys.executable, "-m", "runtime.cli", "run", "--out", str(out),
                           "--cache-dir", str(out.parent / f"{out.name}-cache"), *extra])
    if proc.returncode != 0:
        raise SystemExit(f"bckd run {' '.join(extra)} failed")
    return seconds


def parity_on_real_images(run: Path, size: tuple[int, int]) -> dict:
    """torch vs ONNX Runtime on the validation images at a size other than the traced one."""
    import torch

    from distill.checkpoint import load_student
    from runtime.backends import open_runner
    from runtime.data import open_dataset
    from runtime.data.preprocess import Preprocess

    model, card = load_student(run / "checkpoints" / "student-kd.pt")
    pre = Preprocess.from_dict({**card["preprocess"], "size": list(size)})
    val = open_dataset(run / "data", "val")
    worst, agree, total = 0.0, 0, 0
    with open_runner("onnxruntime", run / "onnx" / "student-kd.onnx") as runner:
        for lo in range(0, len(val), 8):
            x = pre.batch([val.load(i)[0] for i in range(lo, min(lo + 8, len(val)))])
            with torch.no_grad():
                ref = model(torch.from_numpy(x)).numpy()
            got = runner.infer(x)
            worst = max(worst, float(np.abs(ref - got).max()))
            agree += int((ref.argmax(1) == got.argmax(1)).sum())
            total += ref.shape[0] * ref.shape[2] * ref.shape[3]
    return {"size": list(size), "traced_size": card["preprocess"]["size"], "images": len(val),
            "pixels": total, "max_abs_diff": worst, "argmax_agreement": agree / total}


def summarise(run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    rows = {f"{r['model']}/{r['method']}": r for r in report["results"]}
    gap = rows["teacher/none"]["miou"] - rows["student/none"]["miou"]
    return {"rows": {k: {"miou": r["miou"], "p50_ms": r["latency_ms"]["p50"],
                         "p99_ms": r["latency_ms"]["p99"], "fps": r["fps"],
                         "params": r["params"], "parity": r["parity"]} for k, r in rows.items()},
            "teacher_minus_nokd_student_miou": round(gap, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="scratch folder (must not exist)")
    parser.add_argument("--full", action="store_true", help="also time the cold default run")
    parser.add_argument("--tests", action="store_true", help="also time the test suite")
    args = parser.parse_args()
    args.out.mkdir(parents=True)
    import onnxruntime
    import torch

    result: dict = {"host": {"cpu": _cpu(), "cores": os.cpu_count(),
                             "python": platform.python_version(), "torch": torch.__version__,
                             "onnxruntime": onnxruntime.__version__}}
    result["quick_run_s"] = round(bckd_run(args.out / "quick", "--quick"), 1)
    if args.full:
        result["default_run_cold_s"] = round(bckd_run(args.out / "default"), 1)
        result["default"] = summarise(args.out / "default")
        result["default_parity_real_images"] = parity_on_real_images(args.out / "default",
                                                                     (160, 224))
    else:
        result["quick_parity_real_images"] = parity_on_real_images(args.out / "quick", (80, 112))
    if args.tests:
        seconds, proc = timed([sys.executable, "-m", "pytest", "-q", "tests"])
        result["test_suite_s"] = round(seconds, 1)
        result["test_suite_tail"] = proc.stdout.strip().splitlines()[-1]
    print(json.dumps(result, indent=2))


def _cpu() -> str:
    from runtime.report import cpu_name

    return cpu_name()


if __name__ == "__main__":
    main()
