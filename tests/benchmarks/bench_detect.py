"""Detection / instance benchmarks of issue 11: the default run, parity, INT8, and KD over seeds.

Parts (any combination; each writes ``<out>/<part>.json`` and prints a table):

* ``--quick``: ``bckd run --task T --quick`` cold, timed from the outside.
* ``--run``: ``bckd run --task T`` cold (its own teacher cache under ``--out``), timed from the
  outside; the report rows (teacher, students none / kd / bckd, OpenVINO f32, INT8) are copied.
* ``--parity``: the run's BCKD student exported with host NMS and with NMS in the graph, run by
  ONNX Runtime and OpenVINO at a size other than the traced one on every validation image, and
  compared with torch + host NMS: the share of detections reproduced (same label, IoU >= 0.99),
  both ways.
* ``--seeds S ...``: students none / kd / bckd from the run's teacher, one per seed, scored with
  COCO box AP (and mask AP and mask LHD for instance) on the validation split through the
  runtime's own postprocess, and MFS against the teacher; mean ± std over seeds. Each student is
  also scored on a held-out split (``heldout_*``): scenes of another generator seed
  (``HELDOUT_SEED``) that no training run, no variant search and no default choice ever saw.

    python tests/benchmarks/bench_detect.py --out /tmp/bench-det --task detect --run --parity \
        --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

METHODS = ("none", "kd", "bckd")
PARITY_SIZE = (160, 224)  # the default run traces at 128x128
HELDOUT_SEED, HELDOUT_IMAGES = 1000, 400


def run_default(out: Path, task: str, quick: bool = False) -> dict:
    name = f"run-{task}" + ("-quick" if quick else "")
    run = out / name
    if (run / "report.json").is_file():
        return json.loads((out / f"{name}.json").read_text())
    cache = out / (f"cache-{task}" + ("-quick" if quick else ""))  # cold: a teacher cache of its own
    env = dict(os.environ, BCKD_CACHE=str(cache))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "runtime.cli", "run", "--task", task, "--out", str(run)]
                   + (["--quick"] if quick else []), check=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    report = json.loads((run / "report.json").read_text())
    rows = [{k: r.get(k) for k in ("model", "method", "backend", "precision", "box_ap",
                                   "box_ap50", "mask_ap", "boundary_ap")}
            | {"p50_ms": r["latency_ms"]["p50"]} for r in report["results"]]
    result = {"task": task, "quick": quick, "seconds": round(seconds, 1), "rows": rows}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


def print_run(result: dict) -> None:
    quick = " --quick" if result.get("quick") else ""
    print(f"\nbckd run --task {result['task']}{quick}: {result['seconds']:.0f} s")
    print("| model | method | backend | precision | box AP | AP50 | mask AP | boundary AP | "
          "p50 ms |\n|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        cells = [r["model"], r["method"], r["backend"], r["precision"]] + [
            "-" if r.get(k) is None else f"{r[k]:.2f}"
            for k in ("box_ap", "box_ap50", "mask_ap", "boundary_ap", "p50_ms")]
        print("| " + " | ".join(map(str, cells)) + " |")


def teacher_checkpoint(out: Path, task: str) -> Path:
    found = sorted((out / f"cache-{task}" / "teachers").glob("*/teacher.pt"))
    if not found:
        raise SystemExit(f"no cached teacher under {out}/cache-{task}; run --run first")
    return found[-1]


def parity(out: Path, task: str) -> dict:
    import torch

    from distill.checkpoint import load_student
    from export.api import export_checkpoint
    from runtime.backends import open_runner
    from runtime.data import open_dataset
    from runtime.data.preprocess import Preprocess
    from runtime.tasks.detect import match_detections, to_layout
    from runtime.tasks.nms import unpad

    torch.set_num_threads(2)
    run = out / f"run-{task}"
    ckpt = run / "checkpoints" / "student-bckd.pt"
    folder = out / f"parity-{task}"
    folder.mkdir(exist_ok=True)
    exports = {}
    for nms in ("host", "graph"):
        path = folder / f"student-{nms}.onnx"
        card = (json.loads(Path(str(path) + ".card.json").read_text()) if path.is_file()
                else export_checkpoint(ckpt, path, nms=nms))
        exports[nms] = (path, card)
    host_card = exports["host"][1]
    pre = Preprocess.from_dict(dict(host_card["preprocess"], size=list(PARITY_SIZE)))
    val = open_dataset(run / "data", "val", format="coco")
    model, _ = load_student(ckpt)
    model.eval()
    counters = {}
    runners = {}
    stack = contextlib.ExitStack()
    for nms, (path, card) in exports.items():
        runners[f"onnxruntime/{nms}"] = (stack.enter_context(open_runner("onnxruntime", path)),
                                         card)
        runners[f"openvino/{nms}"] = (stack.enter_context(
            open_runner("openvino", path, precision="f32")), card)
    batch = 8
    for lo in range(0, len(val), batch):
        x = pre.batch([val.load(i)[0] for i in range(lo, min(lo + batch, len(val)))])
        with torch.no_grad():
            raw = {n: o.numpy() for n, o in zip(model.output_names, model(torch.from_numpy(x)))}
        ref = to_layout(raw, host_card)
        for name, (runner, card) in runners.items():
            got = to_layout(runner.run(x), card)
            c = counters.setdefault(name, {"torch": 0, "backend": 0, "matched": 0, "back": 0})
            for b in range(x.shape[0]):
                r, g = unpad(ref, b), unpad(got, b)
                c["torch"] += len(r[0])
                c["backend"] += len(g[0])
                c["matched"] += match_detections(r, g)
                c["back"] += match_detections(g, r)
    stack.close()
    result = {"task": task, "size": list(PARITY_SIZE), "images": len(val), "backends": {}}
    for name, c in counters.items():
        result["backends"][name] = dict(c, agreement=c["matched"] / max(c["torch"], 1),
                                        reverse=c["back"] / max(c["backend"], 1))
    (out / f"parity-{task}.json").write_text(json.dumps(result, indent=1))
    return result


def print_parity(result: dict) -> None:
    h, w = result["size"]
    print(f"\nparity vs torch + host NMS, {result['images']} val images at {h}x{w}")
    print("| backend / NMS | torch dets | backend dets | reproduced | reverse |\n|---|---|---|---|---|")
    for name, c in result["backends"].items():
        print(f"| {name} | {c['torch']} | {c['backend']} | {100 * c['agreement']:.3f} % | "
              f"{100 * c['reverse']:.3f} % |")


def seeds(out: Path, task: str, seed_list: list[int], methods: tuple[str, ...] = METHODS,
          options: dict | None = None, tag: str = "") -> dict:
    import torch

    from distill.analysis import manifold_stability
    from distill.checkpoint import load_student
    from distill.run import distill_stage
    from runtime.config import KDConfig, task_config
    from runtime.data import open_dataset
    from runtime.data.preprocess import Preprocess

    torch.set_num_threads(2)
    cfg = task_config(task)
    run = out / f"run-{task}"
    data = run / "data"
    teacher = teacher_checkpoint(out, task)
    records = out / f"seeds-{task}"
    records.mkdir(exist_ok=True)
    card = json.loads((run / "onnx" / "student-bckd.onnx.card.json").read_text())
    pre = Preprocess.from_dict(card["preprocess"])
    val = open_dataset(data, "val", format="coco")
    heldout = open_dataset(heldout_data(out, task, cfg), "val", format="coco")
    teacher_model, _ = load_student(teacher)
    mfs_images = [torch.from_numpy(pre.batch([val.load(i)[0] for i in range(lo, lo + 8)]))
                  for lo in range(0, 32, 8)]
    results: dict[str, list[dict]] = {"teacher": [score_both(teacher_model, val, heldout, pre,
                                                             card)]}
    for seed in seed_list:
        for method in methods:
            name = method + (f"[{tag}]" if tag else "")
            record = records / f"{name}-s{seed}.json"
            if not record.is_file():
                cfg.student_train.seed = seed
                start = time.perf_counter()
                res = distill_stage(data=cfg.data, data_root=data, model=cfg.student,
                                    train_cfg=cfg.student_train, out=records / f"{method}-s{seed}.pt",
                                    method=method,
                                    kd=KDConfig(method=method, options=dict(options or {})),
                                    teacher=teacher if method != "none" else None, force=True,
                                    log=lambda _: None)
                model, _ = load_student(res.checkpoint)
                row = score_both(model, val, heldout, pre, card)
                row["mfs"] = manifold_stability(model, teacher_model, mfs_images)["mfs"]
                row.update(seed=seed, method=method, options=dict(options or {}),
                           seconds=round(time.perf_counter() - start, 1))
                record.write_text(json.dumps(row, indent=1))
                print(f"{name} seed {seed}: box AP {row['box_ap']:.2f}  MFS {row['mfs']:.3f}  "
                      f"({row['seconds']:.0f} s)", flush=True)
            results.setdefault(name, []).append(json.loads(record.read_text()))
    summary = {}
    for name, rows in results.items():
        summary[name] = {"seeds": len(rows)}
        for key in rows[0]:
            if key in ("seed", "method", "seconds", "options") or rows[0][key] is None:
                continue
            values = [r[key] for r in rows]
            summary[name][key] = {"mean": statistics.fmean(values),
                                  "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                  "values": values}
    result = {"task": task, "seeds": seed_list, "epochs": cfg.student_train.epochs,
              "summary": summary}
    suffix = f"-{tag.replace('/', '_')}" if tag else ""
    (out / f"seeds-{task}{suffix}.json").write_text(json.dumps(result, indent=1))
    return result


def heldout_data(out: Path, task: str, cfg) -> Path:
    """The held-out split: the default scenes' generator at another seed, written once."""
    from runtime.data.synth import synthesize

    folder = out / f"heldout-{task}"
    if not (folder / "dataset.json").is_file():
        synthesize(folder, n_train=1, n_val=HELDOUT_IMAGES, size=tuple(cfg.data.synth.size),
                   seed=HELDOUT_SEED, task=task, force=True)
    return folder


