"""Runtime-stage numbers: bckd profile vs benchmark_app, and the profiler's own overhead.

1. **Agreement with benchmark_app.** On one OpenVINO IR, with the same device, precision, stream
   count and thread count, alternate ``bckd profile`` (the runtime's single-stream protocol) and
   OpenVINO's ``benchmark_app`` (``-hint none -nstreams 1 -nireq 1 -api sync -nthreads T``)
   ``--rounds`` times, and compare the medians of the p50s.
2. **Overhead.** On the same runner, alternate blocks of a bare ``perf_counter_ns`` loop around
   ``runner.infer(x, check=False)`` and ``profile_runner`` with the same number of calls; the
   overhead is the ratio of their median per-call times minus one.

Run on an idle machine: ::

    python tests/benchmarks/bench_runtime.py --model runs/default/openvino/student-bckd.xml

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from runtime.backends import open_runner  # noqa: E402
from runtime.card import read_card  # noqa: E402
from runtime.profile import WarmupPolicy, profile_runner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="OpenVINO IR (.xml) with its card")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="f32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    ap.add_argument("--calls", type=int, default=1000, help="calls per overhead block")
    args = ap.parse_args()
    size = read_card(args.model)["preprocess"]["size"]
    x = np.random.default_rng(0).standard_normal((1, 3, *size), dtype=np.float32)
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(bckd_p50(args, x))
        theirs.append(benchmark_app_p50(args, size))
        print(f"bckd p50 {ours[-1]:.4f} ms   benchmark_app median {theirs[-1]:.4f} ms",
              file=sys.stderr, flush=True)
    a, b = statistics.median(ours), statistics.median(theirs)
    overhead = profiler_overhead(args, x, calls=args.calls)
    print(json.dumps({
        "model": args.model, "threads": args.threads, "precision": args.precision,
        "bckd_p50_ms": ours, "benchmark_app_median_ms": theirs,
        "ratio_of_medians": round(a / b, 4), "within_5pct": abs(a / b - 1) <= 0.05,
        "profiler_overhead": overhead}, indent=1))


def bckd_p50(args, x: np.ndarray) -> float:
    with open_runner("openvino", args.model, threads=args.threads, precision=args.precision,
                     hint="latency") as runner:
        stats = profile_runner(runner, x, iters=100, min_seconds=args.seconds,
                               max_seconds=10 * args.seconds)
    return stats.p50_ms


def benchmark_app_p50(args, size) -> float:
    app = shutil.which("benchmark_app") or str(Path(sys.executable).parent / "benchmark_app")
    cmd = [app, "-m", args.model, "-d", "CPU", "-hint", "none", "-nstreams", "1", "-nireq", "1",
           "-api", "sync", "-nthreads", str(args.threads), "-infer_precision", args.precision,
           "-data_shape", f"[1,3,{size[0]},{size[1]}]", "-t", str(int(args.seconds))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    found = re.search(r"Median:\s+([\d.]+) ms", proc.stdout)
    if proc.returncode != 0 or not found:
        sys.exit(f"benchmark_app failed ({proc.returncode}): {proc.stdout[-500:]}{proc.stderr[-500:]}")
    return float(found.group(1))


def profiler_overhead(args, x: np.ndarray, calls: int, blocks: int = 5) -> dict:
    """Median per-call time of profile_runner vs a bare loop over the same runner, alternated."""
    bare, profiled = [], []
    with open_runner("openvino", args.model, threads=args.threads, precision=args.precision,
                     hint="latency") as runner:
        for _ in range(50):
            runner.infer(x, check=False)
        for _ in range(blocks):
            t0 = time.perf_counter_ns()
            for _ in range(calls):
                runner.infer(x, check=False)
            bare.append((time.perf_counter_ns() - t0) / calls / 1e6)
            stats = profile_runner(runner, x, warmup=WarmupPolicy(min_calls=0, settle=False),
                                   iters=calls, min_seconds=0.0)
            profiled.append(stats.total_s * 1e3 / stats.n)
    b, p = statistics.median(bare), statistics.median(profiled)
    return {"bare_ms_per_call": bare, "profiled_ms_per_call": profiled,
            "overhead_pct": round(100 * (p / b - 1), 3)}


if __name__ == "__main__":
    main()
