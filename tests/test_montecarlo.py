"""Independent check sharing no code with the oracle: the NNGP is the covariance of the outputs of random CNNs
(paper Sec. 4 scaling, weights N(0, 1), activations scaled by sqrt(c_sigma / (q^2 n))). For one random net of width n,
the hidden-layer inner product <x^(L), x'^(L)> (the output covariance given the last hidden layer) averages n
channels, so it fluctuates around the infinite-width NNGP with relative spread ~ 1/sqrt(n) and has an O(depth/n)
bias. Averaging R nets divides the spread by sqrt(R)."""
import numpy as np
import pytest

from cntk_gram.workers.cpu import tile_kernels


def conv3x3(x, w):
    """x: (B, P, Q, Cin), w: (3, 3, Cin, Cout), zero padding, stride 1 -> (B, P, Q, Cout), by explicit patches."""
    b, p, q, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = np.stack([padded[:, a:a + p, c:c + q, :] for a in range(3) for c in range(3)], axis=3)
    return patches.reshape(b, p, q, -1) @ w.reshape(-1, w.shape[-1])


def last_hidden_layer(x, width, n_conv, rng):
    """x^(L) of a random CNN with n_conv conv layers of `width` channels: (B, P, Q, width)."""
    h = x
    for _ in range(n_conv):
        f = conv3x3(h, rng.normal(size=(3, 3, h.shape[-1], width)))
        h = np.sqrt(2.0 / (9.0 * width)) * np.maximum(f, 0.0)
    return h


def empirical_nngp(x, width, n_conv, n_nets, seed):
    """Per-net estimates, (n_nets, 2 archs, B, B): vanilla sum_ij <h_i,j, h'_i,j>, GAP <mean_ij h, mean_ij h'>."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_nets):
        h = last_hidden_layer(x, width, n_conv, rng)
        vanilla = np.einsum("aijc,bijc->ab", h, h)
        pooled = h.mean(axis=(1, 2))
        out.append([vanilla, pooled @ pooled.T])
    return np.array(out)


def nngp_last(x, depth):
    k = tile_kernels(x, archs=("vanilla", "gap"), max_depth=depth, dtype=np.float64)
    return np.array([k["nngp-vanilla"][-1], k["nngp-gap"][-1]])


@pytest.mark.parametrize("n_conv", [1, 3])
def test_random_cnn_outputs_converge_to_nngp(n_conv):
    x = np.random.default_rng(0).normal(size=(3, 6, 6, 3))
    exact = nngp_last(x, n_conv + 1)
    wrong = nngp_last(x, n_conv + 2)  # one layer too many: the tolerance must reject it
    errors = {}
    for width, n_nets in ((32, 6), (512, 6)):
        est = empirical_nngp(x, width, n_conv, n_nets, seed=width)
        mean = est.mean(0)
        # 3 standard errors of the R-net average plus the O(depth / n) finite-width bias
        tol = 3 * est.std(0, ddof=1) / np.sqrt(n_nets) + 2.0 * n_conv / width * np.abs(exact)
        errors[width] = (np.abs(mean - exact) / np.abs(exact)).max()
        assert np.all(np.abs(mean - exact) <= tol), (width, errors[width])
    assert not np.all(np.abs(mean - wrong) <= tol), "tolerance too loose to tell depth L from L+1"
    # 16x the width: the error must shrink clearly (~4x expected; 2x required)
    assert errors[512] < errors[32] / 2, errors
