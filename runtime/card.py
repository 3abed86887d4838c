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


# The key under which bckd embeds an ONNX file's card in its metadata_props (export/onnx_export).
EMBEDDED_CARD_KEY = "bckd.card"


def load_onnx_graph(path: str | os.PathLike) -> Any:
    """The ModelProto of ``path`` without external data; an unreadable file is a user error."""
    from runtime.lazy import require

    onnx = require("onnx", "reading ONNX files")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors
        text = str(exc).strip()
        why = text.splitlines()[0] if text else type(exc).__name__
        raise BckdError(f"{path} is not a readable ONNX model ({why}); re-export it or check "
                        "that the file was copied whole") from exc


def embedded_card(source: Any) -> dict[str, Any] | None:
    """The card embedded in an ONNX file (path) or ModelProto, or None if it has none.

    The embedded card lacks the file's own ``sha256`` (unknown while the file is written).
    """
    if isinstance(source, (str, os.PathLike)):
        source = load_onnx_graph(source)
    props = {p.key: p.value for p in source.metadata_props}
    if EMBEDDED_CARD_KEY not in props:
        return None
    try:
        card = json.loads(props[EMBEDDED_CARD_KEY])
    except json.JSONDecodeError as exc:
        raise BckdError(f"the ONNX metadata {EMBEDDED_CARD_KEY!r} is not valid JSON ({exc}); "
                        "re-export the model") from exc
    return card if isinstance(card, dict) else None


def _card_from_onnx(artifact: Path) -> dict[str, Any] | None:
    """The embedded card of an ONNX file whose sidecar is missing, with its sha256 filled in."""
    if artifact.suffix.lower() != ".onnx" or not artifact.is_file():
        return None
    try:
        card = embedded_card(artifact)
    except BckdError:
        return None  # not readable as ONNX: the missing-card error says more
    if card is None or "kind" not in card:
        return None
    from runtime.files import sha256_file

    return dict(card, sha256=sha256_file(artifact), card_source="embedded in the ONNX metadata")


def read_card(artifact: str | os.PathLike) -> dict[str, Any]:
    """Read the sidecar of ``artifact`` (for an ONNX file without one: the card bckd embedded in
    its metadata); a missing or corrupt card is a user error."""
    path = card_path(artifact)
    if not path.is_file():
        card = _card_from_onnx(Path(artifact))
        if card is not None:
            return card
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


def read_card_or_none(artifact: str | os.PathLike) -> dict[str, Any] | None:
    """:func:`read_card`, or None for a model bckd did not make (no sidecar, nothing embedded);
    a sidecar that is there but broken is still an error."""
    try:
        return read_card(artifact)
    except BckdError:
        if card_path(artifact).is_file():
            raise
        return None


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
