"""Random features: the empirical NTK of one finite random CNN per (draw, architecture, depth), on a tile of images.

    from cntk_gram.workers.rf import rf_tile_kernels
    k = rf_tile_kernels(x, y, archs=("vanilla", "gap"), depths=(3, 6), width=128, draw=0, seed=0)
    k["rf-ntk-vanilla"].shape    # (2, n, m): depth depths[i] at index i; float32

The network is defined in `rf_net` (the finite counterpart of our exact kernels). Each requested depth is its own
network (a depth-D net is not a prefix of a deeper one), drawn from a seed fixed by (seed, draw, arch, depth, width):
every tile of a store sees the same net. Gradients are float32; each parameter tensor's Gram block is a float32 matmul,
summed over tensors and chunks in float64.

Memory is bounded by `max_bytes`, never by the tile size (apart from the (n, m) result): the gradients of a group of
column images are held while row images stream through in chunks (see `plan_memory`); a diagonal tile (y None)
reuses the group's own gradients for its rows and mirrors the upper triangle.
"""
import contextlib
from dataclasses import dataclass

import numpy as np

from . import rf_net
from .validate import check_pair
from .vocab import KINDS, RF_ARCHS, KernelKey

DEFAULT_MAX_BYTES = 2 ** 30
MAX_CHUNK = 64  # images per backward pass: larger batches gain little and cost activation memory


def _check_int(name, value, minimum, allowed):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"random features: {name} must be {allowed}, got {value!r}")
    return int(value)


def check_rf_args(*, archs, kinds, depths, width, draw, seed, max_bytes) -> tuple:
    """Validated (archs, kinds, depths) tuples; one ValueError naming the bad argument and what is allowed."""
    archs = (archs,) if isinstance(archs, str) else tuple(archs)
    bad = [a for a in archs if a not in RF_ARCHS]
    if bad or not archs:
        raise ValueError(f"unknown random-features architecture {bad or archs!r}; allowed: {', '.join(RF_ARCHS)}")
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown random-features kind {bad or kinds!r}; allowed: {', '.join(KINDS)}")
    depths = (depths,) if isinstance(depths, (int, np.integer)) else tuple(depths)
    if not depths:
        raise ValueError("random features: depths must list at least one depth >= 2 (conv layers + 1)")
    depths = tuple(_check_int("every depth", d, 2, "an integer >= 2 (paper depth = conv layers + 1)")
                   for d in depths)
    if len(set(depths)) != len(depths):
        raise ValueError(f"random features: depths must not repeat, got {depths}")
    _check_int("width", width, 1, "an integer >= 1 (channels per conv layer)")
    _check_int("draw", draw, 0, "an integer >= 0 (which random net)")
    _check_int("seed", seed, 0, "an integer >= 0")
    _check_int("max_bytes", max_bytes, 1, "a positive integer (memory budget in bytes)")
    return archs, kinds, depths


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' / 'cuda:N' without one raises RuntimeError."""
    torch = rf_net.import_torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        if not torch.cuda.is_available():
            raise RuntimeError(f"random features: device {device!r} requested but torch sees no CUDA device; "
                               "use device 'auto' or 'cpu'")
        return device
    raise ValueError(f"random features: unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N")


def image_bytes(*, arch: str, depth: int, width: int, channels: int, image_shape: tuple[int, int]) -> tuple[int, int]:
    """(gradient bytes held per image, transient backward-pass bytes per image), float32. The transient estimate
    counts the conv inputs, pre-activations, deltas and autograd's saved tensors of all L layers, plus one
    layer's 3x3 patches (twice)."""
    flops = rf_net.flop_counts(arch=arch, depth=depth, width=width, channels=channels, image_shape=image_shape)
    pq, n_conv = int(np.prod(image_shape)), depth - 1
    held = 4 * (flops["trained_parameters"] + (width * pq if arch == "vanilla" else width))
    # measured on CPU (peak RSS): relu, the scaling and autograd each keep a copy per layer, and bmm copies the
    # transposed patches
    transient = 4 * pq * ((6 * n_conv + 2) * width + 18 * max(width, channels))
    return held, transient


@dataclass(frozen=True)
class MemoryPlan:
    """chunk: images per backward pass (rows stream in chunks); group: column images whose gradients are held."""
    chunk: int
    group: int


