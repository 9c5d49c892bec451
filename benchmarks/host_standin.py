"""Dask worker preload for benchmarks/bench_host.py: a GPU stand-in for the CPU backend's tile kernel.

Loaded through DASK_DISTRIBUTED__WORKER__PRELOAD by the workers of `cntk run --backend cpu`; it replaces
`cntk_gram.workers.cpu.tile_kernels` with `standin_tile_kernels`, which emulates the GPU backend's device side:
under one process-wide lock (like workers/gpu.py's `_device_lock`) it sleeps pairs x ns-per-pair (sleeping
releases the GIL, like waiting on a CUDA stream) and then copies the result planes from a "device" buffer into
fresh host arrays (the GPU backend's copy to the host, also under its lock). It also wraps
`cntk_gram.pipeline.tasks.compute_tile` to log when each tile task starts and ends. Settings, from the environment:

    CNTK_STANDIN_NS_PER_PAIR  device nanoseconds per pair (a diagonal tile of n images has n(n+1)/2 pairs)
    CNTK_STANDIN_COPY         all: every plane, 2 kinds x (max_depth - 1) layers; selected: only the asked-for ones
    CNTK_STANDIN_DEPTHS       comma-separated depths the run asks for, and
    CNTK_STANDIN_TILE         tile edge: the device buffer is made at start-up, not in the first tile
    CNTK_STANDIN_LOG          file; one line per event (epoch seconds): 'task T0 T1' per tile task, 'write T0 T1'
                              per store.write_tile (chunks + record), 'device REQ T0 T1 COPY_S' per kernel call
                              (asked for the lock at REQ, held it T0..T1, COPY_S of that was the copy)
"""
import os
import threading
import time

import numpy as np

import cntk_gram.pipeline.tasks as tasks
import cntk_gram.workers.cpu as cpu
from cntk_gram.workers.vocab import KINDS, KernelKey

_device_lock = threading.Lock()
_log_lock = threading.Lock()
_source = {"planes": None}  # the "device" result buffer: (2, layers, n, m) float32, finite non-constant values


def _env_list(name: str, cast=str) -> tuple | None:
    text = os.environ.get(name, "")
    return tuple(cast(v) for v in text.split(",") if v) or None


def _log(line: str) -> None:
    with _log_lock, open(os.environ["CNTK_STANDIN_LOG"], "a") as log:
        log.write(line + "\n")


def _device_planes(layers: int, n: int, m: int) -> np.ndarray:
    """A (2, layers, n, m) view of the device buffer (made once, grown when a larger tile comes)."""
    planes = _source["planes"]
    if planes is None or planes.shape[1] < layers or planes.shape[2] < n or planes.shape[3] < m:
        rng = np.random.default_rng(0)  # random values: store writes of constant chunks could be cheaper
        planes = rng.random((2, layers, max(n, m), max(n, m)), dtype=np.float32) + np.float32(0.5)
        _source["planes"] = planes
    return planes[:, :layers, :n, :m]


def standin_tile_kernels(x, y=None, *, archs, max_depth, lap=(), flip=False, depths=None, kinds=None, **_):
    """The backend interface: {f"{kind}-vanilla": float32 (len(depths), n, m)}, index i holding depths[i] (None:
    every depth 2..max_depth, at index d - 2; kinds None: ntk and nngp)."""
    n = len(x)
    m = n if y is None else len(y)
    layers = max_depth - 1
    pairs = n * (n + 1) // 2 if y is None else n * m
    depths = tuple(depths or range(2, max_depth + 1))
    kinds = tuple(kinds or KINDS)
    copy_all = os.environ.get("CNTK_STANDIN_COPY", "all") == "all"
    source = _device_planes(layers, n, m)
    requested = time.time()
    with _device_lock:
        t0 = time.time()
        time.sleep(pairs * float(os.environ.get("CNTK_STANDIN_NS_PER_PAIR", "60")) * 1e-9)
        copy_start = time.time()
        if copy_all:
            host = np.empty_like(source)
            np.copyto(host, source)
        else:
            stacks = {kind: np.empty((len(depths), n, m), np.float32) for kind in kinds}
            for kind, stack in stacks.items():
                for i, depth in enumerate(depths):
                    np.copyto(stack[i], source[KINDS.index(kind), depth - 2])
        t1 = time.time()
    _log(f"device {requested:.6f} {t0:.6f} {t1:.6f} {t1 - copy_start:.6f}")
    if copy_all:  # the asked-for depths, cut from the full copy outside the lock
        stacks = {kind: host[KINDS.index(kind)][[d - 2 for d in depths]] for kind in kinds}
    return {str(KernelKey(kind, "vanilla")): stacks[kind] for kind in kinds}


def _timed(event, function):
    def timed(*args, **kwargs):
        t0 = time.time()
        result = function(*args, **kwargs)
        _log(f"{event} {t0:.6f} {time.time():.6f}")
        return result
    timed.standin = True
    return timed


# dask may run a preload twice in one namespace: patch only once
if not getattr(tasks.compute_tile, "standin", False):
    if os.environ.get("CNTK_STANDIN_TILE"):
        edge = int(os.environ["CNTK_STANDIN_TILE"])
        depths = _env_list("CNTK_STANDIN_DEPTHS", int) or (21,)
        _device_planes(max(depths) - 1, edge, edge)
    cpu.tile_kernels = standin_tile_kernels
    tasks.compute_tile = _timed("task", tasks.compute_tile)
    tasks.write_tile = _timed("write", tasks.write_tile)
