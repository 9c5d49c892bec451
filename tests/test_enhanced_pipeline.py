"""LAP readouts, flip-averaged kernels and ZCA preprocessing in the pipeline (docs/enhanced.md): config at the edge,
store arrays per output key, tiles vs the whole block, resume refusal, ZCA images and spectrum, solve and report."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

from cntk_gram.pipeline.cli import main
from cntk_gram.pipeline.config import build_config, config_differences, to_dict
from cntk_gram.pipeline.data import load_cifar10
from cntk_gram.pipeline.errors import UserError
from cntk_gram.pipeline.inspect import summary, verify
from cntk_gram.pipeline.paper import Protocol, matching_columns
from cntk_gram.pipeline.run import run
from cntk_gram.pipeline.ridge import SolveOptions
from cntk_gram.pipeline.solve import solve_store
from cntk_gram.pipeline.store import array_name, open_gram, parse_array_name, planned_arrays
from cntk_gram.workers.preprocess import channel_stats, preprocess, zca_apply, zca_fit

from cluster_procs import store_snapshot
from small_stores import LAP_FLIP, LAP_KEYS, ZCA, dense_accuracy, raw_config

SMALL, KEYS = LAP_FLIP, LAP_KEYS   # the LAP / flip store's config and keys (conftest.lap_store)
N_TRAIN = SMALL["data"]["train"]


def test_config_keys_and_array_names():
    config = build_config({"kernel": {"archs": ["vanilla", "gap"], "kinds": ["ntk"], "depths": [11],
                                      "lap": [8, 4, 4], "flip": True}})
    assert config.kernel.lap == (4, 8) and config.kernel.flip is True
    assert config.kernel.keys == ("ntk-vanilla", "ntk-gap", "ntk-lap4", "ntk-lap8", "ntk-vanilla-flip",
                                  "ntk-gap-flip", "ntk-lap4-flip", "ntk-lap8-flip")
    names = planned_arrays(config)
    assert "gram/ntk-lap4/depth-11" in names and "gram/ntk-gap-flip/depth-11" in names
    for name in names:
        assert array_name(*parse_array_name(name)) == name
    assert parse_array_name("gram/nngp-lap16-flip/depth-3") == ("nngp-lap16-flip", 3, None)
    defaults = build_config({})
    assert (defaults.kernel.lap, defaults.kernel.flip, defaults.data.preprocess) == ((), False, "standard")
    assert defaults.kernel.keys == ("ntk-vanilla", "nngp-vanilla", "ntk-gap", "nngp-gap")


def test_a_store_made_before_these_fields_still_resumes_and_epsilon_matters_only_for_zca():
    old = to_dict(build_config({}))
    for section, name in (("kernel", "lap"), ("kernel", "flip"), ("data", "preprocess"), ("data", "zca_epsilon")):
        del old[section][name]
    assert config_differences(old, to_dict(build_config({}))) == []
    assert config_differences(old, to_dict(build_config({"data": {"zca_epsilon": 0.5}}))) == []
    assert config_differences(old, to_dict(build_config({"kernel": {"flip": True}}))) != []
    zca = to_dict(build_config({"data": {"preprocess": "zca"}}))
    assert any("data.preprocess" in d for d in config_differences(old, zca))
    assert any("data.zca_epsilon" in d for d in config_differences(
        zca, to_dict(build_config({"data": {"preprocess": "zca", "zca_epsilon": 0.2}}))))


def test_lap_and_flip_keys_are_different_kernels(lap_store):
    """(The tiles of every key against the whole block: tests/test_pipeline.py, test_gram_from_tiles_...)"""
    g = {key: open_gram(lap_store, key, 3).compute()[:N_TRAIN, :N_TRAIN] for key in ("ntk-gap", "ntk-lap2",
                                                                                     "ntk-gap-flip")}
    assert not np.allclose(g["ntk-gap"], g["ntk-lap2"], rtol=1e-3)
    assert not np.allclose(g["ntk-gap"], g["ntk-gap-flip"], rtol=1e-3)


def test_records_verify_summary_and_export_cover_every_key(lap_store, tmp_path):
    attrs = zarr.open_group(lap_store, mode="r").attrs.asdict()
    arrays = attrs["layout"]["arrays"]
    assert sorted(arrays) == sorted(f"gram/{key}/depth-3" for key in KEYS)
    record = json.loads((Path(lap_store) / "tiles/done/0-1/zarr.json").read_text())["attributes"]
    assert set(record["checksums"]) == set(arrays)
    assert verify(lap_store)["problems"] == []
    assert summary(lap_store)["kernels"] == sorted(KEYS)
    out = tmp_path / "k.npy"
    result = CliRunner().invoke(main, ["export", str(lap_store), "--kernel", "ntk-lap2-flip", "--depth", "3",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(out), open_gram(lap_store, "ntk-lap2-flip", 3).compute())


def test_resume_recomputes_nothing_and_changed_lap_or_flip_is_refused(lap_store, cifar_format_root):
    before = store_snapshot(lap_store)
    assert run(build_config(raw_config(SMALL, cifar_format_root, lap_store)), progress=False).tiles_computed == 0
    for change, field in (({"lap": [0, 4]}, "kernel.lap"), ({"lap": []}, "kernel.lap"),
                          ({"flip": False}, "kernel.flip")):
        with pytest.raises(UserError, match=field):
            run(build_config(raw_config(SMALL, cifar_format_root, lap_store, kernel=change)), progress=False)
    with pytest.raises(UserError, match="data.preprocess"):
        run(build_config(raw_config(SMALL, cifar_format_root, lap_store, data={"preprocess": "zca"})), progress=False)
    assert store_snapshot(lap_store) == before


@pytest.mark.parametrize("section, change, words", [
    ("kernel", {"lap": [-1]}, ["kernel.lap", "integers >= 0", "-1"]),
    ("kernel", {"lap": [1.5]}, ["kernel.lap", "integers >= 0", "1.5"]),
    ("kernel", {"archs": ["fc"], "lap": [2]}, ["kernel.lap", "'gap'"]),
    ("kernel", {"archs": ["vanilla"], "lap": [2]}, ["kernel.lap", "'gap'"]),
    ("kernel", {"flip": "yes"}, ["kernel.flip", "true or false"]),
    ("data", {"zca_epsilon": 0}, ["data.zca_epsilon", "> 0"]),
    ("data", {"preprocess": "pca"}, ["data.preprocess", "standard, zca"]),
])
def test_bad_settings_are_one_line_exit_2_and_leave_the_store_alone(lap_store, cifar_format_root, tmp_path, section,
                                                                    change, words):
    before = store_snapshot(lap_store)
    for store in (lap_store, tmp_path / "new.zarr"):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(raw_config(SMALL, cifar_format_root, store, **{section: change})))
        result = CliRunner().invoke(main, ["run", str(path), "--no-progress"])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output
        assert all(w in lines[0] for w in words), lines[0]
    assert store_snapshot(lap_store) == before and not (tmp_path / "new.zarr").exists()


def test_zca_store_holds_the_whitened_images_fitted_on_train_only(zca_store, cifar_format_root):
    raw = load_cifar10(root=cifar_format_root, download=False)
    train, test = raw["train_images"][:16], raw["test_images"][:4]
    mean, std = channel_stats(train)
    train_std, test_std = preprocess(train, mean, std), preprocess(test, mean, std)
    params = zca_fit(train_std, 0.1)
    stored = zarr.open_array(zca_store, path="inputs/images", mode="r")[:]
    np.testing.assert_allclose(stored[:16], zca_apply(train_std, params), rtol=0, atol=1e-5)
    np.testing.assert_allclose(stored[16:], zca_apply(test_std, params), rtol=0, atol=1e-5)
    # the whitened training covariance has eigenvalues lam / (lam + eps mean lam) of the standardised one's
    flat = train_std.reshape(16, -1).astype(np.float64)
    lam = np.linalg.eigvalsh(np.cov(flat.T, bias=True))
    lam = np.maximum(lam, 0)
    white = stored[:16].reshape(16, -1).astype(np.float64)
    got = np.linalg.eigvalsh(np.cov(white.T, bias=True))
    np.testing.assert_allclose(np.sort(got)[-15:], np.sort(lam / (lam + 0.1 * lam.mean()))[-15:], atol=1e-4)
    zca = zarr.open_group(zca_store, mode="r").attrs["preprocessing"]["zca"]
    assert zca["epsilon"] == 0.1 and len(zca["matrix_sha256"]) == len(zca["mean_sha256"]) == 64
    assert len(zca["source_fingerprint"]) == 64


def test_zca_resume_with_other_settings_is_refused(zca_store, cifar_format_root):
    before = store_snapshot(zca_store)
    assert run(build_config(raw_config(ZCA, cifar_format_root, zca_store)), progress=False).tiles_computed == 0
    for change, field in (({"zca_epsilon": 0.2}, "data.zca_epsilon"), ({"preprocess": "standard"}, "data.preprocess")):
        with pytest.raises(UserError, match=field):
            run(build_config(raw_config(ZCA, cifar_format_root, zca_store, data=change)), progress=False)
    assert store_snapshot(zca_store) == before


def test_solve_handles_lap_and_flip_keys(lap_store, tmp_path):
    rows = solve_store(lap_store, SolveOptions(validate=False, device="cpu", scratch_dir=tmp_path),
                       kernels=["ntk-lap2-flip", "ntk-gap"])
    assert [r.kernel for r in rows] == ["ntk-gap", "ntk-lap2-flip"]
    for row in rows:   # against numpy's dense solve of the same Gram matrix
        assert row.ridgeless.accuracy == dense_accuracy(lap_store, row.kernel, 3, n_train=N_TRAIN)


def test_paper_columns_never_apply_to_whitened_images():
    config = to_dict(build_config({"data": {"train": 2000, "preprocess": "zca"}}))
    protocol = Protocol.from_config(config, n_train=2000, n_test=10_000)
    assert protocol.preprocess == "zca" and matching_columns(protocol) == {}
    config["data"]["preprocess"] = "standard"
    assert "ntk-gap" in matching_columns(Protocol.from_config(config, n_train=2000, n_test=10_000))


def test_zca_resume_tolerates_other_rounding_of_the_whitening_but_not_other_images(zca_store, cifar_format_root,
                                                                                   tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(zca_store, copy)
    meta = copy / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["data_fingerprint"] = "0" * 64   # as if another machine's eigh rounded the images differently
    meta.write_text(json.dumps(doc))
    assert run(build_config(raw_config(ZCA, cifar_format_root, copy)), progress=False).tiles_computed == 0
    doc["attributes"]["preprocessing"]["zca"]["source_fingerprint"] = "1" * 64   # other standardised images
    meta.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="different data"):
        run(build_config(raw_config(ZCA, cifar_format_root, copy)), progress=False)


def test_cli_lap_and_flip_override_the_config_and_are_checked_first(cifar_format_root, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw_config(SMALL, cifar_format_root, tmp_path / "s.zarr")))
    for args, words in ((["--lap", "-1"], ["kernel.lap", "integers >= 0"]),
                        (["--archs", "vanilla", "--lap", "2"], ["kernel.lap", "'gap'"])):
        result = CliRunner().invoke(main, ["run", str(path), "--no-progress", *args])
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert "\n" not in line and all(w in line for w in words), line
    assert not (tmp_path / "s.zarr").exists()
    from cntk_gram.pipeline.config import load_config
    config = load_config(path, {"kernel.lap": [4], "kernel.flip": False})
    assert (config.kernel.lap, config.kernel.flip) == ((4,), False)
