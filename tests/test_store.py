"""Store layout, symmetric reader, records and checksums, refusal of foreign stores, data selection."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import zarr

from _images import SYNTHETIC_TEST, SYNTHETIC_TRAIN
from cntk_gram.pipeline.config import build_config
from cntk_gram.pipeline.data import Inputs, prepare_inputs
from cntk_gram.pipeline.errors import UserError
from cntk_gram.pipeline.store import (array_name, open_gram, prepare_store, read_inputs, tile_status, verify_tile,
                            write_tile)


def synthetic_inputs(rng, n_train, n_test):
    return Inputs(images=rng.standard_normal((n_train + n_test, 32, 32, 3)).astype(np.float32),
                  labels=rng.integers(0, 10, n_train + n_test), index=np.arange(n_train + n_test),
                  split=np.repeat(np.array([0, 1], np.int8), [n_train, n_test]),
                  mean=np.zeros(3), std=np.ones(3))


def make_config(store, **data):
    return build_config({"data": {"train": 12, "test": 5, **data}, "kernel": {"archs": ["vanilla"],
                         "depths": [3, 5]}, "tiles": {"size": 4}, "store": str(store)})


def fill_store(store, matrix, config):
    """Write every planned tile of a known symmetric matrix (one per array, scaled by depth)."""
    planned = tile_status(store)[1]
    bounds = [(s, min(s + 4, len(matrix))) for s in range(0, len(matrix), 4)]
    for i, j in planned:
        (r0, r1), (c0, c1) = bounds[i], bounds[j]
        blocks = {array_name(key, depth): depth * matrix[r0:r1, c0:c1]
                  for key in config.kernel.keys for depth in config.kernel.depths}
        write_tile(store, (i, j), blocks, {"pairs": 0, "started": 0.0})
    return planned


def test_layout_and_symmetric_reader(tmp_path, rng):
    store = tmp_path / "g.zarr"
    config = make_config(store, test_test=False)
    inputs = synthetic_inputs(rng, 12, 5)
    prepare_store(store, config=config, inputs=inputs)
    a = rng.standard_normal((17, 17)).astype(np.float32)
    matrix = a @ a.T
    planned = fill_store(store, matrix, config)
    assert len(planned) == 5 + 4 + 3  # row blocks 0..2 (train), column blocks I..4

    group = zarr.open_group(store, mode="r")
    for name in ("images", "labels", "index", "split"):
        np.testing.assert_array_equal(group[f"inputs/{name}"][:], getattr(inputs, name))
    array = group["gram/nngp-vanilla/depth-5"]
    assert array.shape == (17, 17) and array.chunks == (4, 4) and array.dtype == np.float32
    assert np.isnan(array.fill_value)
    assert any("crc32c" in type(c).__name__.lower() for c in array.compressors)
    assert set(group.attrs) >= {"config", "data_fingerprint", "version"}
    stored = np.asarray(array[:])
    assert np.isnan(stored[4:8, 0:4]).all()  # lower blocks never written

    gram = open_gram(store, "nngp-vanilla", 5)
    assert gram.chunks == ((4, 4, 4, 4, 1),) * 2
    full = gram.compute()
    expected = 5 * matrix
    expected[12:, 12:] = np.nan  # test x test not asked for
    np.testing.assert_array_equal(full, expected)

    info = read_inputs(store)
    assert (info["n_train"], info["n_test"], info["tile"]) == (12, 5, 4)
    np.testing.assert_array_equal(info["labels"], inputs.labels)
    np.testing.assert_array_equal(info["split"], inputs.split)


def test_test_test_tiles_fill_the_whole_matrix(tmp_path, rng):
    store = tmp_path / "g.zarr"
    config = make_config(store, test_test=True)
    prepare_store(store, config=config, inputs=synthetic_inputs(rng, 12, 5))
    a = rng.standard_normal((17, 17)).astype(np.float32)
    fill_store(store, a + a.T, config)
    np.testing.assert_array_equal(open_gram(store, "ntk-vanilla", 3).compute(), 3 * (a + a.T))


def test_records_checksums_and_damage(tmp_path, rng):
    store = tmp_path / "g.zarr"
    config = make_config(store)
    prepare_store(store, config=config, inputs=synthetic_inputs(rng, 12, 5))
    a = rng.standard_normal((17, 17)).astype(np.float32)
    fill_store(store, a @ a.T + 17 * np.eye(17, dtype=np.float32), config)
    done, planned = tile_status(store)
    assert done == set(planned)
    assert not list(Path(store).rglob(".zarr.json.*"))  # no temp files left behind
    assert verify_tile(store, (1, 1)) == []

    chunk = Path(store) / "gram" / "ntk-vanilla" / "depth-3" / "c" / "1" / "1"
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    assert verify_tile(store, (1, 1)) and verify_tile(store, (0, 1)) == []

    (Path(store) / "gram" / "ntk-vanilla" / "depth-5" / "c" / "0" / "2").unlink()
    assert any("checksum" in p for p in verify_tile(store, (0, 2)))

    record = Path(store) / "tiles" / "done" / "0-3" / "zarr.json"
    record.write_text(record.read_text()[:20])  # a torn record counts as not done
    assert (0, 3) not in tile_status(store)[0]


def test_foreign_store_is_refused_and_untouched(tmp_path, rng):
    store = tmp_path / "g.zarr"
    inputs = synthetic_inputs(rng, 12, 5)
    prepare_store(store, config=make_config(store), inputs=inputs)
    before = (store / "zarr.json").read_bytes()
    other = build_config({"data": {"train": 12, "test": 5}, "kernel": {"archs": ["vanilla"], "depths": [3, 6]},
                          "tiles": {"size": 4}, "store": str(store)})
    with pytest.raises(UserError, match=r"different config \(kernel.depths"):
        prepare_store(store, config=other, inputs=inputs)
    changed = synthetic_inputs(np.random.default_rng(0), 12, 5)
    with pytest.raises(UserError, match="different data"):
        prepare_store(store, config=make_config(store), inputs=changed)
    assert (store / "zarr.json").read_bytes() == before
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a cntk-gram store"):
        prepare_store(plain, config=make_config(plain), inputs=inputs)
    assert (plain / "notes.txt").read_text() == "mine"


def test_unwritable_store_path(tmp_path, rng):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    store = blocker / "g.zarr"
    with pytest.raises(UserError, match="cannot create store"):
        prepare_store(store, config=make_config(store), inputs=synthetic_inputs(rng, 12, 5))


def _raw_split(root, names):
    labels, images = [], []
    for name in names:
        with open(Path(root) / "cifar-10-batches-py" / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        labels += list(batch[b"labels"])
        images.append(np.asarray(batch[b"data"]))
    return np.array(labels), np.concatenate(images)


def test_data_selection_and_normalisation(cifar_format_root):
    config = build_config({"data": {"root": str(cifar_format_root), "train": 30, "test": 7, "classes": [0, 1]}})
    inputs = prepare_inputs(config.data)
    train_labels, train_raw = _raw_split(cifar_format_root, [f"data_batch_{b}" for b in range(1, 6)])
    test_labels, _ = _raw_split(cifar_format_root, ["test_batch"])
    expected_train = np.flatnonzero(np.isin(train_labels, [0, 1]))[:30]
    expected_test = np.flatnonzero(np.isin(test_labels, [0, 1]))[:7]
    np.testing.assert_array_equal(inputs.index, np.concatenate([expected_train, expected_test]))
    np.testing.assert_array_equal(inputs.labels[:30], train_labels[expected_train])
    np.testing.assert_array_equal(inputs.split, [0] * 30 + [1] * 7)
    # statistics come from the selected training images only: they are standardised exactly
    train = inputs.images[:30].astype(np.float64)
    np.testing.assert_allclose(train.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(train.std(axis=(0, 1, 2)), 1, atol=1e-5)
    # CHW rows of the official format -> HWC images
    pixel = train_raw[expected_train[3]].reshape(3, 32, 32)[:, 5, 7] / 255.0
    np.testing.assert_allclose(inputs.images[3, 5, 7] * inputs.std + inputs.mean, pixel, atol=1e-6)

    explicit = prepare_inputs(build_config({"data": {"root": str(cifar_format_root), "train_index": [9, 2, 4],
                                                     "test_index": [5]}}).data)
    np.testing.assert_array_equal(explicit.index, [9, 2, 4, 5])


def test_missing_data_is_a_clear_error(tmp_path):
    config = build_config({"data": {"root": str(tmp_path), "download": False}})
    with pytest.raises(UserError, match="no CIFAR-10 under"):
        prepare_inputs(config.data)
    too_many = build_config({"data": {"root": str(tmp_path), "classes": [3], "train": 6000}})
    with pytest.raises(UserError):
        prepare_inputs(too_many.data)


def test_download_checks_md5_then_unpacks(cifar_format_root, tmp_path, monkeypatch):
    """The download path, fed a local archive in the official layout instead of the network."""
    import hashlib
    import tarfile

    import cntk_gram.pipeline.data

    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(Path(cifar_format_root) / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(cntk_gram.pipeline.data, "CIFAR10_URL", archive.as_uri())
    with pytest.raises(UserError, match="expected c58f30108f718f92721af3b95e74349a"):
        cntk_gram.pipeline.data.load_cifar10(root=tmp_path / "first")
    monkeypatch.setattr(cntk_gram.pipeline.data, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    loaded = cntk_gram.pipeline.data.load_cifar10(root=tmp_path / "second")
    assert loaded["train_images"].shape == (SYNTHETIC_TRAIN, 32, 32, 3)
    assert loaded["test_labels"].shape == (SYNTHETIC_TEST,)
    assert (tmp_path / "second" / "cifar-10-batches-py" / "test_batch").exists()


def test_zarr_publishes_a_chunk_only_by_renaming_a_complete_temp_file(tmp_path, monkeypatch):
    """The crash-safety claim of run.py and records.py (zarr >= 3.1.3, pinned in pyproject.toml): a chunk reaches its
    name only through a rename of a finished '.partial' temp file, so a writer that dies first leaves the old chunk."""
    path = tmp_path / "a.zarr"
    array = zarr.create_array(path, shape=(4,), chunks=(4,), dtype="float32", fill_value=np.nan,
                              compressors=None)
    array[:] = 1.0
    renames = []

    def failing_replace(src, dst, *args, **kwargs):
        renames.append((Path(src), Path(dst)))
        raise OSError("the writer died before its rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="died before its rename"):
        array[:] = 2.0
    monkeypatch.undo()
    assert renames and renames[0][0].name.endswith(".partial") and renames[0][0].parent == renames[0][1].parent
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:], np.ones(4, np.float32))
