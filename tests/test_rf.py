"""Random features (workers/rf.py): the empirical NTK of one finite random CNN.

(a) width -> inf: the rf kernels converge to the exact float64 kernels of `workers/reference.py`, one net's error
    shrinking like 1/sqrt(width), with a tolerance shown to reject wrong kernels;
(b) one draw is reproducible bit for bit from its seed, different draws and seeds differ, and tiles, chunks and
    column groups of a block equal the whole block (the same net for every tile);
(c) a tile equals an explicit J J^T from `torch.func.jacrev` of the same net, in float64;
(d) GAP: the first conv layer and the readout are fixed (their gradients are excluded); the rf NNGP is the readout
    gradient's Gram.
Bad arguments raise one clear error.
"""
import sys

import numpy as np
import pytest

from cntk_gram.workers.reference import cntk_reference

torch = pytest.importorskip("torch", reason="random features need PyTorch (pip install -e .[rf])")

from cntk_gram.workers import rf, rf_net  # noqa: E402
from cntk_gram.workers.vocab import KernelKey  # noqa: E402


@pytest.fixture(scope="module")
def images():
    """Three 8x8x3 images: at this size the kernels of neighbouring depths still differ clearly."""
    return np.random.default_rng(7).normal(size=(3, 8, 8, 3)).astype(np.float32)


def scaled(k, exact):
    """k / sqrt(Theta(x,x) Theta(x',x')), the exact kernel's diagonal: errors of all entries on one scale."""
    d = np.sqrt(np.diag(exact))
    return k / np.outer(d, d)


# ---------------------------------------------------------------- (a) convergence to the exact kernel

# draws per width: one net's spread is ~0.5/sqrt(width) (vanilla) and ~1.8/sqrt(width) (GAP, whose error is mostly one
# common factor per net, so its rms needs many nets); fewer nets at the costly widths.
DRAWS = {64: 24, 256: 12, 1024: 6}
DEPTH = 3


@pytest.fixture(scope="module")
def convergence(images):
    """{(arch, kind): {width: (draws, B, B) rf kernels}} for one depth, and the exact kernels of depths 2..4."""
    est = {}
    for width, n_draws in DRAWS.items():
        for draw in range(n_draws):
            k = rf.rf_tile_kernels(images, archs=("vanilla", "gap"), depths=(DEPTH,), kinds=("ntk", "nngp"),
                                   width=width, draw=draw, seed=11)
            for key, v in k.items():
                parsed = KernelKey.parse(key)
                kind, arch = parsed.kind, parsed.arch
                est.setdefault((arch, kind), {}).setdefault(width, []).append(v[0].astype(np.float64))
    exact = cntk_reference(images.astype(np.float64), max_depth=DEPTH + 1)
    return {key: {w: np.array(v) for w, v in per_width.items()} for key, per_width in est.items()}, exact


@pytest.mark.parametrize("arch", ["vanilla", "gap"])
@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_rf_converges_to_exact_kernel(convergence, arch, kind):
    est, exact = convergence
    est, d = est[(arch, kind)], DEPTH - 2
    target = exact[f"{kind}-{arch}"][d]
    other = "nngp" if kind == "ntk" else "ntk"
    wrong = {f"{kind} one layer deeper": exact[f"{kind}-{arch}"][d + 1],
             f"{kind} one layer shallower": exact[f"{kind}-{arch}"][d - 1],
             f"{other} instead of {kind}": exact[f"{other}-{arch}"][d]}
    if (arch, kind) == ("gap", "nngp"):  # differs from depth 4 by ~3% on 8x8 images: below what 6 nets resolve
        del wrong[f"{kind} one layer deeper"]
    rms = {}
    for width, k in est.items():
        err = scaled(k - target, target)
        rms[width] = np.sqrt(np.mean(err ** 2))  # one net's typical relative error
        # the mean of the nets: within 4 standard errors plus the O(L / width) finite-width bias
        tol = 4 * err.std(0, ddof=1) / np.sqrt(len(k)) + 2 * (DEPTH - 1) / width
        assert np.all(np.abs(err.mean(0)) <= tol), (width, err.mean(0), tol)
        if width == max(est):  # the same tolerance rejects each wrong kernel, so the check above can fail
            for name, kernel in wrong.items():
                assert np.any(np.abs(scaled(k.mean(0) - kernel, target)) > tol), f"tolerance accepts the {name}"
    # 1/sqrt(width): 16x the width divides one net's error by ~4 (2..8 allowed: the rms of a few nets is noisy)
    ratio = rms[min(rms)] / rms[max(rms)]
    assert 2 < ratio < 8, rms
    # and no width is far off the 1/sqrt(width) line through the others
    c = {w: e * np.sqrt(w) for w, e in rms.items()}
    assert max(c.values()) < 2 * min(c.values()), c
    print(f"{kind}-{arch}: one net's rms error " + ", ".join(f"width {w}: {e:.4f}" for w, e in rms.items()))


