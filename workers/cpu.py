"""Fast CPU tile kernel: numba; SIMD lanes across 16 column images, threads across row images.

Precision: float32 by default. The only ill-conditioned step is arccos near rho = 1, where float32 rounding of rho
(~6e-8) would move theta by ~3e-4; that happens only when an image meets itself at zero displacement, where rho is
exactly 1 by Cauchy-Schwarz, so those entries are set exactly (identical images are found by content). Everything else
stays within ~1e-7 relative of the float64 reference, and float32 doubles the SIMD width. `dtype=np.float64` runs the
same loops with libm arccos (slower; matches the reference to ~1e-15).
"""
import numpy as np

from . import _cpu_kernels as _k
from ._lock import NUMBA_LOCK
from .enhanced import flip_average, flip_images, lap_weights
from .fc import fc_kernels
from .validate import check_tile_call, same_images
from .vocab import LAP_ARCH, KernelKey, output_keys


def diag_maps(x: np.ndarray, n_layers: int) -> np.ndarray:
    """Per-image variance maps d^(h)[i,j] = Sigma^(h)(x,x)[i,j,i,j] for h = 0..n_layers-1.

    x: (n, P, Q, C). d^(0) = box3x3(sum_c x_c^2), d^(h) = box3x3(d^(h-1) / 9). Returns float64 (n, n_layers, P, Q).
    """
    x = np.asarray(x, np.float64)
    n, p, q, _ = x.shape
    out = np.empty((n, n_layers, p, q))
    d = (x ** 2).sum(-1)
    for h in range(n_layers):
        pad = np.pad(d, ((0, 0), (1, 1), (1, 1)))
        d = sum(pad[:, 1 + a:1 + a + p, 1 + b:1 + b + q] for a in (-1, 0, 1) for b in (-1, 0, 1))
        out[:, h] = d
        d = d / 9.0
    return out


def _prepare(x, n_layers, dtype):
    """Channel-first images and (1/sqrt d, sqrt d) maps, float (n, C, P, Q) and (n, L, P, Q); a zero variance gives
    rho = 0 and K = 0 there."""
    d = diag_maps(x, n_layers)
    with np.errstate(divide="ignore"):
        rs = np.where(d > 0, 1.0 / np.sqrt(d), 0.0)
    chw = np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2), dtype=dtype)
    return chw, rs.astype(dtype), np.sqrt(d).astype(dtype)


