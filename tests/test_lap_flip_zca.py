"""LAP(c) readouts, flip-averaged kernels and ZCA whitening (docs/enhanced.md), against the float64 brute-force
oracle and against properties that do not use the code under test: LAP(0) is the position-diagonal readout of the
final-layer tensor, LAP(c) -> GAP like 1/c, K_flip is symmetric and mirror invariant, ZCA shrinks every covariance
eigenvalue lam to lam / (lam + eps * mean lam)."""
import numpy as np
import pytest

from cntk_gram.workers import kernel_block, zca_apply, zca_fit
from cntk_gram.workers.cpu import tile_kernels
from cntk_gram.workers.reference import cntk_reference, final_layers
from cntk_gram.workers.vocab import KernelKey

from _images import cifar_images

TOL = {np.float64: 1e-9, np.float32: 1e-5}
LAP = (0, 1, 3, 8)   # 8: the largest c the backends take for 8x8 and 8x5 images (the larger side)


def assert_rel(actual, expected, tol, what=""):
    """Relative error per depth, normalised by the block's largest magnitude (GAP/LAP NTK at depth 2 is 0)."""
    for d in range(expected.shape[0]):
        scale = max(np.abs(expected[d]).max(), 1e-30)
        err = np.abs(actual[d] - expected[d]).max()
        assert err <= tol * scale, f"{what} depth {d + 2}: rel err {err / scale:.2e} > {tol}"


def flip(x):
    return x[:, :, ::-1, :]


@pytest.mark.parametrize("shape", [(8, 8), (8, 5)])  # non-square: the row and column weights must not swap
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lap_and_flip_match_reference_small(rng, dtype, shape):
    x, y = rng.normal(size=(2, *shape, 3)), rng.normal(size=(17, *shape, 3))  # 17 columns: ragged 2nd lane batch
    ref = cntk_reference(x, y[:3], max_depth=5, lap=LAP, flip=True)
    fast = tile_kernels(x.astype(dtype), y.astype(dtype), archs=("vanilla", "gap"), max_depth=5, dtype=dtype,
                        lap=LAP, flip=True)
    assert sorted(fast) == sorted(ref)
    for key, expected in ref.items():
        assert fast[key].dtype == dtype and fast[key].shape == (4, 2, 17)
        assert_rel(fast[key][:, :, :3], expected, TOL[dtype], key)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_diagonal_tile_flip_and_lap(rng, dtype):
    """y = None: the flip part is computed on a <= b only and mirrored; the brute-force oracle computes every pair."""
    x = rng.normal(size=(4, 8, 8, 2))
    x[3] = flip(x[:1])[0]  # an image and its mirror: K(x0, flip x3) meets itself at zero displacement
    ref = cntk_reference(x, archs=("gap",), max_depth=5, lap=(0, 2), flip=True)
    fast = tile_kernels(x.astype(dtype), archs=("gap",), max_depth=5, dtype=dtype, lap=(0, 2), flip=True)
    for key, expected in ref.items():
        assert_rel(fast[key], expected, TOL[dtype], key)
        np.testing.assert_array_equal(fast[key], fast[key].transpose(0, 2, 1))


@pytest.mark.parametrize("depths, kinds", [((5, 2), ("ntk",)), ((3,), ("nngp",)), ((4, 3, 5), ("nngp", "ntk"))])
def test_selected_depths_and_kinds_match_reference(rng, depths, kinds):
    """depths / kinds (what compute_tile asks for): only those keys, stack index i holding depths[i], on a plain and
    a diagonal tile, against the brute-force oracle."""
    x, y = rng.normal(size=(3, 6, 6, 3)), rng.normal(size=(2, 6, 6, 3))
    for yy in (y, None):
        ref = cntk_reference(x, yy, max_depth=5, lap=(1,), flip=True)
        got = tile_kernels(x, yy, max_depth=5, dtype=np.float64, lap=(1,), flip=True, depths=depths, kinds=kinds)
        assert sorted(got) == sorted(key for key in ref if KernelKey.parse(key).kind in kinds)
        for key, stack in got.items():
            assert stack.shape == (len(depths), 3, 3 if yy is None else 2)
            assert_rel(stack, ref[key][[d - 2 for d in depths]], TOL[np.float64], key)


@pytest.mark.parametrize("kwargs, match", [
    (dict(depths=(6,)), r"depths must be distinct integers in 2\.\.5"),
    (dict(depths=(3, 3)), "distinct"),
    (dict(depths=()), "distinct"),
    (dict(depths=(2.5,)), "integers"),
    (dict(kinds=("ntk", "cntk")), "kinds must be distinct names from ntk, nngp"),
    (dict(kinds=()), "kinds"),
])
def test_bad_depth_and_kind_selection(rng, kwargs, match):
    x = rng.normal(size=(1, 4, 4, 3))
    with pytest.raises(ValueError, match=match):
        tile_kernels(x, max_depth=5, **kwargs)
    with pytest.raises(ValueError, match=match):
        kernel_block(x, max_depth=5, backend="cpu", **kwargs)


