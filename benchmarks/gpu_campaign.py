"""One prepared command for a lent GPU: every measurement the project needs, in order, within a time budget.

    python benchmarks/gpu_campaign.py --out DIR [--budget-s 540] [--stages env,tests,...] [--rehearse]
                                      [--data-root CIFAR_DIR] [--work WORK_DIR]

Stages, in this order (benchmarks/GPU.md says how a session with a GPU calls it):
  env       device name, driver, CUDA, CuPy, the nvidia-smi line
  tests     `pytest -m gpu` (tests/test_gpu.py, one tile through a real dask_cuda.LocalCUDACluster included)
  kernels   benchmarks/bench_gpu.py: fused GAP and vanilla at depths 3/6/11/21 beside the baseline, % of the
            instruction ceiling, float64-reference error
  table1-v  CNTK-V NTK, depths 3/4/6/11/21, all 50,000 + 10,000 images: `cntk run --backend gpu`, then
            `cntk solve --device gpu` with the paper's lam = 0, whose results.md (the paper's column beside ours) is
            copied into DIR; then, if the budget allows, a second solve that adds the validated lam (its results.md,
            a superset, replaces the first)
  gap-2k    CNTK-GAP NTK, Table 1's 2,000-image column, depths capped to what the budget allows (resumable)
  cifar2    Table 2's exact columns (CIFAR-2): vanilla at all depths, GAP capped likewise (resumable)

Every stage's record is written to DIR/campaign.json and DIR/campaign.md the moment it ends, so a run cut off
still returns everything finished. All files are kept in WORK_DIR/campaign-out and copied to DIR: a later call with
the same --work and commit (a warm machine) continues that campaign as its next call (records, measured rates),
so its DIR holds everything so far; a stage run again replaces its earlier record. DIR holds at most 8 files:
campaign.json, campaign.md, campaign.log, kernels.json and one results-<stage>.md per table stage; stores and
solver output go to --work.

Budget: a stage whose predicted seconds exceed what is left is `skipped`; a resumable stage (a `cntk run`)
starts when its smallest useful part fits and is interrupted cleanly before the budget ends (`out-of-time`:
its store resumes on the next call with the same --work while the machine is warm, keeping the depths it was
started with; a call whose run computed no new tile reuses the reports of the earlier one).

--rehearse: the same sequence on the CPU backend at a tiny size (tens of images, depths 3 and 4), so every
line except the CUDA calls runs without a GPU (tests/test_gpu_campaign.py runs it). Without --rehearse a
missing GPU is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("env", "tests", "kernels", "table1-v", "gap-2k", "cifar2")
TABLE_DEPTHS = (3, 4, 6, 11, 21)
REHEARSE_DEPTHS = (3, 4)
# -P: every command runs the installed wheel (the one carried to the device), not the checkout it runs from
PYTHON = (sys.executable, "-P")
CLI = (*PYTHON, "-m", "cntk_gram.pipeline.cli")
GRACE_S = 20                    # an interrupted `cntk run` gets this long to finish its in-flight tile records
SOLVE_RESERVE_S = {True: 30, False: 90}   # seconds kept for the solve after a kernel run (rehearse, real)
# A validated solve per depth on the GPU (50,000 train): the store read, the fit / validation gather and 8
# Cholesky factorisations (lam = 0 and the 7 of the grid) of ~45,000^2; predicted, docs/gpu.md
VALIDATE_S_PER_DEPTH = 40
REHEARSE_VALIDATE_S_PER_DEPTH = 3

# Predicted rates on one H100/H200 (docs/gpu.md, "Campaign stage times"), used until the kernels stage has
# measured them: GAP at 50% of the issue limit (3.35e13 lane-instructions/s / 50 per entry-layer / 2), and
# vanilla end to end (the copy of each tile's result to the host and the store writes, not the kernel, set its
# pace: ~1e7 pairs/s at depth 21, docs/gpu.md "Host side").
GAP_ENTRY_LAYERS_PER_S = 3.3e11
VANILLA_PAIRS_PER_S_DEPTH21 = 1.0e7
PREDICT_S = {"env": 5, "tests": 60, "kernels": 150}
REHEARSE_PREDICT_S = {"env": 2, "tests": 30, "kernels": 30, "run": 30}


class NoGPU(RuntimeError):
    """A real (non-rehearsal) campaign found no usable CUDA device."""


class OutOfTime(RuntimeError):
    """A resumable stage was stopped before the budget ran out; its store resumes on the next call."""


@dataclass
class Campaign:
    out: Path                # where every file is written (under --work: kept between calls on a warm machine)
    work: Path
    budget_s: float
    rehearse: bool
    data_root: str | None
    mirror: Path | None = None   # --out: gets a copy of `out` after every stage
    call: int = 1                # calls of this campaign so far on this --work, this one included
    calls: list = field(default_factory=list)   # {"call", "budget_s", "elapsed_s", "date_utc", "stages"} each
    start: float = field(default_factory=time.monotonic)
    records: list = field(default_factory=list)
    device: dict = field(default_factory=dict)
    rates: dict = field(default_factory=dict)   # measured by `kernels`: {"gap": entry-layers/s, "vanilla": ...}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def log(self, text: str) -> None:
        with open(self.out / "campaign.log", "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")


# ------------------------------------------------------------------ running commands

def run_logged(c: Campaign, args: list[str], *, deadline_s: float, resumable: bool = False) -> str:
    """Run args (argv list) from the repository root, output appended to campaign.log; return its stdout+stderr.

    At deadline_s seconds from now the command gets SIGINT (a `cntk run` stops between tiles), then SIGKILL
    after GRACE_S; resumable commands then raise OutOfTime, others RuntimeError. A non-zero exit raises
    RuntimeError with the last output line.
    """
    c.log(f"$ {' '.join(args)}")
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=max(deadline_s, 1))
        stopped = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        stopped = True
    c.log(output)
    if stopped:
        raise (OutOfTime if resumable else RuntimeError)(f"stopped after {deadline_s:.0f} s (budget)")
    if proc.returncode != 0:
        last = [line for line in output.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise RuntimeError(f"exit {proc.returncode}: {last[0][:300]}")
    return output


def cntk(c: Campaign, *args: str, deadline_s: float, resumable: bool = False) -> str:
    return run_logged(c, [*CLI, *args], deadline_s=deadline_s, resumable=resumable)


# ------------------------------------------------------------------ stages

def stage_env(c: Campaign) -> dict:
    info = {"python": sys.version.split()[0], "rehearse": c.rehearse}
    smi = shutil.which("nvidia-smi")
    if smi:
        line = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
        info["nvidia_smi"] = line
    if c.rehearse:
        info["device"] = "cpu (rehearsal)"
        c.device = {"name": "cpu (rehearsal)"}
        return info
    cupy = import_cupy()
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    c.device = {"name": name, "compute_capability": f"{props['major']}.{props['minor']}",
                "sm_count": props["multiProcessorCount"], "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
                "driver_version": cupy.cuda.runtime.driverGetVersion(),
                "cuda_runtime_version": cupy.cuda.runtime.runtimeGetVersion(), "cupy_version": cupy.__version__}
    info.update(c.device)
    return info


def stage_tests(c: Campaign) -> dict:
    args = [*PYTHON, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
            "tests/test_gpu.py"]
    output = run_logged(c, args, deadline_s=c.left())
    summary = [line for line in output.splitlines() if " passed" in line or " skipped" in line or "failed" in line]
    return {"command": "pytest -m gpu -q -rs tests/test_gpu.py", "summary": summary[-1] if summary else ""}


def stage_kernels(c: Campaign) -> dict:
    """bench_gpu.py on the GPU (JSON copied into DIR/kernels.json); in rehearsal, the parts that need no GPU:
    the SASS count against the launcher's numbers and the accuracy check through the CPU backend."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_gpu
    if c.rehearse:
        return {"sass_count": bench_gpu.sass_summary(), "accuracy": bench_gpu.accuracy(max_depth=3, backend="cpu")}
    out = c.out / "kernels.json"
    run_logged(c, [*PYTHON, str(REPO / "benchmarks" / "bench_gpu.py"), "--min-seconds", "0.3",
                   "--out", str(out)], deadline_s=c.left())
    report = json.loads(out.read_text())
    for row in report["results"]:
        if row["depth"] == 21:
            c.rates[row["arch"]] = row["fused_pairs_per_s"]
    return {"rows": [{k: row[k] for k in ("arch", "depth", "fused_pairs_per_s", "baseline_pairs_per_s", "ratio",
                                          "fused_fraction_of_fp32_limit", "baseline_vs_fused_max_rel_diff")}
                     for row in report["results"]],
            "accuracy_passed": (report.get("accuracy") or {}).get("passed"),
            "projection_cntk_v_s": (report.get("projection_cntk_v_all_depths_to_21") or {}).get("kernel_seconds")}


