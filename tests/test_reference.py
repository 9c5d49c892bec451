"""The oracle itself: tr_D, the arc-cosine closed form and the diagonal shortcut, each against a direct evaluation."""
import numpy as np
import pytest

from cntk_gram.workers.cpu import diag_maps
from cntk_gram.workers.reference import _relu_moments, relu_expectations, tr_d


def test_tr_d_matches_definition_loops(rng):
    t = rng.normal(size=(4, 5, 4, 5))
    expected = np.zeros_like(t)
    for i, j, k, l in np.ndindex(t.shape):
        for a in (-1, 0, 1):
            for b in (-1, 0, 1):
                if 0 <= i + a < 4 and 0 <= k + a < 4 and 0 <= j + b < 5 and 0 <= l + b < 5:
                    expected[i, j, k, l] += t[i + a, j + b, k + a, l + b]
    np.testing.assert_allclose(tr_d(t), expected, rtol=1e-14)


@pytest.mark.parametrize("rho", [-0.99, -0.4, 0.0, 0.3, 0.9, 0.999])
def test_arccos_closed_form_matches_quadrature(rho):
    s, s_prime = 2.0, 0.7
    c = rho * np.sqrt(s * s_prime)
    k, kdot = relu_expectations(np.full((1, 1, 1, 1), c), np.full((1, 1), s), np.full((1, 1), s_prime))
    relu, step = _relu_moments(s, s_prime, c)
    np.testing.assert_allclose(k.item(), 2 / 9 * relu, rtol=1e-9)
    np.testing.assert_allclose(kdot.item(), 2 / 9 * step, rtol=1e-9)


@pytest.mark.parametrize("shape", [(6, 7, 3), (5, 4, 1), (3, 9, 2)])
def test_diagonal_shortcut_matches_full_recursion(rng, shape):
    """d^(h) = box3x3(d^(h-1) / 9) equals the diagonal of the brute-force Sigma^(h)(x, x), for any P x Q x C."""
    x = rng.normal(size=(1, *shape))
    maps = diag_maps(x, 4)
    sigma = tr_d(np.einsum("ijc,klc->ijkl", x[0], x[0]))
    for h in range(4):
        d = np.einsum("ijij->ij", sigma)
        np.testing.assert_allclose(maps[0, h], d, rtol=1e-13)
        k, _ = relu_expectations(sigma, d, d)
        sigma = tr_d(k)
