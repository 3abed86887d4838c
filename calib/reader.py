"""Calibration images: a seeded, recorded draw from a dataset split through the runtime preprocessing.

A :class:`CalibrationReader` picks ``num_images`` images of one split (a seeded choice, recorded by
id so evaluation can refuse to score on them, architecture.md rule 5) and turns them into network
input with the model card's :class:`~runtime.data.preprocess.Preprocess` — the same call evaluation
makes (:func:`runtime.evaluate.evaluate_runner`), so calibration sees exactly what inference sees.

The reader is a plain iterable of float32 NCHW batches (for NNCF and TensorRT's legacy calibrator)
and also satisfies ONNX Runtime's ``CalibrationDataReader`` protocol (``get_next`` / ``rewind``)
without importing onnxruntime. Images are loaded lazily, one batch at a time, so memory stays
bounded whatever the image size.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from runtime.card import read_card_or_none
from runtime.data import open_dataset
from runtime.data.preprocess import Preprocess
from runtime.errors import BckdError
from runtime.files import sha256_file, sha256_json

DEFAULT_NUM_IMAGES = 300
DEFAULT_INPUT_NAME = "input"  # what export/onnx_export.py names the image input
# A batch holds about this many pixels (16 images at 128x128), so the calibrator's intermediate
# outputs (every activation of every image in the batch) stay bounded at large input sizes.
PIXELS_PER_BATCH = 16 * 128 * 128


def choose_indices(available: int, num_images: int, seed: int) -> list[int]:
    """``num_images`` distinct sample indices out of ``available``, drawn with ``seed``, sorted."""
    if num_images < 1:
        raise BckdError(f"the number of calibration images must be positive, got {num_images}")
    if num_images > available:
        raise BckdError(
            f"asked for {num_images} calibration images but the split holds only {available}; "
            f"ask for {available} or fewer, or calibrate on a larger split"
        )
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(available, size=num_images, replace=False))


def default_batch_size(preprocess: Preprocess) -> int:
    """Images per calibration batch at ``preprocess.size`` (see :data:`PIXELS_PER_BATCH`)."""
    h, w = preprocess.size
    return max(1, PIXELS_PER_BATCH // (h * w))


def dataset_identity(dataset: Any, root: str | os.PathLike, format: str) -> dict[str, Any]:
    """What identifies a dataset in a card: resolved root, format, name and metadata hash."""
    meta = getattr(dataset, "meta", None) or {}
    meta_file = Path(root) / "dataset.json"
    # Same convention as distill/run.py: the folder format's dataset.json, else the loader's meta.
    meta_sha = sha256_file(meta_file) if meta_file.is_file() else sha256_json(meta)
    return {"root": str(Path(root).resolve()), "format": format, "name": meta.get("name"),
            "meta_sha256": meta_sha}


class CalibrationReader:
    """Batches of preprocessed calibration images from chosen samples of one dataset split.

    ``indices`` are sample positions in ``dataset``; ``describe()`` records them by id. Iterating
    yields float32 ``(B, 3, H, W)`` batches of at most ``batch_size`` images, in a fixed order.
    """

    def __init__(self, dataset: Any, preprocess: Preprocess, indices: Sequence[int], *,
                 root: str | os.PathLike, format: str = "folder", seed: int | None = None,
                 batch_size: int | None = None, input_name: str = DEFAULT_INPUT_NAME) -> None:
        if not indices:
            raise BckdError("a calibration reader needs at least one image")
        self.dataset = dataset
        self.preprocess = preprocess
        self.indices = [int(i) for i in indices]
        self.ids = [str(dataset.ids[i]) for i in self.indices]
        self.root, self.format, self.seed = Path(root), format, seed
        self.batch_size = int(batch_size or default_batch_size(preprocess))
        if self.batch_size < 1:
            raise BckdError(f"batch_size must be positive, got {batch_size}")
        self.input_name = input_name
        self._sha256: str | None = None
        self._pending: Iterator[np.ndarray] | None = None
        # A label, e.g. '[calib] reading train images': each pass shows a bar on stderr.
        self.progress = ""
        self._passes = 0

    @classmethod
    def from_split(cls, root: str | os.PathLike, split: str, preprocess: Preprocess, *,
                   format: str = "folder", num_images: int = DEFAULT_NUM_IMAGES, seed: int = 0,
                   batch_size: int | None = None,
                   input_name: str = DEFAULT_INPUT_NAME) -> CalibrationReader:
        """A seeded draw of ``num_images`` images from ``split`` of the dataset at ``root``."""
        dataset = open_dataset(root, split, format=format)
        indices = choose_indices(len(dataset), num_images, seed)
        return cls(dataset, preprocess, indices, root=root, format=format, seed=seed,
                   batch_size=batch_size, input_name=input_name)

    @classmethod
    def for_model(cls, model: str | os.PathLike, root: str | os.PathLike, split: str, *,
                  preprocess: dict[str, Any] | None = None,
                  **kwargs: Any) -> CalibrationReader:
        """:meth:`from_split` with the preprocessing and input name from ``model``'s card; a model
        bckd did not make takes ``preprocess`` (a dict, see :func:`runtime.bare.preprocess_from`)
        and its input name from the graph."""
        from runtime.bare import graph_io, is_bare

        card = read_card_or_none(model)
        if preprocess is None:
            if is_bare(card):
                raise BckdError(f"{model} has no bckd card, so its preprocessing is unknown; give "
                                "--size HxW (and --mean / --std / --layout) or --preprocess "
                                "FILE.yaml")
            preprocess = card["preprocess"]
            kwargs.setdefault("input_name",
                              card.get("onnx", {}).get("input_name", DEFAULT_INPUT_NAME))
        else:
            kwargs.setdefault("input_name", graph_io(model)[0][0].name)
        return cls.from_split(root, split, Preprocess.from_dict(preprocess), **kwargs)

    @property
    def split(self) -> str:
        return str(getattr(self.dataset, "split", ""))

    def __len__(self) -> int:
        """Number of batches (ONNX Runtime's reader protocol counts ``get_next`` results)."""
        return -(-len(self.indices) // self.batch_size)

    def batches(self, batch_size: int | None = None) -> Iterator[np.ndarray]:
        """Float32 NCHW batches of the calibration images, preprocessed as evaluation does.

        A complete pass also fixes :attr:`sha256`; batch boundaries do not change it.
        """
        size = int(batch_size or self.batch_size)
        digest = hashlib.sha256()
        bar = None
        if self.progress:
            from runtime.progress import Progress

            self._passes += 1
            label = f"{self.progress} pass {self._passes}" if self._passes > 1 else self.progress
            bar = Progress(label, len(self.indices))
            bar.__enter__()
        # Not a with block: a consumer that stops early (NNCF takes its subset and drops the
        # generator) ends the pass with GeneratorExit, and the bar's final line must still print.
        try:
            for lo in range(0, len(self.indices), size):
                chunk = self.indices[lo:lo + size]
                # evaluate_runner does exactly this: dataset.load(i), then preprocess.batch(images).
                x = self.preprocess.batch([self.dataset.load(i)[0] for i in chunk])
                digest.update(x.tobytes())
                if bar is not None:
                    bar.update(len(chunk))
                yield x
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
        self._sha256 = digest.hexdigest()

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.batches()

    # -- onnxruntime.quantization.CalibrationDataReader protocol ------------------------------
    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next ``{input_name: batch}`` feed, or None at the end (call :meth:`rewind`)."""
        if self._pending is None:
            self._pending = self.batches()
        x = next(self._pending, None)
        return None if x is None else {self.input_name: x}

    def rewind(self) -> None:
        """Start again from the first batch."""
        self._pending = None

    # -- what the card records -----------------------------------------------------------------
    @property
    def sha256(self) -> str:
        """sha256 of the calibration tensors (all images, in order); reads the images once if needed."""
        if self._sha256 is None:
            for _ in self.batches():
                pass
        assert self._sha256 is not None
        return self._sha256

    def image_hashes(self) -> dict[str, str] | None:
        """sha256 of each calibration image file by id, or None if the dataset has no file paths."""
        image_path = getattr(self.dataset, "image_path", None)
        if image_path is None:
            return None
        return {sid: sha256_file(image_path(i)) for sid, i in zip(self.ids, self.indices)}

    def describe(self) -> dict[str, Any]:
        """The card's ``calibration`` section: dataset, split, chosen ids and their hashes."""
        return {
            "dataset": dataset_identity(self.dataset, self.root, self.format),
            "split": self.split,
            "num_images": len(self.ids),
            "seed": self.seed,
            "ids": list(self.ids),
            "ids_sha256": sha256_json(self.ids),
            "image_sha256": self.image_hashes(),
            "sha256": self.sha256,
            "preprocess": self.preprocess.to_dict(),
        }
