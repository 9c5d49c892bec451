"""Any image size and channel count (issue [H]): the CPU backend (vanilla, GAP, LAP, flip, fc), the float64 reference,
preprocessing and ZCA at 28x28x1, 8x8x1, 32x32x3 and a non-square 16x24x2; the GPU kernel compiled for the image's
shape, checked without a GPU through the host emulation of cntk_tile.cu (tests/test_gpu.py's shim) and the launcher
with a fake CuPy; the limits (LAP c against the image size, the GPU kernel's largest side) as one ValueError each."""
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gap_blocks import block_sums
from cntk_gram.workers import gpu, kernel_block
from cntk_gram.workers.cpu import tile_kernels
from cntk_gram.workers.enhanced import flip_images, max_lap
from cntk_gram.workers.preprocess import channel_stats, preprocess, zca_apply, zca_fit
from cntk_gram.workers.reference import _layer_covariances, cntk_pair, cntk_reference, fc_reference, tr_d

SHAPES = [(28, 28, 1), (8, 8, 1), (32, 32, 3), (16, 24, 2)]
TOL = {np.float64: 1e-9, np.float32: 1e-5}


def assert_rel(actual, expected, tol, what=""):
    """Relative error per depth, normalised by the block's largest magnitude (GAP/LAP NTK at depth 2 is 0)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    for d in range(expected.shape[0]):
        scale = max(np.abs(expected[d]).max(), 1e-30)
        err = np.abs(np.asarray(actual[d], np.float64) - expected[d]).max()
        assert err <= tol * scale, f"{what} depth {d + 2}: rel err {err / scale:.2e} > {tol}"


def _images(rng, n, shape):
    """n float64 images of `shape`; image 1 has an all-zero patch (zero variances there: the rho = 0 branch), as
    MNIST-like images have."""
    x = rng.standard_normal((n, *shape))
    if n > 1:
        p, q, _ = shape
        x[1, : p // 2, : q // 3] = 0.0
    return x


# ---------------------------------------------------------------- CPU backend and reference

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_backend_matches_reference(rng, shape):
    """3 x 2 pairs at depths 2..4: vanilla, GAP, two LAP sizes, fc, and the flip average of each, float32 and float64,
    against the float64 brute-force oracle (fc: Gaussian expectations by quadrature)."""
    x, y = _images(rng, 3, shape), _images(rng, 2, shape)
    lap = (0, min(shape[:2]) // 4)
    ref = cntk_reference(x, y, max_depth=4, lap=lap, flip=True)
    fc = fc_reference(x, y, max_depth=4)
    fc_mirror = fc_reference(x, flip_images(y), max_depth=4)
    ref.update(fc)
    ref.update({f"{key}-flip": (fc[key] + fc_mirror[key]) / 2 for key in fc})
    for dtype in (np.float32, np.float64):
        fast = tile_kernels(x.astype(dtype), y.astype(dtype), archs=("vanilla", "gap", "fc"), max_depth=4,
                            dtype=dtype, lap=lap, flip=True)
        assert sorted(fast) == sorted(ref)
        for key, expected in ref.items():
            assert fast[key].dtype == dtype and fast[key].shape == (3, 3, 2), key
            assert_rel(fast[key], expected, TOL[dtype], f"{key} {shape} {np.dtype(dtype).name}")


@pytest.mark.parametrize("shape", [(28, 28, 1), (16, 24, 2)], ids=lambda s: "x".join(map(str, s)))
def test_cpu_diagonal_tile_with_duplicates(rng, shape):
    """A diagonal tile (pairs a <= b, mirrored) holding an image twice and an image with its mirror (rho = 1 exactly
    at zero displacement, on the plain and the flip pass): symmetric and equal to the oracle."""
    x = _images(rng, 3, shape)
    x[2] = x[0][:, ::-1]                   # K(x0, flip x2) meets itself
    x = np.concatenate([x, x[1:2]])        # x3 = x1
    ref = cntk_reference(x, max_depth=3, lap=(1,), flip=True)
    fast = tile_kernels(x.astype(np.float32), max_depth=3, lap=(1,), flip=True)
    for key, expected in ref.items():
        assert_rel(fast[key], expected, TOL[np.float32], key)
        np.testing.assert_array_equal(fast[key], fast[key].transpose(0, 2, 1))


@pytest.mark.parametrize("shape", [(28, 28, 1), (16, 24, 2), (5, 3, 2)], ids=lambda s: "x".join(map(str, s)))
def test_reference_reads_out_its_own_final_layer_tensors(rng, shape):
    """The oracle at any P x Q x C against the paper's readouts written out with explicit loops over positions, from
    Theta^(L) built here by the recursion's definition (tr_D of the reference, checked in test_reference.py)."""
    x, y = _images(rng, 2, shape)
    p, q, _ = shape
    got = cntk_pair(x, y, max_depth=3, lap=(1,))
    theta_v = theta_g = None
    for h, k, kdot, sigma in _layer_covariances(x, y, 2):
        if h == 1:
            theta_v, theta_g = sigma, np.zeros_like(sigma)
        final_v, final_g = kdot * theta_v + k, kdot * theta_g
        trace = sum(final_v[i, j, i, j] for i in range(p) for j in range(q))
        lap1 = sum(final_g[i, j, i2, j2] * max(0, 1 - abs(i2 - i) / 3) * max(0, 1 - abs(j2 - j) / 3)
                   for i in range(p) for j in range(q) for i2 in range(p) for j2 in range(q)) / (p * q) ** 2
        np.testing.assert_allclose(got["ntk-vanilla"][h - 1], trace, rtol=1e-12)
        np.testing.assert_allclose(got["ntk-gap"][h - 1], final_g.sum() / (p * q) ** 2, rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(got["ntk-lap1"][h - 1], lap1, rtol=1e-12, atol=1e-300)
        theta_v, theta_g = tr_d(final_v), tr_d(kdot * theta_g + k)


# ---------------------------------------------------------------- limits: LAP c against the image, GPU sides

@pytest.mark.parametrize("shape", [(8, 8, 1), (16, 24, 2)], ids=lambda s: "x".join(map(str, s)))
def test_lap_size_up_to_the_larger_side(rng, shape):
    """c = max(P, Q) is allowed (and equals the oracle); c = max(P, Q) + 1 is one ValueError naming the limit, from
    every entry point that knows the images: the CPU backend, kernel_block and the GPU backend (checked before any
    CuPy import)."""
    p, q, _ = shape
    limit = max(p, q)
    assert max_lap(p, q) == limit
    x, y = _images(rng, 2, shape), _images(rng, 1, shape)
    ref = cntk_reference(x, y, max_depth=3, archs=("gap",), lap=(limit,))
    fast = tile_kernels(x, y, archs=("gap",), max_depth=3, dtype=np.float64, lap=(limit,))
    for key in ("ntk-lap", "nngp-lap"):
        assert_rel(fast[f"{key}{limit}"], ref[f"{key}{limit}"], TOL[np.float64], key)
    message = rf"lap sizes must be at most {limit} for {p}x{q} images .*got \[{limit + 1}\]"
    for call in (lambda: tile_kernels(x, archs=("gap",), max_depth=3, lap=(1, limit + 1)),
                 lambda: kernel_block(x, archs=("gap",), max_depth=3, backend="cpu", lap=(1, limit + 1)),
                 lambda: gpu.tile_kernels(x.astype(np.float32), archs=("gap",), max_depth=3, lap=(1, limit + 1))):
        with pytest.raises(ValueError, match=message):
            call()


def test_gpu_image_shape_limits():
    assert gpu.check_image_shape((28, 28, 1)) == (28, 28, 1)
    assert gpu.check_image_shape(np.array([32, 1, 32])) == (32, 1, 32)
    for shape in ((33, 32, 3), (32, 40, 3), (32, 32, 33), (0, 8, 1)):
        with pytest.raises(ValueError, match=r"height and width 1\.\.32 pixels and 1\.\.32 channels, got "
                                             + "x".join(map(str, shape))):
            gpu.check_image_shape(shape)
    for bad in ((32, 32), (32.0, 32, 3), (True, 4, 1)):
        with pytest.raises(ValueError, match=r"\(height, width, channels\) integers"):
            gpu.check_image_shape(bad)


def test_gpu_rejects_a_large_image_before_any_tile_runs(rng):
    """40x40 images: one ValueError naming the 32-pixel limit, before CuPy is imported (none is installed here, or the
    launch would start); fc alone runs on the host for any size."""
    x = rng.standard_normal((2, 40, 40, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"1\.\.32 pixels .* got 40x40x3"):
        gpu.tile_kernels(x, archs=("gap",), max_depth=3)
    got = gpu.tile_kernels(x, archs=("fc",), max_depth=3)
    np.testing.assert_allclose(got["ntk-fc"], tile_kernels(x, archs=("fc",), max_depth=3)["ntk-fc"], rtol=1e-6)


def test_check_image_shape_imports_no_cupy():
    """The pipeline calls it when it plans a run, on machines without CuPy."""
    code = ("import sys; from cntk_gram.workers.gpu import check_image_shape; check_image_shape((28, 28, 1)); "
            "assert not any(m == 'cupy' or m.startswith('cupy.') for m in sys.modules), 'cupy imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# ---------------------------------------------------------------- preprocessing and ZCA

@pytest.mark.parametrize("shape", [(8, 8, 1), (16, 24, 2)], ids=lambda s: "x".join(map(str, s)))
def test_standardisation_any_shape(rng, shape):
    """Per-channel statistics (C,) of the training images; standardised training images have mean 0 and std 1 per
    channel; test images are shifted and scaled by the training statistics only."""
    c = shape[2]
    train = rng.integers(0, 256, size=(40, *shape), dtype=np.uint8)
    test = rng.integers(0, 128, size=(7, *shape), dtype=np.uint8)
    mean, std = channel_stats(train)
    assert mean.shape == std.shape == (c,)
    for k in range(c):
        np.testing.assert_allclose(mean[k], train[..., k].mean() / 255, rtol=1e-12)
        np.testing.assert_allclose(std[k], (train[..., k] / 255).std(), rtol=1e-12)
    x = preprocess(train, mean, std)
    assert x.shape == train.shape and x.dtype == np.float32
    np.testing.assert_allclose(x.reshape(-1, c).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x.reshape(-1, c).std(0), 1, rtol=1e-5)
    np.testing.assert_allclose(preprocess(test, mean, std), (test / 255 - mean) / std, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, n", [((8, 8, 1), 300), ((16, 24, 2), 200)], ids=["8x8x1-full-rank", "16x24x2-N<D"])
def test_zca_any_shape(rng, shape, n):
    """ZCA on D = P*Q*C features: every covariance eigenvalue lam becomes lam / (lam + eps mean lam) (eigenvalues
    from numpy, independent of zca_fit); W symmetric; applied to other images of the shape; the whitened images go
    through the kernels."""
    d = int(np.prod(shape))
    base = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d)
    train = (base * np.linspace(0.2, 3.0, d)).reshape(n, *shape)
    eps = 0.1
    lam = np.maximum(np.linalg.eigvalsh(np.cov(train.reshape(n, -1).T, bias=True)), 0.0)
    params = zca_fit(train, eps)
    assert params["shape"] == shape and params["mean"].shape == (d,) and params["matrix"].shape == (d, d)
    np.testing.assert_allclose(params["matrix"], params["matrix"].T, atol=0)
    white = zca_apply(train, params, dtype=np.float64)
    assert white.shape == train.shape
    got = np.linalg.eigvalsh(np.cov(white.reshape(n, -1).T, bias=True))
    np.testing.assert_allclose(got, np.sort(lam / (lam + eps * lam.mean())), atol=1e-6, rtol=0)
    test = zca_apply(rng.standard_normal((3, *shape)), params)
    assert test.shape == (3, *shape) and test.dtype == np.float32
    k = tile_kernels(test, archs=("vanilla", "gap"), max_depth=3)
    assert all(np.isfinite(v).all() for v in k.values())
    p, q, c = shape
    other = (q, p, c) if p != q else (p + 1, q, c)     # 24x16x2: as many features as 16x24x2, still refused
    with pytest.raises(ValueError, match="fitted on"):
        zca_apply(rng.standard_normal((2, *other)), params)


# ---------------------------------------------------------------- GPU kernel on the host (no GPU needed)

EMULATOR_MAIN = r"""
template <class T> std::vector<T> load(const char* path, size_t n) {
    std::vector<T> v(n);
    FILE* f = fopen(path, "rb");
    if (!f || fread(v.data(), sizeof(T), n, f) != n) exit(3);
    fclose(f);
    return v;
}
template <class T> void save(const char* path, const std::vector<T>& v) {
    FILE* f = fopen(path, "wb"); fwrite(v.data(), sizeof(T), v.size(), f); fclose(f);
}
// usage: emulate MODE layers n_images n_pairs [BLOCK...]   MODE vanilla | gap (BLOCK...: the CUDA blocks of the GAP
// grid to run, default all n_pairs * GAP_CHUNKS). Files: x.bin (n_images, P, Q, C) float32, both sides of every pair
// index into it; pair_x.bin, pair_y.bin int32, pair_self.bin uint8; lap_table.bin (LAP builds) -> maps.bin (diag_maps
// output) and out.bin (n_pairs, layers, slots) float64.
int main(int argc, char** argv) {
    const bool gap = argv[1][0] == 'g';
    const int layers = atoi(argv[2]), n_images = atoi(argv[3]), n_pairs = atoi(argv[4]);
    auto px = load<int>("pair_x.bin", n_pairs), py = load<int>("pair_y.bin", n_pairs);
    auto self = load<unsigned char>("pair_self.bin", n_pairs);
    auto x = load<float>("x.bin", (size_t)n_images * IMAGE_FLOATS);
    std::vector<float2> maps((size_t)n_images * layers * MAP_ENTRIES);
    std::vector<unsigned> images;
    for (int k = 0; k < n_images; ++k) images.push_back(k);
    launch(diag_maps, images, PIXELS, (const float*)x.data(), n_images, layers, maps.data());
    save("maps.bin", maps);
    std::vector<unsigned> blocks;
    for (int k = 5; k < argc; ++k) blocks.push_back(atoi(argv[k]));
    const long long grid = gap ? (long long)n_pairs * GAP_CHUNKS : (n_pairs + WARPS_PER_BLOCK - 1) / WARPS_PER_BLOCK;
    if (blocks.empty()) for (long long b = 0; b < grid; ++b) blocks.push_back((unsigned)b);
    std::vector<double> out((size_t)n_pairs * layers * (gap ? GAP_SLOTS : 2), 0.0);
    if (gap) {
#if LAP_COUNT > 0
        auto table = load<double>("lap_table.bin", (size_t)LAP_COUNT * LAP_TABLE);
#endif
        launch(cntk_gap_tile, blocks, WARPS_PER_BLOCK * 32, (const float*)x.data(), (const float*)x.data(),
               (const float2*)maps.data(), (const float2*)maps.data(), (const int*)px.data(), (const int*)py.data(),
               (const unsigned char*)self.data(), n_pairs, layers,
#if LAP_COUNT > 0
               (const double*)table.data(),
#endif
               out.data());
    } else {
        launch(cntk_vanilla_tile, blocks, WARPS_PER_BLOCK * 32, (const float*)x.data(), (const float*)x.data(),
               (const float2*)maps.data(), (const float2*)maps.data(), (const int*)px.data(), (const int*)py.data(),
               (const unsigned char*)self.data(), n_pairs, layers, out.data());
    }
    save("out.bin", out);
    return 0;
}
"""


def _host_shim_preamble() -> str:
    """The CUDA host emulation of tests/test_gpu.py (std::thread per CUDA thread, barriers for shuffles) up to and
    including its #include of cntk_tile.cu; our own main follows (any image shape, maps written out)."""
    from test_gpu import HOST_SHIM
    marker = '#include "cntk_tile.cu"'
    assert marker in HOST_SHIM, "tests/test_gpu.py's HOST_SHIM no longer includes cntk_tile.cu"
    return HOST_SHIM.split(marker)[0] + marker + "\n"


class Emulator:
    """cntk_tile.cu compiled for the host for one image shape (and LAP sizes), run on (images, pairs)."""

    def __init__(self, work, shape, lap=()):
        compiler = shutil.which("g++")
        if compiler is None:
            pytest.skip("g++ not installed: host emulation of the CUDA kernels not possible here")
        self.work, self.shape, self.lap = work, tuple(shape), tuple(lap)
        (work / "emulate.cpp").write_text(_host_shim_preamble() + EMULATOR_MAIN)
        self.options = gpu.compile_options(gpu.module_options(len(lap), shape))
        defines = [o for o in self.options if o.startswith("-D")]
        subprocess.run([compiler, "-std=c++20", "-O1", *defines, f"-I{gpu.KERNEL_SOURCE.parent}", "-o",
                        str(work / "emulate"), str(work / "emulate.cpp"), "-lpthread"], check=True)
        if lap:
            gpu.lap_table(lap).tofile(work / "lap_table.bin")

    def __call__(self, images, pairs, same, *, layers, mode, blocks=()):
        """(out (n_pairs, layers, slots) float64, maps (n, layers, 2P, Q, 2) float32)."""
        assert images.shape[1:] == self.shape
        np.ascontiguousarray(images, np.float32).tofile(self.work / "x.bin")
        np.array([a for a, _ in pairs], np.int32).tofile(self.work / "pair_x.bin")
        np.array([b for _, b in pairs], np.int32).tofile(self.work / "pair_y.bin")
        np.array(same, np.uint8).tofile(self.work / "pair_self.bin")
        subprocess.run([str(self.work / "emulate"), mode, str(layers), str(len(images)), str(len(pairs)),
                        *map(str, blocks)], cwd=self.work, check=True)
        p, q, _ = self.shape
        out = np.fromfile(self.work / "out.bin", np.float64).reshape(len(pairs), layers, -1)
        maps = np.fromfile(self.work / "maps.bin", np.float32).reshape(len(images), layers, 2 * p, q, 2)
        return out, maps


@pytest.fixture(scope="module")
def emulators(tmp_path_factory):
    """emulators(shape, lap=()) -> Emulator, built once per (shape, lap) for the module."""
    built = {}

    def get(shape, lap=()):
        if (shape, lap) not in built:
            built[shape, lap] = Emulator(tmp_path_factory.mktemp("cuda_emulation"), shape, lap)
        return built[shape, lap]
    return get


WARPS = dict(gpu.DEFAULT_OPTIONS)["WARPS_PER_BLOCK"]


def _displacement_blocks(cuda_blocks, shape):
    """(ci, cj) of the warps of the given CUDA blocks of a pair's GAP grid (BLOCKS_PER_WARP = 1), cut at P * Q."""
    p, q, _ = shape
    return [divmod(c * WARPS + w, q) for c in cuda_blocks for w in range(WARPS) if c * WARPS + w < p * q]


def _assert_close(got, want, what, rtol=1e-5):
    want = np.asarray(want, np.float64)
    err = np.abs(np.asarray(got, np.float64) - want)
    worst = np.max(err / np.maximum(np.abs(want), 1e-30))
    assert np.all(err <= rtol * np.abs(want) + 1e-30), f"{what}: worst rel {worst:.3g}"


def _check_maps(maps, x, layers):
    """diag_maps output against the CPU backend's float64 maps: r = 1/sqrt(d) (0 where d = 0), g = sqrt(d) /
    (3 sqrt(pi)), rows P..2P-1 repeating rows 0..P-1."""
    from cntk_gram.workers.cpu import diag_maps
    d = diag_maps(x, layers)
    p = x.shape[1]
    np.testing.assert_array_equal(maps[:, :, :p], maps[:, :, p:])
    with np.errstate(divide="ignore"):
        r = np.where(d > 0, 1 / np.sqrt(d), 0.0)
    np.testing.assert_allclose(maps[:, :, :p, :, 0], r, rtol=1e-6)
    np.testing.assert_allclose(maps[:, :, :p, :, 1], np.sqrt(d) / (3 * np.sqrt(np.pi)), rtol=1e-6)
    if min(x.shape[1:3]) >= 5:
        assert (r == 0).any()              # the zero patch of image 1 gives zero variances


@pytest.mark.parametrize("shape", [(8, 8, 1), (5, 7, 2), (3, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_emulated_kernels_whole_pairs_match_reference(emulators, rng, shape):
    """Small shapes, every CUDA block of a pair (5x7 = 35 displacement blocks: the last CUDA block has 3 of 8 warps;
    3x1: 31 of 32 lanes idle): GAP, LAP(0), LAP(2) and vanilla values of a pair and of a duplicate pair (rho = 1
    forced), scaled as the launcher scales them, vs cntk_reference; the plain build's GAP sums equal the LAP
    build's bit for bit; diag_maps vs the CPU backend's maps."""
    lap = (0, 2)
    x = _images(rng, 3, shape).astype(np.float32)
    x[2] = x[0]
    pairs, same, layers = [(0, 1), (2, 0)], [0, 1], 3
    p, q, _ = shape
    ref = cntk_reference(x[[0, 2]], x[[1, 0]], max_depth=layers + 1, lap=lap)
    out, maps = emulators(shape, lap)(x, pairs, same, layers=layers, mode="gap")
    plain, _ = emulators(shape)(x, pairs, same, layers=layers, mode="gap")
    vanilla, _ = emulators(shape)(x, pairs, same, layers=layers, mode="vanilla")
    _check_maps(maps, x, layers)
    np.testing.assert_array_equal(out[:, :, :2], plain)
    keys = ["ntk-gap", "nngp-gap"] + [f"{kind}-lap{c}" for c in lap for kind in ("ntk", "nngp")]
    for k, (a, b) in enumerate(pairs):
        for s, key in enumerate(keys):
            want = ref[key][:, k, k]
            assert np.all(out[k, 0, ::2] == 0.0)                  # NTK at depth 2 of GAP and LAP: Theta0 = 0
            _assert_close(out[k, :, s] / (p * q) ** 2, want, f"{key} {a},{b}")
        for s, kind in enumerate(("ntk", "nngp")):
            _assert_close(vanilla[k, :, s], ref[f"{kind}-vanilla"][:, k, k], f"{kind}-vanilla {a},{b}")


@pytest.mark.parametrize("shape, cuda_blocks", [
    ((28, 28, 1), [0, 3, 48, 97]),         # (ci, cj): (0, 0..7), (0, 24..27) + (1, 0..3), (13, 20..27), (27, 20..27)
    ((16, 24, 2), [0, 2, 3, 47]),          # (0, 0..7), (0, 16..23), (1, 0..7), (15, 16..23)
], ids=["28x28x1", "16x24x2"])
def test_emulated_gap_and_lap_blocks_match_reference(emulators, rng, shape, cuda_blocks):
    """The GAP kernel compiled for the shape on CUDA blocks with and without row and column cut lines (ci = 0, inner,
    P - 1; cj up to Q - 1, the last lane holding a column), for a pair and an image with itself: sums of
    Kdot*Theta and K, and of LAP(0), LAP(3) weighted sums, vs float64 brute force; plain build equal to the LAP build
    bit for bit. Vanilla on every pair. (A whole 28x28 pair is 98 CUDA blocks, ~30 s in this emulation.)"""
    lap = (0, 3)
    x = _images(rng, 2, shape).astype(np.float32)
    layers = 3
    blocks = _displacement_blocks(cuda_blocks, shape)
    lap_emulator, plain_emulator = emulators(shape, lap), emulators(shape)
    for (a, b), same in (((0, 1), 0), ((1, 1), 1)):
        out, maps = lap_emulator(x, [(a, b)], [same], layers=layers, mode="gap", blocks=cuda_blocks)
        plain, _ = plain_emulator(x, [(a, b)], [same], layers=layers, mode="gap", blocks=cuda_blocks)
        np.testing.assert_array_equal(out[0, :, :2], plain[0])
        want = block_sums(x[a], x[b], layers, blocks, lap, shape)
        assert np.all(out[0, 0, ::2] == 0.0)
        for s in range(want.shape[1]):
            rows = slice(1, None) if s % 2 == 0 else slice(None)
            _assert_close(out[0, rows, s], want[rows, s], f"slot {s} pair {a},{b}")
        assert want[:, 3].min() > 0        # LAP(0) is not vacuous on these blocks
    _check_maps(maps, x, layers)
    pairs = [(0, 1), (1, 1), (1, 0), (0, 0)]
    vanilla, _ = plain_emulator(x, pairs, [0, 1, 0, 1], layers=layers, mode="vanilla")
    ref = cntk_reference(x, max_depth=layers + 1, archs=("vanilla",))
    for k, (a, b) in enumerate(pairs):
        for s, kind in enumerate(("ntk", "nngp")):
            _assert_close(vanilla[k, :, s], ref[f"{kind}-vanilla"][:, a, b], f"{kind}-vanilla {a},{b}")


def test_emulated_block_oracle_over_all_blocks_is_cntk_reference(rng):
    """Ties block_sums to the reference at a non-square shape: over all P * Q displacement blocks, divided by
    (PQ)^2, it is cntk_reference's GAP and LAP (so the subset test above checks parts of the true kernel)."""
    shape, lap = (6, 9, 2), (0, 3)
    x = _images(rng, 2, shape)
    sums = block_sums(x[0], x[1], 2, [divmod(k, 9) for k in range(54)], lap, shape) / 54 ** 2
    want = cntk_reference(x[:1], x[1:], max_depth=3, archs=("gap",), lap=lap)
    keys = ["ntk-gap", "nngp-gap"] + [f"{kind}-lap{c}" for c in lap for kind in ("ntk", "nngp")]
    for s, key in enumerate(keys):
        np.testing.assert_allclose(sums[:, s], want[key][:, 0, 0], rtol=1e-12, atol=1e-300, err_msg=key)


# ---------------------------------------------------------------- the launcher for a 28x28x1 run (fake CuPy)

def test_launcher_builds_and_launches_for_the_image_shape(monkeypatch, rng):
    """gpu.tile_kernels on 28x28x1 images with CuPy replaced by tests/test_gpu.py's host fakes (kernels that tag
    pairs): the module is compiled with -DIMAGE_ROWS=28 -DIMAGE_COLS=28 -DCHANNELS=1 (the LAP build too), diag_maps
    runs 784 threads per image into (n, layers, 56, 28) float2 maps, the GAP grid has ceil(784 / 8) = 98 CUDA blocks
    per pair and its sums are scaled by 1 / 784^2; the tiles' values land on the right pairs."""
    from test_gpu import _fake_cupy
    seen = {"options": [], "maps": [], "gap_grid": set()}

    def diag_maps(grid, block, args):
        images, n, layers, maps = args
        seen["maps"].append((grid, block, maps.shape))
        maps[...] = np.asarray(images)[:, 0, 0, 0, None, None, None, None]

    def gap(grid, block, args):
        x, y, x_maps, y_maps, pa, pb, same, count, layers, *table, out = args
        seen["gap_grid"].add(grid[0] / int(count))
        tags = 1000 * np.asarray(x_maps)[pa, 0, 0, 0, 0][:, None] + np.asarray(y_maps)[pb, 0, 0, 0, 0][:, None]
        out[..., 0] += tags + np.arange(int(layers))
        out[..., 1] += np.asarray(same)[:, None]
        for r in range(len(table)):
            out[..., 2 + 2 * r] += (r + 2) * tags

    def vanilla(grid, block, args):
        x, y, x_maps, y_maps, pa, pb, same, count, layers, out = args
        assert grid[0] == -(-int(count) // WARPS)
        out[..., 0] = 1000 * np.asarray(x_maps)[pa, 0, 0, 0, 0][:, None] + np.asarray(y_maps)[pb, 0, 0, 0, 0][:, None]
        out[..., 1] = np.asarray(same)[:, None]

    fake = _fake_cupy(monkeypatch, {"diag_maps": diag_maps, "cntk_gap_tile": gap, "cntk_vanilla_tile": vanilla})
    module = gpu.load_module(0, ())
    monkeypatch.setattr(gpu, "load_module", lambda device_id, options: seen["options"].append(options) or module)
    monkeypatch.setattr(gpu, "free_device_bytes", lambda device_id: 1 << 30)
    x = np.zeros((3, 28, 28, 1), np.float32)
    y = np.zeros((2, 28, 28, 1), np.float32)
    x[:, 0, 0, 0], y[:, 0, 0, 0] = np.arange(3), 100 + np.arange(2)
    got = gpu.tile_kernels(x, y, archs=("gap", "vanilla"), max_depth=3, lap=(2,))
    tags = 1000 * np.arange(3)[:, None] + 100 + np.arange(2)[None, :]
    np.testing.assert_allclose(got["ntk-gap"], (tags + np.arange(2)[:, None, None]) / 784 ** 2, rtol=1e-6)
    np.testing.assert_allclose(got["ntk-lap2"], np.broadcast_to(2 * tags / 784 ** 2, (2, 3, 2)), rtol=1e-6)
    np.testing.assert_allclose(got["ntk-vanilla"], np.broadcast_to(tags, (2, 3, 2)), rtol=1e-6)
    assert seen["gap_grid"] == {98}
    assert {(grid, block) for grid, block, _ in seen["maps"]} == {((3,), (784,)), ((2,), (784,))}
    assert {shape for _, _, shape in seen["maps"]} == {(3, 2, 56, 28, 2), (2, 2, 56, 28, 2)}
    for options in seen["options"]:
        assert {"-DIMAGE_ROWS=28", "-DIMAGE_COLS=28", "-DCHANNELS=1"} <= set(options)
    assert sum("-DLAP_COUNT=1" in options for options in seen["options"]) == 1
    assert fake.errors == []


def test_plan_tile_and_module_options_follow_the_shape():
    """Device memory per image and work per pair follow (P, Q, C); the default shape keeps the plain build's options."""
    assert gpu.module_options(0, (32, 32, 3)) == gpu.DEFAULT_OPTIONS
    options = dict(gpu.module_options(2, (16, 24, 2)))
    assert (options["IMAGE_ROWS"], options["IMAGE_COLS"], options["CHANNELS"], options["LAP_COUNT"]) == (16, 24, 2, 2)
    assert gpu.entries_per_pair("gap", (28, 28, 1)) == 784 ** 2 and gpu.entries_per_pair("vanilla", (16, 24, 2)) == 384
    budget = 1 << 30
    big = gpu.plan_tile(64, 64, layers=5, arch="gap", budget_bytes=budget)
    small = gpu.plan_tile(64, 64, layers=5, arch="gap", budget_bytes=budget, shape=(8, 8, 1))
    assert small.pairs_per_launch > big.pairs_per_launch       # 256x less work per pair
    assert small.device_bytes < big.device_bytes
    with pytest.raises(ValueError, match="1..32 pixels"):
        gpu.plan_tile(4, 4, layers=5, arch="gap", budget_bytes=budget, shape=(33, 33, 3))


def test_cuda_source_compiles_for_other_shapes(tmp_path):
    """nvcc builds cntk_tile.cu for 28x28x1 and 16x24x2 (plain and LAP builds) for sm_90; a side over 32 stops the
    build with the kernel's own #error naming the limit."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA compile check not possible here")
    for shape, lap in (((28, 28, 1), 0), ((16, 24, 2), 3), ((5, 7, 2), 1)):
        options = gpu.compile_options(gpu.module_options(lap, shape))
        run = subprocess.run(["nvcc", *options, "-arch=sm_90", "--cubin", "-o", str(tmp_path / "t.cubin"),
                              str(gpu.KERNEL_SOURCE)], capture_output=True, text=True)
        assert run.returncode == 0, (shape, lap, run.stderr)
    options = [o for o in gpu.compile_options() if not o.startswith("-DIMAGE_ROWS")] + ["-DIMAGE_ROWS=33"]
    run = subprocess.run(["nvcc", *options, "-arch=sm_90", "--cubin", "-o", str(tmp_path / "t.cubin"),
                          str(gpu.KERNEL_SOURCE)], capture_output=True, text=True)
    assert run.returncode != 0 and "IMAGE_ROWS and IMAGE_COLS must be 1..32" in run.stderr
