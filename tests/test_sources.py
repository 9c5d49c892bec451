"""Data sources beyond CIFAR-10 (data.source cifar100 | svhn | arrays), each from small synthetic files written here in
the official formats (no network): loading and subsets, the store's source record and the resume check, the bad
inputs of an arrays source (one Error line, exit 2, nothing written), and an arrays source through `cntk run` and
`cntk solve` end to end."""
from __future__ import annotations

import hashlib
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

import cntk_gram.pipeline.data
from cntk_gram.pipeline.cli import main
from cntk_gram.pipeline.config import build_config
from cntk_gram.pipeline.data import prepare_inputs
from cntk_gram.pipeline.errors import UserError
from cntk_gram.pipeline.paper import Protocol, matching_columns
from cntk_gram.pipeline.report import class_names


def _images(rng, n, shape=(32, 32, 3)):
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def write_cifar100(root: Path, *, n_train=8, n_test=4, seed=0) -> dict:
    """root/cifar-100-python/{train,test,meta} in the official layout (rows of 3072 uint8, channel-major)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    made = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = _images(rng, n)
        fine = rng.integers(0, 100, n).tolist()
        coarse = [f // 5 for f in fine]
        batch = {b"data": images.transpose(0, 3, 1, 2).reshape(n, -1), b"fine_labels": fine,
                 b"coarse_labels": coarse, b"filenames": [b"x.png"] * n}
        (folder / split).write_bytes(pickle.dumps(batch))
        made[split] = (images, np.array(fine), np.array(coarse))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"c"] * 100}))
    return made


def write_svhn(root: Path, *, n_train=6, n_test=4, seed=0) -> dict:
    """root/{train,test}_32x32.mat as the official files: 'X' (32, 32, 3, N) uint8, 'y' (N, 1) with 10 for digit 0."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    made = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = _images(rng, n)
        digits = np.arange(n) % 10
        savemat(root / f"{split}_32x32.mat", {"X": images.transpose(1, 2, 3, 0),
                                              "y": np.where(digits == 0, 10, digits).reshape(-1, 1).astype(np.uint8)})
        made[split] = (images, digits)
    return made


def write_arrays(path: Path, *, n_train=12, n_test=6, shape=(8, 8), classes=3, seed=0, dtype=np.uint8, **override):
    rng = np.random.default_rng(seed)
    arrays = {"x_train": _images(rng, n_train, shape).astype(dtype), "y_train": np.arange(n_train) % classes,
              "x_test": _images(rng, n_test, shape).astype(dtype), "y_test": np.arange(n_test) % classes}
    if dtype != np.uint8:
        arrays["x_train"] = arrays["x_train"] / 255.0
        arrays["x_test"] = arrays["x_test"] / 255.0
    for key, value in override.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez(path, **arrays)
    return arrays


# --- loading each source --------------------------------------------------------------------------

def test_cifar100_fine_and_coarse_labels_and_subsets(tmp_path):
    made = write_cifar100(tmp_path)
    fine = prepare_inputs(build_config({"data": {"source": "cifar100", "root": str(tmp_path),
                                                 "download": False}}).data)
    assert fine.images.shape == (12, 32, 32, 3) and fine.n_train == 8 and fine.n_test == 4
    np.testing.assert_array_equal(fine.labels, np.concatenate([made["train"][1], made["test"][1]]))
    assert fine.source["name"] == "cifar100" and fine.source["label"] == "fine"
    assert set(fine.source["files"]) == {"train", "test"} and fine.source["image_shape"] == [32, 32, 3]
    digest = hashlib.sha256((tmp_path / "cifar-100-python" / "train").read_bytes()).hexdigest()
    assert fine.source["files"]["train"]["sha256"] == digest
    coarse_class = int(made["train"][2][0])
    coarse = prepare_inputs(build_config({"data": {"source": "cifar100", "root": str(tmp_path), "label": "coarse",
                                                   "classes": [coarse_class], "test": 0}}).data)
    expected = np.flatnonzero(made["train"][2] == coarse_class)
    np.testing.assert_array_equal(coarse.index, expected)
    assert (coarse.labels == coarse_class).all() and coarse.source["label"] == "coarse"
    # pixels: the official channel-major rows come back as (H, W, C), standardised per channel
    raw = made["train"][0][expected].astype(np.float64) / 255
    np.testing.assert_allclose(coarse.images, (raw - raw.mean(axis=(0, 1, 2))) / raw.std(axis=(0, 1, 2)), atol=1e-5)


