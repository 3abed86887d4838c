"""Trainer and distillation task: named terms, frozen teacher, NaN stop, amp resolution."""
import pytest
import torch

from distill.losses import build_loss
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
