"""Numerical parity between a reference model and an exported artifact.

Both sides are plain callables from one NCHW float32 array to ``{output name: array}``, so the
same check serves torch vs ONNX Runtime, OpenVINO or TensorRT. :func:`check_parity` compares one
candidate; :func:`combine_parity` gathers several backends (some possibly skipped) into the card's
``parity`` section. This module is torch-free; the torch side is wrapped by the caller.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

# The semantic comparison lives with its task (torch-free); re-exported here for callers.
from runtime.tasks.semantic import argmax_agreement, compare_output  # noqa: F401

Outputs = Mapping[str, np.ndarray]
ModelFn = Callable[[np.ndarray], Outputs]

PARITY_SEED = 0
# Export acceptance: max |Δlogit| and the fraction of pixels whose argmax class must agree.
DEFAULT_TOL = 1e-4
MIN_ARGMAX_AGREEMENT = 0.9999
# Fields shared by every backend's result, lifted to the top of a combined section.
_COMMON = ("size", "batch", "seed", "tol", "min_argmax_agreement")


def random_input(
    batch: int, channels: int, size: tuple[int, int], seed: int = PARITY_SEED
) -> np.ndarray:
    """A seeded standard-normal NCHW float32 batch (the range of mean/std-normalised images)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, channels, *size), dtype=np.float32)


def check_parity(
    reference: ModelFn,
    candidate: ModelFn,
    *,
    size: tuple[int, int],
    batch: int,
    channels: int = 3,
    tol: float | Mapping[str, float] = DEFAULT_TOL,
    min_agreement: float | None = None,
    seed: int = PARITY_SEED,
    backend: str = "",
) -> dict:
    """Run both callables on one seeded input and compare every reference output.

    ``tol`` is one tolerance for all outputs or one per output name (outputs differ in scale);
    ``min_agreement`` (a fraction) also bounds the argmax agreement of class-score outputs.
    Returns one backend's parity result: backend, size, batch, seed, tol, ok, the worst case over
    outputs (max_abs_diff, mean_abs_diff, argmax_agreement) and the per-output results.
    """
    x = random_input(batch, channels, size, seed)
    result = {
        "backend": backend, "size": list(size), "batch": batch, "seed": seed,
        "tol": dict(tol) if isinstance(tol, Mapping) else tol,
        "min_argmax_agreement": min_agreement,
    }
    ref_out = reference(x)
    try:
        cand_out = candidate(x)
    except Exception as exc:  # an artifact that cannot run at this shape fails parity, with the reason
        text = str(exc).strip()
        reason = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
        return {**result, "ok": False, "error": f"the candidate failed to run: {reason}", "outputs": {}}
    outputs = {name: _compare_named(name, ref, cand_out, tol, min_agreement)
               for name, ref in ref_out.items()}
    ok = all(o["ok"] for o in outputs.values())
    return {**result, "ok": ok, **_worst_case(outputs), "outputs": outputs}


def _worst_case(outputs: dict) -> dict:
    """Summary over outputs or backends (largest diffs, lowest agreement); empty if any of them
    was not compared."""
    if not outputs or any("max_abs_diff" not in o for o in outputs.values()):
        return {}
    agreements = [o["argmax_agreement"] for o in outputs.values()
                  if o.get("argmax_agreement") is not None]
    summary = {
        "max_abs_diff": max(o["max_abs_diff"] for o in outputs.values()),
        "mean_abs_diff": max(o["mean_abs_diff"] for o in outputs.values()),
    }
    if agreements:
        summary["argmax_agreement"] = min(agreements)
    return summary


def _compare_named(
    name: str, ref: np.ndarray, cand_out: Outputs, tol: float | Mapping[str, float],
    min_agreement: float | None,
) -> dict:
    out_tol = tol[name] if isinstance(tol, Mapping) else tol
    if name not in cand_out:
        return {"ok": False, "tol": out_tol, "error": "missing from the candidate"}
    return compare_output(np.asarray(ref), np.asarray(cand_out[name]), out_tol, min_agreement)


def skipped_parity(backend: str, reason: str) -> dict:
    """The entry of a backend that could not be compared here (e.g. not installed): not a failure."""
    return {"backend": backend, "skipped": True, "reason": reason}


def combine_parity(results: Mapping[str, dict], reference: str = "torch") -> dict:
    """The card's ``parity`` section from per-backend results (:func:`check_parity` or skipped).

    ``ok`` holds when every backend that ran is ok and at least one ran; the top-level
    max_abs_diff / mean_abs_diff / argmax_agreement are the worst case over the backends that ran,
    and ``backends`` keeps each one's numbers (or why it was skipped).
    """
    ran = {b: r for b, r in results.items() if not r.get("skipped")}
    common = next((r for r in ran.values() if "size" in r), {})
    section: dict = {"reference": reference, **{k: common[k] for k in _COMMON if k in common}}
    section["ok"] = bool(ran) and all(r["ok"] for r in ran.values())
    if not ran:
        section["error"] = "no backend could be compared: " + "; ".join(
            f"{b}: {r['reason']}" for b, r in results.items())
    section.update(_worst_case(ran))
    section["backends"] = {b: {k: v for k, v in r.items() if k not in _COMMON and k != "backend"}
                           for b, r in results.items()}
    return section


def describe_failure(parity: dict) -> str:
    """A one-line summary of what failed (per backend for a combined section), for warnings."""
    if "backends" in parity:
        failed = {b: r for b, r in parity["backends"].items() if r.get("ok") is False}
        if not failed:
            return parity.get("error", "")
        return "; ".join(f"{b}: {describe_failure(r)}" for b, r in failed.items())
    if "error" in parity:
        return parity["error"]
    parts = []
    for name, o in parity["outputs"].items():
        if o["ok"]:
            continue
        detail = o.get("error") or f"max |diff| {o['max_abs_diff']:.3g} > tol {o['tol']:.3g}"
        parts.append(f"{name}: {detail}")
    return "; ".join(parts)
