"""Detector task losses, label assigners and box coders (mmdet conventions), as plain tensor code.

Used by the dense heads in :mod:`distill.models.dense_heads`: box coders decode the export
outputs, assigners pick each prior's ground truth, and the losses train GFL (QFL + DFL + GIoU),
RetinaNet (focal + L1) and the YOLACT-style mask branch. This module imports nothing from
``distill.models`` so that models may import it without an import cycle.

Assignments are one long tensor per image, ``[N]`` over the priors: ``>= 0`` is the index of the
assigned ground-truth box, :data:`NEGATIVE` (-1) is background, :data:`IGNORED` (-2) takes no part
in the classification loss (RetinaNet's IoU band between the negative and positive thresholds).

Normalisation (what each term is divided by; all follow mmdet 2.x/3.x):

* ``qfl``: summed over every prior and class of the batch, divided by max(#positives, 1).
* ``giou`` and ``dfl`` (GFL): each positive is weighted by its detached max class score; the sum
  is divided by the sum of those weights, clamped to >= 1 (mmdet's ``avg_factor``). DFL is also
  averaged over the 4 sides. Weights 2 (GIoU) and 0.25 (DFL) are applied here.
* ``focal`` (RetinaNet): summed over non-ignored priors and classes, divided by max(#positives, 1).
* ``l1`` (RetinaNet): summed over the 4 normalised deltas of every positive, / max(#positives, 1).
* ``mask``: per positive, the mean BCE over the proto pixels inside its GT box; then the mean over
  all positives of the batch (YOLACT / Ultralytics' normalisation by box area).

A batch without positives gives exactly 0 for every box term (no NaN), still connected to the
graph so that backward (and DDP) sees every head parameter.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.functional import full_precision
from runtime.errors import BckdError

NEGATIVE = -1
IGNORED = -2
# RetinaNet box coder: mmdet's DeltaXYWHBBoxCoder defaults (means 0) with the stds of the brief.
DELTA_STDS = (0.1, 0.1, 0.2, 0.2)
# exp() of a width/height delta is clamped here (mmdet: |log(16 / 1000)|), so boxes stay finite.
MAX_LOG_RATIO = abs(math.log(16.0 / 1000.0))
_EPS = 1e-7

# ----------------------------------------------------------------------------------------------
# Box geometry and coders


def box_centers(boxes: Tensor) -> Tensor:
    """(..., 2) centres of (..., 4) xyxy boxes."""
    return (boxes[..., :2] + boxes[..., 2:]) * 0.5


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU (N, M) of xyxy boxes ``a`` (N, 4) and ``b`` (M, 4)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=_EPS)


def aligned_iou_giou(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and GIoU (P,) of row-aligned xyxy boxes (P, 4)."""
    area_p = (pred[:, 2] - pred[:, 0]).clamp(min=0) * (pred[:, 3] - pred[:, 1]).clamp(min=0)
    area_t = (target[:, 2] - target[:, 0]).clamp(min=0) * (target[:, 3] - target[:, 1]).clamp(min=0)
    inter = (torch.minimum(pred[:, 2:], target[:, 2:])
             - torch.maximum(pred[:, :2], target[:, :2])).clamp(min=0).prod(-1)
    union = (area_p + area_t - inter).clamp(min=_EPS)
    iou = inter / union
    enclose = (torch.maximum(pred[:, 2:], target[:, 2:])
               - torch.minimum(pred[:, :2], target[:, :2])).clamp(min=0).prod(-1).clamp(min=_EPS)
    return iou, iou - (enclose - union) / enclose


def distance2bbox(points: Tensor, distances: Tensor) -> Tensor:
    """xyxy boxes from centre points (..., 2) and (left, top, right, bottom) distances (..., 4)."""
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def bbox2distance(points: Tensor, boxes: Tensor, max_dis: float | None = None,
                  eps: float = 0.01) -> Tensor:
    """(left, top, right, bottom) from points to boxes; clamped to [0, max_dis - eps] if given.

    The clamp keeps DFL targets strictly below the last bin, as mmdet's ``bbox2distance`` does.
    """
    dist = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)
    if max_dis is not None:
        dist = dist.clamp(min=0, max=max_dis - eps)
    return dist


def delta_encode(anchors: Tensor, boxes: Tensor, stds: Sequence[float] = DELTA_STDS) -> Tensor:
    """mmdet ``DeltaXYWHBBoxCoder.encode``: (dx, dy, dw, dh) / stds of ``boxes`` vs ``anchors``."""
    pw, ph = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    gw, gh = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    dxy = (box_centers(boxes) - box_centers(anchors)) / torch.stack([pw, ph], -1)
    dwh = torch.log(torch.stack([gw / pw, gh / ph], -1).clamp(min=_EPS))
    return torch.cat([dxy, dwh], -1) / anchors.new_tensor(stds)


