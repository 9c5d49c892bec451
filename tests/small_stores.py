"""Small stores computed once per test session (the fixtures are in conftest.py) and the checks several test modules
make on such stores: tiles assembled into the whole matrix, and accuracies against numpy's dense solve."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# 6 train blocks + 2 test blocks of 20 images: 33 tiles of at most 400 pairs (tests/test_pipeline.py).
PIPELINE = {"data": {"train": 120, "test": 40}, "kernel": {"archs": ["vanilla"], "depths": [3, 11]},
            "tiles": {"size": 20}, "backend": "cpu", "cluster": {"workers": 1, "threads": 1}}
# LAP and flip (tests/test_enhanced_pipeline.py): 8 train (2 blocks of 4) + 4 test: 5 tiles, GAP depth 3 with flip.
LAP = [0, 2]
LAP_FLIP = {"data": {"train": 8, "test": 4},
            "kernel": {"archs": ["gap"], "kinds": ["ntk", "nngp"], "depths": [3], "lap": LAP, "flip": True},
            "tiles": {"size": 4}, "backend": "cpu", "cluster": {"workers": 1, "threads": 1}}
LAP_KEYS = ["ntk-gap", "nngp-gap", "ntk-lap0", "nngp-lap0", "ntk-lap2", "nngp-lap2"]
LAP_KEYS += [f"{k}-flip" for k in LAP_KEYS]
# ZCA store: the cheap fc arch (the images are what is tested), 16 train + 4 test.
ZCA = {"data": {"train": 16, "test": 4, "preprocess": "zca", "zca_epsilon": 0.1},
       "kernel": {"archs": ["fc"], "kinds": ["ntk"], "depths": [3]},
       "tiles": {"size": 8}, "backend": "cpu", "cluster": {"workers": 1, "threads": 1}}
# Random features (tests/test_rf_pipeline.py): CIFAR-2, 8 train (2 blocks of 4) + 6 test (blocks of 4 and 2): 7 tiles,
# two of them diagonal, two ragged.
RF = {"width": 8, "draws": 2, "seed": 3, "max_bytes": "4MiB"}
RF_SMALL = {"data": {"classes": [0, 1], "train": 8, "test": 6},
            "kernel": {"archs": ["vanilla", "gap"], "kinds": ["ntk", "nngp"], "depths": [3], "random_features": RF},
            "tiles": {"size": 4}, "backend": "cpu", "cluster": {"workers": 1, "threads": 1}}


def raw_config(base: dict, root: Path, store: Path, **sections) -> dict:
    """A deep copy of `base` with data.root and store set; each keyword updates that section (a dict)."""
    raw = json.loads(json.dumps(base))
    raw["data"]["root"], raw["store"] = str(root), str(store)
    for section, values in sections.items():
        raw[section].update(values)
    return raw


def compute(base: dict, root: Path, store: Path) -> dict:
    """`base` computed to the end into `store` by cntk_gram.pipeline.run.run; returns its summary."""
    from cntk_gram.pipeline.config import build_config
    from cntk_gram.pipeline.run import run

    summary = run(build_config(raw_config(base, root, store)), progress=False)
    assert summary.tiles_computed == summary.tiles_total, summary
    return summary


def assert_tiles_assemble_to_whole(store: Path, expected: dict, *, n_train: int, rtol: float,
                                   atol_scale: float = 0.0) -> None:
    """The store's matrices, assembled from its tiles by open_gram, equal `expected`, {(key, depth, draw or None):
    (N, N) matrix of the whole block computed at once}, on every computed entry (the train rows and the train
    columns), within rtol plus atol_scale times the largest |entry|; train x train is exactly symmetric and test x
    test (not asked for) is NaN."""
    from cntk_gram.pipeline.store import open_gram

    assert expected
    for (key, depth, draw), whole in expected.items():
        what = f"{key} depth {depth}" + ("" if draw is None else f" draw {draw}")
        gram = open_gram(store, key, depth, draw).compute()
        atol = atol_scale * np.abs(whole).max()
        np.testing.assert_allclose(gram[:n_train], whole[:n_train], rtol=rtol, atol=atol, err_msg=what)
        np.testing.assert_allclose(gram[:, :n_train], whole[:, :n_train], rtol=rtol, atol=atol, err_msg=what)
        assert np.array_equal(gram[:n_train, :n_train], gram[:n_train, :n_train].T), what
        assert np.isnan(gram[n_train:, n_train:]).all(), what


def dense_accuracy(store: Path, key: str, depth: int, *, n_train: int, n_classes: int = 10, draw=None) -> float:
    """Test accuracy of kernel regression (no ridge) by numpy's dense solve of the store's Gram matrix."""
    import zarr

    from cntk_gram.pipeline.store import open_gram
    from cntk_gram.workers.preprocess import targets

    labels = zarr.open_array(store, path="inputs/labels", mode="r")[:]
    k = open_gram(store, key, depth, draw).compute().astype(np.float64)
    alpha = np.linalg.solve(k[:n_train, :n_train], targets(labels[:n_train], n_classes=n_classes))
    predicted = (k[n_train:, :n_train] @ alpha).argmax(axis=1)
    return float(np.mean(predicted == labels[n_train:]))