def test_cifar100_download_checks_md5_then_unpacks(tmp_path, monkeypatch):
    served = tmp_path / "served"
    write_cifar100(served)
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(served / "cifar-100-python", arcname="cifar-100-python")
    monkeypatch.setattr(cntk_gram.pipeline.data, "CIFAR100_URL", archive.as_uri())
    data = build_config({"data": {"source": "cifar100", "root": str(tmp_path / "first")}}).data
    with pytest.raises(UserError, match="expected eb9058c3a382ffc7106e4002c42a8d85"):
        prepare_inputs(data)
    monkeypatch.setattr(cntk_gram.pipeline.data, "CIFAR100_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    data = build_config({"data": {"source": "cifar100", "root": str(tmp_path / "second")}}).data
    assert prepare_inputs(data).n_train == 8
    assert (tmp_path / "second" / "cifar-100-python" / "test").exists()


def test_svhn_reads_the_mat_files_and_maps_label_10_to_digit_0(tmp_path):
    made = write_svhn(tmp_path)
    inputs = prepare_inputs(build_config({"data": {"source": "svhn", "root": str(tmp_path),
                                                   "download": False}}).data)
    assert inputs.images.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(inputs.labels, np.concatenate([made["train"][1], made["test"][1]]))
    assert inputs.labels[0] == 0 and set(inputs.source["files"]) == {"train_32x32.mat", "test_32x32.mat"}
    zero = prepare_inputs(build_config({"data": {"source": "svhn", "root": str(tmp_path), "classes": [0, 1]}}).data)
    assert set(zero.labels.tolist()) == {0, 1}
    raw = made["train"][0][zero.index[zero.split == 0]].astype(np.float64) / 255
    np.testing.assert_allclose(zero.images[zero.split == 0],
                               (raw - raw.mean(axis=(0, 1, 2))) / raw.std(axis=(0, 1, 2)), atol=1e-5)


def test_svhn_missing_without_download_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no SVHN file .*train_32x32.mat"):
        prepare_inputs(build_config({"data": {"source": "svhn", "root": str(tmp_path), "download": False}}).data)


@pytest.mark.parametrize("layout", ["npz-gray-uint8", "npz-float-channels", "zarr"])
def test_arrays_source_any_shape_and_channels(tmp_path, layout):
    if layout == "npz-gray-uint8":
        arrays = write_arrays(tmp_path / "a.npz", shape=(8, 8))
        path, shape = tmp_path / "a.npz", (8, 8, 1)
    elif layout == "npz-float-channels":
        arrays = write_arrays(tmp_path / "a.npz", shape=(6, 10, 2), dtype=np.float64)
        path, shape = tmp_path / "a.npz", (6, 10, 2)
    else:
        arrays = write_arrays(tmp_path / "a.npz", shape=(8, 8))
        group = zarr.open_group(tmp_path / "a.zarr", mode="w")
        for key, value in arrays.items():
            group.create_array(key, data=value)
        path, shape = tmp_path / "a.zarr", (8, 8, 1)
    inputs = prepare_inputs(build_config({"data": {"source": "arrays", "path": str(path), "train": 9,
                                                   "test_index": [5, 0]}}).data)
    assert inputs.images.shape == (11, *shape) and inputs.source["image_shape"] == list(shape)
    np.testing.assert_array_equal(inputs.index, [*range(9), 5, 0])
    np.testing.assert_array_equal(inputs.labels, [*arrays["y_train"][:9], arrays["y_test"][5], arrays["y_test"][0]])
    raw = arrays["x_train"][:9].reshape(9, *shape).astype(np.float64)
    raw = raw / 255 if raw.max() > 1 else raw
    mean, std = raw.mean(axis=(0, 1, 2)), raw.std(axis=(0, 1, 2))
    np.testing.assert_allclose(inputs.mean, mean)
    np.testing.assert_allclose(inputs.std, std)
    np.testing.assert_allclose(inputs.images[:9], (raw - mean) / std, atol=1e-5)


def test_config_fields_of_the_sources():
    assert build_config({"data": {"source": "cifar100"}}).data.label == "fine"
    assert build_config({"data": {"source": "cifar100", "classes": [99]}}).data.classes == (99,)
    assert build_config({"data": {"source": "svhn", "train": 73_257, "test": 26_032}}).data.train == 73_257
    assert build_config({}).data.label is None and build_config({}).data.path is None
    for raw, needle in (({"source": "cifar100", "label": "coarse", "classes": [20]}, "data.classes"),
                        ({"source": "cifar100", "label": "medium"}, "data.label"),
                        ({"label": "fine"}, "only for source cifar100"),
                        ({"path": "x.npz"}, "only for source arrays"),
                        ({"source": "arrays"}, "needs data.path"),
                        ({"source": "mnist"}, "cifar10, cifar100, svhn, arrays"),
                        ({"classes": [10]}, "data.classes")):
        with pytest.raises(UserError, match=needle):
            build_config({"data": raw})


def test_other_sources_match_no_paper_column():
    assert matching_columns(Protocol(n_train=2_000, n_test=10_000))        # CIFAR-10's CNTK-V-2K protocol
    for source in ("cifar100", "svhn", "arrays"):
        assert matching_columns(Protocol(n_train=2_000, n_test=10_000, source=source)) == {}
        config = {"data": {"source": source}}
        assert Protocol.from_config(config, n_train=2_000, n_test=10_000).source == source
    assert class_names(3, "svhn") == ["0", "1", "2"] and class_names(2, "cifar10") == ["airplane", "automobile"]
    assert class_names(12, "cifar10")[11] == "11"


# --- through the CLI ------------------------------------------------------------------------------

def arrays_config(tmp_path: Path, data_path: Path, **data) -> Path:
    raw = {"data": {"source": "arrays", "path": str(data_path), **data},
           "kernel": {"archs": ["fc"], "kinds": ["ntk", "nngp"], "depths": [2, 3]}, "tiles": {"size": 6},
           "backend": "cpu", "store": str(tmp_path / "g.zarr"), "cluster": {"threads": 1}}
    path = tmp_path / "arrays.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def bad_arrays(rng) -> dict[str, tuple[dict, str]]:
    """name -> (overrides of the arrays written, words the error line must contain)."""
    ok = _images(rng, 12, (8, 8))
    return {
        "missing key": ({"y_test": None}, "no array 'y_test'"),
        "lengths": ({"y_train": np.arange(11) % 3}, "12 images but y_train has 11 labels"),
        "non-finite": ({"x_train": np.where(np.arange(12)[:, None, None] == 3, np.nan, ok / 255.0)}, "non-finite"),
        "float labels": ({"y_train": (np.arange(12) % 3).astype(float)}, "labels must be integers"),
        "negative labels": ({"y_test": -np.ones(6, int)}, "negative label"),
        "image rank": ({"x_train": ok.reshape(12, 64)}, "allowed: (N, H, W, C) or (N, H, W)"),
        "empty side": ({"x_train": np.zeros((12, 8, 0, 1), np.uint8)}, "H, W, C >= 1"),
        "shape differs": ({"x_test": _images(rng, 6, (7, 8))}, "both splits need one image shape"),
        "int16 pixels": ({"x_train": ok.astype(np.int16)}, "allowed: uint8"),
        "object array": ({"x_train": np.array(["a", 1], dtype=object)}, "plain arrays"),
    }


@pytest.mark.parametrize("case", list(bad_arrays(np.random.default_rng(0))))
def test_bad_arrays_one_error_line_exit_2_nothing_written(tmp_path, case):
    overrides, needle = bad_arrays(np.random.default_rng(0))[case]
    write_arrays(tmp_path / "bad.npz", **overrides)
    result = CliRunner().invoke(main, ["run", str(arrays_config(tmp_path, tmp_path / "bad.npz")), "--no-progress"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "g.zarr").exists() and not list(tmp_path.glob(".g.zarr*"))


def test_arrays_image_shape_checks_before_the_store(tmp_path):
    write_arrays(tmp_path / "a.npz")
    config = arrays_config(tmp_path, tmp_path / "a.npz")
    for args, needle in ((["--archs", "gap", "--lap", "9"], "at most 8"),
                         (["--data-path", str(tmp_path / "none.npz")], "no file or directory"),
                         (["--train", "13", "--tile-size", "13"], "only 12 train images")):
        result = CliRunner().invoke(main, ["run", str(config), "--no-progress", *args])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output
        assert not (tmp_path / "g.zarr").exists()


def test_arrays_end_to_end_run_solve_and_resume_checks_the_file(tmp_path):
    """12 train / 6 test 8x8x1 images in 4 classes, fc kernels, tiles of 6: `cntk run` then `cntk solve`; a resume
    from a moved copy of the file works, one from a different file is refused naming the file."""
    write_arrays(tmp_path / "a.npz", classes=4)
    config = arrays_config(tmp_path, tmp_path / "a.npz")
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(config), "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert (summary["n_train"], summary["n_test"], summary["tiles_computed"]) == (12, 6, 5)
    attrs = dict(zarr.open_group(tmp_path / "g.zarr", mode="r").attrs)
    assert attrs["source"]["name"] == "arrays" and attrs["source"]["image_shape"] == [8, 8, 1]
    assert attrs["source"]["files"]["npz"]["name"] == "a.npz"
    assert attrs["source"]["files"]["npz"]["sha256"] == hashlib.sha256((tmp_path / "a.npz").read_bytes()).hexdigest()
    assert zarr.open_array(tmp_path / "g.zarr", path="inputs/images", mode="r").shape == (18, 8, 8, 1)

    result = runner.invoke(main, ["solve", str(tmp_path / "g.zarr"), "--out", str(tmp_path / "report"), "--json"])
    assert result.exit_code == 0, result.output
    solved = json.loads(result.output.strip().splitlines()[-1])
    assert len(solved["rows"]) == 4 and solved["paper_columns"] == {}
    report = json.loads((tmp_path / "report" / "results.json").read_text())
    assert "n/a" in (tmp_path / "report" / "results.md").read_text()
    assert report["paper_reference"]["protocol"].startswith("source arrays")
    assert all(len(row["ridgeless"]["confusion"]) == 4 for row in report["rows"])

    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "a.npz").write_bytes((tmp_path / "a.npz").read_bytes())
    result = runner.invoke(main, ["run", str(config), "--no-progress", "--json", "--data-path", str(moved / "a.npz")])
    assert result.exit_code == 0 and json.loads(result.output.strip().splitlines()[-1])["tiles_computed"] == 0, result.output

    write_arrays(tmp_path / "other.npz", classes=4, seed=1)
    result = runner.invoke(main, ["run", str(config), "--no-progress", "--data-path", str(tmp_path / "other.npz")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "other source files" in lines[0] and "a.npz" in lines[0] and "other.npz" in lines[0], lines[0]


def test_images_beyond_the_gpu_kernels_refused_for_gpu_and_computed_on_the_cpu_for_auto(tmp_path, monkeypatch):
    import cntk_gram.pipeline.run as run_module

    write_arrays(tmp_path / "a.npz", shape=(40, 40))       # wider than the GPU conv kernels take (32)
    config = arrays_config(tmp_path, tmp_path / "a.npz")
    # backend gpu: conv archs are refused before any store, fc (computed on the host) is not
    result = CliRunner().invoke(main, ["run", str(config), "--backend", "gpu", "--archs", "vanilla", "--dry-run"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "(40, 40, 1)" in lines[0] and "backend cpu" in lines[0]
    assert CliRunner().invoke(main, ["run", str(config), "--backend", "gpu", "--dry-run"]).exit_code == 0
    assert not (tmp_path / "g.zarr").exists()

    # backend auto on a machine whose GPU it would pick: the conv tiles go to the CPU, and it says why
    monkeypatch.setattr(run_module, "resolve_here", lambda name: "gpu")
    result = CliRunner().invoke(main, ["run", str(config), "--backend", "auto", "--archs", "vanilla", "--json",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["backend"] == "cpu" and summary["tiles_computed"] == summary["tiles_total"] > 0
    assert "backend auto: the CPU computes these tiles" in result.stderr
