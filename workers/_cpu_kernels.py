"""Numba loops behind `cntk_gram.workers.cpu` (displacement-slice formulation, ../docs and cntk-math.md).

SIMD lanes run across LANES column images that meet the same row image: every map is stored (..., P, Q*LANES) with
the lane index fastest, so each image row is one contiguous run of W*LANES values and every loop below is a long,
unit-stride vector loop (the row image's maps are broadcast over the lanes once per batch). A pair's 4-D tensor splits into displacement slices (di, dj): entries (i, j, i+di, j+dj). tr_D never mixes slices, and
inside a slice it is a 3x3 box sum over an H x W rectangle (H = P-|di|, W = Q-|dj|) with zero padding at the rectangle's
edges. So each slice runs through all layers on its own with a handful of (H+2) x (W+2) scratch maps. Vanilla needs only
slice (0, 0); GAP needs all (2P-1)(2Q-1) slices. The same code compiles for float32 (fast path, polynomial arccos) and
float64 (libm arccos): the dtype of the inputs picks it.
"""
import math
import os

import numba as nb
import numpy as np
from numba import types
from numba.extending import overload

# No "contract"/"reassoc": vector body and scalar remainder then round identically, so a pair's value does not depend
# on its position in a batch (tiles of any split are bit-identical). Every loop here is element-wise, so nothing is lost.
JIT = dict(fastmath={"nnan", "ninf", "nsz", "arcp"}, cache=os.environ.get("CNTK_NUMBA_CACHE", "1") != "0", nogil=True)

# arccos(a) = sqrt(1 - a) * poly(a) for 0 <= a <= 1, |error| <= 2e-8 (Abramowitz & Stegun 4.4.46).
_ACOS_COEF = (1.5707963050, -0.2145988016, 0.0889789874, -0.0501743046,
              0.0308918810, -0.0170881256, 0.0066700901, -0.0012624911)


def acos_abs(a):
    """arccos(a) for 0 <= a <= 1 (dtype-dispatched inside numba)."""
    return math.acos(a)


_A0, _A1, _A2, _A3, _A4, _A5, _A6, _A7 = (np.float32(v) for v in _ACOS_COEF)
_ONE32 = np.float32(1.0)


@overload(acos_abs)
def _acos_abs_impl(a):
    if a == types.float32:
        def poly(a):
            p = ((((((_A7 * a + _A6) * a + _A5) * a + _A4) * a + _A3) * a + _A2) * a + _A1) * a + _A0
            return math.sqrt(_ONE32 - a) * p
        return poly
    return lambda a: math.acos(a)


LANES = 16  # column images per batch


@nb.njit(**JIT)
def _box2(src_a, dst_a, src_b, dst_b, rows_a, rows_b, H, W):
    """dst[1+i, (1+j)*LANES + lane] = 3x3 box sum of src around it, for i < H, j < W, for two maps at once.

    src_*, dst_*: (P+2, (Q+2)*LANES), src with a zero halo; rows_*: (P+2, Q*LANES) scratch."""
    n = W * LANES
    for r in range(H + 2):
        sa, sb, ra, rb = src_a[r], src_b[r], rows_a[r], rows_b[r]
        for m in range(n):
            ra[m] = sa[m] + sa[m + LANES] + sa[m + 2 * LANES]
            rb[m] = sb[m] + sb[m + LANES] + sb[m + 2 * LANES]
    for i in range(H):
        da, db = dst_a[1 + i, LANES:], dst_b[1 + i, LANES:]
        a0, a1, a2, b0, b1, b2 = rows_a[i], rows_a[i + 1], rows_a[i + 2], rows_b[i], rows_b[i + 1], rows_b[i + 2]
        for m in range(n):
            da[m] = a0[m] + a1[m] + a2[m]
            db[m] = b0[m] + b1[m] + b2[m]


@nb.njit(**JIT)
def _zero_halo(buf, H, W):
    buf[0, :(W + 2) * LANES] = 0
    buf[H + 1, :(W + 2) * LANES] = 0
    for i in range(1, H + 1):
        buf[i, :LANES] = 0
        buf[i, (W + 1) * LANES:(W + 2) * LANES] = 0


