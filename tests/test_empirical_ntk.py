"""Exact CNTK vs the empirical NTK of wide random CNNs, by automatic differentiation (PyTorch, CPU); no code shared
with workers/.

The finite network (NTK parameterisation of Arora et al. 2019, Sec. 4: c_sigma = 2, q = 3, all weights i.i.d. N(0, 1),
3x3 convs, zero padding, stride 1, no biases, L conv layers of `width` channels):
    f_1 = W_1 * x,   g_h = sqrt(c_sigma / (q^2 width)) relu(f_h),   f_{h+1} = W_{h+1} * g_h   (h = 1..L)
    vanilla: out = sum_{c,i,j} V[c,i,j] g_L[c,i,j]        GAP: out = sum_c v[c] mean_{i,j} g_L[c,i,j]
Its NNGP E[out(x) out(x')] is K^(L) summed over the diagonal (vanilla) or averaged (GAP), and the sum over parameters
of gradient products follows the paper's Theta recursion with no extra constant (checked numerically here):
  - the gradient w.r.t. an unscaled conv weight is the 3x3 patch of its input, so W_{h+1} contributes
    tr_D(<g_h, g_h'>) = Sigma^(h) (Sigma^(0) for W_1);
  - backpropagating through g_h multiplies by sqrt(c_sigma / (q^2 width)) twice and sums `width` channels (cross-channel
    terms average out as width grows) and 3x3 offsets: tr_D(K_dot^(h) (.)), K_dot = (c_sigma / q^2) E[relu' relu'];
  - the output weights contribute <g_L, g_L'> per position: K^(L).
CNTK-V trains every weight (W_1..W_L, V). CNTK-GAP (paper App. H) keeps W_1 and v fixed, so only W_2..W_L are trained
(its NTK is exactly 0 for L = 1).

At initialisation the empirical NTK of one net is an average over `width` channels: it fluctuates around the exact
kernel with relative spread ~ c / sqrt(width) (c ~ 1 vanilla, ~ 2 GAP) and has an O(L / width) bias; averaging R
independent nets divides the spread by sqrt(R). Images are 8x8: on smaller ones zero padding drains so much of the
kernel at the border that the NTKs of neighbouring depths get too close for a cheap Monte-Carlo test to tell apart.
"""
import numpy as np
import pytest

from cntk_gram.workers.cpu import tile_kernels

torch = pytest.importorskip("torch")

C_SIGMA, Q = 2.0, 3


def random_weights(n_conv, width, channels, size, rng):
    """float64 torch tensors: convs [(width, cin, 3, 3)] * n_conv, V (width, size, size), v (width,)."""
    convs = [rng.normal(size=(width, channels if h == 0 else width, Q, Q)) for h in range(n_conv)]
    return [torch.tensor(w) for w in convs], torch.tensor(rng.normal(size=(width, size, size))), \
        torch.tensor(rng.normal(size=width))


def outputs(images, convs, head_vanilla, head_gap):
    """images: (B, C, P, P) float64 -> (vanilla, GAP) network outputs, each (B,)."""
    g = images
    for w in convs:
        f = torch.nn.functional.conv2d(g, w, padding=1)
        g = np.sqrt(C_SIGMA / (Q * Q * w.shape[0])) * torch.relu(f)
    return (g * head_vanilla).sum(dim=(1, 2, 3)), g.mean(dim=(2, 3)) @ head_gap


def gradient_gram(out, params):
    """sum over params p of d out[a]/dp . d out[b]/dp: (B, B) float64; one backward pass per output."""
    grads = [torch.autograd.grad(o, params, retain_graph=True) for o in out] if params else []
    gram = torch.zeros(len(out), len(out), dtype=torch.float64)
    for a, grads_a in enumerate(grads):
        for b, grads_b in enumerate(grads):
            gram[a, b] = sum(torch.vdot(ga.flatten(), gb.flatten()) for ga, gb in zip(grads_a, grads_b))
    return gram


