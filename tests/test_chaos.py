"""Fault tolerance with real processes on loopback: SIGKILLs of workers, the client and the scheduler
during one run; submit-and-detach; cancel; two clients on one store.

Every tile computation is logged by a worker preload (start/end lines), so the test can count the tiles
that were computed more than once and check that each was in flight when something was killed.
"""
from __future__ import annotations

import collections
import random
import re
import subprocess
import time
from pathlib import Path

import pytest

from cluster_procs import (assert_bit_identical, cntk, cntk_command, done_tiles, free_port, gram_arrays,
                           proc_env, start_scheduler, start_worker, stop, wait_for_workers, write_config)

N_KILLS = 20
TILE_LOG_PRELOAD = '''
"""Worker preload: log the start and end of every tile computation to $CNTK_TILE_LOG."""
import os
import time

import cntk_gram.pipeline.tasks as tasks


def _log(event, I, J):
    with open(os.environ["CNTK_TILE_LOG"], "a") as log:
        log.write(f"{event} {I} {J} {os.getpid()} {time.time()}\\n")


def _logged(compute_tile):
    def logged_compute_tile(store_path, I, J, **kwargs):
        _log("start", I, J)
        result = compute_tile(store_path, I, J, **kwargs)
        _log("end", I, J)
        return result
    logged_compute_tile.logged = True
    return logged_compute_tile


# dask may run a preload twice in one namespace: wrap only once
if not getattr(tasks.compute_tile, "logged", False):
    tasks.compute_tile = _logged(tasks.compute_tile)
'''


