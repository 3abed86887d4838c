"""Supervised and distillation training: SGD, poly learning rate, CE with ignore, mIoU validation.

One :func:`train` call trains a student (from a teacher when distillation losses are given), keeps
a full-state checkpoint for resume after every epoch, and finishes with the student-only
checkpoint and its card. All writes are atomic; a non-finite loss stops the run with a clear
message and leaves the last good checkpoint in place.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from distill.checkpoint import load_state, save_state, save_student
from distill.data import Augment, SegDataset
from distill.models import build_segmentor, count_parameters
from distill.losses import LossContext, build_losses
from distill.task import DistillTask
from runtime.card import new_card, tool_versions
from runtime.config import ModelConfig, TrainConfig, to_dict
from runtime.data.preprocess import Preprocess
from runtime.errors import BckdError
from runtime.files import refuse_existing
from runtime.metrics import ConfusionMatrix


@dataclass
class TrainResult:
    """What a training run produced."""

    checkpoint: Path
    card: dict[str, Any]
    val: dict[str, Any]
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def state_path(checkpoint: str | os.PathLike) -> Path:
    """The full-state (resume) file kept next to a student checkpoint."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".state.pt")


def set_threads(threads: int) -> int:
    """Use ``threads`` intra-op threads (0: all cores); returns the effective count."""
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; an unavailable device is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BckdError(f"train.device is '{name}' but no CUDA device is available; use 'cpu'")
    return device


