"""Calibration records in model cards, and the rule that calibration and evaluation never overlap.

An INT8 artifact's card carries a ``calibration`` section (written from
:meth:`calib.reader.CalibrationReader.describe`): the dataset, split, the ids of the images used and
the sha256 of each image file. Artifacts built from it later (an engine from a Q/DQ ONNX, say)
either copy that section or point at it through their card's ``source`` path.

:func:`check_disjoint` enforces architecture.md rule 5 precisely: scoring is refused when any
evaluation image *is* a calibration image — the same id with the same file content (or, when file
hashes are unavailable, the same id in the same dataset). Another split of the same dataset, or a
split that merely shares the name, is fine.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from calib.reader import dataset_identity
from runtime.card import card_path, read_card
from runtime.errors import BckdError
from runtime.files import sha256_file

CALIBRATION_KEY = "calibration"
MAX_SOURCE_DEPTH = 8  # source chains are short (checkpoint -> onnx -> int8 onnx -> engine)


def _source_file(card: dict[str, Any], artifact: Path | None) -> Path | None:
    """The existing file named by ``card['source']['path']`` (relative to cwd or the artifact)."""
    source = card.get("source")
    path = source.get("path") if isinstance(source, dict) else source
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        return None
    candidates = [Path(path)]
    if artifact is not None and not Path(path).is_absolute():
        candidates.append(Path(artifact).parent / path)
    return next((p for p in candidates if p.is_file()), None)


def find_calibrations(card: dict[str, Any],
                      artifact: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Every calibration record in ``card`` and in the cards along its ``source`` chain."""
    found: list[dict[str, Any]] = []
    seen: set[Path] = set()
    here = Path(artifact) if artifact is not None else None
    for _ in range(MAX_SOURCE_DEPTH):
        record = card.get(CALIBRATION_KEY)
        if isinstance(record, dict) and record not in found:
            found.append(record)
        source = _source_file(card, here)
        if source is None or source.resolve() in seen or not card_path(source).is_file():
            break
        seen.add(source.resolve())
        try:
            card, here = read_card(source), source
        except BckdError:  # an unreadable ancestor card cannot hold this artifact's calibration
            break
    return found


def _same_dataset(record: dict[str, Any], dataset: Any) -> bool:
    """Same root folder, or the same dataset metadata (a copy or re-generation of it)."""
    mine = record.get("dataset", {})
    root = getattr(dataset, "root", None)
    if root is None:
        return False
    theirs = dataset_identity(dataset, root, mine.get("format", ""))
    return mine.get("root") == theirs["root"] or mine.get("meta_sha256") == theirs["meta_sha256"]


def shared_images(record: dict[str, Any], dataset: Any) -> list[str]:
    """Ids of ``dataset``'s images that were calibration images of ``record``."""
    position = {str(sid): i for i, sid in enumerate(dataset.ids)}
    shared = sorted(set(record.get("ids", [])) & position.keys())
    if not shared:
        return []
    hashes = record.get("image_sha256")
    image_path = getattr(dataset, "image_path", None)
    if hashes and image_path is not None:
        # Same id and same bytes is the same image, whatever folder the dataset now lives in.
        return [sid for sid in shared if hashes.get(sid) == sha256_file(image_path(position[sid]))]
    return shared if _same_dataset(record, dataset) else []


def check_disjoint(card: dict[str, Any] | None, dataset: Any,
                   artifact: str | os.PathLike | None = None) -> None:
    """Refuse (BckdError) to evaluate on images the model behind ``card`` was calibrated on."""
    if not card:
        return
    for record in find_calibrations(card, artifact):
        shared = shared_images(record, dataset)
        if shared:
            raise BckdError(_overlap_message(record, dataset, shared, artifact))


def _overlap_message(record: dict[str, Any], dataset: Any, shared: list[str],
                     artifact: str | os.PathLike | None) -> str:
    what = str(artifact) if artifact is not None else "this model"
    info = record.get("dataset", {})
    name = f"{info.get('name') or 'the dataset'} ({info.get('root', '?')})"
    cal_split = record.get("split", "?")
    fix = "recalibrate on 'train'" if cal_split != "train" else "recalibrate on a split you do not score"
    return (
        f"{what} was calibrated on {record.get('num_images', len(record.get('ids', [])))} images of "
        f"split '{cal_split}' of {name}, and {len(shared)} of them (e.g. '{shared[0]}') are in the "
        f"evaluation split '{getattr(dataset, 'split', '?')}'; evaluate on another split or {fix}"
    )
