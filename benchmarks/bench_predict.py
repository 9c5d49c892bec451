"""Predicted against measured wall time (pipeline.predict) for `cntk run` and `cntk solve`, several archs, depths
and sizes, on real CIFAR-10 images.

    python -m benchmarks.bench_predict --cifar-root DIR --json            # ~12 minutes on 2 quiet cores
    python -m benchmarks.bench_predict --cifar-root DIR --quick           # seconds per case: checks the machinery

Every case is a fresh process with its own store and an empty probe cache (each run probes this machine itself),
read through `--json`. run: predicted = the run's own `predicted_seconds`, measured = wall_seconds -
prepare_seconds (the prediction covers what follows its probes: cluster start and tiles). solve: predicted =
`cntk solve --dry-run --json`'s seconds, measured = the wall time of `cntk solve --json --force` (with process
start and report files). ratio = predicted / measured; the target is 0.67..1.5 for cases of a minute or more on a
quiet machine. The 1-minute load average per core is recorded before and after every case (LOAD_NOTE). With --json
the result goes to benchmarks/results/OUT.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import cpu_info, write_result

# name: (archs, depths, train, test, tile). Sized for ~1 minute each on 2 cores (benchmarks/results/cpu-kernel.json,
# pipeline-cpu.json, fc-full/); quick: the same shapes, a few seconds each.
RUNS = {
    "vanilla-d21": (["vanilla"], [3, 6, 11, 21], 1500, 1000, 250),
    "vanilla-d3": (["vanilla"], [3], 5000, 2000, 500),
    "gap-d3": (["gap"], [3], 160, 100, 40),
    "gap-d6": (["gap"], [3, 6], 100, 80, 50),
    "fc-d3": (["fc"], [3], 20000, 10000, 1000),
}
QUICK_RUNS = {
    "vanilla-d21": (["vanilla"], [3, 21], 200, 100, 100),
    "vanilla-d3": (["vanilla"], [3], 400, 200, 200),
    "gap-d3": (["gap"], [3], 16, 8, 8),
    "fc-d3": (["fc"], [3], 2000, 1000, 500),
}
# name: (store of which run case, extra `cntk solve` options)
SOLVES = {
    "solve-fc-20k-ridgeless": ("fc-d3", ["--no-validation"]),
    "solve-fc-20k-out-of-core": ("fc-d3", ["--no-validation", "--kernel", "ntk-fc", "--memory-budget", "2GiB"]),
    "solve-vanilla-5k-validated": ("vanilla-d3", []),
}
QUICK_SOLVES = {
    "solve-fc-2k-ridgeless": ("fc-d3", ["--no-validation"]),
    "solve-fc-2k-out-of-core": ("fc-d3", ["--no-validation", "--kernel", "ntk-fc", "--memory-budget", "32MiB"]),
    "solve-vanilla-400-validated": ("vanilla-d3", []),
}


LOAD_NOTE = ("1-minute load average per core: a case's own threads (one per core) make about 1 per core, so "
             "load_after near 1 is the case itself; well above 1, or load_before above ~0.5, other processes shared "
             "the cores and the case's ratio says little")


def load() -> float:
    return round(os.getloadavg()[0] / (os.cpu_count() or 1), 2)


def cntk(*args, env) -> tuple[dict, float]:
    """(the JSON object of `cntk ARGS`, wall seconds); stops the benchmark on failure."""
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "cntk_gram.pipeline.cli", *map(str, args)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"cntk {' '.join(map(str, args))} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout), time.time() - started


def run_case(name, spec, *, root, work, env) -> dict:
    archs, depths, train, test, tile = spec
    store = work / f"{name}.zarr"
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"source": "cifar10", "root": str(root), "train": train, "test": test, "download": False},
        "kernel": {"archs": archs, "kinds": ["ntk", "nngp"], "depths": depths}, "tiles": {"size": tile},
        "backend": "cpu", "store": str(store)}))
    before = load()
    summary, _ = cntk("run", config, "--json", "--no-progress", env=env)
    measured = summary["wall_seconds"] - summary["prepare_seconds"]
    return {"name": name, "command": "run", "archs": archs, "max_depth": max(depths), "train": train, "test": test,
            "tile": tile, "pairs": summary["pairs_computed"], "predicted_s": summary["predicted_seconds"],
            "measured_s": round(measured, 2), "ratio": _ratio(summary["predicted_seconds"], measured),
            "load_before": before, "load_after": load(), "store": store}


def solve_case(name, store, options, *, work, env) -> dict:
    before = load()
    plan, _ = cntk("solve", store, "--dry-run", "--json", "--force", *options, env=env)
    solved, wall = cntk("solve", store, "--json", "--force", "--out", work / f"{name}-report", *options, env=env)
    return {"name": name, "command": "solve", "store_case": Path(store).stem, "options": options,
            "factorisations": len(plan["factorisations"]),
            "largest_n": max(f["n"] for f in plan["factorisations"]),
            "out_of_core": any(f["out_of_core"] for f in plan["factorisations"]),
            "predicted_peak_gib": round(plan["peak_bytes"] / 2**30, 3), "predicted_s": round(plan["seconds"], 2),
            "measured_s": round(wall, 2),
            "solve_seconds": round(sum(r["solve_seconds"] or 0 for r in solved["rows"]), 2),
            "ratio": _ratio(plan["seconds"], wall), "load_before": before, "load_after": load()}


def _ratio(predicted, measured):
    return None if predicted is None or measured <= 0 else round(predicted / measured, 3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar-root", default=os.environ.get("CNTK_CIFAR_ROOT"))
    parser.add_argument("--quick", action="store_true", help="Small cases of a few seconds (tests the machinery).")
    parser.add_argument("--cases", help="Comma-separated case names (default: all).")
    parser.add_argument("--work", help="Directory for stores, configs and the probe cache [default: a temp dir].")
    parser.add_argument("--json", action="store_true", help="Write benchmarks/results/OUT.json.")
    parser.add_argument("--out", default=None, help="Result name [default: predict-cpu, or predict-cpu-quick].")
    args = parser.parse_args()
    if not args.cifar_root:
        parser.error("--cifar-root (or $CNTK_CIFAR_ROOT) is required")
    runs, solves = (QUICK_RUNS, QUICK_SOLVES) if args.quick else (RUNS, SOLVES)
    chosen = set(args.cases.split(",")) if args.cases else set(runs) | set(solves)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-predict-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CNTK_CACHE_DIR": str(work / "cache")}
    started, results = time.time(), []
    stores = {}
    for name, spec in runs.items():
        if name in chosen or any(solves[s][0] == name for s in chosen if s in solves):
            case = run_case(name, spec, root=args.cifar_root, work=work, env=env)
            stores[name] = case.pop("store")
            if name in chosen:
                results.append(case)
                print(f"{name:30s} predicted {case['predicted_s']:9.1f} s  measured {case['measured_s']:9.1f} s  "
                      f"ratio {case['ratio']}  load {case['load_before']}..{case['load_after']}", file=sys.stderr)
    for name, (store_case, options) in solves.items():
        if name in chosen:
            case = solve_case(name, stores[store_case], options, work=work, env=env)
            results.append(case)
            print(f"{name:30s} predicted {case['predicted_s']:9.1f} s  measured {case['measured_s']:9.1f} s  "
                  f"ratio {case['ratio']}  load {case['load_before']}..{case['load_after']}", file=sys.stderr)
    long = [c for c in results if c["measured_s"] >= 60 and c["ratio"] is not None]
    payload = {"cpu": cpu_info(), "quick": args.quick, "total_seconds": round(time.time() - started, 1),
               "load_note": LOAD_NOTE, "max_load_per_core": max([c["load_before"] for c in results] + [c["load_after"] for c in results]),
               "cases": results,
               "summary": {"cases": len(results), "minute_or_more": len(long),
                           "within_1_5": sum(1 / 1.5 <= c["ratio"] <= 1.5 for c in long),
                           "ratio_min": min((c["ratio"] for c in long), default=None),
                           "ratio_max": max((c["ratio"] for c in long), default=None)}}
    if args.json:
        print(write_result(args.out or ("predict-cpu-quick" if args.quick else "predict-cpu"), payload))
    else:
        print(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
