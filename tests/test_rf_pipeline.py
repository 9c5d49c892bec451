"""Random features in the pipeline: config block, store arrays per draw, tiles vs the whole block, resume,
refused config changes, bad input at the edge, solve per draw and the report's median / min / max."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner

from cntk_gram.pipeline import config as config_module
from cntk_gram.pipeline.cli import main
from cntk_gram.pipeline.config import build_config
from cntk_gram.pipeline.errors import UserError
from cntk_gram.pipeline.paper import Protocol, matching_columns
from cntk_gram.pipeline.report import rf_summaries, table_cells
from cntk_gram.pipeline.run import run
from cntk_gram.pipeline.ridge import SolveOptions
from cntk_gram.pipeline.solve import solve_store
from cntk_gram.pipeline.store import array_name, open_gram, parse_array_name, planned_arrays

from cluster_procs import store_snapshot
from small_stores import RF, RF_SMALL, dense_accuracy, raw_config

N_TRAIN = RF_SMALL["data"]["train"]


def small_raw(root, store, **rf):
    """RF_SMALL for this root and store, with the random_features block updated by `rf`."""
    raw = raw_config(RF_SMALL, root, store)
    raw["kernel"]["random_features"].update(rf)
    return raw


def test_array_names_round_trip_and_old_names_keep_their_meaning():
    assert array_name("ntk-gap", 11) == "gram/ntk-gap/depth-11"
    assert array_name("rf-ntk-gap", 11, 0) == "gram/rf-ntk-gap/depth-11/draw-0"
    assert parse_array_name("gram/ntk-gap/depth-11") == ("ntk-gap", 11, None)
    assert parse_array_name("gram/rf-nngp-vanilla/depth-3/draw-12") == ("rf-nngp-vanilla", 3, 12)
    for bad in ("gram/ntk-gap/depth-3/draw-", "gram/ntk-gap/draw-1", "gram/rf/depth-3/draw-1/x"):
        with pytest.raises(ValueError):
            parse_array_name(bad)


def test_config_block_plans_every_draw_and_only_rf_archs():
    raw = {"kernel": {"archs": ["vanilla", "fc"], "kinds": ["ntk"], "depths": [3, 4],
                      "random_features": {"draws": 3}}}
    config = build_config(raw)
    rf = config.kernel.random_features
    assert (rf.width, rf.draws, rf.seed, rf.max_bytes) == (128, 3, 0, 2**30)
    assert config.kernel.rf_keys == ("rf-ntk-vanilla",)   # fc has no random network
    names = planned_arrays(config)
    assert names[:4] == ["gram/ntk-vanilla/depth-3", "gram/ntk-vanilla/depth-4", "gram/ntk-fc/depth-3",
                         "gram/ntk-fc/depth-4"]
    assert sorted(names[4:]) == sorted(f"gram/rf-ntk-vanilla/depth-{d}/draw-{r}" for d in (3, 4) for r in range(3))
    assert build_config({}).kernel.random_features is None and build_config({}).kernel.rf_keys == ()


def test_two_draws_are_two_networks_beside_the_exact_kernel(rf_store):
    """(The tiles of every array against the whole block: tests/test_pipeline.py, test_gram_from_tiles_...)"""
    draws = [open_gram(rf_store, "rf-ntk-vanilla", 3, draw).compute()[:N_TRAIN, :N_TRAIN] for draw in range(2)]
    assert not np.allclose(draws[0], draws[1], rtol=1e-2)
    assert np.isfinite(open_gram(rf_store, "ntk-vanilla", 3).compute()[:N_TRAIN]).all()


def test_store_records_torch_and_one_record_covers_every_array(rf_store):
    attrs = zarr.open_group(rf_store, mode="r").attrs.asdict()
    assert attrs["random_features"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert {k: attrs["random_features"][k] for k in ("width", "draws", "seed")} == \
        {"width": RF["width"], "draws": RF["draws"], "seed": RF["seed"]}
    record = json.loads((Path(rf_store) / "tiles/done/0-2/zarr.json").read_text())["attributes"]
    assert set(record["checksums"]) == set(attrs["layout"]["arrays"])
    assert len(attrs["layout"]["arrays"]) == 4 + 4 * RF["draws"]
    assert record["torch"] == torch.__version__


def test_resume_recomputes_nothing_and_a_changed_rf_block_is_refused(rf_store, cifar_format_root):
    before = store_snapshot(rf_store)
    summary = run(build_config(small_raw(cifar_format_root, rf_store)), progress=False)
    assert summary.tiles_computed == 0 and summary.tiles_done_before == 7
    # a different memory budget computes the same kernel: resuming with it is fine
    same_kernel = small_raw(cifar_format_root, rf_store, max_bytes="8MiB")
    assert run(build_config(same_kernel), progress=False).tiles_computed == 0
    for change in ({"width": 16}, {"draws": 3}, {"seed": 4}):
        with pytest.raises(UserError, match=f"kernel.random_features.{next(iter(change))}"):
            run(build_config(small_raw(cifar_format_root, rf_store, **change)), progress=False)
    without = small_raw(cifar_format_root, rf_store)
    del without["kernel"]["random_features"]
    with pytest.raises(UserError, match="kernel.random_features"):
        run(build_config(without), progress=False)
    assert store_snapshot(rf_store) == before


@pytest.mark.parametrize("change, words", [
    ({"width": 0}, ["kernel.random_features.width", ">= 1", "0"]),
    ({"draws": 0}, ["kernel.random_features.draws", ">= 1"]),
    ({"seed": -1}, ["kernel.random_features.seed", ">= 0"]),
    ({"widht": 8}, ["'widht'", "width, draws, seed, max_bytes"]),
    ({"max_bytes": "lots"}, ["kernel.random_features.max_bytes", "1GiB"]),
])
def test_bad_rf_settings_are_one_line_exit_2_and_leave_the_store_alone(rf_store, cifar_format_root, tmp_path, change,
                                                                       words):
    before = store_snapshot(rf_store)
    raw = small_raw(cifar_format_root, rf_store)
    raw["kernel"]["random_features"] = {**RF, **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["run", str(path), "--no-progress"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output
    assert all(w in lines[0] for w in words), lines[0]
    assert store_snapshot(rf_store) == before


def test_rf_without_torch_is_refused_before_any_store_is_touched(rf_store, cifar_format_root, tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "torch_available", lambda: False)
    before = store_snapshot(rf_store)
    for store in (rf_store, tmp_path / "new.zarr"):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(small_raw(cifar_format_root, store)))
        result = CliRunner().invoke(main, ["run", str(path), "--no-progress"])
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert "\n" not in line and "PyTorch" in line and "pip install -e .[rf]" in line, line
    assert store_snapshot(rf_store) == before and not (tmp_path / "new.zarr").exists()
    # without the block (or with it switched off, as `cntk run --no-random-features` does), torch is not needed
    raw = small_raw(cifar_format_root, tmp_path / "x.zarr")
    assert build_config(raw, {"kernel.random_features": False}).kernel.random_features is None
    del raw["kernel"]["random_features"]
    assert build_config(raw).kernel.random_features is None


def test_solve_gives_a_row_per_draw_and_the_summary_is_their_median_min_max(rf_store, tmp_path):
    rows = solve_store(rf_store, SolveOptions(validate=False, device="cpu", scratch_dir=tmp_path),
                       kernels=["rf-ntk-vanilla", "rf-ntk-gap", "ntk-vanilla"])
    assert [(r.kernel, r.draw) for r in rows] == [
        ("ntk-vanilla", None), ("rf-ntk-gap", 0), ("rf-ntk-gap", 1), ("rf-ntk-vanilla", 0), ("rf-ntk-vanilla", 1)]
    for row in rows:   # each per-draw accuracy against numpy's dense solve of that draw's Gram matrix
        assert row.ridgeless.accuracy == dense_accuracy(rf_store, row.kernel, 3, n_train=N_TRAIN, n_classes=2,
                                                        draw=row.draw)
    summaries = {s["kernel"]: s for s in rf_summaries(rows)}
    assert set(summaries) == {"rf-ntk-gap", "rf-ntk-vanilla"}
    for key, s in summaries.items():
        accs = [r.ridgeless.accuracy for r in rows if r.kernel == key]
        assert s["draws"] == 2 and s["depth"] == 3
        assert s["ridgeless"] == {"median": np.median(accs), "min": np.min(accs), "max": np.max(accs)}


def test_summary_of_odd_draws_and_failed_draws():
    def row(draw, acc, lam=1e-3):
        return {"kernel": "rf-ntk-vanilla", "depth": 4, "draw": draw, "ridgeless": {"lambda": 0.0, "accuracy": acc},
                "validated": {"lambda": lam, "accuracy": acc + 0.01},
                "selection": {"val_accuracy": [{"lambda": lam, "accuracy": acc - 0.1}]}}
    accs = [0.81, 0.60, 0.90, 0.70, 0.75]
    rows = [row(i, a, lam=1e-3 if i % 2 else 1e-2) for i, a in enumerate(accs)]
    rows.append({"kernel": "rf-ntk-vanilla", "depth": 4, "draw": 5, "error": "not computed"})
    (s,) = rf_summaries(rows)
    assert (s["draws"], s["draws_failed"]) == (5, 1)
    assert s["ridgeless"] == {"median": 0.75, "min": 0.60, "max": 0.90}
    assert s["validated"]["median"] == pytest.approx(0.76) and s["lambdas"] == [1e-3, 1e-2]
    (cells,) = table_cells(rows)
    assert cells[:4] == ("rf-ntk-vanilla (median of 5 draws, 1 failed)", "4", "75.00 [60.00, 90.00]", "0.001..0.01")


def _rows_for_table():
    exact = {"kernel": "ntk-vanilla", "depth": 3, "ridgeless": {"lambda": 0.0, "accuracy": 0.9}}
    rf = [{"kernel": "rf-ntk-vanilla", "depth": 3, "draw": d, "ridgeless": {"lambda": 0.0, "accuracy": a}}
          for d, a in enumerate((0.80, 0.86, 0.84))]
    gap = {"kernel": "ntk-gap", "depth": 3, "ridgeless": {"lambda": 0.0, "accuracy": 0.7}}
    return [exact, gap, *rf]


def test_report_prints_the_rf_paper_value_beside_ours_only_under_cifar2():
    cifar2 = Protocol(n_train=10_000, n_test=2_000, classes=(0, 1))
    cells = table_cells(_rows_for_table(), matching_columns(cifar2))
    # the rf line follows its exact twin; the paper's RF-from-CNTK-V depth-3 value is beside our median
    assert [c[0] for c in cells] == ["ntk-vanilla", "rf-ntk-vanilla (median of 3 draws)", "ntk-gap"]
    assert cells[0][-1] == "92.15" and cells[2][-1] == "71.05"
    assert cells[1][2] == "84.00 [80.00, 86.00]" and cells[1][-1] == "87.25"
    for other in (Protocol(n_train=2_000, n_test=2_000, classes=(0, 1)),     # other sizes
                  Protocol(n_train=10_000, n_test=2_000, classes=(0, 2)),    # other classes
                  Protocol(n_train=10_000, n_test=2_000, classes=(0, 1), first_images=False),
                  None):
        assert all(c[-1] == "n/a" for c in table_cells(_rows_for_table(), matching_columns(other)))
    narrow = Protocol(n_train=10_000, n_test=2_000, classes=(0, 1), rf_width=64)  # not the paper's 128 channels
    cells = table_cells(_rows_for_table(), matching_columns(narrow))
    assert cells[0][-1] == "92.15" and cells[1][-1] == "n/a"
    # the store's config decides: table2-cifar2.yaml's protocol gets all four Table 2 columns
    from cntk_gram.pipeline.config import load_config, to_dict
    config = to_dict(load_config(Path(__file__).resolve().parents[1] / "configs/paper/table2-cifar2.yaml"))
    columns = matching_columns(Protocol.from_config(config, n_train=10_000, n_test=2_000))
    assert {c.column for c in columns.values()} == {"CNTK-V", "CNTK-GAP", "RF from CNTK-V", "RF from CNTK-GAP"}
    config["kernel"]["random_features"]["width"] = 256
    assert set(matching_columns(Protocol.from_config(config, n_train=10_000, n_test=2_000))) == {"ntk-vanilla",
                                                                                                 "ntk-gap"}