def empirical_ntks(x, width, n_conv, n_nets, seed):
    """x: (B, P, P, C). Per-net empirical NTKs, (n_nets, 2 archs [vanilla, gap], B, B) float64."""
    rng = np.random.default_rng(seed)
    images = torch.tensor(x.transpose(0, 3, 1, 2))
    per_net = []
    for _ in range(n_nets):
        convs, head_vanilla, head_gap = random_weights(n_conv, width, x.shape[-1], x.shape[1], rng)
        for w in (*convs, head_vanilla):
            w.requires_grad_(True)
        out_vanilla, out_gap = outputs(images, convs, head_vanilla, head_gap)
        ntk_vanilla = gradient_gram(out_vanilla, [*convs, head_vanilla])
        ntk_gap = gradient_gram(out_gap, convs[1:])  # W1 and v are not trained
        per_net.append([ntk_vanilla.numpy(), ntk_gap.numpy()])
    return np.array(per_net)


def exact_kernels(x, depth):
    """(2 archs, B, B) NTK and NNGP of the nets with depth - 1 conv layers."""
    k = tile_kernels(x, archs=("vanilla", "gap"), max_depth=depth, dtype=np.float64)
    return (np.array([k["ntk-vanilla"][-1], k["ntk-gap"][-1]]),
            np.array([k["nngp-vanilla"][-1], k["nngp-gap"][-1]]))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(7).normal(size=(3, 8, 8, 3))


def test_gap_ntk_without_trained_layers_is_zero(images):
    """L = 1 GAP: W1 and v fixed leave nothing to train; the vanilla NTK (W1 and V trained) is positive."""
    ntk, _ = exact_kernels(images, depth=2)
    assert np.all(ntk[1] == 0.0)
    assert np.all(ntk[0] > 0.0)


WIDTHS, N_NETS = (32, 512), 12


def check_against_exact(per_net, exact, wrong, n_conv):
    """per_net: {width: (N_NETS, B, B)} empirical NTKs of one arch; exact, wrong[*]: (B, B). Returns the errors
    relative to sqrt(Theta(x,x) Theta(x',x')): {width: (max error of the net average, rms error of one net)}."""
    scale = np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    errors, tol = {}, {}
    for width, est in per_net.items():
        mean = est.mean(0)
        # 4 standard errors of the N_NETS average (SE estimated from 12 nets: a t-variable with 11 dof exceeds 4
        # with prob. ~2e-3 per check) plus the O(L / width) finite-width bias of the empirical NTK.
        tol[width] = 4 * est.std(0, ddof=1) / np.sqrt(len(est)) + 2.0 * n_conv / width * scale
        errors[width] = (np.max(np.abs(mean - exact) / scale), np.sqrt(np.mean(((est - exact) / scale) ** 2)))
        assert np.all(np.abs(mean - exact) <= tol[width]), (width, errors[width])
    # the widest nets' tolerance must reject wrong kernels, or the check above could not fail
    widest = max(per_net)
    for name, kernel in wrong.items():
        rejected = np.any(np.abs(per_net[widest].mean(0) - kernel) > tol[widest])
        assert rejected, f"tolerance too loose to reject the {name}"
    # 16x the width: one net's deviation from the exact kernel must shrink clearly (~4x expected; 2x required)
    narrow, wide = (errors[w][1] for w in (min(per_net), widest))
    assert wide < narrow / 2, errors
    return errors


@pytest.mark.parametrize("n_conv", [1, 2, 3])
def test_empirical_ntk_converges_to_exact(images, n_conv):
    torch.set_num_threads(1)
    exact, nngp = exact_kernels(images, depth=n_conv + 1)
    deeper, _ = exact_kernels(images, depth=n_conv + 2)
    per_net = {w: empirical_ntks(images, w, n_conv, N_NETS, seed=1000 * n_conv + w) for w in WIDTHS}
    archs = ["vanilla", "gap"] if n_conv > 1 else ["vanilla"]  # L = 1 GAP: nothing trained, see test above
    for a, arch in enumerate(archs):
        wrong = {"NTK with one more conv layer": deeper[a], "NNGP": nngp[a]}
        errors = check_against_exact({w: est[:, a] for w, est in per_net.items()}, exact[a], wrong, n_conv)
        print(f"L={n_conv} {arch}: " + ", ".join(f"width {w}: mean {e[0]:.4f} one net {e[1]:.4f}"
                                                 for w, e in errors.items()))
