"""The fast FC kernel (numba pass over a BLAS product) against the float64 recursion written from the formulas."""
import ast
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import cntk_gram
from cntk_gram.workers import _fc_kernels, _lock, cpu, fc
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


# threads: the product's block count, any number whatever numba's thread count, with sizes below and above it.
# tol: F u, the rounding bound of a dot product of F = 48 terms relative to |x||y| (u: the unit roundoff)
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype, tol", [(np.float32, 3e-6), (np.float64, 1e-14)])
def test_blocked_product_matches_float64(rng, threads, dtype, tol):
    for n, m in [(1, 1), (4, 7), (13, 13), (40, 9)]:
        fx = rng.standard_normal((n, 48)).astype(dtype)
        fy = rng.standard_normal((m, 48)).astype(dtype)
        for sym, right in [(False, fy), (True, fx)]:
            gram = np.full((n, len(right)), np.nan, dtype)
            _fc_kernels.product(fx, right, sym, threads, gram)
            a, b = fx.astype(np.float64), right.astype(np.float64)
            scale = np.sqrt(np.outer((a ** 2).sum(1), (b ** 2).sum(1)))
            assert np.max(np.abs(gram - a @ b.T) / scale) <= tol, (n, m, sym)
            if sym:
                np.testing.assert_array_equal(gram, gram.T)


def test_blas_is_single_threaded_during_the_product_and_restored_after(rng, monkeypatch):
    """The product runs on numba's threads, one BLAS call per block: the BLAS's own pool must not run (or spin) then."""
    x = rng.standard_normal((6, 4, 4, 3)).astype(np.float32)
    blas_threads = lambda: [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    fc_kernels(x, max_depth=3)                       # loads scipy's BLAS, the one numba calls
    before, seen = blas_threads(), []
    original = _fc_kernels.product
    monkeypatch.setattr(_fc_kernels, "product", lambda *args: (seen.append(blas_threads()), original(*args)))
    fc_kernels(x, x[:3], max_depth=3)
    assert seen and all(n == 1 for n in seen[0])
    assert blas_threads() == before


def test_numba_lock_has_its_own_module():
    """cpu and fc share one lock from workers/_lock.py, which imports nothing of the package; fc does not import cpu."""
    assert cpu.NUMBA_LOCK is fc.NUMBA_LOCK is _lock.NUMBA_LOCK

    def imported(module):
        """(level, name) of every module it imports: `from .cpu import x` and `from . import cpu` give (1, "cpu")."""
        found = set()
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Import):
                found |= {(0, alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                found |= {(node.level, node.module)} if node.module else {(node.level, a.name) for a in node.names}
        return found

    assert imported(_lock) == {(0, "threading")}
    assert (1, "cpu") not in imported(fc) and (1, "fc") in imported(cpu)


def test_kernel_block_gives_the_worker_path_values(rng):
    """The public API, the tile task's backend call and fc_kernels agree bit for bit, and with the float64 recursion."""
    x, y = _spread_pairs(rng, n=12, shape=(8, 8, 3))
    ref = fc_closed_form(x, y, max_depth=6)
    for right in (y, None):
        api = cntk_gram.kernel_block(x, right, archs=("fc",), max_depth=6, backend="cpu")
        tile = cpu.tile_kernels(x, right, archs=("fc",), max_depth=6)
        direct = fc_kernels(x, right, max_depth=6)
        assert set(api) == set(tile) == set(direct) == {"ntk-fc", "nngp-fc"}
        for key in api:
            np.testing.assert_array_equal(api[key], tile[key])
            np.testing.assert_array_equal(api[key], direct[key])
    assert fc_scaled_error(cntk_gram.kernel_block(x, y, archs=("fc",), max_depth=6, backend="cpu"), ref, range(2, 7),
                           x, y) <= 1e-5
    exact = cntk_gram.kernel_block(x, y, archs=("fc",), max_depth=6, backend="cpu", dtype=np.float64)
    assert fc_scaled_error(exact, ref, range(2, 7), x, y) <= 1e-7     # arccos near rho = 1: see above


# A fresh process, none of the thread or spin settings in its environment, the libraries imported in a user's orders.
_FRESH = """
import json, os, sys
{prelude}
import numpy as np
from threadpoolctl import threadpool_info
import cntk_gram
from cntk_gram.workers import _fc_kernels

blas = lambda: sorted((p["filepath"], p["num_threads"]) for p in threadpool_info() if p["user_api"] == "blas")
seen, product = [], _fc_kernels.product
_fc_kernels.product = lambda *args: (seen.append(blas()), product(*args))[1]
x = np.random.default_rng(0).standard_normal((9, 4, 4, 3)).astype(np.float32)
first = cntk_gram.kernel_block(x, archs=("fc",), max_depth=3, backend="cpu")
before = blas()
again = cntk_gram.kernel_block(x, x[:4], archs=("fc",), max_depth=3, backend="cpu")
print(json.dumps({{"during": seen, "before": before, "after": blas(), "env": sorted(set(os.environ).intersection({spin})),
                  "same": bool(np.allclose(first["ntk-fc"][:, :, :4], again["ntk-fc"], rtol=1e-5, atol=1e-3))}}))
"""


@pytest.mark.parametrize("prelude", [
    "",                                                                 # cntk_gram first
    "import numpy as np; np.ones((256, 256)) @ np.ones((256, 256))",   # numpy's BLAS already run
    "import scipy.linalg, numba, threadpoolctl",                        # scipy's BLAS and numba loaded first
])
def test_kernel_block_needs_no_setting_before_import(prelude):
    """The speed fix needs no environment variable and no import order: in a fresh process, every BLAS the process
    has loaded runs one thread while the product runs on numba's threads, and gets its own thread count back after."""
    spin = {"OPENBLAS_THREAD_TIMEOUT", "GOTO_THREAD_TIMEOUT", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY"}
    env = {k: v for k, v in os.environ.items() if k not in spin}
    script = _FRESH.format(prelude=prelude, spin=sorted(spin))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["env"] == [] and seen["same"]
    assert len(seen["during"]) == 2 and seen["before"], seen      # one product per call; a BLAS was found
    last = seen["during"][-1]
    assert [path for path, _ in last] == [path for path, _ in seen["before"]], seen   # every BLAS loaded was held...
    assert all(threads == 1 for _, threads in last), seen                           # ...to one thread
    assert seen["after"] == seen["before"], seen
