"""The unit of work: one tile, every requested kernel (LAP and flip-averaged ones too) and depth (and every
random-features draw), run on a Dask worker.

run_tile is what the client submits: it skips a tile whose run was cancelled or that is already done
and intact (a second submission, or a task that started after another writer finished the tile), and
otherwise calls compute_tile.

backend 'auto' reaches a task when `cntk submit` found no worker to ask (worker jobs still queued): the task's own
worker then decides it (decide_backend), as `cntk run` does on its machine.
"""
from __future__ import annotations

import functools
import socket
import time

import zarr

from cntk_gram.pipeline.plan import tile_pairs
from cntk_gram.pipeline.records import cancel_requested
from cntk_gram.pipeline.store import array_name, bounds_of, layout, verify_tile, write_tile


def run_tile(store_path: str, I: int, J: int, *, backend: str, archs: tuple[str, ...],
             kinds: tuple[str, ...], depths: tuple[int, ...], lap: tuple[int, ...] = (), flip: bool = False,
             random_features: dict | None = None) -> dict:
    """compute_tile unless the store's run was cancelled or the tile is already done and intact.

    Same arguments as compute_tile. Returns compute_tile's dict, or {'tile', 'pairs': 0, 'seconds': 0,
    'compute_seconds': 0, 'skipped': 'cancelled' | 'done'}.
    """
    skipped = {"tile": (I, J), "pairs": 0, "seconds": 0.0, "compute_seconds": 0.0}
    if cancel_requested(store_path):
        return {**skipped, "skipped": "cancelled"}
    if not verify_tile(store_path, (I, J), deep=False):
        return {**skipped, "skipped": "done"}
    return compute_tile(store_path, I, J, backend=backend, archs=archs, kinds=kinds, depths=depths, lap=lap,
                        flip=flip, random_features=random_features)


def compute_tile(store_path: str, I: int, J: int, *, backend: str, archs: tuple[str, ...],
                 kinds: tuple[str, ...], depths: tuple[int, ...], lap: tuple[int, ...] = (), flip: bool = False,
                 random_features: dict | None = None) -> dict:
    """Compute tile (I, J) and write it into the store; return {'tile', 'pairs', 'seconds', 'compute_seconds'}.

    Reads rows I and columns J of inputs/images from the store, runs the backend once with
    max_depth = max(depths) (returning only the kinds and depths asked for), writes one chunk per output key and
    depth, then the completion record. lap, flip: the LAP(c) readouts and flip-averaged kernels (docs/enhanced.md),
    from the same call; every output key ({kind}-{arch}, {kind}-lap{c}, and with flip each + '-flip') becomes
    gram/{key}/depth-{D}.
    random_features: None, or {'archs', 'width', 'draws', 'seed', 'max_bytes'}: then every draw's
    random-features kernels (rf_tile_kernels, on CUDA for the gpu backend, else the CPU) are computed too,
    and the one record covers them all. Deterministic for a given backend, so a recomputed tile is bit-identical.
    """
    from cntk_gram.workers.backends import get_backend  # imported on the worker: the GPU backend needs its device

    started = time.time()
    bounds = bounds_of(layout(store_path))
    (r0, r1), (c0, c1) = bounds[I], bounds[J]
    images = zarr.open_array(store_path, path="inputs/images", mode="r")
    backend = decide_backend(backend, archs=archs, shape=images.shape[1:])
    x = images[r0:r1]
    y = None if I == J else images[c0:c1]
    kernels = get_backend(backend).tile_kernels(x, y, archs=tuple(archs), max_depth=max(depths), lap=tuple(lap),
                                                flip=bool(flip), depths=tuple(depths), kinds=tuple(kinds))
    computed = time.time()
    blocks = {array_name(key, depth): stack[i] for key, stack in kernels.items() for i, depth in enumerate(depths)}
    extra = {}
    if random_features:
        blocks.update(_rf_blocks(x, y, backend=backend, kinds=kinds, depths=depths, **random_features))
        extra = {"torch": _torch_version(), "rf_seconds": time.time() - computed}
        computed = time.time()
    record = write_tile(store_path, (I, J), blocks, {
        "pairs": tile_pairs(bounds, (I, J)), "backend": backend, "host": socket.gethostname(),
        "worker": _worker_address(),
        "started": started, "compute_seconds": computed - started, **extra,
    })
    return {"tile": (I, J), "pairs": record["pairs"], "seconds": record["finished"] - started,
            "compute_seconds": record["compute_seconds"]}


def decide_backend(backend: str, *, archs: tuple[str, ...], shape: tuple[int, ...]) -> str:
    """backend 'cpu' | 'gpu' as given; 'auto' decided on this worker: 'gpu' when CuPy sees a device and the GPU
    kernels take images of this (H, W, C) shape (or only fc is asked for), else 'cpu' (run.fit_backend's rule)."""
    if backend != "auto":
        return backend
    from cntk_gram.workers.backends import resolve_backend
    from cntk_gram.workers.gpu import check_image_shape

    if resolve_backend("auto") == "cpu":
        return "cpu"
    if any(arch != "fc" for arch in archs):
        try:
            check_image_shape(tuple(shape))
        except ValueError:
            return "cpu"
    _gpu_setup()
    return "gpu"


@functools.cache
def _gpu_setup() -> None:
    """Once per worker process: the GPU set-up that register_gpu_plugin gives the workers of backend 'gpu'."""
    from cntk_gram.workers.gpu_plugin import GPUSetup

    try:
        from distributed import get_worker
        worker = get_worker()
    except (ImportError, ValueError):
        worker = None
    GPUSetup().setup(worker)


def _rf_blocks(x, y, *, backend: str, kinds, depths, archs, width: int, draws: int, seed: int,
               max_bytes: int) -> dict:
    """{array name: (n, m) float32 block} of every random-features kernel, depth and draw of one tile."""
    from cntk_gram.workers.rf import rf_tile_kernels  # needs torch: imported on the worker only

    device = "cuda" if backend == "gpu" else "cpu"
    blocks = {}
    for draw in range(draws):
        kernels = rf_tile_kernels(x, y, archs=tuple(archs), depths=tuple(depths), kinds=tuple(kinds), width=width,
                                  draw=draw, seed=seed, max_bytes=max_bytes, device=device)
        for key, stack in kernels.items():
            for i, depth in enumerate(depths):
                blocks[array_name(key, depth, draw)] = stack[i]
    return blocks


def _torch_version() -> str:
    import torch
    return torch.__version__


def _worker_address() -> str | None:
    """Address of the Dask worker running this task (None outside a worker)."""
    try:
        from distributed import get_worker
        return get_worker().address
    except (ImportError, ValueError):
        return None
