"""GPU throughput: fused tile kernels (workers/cntk_tile.cu) vs the Appendix-I baseline (workers/baseline.cu).

    python benchmarks/bench_gpu.py [--depths 3,6,11,21] [--archs gap,vanilla] [--min-seconds 0.5] [--out FILE]

Measures kernel time with CUDA events on the current device (images, diagonal maps and pair lists are prepared
beforehand for both, as in the paper's code), pairs per second for CNTK-GAP and CNTK-V at each depth, the ratio
to the baseline on the same GPU, the achieved fraction of the FP32 instruction limit by the instruction count of
docs/gpu.md, and the kernel-time projection of CNTK-V (all depths to 21 in one pass) over 1.75e9 pairs. Writes JSON
to benchmarks/results/. Fails with a clear message when CuPy or a GPU is missing.
"""
import argparse
import collections
import datetime
import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cntk_gram.workers import gpu

REPO = Path(__file__).resolve().parents[1]

FULL_CIFAR_PAIRS = 50000 * 50001 // 2 + 50000 * 10000     # train upper triangle + train x test ~= 1.75e9
ENTRIES = 32 ** 4
MAX_IMAGES = 2048                                          # fused launches: at most 2048^2 pairs
BASELINE_IMAGES = 4


def require_gpu():
    try:
        import cupy
    except ImportError as exc:
        sys.exit(f"bench_gpu: CuPy is not importable ({exc}); on a machine with a CUDA GPU install the extra of its "
                 f"CUDA major version, 'gpu-cuda13' or 'gpu-cuda12'")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("zero devices")
    except Exception as exc:
        sys.exit(f"bench_gpu: no CUDA GPU usable ({exc}); this benchmark needs one")
    return cupy


def device_info(cupy) -> dict:
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    clock_khz = props.get("clockRate") or cupy.cuda.runtime.deviceGetAttribute(13, dev.id)  # cudaDevAttrClockRate
    major, minor = props["major"], props["minor"]
    return {"name": name, "compute_capability": f"{major}.{minor}", "sm_count": props["multiProcessorCount"],
            "fp32_lanes_per_sm": 64 if (major, minor) == (8, 0) else 128, "clock_mhz": clock_khz / 1000,
            "driver_version": cupy.cuda.runtime.driverGetVersion(),
            "cuda_runtime_version": cupy.cuda.runtime.runtimeGetVersion(), "cupy_version": cupy.__version__}


def timed(cupy, launch) -> float:
    """Seconds of GPU time of launch() between two events (after one untimed warm-up call)."""
    launch()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    launch()
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) / 1000.0