def test_flip_part_of_diagonal_tile_is_symmetric_without_mirroring(rng):
    """K(x_a, flip x_b) = K(x_b, flip x_a), checked on a full square computed pair by pair (no symmetry used), and
    the mirrored diagonal tile's upper triangle equals the directly computed one bit for bit."""
    x = rng.normal(size=(5, 8, 8, 3)).astype(np.float32)
    direct = tile_kernels(x, flip(x), archs=("gap",), max_depth=5, lap=(2,))  # plain kernel against mirrored columns
    for key, block in direct.items():
        scale = np.abs(block).max()
        assert np.abs(block - block.transpose(0, 2, 1)).max() <= 1e-6 * scale, key
    diag = tile_kernels(x, archs=("gap",), max_depth=5, lap=(2,), flip=True)
    plain = tile_kernels(x, x, archs=("gap",), max_depth=5, lap=(2,))
    upper = np.triu(np.ones((5, 5), bool))
    for key in direct:
        expected = ((plain[key].astype(np.float64) + direct[key]) / 2).astype(np.float32)
        np.testing.assert_array_equal(diag[f"{key}-flip"][:, upper], expected[:, upper])


def test_real_cifar_32x32_against_reference(cifar_root):
    imgs = cifar_images(cifar_root, 3)
    x, y = imgs[:1], imgs[[0, 2]]  # includes the self pair (rho = 1 exactly at zero displacement)
    ref = cntk_reference(x, y, archs=("gap",), max_depth=4, lap=(1, 4), flip=True)
    fast = tile_kernels(x, y, archs=("gap",), max_depth=4, lap=(1, 4), flip=True)
    for key, expected in ref.items():
        assert_rel(fast[key], expected, 1e-5, key)


def test_lap0_is_the_position_diagonal_readout(rng):
    """LAP(0) keeps p' = p only: the trace of the final-layer GAP tensor over (PQ)^2, read off the oracle's tensor."""
    x, y = rng.normal(size=(2, 8, 7, 3)), rng.normal(size=(3, 8, 7, 3))
    fast = tile_kernels(x, y, archs=("gap",), max_depth=5, dtype=np.float64, lap=(0,))
    for a in range(2):
        for b in range(3):
            for depth, _, theta_gap, k in final_layers(x[a], y[b], 5):
                n2 = (8 * 7) ** 2
                for key, tensor in (("ntk-lap0", theta_gap), ("nngp-lap0", k)):
                    expected = sum(tensor[i, j, i, j] for i in range(8) for j in range(7)) / n2
                    np.testing.assert_allclose(fast[key][depth - 2, a, b], expected, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("size, depth", [(8, 5), (32, 3)])
def test_lap_approaches_gap_like_one_over_c(rng, request, size, depth):
    """A property of the LAP definition, on the float64 oracle (the backends take c up to the larger image side only).
    8 x 8 random images, and two real 32 x 32 CIFAR-10 images (the real-data fixture only for those: the ratio
    tolerances at 32 x 32 are those of natural images' displacement profile)."""
    if size == 8:
        x = rng.normal(size=(2, size, size, 3))
    else:
        x = cifar_images(request.getfixturevalue("cifar_root"), 2).astype(np.float64)
    cs = (16, 64, 256, 10 ** 6)
    k = cntk_reference(x[:1], x[1:], archs=("gap",), max_depth=depth, lap=cs)
    for kind in ("ntk", "nngp"):
        gap = k[f"{kind}-gap"][-1, 0, 0]
        err = {c: gap - k[f"{kind}-lap{c}"][-1, 0, 0] for c in cs}
        assert all(e > 0 for e in err.values()), err  # Theta, K >= 0 entry-wise and w_c < 1 off p' = p
        # err(c) = A / (2c + 1) - B / (2c + 1)^2 while 2c + 1 exceeds every |delta|: ratios tend to (2c2+1)/(2c1+1)
        assert err[16] / err[64] == pytest.approx(129 / 33, rel=0.2 if size == 32 else 0.05)
        assert err[64] / err[256] == pytest.approx(513 / 129, rel=0.05 if size == 32 else 0.01)
        # 1 - w_c(delta) <= (|d_row| + |d_col|) / (2c + 1): at 32x32 the mean |d_row| + |d_col| is ~21, so LAP(10^6)
        # sits ~1e-5 below GAP by definition; 8x8 images are well inside 1e-5.
        bound = 1e-5 if size == 8 else 2 * (size - 1) / (2 * 10 ** 6 + 1)
        assert abs(err[10 ** 6]) <= bound * abs(gap)


def test_flip_kernel_is_symmetric_and_mirror_invariant(rng):
    x, y = rng.normal(size=(2, 8, 8, 3)), rng.normal(size=(3, 8, 8, 3))
    kw = dict(archs=("vanilla", "gap", "fc"), max_depth=5, dtype=np.float64, lap=(1, 3), flip=True)
    xy = tile_kernels(x, y, **kw)
    yx = tile_kernels(y, x, **kw)
    mirrored = tile_kernels(flip(x), flip(y), **kw)
    flipped = [key for key in xy if key.endswith("-flip")]
    assert len(flipped) == 10
    for key in flipped:
        np.testing.assert_allclose(xy[key], yx[key].transpose(0, 2, 1), rtol=1e-12, atol=0, err_msg=key)
        np.testing.assert_allclose(mirrored[key], xy[key], rtol=1e-12, atol=0, err_msg=key)
    # the flip average is not the plain kernel: mirroring one image changes it
    assert np.abs(xy["ntk-gap-flip"][-1] - xy["ntk-gap"][-1]).max() > 1e-6 * np.abs(xy["ntk-gap"][-1]).max()


def test_plain_keys_unchanged_bit_for_bit(rng):
    x, y = rng.normal(size=(3, 6, 6, 3)).astype(np.float32), rng.normal(size=(5, 6, 6, 3)).astype(np.float32)
    for yy in (y, None):
        plain = tile_kernels(x, yy, archs=("vanilla", "gap"), max_depth=5)
        more = tile_kernels(x, yy, archs=("vanilla", "gap"), max_depth=5, lap=(0, 2), flip=True)
        assert list(more)[:4] == list(plain)
        for key, block in plain.items():
            np.testing.assert_array_equal(more[key], block)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lap=(-1,)), "integers >= 0"),
    (dict(lap=(2.5,)), "integers >= 0"),
    (dict(lap=(True,)), "integers >= 0"),
    (dict(lap=("4",)), "integers >= 0"),
    (dict(lap=-3), "integers >= 0"),
    (dict(lap=(2,), archs=("vanilla",)), "add 'gap' to archs"),
    (dict(lap=(2,), archs=("fc",)), "add 'gap' to archs"),
    (dict(lap=(4, 5)), r"lap sizes must be at most 4 for 4x4 images .*got \[5\]"),
    (dict(flip="yes"), "flip must be True or False"),
])
def test_bad_lap_and_flip_inputs(rng, kwargs, match):
    x = rng.normal(size=(1, 4, 4, 3))
    kwargs = {"archs": ("gap",), **kwargs}
    with pytest.raises(ValueError, match=match):
        tile_kernels(x, max_depth=3, **kwargs)
    with pytest.raises(ValueError, match=match):
        kernel_block(x, max_depth=3, backend="cpu", **kwargs)


