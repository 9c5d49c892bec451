"""Numba code behind `cntk_gram.workers.fc`: the tile's product x.y on numba's threads, then every ReLU layer of the
fully-connected NTK/NNGP in one pass.

The kernel of a pair depends only on the norms |x|, |y| and the cosine rho = x.y / (|x||y|): with c_sigma = 2 every
layer keeps the variances, so one layer maps (rho, t) to

    theta = arccos(rho),  rho' = (sin theta + (pi - theta) rho) / pi,  t' = t (pi - theta) / pi + rho'

(NNGP^(h) = |x||y| rho_h, NTK^(h) = |x||y| t_h, t_0 = rho_0). Each row keeps its rho and t in a scratch vector and
walks through all layers, writing the layers a run stores; every inner loop is a unit-stride vector loop over the
row's columns. arccos is a polynomial (vectorisable, no libm call) accurate to ~2e-15 absolute.
"""
import math
import os

import numba as nb
import numpy as np

# As in _cpu_kernels: no "contract"/"reassoc", so vector body and scalar remainder round identically and a pair's
# value does not depend on its column position (tiles of any split agree bit for bit, given the same x.y).
JIT = dict(fastmath={"nnan", "ninf", "nsz", "arcp"}, cache=os.environ.get("CNTK_NUMBA_CACHE", "1") != "0", nogil=True)

# arcsin(s) = s + s z R(z), z = s^2 in [0, 1/4]: R is a degree-10 least-squares Chebyshev fit of
# (arcsin(sqrt z) - sqrt z) / z^1.5 on [0, 1/4], converted to powers of z; |error of arcsin| <= 2e-15 there
# (tests/test_fc_kernel.py checks it against numpy on a dense grid).
_R = (0.16666666666667868, 0.07499999999371364, 0.04464285788722921, 0.030381905799303614, 0.022373248284674612,
      0.017334314039704805, 0.014162475253729202, 0.0101892321291089, 0.015727936654923374, -0.00725969808121037,
      0.028154669738427087)
_R0, _R1, _R2, _R3, _R4, _R5, _R6, _R7, _R8, _R9, _R10 = _R
_PI = math.pi
_INV_PI = 1.0 / math.pi


@nb.njit(inline="always", **JIT)
def acos_poly(r):
    """arccos(r), r in [-1, 1], branch-free: arcsin on |r| <= 1/2, else 2 arcsin(sqrt((1 - |r|) / 2))."""
    a = abs(r)
    small = a <= 0.5
    z = a * a if small else 0.5 * (1.0 - a)
    s = a if small else math.sqrt(z)
    poly = _R10
    poly = poly * z + _R9
    poly = poly * z + _R8
    poly = poly * z + _R7
    poly = poly * z + _R6
    poly = poly * z + _R5
    poly = poly * z + _R4
    poly = poly * z + _R3
    poly = poly * z + _R2
    poly = poly * z + _R1
    poly = poly * z + _R0
    asin = s + s * z * poly
    if small:
        return 0.5 * _PI - (asin if r >= 0.0 else -asin)
    return 2.0 * asin if r >= 0.0 else _PI - 2.0 * asin


# Only these pairs are worth a float64 product when the tile's product is float32: for |rho| <= REFINE, arccos
# amplifies the float32 rounding of rho (~1e-6 at worst over 3,072 features) by at most 1 / sin(theta) < 2.3.
REFINE = 0.9


@nb.njit(inline="always", **JIT)
def _identical(u, v):
    """u, v: (F,) rows; True when every entry is equal."""
    for f in range(len(u)):
        if u[f] != v[f]:
            return False
    return True


@nb.njit(fastmath=True, cache=JIT["cache"], nogil=True)
def _dot64(u, v):
    """sum(u * v) in float64; u, v: (F,) float32 or float64. Its order of summation depends only on F."""
    acc = 0.0
    for f in range(len(u)):
        acc += np.float64(u[f]) * np.float64(v[f])
    return acc


@nb.njit(parallel=True, **JIT)
def row_norms(f):
    """(N, F) rows -> float64 (N,) Euclidean norms, summed in float64 (_dot64)."""
    out = np.empty(len(f))
    for i in nb.prange(len(f)):
        out[i] = math.sqrt(_dot64(f[i], f[i]))
    return out