@nb.njit(**JIT)
def _run_slice(xa, yb, rsa, sqa, rsb, sqb, di, dj, self_lane, gap, consts, acc_ntk, acc_nngp,
               sig, the, kk, uu, rows, rows2, rsum_u, rsum_k, lap_w, acc_lap, slice_sum):
    """Run displacement slice (di, dj) of the pairs (a, lane) through every layer; add its sums into acc_*.

    xa, yb: (C, P, Q*LANES) row image (broadcast) and column images; rsa, sqa, rsb, sqb: (L, P, Q*LANES) 1/sqrt and
    sqrt of the per-layer diagonal maps d^(h-1). self_lane: (LANES,) bool, the column image is identical to the row
    image; at (di, dj) = (0, 0) its rho is then exactly 1 (Cauchy-Schwarz), set rather than left to rounding.
    consts: [pi, c_sigma / q^2 / (2 pi)] in the compute dtype. acc_ntk, acc_nngp: float64 (L, LANES).
    sig, the, kk, uu: (P+2, (Q+2)*LANES) scratch; rows, rows2, rsum_*: (P+2, Q*LANES) and (Q*LANES,) scratch.
    LAP readouts (none when lap_w has 0 rows): lap_w: float64 (n_lap, 2P-1, 2Q-1), weight of displacement (di, dj) at
    [c, di+P-1, dj+Q-1]; acc_lap: float64 (n_lap, 2, L, LANES), [c, 0] ntk and [c, 1] nngp; slice_sum: (2, LANES)
    float64 scratch. Every entry of a true slice has the same displacement, so LAP weights the slice's sum once.
    """
    C = xa.shape[0]
    P = xa.shape[1]
    Q = xa.shape[2] // LANES
    L = rsa.shape[0]
    H, W = P - abs(di), Q - abs(dj)
    n = W * LANES
    ia, ja = max(0, -di), max(0, -dj)  # top-left of the slice in x; in y it is (ia+di, ja+dj)
    ib, jb = ia + di, ja + dj
    xo, yo = ja * LANES, jb * LANES
    pi, c1 = consts[0], consts[1]
    one = pi / pi
    zero = pi - pi
    for buf in (sig, the, kk, uu):
        _zero_halo(buf, H, W)
    # Row views keep every index a bare loop counter: numba's negative-index wrap-around on offset indices would turn
    # unit-stride loads into gathers.
    for i in range(H):
        k_row, xr, yr = kk[1 + i, LANES:], xa[:, ia + i, xo:], yb[:, ib + i, yo:]
        for m in range(n):
            k_row[m] = zero
        for c in range(C):
            xc, yc = xr[c], yr[c]
            for m in range(n):
                k_row[m] += xc[m] * yc[m]
    _box2(kk, sig, kk, the, rows, rows2, H, W)  # Sigma^(0), and Theta^(0) = Sigma^(0) (vanilla) ...
    if gap:  # ... or 0 (GAP: first layer fixed)
        for i in range(H):
            t_row = the[1 + i, LANES:]
            for m in range(n):
                t_row[m] = zero
    fix_self = di == 0 and dj == 0 and self_lane.any()
    n_lap = lap_w.shape[0]
    for h in range(L):
        for i in range(H):
            s_row, t_row, k_row, u_row = sig[1 + i, LANES:], the[1 + i, LANES:], kk[1 + i, LANES:], uu[1 + i, LANES:]
            ra, rb = rsa[h, ia + i, xo:], rsb[h, ib + i, yo:]
            qa, qb = sqa[h, ia + i, xo:], sqb[h, ib + i, yo:]
            for m in range(n):
                rho = s_row[m] * (ra[m] * rb[m])  # grouped: K(x, y) == K(y, x) bit for bit
                rho = min(max(rho, -one), one)
                t = acos_abs(abs(rho))
                pmt = pi - t if rho >= zero else t  # pi - arccos(rho)
                k = c1 * (qa[m] * qb[m]) * (rho * pmt + math.sqrt(max(one - rho * rho, zero)))
                k_row[m] = k
                u_row[m] = c1 * pmt * t_row[m] + k
        if fix_self:  # rho = 1: pi - arccos(rho) = pi, sqrt(1 - rho^2) = 0
            for lane in range(LANES):
                if self_lane[lane]:
                    for i in range(H):
                        for j in range(W):
                            m = j * LANES + lane
                            k = c1 * (sqa[h, ia + i, xo + m] * sqb[h, ib + i, yo + m]) * pi
                            kk[1 + i, LANES + m] = k
                            uu[1 + i, LANES + m] = c1 * pi * the[1 + i, LANES + m] + k
        # per-lane sums: nngp = sum K; ntk = sum U (vanilla) or sum (U - K) = sum Kdot*Theta (GAP)
        rsum_u[:n] = zero
        rsum_k[:n] = zero
        for i in range(H):
            k_row, u_row = kk[1 + i, LANES:], uu[1 + i, LANES:]
            for m in range(n):
                rsum_u[m] += u_row[m]
                rsum_k[m] += k_row[m]
        for j in range(W):
            for lane in range(LANES):
                su, sk = rsum_u[j * LANES + lane], rsum_k[j * LANES + lane]
                acc_ntk[h, lane] += su - sk if gap else su
                acc_nngp[h, lane] += sk
        if n_lap:  # a separate loop, so the sums above (the GAP/vanilla values) are untouched bit for bit
            slice_sum[:] = 0.0
            for j in range(W):
                for lane in range(LANES):
                    su, sk = rsum_u[j * LANES + lane], rsum_k[j * LANES + lane]
                    slice_sum[0, lane] += su - sk if gap else su
                    slice_sum[1, lane] += sk
            for c in range(n_lap):
                wt = lap_w[c, di + P - 1, dj + Q - 1]
                for kind in range(2):
                    for lane in range(LANES):
                        acc_lap[c, kind, h, lane] += wt * slice_sum[kind, lane]
        if h + 1 < L:
            _box2(kk, sig, uu, the, rows, rows2, H, W)


