"""One prepared command for a lent GPU: every measurement the project needs, in order, within a time budget.

    python -m benchmarks.gpu_campaign --out DIR [--budget-s 540] [--stages env,kernels,...] [--rehearse]
                                      [--data-root CIFAR_DIR] [--work WORK_DIR] [--prior PRIOR_DIR]

(from the repository root, with the package installed: editable, or as on the device its wheel in SITE with
PYTHONPATH=SITE:REPO and `python -P`, as benchmarks/campaign/device_call.sh runs it). Stages, in this order
(benchmarks/GPU.md says how a session with a GPU calls it):
  env       device name, driver, CUDA, CuPy, the nvidia-smi line (bounded wait), package versions (cupy,
            cuda-core, ...) and where cntk_gram is imported from
  kernels   benchmarks/bench_gpu.py: fused GAP and vanilla at depths 3/6/11/21 beside the baseline, % of the
            instruction ceiling; the measured depth-21 rates replace the predicted ones in the rate model. Its
            float64-reference check is left to the tests stage when that is part of the campaign
  tests     `pytest -m gpu tests/test_gpu.py` (one tile through a real dask_cuda.LocalCUDACluster included), given
            the campaign's CIFAR-10 and no download; at most TESTS_CAP_S seconds, --timeout per test and in
            parallel where pytest-timeout and pytest-xdist are installed
  table1-v  CNTK-V NTK, depths 3/4/6/11/21 (as many as the budget and the free disk allow), all 50,000 + 10,000
            images: `cntk run --backend gpu`, then `cntk solve --device gpu` with the paper's lam = 0, whose
            results.md (the paper's column beside ours) is copied into DIR; then, if the budget allows, a second
            solve that adds the validated lam (its results.md, a superset, replaces the first)
  gap-2k    CNTK-GAP NTK, Table 1's 2,000-image column, depths capped to what the budget allows (resumable)
  cifar2    Table 2's exact columns (CIFAR-2): vanilla at all depths, GAP capped likewise (resumable)
Kernels run before tests, so a first call always yields the kernel speeds.

Every stage's record is written to DIR/campaign.json and DIR/campaign.md the moment it ends, and the moment a
table run publishes its results, so a run cut off still returns everything finished. All files are kept in
WORK_DIR/campaign-out and copied to DIR. A later call continues the campaign of the same commit (its records and
measured rates) from WORK_DIR/campaign-out on a warm machine, or from --prior PRIOR_DIR (an earlier call's returned
DIR) on a fresh one; its DIR then holds everything so far, and a stage run again replaces its earlier record. DIR
holds at most 8 files: campaign.json, campaign.md, campaign.log, kernels.json and one results-<run>.md per table
run; stores and solver output go to --work.

Budget: a stage whose predicted seconds (benchmarks/campaign/rates.py) exceed what is left is `skipped`; a
resumable stage (a `cntk run`) starts when its smallest useful part fits and is interrupted cleanly before the
budget ends (`out-of-time`: its store resumes on the next call with the same --work while the machine is warm,
keeping the depths it was started with; a call whose run computed no new tile reuses the reports of the earlier one).

--rehearse: the same sequence on the CPU backend at a tiny size (tens of images, depths 3 and 4), so every
line except the CUDA calls runs without a GPU (tests/test_gpu_campaign.py runs it). Without --rehearse a
missing GPU is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from benchmarks.campaign.markdown import campaign_markdown
from benchmarks.campaign.rates import TESTS_CAP_S
from benchmarks.campaign.stages import (NoGPU, first_run_s, import_cupy, stage_env, stage_kernels, stage_table,
                                        stage_tests)
from benchmarks.campaign.state import REPO, Campaign, git_commit, resume_state, write_records
from benchmarks.campaign.supervisor import OutOfTime

STAGES = ("env", "kernels", "tests", "table1-v", "gap-2k", "cifar2")
TABLE_STAGES = ("table1-v", "gap-2k", "cifar2")


def tests_check_kernels(c: Campaign, stages: list[str]) -> bool:
    """Whether the tests stage compares the GPU kernels with the float64 reference in this campaign (it runs in this
    call or ran in an earlier one): then bench_gpu.py skips its own, smaller check of the same."""
    return "tests" in stages or any(r["name"] == "tests" and r["status"] == "done" for r in c.records)


def runners(c: Campaign, stages: list[str]) -> dict:
    """Stage name -> function(result dict) for this call."""
    skip_accuracy = tests_check_kernels(c, stages)
    out = {"env": lambda result: stage_env(c, result),
           "kernels": lambda result: stage_kernels(c, result, skip_accuracy=skip_accuracy),
           "tests": lambda result: stage_tests(c, result, cap_s=TESTS_CAP_S)}
    out.update({name: (lambda result, name=name: stage_table(c, result, stage=name)) for name in TABLE_STAGES})
    return out


def predict_stage_s(c: Campaign, stage: str) -> float:
    """Seconds a stage needs to be started: the whole stage, or for a table stage its smallest useful part."""
    if stage in TABLE_STAGES:
        return first_run_s(c, stage)
    need = c.model().stage_s(stage)
    return min(need, TESTS_CAP_S) if stage == "tests" else need


def run_campaign(c: Campaign, stages: list[str]) -> int:
    """Run the chosen stages in STAGES order; 0 when every one of them is done, else 1."""
    if not c.rehearse:
        import_cupy()   # NoGPU before anything is written or spent
    commit = git_commit()
    c.work.mkdir(parents=True, exist_ok=True)
    how = resume_state(c, commit)
    c.checkpoint = lambda: write_records(c, commit, order=STAGES, markdown=campaign_markdown)
    c.log(f"=== call {c.call} ({how}): stages {','.join(stages)}, budget {c.budget_s:.0f} s")
    run = runners(c, stages)
    for name in (s for s in STAGES if s in stages):
        record = {"name": name, "call": c.call, "status": "skipped", "seconds": 0.0, "predicted_s": 0,
                  "result": None}
        c.records = [r for r in c.records if r["name"] != name] + [record]   # a rerun replaces the earlier one
        try:
            need = predict_stage_s(c, name)
        except Exception as exc:   # e.g. no CIFAR-10 to size a table run from
            need, record["status"], record["why"] = None, "failed", f"{type(exc).__name__}: {exc}"[:400]
        if need is not None:
            record["predicted_s"] = round(need)
            if need > c.left():
                record["why"] = f"needs ~{need:.0f} s, {max(c.left(), 0):.0f} s left"
            else:
                _run_stage(c, run[name], record)
        print(f"gpu_campaign: {name:9s} {record['status']:11s} {record['seconds']:7.1f} s  "
              f"{record.get('why', '')}", flush=True)
        c.checkpoint()
    return 0 if all(r["status"] == "done" for r in c.records if r["call"] == c.call) else 1


def _run_stage(c: Campaign, runner, record: dict) -> None:
    record["result"], record["status"] = {}, "running"   # what a checkpoint inside the stage records
    t0 = c.clock()
    try:
        runner(record["result"])
        record["status"] = "done"
    except OutOfTime as exc:
        record["status"], record["why"] = "out-of-time", str(exc)
    except NoGPU:
        raise
    except Exception as exc:   # one stage failing must not lose the others
        record["status"], record["why"] = "failed", f"{type(exc).__name__}: {exc}"[:400]
    record["seconds"] = round(c.clock() - t0, 1)


def layout_problem() -> str | None:
    """Why the package's subpackages do not import here, else None: a checkout's own cntk_gram/ found before the
    installed package has no pipeline/ or workers/ (they are mapped in by the install)."""
    missing = [name for name in ("cntk_gram.pipeline", "cntk_gram.workers") if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    import cntk_gram
    return (f"{', '.join(missing)} not importable: cntk_gram was found at {Path(cntk_gram.__file__).parent}; install "
            f"the project (pip install -e ., or its wheel with --target SITE and PYTHONPATH=SITE:REPO) and run "
            f"python -P -m benchmarks.gpu_campaign")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for campaign.json/.md and results")
    parser.add_argument("--budget-s", type=float, default=540.0, help="seconds for all stages (default 540)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"subset of {','.join(STAGES)}")
    parser.add_argument("--rehearse", action="store_true", help="CPU backend, tiny sizes: no GPU needed")
    parser.add_argument("--data-root", default=os.environ.get("CNTK_CIFAR_ROOT"),
                        help="folder holding cifar-10-batches-py/ (default $CNTK_CIFAR_ROOT)")
    parser.add_argument("--work", type=Path, default=None,
                        help="stores and solver output (default runs/gpu-campaign, resumable between calls)")
    parser.add_argument("--prior", type=Path, default=None,
                        help="an earlier call's returned --out folder: continue its campaign when --work holds none "
                             "of this commit (a fresh machine)")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        print(f"gpu_campaign: unknown stage(s) {unknown or '(none given)'}; allowed: {', '.join(STAGES)}",
              file=sys.stderr)
        return 2
    if args.budget_s <= 0:
        print(f"gpu_campaign: --budget-s must be > 0 seconds, got {args.budget_s}", file=sys.stderr)
        return 2
    problem = layout_problem()
    if problem:
        print(f"gpu_campaign: {problem}", file=sys.stderr)
        return 2
    work = args.work or REPO / "runs" / ("gpu-campaign-rehearsal" if args.rehearse else "gpu-campaign")
    c = Campaign(out=work / "campaign-out", mirror=args.out, prior=args.prior, work=work, budget_s=args.budget_s,
                 rehearse=args.rehearse, data_root=args.data_root)
    try:
        return run_campaign(c, stages)
    except NoGPU as exc:
        print(f"gpu_campaign: no GPU for a real run: {exc}; use --rehearse to run on the CPU", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
