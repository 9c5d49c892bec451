"""Predicted wall time (pipeline.predict): it exists, is positive, grows with pairs and depth, is cached per machine,
shows up in the dry run, the plan line, the progress ETA (predicted before the first tile, then measured) and
`cntk status`, and `cntk solve --dry-run`. No verdict depends on the machine's speed."""
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cluster_procs import write_config
from cntk_gram.pipeline import predict
from cntk_gram.pipeline.cli import main
from cntk_gram.pipeline.plan import block_bounds, plan_tiles
from cntk_gram.pipeline.ridge import SolveOptions

REPO = Path(__file__).resolve().parents[1]

# fixed rates: the model's arithmetic without measuring anything
RATES = {"backend": "cpu", "kernels": {"vanilla": {"seconds_per_pair": 1e-5, "seconds_per_call": 1e-3}},
         "rf": {}, "io": {"write_chunk_s": 1e-3, "write_bps": 1e9, "read_chunk_s": 1e-3, "read_bps": 1e9},
         "cached": True, "load": 0.0}


def predicted(n_train, n_test, size, rates=RATES, workers=1):
    bounds = block_bounds(n_train=n_train, n_test=n_test, size=size)
    todo = plan_tiles(n_train=n_train, n_test=n_test, size=size)
    return predict.predict_run(rates, todo=todo, bounds=bounds, arrays=2, size=size, image_bytes=3072 * 4,
                               workers=workers, startup=1.0)


def test_the_prediction_is_positive_and_grows_with_pairs():
    small, large = predicted(100, 50, 50), predicted(400, 200, 50)
    assert 0 < small.seconds < large.seconds and large.pairs > small.pairs
    assert small.parts["parallel"] > 0 and small.parts["serial"] > 0 and small.parts["startup"] == 1.0
    two = predicted(400, 200, 50, workers=2)          # more workers: less wall time, the same work per worker
    assert two.seconds < large.seconds and two.worker_seconds == pytest.approx(large.worker_seconds)
    assert predict.lane_pairs(3, 20, False) == 3 * 32 and predict.lane_pairs(20, 20, True) >= 20 * 21 // 2
    assert predict.makespan([4, 1, 1, 1, 1], 2) == 4 and predict.makespan([1, 1], 1) == 2


def test_the_probe_grows_with_depth_and_is_cached_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv(predict.CACHE_ENV, str(tmp_path / "cache"))
    images = np.random.default_rng(0).standard_normal((40, 8, 8, 3)).astype(np.float32)

    def tile(depth, **kw):
        rates = predict.calibrate(images, backend="cpu", archs=("vanilla",), max_depth=depth, threads=1,
                                  store=str(tmp_path / "s.zarr"), tile=64, **kw)
        return rates, predict.tile_seconds(rates, 64, 64, False, arrays=2, size=64, image_bytes=8 * 8 * 3 * 4)

    shallow, (p3, s3) = tile(3)
    deep, (p21, s21) = tile(21)
    assert 0 < p3 + s3 < p21 + s21 and not shallow["cached"]
    again, _ = tile(21)
    assert again["cached"] and again["kernels"] == deep["kernels"]
    assert not tile(21, recalibrate=True)[0]["cached"]
    doc = json.loads((tmp_path / "cache" / predict.CACHE_FILE).read_text())
    assert doc["machine"] == predict.machine() and any("|d21|8x8x3|" in key for key in doc["entries"])
    doc["machine"]["host"] = "another-host"                 # rates of another machine are not used
    (tmp_path / "cache" / predict.CACHE_FILE).write_text(json.dumps(doc))
    assert not tile(21)[0]["cached"]


def test_eta_is_predicted_before_the_first_tile_then_measured():
    eta = predict.Eta(100.0, pairs_todo=1000, started=0.0)
    assert eta.seconds(0, now=30.0) == (70.0, "predicted") and "(predicted)" in eta.text(0, now=30.0)
    left, source = eta.seconds(250, now=40.0)
    assert source == "measured" and left == pytest.approx(120.0) and "(measured)" in eta.text(250, now=40.0)
    assert predict.Eta(None, 10).text(0) == "ETA unknown"
    assert predict.duration(42) == "42 s" and predict.duration(3 * 86400 + 7200) == "3 d 2 h"


def test_slow_cpu_runs_warn_once_only_where_the_gpu_takes_the_kernels():
    slow = predict.RunPrediction(seconds=predict.WARN_SECONDS + 1, backend="cpu")
    line = predict.slow_cpu_warning(slow, gpu_takes_it=True)
    assert line.startswith("warning:") and "--backend gpu" in line and "\n" not in line
    assert predict.slow_cpu_warning(slow, gpu_takes_it=False) is None                 # fc only, or images too big
    assert predict.slow_cpu_warning(predict.RunPrediction(seconds=60, backend="cpu"), gpu_takes_it=True) is None