def delta_decode(anchors: Tensor, deltas: Tensor, stds: Sequence[float] = DELTA_STDS) -> Tensor:
    """Inverse of :func:`delta_encode` (xyxy); log-ratios clamped to :data:`MAX_LOG_RATIO`."""
    deltas = deltas * deltas.new_tensor(stds)
    wh = anchors[..., 2:] - anchors[..., :2]
    center = box_centers(anchors) + deltas[..., :2] * wh
    half = 0.5 * wh * deltas[..., 2:].clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()
    return torch.cat([center - half, center + half], -1)


def integral(reg_logits: Tensor) -> Tensor:
    """Expected value of the discrete distribution over bins 0..reg_max: (..., R+1) -> (...)."""
    bins = torch.arange(reg_logits.shape[-1], device=reg_logits.device, dtype=reg_logits.dtype)
    # An elementwise product, not a matmul, so autocast cannot take it down to 16 bit.
    return (reg_logits.softmax(-1) * bins).sum(-1)


# ----------------------------------------------------------------------------------------------
# Elementwise losses (no reduction: the callers normalise)


def quality_focal_loss(logits: Tensor, quality: Tensor, beta: float = 2.0) -> Tensor:
    """QFL (GFL paper eq. 5): BCE(σ, y) · |y − σ|^β, elementwise; y = IoU target, 0 = negative.

    Matches mmdet's ``quality_focal_loss``: a negative's factor is σ^β, a positive's |y − σ|^β,
    and the modulating factor is not detached.
    """
    sigma = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, quality, reduction="none")
    return bce * (quality - sigma).abs().pow(beta)


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """DFL per row: −[(y_{i+1} − y) log S_i + (y − y_i) log S_{i+1}], y in [0, R) bin units."""
    left = target.long()
    w_left = (left + 1).to(target.dtype) - target
    log_prob = logits.log_softmax(-1)
    lp_left = log_prob.gather(-1, left[..., None])[..., 0]
    lp_right = log_prob.gather(-1, (left + 1)[..., None])[..., 0]
    return -(w_left * lp_left + (1 - w_left) * lp_right)


def giou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """1 − GIoU per row of aligned xyxy boxes (P, 4)."""
    return 1 - aligned_iou_giou(pred, target)[1]


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0,
                       alpha: float = 0.25) -> Tensor:
    """Focal loss −α_t (1 − p_t)^γ log p_t, elementwise on sigmoid logits (mmdet's formula)."""
    p = logits.sigmoid()
    one_minus_pt = p * (1 - targets) + (1 - p) * targets
    weight = (alpha * targets + (1 - alpha) * (1 - targets)) * one_minus_pt.pow(gamma)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weight


# ----------------------------------------------------------------------------------------------
# Assigners


@torch.no_grad()
def atss_assign(priors: Tensor, num_level_priors: Sequence[int], gt_boxes: Tensor,
                topk: int = 9) -> Tensor:
    """ATSS (mmdet ``ATSSAssigner``): per GT, the ``topk`` closest priors of each level by centre
    distance are candidates; those with IoU >= mean + std of the candidates' IoUs and whose centre
    lies inside the GT are positive; a prior claimed by several GTs goes to the highest IoU.
    """
    n, m = priors.shape[0], gt_boxes.shape[0]
    assigned = torch.full((n,), NEGATIVE, dtype=torch.long, device=priors.device)
    if m == 0 or n == 0:
        return assigned
    overlaps = box_iou(priors, gt_boxes)
    centers = box_centers(priors)
    dist = torch.cdist(centers, box_centers(gt_boxes))
    candidates, start = [], 0
    for count in num_level_priors:
        k = min(topk, count)
        candidates.append(dist[start:start + count].topk(k, dim=0, largest=False).indices + start)
        start += count
    cand = torch.cat(candidates, 0)  # (K, M)
    gt_idx = torch.arange(m, device=priors.device).expand_as(cand)
    cand_iou = overlaps[cand, gt_idx]
    threshold = cand_iou.mean(0) + cand_iou.std(0)  # unbiased std, as mmdet
    c = centers[cand]  # (K, M, 2)
    inside = torch.cat([c - gt_boxes[:, :2], gt_boxes[:, 2:] - c], -1).amin(-1) > 0.01
    is_pos = (cand_iou >= threshold) & inside
    claimed = torch.full_like(overlaps, -math.inf)
    claimed[cand[is_pos], gt_idx[is_pos]] = overlaps[cand[is_pos], gt_idx[is_pos]]
    best, best_gt = claimed.max(1)
    return torch.where(best > -math.inf, best_gt, assigned)


