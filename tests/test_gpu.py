"""GPU tile worker (cntk_gram.workers.gpu, workers/*.cu).

Without a GPU: the .cu files compile for sm_80/sm_90 (nvcc), the pure-Python planner behaves, and cntk_tile.cu itself
runs on the host through a small CUDA emulation (one std::thread per CUDA thread) against the float64 reference.
With a GPU (@pytest.mark.gpu, skipped when CuPy or a device is missing): tiles equal the float64 reference and the
CPU backend within 1e-5 relative, for both architectures, NTK and NNGP, diagonal and ragged tiles, forced sub-batching.
"""
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from _images import cifar_images
from cntk_gram.workers import gpu
from cntk_gram.workers.reference import _layer_covariances, cntk_pair, cntk_reference, tr_d

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5


def _images(rng, n):
    """n preprocessed-like images; image 1 has a zero patch (zero variances: rho = 0 branch)."""
    x = rng.standard_normal((n, 32, 32, 3)).astype(np.float32)
    if n > 1:
        x[1, 4:20, 6:18] = 0.0
    return x


def _assert_close(got, want, what):
    want = np.asarray(want, np.float64)
    err = np.abs(np.asarray(got, np.float64) - want)
    bad = err > RTOL * np.abs(want) + 1e-30
    assert not bad.any(), f"{what}: {bad.sum()} entries off, worst rel {np.max(err / np.maximum(np.abs(want), 1e-30)):.3g}"


# ---------------------------------------------------------------- no GPU needed

def test_cuda_sources_compile_for_sm80_and_sm90():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA compile check not possible here")
    from cluster_procs import proc_env  # the script's `python` must be this interpreter, activated or not

    run = subprocess.run(["bash", str(REPO / ".ci" / "check_cuda.sh")], capture_output=True, text=True,
                         env=proc_env())
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok ") == 2 * len(list((REPO / "workers").glob("*.cu")))


def test_compile_options_match_source_defaults():
    source = gpu.KERNEL_SOURCE.read_text()
    defaults = dict(re.findall(r"#define (\w+) (\d+)\n#endif", source))
    assert {k: int(v) for k, v in defaults.items()} == dict(gpu.DEFAULT_OPTIONS)
    assert gpu.compile_options()[0] == "-std=c++17"
    assert "-DMAX_LAYERS=32" in gpu.compile_options()


def test_plan_tile_fits_budget_and_shrinks_chunks():
    layers = 20
    roomy = gpu.plan_tile(1000, 1000, layers=layers, arch="gap", budget_bytes=8 << 30)
    assert roomy.chunk == 1000 and roomy.device_bytes <= 8 << 30
    per_image = gpu.IMAGE_BYTES + layers * gpu.MAP_BYTES_PER_LAYER
    tight_budget = 600 * per_image  # room for ~300 images per side, so a 1000-image tile must be cut
    tight = gpu.plan_tile(1000, 1000, layers=layers, arch="gap", budget_bytes=tight_budget)
    assert tight.chunk < 1000 and tight.device_bytes <= tight_budget
    assert 2 * tight.chunk * per_image <= tight_budget
    assert 1 <= tight.pairs_per_launch <= tight.chunk ** 2
    # GAP pairs are 1024x the work of vanilla pairs: fewer per launch
    vanilla = gpu.plan_tile(1000, 1000, layers=layers, arch="vanilla", budget_bytes=8 << 30)
    assert vanilla.pairs_per_launch > roomy.pairs_per_launch
    with pytest.raises(ValueError, match="cannot hold even one image pair"):
        gpu.plan_tile(10, 10, layers=layers, arch="gap", budget_bytes=1000)
    with pytest.raises(ValueError, match="conv layers"):
        gpu.plan_tile(10, 10, layers=gpu.MAX_LAYERS + 1, arch="gap", budget_bytes=8 << 30)


def test_pair_lists_and_same_images(rng):
    a, b = gpu.pair_lists(4, 4, diagonal=True)
    assert len(a) == 10 and np.all(a <= b)
    a, b = gpu.pair_lists(3, 5, diagonal=False)
    assert len(a) == 15 and a.dtype == np.int32
    x = _images(rng, 3)
    y = np.stack([x[2], rng.standard_normal((32, 32, 3)).astype(np.float32)])
    same = gpu.same_images(x, y)
    assert same.tolist() == [[False, False], [False, False], [True, False]]


