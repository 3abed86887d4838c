"""Golden values for every registered distillation loss on seeded inputs.

Each loss (and each listed variant) is built after ``torch.manual_seed(0)`` on one thread and run
once in training mode on the same seeded student/teacher tensors; the value must match the one
pinned in ``tests/golden/losses.json``. A loss without a pinned value fails. After an intended
change, rewrite the file explicitly with ``pytest tests/test_loss_golden.py --regen-golden`` and
review the diff.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.losses import LOSSES, build_loss
from loss_inputs import CTX, distill_inputs

GOLDEN = Path(__file__).parent / "golden" / "losses.json"
# Options worth pinning beyond each loss's defaults (names not registered are skipped).
VARIANTS = {
    "bckd": [{"context": "mse"}, {"teacher_adapters": "free"}, {"teacher_adapters": "trained"},
             {"feature_stride": 4}, {"teacher_boundary": "hard"}, {"pairs": "pad"},
             {"context_chunk": 16}],
    "kd": [{"tau": 4.0}],
    "cwd": [{"on": "decoder"}],
    "cirkd": [{"variant": "memory"}, {"variant": "both"}],
    "skd": [{"mode": "window"}],
}


def _cases() -> list[tuple[str, dict]]:
    names = LOSSES.names()
    return [(n, {}) for n in names] + [(n, v) for n in names for v in VARIANTS.get(n, [])]


def _key(name: str, options: dict) -> str:
    return name + "".join(f"[{k}={v}]" for k, v in sorted(options.items()))


def _value(name: str, options: dict) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        loss = build_loss(name, CTX, **options).train()
        return float(loss(distill_inputs()).detach())
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


@pytest.mark.parametrize("name, options", _cases(), ids=[_key(*c) for c in _cases()])
def test_golden_value(golden, name, options):
    regen, pinned, fresh = golden
    key = _key(name, options)
    value = _value(name, options)
    assert torch.isfinite(torch.tensor(value))
    if regen:
        fresh[key] = value
        return
    assert key in pinned, f"no golden value for '{key}'; run pytest --regen-golden and review"
    assert value == pytest.approx(pinned[key], rel=2e-5, abs=1e-7)
