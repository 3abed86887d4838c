"""Golden values for every registered distillation loss on seeded inputs.

Each loss (and each listed variant) is built after ``torch.manual_seed(0)`` on one thread and run
once in training mode on the same seeded student/teacher tensors; the value must match the one
pinned in ``tests/golden/losses.json``. Segmentation losses (``LOSSES``) run on
``distill_inputs()``; detection losses (``DETECT_LOSSES``) on ``det_distill_inputs()``, keyed
``detect/<name>[...]``. A loss without a pinned value fails. After an intended
change, rewrite the file explicitly with ``pytest tests/test_loss_golden.py --regen-golden`` and
review the diff.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.losses import DETECT_LOSSES, LOSSES, build_loss
from loss_inputs import CTX, DET_CTX, det_distill_inputs, distill_inputs

GOLDEN = Path(__file__).parent / "golden" / "losses.json"
# Options worth pinning beyond each loss's defaults (names not registered are skipped).
VARIANTS = {
    "bckd": [{"context": "mse"}, {"teacher_adapters": "free"}, {"teacher_adapters": "trained"},
             {"feature_stride": 4}, {"teacher_boundary": "hard"}, {"pairs": "pad"},
             {"context_chunk": 16}, {"teacher_boundary": "soft"}, {"teacher_boundary": "fitted"}],
    "kd": [{"tau": 4.0}],
    "cwd": [{"on": "decoder"}],
    "cirkd": [{"variant": "memory"}, {"variant": "both"}],
    "skd": [{"mode": "window"}],
}
DETECT_VARIANTS = {
    "kd": [{"beta": 0.0}, {"normalize": "priors"}, {"tau": 2.0}],
    "cwd": [{"tau": 1.0}],
    "ld": [{"score_threshold": 0.0}, {"tau": 1.0}],
    "bckd": [{"context": "mse"}, {"feature_stride": 4}, {"teacher_adapters": "free"}],
}
# task -> (registry, variants, context, inputs); semantic keys carry no prefix (the older keys).
TASKS = {"semantic": (LOSSES, VARIANTS, CTX, distill_inputs),
         "detect": (DETECT_LOSSES, DETECT_VARIANTS, DET_CTX, det_distill_inputs)}


def _cases() -> list[tuple[str, str, dict]]:
    cases = []
    for task, (registry, variants, _, _) in TASKS.items():
        names = registry.names()
        cases += [(task, n, {}) for n in names]
        cases += [(task, n, v) for n in names for v in variants.get(n, [])]
    return cases


def _key(task: str, name: str, options: dict) -> str:
    prefix = "" if task == "semantic" else f"{task}/"
    return prefix + name + "".join(f"[{k}={v}]" for k, v in sorted(options.items()))


def _value(task: str, name: str, options: dict) -> float:
    _, _, ctx, make_inputs = TASKS[task]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        loss = build_loss(name, ctx, task=task, **options).train()
        return float(loss(make_inputs()).detach())
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def golden(request):
    regen = request.config.getoption("--regen-golden")
    pinned = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    fresh: dict[str, float] = {}
    yield regen, pinned, fresh
    if regen:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(dict(sorted(fresh.items())), indent=1) + "\n")


@pytest.mark.parametrize("task, name, options", _cases(), ids=[_key(*c) for c in _cases()])
def test_golden_value(golden, task, name, options):
    regen, pinned, fresh = golden
    key = _key(task, name, options)
    value = _value(task, name, options)
    assert torch.isfinite(torch.tensor(value))
    if regen:
        fresh[key] = value
        return
    assert key in pinned, f"no golden value for '{key}'; run pytest --regen-golden and review"
    assert value == pytest.approx(pinned[key], rel=2e-5, abs=1e-7)
