"""Supervised and distillation training: SGD, poly learning rate, CE with ignore, mIoU validation.

One :func:`train` call trains a student (from a teacher when distillation losses are given), keeps
a full-state checkpoint for resume after every epoch, and finishes with the student-only
checkpoint and its card. All writes are atomic; a non-finite loss stops the run with a clear
message and leaves the last good checkpoint in place. Resuming from the full state reproduces
the uninterrupted run (bit for bit on CPU with the same thread count).

Under ``torchrun`` the same call trains with DistributedDataParallel (see
:mod:`distill.distributed`): ``train.batch_size`` stays the global batch, split evenly over the
processes by :class:`~distill.data.ShardedBatchSampler`; the DistillTask (student + trainable loss
adapters) is wrapped in DDP while the frozen teacher stays outside it; BatchNorm is synchronised
on CUDA. Logged loss terms are means over the processes, validation is sharded and its confusion
matrices summed, and only rank 0 writes checkpoints, states, cards, logs and TensorBoard events.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from distill import distributed
from distill.checkpoint import load_state, save_state, save_student
from distill.data import Augment, SegDataset, ShardedBatchSampler
from distill.models import count_parameters
from distill.losses import LossContext, build_losses
from distill.task import DistillTask
from distill.tasks import TaskSpec, get_spec, validate_detector
from runtime.card import new_card, tool_versions
from runtime.config import ModelConfig, TrainConfig, to_dict
from runtime.data.preprocess import Preprocess
from runtime.errors import BckdError
from runtime.files import refuse_existing
from runtime.lazy import require
from runtime.boundary import BoundaryMeter
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


def tensorboard_dir(checkpoint: str | os.PathLike) -> Path:
    """The TensorBoard log folder kept next to a student checkpoint (``<ckpt>.tb``)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".tb")


