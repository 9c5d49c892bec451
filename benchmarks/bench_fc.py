"""FC NTK + NNGP tile speed, side by side: ours (every depth 2..D in one pass), plain vectorised numpy float64 of the
same recursion, and neural-tangents (when it imports) for one network of depth D.

    python -m benchmarks.bench_fc [--n 1000] [--depths 3,6,11,21] [--out fc-kernel]
    python -m benchmarks.bench_fc --api [--n 1000] [--depths 3,21] [--repeats 15] [--out fc-api]

Images: the first 2n CIFAR-10 training images standardised per channel ($CNTK_CIFAR_ROOT or --cifar-root), rows the
first n, columns the next n; Gaussian noise when there is no data (or with --gaussian). Errors are max |K - K_ref| /
sqrt(K(x,x) K(y,y)) against the numpy float64 recursion, over every depth each method returns. The machine's BLAS rate
on the same product (n x 3072 times 3072 x n) gives the fraction of the time ours spends in the product.

--api: what a user of the library gets. The public `cntk_gram.kernel_block(x, y, archs=("fc",), max_depth=D)` and
neural-tangents each run in a fresh Python process of their own (`import numpy`, then the library), with no thread or
spin setting in the environment (OPENBLAS_THREAD_TIMEOUT and the like are removed). Both are started and warmed, then
timed call by call in turn, so that other load on the machine falls on both; errors at depth D.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import cpu_info, write_result

# cntk_gram is imported where used, so that an --api child of neural-tangents never loads it.

# Settings that change how long idle BLAS / OpenMP threads spin: an --api child runs without them.
SPIN_SETTINGS = ("OPENBLAS_THREAD_TIMEOUT", "GOTO_THREAD_TIMEOUT", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


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


def neural_tangents_call(kernel_fn, x, y):
    """A call of kernel_fn on the flattened images and its result as float64 {"ntk-fc", "nngp-fc"}: (1, n, m)."""
    fx, fy = x.reshape(len(x), -1), y.reshape(len(y), -1)
    call = lambda: [v.block_until_ready() for v in kernel_fn(fx, fy, get=("ntk", "nngp"))]
    ntk, nngp = (np.asarray(v, np.float64) * fx.shape[1] for v in call())   # neural-tangents divides x.y by the width
    return call, {"ntk-fc": ntk[None], "nngp-fc": nngp[None]}


def measure(depth: int, x, y, ref, repeats: int) -> dict:
    from cntk_gram.workers.fc import fc_kernels
    from cntk_gram.workers.reference import fc_closed_form, fc_scaled_error

    n, m = len(x), len(y)
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
        call, nt = neural_tangents_call(kernel_fn, x, y)
        seconds = best_seconds(call, repeats)
        row["neural_tangents"] = {"seconds": seconds, "pairs_per_second": pairs / seconds, "depths_returned": 1,
                                  "max_scaled_error": fc_scaled_error(nt, ref, [depth], x, y)}
        row["speedup_vs_neural_tangents"] = row["ours"]["pairs_per_second"] / row["neural_tangents"]["pairs_per_second"]
    row["speedup_vs_numpy_float64"] = row["ours"]["pairs_per_second"] / row["numpy_float64"]["pairs_per_second"]
    return row


def gemm_seconds(x, y, dtype, repeats: int) -> float:
    fx, fy = (np.ascontiguousarray(v.reshape(len(v), -1), dtype) for v in (x, y))
    return best_seconds(lambda: fx @ fy.T, repeats)


def prepare(method: str, x, y, depths) -> tuple[dict, dict, float | None]:
    """--api child: {depth: one call} of `method` (each run once: compiled, caches loaded), {depth: its float64
    planes {"ntk-fc", "nngp-fc"} at that depth}, and for kernel_block the seconds of import plus first call."""
    if method == "kernel_block":
        start = time.perf_counter()
        import cntk_gram

        calls = {d: (lambda d=d: cntk_gram.kernel_block(x, y, archs=("fc",), max_depth=d)) for d in depths}
        calls[depths[0]]()
        first = time.perf_counter() - start                # import, numba cache load, first block
        planes = {d: {k: v[d - 2].astype(np.float64) for k, v in calls[d]().items()} for d in depths}
        return calls, planes, first
    calls, planes = {}, {}
    for d in depths:
        kernel_fn = neural_tangents_fn(d)
        if kernel_fn is None:                              # neural-tangents does not import
            return {}, {}, None
        calls[d], out = neural_tangents_call(kernel_fn, x, y)
        planes[d] = {k: v[0] for k, v in out.items()}
    return calls, planes, None


def child(method: str, folder: Path, depths: list[int]) -> None:
    """Runs in a fresh process: prepares `method`, saves its planes, reports ready, then times one call per request
    (a depth on stdin; a line "@@ SECONDS" on stdout) until stdin closes."""
    from threadpoolctl import threadpool_info

    x, y = np.load(folder / "x.npy"), np.load(folder / "y.npy")
    calls, planes, first = prepare(method, x, y, depths)
    for d, out in planes.items():
        np.savez(folder / f"{method}-{d}.npz", **out)
    pools = [{k: info.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
             for info in threadpool_info()]
    print("@@", json.dumps({"available": bool(calls), "first_call_seconds": first, "thread_pools": pools}), flush=True)
    for line in sys.stdin:
        call = calls[int(line)]
        start = time.perf_counter()
        call()
        print("@@", time.perf_counter() - start, flush=True)


def _answer(proc) -> str:
    """The next "@@" line of a child (other output passes through)."""
    for line in proc.stdout:
        if line.startswith("@@ "):
            return line[3:]
        sys.stdout.write(line)
    raise RuntimeError(f"benchmark child exited with status {proc.wait()}")


def api(args, x, y, source: str) -> dict:
    """Each library in a fresh process of its own (child), both started and warmed first, then timed call by call in
    turn (per repeat and depth one call of each, the order alternating), so that the machine's other load falls on
    both alike. Per depth: each library's best call, and the median over repeats of the two calls' ratio; errors at
    depth D against the float64 recursion."""
    from cntk_gram.workers.reference import fc_closed_form, fc_scaled_error

    depths = [int(d) for d in args.depths.split(",")]
    env = {k: v for k, v in os.environ.items() if k not in SPIN_SETTINGS}
    ref = fc_closed_form(x, y, max_depth=max(depths))
    pairs = len(x) * len(y)
    methods = ["kernel_block", "neural_tangents"]
    seconds = {m: {d: [] for d in depths} for m in methods}
    info, procs, load = {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.save(folder / "x.npy", x)
        np.save(folder / "y.npy", y)
        try:
            for method in methods:
                procs[method] = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.bench_fc", "--child", method, "--child-dir", tmp,
                     "--depths", args.depths], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                info[method] = json.loads(_answer(procs[method]))
            methods = [m for m in methods if info[m]["available"]]
            for r in range(args.repeats):
                load.append(os.getloadavg()[0])
                for d in depths:
                    for method in methods if r % 2 == 0 else methods[::-1]:
                        procs[method].stdin.write(f"{d}\n")
                        procs[method].stdin.flush()
                        seconds[method][d].append(float(_answer(procs[method])))
        finally:
            for proc in procs.values():
                proc.stdin.close()
                proc.wait()
        errors = {}
        for method in methods:
            for d in depths:
                with np.load(folder / f"{method}-{d}.npz") as planes:
                    errors[method, d] = fc_scaled_error({k: planes[k][None] for k in ("ntk-fc", "nngp-fc")},
                                                        ref, [d], x, y)
    runs = []
    for d in depths:
        run = {"depth": d, "pairs": pairs}
        for method in methods:
            best = min(seconds[method][d])
            run[method] = {"seconds": best, "pairs_per_second": pairs / best,
                           "median_seconds": float(np.median(seconds[method][d])),
                           "max_scaled_error": errors[method, d]}
        if "neural_tangents" in run:
            run["speedup_vs_neural_tangents"] = run["neural_tangents"]["seconds"] / run["kernel_block"]["seconds"]
            run["speedup_median_of_paired_calls"] = float(np.median(
                np.array(seconds["neural_tangents"][d]) / np.array(seconds["kernel_block"][d])))
        runs.append(run)
    compared = [r["speedup_vs_neural_tangents"] for r in runs if "speedup_vs_neural_tangents" in r]
    return {"mode": "api", "images": source, "n": args.n, "repeats": args.repeats,
            "environment_removed": list(SPIN_SETTINGS), "load_average_1min_per_repeat": load,
            "processes": info, "seconds_per_call": seconds,
            "runs": runs,     # target: None when neural-tangents did not import
            "target_kernel_block_at_least_neural_tangents": min(compared) >= 1 if compared else None}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("numpy", "numba", "scipy", "threadpoolctl", "jax", "neural-tangents"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="rows = columns of the block (default 1000)")
    parser.add_argument("--depths", default=None, help="network depths D, ours returns every depth 2..D "
                                                       "(default 3,6,11,21; with --api 3,21)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cifar-root", default=os.environ.get("CNTK_CIFAR_ROOT"))
    parser.add_argument("--gaussian", action="store_true", help="Gaussian noise images even when CIFAR-10 is there")
    parser.add_argument("--api", action="store_true", help="kernel_block and neural-tangents, each in a fresh process")
    parser.add_argument("--out", default=None, help="result name under benchmarks/results/ (default fc-kernel, "
                                                    "with --api fc-api)")
    parser.add_argument("--child", choices=("kernel_block", "neural_tangents"), help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.depths = args.depths or ("3,21" if args.api or args.child else "3,6,11,21")
    if args.child:
        return child(args.child, Path(args.child_dir), [int(d) for d in args.depths.split(",")])
    load_before = os.getloadavg()
    x, y, source = images(args.n, None if args.gaussian else args.cifar_root)
    common = {"cpu": cpu_info(), "versions": versions()}
    if args.api:
        result = api(args, x, y, source)
        path = write_result(args.out or "fc-api", {**common, **result, "load_average_1min": {
            "before": load_before[0], "after": os.getloadavg()[0]}})
        print(f"load average (1 min) before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}; best of "
              f"{args.repeats} calls each, taking turns")
        print(f"{'depth':>5} {'kernel_block M/s':>16} {'NT M/s':>8} {'x NT':>6} {'x NT paired median':>18} "
              f"{'err ours':>9} {'err NT':>8}")
        for r in result["runs"]:
            nt = r.get("neural_tangents", {})
            print(f"{r['depth']:>5} {r['kernel_block']['pairs_per_second'] / 1e6:16.2f} "
                  f"{nt.get('pairs_per_second', float('nan')) / 1e6:8.2f} "
                  f"{r.get('speedup_vs_neural_tangents', float('nan')):6.2f} "
                  f"{r.get('speedup_median_of_paired_calls', float('nan')):18.2f} "
                  f"{r['kernel_block']['max_scaled_error']:9.1e} {nt.get('max_scaled_error', float('nan')):8.1e}")
        print(f"written {path}")
        return
    from cntk_gram.workers.reference import fc_closed_form

    depths = [int(d) for d in args.depths.split(",")]
    ref = fc_closed_form(x, y, max_depth=max(depths))
    flops = 2.0 * len(x) * len(y) * x[0].size
    gemm = {dt.__name__: {"seconds": gemm_seconds(x, y, dt, args.repeats)} for dt in (np.float32, np.float64)}
    for entry in gemm.values():
        entry["gflops"] = flops / entry["seconds"] / 1e9
    rows = [measure(d, x, y, ref, args.repeats) for d in depths]
    for row in rows:
        row["ours"]["gemm_share_of_time"] = gemm["float32"]["seconds"] / row["ours"]["seconds"]
    path = write_result(args.out or "fc-kernel", {
        **common, "images": source, "n": args.n, "neural_tangents": common["versions"]["neural-tangents"],
        "gemm": gemm, "runs": rows, "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
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
