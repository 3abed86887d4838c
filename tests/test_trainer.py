"""Trainer and distillation task: named terms, frozen teacher, NaN stop, amp resolution,
exact resume after a SIGKILL, TensorBoard scalars."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.checkpoint import load_student, save_student
from distill.losses import build_loss
from distill.losses.logit_kd import LogitKD
from distill.models import build_segmentor
from distill.task import DistillTask
from distill.trainer import resolve_amp, resolve_device, state_path, train
from runtime.config import ModelConfig, TrainConfig
from runtime.data import open_dataset
from runtime.data.preprocess import Preprocess
from runtime.data.synth import synthesize
from runtime.errors import BckdError


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("d") / "data"
    synthesize(root, n_train=16, n_val=4, size=(32, 32), seed=1)
    return root


def _models():
    s = build_segmentor("resnet18", "pspnet", num_classes=7, width=0.125)
    t = build_segmentor("resnet18", "pspnet", num_classes=7, width=0.25)
    return s, t


def test_task_returns_named_terms_and_keeps_teacher_frozen():
    s, t = _models()
    task = DistillTask(s, t, {"kd": (build_loss("kd", tau=2.0), 0.5)}).train()
    assert not t.training
    assert all(not p.requires_grad for p in t.parameters())
    assert not any(p is q for p in task.parameters() for q in t.parameters())
    terms = task(torch.randn(2, 3, 32, 32), torch.randint(0, 7, (2, 32, 32)))
    assert set(terms) == {"task", "kd", "total"}
    assert torch.allclose(terms["total"], terms["task"] + terms["kd"])
    terms["total"].backward()
    assert all(p.grad is None for p in t.parameters())
    assert "teacher" not in dict(task.named_children())


def test_losses_without_teacher_rejected():
    s, _ = _models()
    with pytest.raises(ValueError, match="need a teacher"):
        DistillTask(s, None, {"kd": (build_loss("kd"), 1.0)})


def test_amp_and_device_resolution():
    cpu = torch.device("cpu")
    assert resolve_amp("none", cpu) == "none"
    assert resolve_amp("auto", cpu) in ("bf16", "none")
    with pytest.raises(BckdError, match="train.amp"):
        resolve_amp("fp8", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(BckdError, match="no CUDA"):
            resolve_device("cuda")


def _train(root, out, cfg, **kw):
    src, val = open_dataset(root, "train"), open_dataset(root, "val")
    return train(model_cfg=ModelConfig(width=0.125), train_cfg=cfg, train_source=src,
                 val_source=val, preprocess=Preprocess((32, 32)), classes=src.classes,
                 out=out, log=lambda _: None, **kw)


def test_nan_loss_stops_with_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    cfg = TrainConfig(epochs=2, batch_size=8, crop_size=(32, 32), amp="none")
    calls = {"n": 0}
    real = DistillTask.forward

    def poisoned(self, *a, **k):
        calls["n"] += 1
        terms = real(self, *a, **k)
        if calls["n"] > 2:  # epoch 2 (2 iterations per epoch)
            terms["total"] = terms["total"] * float("nan")
        return terms

    monkeypatch.setattr(DistillTask, "forward", poisoned)
    out = tmp_path / "s.pt"
    with pytest.raises(BckdError, match="became nan at iteration 2"):
        _train(tiny_data, out, cfg)
    assert not out.exists()
    state = torch.load(state_path(out), weights_only=False)
    assert state["epoch"] == 1 and state["iteration"] == 2


def test_checkpoint_card_records_training(tiny_data, tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=8, crop_size=(32, 32))
    result = _train(tiny_data, tmp_path / "s.pt", cfg)
    card = result.card
    assert card["kind"] == "checkpoint" and card["method"] == "none"
    assert card["amp"] in ("bf16", "none") and card["device"] == "cpu"
    assert card["arch"]["width"] == 0.125 and card["params"] > 0
    assert 0 <= card["metrics"]["val_miou"] <= 1
    assert 0 <= card["metrics"]["val_boundary_f"] <= 1 and card["metrics"]["val_lhd_gt"] >= 0


RESUME_CFG = dict(epochs=3, batch_size=8, crop_size=(32, 32), amp="none", threads=1, val_every=1)


def resume_run(root: str, teacher: str, out: str, resume: bool = False, **cfg) -> None:
    """The run the resume test repeats: KD from a saved teacher, dropout and BN live."""
    model, _ = load_student(teacher)
    _train(root, out, TrainConfig(**{**RESUME_CFG, **cfg}), teacher=model, method="kd",
           resume=resume)


# Runs resume_run in a fresh process that SIGKILLs itself once the epoch-2 state is on disk:
# nothing after that point (no finally, no flush) can help the resumed run.
KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import distill.trainer as trainer
import test_trainer

real = trainer.save_state
def save_then_die(path, state):
    real(path, state)
    if state["epoch"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
trainer.save_state = save_then_die
test_trainer.resume_run({root!r}, {teacher!r}, {out!r})
"""


