"""Float64 brute-force oracle, written straight from the paper's formulas (Arora et al. 2019, Sec. 4, App. H).

Every pair keeps full 4-D tensors T[i, j, i', j'] (P*Q*P*Q entries) and every self-covariance is obtained by
running the same recursion on (x, x): no diagonal shortcut, no displacement slicing. Slow on purpose: it is the
reference every fast path is tested against and is never used for production runs.
"""
import numpy as np

from .enhanced import flip_average
from .validate import check_depth, check_pair
from .vocab import KINDS, LAP_ARCH, KernelKey, output_keys

C_SIGMA = 2.0
Q2 = 9.0  # filter size q*q


def tr_d(t: np.ndarray) -> np.ndarray:
    """tr_D(T)[i,j,i',j'] = sum_{a,b in {-1,0,1}} T[i+a, j+b, i'+a, j'+b], zero outside the image. t: (P,Q,P,Q)."""
    p, q = t.shape[:2]
    padded = np.pad(t, 1)
    out = np.zeros_like(t)
    for a in (-1, 0, 1):
        for b in (-1, 0, 1):
            out += padded[1 + a:1 + a + p, 1 + b:1 + b + q, 1 + a:1 + a + p, 1 + b:1 + b + q]
    return out


def relu_expectations(sigma, s, s_prime):
    """K and K-dot of one layer from the covariance tensor and the two variance maps.

    sigma: (P,Q,P,Q) cross-covariance; s: (P,Q) variances of x; s_prime: (P,Q) variances of x'.
    K = (c/q^2) E[relu(u) relu(v)], Kdot = (c/q^2) E[relu'(u) relu'(v)], (u, v) ~ N(0, [[s, sigma], [sigma, s']]).
    """
    ss = s[:, :, None, None] * s_prime[None, None, :, :]
    norm = np.sqrt(ss)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(ss > 0, sigma / np.where(ss > 0, norm, 1.0), 0.0)
    rho = np.clip(rho, -1.0, 1.0)
    theta = np.arccos(rho)
    k = C_SIGMA / Q2 * norm * (rho * (np.pi - theta) + np.sqrt(1.0 - rho ** 2)) / (2 * np.pi)
    kdot = C_SIGMA / Q2 * (np.pi - theta) / (2 * np.pi)
    return k, kdot


def _layer_covariances(x, y, n_layers):
    """Yields (h, K^(h), Kdot^(h), Sigma^(h-1)) for h = 1..n_layers for the pair (x, y), each (P,Q,P,Q)."""
    def sigma0(a, b):
        return tr_d(np.einsum("ijc,klc->ijkl", a, b))

    def diag(t):
        p, q = t.shape[:2]
        return np.einsum("ijij->ij", t.reshape(p, q, p, q))

    sig_xy, sig_xx, sig_yy = sigma0(x, y), sigma0(x, x), sigma0(y, y)
    for h in range(1, n_layers + 1):
        s, s_prime = diag(sig_xx), diag(sig_yy)
        k, kdot = relu_expectations(sig_xy, s, s_prime)
        yield h, k, kdot, sig_xy
        sig_xy = tr_d(k)
        sig_xx = tr_d(relu_expectations(sig_xx, s, s)[0])
        sig_yy = tr_d(relu_expectations(sig_yy, s_prime, s_prime)[0])


def final_layers(x: np.ndarray, y: np.ndarray, max_depth: int):
    """Yields (depth, Theta_V, Theta_GAP, K) for depth 2..max_depth: the final-layer tensors (P,Q,P,Q) of the pair
    (x, y) for the net of that depth (depth - 1 conv layers). Vanilla Theta^(L) = Kdot*Theta^(L-1) + K; GAP
    Theta^(L) = Kdot*Theta^(L-1) (last layer fixed; Theta^(0) = 0, first layer fixed); K = K^(L) (the NNGP tensor).
    x, y: (P, Q, C) float64."""
    theta_v = theta_g = None
    for h, k, kdot, sigma_prev in _layer_covariances(x, y, max_depth - 1):
        if h == 1:
            theta_v, theta_g = sigma_prev, np.zeros_like(sigma_prev)  # Theta^(0): Sigma^(0) (vanilla), 0 (GAP)
        final_v = kdot * theta_v + k
        final_g = kdot * theta_g
        yield h + 1, final_v, final_g, k
        # Intermediate layers h < L: Theta^(h) = tr_D(Kdot * Theta^(h-1) + K) for both architectures.
        theta_v = tr_d(kdot * theta_v + k)
        theta_g = tr_d(kdot * theta_g + k)


