"""Submit-and-detach: hand a config's missing tiles to a running Dask cluster and return; cancel them.

`submit` prepares the store exactly as `cntk run` does, then gives every tile that is missing or fails
its checksums to the cluster as a fire-and-forget task and returns: the work goes on after the client
exits, and `cntk status STORE` follows it from any machine that sees the store.

Why two clients (or a resubmission) cannot corrupt a store:
- task keys are `cntk-{store id}-{I}-{J}`: the scheduler merges a second submission of a tile that is
  still queued or running into the first one;
- a task that starts after its tile was finished (by anyone) re-checks the record and skips;
- tiles are deterministic and every chunk and record is published by an atomic rename, so two
  writers of one tile write the same bytes and a reader never sees a half-written file.

`cancel` writes a flag (`tiles/cancel`, a Zarr group) that every task checks before it starts, and
cancels the store's queued tasks on the scheduler by key prefix. Running tiles finish normally.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import time
import uuid
from pathlib import Path

import click

from cntk_gram.pipeline.errors import UserError

CONNECT_TIMEOUT_S = 5
CANCEL_FLAG = "tiles/cancel/zarr.json"


# --- keys and the cancel flag ----------------------------------------------------------------------

def store_id(store_path: str | os.PathLike) -> str:
    """Short stable id of a store: sha1 of its absolute path (the path workers are given)."""
    return hashlib.sha1(str(Path(store_path).resolve()).encode()).hexdigest()[:12]


def tile_key(store_path: str | os.PathLike, tile: tuple[int, int]) -> str:
    """Dask task key of one tile of one store, e.g. 'cntk-1a2b3c4d5e6f-0-3'."""
    return f"cntk-{store_id(store_path)}-{tile[0]}-{tile[1]}"


def cancel_requested(store_path: str | os.PathLike) -> bool:
    return (Path(store_path) / CANCEL_FLAG).exists()


def request_cancel(store_path: str | os.PathLike) -> None:
    """Atomically write the flag (a Zarr group whose attributes say who asked and when)."""
    flag = Path(store_path) / CANCEL_FLAG
    flag.parent.mkdir(parents=True, exist_ok=True)
    tmp = flag.with_name(f".zarr.json.{uuid.uuid4().hex[:8]}")
    attrs = {"requested": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
    tmp.write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}))
    os.replace(tmp, flag)


def clear_cancel(store_path: str | os.PathLike) -> None:
    flag = Path(store_path) / CANCEL_FLAG
    flag.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        flag.parent.rmdir()


# --- files left behind by killed writers -----------------------------------------------------------

STRAY_PATTERNS = ("*.partial", ".zarr.json.*")  # zarr's chunk temp files; temp records (store.write_record)


def stray_files(store_path: str | os.PathLike, *, older_than_s: float = 0) -> list[Path]:
    """Temp files that a killed writer left in the store, oldest first; younger ones may still be in use.

    They never hold data that is read (chunks and records are published by rename), so removing a stray
    file loses nothing; its tile has no record, or an intact one from another writer.
    """
    root = Path(store_path)
    now = time.time()
    found = {path for pattern in STRAY_PATTERNS for path in root.rglob(pattern) if path.is_file()}
    old = [path for path in found if now - _mtime(path) >= older_than_s]
    return sorted(old, key=_mtime)


def remove_stray_files(store_path: str | os.PathLike, *, older_than_s: float = 60) -> int:
    """Delete stray temp files older than `older_than_s` (a live writer's are seconds old); return the count."""
    removed = 0
    for path in stray_files(store_path, older_than_s=older_than_s):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


# --- what runs on a worker -------------------------------------------------------------------------

def run_tile(store_path: str, I: int, J: int, *, backend: str, archs: tuple[str, ...],
             kinds: tuple[str, ...], depths: tuple[int, ...]) -> dict:
    """compute_tile unless the store's run was cancelled or the tile is already done and intact.

    A drop-in for compute_tile (same arguments; the same result keys, with 0 pairs when skipped).
    Returns compute_tile's dict, or {'tile', 'pairs': 0, 'seconds': 0, 'compute_seconds': 0,
    'skipped': 'cancelled' | 'done'}.
    """
    from cntk_gram.pipeline.store import verify_tile
    from cntk_gram.pipeline.tasks import compute_tile

    skipped = {"tile": (I, J), "pairs": 0, "seconds": 0.0, "compute_seconds": 0.0}
    if cancel_requested(store_path):
        return {**skipped, "skipped": "cancelled"}
    if not verify_tile(store_path, (I, J), deep=False):
        return {**skipped, "skipped": "done"}
    return compute_tile(store_path, I, J, backend=backend, archs=archs, kinds=kinds, depths=depths)


def _keys_with_prefix(dask_scheduler=None, *, prefix: str) -> list[str]:
    return [key for key in dask_scheduler.tasks if isinstance(key, str) and key.startswith(prefix)]


# --- client side -----------------------------------------------------------------------------------

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


def submit(config, *, scheduler: str | None = None, scheduler_file: str | None = None) -> dict:
    """Prepare config.store, hand every missing or damaged tile to the cluster, return at once.

    Returns {'store', 'backend', 'scheduler', 'tiles_total', 'tiles_done_before', 'tiles_damaged',
    'tiles_submitted'}.
    """
    from distributed import fire_and_forget

    from cntk_gram.pipeline.schedule import prepare_run, register_gpu_plugin

    scheduler = scheduler or config.cluster.scheduler
    scheduler_file = scheduler_file or config.cluster.scheduler_file
    store = str(Path(config.store).resolve())
    config = dataclasses.replace(config, store=store)
    with connect(scheduler=scheduler, scheduler_file=scheduler_file) as client:
        prep = prepare_run(config)
        backend = _cluster_backend(client, config.backend)
        if backend == "gpu":
            register_gpu_plugin(client)
        kernel = config.kernel
        futures = [client.submit(run_tile, store, tile[0], tile[1], backend=backend, archs=kernel.archs,
                                 kinds=kernel.kinds, depths=kernel.depths, key=tile_key(store, tile),
                                 retries=config.cluster.retries, pure=False)
                   for tile in prep.todo]
        fire_and_forget(futures)  # closing the client flushes these messages to the scheduler first
    return {"store": store, "backend": backend, "scheduler": scheduler or scheduler_file,
            "tiles_total": len(prep.planned), "tiles_done_before": len(prep.done - prep.damaged),
            "tiles_damaged": len(prep.damaged), "tiles_submitted": len(prep.todo)}


def _cluster_backend(client, name: str) -> str:
    """'auto' is decided by a worker (the submitting machine may have no GPU); needs one worker."""
    if name != "auto":
        return name
    try:
        client.wait_for_workers(1, timeout=60)
    except TimeoutError:
        raise UserError("the cluster has no workers (waited 60 s); start workers, or give backend: cpu "
                        "or backend: gpu so that tiles can be queued before workers join") from None
    from cntk_gram.pipeline.schedule import _resolve_here

    return client.submit(_resolve_here, name, pure=False).result()


def cancel(store_path: str | os.PathLike, *, scheduler: str | None = None,
           scheduler_file: str | None = None) -> dict:
    """Flag the store's run as cancelled; with a cluster also drop its queued tasks.

    Returns {'store', 'tasks_cancelled' (None without a cluster)}.
    """
    from distributed import Future

    from cntk_gram.pipeline.store import layout

    store = str(Path(store_path).resolve())
    layout(store)  # UserError when this is not a store
    request_cancel(store)
    cancelled = None
    if scheduler or scheduler_file:
        with connect(scheduler=scheduler, scheduler_file=scheduler_file) as client:
            keys = client.run_on_scheduler(_keys_with_prefix, prefix=f"cntk-{store_id(store)}-")
            futures = [Future(key, client=client) for key in keys]
            client.cancel(futures, force=True)
            cancelled = len(keys)
    return {"store": store, "tasks_cancelled": cancelled}


# --- CLI (registered in pipeline/cli.py) -------------------------------------------------------------

scheduler_option = click.option("--scheduler", default=None, metavar="ADDRESS",
                                help="address of a running Dask scheduler, e.g. tcp://host:8786")
scheduler_file_option = click.option("--scheduler-file", default=None, metavar="FILE",
                                     help="scheduler file written by `dask scheduler --scheduler-file`")


@click.command("submit")
@click.argument("config_path", metavar="CONFIG")
@scheduler_option
@scheduler_file_option
@click.option("--store", default=None, help="store path (overrides the config's store)")
@click.option("--backend", type=click.Choice(["auto", "cpu", "gpu"]), default=None,
              help="tile backend on the workers (overrides the config)")
def submit_command(config_path, scheduler, scheduler_file, store, backend):
    """Queue CONFIG's missing tiles on a running cluster and return; follow with `cntk status STORE`."""
    from cntk_gram.pipeline.config import load_config

    config = load_config(config_path, {"store": store, "backend": backend})
    summary = submit(config, scheduler=scheduler, scheduler_file=scheduler_file)
    click.echo(f"submitted {summary['tiles_submitted']} of {summary['tiles_total']} tiles "
               f"({summary['tiles_done_before']} already done, {summary['tiles_damaged']} damaged) "
               f"to {summary['scheduler']}, backend {summary['backend']}")
    click.echo(f"follow with: cntk status {summary['store']}")


@click.command("cancel")
@click.argument("store_path", metavar="STORE")
@scheduler_option
@scheduler_file_option
def cancel_command(store_path, scheduler, scheduler_file):
    """Stop STORE's outstanding tiles: queued tasks are dropped, running tiles finish."""
    summary = cancel(store_path, scheduler=scheduler, scheduler_file=scheduler_file)
    dropped = "" if summary["tasks_cancelled"] is None else f"; {summary['tasks_cancelled']} queued tasks dropped"
    click.echo(f"cancel flag set in {summary['store']}{dropped}; `cntk submit` clears it")
