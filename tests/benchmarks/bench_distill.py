"""Does BCKD help? Students from one teacher, several seeds, plus the ablation of method.md §7.

Trains, on the built-in procedural data, the no-KD student and the KD, CWD, BPKD and BCKD
students from one teacher for every seed, and (with ``--ablation``) BCKD with each open choice of
method.md §7 flipped: C-MSE instead of C-KL, the spec's context weight 50 (with C-KL and with
C-MSE), teacher-side adapters trained / parameter-free, feature stride 4, pair radius 3. Every
student is scored on the validation split with mIoU, boundary F
(3 px, against ground truth), boundary IoU, and LHD (r = 5) against the teacher's prediction and
against the ground truth. Writes ``table.md`` / ``table.json`` with mean ± std over seeds.

Each finished run is kept under ``--out`` (``runs/<variant>-s<seed>.json``), so an interrupted
benchmark resumes where it stopped and more seeds can be added later. The records behind the
README's table are copied to ``tests/benchmarks/results/distill/``; they are comparable only with
runs from the same teacher (``--out``'s ``teacher.pt``), so a new teacher means rerunning all.

    python tests/benchmarks/bench_distill.py --out /tmp/bench-distill --seeds 0 1 2 --ablation
"""
from __future__ import annotations

import argparse
import inspect
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from distill.checkpoint import load_student  # noqa: E402
from distill.data import SegDataset  # noqa: E402
from distill.losses import LOSSES  # noqa: E402
from distill.losses.base import method_names  # noqa: E402
from distill.run import distill_stage  # noqa: E402
from runtime.boundary import BoundaryMeter  # noqa: E402
from runtime.config import KDConfig, RunConfig  # noqa: E402
from runtime.data import open_dataset  # noqa: E402
from runtime.data.preprocess import Preprocess  # noqa: E402
from runtime.data.synth import synthesize  # noqa: E402
from runtime.metrics import ConfusionMatrix  # noqa: E402

MAIN = {"none": ("none", {}), "kd": ("kd", {}), "cwd": ("cwd", {}), "bpkd": ("bpkd", {}),
        "bckd": ("bckd", {}),
        # BPKD's third-party weights, from an AdamW/SegFormer recipe (see distill/losses/bpkd.py)
        "bpkd/edge-weight=50,body-weight=20": ("bpkd", {"bpkd": {"edge_weight": 50.0,
                                                                 "body_weight": 20.0}})}
ABLATION = {
    "bckd/context-weight=50": ("bckd", {"bckd": {"context_weight": 50.0}}),
    "bckd/context=mse,context-weight=50": ("bckd", {"bckd": {"context": "mse",
                                                              "context_weight": 50.0}}),
    "bckd/context=mse": ("bckd", {"bckd": {"context": "mse"}}),
    "bckd/teacher-adapters=trained": ("bckd", {"bckd": {"teacher_adapters": "trained"}}),
    "bckd/teacher-adapters=free": ("bckd", {"bckd": {"teacher_adapters": "free"}}),
    "bckd/stride=4": ("bckd", {"bckd": {"feature_stride": 4}}),
    "bckd/radius=3": ("bckd", {"bckd": {"radius": 3}}),
}
METRICS = ("miou", "boundary_f", "boundary_iou", "lhd_teacher", "lhd_gt")
HELDOUT_METRICS = ("heldout_miou", "heldout_boundary_f", "heldout_lhd_gt")
# A second split of the built-in data that no training run or search saw: scenes of another
# generator seed (issue 14: a setting chosen on the validation split is reported on this one).
HELDOUT_SEED, HELDOUT_IMAGES = 1000, 400


def predict(model: torch.nn.Module, dataset: SegDataset, batch: int = 16) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(dataset), batch):
            x = torch.stack([dataset[j][0] for j in range(i, min(i + batch, len(dataset)))])
            out.append(model(x).argmax(1).numpy().astype(np.uint8))
    return np.concatenate(out)


