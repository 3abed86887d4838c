"""The export stage as one function: student checkpoint -> ONNX + card.

Imports torch only through the checkpoint loader and the torch->ONNX step.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, opset: int = 17,
                      dynamic: bool = True, simplify: bool = True, force: bool = False,
                      extra: dict[str, Any] | None = None,
                      source_label: str | None = None, nms: str = "host") -> dict[str, Any]:
    """Export a bckd checkpoint to ONNX at its card's input size; returns the ONNX card.

    ``extra`` fields are added to the card; ``source_label`` is what it records as the source
    path (default: the path as given).
    """
    from distill.checkpoint import load_student
    from export.onnx_export import export_onnx
    from runtime.files import refuse_existing

    refuse_existing(out, "output", force)
    model, card = load_student(checkpoint)
    size = tuple(card["preprocess"]["size"])
    card = dict(card, **(extra or {}),
                source={"path": source_label or str(Path(checkpoint)), "sha256": card.get("sha256")})
    for key in ("history", "sha256"):
        card.pop(key, None)
    return export_onnx(model, out, size, card=card, opset=opset, dynamic=dynamic,
                       simplify=simplify, force=force, **({"nms": nms} if "postprocess" in card else {}))
