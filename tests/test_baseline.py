"""Benchmark baseline (workers/baseline.cu driven by baseline_pair in benchmarks/bench_gpu.py), without a GPU.

The two kernels are compiled for the host at BASE_SIDE = 8 with a small CUDA emulation (one std::thread per CUDA
thread of a block, blocks one after another) and loaded with ctypes; the unchanged Python driver runs them on NumPy
arrays (NumPy in place of CuPy for the GEMM, zeroing and readout) with the launch shapes it uses on the GPU. Values of
pairs vs the float64 reference at depths 2 and 4, both architectures, a self pair and an image with a zero
patch (zero variances).
"""
import ctypes
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from cntk_gram.workers.reference import cntk_pair

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_gpu  # noqa: E402

SIDE = 8
RTOL = 1e-5       # float32 tensors, a few layers of 8^4 entries (measured error ~1e-7)

HOST_SHIM = r"""
// Host emulation of the CUDA subset used by baseline.cu: one std::thread per CUDA thread, blocks one at a time.
#include <barrier>
#include <math.h>
#include <memory>
#include <thread>
#include <vector>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
#define __global__
#define __restrict__
#define __shared__ static
static std::unique_ptr<std::barrier<>> block_barrier;
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
#include "baseline.cu"
// One std::thread per CUDA thread of a block, reused for every block of the launch; a barrier ends each block.
template <class F, class... A> void launch(F f, const unsigned* grid, const unsigned* block, A... args) {
    const unsigned threads = block[0] * block[1] * block[2];
    block_barrier = std::make_unique<std::barrier<>>(threads);
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t)
        pool.emplace_back([=] {
            threadIdx = {t % block[0], t / block[0] % block[1], t / (block[0] * block[1])};
            for (unsigned bz = 0; bz < grid[2]; ++bz)
                for (unsigned by = 0; by < grid[1]; ++by)
                    for (unsigned bx = 0; bx < grid[0]; ++bx) {
                        blockIdx = {bx, by, bz};
                        f(args...);
                        __syncthreads();   // the block's shared memory is reused by the next block
                    }
        });
    for (auto& t : pool) t.join();
}
extern "C" void host_base_box(const unsigned* grid, const unsigned* block, float* t) {
    launch(base_box, grid, block, t);
}
extern "C" void host_base_relu_theta(const unsigned* grid, const unsigned* block, float* sigma, float* theta,
                                     const float* rx, const float* ry, const float* ix, const float* iy, int same) {
    launch(base_relu_theta, grid, block, sigma, theta, rx, ry, ix, iy, same);
}
"""


class HostKernel:
    """Called like a CuPy RawKernel: kernel(grid, block, args) with C-contiguous float32 arrays and np.int32."""

    def __init__(self, function):
        self.function = function
        self.launches = []

    def __call__(self, grid, block, args):
        dims = [(ctypes.c_uint * 3)(*(tuple(d) + (1,) * (3 - len(d)))) for d in (grid, block)]
        converted = []
        for a in args:
            if isinstance(a, np.ndarray):
                assert a.dtype == np.float32 and a.flags.c_contiguous, "kernel arguments must be C-contiguous float32"
                converted.append(a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
            else:
                assert isinstance(a, np.int32), "scalar kernel arguments must be np.int32, as CuPy needs"
                converted.append(ctypes.c_int(int(a)))
        self.launches.append((tuple(grid), tuple(block)))
        self.function(*dims, *converted)


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not installed: host emulation of the CUDA kernels not possible here")
    work = tmp_path_factory.mktemp("baseline_emulation")
    (work / "shim.cpp").write_text(HOST_SHIM)
    subprocess.run([compiler, "-std=c++20", "-O1", "-shared", "-fPIC", f"-DBASE_SIDE={SIDE}", f"-I{REPO / 'workers'}",
                    "-o", str(work / "baseline.so"), str(work / "shim.cpp"), "-lpthread"], check=True)
    lib = ctypes.CDLL(str(work / "baseline.so"))
    return {name: HostKernel(getattr(lib, f"host_{name}")) for name in ("base_box", "base_relu_theta")}


def test_launch_shapes_are_the_authors():
    """CNTK.py launches conv3 on a (63, 63) grid of (32, 32) blocks and trans on (32, 32, 16) of (8, 8)."""
    assert bench_gpu.baseline_launch_shapes(32) == {"base_box": ((63, 63), (32, 32)),
                                                    "base_relu_theta": ((32, 32, 16), (8, 8))}


def test_baseline_images_layout():
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    got = bench_gpu.baseline_images(x)
    assert got.shape == (2, 3, 16) and got.flags.c_contiguous
    assert got[1, 2, 4 * 1 + 3] == x[1, 1, 3, 2]


def test_emulated_baseline_matches_reference(host_kernels):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, SIDE, SIDE, 3)).astype(np.float32)
    x[1, 0:4, 2:7] = 0.0                                   # zero variances at layer 1: rho = 0 branch, no NaN
    images = bench_gpu.baseline_images(x)
    max_depth = 4
    layers = max_depth - 1
    norms = [bench_gpu.baseline_normalisers(np, host_kernels, images[a], layers) for a in range(len(x))]
    for a, b in ((0, 1), (1, 1), (2, 0)):
        want = cntk_pair(x[a], x[b], max_depth)
        for arch in ("gap", "vanilla"):
            for depth in (2, max_depth):
                for kernel in host_kernels.values():
                    kernel.launches.clear()
                got = bench_gpu.baseline_pair(np, host_kernels, images[a], images[b], norms[a], norms[b],
                                              layers=depth - 1, arch=arch, same=a == b)
                ref = want[f"ntk-{arch}"][depth - 2]
                assert abs(float(got) - ref) <= RTOL * abs(ref) + 1e-7, (arch, depth, a, b, float(got), ref)
                # the authors' launch count per pair: 1 + 2 (layers - 1) boxes, one fused update per layer
                assert len(host_kernels["base_box"].launches) == 1 + 2 * (depth - 2)
                assert len(host_kernels["base_relu_theta"].launches) == depth - 1


class _NumpyAsCupy:
    """CuPy's surface that baseline_pairs_per_s uses, on NumPy; CUDA events read the host clock."""

    class _Event:
        def record(self):
            self.at = time.perf_counter()

        def synchronize(self):
            pass

    cuda = types.SimpleNamespace(Event=_Event, get_elapsed_time=lambda a, b: 1000.0 * (b.at - a.at))

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def asnumpy(a):
        return np.asarray(a)


def test_baseline_timing_loop_returns_every_pair_value(host_kernels):
    """The benchmark's loop (images of seed 0, per-image normalisers, n^2 pairs timed): its values in row-major
    pair order are the float64 reference's (vanilla; both archs of baseline_pair are checked above)."""
    arch, layers = "vanilla", 2
    got = bench_gpu.baseline_pairs_per_s(_NumpyAsCupy(), host_kernels, arch=arch, layers=layers, min_seconds=0.0,
                                         side=SIDE)
    n = bench_gpu.BASELINE_IMAGES
    x = np.random.default_rng(0).standard_normal((n, SIDE, SIDE, 3)).astype(np.float32)
    want = np.array([cntk_pair(x[a], x[b], layers + 1)[f"ntk-{arch}"][-1] for a in range(n) for b in range(n)])
    assert got["pairs"] == n * n and got["pairs_per_s"] > 0
    np.testing.assert_allclose(got["final_depth_values"], want, rtol=RTOL, atol=1e-7)