def score(pred: np.ndarray, teacher_pred: np.ndarray, targets: np.ndarray, classes) -> dict:
    cm = ConfusionMatrix(len(classes), 255)
    gt, vs_teacher = BoundaryMeter(len(classes)), BoundaryMeter(len(classes))
    for p, t, y in zip(pred, teacher_pred, targets):
        cm.update(p, y)
        gt.update(p, y)
        vs_teacher.update(p, y, reference=t)
    g = gt.summary()
    return {"miou": 100 * cm.summary(classes)["miou"], "boundary_f": 100 * g["boundary_f"],
            "boundary_iou": 100 * g["boundary_iou"], "lhd_gt": g["lhd"],
            "lhd_teacher": vs_teacher.summary()["lhd"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    # Pinned, not the default run's (teacher 20 / students 16 epochs, sized for 15 minutes):
    # the table and the records in tests/benchmarks/results/distill/ are at 25 / 20.
    ap.add_argument("--epochs", type=int, default=20, help="student epochs (default 20)")
    ap.add_argument("--teacher-epochs", type=int, default=25, help="teacher epochs (default 25)")
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--only", nargs="*", help="train only these variants")
    ap.add_argument("--table-only", action="store_true",
                    help="train nothing; write the table from the runs kept under --out")
    ap.add_argument("--define", nargs=3, action="append", default=[],
                    metavar=("NAME", "METHOD", "OPTIONS_JSON"),
                    help="an extra variant, e.g. bckd/lambda=2,1 bckd "
                    "'{\"bckd\": {\"boundary_weight\": 2, \"context_weight\": 1}}'")
    ap.add_argument("--grad-probe", type=int, default=0, metavar="N",
                    help="record gradient norms of each loss term every N iterations "
                    "(train.grad_probe_every; the per-epoch means go into the record)")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    cfg = RunConfig()
    cfg.student_train.epochs = args.epochs
    cfg.teacher_train.epochs = args.teacher_epochs
    cfg.student_train.grad_probe_every = args.grad_probe
    data = out / "data"
    if not (data / "dataset.json").is_file():
        s = cfg.data.synth
        synthesize(data, n_train=s.n_train, n_val=s.n_val, size=tuple(s.size), seed=s.seed)
    teacher = out / "teacher.pt"
    if not teacher.is_file():
        distill_stage(data=cfg.data, data_root=data, model=cfg.teacher,
                      train_cfg=cfg.teacher_train, out=teacher, resume=True)
    val_src = open_dataset(data, cfg.data.val_split)
    pre = Preprocess(size=tuple(cfg.data.input_size), ignore_index=val_src.ignore_index)
    val = SegDataset(val_src, pre, None)
    targets = np.stack([val[i][1].numpy() for i in range(len(val))])
    teacher_model, _ = load_student(teacher)
    teacher_pred = predict(teacher_model, val)
    results = {"teacher": [score(teacher_pred, teacher_pred, targets, val_src.classes)]}
    defined = {name: (method, json.loads(options)) for name, method, options in args.define}
    variants = dict(MAIN, **(ABLATION if args.ablation else {}), **defined)
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only}
    # The main comparison for every seed first, then the ablation: a stopped benchmark has the
    # table that matters most, and a rerun continues where it stopped.
    order = [(n, s) for group in (MAIN, ABLATION, defined) for s in args.seeds for n in group
             if n in variants]
    heldout_src = open_dataset(heldout_data(out, cfg), "val")
    heldout = SegDataset(heldout_src, pre, None)
    heldout_targets = np.stack([heldout[i][1].numpy() for i in range(len(heldout))])
    heldout_teacher = predict(teacher_model, heldout)
    split = (heldout, heldout_teacher, heldout_targets)
    results["teacher"][0].update(heldout_scores(teacher_model, split, val_src.classes))
    for name, seed in order:
        method, options = variants[name]
        record = out / "runs" / f"{name.replace('/', '_')}-s{seed}.json"
        if record.is_file() and not args.table_only and stale(record, method, options):
            print(f"{name} seed {seed}: its record was trained under other loss settings "
                  "(a default changed); training it again", flush=True)
            record.unlink()
        if not record.is_file() and not args.table_only:
            run_one(cfg, data, teacher, name, method, options, seed, record, val,
                    teacher_pred, targets, val_src.classes, split)
    write_table(out, variants, results)


def loss_settings(method: str, options: dict) -> dict:
    """Every option of each loss of ``method``: its defaults, updated by ``options``."""
    settings = {}
    for name in method_names(method, options):
        cls = LOSSES.get(name)
        values = {"weight": getattr(cls, "default_weight", 1.0)}
        values.update({k: p.default for k, p in inspect.signature(cls).parameters.items()
                       if k != "ctx" and p.default is not inspect.Parameter.empty})
        values.update(options.get(name) or {})
        settings[name] = values
    return settings


def stale(record: Path, method: str, options: dict) -> bool:
    """Whether a kept run was trained under loss settings other than today's (a default
    changed since). Records from before settings were kept count as current."""
    kept = json.loads(record.read_text()).get("settings")
    return kept is not None and kept != json.loads(json.dumps(loss_settings(method, options)))


def heldout_data(out: Path, cfg) -> Path:
    """The held-out split (written once under ``--out``)."""
    folder = out / "heldout"
    if not (folder / "dataset.json").is_file():
        synthesize(folder, n_train=1, n_val=HELDOUT_IMAGES, size=tuple(cfg.data.synth.size),
                   seed=HELDOUT_SEED, force=True)
    return folder


def heldout_scores(model, split, classes) -> dict:
    data, teacher_pred, targets = split
    got = score(predict(model, data), teacher_pred, targets, classes)
    return {f"heldout_{k}": got[k] for k in ("miou", "boundary_f", "lhd_gt")}


def run_one(cfg, data, teacher, name, method, options, seed, record, val, teacher_pred, targets,
            classes, split=None) -> None:
    cfg.student_train.seed = seed
    ckpt = record.with_suffix(".pt")
    start = time.perf_counter()
    result = distill_stage(data=cfg.data, data_root=data, model=cfg.student,
                           train_cfg=cfg.student_train, out=ckpt, method=method,
                           kd=KDConfig(method=method, options=options),
                           teacher=teacher if method != "none" else None, force=True,
                           log=lambda msg: None)
    model, _ = load_student(result.checkpoint)
    scores = score(predict(model, val), teacher_pred, targets, classes)
    if split is not None:
        scores.update(heldout_scores(model, split, classes))
    probes = [{k: v for k, v in h.items() if "/" in k} for h in result.card.get("history", [])]
    if any(probes):
        scores["grad_probes"] = probes  # per epoch: gradient norms and cosines to the task's
    scores.update(seconds=round(time.perf_counter() - start, 1), seed=seed, variant=name,
                  method=method, options=options, settings=loss_settings(method, options),
                  epochs=cfg.student_train.epochs)
    record.write_text(json.dumps(scores, indent=1))
    print(f"{name:32s} seed {seed}: " + "  ".join(f"{k} {scores[k]:.2f}" for k in METRICS)
          + f"  ({scores['seconds']:.0f} s)", flush=True)


def write_table(out: Path, variants: dict, results: dict) -> None:
    for name in variants:
        stem = name.replace("/", "_")
        runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob(f"{stem}-s*.json"))
                if re.fullmatch(rf"{re.escape(stem)}-s\d+\.json", p.name)]  # not the .card.json
        if runs:
            results[name] = runs
    lines = ["| student | seeds | mIoU % | boundary F % | boundary IoU % | LHD vs teacher px "
             "| LHD vs GT px | held-out mIoU % | held-out boundary F % | held-out LHD vs GT px |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name, runs in results.items():
        cells, summary[name] = [], {"seeds": len(runs)}
        for key in METRICS + HELDOUT_METRICS:
            values = [r[key] for r in runs if key in r]
            if not values:
                cells.append("-")
                continue
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[name][key] = {"mean": mean, "std": std, "values": values}
            cells.append(f"{mean:.2f} ± {std:.2f}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    write_probe_table(out, results)
    (out / "table.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))


def write_probe_table(out: Path, results: dict) -> None:
    """probes.md: per variant, the gradient norms of each applied term on the student's weights
    and their cosines to the task gradient, averaged over the first and the last quarter of the
    epochs (runs trained with --grad-probe)."""
    lines = ["| student | seed | epochs | term | ‖∇‖ early | ‖∇‖ late | ‖∇‖ / ‖∇task‖ early "
             "| late | cos to task early | late |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        for run in runs:
            probes = run.get("grad_probes") or []
            if not probes:
                continue
            q = max(1, len(probes) // 4)
            early, late = probes[:q], probes[-q:]

            def mean(rows, key):
                vals = [r[key] for r in rows if key in r]
                return statistics.fmean(vals) if vals else float("nan")

            terms = sorted({k.split("/", 1)[1] for p in probes for k in p if k.startswith("grad/")})
            task_e, task_l = mean(early, "grad/task"), mean(late, "grad/task")
            for term in terms:
                ge, gl = mean(early, f"grad/{term}"), mean(late, f"grad/{term}")
                ce, cl = mean(early, f"cos_task/{term}"), mean(late, f"cos_task/{term}")
                lines.append(f"| {name} | {run['seed']} | {len(probes)} | {term} | {ge:.4g} | "
                             f"{gl:.4g} | {ge / task_e:.3g} | {gl / task_l:.3g} | "
                             f"{'-' if term == 'task' else f'{ce:.3f}'} | "
                             f"{'-' if term == 'task' else f'{cl:.3f}'} |")
    if len(lines) > 2:
        (out / "probes.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
