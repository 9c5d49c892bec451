"""Fully-connected ReLU NTK and NNGP (paper Eq. 7-9) on flattened images, closed form.

One tile is one matrix product x.y and one fused numba pass over the pairs that walks every layer in float64
(workers/_fc_kernels.py), both on numba's threads: the product as one single-threaded BLAS call per block of the tile.
Two thread pools taking turns would slow each other down: OpenBLAS's threads spin ~0.1 s after every product by
default (only an environment variable read when numpy loads changes that), holding the cores the numba pass needs,
and numba's OpenMP threads spin after a pass, holding them from the next product. With one pool for both, no core
waits on another pool's idle threads, whatever the environment, so the library runs at the workers' speed.

Precision: with dtype float32 the product is float32 (2.4x the BLAS rate of float64 here) and rounds rho = x.y/|x||y|
by up to ~1e-6 over 3,072 features; arccos amplifies that only where |rho| is near 1, so the pairs with |rho| > 0.9
(rare: near-duplicate images) get a float64 product. Every value then stays within ~2e-6 of the float64 recursion,
relative to sqrt(K(x,x) K(y,y)). dtype float64: float64 product, ~1e-15.
"""
import functools

import numba
import numpy as np

from . import _fc_kernels as _k
from ._lock import NUMBA_LOCK
from .validate import check_depth, check_pair, check_selection


def fc_kernels(x, y=None, *, max_depth: int = 21, dtype=np.float32, depths=None) -> dict:
    """x: (n, P, Q, C), y: (m, P, Q, C) or None (= x). Returns {"ntk-fc", "nngp-fc"}: (len(depths), n, m) in `dtype`,
    index i holding depths[i]; depths None = every depth 2..max_depth, depth d at index d-2 (computed in float64).

    Sigma^(0) = x.x', Sigma^(h) = 2 E[relu(u) relu(v)], Theta^(h) = Theta^(h-1) Sigma-dot^(h) + Sigma^(h); depth d is
    the net with d-1 hidden layers. ReLU with c_sigma = 2 keeps the variances: Sigma^(h)(x, x) = |x|^2.
    While it runs, every BLAS of the process is limited to one thread (threadpoolctl); other threads' BLAS calls in
    that time run single-threaded.
    """
    x, y = check_pair(x, y)
    max_depth = check_depth(max_depth)
    depths, _ = check_selection(depths, None, max_depth)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    fx = np.ascontiguousarray(np.asarray(x, dtype).reshape(len(x), -1))
    fy = fx if y is None else np.ascontiguousarray(np.asarray(y, dtype).reshape(len(y), -1))
    slots = np.full(max_depth - 1, -1, np.int64)
    slots[[d - 2 for d in depths]] = np.arange(len(depths))
    gram = np.empty((len(fx), len(fy)), dtype)
    ntk = np.empty((len(depths), len(fx), len(fy)), dtype)
    nngp = np.empty_like(ntk)
    refine = _k.REFINE if dtype == np.float32 else 2.0
    with NUMBA_LOCK, _blas_threads().limit(limits=1, user_api="blas"):
        norm_x = _k.row_norms(fx)
        norm_y = norm_x if y is None else _k.row_norms(fy)
        _k.product(fx, fy, y is None, numba.get_num_threads(), gram)   # y None: half of it, mirrored
        _k.fc_layers(gram, fx, fy, norm_x, norm_y, refine, slots, ntk, nngp)
    return {"ntk-fc": ntk, "nngp-fc": nngp}


@functools.cache
def _blas_threads():
    """The process's BLAS libraries (threadpoolctl), scipy's among them: numba's np.dot calls scipy's BLAS, which is
    loaded here first so that the controller finds it."""
    import scipy.linalg.cython_blas  # noqa: F401
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()
