"""Disk space: a run that cannot fit stops before its first tile; a disk that fills during a run loses nothing."""
import json
from pathlib import Path

import numpy as np
import zarr

from cluster_procs import cntk, write_config
from cntk_gram.pipeline.plan import run_cost
from cntk_gram.pipeline.store import all_records, layout, planned_tiles, verify_tile

QUOTA_PRELOAD = Path(__file__).resolve().parent / "disk_quota.py"


def _grams(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return {name: group[name][:] for name in layout(store)["arrays"]}


def test_cost_counts_tiles_pairs_and_bytes(tmp_path):
    cost = run_cost(n_train=6, n_test=3, size=3, test_test=False, arrays=2, store_path=tmp_path / "new.zarr")
    # blocks: train 0, 1, test 2; tiles (0,0) (0,1) (0,2) (1,1) (1,2)
    assert (cost.tiles_total, cost.tiles_todo) == (5, 5)
    assert cost.pairs_total == cost.pairs_todo == 6 + 9 + 9 + 6 + 9
    assert cost.store_bytes == cost.bytes_todo == 5 * 2 * (3 * 3 * 4 + 4)
    assert cost.free_bytes > 0


def test_a_run_that_cannot_fit_stops_before_the_first_tile(tmp_path, cifar_format_root, monkeypatch):
    import shutil

    from click.testing import CliRunner

    from cntk_gram.pipeline.cli import main

    config = write_config(tmp_path / "c.yaml", data_root=cifar_format_root, store=tmp_path / "s.zarr", train=8, test=4,
                          tile=4, archs=("fc",))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("cntk_gram.pipeline.plan.shutil.disk_usage", lambda path: usage._replace(free=10**6))
    done = CliRunner().invoke(main, ["run", str(config), "--no-progress"])
    assert done.exit_code == 2
    errors = [line for line in done.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "0.00 GiB free" in errors[0] and "needs" in errors[0], done.output
    assert not (tmp_path / "s.zarr").exists()


def test_a_full_disk_fails_the_tile_keeps_the_rest_and_resumes_bit_identically(tmp_path, cifar_format_root):
    sizes = dict(data_root=cifar_format_root, train=24, test=8, tile=4, archs=("fc",), depths=(3,))
    whole = write_config(tmp_path / "a.yaml", store=tmp_path / "a.zarr", **sizes)
    assert cntk("run", whole, "--no-progress").returncode == 0

    quota = tmp_path / "quota"
    quota.write_text("15")         # 7 tiles of 2 arrays, then one chunk of the 8th tile
    env = dict(DASK_DISTRIBUTED__WORKER__PRELOAD=json.dumps([str(QUOTA_PRELOAD)]), CNTK_DISK_QUOTA=str(quota))
    store = tmp_path / "b.zarr"
    config = write_config(tmp_path / "b.yaml", store=store, **sizes)
    failed = cntk("run", config, "--no-progress", **env)
    assert failed.returncode != 0
    errors = [line for line in failed.stdout.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "disk is full" in errors[0] and "rerun" in errors[0], failed.stdout

    records = all_records(store)
    assert len(records) == 7 < len(planned_tiles(layout(store)))
    assert not any(verify_tile(store, tile, record=record) for tile, record in records.items())

    quota.unlink()                 # space freed
    assert cntk("run", config, "--no-progress", **env).returncode == 0
    expected, got = _grams(tmp_path / "a.zarr"), _grams(store)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def test_dry_run_prints_the_cost_as_json_and_touches_nothing(tmp_path, cifar_format_root, monkeypatch):
    import shutil

    from click.testing import CliRunner

    from cntk_gram.pipeline.cli import main

    config = write_config(tmp_path / "c.yaml", data_root=cifar_format_root, store=tmp_path / "s.zarr", train=8, test=4,
                          tile=4, archs=("fc",), depths=(3, 4))
    done = CliRunner().invoke(main, ["run", str(config), "--dry-run", "--json"])
    assert done.exit_code == 0, done.output
    cost = json.loads(done.stdout)
    expected = run_cost(n_train=8, n_test=4, size=4, test_test=False, arrays=4, store_path=tmp_path)
    assert (cost["tiles_todo"], cost["pairs_todo"], cost["store_bytes"]) == (
        expected.tiles_total, expected.pairs_total, expected.store_bytes)
    assert cost["fits"] and not (tmp_path / "s.zarr").exists()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("cntk_gram.pipeline.plan.shutil.disk_usage", lambda path: usage._replace(free=10**6))
    refused = CliRunner().invoke(main, ["run", str(config), "--dry-run"])
    assert refused.exit_code == 2 and sum(line.startswith("Error:") for line in refused.output.splitlines()) == 1
