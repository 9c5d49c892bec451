"""GPU tile worker (cntk_gram.workers.gpu, workers/*.cu).

Without a GPU: the .cu files compile for sm_80/sm_90 (nvcc), the pure-Python planner behaves, and cntk_tile.cu itself
runs on the host through a small CUDA emulation (one std::thread per CUDA thread) against the float64 reference.
With a GPU (@pytest.mark.gpu, skipped when CuPy or a device is missing): tiles equal the float64 reference and the
CPU backend within 1e-5 relative, for both architectures, NTK and NNGP, diagonal and ragged tiles, forced sub-batching.
"""
import itertools
import re
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

from _images import cifar_images
from gap_blocks import block_sums
from cntk_gram.workers import gpu
from cntk_gram.workers.reference import _layer_covariances, cntk_pair, cntk_reference, tr_d
from cntk_gram.workers.vocab import gpu_unavailable_reason

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
    run = subprocess.run(["bash", str(REPO / ".ci" / "check_cuda.sh")], capture_output=True, text=True,
                         env=_tool_env())
    assert run.returncode == 0, run.stdout + run.stderr
    for source in (REPO / "workers").glob("*.cu"):
        for arch in ("sm_80", "sm_90"):
            assert f"ok   {source.name} {arch}" in run.stdout
    for kernel in gpu.KERNEL_NAMES.values():
        assert f"ok   {kernel} sm_90 no spills" in run.stdout
    assert "FAIL" not in run.stdout