def plan_memory(held: int, transient: int, max_bytes: int, n_cols: int) -> MemoryPlan:
    """Largest chunk (<= MAX_CHUNK, at most a quarter of the budget) and column group with
    group * held + chunk * (held + transient) <= max_bytes. Raises ValueError when one image does not fit."""
    need = 2 * held + transient
    if max_bytes < need:
        raise ValueError(f"random features: max_bytes={max_bytes} is below the {need} bytes one image pair needs "
                         "at this width, depth and image size; raise max_bytes")
    chunk = int(max(1, min(MAX_CHUNK, max_bytes // 4 // (held + transient), n_cols)))
    group = int(max(1, min(n_cols, (max_bytes - chunk * (held + transient)) // held)))
    return MemoryPlan(chunk=chunk, group=group)


def gradient_passes(n: int, m: int, plan: MemoryPlan, diagonal: bool) -> int:
    """How many image gradients one tile computes with this plan (recomputation included): the cost model's count."""
    total = 0
    for j0 in range(0, m, plan.group):
        total += min(plan.group, m - j0) + (j0 if diagonal else n)
    return total


def _gradients(params, images, arch, chunk):
    """Per-sample gradients of images (B, C, P, Q) in backward passes of `chunk`: (list of (B, numel), features)."""
    torch = rf_net.import_torch()
    grads = features = None
    for i in range(0, len(images), chunk):
        part, feats = rf_net.per_sample_gradients(params, images[i:i + chunk], arch)
        if grads is None:  # filled in place: concatenating would hold every gradient twice
            grads = [torch.empty((len(images), g.shape[1]), dtype=g.dtype, device=g.device) for g in part]
            features = torch.empty((len(images), feats.shape[1]), dtype=feats.dtype, device=feats.device)
        for buf, g in zip(grads, part):
            buf[i:i + len(g)] = g
        features[i:i + len(feats)] = feats
    return grads, features


def _accumulate(out, rows, cols, a, b):
    """out["ntk"/"nngp"][rows, cols] += float64 sums of float32 Gram blocks; a, b: (grads, features) pairs."""
    if "ntk" in out and a[0]:  # a GAP net of depth 2 has no trained parameter: its NTK stays 0
        out["ntk"][rows, cols] += sum((ga @ gb.T).double() for ga, gb in zip(a[0], b[0])).cpu().numpy()
    if "nngp" in out:
        out["nngp"][rows, cols] += (a[1] @ b[1].T).double().cpu().numpy()


def _net_tile(params, xs, ys, arch, kinds, plan) -> dict:
    """Kernels of one net on channel-first device images xs (n,...), ys (m,...) or None (diagonal): kind -> (n, m)
    float64."""
    n = len(xs)
    cols = xs if ys is None else ys
    m = len(cols)
    out = {kind: np.zeros((n, m)) for kind in kinds}
    for j0 in range(0, m, plan.group):
        j1 = min(m, j0 + plan.group)
        col = _gradients(params, cols[j0:j1], arch, plan.chunk)
        # rows held by the group itself (diagonal tile) are sliced, not recomputed; only rows < j1 are needed there
        row_starts = range(0, j0 if ys is None else n, plan.chunk)
        for i0 in row_starts:
            i1 = min(i0 + plan.chunk, j0 if ys is None else n)
            _accumulate(out, slice(i0, i1), slice(j0, j1), _gradients(params, xs[i0:i1], arch, plan.chunk), col)
        if ys is None:
            _accumulate(out, slice(j0, j1), slice(j0, j1), col, col)
    if ys is None:  # mirror the computed upper triangle: the diagonal tile is exactly symmetric
        for kind, k in out.items():
            out[kind] = np.triu(k) + np.triu(k, 1).T
    return out


def rf_tile_kernels(x, y=None, *, archs=("vanilla",), depths=(3,), kinds=("ntk",), width: int = 128, draw: int = 0,
                    seed: int = 0, max_bytes: int = DEFAULT_MAX_BYTES, device: str = "auto") -> dict:
    """Random-features kernels of one random net per (arch, depth) on the tile (x, y).

    x: (n, P, Q, C) preprocessed images; y: (m, P, Q, C) or None (y = x: a diagonal tile, exactly symmetric result).
    archs: "vanilla" (CNTK-V net, all layers trained) and/or "gap" (CNTK-GAP net, first and last layer fixed).
    depths: paper depths (conv layers + 1), one net each. kinds: "ntk" (inner products of the trained parameters'
    gradients) and/or "nngp" (inner products of the readout's input features). width: channels per conv layer.
    draw, seed: which net (see `rf_net.network_seed`). max_bytes: memory budget of the gradients and backward pass.
    device: "auto" (CUDA when torch sees a GPU), "cpu", "cuda" or "cuda:N".
    Returns {"rf-{kind}-{arch}": float32 (len(depths), n, m)}, depth depths[i] at index i.
    Raises ValueError for bad arguments or images, ImportError without torch.
    """
    archs, kinds, depths = check_rf_args(archs=archs, kinds=kinds, depths=depths, width=width, draw=draw, seed=seed,
                                         max_bytes=max_bytes)
    x, y = check_pair(x, y)
    torch = rf_net.import_torch()
    device = resolve_device(device)
    n, p, q, channels = x.shape
    m = n if y is None else len(y)

    def to_device(images):
        return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float32)).to(device)

    xs = to_device(x)
    ys = None if y is None else to_device(y)
    key = {(kind, arch): str(KernelKey(kind, arch, rf=True)) for arch in archs for kind in kinds}
    out = {key[kind, arch]: np.zeros((len(depths), n, m), np.float32) for arch in archs for kind in kinds}
    # full float32 on GPUs: cuDNN would otherwise run the convolutions in TF32 (10-bit mantissa)
    flags = (torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False,
                                          fp32_precision="ieee")
             if device != "cpu" else contextlib.nullcontext())
    with flags, torch.no_grad():
        for arch in archs:
            for d, depth in enumerate(depths):
                shape = dict(arch=arch, depth=depth, width=width, channels=channels, image_shape=(p, q))
                plan = plan_memory(*image_bytes(**shape), max_bytes, m)
                params = {k: v.to(device) for k, v in
                          rf_net.draw_network(**shape, seed=seed, draw=draw).items()}
                for kind, k in _net_tile(params, xs, ys, arch, kinds, plan).items():
                    out[key[kind, arch]][d] = k
    return out