# ---------------------------------------------------------------- (b) reproducibility and tiling

def test_one_draw_is_reproducible_and_draws_differ(images):
    args = dict(archs=("vanilla", "gap"), depths=(3,), kinds=("ntk", "nngp"), width=32)
    first = rf.rf_tile_kernels(images, **args, draw=3, seed=5)
    again = rf.rf_tile_kernels(images, **args, draw=3, seed=5)
    other_draw = rf.rf_tile_kernels(images, **args, draw=4, seed=5)
    other_seed = rf.rf_tile_kernels(images, **args, draw=3, seed=6)
    for key, k in first.items():
        assert np.array_equal(k, again[key]), key
        for other in (other_draw, other_seed):
            assert np.max(np.abs(other[key] - k)) > 1e-3 * np.max(np.abs(k)), key


def test_different_depths_and_archs_are_different_nets():
    seeds = {rf_net.network_seed(seed=0, draw=0, arch=a, depth=d, width=w)
             for a in ("vanilla", "gap") for d in (3, 4) for w in (64, 128)}
    assert len(seeds) == 8
    p3 = rf_net.draw_network(arch="vanilla", depth=3, width=8, channels=3, image_shape=(4, 4), seed=0, draw=0)
    p4 = rf_net.draw_network(arch="vanilla", depth=4, width=8, channels=3, image_shape=(4, 4), seed=0, draw=0)
    assert not torch.equal(p3["conv1"], p4["conv1"])


def test_tiles_and_chunks_equal_the_whole_block():
    x = np.random.default_rng(3).normal(size=(7, 6, 6, 3)).astype(np.float32)
    args = dict(archs=("vanilla", "gap"), depths=(2, 4), kinds=("ntk", "nngp"), width=16, draw=1, seed=2)
    whole = rf.rf_tile_kernels(x, **args)
    # a budget of a few images: backward passes of one image, column groups of 3, rows recomputed per group
    held, transient = rf.image_bytes(arch="vanilla", depth=4, width=16, channels=3, image_shape=(6, 6))
    budget = (held + transient) + 3 * held
    plan = rf.plan_memory(held, transient, budget, 7)
    assert (plan.chunk, plan.group) == (1, 3), plan
    chunked = rf.rf_tile_kernels(x, **args, max_bytes=budget)
    top, bottom = rf.rf_tile_kernels(x[:3], **args), rf.rf_tile_kernels(x[3:], **args, max_bytes=budget)
    corner = rf.rf_tile_kernels(x[:3], x[3:], **args, max_bytes=budget)
    for key, k in whole.items():
        assert np.array_equal(k, k.transpose(0, 2, 1)), key  # a diagonal tile is exactly symmetric
        scale = np.max(np.abs(k))
        if key == "rf-ntk-gap":
            assert scale == 0 or np.any(k[1] != 0)
        assert np.allclose(chunked[key], k, rtol=0, atol=1e-6 * scale), key
        for part, rows, cols in ((top, slice(0, 3), slice(0, 3)), (bottom, slice(3, 7), slice(3, 7)),
                                 (corner, slice(0, 3), slice(3, 7))):
            assert np.allclose(part[key], k[:, rows, cols], rtol=0, atol=1e-6 * scale), key