def _tool_env():
    """Environment whose PYTHON is this interpreter (check_cuda.sh imports cntk_gram.workers.gpu with it)."""
    import os
    return {**os.environ, "PYTHON": sys.executable,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_spill_guard_fails_when_registers_are_capped():
    """32 registers per thread (MIN_BLOCKS_PER_SM=8 at 256 threads) force spills: check_cuda.sh must say so."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA compile check not possible here")
    env = {**_tool_env(), "CHECK_CUDA_EXTRA": "-DMIN_BLOCKS_PER_SM=8"}
    run = subprocess.run(["bash", str(REPO / ".ci" / "check_cuda.sh")], capture_output=True, text=True, env=env)
    assert run.returncode != 0
    assert "FAIL cntk_gap_tile sm_90 uses local memory" in run.stdout


def test_sass_guard_fails_when_the_launcher_count_is_off(monkeypatch):
    from benchmarks import bench_gpu
    if bench_gpu.sass_summary() is None:
        pytest.skip("nvcc or cuobjdump/nvdisasm missing: SASS count not possible here")
    assert bench_gpu.check_sass() == 0
    monkeypatch.setitem(gpu.INSTR_PER_ENTRY_LAYER, "vanilla", gpu.INSTR_PER_ENTRY_LAYER["vanilla"] + 2)
    assert bench_gpu.check_sass() == 1


def test_compile_options_match_source_defaults():
    source = gpu.KERNEL_SOURCE.read_text()
    defaults = dict(re.findall(r"#define (\w+) (\d+)\n#endif", source))
    assert defaults.pop("LAP_COUNT") == "0"          # the plain build; LAP builds add -DLAP_COUNT (module_options)
    assert {k: int(v) for k, v in defaults.items()} == dict(gpu.DEFAULT_OPTIONS)
    assert gpu.module_options(0) == gpu.DEFAULT_OPTIONS
    assert gpu.module_options(3) == gpu.DEFAULT_OPTIONS + (("LAP_COUNT", 3),)
    assert gpu.compile_options()[:2] == ("-std=c++17", "-ftz=true")
    assert "-DMAX_LAYERS=32" in gpu.compile_options()


def test_plan_tile_fits_budget_and_shrinks_chunks():
    layers = 20
    roomy = gpu.plan_tile(1000, 1000, layers=layers, arch="gap", budget_bytes=8 << 30)
    assert roomy.chunk == 1000 and roomy.device_bytes <= 8 << 30
    per_image = gpu.IMAGE_BYTES + layers * gpu.MAP_BYTES_PER_LAYER
    tight_budget = 600 * per_image  # room for ~300 images per side, so a 1000-image tile must be cut
    tight = gpu.plan_tile(1000, 1000, layers=layers, arch="gap", budget_bytes=tight_budget)
    assert tight.chunk < 1000 and tight.device_bytes <= tight_budget
    result = 1000 * 1000 * layers * 2 * 4                  # the tile's (2, layers, n, m) float32 result on the device
    assert result + 2 * (2 * tight.chunk * per_image) <= tight_budget   # two sub-tiles' inputs at once
    assert 1 <= tight.pairs_per_launch <= tight.chunk ** 2
    # GAP pairs are 1024x the work of vanilla pairs: fewer per launch
    vanilla = gpu.plan_tile(1000, 1000, layers=layers, arch="vanilla", budget_bytes=8 << 30)
    assert vanilla.pairs_per_launch > roomy.pairs_per_launch
    with pytest.raises(ValueError, match="cannot hold a 10 x 10 tile's result .* and one image pair"):
        gpu.plan_tile(10, 10, layers=layers, arch="gap", budget_bytes=1000)
    with pytest.raises(ValueError, match="smaller tile size"):
        gpu.plan_tile(10000, 10000, layers=layers, arch="vanilla", budget_bytes=8 << 30)   # 16 GB result
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


class _FakeGPU:
    """Host stand-in for the CuPy calls of the launcher, with a log of stream work and two checks (a vector clock
    per stream): a kernel or copy on stream S may use an array written on stream T only after S waited for an event
    recorded on T after that write (or the host waited for that write to finish); a device or pinned buffer may be freed only once the host has synchronized on
    events covering every use of it. Violations collect in `errors`."""

    def __init__(self, kernels):
        self.log, self.errors, self.kernels = [], [], kernels
        self.default = _FakeStream(self, "default")
        self.current = [self.default]
        self.covered = {}                      # stream name -> last op index the host knows finished
        self.info = {}                         # id(root buffer) -> {"written": {stream: i}, "used": {stream: i}}

    def op(self, name, stream, *arrays, writes=()):
        i = len(self.log)
        self.log.append((name, stream.name))
        for arr in arrays + tuple(writes):
            info = self._track(arr)
            for t, w in info["written"].items():
                if t != stream.name and stream.waited.get(t, -1) < w and self.covered.get(t, -1) < w:
                    self.errors.append(f"{name} on {stream.name} uses a buffer written on {t} at op {w} unwaited")
            info["used"][stream.name] = i
        for arr in writes:
            self._track(arr)["written"][stream.name] = i
        return i

    def _track(self, arr):
        root = arr
        while isinstance(root.base, np.ndarray):
            root = root.base
        key = id(root)
        if key not in self.info:
            self.info[key] = {"written": {}, "used": {}}
            weakref.finalize(root, self._freed, key)
        return self.info[key]

    def _freed(self, key):
        for stream, i in self.info.pop(key)["used"].items():
            if self.covered.get(stream, -1) < i:
                self.errors.append(f"buffer used on {stream} at op {i} freed before the host waited for it")

    def module(self):
        import types
        return types.SimpleNamespace(get_function=lambda name: _FakeKernel(self, name))

    def cupy(self):
        import types

        names = itertools.count()

        def alloc(shape, dtype):
            return np.zeros(shape, dtype).view(_FakeDeviceArray).bind(self)
        return types.SimpleNamespace(
            float32=np.float32, float64=np.float64, uint8=np.uint8, empty=alloc, zeros=alloc,
            cuda=types.SimpleNamespace(Device=lambda device_id: _FakeStream(self, "device"),
                                       Stream=lambda non_blocking=False: _FakeStream(self, f"s{next(names)}")))


class _FakeDeviceArray(np.ndarray):
    """Host stand-in for a cupy.ndarray: set / get go through the fake GPU's log."""
    gpu = None

    def bind(self, gpu):
        self.gpu = gpu
        return self

    def __array_finalize__(self, obj):
        self.gpu = getattr(obj, "gpu", None)

    def set(self, arr, stream=None):
        self.gpu.op("set", stream, arr, writes=(self,))
        self[...] = arr

    def get(self, stream=None, out=None, blocking=True):
        i = self.gpu.op("get", stream, self, writes=(out,))
        out[...] = self
        if blocking:
            stream.host_wait(i)
        return out


class _FakeStream:
    def __init__(self, gpu, name):
        self.gpu, self.name, self.waited = gpu, name, {}

    def __enter__(self):
        self.gpu.current.append(self)
        return self

    def __exit__(self, *exc):
        self.gpu.current.pop()
        return False

    def record(self):
        return _FakeEvent(self, len(self.gpu.log) - 1, dict(self.waited))

    def wait_event(self, event):
        self.gpu.log.append(("wait", self.name))
        for stream, i in {**event.clock, event.stream.name: event.index}.items():
            self.waited[stream] = max(self.waited.get(stream, -1), i)

    def host_wait(self, index):
        self.gpu.log.append(("sync", self.name))
        self.gpu.covered[self.name] = max(self.gpu.covered.get(self.name, -1), index)
        for stream, i in self.waited.items():
            self.gpu.covered[stream] = max(self.gpu.covered.get(stream, -1), i)


class _FakeEvent:
    def __init__(self, stream, index, clock):
        self.stream, self.index, self.clock = stream, index, clock

    def synchronize(self):
        self.stream.gpu.log.append(("sync", self.stream.name))
        covered = self.stream.gpu.covered
        for stream, i in {**self.clock, self.stream.name: self.index}.items():
            covered[stream] = max(covered.get(stream, -1), i)


class _FakeKernel:
    """Kernels by name, run on the current fake stream. Default bodies tag pairs: diag_maps stores each image's tag
    (pixel [0, 0, 0]); a tile kernel writes ntk = 1000 * tag_x + tag_y + layer and nngp = the self flag (GAP adds,
    like its atomicAdd, so an unzeroed slot shows); scatter_pairs follows the contract in cntk_tile.cu."""

    def __init__(self, gpu, name):
        self.gpu, self.name = gpu, name

    def __call__(self, grid, block, args):
        stream = self.gpu.current[-1]
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        outputs = {"diag_maps": -1, "scatter_pairs": -1}.get(self.name, -1)
        self.gpu.op(f"kernel:{self.name}", stream, *arrays[:outputs], writes=(arrays[outputs],))
        self.gpu.kernels.get(self.name, getattr(self, "_" + self.name.split("_")[0], None))(grid, block, args)

    @staticmethod
    def _diag(grid, block, args):
        images, n, layers, maps = args
        maps[...] = np.asarray(images)[:, 0, 0, 0, None, None, None, None]

    @staticmethod
    def _cntk(grid, block, args):
        x, y, x_maps, y_maps, pa, pb, same, count, layers, out = args
        gap = grid[0] == int(count) * 128
        assert gap or grid[0] == -(-int(count) // 8)
        h = np.arange(int(layers))
        tags = 1000 * np.asarray(x_maps)[pa, 0, 0, 0, 0][:, None] + np.asarray(y_maps)[pb, 0, 0, 0, 0][:, None] + h
        if gap:
            out[..., 0] += tags
            out[..., 1] += np.asarray(same)[:, None]
        else:
            out[..., 0] = tags
            out[..., 1] = np.asarray(same)[:, None]

    @staticmethod
    def _scatter(grid, block, args):
        sums, pa, pb, count, layers, scale, row0, col0, rows, cols, mirror, result = args
        assert grid[0] * block[0] >= int(count) * 2 * int(layers) and result.shape[2:] == (rows, cols)
        values = (np.asarray(sums)[:int(count)] * float(scale)).transpose(2, 1, 0).astype(np.float32)
        r, c = int(row0) + np.asarray(pa), int(col0) + np.asarray(pb)
        result[:, :, r, c] = values
        if mirror:
            result[:, :, c, r] = values


def _fake_cupy(monkeypatch, kernels=None):
    """Installs a _FakeGPU as cupy / cupyx for cntk_gram.workers.gpu; returns it."""
    import types
    fake = _FakeGPU(kernels or {})
    monkeypatch.setitem(sys.modules, "cupy", fake.cupy())
    monkeypatch.setitem(sys.modules, "cupyx", types.SimpleNamespace(empty_pinned=lambda shape, dtype: np.zeros(shape, dtype)))
    module = fake.module()
    monkeypatch.setattr(gpu, "load_module", lambda device_id, options: module)
    monkeypatch.setattr(gpu, "_pinned", {"buffer": None})
    monkeypatch.setattr(gpu, "_streams", {})
    return fake


def _force_chunk(monkeypatch, chunk, n, m, layers):
    """Memory budget that makes plan_tile cut an n x m tile into chunk x chunk sub-tiles."""
    per_image = gpu.IMAGE_BYTES + layers * gpu.MAP_BYTES_PER_LAYER
    need = n * m * layers * 8 + 2 * (2 * chunk * per_image + chunk * chunk * gpu.PAIR_INDEX_BYTES) + chunk ** 2 * layers * 16
    monkeypatch.setattr(gpu, "free_device_bytes", lambda device_id: int(need / 0.8) + 8)


def test_tile_orchestration_with_fake_cupy(monkeypatch):
    """The launcher's sub-tiling, pair batches, device scatter and mirroring, with CuPy replaced by host fakes (the
    kernels only tag pairs): every entry of the result must come from the right pair, and the stream checks of
    _FakeGPU must hold."""
    fake = _fake_cupy(monkeypatch)
    _force_chunk(monkeypatch, 2, 5, 3, 2)
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
    kernels = [name for name, _ in fake.log if name.startswith("kernel:cntk")]
    assert kernels.count("kernel:cntk_vanilla_tile") == 6                                     # 3 x 2 sub-tiles
    assert kernels.count("kernel:cntk_gap_tile") > 6                                          # 3 pairs per launch

    fake.log.clear()
    got = gpu.tile_kernels(x, archs=("gap",), max_depth=3)
    lo, hi = np.minimum(ida, ida.T), np.maximum(ida, ida.T)
    np.testing.assert_allclose(got["ntk-gap"], (1000 * lo + hi + h) / 2 ** 20)
    np.testing.assert_array_equal(got["nngp-gap"][1] * 2 ** 20, np.eye(5))
    assert fake.errors == []


def test_launcher_copies_only_the_selected_planes_with_fake_cupy(monkeypatch):
    """depths / kinds: the host receives only the chosen (kind, depth) planes of the device result, one copy each
    (2 of 6 per architecture here), with the right values in the caller's order, on a plain and a diagonal tile."""
    fake = _fake_cupy(monkeypatch)
    _force_chunk(monkeypatch, 2, 5, 3, 3)
    x = np.zeros((5, 32, 32, 3), np.float32)
    y = np.zeros((3, 32, 32, 3), np.float32)
    x[:, 0, 0, 0] = np.arange(5)
    y[:, 0, 0, 0] = 100 + np.arange(3)
    ida, idb = x[:, 0, 0, 0][:, None], y[:, 0, 0, 0][None, :]
    for yy, col in ((y, idb), (None, ida.T)):
        fake.log.clear()
        got = gpu.tile_kernels(x, yy, archs=("gap", "vanilla"), max_depth=4, depths=(4, 2), kinds=("ntk",))
        assert list(got) == ["ntk-gap", "ntk-vanilla"]
        lo, hi = (ida, col) if yy is not None else (np.minimum(ida, col), np.maximum(ida, col))
        for i, depth in enumerate((4, 2)):
            np.testing.assert_allclose(got["ntk-vanilla"][i], 1000 * lo + hi + depth - 2)
            np.testing.assert_allclose(got["ntk-gap"][i], (1000 * lo + hi + depth - 2) / 2 ** 20)
        assert [name for name, _ in fake.log].count("get") == 2 * 2
    assert fake.errors == []


def test_streams_are_made_once_per_device_and_reused_by_every_tile(monkeypatch):
    """CuPy's memory pool keeps freed blocks per stream: every tile (both archs, flip too) runs on the same compute and
    upload streams, made on the first tile, so the next tile reuses the blocks the last one freed."""
    fake = _fake_cupy(monkeypatch)
    made = []
    stream_factory = sys.modules["cupy"].cuda.Stream
    monkeypatch.setattr(sys.modules["cupy"].cuda, "Stream", lambda **kw: made.append(stream_factory(**kw)) or made[-1])
    _force_chunk(monkeypatch, 2, 4, 3, 2)
    x, y = np.zeros((4, 32, 32, 3), np.float32), np.ones((3, 32, 32, 3), np.float32)
    gpu.tile_kernels(x, y, archs=("gap", "vanilla"), max_depth=3)
    assert len(made) == 2
    first = {stream for _, stream in fake.log} - {"default", "device"}
    fake.log.clear()
    for yy in (y, None):
        gpu.tile_kernels(x, yy, archs=("gap", "vanilla"), max_depth=3, flip=True)
    assert len(made) == 2 and {stream for _, stream in fake.log} - {"default", "device"} == first
    assert gpu._streams == {0: tuple(made)} and fake.errors == []


def test_pair_lists_cover_every_pair_once_in_super_tiles():
    for n, m, diagonal in ((70, 45, False), (64, 64, True), (37, 37, True), (5, 3, False), (1, 1, True)):
        a, b = gpu.pair_lists(n, m, diagonal=diagonal)
        assert a.dtype == b.dtype == np.int32 and not a.flags.writeable
        keys = a.astype(np.int64) * m + b
        want = [(i, j) for i in range(n) for j in range(m) if not diagonal or i <= j]
        assert len(keys) == len(want) == len(set(keys.tolist()))
        assert set(zip(a.tolist(), b.tolist())) == set(want)
        # each 32 x 32 super-tile is one contiguous run, the runs in row-major order of super-tiles
        tile = (a // 32) * 1000 + b // 32
        runs = tile[np.r_[True, tile[1:] != tile[:-1]]]
        assert len(runs) == len(set(runs.tolist())) and np.all(np.diff(runs) > 0)
        # inside full super-tiles, each CUDA block of 8 pairs covers 2 row images x 4 column images
        full = (a // 32 < n // 32) & (b // 32 < m // 32) & ~diagonal
        for start in range(0, len(a) - 7, 8):
            if full[start:start + 8].all():
                assert np.ptp(a[start:start + 8]) <= 1 and np.ptp(b[start:start + 8]) <= 3
    with pytest.raises(ValueError, match="divide"):
        gpu.pair_lists(4, 4, diagonal=False, tile=(32, 32), group=(3, 4))


def test_subtiles_cover_the_tile(monkeypatch):
    for n, m, chunk, diagonal in ((7, 5, 3, False), (7, 7, 3, True), (4, 4, 4, True)):
        covered = np.zeros((n, m), int)
        for rows, cols, on_diagonal in gpu.subtiles(n, m, chunk, diagonal=diagonal):
            assert rows.stop - rows.start <= chunk and cols.stop - cols.start <= chunk
            assert on_diagonal == (diagonal and rows == cols)
            a, b = gpu.pair_lists(rows.stop - rows.start, cols.stop - cols.start, diagonal=on_diagonal)
            covered[rows.start + a, cols.start + b] += 1
        if diagonal:
            covered = covered + np.triu(covered, 1).T
        assert np.all(covered == 1)


def test_next_subtile_uploads_while_the_current_one_computes(monkeypatch):
    """Stream order of a tile cut into 3 x 3 sub-tiles: uploads on one stream, kernels on another; the upload of
    sub-tile k + 1 is issued before the host waits for sub-tile k, whose kernels are queued before that wait; one
    device-to-host copy per tile (after the last sub-tile)."""
    fake = _fake_cupy(monkeypatch)
    _force_chunk(monkeypatch, 2, 6, 6, 2)
    x = np.zeros((6, 32, 32, 3), np.float32)
    x[:, 0, 0, 0] = np.arange(6)
    y = x + 0.5
    got = gpu.tile_kernels(x, y, archs=("vanilla",), max_depth=3)
    np.testing.assert_allclose(got["ntk-vanilla"], 1000 * np.arange(6)[:, None] + np.arange(6) + 0.5
                               + np.arange(2)[:, None, None])
    assert fake.errors == []
    log = fake.log
    streams = {name: {s for op, s in log if op.startswith(name)} for name in ("set", "kernel", "get")}
    assert len(streams["set"]) == len(streams["kernel"]) == 1 and streams["set"] != streams["kernel"]
    assert streams["get"] == streams["kernel"] and [op for op, _ in log].count("get") == 1
    compute = streams["kernel"].pop()
    # job k: its uploads end at the k-th wait of the compute stream; its host wait is the k-th sync on compute
    waits = [i for i, (op, s) in enumerate(log) if op == "wait" and s == compute]
    syncs = [i for i, (op, s) in enumerate(log) if op == "sync" and s == compute]
    sets = [i for i, (op, s) in enumerate(log) if op == "set"]
    assert len(waits) == 9 and len(syncs) == 10                                          # 9 sub-tiles + the copy
    for k in range(8):
        next_uploads = [i for i in sets if waits[k] < i < waits[k + 1]]
        kernels_k = [i for i, (op, _) in enumerate(log) if op.startswith("kernel") and waits[k] < i < waits[k + 1]]
        assert next_uploads and kernels_k and max(kernels_k) < min(next_uploads) and max(next_uploads) < syncs[k]
    assert log[-1] == ("sync", compute) and log[-2] == ("get", compute)


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
    std::vector<T> v(n); FILE* f = fopen(path, "rb"); if (!f || fread(v.data(), sizeof(T), n, f) != n) exit(3); fclose(f); return v;
}
template <class T> void save(const char* path, const std::vector<T>& v) {
    FILE* f = fopen(path, "wb"); fwrite(v.data(), sizeof(T), v.size(), f); fclose(f);
}
std::vector<unsigned> range(long long n, long long per_block) {
    std::vector<unsigned> blocks; for (long long b = 0; b * per_block < n; ++b) blocks.push_back((unsigned)b); return blocks;
}
// usage: emulate n_x n_y layers n_pairs vanilla              (n_y = 0: y images = x images, shared maps)
//        emulate n_x n_y layers n_pairs gap BLOCK...        (the CUDA blocks of the GAP grid to run; a -DLAP_COUNT
//                                                            build reads lap_table.bin and writes GAP_SLOTS sums)
//        emulate 0 0 layers n_pairs scatter rows cols row0 col0 mirror scale
// files: x.bin, y.bin (n, 32, 32, 3) float32, pair_x.bin, pair_y.bin int32, pair_self.bin uint8 -> out.bin
// (n_pairs, layers, 2) float64; scatter: sums.bin (n_pairs, layers, 2) float64 into result.bin (2, layers, rows,
// cols) float32, read and written back.
int main(int argc, char** argv) {
    const int n_x = atoi(argv[1]), n_y = atoi(argv[2]), layers = atoi(argv[3]), n_pairs = atoi(argv[4]);
    const char mode = argv[5][0];
    auto px = load<int>("pair_x.bin", n_pairs), py = load<int>("pair_y.bin", n_pairs);
    if (mode == 's') {
        const int rows = atoi(argv[6]), cols = atoi(argv[7]), row0 = atoi(argv[8]), col0 = atoi(argv[9]);
        const int mirror = atoi(argv[10]);
        const double scale = atof(argv[11]);
        auto sums = load<double>("sums.bin", (size_t)n_pairs * layers * GAP_SLOTS);
        auto result = load<float>("result.bin", (size_t)GAP_SLOTS * layers * rows * cols);
        launch(scatter_pairs, range((long long)n_pairs * GAP_SLOTS * layers, 256), 256, (const double*)sums.data(),
               (const int*)px.data(), (const int*)py.data(), n_pairs, layers, scale, row0, col0, rows, cols, mirror,
               result.data());
        save("result.bin", result);
        return 0;
    }
    auto self = load<unsigned char>("pair_self.bin", n_pairs);
    auto x = load<float>("x.bin", (size_t)n_x * IMAGE_FLOATS);
    auto y = n_y ? load<float>("y.bin", (size_t)n_y * IMAGE_FLOATS) : x;
    std::vector<float2> x_maps((size_t)n_x * layers * MAP_ENTRIES), y_maps((size_t)(n_y ? n_y : 1) * layers * MAP_ENTRIES);
    launch(diag_maps, range(n_x, 1), SIDE * SIDE, (const float*)x.data(), n_x, layers, x_maps.data());
    if (n_y) launch(diag_maps, range(n_y, 1), SIDE * SIDE, (const float*)y.data(), n_y, layers, y_maps.data());
    const float2* ym = n_y ? y_maps.data() : x_maps.data();
    std::vector<unsigned> blocks;
    if (mode == 'g') for (int k = 6; k < argc; ++k) blocks.push_back(atoi(argv[k]));
    else blocks = range(n_pairs, WARPS_PER_BLOCK);
    std::vector<double> out((size_t)n_pairs * layers * (mode == 'g' ? GAP_SLOTS : 2), 0.0);
    if (mode == 'g') {
#if LAP_COUNT > 0
        auto table = load<double>("lap_table.bin", (size_t)LAP_COUNT * LAP_TABLE);
#endif
        launch(cntk_gap_tile, blocks, WARPS_PER_BLOCK * 32, (const float*)x.data(), (const float*)y.data(),
               (const float2*)x_maps.data(), ym, (const int*)px.data(), (const int*)py.data(),
               (const unsigned char*)self.data(), n_pairs, layers,
#if LAP_COUNT > 0
               (const double*)table.data(),
#endif
               out.data());
    } else {
        launch(cntk_vanilla_tile, blocks, WARPS_PER_BLOCK * 32, (const float*)x.data(), (const float*)y.data(),
               (const float2*)x_maps.data(), ym, (const int*)px.data(), (const int*)py.data(),
               (const unsigned char*)self.data(), n_pairs, layers, out.data());
    }
    save("out.bin", out);
    return 0;
}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """cntk_tile.cu built for the host with HOST_SHIM; runs (images, pairs, self flags, mode, gap blocks) -> out."""
    return _build_emulator(tmp_path_factory.mktemp("cuda_emulation"))


LAP_SIZES = (0, 1, 5)


@pytest.fixture(scope="module")
def lap_emulator(tmp_path_factory):
    """The -DLAP_COUNT=3 build (module_options) for LAP_SIZES; its GAP mode returns (n_pairs, layers, 8) sums."""
    return _build_emulator(tmp_path_factory.mktemp("cuda_emulation_lap"), lap=LAP_SIZES)


def _build_emulator(work, lap=()):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not installed: host emulation of the CUDA kernels not possible here")
    (work / "emulate.cpp").write_text(HOST_SHIM)
    options = [o for o in gpu.compile_options(gpu.module_options(len(lap))) if o.startswith("-D")]
    subprocess.run([compiler, "-std=c++20", "-O1", *options, f"-I{REPO / 'workers'}", "-o", str(work / "emulate"),
                    str(work / "emulate.cpp"), "-lpthread"], check=True)
    if lap:
        gpu.lap_table(lap).tofile(work / "lap_table.bin")

    def run(images, pairs, same, *, layers, mode, blocks=(), y_images=None):
        """Tile kernel over `pairs` (a into images, b into y_images or images): (n_pairs, layers, slots) float64
        (slots 2, or 2 (1 + len(lap)) for the GAP kernel of a LAP build)."""
        images.astype(np.float32).tofile(work / "x.bin")
        if y_images is not None:
            y_images.astype(np.float32).tofile(work / "y.bin")
        _write_pairs(work, pairs)
        np.array(same, np.uint8).tofile(work / "pair_self.bin")
        n_y = 0 if y_images is None else len(y_images)
        subprocess.run([str(work / "emulate"), str(len(images)), str(n_y), str(layers), str(len(pairs)), mode,
                        *map(str, blocks)], cwd=work, check=True)
        return np.fromfile(work / "out.bin", np.float64).reshape(len(pairs), layers, -1)

    def scatter(sums, pairs, result, *, row0, col0, mirror, scale):
        """scatter_pairs of (n_pairs, layers, 2) sums into a copy of result (2, layers, rows, cols) float32."""
        count, layers, _ = sums.shape
        np.ascontiguousarray(sums, np.float64).tofile(work / "sums.bin")
        np.ascontiguousarray(result, np.float32).tofile(work / "result.bin")
        _write_pairs(work, pairs)
        rows, cols = result.shape[2:]
        subprocess.run([str(work / "emulate"), "0", "0", str(layers), str(count), "scatter", str(rows), str(cols),
                        str(row0), str(col0), str(int(mirror)), repr(float(scale))], cwd=work, check=True)
        return np.fromfile(work / "result.bin", np.float32).reshape(result.shape)
    run.scatter = scatter
    return run


def _write_pairs(work, pairs):
    np.array([p[0] for p in pairs], np.int32).tofile(work / "pair_x.bin")
    np.array([p[1] for p in pairs], np.int32).tofile(work / "pair_y.bin")


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


def test_emulated_scatter_places_pairs_into_the_tile_result(emulator, rng):
    """scatter_pairs on the host: kernel sums of a ragged off-diagonal sub-tile (offset rows and columns, own y images)
    and of a diagonal sub-tile (mirrored), in super-tile pair order, land on the float64 reference; nothing else is
    written."""
    x, y = _images(rng, 3), _images(rng, 2)
    y[1] = x[2]
    layers, want = 2, {}
    for a in range(3):
        for b in range(a, 3):
            want[a, "x", b] = cntk_pair(x[a], x[b], max_depth=layers + 1)
        want[a, "y", 0] = cntk_pair(x[a], y[0], max_depth=layers + 1)
        want[a, "y", 1] = want[a, "x", 2]                      # y[1] is x[2]

    ragged = list(zip(*(v.tolist() for v in gpu.pair_lists(3, 2, diagonal=False))))
    sums = emulator(x, ragged, [int(b == 1 and a == 2) for a, b in ragged], layers=layers, mode="vanilla", y_images=y)
    start = np.full((2, layers, 5, 7), -7.0, np.float32)                     # untouched entries keep -7
    got = emulator.scatter(sums, ragged, start, row0=2, col0=4, mirror=False, scale=1.0)
    untouched = np.ones((5, 7), bool)
    untouched[2:5, 4:6] = False
    assert np.all(got[:, :, untouched] == -7.0)
    for a, b in ragged:
        for k, kind in enumerate(("ntk", "nngp")):
            _assert_close(got[k, :, 2 + a, 4 + b], want[a, "y", b][f"{kind}-vanilla"], f"{kind} ragged {a},{b}")

    diagonal = list(zip(*(v.tolist() for v in gpu.pair_lists(3, 3, diagonal=True))))
    sums = emulator(x, diagonal, [int(a == b) for a, b in diagonal], layers=layers, mode="vanilla")
    got = emulator.scatter(sums, diagonal, np.zeros((2, layers, 4, 4), np.float32), row0=1, col0=1, mirror=True,
                           scale=0.5)
    assert np.all(got[:, :, 0, :] == 0) and np.all(got[:, :, :, 0] == 0)
    for a, b in diagonal:
        for k, kind in enumerate(("ntk", "nngp")):
            ref = 0.5 * want[a, "x", b][f"{kind}-vanilla"]
            _assert_close(got[k, :, 1 + a, 1 + b], ref, f"{kind} diagonal {a},{b}")
            _assert_close(got[k, :, 1 + b, 1 + a], ref, f"{kind} mirrored {b},{a}")


def test_emulated_lap_kernel_blocks_match_reference(emulator, lap_emulator, rng):
    """The LAP build's GAP kernel on the host (LAP_SIZES = 0, 1, 5), CUDA blocks whose displacement blocks have
    ci = 0 (no row cut), 15, 31 (cut after the first row) and cj = 0..7 (no column cut at cj = 0), 24..31 (cut at the
    last lane at cj = 31): its weighted sums vs float64 brute force with each entry's own displacement, for a pair
    and an image with itself; its plain GAP sums bit-identical to the plain build's."""
    x = _images(rng, 2)
    warps = dict(gpu.DEFAULT_OPTIONS)["WARPS_PER_BLOCK"]
    cuda_blocks = [0, 3, 60, 63, 124, 127]
    layers = 3
    displacement_blocks = [divmod(c * warps + w, 32) for c in cuda_blocks for w in range(warps)]
    for (a, b), same in (((0, 1), 0), ((1, 1), 1)):
        out = lap_emulator(x, [(a, b)], [same], layers=layers, mode="gap", blocks=cuda_blocks)[0]
        assert out.shape == (layers, 2 + 2 * len(LAP_SIZES))
        plain = emulator(x, [(a, b)], [same], layers=layers, mode="gap", blocks=cuda_blocks)[0]
        assert np.array_equal(out[:, :2], plain), "GAP sums of the LAP build differ from the plain build"
        want = block_sums(x[a], x[b], layers, displacement_blocks, LAP_SIZES, (32, 32, 3))
        for r, c in enumerate(LAP_SIZES):
            assert np.all(out[0, 2 + 2 * r] == 0.0)                        # NTK at depth 2: Theta0 = 0
            _assert_close(out[1:, 2 + 2 * r], want[1:, 2 + 2 * r], f"ntk-lap{c} block sums {a},{b}")
            _assert_close(out[:, 3 + 2 * r], want[:, 3 + 2 * r], f"nngp-lap{c} block sums {a},{b}")
        assert want[:, 3].min() > 0 and want[:, 5].min() > 0      # c = 0 and 1 are not vacuous on these blocks


def test_lap_block_oracle_over_all_blocks_is_cntk_reference(rng):
    """Ties the block oracle of the emulation test to the reference's LAP definition: block_sums over all 1024
    displacement blocks, scaled by 2^-20, equals cntk_reference(lap=LAP_SIZES) (float64 both). (Emulating all 128
    CUDA blocks of a pair takes ~80 s on two cores; the GPU tests compare whole pairs on the device.)"""
    x = _images(rng, 2)
    sums = block_sums(x[0], x[1], 2, [divmod(k, 32) for k in range(1024)], LAP_SIZES, (32, 32, 3)) / 2 ** 20
    want = cntk_reference(x[:1], x[1:], max_depth=3, archs=("gap",), lap=LAP_SIZES)
    keys = ["ntk-gap", "nngp-gap"] + [f"{kind}-lap{c}" for c in LAP_SIZES for kind in ("ntk", "nngp")]
    for s, key in enumerate(keys):
        np.testing.assert_allclose(sums[:, s], want[key][:, 0, 0], rtol=1e-12, atol=1e-300, err_msg=key)


def test_emulated_lap_scatter_places_every_slot(lap_emulator, rng):
    """The LAP build's scatter_pairs reads (count, layers, 8) sums into an (8, layers, rows, cols) result."""
    layers, pairs = 2, [(0, 1), (1, 0), (1, 1)]
    sums = rng.standard_normal((len(pairs), layers, 8))
    got = lap_emulator.scatter(sums, pairs, np.zeros((8, layers, 3, 3), np.float32), row0=1, col0=1, mirror=False,
                               scale=0.25)
    for p, (a, b) in enumerate(pairs):
        np.testing.assert_array_equal(got[:, :, 1 + a, 1 + b], (0.25 * sums[p].T).astype(np.float32))
    assert np.count_nonzero(got) == len(pairs) * 8 * layers


def _tagged(n, base):
    """Images tagged for the fake kernels: pixel [0, 0, 0] = base + index (what diag_maps stores), [0, 31, 0] =
    that + 0.5, so a mirrored image carries tag + 0.5."""
    x = np.zeros((n, 32, 32, 3), np.float32)
    x[:, 0, 0, 0] = base + np.arange(n)
    x[:, 0, 31, 0] = base + np.arange(n) + 0.5
    return x


def _fake_lap_gap(grid, block, args):
    """Fake GAP kernel of a LAP build: ntk = tag as the default fake, nngp = self flag, ntk of the r-th c =
    (r + 2) * tag, nngp of the r-th c = t_c(1) read from the lap_table argument."""
    x, y, x_maps, y_maps, pa, pb, same, count, layers, table, out = args
    assert grid[0] == int(count) * 128 and out.shape[2] == 2 + 2 * len(table)
    tags = (1000 * np.asarray(x_maps)[pa, 0, 0, 0, 0][:, None] + np.asarray(y_maps)[pb, 0, 0, 0, 0][:, None]
            + np.arange(int(layers)))
    out[..., 0] += tags
    out[..., 1] += np.asarray(same)[:, None]
    for r in range(len(table)):
        out[..., 2 + 2 * r] += (r + 2) * tags
        out[..., 3 + 2 * r] += np.asarray(table)[r, gpu.SIDE + 1]


def test_launcher_lap_and_flip_keys_and_assembly_with_fake_cupy(monkeypatch):
    """tile_kernels(lap=, flip=) through the launcher with fake kernels that tag pairs: the CPU backend's keys in
    its order and shapes; LAP slots land under their c with the right weight table; flip is the mean of the plain
    tile and a pass against the mirrored column images (diagonal tiles: a <= b computed, then mirrored, so the
    lower triangle holds K(x_b, flip x_a)), also when the tile is cut into sub-tiles; fc gets flip on the host."""
    fake = _fake_cupy(monkeypatch, {"cntk_gap_tile": _fake_lap_gap})
    _force_chunk(monkeypatch, 2, 5, 5, 2)
    x, y = _tagged(5, 0), _tagged(3, 100)
    lap = (4, 0)
    h = np.arange(2)[:, None, None]
    scale = 2.0 ** -20
    t1 = {4: 1 - 1 / 9, 0: 0.0}
    plain_keys = ["ntk-gap", "nngp-gap", "ntk-fc", "nngp-fc", "ntk-lap4", "nngp-lap4", "ntk-lap0", "nngp-lap0"]
    for yy in (y, None):
        got = gpu.tile_kernels(x, yy, archs=("gap", "fc"), max_depth=3, lap=lap, flip=True)
        cols = x if yy is None else yy
        assert list(got) == plain_keys + [f"{k}-flip" for k in plain_keys]     # the CPU backend's keys and order
        for key, value in got.items():
            assert value.shape == (2, 5, len(cols)) and value.dtype == np.float32, key
        ia, ib = x[:, 0, 0, 0][:, None], cols[:, 0, 0, 0][None, :]
        if yy is None:   # computed for a <= b and mirrored
            plain = 1000 * np.minimum(ia, ib) + np.maximum(ia, ib) + h
            mirrored = plain + 0.5
        else:
            plain = 1000 * ia + ib + h
            mirrored = plain + 0.5
        np.testing.assert_allclose(got["ntk-gap"], plain * scale, rtol=1e-6)
        np.testing.assert_allclose(got["ntk-gap-flip"], (plain + mirrored) / 2 * scale, rtol=1e-6)
        for r, c in enumerate(lap):
            np.testing.assert_allclose(got[f"ntk-lap{c}"], (r + 2) * plain * scale, rtol=1e-6)
            np.testing.assert_allclose(got[f"ntk-lap{c}-flip"], (r + 2) * (plain + mirrored) / 2 * scale, rtol=1e-6)
            np.testing.assert_allclose(got[f"nngp-lap{c}"], np.full((2, 5, len(cols)), t1[c] * scale), rtol=1e-6)
        same = gpu.same_images(x, cols).astype(float)
        np.testing.assert_allclose(got["nngp-gap"][0], same * scale)
        np.testing.assert_allclose(got["nngp-gap-flip"][0], same / 2 * scale)   # no image equals a mirrored one
        from cntk_gram.workers.fc import fc_kernels
        from cntk_gram.workers.enhanced import flip_images
        fc_flip = fc_kernels(x, flip_images(cols), max_depth=3)["ntk-fc"]
        np.testing.assert_allclose(got["ntk-fc-flip"], (got["ntk-fc"].astype(np.float64) + fc_flip) / 2, rtol=1e-6)
        assert not np.allclose(got["ntk-fc-flip"], got["ntk-fc"])
    assert fake.errors == []


def test_launcher_flip_on_diagonal_tile_uploads_mirrored_columns(monkeypatch):
    """A diagonal tile's flip pass must upload the mirrored images as columns (the plain diagonal pass shares the
    row images): the fake vanilla kernel sees distinct y images with tags + 0.5, and the plain pass sees none."""
    seen = []

    def vanilla(grid, block, args):
        x, y, x_maps, y_maps, pa, pb, same, count, layers, out = args
        seen.append((x is y, np.asarray(y_maps)[:, 0, 0, 0, 0].tolist()))
        out[..., 0] = 1000 * np.asarray(x_maps)[pa, 0, 0, 0, 0][:, None] + np.asarray(y_maps)[pb, 0, 0, 0, 0][:, None]
        out[..., 1] = 0
    _fake_cupy(monkeypatch, {"cntk_vanilla_tile": vanilla})
    _force_chunk(monkeypatch, 3, 3, 3, 1)
    x = _tagged(3, 0)
    got = gpu.tile_kernels(x, archs=("vanilla",), max_depth=2, flip=True)
    assert seen == [(True, [0.0, 1.0, 2.0]), (False, [0.5, 1.5, 2.5])]
    a, b = np.arange(3)[:, None], np.arange(3)[None, :]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    np.testing.assert_allclose(got["ntk-vanilla-flip"][0], 1000 * lo + hi + 0.25)
    with pytest.raises(ValueError, match="at most 8 LAP sizes"):
        gpu.tile_kernels(x, archs=("gap",), max_depth=2, lap=range(9))
    with pytest.raises(ValueError, match="add 'gap' to archs"):
        gpu.tile_kernels(x, archs=("vanilla",), max_depth=2, lap=2)


# ---------------------------------------------------------------- GPU

_NO_GPU = gpu_unavailable_reason()   # None when CuPy imports and sees a CUDA device, else why the GPU tests skip
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
@pytest.mark.parametrize("n, m, max_depth, archs", [(3, 2, 4, ("gap", "vanilla")), (1, 2, 21, ("vanilla", "gap"))],
                         ids=["ragged", "depth-21"])
def test_gpu_tile_matches_reference(rng, n, m, max_depth, archs):
    """A ragged n x m tile at every depth 2..max_depth (depth-21: a few pairs), one column image equal to the last
    row image; keys in the order of `archs`."""
    x, y = _images(rng, n), _images(rng, m)
    y[1] = x[n - 1]
    got = gpu.tile_kernels(x, y, archs=archs, max_depth=max_depth)
    want = cntk_reference(x, y, max_depth=max_depth, archs=archs)
    assert list(got) == [f"{kind}-{arch}" for arch in archs for kind in ("ntk", "nngp")]
    for key in want:
        assert got[key].shape == (max_depth - 1, n, m)
        _assert_close(got[key], want[key], key)


@pytest.mark.gpu
@needs_gpu
def test_gpu_selected_depths_and_kinds_match_reference(rng):
    """Only the chosen planes come back (per-plane copies from the device result), in the caller's depth order."""
    x, y = _images(rng, 3), _images(rng, 2)
    want = cntk_reference(x, y, max_depth=6, archs=("vanilla", "gap"))
    for yy, ref in ((y, want), (None, cntk_reference(x, max_depth=6, archs=("vanilla", "gap")))):
        got = gpu.tile_kernels(x, yy, archs=("vanilla", "gap"), max_depth=6, depths=(6, 3), kinds=("ntk",))
        assert list(got) == ["ntk-vanilla", "ntk-gap"]
        for key in got:
            _assert_close(got[key], ref[key][[4, 1]], key)


@pytest.mark.gpu
@needs_gpu
def test_gpu_sub_batching_gives_the_same_tile(rng, monkeypatch):
    """Tiny memory budget and launch size force several sub-tiles and both output slots; results must not change."""
    x, y = _images(rng, 5), _images(rng, 4)
    whole = gpu.tile_kernels(x, y, archs=("vanilla", "gap"), max_depth=3)
    whole_diag = gpu.tile_kernels(x, archs=("vanilla", "gap"), max_depth=3)
    _force_chunk(monkeypatch, 2, 5, 5, 2)
    monkeypatch.setattr(gpu, "WORK_PER_LAUNCH", 3 * 2 ** 21)   # 3 GAP pairs per launch at 2 layers
    assert gpu.plan_tile(5, 4, layers=2, arch="gap", budget_bytes=int(0.8 * gpu.free_device_bytes(0))).chunk < 4
    cut = gpu.tile_kernels(x, y, archs=("vanilla", "gap"), max_depth=3)
    cut_diag = gpu.tile_kernels(x, archs=("vanilla", "gap"), max_depth=3)
    for key in whole:
        _assert_close(cut[key], whole[key], key)
        _assert_close(cut_diag[key], whole_diag[key], key + " diagonal")


@pytest.mark.gpu
@needs_gpu
def test_gpu_vanilla_super_tiles_sub_tiles_and_device_scatter(rng, monkeypatch):
    """The real vanilla path over several 32 x 32 super-tiles with ragged edges, cut into 35-image sub-tiles (uploads
    overlapping compute, one launch of 1000 pairs each, scatter on the device): equal to the CPU backend everywhere
    and to the float64 reference on corner and edge pairs; diagonal tiles symmetric."""
    from cntk_gram.workers.backends import get_backend
    x, y = _images(rng, 70), _images(rng, 45)
    y[44] = x[69]
    _force_chunk(monkeypatch, 35, 70, 70, 3)      # sub-tiles of 35: a full super-tile and a 3-image edge
    monkeypatch.setattr(gpu, "WORK_PER_LAUNCH", 1000 * 1024 * 3)
    for yy in (y, None):
        got = gpu.tile_kernels(x, yy, archs=("vanilla",), max_depth=4)
        cpu = get_backend("cpu").tile_kernels(x, yy, archs=("vanilla",), max_depth=4)
        m = 70 if yy is None else 45
        for key in cpu:
            _assert_close(got[key], cpu[key], f"{key} vs cpu backend, {'diagonal' if yy is None else 'ragged'}")
            if yy is None:
                assert np.array_equal(got[key], got[key].transpose(0, 2, 1))
        for a, b in ((0, 0), (31, 32), (69, m - 1), (40, 7), (69, 0)):
            ref = cntk_pair(x[a], (x if yy is None else yy)[b], max_depth=4)
            for key in ("ntk-vanilla", "nngp-vanilla"):
                _assert_close(got[key][:, a, b], ref[key], f"{key} pair {a},{b} vs float64 reference")


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


def _reference_pair(args):
    x, y, max_depth = args
    return cntk_pair(x, y, max_depth=max_depth)


@pytest.mark.gpu
@needs_gpu
def test_gpu_depth_21_many_pairs_both_archs(rng):
    """8 x 8 = 64 pairs (two of them an image with itself) at every depth 2..21, both archs, NTK and NNGP, vs the
    float64 reference (run in parallel on the host: ~3 s per pair)."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    x, y = _images(rng, 8), _images(rng, 8)
    y[3], y[5] = x[3], x[6]
    got = gpu.tile_kernels(x, y, archs=("vanilla", "gap"), max_depth=21)
    jobs = [(x[a], y[b], 21) for a in range(8) for b in range(8)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        refs = list(pool.map(_reference_pair, jobs))
    for key in got:
        want = np.stack([r[key] for r in refs], axis=1).reshape(20, 8, 8)
        _assert_close(got[key], want, f"{key} depth 2..21, 64 pairs")


@pytest.mark.gpu
@needs_gpu
def test_gpu_tile_through_local_cuda_cluster(rng):
    """One tile through a real dask_cuda.LocalCUDACluster worker with the GPUSetup plugin, vs the reference."""
    dask_cuda = pytest.importorskip("dask_cuda")
    from distributed import Client
    from cntk_gram.workers.gpu_plugin import GPUSetup
    x, y = _images(rng, 3), _images(rng, 2)
    with dask_cuda.LocalCUDACluster(n_workers=1, threads_per_worker=1, CUDA_VISIBLE_DEVICES="0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(GPUSetup())
        got = client.submit(gpu.tile_kernels, x, y, archs=("vanilla", "gap"), max_depth=4).result()
    want = cntk_reference(x, y, max_depth=4, archs=("vanilla", "gap"))
    for key in want:
        _assert_close(got[key], want[key], f"{key} via LocalCUDACluster")


@pytest.mark.gpu
@needs_gpu
def test_gpu_lap_and_flip_match_reference(rng):
    """LAP (c = 0, 1, 3, 8) and flip on the real GPU at depths 2..6, diagonal and ragged tiles (with duplicates and
    a mirrored duplicate) vs the float64 reference; the plain keys equal a run without lap and flip bit for bit."""
    x, y = _images(rng, 3), _images(rng, 2)
    x[2] = x[0]
    y[1] = x[1][:, ::-1]                 # a mirrored copy: rho = 1 on the flip pass
    lap = (0, 1, 3, 8)
    for yy in (None, y):
        got = gpu.tile_kernels(x, yy, archs=("gap", "vanilla"), max_depth=6, lap=lap, flip=True)
        want = cntk_reference(x, yy, max_depth=6, archs=("gap", "vanilla"), lap=lap, flip=True)
        assert list(got) == list(want)
        for key in want:
            _assert_close(got[key], want[key], key)
            if yy is None:
                assert np.array_equal(got[key], got[key].transpose(0, 2, 1)), f"{key} not symmetric"
        plain = gpu.tile_kernels(x, yy, archs=("gap", "vanilla"), max_depth=6)
        for key in plain:
            assert np.array_equal(got[key], plain[key]), key


@pytest.mark.gpu
@needs_gpu
def test_gpu_lap_and_flip_depth_21_match_reference(rng):
    """Depths 2..21 for LAP (c = 2, 4) and flip, a 1 x 2 tile (one column image the mirror of the row image)."""
    x, y = _images(rng, 1), _images(rng, 2)
    y[1] = x[0][:, ::-1]
    got = gpu.tile_kernels(x, y, archs=("gap",), max_depth=21, lap=(2, 4), flip=True)
    want = cntk_reference(x, y, max_depth=21, archs=("gap",), lap=(2, 4), flip=True)
    for key in want:
        _assert_close(got[key], want[key], f"{key} depth 2..21")


@pytest.mark.gpu
@needs_gpu
def test_gpu_kernel_block_passes_lap_and_flip(rng):
    from cntk_gram.workers import kernel_block
    x = _images(rng, 2)
    got = kernel_block(x, archs=("gap",), max_depth=3, backend="gpu", lap=(1,), flip=True)
    want = cntk_reference(x, max_depth=3, archs=("gap",), lap=(1,), flip=True)
    for key in want:
        _assert_close(got[key], want[key], key)