@torch.no_grad()
def max_iou_assign(priors: Tensor, gt_boxes: Tensor, pos_iou: float = 0.5,
                   neg_iou: float = 0.4, min_pos_iou: float = 0.0) -> Tensor:
    """MaxIoU (mmdet ``MaxIoUAssigner``, RetinaNet settings): IoU >= ``pos_iou`` is positive,
    < ``neg_iou`` negative, in between ignored; then every GT also takes the prior(s) with its
    highest IoU (all ties; a later GT wins a shared prior, as mmdet's loop does).

    Unlike mmdet (``>= min_pos_iou``), a GT only claims its best prior when that IoU is strictly
    above ``min_pos_iou``: with the default 0 a GT touching no prior claims nothing.
    """
    n, m = priors.shape[0], gt_boxes.shape[0]
    assigned = torch.full((n,), NEGATIVE, dtype=torch.long, device=priors.device)
    if m == 0 or n == 0:
        return assigned
    overlaps = box_iou(priors, gt_boxes)
    max_iou, argmax = overlaps.max(1)
    assigned[max_iou >= neg_iou] = IGNORED
    assigned = torch.where(max_iou >= pos_iou, argmax, assigned)
    gt_best = overlaps.max(0).values
    match = (overlaps == gt_best[None]) & (gt_best[None] > min_pos_iou)
    last_gt = (match * torch.arange(1, m + 1, device=priors.device)).argmax(1)
    return torch.where(match.any(1), last_gt, assigned)


# ----------------------------------------------------------------------------------------------
# Batch losses


