"""benchmarks/gpu_campaign.py and its parts (benchmarks/campaign/): the rehearsal runs every stage on the CPU; the
deadline supervisor, the rate model, the Markdown writer and the state across calls each on their own; budget, bad
input and no-GPU exits. No verdict here depends on the machine's speed: the supervisor's clock is driven by the
command's progress, and budget decisions are made on a clock that stands still."""
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from _images import SYNTHETIC_TEST, SYNTHETIC_TRAIN
from benchmarks import bench_gpu, gpu_campaign
from benchmarks.campaign import rates, stages
from benchmarks.campaign.markdown import campaign_markdown
from benchmarks.campaign.state import Campaign, resume_state, write_records
from benchmarks.campaign.supervisor import CommandFailed, OutOfTime, Supervisor

REPO = Path(__file__).resolve().parents[1]


def _campaign(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_campaign", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True)


def _write(c: Campaign, commit: str) -> None:
    write_records(c, commit, order=gpu_campaign.STAGES, markdown=campaign_markdown)


# ------------------------------------------------------------------ the whole campaign, rehearsed

@pytest.mark.slow
def test_rehearsal_runs_every_stage_and_writes_records(tmp_path, cifar_format_root):
    out, work = tmp_path / "out", tmp_path / "work"
    # a budget no machine comes near: what runs is decided by the stage list, not by this machine's speed
    run = _campaign("--rehearse", "--out", out, "--work", work, "--data-root", cifar_format_root,
                    "--budget-s", 10**6)
    assert run.returncode == 0, run.stdout + run.stderr + (out / "campaign.log").read_text()
    doc = json.loads((out / "campaign.json").read_text())
    assert [s["name"] for s in doc["stages"]] == list(gpu_campaign.STAGES)
    assert gpu_campaign.STAGES.index("kernels") < gpu_campaign.STAGES.index("tests")
    assert {s["name"]: s["status"] for s in doc["stages"]} == {name: "done" for name in gpu_campaign.STAGES}
    assert doc["rehearse"] is True and len(doc["git_commit"]) >= 40
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    for name in ("table1-v", "gap-2k", "cifar2-v", "cifar2-gap"):
        assert "| kernel | depth |" in (out / f"results-{name}.md").read_text()
    md = (out / "campaign.md").read_text()
    for stage in gpu_campaign.STAGES:
        assert f"| {stage} | 1 | done |" in md
    assert "results-table1-v.md" not in md and "| ntk-vanilla | 4 |" in md   # the solver's table, embedded
    by_name = {s["name"]: s["result"] for s in doc["stages"]}
    table1 = by_name["table1-v"]["runs"]["table1-v"]
    assert table1["depths"] == [3, 4] and table1["tiles_computed"] == 5 and "kernel_s" in table1
    assert (table1["n_train"], table1["n_test"], table1["pairs"]) == (20, 10, rates.pairs_of(20, 10))
    assert table1["validated"] == "done" and "validated lam: done" in md
    # the validated solve's table replaced the lam = 0 one: the lam* column is filled
    assert re.search(r"\| ntk-vanilla \| 4 \| [\d.]+ \| [^ |]+ \|", (out / "results-table1-v.md").read_text())
    # the tests stage ran pytest on the GPU tests (skipped here: no GPU); the kernels stage left the float64
    # check to it
    assert by_name["tests"]["command"].startswith("pytest -m gpu") and "skipped" in by_name["tests"]["summary"]
    assert by_name["kernels"]["accuracy"].startswith("skipped")
    # the env stage says what the host reports (RAM may grow on a lent machine: the solve reads it again)
    host = by_name["env"]["host"]
    assert host["mem_total_gib"] > 0 and host["cpus"] >= 1 and host["disk_free_gib"] > 0
    assert set(by_name["env"]["packages"]) == set(stages.PACKAGES) and "cuda-core" in stages.PACKAGES
    assert "solve: --memory-budget" in (out / "campaign.log").read_text()

    # a second call on the same work folder (a warm machine): nothing is recomputed, the reports are reused, and
    # its --out holds the whole campaign so far (call 1's records and files too)
    again = _campaign("--rehearse", "--stages", "table1-v", "--out", tmp_path / "again", "--work", work,
                      "--data-root", cifar_format_root, "--budget-s", 10**6)
    assert again.returncode == 0, again.stdout + again.stderr
    doc2 = json.loads((tmp_path / "again" / "campaign.json").read_text())
    assert [k["call"] for k in doc2["calls"]] == [1, 2] and doc2["calls"][1]["stages"] == ["table1-v"]
    assert {s["name"]: s["call"] for s in doc2["stages"]} == {**{name: 1 for name in gpu_campaign.STAGES},
                                                             "table1-v": 2}
    second = next(s for s in doc2["stages"] if s["name"] == "table1-v")["result"]["runs"]["table1-v"]
    assert second["tiles_computed"] == 0 and "reused" in second["solve"]
    assert (tmp_path / "again" / "results-table1-v.md").read_text() == (out / "results-table1-v.md").read_text()
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == files
    assert "| table1-v | 2 | done |" in (tmp_path / "again" / "campaign.md").read_text()


def test_real_run_without_gpu_is_one_line_and_fails(tmp_path):
    try:
        stages.import_cupy()
        pytest.skip("a CUDA device is usable here: the no-GPU exit cannot be exercised")
    except stages.NoGPU:
        pass
    run = _campaign("--out", tmp_path / "out", "--work", tmp_path / "work")
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "no GPU" in lines[0] and "--rehearse" in lines[0]
    assert not (tmp_path / "work").exists()


def test_unknown_stage_is_one_line(tmp_path, capsys):
    assert gpu_campaign.main(["--rehearse", "--out", str(tmp_path), "--stages", "env,tabel1-v"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert "tabel1-v" in err and "allowed: env, kernels, tests, table1-v" in err


def test_stage_that_cannot_fit_is_skipped_and_recorded(tmp_path, cifar_format_root):
    """On a clock that stands still: env (2 s predicted) fits a 5 s budget, table1-v (a 30 s run, its solve and
    the grace) does not, and nothing of it is started."""
    c = Campaign(out=tmp_path / "work" / "campaign-out", work=tmp_path / "work", mirror=tmp_path / "out",
                 budget_s=5, rehearse=True, data_root=str(cifar_format_root), clock=lambda: 0.0)
    assert gpu_campaign.run_campaign(c, ["env", "table1-v"]) == 1
    got = json.loads((tmp_path / "out" / "campaign.json").read_text())["stages"]
    assert [(s["name"], s["status"]) for s in got] == [("env", "done"), ("table1-v", "skipped")]
    assert got[1]["why"] == f"needs ~{got[1]['predicted_s']} s, 5 s left" and got[1]["predicted_s"] > 5
    assert not (tmp_path / "work" / "table1-v.zarr").exists()


def test_table_stage_without_data_fails_with_one_reason(tmp_path):
    c = Campaign(out=tmp_path / "work" / "campaign-out", work=tmp_path / "work", budget_s=600, rehearse=True,
                 data_root=str(tmp_path / "nothing"), clock=lambda: 0.0)
    assert gpu_campaign.run_campaign(c, ["gap-2k"]) == 1
    (record,) = c.records
    assert record["status"] == "failed" and "no CIFAR-10 under" in record["why"]


# ------------------------------------------------------------------ the deadline supervisor

def _progress_clock(log: Path, *steps: str):
    """A clock that stands at 0 until the log holds the line steps[0], then at 1e9 until it holds the line steps[1],
    and so on: time passes only when the command has shown the progress the test waits for."""
    def clock():
        lines = log.read_text().splitlines() if log.exists() else []
        return 1e9 * sum(step in lines for step in steps)
    return clock


CHILD = ("import signal, sys, time\n"
         "def on_interrupt(*_):\n"
         "    print('interrupted', flush=True)\n"
         "    sys.exit(IGNORE_EXIT)\n"
         "signal.signal(signal.SIGINT, on_interrupt)\n"
         "print('started', flush=True)\n"
         "while True:\n"
         "    time.sleep(0.05)\n")


@pytest.mark.parametrize("resumable", [True, False])
def test_supervisor_interrupts_a_command_at_its_deadline(tmp_path, resumable):
    log = tmp_path / "campaign.log"
    supervisor = Supervisor(log=log, cwd=tmp_path, clock=_progress_clock(log, "started"), poll_s=0.01)
    child = [sys.executable, "-c", CHILD.replace("IGNORE_EXIT", "130")]
    with pytest.raises(OutOfTime if resumable else CommandFailed, match="deadline") as stopped:
        supervisor.run(child, seconds=60, resumable=resumable)
    assert log.read_text().splitlines()[-2:] == ["started", "interrupted"]   # SIGINT first, and it could finish
    if resumable:
        assert stopped.value.output.split() == ["started", "interrupted"]


def test_supervisor_kills_a_command_that_ignores_the_interrupt(tmp_path):
    log = tmp_path / "campaign.log"
    stubborn = CHILD.replace("    sys.exit(IGNORE_EXIT)\n", "")
    supervisor = Supervisor(log=log, cwd=tmp_path, clock=_progress_clock(log, "started", "interrupted"),
                            poll_s=0.01, grace_s=10)
    with pytest.raises(OutOfTime) as stopped:
        supervisor.run([sys.executable, "-c", stubborn], seconds=60, resumable=True)
    assert stopped.value.output.split() == ["started", "interrupted"]


def test_supervisor_returns_output_and_names_a_failure_by_its_last_line(tmp_path):
    supervisor = Supervisor(log=tmp_path / "campaign.log", cwd=tmp_path, clock=lambda: 0.0, poll_s=0.01)
    assert supervisor.run([sys.executable, "-c", "print('fine')"], seconds=1).strip() == "fine"
    with pytest.raises(CommandFailed, match="exit 3: boom"):
        supervisor.run([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], seconds=1)


# ------------------------------------------------------------------ the rate model and the stages' inputs

def test_depth_cap_follows_the_measured_rate():
    pairs = rates.pairs_of(2000, 10000)
    assert pairs == 2000 * 2001 // 2 + 2000 * 10000
    model = rates.RateModel({"gap": pairs / 100.0})   # a depth-21 pass (20 layers) of all pairs in 100 s: 5 s a layer
    start = rates.RUN_START_S
    assert model.depths_that_fit("gap", pairs, start + 200) == [3, 4, 6, 11, 21]
    assert model.depths_that_fit("gap", pairs, start + 5 * 10 + 1) == [3, 4, 6, 11]
    assert model.depths_that_fit("gap", pairs, start + 5 * 3) == [3, 4]
    assert model.depths_that_fit("gap", pairs, start) == []
    # vanilla: a measured kernel rate above the host side's cap is capped
    fast = rates.RateModel({"vanilla": 1e12})
    assert fast.run_s("vanilla", 10**7, 21) == start + 10**7 * 20 / (rates.VANILLA_PAIRS_PER_S_DEPTH21 * 20)


def test_measured_rates_come_from_bench_gpu_depth_21_rows():
    report = {"results": [{"arch": "gap", "depth": 3, "fused_pairs_per_s": 1.0},
                          {"arch": "gap", "depth": 21, "fused_pairs_per_s": 2.5},
                          {"arch": "vanilla", "depth": 21, "fused_pairs_per_s": 7.0}]}
    assert rates.rates_from_kernels(report) == {"gap": 2.5, "vanilla": 7.0}


def test_tests_stage_gets_the_data_no_download_and_bounded_parallel_pytest(monkeypatch):
    env = stages.tests_environment("/data/cifar")
    assert env["CNTK_CIFAR_ROOT"] == "/data/cifar" and env["CNTK_TEST_DOWNLOAD"] == "0"
    assert env["CNTK_TEST_SHARED_BUILDER"] == ""
    installed = {"pytest_timeout", "xdist"}
    monkeypatch.setattr(stages.importlib.util, "find_spec", lambda name: object() if name in installed else None)
    command = stages.pytest_command()
    assert command[:2] == [sys.executable, "-P"] and command[-1] == "tests/test_gpu.py"
    assert "--timeout=90" in command and command[command.index("-n") + 1] == str(stages.TESTS_WORKERS)
    installed.clear()   # neither plugin: plain pytest, no unknown options
    assert "-n" not in stages.pytest_command() and not any("timeout" in a for a in stages.pytest_command())
    assert gpu_campaign.predict_stage_s(Campaign(out=Path("."), work=Path("."), budget_s=1, rehearse=False,
                                                 data_root=None), "tests") <= rates.TESTS_CAP_S


def test_kernels_leave_the_float64_check_to_the_tests_stage():
    c = Campaign(out=Path("."), work=Path("."), budget_s=1, rehearse=False, data_root=None)
    assert gpu_campaign.tests_check_kernels(c, ["env", "kernels", "tests"])
    assert not gpu_campaign.tests_check_kernels(c, ["env", "kernels"])
    c.records = [{"name": "tests", "status": "done"}]    # done in an earlier call
    assert gpu_campaign.tests_check_kernels(c, ["kernels"])


def test_table_run_sizes_come_from_its_config_and_the_data(tmp_path, cifar_format_root):
    c = Campaign(out=tmp_path, work=tmp_path, budget_s=1, rehearse=False, data_root=str(cifar_format_root))
    full, cifar2 = stages.table_runs("table1-v", False)[0], stages.table_runs("cifar2", False)[0]
    assert stages.run_sizes(full, stages.run_overrides(full, c)) == (SYNTHETIC_TRAIN, SYNTHETIC_TEST)   # all
    assert stages.run_sizes(cifar2, stages.run_overrides(cifar2, c)) == (SYNTHETIC_TRAIN // 5, SYNTHETIC_TEST // 5)
    rehearsed = stages.table_runs("cifar2", True)[1]
    overrides = stages.run_overrides(rehearsed, c, depths=[3, 4])
    assert stages.run_sizes(rehearsed, overrides) == (8, 4)
    command = stages.run_command(rehearsed, overrides, trust_records=True)
    assert command[command.index("--depths") + 1] == "3,4" and command[command.index("--tile-size") + 1] == "4"
    assert command[command.index("--archs") + 1] == "gap" and "--no-random-features" in command
    assert command[-1] == "--trust-records" and command[command.index("--data-root") + 1] == str(cifar_format_root)


def test_a_new_stores_depths_fit_the_free_disk(tmp_path, monkeypatch):
    from cntk_gram.pipeline import plan
    monkeypatch.setattr(stages, "run_sizes", lambda run, overrides: (2000, 1000))
    c = Campaign(out=tmp_path, work=tmp_path, budget_s=10**6, rehearse=False, data_root=None, clock=lambda: 0.0)
    run = stages.table_runs("table1-v", False)[0]
    one = stages.store_bytes(c, run, [3])
    assert one == 5 * (1000 * 1000 * 4 + plan.CHUNK_OVERHEAD)   # 3 train x train tiles, 2 train x test
    assert stages.store_bytes(c, run, [3, 4, 6]) == 3 * one     # one float32 array per depth
    assert stages.depths_on_disk(c, run, [3, 4, 6, 11, 21], stages.DISK_SPARE + 3 * one) == [3, 4, 6]
    pairs = rates.pairs_of(2000, 1000)   # every depth fits the time
    monkeypatch.setattr(plan, "free_bytes", lambda path: stages.DISK_SPARE + 2 * one)
    record = {}
    assert stages.choose_depths(c, run, pairs, record) == [3, 4] and record["capped_by"] == "disk"
    monkeypatch.setattr(plan, "free_bytes", lambda path: stages.DISK_SPARE + one - 1)
    record = {}
    assert stages.choose_depths(c, run, pairs, record) == [] and record["status"] == "skipped"
    assert "depth 3's store needs" in record["why"] and "GiB free" in record["why"]
    # the whole of table1-v (50,000 + 10,000 images, 1,000-image tiles) at 5 depths: ~35 GB, over most free disks
    monkeypatch.setattr(stages, "run_sizes", lambda run, overrides: (50_000, 10_000))
    assert 35e9 < stages.store_bytes(c, run, rates.TABLE_DEPTHS) < 36e9


# ------------------------------------------------------------------ measurements kept, results published at once

def _bench_without_gpu(monkeypatch, measure_row, count_sass):
    """bench_gpu.main's GPU parts replaced: the device, the modules, each row's measurement and the SASS count."""
    device = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=0)))
    monkeypatch.setattr(bench_gpu, "require_gpu", lambda: device)
    monkeypatch.setattr(bench_gpu, "device_info", lambda cupy: {"name": "stand-in", "sm_count": 1,
                                                                "fp32_lanes_per_sm": 128, "clock_mhz": 1000.0})
    monkeypatch.setattr(bench_gpu.gpu, "load_module", lambda *args: None)
    monkeypatch.setattr(bench_gpu, "baseline_kernels", lambda cupy: None)
    monkeypatch.setattr(bench_gpu, "measure_row", measure_row)
    monkeypatch.setattr(bench_gpu, "count_sass", count_sass)


def _row(cupy, module, base, *, arch, depth, min_seconds, limit):
    return {"arch": arch, "depth": depth, "fused_pairs_per_s": 100.0 * depth, "fused_pairs_timed": 64}


def test_bench_gpu_writes_its_measurements_before_the_sass_count(tmp_path, monkeypatch):
    def failing_tool():
        raise subprocess.CalledProcessError(1, ["nvcc", "--cubin"])
    _bench_without_gpu(monkeypatch, _row, failing_tool)
    out = tmp_path / "kernels.json"
    bench_gpu.main(["--archs", "vanilla", "--depths", "3,21", "--skip-accuracy", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [(r["arch"], r["depth"]) for r in report["results"]] == [("vanilla", 3), ("vanilla", 21)]
    assert report["sass_count"]["error"].startswith("CalledProcessError")
    assert report["projection_cntk_v_all_depths_to_21"]["kernel_seconds"] == bench_gpu.FULL_CIFAR_PAIRS / 2100.0


def test_bench_gpu_keeps_the_rows_measured_before_a_failure(tmp_path, monkeypatch):
    def second_fails(*args, depth, **kw):
        if depth == 21:
            raise RuntimeError("device lost")
        return _row(*args, depth=depth, **kw)
    _bench_without_gpu(monkeypatch, second_fails, lambda: None)
    out = tmp_path / "kernels.json"
    with pytest.raises(RuntimeError, match="device lost"):
        bench_gpu.main(["--archs", "gap", "--depths", "3,21", "--skip-accuracy", "--out", str(out)])
    assert [r["depth"] for r in json.loads(out.read_text())["results"]] == [3]


def test_kernels_stage_keeps_the_rows_of_a_failed_bench_gpu(tmp_path, monkeypatch):
    """bench_gpu.py failing after some rows: the stage fails, and its rows and measured rates stay. A kernels.json
    of an earlier call never passes for this one's."""
    row = {"arch": "gap", "depth": 21, "fused_pairs_per_s": 2.0e4, "baseline_pairs_per_s": 2.0, "ratio": 1e4,
           "fused_fraction_of_fp32_limit": 0.5, "baseline_vs_fused_max_rel_diff": 1e-6}

    class FailingBench:
        writes = True

        def run(self, args, **kw):
            if self.writes:
                Path(args[args.index("--out") + 1]).write_text(json.dumps({"results": [row]}))
            raise CommandFailed("exit 1: cuobjdump failed")
    bench = FailingBench()
    monkeypatch.setattr(Campaign, "supervisor", lambda self: bench)
    c = Campaign(out=tmp_path, work=tmp_path, budget_s=600, rehearse=False, data_root=None, clock=lambda: 0.0)
    result = {}
    with pytest.raises(CommandFailed):
        stages.stage_kernels(c, result, skip_accuracy=True)
    assert result["rows"] == [row] and c.rates == {"gap": 2.0e4}
    bench.writes, result = False, {}
    with pytest.raises(CommandFailed):
        stages.stage_kernels(c, result, skip_accuracy=True)
    assert "rows" not in result and not (tmp_path / "kernels.json").exists()


def test_published_results_reach_out_before_their_stage_ends(tmp_path, monkeypatch):
    """A table run's results file and its record are in --out the moment they are published: a call cut off later
    (by its timeout, in the validated solve say) still returns them."""
    seen = {}

    def table_stage(c, result, *, stage):
        report = tmp_path / "report"
        report.mkdir()
        (report / "results.md").write_text("| kernel | depth |\n")
        result["runs"] = {"table1-v": {"depths": [3, 4]}}
        stages.publish(c, stages.table_runs(stage, True)[0], result["runs"]["table1-v"], report)
        doc = json.loads((tmp_path / "out" / "campaign.json").read_text())
        seen.update(files={p.name for p in (tmp_path / "out").iterdir()}, record=doc["stages"][0])
        raise RuntimeError("cut off")
    monkeypatch.setattr(gpu_campaign, "stage_table", table_stage)
    monkeypatch.setattr(gpu_campaign, "first_run_s", lambda c, stage: 1.0)
    c = Campaign(out=tmp_path / "work" / "campaign-out", work=tmp_path / "work", mirror=tmp_path / "out",
                 budget_s=600, rehearse=True, data_root=None, clock=lambda: 0.0)
    assert gpu_campaign.run_campaign(c, ["table1-v"]) == 1
    assert "results-table1-v.md" in seen["files"]
    assert seen["record"]["status"] == "running"
    assert seen["record"]["result"]["runs"]["table1-v"] == {"depths": [3, 4], "results": "results-table1-v.md"}


# ------------------------------------------------------------------ the GPU cluster's start on the device

def test_gpu_cluster_falls_back_to_one_plain_worker_when_nvml_fails(monkeypatch, capsys):
    """NVML unusable (pynvml.NVMLError), met while counting the GPUs or while dask-cuda starts: a plain local
    cluster with one worker and the GPU worker's task slots, and one line on stderr saying so."""
    import distributed

    from cntk_gram.pipeline import cluster
    from cntk_gram.pipeline.config import build_config

    class NVMLError(Exception):
        pass

    def no_nvml(**kw):
        raise NVMLError("NVML Shared Library Not Found")
    made = []
    dask_cuda, utils = types.ModuleType("dask_cuda"), types.ModuleType("dask_cuda.utils")
    monkeypatch.setitem(sys.modules, "dask_cuda", dask_cuda)
    monkeypatch.setitem(sys.modules, "dask_cuda.utils", utils)
    monkeypatch.setattr(distributed, "LocalCluster", lambda **kw: made.append(kw) or "plain")
    config = build_config({"cluster": {"workers": 4}}).cluster
    for fails_at in ("counting", "starting"):
        dask_cuda.LocalCUDACluster = no_nvml if fails_at == "starting" else (lambda **kw: "dask-cuda")
        utils.get_n_gpus = (lambda: 1) if fails_at == "starting" else no_nvml
        assert cluster.local_cluster(cluster=config, backend="gpu") == "plain"
    assert [(kw["n_workers"], kw["threads_per_worker"]) for kw in made] == [(1, cluster.GPU_SLOTS)] * 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("NVMLError: NVML Shared Library Not Found" in line and
                                 "plain local cluster with one GPU worker" in line for line in err)


# ------------------------------------------------------------------ state across calls, the Markdown

def _records(call=1):
    kernels = {"rows": [{"arch": "gap", "depth": 21, "fused_pairs_per_s": 2.0e4, "baseline_pairs_per_s": 2.0,
                         "ratio": 1.0e4, "fused_fraction_of_fp32_limit": 0.5,
                         "baseline_vs_fused_max_rel_diff": 1e-6}]}
    table = {"runs": {"gap-2k": {"depths": [3, 4], "capped": True, "capped_by": "budget", "n_train": 2000,
                                 "n_test": 10000, "pairs": rates.pairs_of(2000, 10000), "kernel_s": 12.5,
                                 "solve_s": 3.0, "validated": "skipped: needs ~80 s, 10 s left"}}}
    return [{"name": "env", "call": call, "status": "done", "seconds": 1.0, "predicted_s": 2, "result": {}},
            {"name": "kernels", "call": call, "status": "done", "seconds": 9.0, "predicted_s": 150, "result": kernels},
            {"name": "gap-2k", "call": call, "status": "out-of-time", "seconds": 99.0, "predicted_s": 80,
             "why": "stopped at its 99 s deadline (budget)", "result": table}]


def test_markdown_shows_calls_stages_kernels_and_table_runs(tmp_path):
    doc = {"rehearse": False, "device": {"name": "H200"}, "git_commit": "abc", "stages": _records(),
           "calls": [{"call": 1, "stages": ["env"], "elapsed_s": 10.0, "budget_s": 300.0, "date_utc": "now"}]}
    md = campaign_markdown(doc, tmp_path)
    assert md.startswith("# GPU campaign\n") and "Device: H200; commit abc." in md
    assert "- call 1: stages env; 10 s of a 300 s budget; now" in md
    assert "| gap-2k | 1 | out-of-time | 99.0 | 80 | stopped at its 99 s deadline (budget) |" in md
    assert "| gap | 21 | 20,000 | 2.0 | 10,000 | 50 | 1.0e-06 |" in md
    assert "## gap-2k" in md and "Depths [3, 4] (capped by the budget); 2000 train + 10000 test images" in md
    assert "validated lam: skipped: needs ~80 s" in md


def test_a_later_call_continues_only_the_same_commits_campaign(tmp_path):
    def campaign(**kw):
        return Campaign(out=tmp_path / "work" / "campaign-out", work=tmp_path / "work", budget_s=60,
                        rehearse=True, data_root=None, mirror=tmp_path / "out", clock=lambda: 0.0, **kw)
    first = campaign()
    assert resume_state(first, "abc") == "fresh"
    assert first.call == 1 and (first.out / "campaign.log").exists()
    first.records, first.rates = _records()[:1], {"vanilla": 5.0}
    _write(first, "abc")
    assert json.loads((tmp_path / "out" / "campaign.json").read_text())["calls"][0]["stages"] == ["env"]

    same = campaign()
    assert resume_state(same, "abc") == "continued"
    assert same.call == 2 and same.rates == {"vanilla": 5.0} and [r["name"] for r in same.records] == ["env"]

    other = campaign()
    assert resume_state(other, "def") == "fresh"   # another commit: its numbers must not mix with these
    assert other.call == 1 and other.records == [] and other.rates == {}
    assert [p.name for p in other.out.iterdir()] == ["campaign.log"]


def test_a_fresh_machine_continues_from_the_earlier_calls_returned_files(tmp_path):
    """Call 1's $OUT, carried back to the device as --prior: its rates and records survive a machine whose --work
    is gone, and call 2's --out holds the whole campaign."""
    call1 = Campaign(out=tmp_path / "m1" / "campaign-out", work=tmp_path / "m1", mirror=tmp_path / "returned1",
                     budget_s=300, rehearse=False, data_root=None, clock=lambda: 0.0)
    resume_state(call1, "abc")
    call1.log("call 1 was here")
    call1.records, call1.rates, call1.device = _records()[:2], {"gap": 2.0e4}, {"name": "H200"}
    (call1.out / "kernels.json").write_text("{}")
    _write(call1, "abc")

    def fresh(commit, prior):
        c = Campaign(out=tmp_path / commit / "campaign-out", work=tmp_path / commit, mirror=tmp_path / "returned2",
                     prior=prior, budget_s=400, rehearse=False, data_root=None, clock=lambda: 0.0)
        return c, resume_state(c, commit)

    call2, how = fresh("abc", tmp_path / "returned1")
    assert how == "prior" and call2.call == 2 and call2.rates == {"gap": 2.0e4} and call2.device == {"name": "H200"}
    assert [r["name"] for r in call2.records] == ["env", "kernels"]
    assert "call 1 was here" in (call2.out / "campaign.log").read_text() and (call2.out / "kernels.json").exists()
    _write(call2, "abc")
    doc = json.loads((tmp_path / "returned2" / "campaign.json").read_text())
    assert [k["call"] for k in doc["calls"]] == [1, 2] and doc["rates"] == {"gap": 2.0e4}
    assert "kernels.json" in {p.name for p in (tmp_path / "returned2").iterdir()}

    other, how = fresh("def", tmp_path / "returned1")   # the prior of another commit is not continued
    assert how == "fresh" and other.call == 1 and other.rates == {}