class _FakeDeviceArray(np.ndarray):
    """Host stand-in for a cupy.ndarray: adds get(stream, out, blocking)."""

    def get(self, stream=None, out=None, blocking=True):
        out[...] = self
        return out


class _FakeStream:
    def __init__(self, non_blocking=False):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def record(self):
        return self

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass


def _fake_kernel(name, launches):
    """Fake kernels: diag_maps stores each image's tag (pixel [0,0,0]); tile kernels write
    ntk = 1000 * tag_x + tag_y + layer and nngp = the self flag, so placement errors show up."""
    def launch(grid, block, args):
        if name == "diag_maps":
            images, n, layers, maps = args
            maps[...] = np.asarray(images)[:, 0, 0, 0, None, None, None, None]
            return
        x, y, x_maps, y_maps, pa, pb, same, count, layers, out = args
        launches.append((name, grid[0], int(count)))
        h = np.arange(int(layers))
        out[..., 0] = 1000 * x_maps[pa, 0, 0, 0, 0][:, None] + y_maps[pb, 0, 0, 0, 0][:, None] + h
        out[..., 1] = np.asarray(same)[:, None]
    return launch


def test_tile_orchestration_with_fake_cupy(monkeypatch):
    """The launcher's sub-tiling, pair batches, two output slots, scatter and mirroring, with CuPy replaced by host
    fakes (the kernels only tag pairs): every entry of the result must come from the right pair."""
    import sys
    import types
    launches = []
    fake = types.SimpleNamespace(
        float32=np.float32, float64=np.float64, uint8=np.uint8,
        asarray=lambda a: np.array(a).view(_FakeDeviceArray),
        zeros=lambda shape, dtype: np.zeros(shape, dtype).view(_FakeDeviceArray),
        empty=lambda shape, dtype: np.zeros(shape, dtype).view(_FakeDeviceArray),
        cuda=types.SimpleNamespace(Device=lambda device_id: _FakeStream(), Stream=_FakeStream))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupyx", types.SimpleNamespace(empty_pinned=np.zeros))
    module = types.SimpleNamespace(get_function=lambda name: _fake_kernel(name, launches))
    monkeypatch.setattr(gpu, "load_module", lambda device_id, options: module)
    per_image = gpu.IMAGE_BYTES + 2 * gpu.MAP_BYTES_PER_LAYER
    monkeypatch.setattr(gpu, "free_device_bytes", lambda device_id: int(5 * per_image / 0.8))   # 2-image chunks
    monkeypatch.setattr(gpu, "WORK_PER_LAUNCH", 3 * 2 ** 21)                                    # 3 GAP pairs
    x = np.zeros((5, 32, 32, 3), np.float32)
    y = np.zeros((3, 32, 32, 3), np.float32)
    x[:, 0, 0, 0] = np.arange(5)
    y[:, 0, 0, 0] = 100 + np.arange(3)
    y[2] = x[4]                                                                                # same content
    h = np.arange(2)[:, None, None]
    ida, idb = x[:, 0, 0, 0][:, None], y[:, 0, 0, 0][None, :]

    got = gpu.tile_kernels(x, y, archs=("gap", "vanilla"), max_depth=3)
    want = 1000 * ida + idb + h
    np.testing.assert_allclose(got["ntk-vanilla"], want)
    np.testing.assert_allclose(got["ntk-gap"], want / 2 ** 20)
    np.testing.assert_array_equal(got["nngp-vanilla"][0], gpu.same_images(x, y))
    assert {g for name, g, c in launches if name == "cntk_gap_tile"} >= {3 * 128}
    assert all(c <= 3 for name, g, c in launches if name == "cntk_gap_tile")
    assert all(g == -(-c // 8) for name, g, c in launches if name == "cntk_vanilla_tile")

    launches.clear()
    got = gpu.tile_kernels(x, archs=("gap",), max_depth=3)
    lo, hi = np.minimum(ida, ida.T), np.maximum(ida, ida.T)
    np.testing.assert_allclose(got["ntk-gap"], (1000 * lo + hi + h) / 2 ** 20)
    np.testing.assert_array_equal(got["nngp-gap"][1] * 2 ** 20, np.eye(5))
    assert sum(c for _, _, c in launches) == 5 * 6 // 2                                         # a <= b only


HOST_SHIM = r"""
// Host emulation of the CUDA subset used by cntk_tile.cu: one std::thread per CUDA thread, blocks one at a time.
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct float2 { float x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __shared__ static
template <class T> T __ldg(const T* p) { return *p; }
inline float rsqrtf(float x) { return (float)(1.0 / sqrt((double)x)); }
static std::unique_ptr<std::barrier<>> block_barrier;
static std::vector<std::unique_ptr<std::barrier<>>> warp_barrier;
static double lanes[64][32];
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
inline void __syncwarp() { warp_barrier[threadIdx.x / 32]->arrive_and_wait(); }
template <class T> T shfl(T v, int src) {
    const int w = threadIdx.x / 32;
    double d = 0; memcpy(&d, &v, sizeof(T)); lanes[w][threadIdx.x % 32] = d;
    warp_barrier[w]->arrive_and_wait();
    T out; memcpy(&out, &lanes[w][src], sizeof(T));
    warp_barrier[w]->arrive_and_wait();
    return out;
}
template <class T> T __shfl_up_sync(unsigned, T v, int d) { int l = threadIdx.x % 32; return shfl(v, l < d ? l : l - d); }
template <class T> T __shfl_down_sync(unsigned, T v, int d) { int l = threadIdx.x % 32; return shfl(v, l + d > 31 ? l : l + d); }
template <class T> T __shfl_xor_sync(unsigned, T v, int d) { return shfl(v, (threadIdx.x % 32) ^ d); }
static std::mutex atomic_lock;
inline double atomicAdd(double* p, double v) { std::lock_guard<std::mutex> g(atomic_lock); double o = *p; *p += v; return o; }
template <class F, class... A> void launch(F f, const std::vector<unsigned>& blocks, unsigned threads, A... args) {
    blockDim.x = threads;
    for (unsigned b : blocks) {
        block_barrier = std::make_unique<std::barrier<>>(threads);
        warp_barrier.clear();
        for (unsigned w = 0; w < threads / 32; ++w) warp_barrier.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; ++t) pool.emplace_back([=] { threadIdx.x = t; blockIdx.x = b; f(args...); });
        for (auto& t : pool) t.join();
    }
}
#include "cntk_tile.cu"
template <class T> std::vector<T> load(const char* path, size_t n) {
    std::vector<T> v(n); FILE* f = fopen(path, "rb"); if (fread(v.data(), sizeof(T), n, f) != n) exit(3); fclose(f); return v;
}
// usage: emulate n_images layers n_pairs vanilla|gap [CUDA block ids of the GAP grid]
int main(int argc, char** argv) {
    const int n_images = atoi(argv[1]), layers = atoi(argv[2]), n_pairs = atoi(argv[3]);
    const bool gap = argv[4][0] == 'g';
    auto images = load<float>("images.bin", (size_t)n_images * IMAGE_FLOATS);
    auto px = load<int>("pair_x.bin", n_pairs), py = load<int>("pair_y.bin", n_pairs);
    auto self = load<unsigned char>("pair_self.bin", n_pairs);
    std::vector<float2> maps((size_t)n_images * layers * MAP_ENTRIES);
    std::vector<unsigned> blocks;
    for (int i = 0; i < n_images; ++i) blocks.push_back(i);
    launch(diag_maps, blocks, SIDE * SIDE, (const float*)images.data(), n_images, layers, maps.data());
    blocks.clear();
    if (gap) for (int k = 5; k < argc; ++k) blocks.push_back(atoi(argv[k]));
    else for (int b = 0; b * WARPS_PER_BLOCK < n_pairs; ++b) blocks.push_back(b);
    std::vector<double> out((size_t)n_pairs * layers * 2, 0.0);
    launch(gap ? cntk_gap_tile : cntk_vanilla_tile, blocks, WARPS_PER_BLOCK * 32, (const float*)images.data(),
           (const float*)images.data(), (const float2*)maps.data(), (const float2*)maps.data(), (const int*)px.data(),
           (const int*)py.data(), (const unsigned char*)self.data(), n_pairs, layers, out.data());
    FILE* f = fopen("out.bin", "wb"); fwrite(out.data(), sizeof(double), out.size(), f); fclose(f);
    return 0;
}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """cntk_tile.cu built for the host with HOST_SHIM; runs (images, pairs, self flags, mode, gap blocks) -> out."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not installed: host emulation of the CUDA kernels not possible here")
    work = tmp_path_factory.mktemp("cuda_emulation")
    (work / "emulate.cpp").write_text(HOST_SHIM)
    options = [o for o in gpu.compile_options() if o.startswith("-D")]
    subprocess.run([compiler, "-std=c++20", "-O1", *options, f"-I{REPO / 'workers'}", "-o", str(work / "emulate"),
                    str(work / "emulate.cpp"), "-lpthread"], check=True)

    def run(images, pairs, same, *, layers, mode, blocks=()):
        images.astype(np.float32).tofile(work / "images.bin")
        np.array([p[0] for p in pairs], np.int32).tofile(work / "pair_x.bin")
        np.array([p[1] for p in pairs], np.int32).tofile(work / "pair_y.bin")
        np.array(same, np.uint8).tofile(work / "pair_self.bin")
        subprocess.run([str(work / "emulate"), str(len(images)), str(layers), str(len(pairs)), mode,
                        *map(str, blocks)], cwd=work, check=True)
        return np.fromfile(work / "out.bin", np.float64).reshape(len(pairs), layers, 2)
    return run


def test_emulated_vanilla_kernel_matches_reference(emulator, rng):
    """Vanilla tile kernel (all of its warps) on the host: traces of every layer vs float64 brute force."""
    x = _images(rng, 3)
    x[2] = x[0]                       # identical content: rho = 1 forced on the zero-displacement block
    pairs, same = [(0, 1), (1, 1), (2, 0), (1, 2)], [0, 1, 1, 0]
    out = emulator(x, pairs, same, layers=3, mode="vanilla")
    for p, (a, b) in enumerate(pairs):
        ref = cntk_pair(x[a], x[b], max_depth=4)
        _assert_close(out[p, :, 0], ref["ntk-vanilla"], f"ntk-vanilla {a},{b}")
        _assert_close(out[p, :, 1], ref["nngp-vanilla"], f"nngp-vanilla {a},{b}")


def test_emulated_gap_kernel_blocks_match_reference(emulator, rng):
    """GAP tile kernel on the host, CUDA blocks with displacement blocks ci = 0, 15, 31 and cj = 0..7, 24..31 (row and
    column cut lines at both ends and inside): their sums of Kdot*Theta and K vs float64 brute force."""
    x = _images(rng, 2)
    warps = dict(gpu.DEFAULT_OPTIONS)["WARPS_PER_BLOCK"]
    cuda_blocks = [0, 3, 60, 127]     # first / last chunk of row displacement ci = 0, a middle one, ci = 31
    layers = 3
    for (a, b), same in (((0, 1), 0), ((1, 1), 1)):
        out = emulator(x, [(a, b)], [same], layers=layers, mode="gap", blocks=cuda_blocks)[0]   # (layers, 2)
        displacement_blocks = [divmod(c * warps + w, 32) for c in cuda_blocks for w in range(warps)]
        i, j = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
        want = np.zeros((layers, 2))
        theta = None
        for h, k, kdot, sigma in _layer_covariances(x[a].astype(np.float64), x[b].astype(np.float64), layers):
            theta = np.zeros_like(sigma) if h == 1 else theta
            for ci, cj in displacement_blocks:
                entries = (i, j, (i + ci) % 32, (j + cj) % 32)
                want[h - 1] += (kdot * theta)[entries].sum(), k[entries].sum()
            theta = tr_d(kdot * theta + k)
        assert out[0, 0] == 0.0          # GAP NTK at depth 2: Theta0 = 0
        _assert_close(out[1:, 0], want[1:, 0], f"gap ntk block sums {a},{b}")
        _assert_close(out[:, 1], want[:, 1], f"gap nngp block sums {a},{b}")


# ---------------------------------------------------------------- GPU

def _gpu_skip_reason():
    """None when CuPy imports and sees a CUDA device, else why the GPU tests are skipped."""
    try:
        import cupy
    except ImportError as exc:
        return f"cupy not importable ({exc}); GPU tests need CuPy and a CUDA device"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver
        return f"no CUDA device usable ({type(exc).__name__}: {exc})"
    return None if count > 0 else "no CUDA device present"


_NO_GPU = _gpu_skip_reason()
needs_gpu = pytest.mark.skipif(_NO_GPU is not None, reason=_NO_GPU or "")


@pytest.mark.gpu
@needs_gpu
def test_gpu_diagonal_tile_matches_reference(rng):
    x = _images(rng, 4)
    x[3] = x[0]                        # a duplicate inside a diagonal tile
    got = gpu.tile_kernels(x, archs=("vanilla", "gap"), max_depth=5)
    want = cntk_reference(x, max_depth=5, archs=("vanilla", "gap"))
    for key in want:
        assert got[key].dtype == np.float32 and got[key].shape == (4, 4, 4)
        _assert_close(got[key], want[key], key)
        assert np.array_equal(got[key], got[key].transpose(0, 2, 1)), f"{key} not symmetric"
    assert np.all(got["ntk-gap"][0] == 0.0)


@pytest.mark.gpu
@needs_gpu
def test_gpu_ragged_tile_matches_reference(rng):
    x, y = _images(rng, 3), _images(rng, 2)
    y[1] = x[2]
    got = gpu.tile_kernels(x, y, archs=("gap", "vanilla"), max_depth=4)
    want = cntk_reference(x, y, max_depth=4, archs=("gap", "vanilla"))
    assert list(got) == ["ntk-gap", "nngp-gap", "ntk-vanilla", "nngp-vanilla"]
    for key in want:
        assert got[key].shape == (3, 3, 2)
        _assert_close(got[key], want[key], key)


@pytest.mark.gpu
@needs_gpu
def test_gpu_depth_21_matches_reference(rng):
    """All depths 2..21 for a few pairs, one of them an image with itself."""
    x, y = _images(rng, 1), _images(rng, 2)
    y[1] = x[0]
    got = gpu.tile_kernels(x, y, archs=("vanilla", "gap"), max_depth=21)
    want = cntk_reference(x, y, max_depth=21, archs=("vanilla", "gap"))
    for key in want:
        _assert_close(got[key], want[key], key)


@pytest.mark.gpu
@needs_gpu
def test_gpu_sub_batching_gives_the_same_tile(rng, monkeypatch):
    """Tiny memory budget and launch size force several sub-tiles and both output slots; results must not change."""
    x, y = _images(rng, 5), _images(rng, 4)
    whole = gpu.tile_kernels(x, y, archs=("vanilla", "gap"), max_depth=3)
    whole_diag = gpu.tile_kernels(x, archs=("vanilla", "gap"), max_depth=3)
    per_image = gpu.IMAGE_BYTES + 2 * gpu.MAP_BYTES_PER_LAYER
    monkeypatch.setattr(gpu, "free_device_bytes", lambda device_id: int(5 * per_image / 0.8))
    monkeypatch.setattr(gpu, "WORK_PER_LAUNCH", 3 * 2 ** 21)   # 3 GAP pairs per launch at 2 layers
    assert gpu.plan_tile(5, 4, layers=2, arch="gap", budget_bytes=int(5 * per_image)).chunk < 4
    cut = gpu.tile_kernels(x, y, archs=("vanilla", "gap"), max_depth=3)
    cut_diag = gpu.tile_kernels(x, archs=("vanilla", "gap"), max_depth=3)
    for key in whole:
        _assert_close(cut[key], whole[key], key)
        _assert_close(cut_diag[key], whole_diag[key], key + " diagonal")


@pytest.mark.gpu
@needs_gpu
def test_gpu_equals_cpu_backend(cifar_root):
    from cntk_gram.workers.backends import get_backend
    x = cifar_images(cifar_root, 6)
    for y in (None, x[:2] + 0.5):
        got = get_backend("gpu").tile_kernels(x, y, archs=("vanilla", "gap"), max_depth=6)
        want = get_backend("cpu").tile_kernels(x, y, archs=("vanilla", "gap"), max_depth=6)
        for key in want:
            _assert_close(got[key], want[key], key)


@pytest.mark.gpu
@needs_gpu
def test_gpu_module_is_cached():
    first = gpu.load_module(0, gpu.compile_options())
    assert gpu.load_module(0, gpu.compile_options()) is first


@pytest.mark.gpu
@needs_gpu
def test_gpu_plugin_selects_device_and_warms_module():
    from cntk_gram.workers.gpu_plugin import GPUSetup
    GPUSetup(device_id=0, memory_fraction=0.5).setup(worker=None)
    assert gpu.current_device() == 0
    assert gpu.load_module.cache_info().currsize >= 1
    with pytest.raises(ValueError, match="memory_fraction"):
        GPUSetup(memory_fraction=1.5)