def score_both(model, val, heldout, pre, card) -> dict:
    row = score(model, val, pre, card)
    row.update({f"heldout_{k}": v for k, v in score(model, heldout, pre, card).items()})
    return row


def score(model, val, pre, card) -> dict:
    """COCO AP in points (and mask LHD in px for instance) through the runtime postprocess."""
    from distill.tasks import validate_detector

    s = validate_detector(model, val, pre, dict(card, task=model.task))
    row = {k: 100 * s[k] for k in ("box_ap", "box_ap50", "box_ap75") if s.get(k) is not None}
    for k in ("mask_ap", "boundary_ap"):
        if s.get(k) is not None:
            row[k] = 100 * s[k]
    return row


def print_seeds(result: dict) -> None:
    keys = [k for k in ("box_ap", "box_ap50", "mask_ap", "boundary_ap", "heldout_box_ap",
                        "heldout_mask_ap", "mfs")
            if any(k in s for s in result["summary"].values())]
    print(f"\n{result['task']}: students over seeds {result['seeds']} "
          f"({result['epochs']} epochs), mean ± std")
    print("| model | seeds | " + " | ".join(keys) + " |\n|---|---|" + "---|" * len(keys))
    for name, s in result["summary"].items():
        cells = [f"{s[k]['mean']:.2f} ± {s[k]['std']:.2f}" if k in s else "-" for k in keys]
        print(f"| {name} | {s['seeds']} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--task", default="detect", choices=["detect", "instance"])
    ap.add_argument("--run", action="store_true")
    ap.add_argument("--quick", action="store_true", help="time bckd run --quick (cold)")
    ap.add_argument("--parity", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="*", default=[])
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help="student methods of --seeds (default none kd bckd)")
    ap.add_argument("--options", default="{}",
                    help='JSON kd options for --seeds, e.g. \'{"bckd": {"context_weight": 50}}\'')
    ap.add_argument("--tag", default="", help="name of this options variant in the records")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        print_run(run_default(out, args.task, quick=True))
    if args.run:
        print_run(run_default(out, args.task))
    if args.parity:
        print_parity(parity(out, args.task))
    if args.seeds:
        print_seeds(seeds(out, args.task, args.seeds, tuple(args.methods),
                          json.loads(args.options), args.tag))


if __name__ == "__main__":
    main()
