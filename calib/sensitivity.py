"""Accuracy-aware INT8: keep the most sensitive layers in float until a task-accuracy budget holds.

1. Score the FP32 model and the fully quantized model on a small held-out set (disjoint from the
   calibration images) with a scoring function — by default the task's budget metric in points
   (mIoU for semantic segmentation, COCO box AP for detect, mask AP for instance); any
   ``score(runner) -> float`` where higher is better fits.
2. If the drop exceeds ``budget``, rank the weighted layers (Conv, ConvTranspose, Gemm, MatMul) by
   how much of the score keeping each one alone in float recovers (leave-one-out).
3. Keep layers in float greedily, most sensitive first, until the drop is within budget; each
   step's score and ONNX Runtime latency is recorded, so the accuracy bought by each float layer
   and its latency cost are both in the card.

Calibration runs once; every candidate model reuses the same tensor ranges
(:class:`calib.quantize.Calibration`), so a step costs one quantization and one held-out pass.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from calib.card import shared_images
from calib.quantize import (DEFAULT_PERCENTILE, WEIGHTED_OPS, Calibration, calibrate,
                            keeps_float_tail, source_card, write_qdq)
from calib.reader import CalibrationReader, choose_indices
from runtime.backends import open_runner
from runtime.data.preprocess import Preprocess
from runtime.errors import BckdError
from runtime.evaluate import evaluate_runner
from runtime.files import refuse_existing, sha256_json
from runtime.profile import profile_runner
from runtime.registry import unknown_name_message

Scorer = Callable[[Any], float]  # runner -> score, higher is better
DEFAULT_HELDOUT_IMAGES = 100


class BudgetWarning(UserWarning):
    """Even with every candidate layer in float the score drop exceeds the budget."""


def task_scorer(dataset: Any, preprocess: Preprocess, card: dict[str, Any],
                batch_size: int = 8) -> Scorer:
    """A scorer giving the budget metric of ``card``'s task in points (0-100) of a runner on
    ``dataset``, postprocessed as ``card`` says (NMS settings included)."""
    from runtime.tasks import get_task

    task = get_task(card)
    key = task.budget_metric

    def score(runner: Any) -> float:
        value = evaluate_runner(runner, dataset, preprocess, batch_size=batch_size, task=task,
                                card=card)[key]
        return 100.0 * float(value or 0.0)

    score.name = key  # type: ignore[attr-defined]
    return score


def miou_scorer(dataset: Any, preprocess: Preprocess, classes: list[str],
                batch_size: int = 8) -> Scorer:
    """A scorer giving mIoU in points (0-100) of a runner on ``dataset``."""
    return task_scorer(dataset, preprocess, {"task": "semantic", "classes": list(classes)},
                       batch_size)


class Subset:
    """Chosen samples of a dataset split, with the dataset interface evaluation uses."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        self.ids = [dataset.ids[i] for i in self.indices]
        self.split = getattr(dataset, "split", "")
        self.root = getattr(dataset, "root", None)
        self.meta = getattr(dataset, "meta", {})
        self.classes = getattr(dataset, "classes", [])

    def __len__(self) -> int:
        return len(self.indices)

    def __getattr__(self, name: str) -> Any:
        """Everything else (a COCO split's ``coco``, ``category_ids``, ``task``, ...) is the
        dataset's; COCO scoring evaluates only the images it was given."""
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.dataset.load(self.indices[i])

    def image_path(self, i: int) -> Path:
        return self.dataset.image_path(self.indices[i])


def heldout_subset(dataset: Any, num_images: int | None, seed: int = 0,
                   exclude: CalibrationReader | None = None) -> Subset:
    """``num_images`` seeded samples of ``dataset`` (all of it when None or larger).

    With ``exclude``, the reader's calibration images are left out first, so a held-out set can
    come from the calibration split itself (the images calibration did not draw).
    """
    pool = list(range(len(dataset)))
    if exclude is not None and Path(exclude.root).resolve() == Path(
            getattr(dataset, "root", exclude.root)).resolve() and exclude.split == getattr(
            dataset, "split", None):
        taken = set(exclude.indices)
        pool = [i for i in pool if i not in taken]
    if not pool:
        raise BckdError("no held-out images are left once the calibration images are excluded; "
                        "calibrate on fewer images or hold out another split")
    count = len(pool) if num_images is None else min(num_images, len(pool))
    return Subset(dataset, [pool[i] for i in choose_indices(len(pool), count, seed)])


