"""Dask worker preload for the process tests: log every tile computation and let the test pace them.

Loaded by a worker with `--preload tests/tile_gate.py` (or DASK_DISTRIBUTED__WORKER__PRELOAD for the
embedded cluster of `cntk run`); everything is driven by files the test names in the environment:

    CNTK_TILE_LOG   every tile computation appends 'start I J PID' before and 'end I J PID' after it
    CNTK_TILE_GATE  optional; holds an integer N: at most N tile computations may start, summed over all
                    workers and restarts (a worker waits before starting beyond that). No file: no limit. A task
                    waiting here on a worker that retires (its lifetime) goes back to the scheduler (Reschedule):
                    it has not started computing, and a retiring worker waits for the tasks it runs.
    CNTK_TILE_HOLD  optional; while this file exists a tile whose chunks are written waits before its
                    completion record ('hold I J PID' is logged), so a test can kill a worker mid-tile.

The log is written and the starts counted under an exclusive lock on CNTK_TILE_LOG + '.lock', so the
count is exact however many workers race. The test, not the clock, decides how far a run gets.
"""
import fcntl
import os
import time

import cntk_gram.pipeline.store as store
import cntk_gram.pipeline.tasks as tasks

POLL_S = 0.02  # how often a waiting worker looks at the gate or hold file again


class _locked:
    def __enter__(self):
        self.file = open(os.environ["CNTK_TILE_LOG"] + ".lock", "a")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.file.close()  # releases the lock


def _append(event, I, J):
    with open(os.environ["CNTK_TILE_LOG"], "a") as log:  # one short write: a SIGKILL cannot split it
        log.write(f"{event} {I} {J} {os.getpid()}\n")


def _starts_so_far() -> int:
    try:
        with open(os.environ["CNTK_TILE_LOG"]) as log:
            return sum(line.startswith("start ") for line in log)
    except FileNotFoundError:
        return 0


def _allowed() -> float:
    path = os.environ.get("CNTK_TILE_GATE")
    if not path:
        return float("inf")
    try:
        with open(path) as gate:
            return int(gate.read())
    except (FileNotFoundError, ValueError):  # no gate yet, or the test is rewriting it: no limit / wait
        return float("inf") if not os.path.exists(path) else 0


def _start(I, J):
    """Wait for a free start under the gate, then log the start (both under the lock)."""
    while True:
        with _locked():
            if _starts_so_far() < _allowed():
                _append("start", I, J)
                return
        _leave_if_retiring()
        time.sleep(POLL_S)


def _leave_if_retiring():
    """Raise Reschedule when this task's worker is closing (gracefully or not)."""
    from distributed import Reschedule, get_worker
    from distributed.core import Status

    try:
        status = get_worker().status
    except ValueError:  # not on a worker
        return
    if status in (Status.closing_gracefully, Status.closing, Status.closed):
        raise Reschedule()


def _logged(compute_tile):
    def logged_compute_tile(store_path, I, J, **kwargs):
        _start(I, J)
        result = compute_tile(store_path, I, J, **kwargs)
        with _locked():
            _append("end", I, J)
        return result
    logged_compute_tile.logged = True
    return logged_compute_tile


def _held(write_record):
    def held_write_record(store_path, tile, record):
        hold = os.environ.get("CNTK_TILE_HOLD")
        if hold and os.path.exists(hold):
            with _locked():
                _append("hold", *tile)
            while os.path.exists(hold):
                time.sleep(POLL_S)
        return write_record(store_path, tile, record)
    held_write_record.logged = True
    return held_write_record


# dask may run a preload twice in one namespace: wrap only once
if not getattr(tasks.compute_tile, "logged", False):
    tasks.compute_tile = _logged(tasks.compute_tile)
if not getattr(store.write_record, "logged", False):
    store.write_record = _held(store.write_record)
