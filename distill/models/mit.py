"""Mix Transformer (MiT-B0), the SegFormer encoder, as a backbone with the usual feature interface.

State-dict keys are exactly NVlabs SegFormer's ``mix_transformer.py`` (``patch_embed1.proj``,
``block1.0.attn.q``, ``block1.0.mlp.dwconv.dwconv``, ``norm1`` ...), so the public ``mit_b0.pth``
ImageNet weights load with :func:`distill.models.weights.load_backbone_weights`, which drops the
classifier (``head.*``). mmseg's own ``MixVisionTransformer`` names them differently
(``layers.0.0...``); convert such files first.

MiT is a native stride-32 encoder: its four stages are at strides 4, 8, 16 and 32 and come from
strided overlapping patch embeddings, so there is no stride to trade for dilation. ``mit_b0``
accepts ``output_stride`` for a uniform backbone interface and rejects anything but 32; set
``model.output_stride: 32`` for it (``build_segmentor`` defaults to 8).

Everything follows the input's runtime size (no Python-int shapes), so it exports to ONNX with
dynamic H and W (checked for the legacy exporter at opset 17); attention is
``F.scaled_dot_product_attention`` with its default 1/sqrt(d) scale. The dynamo exporter also
works, given an example batch >= 2: with batch 1 the token reshapes specialise the batch size.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.models.ops import make_divisible
from distill.models.resnet import BACKBONES
from runtime.errors import BckdError

_BLOCK_EPS = 1e-6  # NVlabs: block and stage norms use eps 1e-6; patch-embed and attn.norm 1e-5


def _tokens_to_map(x: Tensor, like: Tensor) -> Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) with ``like``'s runtime H and W."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], like.shape[-2], like.shape[-1])


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a sample's residual branch with probability ``p``.

    Kept samples are scaled by 1/(1-p), so the expectation is unchanged; identity in eval.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows, then LayerNorm over channels."""

    def __init__(self, in_chs: int, dim: int, *, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chs, dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C_in, H, W) -> normalised tokens (B, H'*W', C) and the (B, C, H', W') conv map."""
        x = self.proj(x)
        return self.norm(x.flatten(2).transpose(1, 2)), x


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from a map shrunk by ``sr_ratio``."""

    def __init__(self, dim: int, num_heads: int, *, sr_ratio: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:  # NVlabs builds sr/norm only when used: stage 4 has no such keys
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def _split_heads(self, x: Tensor, parts: int) -> Tensor:
        """(B, N, parts*C) -> (parts, B, heads, N, head_dim)."""
        x = x.reshape(x.shape[0], x.shape[1], parts, self.num_heads, self.head_dim)
        return x.permute(2, 0, 3, 1, 4)

    def forward(self, x: Tensor, like: Tensor) -> Tensor:
        """``x``: (B, H*W, C) tokens; ``like``: a (·, ·, H, W) map giving the runtime H, W."""
        q = self._split_heads(self.q(x), 1)[0]
        if self.sr_ratio > 1:
            x = self.norm(self.sr(_tokens_to_map(x, like)).flatten(2).transpose(1, 2))
        k, v = self._split_heads(self.kv(x), 2).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).flatten(2))


class DWConv(nn.Module):
    """3x3 depthwise conv over the token map (NVlabs keeps it in a wrapper: ``dwconv.dwconv``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, like: Tensor) -> Tensor:
        return self.dwconv(_tokens_to_map(x, like)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """fc1 -> 3x3 depthwise conv -> GELU -> fc2: the conv supplies positional information."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, like: Tensor) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), like)))


class MiTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1 x), then x + MixFFN(norm2 x), with drop path."""

    def __init__(
        self, dim: int, num_heads: int, *, sr_ratio: int, mlp_ratio: int, drop_path: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_BLOCK_EPS)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio=sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=_BLOCK_EPS)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: Tensor, like: Tensor) -> Tensor:
        """``x``: (B, H*W, C) tokens; ``like``: a (·, ·, H, W) map giving the runtime H, W."""
        x = x + self.drop_path(self.attn(self.norm1(x), like))
        return x + self.drop_path(self.mlp(self.norm2(x), like))


class MixTransformer(nn.Module):
    """MiT encoder: per stage, overlapping patch embed -> transformer blocks -> LayerNorm.

    Modules are named as in NVlabs (``patch_embed{i}``, ``block{i}``, ``norm{i}``, i = 1..4) so
    the public checkpoints load unchanged; ``feature_info`` names ``norm{i}``, each stage's last
    module (its token output, reshaped to (B, C, H, W), is the stage feature).
    """

    checkpoint_ignore_prefixes = ("head.",)  # the ImageNet classifier
    checkpoint_description = "an NVlabs SegFormer mit_b0.pth (ImageNet) state dict"

    def __init__(
        self, *, embed_dims: Sequence[int], num_heads: Sequence[int], depths: Sequence[int],
        sr_ratios: Sequence[int], mlp_ratio: int = 4, drop_path_rate: float = 0.1,
        in_chans: int = 3, width: float = 1.0,
    ) -> None:
        super().__init__()
        self.width = width
        self.output_stride = 32
        # Stochastic depth grows linearly from 0 to drop_path_rate over all blocks (NVlabs).
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.feature_info: list[dict[str, Any]] = []
        in_chs = in_chans
        for i, (dim, heads, depth, sr) in enumerate(zip(embed_dims, num_heads, depths, sr_ratios)):
            k = i + 1
            patch, stride = (7, 4) if i == 0 else (3, 2)
            self.add_module(f"patch_embed{k}",
                            OverlapPatchEmbed(in_chs, dim, patch_size=patch, stride=stride))
            start = sum(depths[:i])
            self.add_module(f"block{k}", nn.ModuleList(
                MiTBlock(dim, heads, sr_ratio=sr, mlp_ratio=mlp_ratio, drop_path=rates[start + j])
                for j in range(depth)))
            self.add_module(f"norm{k}", nn.LayerNorm(dim, eps=_BLOCK_EPS))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"norm{k}"))
            in_chs = dim
        self.apply(_init_weights)

    @property
    def out_channels(self) -> list[int]:
        """Channels of the four stages (the embed dims)."""
        return [info["num_chs"] for info in self.feature_info]

    def forward_features(self, x: Tensor) -> list[Tensor]:
        feats = []
        for k in range(1, len(self.feature_info) + 1):
            tokens, like = getattr(self, f"patch_embed{k}")(x)
            for block in getattr(self, f"block{k}"):
                tokens = block(tokens, like)
            x = _tokens_to_map(getattr(self, f"norm{k}")(tokens), like)
            feats.append(x)
        return feats

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_features(x)


def _init_weights(m: nn.Module) -> None:
    """NVlabs' initialisation: truncated normal linears, He-normal (fan-out) convs."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
        nn.init.zeros_(m.bias)


_B0_HEADS = (1, 2, 5, 8)
_B0_HEAD_DIM = 32  # every B0 stage has 32 channels per head: dims 32, 64, 160, 256


@BACKBONES.register("mit_b0")
def mit_b0(
    *, width: float = 1.0, output_stride: int = 32, in_chans: int = 3,
    drop_path_rate: float = 0.1,
) -> MixTransformer:
    """SegFormer's MiT-B0 (NVlabs keys); stages at strides 4/8/16/32, only output_stride 32.

    ``width`` scales the per-head channels (32, rounded to a multiple of 8, at least 8), so the
    head counts stay (1, 2, 5, 8) and every stage stays divisible by its heads: width 0.5 gives
    dims (16, 32, 80, 128). ImageNet weights fit width 1 only.
    """
    if output_stride != 32:
        raise BckdError(f"mit_b0 is a stride-32 encoder (stages at strides 4, 8, 16, 32) and "
                        f"cannot run at output_stride {output_stride}; set model.output_stride "
                        "to 32 for it")
    if not width > 0:
        raise BckdError(f"backbone width must be > 0, got {width}")
    head_dim = make_divisible(_B0_HEAD_DIM * width)
    return MixTransformer(
        embed_dims=[h * head_dim for h in _B0_HEADS], num_heads=_B0_HEADS, depths=(2, 2, 2, 2),
        sr_ratios=(8, 4, 2, 1), drop_path_rate=drop_path_rate, in_chans=in_chans, width=width,
    )