@nb.njit(**JIT)
def _broadcast_lanes(src, dst):
    """dst[..., p, q*LANES + lane] = src[..., p, q]; src (K, P, Q), dst (K, P, Q*LANES)."""
    K, P, Q = src.shape
    for k in range(K):
        for p in range(P):
            for q in range(Q):
                v = src[k, p, q]
                for lane in range(LANES):
                    dst[k, p, q * LANES + lane] = v


@nb.njit(parallel=True, **JIT)
def pair_kernels(xs, ys, rsx, sqx, rsy, sqy, rows, first_batch, same, gap, consts, lap_w):
    """All depths of one architecture for every row image a in `rows` against column batches first_batch[a] ..
    nb-1 (batch b holds column images b*LANES .. b*LANES+LANES-1).

    xs: (n, C, P, Q); rsx, sqx: (n, L, P, Q); ys: (nb, C, P, Q*LANES); rsy, sqy: (nb, L, P, Q*LANES) lanes fastest;
    rows: (n,) row order (parallel work is split into contiguous runs of it, so callers interleave long and short
    rows); first_batch: (n,); same: (n, nb*LANES) bool, identical images.
    lap_w: float64 (n_lap, 2P-1, 2Q-1) LAP weights per true displacement (n_lap = 0: no LAP; GAP only).
    Returns ntk, nngp: float64 (L, n, nb*LANES), zero where not computed, and lap: float64 (n_lap, 2, L, n, nb*LANES)
    ([c, 0] ntk, [c, 1] nngp). GAP and LAP values are divided by P*Q*P*Q.
    """
    n, C, P, Q = xs.shape
    L = rsx.shape[1]
    nb_ = ys.shape[0]
    ntk = np.zeros((L, n, nb_ * LANES))
    nngp = np.zeros((L, n, nb_ * LANES))
    n_lap = lap_w.shape[0]
    lap = np.zeros((n_lap, 2, L, n, nb_ * LANES))
    dt = xs.dtype
    span_i = P - 1 if gap else 0
    span_j = Q - 1 if gap else 0
    scale = 1.0 / (P * Q * P * Q) if gap else 1.0
    for t in nb.prange(rows.shape[0]):
        a = rows[t]
        # the row image's maps, broadcast over the lanes once and reused by every column batch
        xa = np.empty((C, P, Q * LANES), dt)
        rsa = np.empty((L, P, Q * LANES), dt)
        sqa = np.empty((L, P, Q * LANES), dt)
        _broadcast_lanes(xs[a], xa)
        _broadcast_lanes(rsx[a], rsa)
        _broadcast_lanes(sqx[a], sqa)
        sig = np.empty((P + 2, (Q + 2) * LANES), dt)
        the = np.empty_like(sig)
        kk = np.empty_like(sig)
        uu = np.empty_like(sig)
        rows_a = np.empty((P + 2, Q * LANES), dt)
        rows_b = np.empty_like(rows_a)
        rsum_u = np.empty(Q * LANES, dt)
        rsum_k = np.empty(Q * LANES, dt)
        acc_ntk = np.empty((L, LANES))
        acc_nngp = np.empty((L, LANES))
        acc_lap = np.empty((n_lap, 2, L, LANES))
        slice_sum = np.empty((2, LANES))
        for b in range(first_batch[a], nb_):
            acc_ntk[:] = 0.0
            acc_nngp[:] = 0.0
            acc_lap[:] = 0.0
            self_lane = same[a, b * LANES:(b + 1) * LANES]
            for di in range(-span_i, span_i + 1):
                for dj in range(-span_j, span_j + 1):
                    _run_slice(xa, ys[b], rsa, sqa, rsy[b], sqy[b], di, dj, self_lane, gap, consts,
                               acc_ntk, acc_nngp, sig, the, kk, uu, rows_a, rows_b, rsum_u, rsum_k,
                               lap_w, acc_lap, slice_sum)
            for h in range(L):
                for lane in range(LANES):
                    ntk[h, a, b * LANES + lane] = acc_ntk[h, lane] * scale
                    nngp[h, a, b * LANES + lane] = acc_nngp[h, lane] * scale
                    for c in range(n_lap):
                        for kind in range(2):
                            lap[c, kind, h, a, b * LANES + lane] = acc_lap[c, kind, h, lane] * scale
    return ntk, nngp, lap
