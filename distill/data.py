"""Torch dataset wrapper with training augmentation, and the (distributed) batch order.

Decoding, resizing and normalisation come from :mod:`runtime.data.preprocess` (architecture.md
rule 2: one preprocessing path); this module only adds the random training augmentation —
random scale, crop (padded with the ignore label), horizontal flip and brightness jitter — the
tensors torch wants, and :class:`ShardedBatchSampler`, which makes the union of the processes'
batches at step k the batch a single process would draw at step k.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from runtime.data.preprocess import Preprocess, resize_image, resize_mask


@dataclass(frozen=True)
class Augment:
    """Random training augmentation; all parameters in the units the config uses."""

    crop_size: tuple[int, int] = (128, 128)
    scale_range: tuple[float, float] = (0.75, 1.5)
    hflip: bool = True
    brightness: float = 0.2


class SegDataset(Dataset):
    """Wraps a runtime dataset (anything with ``__len__`` and ``load(i)``) for torch training.

    Decoded images are cached in memory on first use (the built-in data is small, and decoding
    PNGs every epoch would dominate a CPU training step). With ``augment=None`` a sample is the
    deterministic evaluation view: ``preprocess.image``/``preprocess.mask`` at the input size.
    """

    def __init__(self, source, preprocess: Preprocess, augment: Augment | None = None,
                 seed: int = 0, cache: bool = True) -> None:
        self.source = source
        self.preprocess = preprocess
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._use_cache = cache

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        """Reseed augmentation so that each epoch (and a resumed one) draws the same crops."""
        self.epoch = epoch

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._cache:
            pair = self.source.load(i)
            if not self._use_cache:
                return pair
            self._cache[i] = pair
        return self._cache[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, mask = self._load(i)
        if self.augment is None:
            x, y = self.preprocess.image(img), self.preprocess.mask(mask)
        else:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            img, mask = augment_pair(img, mask, self.augment, self.preprocess.ignore_index, rng)
            x, y = self.preprocess.normalize(img), mask.astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


class ShardedBatchSampler(Sampler[list[int]]):
    """Seeded per-epoch shuffle cut into global batches; one process's share of each batch.

    Every process draws the same permutation (seeded by ``seed`` and the epoch), cuts it into
    ``len(self)`` global batches of ``batch_size`` (the remainder is dropped) and takes the
    positions ``rank, rank + world_size, ...`` of each, so the ranks' step-k batches together are
    exactly the step-k batch of a single process with the same global batch size.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} is not divisible by {world_size} processes")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=gen).tolist()
        for k in range(len(self)):
            batch = order[k * self.batch_size:(k + 1) * self.batch_size]
            yield batch[self.rank::self.world_size]


def augment_pair(img: np.ndarray, mask: np.ndarray, aug: Augment, ignore_index: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random scale, pad-and-crop, flip and brightness on a uint8 image and its label map."""
    h, w = mask.shape
    s = rng.uniform(*aug.scale_range)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    img, mask = resize_image(img, size), resize_mask(mask, size)
    img, mask = _pad_to(img, mask, aug.crop_size, ignore_index)
    img, mask = _random_crop(img, mask, aug.crop_size, rng)
    if aug.hflip and rng.random() < 0.5:
        img, mask = img[:, ::-1], mask[:, ::-1]
    if aug.brightness > 0:
        factor = 1.0 + rng.uniform(-aug.brightness, aug.brightness)
        img = np.clip(img.astype(np.float32) * factor, 0, 255).astype(np.uint8)
    return img, mask


def _pad_to(img: np.ndarray, mask: np.ndarray, size: tuple[int, int], ignore_index: int):
    ph, pw = max(size[0] - mask.shape[0], 0), max(size[1] - mask.shape[1], 0)
    if ph == 0 and pw == 0:
        return img, mask
    img = np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=0)
    mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=ignore_index)
    return img, mask


def _random_crop(img: np.ndarray, mask: np.ndarray, size: tuple[int, int],
                 rng: np.random.Generator):
    top = int(rng.integers(0, mask.shape[0] - size[0] + 1))
    left = int(rng.integers(0, mask.shape[1] - size[1] + 1))
    return (img[top:top + size[0], left:left + size[1]],
            mask[top:top + size[0], left:left + size[1]])