def _lanes_last(a, width):
    """(m, K, P, Q) -> (width // LANES, K, P, Q*LANES), lane index fastest; padded with copies of the last image
    (their results are dropped)."""
    lanes = _k.LANES
    if width > len(a):
        a = np.concatenate([a, np.repeat(a[-1:], width - len(a), axis=0)])
    m, k, p, q = a.shape
    return np.ascontiguousarray(a.reshape(m // lanes, lanes, k, p, q).transpose(0, 2, 3, 4, 1)).reshape(
        m // lanes, k, p, q * lanes)


def tile_kernels(x, y=None, *, archs=("vanilla", "gap"), max_depth: int = 21, dtype=np.float32, lap=(),
                 flip: bool = False, depths=None, kinds=None) -> dict:
    """CNTK (and NNGP) blocks for every depth 2..max_depth in one pass.

    x: (n, P, Q, C) preprocessed images, any height P, width Q and channel count C; y: (m, P, Q, C) or None (y is x:
    only pairs a <= b are computed and the block is mirrored). archs: any of "vanilla", "gap", "fc". Returns
    {"{kind}-{arch}": (max_depth-1, n, m)} in `dtype`, depth d at index d-2. dtype: compute and output precision of
    the conv archs: float32 (fast) or float64.

    lap: LAP sizes c (ints 0..max(P, Q); needs "gap" in archs): adds "{kind}-lap{c}" from the same pass over
    displacements and depths as GAP. flip: adds "{kind}-{name}-flip" = (K(x, y) + K(x, flip y)) / 2 for every other
    key, at the cost of one more pass against mirrored column images. Without lap and flip the output is unchanged bit
    for bit.
    Key names and definitions: docs/enhanced.md.

    depths, kinds: what to return (the pass computes everything up to max_depth either way): depths None = every
    depth as above, else only those depths, in that order (index i holds depths[i]); kinds None = ntk and nngp, else
    only the keys of those kinds.
    """
    x, y, archs, max_depth, lap, flip, depths, kinds = check_tile_call(
        x, y, archs=archs, max_depth=max_depth, lap=lap, flip=flip, depths=depths, kinds=kinds)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    sym = y is None
    yy = x if sym else y
    out = _conv_fc(x, yy, sym, archs, max_depth, depths, dtype, lap)
    if flip:
        # K(x, flip y): on a diagonal tile it is symmetric too (mirror invariance, docs/enhanced.md), so the same
        # upper-triangle-and-mirror scheme applies with the mirrored images as columns.
        mirrored = _conv_fc(x, flip_images(yy), False, archs, max_depth, depths, dtype, lap, mirror_sym=sym)
        for key in list(out):
            out[str(KernelKey.parse(key).flipped())] = flip_average(out[key], mirrored[key], dtype)
    return {key: out[key] for key in output_keys(archs, lap, flip, kinds)}


def _conv_fc(x, yy, sym, archs, max_depth, depths, dtype, lap, mirror_sym=None):
    """Plain and LAP blocks of (x, yy): {key: (len(depths), n, m)}, index i holding depths[i]. sym: yy is x, compute
    pairs a <= b and mirror. mirror_sym (flip pass, sym False): yy is flip(x); conv pairs a <= b are computed and
    mirrored, since K(x_b, flip x_a) = K(x_a, flip x_b); fc (cheap) computes the full square.
    Only the requested depths leave the kernels: the fc pass writes no others, and conv stacks are cut before the
    mirror, so a tile asking for 2 of 20 depths does not copy and allocate 10x its output."""
    tri = sym if mirror_sym is None else mirror_sym
    n, m, n_layers = len(x), len(yy), max_depth - 1
    lanes = _k.LANES
    width = -(-m // lanes) * lanes
    # row a meets column batches first_batch[a] .. end; a diagonal tile starts at the batch holding a, then mirrors.
    first_batch = (np.arange(n) // lanes if tri else np.zeros(n, int)).astype(np.int64)
    # interleave long and short rows (0, n-1, 1, n-2, ...) so contiguous parallel chunks carry equal work
    rows = np.empty(n, np.int64)
    rows[0::2], rows[1::2] = np.arange((n + 1) // 2), np.arange(n - 1, (n - 1) // 2, -1)
    out = {}
    index = [d - 2 for d in depths]
    conv = [a for a in archs if a != "fc"]
    if conv:
        same = np.zeros((n, width), bool)
        same[:, :m] = same_images(x, yy)
        xs, rsx, sqx = _prepare(x, n_layers, dtype)
        ys, rsy, sqy = (xs, rsx, sqx) if yy is x else _prepare(yy, n_layers, dtype)
        ys, rsy, sqy = (_lanes_last(v, width) for v in (ys, rsy, sqy))
        consts = np.array([np.pi, 2.0 / 9.0 / (2 * np.pi)], dtype)
        upper = np.triu(np.ones((n, n), bool)) if tri else None
        p, q = x.shape[1:3]
        for arch in conv:
            arch_lap = lap if arch == LAP_ARCH else ()
            lap_w = lap_weights(arch_lap, p, q)
            with NUMBA_LOCK:
                ntk, nngp, lap_vals = _k.pair_kernels(xs, ys, rsx, sqx, rsy, sqy, rows, first_batch, same,
                                                      arch == "gap", consts, lap_w)
            # the keys of one arch in output_keys order, each with its values: ntk, nngp, then per c ntk, nngp
            values = [ntk, nngp] + [lap_vals[k, i] for k in range(len(arch_lap)) for i in (0, 1)]
            named = zip(output_keys((arch,), arch_lap), values)
            for key, vals in named:
                block = vals[index, :, :m].astype(dtype, copy=False)
                if tri:
                    block = np.where(upper, block, block.transpose(0, 2, 1))
                out[key] = block
    if "fc" in archs:
        out.update(fc_kernels(x, None if sym else yy, max_depth=max_depth, dtype=dtype, depths=depths))
    return out
