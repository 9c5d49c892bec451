"""benchmarks/gpu_campaign.py: the rehearsal runs every stage on the CPU; budget, bad input and no-GPU exits."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CAMPAIGN = REPO / "benchmarks" / "gpu_campaign.py"
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_campaign  # noqa: E402


def _campaign(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(CAMPAIGN), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True)


@pytest.mark.slow
def test_rehearsal_runs_every_stage_and_writes_records(tmp_path, cifar_format_root):
    out, work = tmp_path / "out", tmp_path / "work"
    run = _campaign("--rehearse", "--out", out, "--work", work, "--data-root", cifar_format_root)
    assert run.returncode == 0, run.stdout + run.stderr + (out / "campaign.log").read_text()
    doc = json.loads((out / "campaign.json").read_text())
    assert [s["name"] for s in doc["stages"]] == list(gpu_campaign.STAGES)
    assert {s["name"]: s["status"] for s in doc["stages"]} == {name: "done" for name in gpu_campaign.STAGES}
    assert doc["rehearse"] is True and len(doc["git_commit"]) >= 40
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    for name in ("table1-v", "gap-2k", "cifar2-v", "cifar2-gap"):
        table = (out / f"results-{name}.md").read_text()
        assert "| kernel | depth |" in table
    md = (out / "campaign.md").read_text()
    for stage in gpu_campaign.STAGES:
        assert f"| {stage} | 1 | done |" in md
    assert "results-table1-v.md" not in md and "| ntk-vanilla | 4 |" in md   # the solver's table, embedded
    table1 = next(s for s in doc["stages"] if s["name"] == "table1-v")["result"]["table1-v"]
    assert table1["depths"] == [3, 4] and table1["kernel_s"] > 0 and table1["tiles_computed"] > 0
    assert table1["validated"] == "done" and "validated lam: done" in md
    # the validated solve's table replaced the lam = 0 one: the lam* column is filled
    assert re.search(r"\| ntk-vanilla \| 4 \| [\d.]+ \| [^ |]+ \|", (out / "results-table1-v.md").read_text())

    # a second call on the same work folder (a warm machine): nothing is recomputed, the reports are reused, and
    # its --out holds the whole campaign so far (call 1's records and files too)
    again = _campaign("--rehearse", "--stages", "table1-v", "--out", tmp_path / "again", "--work", work,
                      "--data-root", cifar_format_root)
    assert again.returncode == 0, again.stdout + again.stderr
    doc2 = json.loads((tmp_path / "again" / "campaign.json").read_text())
    assert [k["call"] for k in doc2["calls"]] == [1, 2] and doc2["calls"][1]["stages"] == ["table1-v"]
    calls = {s["name"]: s["call"] for s in doc2["stages"]}
    assert calls == {**{name: 1 for name in gpu_campaign.STAGES}, "table1-v": 2}
    second = next(s for s in doc2["stages"] if s["name"] == "table1-v")["result"]["table1-v"]
    assert second["tiles_computed"] == 0 and "reused" in second["solve"]
    assert (tmp_path / "again" / "results-table1-v.md").read_text() == (out / "results-table1-v.md").read_text()
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == files
    assert "| table1-v | 2 | done |" in (tmp_path / "again" / "campaign.md").read_text()
    kernels = next(s for s in doc["stages"] if s["name"] == "kernels")["result"]
    assert kernels["accuracy"]["passed"] is True and kernels["accuracy"]["backend"] == "cpu"


def test_real_run_without_gpu_is_one_line_and_fails(tmp_path):
    try:
        gpu_campaign.import_cupy()
        pytest.skip("a CUDA device is usable here: the no-GPU exit cannot be exercised")
    except gpu_campaign.NoGPU:
        pass
    run = _campaign("--out", tmp_path / "out", "--work", tmp_path / "work")
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "no GPU" in lines[0] and "--rehearse" in lines[0]
    assert not (tmp_path / "work").exists()


def test_unknown_stage_is_one_line(tmp_path):
    run = _campaign("--rehearse", "--out", tmp_path, "--stages", "env,tabel1-v")
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0
    assert "tabel1-v" in run.stderr and "allowed: env, tests, kernels" in run.stderr


def test_stage_that_cannot_fit_is_skipped_and_recorded(tmp_path):
    run = _campaign("--rehearse", "--budget-s", "5", "--stages", "env,table1-v", "--out", tmp_path / "out",
                    "--work", tmp_path / "work")
    assert run.returncode == 1, run.stdout + run.stderr
    stages = json.loads((tmp_path / "out" / "campaign.json").read_text())["stages"]
    assert [(s["name"], s["status"]) for s in stages] == [("env", "done"), ("table1-v", "skipped")]
    assert "s left" in stages[1]["why"]
    assert not (tmp_path / "work" / "table1-v.zarr").exists()


def test_running_command_is_stopped_at_its_deadline(tmp_path):
    c = gpu_campaign.Campaign(out=tmp_path, work=tmp_path, budget_s=60, rehearse=True, data_root=None)
    sleeper = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(600)"]
    with pytest.raises(gpu_campaign.OutOfTime):
        gpu_campaign.run_logged(c, sleeper, deadline_s=1, resumable=True)
    with pytest.raises(RuntimeError, match="budget"):
        gpu_campaign.run_logged(c, sleeper, deadline_s=1, resumable=False)
    with pytest.raises(RuntimeError, match="exit 3: boom"):
        gpu_campaign.run_logged(c, [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], deadline_s=60)
    assert "started" in (tmp_path / "campaign.log").read_text()


def test_depth_cap_follows_the_measured_rate(tmp_path):
    c = gpu_campaign.Campaign(out=tmp_path, work=tmp_path, budget_s=540, rehearse=False, data_root=None)
    run = gpu_campaign.table_runs("gap-2k", rehearse=False)[0]
    pairs = gpu_campaign.pairs_of(run)
    assert pairs == 2000 * 2001 // 2 + 2000 * 10000
    c.rates["gap"] = pairs / 100.0            # a depth-21 pass (20 layers) of all pairs in 100 s: 5 s per layer
    assert gpu_campaign.depths_that_fit(c, run, 200) == [3, 4, 6, 11, 21]
    assert gpu_campaign.depths_that_fit(c, run, 15 + 5 * 10 + 1) == [3, 4, 6, 11]
    assert gpu_campaign.depths_that_fit(c, run, 15 + 5 * 3) == [3, 4]
    assert gpu_campaign.depths_that_fit(c, run, 15) == []


def test_a_later_call_continues_only_the_same_commits_campaign(tmp_path):
    def campaign():
        return gpu_campaign.Campaign(out=tmp_path / "work" / "campaign-out", work=tmp_path / "work", budget_s=60,
                                     rehearse=True, data_root=None, mirror=tmp_path / "out")
    first = campaign()
    gpu_campaign.resume_state(first, "abc")
    assert first.call == 1 and (first.out / "campaign.log").exists()
    first.records = [{"name": "env", "call": 1, "status": "done", "seconds": 1.0, "predicted_s": 2, "result": {}}]
    first.rates = {"vanilla": 5.0}
    gpu_campaign.write_records(first, "abc")
    assert json.loads((tmp_path / "out" / "campaign.json").read_text())["calls"][0]["stages"] == ["env"]

    same = campaign()
    gpu_campaign.resume_state(same, "abc")
    assert same.call == 2 and same.rates == {"vanilla": 5.0} and [r["name"] for r in same.records] == ["env"]

    other = campaign()
    gpu_campaign.resume_state(other, "def")      # another commit: its numbers must not mix with these
    assert other.call == 1 and other.records == [] and other.rates == {}
    assert [p.name for p in other.out.iterdir()] == ["campaign.log"]
