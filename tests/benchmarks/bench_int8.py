"""Export and INT8 numbers of the issue: parity, INT8 latency and accuracy, calibration time.

For one student checkpoint and its dataset it

1. exports ONNX (traced at the card's size) and converts it to OpenVINO IR (f32 weights);
2. FP32 parity over the whole validation split at another size (default 160x224): ONNX Runtime
   and OpenVINO (INFERENCE_PRECISION_HINT f32) against torch — max |Δlogit|, argmax agreement;
3. calibrates on ``--calib-images`` train images: ONNX Runtime Q/DQ with MinMax, Entropy and
   Percentile (each timed; symmetric int8 activations), Percentile with uint8 activations (ONNX
   Runtime's x86 fast path), and NNCF for OpenVINO (timed);
4. scores mIoU on the validation split and times single-stream latency (batch 1, ``--threads``
   threads, the runtime's protocol) for OpenVINO f32 / INT8 and ONNX Runtime f32 / INT8;
5. where the default method's (percentile) INT8 model misses the mIoU budget on a runtime, runs
   the accuracy-aware fallback scored on that runtime (sensitivity on held-out train images the
   calibration did not draw) and measures the result the same way;
6. checks every artifact with the vendor's tool: ``onnx.checker`` full check for the ONNX files,
   OpenVINO's ``benchmark_app`` for the IRs (its latency is printed beside ours).

Run it on an idle machine (latency): ::

    python tests/benchmarks/bench_int8.py --student runs/default/checkpoints/student-bckd.pt \\
        --data runs/default/data --out /tmp/bench-int8

Writes ``results.json`` and ``results.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from calib.nncf_ptq import quantize_openvino  # noqa: E402
from calib.quantize import quantize_onnx  # noqa: E402
from calib.reader import CalibrationReader  # noqa: E402
from calib.sensitivity import accuracy_aware_quantize  # noqa: E402
from export.api import export_checkpoint  # noqa: E402
from export.openvino_export import convert_to_openvino  # noqa: E402
from runtime.backends import open_runner  # noqa: E402
from runtime.card import read_card  # noqa: E402
from runtime.data import open_dataset  # noqa: E402
from runtime.data.preprocess import Preprocess  # noqa: E402
from runtime.evaluate import evaluate_runner  # noqa: E402
from runtime.profile import profile_runner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", required=True, help="student checkpoint (.pt)")
    ap.add_argument("--data", required=True, help="dataset root (folder format)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-images", type=int, default=300)
    ap.add_argument("--parity-size", default="160x224")
    ap.add_argument("--budget", type=float, default=0.5, help="max mIoU drop, points")
    ap.add_argument("--aware", action="store_true",
                    help="run the accuracy-aware fallback even where plain INT8 meets the budget")
    ap.add_argument("--min-seconds", type=float, default=5.0, help="per latency measurement")
    ap.add_argument("--force", action="store_true", help="replace --out")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        if not args.force:
            sys.exit(f"bench_int8: {out} exists; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    res: dict = {"machine": machine(args.threads), "args": vars(args)}

    onnx_path, ir_path = out / "student.onnx", out / "student.xml"
    card = export_checkpoint(args.student, onnx_path)
    convert_to_openvino(onnx_path, ir_path)
    res["export_parity_card"] = card.get("parity")
    pre = Preprocess.from_dict(card["preprocess"])
    val = open_dataset(args.data, "val")
    train = open_dataset(args.data, "train")
    size = tuple(int(v) for v in args.parity_size.split("x"))
    res["parity"] = fp32_parity(args.student, onnx_path, ir_path, val, pre, size, args.threads)
    print(json.dumps(res["parity"], indent=1), flush=True)

    reader = CalibrationReader.for_model(onnx_path, args.data, "train",
                                         num_images=args.calib_images)
    res["calibration"] = {}
    int8 = {}
    for method in ("minmax", "entropy", "percentile"):
        path = out / f"student.int8-{method}.onnx"
        t0 = time.perf_counter()
        quantize_onnx(onnx_path, path, reader, method=method)
        res["calibration"][f"ort-{method}"] = round(time.perf_counter() - t0, 1)
        int8[f"ort-{method}"] = path
        print(f"calibrated {method}: {res['calibration'][f'ort-{method}']} s", flush=True)
    u8 = out / "student.uint8-percentile.onnx"  # ORT's x86 fast path (asymmetric activations)
    t0 = time.perf_counter()
    quantize_onnx(onnx_path, u8, reader, method="percentile", activations="uint8")
    res["calibration"]["ort-percentile-uint8"] = round(time.perf_counter() - t0, 1)
    nncf_path = out / "student.int8-nncf.xml"
    t0 = time.perf_counter()
    quantize_openvino(ir_path, nncf_path, reader)
    res["calibration"]["nncf"] = round(time.perf_counter() - t0, 1)
    print(f"calibrated nncf: {res['calibration']['nncf']} s", flush=True)

    rows = [measure("openvino", "fp32", ir_path, val, pre, args),
            measure("onnxruntime", "fp32", onnx_path, val, pre, args),
            measure("openvino", "int8 nncf", nncf_path, val, pre, args)]
    for key, path in int8.items():
        rows.append(measure("onnxruntime", f"int8 {key}", path, val, pre, args))
        rows.append(measure("openvino", f"int8 {key}", path, val, pre, args))
    rows.append(measure("onnxruntime", "int8 ort-percentile-uint8", u8, val, pre, args))
    fp32 = {r["backend"]: r for r in rows if r["precision"] == "fp32"}
    for r in rows:
        base = fp32[r["backend"]]
        r["latency_ratio"] = round(r["p50_ms"] / base["p50_ms"], 3)
        r["miou_drop"] = round(base["miou"] - r["miou"], 2)
        print(row_text(r), flush=True)
    default = f"int8 ort-{DEFAULT_METHOD}"
    res["accuracy_aware"] = {}
    for backend in ("onnxruntime", "openvino"):
        plain = next(r for r in rows if r["backend"] == backend and r["precision"] == default)
        if plain["miou_drop"] <= args.budget and not args.aware:
            continue
        aware = out / f"student.int8-aware-{backend}.onnx"
        t0 = time.perf_counter()
        acard = accuracy_aware_quantize(onnx_path, aware, reader, train, budget=args.budget,
                                        method=DEFAULT_METHOD, backend=backend)
        s = acard["sensitivity"]
        res["accuracy_aware"][backend] = {
            "seconds": round(time.perf_counter() - t0, 1), "float_nodes": s["float_nodes"],
            "steps": s["steps"], "heldout_int8_drop": s["int8_drop"]}
        r = measure(backend, "int8 aware", aware, val, pre, args)
        r["latency_ratio"] = round(r["p50_ms"] / fp32[backend]["p50_ms"], 3)
        r["miou_drop"] = round(fp32[backend]["miou"] - r["miou"], 2)
        rows.append(r)
        print(row_text(r), flush=True)
    res["rows"] = rows
    res["checks"] = vendor_checks(out, args.threads)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "results.md").write_text(markdown(res))
    print(markdown(res))


DEFAULT_METHOD = "percentile"  # bckd calib's default


def machine(threads: int) -> dict:
    import onnxruntime
    import openvino

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": threads, "onnxruntime": onnxruntime.__version__,
            "openvino": openvino.__version__}


def fp32_parity(student, onnx_path, ir_path, val, pre, size, threads) -> dict:
    """Max |Δlogit| and argmax agreement of ORT / OpenVINO f32 vs torch over the val split."""
    import torch

    from distill.checkpoint import load_student

    model, _ = load_student(student)
    model.eval()
    resized = Preprocess(size=size, mean=pre.mean, std=pre.std, ignore_index=pre.ignore_index)
    stats = {b: {"max_abs_diff": 0.0, "same": 0, "pixels": 0} for b in ("onnxruntime", "openvino")}
    runners = {"onnxruntime": open_runner("onnxruntime", onnx_path, threads=threads),
               "openvino": open_runner("openvino", ir_path, threads=threads, precision="f32")}
    with runners["onnxruntime"], runners["openvino"]:
        for start in range(0, len(val), 8):
            x = resized.batch([val.load(i)[0] for i in range(start, min(start + 8, len(val)))])
            with torch.no_grad():
                ref = model(torch.from_numpy(x)).numpy()
            for name, runner in runners.items():
                y = runner.infer(x)
                s = stats[name]
                s["max_abs_diff"] = max(s["max_abs_diff"], float(np.abs(y - ref).max()))
                s["same"] += int((y.argmax(1) == ref.argmax(1)).sum())
                s["pixels"] += int(ref.shape[0] * ref.shape[2] * ref.shape[3])
    return {name: {"size": list(size), "images": len(val), "max_abs_diff": s["max_abs_diff"],
                   "argmax_agreement_pct": 100.0 * s["same"] / s["pixels"], "pixels": s["pixels"]}
            for name, s in stats.items()}


def measure(backend, label, path, val, pre, args) -> dict:
    opts = {"threads": args.threads}
    if backend == "openvino":
        opts["precision"] = "f32"  # the hint for the parts that stay in float
    with open_runner(backend, path, **opts) as runner:
        acc = evaluate_runner(runner, val, pre, read_card(path)["classes"], batch_size=8)
        x = pre.batch([val.load(0)[0]])
        lat = profile_runner(runner, x, warmup=50, iters=300, min_seconds=args.min_seconds)
        desc = runner.describe()
    return {"backend": backend, "precision": label, "artifact": Path(path).name,
            "threads": desc.get("threads"), "inference_precision": desc.get("inference_precision"),
            "miou": round(100 * acc["miou"], 2), "boundary_f": round(100 * acc["boundary_f"], 2),
            "p50_ms": round(lat.p50_ms, 3), "p90_ms": round(lat.p90_ms, 3),
            "mean_ms": round(lat.mean_ms, 3), "std_ms": round(lat.std_ms, 3), "n": lat.n}


def row_text(r: dict) -> str:
    return (f"{r['backend']:12s} {r['precision']:20s} mIoU {r['miou']:6.2f} (drop "
            f"{r['miou_drop']:+.2f})  p50 {r['p50_ms']:7.3f} ms  ratio {r['latency_ratio']:.3f}")


def vendor_checks(out: Path, threads: int) -> dict:
    import onnx

    checks = {}
    for path in sorted(out.glob("*.onnx")):
        onnx.checker.check_model(str(path), full_check=True)
        checks[path.name] = "onnx.checker full_check ok"
    app = shutil.which("benchmark_app") or str(Path(sys.executable).parent / "benchmark_app")
    for path in sorted(out.glob("*.xml")):
        size = read_card(path)["preprocess"]["size"]
        # benchmark_app takes -nthreads only with -hint none; one stream, one sync request is
        # the single-stream setting the runner's latency hint gives.
        cmd = [app, "-m", str(path), "-d", "CPU", "-hint", "none", "-nstreams", "1", "-nireq",
               "1", "-api", "sync", "-nthreads", str(threads),
               "-infer_precision", "f32", "-data_shape", f"[1,3,{size[0]},{size[1]}]", "-t", "5"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        median = re.search(r"Median:\s+([\d.]+) ms", proc.stdout)
        checks[path.name] = (f"benchmark_app ok, median {median.group(1)} ms"
                             if proc.returncode == 0 and median
                             else f"benchmark_app FAILED ({proc.returncode}): {proc.stderr[-300:]}")
    return checks


def markdown(res: dict) -> str:
    lines = ["| backend | model | mIoU % | drop | p50 ms | ratio to its f32 |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['backend']} | {r['precision']} | {r['miou']:.2f} | {r['miou_drop']:+.2f} "
                     f"| {r['p50_ms']:.3f} | {r['latency_ratio']:.3f} |")
    lines += ["", "FP32 parity (val split at " + "x".join(map(str, res["parity"]["onnxruntime"]["size"]))
              + "):"]
    for name, p in res["parity"].items():
        lines.append(f"- {name}: max |Δlogit| {p['max_abs_diff']:.2e}, argmax agreement "
                     f"{p['argmax_agreement_pct']:.4f} % of {p['pixels']} pixels")
    lines.append("- calibration seconds: " + ", ".join(f"{k} {v}" for k, v in
                                                      res["calibration"].items()))
    for backend, a in res["accuracy_aware"].items():
        lines.append(f"- accuracy-aware fallback scored on {backend} ({a['seconds']} s): float "
                     f"layers {a['float_nodes']}")
    lines += [f"- {k}: {v}" for k, v in res["checks"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
