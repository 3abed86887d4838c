"""Numerical parity between a reference model and an exported artifact.

Both sides are plain callables from one NCHW float32 array to ``{output name: array}``, so the
same check serves torch vs ONNX Runtime today and torch (or ONNX) vs OpenVINO / TensorRT later.
This module is torch-free; the torch side is wrapped by the caller.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

Outputs = Mapping[str, np.ndarray]
ModelFn = Callable[[np.ndarray], Outputs]

PARITY_SEED = 0


def random_input(
    batch: int, channels: int, size: tuple[int, int], seed: int = PARITY_SEED
) -> np.ndarray:
    """A seeded standard-normal NCHW float32 batch (the range of mean/std-normalised images)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, channels, *size), dtype=np.float32)


def compare_output(reference: np.ndarray, candidate: np.ndarray, tol: float) -> dict:
    """Differences of one output; ``ok`` when shapes agree and max |diff| <= tol (NaN fails)."""
    if reference.shape != candidate.shape:
        return {
            "ok": False, "tol": tol, "error": "shape mismatch",
            "reference_shape": list(reference.shape), "candidate_shape": list(candidate.shape),
        }
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    return {
        "max_abs_diff": max_abs,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "argmax_agreement": argmax_agreement(reference, candidate),
        "tol": tol,
        "ok": bool(max_abs <= tol),  # False for NaN, which compares unequal to everything
    }


def argmax_agreement(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """Fraction of pixels whose class (argmax over axis 1, NCHW logits) agrees; None if no class axis."""
    if reference.ndim < 2:
        return None
    same = reference.argmax(axis=1) == candidate.argmax(axis=1)
    return float(same.mean())


def check_parity(
    reference: ModelFn,
    candidate: ModelFn,
    *,
    size: tuple[int, int],
    batch: int,
    channels: int = 3,
    tol: float | Mapping[str, float] = 1e-4,
    seed: int = PARITY_SEED,
    backend: str = "",
) -> dict:
    """Run both callables on one seeded input and compare every reference output.

    ``tol`` is one tolerance for all outputs or one per output name (outputs differ in scale).
    Returns the card's ``parity`` section: backend, size, batch, seed, tol, ok, the worst case over
    outputs (max_abs_diff, mean_abs_diff, argmax_agreement) and the per-output results.
    """
    x = random_input(batch, channels, size, seed)
    result = {
        "backend": backend, "size": list(size), "batch": batch, "seed": seed,
        "tol": dict(tol) if isinstance(tol, Mapping) else tol,
    }
    ref_out = reference(x)
    try:
        cand_out = candidate(x)
    except Exception as exc:  # an artifact that cannot run at this shape fails parity, with the reason
        text = str(exc).strip()
        reason = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
        return {**result, "ok": False, "error": f"the candidate failed to run: {reason}", "outputs": {}}
    outputs = {name: _compare_named(name, ref, cand_out, tol) for name, ref in ref_out.items()}
    ok = all(o["ok"] for o in outputs.values())
    return {**result, "ok": ok, **_worst_case(outputs), "outputs": outputs}


def _worst_case(outputs: dict) -> dict:
    """Summary over outputs (largest diffs, lowest agreement); empty if any output was not compared."""
    if not outputs or any("max_abs_diff" not in o for o in outputs.values()):
        return {}
    agreements = [o["argmax_agreement"] for o in outputs.values() if o["argmax_agreement"] is not None]
    summary = {
        "max_abs_diff": max(o["max_abs_diff"] for o in outputs.values()),
        "mean_abs_diff": max(o["mean_abs_diff"] for o in outputs.values()),
    }
    if agreements:
        summary["argmax_agreement"] = min(agreements)
    return summary


def _compare_named(
    name: str, ref: np.ndarray, cand_out: Outputs, tol: float | Mapping[str, float]
) -> dict:
    out_tol = tol[name] if isinstance(tol, Mapping) else tol
    if name not in cand_out:
        return {"ok": False, "tol": out_tol, "error": "missing from the candidate"}
    return compare_output(np.asarray(ref), np.asarray(cand_out[name]), out_tol)


def describe_failure(parity: dict) -> str:
    """A one-line summary of the outputs that failed, for warnings."""
    if "error" in parity:
        return parity["error"]
    parts = []
    for name, o in parity["outputs"].items():
        if o["ok"]:
            continue
        detail = o.get("error") or f"max |diff| {o['max_abs_diff']:.3g} > tol {o['tol']:.3g}"
        parts.append(f"{name}: {detail}")
    return "; ".join(parts)
