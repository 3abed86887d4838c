"""Model cards: the JSON sidecar every artifact carries (architecture.md rule 3).

A card sits next to its artifact as ``<artifact>.card.json`` and says what the artifact is:
architecture and its arguments, task, classes, input size and normalisation, ignore index, output
layout, precision, tool versions and the sha256 of each input it was made from. The next stage
reads the card instead of asking the user again.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any

from runtime.errors import BckdError
from runtime.files import atomic_write_json

CARD_SUFFIX = ".card.json"
CARD_SCHEMA_VERSION = 1


def card_path(artifact: str | os.PathLike) -> Path:
    """The sidecar path of ``artifact``."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + CARD_SUFFIX)


def new_card(kind: str, **fields: Any) -> dict[str, Any]:
    """A card dict with the common header fields filled in."""
    card: dict[str, Any] = {
        "card_version": CARD_SCHEMA_VERSION,
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "python": platform.python_version()},
    }
    card.update(fields)
    return card


def write_card(artifact: str | os.PathLike, card: dict[str, Any]) -> Path:
    """Write ``card`` atomically as the sidecar of ``artifact``."""
    return atomic_write_json(card_path(artifact), card)


def read_card(artifact: str | os.PathLike) -> dict[str, Any]:
    """Read the sidecar of ``artifact``; a missing or corrupt card is a user error."""
    path = card_path(artifact)
    if not path.is_file():
        raise BckdError(
            f"model card {path} not found next to {artifact}; artifacts must be made by bckd "
            "(or given a card) so later stages know their input size, classes and normalisation"
        )
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BckdError(f"model card {path} is not valid JSON ({exc}); re-create the artifact") from exc
    if not isinstance(card, dict) or "kind" not in card:
        raise BckdError(f"model card {path} has no 'kind' field; re-create the artifact")
    return card


def tool_versions(*modules: str) -> dict[str, str]:
    """Versions of the named, already-importable modules (absent ones are skipped)."""
    import importlib

    out: dict[str, str] = {}
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        out[name] = str(getattr(mod, "__version__", "unknown"))
    return out
