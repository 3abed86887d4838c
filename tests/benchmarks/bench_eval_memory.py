"""Issue-5 number: ``bckd eval`` over 5,000 images at 512x512 keeps resident memory under 1 GiB.

What it does, in ``--work`` (reused between runs when already there):

1. writes the built-in procedural dataset at 512x512 with ``--images`` validation images and a
   16-image train split (``bckd data synth``);
2. trains ``bckd run``'s default student (ResNet-18 w0.25 PSPNet) for one epoch on that train split at 512x512 with no teacher
   (``bckd distill --method none``) and exports it (ONNX, then the OpenVINO IR), so the network
   itself runs at 512x512 — its accuracy does not matter here, its activations do;
3. runs ``bckd eval`` as a child process on every backend asked for, sampling the child's
   resident set (``VmRSS``) every ``--interval`` seconds, and reads its peak (``VmHWM``, and
   ``ru_maxrss`` after it exits). The sampled curve shows whether memory grows with the number of
   images scored: the RSS after the first 10 % and at the end are printed side by side.

Run it on an idle machine (the eval takes a few minutes per backend): ::

    python tests/benchmarks/bench_eval_memory.py --work /tmp/bench-eval-mem

Prints one JSON object (also written to ``WORK/results.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024 ** 3
LIMIT_BYTES = 1 * GIB


def bckd(*args: str) -> None:
    cmd = [sys.executable, "-m", "runtime.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB (empty once the process has gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def prepare(work: Path, images: int) -> dict[str, Path]:
    data = work / f"data-512-{images}"
    if not (data / "dataset.json").exists():
        t = time.perf_counter()
        bckd("data", "synth", "--out", str(data), "--n-train", "16", "--n-val", str(images),
             "--size", "512")
        print(f"dataset: {images} val images at 512x512 in {time.perf_counter() - t:.0f} s",
              file=sys.stderr, flush=True)
    student = work / "student-512.pt"
    if not student.exists():
        config = work / "student.yaml"  # bckd run's default student (RunConfig.student)
        config.write_text("model:\n  backbone: resnet18\n  head: pspnet\n  width: 0.25\n")
        bckd("distill", "--data", str(data), "--config", str(config), "--method", "none",
             "--epochs", "1", "--input-size", "512", "--out", str(student))
    onnx = work / "student-512.onnx"
    if not onnx.exists():
        bckd("export", str(student), "--out", str(onnx))
    xml = work / "student-512.xml"
    if not xml.exists():
        bckd("export", str(onnx), "--out", str(xml))
    return {"data": data, "onnxruntime": onnx, "openvino": xml}


def measure(backend: str, model: Path, data: Path, out: Path, threads: int,
            interval: float) -> dict:
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "runtime.cli", "eval", str(model), "--backend", backend,
           "--data", str(data), "--split", "val", "--threads", str(threads), "--out", str(out)]
    if backend == "openvino":
        cmd += ["--precision", "fp32"]
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    curve: list[tuple[float, int]] = []  # (seconds, VmRSS KiB)
    hwm = 0
    while True:
        # wait4 on this one child: its own ru_maxrss (KiB on Linux) cannot miss a peak between
        # samples, and is not mixed with the preparation steps' children.
        pid, wstatus, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        s = status_kib(proc.pid)
        if "VmRSS" in s:
            curve.append((round(time.perf_counter() - start, 1), s["VmRSS"]))
            hwm = max(hwm, s.get("VmHWM", 0))
        time.sleep(interval)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(wstatus) != 0:
        sys.exit(f"bckd eval failed ({backend}):\n{log.read_text()[-3000:]}")
    maxrss = usage.ru_maxrss
    result = json.loads(out.read_text())
    tenth = [kib for t, kib in curve if t <= seconds / 10] or [curve[0][1]]
    peak = max(hwm, maxrss, max(kib for _, kib in curve))
    return {
        "backend": backend, "model": str(model), "images": result["images"],
        "seconds": round(seconds, 1), "images_per_s": round(result["images"] / seconds, 2),
        "peak_rss_mib": round(peak / 1024, 1),
        "ru_maxrss_mib": round(maxrss / 1024, 1),
        "rss_after_first_10pct_mib": round(max(tenth) / 1024, 1),
        "rss_at_end_mib": round(curve[-1][1] / 1024, 1),
        "under_1_gib": peak * 1024 < LIMIT_BYTES,
        "miou": result.get("miou"),
        "curve_mib": [(t, round(k / 1024, 1)) for t, k in curve[:: max(1, len(curve) // 40)]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/bench-eval-mem")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--backends", nargs="+", default=["openvino", "onnxruntime"],
                    choices=["openvino", "onnxruntime"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--interval", type=float, default=0.2, help="RSS sampling period, seconds")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work, args.images)
    rows = []
    for backend in args.backends:
        row = measure(backend, paths[backend], paths["data"], work / f"eval-{backend}.json",
                      args.threads, args.interval)
        rows.append(row)
        print(f"{backend}: peak RSS {row['peak_rss_mib']} MiB (first 10 %: "
              f"{row['rss_after_first_10pct_mib']}, end: {row['rss_at_end_mib']}), "
              f"{row['images_per_s']} images/s", file=sys.stderr, flush=True)
    report = {"images": args.images, "size": [512, 512], "limit_mib": LIMIT_BYTES // 2 ** 20,
              "cpu_count": os.cpu_count(), "runs": rows}
    (work / "results.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({**report, "runs": [{k: v for k, v in r.items() if k != "curve_mib"}
                                         for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