@dataclass(frozen=True)
class TableRun:
    """One `cntk run` + `cntk solve` of a paper config; sizes (train, test) None = the config's."""
    name: str
    config: str
    arch: str
    train: int | None
    test: int | None


def table_runs(stage: str, rehearse: bool) -> list[TableRun]:
    # rehearsal: tens of images for vanilla, fewer for GAP (~1000x the work per pair on the CPU)
    tiny = dict(train=20, test=10) if rehearse else dict(train=None, test=None)
    tiny_gap = dict(train=8, test=4) if rehearse else tiny
    return {
        "table1-v": [TableRun("table1-v", "configs/paper/table1.yaml", "vanilla", **tiny)],
        "gap-2k": [TableRun("gap-2k", "configs/paper/table1-2000.yaml", "gap", **tiny_gap)],
        "cifar2": [TableRun("cifar2-v", "configs/paper/table2-cifar2.yaml", "vanilla", **tiny),
                   TableRun("cifar2-gap", "configs/paper/table2-cifar2.yaml", "gap", **tiny_gap)],
    }[stage]


PAPER_SIZES = {"configs/paper/table1.yaml": (50000, 10000), "configs/paper/table1-2000.yaml": (2000, 10000),
               "configs/paper/table2-cifar2.yaml": (10000, 2000)}