def _positives(assigned: Sequence[Tensor], targets: Sequence[dict[str, Any]]
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flattened positives of a batch: image index, prior index, GT box (P, 4), GT label (P,)."""
    b_idx, p_idx, boxes, labels = [], [], [], []
    for b, (assign, target) in enumerate(zip(assigned, targets)):
        pos = torch.nonzero(assign >= 0)[:, 0]
        gt = assign[pos]
        b_idx.append(torch.full_like(pos, b))
        p_idx.append(pos)
        boxes.append(target["boxes"].float().reshape(-1, 4)[gt])
        labels.append(target["labels"].long()[gt])
    return torch.cat(b_idx), torch.cat(p_idx), torch.cat(boxes), torch.cat(labels)


def _zero(*tensors: Tensor) -> Tensor:
    """0, attached to every tensor's graph, so parameters without positives still get a grad."""
    return sum(t.sum() * 0.0 for t in tensors)  # type: ignore[return-value]


def gfl_loss(cls_logits: Tensor, reg: Tensor, priors: Tensor, strides: Tensor,
             assigned: Sequence[Tensor], targets: Sequence[dict[str, Any]], *, beta: float = 2.0,
             dfl_weight: float = 0.25, giou_weight: float = 2.0) -> dict[str, Tensor]:
    """GFL losses {qfl, dfl, giou} (normalisation: module docstring), in fp32 under any autocast.

    ``cls_logits`` (B, N, C), ``reg`` (B, N, 4, R+1) logits in stride units, ``priors`` (N, 4),
    ``strides`` (N,). Boxes are compared in stride units, as mmdet does (IoU is scale-free, DFL
    bins are stride units).
    """
    with full_precision(cls_logits):
        cls_logits, reg = cls_logits.float(), reg.float()
        reg_max = reg.shape[-1] - 1
        b_idx, p_idx, gt_boxes, gt_labels = _positives(assigned, targets)
        stride = strides.float()[p_idx, None]
        centers = box_centers(priors.float())[p_idx] / stride
        pos_reg = reg[b_idx, p_idx]  # (P, 4, R+1)
        pred = distance2bbox(centers, integral(pos_reg))
        target = gt_boxes / stride
        quality = torch.zeros_like(cls_logits)
        iou = aligned_iou_giou(pred.detach(), target)[0]
        quality[b_idx, p_idx, gt_labels] = iou.clamp(min=0)
        num_pos = max(int(p_idx.numel()), 1)
        qfl = quality_focal_loss(cls_logits, quality, beta).sum() / num_pos
        weight = cls_logits.detach().sigmoid()[b_idx, p_idx].amax(-1)
        avg = weight.sum().clamp(min=1.0)
        giou = (giou_loss(pred, target) * weight).sum() / avg
        dist = bbox2distance(centers, target, max_dis=reg_max)
        dfl = (distribution_focal_loss(pos_reg, dist) * weight[:, None]).sum() / (4.0 * avg)
        zero = _zero(reg)
        return {"qfl": qfl, "dfl": dfl_weight * dfl + zero, "giou": giou_weight * giou + zero}


def retina_loss(cls_logits: Tensor, deltas: Tensor, priors: Tensor, assigned: Sequence[Tensor],
                targets: Sequence[dict[str, Any]], *, gamma: float = 2.0, alpha: float = 0.25,
                stds: Sequence[float] = DELTA_STDS) -> dict[str, Tensor]:
    """RetinaNet losses {focal, l1} (normalisation: module docstring), fp32 under any autocast.

    ``cls_logits`` (B, N, C), ``deltas`` (B, N, 4) normalised delta-xywh, ``priors`` (N, 4).
    """
    with full_precision(cls_logits):
        cls_logits, deltas = cls_logits.float(), deltas.float()
        b_idx, p_idx, gt_boxes, gt_labels = _positives(assigned, targets)
        onehot = torch.zeros_like(cls_logits)
        onehot[b_idx, p_idx, gt_labels] = 1.0
        valid = (torch.stack(list(assigned)) != IGNORED).to(cls_logits.dtype)[..., None]
        num_pos = max(int(p_idx.numel()), 1)
        focal = (sigmoid_focal_loss(cls_logits, onehot, gamma, alpha) * valid).sum() / num_pos
        target = delta_encode(priors.float()[p_idx], gt_boxes, stds)
        l1 = (deltas[b_idx, p_idx] - target).abs().sum() / num_pos
        return {"focal": focal, "l1": l1 + _zero(deltas)}


def _mask_targets(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """GT masks (M, H, W) area-downsampled to the proto size: soft targets in [0, 1].

    Area, not nearest/threshold, so thin instances (wires) keep their coverage at stride 4.
    """
    return F.adaptive_avg_pool2d(masks.float()[None], size)[0]


def _box_crop(boxes: Tensor, size: tuple[int, int], scale: tuple[float, float]) -> Tensor:
    """(P, h, w) 0/1 map of proto pixels whose centre lies in each (input-pixel) box."""
    h, w = size
    ys = (torch.arange(h, device=boxes.device, dtype=torch.float32) + 0.5) * scale[0]
    xs = (torch.arange(w, device=boxes.device, dtype=torch.float32) + 0.5) * scale[1]
    in_x = (xs[None] >= boxes[:, 0:1]) & (xs[None] <= boxes[:, 2:3])
    in_y = (ys[None] >= boxes[:, 1:2]) & (ys[None] <= boxes[:, 3:4])
    return (in_y[:, :, None] & in_x[:, None, :]).float()


def proto_mask_loss(coeffs: Tensor, proto: Tensor, assigned: Sequence[Tensor],
                    targets: Sequence[dict[str, Any]], input_size: tuple[int, int]) -> Tensor:
    """YOLACT mask loss: BCE of sigmoid(coeffs · proto) vs the assigned GT mask, in its GT box.

    ``coeffs`` (B, N, k) after tanh, ``proto`` (B, k, h, w), ``input_size`` (H, W) of the network
    input the GT boxes and masks are given at. Normalisation: per positive the mean over the proto
    pixels inside its GT box (at least one pixel), then the mean over the batch's positives.
    """
    with full_precision(coeffs):
        coeffs, proto = coeffs.float(), proto.float()
        size = (proto.shape[-2], proto.shape[-1])
        scale = (input_size[0] / size[0], input_size[1] / size[1])
        total, count = _zero(coeffs, proto), 0
        for b, (assign, target) in enumerate(zip(assigned, targets)):
            pos = torch.nonzero(assign >= 0)[:, 0]
            if pos.numel() == 0:
                continue
            if target.get("masks") is None:
                raise BckdError("the detector has a mask branch but a training image has boxes "
                                "and no masks; train on an instance dataset or set masks=False")
            gt = assign[pos]
            logits = (coeffs[b, pos] @ proto[b].flatten(1)).view(-1, *size)
            masks = _mask_targets(target["masks"], size)[gt]
            crop = _box_crop(target["boxes"].float()[gt], size, scale)
            bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none")
            total = total + ((bce * crop).sum((1, 2)) / crop.sum((1, 2)).clamp(min=1)).sum()
            count += int(pos.numel())
        return total / max(count, 1)