def lap_tensor(c: int, p: int, q: int) -> np.ndarray:
    """LAP(c) weights as a full tensor W[i, j, i', j'] = t(i' - i) t(j' - j), t(d) = (1 - |d| / (2c+1))_+, (P,Q,P,Q)."""
    t_row = np.maximum(1.0 - np.abs(np.subtract.outer(np.arange(p), np.arange(p))) / (2 * c + 1), 0.0)
    t_col = np.maximum(1.0 - np.abs(np.subtract.outer(np.arange(q), np.arange(q))) / (2 * c + 1), 0.0)
    return t_row[:, None, :, None] * t_col[None, :, None, :]


def cntk_pair(x: np.ndarray, y: np.ndarray, max_depth: int, lap=()) -> dict[str, np.ndarray]:
    """All kernels of one image pair for every depth 2..max_depth.

    x, y: (P, Q, C) float images. Returns {"ntk-vanilla", "nngp-vanilla", "ntk-gap", "nngp-gap"} and, for each c in
    lap, {"ntk-lap{c}", "nngp-lap{c}"} -> (max_depth-1,) float64; entry d-2 is the kernel of the net with d-1 conv
    layers (paper depth d). LAP(c) = sum over (p, p') of w_c(p' - p) Theta_GAP[p, p'] / (PQ)^2 (docs/enhanced.md).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n_layers = max_depth - 1
    p, q = x.shape[:2]
    weights = {c: lap_tensor(c, p, q) for c in lap}
    keys = output_keys(("vanilla", "gap"), lap)
    lap_keys = {c: [str(KernelKey(kind, LAP_ARCH, lap=int(c))) for kind in KINDS] for c in lap}
    out = {k: np.zeros(n_layers) for k in keys}
    for depth, final_v, final_g, k in final_layers(x, y, max_depth):
        # vanilla: traced on i=i', j=j'; GAP: averaged over all (i, j, i', j'); LAP: weighted average
        out["ntk-vanilla"][depth - 2] = np.einsum("ijij->", final_v)
        out["nngp-vanilla"][depth - 2] = np.einsum("ijij->", k)
        out["ntk-gap"][depth - 2] = final_g.mean()
        out["nngp-gap"][depth - 2] = k.mean()
        for c, w in weights.items():
            ntk_lap, nngp_lap = lap_keys[c]
            out[ntk_lap][depth - 2] = (w * final_g).sum() / (p * q) ** 2
            out[nngp_lap][depth - 2] = (w * k).sum() / (p * q) ** 2
    return out


def cntk_reference(x, y=None, *, max_depth: int, archs=("vanilla", "gap"), lap=(), flip=False) -> dict:
    """Brute-force CNTK blocks. x: (n,P,Q,C), y: (m,P,Q,C) or None (= x); any P, Q, C.

    lap: LAP sizes c (readouts of the GAP recursion; any c >= 0 here: the oracle evaluates the definition, while the
    backends take c <= max(P, Q)); flip: add "{key}-flip" = (K(x, y) + K(x, y[:, :, ::-1])) / 2
    for every key, with K(x, mirror y) evaluated by brute force (no symmetry used).
    Returns {"{kind}-{arch}", "{kind}-lap{c}", "...-flip": float64 (max_depth-1, n, m)} for the requested conv archs.
    """
    x, y = check_pair(x, y)
    y = x if y is None else y
    max_depth = check_depth(max_depth)
    lap = tuple(lap)
    keys = output_keys(archs, lap)
    out = {k: np.zeros((max_depth - 1, len(x), len(y))) for k in keys}
    mirrored = {k: np.zeros((max_depth - 1, len(x), len(y))) for k in keys} if flip else {}
    for a in range(len(x)):
        for b in range(len(y)):
            pair = cntk_pair(x[a], y[b], max_depth, lap)
            for k in keys:
                out[k][:, a, b] = pair[k]
            if flip:
                pair = cntk_pair(x[a], y[b][:, ::-1], max_depth, lap)
                for k in keys:
                    mirrored[k][:, a, b] = pair[k]
    for k in mirrored:
        out[str(KernelKey.parse(k).flipped())] = flip_average(out[k], mirrored[k], np.float64)
    return out


def _relu_moments(s, s_prime, c):
    """E[relu(u) relu(v)] and E[step(u) step(v)] for (u, v) ~ N(0, [[s, c], [c, s']]), by adaptive quadrature over
    u > 0 with the inner Gaussian integral over v | u done exactly (independent of the arc-cosine closed form)."""
    from scipy import integrate, stats
    rho = float(np.clip(c / np.sqrt(s * s_prime), -1.0, 1.0))
    sd = np.sqrt(max(1.0 - rho * rho, 0.0))
    pdf, cdf = stats.norm.pdf, stats.norm.cdf

    def inner_relu(z):  # E[relu(rho z + sd w)], w ~ N(0, 1)
        mu = rho * z
        return max(mu, 0.0) if sd == 0 else mu * cdf(mu / sd) + sd * pdf(mu / sd)

    def inner_step(z):  # P(rho z + sd w > 0)
        return float(rho * z > 0) if sd == 0 else cdf(rho * z / sd)

    opts = dict(epsabs=1e-13, epsrel=1e-12, limit=200)
    relu = integrate.quad(lambda z: pdf(z) * z * inner_relu(z), 0, np.inf, **opts)[0]
    step = integrate.quad(lambda z: pdf(z) * inner_step(z), 0, np.inf, **opts)[0]
    return np.sqrt(s * s_prime) * relu, step


def fc_reference(x, y=None, *, max_depth: int) -> dict[str, np.ndarray]:
    """Fully-connected ReLU NTK / NNGP (paper Eq. 7-9) on flattened images, c_sigma = 2, with the Gaussian
    expectations integrated numerically (see `_relu_moments`).

    x: (n,P,Q,C), y: (m,P,Q,C) or None. Returns {"ntk-fc", "nngp-fc"} -> float64 (max_depth-1, n, m).
    """
    x, y = check_pair(x, y)
    y = x if y is None else y
    max_depth = check_depth(max_depth)
    out = {k: np.zeros((max_depth - 1, len(x), len(y))) for k in ("ntk-fc", "nngp-fc")}
    for a, xa in enumerate(np.asarray(x, np.float64).reshape(len(x), -1)):
        for b, yb in enumerate(np.asarray(y, np.float64).reshape(len(y), -1)):
            sig, s, s_prime = xa @ yb, xa @ xa, yb @ yb
            theta = sig
            for h in range(1, max_depth):
                relu, step = _relu_moments(s, s_prime, sig)
                sig = C_SIGMA * relu
                s = C_SIGMA * _relu_moments(s, s, s)[0]
                s_prime = C_SIGMA * _relu_moments(s_prime, s_prime, s_prime)[0]
                theta = theta * C_SIGMA * step + sig
                out["ntk-fc"][h - 1, a, b] = theta
                out["nngp-fc"][h - 1, a, b] = sig
    return out


def fc_closed_form(x, y=None, *, max_depth: int) -> dict[str, np.ndarray]:
    """The fully-connected recursion of `fc_reference` in closed form (the arc-cosine kernel), plain vectorised
    numpy float64 over all pairs at once: the baseline the fast FC kernel is measured and tested against.

    Sigma^(h) = |x||y| (sin theta + (pi - theta) rho) / pi, Sigma-dot^(h) = (pi - theta) / pi with rho = cos theta the
    cosine of layer h-1 (c_sigma = 2 keeps |x|^2 on the diagonal); byte-identical images have rho = 1.
    x: (n,P,Q,C), y: (m,P,Q,C) or None. Returns {"ntk-fc", "nngp-fc"} -> float64 (max_depth-1, n, m).
    """
    x, y = check_pair(x, y)
    y = x if y is None else y
    max_depth = check_depth(max_depth)
    fx, fy = (np.asarray(v, np.float64).reshape(len(v), -1) for v in (x, y))
    scale = np.sqrt(np.outer((fx ** 2).sum(1), (fy ** 2).sum(1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.clip(np.where(scale > 0, (fx @ fy.T) / scale, 0.0), -1.0, 1.0)
    rho[(fx[:, None, :] == fy[None, :, :]).all(-1) & (scale > 0)] = 1.0
    ntk = rho.copy()
    out = {k: np.zeros((max_depth - 1, len(fx), len(fy))) for k in ("ntk-fc", "nngp-fc")}
    for h in range(max_depth - 1):
        theta = np.arccos(rho)
        rho = (np.sqrt(1.0 - rho ** 2) + (np.pi - theta) * rho) / np.pi
        ntk = ntk * (np.pi - theta) / np.pi + rho
        out["ntk-fc"][h], out["nngp-fc"][h] = ntk * scale, rho * scale
    return out


def fc_scaled_error(out: dict, ref: dict, depths, x, y) -> float:
    """max over "ntk-fc", "nngp-fc" and `depths` (out index i holds depths[i]; ref: fc_closed_form's full stacks) of
    |out - ref| / sqrt(K(x,x) K(y,y)), with K(x,x) = d |x|^2 for the NTK of depth d and |x|^2 for the NNGP."""
    sx = (np.asarray(x, np.float64).reshape(len(x), -1) ** 2).sum(1)
    sy = (np.asarray(y, np.float64).reshape(len(y), -1) ** 2).sum(1)
    scale = np.sqrt(np.outer(sx, sy))
    worst = 0.0
    for key in ("ntk-fc", "nngp-fc"):
        for i, d in enumerate(depths):
            diag = d if key == "ntk-fc" else 1
            worst = max(worst, float(np.max(np.abs(out[key][i] - ref[key][d - 2]) / np.maximum(diag * scale, 1e-300))))
    return worst