def check_heldout(reader: CalibrationReader, heldout: Any) -> None:
    """Refuse a held-out set that shares images with the calibration images."""
    shared = shared_images(reader.describe(), heldout)
    if shared:
        raise BckdError(
            f"the held-out split '{getattr(heldout, 'split', '?')}' shares {len(shared)} images with "
            f"the calibration images (e.g. '{shared[0]}'); measure sensitivity on a split disjoint "
            f"from the calibration split '{reader.split}'"
        )


# The runtimes a sensitivity search can score on; OpenVINO gets an explicit f32 hint for the
# parts of the model that stay in float.
SCORING_BACKENDS = {"onnxruntime": {}, "openvino": {"precision": "f32"}}


def measure(model: str | os.PathLike, score: Scorer, x: np.ndarray,
            latency_iters: int, backend: str = "onnxruntime") -> dict[str, Any]:
    """Score of ``model`` on ``backend`` and its median latency (ms) on ``x`` (None: not timed).

    INT8 kernels differ between runtimes (OpenVINO and ONNX Runtime do not round a Q/DQ model
    alike), so the search scores on the runtime the model is meant for.
    """
    with open_runner(backend, model, card={}, **SCORING_BACKENDS[backend]) as runner:
        value = float(score(runner))
        if latency_iters <= 0:
            return {"score": value, "latency_ms": None}
        stats = profile_runner(runner, x, warmup=2, iters=latency_iters, min_seconds=0.0)
    return {"score": value, "latency_ms": round(stats.p50_ms, 4)}


class _Trials:
    """Quantize-and-measure with one calibration: each trial names the nodes kept in float."""

    def __init__(self, cal: Calibration, folder: Path, score: Scorer, x: np.ndarray,
                 backend: str = "onnxruntime") -> None:
        self.cal, self.folder, self.score, self.x = cal, folder, score, x
        self.backend = backend
        self.count = 0

    def run(self, float_nodes: Sequence[str], latency_iters: int) -> dict[str, Any]:
        self.count += 1
        path = self.folder / f"trial{self.count}.onnx"
        self.cal.quantize(path, float_nodes)
        try:
            return measure(path, self.score, self.x, latency_iters, self.backend)
        finally:
            path.unlink()


def rank_layers(trials: _Trials, candidates: Sequence[str], int8_score: float,
                op_of: dict[str, str]) -> list[dict[str, Any]]:
    """Candidates by the score recovered when each alone stays in float, most sensitive first."""
    rows = []
    for node in candidates:
        value = trials.run([node], latency_iters=0)["score"]
        rows.append({"node": node, "op_type": op_of[node], "score": round(value, 4),
                     "gain": round(value - int8_score, 4)})
    # sorted() is stable: ties keep graph order
    return sorted(rows, key=lambda r: -r["gain"])


def greedy_fallback(trials: _Trials, ranking: list[dict[str, Any]], fp32_score: float,
                    int8_latency_ms: float | None, budget: float, max_float: int,
                    latency_iters: int) -> list[dict[str, Any]]:
    """Keep ranked layers in float one by one until the drop is within ``budget``; the steps taken.

    Each step records the score, its drop vs FP32, the median latency and its cost over full INT8.
    """
    steps: list[dict[str, Any]] = []
    kept: list[str] = []
    for row in ranking[:max_float]:
        kept.append(row["node"])
        m = trials.run(kept, latency_iters)
        steps.append({"float_nodes": list(kept), "added": row["node"],
                      "score": round(m["score"], 4), "drop": round(fp32_score - m["score"], 4),
                      "latency_ms": m["latency_ms"],
                      "latency_cost_ms": _difference(m["latency_ms"], int8_latency_ms)})
        if fp32_score - m["score"] <= budget:
            break
    return steps


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


