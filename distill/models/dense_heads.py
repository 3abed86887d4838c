"""Dense detection heads (GFL, RetinaNet) over FPN levels P3..P5, and the YOLACT proto net.

Every head registered in :data:`DETECTION_HEADS` is built from the same keywords (``in_channels``,
``num_classes``, ``channels``, ``num_convs``, ``num_protos``) and shares one layout:

* two towers (cls, reg) of ``num_convs`` 3x3 conv -> GroupNorm -> ReLU, shared by all levels;
* ``cls_out`` (A x C sigmoid logits), ``reg_out`` (A x the head's box code) and, with
  ``num_protos > 0``, ``coeff_out`` (A x k mask coefficients, tanh) on the reg tower (YOLACT
  predicts them beside the box); A = priors per location;
* priors generated from each level's *runtime* size, so a model traced at one size runs at any.

Prior order (the N axis everywhere): levels P3, P4, P5; inside a level row-major over (y, x) and
then the A priors of that location, mmdet's layout. Prior centres sit at (i + 0.5) * stride:
mmdet's default offset is 0, which leaves the right/bottom border uncovered on the coarse levels.

GroupNorm, not BatchNorm, in the towers: the towers are shared across levels whose statistics
differ, so BN's running averages would mix them and eval would not match training; GN is also
independent of the (small, per-process) batch size and is what mmdet's GFL uses. The price is
that GN cannot be folded into the conv at deployment; at opset 17 it exports as
InstanceNormalization + Mul/Add, which ONNX Runtime, OpenVINO and TensorRT all run.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.det_task import (DELTA_STDS, atss_assign, box_centers, delta_decode,
                                     distance2bbox, gfl_loss, integral, max_iou_assign,
                                     retina_loss)
from runtime.errors import BckdError
from runtime.registry import Registry

DETECTION_HEADS: Registry[Callable[..., nn.Module]] = Registry("detection head")
STRIDES = (8, 16, 32)  # P3..P5
CENTER_OFFSET = 0.5  # prior centres at (i + 0.5) * stride
PRIOR_PROB = 0.01  # initial foreground probability of the classifier (RetinaNet's bias init)


def gn_groups(channels: int) -> int:
    """GroupNorm groups: mmdet's 32 when that leaves >= 2 channels a group, else fewer."""
    for groups in (32, 16, 8, 4, 2):
        if channels % groups == 0 and channels // groups >= 2:
            return groups
    return 1


def conv_gn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv (no bias) -> GroupNorm -> ReLU, the unit of the towers and the proto net."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(gn_groups(out_channels), out_channels),
        nn.ReLU(inplace=True),
    )


def _tower(in_channels: int, channels: int, num_convs: int) -> nn.Sequential:
    return nn.Sequential(*(conv_gn_relu(in_channels if i == 0 else channels, channels)
                           for i in range(num_convs)))


def fuse_towers(cls_tower: nn.Sequential, reg_tower: nn.Sequential
                ) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """The cls and reg towers as one (horizontal fusion), exactly: the first convs share their
    input and stack into one conv with twice the filters, the later ones become one conv of 2
    groups, and GroupNorm with twice the groups over the stacked channels normalises each
    tower's groups as before (GN groups are contiguous channel runs). Half the convolutions and
    norms per level: at the default 128² input the towers' convs are so small that per-layer
    overhead dominates, and the fused head is 15-20 % faster on OpenVINO INT8 (docs/detection.md).

    Returns the fused tower as a function of one level's input -> (cls, reg) features. The
    weights are concatenated here, once for all levels; the exporter folds them into constants."""
    layers = [(torch.cat([cls_conv.weight, reg_conv.weight]), 1 if i == 0 else 2,
               2 * cls_norm.num_groups, torch.cat([cls_norm.weight, reg_norm.weight]),
               torch.cat([cls_norm.bias, reg_norm.bias]), cls_norm.eps)
              for i, ((cls_conv, cls_norm, _), (reg_conv, reg_norm, _))
              in enumerate(zip(cls_tower, reg_tower))]

    def run(x: Tensor) -> tuple[Tensor, Tensor]:
        for weight, groups, num_groups, norm_weight, norm_bias, eps in layers:
            x = F.conv2d(x, weight, padding=1, groups=groups)
            x = F.relu(F.group_norm(x, num_groups, norm_weight, norm_bias, eps))
        half = x.shape[1] // 2
        return x[:, :half], x[:, half:]

    return run