def pairs_of(run: TableRun) -> int:
    train, test = PAPER_SIZES[run.config]
    train, test = run.train or train, run.test or test
    return train * (train + 1) // 2 + train * test


def predict_run_s(c: Campaign, run: TableRun, depth: int) -> float:
    """Predicted seconds of the kernel run of `run` up to `depth` (one pass yields every smaller depth)."""
    if c.rehearse:
        return REHEARSE_PREDICT_S["run"]
    layers = depth - 1
    if run.arch == "gap":
        rate = c.rates.get("gap", GAP_ENTRY_LAYERS_PER_S / (2**20 * 20)) * 20   # pair-layers/s
    else:
        # the kernel stage's rate is kernel-only; end to end is capped by the host side
        rate = min(c.rates.get("vanilla", VANILLA_PAIRS_PER_S_DEPTH21), VANILLA_PAIRS_PER_S_DEPTH21) * 20
    return 15 + pairs_of(run) * layers / rate


def depths_that_fit(c: Campaign, run: TableRun, seconds: float) -> list[int]:
    """The paper depths whose single pass fits in `seconds` (all of them below the largest that fits)."""
    depths = REHEARSE_DEPTHS if c.rehearse else TABLE_DEPTHS
    fits = [d for d in depths if predict_run_s(c, run, d) <= seconds]
    return [d for d in depths if fits and d <= max(fits)]


def store_depths(store: Path) -> list[int] | None:
    """Depths of an existing store (a run of an earlier call on this warm machine), else None. A store's depths
    cannot change, so a resumed stage keeps them rather than failing on a different depth cap."""
    from cntk_gram.pipeline.store import store_attrs
    if not store.exists():
        return None
    return list(store_attrs(store)["config"]["kernel"]["depths"])


def tiles_computed(run_output: str) -> int | None:
    """The 'tiles N computed' count of a `cntk run` summary (None when absent)."""
    match = re.search(r"^tiles\s+(\d+) computed", run_output, re.MULTILINE)
    return int(match.group(1)) if match else None


def solve_to(c: Campaign, run: TableRun, store: Path, report: Path, *, validate: bool) -> float:
    """`cntk solve` of the run's NTK into `report` (results.md there), before the budget ends; returns seconds.
    validate False: the paper's lam = 0 only; True: also the lam chosen on a validation split of the training
    set (the solver's grid), whose results.md lists both."""
    t0 = time.monotonic()
    cntk(c, "solve", str(store), "--device", "cpu" if c.rehearse else "gpu", "--out", str(report),
         "--kernel", f"ntk-{run.arch}", "--memory-budget", solve_memory_budget(),
         *([] if validate else ["--no-validation"]), deadline_s=c.left())
    return round(time.monotonic() - t0, 1)