def prepare(cupy, module, n_images: int, layers: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = cupy.asarray(rng.standard_normal((n_images, 32, 32, 3)).astype(np.float32))
    maps = cupy.empty((n_images, layers, 64, 32, 2), cupy.float32)
    module.get_function("diag_maps")((n_images,), (1024,), (images, np.int32(n_images), np.int32(layers), maps))
    return images, maps


def fused_pairs_per_s(cupy, module, *, arch: str, layers: int, min_seconds: float, n_start: int = 8) -> dict:
    """Pairs/s of one launch over all n^2 pairs of n random images; n doubles until a launch lasts min_seconds.
    Also returns the device output (n^2, layers, 2) float64 sums and n."""
    warps = dict(gpu.DEFAULT_OPTIONS)["WARPS_PER_BLOCK"]
    chunks = 1024 // (warps * dict(gpu.DEFAULT_OPTIONS)["BLOCKS_PER_WARP"])
    kernel = module.get_function(gpu.KERNEL_NAMES[arch])
    n = n_start
    while True:
        images, maps = prepare(cupy, module, n, layers)
        pa, pb = (cupy.asarray(v) for v in gpu.pair_lists(n, n, diagonal=False))
        same = (pa == pb).astype(cupy.uint8)
        out = cupy.zeros((len(pa), layers, 2), cupy.float64)
        grid = len(pa) * chunks if arch == "gap" else -(-len(pa) // warps)

        def launch():
            out.fill(0)
            kernel((grid,), (32 * warps,), (images, images, maps, maps, pa, pb, same, np.int32(len(pa)),
                                            np.int32(layers), out))
        seconds = timed(cupy, launch)
        if seconds >= min_seconds or n >= MAX_IMAGES:
            return {"n": n, "pairs": int(len(pa)), "kernel_seconds": seconds, "pairs_per_s": len(pa) / seconds,
                    "out": out}
        del out
        n *= 2


@functools.lru_cache(maxsize=None)
def baseline_launch_shapes(side: int = 32) -> dict:
    """(grid, block) of each workers/baseline.cu kernel for side x side images. At side 32 these are the authors'
    launch shapes (ruosongwang/CNTK, CNTK.py: conv3 on (63, 63) x (32, 32), trans on (32, 32, 16) x (8, 8))."""
    tiles = side // 8
    return {"base_box": ((2 * side - 1, 2 * side - 1), (side, side)),
            "base_relu_theta": ((side, side, tiles * tiles), (8, 8))}


def baseline_kernels(cupy) -> dict:
    """The workers/baseline.cu kernels by name, compiled by NVRTC with default options, as the authors' RawKernels."""
    module = cupy.RawModule(code=(REPO / "workers" / "baseline.cu").read_text(), options=("-std=c++17",))
    return {name: module.get_function(name) for name in baseline_launch_shapes()}


def baseline_images(images: np.ndarray) -> np.ndarray:
    """(n, side, side, 3) images -> (n, 3, side * side) float32 channel rows, the authors' layout for one GEMM."""
    n, side = images.shape[0], images.shape[1]
    return np.ascontiguousarray(np.asarray(images, np.float32).transpose(0, 3, 1, 2).reshape(n, 3, side * side))


def baseline_normalisers(xp, kernels, image, layers: int) -> tuple[list, list]:
    """Per-layer sqrt(d) and 1/sqrt(d) (0 where d = 0) of one image, d = diag Sigma(x, x), by the pair scheme on
    (x, x), as the authors do once per image before any pair. image: (3, side * side) float32 on xp.
    Returns two lists of `layers` (side, side) float32 arrays; entry h serves layer h + 1."""
    side = int(round(image.shape[1] ** 0.5))
    shapes = baseline_launch_shapes(side)
    sigma = xp.matmul(image.T, image).reshape((side,) * 4)
    kernels["base_box"](*shapes["base_box"], (sigma,))
    scratch = xp.zeros_like(sigma)
    roots, inverses = [], []
    for h in range(layers):
        root = xp.sqrt(xp.diagonal(sigma.reshape(side * side, side * side))).reshape(side, side).astype(xp.float32)
        inverse = xp.where(root > 0, 1 / xp.where(root > 0, root, 1), 0).astype(xp.float32)
        root, inverse = xp.ascontiguousarray(root), xp.ascontiguousarray(inverse)
        roots.append(root)
        inverses.append(inverse)
        kernels["base_relu_theta"](*shapes["base_relu_theta"], (sigma, scratch, root, root, inverse, inverse,
                                                                 np.int32(1)))
        if h + 1 < layers:
            kernels["base_box"](*shapes["base_box"], (sigma,))
    return roots, inverses


def baseline_pair(xp, kernels, x, z, norms_x, norms_z, *, layers: int, arch: str, same: bool):
    """One kernel value of the pair (x, z) at depth layers + 1, the authors' per-pair scheme (CNTK.py, xz()):
    Sigma = tr_D(x^T z) (one GEMM, one base_box), Theta = 0 (GAP: first and last layer fixed) or Sigma (vanilla),
    then per layer base_relu_theta and, between layers, base_box on Sigma and on Theta; GAP subtracts the last K
    (Theta = Kdot Theta) and returns the mean over all side^4 entries, vanilla the trace over i = i', j = j'.
    x, z: (3, side * side) float32 on xp; norms_*: baseline_normalisers of each image. Returns a 0-d xp array
    (left on the device: no host round trip per pair)."""
    side = int(round(x.shape[1] ** 0.5))
    shapes = baseline_launch_shapes(side)
    box, relu_theta = kernels["base_box"], kernels["base_relu_theta"]
    sigma = xp.matmul(x.T, z).reshape((side,) * 4)
    box(*shapes["base_box"], (sigma,))
    theta = xp.zeros((side,) * 4, xp.float32)
    if arch == "vanilla":
        theta += sigma
    for h in range(layers):
        relu_theta(*shapes["base_relu_theta"], (sigma, theta, norms_x[0][h], norms_z[0][h], norms_x[1][h],
                                                norms_z[1][h], np.int32(same)))
        if h + 1 < layers:
            box(*shapes["base_box"], (sigma,))
            box(*shapes["base_box"], (theta,))
    if arch == "gap":
        theta -= sigma
        return xp.mean(theta)
    return xp.trace(theta.reshape(side * side, side * side))


def baseline_pairs_per_s(cupy, kernels, *, arch: str, layers: int, min_seconds: float, side: int = 32) -> dict:
    """Pairs/s of the authors' scheme (baseline_pair) over the n^2 pairs of n = BASELINE_IMAGES random images
    (the images of prepare(), seed 0), repeated until the timed loop lasts min_seconds (at most 4096 pairs).
    side: image side, 32 except in host tests (kernels compiled with a smaller BASE_SIDE).
    The per-image normalisers are computed before timing, as in the authors' code. Also returns the n^2 values
    (GAP: mean, vanilla: trace) in row-major pair order."""
    n = BASELINE_IMAGES
    rng = np.random.default_rng(0)
    images = cupy.asarray(baseline_images(rng.standard_normal((n, side, side, 3)).astype(np.float32)))
    norms = [baseline_normalisers(cupy, kernels, images[a], layers) for a in range(n)]
    pairs = [(a, b) for a in range(n) for b in range(n)]
    values = []

    def launch():
        values.clear()
        for a, b in pairs:
            values.append(baseline_pair(cupy, kernels, images[a], images[b], norms[a], norms[b], layers=layers,
                                        arch=arch, same=a == b))
    start = time.perf_counter()
    while True:
        seconds = timed(cupy, launch)
        if seconds >= min_seconds or len(pairs) >= 4096:
            break
        pairs = pairs * 2
    final = np.array([float(cupy.asnumpy(v)) for v in values[:n * n]])
    return {"pairs": len(pairs), "kernel_seconds": seconds, "pairs_per_s": len(pairs) / seconds,
            "final_depth_values": final, "wall_seconds": time.perf_counter() - start}


def find_tool(name: str) -> str | None:
    """A CUDA tool on PATH, else from NVIDIA's pip wheels (nvidia-cuda-cuobjdump puts nvidia/cu13/bin/cuobjdump)."""
    found = shutil.which(name)
    if found:
        return found
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec else None) or ():
        for candidate in sorted(Path(root).glob(f"*/bin/{name}")):
            return str(candidate)
    return None


def count_sass(*, sm: str = "sm_90", lap_count: int = 0) -> dict | None:
    """Instructions per entry-layer counted from the SASS of each tile kernel's layer loop (the backward branch whose
    body holds the most MUFU), divided by its 32 unrolled rows. lap_count > 0: the LAP build (-DLAP_COUNT), its GAP
    kernel only, under the key "gap". None when nvcc or cuobjdump is missing."""
    cuobjdump = find_tool("cuobjdump")
    if not (shutil.which("nvcc") and cuobjdump):
        return None
    fp32_ops = ("FFMA", "FMUL", "FADD", "FMNMX", "FSETP", "FSEL")
    counts = {}
    # cuobjdump runs nvdisasm for -sass: the one beside it (pip wheels) when none is on PATH
    env = {**os.environ, "PATH": f"{Path(cuobjdump).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "tile.cubin"
        subprocess.run(["nvcc", *gpu.compile_options(gpu.module_options(lap_count)), f"-arch={sm}", "--cubin",
                        "-o", str(cubin), str(gpu.KERNEL_SOURCE)], check=True)
        names = gpu.KERNEL_NAMES if lap_count == 0 else {"gap": gpu.KERNEL_NAMES["gap"]}
        for arch, name in names.items():
            sass = subprocess.run([cuobjdump, "-sass", "-fun", name, str(cubin)], check=True, text=True,
                                  capture_output=True, env=env).stdout
            rows = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)[^;]*;(.*)", sass)
            addrs = [int(r[0], 16) for r in rows]
            ops = [r[2] for r in rows]
            best = []
            for k, line in enumerate(re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", sass)):
                target = re.search(r"BRA (0x[0-9a-f]+)", line)
                if target and int(target.group(1), 16) in addrs and int(target.group(1), 16) < addrs[k]:
                    body = ops[addrs.index(int(target.group(1), 16)):k + 1]
                    best = body if body.count("MUFU") > best.count("MUFU") else best
            c = collections.Counter(best)
            counts[arch] = {"sm": sm, "per_entry_layer": len(best) / 32,
                            "fp32_pipe_per_entry_layer": sum(c[o] for o in fp32_ops) / 32,
                            "by_opcode_per_entry_layer": {o: n / 32 for o, n in c.most_common()}}
    return counts


def sass_summary(*, sm: str = "sm_90") -> dict | None:
    """count_sass rounded as the launcher rounds it, beside INSTR_PER_ENTRY_LAYER; `agrees` is False when the SASS
    and the launcher's numbers differ by more than half an instruction. None when nvcc or cuobjdump is missing."""
    counts = count_sass(sm=sm)
    if counts is None:
        return None
    out = {}
    for arch, c in counts.items():
        out[arch] = {"sass_per_entry_layer": round(c["per_entry_layer"], 2),
                     "launcher_per_entry_layer": gpu.INSTR_PER_ENTRY_LAYER[arch],
                     "sass_fp32_pipe": round(c["fp32_pipe_per_entry_layer"], 2),
                     "launcher_fp32_pipe": gpu.FP32_INSTR_PER_ENTRY_LAYER[arch],
                     "agrees": abs(c["per_entry_layer"] - gpu.INSTR_PER_ENTRY_LAYER[arch]) <= 0.5
                     and abs(c["fp32_pipe_per_entry_layer"] - gpu.FP32_INSTR_PER_ENTRY_LAYER[arch]) <= 0.5}
    return out


def lap_sass_summary(*, sm: str = "sm_90") -> dict | None:
    """SASS count of the LAP builds' GAP kernel for each LAP_COUNT in gpu.LAP_INSTR_PER_ENTRY_LAYER, beside the
    recorded numbers (docs/gpu.md, "LAP and flip"); `agrees` as in sass_summary. None when tools are missing."""
    out = {}
    for count, recorded in gpu.LAP_INSTR_PER_ENTRY_LAYER.items():
        counted = count_sass(sm=sm, lap_count=count)
        if counted is None:
            return None
        c = counted["gap"]["per_entry_layer"]
        out[count] = {"sass_per_entry_layer": round(c, 2), "recorded_per_entry_layer": recorded,
                      "ratio_to_gap": round(c / gpu.INSTR_PER_ENTRY_LAYER["gap"], 3),
                      "agrees": abs(c - recorded) <= 0.5}
    return out


def check_sass() -> int:
    """Print the SASS count beside the launcher's numbers; 0 when they agree, 1 when not, 3 when tools are missing."""
    summary = sass_summary()
    if summary is None:
        print("check-sass: nvcc or cuobjdump (with nvdisasm) not found; pip install nvidia-cuda-cuobjdump "
              "nvidia-cuda-nvdisasm")
        return 3
    for arch, s in summary.items():
        print(f"check-sass: {'ok  ' if s['agrees'] else 'FAIL'} {arch}: SASS {s['sass_per_entry_layer']} "
              f"instructions per entry-layer ({s['sass_fp32_pipe']} FP32 pipe), launcher uses "
              f"{s['launcher_per_entry_layer']} ({s['launcher_fp32_pipe']})")
    lap = lap_sass_summary() or {}
    for count, s in lap.items():
        print(f"check-sass: {'ok  ' if s['agrees'] else 'FAIL'} gap LAP_COUNT={count}: SASS "
              f"{s['sass_per_entry_layer']} instructions per entry-layer, recorded {s['recorded_per_entry_layer']}")
    return 0 if all(s["agrees"] for s in (*summary.values(), *lap.values())) else 1


def accuracy(*, max_depth: int = 21, seed: int = 1, backend: str = "gpu") -> dict:
    """Max relative error of a backend's tile_kernels (default the GPU's) vs the float64 reference
    (cntk_gram.workers.reference) on a 2 x 2 tile (one pair an image with itself) and a 2-image diagonal tile,
    every depth 2..max_depth, both archs and kinds."""
    from cntk_gram.workers.backends import get_backend
    from cntk_gram.workers.reference import cntk_reference
    tile_kernels = get_backend(backend).tile_kernels
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    y = np.stack([x[0], rng.standard_normal((32, 32, 3)).astype(np.float32)])
    errors = {}
    for name, yy in (("off_diagonal_2x2", y), ("diagonal_2", None)):
        got = tile_kernels(x, yy, archs=("vanilla", "gap"), max_depth=max_depth)
        want = cntk_reference(x, yy, max_depth=max_depth, archs=("vanilla", "gap"))
        for key in want:
            err = np.abs(got[key] - want[key])   # relative, absolute where the exact value is 0 (GAP NTK, depth 2)
            errors[f"{name}/{key}"] = float(np.max(np.where(want[key] != 0, err / np.abs(want[key] + (want[key] == 0)),
                                                            err)))
    return {"backend": backend, "max_depth": max_depth, "max_rel_error": errors, "tolerance": 1e-5,
            "passed": all(e <= 1e-5 for e in errors.values())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="3,6,11,21", help="paper depths (conv layers + 1), comma separated")
    parser.add_argument("--archs", default="gap,vanilla", help="gap and/or vanilla, comma separated")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="shortest timed launch (s)")
    parser.add_argument("--skip-accuracy", action="store_true", help="skip the float64-reference check (~1 min)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--check-sass", action="store_true",
                        help="no GPU needed: count the SASS (nvcc + cuobjdump) and exit 1 unless it agrees with "
                             "INSTR_PER_ENTRY_LAYER in cntk_gram.workers.gpu")
    args = parser.parse_args(argv)
    if args.check_sass:
        return check_sass()
    depths = [int(d) for d in args.depths.split(",")]
    archs = args.archs.split(",")
    bad = [a for a in archs if a not in gpu.KERNEL_NAMES] + [d for d in depths if not 2 <= d <= gpu.MAX_LAYERS + 1]
    if bad:
        sys.exit(f"bench_gpu: bad --archs/--depths value(s) {bad}; allowed archs gap, vanilla and depths "
                 f"2..{gpu.MAX_LAYERS + 1}")
    cupy = require_gpu()
    info = device_info(cupy)
    module = gpu.load_module(cupy.cuda.Device().id, gpu.compile_options())
    base = baseline_kernels(cupy)
    limit = info["sm_count"] * info["fp32_lanes_per_sm"] * info["clock_mhz"] * 1e6   # lane-instructions / s
    out = args.out or REPO / "benchmarks" / "results" / (
        f"gpu-{info['name'].replace(' ', '_')}-{datetime.date.today().isoformat()}.json")
    report = {"benchmark": "gpu tile kernels vs Appendix-I baseline", "device": info,
              "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "host": platform.node(), "compile_options": list(gpu.compile_options()),
              "instr_per_entry_layer": gpu.INSTR_PER_ENTRY_LAYER,
              "fp32_pipe_instr_per_entry_layer": gpu.FP32_INSTR_PER_ENTRY_LAYER,
              "fp32_instruction_limit_per_s": limit, "sass_count": "not counted yet",
              "fraction_definition": "pairs/s * entries per pair * layers * instr_per_entry_layer / "
                                     "(SMs * FP32 lanes per SM * clock); see docs/gpu.md",
              "results": [], "accuracy": None}
    # the measurements reach the file first, row by row: a run stopped, or a tool below failing, keeps them
    for arch in archs:
        for depth in depths:
            row = measure_row(cupy, module, base, arch=arch, depth=depth, min_seconds=args.min_seconds, limit=limit)
            report["results"].append(row)
            report.update(projection(report["results"]))
            write_report(out, report)
            print(json.dumps(row), flush=True)
    report["sass_count"] = sass_count_or_error()
    write_report(out, report)
    if not args.skip_accuracy:
        report["accuracy"] = accuracy()
        write_report(out, report)
    print(f"wrote {out}")


def measure_row(cupy, module, base, *, arch: str, depth: int, min_seconds: float, limit: float) -> dict:
    """One arch and depth: the fused kernel's and the baseline's pairs/s, and how far their values differ."""
    layers = depth - 1
    fused = fused_pairs_per_s(cupy, module, arch=arch, layers=layers, min_seconds=min_seconds)
    baseline = baseline_pairs_per_s(cupy, base, arch=arch, layers=layers, min_seconds=min_seconds)
    # the same first images and pairs through the fused kernel: the baseline must agree
    check = fused_pairs_per_s(cupy, module, arch=arch, layers=layers, min_seconds=0.0, n_start=BASELINE_IMAGES)
    fused_final = check["out"].get()[:, layers - 1, 0] * (1.0 / ENTRIES if arch == "gap" else 1.0)
    rel = np.abs(fused_final - baseline["final_depth_values"]) / np.maximum(np.abs(fused_final), 1e-30)
    entry_layers = gpu.ENTRIES_PER_PAIR[arch] * layers
    return {"arch": arch, "depth": depth, "layers": layers,
            "fused_pairs_per_s": fused["pairs_per_s"], "fused_pairs_timed": fused["pairs"],
            "fused_kernel_seconds": fused["kernel_seconds"],
            "baseline_pairs_per_s": baseline["pairs_per_s"], "baseline_pairs_timed": baseline["pairs"],
            "baseline_kernel_seconds": baseline["kernel_seconds"],
            "ratio": fused["pairs_per_s"] / baseline["pairs_per_s"],
            "fused_fraction_of_fp32_limit": fused["pairs_per_s"] * entry_layers
            * gpu.INSTR_PER_ENTRY_LAYER[arch] / limit,
            "fused_fraction_fp32_pipe_only": fused["pairs_per_s"] * entry_layers
            * gpu.FP32_INSTR_PER_ENTRY_LAYER[arch] / limit,
            "baseline_vs_fused_max_rel_diff": float(rel.max())}


def projection(results: list[dict]) -> dict:
    """The kernel-time projection of CNTK-V at all depths to 21 over FULL_CIFAR_PAIRS, once its row is measured."""
    vanilla21 = [r for r in results if r["arch"] == "vanilla" and r["depth"] == 21]
    if not vanilla21:
        return {}
    return {"projection_cntk_v_all_depths_to_21": {
        "pairs": FULL_CIFAR_PAIRS, "kernel_seconds": FULL_CIFAR_PAIRS / vanilla21[0]["fused_pairs_per_s"],
        "method": "one depth-21 pass yields depths 2..21; kernel seconds = pairs / measured pairs per second "
                  f"of a {vanilla21[0]['fused_pairs_timed']}-pair launch"}}


def sass_count_or_error() -> dict | None:
    """count_sass(), or what made nvcc or cuobjdump fail (a tool's failure must not cost the measurements)."""
    try:
        return count_sass()
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:400]}


def write_report(out: Path, report: dict) -> None:
    """The JSON report at `out`, replaced whole (a reader never sees half of it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)

if __name__ == "__main__":
    sys.exit(main())
