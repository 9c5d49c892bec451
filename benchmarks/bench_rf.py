"""Random-features throughput on CPU (width 128, 32x32x3 images) and a predicted GPU time for CIFAR-2.

    python -m benchmarks.bench_rf [--images 8] [--out rf-cpu]

Measured: one diagonal tile of `--images` images per (arch, depth), depths 3, 6, 11, 21, vanilla and GAP nets: seconds,
pairs/s, image gradients/s and achieved GFLOP/s by our float-operation count (`rf_net.flop_counts`); and the float32
matmul rate that prices the pair inner products. Small tiles are dominated by the gradients; the JSON also gives the
model's pairs/s for larger tiles. PREDICTED (not measured): the GPU time of the paper's Table 2 protocol on CIFAR-2
(10,000 train + 2,000 test, 10 draws, depths 3, 4, 6, 11, 21, both architectures) from the same float-operation
count at an assumed sustained float32 rate.
"""
import argparse
import os
import time

import numpy as np

from benchmarks.common import cpu_info, write_result
from cntk_gram.workers import rf, rf_net

WIDTH, SHAPE, CHANNELS = 128, (32, 32), 3
# Assumed sustained float32 rate of one H200 on these convs and matmuls (no TF32): about half of its ~67 TFLOP/s
# non-tensor-core float32 peak. An assumption, to be replaced by a measurement on the GPU.
GPU_ASSUMED_FLOPS = 33e12
GPU_BUDGET_BYTES = 64 * 2 ** 30  # max_bytes a GPU worker would get (of ~140 GiB)


def sgemm_rate(torch) -> float:
    """Measured float32 matmul FLOP/s on a (64, k) x (k, 64) product like the pair inner products."""
    a = torch.randn(64, 2 ** 20)
    a @ a.T
    start = time.perf_counter()
    for _ in range(3):
        a @ a.T
    return 3 * 2 * 64 * 64 * 2 ** 20 / (time.perf_counter() - start)


def measure(arch, depth, x) -> dict:
    rf.rf_tile_kernels(x[:1], archs=(arch,), depths=(depth,), width=WIDTH, device="cpu")  # warm-up
    start = time.perf_counter()
    rf.rf_tile_kernels(x, archs=(arch,), depths=(depth,), kinds=("ntk",), width=WIDTH, device="cpu")
    seconds = time.perf_counter() - start
    n = len(x)
    flops = rf_net.flop_counts(arch=arch, depth=depth, width=WIDTH, channels=CHANNELS, image_shape=SHAPE)
    pairs = n * (n + 1) // 2
    return {"arch": arch, "depth": depth, "tile": f"diagonal {n}x{n}", "pairs": pairs, "seconds": round(seconds, 3),
            "pairs_per_second": pairs / seconds, "image_gradients_per_second": n / seconds,
            "flops_per_image": flops["per_image"], "flops_per_pair": flops["per_pair"],
            "achieved_gflops": (n * flops["per_image"] + n * n * flops["per_pair"]) / seconds / 1e9}


def tile_seconds(arch, depth, n, m, diagonal, max_bytes, grad_flops_rate, pair_flops_rate) -> float:
    """Model: seconds of one tile = image gradients (recomputation included) + pair inner products."""
    shape = dict(arch=arch, depth=depth, width=WIDTH, channels=CHANNELS, image_shape=SHAPE)
    flops = rf_net.flop_counts(**shape)
    plan = rf.plan_memory(*rf.image_bytes(**shape), max_bytes, m)
    pairs = n * (n + 1) // 2 if diagonal else n * m
    return (rf.gradient_passes(n, m, plan, diagonal) * flops["per_image"] / grad_flops_rate
            + pairs * flops["per_pair"] / pair_flops_rate)


def cifar2_prediction(tile_size: int) -> dict:
    """PREDICTED GPU seconds for CIFAR-2 (10,000 train, 2,000 test), tiles as the pipeline plans them (train x train
    upper triangle + test x train), 10 draws, depths 3, 4, 6, 11, 21, both architectures, one net per tile task."""
    n_train, n_test, draws, depths = 10_000, 2_000, 10, (3, 4, 6, 11, 21)
    blocks = n_train // tile_size
    test_rows = [min(tile_size, n_test - r) for r in range(0, n_test, tile_size)]
    tiles = ([(True, tile_size, tile_size)] * blocks + [(False, tile_size, tile_size)] * (blocks * (blocks - 1) // 2)
             + [(False, rows, tile_size) for rows in test_rows for _ in range(blocks)])
    per_arch = {}
    for arch in ("vanilla", "gap"):
        per_arch[arch] = draws * sum(
            tile_seconds(arch, depth, n, m, diag, GPU_BUDGET_BYTES, GPU_ASSUMED_FLOPS, GPU_ASSUMED_FLOPS)
            for depth in depths for diag, n, m in tiles)
    return {"tile_size": tile_size, "predicted_seconds": {a: round(s) for a, s in per_arch.items()},
            "predicted_hours_total": round(sum(per_arch.values()) / 3600, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per diagonal tile (default 8)")
    parser.add_argument("--out", default="rf-cpu", help="result name under benchmarks/results/")
    args = parser.parse_args()
    torch = rf_net.import_torch()
    x = np.random.default_rng(0).normal(size=(args.images, *SHAPE, CHANNELS)).astype(np.float32)
    matmul = sgemm_rate(torch)
    print(f"float32 matmul: {matmul / 1e9:.1f} GFLOP/s", flush=True)
    runs = []
    for arch in ("vanilla", "gap"):
        for depth in (3, 6, 11, 21):
            r = measure(arch, depth, x)
            grad_rate = r["flops_per_image"] * r["image_gradients_per_second"]
            r["model_pairs_per_second"] = {
                str(t): round(t * (t + 1) / 2 / tile_seconds(arch, depth, t, t, True, rf.DEFAULT_MAX_BYTES,
                                                             grad_rate, matmul), 1) for t in (64, 1000)}
            runs.append(r)
            print(f"{arch:8s} depth {depth:2d}: {r['pairs_per_second']:8.1f} pairs/s on a {r['tile']} tile, "
                  f"{r['image_gradients_per_second']:6.2f} image gradients/s, {r['achieved_gflops']:.1f} GFLOP/s",
                  flush=True)
    prediction = {"label": "PREDICTION from the float-operation count, not a measurement",
                  "assumed_gpu_float32_flops": GPU_ASSUMED_FLOPS, "gpu_max_bytes": GPU_BUDGET_BYTES,
                  "by_tile_size": [cifar2_prediction(t) for t in (1000, 2000, 5000)]}
    for p in prediction["by_tile_size"]:
        print(f"PREDICTED CIFAR-2 Table 2 on one GPU, tiles of {p['tile_size']}: {p['predicted_hours_total']} h",
              flush=True)
    path = write_result(args.out, {
        "cpu": cpu_info(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0], "width": WIDTH, "image_shape": [*SHAPE, CHANNELS],
        "precision": "float32 gradients, float64 sums of per-tensor float32 Gram blocks",
        "float32_matmul_gflops": matmul / 1e9, "runs": runs, "cifar2_gpu_prediction": prediction})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
