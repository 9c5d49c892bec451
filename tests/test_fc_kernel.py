"""The fast FC kernel (numba pass over a BLAS product) against the float64 recursion written from the formulas."""
import numpy as np
import pytest

from cntk_gram.workers._fc_kernels import acos_poly
from cntk_gram.workers.fc import fc_kernels
from cntk_gram.workers.reference import fc_closed_form, fc_reference, fc_scaled_error


def _spread_pairs(rng, n=24, shape=(32, 32, 3)):
    """Rows x and columns y whose cosines cover [-1, 1]: rotations of x's images towards noise, negated and scaled
    copies, exact duplicates and a zero image."""
    x = rng.standard_normal((n,) + shape).astype(np.float32)
    noise = rng.standard_normal((n,) + shape).astype(np.float32)
    angles = np.concatenate([np.linspace(0, np.pi, n - 4), [1e-4, np.pi - 1e-4, 0.0, 0.0]])
    y = (np.cos(angles)[:, None, None, None] * x + np.sin(angles)[:, None, None, None] * noise).astype(np.float32)
    y[-2] = x[-2]                 # byte-identical pair
    y[-1] = 2 * x[-1]             # same direction, different image
    x[3] = 0.0                    # zero image: kernel 0 against everything
    return x, y


def test_arccos_polynomial_matches_numpy():
    from numba import njit
    grid = np.concatenate([np.linspace(-1, 1, 200001), 1 - np.logspace(-16, -1, 2000), -1 + np.logspace(-16, -1, 2000)])
    vec = njit(lambda r: np.array([acos_poly(v) for v in r]))
    assert np.max(np.abs(vec(grid) - np.arccos(grid))) <= 4e-15


# float64: arccos near rho = 1 turns one rounding of rho (1e-16) into ~1e-8 of theta, in any float64 code
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-7), (np.float32, 1e-5)])
def test_fc_matches_closed_form_across_cosines(rng, dtype, tol):
    x, y = _spread_pairs(rng)
    fast = fc_kernels(x, y, max_depth=21, dtype=dtype)
    ref = fc_closed_form(x, y, max_depth=21)
    assert fc_scaled_error(fast, ref, range(2, 22), x, y) <= tol
    assert np.all(fast["ntk-fc"][:, 3] == 0) and np.all(fast["nngp-fc"][:, 3] == 0)


def test_fc_closed_form_matches_the_quadrature_reference(rng):
    x, y = _spread_pairs(rng, n=6, shape=(4, 4, 2))
    assert fc_scaled_error(fc_closed_form(x, y, max_depth=5), fc_reference(x, y, max_depth=5), range(2, 6), x,
                           y) <= 1e-7


def test_identical_images_have_exact_diagonal(rng):
    x = rng.standard_normal((5, 32, 32, 3)).astype(np.float32)
    out = fc_kernels(x, max_depth=8, dtype=np.float64)
    sq = (x.reshape(5, -1).astype(np.float64) ** 2).sum(1)
    for i, depth in enumerate(range(2, 9)):
        np.testing.assert_allclose(np.diagonal(out["nngp-fc"][i]), sq, rtol=1e-14)
        np.testing.assert_allclose(np.diagonal(out["ntk-fc"][i]), depth * sq, rtol=1e-14)


def test_diagonal_tile_is_symmetric_and_matches_off_diagonal(rng):
    x = rng.standard_normal((37, 8, 8, 3)).astype(np.float32)
    sym = fc_kernels(x, max_depth=6)
    full = fc_kernels(x, x.copy(), max_depth=6)
    for key in sym:
        np.testing.assert_array_equal(sym[key], sym[key].transpose(0, 2, 1))
        np.testing.assert_allclose(sym[key], full[key], rtol=1e-6)


def test_depth_selection_keeps_the_order_given(rng):
    x, y = _spread_pairs(rng, n=10, shape=(6, 6, 3))
    every = fc_kernels(x, y, max_depth=9)
    some = fc_kernels(x, y, max_depth=9, depths=(7, 3))
    for key in every:
        np.testing.assert_array_equal(some[key], every[key][[5, 1]])
    with pytest.raises(ValueError, match="depths"):
        fc_kernels(x, y, max_depth=9, depths=(10,))
