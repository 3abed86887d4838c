"""The torch dataset wrapper: augmentation keeps image and label aligned and is reproducible."""
import numpy as np
import torch

from distill.data import Augment, SegDataset, augment_pair
from runtime.data.preprocess import Preprocess


class _Source:
    """Two images whose label equals a function of the pixel colour, so alignment is checkable."""

    def __init__(self, size=(40, 56)):
        rng = np.random.default_rng(0)
        blocks = (size[0] // 8, size[1] // 8)  # 8x8 blocks: mostly interiors, some edges
        self.masks = [np.kron(rng.integers(0, 4, blocks, dtype=np.uint8),
                              np.ones((8, 8), np.uint8)) for _ in range(2)]

    def __len__(self):
        return len(self.masks)

    def load(self, i):
        mask = self.masks[i]
        img = np.repeat((mask * 60)[..., None], 3, axis=2).astype(np.uint8)
        return img, mask


def test_augmentation_keeps_image_and_mask_aligned():
    src = _Source()
    aug = Augment(crop_size=(32, 32), scale_range=(0.5, 2.0), hflip=True, brightness=0.0)
    for seed in range(20):
        img, mask = augment_pair(*src.load(0), aug, 255, np.random.default_rng(seed))
        assert img.shape == (32, 32, 3) and mask.shape == (32, 32)
        valid = mask != 255
        # label k was drawn with grey level 60k; bilinear resize blurs edges, nearest keeps labels
        interior = valid & (np.abs(img[..., 0].astype(int) - 60 * mask.astype(int)) <= 30)
        assert interior.sum() > 0.8 * valid.sum()


def test_padding_uses_ignore_label():
    src = _Source(size=(16, 16))
    aug = Augment(crop_size=(32, 32), scale_range=(1.0, 1.0), hflip=False, brightness=0.0)
    img, mask = augment_pair(*src.load(0), aug, 255, np.random.default_rng(0))
    assert (mask == 255).sum() == 32 * 32 - 16 * 16
    assert (img[mask == 255] == 0).all()


def test_epoch_reseeds_and_is_reproducible():
    pre = Preprocess((32, 32))
    ds = SegDataset(_Source(), pre, Augment(crop_size=(32, 32)), seed=3)
    x1, y1 = ds[0]
    x2, y2 = ds[0]
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    ds.set_epoch(1)
    x3, _ = ds[0]
    assert not torch.equal(x1, x3)
    assert x1.dtype == torch.float32 and y1.dtype == torch.int64 and x1.shape == (3, 32, 32)


def test_eval_view_uses_the_runtime_preprocessing():
    src = _Source()
    pre = Preprocess((32, 48))
    x, y = SegDataset(src, pre, None)[1]
    img, mask = src.load(1)
    np.testing.assert_array_equal(x.numpy(), pre.image(img))
    np.testing.assert_array_equal(y.numpy(), pre.mask(mask))