def test_killed_run_resumes_to_bit_identical_weights(tiny_data, tmp_path):
    torch.manual_seed(0)
    teacher = build_segmentor("resnet18", "pspnet", num_classes=7, width=0.125)
    save_student(tmp_path / "t.pt", teacher, {"kind": "checkpoint", "classes": []})
    args = dict(root=str(tiny_data), teacher=str(tmp_path / "t.pt"))
    resume_run(**args, out=str(tmp_path / "a.pt"))  # uninterrupted

    code = KILLED_RUN.format(tests=str(Path(__file__).parent), out=str(tmp_path / "b.pt"), **args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "b.pt").exists()
    assert torch.load(state_path(tmp_path / "b.pt"), weights_only=False)["epoch"] == 2
    resume_run(**args, out=str(tmp_path / "b.pt"), resume=True)

    a = torch.load(state_path(tmp_path / "a.pt"), weights_only=False)
    b = torch.load(state_path(tmp_path / "b.pt"), weights_only=False)
    assert (a["epoch"], a["iteration"]) == (b["epoch"], b["iteration"]) == (3, 6)
    assert a["history"] == b["history"]
    assert a["task"].keys() == b["task"].keys()
    for name in a["task"]:
        assert torch.equal(a["task"][name], b["task"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])

    with pytest.raises(BckdError, match="resume with the original train.epochs"):
        resume_run(**args, out=str(tmp_path / "b.pt"), resume=True, epochs=4)


def test_tensorboard_scalars(tiny_data, tmp_path, monkeypatch):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    monkeypatch.setattr(LogitKD, "log_scalars", lambda self: {"tau": self.tau}, raising=False)
    _, teacher = _models()
    cfg = TrainConfig(epochs=2, batch_size=8, crop_size=(32, 32), amp="none", val_every=1)
    _train(tiny_data, tmp_path / "s.pt", cfg, teacher=teacher, method="kd",
           tensorboard=tmp_path / "tb", log_every=1)
    events = ea.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/task", "train/kd", "train/total", "train/lr", "epoch/total", "epoch/kd",
            "val/miou", "val/pixel_acc", "loss/kd/tau"} <= tags
    assert [e.step for e in events.Scalars("train/total")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("epoch/total")] == [2, 4]
    assert events.Scalars("loss/kd/tau")[0].value == 1.0


def test_distill_stage_trains_on_a_standard_layout(tmp_path):
    """A Cityscapes-layout dataset (no dataset.json) goes through the distill stage."""
    from test_datasets import make_cityscapes

    from distill.run import distill_stage
    from runtime.config import DataConfig, ModelConfig, TrainConfig

    make_cityscapes(tmp_path / "cs")
    data = DataConfig(format="cityscapes", input_size=(16, 24))
    result = distill_stage(data=data, data_root=tmp_path / "cs", model=ModelConfig(width=0.125),
                           train_cfg=TrainConfig(epochs=1, batch_size=2, crop_size=(16, 24),
                                                 threads=1),
                           out=tmp_path / "s.pt", log=lambda m: None)
    card = result.card
    assert card["num_classes"] == 19 and card["data"]["format"] == "cityscapes"
    assert card["data"]["images"] == {"train": 2, "val": 1} and len(card["data"]["meta_sha256"]) == 64


def test_gradient_probe_records_each_term_and_bckd_parts(tiny_data, tmp_path):
    from runtime.config import ModelConfig as MC

    teacher_cfg = TrainConfig(epochs=1, batch_size=8, crop_size=(32, 32), amp="none")
    src, val = open_dataset(tiny_data, "train"), open_dataset(tiny_data, "val")
    t = train(model_cfg=MC(width=0.25), train_cfg=teacher_cfg, train_source=src,
              val_source=val, preprocess=Preprocess((32, 32)), classes=src.classes,
              out=tmp_path / "t.pt", log=lambda _: None)
    teacher, _ = load_student(t.checkpoint)
    cfg = TrainConfig(epochs=2, batch_size=8, crop_size=(32, 32), amp="none", grad_probe_every=1)
    plain = TrainConfig(epochs=2, batch_size=8, crop_size=(32, 32), amp="none")
    options = {"bckd": {"channels": 16}}
    probed = _train(tiny_data, tmp_path / "p.pt", cfg, teacher=teacher, method="bckd+cwd",
                    kd_options=options)
    first = probed.history[0]
    for key in ("grad/task", "grad/bckd", "grad/cwd", "grad/bckd.boundary", "grad/bckd.context",
                "cos_task/bckd", "cos_task/cwd"):
        assert key in first, sorted(first)
    assert first["grad/task"] > 0 and -1 <= first["cos_task/cwd"] <= 1
    # the probe only reads gradients: training is unchanged
    same = _train(tiny_data, tmp_path / "q.pt", plain, teacher=teacher, method="bckd+cwd",
                  kd_options=options)
    a, b = load_student(probed.checkpoint)[0], load_student(same.checkpoint)[0]
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