def set_threads(threads: int, processes: int = 1) -> int:
    """Use ``threads`` intra-op threads (0: the cores divided among ``processes`` on this machine)."""
    n = threads or max(1, (os.cpu_count() or 1) // processes)
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


def process_device(device: torch.device) -> torch.device:
    """Under ``torchrun`` each process owns the GPU ``cuda:LOCAL_RANK``."""
    if device.type != "cuda" or distributed.launched_world_size() <= 1:
        return device
    if device.index is not None:
        raise BckdError(f"train.device is '{device}' but under torchrun each process uses "
                        "cuda:LOCAL_RANK; set train.device to 'cuda' or 'auto'")
    device = torch.device("cuda", distributed.local_rank())
    torch.cuda.set_device(device)
    return device


def local_batch_size(batch_size: int, world_size: int) -> int:
    """Each process's share of the global ``train.batch_size``."""
    if batch_size % world_size:
        raise BckdError(f"train.batch_size {batch_size} is the global batch and must divide evenly "
                        f"over {world_size} processes; use a multiple of {world_size}")
    return batch_size // world_size


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: ModelConfig, num_classes: int, task: str = "semantic") -> torch.nn.Module:
    """A segmentor (or, for the detect / instance tasks, a detector) from its config section."""
    return get_spec(task).build_model(cfg, num_classes)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset: SegDataset, num_classes: int,
                   batch_size: int = 16, shard: tuple[int, int] = (0, 1),
                   boundary: BoundaryMeter | None = None) -> ConfusionMatrix:
    """Confusion matrix of ``model`` (in fp32) over an evaluation-view dataset.

    ``shard=(rank, world_size)`` scores only the images ``rank, rank + world_size, ...``; the
    shards' matrices add up to the whole split's. A ``boundary`` meter, when given, also scores
    each image's boundaries against the ground truth.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rank, world = shard
    data = dataset if world == 1 else Subset(dataset, range(rank, len(dataset), world))
    cm = ConfusionMatrix(num_classes, dataset.preprocess.ignore_index)
    for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
        pred, target = model(x.to(device)).argmax(1).cpu().numpy(), y.numpy()
        cm.update(pred, target)
        for p, t in zip(pred, target) if boundary is not None else ():
            boundary.update(p, t)
    model.train(was_training)
    return cm


class ScalarLog:
    """TensorBoard scalars, written by rank 0 only; a no-op without a log folder.

    The writer opens at the first write with ``purge_step`` at that step, so events that a killed
    run wrote past the state it is resumed from are hidden rather than drawn twice.
    """

    def __init__(self, log_dir: str | os.PathLike | None) -> None:
        self.log_dir = log_dir if distributed.is_main() else None
        self._writer = None
        if self.log_dir is not None:  # fail before training, not at the first write
            require("tensorboard", "TensorBoard logging (train.tensorboard)")

    @property
    def enabled(self) -> bool:
        return self.log_dir is not None

    def add(self, prefix: str, values: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=step)
        for key, value in values.items():
            if value is not None:
                self._writer.add_scalar(f"{prefix}/{key}", float(value), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    """Runs the optimisation loop of one :class:`DistillTask`, in one process or under DDP.

    ``tensorboard`` is a log folder (None: no TensorBoard); loss terms and the learning rate are
    written every ``log_every`` iterations, epoch means and validation scores once per epoch,
    all against the global iteration.
    """

    def __init__(self, task: DistillTask, train_set: SegDataset, val_set: Any,
                 cfg: TrainConfig, classes: list[str],
                 log: Callable[[str], None] = print, *,
                 tensorboard: str | os.PathLike | None = None, log_every: int = 10,
                 val_card: dict | None = None) -> None:
        self.task, self.train_set, self.val_set = task, train_set, val_set
        # detect / instance: the validation split is the runtime dataset, scored through the
        # runtime task with this card (task, classes, host NMS)
        self.val_card = val_card
        self.cfg, self.classes, self.log = cfg, list(classes), log
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        local_batch_size(cfg.batch_size, self.world_size)
        self.iters_per_epoch = len(train_set) // cfg.batch_size
        if self.iters_per_epoch == 0:
            raise BckdError(f"the training split has {len(train_set)} images, fewer than one batch "
                            f"of {cfg.batch_size}; lower train.batch_size or add images")
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.max_iters = cfg.max_iters or cfg.epochs * self.iters_per_epoch
        self.device = next(task.student.parameters()).device
        self.model = self._wrap(task)
        params = [p for p in task.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        power, total = cfg.poly_power, self.max_iters
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: max(1.0 - it / total, 0.0) ** power)
        self.sampler = ShardedBatchSampler(len(train_set), cfg.batch_size, seed=cfg.seed,
                                           rank=self.rank, world_size=self.world_size)
        self.epoch, self.iteration = 0, 0
        self.history: list[dict[str, float]] = []
        self.probes: list[dict[str, float]] = []  # train.grad_probe_every diagnostics
        self.amp = resolve_amp(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.scalars, self.log_every = ScalarLog(tensorboard), log_every

    def _wrap(self, task: DistillTask) -> nn.Module:
        """DDP around the task (student + loss adapters); the teacher is not a submodule."""
        if self.world_size == 1:
            return task
        if self.device.type == "cuda":
            # torch's SyncBatchNorm refuses CPU input (and has no CPU kernels), so on CPU each
            # process normalises with the statistics of its own share of the batch.
            nn.SyncBatchNorm.convert_sync_batchnorm(task)
        # Loss adapters may sit idle for a whole run (a branch with weight 0), which plain DDP
        # rejects; a static graph learns the idle set at the first step instead of searching
        # the graph every step (find_unused_parameters). The student alone is always all used.
        adapters = any(p.requires_grad for p in task.losses.parameters())
        return DistributedDataParallel(
            task, device_ids=[self.device] if self.device.type == "cuda" else None,
            static_graph=adapters)

    def state_dict(self) -> dict[str, Any]:
        """The full training state; collective under DDP (every process must call it)."""
        return {"task": self.task.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "iteration": self.iteration, "history": self.history,
                "max_iters": self.max_iters, "batch_size": self.cfg.batch_size,
                # one entry per rank: each process has its own dropout stream
                "rng": distributed.all_gather_object(_rng_state(self.device))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_schedule(state)
        self.task.load_state_dict(state["task"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.iteration = state["epoch"], state["iteration"]
        self.history = state["history"]
        rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rng) == self.world_size:
            _set_rng_state(rng[self.rank], self.device)
            return
        _set_rng_state(rng[0], self.device)
        torch.manual_seed(self.cfg.seed + 1000 * self.rank + self.iteration)
        self.log(f"note: the state was saved by {len(rng)} processes and resumes on "
                 f"{self.world_size}; random streams (dropout) restart, so the run is not "
                 "bit-identical to an uninterrupted one")

    def _check_schedule(self, state: dict[str, Any]) -> None:
        saved = (state.get("max_iters", self.max_iters), state.get("batch_size", self.cfg.batch_size))
        if saved != (self.max_iters, self.cfg.batch_size):
            raise BckdError(
                f"the training state is for {saved[0]} iterations at batch {saved[1]} but the "
                f"config asks for {self.max_iters} at batch {self.cfg.batch_size}; resume with the "
                "original train.epochs / max_iters / batch_size (the learning-rate schedule "
                "depends on them)")

    def _loader(self) -> DataLoader:
        self.train_set.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch)
        # The generator only seeds loader workers; passing one keeps the loader from drawing on
        # the global stream that dropout uses.
        return DataLoader(self.train_set, batch_sampler=self.sampler, generator=torch.Generator(),
                          pin_memory=self.device.type == "cuda", collate_fn=self.task.spec.collate)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        x, y = x.to(self.device, non_blocking=True), self.task.spec.to_device(y, self.device)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Forward passes run under autocast; every loss casts its inputs to fp32 itself.
        with torch.autocast(self.device.type, dtype=AMP_DTYPES.get(self.amp),
                            enabled=self.amp != "none"):
            terms = self.model(x, y, progress=self.iteration / self.max_iters,
                               epoch=self.epoch, epochs=self.epochs)
        values = self._mean_terms(terms)
        if not math.isfinite(values["total"]):  # the mean is non-finite on every rank alike
            raise BckdError(self._non_finite_message(values))
        every = self.cfg.grad_probe_every
        if every and self.iteration % every == 0:
            self._probe_gradients(terms)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["total"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.iteration += 1
        if self.scalars.enabled and self.iteration % self.log_every == 0:
            self._log_iteration(values)
        return values

    def _probe_gradients(self, terms: dict[str, torch.Tensor]) -> None:
        """Gradient norm on the student's weights of each applied loss term (and each part a
        loss reports in ``last_parts``), with its cosine to the task term's gradient."""
        params = [p for p in self.task.student.parameters() if p.requires_grad]
        parts = {k: v for k, v in terms.items() if k != "total"}
        for name, loss in self.task.losses.items():
            for part, value in (getattr(loss, "last_parts", None) or {}).items():
                parts[f"{name}.{part}"] = self.task.weights[name] * value
        flat: dict[str, torch.Tensor] = {}
        for name, value in parts.items():
            if not value.requires_grad:
                continue
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            flat[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float()
                                    for g, p in zip(grads, params)])
        task = flat.get("task")
        probe = {f"grad/{k}": float(v.norm()) for k, v in flat.items()}
        if task is not None:
            for k, v in flat.items():
                if k != "task":
                    probe[f"cos_task/{k}"] = float(torch.nn.functional.cosine_similarity(
                        v, task, dim=0, eps=1e-12))
        self.probes.append(probe)

    def _mean_terms(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """Loss terms as floats averaged over the processes (one all-reduce for all of them)."""
        stacked = torch.stack([v.detach().float() for v in terms.values()])
        return dict(zip(terms, distributed.all_reduce_mean(stacked).tolist()))

    def _non_finite_message(self, values: dict[str, float]) -> str:
        where = f" (mean over {self.world_size} processes)" if self.world_size > 1 else ""
        return (f"the training loss became {values['total']} at iteration {self.iteration}{where} "
                "(terms: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                + "); the last good checkpoint is kept; lower the learning rate or the "
                  "distillation weights")

    def _log_iteration(self, values: dict[str, float]) -> None:
        self.scalars.add("train", {**values, "lr": self.lr}, self.iteration)
        for name, loss in self.task.losses.items():
            log_scalars = getattr(loss, "log_scalars", None)
            if callable(log_scalars):
                self.scalars.add(f"loss/{name}", log_scalars(), self.iteration)

    def run_epoch(self) -> dict[str, float]:
        """One pass over the training split; returns mean loss terms (averaged over processes)."""
        self.model.train()
        sums: dict[str, float] = {}
        n = 0
        for x, y in self._loader():
            if self.iteration >= self.max_iters:
                break
            for k, v in self._step(x, y).items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        self.epoch += 1
        means = {k: v / max(n, 1) for k, v in sums.items()}
        if self.probes:  # the epoch's gradient probes, averaged
            keys = sorted({k for p in self.probes for k in p})
            means.update({k: sum(p[k] for p in self.probes if k in p)
                          / sum(1 for p in self.probes if k in p) for k in keys})
            self.probes = []
        self.scalars.add("epoch", means, self.iteration)
        return means

    def validate(self) -> dict[str, Any]:
        """mIoU, pixel accuracy and per-class IoU of the student on the validation split.

        Each process scores its shard of the split; the confusion matrices are summed, so every
        process returns the scores of the whole split. Detectors are scored with COCO AP by the
        runtime task (every process scores the whole split).
        """
        if self.val_card is not None:
            summary = validate_detector(self.task.student, self.val_set.source,
                                        self.val_set.preprocess, self.val_card)
            self.scalars.add("val", {k: v for k, v in summary.items()
                                     if k.startswith("box_ap") and v is not None}, self.iteration)
            return summary
        meter = BoundaryMeter(len(self.classes), self.val_set.preprocess.ignore_index)
        cm = evaluate_model(self.task.student, self.val_set, len(self.classes),
                            shard=(self.rank, self.world_size), boundary=meter)
        if self.world_size > 1:
            counts = torch.from_numpy(cm.matrix).to(self.device)
            cm.matrix = distributed.all_reduce_sum(counts).cpu().numpy()
            shards = distributed.all_gather_object(meter)  # collective: every rank merges all
            meter = shards[0]
            for other in shards[1:]:
                meter.merge(other)
        summary = cm.summary(self.classes)
        edges = meter.summary()
        summary.update(boundary_f=edges["boundary_f"], lhd=edges["lhd"])
        self.scalars.add("val", {"miou": summary["miou"], "pixel_acc": summary["pixel_acc"],
                                 "boundary_f": summary["boundary_f"], "lhd": summary["lhd"]},
                         self.iteration)
        return summary

    def close(self) -> None:
        self.scalars.close()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def epochs(self) -> int:
        return math.ceil(self.max_iters / self.iters_per_epoch)