@nb.njit(parallel=True, **JIT)
def product(fx, fy, sym, threads, gram):
    """gram = fx fy' on numba's threads, one BLAS call (np.dot, scipy's BLAS) per block; the caller limits the BLAS to
    one thread. fx: (n, F), fy: (m, F), gram: (n, m), all float32 or all float64; threads: numba.get_num_threads()
    (passed in: called here it would keep numba from caching this function).

    sym (fy is fx): only the blocks on and above the diagonal of a B x B grid, B = 2 x threads, each written to both
    triangles (a diagonal block mirrors its upper triangle), so gram is exactly symmetric; T(2T+1) products of one
    size, an equal share per thread, (B+1)/2B of the full square's flops. Otherwise one block of rows per thread.
    """
    n, m = gram.shape
    if not sym:
        for k in nb.prange(threads):
            rows = slice(k * n // threads, (k + 1) * n // threads)
            np.dot(fx[rows], fy.T, gram[rows])
        return
    blocks = 2 * threads
    pairs = [(i, j) for i in range(blocks) for j in range(i, blocks)]
    for t in nb.prange(len(pairs)):
        i, j = pairs[t]
        r0, r1, c0, c1 = i * n // blocks, (i + 1) * n // blocks, j * n // blocks, (j + 1) * n // blocks
        part = np.dot(fx[r0:r1], fx[c0:c1].T)
        if i == j:
            part = np.triu(part) + np.triu(part, 1).T
        gram[r0:r1, c0:c1] = part
        gram[c0:c1, r0:r1] = part.T


@nb.njit(parallel=True, **JIT)
def fc_layers(gram, fx, fy, norm_x, norm_y, refine, slots, ntk, nngp):
    """All layers of one tile, in place.

    gram: (n, m) x.y, float32 or float64; fx: (n, F), fy: (m, F) the flattened images (the dtype of gram); norm_x:
    float64 (n,) |x|; norm_y: float64 (m,) |y|. refine: pairs with |rho| > refine get rho from a float64 product
    of their images (REFINE for a float32 gram, > 1 for none). slots: int64 (n_layers,), the output plane of layer
    h (index h-1) or -1 to skip it. ntk, nngp: (n_out, n, m) float32 or float64, filled.

    A pair of byte-identical images gets rho = 1 exactly (its rho from the product is only within rounding of 1,
    which arccos would amplify); they are found among the pairs whose rho is within 1e-9 of 1, by comparing the
    images. A zero-norm image gives rho = 0 and a zero kernel.
    """
    n, m = gram.shape
    n_layers = len(slots)
    inv_x_all = np.where(norm_x > 0.0, 1.0 / norm_x, 0.0)
    inv_y = np.where(norm_y > 0.0, 1.0 / norm_y, 0.0)
    for a in nb.prange(n):
        rho = np.empty(m)
        t = np.empty(m)
        scale = np.empty(m)
        nx, inv_x = norm_x[a], inv_x_all[a]
        outliers = 0
        for b in range(m):
            r = np.float64(gram[a, b]) * inv_x * inv_y[b]
            r = min(max(r, -1.0), 1.0)
            outliers += abs(r) > refine or r > 1.0 - 1e-9
            rho[b] = r
            scale[b] = nx * norm_y[b]
        if outliers:
            for b in range(m):
                if abs(rho[b]) > refine:
                    rho[b] = min(max(_dot64(fx[a], fy[b]) * inv_x * inv_y[b], -1.0), 1.0)
                if rho[b] > 1.0 - 1e-9 and _identical(fx[a], fy[b]):
                    rho[b] = 1.0
        for b in range(m):
            t[b] = rho[b]
        for h in range(n_layers):
            for b in range(m):
                r = rho[b]
                rest = _PI - acos_poly(r)                 # pi - theta
                sin = math.sqrt(max((1.0 - r) * (1.0 + r), 0.0))
                r = (sin + rest * r) * _INV_PI
                rho[b] = r
                t[b] = t[b] * (rest * _INV_PI) + r
            slot = slots[h]
            if slot >= 0:
                for b in range(m):
                    ntk[slot, a, b] = t[b] * scale[b]
                    nngp[slot, a, b] = rho[b] * scale[b]