def solve_memory_budget() -> str:
    """60% of this machine's RAM for `cntk solve --memory-budget` (default 12 GiB): with 128 GB the validation's
    fitting block, 45,000^2 float64 = 16 GB, fits a quarter of it and is read from the store once, not once per lam."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{max(1, int(0.6 * ram) // 2**30)}GiB"


def stage_table(c: Campaign, stage: str) -> dict:
    results = {}
    for run in table_runs(stage, c.rehearse):
        reserve = SOLVE_RESERVE_S[c.rehearse]
        store = c.work / f"{run.name}.zarr"
        depths = store_depths(store) or depths_that_fit(c, run, c.left() - reserve - GRACE_S)
        if not depths:
            results[run.name] = {"status": "skipped", "why": f"depth 3 needs ~{predict_run_s(c, run, 3):.0f} s, "
                                                             f"{c.left():.0f} s left"}
            continue
        args = ["run", run.config, "--backend", "cpu" if c.rehearse else "gpu", "--store", str(store),
                "--archs", run.arch, "--kinds", "ntk", "--depths", ",".join(map(str, depths)), "--no-progress",
                "--no-random-features"]   # the exact columns; random features are a stage of their own when added
        if run.train:
            args += ["--train", str(run.train), "--test", str(run.test), "--tile-size", str(run.train // 2)]
        if c.data_root:
            args += ["--data-root", c.data_root]
        if store.exists():   # written by an earlier call on this machine minutes ago: no checksum pass over it
            args.append("--trust-records")
        record = {"depths": depths, "capped": depths[-1] < TABLE_DEPTHS[-1] and not c.rehearse,
                  "pairs": pairs_of(run), "predicted_s": round(predict_run_s(c, run, depths[-1]))}
        results[run.name] = record
        t0 = time.monotonic()
        try:
            output = cntk(c, *args, deadline_s=c.left() - reserve - GRACE_S, resumable=True)
        except OutOfTime:
            record["kernel_s"] = round(time.monotonic() - t0, 1)
            record["store_status"] = cntk(c, "status", str(store), deadline_s=30).strip().splitlines()[0]
            raise
        record["kernel_s"] = round(time.monotonic() - t0, 1)
        record["tiles_computed"] = tiles_computed(output)
        unchanged = record["tiles_computed"] == 0   # a resumed call: earlier reports of this store still hold
        paper, validated = c.work / f"{run.name}-report", c.work / f"{run.name}-report-validated"
        if unchanged and (validated / "results.md").exists():
            record["solve"] = "validated results of an earlier call reused"
            publish(c, run, record, validated)
            continue
        if unchanged and (paper / "results.md").exists():
            record["solve"] = "lam = 0 results of an earlier call reused"
        else:
            record["solve_s"] = solve_to(c, run, store, paper, validate=False)
        publish(c, run, record, paper)
        # the validated lam second: its solve refactors per lam, and the lam = 0 column must not wait for it
        need = predict_validate_s(c, depths)
        if need > c.left():
            record["validated"] = f"skipped: needs ~{need:.0f} s, {max(c.left(), 0):.0f} s left"
            continue
        try:
            record["validate_s"] = solve_to(c, run, store, validated, validate=True)
        except RuntimeError as exc:   # stopped at the budget or failed: the lam = 0 results above stay
            record["validated"] = f"not finished: {exc}"[:300]
            continue
        record["validated"] = "done"
        publish(c, run, record, validated)   # lam = 0 rows included
    return results


def publish(c: Campaign, run: TableRun, record: dict, report: Path) -> None:
    """The run's results.md from `report` becomes DIR/results-<run>.md (replacing an earlier one)."""
    record["results"] = f"results-{run.name}.md"
    shutil.copyfile(report / "results.md", c.out / record["results"])


def predict_validate_s(c: Campaign, depths) -> float:
    """Seconds of a validated solve: per depth, the lam = 0 fit again plus one fit per lam of the grid on the
    fitting part of the training set (docs/gpu.md, "GPU solve and store read")."""
    return (REHEARSE_VALIDATE_S_PER_DEPTH if c.rehearse else VALIDATE_S_PER_DEPTH) * len(depths)


RUNNERS = {"env": stage_env, "tests": stage_tests, "kernels": stage_kernels,
           "table1-v": lambda c: stage_table(c, "table1-v"), "gap-2k": lambda c: stage_table(c, "gap-2k"),
           "cifar2": lambda c: stage_table(c, "cifar2")}