def resolve_amp(name: str, device: torch.device) -> str:
    """'auto' -> bf16 where the device computes it natively (CUDA, or a CPU with AVX512-BF16/AMX)."""
    if name not in ("auto", "none", *AMP_DTYPES):
        raise BckdError(f"train.amp must be auto, bf16, fp16 or none, got '{name}'")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else "none"


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    """A segmentor from its config section."""
    return build_segmentor(backbone=cfg.backbone, head=cfg.head, num_classes=num_classes,
                           width=cfg.width, output_stride=cfg.output_stride,
                           head_channels=cfg.head_channels or None,
                           pretrained_backbone=cfg.pretrained_backbone or None)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset: SegDataset, num_classes: int,
                   batch_size: int = 16) -> ConfusionMatrix:
    """Confusion matrix of ``model`` (in fp32) over an evaluation-view dataset."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    cm = ConfusionMatrix(num_classes, dataset.preprocess.ignore_index)
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        cm.update(model(x.to(device)).argmax(1).cpu().numpy(), y.numpy())
    model.train(was_training)
    return cm


class Trainer:
    """Runs the optimisation loop of one :class:`DistillTask`."""

    def __init__(self, task: DistillTask, train_set: SegDataset, val_set: SegDataset,
                 cfg: TrainConfig, classes: list[str],
                 log: Callable[[str], None] = print) -> None:
        self.task, self.train_set, self.val_set = task, train_set, val_set
        self.cfg, self.classes, self.log = cfg, list(classes), log
        self.iters_per_epoch = len(train_set) // cfg.batch_size
        if self.iters_per_epoch == 0:
            raise BckdError(f"the training split has {len(train_set)} images, fewer than one batch "
                            f"of {cfg.batch_size}; lower train.batch_size or add images")
        self.max_iters = cfg.max_iters or cfg.epochs * self.iters_per_epoch
        params = [p for p in task.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        power, total = cfg.poly_power, self.max_iters
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: max(1.0 - it / total, 0.0) ** power)
        self.epoch, self.iteration = 0, 0
        self.history: list[dict[str, float]] = []
        self.device = next(task.student.parameters()).device
        self.amp = resolve_amp(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch,
                "iteration": self.iteration, "history": self.history,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                        "python": random.getstate()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.task.load_state_dict(state["task"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.iteration = state["epoch"], state["iteration"]
        self.history = state["history"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])

    def _loader(self) -> DataLoader:
        self.train_set.set_epoch(self.epoch)
        gen = torch.Generator().manual_seed(self.cfg.seed * 100003 + self.epoch)
        return DataLoader(self.train_set, batch_size=self.cfg.batch_size, shuffle=True,
                          drop_last=True, generator=gen)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Forward passes run under autocast; every loss casts its inputs to fp32 itself.
        with torch.autocast(self.device.type, dtype=AMP_DTYPES.get(self.amp),
                            enabled=self.amp != "none"):
            terms = self.task(x, y, progress=self.iteration / self.max_iters,
                              epoch=self.epoch, epochs=self.epochs)
        total = terms["total"]
        if not torch.isfinite(total):
            raise BckdError(f"the training loss became {total.item()} at iteration "
                            f"{self.iteration} (terms: "
                            + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
                            + "); the last good checkpoint is kept; lower the learning rate "
                              "or the distillation weights")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.iteration += 1
        return {k: v.item() for k, v in terms.items()}

    def run_epoch(self) -> dict[str, float]:
        """One pass over the training split; returns mean loss terms."""
        self.task.train()
        sums: dict[str, float] = {}
        n = 0
        for x, y in self._loader():
            if self.iteration >= self.max_iters:
                break
            for k, v in self._step(x, y).items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        self.epoch += 1
        return {k: v / max(n, 1) for k, v in sums.items()}

    def validate(self) -> dict[str, Any]:
        """mIoU, pixel accuracy and per-class IoU of the student on the validation split."""
        cm = evaluate_model(self.task.student, self.val_set, len(self.classes))
        return cm.summary(self.classes)

    @property
    def epochs(self) -> int:
        return math.ceil(self.max_iters / self.iters_per_epoch)


def train(*, model_cfg: ModelConfig, train_cfg: TrainConfig, train_source, val_source,
          preprocess: Preprocess, classes: list[str], out: str | os.PathLike,
          teacher: torch.nn.Module | None = None, teacher_card: dict | None = None,
          method: str = "none", kd_options: dict | None = None, data_info: dict | None = None, resume: bool = False,
          force: bool = False, log: Callable[[str], None] = print) -> TrainResult:
    """Train a student and write ``out`` (student-only), its card and ``out.state.pt``."""
    out = Path(out)
    resume_from = state_path(out)
    if not (resume and resume_from.is_file()):
        refuse_existing(out, "checkpoint", force)
    threads = set_threads(train_cfg.threads)
    seed_everything(train_cfg.seed)
    device = resolve_device(train_cfg.device)
    student = build_model(model_cfg, len(classes)).to(device)
    if train_cfg.channels_last:
        student = student.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher = teacher.to(device)
        if train_cfg.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
    losses = {}
    if teacher is not None and method != "none":
        ctx = LossContext.from_models(student, teacher, preprocess.ignore_index)
        losses = build_losses(method, kd_options, ctx)
        for loss, _ in losses.values():
            loss.to(device)
    task = DistillTask(student, teacher, losses, preprocess.ignore_index)
    aug = Augment(train_cfg.crop_size, train_cfg.scale_range, train_cfg.hflip, train_cfg.brightness)
    train_set = SegDataset(train_source, preprocess, aug, seed=train_cfg.seed)
    val_set = SegDataset(val_source, preprocess, None)
    trainer = Trainer(task, train_set, val_set, train_cfg, classes, log)
    if resume and resume_from.is_file():
        trainer.load_state_dict(load_state(resume_from))
        log(f"resumed from {resume_from} at epoch {trainer.epoch}")
    start = time.perf_counter()
    val = None  # the latest validation, reused at the end if it scored the final weights
    while trainer.iteration < trainer.max_iters:
        terms = trainer.run_epoch()
        record = {"epoch": trainer.epoch, **terms, "lr": trainer.scheduler.get_last_lr()[0]}
        val = None
        if train_cfg.val_every and trainer.epoch % train_cfg.val_every == 0:
            val = trainer.validate()
            record["val_miou"] = val["miou"]
        trainer.history.append(record)
        log("  epoch %d/%d  " % (trainer.epoch, trainer.epochs)
            + "  ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"))
        save_state(resume_from, trainer.state_dict())
    seconds = time.perf_counter() - start
    val = val or trainer.validate()
    card = new_card(
        "checkpoint", task="semseg", arch=student.arch, classes=list(classes),
        num_classes=len(classes), preprocess=preprocess.to_dict(), method=method,
        teacher=({"arch": teacher_card.get("arch"), "sha256": teacher_card.get("sha256")}
                 if teacher_card else None),
        data=data_info or {}, train=to_dict(train_cfg), params=count_parameters(student),
        metrics={"val_miou": val["miou"], "val_pixel_acc": val["pixel_acc"],
                 "per_class_iou": val["per_class_iou"]},
        train_seconds=round(seconds, 2), threads=threads, history=trainer.history,
        device=str(device), amp=trainer.amp,
        tools=tool_versions("torch", "numpy"))
    card = save_student(out, student.cpu().to(memory_format=torch.contiguous_format), card)
    return TrainResult(out, card, val, seconds, trainer.history)