def test_dry_run_and_run_show_the_prediction_and_a_predicted_eta_from_the_start(tmp_path, cifar_format_root,
                                                                                  monkeypatch):
    store = tmp_path / "s.zarr"
    config = write_config(tmp_path / "c.yaml", data_root=cifar_format_root, store=store, train=16, test=8, tile=8,
                          depths=(3,), cluster={"threads": 1})
    dry = CliRunner().invoke(main, ["run", str(config), "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    p = json.loads(dry.stdout)["predicted"]
    assert p["seconds"] > 0 and p["workers"] == 1 and p["backend"] == "cpu" and p["pairs"] > 0
    assert not store.exists()
    monkeypatch.setattr(predict, "WARN_SECONDS", 0)       # every CPU conv run is "too long": the warning shows
    text = CliRunner().invoke(main, ["run", str(config), "--dry-run"])
    assert text.exit_code == 0 and "predicted" in text.stdout and "(cpu, probe cached" in text.stdout
    assert sum(line.startswith("warning:") for line in text.stderr.splitlines()) == 1

    done = CliRunner().invoke(main, ["run", str(config), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["predicted_seconds"] > 0
    lines = done.stderr.replace("\r", "\n").splitlines()
    assert lines[0].startswith("warning:") or lines[1].startswith("warning:")      # before the first tile
    first_bar = next(line for line in lines if "tiles 0/" in line)
    assert "ETA" in first_bar and "(predicted)" in first_bar
    assert any("(measured)" in line for line in lines)


def test_status_shows_the_predicted_eta_until_a_tile_of_the_run_finishes(tmp_path, cifar_format_root):
    from cntk_gram.pipeline.inspect import status
    from cntk_gram.pipeline.records import record_path, write_prediction

    store = tmp_path / "s.zarr"
    config = write_config(tmp_path / "c.yaml", data_root=cifar_format_root, store=store, train=16, test=8, tile=8,
                          archs=("fc",))
    assert CliRunner().invoke(main, ["run", str(config), "--no-progress"]).exit_code == 0
    record_path(store, (0, 0)).unlink()                     # one tile to do
    assert status(store)["eta_source"] == "measured"        # the run's own prediction: its tiles have finished since
    write_prediction(store, {"seconds": 500.0, "pairs": 10, "made": time.time() + 1})   # a run starting now
    s = status(store)
    assert s["eta_source"] == "predicted" and 400 < s["eta_seconds"] <= 501 and s["predicted_seconds"] == 500
    result = CliRunner().invoke(main, ["status", str(store)])
    assert "(predicted)" in result.output


def test_solve_dry_run_lists_the_factorisations_with_time_and_memory(reference_store, tmp_path):
    result = CliRunner().invoke(main, ["solve", str(reference_store), "--dry-run", "--json", "--depth", "3"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    steps = plan["factorisations"]
    assert plan["seconds"] > 0 and plan["peak_bytes"] > 0 and plan["solved"] == 2
    assert len(steps) == 2 * (1 + len(SolveOptions().lambdas) + 1)   # per kernel: λ = 0, the grid, validated fit
    assert all(s["seconds"] > 0 and s["n"] > 0 for s in steps)
    curve = CliRunner().invoke(main, ["solve", str(reference_store), "--dry-run", "--json", "--depth", "3",
                                      "--no-validation", "--train-sizes", "40,80"])
    assert curve.exit_code == 0, curve.output
    assert [s["n"] for s in json.loads(curve.stdout)["factorisations"]] == [120, 120]   # one shared per kernel
    text = CliRunner().invoke(main, ["solve", str(reference_store), "--dry-run", "--no-validation"])
    assert text.exit_code == 0 and "predicted" in text.output and "in core" in text.output
    missing = CliRunner().invoke(main, ["solve", str(tmp_path / "none.zarr"), "--dry-run"])
    assert missing.exit_code == 2 and missing.output.startswith("Error: ") and len(missing.output.splitlines()) == 1


def test_factor_cost_follows_the_solves_own_plan_and_grows_with_n():
    from cntk_gram.pipeline.linalg import plan_factor

    rates = {"potrf_flops": 1e10, "gemm_flops": 2e10, "read_bps": 1e9, "write_bps": 1e9}
    small = predict.factor_cost(4000, chunk=500, memory_budget=2**34, rates=rates, read_bytes=0)
    large = predict.factor_cost(8000, chunk=500, memory_budget=2**34, rates=rates, read_bytes=0)
    assert 0 < small[3] < large[3] and not small[1] and small[0] == 1
    tight = predict.factor_cost(8000, chunk=500, memory_budget=2**28, rates=rates, read_bytes=0)
    plan = plan_factor(8000, chunk=500, memory_budget=2**28)
    assert (tight[0], tight[1]) == (len(plan.bounds), plan.on_disk) and tight[1]
    assert tight[3] > large[3] and tight[2] < large[2]      # out of core: slower, less memory


# seconds per pair (2 quiet cores, benchmarks/results/cpu-kernel.json at depth 21; fc-kernel.json): stand-in probes
STAND_IN = {"vanilla": 2e-5, "gap": 2.6e-2, "fc": 1e-7}


@pytest.fixture
def stand_in_probes(monkeypatch, tmp_path):
    """The probes replaced by fixed rates (and their own cache): the dry runs' arithmetic, not this machine's speed."""
    monkeypatch.setenv(predict.CACHE_ENV, str(tmp_path / "stand-in-cache"))
    monkeypatch.setattr(predict, "probe_kernel", lambda images, *, arch, **_: {
        "seconds_per_pair": STAND_IN[arch], "seconds_per_call": 1e-3, "warmup_seconds": 0.0})
    monkeypatch.setattr(predict, "probe_rf", lambda images, **_: {"seconds_per_gradient": 0.05})
    monkeypatch.setattr(predict, "probe_io", lambda directory, **_: {
        "write_chunk_s": 1e-3, "write_bps": 2e8, "read_chunk_s": 1e-3, "read_bps": 1e9})


CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))


INPUTS = {}   # DataConfig -> Inputs: the configs of all 60,000 images load them once


@pytest.mark.parametrize("name", CONFIGS)
def test_the_dry_run_of_every_config_prints_a_predicted_time(name, cifar_root, tmp_path, stand_in_probes,
                                                             monkeypatch):
    """Each config as shipped (its sizes, archs, depths, LAP, flip, random features, tiles), on the real CIFAR-10
    counts; an `arrays` config gets random arrays of its documented shapes."""
    from cntk_gram.pipeline import run
    from cntk_gram.pipeline.config import load_config

    load = run.prepare_inputs
    monkeypatch.setattr(run, "prepare_inputs", lambda data: INPUTS[data] if data in INPUTS else
                        INPUTS.setdefault(data, load(data)) if data.source == "cifar10" else load(data))

    data = ["--data-root", str(cifar_root)]
    if load_config(REPO / name).data.source == "arrays":      # configs/digits.yaml: (1300, 8, 8) + (497, 8, 8)
        rng = np.random.default_rng(0)
        np.savez(tmp_path / "a.npz", x_train=rng.random((1300, 8, 8)), y_train=rng.integers(0, 10, 1300),
                 x_test=rng.random((497, 8, 8)), y_test=rng.integers(0, 10, 497))
        data = ["--data-path", str(tmp_path / "a.npz")]
    result = CliRunner().invoke(main, ["run", str(REPO / name), "--dry-run", "--store", str(tmp_path / "s.zarr"),
                                       *data])
    full_disk = result.exit_code == 2 and "free space or choose another store path" in result.output  # table1: 66 GiB
    assert result.exit_code == 0 or full_disk, result.output
    assert re.search(r"; predicted \d+ (s|min|h|d)\b", result.stdout), result.stdout
    if name == "configs/paper/table1-2000.yaml":              # CNTK-GAP at depth 21 on the CPU: about a week
        assert "--backend gpu" in result.stderr and result.stderr.count("warning:") == 1


def test_a_dry_run_for_a_cluster_predicts_per_worker_and_says_the_workers_are_unknown(tmp_path, cifar_format_root,
                                                                                      stand_in_probes):
    config = write_config(tmp_path / "c.yaml", data_root=cifar_format_root, store=tmp_path / "s.zarr", train=40,
                         test=20, tile=20)
    result = CliRunner().invoke(main, ["run", str(config), "--dry-run", "--json", "--scheduler", "tcp://127.0.0.1:9"])
    assert result.exit_code == 0, result.output
    p = json.loads(result.stdout)["predicted"]
    assert p["seconds"] is None and p["workers"] is None and p["worker_seconds"] > 0 and "cluster" in p["reason"]
    text = CliRunner().invoke(main, ["run", str(config), "--dry-run", "--scheduler", "tcp://127.0.0.1:9"])
    assert "per worker" in text.stdout and "does not contact the cluster" in text.stdout


@pytest.mark.parametrize("arch, options", [("gap", {"lap": (2,), "flip": True}), ("fc", {})])
def test_every_arch_can_be_probed(arch, options):
    images = np.random.default_rng(0).standard_normal((24, 8, 8, 3)).astype(np.float32)
    rates = predict.probe_kernel(images, backend="cpu", arch=arch, max_depth=3, threads=1, tile=8, **options)
    assert rates["seconds_per_pair"] > 0 and rates["seconds_per_call"] >= 0
    rf = predict.probe_rf(images, arch="vanilla", max_depth=3, width=8, kinds=("ntk",), max_bytes=2**28, device="cpu")
    assert rf["seconds_per_gradient"] > 0
