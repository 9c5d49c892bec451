"""Run a config: prepare the store, find the tiles still to do, run them on a Dask cluster.

Embedded LocalCluster by default (worker processes, one task at a time each, numba threads = cores of
the worker); or an existing cluster through a scheduler address or scheduler file. At most
`max_in_flight` tasks are submitted at once; failed tasks are retried; a tqdm bar shows progress.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from cntk_gram.pipeline.config import ClusterConfig, RunConfig
from cntk_gram.pipeline.data import prepare_inputs
from cntk_gram.pipeline.errors import UserError
from cntk_gram.pipeline.plan import check_tile_size, tile_pairs
from cntk_gram.pipeline.store import bounds_of, check_existing, layout, prepare_store, tile_status, verify_tile
from cntk_gram.pipeline.cluster import clear_cancel, connect, remove_stray_files, run_tile


def run(config: RunConfig, *, scheduler: str | None = None, scheduler_file: str | None = None,
        progress: bool = True, verify: bool = True) -> dict:
    """Compute every missing tile of `config` into config.store; return a summary dict:
    store, backend, kernels, depths, n_train, n_test, tile, tiles_total, tiles_done_before,
    tiles_damaged, tiles_computed, pairs_computed, wall_seconds.

    verify: re-check the chunk checksums of tiles already done (recomputing damaged ones); False trusts
    the completion records (faster resume of a very large store)."""
    started = time.time()
    scheduler = scheduler or config.cluster.scheduler
    scheduler_file = scheduler_file or config.cluster.scheduler_file
    external = bool(scheduler or scheduler_file)
    # an existing cluster's workers may have GPUs this client lacks: there 'auto' is resolved on a worker
    backend = config.backend if external else _resolve_here(config.backend)
    prep = prepare_run(config, verify=verify)
    inputs, planned, done, damaged, todo = prep.inputs, prep.planned, prep.done, prep.damaged, prep.todo
    bounds = bounds_of(layout(config.store))
    pairs_todo = sum(tile_pairs(bounds, tile) for tile in todo)
    if todo:
        with _client(scheduler=scheduler, scheduler_file=scheduler_file, cluster=config.cluster,
                     backend=backend) as client:
            if backend == "auto":
                backend = client.submit(_resolve_here, "auto", pure=False).result()
                if backend == "gpu":
                    register_gpu_plugin(client)
            _execute(client, todo, config=config, backend=backend,
                     pairs_todo=pairs_todo, progress=progress)
    return {
        "store": str(config.store), "backend": backend, "kernels": list(config.kernel.keys),
        "depths": list(config.kernel.depths), "n_train": inputs.n_train, "n_test": inputs.n_test,
        "tile": config.tiles.size, "tiles_total": len(planned), "tiles_done_before": len(done - damaged),
        "tiles_damaged": len(damaged), "tiles_computed": len(todo), "pairs_computed": pairs_todo,
        "wall_seconds": time.time() - started,
    }


@dataclasses.dataclass(frozen=True)
class PreparedRun:
    """What a run or submit has to do: the loaded inputs and the tiles planned, done, damaged and to do."""
    inputs: object
    planned: list
    done: set
    damaged: set
    todo: list


def prepare_run(config: RunConfig, *, verify: bool = True) -> PreparedRun:
    """Check and create the store, clear leftovers of earlier runs, and list the tiles still to compute.

    verify: re-check the chunk checksums of done tiles (damaged ones are redone); False trusts the records."""
    check_existing(config.store, config)  # refuse a foreign store before the (slow) data load
    known_train = len(config.data.train_index) if config.data.train_index else config.data.train
    if known_train is not None:
        check_tile_size(n_train=known_train, size=config.tiles.size)
    inputs = prepare_inputs(config.data)
    check_tile_size(n_train=inputs.n_train, size=config.tiles.size)
    prepare_store(config.store, config=config, inputs=inputs)
    remove_stray_files(config.store)  # temp files of writes interrupted long ago
    clear_cancel(config.store)  # a new run overrides an earlier `cntk cancel`
    done, planned = tile_status(config.store)
    damaged = _damaged(config.store, done) if verify else set()
    todo = [tile for tile in planned if tile not in done or tile in damaged]
    return PreparedRun(inputs=inputs, planned=planned, done=done, damaged=damaged, todo=todo)


def _resolve_here(name: str) -> str:
    """'auto' | 'cpu' | 'gpu' -> the backend usable in this process ('cpu' or 'gpu')."""
    from cntk_gram.workers.backends import resolve_backend

    try:
        return resolve_backend(name)
    except (RuntimeError, ValueError, ImportError) as exc:
        raise UserError(f"backend {name!r} is not available here: {exc}") from None


def _damaged(store: str, done: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """Done tiles whose chunks fail their checksums (read in a thread pool: I/O and crc32c)."""
    tiles = sorted(done)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = pool.map(lambda tile: verify_tile(store, tile, deep=False), tiles)
        return {tile for tile, found in zip(tiles, problems) if found}


def _execute(client, todo: list[tuple[int, int]], *, config: RunConfig, backend: str,
             pairs_todo: int, progress: bool) -> None:
    """Submit tiles through a bounded window; stop with a UserError when a tile fails after retries."""
    from distributed import as_completed

    threads = sum(client.nthreads().values())
    window = config.cluster.max_in_flight or max(2, 2 * threads)
    kernel = config.kernel
    store = str(Path(config.store).resolve())  # workers may run elsewhere on a shared filesystem

    def submit(tile):
        return client.submit(run_tile, store, tile[0], tile[1], backend=backend,
                             archs=kernel.archs, kinds=kernel.kinds, depths=kernel.depths,
                             retries=config.cluster.retries, pure=False)

    queue = collections.deque(todo)
    pending = as_completed([submit(queue.popleft()) for _ in range(min(window, len(queue)))])
    bar = tqdm(total=pairs_todo, unit="pair", unit_scale=True, disable=not progress, dynamic_ncols=True)
    finished = 0
    try:
        for future in pending:
            try:
                result = future.result()
            except Exception as exc:
                if "scheduler-connection-lost" in str(exc) or client.status != "running":
                    raise UserError("lost the connection to the Dask scheduler; finished tiles are kept, "
                                    "rerun the same command to resume") from None
                raise UserError(f"a tile task failed after {config.cluster.retries} retries: "
                                f"{type(exc).__name__}: {exc}; finished tiles are kept, rerun to resume") from None
            finished += 1
            bar.update(result["pairs"])
            bar.set_postfix_str(f"tiles {finished}/{len(todo)}")
            if queue:
                pending.add(submit(queue.popleft()))
    finally:
        bar.close()
        for future in list(pending.futures):
            future.cancel()


@contextlib.contextmanager
def _client(*, scheduler: str | None, scheduler_file: str | None, cluster: ClusterConfig, backend: str):
    """A connected distributed.Client; the embedded cluster (if any) is shut down on exit."""
    from distributed import Client

    if scheduler or scheduler_file:
        # the run path needs a default client (without one Dask raises "No clients found")
        with connect(scheduler=scheduler, scheduler_file=scheduler_file, set_as_default=True) as client:
            if backend == "gpu":
                register_gpu_plugin(client)
            yield client
        return
    local = _local_cluster(cluster=cluster, backend=backend)
    client = Client(local)
    try:
        if backend == "gpu":
            register_gpu_plugin(client)
        yield client
    finally:
        client.close()
        local.close()


def _local_cluster(*, cluster: ClusterConfig, backend: str):
    """Worker processes with one task slot each; numba gets the cores (env is set before import)."""
    threads = cluster.threads or max(1, (os.cpu_count() or 1) // cluster.workers)
    env = {"NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": "1"}
    if backend == "gpu":
        try:
            from dask_cuda import LocalCUDACluster
            return LocalCUDACluster(threads_per_worker=1, dashboard_address=":0",
                                    silence_logs=logging.ERROR, env=env)
        except ImportError:
            pass
    from distributed import LocalCluster
    return LocalCluster(n_workers=cluster.workers, threads_per_worker=1, processes=True,
                        dashboard_address=":0", silence_logs=logging.ERROR, env=env)


def register_gpu_plugin(client) -> None:
    """Per-worker GPU set-up, when the GPU backend ships its plugin."""
    try:
        from cntk_gram.workers.gpu_plugin import GPUSetup
    except ImportError:
        return
    client.register_plugin(GPUSetup())
