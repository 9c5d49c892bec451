"""Benchmark the kernel-regression solve: wall time and peak memory of factor + solve + predict.

    python -m benchmarks.bench_solve --n 10000 --n 20000 --memory-budget 12GiB --memory-budget 2GiB \
        --out benchmarks/results/solve-cpu.json

For each n a synthetic SPD kernel (exponential kernel exp(-|x - y| / scale) on random points, full rank
like a CNTK Gram) is written into a real store (same layout as `cntk run`: float32 tiles, upper
triangle only, n_train train rows + n_test test rows), then a fresh process times
cntk_gram.pipeline.ridge.fit_alpha + predict_scores on it and reports: wall seconds, peak RSS
(resource.getrusage ru_maxrss: includes touched pages of memory-mapped factor panels), peak traced
allocations (tracemalloc: numpy buffers), the relative residual |K alpha - Y| / |Y|, and the panel plan.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]   # the measuring child runs as python -m benchmarks.bench_solve from here


def write_synthetic_store(store: Path, *, n_train: int, n_test: int, tile: int, seed: int = 0) -> None:
    """A store with one array gram/ntk-vanilla/depth-3 holding an SPD exponential kernel."""
    import zarr

    from cntk_gram.pipeline.config import build_config
    from cntk_gram.pipeline.data import Inputs
    from cntk_gram.pipeline.store import prepare_store

    n = n_train + n_test
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int64)
    points = rng.standard_normal((n, 8)) + 0.5 * np.eye(10, 8)[labels]   # weak class signal
    inputs = Inputs(images=np.zeros((n, 32, 32, 3), np.float32), labels=labels, index=np.arange(n),
                    split=np.repeat(np.array([0, 1], np.int8), [n_train, n_test]),
                    mean=np.zeros(3), std=np.ones(3))
    config = build_config({"data": {"train": n_train, "test": n_test},
                           "kernel": {"archs": ["vanilla"], "kinds": ["ntk"], "depths": [3]},
                           "tiles": {"size": tile}, "store": str(store)})
    prepare_store(store, config=config, inputs=inputs)
    gram = zarr.open_array(str(store), path="gram/ntk-vanilla/depth-3", mode="r+")
    for i0 in range(0, n_train, tile):
        xi = points[i0:i0 + tile]
        for j0 in range(i0, n, tile):
            xj = points[j0:j0 + tile]
            dist = np.sqrt(np.maximum(((xi[:, None, :] - xj[None, :, :]) ** 2).sum(-1), 0.0))
            gram[i0:i0 + tile, j0:j0 + tile] = np.exp(-dist / 4.0).astype(np.float32)


def measure(store: Path, *, memory_budget: int, device: str, scratch: Path) -> dict:
    """Runs in a fresh process: time and memory of one lambda = 0 fit and prediction."""
    from cntk_gram.pipeline.linalg import plan_factor
    from cntk_gram.pipeline.ridge import SolveOptions, fit_alpha, predict_scores
    from cntk_gram.pipeline.store import open_gram, read_inputs
    from cntk_gram.workers.preprocess import targets

    info = read_inputs(store)
    n_train = info["n_train"]
    gram = open_gram(store, "ntk-vanilla", 3)
    k_train, k_cross = gram[:n_train, :n_train], gram[:n_train, n_train:]
    y = targets(info["labels"][:n_train])
    plan = plan_factor(n_train, chunk=info["tile"], memory_budget=memory_budget)  # as cholesky_blocked on the CPU
    panels = plan.bounds
    tracemalloc.start()
    start = time.perf_counter()
    options = SolveOptions(device=device, memory_budget=memory_budget, scratch_dir=scratch)
    alpha = fit_alpha(k_train, y, lam=0.0, options=options)
    fit_s = time.perf_counter() - start
    predict_scores(k_cross, alpha)
    wall_s = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    residual = (k_train.astype(np.float64) @ alpha).compute(scheduler="threads") - y
    return {"n_train": n_train, "n_test": info["n_test"], "tile": info["tile"], "device": device,
            "memory_budget_gib": memory_budget / 2**30, "panels": len(panels),
            "panel_width": panels[0][1] - panels[0][0], "on_disk": plan.on_disk,
            "factor_gib": round(plan.factor_bytes / 2**30, 3), "fit_seconds": round(fit_s, 3),
            "fit_gflops": round(n_train ** 3 / 3 / fit_s / 1e9, 1),
            "wall_seconds": round(wall_s, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 3),
            "peak_traced_gib": round(traced_peak / 2**30, 3),
            "relative_residual": float(np.linalg.norm(residual) / np.linalg.norm(y))}


def main() -> None:
    from cntk_gram.pipeline.config import parse_bytes

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, action="append", help="n_train (repeatable) [10000, 20000]")
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--tile", type=int, default=500, help="store tile; must divide every n")
    parser.add_argument("--memory-budget", action="append", help="host budget (repeatable) [12GiB, 2GiB]")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"])
    parser.add_argument("--workdir", type=Path, default=None, help="where synthetic stores go [a temp dir]")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)   # internal: child process
    args = parser.parse_args()
    budgets = [parse_bytes("--memory-budget", b) for b in (args.memory_budget or ["12GiB", "2GiB"])]
    if args.measure:
        print(json.dumps(measure(args.measure, memory_budget=budgets[0], device=args.device,
                                 scratch=args.measure.parent)))
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench-solve-", dir=args.workdir))
    results = []
    try:
        for n in args.n or [10000, 20000]:
            store = workdir / f"synthetic-{n}.zarr"
            t0 = time.perf_counter()
            write_synthetic_store(store, n_train=n, n_test=args.n_test, tile=args.tile)
            print(f"n={n}: synthetic store written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            for budget in budgets:
                child = subprocess.run([sys.executable, "-m", "benchmarks.bench_solve", "--measure",
                                        str(store.resolve()), "--device", args.device, "--memory-budget", f"{budget}B"],
                                       cwd=REPO, capture_output=True, text=True)
                if child.returncode != 0:
                    sys.exit(child.stderr)
                results.append(json.loads(child.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), file=sys.stderr)
            shutil.rmtree(store)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()}, "results": results}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