def read_tile_log(path: Path) -> list[tuple[str, tuple[int, int], int, float]]:
    """(event, tile, worker pid, time) for every complete line of the tile log."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5:  # a line cut by a SIGKILL is incomplete and ignored
            events.append((parts[0], (int(parts[1]), int(parts[2])), int(parts[3]), float(parts[4])))
    return events


def in_flight(events, pids: set[int] | None = None) -> set[tuple[tuple[int, int], int]]:
    """(tile, pid) started and not ended, on the given worker pids (all when None)."""
    running = collections.Counter()
    for event, tile, pid, _ in events:
        running[(tile, pid)] += 1 if event == "start" else -1
    return {key for key, n in running.items() if n > 0 and (pids is None or key[1] in pids)}


def hit_by_kill(events, *, when: float, pids: set[int], grace_s: float) -> set[tuple[int, int]]:
    """Tiles a kill at `when` may force to be computed again: in flight on `pids` at that moment, or started
    on them up to `grace_s` later (a worker keeps running its local queue until it learns that the
    client or the scheduler is gone)."""
    before = [e for e in events if e[3] <= when]
    started_later = {tile for event, tile, pid, t in events
                     if event == "start" and pid in pids and when < t <= when + grace_s}
    return {tile for tile, _ in in_flight(before, pids)} | started_later


class Cluster:
    """A scheduler on a fixed port, worker processes and one client command, each restartable."""

    def __init__(self, tmp_path: Path, *, n_workers: int, client_args: list[str]):
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.tile_log = tmp_path / "tiles.log"
        self.preload = tmp_path / "tile_log_preload.py"
        self.preload.write_text(TILE_LOG_PRELOAD)
        self.client_args = client_args
        self.procs: dict[str, subprocess.Popen | None] = {"scheduler": None, "client": None}
        self.procs.update({f"worker-{i}": None for i in range(n_workers)})
        self.client_exit_codes: list[int] = []

    def start(self, name: str) -> None:
        if name == "scheduler":
            self.procs[name] = start_scheduler(self.port, self.logs / "scheduler.log")
        elif name == "client":
            self.procs[name] = subprocess.Popen(
                cntk_command(*self.client_args, "--scheduler", self.address, "--no-progress"),
                env=proc_env(), stdout=(self.logs / "client.log").open("ab"), stderr=subprocess.STDOUT,
                start_new_session=True)
        else:
            self.procs[name] = start_worker(self.address, self.logs / f"{name}.log", preload=self.preload,
                                            CNTK_TILE_LOG=str(self.tile_log))

    def worker_pids(self) -> set[int]:
        return {p.pid for name, p in self.procs.items() if name.startswith("worker") and p and p.poll() is None}

    def kill(self, name: str) -> None:
        stop(self.procs[name])

    def close(self) -> None:
        stop(*self.procs.values())


def _config(tmp_path: Path, cifar_root: Path, store: Path) -> Path:
    # 160 + 40 images in tiles of 20: 10 blocks, 52 tiles; depth 60 makes a tile take a few tenths of a s.
    return write_config(tmp_path / f"{store.stem}.yaml", cifar_root=cifar_root, store=store, train=160,
                        test=40, tile=20, depths=(60,), cluster={"retries": 5, "max_in_flight": 4})


@pytest.mark.slow
def test_chaos_sigkills_then_resume_is_bit_identical(tmp_path, cifar_root):
    rng = random.Random(20260)
    clean_store, chaos_store = tmp_path / "clean.zarr", tmp_path / "chaos.zarr"
    clean = cntk("run", _config(tmp_path, cifar_root, clean_store), "--workers", "2", "--threads", "1",
                 "--no-progress", timeout=300)
    assert clean.returncode == 0, clean.stdout
    n_tiles = int(re.search(r"(\d+) total", clean.stdout).group(1))

    cluster = Cluster(tmp_path, n_workers=2, client_args=["run", str(_config(tmp_path, cifar_root, chaos_store))])
    kills, watchdog_kills = [], []  # (target, {(tile, pid) in flight when it was killed})
    started = time.time()
    try:
        for name in cluster.procs:
            cluster.start(name)
        last_kill, done_at_last_kill, kill_after = time.time(), 0, 3.0
        last_progress, last_done = time.time(), -1
        while True:
            assert time.time() - started < 240, f"chaos run did not finish; kills so far: {kills}"
            client = cluster.procs["client"]
            if client.poll() is not None:
                cluster.client_exit_codes.append(client.returncode)
                if client.returncode == 0:
                    break
            for name, proc in cluster.procs.items():
                if proc.poll() is not None:
                    cluster.start(name)
            done = len(done_tiles(chaos_store)) if (chaos_store / "zarr.json").exists() else 0
            if done != last_done:
                last_progress, last_done = time.time(), done
            # kills are paced by progress (every ~2 finished tiles), with a random time-based fallback,
            # so that they spread over the run whatever the speed of the machine
            since_kill = time.time() - last_kill
            progressed = done - done_at_last_kill >= 2 and since_kill > 0.5
            if len(kills) < N_KILLS and (since_kill > kill_after or progressed):
                assert done < n_tiles, f"the run finished after only {len(kills)} kills; make it longer"
                target = rng.choice(["worker-0", "worker-1", "worker-0", "worker-1", "client", "scheduler"])
                pids = {cluster.procs[target].pid} if target.startswith("worker") else cluster.worker_pids()
                kills.append((target, time.time(), pids))
                cluster.kill(target)
                last_kill, done_at_last_kill, kill_after = time.time(), done, rng.uniform(1.0, 3.0)
            elif time.time() - last_progress > 25:  # a client that lost its scheduler and hangs
                watchdog_kills.append(("client", time.time(), cluster.worker_pids()))
                cluster.kill("client")
                last_progress = time.time()
            time.sleep(0.1)
    finally:
        cluster.close()

    assert done_tiles(chaos_store) == done_tiles(clean_store) and len(done_tiles(clean_store)) == n_tiles
    assert_bit_identical(gram_arrays(chaos_store), gram_arrays(clean_store))
    verify = cntk("verify", chaos_store)
    assert verify.returncode == 0, verify.stdout

    events = read_tile_log(cluster.tile_log)
    starts = collections.Counter(tile for event, tile, _, _ in events if event == "start")
    recomputed = sum(starts.values()) - len(starts)
    grace_s = {"worker": 0.0, "client": 2.0, "scheduler": 30.0}  # orphaned workers stop within death-timeout
    in_flight_at_kills = collections.Counter(
        tile for target, when, pids in kills + watchdog_kills
        for tile in hit_by_kill(events, when=when, pids=pids, grace_s=grace_s[target.split("-")[0]]))
    by_target = collections.Counter(target.split("-")[0] for target, _, _ in kills)
    print(f"\nchaos: {len(kills)} random SIGKILLs ({dict(by_target)}) + {len(watchdog_kills)} of a stuck client, "
          f"{len(cluster.client_exit_codes)} client exits, {n_tiles} tiles, {sum(starts.values())} tile "
          f"computations, {recomputed} recomputed; {sum(in_flight_at_kills.values())} in flight at a kill; "
          f"{time.time() - started:.0f} s")
    assert len(kills) >= N_KILLS and {"worker", "client", "scheduler"} <= set(by_target)
    assert set(starts) == done_tiles(clean_store)
    for tile, n in starts.items():  # a tile computed k times was in flight at >= k - 1 kills
        assert n - 1 <= in_flight_at_kills[tile], (tile, n, in_flight_at_kills[tile])


@pytest.fixture
def loopback_cluster(tmp_path):
    """A scheduler and two worker processes (with the tile log), torn down after the test."""
    cluster = Cluster(tmp_path, n_workers=2, client_args=[])
    for name in ("scheduler", "worker-0", "worker-1"):
        cluster.start(name)
    wait_for_workers(cluster.address, 2)
    yield cluster
    cluster.close()


def _wait_done(store: Path, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (store / "zarr.json").exists() and len(done_tiles(store)) >= n:
            return
        time.sleep(0.3)
    raise AssertionError(f"{store}: {len(done_tiles(store))} of {n} tiles after {timeout} s")


def test_submit_returns_and_the_work_continues(tmp_path, cifar_root, loopback_cluster):
    store = tmp_path / "s.zarr"
    config = write_config(tmp_path / "s.yaml", cifar_root=cifar_root, store=store, train=60, test=20, tile=20)
    submitted = cntk("submit", config, "--scheduler", loopback_cluster.address)
    assert submitted.returncode == 0, submitted.stdout
    assert "submitted 9 of 9 tiles" in submitted.stdout
    _wait_done(store, 9)
    assert "tiles 9/9" in cntk("status", store).stdout
    again = cntk("submit", config, "--scheduler", loopback_cluster.address)
    assert "submitted 0 of 9 tiles (9 already done" in again.stdout
    reference = tmp_path / "ref.zarr"
    ref = cntk("run", config, "--store", reference, "--workers", "1", "--threads", "1", "--no-progress")
    assert ref.returncode == 0, ref.stdout
    assert_bit_identical(gram_arrays(store), gram_arrays(reference))


def test_cancel_stops_outstanding_tiles(tmp_path, cifar_root, loopback_cluster):
    store = tmp_path / "c.zarr"
    config = write_config(tmp_path / "c.yaml", cifar_root=cifar_root, store=store, train=160, test=40,
                          tile=20, depths=(60,))
    assert cntk("submit", config, "--scheduler", loopback_cluster.address).returncode == 0
    cancelled = cntk("cancel", store, "--scheduler", loopback_cluster.address)
    assert cancelled.returncode == 0, cancelled.stdout
    assert "queued tasks dropped" in cancelled.stdout
    time.sleep(3)
    after_cancel = done_tiles(store)
    assert len(after_cancel) < 52
    time.sleep(3)
    assert done_tiles(store) == after_cancel  # nothing runs any more
    resumed = cntk("submit", config, "--scheduler", loopback_cluster.address)
    assert f"submitted {52 - len(after_cancel)} of 52 tiles" in resumed.stdout
    _wait_done(store, 52, timeout=180)


@pytest.mark.parametrize("command", ["submit", "run"])
def test_two_clients_on_one_store_do_not_corrupt_it(tmp_path, cifar_root, loopback_cluster, command):
    store = tmp_path / "two.zarr"
    config = write_config(tmp_path / "two.yaml", cifar_root=cifar_root, store=store, train=60, test=20,
                          tile=20, depths=(30,))
    args = [command, str(config), "--scheduler", loopback_cluster.address]
    if command == "run":
        args.append("--no-progress")
    clients = [subprocess.Popen(cntk_command(*args), env=proc_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [client.communicate(timeout=180)[0] for client in clients]
    assert [client.returncode for client in clients] == [0, 0], outputs
    _wait_done(store, 9)
    reference = tmp_path / "ref.zarr"
    assert cntk("run", config, "--store", reference, "--workers", "1", "--threads", "1",
                "--no-progress").returncode == 0
    assert_bit_identical(gram_arrays(store), gram_arrays(reference))
    verify = cntk("verify", store)
    assert verify.returncode == 0, verify.stdout
    if command == "submit":  # the scheduler merged the second submission: each tile ran once
        starts = collections.Counter(t for e, t, _, _ in read_tile_log(loopback_cluster.tile_log) if e == "start")
        assert sum(starts.values()) <= 9 + 2, starts


def test_worker_killed_mid_tile_leaves_nothing_counted_as_done(tmp_path, cifar_root, loopback_cluster):
    store = tmp_path / "k.zarr"
    config = write_config(tmp_path / "k.yaml", cifar_root=cifar_root, store=store, train=40, test=0,
                          tile=40, depths=(150,))  # one slow tile
    assert cntk("submit", config, "--scheduler", loopback_cluster.address).returncode == 0
    deadline = time.time() + 60
    while not in_flight(read_tile_log(loopback_cluster.tile_log)) and time.time() < deadline:
        time.sleep(0.05)
    ((tile, pid),) = in_flight(read_tile_log(loopback_cluster.tile_log))
    victim = next(name for name, p in loopback_cluster.procs.items() if p and p.pid == pid)
    loopback_cluster.kill(victim)
    assert done_tiles(store) == set()  # the killed worker wrote no record
    _wait_done(store, 1)  # the scheduler gave the tile to the other worker
    assert cntk("verify", store).returncode == 0
