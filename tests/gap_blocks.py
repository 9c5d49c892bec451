"""The float64 oracle of the GPU GAP kernel's per-block sums, shared by the emulation tests of test_gpu (32 x 32 x 3)
and test_shapes (other image shapes)."""
import numpy as np

from cntk_gram.workers.reference import _layer_covariances, tr_d


def block_sums(x, y, layers, blocks, lap, shape):
    """float64 brute force of the GAP kernel's sums over the displacement blocks `blocks`: per layer [ntk, nngp, then
    ntk, nngp of each c], entry (i, j) of block (ci, cj) pairing x at (i, j) with y at ((i + ci) % P, (j + cj) % Q),
    weighted for LAP by w_c of its true displacement (from the unwrapped positions, not the kernel's cut lines)."""
    p, q, _ = shape
    i, j = np.meshgrid(np.arange(p), np.arange(q), indexing="ij")
    want = np.zeros((layers, 2 + 2 * len(lap)))
    theta = None
    for h, k, kdot, sigma in _layer_covariances(x.astype(np.float64), y.astype(np.float64), layers):
        theta = np.zeros_like(sigma) if h == 1 else theta
        for ci, cj in blocks:
            i2, j2 = (i + ci) % p, (j + cj) % q
            values = ((kdot * theta)[i, j, i2, j2], k[i, j, i2, j2])
            want[h - 1, :2] += [v.sum() for v in values]
            for r, c in enumerate(lap):
                w = np.maximum(1 - np.abs(i2 - i) / (2 * c + 1), 0) * np.maximum(1 - np.abs(j2 - j) / (2 * c + 1), 0)
                want[h - 1, 2 + 2 * r:4 + 2 * r] += [(w * v).sum() for v in values]
        theta = tr_d(kdot * theta + k)
    return want
