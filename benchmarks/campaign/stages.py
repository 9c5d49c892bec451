"""What each campaign stage runs. Each takes the Campaign and the stage's result dict, which it fills as it goes (so
a stage stopped or failed part-way keeps what it found). Commands run through the campaign's supervisor with `-P`,
so they import the installed wheel (the one carried to the device) rather than the checkout they run in; facts
about a store or a config come from the package's API (sizes from the configs the runs use, tile counts from the
completion records), never from parsing a command's human-readable output."""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .rates import TABLE_DEPTHS, pairs_of, rates_from_kernels
from .state import REPO, Campaign
from .supervisor import GRACE_S, OutOfTime

PYTHON = (sys.executable, "-P")
CLI = (*PYTHON, "-m", "cntk_gram.pipeline.cli")
NVIDIA_SMI_TIMEOUT_S = 15
TESTS_TIMEOUT_S = 90           # pytest-timeout's bound of one GPU test in the tests stage
TESTS_WORKERS = 4              # pytest-xdist processes of the tests stage (when xdist is installed)


class NoGPU(RuntimeError):
    """A real (non-rehearsal) campaign found no usable CUDA device."""


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


# ------------------------------------------------------------------ env, kernels, tests

def host_facts(path: Path) -> dict:
    """This machine as it reports itself now: memory (/proc/meminfo MemTotal and MemAvailable, GiB; on the lent
    machines RAM may start small and grow, so solve_memory_budget reads it again when the solve starts), cores, and
    free disk under `path`."""
    meminfo = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                meminfo[name] = round(int(value.split()[0]) * 1024 / 2**30, 1)
    path.mkdir(parents=True, exist_ok=True)
    return {"mem_total_gib": meminfo.get("MemTotal"), "mem_available_gib": meminfo.get("MemAvailable"),
            "cpus": os.cpu_count(), "disk_free_gib": round(shutil.disk_usage(path).free / 2**30, 1)}


# distributions whose versions the env stage records (None: not installed)
PACKAGES = ("cupy-cuda13x", "cupy-cuda12x", "cuda-core", "cuda-bindings", "numpy", "numba", "dask", "distributed",
            "dask-cuda", "zarr", "cntk-gram")


