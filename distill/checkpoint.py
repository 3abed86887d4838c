"""Student-only checkpoints (what export reads) and full-state checkpoints (what resume reads).

Both are written atomically (temp file + rename). A student-only checkpoint holds only the
deployable network — no adapters, no optimizer — plus its ``arch`` so it rebuilds without a
config; its card (``<ckpt>.card.json``) describes it for the next stage.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from runtime.card import read_card, write_card
from runtime.errors import BckdError
from runtime.files import atomic_write_bytes, sha256_file

CHECKPOINT_FORMAT = "bckd-checkpoint"


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_student(path: str | os.PathLike, model: torch.nn.Module, card: dict[str, Any]) -> dict:
    """Write the deployable student and its card; returns the card (with the file's sha256)."""
    payload = {"format": CHECKPOINT_FORMAT, "version": 1, "arch": model.arch,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    atomic_write_bytes(path, _to_bytes(payload))
    card = dict(card, sha256=sha256_file(path))
    write_card(path, card)
    return card


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a full training state (model, optimizer, scheduler, RNG, loss state, epoch)."""
    atomic_write_bytes(path, _to_bytes(state))


def _torch_load(path: Path, what: str) -> Any:
    if not path.is_file():
        raise BckdError(f"{what} {path} not found; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BckdError(f"{what} {path} is corrupt or not a torch file ({first}); "
                        "re-create it") from exc


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a full training state written by :func:`save_state`."""
    return _torch_load(Path(path), "training state")


def load_student(path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the student from a bckd checkpoint; returns (model in eval mode, its card)."""
    path = Path(path)
    payload = _torch_load(path, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise BckdError(f"{path} is not a bckd checkpoint (no '{CHECKPOINT_FORMAT}' header); "
                        "pass a file written by 'bckd distill'")
    card = read_card(path)
    from distill.tasks import get_spec  # the card's task knows how to rebuild its models

    model = get_spec(card).from_arch(payload["arch"])
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise BckdError(f"checkpoint {path} does not match its architecture "
                        f"({str(exc).splitlines()[0]}); re-create it") from exc
    return model.eval(), card