def _quiet(_: str) -> None:
    pass


def build_task(model_cfg: ModelConfig, train_cfg: TrainConfig, classes: list[str],
               ignore_index: int, device: torch.device, teacher: torch.nn.Module | None = None,
               method: str = "none", kd_options: dict | None = None,
               task: str = "semantic") -> DistillTask:
    """Student (freshly initialised), frozen teacher and losses on ``device``."""
    student = build_model(model_cfg, len(classes), task).to(device)
    if train_cfg.channels_last:
        student = student.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher = teacher.to(device)
        if train_cfg.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
    losses = {}
    if teacher is not None and method != "none":
        ctx = LossContext.from_models(student, teacher, ignore_index)
        losses = build_losses(method, kd_options, ctx, task=task)
        for loss, _ in losses.values():
            loss.to(device)
    return DistillTask(student, teacher, losses, ignore_index, spec=task)


def fit(trainer: Trainer, state_file: Path, val_every: int,
        log: Callable[[str], None]) -> dict[str, Any] | None:
    """Train to ``max_iters``, saving the full state after every epoch (rank 0 writes it).

    Returns the latest validation if it scored the final weights, else None.
    """
    val = None
    while trainer.iteration < trainer.max_iters:
        terms = trainer.run_epoch()
        record = {"epoch": trainer.epoch, **terms, "lr": trainer.lr}
        val = None
        if val_every and trainer.epoch % val_every == 0:
            val = trainer.validate()
            record.update({k: v for k, v in trainer.task.spec.card_metrics(val).items()
                           if k in ("val_miou", "val_boundary_f", "val_box_ap", "val_mask_ap")})
            if "lhd" in val:
                record["val_lhd"] = val["lhd"]
        trainer.history.append(record)
        log("  epoch %d/%d  " % (trainer.epoch, trainer.epochs)
            + "  ".join(f"{k}={v:.4f}" for k, v in record.items()
                        if k != "epoch" and v is not None and "/" not in k))
        state = trainer.state_dict()  # collective: every process takes part
        if distributed.is_main():
            save_state(state_file, state)
        distributed.barrier()
    return val


