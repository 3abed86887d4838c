"""The procedural scene generator: determinism, class coverage, thin structures, ignore labels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from runtime.data import FolderDataset
from runtime.data.synth import (
    CLASSES,
    GENERATOR_VERSION,
    IGNORE_INDEX,
    WIRE,
    SynthSpec,
    render_sample,
    synthesize,
    write_synth,
)
from runtime.errors import BckdError
from runtime.files import sha256_file

SMALL = dict(n_train=6, n_val=3, size=(64, 64))


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def samples() -> list[tuple[np.ndarray, np.ndarray]]:
    spec = SynthSpec()
    return [render_sample(spec, 0, "train", k) for k in range(24)]


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", seed=3, **SMALL)
    b = synthesize(tmp_path / "b", seed=3, workers=2, **SMALL)  # worker count must not matter
    c = synthesize(tmp_path / "c", seed=4, **SMALL)
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert len(ha) == 2 * 9 + 2 + 1  # images + masks + split files + dataset.json
    assert ha == hb
    differing = [k for k in ha if ha[k] != hc[k]]
    assert any(k.startswith("images/") for k in differing)
    assert json.loads((c / "dataset.json").read_text())["generator"]["seed"] == 4


def test_sample_depends_only_on_seed_split_index() -> None:
    spec = SynthSpec(size=(64, 64))
    img, mask = render_sample(spec, 0, "val", 5)
    again_img, again_mask = render_sample(spec, 0, "val", 5)
    np.testing.assert_array_equal(again_img, img)
    np.testing.assert_array_equal(again_mask, mask)
    assert not np.array_equal(render_sample(spec, 0, "train", 5)[0], img)
    assert not np.array_equal(render_sample(spec, 0, "val", 6)[0], img)


def test_all_classes_and_ignore_appear(samples: list) -> None:
    labels = np.concatenate([m.ravel() for _, m in samples])
    present = set(np.unique(labels).tolist())
    assert set(range(len(CLASSES))) <= present
    assert IGNORE_INDEX in present
    assert present <= set(range(len(CLASSES))) | {IGNORE_INDEX}  # masks within range
    ignore_share = np.mean(labels == IGNORE_INDEX)
    assert 0 < ignore_share < 0.02  # exercised, but a small part of the data


def test_classes_are_not_identified_by_colour(samples: list) -> None:
    # colours are drawn per instance from one shared distribution, so every class's mean colour
    # varies widely from image to image
    means = {c: [] for c in range(1, len(CLASSES))}
    for img, mask in samples:
        for c in means:
            if (mask == c).sum() > 20:
                means[c].append(img[mask == c].mean(axis=0))
    spreads = [np.std(np.array(v), axis=0).mean() for v in means.values() if len(v) > 3]
    assert spreads and min(spreads) > 25  # every class spans a wide range of colours


def test_wires_are_thin(samples: list) -> None:
    wire = np.stack([m == WIRE for _, m in samples])
    total = wire.sum()
    assert total > 0
    eroded = sum(ndimage.binary_erosion(w, structure=np.ones((3, 3), bool)).sum() for w in wire)
    assert eroded / total < 0.25  # 1-3 px wide: a 3x3 erosion removes most of it


def test_objects_overlap(samples: list) -> None:
    # occlusion splits some regions into several connected pieces (or leaves holes, as rings do)
    split_regions = 0
    for _, mask in samples:
        for c in range(1, len(CLASSES)):
            _, n = ndimage.label(mask == c)
            split_regions += n > 1
    assert split_regions > len(samples)


def test_dataset_loads_with_folder_reader(tmp_path: Path) -> None:
    root = synthesize(tmp_path / "ds", seed=0, **SMALL)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["classes"] == list(CLASSES)
    assert meta["generator"]["version"] == GENERATOR_VERSION
    assert meta["generator"]["spec"]["size"] == [64, 64]
    for split, n in (("train", 6), ("val", 3)):
        ds = FolderDataset(root, split)
        assert len(ds) == n and ds.num_classes == len(CLASSES)
        img, mask = ds.load(0)
        assert img.shape == (64, 64, 3) and mask.shape == (64, 64)
        _, expected = render_sample(SynthSpec(size=(64, 64), n_train=6, n_val=3), 0, split, 0)
        np.testing.assert_array_equal(mask, expected)


def test_existing_output_is_refused_and_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BckdError, match="already exists"):
        synthesize(out, **SMALL)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging leftovers
    synthesize(out, force=True, **SMALL)
    assert not (out / "keep.txt").exists() and (out / "dataset.json").is_file()


def test_progress_is_reported(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    synthesize(tmp_path / "p", progress=lambda done, total: calls.append((done, total)), **SMALL)
    assert calls[-1] == (9, 9) and len(calls) == 9


def test_bad_settings_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(BckdError, match="n_train"):
        synthesize(tmp_path / "x", n_train=0)
    with pytest.raises(BckdError, match="seed"):
        synthesize(tmp_path / "x", seed=-1, **SMALL)
    with pytest.raises(ValueError, match="objects"):
        SynthSpec(objects=(5, 2))
    assert not (tmp_path / "x").exists()


def test_spec_is_recorded(tmp_path: Path) -> None:
    spec = SynthSpec(size=(48, 40), n_train=2, n_val=1, objects=(1, 2), wires=(0, 0), ignore_blob_prob=0.0)
    root = write_synth(tmp_path / "s", spec, seed=7)
    assert json.loads((root / "dataset.json").read_text())["generator"]["spec"] == spec.to_dict()
    mask = FolderDataset(root, "train").load(0)[1]
    assert mask.shape == (48, 40) and WIRE not in mask and IGNORE_INDEX not in mask
