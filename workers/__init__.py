"""Exact infinite-width kernels of Arora et al. 2019, computed on blocks of images.

Public API (shapes: images are (n, P, Q, C) floats, preprocessed; kernels are (max_depth - 1, n, m)):

    from cntk_gram.workers import kernel_block, preprocess, channel_stats, targets
    k = kernel_block(x, y, archs=("vanilla", "gap"), max_depth=21)   # dict "ntk-vanilla" -> (20, n, m)
    k["ntk-vanilla"][6 - 2]   # CNTK-V of depth 6 (5 conv layers + the output layer)

`archs`: "vanilla" (CNTK-V, all layers trained), "gap" (CNTK-GAP, Appendix H), "fc" (fully-connected ReLU NTK/NNGP on
flattened images). Each comes with its NNGP ("nngp-{arch}") from the same pass. Depth d is at index d - 2.
Enhanced readouts (docs/enhanced.md, CPU and GPU backends): lap=(2, 4) adds "ntk-lap2", "nngp-lap2", ... (needs "gap");
flip=True adds "{key}-flip" for every key. ZCA: params = zca_fit(train, epsilon); zca_apply(images, params).
"""
# One importable name per module: never a second copy of this package under the folder's bare name.
if __name__ != "cntk_gram.workers":
    raise ImportError(f"the folder workers/ is the package cntk_gram.workers and cannot be imported as {__name__!r}: "
                      "install the package (pip install -e . in the repository root) and import cntk_gram.workers")

import numpy as np  # noqa: E402

from .backends import get_backend, resolve_backend  # noqa: E402
from .preprocess import channel_stats, preprocess, targets, zca_apply, zca_fit  # noqa: E402
from .reference import cntk_reference, fc_reference  # noqa: E402

__all__ = ["kernel_block", "channel_stats", "preprocess", "targets", "zca_fit", "zca_apply", "cntk_reference",
           "fc_reference", "get_backend", "resolve_backend"]


def kernel_block(x, y=None, *, archs=("vanilla", "gap"), max_depth: int = 21, backend: str = "auto",
                 dtype=np.float32, lap=(), flip: bool = False, depths=None, kinds=None) -> dict:
    """Kernel values for every pair (x[a], y[b]) and every depth 2..max_depth, in one pass.

    x: (n, P, Q, C), y: (m, P, Q, C) or None (the Gram of x with itself). backend: "auto", "cpu" or "gpu" (GPU needs
    images up to 32x32 with 1..32 channels). dtype (CPU only): float32 (fast) or float64. Returns {"{kind}-{arch}": (max_depth-1, n, m)}.
    lap, flip: LAP(c) readouts and flip-averaged kernels (both backends), keys in docs/enhanced.md.
    depths, kinds: return only these depths (stack index i holds depths[i]) and kinds ("ntk", "nngp"); None = all.
    Raises ValueError naming the problem for bad shapes, non-finite pixels, depth < 2 or an unknown architecture.
    """
    name = resolve_backend(backend)
    options = dict(archs=archs, max_depth=max_depth, lap=lap, flip=flip, depths=depths, kinds=kinds)
    if name == "cpu":
        return get_backend("cpu").tile_kernels(x, y, dtype=dtype, **options)
    return get_backend(name).tile_kernels(x, y, **options)
