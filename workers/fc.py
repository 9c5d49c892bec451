"""Fully-connected ReLU NTK and NNGP (paper Eq. 7-9) on flattened images: a cheap baseline, closed form, float64."""
import numpy as np

from .validate import check_depth, check_pair


def _arccos_step(sigma, s_x, s_y, same):
    """One ReLU layer with c_sigma = 2. sigma: (n, m); s_x: (n,); s_y: (m,). Returns (Sigma, Sigma-dot), (n, m)."""
    norm = np.sqrt(np.outer(s_x, s_y))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(norm > 0, sigma / np.where(norm > 0, norm, 1.0), 0.0)
    rho = np.where(same, 1.0, np.clip(rho, -1.0, 1.0))
    theta = np.arccos(rho)
    new_sigma = norm * (np.sin(theta) + (np.pi - theta) * rho) / np.pi
    sigma_dot = (np.pi - theta) / np.pi
    return new_sigma, sigma_dot


def fc_kernels(x, y=None, *, max_depth: int = 21, dtype=np.float32) -> dict:
    """x: (n, P, Q, C), y: (m, P, Q, C) or None (= x). Returns {"ntk-fc", "nngp-fc"}: (max_depth-1, n, m) in `dtype`
    (computed in float64).

    Sigma^(0) = x.x', Sigma^(h) = 2 E[relu(u) relu(v)], Theta^(h) = Theta^(h-1) Sigma-dot^(h) + Sigma^(h); depth d is
    the net with d-1 hidden layers. ReLU with c_sigma = 2 keeps the variances: Sigma^(h)(x, x) = |x|^2.
    """
    x, y = check_pair(x, y)
    max_depth = check_depth(max_depth)
    fx = np.asarray(x, np.float64).reshape(len(x), -1)
    fy = fx if y is None else np.asarray(y, np.float64).reshape(len(y), -1)
    s_x, s_y = (fx ** 2).sum(1), (fy ** 2).sum(1)
    same = (fx[:, None, :] == fy[None, :, :]).all(-1) if len(fx) * len(fy) * fx.shape[1] < 5e7 else \
        np.array([[np.array_equal(a, b) for b in fy] for a in fx])
    sigma = fx @ fy.T
    theta = sigma.copy()
    ntk = np.empty((max_depth - 1,) + sigma.shape, dtype)
    nngp = np.empty_like(ntk)
    for h in range(max_depth - 1):
        sigma, sigma_dot = _arccos_step(sigma, s_x, s_y, same)
        theta = theta * sigma_dot + sigma
        ntk[h], nngp[h] = theta, sigma
    return {"ntk-fc": ntk, "nngp-fc": nngp}