RESUMABLE = {"table1-v", "gap-2k", "cifar2"}


def predict_stage_s(c: Campaign, stage: str) -> float:
    """Seconds a stage needs to be started: the whole stage, or for a resumable one its smallest useful part."""
    if stage in RESUMABLE:
        first = table_runs(stage, c.rehearse)[0]
        return predict_run_s(c, first, 3) + SOLVE_RESERVE_S[c.rehearse] + GRACE_S
    return (REHEARSE_PREDICT_S if c.rehearse else PREDICT_S)[stage]


# ------------------------------------------------------------------ records

def import_cupy():
    """CuPy with at least one CUDA device, else NoGPU (one line saying what is missing)."""
    try:
        import cupy
    except ImportError as exc:
        raise NoGPU(f"CuPy is not importable ({exc})") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:   # no driver, no device node
        raise NoGPU(f"no CUDA device usable ({type(exc).__name__}: {exc})") from None
    if count < 1:
        raise NoGPU("CuPy sees zero CUDA devices")
    return cupy


def git_commit() -> str:
    """HEAD (+dirty), or where the checkout has no git history (the device gets the working tree only) the commit
    written to .whl/COMMIT when the wheels were built (benchmarks/GPU.md), else 'unknown'."""
    try:
        run = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
    except OSError:   # no git program
        run, dirty = None, ""
    if run is not None and run.returncode == 0 and run.stdout.strip():
        return run.stdout.strip() + ("+dirty" if dirty else "")
    stamp = REPO / ".whl" / "COMMIT"
    return stamp.read_text().strip() if stamp.is_file() else "unknown"


