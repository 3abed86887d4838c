"""Is BCKD's teacher boundary an object boundary? Scores the teacher-side pair boundary B^T of
finished distillation runs against the teacher's own class changes on the validation split.

For each run (its ``.pt.state.pt`` holds the loss's teacher-side adapters as trained or frozen),
every IRNet pair (i, j) of the validation images at the loss's feature size is labelled
"different" when the teacher's argmax classes of i and j differ. Printed per run: the share of
different-class pairs, the ROC AUC of B^T as a detector of them (0.5 = no information), the
balanced accuracy at B^T > 0.5, and the spread (std) of B^T. Usage:

    python tests/benchmarks/bench_bckd_boundary.py --out /work/bench-distill \
        --runs bckd-s0 bckd_tb=fitted-s0
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distill.checkpoint import load_student  # noqa: E402
from distill.data import SegDataset  # noqa: E402
from distill.losses.bckd import _posteriors  # noqa: E402
from distill.trainer import build_task  # noqa: E402
from runtime.config import RunConfig  # noqa: E402
from runtime.data import open_dataset  # noqa: E402
from runtime.data.preprocess import Preprocess  # noqa: E402


def roc_auc(score: np.ndarray, label: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half."""
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s))
    _, first, counts = np.unique(s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    pos = label.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def score_run(out: Path, run: str, val: SegDataset, cfg: RunConfig, teacher) -> dict:
    record = json.loads((out / "runs" / f"{run}.json").read_text())
    state = torch.load(out / "runs" / f"{run}.pt.state.pt", map_location="cpu", weights_only=False)
    task = build_task(cfg.student, cfg.student_train, val.source.classes, val.source.ignore_index,
                      torch.device("cpu"), teacher=teacher, method=record["method"],
                      kd_options=record.get("settings") or record["options"])  # as trained
    task.load_state_dict(state["task"])
    loss = task.losses["bckd"].eval()
    scores, labels = [], []
    with torch.no_grad():
        for start in range(0, len(val), 16):
            x = torch.stack([val[i][0] for i in range(start, min(start + 16, len(val)))])
            s, t = task._run(task.student, x), task._run(task.teacher, x)
            inputs = task.spec.distill_inputs(s, t, None, progress=1.0, epoch=0, epochs=1,
                                              size=x.shape[-2:])
            _, _, edge_s, edge_t = loss.features(inputs)
            radius = loss.pair_radius(*edge_s.shape[-2:])
            if loss.teacher_boundary == "semantic":  # as BCKDLoss.forward: the class posteriors
                edge_t = _posteriors(inputs.teacher_logits, edge_s.shape[-2:])
            bt = loss.teacher_pairs(edge_t, radius)
            different = loss.different_classes(inputs.teacher_logits, edge_s.shape[-2:], radius)
            scores.append(bt.flatten().numpy())
            labels.append((different > 0.5).flatten().numpy())
    b, y = np.concatenate(scores), np.concatenate(labels)
    hit = b > 0.5
    balanced = 0.5 * (hit[y].mean() + (~hit[~y]).mean())
    return {"run": run, "different_share": float(y.mean()), "auc": roc_auc(b, y),
            "balanced_accuracy": float(balanced), "bt_mean": float(b.mean()),
            "bt_std": float(b.std())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the bench_distill.py --out folder")
    ap.add_argument("--runs", nargs="+", required=True, help="run stems under OUT/runs")
    args = ap.parse_args()
    out = Path(args.out)
    cfg = RunConfig()
    src = open_dataset(out / "data", cfg.data.val_split)
    val = SegDataset(src, Preprocess(size=tuple(cfg.data.input_size),
                                     ignore_index=src.ignore_index), None)
    teacher, _ = load_student(out / "teacher.pt")
    torch.set_grad_enabled(False)
    print("| run | different-class pairs | AUC of B^T | balanced accuracy | B^T mean | B^T std |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        r = score_run(out, run, val, cfg, teacher)
        print(f"| {r['run']} | {r['different_share']:.3f} | {r['auc']:.3f} | "
              f"{r['balanced_accuracy']:.3f} | {r['bt_mean']:.3f} | {r['bt_std']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