def search_float_layers(cal: Calibration, onnx_path: str | os.PathLike, score: Scorer,
                        x: np.ndarray, *, budget: float, op_types: Sequence[str] = WEIGHTED_OPS,
                        max_float_layers: int | None = None, latency_iters: int = 20,
                        backend: str = "onnxruntime") -> dict[str, Any]:
    """The sensitivity report: FP32 and INT8 scores, layer ranking, fallback steps, chosen layers."""
    with tempfile.TemporaryDirectory(prefix="bckd-sensitivity.") as tmp:
        trials = _Trials(cal, Path(tmp), score, x, backend)
        fp32 = measure(onnx_path, score, x, latency_iters, backend)
        int8 = trials.run([], latency_iters)
        report = {"metric": getattr(score, "name", getattr(score, "__name__", "score")),
                  "backend": backend,
                  "budget": budget, "fp32": fp32, "int8": int8,
                  "int8_drop": round(fp32["score"] - int8["score"], 4),
                  "ranking": [], "steps": [], "float_nodes": []}
        if fp32["score"] - int8["score"] <= budget:
            report["within_budget"] = True
            return report
        names = cal.nodes(tuple(op_types))
        report["ranking"] = rank_layers(trials, names, int8["score"], cal.op_types)
        limit = len(names) if max_float_layers is None else max_float_layers
        report["steps"] = greedy_fallback(trials, report["ranking"], fp32["score"],
                                          int8["latency_ms"], budget, limit, latency_iters)
    last = report["steps"][-1] if report["steps"] else None
    report["float_nodes"] = last["float_nodes"] if last else []
    report["within_budget"] = bool(last and last["drop"] <= budget)
    return report


def accuracy_aware_quantize(onnx_path: str | os.PathLike, out: str | os.PathLike,
                            reader: CalibrationReader, heldout: Any, *, budget: float,
                            score: Scorer | None = None, method: str = "minmax",
                            heldout_images: int | None = DEFAULT_HELDOUT_IMAGES,
                            op_types: Sequence[str] = WEIGHTED_OPS,
                            max_float_layers: int | None = None, latency_iters: int = 20,
                            num_bins: int | None = None, percentile: float = DEFAULT_PERCENTILE,
                            backend: str = "onnxruntime", force: bool = False) -> dict[str, Any]:
    """Q/DQ INT8 ONNX at ``out`` whose score drop vs FP32 on ``heldout`` is within ``budget``.

    ``heldout`` is an opened dataset split disjoint from the calibration images (checked), of
    which ``heldout_images`` seeded samples are used; ``score`` defaults to mIoU in points, and
    ``budget`` is in the score's units. Returns the card, whose ``sensitivity`` section lists the
    layers kept in float, the score and latency after each step, and the ranking.
    """
    if backend not in SCORING_BACKENDS:
        raise BckdError(unknown_name_message("scoring backend", backend, list(SCORING_BACKENDS)))
    if budget < 0:
        raise BckdError(f"the accuracy budget is a maximum drop and must be >= 0, got {budget}")
    out = Path(out)
    refuse_existing(out, "INT8 ONNX file", force)
    base = source_card(onnx_path, reader)
    subset = heldout_subset(heldout, heldout_images, exclude=reader)
    check_heldout(reader, subset)
    score = score or task_scorer(subset, reader.preprocess, base)
    x = reader.preprocess.batch([subset.load(0)[0]])
    with calibrate(onnx_path, reader, method=method, num_bins=num_bins,
                   percentile=percentile, keep_tail=keeps_float_tail(base)) as cal:
        report = search_float_layers(cal, onnx_path, score, x, budget=budget, op_types=op_types,
                                     max_float_layers=max_float_layers, latency_iters=latency_iters,
                                     backend=backend)
        report["heldout"] = {"split": subset.split, "num_images": len(subset),
                             "ids_sha256": sha256_json([str(i) for i in subset.ids])}
        card = write_qdq(cal, out, base, onnx_path, reader, report["float_nodes"],
                         {"sensitivity": report})
    if not report["within_budget"]:
        warnings.warn(f"{out}: the score drop stays above the budget of {budget} even with "
                      f"{len(report['float_nodes'])} layers in float; see the card's sensitivity "
                      "section", BudgetWarning, stacklevel=2)
    return card
