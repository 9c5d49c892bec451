"""Run a config on a Dask cluster: compute its missing tiles and wait (`run`), hand them to a running
cluster and return (`submit`), or stop them (`cancel`).

`run` uses the embedded local cluster unless a scheduler is given; it keeps at most `max_in_flight`
tasks submitted, retries failed ones and shows a tqdm bar. `submit` gives every missing tile to the
cluster as a fire-and-forget task: the work goes on after the client exits, and `cntk status STORE`
follows it from any machine that sees the store. Both prepare the store with prepare_run, choose the
scheduler, resolve the backend and submit tiles through the same functions.

Why two clients (or a resubmission) cannot corrupt a store:
- submitted task keys are `cntk-{store id}-{I}-{J}`: the scheduler merges a second submission of a
  tile that is still queued or running into the first one;
- a task that starts after its tile was finished (by anyone) re-checks the record and skips;
- tiles are deterministic and every chunk and record is published by an atomic rename (chunks: zarr's
  LocalStore from 3.1.3 on, the version pyproject.toml requires; records: records.py), so two writers of one
  tile write the same bytes and a reader never sees a half-written file.

`cancel` sets the store's cancel flag, which every task checks before it starts, and cancels the
store's queued tasks on the scheduler by key prefix. Running tiles finish normally.
"""
from __future__ import annotations

import collections
import errno
import dataclasses
import hashlib
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from cntk_gram.pipeline.cluster import (connect, open_client, register_gpu_plugin, resolve_here,
                                        resolve_on_cluster)
from cntk_gram.pipeline.config import RunConfig
from cntk_gram.pipeline.data import Inputs, prepare_inputs
from cntk_gram.pipeline.errors import UserError
from cntk_gram.pipeline.plan import (RunCost, block_bounds, check_disk, check_tile_size, free_bytes, gib,
                                     plan_tiles, run_cost, tile_pairs)
from cntk_gram.pipeline.predict import (LOCAL_END_S, LOCAL_START_S, Eta, RunPrediction, calibrate, describe,
                                        numba_threads, predict_run, slow_cpu_warning, unknown)
from cntk_gram.pipeline.records import clear_cancel, remove_stray_files, request_cancel, write_prediction
from cntk_gram.pipeline.store import (bounds_of, check_existing, layout, planned_arrays, prepare_store, tile_status,
                                      verify_tile)
from cntk_gram.pipeline.tasks import run_tile


# --- what a run has to do -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PreparedRun:
    """What a run or submit has to do: the loaded inputs and the tiles planned, done, damaged and to do."""
    inputs: Inputs
    planned: list[tuple[int, int]]
    done: set[tuple[int, int]]
    damaged: set[tuple[int, int]]
    todo: list[tuple[int, int]]
    cost: RunCost


def prepare_run(config: RunConfig, *, verify: bool = True) -> PreparedRun:
    """Check and create the store, clear leftovers of earlier runs, and list the tiles still to compute.

    verify: re-check the chunk checksums of done tiles (damaged ones are redone); False trusts the records."""
    exists = check_existing(config.store, config)  # refuse a foreign store before the (slow) data load
    known_train = len(config.data.train_index) if config.data.train_index else config.data.train
    if known_train is not None:
        check_tile_size(n_train=known_train, size=config.tiles.size)
    inputs = prepare_inputs(config.data)
    check_image_shape(config, inputs.images.shape[1:])
    check_tile_size(n_train=inputs.n_train, size=config.tiles.size)
    if not exists:  # a new store: the whole plan and the inputs must fit
        check_disk(plan_cost(config, inputs, todo=None), config.store)
    prepare_store(config.store, config=config, inputs=inputs)
    remove_stray_files(config.store)  # temp files of writes interrupted long ago
    clear_cancel(config.store)  # a new run overrides an earlier `cntk cancel`
    done, planned = tile_status(config.store)
    damaged = _damaged(config.store, done) if verify else set()
    todo = [tile for tile in planned if tile not in done or tile in damaged]
    cost = plan_cost(config, inputs, todo=todo)
    check_disk(cost, config.store)
    return PreparedRun(inputs=inputs, planned=planned, done=done, damaged=damaged, todo=todo, cost=cost)


