"""The torch side of a task: its models, training data, task loss, feature taps and validation.

The device side of a task (outputs, postprocess, metric) lives in :mod:`runtime.tasks`; this
registry adds what training needs. The trainer, the distillation task object and the checkpoint
loader ask the spec of the card's task instead of branching on its name, so a new task adds one
entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from runtime.data.preprocess import Preprocess
from runtime.registry import Registry
from runtime.tasks import get_task, task_name

SPECS: Registry["TaskSpec"] = Registry("training task")


class TaskSpec:
    """What training needs to know about one task."""

    name = ""

    def build_model(self, cfg: Any, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def from_arch(self, arch: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def dataset(self, source: Any, preprocess: Preprocess, augment: Any, seed: int = 0) -> Dataset:
        raise NotImplementedError

    def collate(self, batch: list) -> Any:
        return torch.utils.data.default_collate(batch)

    def taps(self, model: nn.Module, x: torch.Tensor, features: bool) -> dict[str, Any]:
        raise NotImplementedError

    def task_loss(self, model: nn.Module, taps: dict[str, Any], target: Any,
                  ignore_index: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def distill_inputs(self, s: dict[str, Any], t: dict[str, Any], target: Any, **kw: Any):
        raise NotImplementedError

    def to_device(self, target: Any, device: torch.device) -> Any:
        return target.to(device, non_blocking=True)

    def card_metrics(self, val: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


def get_spec(name_or_card: str | dict[str, Any] | None) -> TaskSpec:
    name = name_or_card if isinstance(name_or_card, str) else task_name(name_or_card)
    return SPECS.get(get_task(name).name)


# -- semantic ----------------------------------------------------------------------------------
class SemanticSpec(TaskSpec):
    name = "semantic"

    def build_model(self, cfg: Any, num_classes: int) -> nn.Module:
        from distill.models import build_segmentor

        return build_segmentor(backbone=cfg.backbone, head=cfg.head, num_classes=num_classes,
                               width=cfg.width, output_stride=cfg.output_stride,
                               head_channels=cfg.head_channels or None,
                               pretrained_backbone=cfg.pretrained_backbone or None)

    def from_arch(self, arch: dict[str, Any]) -> nn.Module:
        from distill.models import model_from_arch

        return model_from_arch(arch)

    def dataset(self, source: Any, preprocess: Preprocess, augment: Any, seed: int = 0) -> Dataset:
        from distill.data import SegDataset

        return SegDataset(source, preprocess, augment, seed=seed)

    def taps(self, model: nn.Module, x: torch.Tensor, features: bool) -> dict[str, Any]:
        if features:
            return model.forward_taps(x)
        return {"logits": model(x), "stages": [], "decoder": None}

    def task_loss(self, model: nn.Module, taps: dict[str, Any], target: Any,
                  ignore_index: int) -> dict[str, torch.Tensor]:
        return {"task": F.cross_entropy(taps["logits"].float(), target, ignore_index=ignore_index)}

    def distill_inputs(self, s: dict[str, Any], t: dict[str, Any], target: Any, **kw: Any):
        from distill.losses import DistillInputs

        return DistillInputs(s["logits"], t["logits"], s["stages"], t["stages"], target,
                             kw["progress"], s["decoder"], t["decoder"], kw["epoch"], kw["epochs"])

    def card_metrics(self, val: dict[str, Any]) -> dict[str, Any]:
        return {"val_miou": val["miou"], "val_pixel_acc": val["pixel_acc"],
                "val_boundary_f": val["boundary_f"], "val_lhd_gt": val["lhd"],
                "per_class_iou": val["per_class_iou"]}


# -- detect / instance ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DetAugment:
    """Detector training augmentation: horizontal flip and brightness jitter (boxes follow)."""

    hflip: bool = True
    brightness: float = 0.2


class DetDataset(Dataset):
    """A COCO-format runtime dataset as training samples at the network input size.

    Each item is (float32 3xHxW image, {"boxes": [M,4] xyxy input px, "labels": [M], "masks":
    uint8 [M,H,W] or None}). Crowd (ignore) annotations are left out of training targets.
    Decoded samples are cached, like :class:`distill.data.SegDataset`.
    """

    def __init__(self, source: Any, preprocess: Preprocess, augment: DetAugment | None,
                 seed: int = 0, masks: bool = False) -> None:
        self.source, self.preprocess, self.augment = source, preprocess, augment
        self.seed, self.epoch, self.masks = seed, 0, masks
        self._cache: dict[int, tuple[np.ndarray, dict]] = {}

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _sample(self, i: int) -> tuple[np.ndarray, dict]:
        if i not in self._cache:
            img, t = self.source.load(i)
            keep = ~np.asarray(t["iscrowd"], dtype=bool)
            tr = self.preprocess.box_transform(t["size"])
            target = {"boxes": tr.to_input(np.asarray(t["boxes"], np.float32)[keep]),
                      "labels": np.asarray(t["labels"], np.int64)[keep], "masks": None}
            if self.masks and t.get("masks") is not None:
                target["masks"] = self.preprocess.instance_masks(t["masks"][keep])
            self._cache[i] = (self.preprocess.image(img), target)
        return self._cache[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        x, t = self._sample(i)
        boxes, masks = t["boxes"].copy(), t["masks"]
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            if self.augment.hflip and rng.random() < 0.5:
                w = x.shape[2]
                x = x[:, :, ::-1]
                boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
                masks = None if masks is None else masks[:, :, ::-1]
            if self.augment.brightness > 0:
                # brightness in 0-255 units is a shift of the normalised image by its std
                shift = rng.uniform(-self.augment.brightness, self.augment.brightness) * 128.0
                x = x + (shift / np.asarray(self.preprocess.std, np.float32)).reshape(3, 1, 1)
        target = {"boxes": torch.from_numpy(np.ascontiguousarray(boxes)),
                  "labels": torch.from_numpy(t["labels"]),
                  "masks": None if masks is None else torch.from_numpy(np.ascontiguousarray(masks))}
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), target


def _det_collate(batch: list) -> tuple[torch.Tensor, list[dict]]:
    return torch.stack([x for x, _ in batch]), [t for _, t in batch]


class DetectSpec(TaskSpec):
    name = "detect"
    masks = False

    def build_model(self, cfg: Any, num_classes: int) -> nn.Module:
        from distill.models.detector import build_detector

        return build_detector(backbone=cfg.backbone, head=cfg.head, num_classes=num_classes,
                              width=cfg.width, masks=self.masks,
                              pretrained_backbone=cfg.pretrained_backbone or None,
                              **dict(cfg.detector or {}))

    def from_arch(self, arch: dict[str, Any]) -> nn.Module:
        from distill.models.detector import detector_from_arch

        return detector_from_arch(arch)

    def dataset(self, source: Any, preprocess: Preprocess, augment: Any, seed: int = 0) -> Dataset:
        aug = None if augment is None else DetAugment(augment.hflip, augment.brightness)
        return DetDataset(source, preprocess, aug, seed=seed, masks=self.masks)

    def collate(self, batch: list) -> Any:
        return _det_collate(batch)

    def taps(self, model: nn.Module, x: torch.Tensor, features: bool) -> dict[str, Any]:
        return model.forward_taps(x)

    def task_loss(self, model: nn.Module, taps: dict[str, Any], target: Any,
                  ignore_index: int) -> dict[str, torch.Tensor]:
        return model.loss(taps, target)

    def distill_inputs(self, s: dict[str, Any], t: dict[str, Any], target: Any, **kw: Any):
        from distill.losses import DistillInputs

        return DistillInputs(
            s["cls_logits"], t["cls_logits"], s["stages"], t["stages"], None, kw["progress"],
            None, None, kw["epoch"], kw["epochs"], input_size=tuple(kw["size"]),
            student_fpn=s["fpn"], teacher_fpn=t["fpn"], student_reg=self._distribution(s),
            teacher_reg=self._distribution(t), priors=s["priors"], strides=s["strides"],
            det_targets=target)

    @staticmethod
    def _distribution(taps: dict[str, Any]) -> torch.Tensor | None:
        reg = taps.get("reg")
        return reg if reg is not None and reg.ndim == 4 else None  # GFL only

    def to_device(self, target: Any, device: torch.device) -> Any:
        return [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                 for k, v in t.items()} for t in target]

    def card_metrics(self, val: dict[str, Any]) -> dict[str, Any]:
        keys = [k for k in val if k.startswith(("box_", "mask_", "boundary_"))]
        return {f"val_{k}": val[k] for k in keys}


class InstanceSpec(DetectSpec):
    name = "instance"
    masks = True


@torch.no_grad()
def validate_detector(model: nn.Module, source: Any, preprocess: Preprocess, card: dict,
                      batch_size: int = 16) -> dict[str, Any]:
    """COCO AP of a torch detector on ``source``, through the runtime task's own postprocess
    (host NMS, box mapping) and meter, so it scores exactly as the exported model will."""
    task = get_task(card)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    meter = task.meter(source, preprocess, card)
    for lo in range(0, len(source), batch_size):
        idx = range(lo, min(lo + batch_size, len(source)))
        samples = [source.load(i) for i in idx]
        x = torch.from_numpy(preprocess.batch([img for img, _ in samples])).to(device)
        outputs = {n: o.float().cpu().numpy() for n, o in zip(model.output_names, model(x))}
        meter.update(idx, task.postprocess(outputs, card, preprocess, samples), samples)
    model.train(was_training)
    return meter.summary()


for _spec in (SemanticSpec(), DetectSpec(), InstanceSpec()):
    SPECS.register(_spec.name)(_spec)

__all__ = ["SPECS", "TaskSpec", "get_spec", "validate_detector", "DetDataset"]
