"""CPU cost of the enhanced readouts (docs/enhanced.md): pairs/s of CNTK-GAP vs GAP + LAP(c) vs GAP + flip, 32x32.

    python -m benchmarks.bench_enhanced [--out NAME] [--depths 3 6] [--rows 2] [--cols 32] [--reps 3]

Every configuration is timed `reps` times, interleaved (GAP, LAP..., flip, GAP, ...) so that load from other processes
on a shared machine hits all of them alike; the JSON keeps every time, the median and the load average before and
after. It also records the GPU cost predicted for each readout relative to GAP (see `gpu_prediction`).
"""
import argparse
import os
import time

import numpy as np

from benchmarks.common import cpu_info, write_result
from cntk_gram.workers.cpu import tile_kernels

LAP_SIZES = (2, 4, 8)
# name -> tile_kernels keyword arguments (all with archs=("gap",)); "diag" runs the Gram of the first 16 columns with
# themselves (a diagonal tile: pairs a <= b only, for the plain and the flip part alike)
CONFIGS = {"gap": {}, **{f"lap{c}": {"lap": (c,)} for c in LAP_SIZES},
           "lap" + "+".join(map(str, LAP_SIZES)): {"lap": LAP_SIZES}, "gap-flip": {"flip": True},
           "diag-gap": {"diag": True}, "diag-gap-flip": {"diag": True, "flip": True}}


DIAG = 16


def run(x, y, depth, diag=False, **kw):
    return tile_kernels(y[:DIAG], archs=("gap",), max_depth=depth, **kw) if diag else \
        tile_kernels(x, y, archs=("gap",), max_depth=depth, **kw)

# GPU model (workers/cntk_tile.cu; docs/cntk-math.md: 35-45 instructions per entry and layer, 45 taken here). LAP adds,
# per thread and layer, one select per entry (its running sum splits at the row cut line: 1 per entry-layer), six
# more warp reductions (4 quadrant sums per kind instead of 1; 10 instructions each over the thread's 32 entries:
# 60 / 32 per entry-layer) and, per c, ~8 float64 multiply-adds on lane 0 while the warp waits (8 / 32 per
# entry-layer) plus one more block reduction and atomicAdd per kind (negligible). Flip runs the tile twice.
GPU_OPS_GAP = 45.0
GPU_LAP_FIXED = 1.0 + 60.0 / 32
GPU_LAP_PER_C = 8.0 / 32


def gpu_prediction() -> dict:
    """Predicted GPU time per pair relative to CNTK-GAP, by instruction count (not measured)."""
    lap = {f"lap x{n}": (GPU_OPS_GAP + GPU_LAP_FIXED + n * GPU_LAP_PER_C) / GPU_OPS_GAP for n in (1, 3)}
    return {"model": "instructions per entry-layer; GAP = 45", "gap": 1.0, **lap, "gap-flip": 2.0,
            "lap x3 + flip": 2 * lap["lap x3"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="enhanced-cpu", help="result name under benchmarks/results/")
    parser.add_argument("--depths", type=int, nargs="+", default=[3, 6])
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--cols", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.rows, 32, 32, 3)).astype(np.float32)
    y = rng.normal(size=(args.cols, 32, 32, 3)).astype(np.float32)
    for kw in CONFIGS.values():  # compile / load the numba cache
        run(x[:1], y[:1], 2, **kw)
    load_before = os.getloadavg()
    runs = []
    for depth in args.depths:
        times = {name: [] for name in CONFIGS}
        for _ in range(args.reps):
            for name, kw in CONFIGS.items():
                start = time.perf_counter()
                run(x, y, depth, **kw)
                times[name].append(time.perf_counter() - start)
        for name, secs in times.items():
            diag = name.startswith("diag")
            med, base = float(np.median(secs)), float(np.median(times["diag-gap" if diag else "gap"]))
            n_diag = min(DIAG, args.cols)
            pairs = n_diag * (n_diag + 1) // 2 if diag else args.rows * args.cols  # distinct pairs computed
            runs.append({"config": name, "depth": depth, "pairs": pairs, "seconds": [round(s, 3) for s in secs],
                         "median_seconds": round(med, 3), "pairs_per_second": pairs / med, "relative_to_gap": med / base})
            print(f"depth {depth}  {name:14s} {pairs / med:8.1f} pairs/s  x{med / base:.3f} GAP", flush=True)
    path = write_result(args.out, {"cpu": cpu_info(), "precision": "float32", "image": [32, 32, 3],
                                   "load_average_before": load_before, "load_average_after": os.getloadavg(),
                                   "runs": runs, "gpu_predicted_relative_cost": gpu_prediction()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