def check_image_shape(config: RunConfig, shape: tuple[int, ...]) -> None:
    """Refuse, before the store is made, images the configured kernels cannot take: LAP sizes beyond the image
    (kernel.lap c <= max(H, W)) and, with backend gpu, images beyond the GPU conv kernels' limits (any size runs
    on the CPU, fc on the host for either backend). One UserError naming the shape and what is allowed."""
    from cntk_gram.workers.enhanced import check_lap

    try:
        check_lap(config.kernel.lap, config.kernel.archs, tuple(shape))
    except ValueError as exc:
        raise UserError(f"images of shape {tuple(shape)} (H, W, C): {exc}") from None
    why = gpu_refusal(config, shape) if config.backend == "gpu" else None
    if why:
        raise UserError(f"images of shape {tuple(shape)} (H, W, C): {why}; backend cpu takes any size")


def gpu_refusal(config: RunConfig, shape: tuple[int, ...]) -> str | None:
    """Why the GPU conv kernels cannot take images of this shape for config's archs, or None (they can, or no
    conv arch is configured)."""
    from cntk_gram.workers.gpu import check_image_shape as gpu_shape

    if all(arch == "fc" for arch in config.kernel.archs):
        return None
    try:
        gpu_shape(tuple(shape))
    except ValueError as exc:
        return str(exc)
    return None


def fit_backend(config: RunConfig, backend: str, shape: tuple[int, ...]) -> str:
    """backend: config.backend resolved ('cpu' | 'gpu'). 'auto' resolved to 'gpu' becomes 'cpu', said on stderr,
    when the GPU conv kernels cannot take these images (an explicit 'gpu' was refused by check_image_shape)."""
    why = gpu_refusal(config, shape) if backend == "gpu" and config.backend == "auto" else None
    if why:
        print(f"backend auto: the CPU computes these tiles, since the GPU kernels cannot: {why}", file=sys.stderr,
              flush=True)
        return "cpu"
    return backend


def plan_cost(config: RunConfig, inputs: Inputs, *, todo) -> RunCost:
    """The tiles, pairs and bytes of config's plan for these inputs; todo None: a new store, every planned tile
    plus the input images it stores."""
    cost = run_cost(n_train=inputs.n_train, n_test=inputs.n_test, size=config.tiles.size,
                    test_test=config.data.test_test, arrays=len(planned_arrays(config)), todo=todo,
                    store_path=config.store)
    if todo is None:
        cost = dataclasses.replace(cost, bytes_todo=cost.bytes_todo + inputs.images.nbytes)
    return cost


# --- what a run will take (pipeline.predict) ----------------------------------------------------------

