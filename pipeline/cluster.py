"""Dask clusters: connect to a running scheduler or start the embedded local one, set up GPU workers,
and decide which tile backend the workers use.

Every worker of the embedded cluster, CPU or GPU, gets the environment of worker_env: the thread
counts must be in place before the worker imports numba or a BLAS.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from cntk_gram.pipeline.config import ClusterConfig
from cntk_gram.pipeline.errors import UserError

CONNECT_TIMEOUT_S = 5
WORKER_WAIT_S = 60  # how long deciding backend 'auto' waits for a first worker
# Tile tasks per GPU worker: the GPU backend serialises device use (workers/gpu.py, _device_lock), so the
# other slots only let tiles' host work (input read, copy to the host, store writes) overlap the current
# tile's kernels. A tile's host work (~110 ms per 1000 x 1000 tile at 5 depths) outlasts its CNTK-V
# kernels (~60 ms), so two other tiles must be in their host part at once: 3 slots
# (benchmarks/results/host-cpu-slots.json: 1/2/3/4 slots 5.2/8.3/9.0/10.1 M pairs/s on 2 cores).
GPU_SLOTS = 3


@contextlib.contextmanager
def connect(*, scheduler: str | None, scheduler_file: str | None, set_as_default: bool = False):
    """A Client on an existing cluster; UserError with what to do when it cannot be reached."""
    from distributed import Client

    if not scheduler and not scheduler_file:
        raise UserError("no cluster given: pass --scheduler ADDRESS (e.g. tcp://host:8786) or "
                        "--scheduler-file FILE; `cntk run` uses an embedded local cluster instead")
    if scheduler and scheduler_file:
        raise UserError("give either --scheduler or --scheduler-file, not both")
    if scheduler_file and not Path(scheduler_file).is_file():
        raise UserError(f"scheduler file {scheduler_file} does not exist; start the scheduler with "
                        f"--scheduler-file {scheduler_file} first")
    target = scheduler or scheduler_file
    try:
        client = Client(address=scheduler, scheduler_file=scheduler_file,
                        timeout=f"{CONNECT_TIMEOUT_S}s", set_as_default=set_as_default)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        raise UserError(f"cannot reach the Dask scheduler at {target} within {CONNECT_TIMEOUT_S} s "
                        f"({type(exc).__name__}); check the address and that the scheduler is running") from None
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def open_client(*, scheduler: str | None, scheduler_file: str | None, cluster: ClusterConfig, backend: str):
    """A Client on the given scheduler, else on an embedded local cluster that is shut down on exit.

    backend: 'cpu' or 'gpu' picks the kind of local workers; unused for an existing cluster.
    """
    from distributed import Client

    if scheduler or scheduler_file:
        # the execution loop needs a default client (without one Dask raises "No clients found")
        with connect(scheduler=scheduler, scheduler_file=scheduler_file, set_as_default=True) as client:
            yield client
        return
    local = local_cluster(cluster=cluster, backend=backend)
    client = Client(local)
    try:
        yield client
    finally:
        client.close()
        local.close()


# OpenBLAS threads spin for 2^28 cycles (~0.1 s) after each call by default, holding the cores the numba pass
# after a tile's matrix product (fc) needs: 1.7x slower at depth 21 measured. 2^20 cycles is ~0.4 ms.
BLAS_SPIN = "20"


def worker_env(cluster: ClusterConfig, *, n_workers: int) -> dict[str, str]:
    """Environment of a local worker process: numba and OpenBLAS get the worker's share of the cores
    (cluster.threads when given), OpenBLAS with a short spin (BLAS_SPIN), OpenMP one thread (the tile kernels
    parallelise with numba; BLAS and numba run one after the other)."""
    threads = str(cluster.threads or max(1, (os.cpu_count() or 1) // max(1, n_workers)))
    return {"NUMBA_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "OPENBLAS_THREAD_TIMEOUT": BLAS_SPIN,
            "OMP_NUM_THREADS": "1"}


def task_slots(cluster: ClusterConfig, *, backend: str) -> int:
    """Tile tasks one local worker runs at once (its Dask threads): cluster.slots, else GPU_SLOTS for
    backend 'gpu' and 1 for 'cpu'."""
    if cluster.slots is not None:
        return cluster.slots
    return GPU_SLOTS if backend == "gpu" else 1


def local_cluster(*, cluster: ClusterConfig, backend: str):
    """Worker processes on this machine with task_slots threads each, all with worker_env: one per GPU
    (dask-cuda) for the GPU backend when dask-cuda is installed, else cluster.workers CPU workers."""
    import dask

    options = {"threads_per_worker": task_slots(cluster, backend=backend), "dashboard_address": ":0",
               "silence_logs": logging.ERROR}
    cuda = None
    if backend == "gpu":
        try:
            from dask_cuda import LocalCUDACluster
            from dask_cuda.utils import get_n_gpus
        except ImportError:
            pass
        else:
            cuda = LocalCUDACluster, get_n_gpus()
    env = worker_env(cluster, n_workers=cuda[1] if cuda else cluster.workers)
    # The nanny's pre-spawn environment is in place when a worker process starts, before it imports anything (a
    # BLAS reads its thread settings when it loads; Dask's default there is one BLAS thread). The `env` option
    # arrives too late for that, and LocalCUDACluster replaces it with CUDA_VISIBLE_DEVICES alone.
    pre_spawn = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **env}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": pre_spawn}):
        if cuda:
            return cuda[0](**options)
        from distributed import LocalCluster

        return LocalCluster(n_workers=cluster.workers, processes=True, env=env, **options)


def register_gpu_plugin(client) -> None:
    """Per-worker GPU set-up, when the GPU backend ships its plugin."""
    try:
        from cntk_gram.workers.gpu_plugin import GPUSetup
    except ImportError:
        return
    client.register_plugin(GPUSetup())


def resolve_here(name: str) -> str:
    """'auto' | 'cpu' | 'gpu' -> the backend usable in this process ('cpu' or 'gpu')."""
    from cntk_gram.workers.backends import resolve_backend

    try:
        return resolve_backend(name)
    except (RuntimeError, ValueError, ImportError) as exc:
        raise UserError(f"backend {name!r} is not available here: {exc}") from None


def resolve_on_cluster(client, name: str) -> str:
    """'auto' is decided by a worker (the client's machine may have no GPU): waits at most WORKER_WAIT_S
    for one to join. 'cpu' and 'gpu' are returned as given, so tiles can be queued before workers join."""
    if name != "auto":
        return name
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except TimeoutError:
        raise UserError(f"the cluster has no workers (waited {WORKER_WAIT_S} s); start workers, or give "
                        "backend: cpu or backend: gpu so that tiles can be queued before workers join") from None
    return client.submit(resolve_here, name, pure=False).result()
