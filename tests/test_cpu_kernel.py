"""The fast CPU path against the float64 oracle (cntk_gram.workers.reference): random and real images, both architectures,
NTK and NNGP, every depth 2..8 and one case at 21; float64 path <= 1e-9 relative, float32 path <= 1e-5."""
import numpy as np
import pytest

from cntk_gram.workers.cpu import tile_kernels
from cntk_gram.workers.fc import fc_kernels
from cntk_gram.workers.reference import cntk_reference, fc_reference

from _images import cifar_images

TOL = {np.float64: 1e-9, np.float32: 1e-5}


def assert_rel(actual, expected, tol, what=""):
    """Relative error per depth, normalised by the block's largest magnitude (GAP NTK at depth 2 is exactly 0)."""
    for d in range(expected.shape[0]):
        scale = np.abs(expected[d]).max()
        err = np.abs(actual[d] - expected[d]).max()
        assert err <= tol * max(scale, 1e-30), f"{what} depth {d + 2}: rel err {err / max(scale, 1e-30):.2e} > {tol}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_random_images_all_depths(rng, dtype):
    x, y = rng.normal(size=(3, 7, 8, 3)), rng.normal(size=(18, 7, 8, 3))  # 18 columns: two lane batches, ragged
    ref = cntk_reference(x, y[:4], max_depth=8)
    fast = tile_kernels(x.astype(dtype), y.astype(dtype), max_depth=8, dtype=dtype)
    for key, expected in ref.items():
        assert fast[key].dtype == dtype
        assert_rel(fast[key][:, :, :4], expected, TOL[dtype], key)
    assert np.all(fast["ntk-gap"][0] == 0)  # depth 2 GAP: first and last layer fixed, nothing trained


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_diagonal_tile_is_symmetric_and_exact(rng, dtype):
    x = rng.normal(size=(4, 6, 6, 2))
    ref = cntk_reference(x, max_depth=8)
    fast = tile_kernels(x.astype(dtype), max_depth=8, dtype=dtype)
    for key, expected in ref.items():
        assert_rel(fast[key], expected, TOL[dtype], key)
        np.testing.assert_array_equal(fast[key], fast[key].transpose(0, 2, 1))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_real_cifar_images(cifar_root, dtype):
    imgs = cifar_images(cifar_root, 4)
    ref = cntk_reference(imgs[:2], imgs[1:4], max_depth=8)  # includes the self pair (1, 1)
    fast = tile_kernels(imgs[:2].astype(dtype), imgs[1:4].astype(dtype), max_depth=8, dtype=dtype)
    for key, expected in ref.items():
        assert_rel(fast[key], expected, TOL[dtype], key)


def test_real_cifar_depth_21(cifar_root):
    imgs = cifar_images(cifar_root, 2)
    ref = cntk_reference(imgs, max_depth=21)
    for dtype in (np.float64, np.float32):
        fast = tile_kernels(imgs.astype(dtype), max_depth=21, dtype=dtype)
        for key, expected in ref.items():
            assert_rel(fast[key], expected, TOL[dtype], f"{key} {dtype.__name__}")


def test_one_pass_equals_separate_shallow_runs(rng):
    x, y = rng.normal(size=(2, 6, 6, 3)), rng.normal(size=(3, 6, 6, 3))
    deep = tile_kernels(x, y, max_depth=9, dtype=np.float64)
    for depth in (2, 3, 5):
        shallow = cntk_reference(x, y, max_depth=depth)
        for key, expected in shallow.items():
            assert_rel(deep[key][:depth - 1], expected, 1e-9, key)


def test_fc_against_quadrature_reference(rng):
    x, y = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 4, 4, 3))
    ref = fc_reference(x, y, max_depth=6)
    fast = fc_kernels(x, y, max_depth=6, dtype=np.float64)
    for key in ("ntk-fc", "nngp-fc"):
        assert_rel(fast[key], ref[key], 1e-9, key)
    via_tile = tile_kernels(x, y, archs=("fc",), max_depth=6, dtype=np.float64)
    np.testing.assert_array_equal(via_tile["ntk-fc"], fast["ntk-fc"])


def test_sub_blocks_equal_whole_block(rng):
    x = rng.normal(size=(21, 6, 6, 3)).astype(np.float32)
    whole = tile_kernels(x, max_depth=5, archs=("vanilla", "gap"))
    parts = {k: np.empty_like(v) for k, v in whole.items()}
    cuts = [0, 5, 13, 21]
    for a0, a1 in zip(cuts, cuts[1:]):
        for b0, b1 in zip(cuts, cuts[1:]):
            block = tile_kernels(x[a0:a1], None if a0 == b0 else x[b0:b1], max_depth=5, archs=("vanilla", "gap"))
            for k in parts:
                parts[k][:, a0:a1, b0:b1] = block[k]
    for k in whole:
        np.testing.assert_array_equal(parts[k], whole[k])


def test_identical_images_in_different_blocks_are_exact(cifar_format_root):
    """A duplicate image outside a diagonal tile still gets rho = 1 exactly (content match, not position)."""
    imgs = cifar_images(cifar_format_root, 2)
    ref = cntk_reference(imgs[:1], imgs[:1], max_depth=11)
    fast = tile_kernels(imgs[:1], imgs[[1, 0]], max_depth=11)
    for key, expected in ref.items():
        assert_rel(fast[key][:, :, 1:], expected, 1e-5, key)