def predict(config: RunConfig, inputs: Inputs, todo, backend: str, *, client=None, local: bool = False,
            recalibrate: bool = False) -> RunPrediction:
    """The predicted wall time of computing `todo` with this backend ('cpu' | 'gpu'; 'auto' when no worker has
    decided it yet: this machine's), from now. With a client:
    probed on one of its workers, where the tiles run, for its connected workers (local: the embedded cluster,
    which is closed at the end). Without one (a dry run): probed here, for the embedded cluster, or per worker
    when the config names a cluster, as also when no worker is connected yet. Never raises: a failed probe gives
    a prediction that says why it is unknown."""
    from cntk_gram.workers.vocab import gpu_available

    cluster, kernel = config.cluster, config.kernel
    connected = None if client is None else len(client.scheduler_info()["workers"])
    if backend == "auto":   # left to each tile's worker (none has joined): probed with what this machine has
        backend = "gpu" if gpu_available() else "cpu"
    if backend == "gpu" and not connected and not gpu_available():
        return unknown("no GPU here to probe", backend)
    cores = os.cpu_count() or 1
    local_threads = cluster.workers * (cluster.threads or max(1, cores // cluster.workers))
    rf = kernel.random_features
    options = {"backend": backend, "archs": kernel.archs, "max_depth": max(kernel.depths), "lap": kernel.lap,
               "flip": kernel.flip, "store": str(Path(config.store).resolve()), "tile": config.tiles.size,
               "recalibrate": recalibrate,
               "rf": None if rf is None else {"archs": kernel.rf_archs, "kinds": kernel.kinds, "width": rf.width,
                                              "max_bytes": rf.max_bytes}}
    images = inputs.images[:1024]   # the probes use at most this many
    reason = None
    try:
        if connected:
            threads = client.submit(numba_threads, pure=False).result()
            rates = client.submit(calibrate, images, threads=threads, **options, pure=False).result()
            workers, scale, startup = connected, 1, (LOCAL_END_S if local else 0.0)
        elif client is None and not (cluster.scheduler or cluster.scheduler_file):
            threads = min(cores, local_threads) if backend == "cpu" else cores
            rates = calibrate(images, threads=threads, **options)
            workers, scale, startup = cluster.workers, (cluster.workers if backend == "cpu" else 1), LOCAL_START_S
        else:
            rates = calibrate(images, threads=cores, **options)
            workers, scale, startup = None, 1, 0.0
            reason = (f"{'a dry run does not contact the cluster' if client is None else 'no worker connected yet'}"
                      f"; probed here, assumes workers like this machine")
    except Exception as exc:  # a prediction never stops a run
        return unknown(f"the probe failed ({type(exc).__name__}: {exc})", backend)
    rf_model = None if rf is None else {"draws": rf.draws, "depths": kernel.depths, "max_depth": max(kernel.depths),
                                        "max_bytes": rf.max_bytes, "width": rf.width, "shape": images.shape[1:]}
    bounds = block_bounds(n_train=inputs.n_train, n_test=inputs.n_test, size=config.tiles.size)
    return predict_run(rates, todo=todo, bounds=bounds, arrays=len(planned_arrays(config)), size=config.tiles.size,
                       image_bytes=math.prod(images.shape[1:]) * 4, workers=workers, scale=scale, startup=startup,
                       rf=rf_model, reason=reason)


def announce(config: RunConfig, cost: RunCost, prediction: RunPrediction, shape, *, progress: bool) -> None:
    """Before the first tile: the plan line (with progress), the slow-CPU warning (always), and the prediction
    saved in the store for `cntk status`."""
    if progress:
        print(describe_cost(cost, prediction), file=sys.stderr, flush=True)
    warning = slow_cpu_warning(prediction, gpu_takes_it=gpu_takes(config, shape))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    seconds = prediction.seconds if prediction.seconds is not None else prediction.worker_seconds
    write_prediction(config.store, {"seconds": seconds, "workers": prediction.workers, "backend": prediction.backend,
                                    "pairs": cost.pairs_todo, "source": prediction.source,
                                    "made": prediction.made})


def gpu_takes(config: RunConfig, shape) -> bool:
    """Whether the GPU backend computes this run's kernels (conv archs, images within its limits): fc alone runs on
    the host either way."""
    return any(arch != "fc" for arch in config.kernel.archs) and gpu_refusal(config, shape) is None


def _damaged(store: str, done: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """Done tiles whose chunks fail their checksums (read in a thread pool: I/O and crc32c)."""
    tiles = sorted(done)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = pool.map(lambda tile: verify_tile(store, tile, deep=False), tiles)
        return {tile for tile, found in zip(tiles, problems) if found}


# --- the steps run and submit share ---------------------------------------------------------------

def _scheduler_of(config: RunConfig, scheduler: str | None, scheduler_file: str | None) -> dict:
    """{'scheduler', 'scheduler_file'}: each given argument, else the config's cluster setting."""
    return {"scheduler": scheduler or config.cluster.scheduler,
            "scheduler_file": scheduler_file or config.cluster.scheduler_file}


def _with_absolute_store(config: RunConfig) -> RunConfig:
    """Workers may run elsewhere on a shared filesystem: they get the store's absolute path."""
    return dataclasses.replace(config, store=str(Path(config.store).resolve()))


def _ready_backend(client, backend: str) -> str:
    """Resolve 'auto' on the cluster (bounded wait for a worker) and set up GPU workers; 'cpu' | 'gpu'."""
    backend = resolve_on_cluster(client, backend)
    if backend == "gpu":
        register_gpu_plugin(client)
    return backend


def _submit_tile(client, config: RunConfig, tile: tuple[int, int], *, backend: str, key: str | None = None):
    """One run_tile task for `tile` of config.store (absolute path); key None lets Dask name it."""
    kernel = config.kernel
    return client.submit(run_tile, config.store, tile[0], tile[1], backend=backend, archs=kernel.archs,
                         kinds=kernel.kinds, depths=kernel.depths, lap=kernel.lap, flip=kernel.flip,
                         random_features=rf_task_options(config),
                         key=key, retries=config.cluster.retries, pure=False)


def rf_task_options(config: RunConfig) -> dict | None:
    """The random_features argument of a tile task: None, or its archs, width, draws, seed and max_bytes."""
    rf = config.kernel.random_features
    if rf is None:
        return None
    return {"archs": config.kernel.rf_archs, **dataclasses.asdict(rf)}


def store_id(store_path: str | os.PathLike) -> str:
    """Short stable id of a store: sha1 of its absolute path (the path workers are given)."""
    return hashlib.sha1(str(Path(store_path).resolve()).encode()).hexdigest()[:12]


def tile_key(store_path: str | os.PathLike, tile: tuple[int, int]) -> str:
    """Dask task key of one tile of one store, e.g. 'cntk-1a2b3c4d5e6f-0-3'."""
    return f"cntk-{store_id(store_path)}-{tile[0]}-{tile[1]}"


# --- run: compute and wait ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What `run` did (`cntk run --json` prints these fields): store path, backend ('cpu' | 'gpu'), kernels
    (keys, random features included), depths, n_train, n_test, tile (edge), tiles_total (planned),
    tiles_done_before (done and intact before this run), tiles_damaged (done but failing their checksums:
    recomputed), tiles_computed (by this run, damaged ones included), pairs_computed, wall_seconds;
    prepare_seconds (data load, store checks and creation, before the cluster starts), store_bytes (the Gram
    arrays once complete), predicted_seconds (pipeline.predict: the wall time after prepare_seconds, the time the
    cluster's start and the probes took included; null when unknown or nothing was to compute)."""
    store: str
    backend: str
    kernels: list[str]
    depths: list[int]
    n_train: int
    n_test: int
    tile: int
    tiles_total: int
    tiles_done_before: int
    tiles_damaged: int
    tiles_computed: int
    pairs_computed: int
    wall_seconds: float
    prepare_seconds: float = 0.0
    store_bytes: int = 0
    predicted_seconds: float | None = None


def run(config: RunConfig, *, scheduler: str | None = None, scheduler_file: str | None = None,
        progress: bool = True, verify: bool = True, recalibrate: bool = False) -> RunSummary:
    """Compute every missing tile of `config` into config.store; return a RunSummary. progress: the plan line
    (with the predicted time) and a tqdm bar with an ETA on stderr.

    verify: re-check the chunk checksums of tiles already done (recomputing damaged ones); False trusts
    the completion records (faster resume of a very large store). recalibrate: probe again rather than reuse
    the cached rates of the prediction (pipeline.predict)."""
    started = time.time()
    target = _scheduler_of(config, scheduler, scheduler_file)
    external = bool(target["scheduler"] or target["scheduler_file"])
    # an existing cluster's workers may have GPUs this client lacks: there 'auto' is resolved on a worker
    backend = config.backend if external else resolve_here(config.backend)
    prep = prepare_run(config, verify=verify)
    shape = prep.inputs.images.shape[1:]
    backend = fit_backend(config, backend, shape)
    prediction = None
    prepared = time.time() - started
    bounds = bounds_of(layout(config.store))
    pairs_todo = sum(tile_pairs(bounds, tile) for tile in prep.todo)
    if prep.todo:
        with open_client(**target, cluster=config.cluster, backend=backend) as client:
            backend = fit_backend(config, _ready_backend(client, backend), shape)
            prediction = predict(config, prep.inputs, prep.todo, backend, client=client, local=not external,
                                 recalibrate=recalibrate)
            announce(config, prep.cost, prediction, shape, progress=progress)
            _execute(client, prep.todo, config=_with_absolute_store(config), backend=backend,
                     pairs_todo=pairs_todo, progress=progress,
                     eta=Eta(prediction.seconds, pairs_todo, started=prediction.made))
    return RunSummary(
        store=str(config.store), backend=backend,
        kernels=list(config.kernel.keys) + list(config.kernel.rf_keys),
        depths=list(config.kernel.depths), n_train=prep.inputs.n_train, n_test=prep.inputs.n_test,
        tile=config.tiles.size, tiles_total=len(prep.planned),
        tiles_done_before=len(prep.done - prep.damaged), tiles_damaged=len(prep.damaged),
        tiles_computed=len(prep.todo), pairs_computed=pairs_todo, wall_seconds=time.time() - started,
        prepare_seconds=prepared, store_bytes=prep.cost.store_bytes,
        predicted_seconds=None if prediction is None or prediction.seconds is None else
        prediction.made - started - prepared + prediction.seconds)   # the cluster's start and the probes, elapsed


def describe_cost(cost: RunCost, prediction: RunPrediction | None = None) -> str:
    """One line: what the tiles still to compute cost, what the disk holds, and the predicted time."""
    return (f"plan: {cost.tiles_todo:,} of {cost.tiles_total:,} tiles to compute, {cost.pairs_todo:,} pairs; "
            f"store {gib(cost.store_bytes)} when complete, {gib(cost.bytes_todo)} still to write, "
            f"{gib(cost.free_bytes)} free on its disk" + ("" if prediction is None else f"; {describe(prediction)}"))


def dry_run(config: RunConfig, *, recalibrate: bool = False) -> tuple[RunCost, RunPrediction, str | None]:
    """The cost of running `config` now, touching nothing: every planned tile for a new store, the tiles not yet
    recorded for an existing one (its checksums are not re-read), the predicted time (probed here; per worker when
    the config names a cluster, which is not contacted) and the slow-CPU warning line, or None. Loads the data to
    know the image counts."""
    exists = check_existing(config.store, config)
    inputs = prepare_inputs(config.data)
    shape = inputs.images.shape[1:]
    check_image_shape(config, shape)
    check_tile_size(n_train=inputs.n_train, size=config.tiles.size)
    planned = plan_tiles(n_train=inputs.n_train, n_test=inputs.n_test, size=config.tiles.size,
                         test_test=config.data.test_test)
    todo = None
    if exists:
        done, planned = tile_status(config.store)
        todo = [tile for tile in planned if tile not in done]
    backend = fit_backend(config, resolve_here(config.backend) if config.backend != "gpu" else "gpu", shape)
    prediction = predict(config, inputs, planned if todo is None else todo, backend, recalibrate=recalibrate)
    return plan_cost(config, inputs, todo=todo), prediction, slow_cpu_warning(
        prediction, gpu_takes_it=gpu_takes(config, shape))


def _execute(client, todo: list[tuple[int, int]], *, config: RunConfig, backend: str,
             pairs_todo: int, progress: bool, eta: Eta) -> None:
    """Submit tiles through a bounded window; stop with a UserError when a tile fails after retries. The bar's
    ETA (refreshed every second) is eta's: predicted until a tile finishes, then measured."""
    from distributed import as_completed

    threads = sum(client.nthreads().values())
    window = config.cluster.max_in_flight or max(2, 2 * threads)
    queue = collections.deque(todo)

    def submit_next():
        return _submit_tile(client, config, queue.popleft(), backend=backend)

    eta.measured_from = time.time()
    pending = as_completed([submit_next() for _ in range(min(window, len(queue)))])
    finished = 0

    def postfix() -> str:
        return f"tiles {finished}/{len(todo)}, {eta.text(bar.n)}"

    bar = tqdm(total=pairs_todo, unit="pair", unit_scale=True, disable=not progress, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]",
               postfix=f"tiles 0/{len(todo)}, {eta.text(0)}")   # tqdm's own ETA is left out: eta's replaces it
    stop = threading.Event()

    def tick():
        while not stop.wait(1.0):
            bar.set_postfix_str(postfix())

    if progress:
        threading.Thread(target=tick, daemon=True).start()
    try:
        for future in pending:
            try:
                result = future.result()
            except Exception as exc:
                if "scheduler-connection-lost" in str(exc) or client.status != "running":
                    raise UserError("lost the connection to the Dask scheduler; finished tiles are kept, "
                                    "rerun the same command to resume") from None
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    raise UserError(f"the store's disk is full ({gib(free_bytes(config.store))} free): a tile "
                                    f"could not be written; finished tiles are kept, free space and rerun the same "
                                    f"command to resume") from None
                raise UserError(f"a tile task failed after {config.cluster.retries} retries: "
                                f"{type(exc).__name__}: {exc}; finished tiles are kept, rerun to resume") from None
            finished += 1
            bar.update(result["pairs"])
            bar.set_postfix_str(postfix())
            if queue:
                pending.add(submit_next())
    finally:
        stop.set()
        bar.close()
        for future in list(pending.futures):
            future.cancel()


# --- submit: hand over and return; cancel ---------------------------------------------------------

def submit(config: RunConfig, *, scheduler: str | None = None, scheduler_file: str | None = None) -> dict:
    """Prepare config.store, hand every missing or damaged tile to the cluster, return at once.

    Returns {'store', 'backend', 'scheduler', 'tiles_total', 'tiles_done_before', 'tiles_damaged',
    'tiles_submitted'}.
    """
    from distributed import fire_and_forget

    target = _scheduler_of(config, scheduler, scheduler_file)
    config = _with_absolute_store(config)
    with connect(**target) as client:
        prep = prepare_run(config)
        shape = prep.inputs.images.shape[1:]
        backend = fit_backend(config, _ready_backend(client, config.backend), shape)
        if prep.todo:
            announce(config, prep.cost, predict(config, prep.inputs, prep.todo, backend, client=client), shape,
                     progress=True)
        futures = [_submit_tile(client, config, tile, backend=backend, key=tile_key(config.store, tile))
                   for tile in prep.todo]
        fire_and_forget(futures)  # closing the client flushes these messages to the scheduler first
    return {"store": config.store, "backend": backend,
            "scheduler": target["scheduler"] or target["scheduler_file"],
            "tiles_total": len(prep.planned), "tiles_done_before": len(prep.done - prep.damaged),
            "tiles_damaged": len(prep.damaged), "tiles_submitted": len(prep.todo)}


def cancel(store_path: str | os.PathLike, *, scheduler: str | None = None,
           scheduler_file: str | None = None) -> dict:
    """Flag the store's run as cancelled; with a cluster also drop its queued tasks.

    Returns {'store', 'tasks_cancelled' (None without a cluster)}.
    """
    from distributed import Future

    store = str(Path(store_path).resolve())
    layout(store)  # UserError when this is not a store
    request_cancel(store)
    cancelled = None
    if scheduler or scheduler_file:
        with connect(scheduler=scheduler, scheduler_file=scheduler_file) as client:
            keys = client.run_on_scheduler(_keys_with_prefix, prefix=f"cntk-{store_id(store)}-")
            client.cancel([Future(key, client=client) for key in keys], force=True)
            cancelled = len(keys)
    return {"store": store, "tasks_cancelled": cancelled}


def _keys_with_prefix(dask_scheduler=None, *, prefix: str) -> list[str]:
    """Runs on the scheduler: keys of its tasks that start with `prefix`."""
    return [key for key in dask_scheduler.tasks if isinstance(key, str) and key.startswith(prefix)]
