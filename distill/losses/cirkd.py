"""Cross-image relational distillation (CIRKD; Yang et al., CVPR 2022), method.md §4.3.

Source: winycg/CIRKD @91ed5ca, ``losses/cirkd_mini_batch.py``, ``losses/cirkd_memory.py`` and
``train_cirkd.py``. The pixel-wise KD term of CIRKD's recipe is the separate loss ``kd``
(compose them: ``method: kd+cirkd``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from distill.losses.base import LOSSES, DistillInputs, LossContext
from distill.losses.functional import (as_float, check_choice, check_non_negative, check_positive,
                                       check_positive_int, full_precision, require, resize_like)

VARIANTS = ("minibatch", "memory", "both")


@LOSSES.register("cirkd")
class CrossImageRelationKD(nn.Module):
    """mb_weight·L_mb + pixel_weight·L_pix + region_weight·L_reg on the decoder features.

    Features are the heads' pre-classifier maps (a teacher map at another stride is resized to
    the student's). ``variant`` picks the terms: "minibatch" (default; parameter-free, nothing
    to store), "memory" (needs the target; adds a projection head and two queues) or "both"
    (CIRKD's full recipe; weights 1 / 0.1 / 0.1).

    * L_mb, mini-batch pixel-to-pixel: optional 2×2 average pooling (``pool``), L2-normalised pixel
      vectors, and for every ordered image pair (u, v) the relation S_uv = X_u X_vᵀ (N×N) within
      each model. L_mb = (1/B²) Σ_uv (1/N) Σ_i KL(softmax(S^T_uv,i/τ) ‖ softmax(S^S_uv,i/τ)).
      Normalisation: per pixel row, averaged over the B² pairs; no τ² factor.
    * L_pix / L_reg, memory-based: the student passes through a projection head (1×1 conv
      C_s→C_t, BN, ReLU, 1×1 conv) and both are L2-normalised. Anchors are the non-ignored
      pixels (labels nearest-downsampled to the feature size). Contrast keys are sampled from
      per-class queues of teacher pixel embeddings (``pixel_queue`` per class; ``pixel_update``
      random pixels per image and class enqueued each step) and region embeddings
      (``region_queue`` per class; the normalised mean of a class's pixels in one image).
      Each step draws ⌊pixel_samples/K⌋+1 and ⌊region_samples/K⌋+1 entries per class. Logits
      are anchor·keyᵀ/τ; L = kd_tau² · KL(softmax(t/kd_tau) ‖ softmax(s/kd_tau)), a mean over
      anchors. Normalisation: per anchor pixel; τ_kd² convention.

    The queues are buffers, so they are part of the training state and a resumed run continues
    them exactly. They are updated in training mode only, before the loss is computed, from the
    teacher's embeddings of the whole batch (all-gathered across processes when
    ``torch.distributed`` is initialised, as CIRKD does). Random draws use the global CPU torch
    generator, which the trainer saves and restores. Memory: K·(pixel_queue + region_queue)·C_t
    floats (≈ 0.8 GB at 19 classes and C_t = 512).

    The queue and sample options are read only when ``variant`` includes the memory terms.
    ``chunk`` bounds memory: rows of each relation / logit matrix are processed ``chunk`` at a
    time and each block is recomputed in the backward pass, so only one block of activations
    lives at once (0: whole matrices, nothing recomputed — CIRKD's own behaviour).

    Computed in fp32 (fp64 inputs stay fp64) with autocast off; the teacher is detached.
    """

    default_weight = 1.0
    needs_features = True

    def __init__(self, ctx: LossContext, *, variant: str = "minibatch", tau: float = 0.1,
                 kd_tau: float = 1.0, pool: bool = False, mb_weight: float = 1.0,
                 pixel_weight: float = 0.1, region_weight: float = 0.1, pixel_queue: int = 20000,
                 region_queue: int = 2000, pixel_samples: int = 4096, region_samples: int = 1024,
                 pixel_update: int = 16, chunk: int = 1024) -> None:
        super().__init__()
        check_choice("variant", variant, VARIANTS, "cirkd")
        for name, value in (("tau", tau), ("kd_tau", kd_tau)):
            check_positive(name, value, "cirkd")
        for name, value in (("mb_weight", mb_weight), ("pixel_weight", pixel_weight),
                            ("region_weight", region_weight)):
            check_non_negative(name, value, "cirkd")
        for name, value in (("pixel_queue", pixel_queue), ("region_queue", region_queue),
                            ("pixel_samples", pixel_samples), ("region_samples", region_samples),
                            ("pixel_update", pixel_update)):
            check_positive_int(name, value, "cirkd")
        if not isinstance(pool, bool):
            raise ValueError(f"cirkd option 'pool' must be true or false, got {pool!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
            raise ValueError(f"cirkd option 'chunk' must be an integer >= 0, got {chunk!r}")
        if pool and variant == "memory":
            raise ValueError("cirkd option 'pool' pools the minibatch term only; use variant "
                             "'minibatch' or 'both', or remove it")
        if pixel_update > pixel_queue:
            raise ValueError(f"cirkd option 'pixel_update' ({pixel_update}) exceeds "
                             f"'pixel_queue' ({pixel_queue}); lower it or enlarge the queue")
        self.variant, self.tau, self.kd_tau, self.pool, self.chunk = (
            variant, float(tau), float(kd_tau), pool, chunk)
        self.weights = {"minibatch": float(mb_weight), "pixel": float(pixel_weight),
                        "region": float(region_weight)}
        self.ignore_index = ctx.ignore_index
        self.last_terms: dict[str, float] = {}
        if variant != "minibatch":
            self._build_memory(ctx, pixel_queue, region_queue, pixel_update,
                               pixel_samples // ctx.num_classes + 1,
                               region_samples // ctx.num_classes + 1)

    def _build_memory(self, ctx: LossContext, pixel_queue: int, region_queue: int,
                      pixel_update: int, pixel_per_class: int, region_per_class: int) -> None:
        c_s, c_t, k = ctx.student_decoder_channels, ctx.teacher_decoder_channels, ctx.num_classes
        self.project = nn.Sequential(
            nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t), nn.ReLU(inplace=True),
            nn.Conv2d(c_t, c_t, 1, bias=False))
        # Random unit vectors until real embeddings replace them, as in CIRKD.
        self.register_buffer("pixel_bank", F.normalize(torch.randn(k, pixel_queue, c_t), dim=2))
        self.register_buffer("pixel_ptr", torch.zeros(k, dtype=torch.long))
        self.register_buffer("region_bank", F.normalize(torch.randn(k, region_queue, c_t), dim=2))
        self.register_buffer("region_ptr", torch.zeros(k, dtype=torch.long))
        self.pixel_update = pixel_update
        self.pixel_per_class, self.region_per_class = pixel_per_class, region_per_class

    def forward(self, inputs: DistillInputs) -> torch.Tensor:
        s = require(inputs.student_decoder, "the student's decoder features", "cirkd")
        t = require(inputs.teacher_decoder, "the teacher's decoder features", "cirkd")
        with full_precision(s):
            s = as_float(s)
            t = resize_like(as_float(t.detach()), s)
            terms = {}
            if self.variant != "memory":
                terms["minibatch"] = minibatch_relation_kl(s, t, self.tau, self.pool, self.chunk)
            if self.variant != "minibatch":
                target = require(inputs.target, "the ground-truth target", "cirkd")
                terms["pixel"], terms["region"] = self._memory_terms(s, t, target)
            terms = {k: self.weights[k] * v for k, v in terms.items()}
        self.last_terms = {k: v.detach().item() for k, v in terms.items()}
        return sum(terms.values())

    def _memory_terms(self, s: torch.Tensor, t: torch.Tensor, target: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        emb_s = F.normalize(self.project(s), dim=1)
        emb_t = F.normalize(t, dim=1)
        labels = F.interpolate(target[:, None].float(), size=emb_t.shape[-2:],
                               mode="nearest")[:, 0].long()
        valid = labels != self.ignore_index
        if valid.any() and int(labels[valid].max()) >= self.pixel_bank.shape[0]:
            raise ValueError(f"cirkd: target label {int(labels[valid].max())} is outside the "
                             f"{self.pixel_bank.shape[0]} classes the loss was built for")
        if self.training:
            self._enqueue(emb_t, labels)
        keep = valid.flatten()
        if not keep.any():  # every pixel ignored: nothing to anchor, keep the graph
            zero = 0.0 * emb_s.sum()
            return zero, zero
        anchors_s = emb_s.permute(0, 2, 3, 1).flatten(0, 2)[keep]
        anchors_t = emb_t.permute(0, 2, 3, 1).flatten(0, 2)[keep]
        scale = self.kd_tau * self.kd_tau / anchors_s.shape[0]
        out = []
        for bank, per_class in ((self.pixel_bank, self.pixel_per_class),
                                (self.region_bank, self.region_per_class)):
            keys = sample_bank(bank, per_class)
            kl = relation_kl_sum(anchors_s, keys, anchors_t, keys, self.tau * self.kd_tau,
                                 self.chunk)
            out.append(kl * scale)
        return out[0], out[1]

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Push each image's class regions and up to ``pixel_update`` pixels per class."""
        keys, labels = gather_all(keys), gather_all(labels)
        feats = keys.flatten(2)
        for b in range(feats.shape[0]):
            lab = labels[b].flatten()
            for c in torch.unique(lab).tolist():
                if c == self.ignore_index:
                    continue
                f = feats[b][:, (lab == c).nonzero().squeeze(1)]
                push_ring(self.region_bank, self.region_ptr, c,
                          F.normalize(f.mean(1), dim=0)[None])
                pick = torch.randperm(f.shape[1])[:self.pixel_update].to(f.device)
                push_ring(self.pixel_bank, self.pixel_ptr, c, F.normalize(f[:, pick].T, dim=1))


def push_ring(bank: torch.Tensor, ptr: torch.Tensor, c: int, rows: torch.Tensor) -> None:
    """Write ``rows`` (k, C) into class ``c``'s queue at its pointer and advance it (CIRKD's rule).

    If the k rows would reach the end, they overwrite the queue's last k slots and the pointer
    goes back to 0; otherwise they go at the pointer and it moves on by k.
    """
    k, size, p = rows.shape[0], bank.shape[1], int(ptr[c])
    if p + k >= size:
        bank[c, size - k:] = rows
        ptr[c] = 0
    else:
        bank[c, p:p + k] = rows
        ptr[c] = p + k


def sample_bank(bank: torch.Tensor, per_class: int) -> torch.Tensor:
    """(K·n, C) keys: the same ``n`` random queue slots of every class, class-major (CIRKD)."""
    index = torch.randperm(bank.shape[1])[:per_class].to(bank.device)
    return bank[:, index].flatten(0, 1)


@torch.no_grad()
def gather_all(x: torch.Tensor) -> torch.Tensor:
    """``x`` concatenated over all processes along dim 0, or ``x`` when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def minibatch_relation_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float,
                          pool: bool = False, chunk: int = 0) -> torch.Tensor:
    """L_mb of (B, C, h, w) maps (channel counts may differ); see :class:`CrossImageRelationKD`."""
    if pool:
        student, teacher = (F.avg_pool2d(x, 2, 2, ceil_mode=True) for x in (student, teacher))
    xs = F.normalize(student, dim=1).flatten(2).transpose(1, 2)
    xt = F.normalize(teacher.detach(), dim=1).flatten(2).transpose(1, 2)
    b, n = xs.shape[:2]
    total = sum(relation_kl_sum(xs[u], xs[v], xt[u], xt[v], tau, chunk)
                for u in range(b) for v in range(b))
    return total / (b * b * n)


def relation_kl_sum(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                    tau: float, chunk: int = 0) -> torch.Tensor:
    """Σ_i KL(softmax(q_t,i·k_tᵀ/τ) ‖ softmax(q_s,i·k_sᵀ/τ)) over the rows i of ``q``.

    With ``chunk`` > 0 the rows go ``chunk`` at a time and, when a gradient is needed, each block
    is recomputed in the backward pass instead of being stored.
    """
    step = chunk or q_s.shape[0]
    recompute = chunk > 0 and torch.is_grad_enabled() and (q_s.requires_grad or k_s.requires_grad)
    total = q_s.new_zeros(())
    for i in range(0, q_s.shape[0], step):
        args = (q_s[i:i + step], k_s, q_t[i:i + step], k_t, tau)
        block = checkpoint(_block_kl, *args, use_reentrant=False) if recompute else _block_kl(*args)
        total = total + block
    return total


def _block_kl(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
              tau: float) -> torch.Tensor:
    log_ps = F.log_softmax(q_s @ k_s.T / tau, dim=1)
    log_pt = F.log_softmax(q_t @ k_t.T / tau, dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum()
