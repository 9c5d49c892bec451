"""End to end on CIFAR-format images (the synthetic set of tests/_images.py): tiles vs whole block, SIGKILL + resume,
a real multi-process cluster, and the read-side commands (status, inspect, verify, export) on the result."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

from cntk_gram.pipeline.cli import main
from cntk_gram.pipeline.config import build_config
from cntk_gram.pipeline.data import prepare_inputs
from cntk_gram.pipeline.errors import UserError
from cntk_gram.pipeline.run import run
from cntk_gram.pipeline.records import read_record
from cntk_gram.pipeline.store import all_records, array_name, open_gram, prepare_store, tile_status
from cntk_gram.workers.backends import get_backend
from cntk_gram.workers.reference import cntk_reference, fc_reference

from cluster_procs import TileLog, wait_for_records, wait_for_workers, wait_until
from small_stores import LAP, LAP_FLIP, PIPELINE, RF_SMALL, assert_tiles_assemble_to_whole, raw_config

REPO = Path(__file__).resolve().parents[1]
SMALL = PIPELINE   # the reference store's config (conftest.reference_store): 120 + 40 images, 33 tiles


def subprocess_env():
    return {**os.environ, "NUMBA_NUM_THREADS": "1"}   # the installed package (pip install -e .), one numba thread


def write_config(path, raw, *, root, store):
    path.write_text(yaml.safe_dump(raw_config(raw, root, store)))
    return path


def gram_arrays(store):
    group = zarr.open_group(store, mode="r")
    return {name: group[name][:] for name in group.attrs["layout"]["arrays"]}


def _exact_whole(images, *, archs, depths, **options):
    """{(key, depth, None): the CPU backend's kernel of the whole block at once}."""
    whole = get_backend("cpu").tile_kernels(images, None, archs=archs, max_depth=max(depths), **options)
    return {(key, depth, None): stack[depth - 2] for key, stack in whole.items() for depth in depths}


def _rf_whole(images, *, config):
    from cntk_gram.workers.rf import rf_tile_kernels

    rf, kernel = config["random_features"], {k: tuple(v) for k, v in config.items() if k in ("archs", "kinds")}
    out = {}
    for draw in range(rf["draws"]):
        stacks = rf_tile_kernels(images, None, depths=tuple(config["depths"]), width=rf["width"], draw=draw,
                                 seed=rf["seed"], device="cpu", **kernel)
        out.update({(key, depth, draw): stack[i] for key, stack in stacks.items()
                    for i, depth in enumerate(config["depths"])})
    return out


# (store fixture, its config, the whole block's kernels from the images, rtol, atol as a share of the largest entry)
WHOLE_CASES = {
    "vanilla": ("reference_store", PIPELINE,
                lambda x: _exact_whole(x, archs=("vanilla",), depths=PIPELINE["kernel"]["depths"]), 2e-6, 0.0),
    "gap-lap-flip": ("lap_store", LAP_FLIP,
                     lambda x: _exact_whole(x, archs=("gap",), depths=(3,), lap=LAP, flip=True), 1e-5, 1e-6),
    "random-features": ("rf_store", RF_SMALL,   # the exact kernels beside every draw's
                        lambda x: {**_exact_whole(x, archs=("vanilla", "gap"), depths=(3,)),
                                   **_rf_whole(x, config=RF_SMALL["kernel"])}, 1e-5, 1e-6),
}


@pytest.mark.parametrize("case", list(WHOLE_CASES))
def test_gram_from_tiles_equals_whole_block(case, request):
    """Every array of a computed store (exact kernels, LAP and flip keys, each random-features draw), assembled
    from its tiles, equals the same kernel computed on the whole block of images at once."""
    fixture, config, whole, rtol, atol_scale = WHOLE_CASES[case]
    store = request.getfixturevalue(fixture)
    images = zarr.open_array(store, path="inputs/images", mode="r")[:]
    expected = whole(images)
    arrays = zarr.open_group(store, mode="r").attrs["layout"]["arrays"]
    assert sorted(array_name(*key) for key in expected) == sorted(arrays)   # every stored array is compared
    assert_tiles_assemble_to_whole(store, expected, n_train=config["data"]["train"], rtol=rtol,
                                   atol_scale=atol_scale)


def test_cross_tile_entry_equals_the_float64_oracle(reference_store):
    """One train x test entry of the reference store, from two different tiles, against the brute-force oracle."""
    images = zarr.open_array(reference_store, path="inputs/images", mode="r")[:]
    oracle = cntk_reference(images[[25]], images[[150]], max_depth=3, archs=("vanilla",))
    gram = open_gram(reference_store, "ntk-vanilla", 3).compute()
    np.testing.assert_allclose(gram[25, 150], oracle["ntk-vanilla"][1, 0, 0], rtol=1e-5)
    np.testing.assert_allclose(gram[150, 25], oracle["ntk-vanilla"][1, 0, 0], rtol=1e-5)


def test_gap_and_fc_tiles_match_the_oracle(cifar_format_root, tmp_path):
    """Every arch through the pipeline on a handful of images, test x test included."""
    raw = {"data": {"root": str(cifar_format_root), "train": 4, "test": 2, "test_test": True},
           "kernel": {"archs": ["vanilla", "gap", "fc"], "depths": [2, 3]}, "tiles": {"size": 2},
           "backend": "cpu", "store": str(tmp_path / "gap.zarr"), "cluster": {"threads": 1}}
    summary = run(build_config(raw), progress=False)
    assert summary.tiles_computed == 6
    images = zarr.open_array(tmp_path / "gap.zarr", path="inputs/images", mode="r")[:]
    rows, cols = [0, 1, 3], [2, 4, 5]  # entries from different tiles, train x test and test x test
    oracle = cntk_reference(images[rows], images[cols], max_depth=3, archs=("vanilla", "gap"))
    for key in ("ntk-gap", "nngp-gap", "ntk-vanilla"):
        for depth in (2, 3):
            gram = open_gram(tmp_path / "gap.zarr", key, depth).compute()
            assert not np.isnan(gram).any()
            np.testing.assert_allclose(gram[np.ix_(rows, cols)], oracle[key][depth - 2], rtol=1e-5)
            np.testing.assert_array_equal(gram, gram.T)
    fc_oracle = fc_reference(images[rows], images[cols], max_depth=3)
    for key in ("ntk-fc", "nngp-fc"):
        gram = open_gram(tmp_path / "gap.zarr", key, 3).compute()
        np.testing.assert_allclose(gram[np.ix_(rows, cols)], fc_oracle[key][1], rtol=1e-5)


def test_sigkill_then_resume_is_bit_identical(cifar_format_root, reference_store, tmp_path):
    store = tmp_path / "killed.zarr"
    config = write_config(tmp_path / "c.yaml", SMALL, root=cifar_format_root, store=store)
    command = [sys.executable, "-m", "cntk_gram.pipeline.cli", "run", str(config), "--no-progress"]
    # the embedded cluster's worker may start only KILL_AFTER tiles (tests/tile_gate.py), so the kill lands
    # part-way through the 33 tiles however fast or slow this machine is
    KILL_AFTER, tiles = 3, TileLog(tmp_path)
    tiles.allow_starts(KILL_AFTER)
    process = subprocess.Popen(command, cwd=tmp_path, env={**subprocess_env(), **tiles.embedded_env()},
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_records(store, KILL_AFTER, procs=[process])
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the CLI and its local-cluster worker processes
        process.wait()
    assert process.returncode == -signal.SIGKILL, process.stdout.read().decode()
    assert tiles.starts() == KILL_AFTER  # the gate was in the embedded cluster's worker

    done_before, planned = tile_status(store)
    assert len(done_before) == KILL_AFTER < len(planned), "the run was not interrupted part-way"
    records_before = {t: read_record(store, t) for t in done_before}

    resumed = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    expected_line = f"tiles     {len(planned) - len(done_before)} computed"
    assert expected_line in resumed.stdout, resumed.stdout
    for tile, record in records_before.items():
        assert read_record(store, tile) == record  # finished tiles were not recomputed
    assert tile_status(store)[0] == set(planned)

    reference, resumed_arrays = gram_arrays(reference_store), gram_arrays(store)
    assert reference.keys() == resumed_arrays.keys()
    for name in reference:
        np.testing.assert_array_equal(resumed_arrays[name], reference[name])
        assert resumed_arrays[name].tobytes() == reference[name].tobytes()


def test_two_slots_on_one_cpu_worker_run_tiles_at_once_and_match(cifar_format_root, reference_store, tmp_path):
    """cluster.slots 2 on the CPU backend: one worker process holds two tiles at once (each parked before its
    completion record by tests/tile_gate.py until both are there, so one slot could never get there), its numba
    kernels with 2 threads each do not clash, and the Gram is the one-slot run's, bit for bit."""
    raw = json.loads(json.dumps(SMALL))
    raw["cluster"] = {"workers": 1, "threads": 2, "slots": 2}
    store = tmp_path / "slots.zarr"
    config = write_config(tmp_path / "c.yaml", raw, root=cifar_format_root, store=store)
    tiles = TileLog(tmp_path)
    tiles.hold.touch()
    process = subprocess.Popen([sys.executable, "-m", "cntk_gram.pipeline.cli", "run", str(config), "--no-progress"],
                               cwd=tmp_path, env={**subprocess_env(), **tiles.embedded_env()},
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        held = lambda: {(tile, pid) for event, tile, pid in tiles.events() if event == "hold"}
        wait_until(lambda: len(held()) >= 2, what="two tiles held at once", procs=[process])
        assert len({pid for _, pid in held()}) == 1  # both in the one worker process
        tiles.hold.unlink()
        output = process.communicate()[0].decode()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, output
    assert "tiles     33 computed" in output, output
    reference, computed = gram_arrays(reference_store), gram_arrays(store)
    assert reference.keys() == computed.keys()
    for name in reference:
        assert computed[name].tobytes() == reference[name].tobytes(), name


def test_real_multiprocess_cluster_matches_local_run(cifar_format_root, reference_store, tmp_path):
    env = subprocess_env()
    scheduler_file = tmp_path / "scheduler.json"
    started = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                 "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                                env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)]
    try:
        wait_until(scheduler_file.exists, what="the scheduler file", procs=started)
        address = json.loads(scheduler_file.read_text())["address"]
        for name in ("w1", "w2"):
            started.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                 "--nworkers", "1", "--name", name, "--no-dashboard"],
                env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True))
        wait_for_workers(address, 2, procs=started)
        store = tmp_path / "cluster.zarr"
        config = write_config(tmp_path / "c.yaml", SMALL, root=cifar_format_root, store=store)
        result = subprocess.run([sys.executable, "-m", "cntk_gram.pipeline.cli", "run", str(config), "--no-progress",
                                 "--scheduler", address], cwd=tmp_path, env=env, capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr
    finally:
        for process in started:  # each in its own session: the group holds the nanny and its worker
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    workers = {record["worker"] for record in all_records(store).values()}
    assert len(workers) == 2, workers  # both worker processes computed tiles
    reference, clustered = gram_arrays(reference_store), gram_arrays(store)
    for name in reference:
        np.testing.assert_array_equal(clustered[name], reference[name])


def test_read_commands_and_damage_repair(reference_store, tmp_path):
    store = tmp_path / "copy.zarr"
    shutil.copytree(reference_store, store)
    runner = CliRunner()

    result = runner.invoke(main, ["status", str(store)])
    assert result.exit_code == 0 and "tiles 33/33" in result.output
    assert "gram/ntk-vanilla/depth-11" in result.output and "33/33" in result.output

    result = runner.invoke(main, ["inspect", str(store), "--out", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    assert "120 train + 40 test" in result.output
    assert (tmp_path / "png" / "coverage.png").read_bytes()[:4] == b"\x89PNG"
    result = runner.invoke(main, ["inspect", str(store), "--tile", "1", "6", "--out", str(tmp_path / "png"),
                                  "--kernel", "nngp-vanilla", "--depth", "3"])
    assert result.exit_code == 0, result.output
    assert "nan 0" in result.output and (tmp_path / "png" / "tile-1-6.png").exists()

    out = tmp_path / "k.npy"
    result = runner.invoke(main, ["export", str(store), "--kernel", "ntk-vanilla", "--depth", "11",
                                  "--out", str(out)])
    assert result.exit_code == 0, result.output
    exported = np.load(out)
    np.testing.assert_array_equal(exported, open_gram(store, "ntk-vanilla", 11).compute())
    np.testing.assert_array_equal(exported[:120], exported[:, :120].T)

    result = runner.invoke(main, ["verify", str(store)])
    assert result.exit_code == 0 and "33 tiles checked" in result.output and "0 problems" in result.output

    chunk = store / "gram" / "nngp-vanilla" / "depth-3" / "c" / "2" / "4"
    raw = bytearray(chunk.read_bytes())
    raw[100] ^= 0x01
    chunk.write_bytes(bytes(raw))
    result = runner.invoke(main, ["verify", str(store)])
    assert result.exit_code == 1 and "tile (2, 4) gram/nngp-vanilla/depth-3" in result.output

    image_chunk = store / "inputs" / "images" / "c" / "3" / "0" / "0" / "0"
    pristine = image_chunk.read_bytes()
    image_chunk.write_bytes(pristine[:-1] + bytes([pristine[-1] ^ 0x10]))
    result = runner.invoke(main, ["verify", str(store)])
    assert result.exit_code == 1 and "inputs: unreadable" in result.output
    image_chunk.write_bytes(pristine)

    raw_config = zarr.open_group(store, mode="r").attrs["config"]
    raw_config["store"] = str(store)
    summary = run(build_config(raw_config), progress=False)
    assert (summary.tiles_damaged, summary.tiles_computed) == (1, 1)
    assert runner.invoke(main, ["verify", str(store)]).exit_code == 0
    np.testing.assert_array_equal(gram_arrays(store)["gram/nngp-vanilla/depth-3"],
                                  gram_arrays(reference_store)["gram/nngp-vanilla/depth-3"])


def test_failing_tile_stops_with_one_line_and_keeps_finished_tiles(cifar_format_root, tmp_path):
    store = tmp_path / "f.zarr"
    raw = {"data": {"root": str(cifar_format_root), "train": 40, "test": 0}, "kernel": {"archs": ["vanilla"],
           "depths": [2]}, "tiles": {"size": 20}, "backend": "cpu", "store": str(store),
           "cluster": {"threads": 1, "retries": 1, "max_in_flight": 1}}
    config = build_config(raw)
    prepare_store(store, config=config, inputs=prepare_inputs(config.data))
    # a directory where chunk (0, 1) must go makes every attempt at that tile fail
    (store / "gram" / "ntk-vanilla" / "depth-2" / "c" / "0" / "1").mkdir(parents=True)
    with pytest.raises(UserError, match="tile task failed after 1 retries"):
        run(config, progress=False)
    assert (0, 0) in tile_status(store)[0] and (0, 1) not in tile_status(store)[0]
    shutil.rmtree(store / "gram" / "ntk-vanilla" / "depth-2" / "c" / "0" / "1")
    summary = run(config, progress=False)
    assert summary.tiles_computed == 3 - summary.tiles_done_before and summary.tiles_done_before >= 1
    assert tile_status(store)[0] == set(tile_status(store)[1])
