"""The legacy (implicit) INT8 calibrator of TensorRT 8.5 - 10.x, fed by any iterable of batches.

TensorRT calls back into a Python subclass of ``IInt8EntropyCalibrator2`` or
``IInt8MinMaxCalibrator`` (trt-jetson.md §1.7): ``get_batch(names)`` returns one device pointer per
input, or None when the data is exhausted; ``read_calibration_cache`` / ``write_calibration_cache``
make the scales reusable across builds. The classes are deprecated in 10.1 and gone in 11.0, where
INT8 comes only from Q/DQ nodes (see :mod:`export.trt.plan`).

The data-handling halves (:class:`BatchFeed`, :class:`CalibrationCache`) are plain classes so they
are tested without TensorRT; :func:`make_calibrator` only glues them to TensorRT's base class.
An exception inside a callback cannot cross TensorRT's C++ frames cleanly, so it is stored in
``calibrator.error``, calibration is ended, and the builder re-raises it after the build.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from runtime.cuda import CudaApi
from runtime.errors import BckdError
from runtime.files import atomic_write_bytes, sha256_file


class BatchFeed:
    """NCHW float32 batches copied, one at a time, into a single device buffer."""

    def __init__(self, batches: Iterable[np.ndarray], api: CudaApi) -> None:
        self.api = api
        # A calib.reader.CalibrationReader describes its images (split, ids, hashes); the engine
        # card keeps that, so evaluation can refuse to score on the calibration images.
        describe = getattr(batches, "describe", None)
        self.description: dict[str, Any] = describe() if callable(describe) else {}
        self._it: Iterator[np.ndarray] = iter(batches)
        self._first = next(self._it, None)
        self.shape: tuple[int, ...] | None = None
        if self._first is not None:
            self.shape = _check_batch(self._first, None, 0)
        self.count = 0
        self.dropped = 0
        self._ptr: int | None = None

    @property
    def batch_size(self) -> int:
        return self.shape[0] if self.shape else 1

    def next_pointers(self, names: list[str]) -> list[int] | None:
        """The device pointer of the next batch for the one input in ``names``; None when done."""
        if len(names) != 1:
            raise BckdError(f"calibration feeds single-input networks; this one has inputs {names}")
        batch = self._take()
        if batch is None or self._partial_tail(batch):
            return None
        _check_batch(batch, self.shape, self.count)
        if self._ptr is None:
            self._ptr = self.api.malloc(batch.nbytes)
        self.api.htod(self._ptr, np.ascontiguousarray(batch))
        self.count += 1
        return [self._ptr]

    def _partial_tail(self, batch: Any) -> bool:
        """A smaller last batch (a reader's remainder) is left out and counted in ``dropped``."""
        if not (isinstance(batch, np.ndarray) and self.shape and batch.ndim == 4
                and batch.shape[1:] == self.shape[1:] and batch.shape[0] < self.shape[0]):
            return False
        following = next(self._it, None)
        if following is not None:
            self._first = following  # not the tail: the shape check reports it
            return False
        self.dropped = int(batch.shape[0])
        return True

    def _take(self) -> np.ndarray | None:
        if self._first is not None:
            batch, self._first = self._first, None
            return batch
        return next(self._it, None)

    def close(self) -> None:
        if self._ptr is not None:
            self.api.free(self._ptr)
            self._ptr = None


def _check_batch(batch: Any, shape: tuple[int, ...] | None, index: int) -> tuple[int, ...]:
    if not isinstance(batch, np.ndarray) or batch.dtype != np.float32 or batch.ndim != 4:
        got = f"{batch.dtype} {batch.shape}" if isinstance(batch, np.ndarray) else type(batch).__name__
        raise BckdError(f"calibration batch {index} must be an NCHW float32 numpy array, got {got}; "
                        "preprocess images with the model card's preprocess")
    if shape is not None and tuple(batch.shape) != shape:
        raise BckdError(f"calibration batch {index} has shape {tuple(batch.shape)} but the first had "
                        f"{shape}; calibration needs batches of one shape")
    return tuple(batch.shape)


class CalibrationCache:
    """The calibration cache file: read before calibrating, written (atomically) after."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self.reused = False
        self.written = False

    def read(self) -> bytes | None:
        if self.path is None or not self.path.is_file():
            return None
        self.reused = True
        return self.path.read_bytes()

    def write(self, data: Any) -> None:
        if self.path is not None:
            atomic_write_bytes(self.path, bytes(data))
            self.written = True

    def to_card(self) -> dict[str, Any]:
        exists = self.path is not None and self.path.is_file()
        return {"path": str(self.path) if self.path else None, "reused": self.reused,
                "sha256": sha256_file(self.path) if exists else None}


def make_calibrator(trt: Any, feed: BatchFeed, cache: CalibrationCache, algorithm: str) -> Any:
    """A TensorRT calibrator of ``algorithm`` ('entropy' or 'minmax') over ``feed`` and ``cache``."""
    base = {"entropy": trt.IInt8EntropyCalibrator2, "minmax": trt.IInt8MinMaxCalibrator}[algorithm]

    class BckdCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # required explicitly by TensorRT's Python bindings (§1.7)
            self.feed, self.cache, self.algorithm = feed, cache, algorithm
            self.error: BaseException | None = None

        def get_batch_size(self) -> int:
            return self.feed.batch_size

        def get_batch(self, names: list[str], *_: Any) -> list[int] | None:
            try:
                return self.feed.next_pointers(list(names))
            except Exception as exc:  # re-raised by the builder; see the module docstring
                self.error = exc
                return None

        def read_calibration_cache(self, *_: Any) -> bytes | None:
            return self.cache.read()

        def write_calibration_cache(self, data: Any, *_: Any) -> None:
            try:
                self.cache.write(data)
            except Exception as exc:
                self.error = exc

    return BckdCalibrator()


def calibration_card(calibrator: Any, source: str) -> dict[str, Any]:
    """What the engine card records about the legacy calibration."""
    feed = calibrator.feed
    return {**feed.description, "source": source, "algorithm": calibrator.algorithm, "batches": feed.count,
            "batch_shape": list(feed.shape) if feed.shape else None,
            "dropped_tail_images": feed.dropped,
            "cache": calibrator.cache.to_card()}
