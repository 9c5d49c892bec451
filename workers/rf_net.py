"""The finite random CNN whose infinite-width limit is our exact CNTK, and its per-sample parameter gradients.

Network (NTK parameterisation of Arora et al. 2019, Sec. 4; c_sigma = 2, q = 3; every weight i.i.d. N(0, 1);
3x3 convolutions, stride 1, zero padding, no biases; L = depth - 1 conv layers of `width` channels):

    f_1 = W_1 * x,    g_h = sqrt(c_sigma / (q^2 width)) relu(f_h),    f_{h+1} = W_{h+1} * g_h    (h = 1..L)
    vanilla (CNTK-V):  out = sum_{c,i,j} V[c,i,j] g_L[c,i,j]       trained: W_1..W_L and V
    gap (CNTK-GAP):    out = sum_c v[c] mean_{i,j} g_L[c,i,j]       trained: W_2..W_L (W_1 and v fixed, App. H)

The NTK of this net, sum over trained parameters of d out(x)/dp d out(x')/dp, tends to our exact kernel as width -> inf;
the inner product of the readout's input features (g_L, or its spatial mean for GAP) tends to the exact NNGP.

Gradients are computed by hand from one autograd pass: delta_h = d out / d f_h (batched: samples are independent, so
the gradient of the summed outputs gives each sample's own delta), then d out / d W_h = delta_h . patches(g_{h-1})
per sample (unfold + batched matmul). Torch is imported lazily so the rest of the package works without it.
"""
import hashlib

import numpy as np

C_SIGMA, Q = 2.0, 3


def import_torch():
    """The torch module, or ImportError with the install hint."""
    try:
        import torch
    except ImportError as err:
        raise ImportError("random features need PyTorch, which is not installed: pip install -e .[rf]") from err
    return torch


def network_seed(*, seed: int, draw: int, arch: str, depth: int, width: int) -> int:
    """A 63-bit generator seed fixed by (seed, draw, arch, depth, width) alone: the same net for every tile of a store,
    a different net for every draw, architecture, depth and width."""
    text = f"cntk-gram random features: seed={seed} draw={draw} arch={arch} depth={depth} width={width}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def draw_network(*, arch: str, depth: int, width: int, channels: int, image_shape: tuple[int, int], seed: int,
                 draw: int) -> dict:
    """Parameters of one random net, float32 CPU tensors drawn from a seeded torch.Generator (bit-reproducible):
    "conv1" (width, channels, 3, 3), "conv2".."conv{L}" (width, width, 3, 3), and "readout": (width, P, Q) for
    vanilla, (width,) for gap. L = depth - 1."""
    torch = import_torch()
    gen = torch.Generator().manual_seed(network_seed(seed=seed, draw=draw, arch=arch, depth=depth, width=width))
    params = {}
    for h in range(1, depth):
        cin = channels if h == 1 else width
        params[f"conv{h}"] = torch.randn(width, cin, Q, Q, generator=gen, dtype=torch.float32)
    shape = (width, *image_shape) if arch == "vanilla" else (width,)
    params["readout"] = torch.randn(*shape, generator=gen, dtype=torch.float32)
    return params


def trained_names(arch: str, depth: int) -> list[str]:
    """Names of the trained parameters: every one for vanilla; conv2..conv{L} for gap (first and last layer fixed)."""
    if arch == "vanilla":
        return [f"conv{h}" for h in range(1, depth)] + ["readout"]
    return [f"conv{h}" for h in range(2, depth)]


def forward(params: dict, images, arch: str):
    """Network outputs (B,) for channel-first images (B, C, P, Q); any float dtype and device (params must match).
    Plain differentiable torch code: tests take `torch.func.jacrev` of it."""
    torch = import_torch()
    g = images
    n_conv = sum(name.startswith("conv") for name in params)
    for h in range(1, n_conv + 1):
        w = params[f"conv{h}"]
        g = np.sqrt(C_SIGMA / (Q * Q * w.shape[0])) * torch.relu(torch.nn.functional.conv2d(g, w, padding=1))
    if arch == "vanilla":
        return (g * params["readout"]).sum(dim=(1, 2, 3))
    return g.mean(dim=(2, 3)) @ params["readout"]


def per_sample_gradients(params: dict, images, arch: str) -> tuple[list, object]:
    """Per-sample gradients of the trained parameters and the readout's input features.

    images: (B, C, P, Q) float32 on the params' device. Returns (grads, features): grads is a list with one
    (B, numel) tensor per trained parameter, in `trained_names` order; features is (B, width*P*Q) for vanilla
    (g_L, which is also d out / d V) and (B, width) for gap (spatial mean of g_L).
    """
    torch = import_torch()
    depth = sum(name.startswith("conv") for name in params) + 1
    width = params["conv1"].shape[0]
    scale = np.sqrt(C_SIGMA / (Q * Q * width))
    with torch.enable_grad():
        inputs, pre = [images], []
        # f_1 is made a leaf: the backward pass then stops there and never differentiates the images.
        f = torch.nn.functional.conv2d(images, params["conv1"], padding=1).detach().requires_grad_(True)
        for h in range(1, depth):
            pre.append(f)
            g = scale * torch.relu(f)
            if h < depth - 1:
                inputs.append(g)
                f = torch.nn.functional.conv2d(g, params[f"conv{h + 1}"], padding=1)
        if arch == "vanilla":
            out = (g * params["readout"]).sum()
            features = g.detach().flatten(1)
        else:
            pooled = g.mean(dim=(2, 3))
            out = (pooled @ params["readout"]).sum()
            features = pooled.detach()
        first = 1 if arch == "vanilla" else 2  # GAP: no gradient of W_1 (fixed) is needed
        wanted = pre[first - 1:]
        deltas = torch.autograd.grad(out, wanted) if wanted else []
    grads = []
    for h, delta in zip(range(first, depth), deltas):
        patches = torch.nn.functional.unfold(inputs[h - 1], Q, padding=1)  # (B, cin*9, P*Q)
        grads.append(torch.bmm(delta.flatten(2), patches.transpose(1, 2)).flatten(1))  # (B, width*cin*9)
    if arch == "vanilla":
        grads.append(features)  # d out / d V = g_L
    return grads, features


def flop_counts(*, arch: str, depth: int, width: int, channels: int, image_shape: tuple[int, int]) -> dict:
    """Float operations (multiply and add counted apart) of the rf kernel for one net.

    per_image: gradients of one image (forward convs, backward through the convs down to the first trained layer,
    per-sample weight gradients); per_pair: the inner products of one pair (NTK over trained parameters + NNGP
    features). The grouped tile loop recomputes gradients, see `rf.gradient_passes`.
    """
    pq = int(np.prod(image_shape))
    conv = [2 * pq * width * (channels if h == 1 else width) * Q * Q for h in range(1, depth)]
    first = 1 if arch == "vanilla" else 2
    backward = sum(conv[first:])  # delta_h from delta_{h+1} for h >= first: the convs above the first trained one
    weight_grads = sum(conv[first - 1:])
    trained = sum(c // (2 * pq) for c in conv[first - 1:]) + (width * pq if arch == "vanilla" else 0)
    features = width * pq if arch == "vanilla" else width
    return {"per_image": sum(conv) + backward + weight_grads, "per_pair": 2 * (trained + features),
            "trained_parameters": trained}