def train(*, model_cfg: ModelConfig, train_cfg: TrainConfig, train_source, val_source,
          preprocess: Preprocess, classes: list[str], out: str | os.PathLike,
          teacher: torch.nn.Module | None = None, teacher_card: dict | None = None,
          method: str = "none", kd_options: dict | None = None, data_info: dict | None = None,
          resume: bool = False, force: bool = False, log: Callable[[str], None] = print,
          tensorboard: str | os.PathLike | None = None, log_every: int = 10,
          task: str = "semantic", postprocess: dict | None = None) -> TrainResult:
    """Train a student and write ``out`` (student-only), its card and ``out.state.pt``.

    ``task`` is 'semantic', 'detect' or 'instance' (:mod:`distill.tasks`); ``postprocess`` is
    the card's NMS settings for detectors (``runtime.tasks.nms.NMSSettings``), used to validate.

    Launched by ``torchrun`` with several processes, it joins their process group (and leaves it
    at the end); every process returns the same result. ``tensorboard`` is a log folder for
    TensorBoard scalars (None: none written), ``log_every`` their interval in iterations.
    """
    out = Path(out)
    state_file = state_path(out)
    resuming = resume and state_file.is_file()
    if not resuming:
        refuse_existing(out, "checkpoint", force)
        if state_file.is_file() and not force:
            raise BckdError(f"{state_file} holds the state of an interrupted run; pass --resume to "
                            "continue it or --force to start over")
    device = process_device(resolve_device(train_cfg.device))
    with distributed.process_group(device):
        log = log if distributed.is_main() else _quiet
        threads = set_threads(train_cfg.threads, distributed.local_world_size())
        seed_everything(train_cfg.seed)  # the same initial weights in every process
        spec = get_spec(task)
        distill_task = build_task(model_cfg, train_cfg, classes, preprocess.ignore_index, device,
                                  teacher, method, kd_options, task=spec.name)
        if distributed.world_size() > 1:
            torch.manual_seed(train_cfg.seed + 1000 * distributed.rank())  # own dropout masks
        aug = Augment(train_cfg.crop_size, train_cfg.scale_range, train_cfg.hflip,
                      train_cfg.brightness)
        val_card = None if spec.name == "semantic" else {
            "task": spec.name, "classes": list(classes), "postprocess": postprocess or {}}
        trainer = Trainer(distill_task,
                          spec.dataset(train_source, preprocess, aug, seed=train_cfg.seed),
                          spec.dataset(val_source, preprocess, None), train_cfg, classes, log,
                          tensorboard=tensorboard, log_every=log_every, val_card=val_card)
        with contextlib.closing(trainer):
            if resuming:
                trainer.load_state_dict(load_state(state_file))
                log(f"resumed from {state_file} at epoch {trainer.epoch}")
            start = time.perf_counter()
            val = fit(trainer, state_file, train_cfg.val_every, log)
            seconds = time.perf_counter() - start
            val = val or trainer.validate()
        student = distill_task.student
        extra = {"postprocess": val_card["postprocess"]} if val_card else {}
        card = new_card(
            "checkpoint", task=spec.name, arch=student.arch, classes=list(classes),
            num_classes=len(classes), preprocess=preprocess.to_dict(), method=method,
            teacher=({"arch": teacher_card.get("arch"), "sha256": teacher_card.get("sha256")}
                     if teacher_card else None),
            data=data_info or {}, train=to_dict(train_cfg), params=count_parameters(student),
            metrics=spec.card_metrics(val), **extra,
            train_seconds=round(seconds, 2), threads=threads, processes=trainer.world_size,
            history=trainer.history, device=str(device), amp=trainer.amp,
            tools=tool_versions("torch", "numpy"))
        if distributed.is_main():
            card = save_student(out, student.cpu().to(memory_format=torch.contiguous_format), card)
        card = distributed.broadcast_object(card)  # with the checkpoint's sha256
    return TrainResult(out, card, val, seconds, trainer.history)