# ---------------------------------------------------------------- (c), (d) against jacrev of the same net

def jacobian_grams(images, arch, depth, width, seed, draw):
    """{parameter name: (B, B) float64 J J^T} over ALL parameters of the net (trained or not), by jacrev."""
    from torch.func import jacrev
    params = rf_net.draw_network(arch=arch, depth=depth, width=width, channels=images.shape[-1],
                                 image_shape=images.shape[1:3], seed=seed, draw=draw)
    params = {k: v.double() for k, v in params.items()}
    x = torch.tensor(images.transpose(0, 3, 1, 2), dtype=torch.float64)
    jac = jacrev(lambda p: rf_net.forward(p, x, arch))(params)
    return {name: (j.flatten(1) @ j.flatten(1).T).numpy() for name, j in jac.items()}


@pytest.mark.parametrize("arch", ["vanilla", "gap"])
@pytest.mark.parametrize("depth", [2, 3, 5])
def test_tile_equals_jacobian_gram(images, arch, depth):
    y = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
    both = np.concatenate([images, y])
    grams = jacobian_grams(both, arch, depth, width=12, seed=4, draw=2)
    trained = rf_net.trained_names(arch, depth)
    ntk = sum((grams[name] for name in trained), np.zeros((5, 5)))
    nngp = grams["readout"]  # the readout's gradient is its input features: g_L (vanilla), mean of g_L (gap)
    got = rf.rf_tile_kernels(images, y, archs=(arch,), depths=(depth,), kinds=("ntk", "nngp"), width=12, draw=2,
                             seed=4)
    tol = {}
    for key, full in (("rf-ntk", ntk), ("rf-nngp", nngp)):
        tol[key] = 2e-6 * (np.max(np.abs(full)) if np.any(full) else 1.0)
        assert np.allclose(got[f"{key}-{arch}"][0], full[:3, 3:], rtol=0, atol=tol[key]), key
    if arch == "gap":  # (d) first layer and readout fixed: their gradient products are not in the kernel, and
        # including either would move the tile far outside the tolerance above
        assert trained == [f"conv{h}" for h in range(2, depth)]
        for fixed in ("conv1", "readout"):
            assert np.max(np.abs(grams[fixed][:3, 3:])) > 100 * max(tol["rf-ntk"], 2e-6 * np.max(grams[fixed]))
        if depth == 2:
            assert np.all(got["rf-ntk-gap"] == 0)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, words", [
    (dict(width=0), "width must be an integer >= 1"),
    (dict(width=2.5), "width must be an integer >= 1"),
    (dict(draw=-1), "draw must be an integer >= 0"),
    (dict(seed=-2), "seed must be an integer >= 0"),
    (dict(archs=("fc",)), "allowed: vanilla, gap"),
    (dict(kinds=("cntk",)), "allowed: ntk, nngp"),
    (dict(depths=(1,)), "integer >= 2"),
    (dict(depths=()), "at least one depth"),
    (dict(depths=(3, 3)), "must not repeat"),
    (dict(max_bytes=1000), "raise max_bytes"),
    (dict(device="tpu"), "allowed: auto, cpu, cuda"),
])
def test_bad_arguments_raise_one_clear_error(images, kwargs, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace(".", r"\.")):
        rf.rf_tile_kernels(images, **kwargs)


def test_bad_images_raise(images):
    bad = images.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        rf.rf_tile_kernels(bad)
    with pytest.raises(ValueError, match="differ in shape"):
        rf.rf_tile_kernels(images, images[:, :4])


def test_without_torch_the_error_names_the_extra(images, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[rf\]"):
        rf.rf_tile_kernels(images)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when no CUDA device is visible")
def test_cuda_without_a_gpu_is_refused(images):
    with pytest.raises(RuntimeError, match="no CUDA device"):
        rf.rf_tile_kernels(images, device="cuda")
