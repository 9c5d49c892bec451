"""CPU tile-kernel throughput: pairs per second for CNTK-V and CNTK-GAP at depths 3, 6, 11, 21.

    python -m benchmarks.bench_cpu_kernel [--out NAME]

Achieved fraction of the SIMD limit, by our own count of float operations per entry and layer (see OPS_PER_ENTRY_LAYER):
limit = cores x clock x fp32 lanes x 2 vector float instructions per cycle (two FP pipes; an FMA counts once).
"""
import argparse
import time

import numpy as np

from benchmarks.common import cpu_info, write_result
from cntk_gram.workers.cpu import tile_kernels

# Float operations per entry and layer in workers/_cpu_kernels.py, counted from the source:
# rho 2 mul + clamp 2 + abs 1; arccos polynomial 7 mul + 7 add, 1 - a, sqrt, mul; pi - t select 3;
# K: 1+1+1+1+1+sqrt+1+1+1 = 9; U: 3; two 3x3 box sums (2+2 adds each, x34/32 rows) ~8.3; row sums 2.  Total 47.
OPS_PER_ENTRY_LAYER = 47


def measure(arch: str, depth: int, n: int, m: int, rng) -> dict:
    x = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
    y = rng.normal(size=(m, 32, 32, 3)).astype(np.float32)
    tile_kernels(x[:1], y[:16], archs=(arch,), max_depth=depth)  # compile / load the cache
    start = time.perf_counter()
    tile_kernels(x, y, archs=(arch,), max_depth=depth)
    seconds = time.perf_counter() - start
    pairs = n * m
    entries = 1024 * (1024 if arch == "gap" else 1) * (depth - 1)
    return {"arch": arch, "depth": depth, "pairs": pairs, "seconds": round(seconds, 3),
            "pairs_per_second": pairs / seconds, "entry_layers_per_second": pairs * entries / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="cpu-kernel", help="result name under benchmarks/results/")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cpu = cpu_info()
    limit = cpu["logical_cores"] * cpu["mhz"] * 1e6 * cpu["fp32_lanes"] * 2
    runs = []
    for arch, sizes in (("vanilla", (256, 256)), ("gap", (2, 16))):
        for depth in (3, 6, 11, 21):
            r = measure(arch, depth, *sizes, rng)
            r["fraction_of_simd_limit"] = r["entry_layers_per_second"] * OPS_PER_ENTRY_LAYER / limit
            runs.append(r)
            print(f"{arch:8s} depth {depth:2d}: {r['pairs_per_second']:12.1f} pairs/s  "
                  f"({100 * r['fraction_of_simd_limit']:.1f}% of SIMD limit)", flush=True)
    path = write_result(args.out, {"cpu": cpu, "precision": "float32", "ops_per_entry_layer": OPS_PER_ENTRY_LAYER,
                                   "simd_limit_flops": limit, "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
