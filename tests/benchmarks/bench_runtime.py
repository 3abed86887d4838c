"""Runtime-stage numbers: bckd profile vs benchmark_app, and the profiler's own overhead.

1. **Agreement with benchmark_app.** On one OpenVINO IR, with the same device, precision, hint
   and thread count, run ``bckd profile`` (the CLI, in its own process, as a user runs it) and
   OpenVINO's ``benchmark_app`` (``-hint none -nstreams 1 -nireq 1 -api sync -nthreads T``)
   back to back ``--rounds`` times, the order swapped every round. This machine's speed drifts by
   more than 5 % over minutes (a shared VM), so the figure is the median of the per-round ratios
   (each pair measured within seconds of each other); the ratio of the two medians is printed too.
2. **Overhead.** (a) On the same runner, ``--blocks`` alternating blocks of ``--calls`` calls: a
   bare ``perf_counter_ns`` loop around ``runner.infer(x, check=False)`` and ``profile_runner``
   (its timed phase) with the same calls; the overhead is the median of the per-pair ratios minus
   one. (b) The profiler's own bookkeeping per call, measured on a no-op function against a bare
   loop of the same no-op, as a fraction of the median inference time: what (a) would show with
   no machine noise.

Run on an idle machine: ::

    python tests/benchmarks/bench_runtime.py --model runs/default/openvino/student-bckd.xml

A model bckd did not make (issue 12): ``--third-party DIR`` writes a plain conv stack with
onnx.helper (dynamic N, H, W; two outputs; no card), converts it with ``bckd export`` and measures
that IR at ``--size`` (bckd profile compiles it static, benchmark_app gets the same ``-shape``)::

    python tests/benchmarks/bench_runtime.py --third-party /tmp/third --size 224x224

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
from runtime.card import read_card_or_none  # noqa: E402
from runtime.profile import WarmupPolicy, profile_latency, profile_runner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="OpenVINO IR (.xml), with its card or with --size")
    ap.add_argument("--third-party", metavar="DIR",
                    help="write and convert a third-party style model there, and measure it")
    ap.add_argument("--size", help="HxW of a model without a bckd card")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    ap.add_argument("--calls", type=int, default=100, help="calls per overhead block")
    ap.add_argument("--blocks", type=int, default=30, help="overhead block pairs")
    args = ap.parse_args()
    if args.third_party:
        args.model = str(third_party_ir(Path(args.third_party)))
    if not args.model:
        sys.exit("give --model IR or --third-party DIR")
    card = read_card_or_none(args.model) or {}
    bare = "preprocess" not in card
    if bare and not args.size:
        sys.exit(f"{args.model} has no bckd card: give --size HxW")
    size = ([int(v) for v in args.size.lower().split("x")] if args.size
            else card["preprocess"]["size"])
    args.size_flag = ["--size", f"{size[0]}x{size[1]}"] if bare or args.size else []
    args.bare = bare
    x = np.random.default_rng(0).standard_normal((1, 3, *size), dtype=np.float32)
    ours, theirs = [], []
    for r in range(args.rounds):
        pair = {}
        for who in (("bckd", "app") if r % 2 == 0 else ("app", "bckd")):
            pair[who] = bckd_profile_p50(args) if who == "bckd" else benchmark_app_p50(args, size)
        ours.append(pair["bckd"])
        theirs.append(pair["app"])
        print(f"round {r}: bckd profile p50 {pair['bckd']:.4f} ms, benchmark_app median "
              f"{pair['app']:.4f} ms, ratio {pair['bckd'] / pair['app']:.4f}",
              file=sys.stderr, flush=True)
    ratios = [a / b for a, b in zip(ours, theirs)]
    ratio = statistics.median(ratios)
    overhead = profiler_overhead(args, x, calls=args.calls, blocks=args.blocks)
    print(json.dumps({
        "model": args.model, "bare": bare, "size": size, "threads": args.threads,
        "precision": args.precision,
        "seconds_per_measurement": args.seconds,
        "bckd_profile_p50_ms": ours, "benchmark_app_median_ms": theirs,
        "per_round_ratio": [round(q, 4) for q in ratios],
        "median_per_round_ratio": round(ratio, 4),
        "ratio_of_medians": round(statistics.median(ours) / statistics.median(theirs), 4),
        "within_5pct": abs(ratio - 1) <= 0.05,
        "profiler_overhead": overhead}, indent=1))


def bckd_profile_p50(args) -> float:
    """p50 that ``bckd profile`` reports, run as a user runs it (its own process)."""
    cmd = [sys.executable, "-m", "runtime.cli", "profile", args.model, "--backend", "openvino",
           "--precision", args.precision, "--hint", "latency", "--threads", str(args.threads),
           "--iters", "100", "--min-seconds", str(args.seconds),
           "--max-seconds", str(10 * args.seconds), "--json", *args.size_flag]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if proc.returncode != 0:
        sys.exit(f"bckd profile failed ({proc.returncode}): {proc.stderr[-800:]}")
    out = json.loads(proc.stdout)
    assert out["threads"] == args.threads, out  # the thread count really used, read back
    return float(out["latency_ms"]["p50"])


def benchmark_app_p50(args, size) -> float:
    app = shutil.which("benchmark_app") or str(Path(sys.executable).parent / "benchmark_app")
    # -nthreads needs -hint none in benchmark_app's UI; the compiled model then reports
    # PERFORMANCE_HINT LATENCY and NUM_STREAMS 1, as bckd's latency hint gives.
    # A dynamic model is reshaped static (-shape), as bckd profile compiles it; a bckd IR keeps
    # its dynamic dims and gets only the data shape, as bckd profile runs it.
    shape_flag = "-shape" if args.bare else "-data_shape"
    precision = {"fp32": "f32", "fp16": "f16"}.get(args.precision, args.precision)
    cmd = [app, "-m", args.model, "-d", "CPU", "-hint", "none", "-nstreams", "1", "-nireq",
           "1", "-api", "sync", "-nthreads", str(args.threads), "-infer_precision",
           precision, shape_flag, f"[1,3,{size[0]},{size[1]}]",
           "-t", str(max(1, round(args.seconds)))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    found = re.search(r"Median:\s+([\d.]+) ms", proc.stdout)
    if proc.returncode != 0 or not found:
        sys.exit(f"benchmark_app failed ({proc.returncode}): {proc.stdout[-500:]}{proc.stderr[-500:]}")
    return float(found.group(1))


def _named(model: str, options: dict) -> dict:
    """The runner's shapes keyed by the model's input name."""
    if not options:
        return {}
    from runtime.bare import graph_io

    name = graph_io(model)[0][0].name
    return {"shapes": {name: options["shapes"][""]}}


def third_party_ir(folder: Path) -> Path:
    """A plain conv stack (3-32-64-64-32-8, 3x3, ReLU; dynamic N, H, W; logits and a pooled
    vector out) written with onnx.helper, with no card, then converted by ``bckd export``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    xml = folder / "third.xml"
    if xml.is_file():
        return xml
    rng = np.random.default_rng(0)
    chans, nodes, weights, prev = [3, 32, 64, 64, 32, 8], [], [], "image"
    for i, (a, b) in enumerate(zip(chans, chans[1:])):
        w = (rng.standard_normal((b, a, 3, 3)) * (2 / (9 * a)) ** 0.5).astype(np.float32)
        weights += [numpy_helper.from_array(w, f"w{i}"),
                    numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")]
        out = "logits" if i == len(chans) - 2 else f"c{i}"
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [out], pads=[1] * 4))
        if out != "logits":
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", ["r3"], ["pooled"]))
    graph = helper.make_graph(
        nodes, "third_party",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 8, "H", "W"]),
         helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 32, 1, 1])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "third.onnx"))
    subprocess.run([sys.executable, "-m", "runtime.cli", "export", str(folder / "third.onnx"),
                    "--out", str(xml)], check=True, cwd=ROOT)
    return xml