def package_versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def stage_env(c: Campaign, result: dict) -> None:
    """The machine and the software: host facts, package versions and where `cntk_gram` is imported from (the
    installed wheel on the device), nvidia-smi's line and the device's properties."""
    import cntk_gram
    result.update(python=sys.version.split()[0], rehearse=c.rehearse, host=host_facts(c.work),
                  packages=package_versions(), cntk_gram_from=str(Path(cntk_gram.__file__).parent))
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            result["nvidia_smi"] = subprocess.run(
                [smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S).stdout.strip()
        except subprocess.TimeoutExpired:
            result["nvidia_smi"] = f"no answer within {NVIDIA_SMI_TIMEOUT_S} s"
    if c.rehearse:
        c.device = {"name": "cpu (rehearsal)"}
    else:
        cupy = import_cupy()
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        c.device = {"name": name, "compute_capability": f"{props['major']}.{props['minor']}",
                    "sm_count": props["multiProcessorCount"],
                    "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
                    "driver_version": cupy.cuda.runtime.driverGetVersion(),
                    "cuda_runtime_version": cupy.cuda.runtime.runtimeGetVersion(), "cupy_version": cupy.__version__}
    result.update(c.device)


def stage_kernels(c: Campaign, result: dict, *, skip_accuracy: bool) -> None:
    """bench_gpu.py on the GPU (its JSON becomes DIR/kernels.json; the depth-21 rates go into the rate model);
    skip_accuracy: the tests stage checks the kernels against the float64 reference, so bench_gpu does not.
    In rehearsal, the parts that need no GPU: the SASS count and the accuracy check through the CPU backend."""
    if c.rehearse:
        from benchmarks import bench_gpu
        result["sass_count"] = bench_gpu.sass_summary()
        result["accuracy"] = "skipped: the tests stage checks the kernels" if skip_accuracy else \
            bench_gpu.accuracy(max_depth=3, backend="cpu")
        return
    out = c.out / "kernels.json"
    out.unlink(missing_ok=True)   # an earlier call's rows must not pass for this one's
    try:
        c.supervisor().run([*PYTHON, REPO / "benchmarks" / "bench_gpu.py", "--min-seconds", "0.3", "--out", out,
                            *(["--skip-accuracy"] if skip_accuracy else [])], seconds=c.left())
    finally:   # bench_gpu writes its rows as it measures them: a failed or stopped run keeps those
        if out.exists():
            kernel_rows(c, json.loads(out.read_text()), result)


def kernel_rows(c: Campaign, report: dict, result: dict) -> None:
    """bench_gpu.py's report into the stage's result, its depth-21 rates into the rate model."""
    c.rates.update(rates_from_kernels(report))
    result["rows"] = [{k: row[k] for k in ("arch", "depth", "fused_pairs_per_s", "baseline_pairs_per_s", "ratio",
                                           "fused_fraction_of_fp32_limit", "baseline_vs_fused_max_rel_diff")}
                      for row in report["results"]]
    result["sass_count"] = report.get("sass_count")
    result["accuracy_passed"] = (report.get("accuracy") or {}).get("passed")
    result["projection_cntk_v_s"] = (report.get("projection_cntk_v_all_depths_to_21") or {}).get("kernel_seconds")


def pytest_command(*, timeout_s: int = TESTS_TIMEOUT_S, workers: int = TESTS_WORKERS) -> list[str]:
    """`pytest -m gpu tests/test_gpu.py`, with a per-test timeout when pytest-timeout is installed and in parallel
    when pytest-xdist is (both are on the device's image; neither is required)."""
    args = [*PYTHON, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        args += [f"--timeout={timeout_s}"]
    if importlib.util.find_spec("xdist") is not None and workers > 1:
        args += ["-n", str(workers)]
    return args + ["tests/test_gpu.py"]


def tests_environment(data_root: str | None) -> dict[str, str]:
    """The tests' environment: the campaign's CIFAR-10 for the real-image GPU test, and no search elsewhere (no
    ../shared builder, no download: the device reaches no network)."""
    env = {**os.environ, "CNTK_TEST_DOWNLOAD": "0", "CNTK_TEST_SHARED_BUILDER": ""}
    if data_root:
        env["CNTK_CIFAR_ROOT"] = str(data_root)
    return env


def stage_tests(c: Campaign, result: dict, *, cap_s: float) -> None:
    """The GPU tests, for at most cap_s seconds (the table stages keep their time); a stopped run keeps pytest's
    summary of what ran."""
    command = pytest_command()
    result["command"] = " ".join(command[command.index("pytest"):])
    try:
        output = c.supervisor().run(command, seconds=min(cap_s, c.left()), env=tests_environment(c.data_root),
                                    resumable=True)
    except OutOfTime as exc:
        result["summary"] = _pytest_summary(exc.output)
        raise
    result["summary"] = _pytest_summary(output)


def _pytest_summary(output: str) -> str:
    words = (" passed", " skipped", " failed", " error", "no tests ran")
    lines = [line.strip("= ") for line in output.splitlines() if any(w in line for w in words)]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------ table stages

@dataclass(frozen=True)
class TableRun:
    """One `cntk run` + `cntk solve` of a paper config for one arch; train / test None: the config's own."""
    name: str
    config: str
    arch: str
    train: int | None = None
    test: int | None = None


def table_runs(stage: str, rehearse: bool) -> list[TableRun]:
    """The runs of a table stage; in rehearsal tens of images for vanilla, fewer for GAP (~1000x the work per pair
    on the CPU)."""
    tiny = dict(train=20, test=10) if rehearse else {}
    tiny_gap = dict(train=8, test=4) if rehearse else {}
    return {
        "table1-v": [TableRun("table1-v", "configs/paper/table1.yaml", "vanilla", **tiny)],
        "gap-2k": [TableRun("gap-2k", "configs/paper/table1-2000.yaml", "gap", **tiny_gap)],
        "cifar2": [TableRun("cifar2-v", "configs/paper/table2-cifar2.yaml", "vanilla", **tiny),
                   TableRun("cifar2-gap", "configs/paper/table2-cifar2.yaml", "gap", **tiny_gap)],
    }[stage]


def run_overrides(run: TableRun, c: Campaign, *, depths=None) -> dict:
    """The config overrides (dotted fields) of a table run: the same dict decides its sizes (run_sizes) and its
    `cntk run` options (run_command). The exact kernels only (random features would be a stage of their own)."""
    overrides = {"store": str(c.work / f"{run.name}.zarr"), "backend": "cpu" if c.rehearse else "gpu",
                 "kernel.archs": [run.arch], "kernel.kinds": ["ntk"], "kernel.random_features": False}
    if run.train is not None:
        overrides.update({"data.train": run.train, "data.test": run.test, "tiles.size": run.train // 2})
    if c.data_root:
        overrides["data.root"] = str(c.data_root)
    if depths:
        overrides["kernel.depths"] = list(depths)
    return overrides


RUN_OPTIONS = {"store": "--store", "data.root": "--data-root", "data.train": "--train", "data.test": "--test",
               "tiles.size": "--tile-size", "kernel.archs": "--archs", "kernel.kinds": "--kinds",
               "kernel.depths": "--depths", "backend": "--backend"}


def run_command(run: TableRun, overrides: dict, *, trust_records: bool) -> list[str]:
    """`cntk run CONFIG` with `overrides` as its options."""
    args = [*CLI, "run", run.config]
    for name, value in overrides.items():
        if name == "kernel.random_features":
            args += [] if value is None else ["--no-random-features"]
        else:
            args += [RUN_OPTIONS[name], ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return args + ["--no-progress", *(["--trust-records"] if trust_records else [])]


@functools.lru_cache(maxsize=4)
def _labels(root: str) -> dict:
    from cntk_gram.pipeline.data import load_cifar10
    raw = load_cifar10(root=root, download=False)
    return {"train": raw["train_labels"], "test": raw["test_labels"]}


def run_sizes(run: TableRun, overrides: dict) -> tuple[int, int]:
    """(train, test) images of the run: its config with `overrides`, selected from the data by the package's own
    selection (cntk_gram.pipeline.data.select_indices)."""
    from cntk_gram.pipeline.config import load_config
    from cntk_gram.pipeline.data import select_indices
    data = load_config(REPO / run.config, overrides).data
    labels = _labels(str(data.root))
    return tuple(len(select_indices(labels=labels[split], count=count, classes=data.classes, explicit=explicit,
                                    split=split))
                 for split, count, explicit in (("train", data.train, data.train_index),
                                                ("test", data.test, data.test_index)))


def store_depths(store: Path) -> list[int] | None:
    """Depths of an existing store (a run of an earlier call on this warm machine), else None. A store's depths
    cannot change, so a resumed stage keeps them rather than failing on a different depth cap."""
    from cntk_gram.pipeline.store import store_attrs
    if not store.exists():
        return None
    return list(store_attrs(store)["config"]["kernel"]["depths"])


def store_tiles(store: Path) -> tuple[int, int]:
    """(tiles done, tiles planned) of a store from its completion records; (0, 0) before it exists."""
    from cntk_gram.pipeline.inspect import status
    if not (store / "zarr.json").exists():
        return 0, 0
    s = status(store)
    return s["tiles_done"], s["tiles_total"]


def first_run_s(c: Campaign, stage: str) -> float:
    """Seconds a table stage needs to be started (its first run at the smallest depth and its lam = 0 solve)."""
    run = table_runs(stage, c.rehearse)[0]
    pairs = pairs_of(*run_sizes(run, run_overrides(run, c)))
    return c.model().first_run_s(run.arch, pairs, GRACE_S)


def stage_table(c: Campaign, result: dict, *, stage: str) -> None:
    runs = result.setdefault("runs", {})
    for run in table_runs(stage, c.rehearse):
        runs[run.name] = {}   # in the stage's result from the start: a checkpoint records it as it fills
        table_run(c, run, runs[run.name])


def table_run(c: Campaign, run: TableRun, record: dict) -> None:
    """Kernel run, lam = 0 solve, then (when it fits) the validated-lam solve of one table run, into `record`.
    OutOfTime from the kernel run propagates after the record is filled (store status included)."""
    model = c.model()
    store = c.work / f"{run.name}.zarr"
    n_train, n_test = run_sizes(run, run_overrides(run, c))
    pairs = pairs_of(n_train, n_test)
    reserve = model.solve_reserve_s
    depths = store_depths(store) or choose_depths(c, run, pairs, record)
    if not depths:
        return
    record.update({"depths": depths, "capped": depths[-1] < TABLE_DEPTHS[-1] and not c.rehearse,
                   "n_train": n_train, "n_test": n_test, "pairs": pairs,
                   "predicted_s": round(model.run_s(run.arch, pairs, depths[-1]))})
    done_before, _ = store_tiles(store)
    command = run_command(run, run_overrides(run, c, depths=depths), trust_records=store.exists())
    t0 = c.clock()
    try:   # a store of an earlier call on this machine minutes ago is trusted: no checksum pass over it
        c.supervisor().run(command, seconds=c.left() - reserve - GRACE_S, resumable=True)
    except OutOfTime:
        done, total = store_tiles(store)
        record.update(kernel_s=round(c.clock() - t0, 1), store_status=f"{done}/{total} tiles done")
        raise
    record["kernel_s"] = round(c.clock() - t0, 1)
    record["tiles_computed"] = store_tiles(store)[0] - done_before
    unchanged = record["tiles_computed"] == 0   # a resumed call: earlier reports of this store still hold
    paper, validated = c.work / f"{run.name}-report", c.work / f"{run.name}-report-validated"
    if unchanged and (validated / "results.md").exists():
        record["solve"] = "validated results of an earlier call reused"
        return publish(c, run, record, validated)
    if unchanged and (paper / "results.md").exists():
        record["solve"] = "lam = 0 results of an earlier call reused"
    else:
        record["solve_s"] = solve_to(c, run, store, paper, validate=False)
    publish(c, run, record, paper)
    # the validated lam second: its solve refactors per lam, and the lam = 0 column must not wait for it
    need = model.validate_s(len(depths))
    if need > c.left():
        record["validated"] = f"skipped: needs ~{need:.0f} s, {max(c.left(), 0):.0f} s left"
        return
    try:
        record["validate_s"] = solve_to(c, run, store, validated, validate=True)
    except RuntimeError as exc:   # stopped at the budget or failed: the lam = 0 results above stay
        record["validated"] = f"not finished: {exc}"[:300]
        return
    record["validated"] = "done"
    publish(c, run, record, validated)   # lam = 0 rows included


def choose_depths(c: Campaign, run: TableRun, pairs: int, record: dict) -> list[int]:
    """A new store's depths: those whose single pass fits the time left and whose arrays fit the disk free now.
    `record` gets the free disk, what capped the depths, or why none fits (then [])."""
    from cntk_gram.pipeline.plan import free_bytes
    model = c.model()
    in_time = model.depths_that_fit(run.arch, pairs, c.left() - model.solve_reserve_s - GRACE_S)
    free = free_bytes(c.work)
    depths = depths_on_disk(c, run, in_time, free)
    record["disk_free_gib"] = round(free / 2**30, 1)
    if depths and depths[-1] < TABLE_DEPTHS[-1] and not c.rehearse:
        record["capped_by"] = "disk" if len(depths) < len(in_time) else "budget"
    if not in_time:
        first = model.depths[0]
        record.update(status="skipped", why=f"depth {first} needs ~{model.run_s(run.arch, pairs, first):.0f} s, "
                                            f"{max(c.left(), 0):.0f} s left")
    elif not depths:
        record.update(status="skipped", why=f"depth {in_time[0]}'s store needs "
                                            f"{store_bytes(c, run, in_time[:1]) / 2**30:.1f} GiB and "
                                            f"{DISK_SPARE / 2**30:.0f} GiB spare, the disk has {free / 2**30:.1f} "
                                            f"GiB free")
    return depths


# Kept free beside a new store's Gram arrays: its input images (0.7 GB at 60,000), the solver's reports, the
# records and the file system's own margin.
DISK_SPARE = 2 * 2**30


def store_bytes(c: Campaign, run: TableRun, depths) -> int:
    """Bytes of the run's Gram arrays at these depths once complete, by the package's own plan (one float32
    tile x tile chunk per planned tile and array): table1-v at 5 depths is ~35 GB."""
    from cntk_gram.pipeline.config import load_config
    from cntk_gram.pipeline.plan import run_cost
    from cntk_gram.pipeline.store import planned_arrays
    overrides = run_overrides(run, c, depths=depths)
    config = load_config(REPO / run.config, overrides)
    n_train, n_test = run_sizes(run, overrides)
    return run_cost(n_train=n_train, n_test=n_test, size=config.tiles.size, test_test=config.data.test_test,
                    arrays=len(planned_arrays(config)), store_path=c.work).store_bytes


def depths_on_disk(c: Campaign, run: TableRun, depths: list[int], free: int) -> list[int]:
    """The longest prefix of `depths` whose store fits `free` bytes with DISK_SPARE left over."""
    while depths and store_bytes(c, run, depths) + DISK_SPARE > free:
        depths = depths[:-1]
    return depths


def solve_to(c: Campaign, run: TableRun, store: Path, report: Path, *, validate: bool) -> float:
    """`cntk solve` of the run's NTK into `report` (results.md there) before the budget ends; returns seconds.
    validate False: the paper's lam = 0 only; True: also the lam chosen on a validation split of the training set
    (the solver's grid), whose results.md lists both."""
    t0 = c.clock()
    budget = solve_memory_budget()
    c.log(f"solve: --memory-budget {budget} (host now: {host_facts(c.work)})")
    c.supervisor().run([*CLI, "solve", store, "--device", "cpu" if c.rehearse else "gpu", "--out", report,
                        "--kernel", f"ntk-{run.arch}", "--memory-budget", budget,
                        *([] if validate else ["--no-validation"])], seconds=c.left())
    return round(c.clock() - t0, 1)


def solve_memory_budget() -> str:
    """60% of this machine's RAM for `cntk solve --memory-budget` (default 12 GiB): with 128 GB the validation's
    fitting block, 45,000^2 float64 = 16 GB, fits a quarter of it and is read from the store once, not once per lam."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{max(1, int(0.6 * ram) // 2**30)}GiB"


def publish(c: Campaign, run: TableRun, record: dict, report: Path) -> None:
    """The run's results.md from `report` becomes DIR/results-<run>.md (replacing an earlier one), and reaches the
    call's --out at once with the records (a call cut off later still returns it)."""
    record["results"] = f"results-{run.name}.md"
    shutil.copyfile(report / "results.md", c.out / record["results"])
    c.checkpoint()
