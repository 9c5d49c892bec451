"""Benchmark the ridgeless learning curve: `--train-sizes` of 8 sizes against one ridgeless solve of the largest.

    python -m benchmarks.bench_curve --n 16000 --out benchmarks/results/curve-cpu.json [--json]

A synthetic SPD kernel (benchmarks.bench_solve.write_synthetic_store: exponential kernel, full rank like a CNTK
Gram) is written into a real store of n training + n_test test images. Then, each in a fresh process and
alternating (A B A B ... to spread the load of other jobs over both), with --repeats pairs:

- one:   solve_store(validate=False): one ridgeless solve of all n rows (factorisation, triangular solves,
         prediction, saving), what `cntk solve --no-validation` does;
- curve: solve_store_with_curve(validate=False, train_sizes=8 sizes up to n): the same row plus the 7 smaller
         curve points, what `cntk solve --no-validation --train-sizes ...` does.

Reported per measurement: wall and CPU seconds (user + system: less sensitive to other jobs on the machine) and
peak RSS; the ratios curve / one of the medians (the target is <= 1.2),
and what 8 separate solves would cost by the cubic model (sum of (s/n)^3: the factorisations alone). With --naive
the 8 separate solves are also measured (solve_kernel on each leading block).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]   # the measuring child runs as python -m benchmarks.bench_curve from here


def default_sizes(n: int, count: int = 8) -> list[int]:
    """count sizes from n/50 to n, about evenly spaced in log n (multiples of 10), the last one n itself."""
    import numpy as np

    return sorted({max(10, int(round(s, -1))) for s in np.geomspace(n / 50, n, count)[:-1]} | {n})


def measure(store: Path, *, what: str, sizes: list[int], memory_budget: int, scratch: Path) -> dict:
    """Runs in a fresh process: wall time and peak RSS of one way of solving (module docstring)."""
    import numpy as np

    from cntk_gram.pipeline.curve import prefix_gram
    from cntk_gram.pipeline.ridge import SolveOptions, solve_kernel
    from cntk_gram.pipeline.solve import solve_store_with_curve
    from cntk_gram.pipeline.store import open_gram, read_inputs

    options = SolveOptions(validate=False, device="cpu", memory_budget=memory_budget, scratch_dir=scratch)
    start = time.perf_counter()
    cpu_start = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    if what == "naive":
        info = read_inputs(store)
        gram, n_train, labels = open_gram(store, "ntk-vanilla", 3), info["n_train"], info["labels"]
        accuracy = {s: solve_kernel(prefix_gram(gram, s, n_train), labels=np.r_[labels[:s], labels[n_train:]],
                                    n_train=s, options=options).ridgeless.accuracy for s in sizes}
    else:
        rows, curve = solve_store_with_curve(store, options, force=True,
                                             train_sizes=sizes if what == "curve" else ())
        accuracy = {r.n_train: r.ridgeless.accuracy for r in (curve or rows)}
    usage = resource.getrusage(resource.RUSAGE_SELF)   # CPU seconds: less sensitive than wall time to other jobs
    return {"what": what, "wall_seconds": round(time.perf_counter() - start, 3),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime - cpu_start, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 3),
            "accuracy": accuracy}


def run_child(store: Path, what: str, sizes: list[int], budget: int) -> dict:
    child = subprocess.run([sys.executable, "-m", "benchmarks.bench_curve", "--measure", str(store.resolve()),
                            "--what", what, "--sizes", ",".join(map(str, sizes)), "--memory-budget", f"{budget}B"],
                           cwd=REPO, capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(child.stderr)
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    from cntk_gram.pipeline.config import parse_bytes
    from cntk_gram.pipeline.linalg import plan_factor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16000, help="training images of the synthetic store [16000]")
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--tile", type=int, default=500, help="store tile; must divide n")
    parser.add_argument("--sizes", default=None, help="comma-separated curve sizes [8 from n/50 to n]")
    parser.add_argument("--memory-budget", default="12GiB", help="host budget of the factorisation [12GiB]")
    parser.add_argument("--repeats", type=int, default=2, help="pairs of (one, curve) measurements [2]")
    parser.add_argument("--naive", action="store_true", help="also measure 8 separate solves")
    parser.add_argument("--workdir", type=Path, default=None, help="where the synthetic store goes [a temp dir]")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument("--json", action="store_true", help="print only the JSON object on stdout")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)   # internal: child process
    parser.add_argument("--what", default="one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    budget = parse_bytes("--memory-budget", args.memory_budget)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else default_sizes(args.n)
    if args.measure:
        print(json.dumps(measure(args.measure, what=args.what, sizes=sizes, memory_budget=budget,
                                 scratch=args.measure.parent)))
        return
    from benchmarks.bench_solve import write_synthetic_store

    say = (lambda *a: print(*a, file=sys.stderr))
    workdir = Path(tempfile.mkdtemp(prefix="bench-curve-", dir=args.workdir))
    runs = []
    try:
        store = workdir / f"synthetic-{args.n}.zarr"
        t0 = time.perf_counter()
        write_synthetic_store(store, n_train=args.n, n_test=args.n_test, tile=args.tile)
        say(f"n={args.n}: synthetic store written in {time.perf_counter() - t0:.1f} s; sizes {sizes}")
        for _ in range(args.repeats):
            for what in ("one", "curve"):
                runs.append(run_child(store, what, sizes, budget))
                say(json.dumps({k: v for k, v in runs[-1].items() if k != "accuracy"}))
        if args.naive:
            runs.append(run_child(store, "naive", sizes, budget))
            say(json.dumps(runs[-1]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    def medians(field):
        return {what: statistics.median(r[field] for r in runs if r["what"] == what)
                for what in ("one", "curve", "naive") if any(r["what"] == what for r in runs)}

    median, cpu = medians("wall_seconds"), medians("cpu_seconds")
    plan = plan_factor(args.n, chunk=args.tile, memory_budget=budget)
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "load_average_at_end": os.getloadavg()},
              "n_train": args.n, "n_test": args.n_test, "tile": args.tile, "sizes": sizes,
              "memory_budget_gib": budget / 2**30, "panels": len(plan.bounds), "on_disk": plan.on_disk,
              "median_seconds": median, "ratio_curve_over_one": round(median["curve"] / median["one"], 3),
              "median_cpu_seconds": cpu, "cpu_ratio_curve_over_one": round(cpu["curve"] / cpu["one"], 3),
              "model_ratio_separate_solves": round(sum((s / args.n) ** 3 for s in sizes), 3),
              "runs": runs}
    if "naive" in median:
        report["ratio_naive_over_one"] = round(median["naive"] / median["one"], 3)
        naive = next(r["accuracy"] for r in runs if r["what"] == "naive")
        report["curve_accuracy_equals_naive"] = all(
            r["accuracy"] == {str(s): a for s, a in naive.items()} for r in runs if r["what"] == "curve")
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(json.dumps(report) if args.json else text)


if __name__ == "__main__":
    main()
