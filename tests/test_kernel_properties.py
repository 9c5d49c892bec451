"""Invariants of the exact kernels (hypothesis): symmetry, positive semi-definiteness, positive homogeneity."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cntk_gram.workers.cpu import tile_kernels
from cntk_gram.workers.vocab import ARCHS

SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def images(seed, n, size=5, channels=3):
    return np.random.default_rng(seed).normal(size=(n, size, size, channels))


@SETTINGS
@given(seed=st.integers(0, 2 ** 31))
def test_symmetry_every_depth(seed):
    x, y = images(seed, 2), images(seed + 1, 3)
    xy = tile_kernels(x, y, archs=ARCHS, max_depth=8, dtype=np.float64)
    yx = tile_kernels(y, x, archs=ARCHS, max_depth=8, dtype=np.float64)
    for key in xy:  # GAP sums its slices in mirrored order when x and y swap: equal up to float64 rounding
        np.testing.assert_allclose(xy[key], yx[key].transpose(0, 2, 1), rtol=1e-13, atol=0, err_msg=key)


@SETTINGS
@given(seed=st.integers(0, 2 ** 31))
def test_gram_of_20_images_is_psd(seed):
    x = images(seed, 20, size=4)
    gram = tile_kernels(x.astype(np.float32), archs=ARCHS, max_depth=6)
    for key, g in gram.items():
        for d, block in enumerate(g.astype(np.float64)):
            eig = np.linalg.eigvalsh(block)
            # float32 entries: eigenvalues may dip below 0 by rounding only (~1e-6 of the largest)
            assert eig.min() >= -1e-5 * max(eig.max(), 1e-30), f"{key} depth {d + 2}: min eig {eig.min()}"


@SETTINGS
@given(seed=st.integers(0, 2 ** 31), a=st.floats(0.01, 100.0), b=st.floats(0.01, 100.0))
def test_positive_homogeneity(seed, a, b):
    x, y = images(seed, 2), images(seed + 7, 2)
    base = tile_kernels(x, y, archs=ARCHS, max_depth=6, dtype=np.float64)
    scaled = tile_kernels(a * x, b * y, archs=ARCHS, max_depth=6, dtype=np.float64)
    for key in base:
        np.testing.assert_allclose(scaled[key], a * b * base[key], rtol=1e-9, atol=1e-12 * a * b, err_msg=key)
