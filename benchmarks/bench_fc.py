"""FC NTK + NNGP tile speed, side by side: ours (every depth 2..D in one pass), plain vectorised numpy float64 of the
same recursion, and neural-tangents (when it imports) for one network of depth D.

    python -m benchmarks.bench_fc [--n 1000] [--depths 3,6,11,21] [--out fc-kernel]

Images: the first 2n CIFAR-10 training images standardised per channel ($CNTK_CIFAR_ROOT or --cifar-root), rows the
first n, columns the next n; Gaussian noise when there is no data. Errors are max |K - K_ref| / sqrt(K(x,x) K(y,y))
against the numpy float64 recursion, over every depth each method returns. The machine's BLAS rate on the same
product (n x 3072 times 3072 x n) gives the fraction of the time ours spends in the product.
"""
import argparse
import os
import time

# As cntk's tile workers run (pipeline/cluster.py, worker_env): OpenBLAS spins only briefly after a product, so its
# threads hand the cores back to the numba pass. OpenBLAS reads this when numpy loads it, hence before the import.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

import numpy as np  # noqa: E402

from benchmarks.common import cpu_info, write_result  # noqa: E402
from cntk_gram.pipeline.cluster import BLAS_SPIN  # noqa: E402
from cntk_gram.workers.fc import fc_kernels  # noqa: E402
from cntk_gram.workers.reference import fc_closed_form, fc_scaled_error  # noqa: E402


def images(n: int, root: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Rows and columns, (n, 32, 32, 3) float32 each, and where they came from."""
    if root:
        from cntk_gram.pipeline.data import load_cifar10
        from cntk_gram.workers.preprocess import channel_stats, preprocess

        raw = load_cifar10(root=root, download=False)["train_images"][:2 * n]
        x = preprocess(raw, *channel_stats(raw))
        return x[:n], x[n:], "cifar10-train"
    x = np.random.default_rng(0).standard_normal((2 * n, 32, 32, 3)).astype(np.float32)
    return x[:n], x[n:], "gaussian"


def best_seconds(fn, repeats: int) -> float:
    fn()                                     # compile, load caches, warm the allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def neural_tangents_fn(depth: int):
    """neural-tangents' closed form for the same net (depth-1 ReLU hidden layers, c_sigma = 2), or None."""
    try:
        from jax import jit
        from neural_tangents import stax
    except ImportError:
        return None
    layers = [stax.Dense(1, W_std=1.0, b_std=0.0)]
    for _ in range(depth - 1):
        layers += [stax.Relu(), stax.Dense(1, W_std=2.0 ** 0.5, b_std=0.0)]
    return jit(stax.serial(*layers)[2], static_argnames="get")


def measure(depth: int, x, y, ref, repeats: int) -> dict:
    n, m, features = len(x), len(y), x[0].size
    pairs = n * m
    row = {"depth": depth, "pairs": pairs}
    seconds = best_seconds(lambda: fc_kernels(x, y, max_depth=depth), repeats)
    ours = fc_kernels(x, y, max_depth=depth)
    row["ours"] = {"seconds": seconds, "pairs_per_second": pairs / seconds, "depths_returned": depth - 1,
                   "max_scaled_error": fc_scaled_error(ours, ref, range(2, depth + 1), x, y)}
    start = time.perf_counter()
    fc_closed_form(x, y, max_depth=depth)
    seconds = time.perf_counter() - start
    row["numpy_float64"] = {"seconds": seconds, "pairs_per_second": pairs / seconds, "depths_returned": depth - 1}
    kernel_fn = neural_tangents_fn(depth)
    if kernel_fn is not None:
        fx, fy = x.reshape(n, -1), y.reshape(m, -1)
        call = lambda: [v.block_until_ready() for v in kernel_fn(fx, fy, get=("ntk", "nngp"))]
        seconds = best_seconds(call, repeats)
        ntk, nngp = (np.asarray(v, np.float64) * features for v in kernel_fn(fx, fy, get=("ntk", "nngp")))
        nt = {"ntk-fc": ntk[None], "nngp-fc": nngp[None]}     # neural-tangents divides x.y by the input width
        row["neural_tangents"] = {"seconds": seconds, "pairs_per_second": pairs / seconds, "depths_returned": 1,
                                  "max_scaled_error": fc_scaled_error(nt, ref, [depth], x, y)}
        row["speedup_vs_neural_tangents"] = row["ours"]["pairs_per_second"] / row["neural_tangents"]["pairs_per_second"]
    row["speedup_vs_numpy_float64"] = row["ours"]["pairs_per_second"] / row["numpy_float64"]["pairs_per_second"]
    return row


def gemm_seconds(x, y, dtype, repeats: int) -> float:
    fx, fy = (np.ascontiguousarray(v.reshape(len(v), -1), dtype) for v in (x, y))
    return best_seconds(lambda: fx @ fy.T, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="rows = columns of the block (default 1000)")
    parser.add_argument("--depths", default="3,6,11,21", help="network depths D (ours returns every depth 2..D)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cifar-root", default=os.environ.get("CNTK_CIFAR_ROOT"))
    parser.add_argument("--out", default="fc-kernel", help="result name under benchmarks/results/")
    args = parser.parse_args()
    if os.environ["OPENBLAS_THREAD_TIMEOUT"] != BLAS_SPIN:
        print(f"note: OPENBLAS_THREAD_TIMEOUT={os.environ['OPENBLAS_THREAD_TIMEOUT']}, cntk's workers use {BLAS_SPIN}")
    load_before = os.getloadavg()
    x, y, source = images(args.n, args.cifar_root)
    depths = [int(d) for d in args.depths.split(",")]
    ref = fc_closed_form(x, y, max_depth=max(depths))
    flops = 2.0 * len(x) * len(y) * x[0].size
    gemm = {dt.__name__: {"seconds": gemm_seconds(x, y, dt, args.repeats)} for dt in (np.float32, np.float64)}
    for entry in gemm.values():
        entry["gflops"] = flops / entry["seconds"] / 1e9
    rows = [measure(d, x, y, ref, args.repeats) for d in depths]
    for row in rows:
        row["ours"]["gemm_share_of_time"] = gemm["float32"]["seconds"] / row["ours"]["seconds"]
    try:
        import neural_tangents
        nt_version = neural_tangents.__version__
    except ImportError:
        nt_version = None
    path = write_result(args.out, {"cpu": cpu_info(), "images": source, "n": args.n, "neural_tangents": nt_version,
                                   "gemm": gemm, "runs": rows,
                                   "openblas_thread_timeout": os.environ["OPENBLAS_THREAD_TIMEOUT"],
                                   "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]}})
    print(f"{'depth':>5} {'ours M/s':>9} {'numpy M/s':>9} {'NT M/s':>8} {'x numpy':>8} {'x NT':>6} {'err ours':>9} "
          f"{'err NT':>8} {'gemm %':>6}")
    for r in rows:
        nt = r.get("neural_tangents", {})
        print(f"{r['depth']:>5} {r['ours']['pairs_per_second'] / 1e6:9.2f} "
              f"{r['numpy_float64']['pairs_per_second'] / 1e6:9.2f} "
              f"{nt.get('pairs_per_second', float('nan')) / 1e6:8.2f} {r['speedup_vs_numpy_float64']:8.1f} "
              f"{r.get('speedup_vs_neural_tangents', float('nan')):6.1f} {r['ours']['max_scaled_error']:9.1e} "
              f"{nt.get('max_scaled_error', float('nan')):8.1e} {100 * r['ours']['gemm_share_of_time']:6.0f}")
    print(f"written {path}")


if __name__ == "__main__":
    main()
