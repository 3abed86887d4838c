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

from distill.losses import LOSSES, DistillInputs, LossContext, build_loss

GOLDEN = Path(__file__).parent / "golden" / "losses.json"
CTX = LossContext(student_channels=(8, 8, 16, 16), teacher_channels=(8, 16, 16, 32),
                  student_reductions=(4, 8, 8, 8), teacher_reductions=(4, 8, 8, 8),
                  student_decoder_channels=16, teacher_decoder_channels=24, num_classes=5,
                  ignore_index=255)
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


def _inputs() -> DistillInputs:
    g = torch.Generator().manual_seed(1234)
    b, size = 2, 64

    def stages(channels):
        return [torch.randn(b, c, size // r, size // r, generator=g)
                for c, r in zip(channels, CTX.student_reductions)]

    target = torch.randint(0, CTX.num_classes, (b, size, size), generator=g)
    target[:, :4] = CTX.ignore_index
    return DistillInputs(
        student_logits=torch.randn(b, CTX.num_classes, size, size, generator=g),
        teacher_logits=torch.randn(b, CTX.num_classes, size, size, generator=g) * 2,
        student_feats=stages(CTX.student_channels), teacher_feats=stages(CTX.teacher_channels),
        target=target, progress=0.25,
        student_decoder=torch.randn(b, CTX.student_decoder_channels, 8, 8, generator=g),
        teacher_decoder=torch.randn(b, CTX.teacher_decoder_channels, 8, 8, generator=g),
        epoch=1, epochs=4)


def _value(name: str, options: dict) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        loss = build_loss(name, CTX, **options).train()
        return float(loss(_inputs()).detach())
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