def profiler_overhead(args, x: np.ndarray, calls: int, blocks: int) -> dict:
    """(a) profile_runner vs a bare loop over the same runner, in alternating blocks;
    (b) the profiler's bookkeeping per call, on a no-op."""
    bare, profiled = [], []
    shapes = {"shapes": {"": x.shape}} if args.bare else {}
    with open_runner("openvino", args.model, threads=args.threads, precision=args.precision,
                     hint="latency", **_named(args.model, shapes)) as runner:
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
    pair = [p / b for p, b in zip(profiled, bare)]
    infer_ms = statistics.median(bare)
    noop_bare, noop_prof = [], []
    for _ in range(5):
        n = 200_000
        t0 = time.perf_counter_ns()
        for _ in range(n):
            _noop()
        noop_bare.append((time.perf_counter_ns() - t0) / n)
        stats = profile_latency(_noop, warmup=WarmupPolicy(min_calls=0, settle=False), iters=n,
                                min_seconds=0.0)
        noop_prof.append(stats.total_s * 1e9 / stats.n)
    bookkeeping_ns = statistics.median(noop_prof) - statistics.median(noop_bare)
    return {"blocks": blocks, "calls_per_block": calls,
            "bare_ms_per_call_median": round(infer_ms, 4),
            "profiled_ms_per_call_median": round(statistics.median(profiled), 4),
            "paired_overhead_pct": round(100 * (statistics.median(pair) - 1), 3),
            "paired_ratio_iqr": [round(q, 4) for q in np.percentile(pair, [25, 75])],
            "bookkeeping_ns_per_call": round(bookkeeping_ns, 1),
            "bookkeeping_pct_of_inference": round(100 * bookkeeping_ns / (infer_ms * 1e6), 4)}


def _noop() -> None:
    return None


if __name__ == "__main__":
    main()
