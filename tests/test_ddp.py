"""DDP under torchrun on CPU (gloo): 2 processes at global batch 4 train like 1 process at batch 4.

The sampler's union property is tested as pure logic. The process tests launch the real entry
point, ``python -m torch.distributed.run --standalone --nproc_per_node=2 -m runtime.cli distill``
(through this file, which as a script applies the patches below and calls ``runtime.cli.main``).

Three things differ between 2 processes x 2 images and 1 process x 4 images by construction,
and the equivalence run removes each one (in both runs alike), so what is compared is the DDP
machinery itself — sharding, gradient averaging, loss averaging, schedule, rank-0 writes:

* BatchNorm statistics: SyncBatchNorm would make them global, but torch refuses it on CPU (no
  CPU kernels), so here BatchNorm normalises with its running statistics;
* dropout masks: each process draws its own;
* cross-entropy normalisation: each process averages over its own non-ignored pixels, so the
  fixture's masks carry no ignore label.

What is left is float summation order: the tolerances below (1e-5 relative on the losses, 1e-6
absolute on the weights, observed ~1e-7) allow for it and nothing more.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from distill.checkpoint import save_student
from distill.data import ShardedBatchSampler
from distill.models import build_segmentor
from distill.task import DistillTask
from distill.trainer import local_batch_size, state_path
from runtime.cli import main
from runtime.data import open_dataset
from runtime.data.synth import synthesize
from runtime.errors import BckdError

REPO = Path(__file__).resolve().parents[1]
CONFIG = """\
model: {width: 0.125}
data: {input_size: [32, 32]}
train: {batch_size: 4, max_iters: 3, amp: none, threads: 1, device: cpu, crop_size: [32, 32],
        scale_range: [1.0, 1.5], val_every: 1}
"""


@pytest.mark.parametrize("n, batch, world", [(8, 4, 2), (11, 4, 2), (12, 6, 3), (9, 4, 4)])
def test_ranks_batches_union_is_the_single_process_batch(n, batch, world):
    single = ShardedBatchSampler(n, batch, seed=3)
    shards = [ShardedBatchSampler(n, batch, seed=3, rank=r, world_size=world) for r in range(world)]
    for epoch in range(3):
        for s in (single, *shards):
            s.set_epoch(epoch)
        steps = list(zip(single, *shards, strict=True))
        assert len(steps) == n // batch
        for full, *parts in steps:
            assert len(full) == batch and all(len(p) == batch // world for p in parts)
            assert sorted(sum(parts, [])) == sorted(full)
            assert [full[r::world] for r in range(world)] == parts


def test_epochs_reshuffle_and_batch_must_divide():
    s = ShardedBatchSampler(16, 4, seed=0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    with pytest.raises(ValueError, match="not divisible"):
        ShardedBatchSampler(16, 6, world_size=4)
    with pytest.raises(BckdError, match="train.batch_size 6 .* multiple of 4"):
        local_batch_size(6, 4)
    assert local_batch_size(8, 4) == 2


def _batch_independent(setattr_=setattr) -> None:
    """Dropout off and BatchNorm on running statistics (see the module docstring)."""
    def bn_running_stats(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)

    setattr_(torch.nn.Dropout2d, "forward", lambda self, x: x)
    setattr_(torch.nn.BatchNorm2d, "forward", bn_running_stats)


def _poison_rank(rank: int) -> None:
    """Make the loss NaN on ``rank`` from its 3rd step (epoch 2) on."""
    real, calls = DistillTask.forward, [0]

    def poisoned(self, *a, **k):
        terms = real(self, *a, **k)
        calls[0] += 1
        if int(os.environ["RANK"]) == rank and calls[0] > 2:
            terms["total"] = terms["total"] * float("nan")
        return terms

    DistillTask.forward = poisoned


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    root = synthesize(base / "data", n_train=8, n_val=4, size=(32, 32), seed=0)
    for mask in (root / "masks").glob("*.png"):  # no ignore label: see the module docstring
        m = np.array(Image.open(mask))
        Image.fromarray(np.where(m == 255, 0, m).astype(m.dtype)).save(mask)
    classes = open_dataset(root, "train").classes
    torch.manual_seed(0)
    teacher = build_segmentor("resnet18", "pspnet", num_classes=len(classes), width=0.125)
    save_student(base / "teacher.pt", teacher, {"kind": "checkpoint", "classes": list(classes)})
    (base / "cfg.yaml").write_text(CONFIG)
    return base


def _args(base: Path, out: Path) -> list[str]:
    return ["distill", "--data", str(base / "data"), "--teacher", str(base / "teacher.pt"),
            "--config", str(base / "cfg.yaml"), "--method", "kd", "--out", str(out)]


def _torchrun(base: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           __file__, *_args(base, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_train_like_one(setup, tmp_path, monkeypatch):
    ddp = _torchrun(setup, tmp_path / "ddp.pt")
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ddp.pt", "ddp.pt.card.json", "ddp.pt.state.pt"]  # rank 0 alone wrote, no temp files

    _batch_independent(monkeypatch.setattr)
    assert main(_args(setup, tmp_path / "one.pt")) == 0
    one = torch.load(state_path(tmp_path / "one.pt"), weights_only=False)
    two = torch.load(state_path(tmp_path / "ddp.pt"), weights_only=False)

    assert two["iteration"] == one["iteration"] == 3
    assert len(two["rng"]) == 2 and len(one["rng"]) == 1
    for h1, h2 in zip(one["history"], two["history"], strict=True):  # epoch 2 = step 3 alone
        assert h1.keys() == h2.keys()
        for key in h1:
            assert h2[key] == pytest.approx(h1[key], rel=1e-5, abs=1e-7), key
    for name, w1 in one["task"].items():
        torch.testing.assert_close(two["task"][name], w1, rtol=1e-5, atol=1e-6, msg=name)
    moments = [(a["momentum_buffer"], b["momentum_buffer"])
               for a, b in zip(one["optimizer"]["state"].values(),
                               two["optimizer"]["state"].values(), strict=True)]
    for m1, m2 in moments:
        torch.testing.assert_close(m2, m1, rtol=1e-4, atol=1e-6)


def test_nan_on_one_rank_stops_every_rank(setup, tmp_path):
    run = _torchrun(setup, tmp_path / "s.pt", BCKD_TEST_NAN_RANK="1")
    assert run.returncode != 0
    assert "rank 0 exit 1" in run.stdout and "rank 1 exit 1" in run.stdout, run.stdout
    assert "became nan at iteration 2 (mean over 2 processes)" in run.stderr
    assert not (tmp_path / "s.pt").exists()
    state = torch.load(state_path(tmp_path / "s.pt"), weights_only=False)
    assert state["epoch"] == 1 and state["iteration"] == 2


if __name__ == "__main__":  # one torchrun worker
    _batch_independent()
    if "BCKD_TEST_NAN_RANK" in os.environ:
        _poison_rank(int(os.environ["BCKD_TEST_NAN_RANK"]))
    code = main(sys.argv[1:])
    print(f"rank {os.environ.get('RANK')} exit {code}", flush=True)
    sys.exit(code)