def _images_with_structure(rng, n):
    base = rng.normal(size=(n, 4, 4, 3)) @ rng.normal(size=(3, 3))
    return base * np.linspace(0.1, 3.0, 16).reshape(1, 4, 4, 1)


@pytest.mark.parametrize("n", [300, 20])  # D = 48 features: full rank and rank deficient (N < D)
@pytest.mark.parametrize("eps", [0.1, 1e-3])
def test_zca_whitened_covariance_eigenvalues(rng, n, eps):
    train = _images_with_structure(rng, n)
    flat = train.reshape(n, -1)
    lam = np.linalg.eigvalsh(np.cov(flat.T, bias=True))  # independent of zca_fit
    lam = np.maximum(lam, 0.0)
    expected = np.sort(lam / (lam + eps * lam.mean()))
    params = zca_fit(train, eps)
    white = zca_apply(train, params, dtype=np.float64).reshape(n, -1)
    got = np.linalg.eigvalsh(np.cov(white.T, bias=True))
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(params["matrix"], params["matrix"].T, atol=0)  # ZCA, not PCA: W symmetric
    assert params["epsilon"] == eps and params["mean"].shape == (48,)


def test_zca_fitted_on_train_only_and_applied_to_test(rng):
    train, test = _images_with_structure(rng, 200), _images_with_structure(rng, 30) + 5.0
    params = zca_fit(train, 0.1)
    out = zca_apply(test, params)
    assert out.shape == test.shape and out.dtype == np.float32
    # the test set's own mean is not removed: it shows up whitened, so a pure train-statistics transform
    assert np.abs(out.reshape(30, -1).mean(0)).max() > 0.5


@pytest.mark.parametrize("eps", [0, -0.1, float("nan"), float("inf"), "0.1", True, None])
def test_zca_bad_epsilon(rng, eps):
    with pytest.raises(ValueError, match="zca_epsilon must be a finite number > 0"):
        zca_fit(_images_with_structure(rng, 10), eps)


def test_zca_shape_mismatch(rng):
    params = zca_fit(_images_with_structure(rng, 10), 0.1)
    with pytest.raises(ValueError, match="fitted on"):
        zca_apply(rng.normal(size=(2, 4, 5, 3)), params)
