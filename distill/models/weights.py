"""Loading published ImageNet weights into backbones, strictly, offline.

Every backbone keeps its upstream checkpoint's key layout (torchvision for ResNet and MobileNetV2,
NVlabs SegFormer for MiT), so a checkpoint loads as is once the keys the backbone has no use for
are dropped. A backbone class names those keys and its checkpoint format as class attributes:

* ``checkpoint_ignore_prefixes``: key prefixes to drop (a classifier, an unused last conv);
* ``checkpoint_description``: what to pass, for the error message.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from runtime.errors import BckdError


def _read_state_dict(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A flat name -> tensor dict from a state dict, a .pth path or a "state_dict"/"model" wrap."""
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise BckdError(f"backbone weights file '{os.fspath(source)}' does not exist; "
                            "pass the path of the backbone's ImageNet .pth state dict")
        try:
            source = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # a pickle with code in it, or not a torch file at all
            raise BckdError(f"cannot read backbone weights '{os.fspath(source)}': {exc}; "
                            "save them with torch.save(model.state_dict(), path)") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(source, Mapping) and isinstance(source.get(wrapper), Mapping):
            source = source[wrapper]
    if not isinstance(source, Mapping):
        raise BckdError(f"backbone weights must be a state dict, got {type(source).__name__}")
    return dict(source)


def _shape(value: Any) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _key_problems(model: nn.Module, state: Mapping[str, Any]) -> list[str]:
    """One phrase per kind of mismatch between ``state`` and the model's own state dict."""
    own = model.state_dict()
    # Pre-0.4 checkpoints (torchvision's original ImageNet files) have no BN step counter; it is
    # bookkeeping, not a weight, so its absence is not an error.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {_shape(state[k])} vs {_shape(own[k])}"
              for k in own if k in state and _shape(state[k]) != _shape(own[k])]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected),
                        ("shape-mismatched", shapes)):
        if keys:
            more = ", ..." if len(keys) > 3 else ""
            problems.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{more})")
    return problems


def load_backbone_weights(
    model: nn.Module, state_dict_or_path: Mapping[str, Any] | str | os.PathLike, *,
    ignore_prefixes: Sequence[str] | None = None,
) -> None:
    """Load upstream-format weights into ``model`` strictly, dropping ``ignore_prefixes`` keys.

    ``ignore_prefixes=None`` means the backbone's own ``checkpoint_ignore_prefixes`` (e.g.
    ``fc.`` for ResNet). Any missing, unexpected or shape-mismatched key is a
    :class:`BckdError` naming the first few and the counts; nothing is loaded in that case.
    """
    if ignore_prefixes is None:
        ignore_prefixes = getattr(model, "checkpoint_ignore_prefixes", ())
    state = {k: v for k, v in _read_state_dict(state_dict_or_path).items()
             if not any(k.startswith(p) for p in ignore_prefixes)}
    problems = _key_problems(model, state)
    if problems:
        width = getattr(model, "width", 1.0)
        wanted = getattr(model, "checkpoint_description", "a state dict with the model's own keys")
        hint = (f"the backbone has width={width}; ImageNet weights only fit width=1.0"
                if width != 1.0 else f"pass {wanted}")
        raise BckdError(f"backbone weights do not match {type(model).__name__}: "
                        f"{'; '.join(problems)}; {hint}")
    own = model.state_dict()
    state.update({k: own[k] for k in own if k not in state})  # only BN counters can be absent
    model.load_state_dict(state, strict=True)