def write_records(c: Campaign, commit: str) -> None:
    """campaign.json and campaign.md in c.out (every call so far on this --work), then c.out copied to c.mirror."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    this = {"call": c.call, "budget_s": c.budget_s, "elapsed_s": round(c.budget_s - c.left(), 1), "date_utc": now,
            "stages": [r["name"] for r in c.records if r.get("call") == c.call]}
    calls = [k for k in c.calls if k["call"] != c.call] + [this]
    order = {name: i for i, name in enumerate(STAGES)}
    doc = {"campaign": "gpu", "rehearse": c.rehearse, "device": c.device, "git_commit": commit,
           "budget_s": c.budget_s, "elapsed_s": this["elapsed_s"], "date_utc": now, "calls": calls,
           "rates": c.rates, "stages": sorted(c.records, key=lambda r: order[r["name"]])}
    for name, text in (("campaign.json", json.dumps(doc, indent=2, default=str) + "\n"),
                       ("campaign.md", markdown(doc, c.out))):
        tmp = c.out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(c.out / name)
    if c.mirror is not None:
        c.mirror.mkdir(parents=True, exist_ok=True)
        for path in c.out.iterdir():
            if path.is_file() and not path.name.endswith(".tmp"):
                shutil.copyfile(path, c.mirror / path.name)


def resume_state(c: Campaign, commit: str) -> None:
    """Continue the campaign of an earlier call on this --work (a warm machine: its stores and c.out are still
    there) when it ran the same commit in the same mode: its records, measured rates, device and calls carry
    over, and this call is the next one. Otherwise c.out starts empty."""
    doc_path = c.out / "campaign.json"
    try:
        doc = json.loads(doc_path.read_text())
    except (OSError, ValueError):
        doc = None
    if not doc or doc.get("git_commit") != commit or doc.get("rehearse") != c.rehearse:
        if c.out.exists():
            shutil.rmtree(c.out)
        c.out.mkdir(parents=True)
        (c.out / "campaign.log").write_text("")
        return
    c.records, c.rates, c.device = doc["stages"], doc.get("rates", {}), doc.get("device", {})
    c.calls = doc.get("calls", [])
    c.call = max([k["call"] for k in c.calls], default=0) + 1


def markdown(doc: dict, out: Path) -> str:
    """campaign.md: the stage table, the kernel table and the copied results.md tables."""
    lines = [f"# GPU campaign{' (rehearsal on the CPU)' if doc['rehearse'] else ''}", "",
             f"Device: {doc['device'].get('name', 'unknown')}; commit {doc['git_commit']}.", ""]
    for k in doc["calls"]:
        lines.append(f"- call {k['call']}: stages {', '.join(k['stages'])}; {k['elapsed_s']:.0f} s of a "
                     f"{k['budget_s']:.0f} s budget; {k['date_utc']}")
    lines += ["", "| stage | call | status | seconds | predicted s | note |", "|---|---|---|---|---|---|"]
    for r in doc["stages"]:
        note = r.get("why") or ""
        lines.append(f"| {r['name']} | {r.get('call', 1)} | {r['status']} | {r['seconds']:.1f} | "
                     f"{r['predicted_s']:.0f} | {note} |")
    kernels = next((r for r in doc["stages"] if r["name"] == "kernels" and r["status"] == "done"), None)
    if kernels and kernels["result"].get("rows"):
        lines += ["", "## Tile kernels (bench_gpu.py)", "",
                  "| arch | depth | fused pairs/s | baseline pairs/s | ratio | % of issue limit | max rel diff |",
                  "|---|---|---|---|---|---|---|"]
        for row in kernels["result"]["rows"]:
            lines.append(f"| {row['arch']} | {row['depth']} | {row['fused_pairs_per_s']:,.0f} | "
                         f"{row['baseline_pairs_per_s']:,.1f} | {row['ratio']:,.0f} | "
                         f"{100 * row['fused_fraction_of_fp32_limit']:.0f} | "
                         f"{row['baseline_vs_fused_max_rel_diff']:.1e} |")
    for r in doc["stages"]:
        if r["name"] in RESUMABLE and isinstance(r.get("result"), dict):
            for name, run in r["result"].items():
                if not isinstance(run, dict):
                    continue
                lines += ["", f"## {name}", "", f"Depths {run.get('depths')}"
                          f"{' (capped by the budget)' if run.get('capped') else ''}; {run.get('pairs', 0):,} pairs; "
                          f"kernel {run.get('kernel_s', '-')} s, solve (lam = 0) {run.get('solve_s', '-')} s, "
                          f"validated lam: {run.get('validated', '-')}"
                          f"{' in %s s' % run['validate_s'] if 'validate_s' in run else ''}."]
                if run.get("results") and (out / run["results"]).exists():
                    lines += ["", (out / run["results"]).read_text().strip()]
    return "\n".join(lines) + "\n"


def run_campaign(c: Campaign, stages: list[str]) -> int:
    if not c.rehearse:
        import_cupy()   # NoGPU before anything is written or spent
    commit = git_commit()
    c.work.mkdir(parents=True, exist_ok=True)
    resume_state(c, commit)
    c.log(f"=== call {c.call}: stages {','.join(stages)}, budget {c.budget_s:.0f} s")
    for name in STAGES:
        if name not in stages:
            continue
        need = predict_stage_s(c, name)
        record = {"name": name, "call": c.call, "status": "skipped", "seconds": 0.0, "predicted_s": round(need),
                  "result": None}
        c.records = [r for r in c.records if r["name"] != name] + [record]   # a rerun replaces the earlier one
        if need > c.left():
            record["why"] = f"needs ~{need:.0f} s, {max(c.left(), 0):.0f} s left"
        else:
            t0 = time.monotonic()
            try:
                record["result"] = RUNNERS[name](c)
                record["status"] = "done"
            except OutOfTime as exc:
                record["status"], record["why"] = "out-of-time", str(exc)
            except NoGPU:
                raise
            except Exception as exc:   # one stage failing must not lose the others
                record["status"], record["why"] = "failed", f"{type(exc).__name__}: {exc}"[:400]
            record["seconds"] = round(time.monotonic() - t0, 1)
            if name in RESUMABLE and record["status"] != "done":
                record.setdefault("result", None)
        print(f"gpu_campaign: {name:9s} {record['status']:11s} {record['seconds']:7.1f} s  "
              f"{record.get('why', '')}", flush=True)
        write_records(c, commit)
    return 0 if all(r["status"] == "done" for r in c.records if r["call"] == c.call) else 1


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
    work = args.work or REPO / "runs" / ("gpu-campaign-rehearsal" if args.rehearse else "gpu-campaign")
    c = Campaign(out=work / "campaign-out", mirror=args.out, work=work, budget_s=args.budget_s,
                 rehearse=args.rehearse, data_root=args.data_root)
    try:
        return run_campaign(c, stages)
    except NoGPU as exc:
        print(f"gpu_campaign: no GPU for a real run: {exc}; use --rehearse to run on the CPU", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