class Scale(nn.Module):
    """A learnable scalar (init 1) multiplying one level's regression output (FCOS/GFL)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _per_prior(x: Tensor, num_anchors: int) -> Tensor:
    """(B, A*K, H, W) -> (B, H*W*A, K), the flattened prior order of this module."""
    k = x.shape[1] // num_anchors
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, k)


def _grid_priors(feat: Tensor, stride: int, base: Tensor) -> Tensor:
    """(H*W*A, 4) xyxy priors: ``base`` (A, 4, centred at 0) shifted to every location."""
    h, w = feat.shape[-2:]
    ys = (torch.arange(h, device=feat.device, dtype=torch.float32) + CENTER_OFFSET) * stride
    xs = (torch.arange(w, device=feat.device, dtype=torch.float32) + CENTER_OFFSET) * stride
    # Broadcasting instead of meshgrid/expand: no size arguments for the tracer to bake in.
    cx = (xs[None, :] + 0 * ys[:, None]).reshape(-1)
    cy = (ys[:, None] + 0 * xs[None, :]).reshape(-1)
    shifts = torch.stack([cx, cy, cx, cy], dim=-1)
    return (shifts[:, None, :] + base.float()[None]).reshape(-1, 4)


class DenseHead(nn.Module):
    """Shared towers and the prior machinery; subclasses define the box code and the losses."""

    num_anchors = 1  # priors per location

    def __init__(
        self, *, in_channels: int, num_classes: int, channels: int, num_convs: int = 4,
        num_protos: int = 0, strides: Sequence[int] = STRIDES, box_code_size: int = 4,
    ) -> None:
        super().__init__()
        if num_convs < 0 or channels < 1:
            raise BckdError(f"head needs num_convs >= 0 and channels >= 1, got {num_convs}, "
                            f"{channels}")
        self.num_classes = num_classes
        self.channels = channels
        self.num_protos = num_protos
        self.strides = tuple(strides)
        a = self.num_anchors
        self.cls_convs = _tower(in_channels, channels, num_convs)
        self.reg_convs = _tower(in_channels, channels, num_convs)
        tower_out = channels if num_convs else in_channels
        self.cls_out = nn.Conv2d(tower_out, a * num_classes, 3, padding=1)
        self.reg_out = nn.Conv2d(tower_out, a * box_code_size, 3, padding=1)
        self.coeff_out = nn.Conv2d(tower_out, a * num_protos, 3, padding=1) if num_protos else None
        for stride in self.strides:  # buffers: they follow .to(device); the tracer keeps them
            self.register_buffer(f"anchors_s{stride}", self.base_anchors(stride), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():  # mmdet: normal(0, 0.01) convs, classifier bias at PRIOR_PROB
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))

    def _towers(self) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """One level's input -> (cls, reg) tower outputs: the two towers when training, one
        fused tower (:func:`fuse_towers`) in eval and so in every export, the same function of
        the same weights. Towers whose norms are not GroupNorm (swapped by a user or a
        benchmark) run unfused."""
        units = (*self.cls_convs, *self.reg_convs)
        if self.training or not units or not all(isinstance(u[1], nn.GroupNorm) for u in units):
            return lambda x: (self.cls_convs(x), self.reg_convs(x))
        return fuse_towers(self.cls_convs, self.reg_convs)

    def forward(self, feats: Sequence[Tensor]) -> dict[str, Any]:
        """Per-prior outputs over all levels: ``cls_logits`` (B, N, C), ``reg`` (head-specific),
        ``mask_coeffs`` (B, N, k) when the head has them; ``cls_feats`` / ``reg_feats`` are the
        tower outputs per level (distillation taps)."""
        if len(feats) != len(self.strides):
            raise ValueError(f"head built for {len(self.strides)} levels got {len(feats)}")
        out: dict[str, list[Tensor]] = {"cls_logits": [], "reg": [], "mask_coeffs": [],
                                        "cls_feats": [], "reg_feats": []}
        towers = self._towers()
        for level, x in enumerate(feats):
            cls_feat, reg_feat = towers(x)
            out["cls_feats"].append(cls_feat)
            out["reg_feats"].append(reg_feat)
            out["cls_logits"].append(_per_prior(self.cls_out(cls_feat), self.num_anchors))
            out["reg"].append(self._reg_level(self.reg_out(reg_feat), level))
            if self.coeff_out is not None:
                out["mask_coeffs"].append(
                    _per_prior(torch.tanh(self.coeff_out(reg_feat)), self.num_anchors))
        result: dict[str, Any] = {k: out[k] for k in ("cls_feats", "reg_feats")}
        for key in ("cls_logits", "reg", "mask_coeffs"):
            if out[key]:  # fp32 from here on: box decoding and losses need it under autocast
                result[key] = torch.cat(out[key], dim=1).float()
        return result

    def _reg_level(self, reg: Tensor, level: int) -> Tensor:
        """One level's raw box output (B, A*code, H, W) -> per prior (B, H*W*A, ...)."""
        return _per_prior(reg, self.num_anchors)

    def base_anchors(self, stride: int) -> Tensor:
        """(A, 4) xyxy prior boxes of one location, centred at 0."""
        raise NotImplementedError

    def priors(self, feats: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Prior boxes (N, 4) xyxy in input pixels and their strides (N,), from runtime sizes."""
        boxes = [_grid_priors(f, s, getattr(self, f"anchors_s{s}"))
                 for f, s in zip(feats, self.strides)]
        strides = [b[:, 0] * 0 + s for b, s in zip(boxes, self.strides)]
        return torch.cat(boxes), torch.cat(strides)

    def num_level_priors(self, feats: Sequence[Tensor]) -> list[int]:
        """Priors per level (Python ints; for assigners, not for the export graph)."""
        return [int(f.shape[-2]) * int(f.shape[-1]) * self.num_anchors for f in feats]

    def decode(self, reg: Tensor, priors: Tensor, strides: Tensor) -> Tensor:
        """(B, N, 4) xyxy boxes in input pixels (not clamped) from the head's box code."""
        raise NotImplementedError

    def assign(self, priors: Tensor, num_level_priors: Sequence[int], gt_boxes: Tensor) -> Tensor:
        """Per-prior assignment (N,) of one image: GT index, -1 negative, -2 ignored."""
        raise NotImplementedError

    def loss(self, taps: dict[str, Any], targets: Sequence[dict[str, Any]],
             assigned: Sequence[Tensor]) -> dict[str, Tensor]:
        """Named box/class loss terms of a batch, given each image's assignment."""
        raise NotImplementedError


@DETECTION_HEADS.register("gfl")
class GFLHead(DenseHead):
    """Generalized Focal Loss head (Li et al. 2020; mmdet ``GFLHead``): one prior per location,
    joint class-IoU sigmoid scores (QFL), and per side a distribution over ``reg_max + 1`` bins in
    stride units whose expectation x stride is the distance from the centre (DFL + GIoU).

    The prior *box* (8 x stride, mmdet's octave_base_scale 8) is only what ATSS measures IoU with;
    boxes are decoded from the prior centre. A learnable :class:`Scale` per level multiplies the
    distribution logits. Assignment: ATSS, top-k 9 per level.
    """

    num_anchors = 1
    anchor_scale = 8
    topk = 9

    def __init__(self, *, reg_max: int = 16, **kwargs: Any) -> None:
        if reg_max < 1:
            raise BckdError(f"GFL reg_max must be >= 1, got {reg_max}")
        super().__init__(box_code_size=4 * (reg_max + 1), **kwargs)
        self.reg_max = reg_max
        self.scales = nn.ModuleList(Scale() for _ in self.strides)

    def _reg_level(self, reg: Tensor, level: int) -> Tensor:
        reg = _per_prior(self.scales[level](reg), self.num_anchors)
        return reg.unflatten(-1, (4, self.reg_max + 1))  # (B, HW, 4, R+1), mmdet's side-major

    def base_anchors(self, stride: int) -> Tensor:
        half = self.anchor_scale * stride / 2
        return torch.tensor([[-half, -half, half, half]])

    def decode(self, reg: Tensor, priors: Tensor, strides: Tensor) -> Tensor:
        return distance2bbox(box_centers(priors), integral(reg) * strides[:, None])

    def assign(self, priors: Tensor, num_level_priors: Sequence[int], gt_boxes: Tensor) -> Tensor:
        return atss_assign(priors, num_level_priors, gt_boxes, self.topk)

    def loss(self, taps: dict[str, Any], targets: Sequence[dict[str, Any]],
             assigned: Sequence[Tensor]) -> dict[str, Tensor]:
        return gfl_loss(taps["cls_logits"], taps["reg"], taps["priors"], taps["strides"],
                        assigned, targets)


@DETECTION_HEADS.register("retinanet")
class RetinaHead(DenseHead):
    """RetinaNet head (Lin et al. 2017; mmdet ``RetinaHead``): 9 anchors per location
    (octave_base_scale 4, 3 scales per octave, ratios h/w 0.5, 1, 2), sigmoid focal loss, and
    delta-xywh regression (stds :data:`~distill.losses.det_task.DELTA_STDS`) with L1.
    Assignment: MaxIoU, positive >= 0.5, negative < 0.4, plus each GT's best anchor.
    """

    num_anchors = 9
    octave_base_scale = 4
    scales_per_octave = 3
    ratios = (0.5, 1.0, 2.0)
    stds = DELTA_STDS

    def base_anchors(self, stride: int) -> Tensor:
        """mmdet ``AnchorGenerator.gen_single_level_base_anchors`` (ratio-major order)."""
        scales = torch.tensor([self.octave_base_scale * 2 ** (i / self.scales_per_octave)
                               for i in range(self.scales_per_octave)])
        h_ratios = torch.tensor(self.ratios).sqrt()
        ws = (stride / h_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
        return torch.stack([-ws / 2, -hs / 2, ws / 2, hs / 2], dim=-1)

    def decode(self, reg: Tensor, priors: Tensor, strides: Tensor) -> Tensor:
        return delta_decode(priors, reg, self.stds)

    def assign(self, priors: Tensor, num_level_priors: Sequence[int], gt_boxes: Tensor) -> Tensor:
        return max_iou_assign(priors, gt_boxes, pos_iou=0.5, neg_iou=0.4)

    def loss(self, taps: dict[str, Any], targets: Sequence[dict[str, Any]],
             assigned: Sequence[Tensor]) -> dict[str, Tensor]:
        return retina_loss(taps["cls_logits"], taps["reg"], taps["priors"], assigned, targets,
                           stds=self.stds)


class ProtoNet(nn.Module):
    """YOLACT prototype branch on P3: 3x3 conv, x2 bilinear upsample to stride 4, 3x3 conv, 1x1
    conv to ``num_protos`` maps, ReLU (YOLACT's non-negative prototypes). Output (B, k, H/4, W/4).
    """

    def __init__(self, in_channels: int, channels: int, num_protos: int) -> None:
        super().__init__()
        if num_protos < 1:
            raise BckdError(f"num_protos must be >= 1 for a mask branch, got {num_protos}")
        self.num_protos = num_protos
        self.pre = conv_gn_relu(in_channels, channels)
        self.post = conv_gn_relu(channels, channels)
        self.out = nn.Conv2d(channels, num_protos, 1)

    def forward(self, p3: Tensor) -> Tensor:
        # scale_factor, not a size: it exports as a constant-scale Resize valid at any input size.
        x = F.interpolate(self.pre(p3), scale_factor=2.0, mode="bilinear", align_corners=False)
        return F.relu(self.out(self.post(x)))
