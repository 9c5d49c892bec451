"""Fault tolerance with real processes on loopback: SIGKILLs of workers, the client and the scheduler
during one run; submit-and-detach; cancel; two clients on one store.

Every tile computation is logged by a worker preload (tests/tile_gate.py: start/end lines), so the test can
count the tiles that were computed more than once and check that each was hit by a kill. The same preload
lets the test, not the clock, decide how far a run gets: a gate caps the number of tile starts, a hold
file parks a tile before its completion record. No verdict here depends on the machine's speed.
"""
from __future__ import annotations

import collections
import random
import subprocess
import time
from pathlib import Path

import pytest

from cluster_procs import (assert_bit_identical, cntk, cntk_command, cntk_json, done_tiles, free_port, gram_arrays,
                           proc_env, start_scheduler, start_worker, stop, wait_for_records, wait_for_workers,
                           wait_until, write_config, GATE_PRELOAD, TileLog)

def read_tile_log(path: Path) -> list[tuple[str, tuple[int, int], int]]:
    return TileLog(path.parent).events() if path.exists() else []


def in_flight(events, pids: set[int] | None = None) -> set[tuple[tuple[int, int], int]]:
    """(tile, pid) started and not ended, on the given worker pids (all when None)."""
    running = collections.Counter()
    for event, tile, pid in events:
        if event in ("start", "end"):
            running[(tile, pid)] += 1 if event == "start" else -1
    return {key for key, n in running.items() if n > 0 and (pids is None or key[1] in pids)}


# How many tile starts on one worker after a client or scheduler kill may still come from the dead
# client's tasks: the one the worker was executing (or waiting at the gate) and the one queued behind it
# (worker-saturation 1.1 sends at most two tasks to a one-thread worker).
ORPHAN_STARTS_PER_WORKER = 2


def hit_by_kill(events, *, at: int, pids: set[int], orphans: int) -> set[tuple[int, int]]:
    """Tiles a kill may force to be computed again, the kill being made after the first `at` log lines:
    in flight on `pids` then, or among the next `orphans` starts on each of them (a worker finishes the
    dead client's or scheduler's tasks it already holds). Ordered by the log, not by the clock."""
    later_starts = collections.defaultdict(list)
    for event, tile, pid in events[at:]:
        if event == "start" and pid in pids:
            later_starts[pid].append(tile)
    orphaned = {tile for tiles in later_starts.values() for tile in tiles[:orphans]}
    return {tile for tile, _ in in_flight(events[:at], pids)} | orphaned


class Cluster:
    """A scheduler on a fixed port, worker processes and one client command, each restartable."""

    def __init__(self, tmp_path: Path, *, n_workers: int, client_args: list[str]):
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.tiles = TileLog(tmp_path)
        self.tile_log = self.tiles.path
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
            self.procs[name] = start_worker(self.address, self.logs / f"{name}.log", preload=GATE_PRELOAD,
                                            **self.tiles.env())

    def worker_pids(self) -> set[int]:
        return {p.pid for name, p in self.procs.items() if name.startswith("worker") and p and p.poll() is None}

    def live_servers(self) -> list[subprocess.Popen]:
        """The scheduler and worker processes running now."""
        return [p for name, p in self.procs.items() if name != "client" and p and p.poll() is None]

    def kill(self, name: str) -> None:
        stop(self.procs[name])

    def close(self) -> None:
        stop(*self.procs.values())


N_KILLS = 20
KILL_EVERY = 2   # a kill after every KILL_EVERY new completion records
OUTSTANDING = 2  # tile computations granted by the gate and not yet ended (= the two workers' slots)
WATCHDOG_S = 30  # see below: a watchdog kill is one more kill, never a verdict


def _config(tmp_path: Path, cifar_format_root: Path, store: Path) -> Path:
    # 120 + 20 images in tiles of 10: 14 blocks, 12 of them train: 78 + 24 = 102 tiles.
    return write_config(tmp_path / f"{store.stem}.yaml", data_root=cifar_format_root, store=store, train=120,
                        test=20, tile=10, depths=(30,), cluster={"retries": 5, "max_in_flight": 4})


@pytest.mark.slow
def test_chaos_sigkills_then_resume_is_bit_identical(tmp_path, cifar_format_root):
    """20 random SIGKILLs paced by progress: one after every KILL_EVERY new completion records. The test
    grants tile starts through the workers' gate so that at most OUTSTANDING granted tiles are unfinished;
    between two looks at the store at most OUTSTANDING records appear, so a kill interval adds at most
    KILL_EVERY - 1 + OUTSTANDING records and the plan cannot finish before the last kill at any speed."""
    rng = random.Random(20260)
    clean_store, chaos_store = tmp_path / "clean.zarr", tmp_path / "chaos.zarr"
    clean = cntk_json("run", _config(tmp_path, cifar_format_root, clean_store), "--workers", "2", "--threads", "1",
                      "--no-progress")
    n_tiles = clean["tiles_total"]
    assert n_tiles >= N_KILLS * (KILL_EVERY + OUTSTANDING), "the plan could finish before the last kill"

    cluster = Cluster(tmp_path, n_workers=2,
                      client_args=["run", str(_config(tmp_path, cifar_format_root, chaos_store))])
    tiles = cluster.tiles
    kills, watchdog_kills = [], []  # (target, log lines before the kill, worker pids it may orphan)
    started = time.time()
    try:
        tiles.allow_starts(OUTSTANDING)
        for name in cluster.procs:
            cluster.start(name)
        allowed, done_at_last_kill = OUTSTANDING, 0
        progress, last_progress = None, time.monotonic()
        while True:
            client = cluster.procs["client"]
            if client.poll() is not None:
                cluster.client_exit_codes.append(client.returncode)
                if client.returncode == 0:
                    break
            for name, proc in cluster.procs.items():
                if proc.poll() is not None:
                    cluster.start(name)
            done = len(done_tiles(chaos_store))
            events = tiles.events()
            if len(kills) < N_KILLS and done - done_at_last_kill >= KILL_EVERY:
                assert done < n_tiles, f"the run finished after only {len(kills)} kills"
                target = rng.choice(["worker-0", "worker-1", "worker-0", "worker-1", "client", "scheduler"])
                pids = {cluster.procs[target].pid} if target.startswith("worker") else cluster.worker_pids()
                kills.append((target, len(events), pids))
                cluster.kill(target)
                done_at_last_kill = done
            elif len(kills) == N_KILLS:
                allowed = float("inf")  # the last kill is made: let the run finish at full speed
            else:  # grant starts until OUTSTANDING tiles are granted or running on live workers
                starts = sum(event == "start" for event, _, _ in events)
                running = len(in_flight(events, cluster.worker_pids()))
                allowed = max(allowed, starts + OUTSTANDING - running)
            tiles.allow_starts(allowed)
            # A client that lost its scheduler can hang instead of exiting; when nothing at all has happened
            # for WATCHDOG_S it is killed too. That can only add a kill (counted below like the others),
            # so a slow machine that trips it still gets the same verdict.
            if (done, len(events)) != progress:
                progress, last_progress = (done, len(events)), time.monotonic()
            elif time.monotonic() - last_progress > WATCHDOG_S:
                watchdog_kills.append(("client", len(events), cluster.worker_pids()))
                cluster.kill("client")
                last_progress = time.monotonic()
            time.sleep(0.05)
    finally:
        cluster.close()

    assert done_tiles(chaos_store) == done_tiles(clean_store) and len(done_tiles(clean_store)) == n_tiles
    assert_bit_identical(gram_arrays(chaos_store), gram_arrays(clean_store))
    verify = cntk("verify", chaos_store)
    assert verify.returncode == 0, verify.stdout

    events = tiles.events()
    starts = collections.Counter(tile for event, tile, _ in events if event == "start")
    recomputed = sum(starts.values()) - len(starts)
    orphans = {"worker": 0, "client": ORPHAN_STARTS_PER_WORKER, "scheduler": ORPHAN_STARTS_PER_WORKER}
    hits = collections.Counter(
        tile for target, at, pids in kills + watchdog_kills
        for tile in hit_by_kill(events, at=at, pids=pids, orphans=orphans[target.split("-")[0]]))
    by_target = collections.Counter(target.split("-")[0] for target, _, _ in kills)
    print(f"\nchaos: {len(kills)} random SIGKILLs ({dict(by_target)}) + {len(watchdog_kills)} of a stuck client, "
          f"{len(cluster.client_exit_codes)} client exits, {n_tiles} tiles, {sum(starts.values())} tile "
          f"computations, {recomputed} recomputed; {sum(hits.values())} hit by a kill; "
          f"{time.time() - started:.0f} s")
    assert len(kills) == N_KILLS and {"worker", "client", "scheduler"} <= set(by_target)
    assert set(starts) == done_tiles(clean_store)
    for tile, n in starts.items():  # a tile computed k times was hit by >= k - 1 kills
        assert n - 1 <= hits[tile], (tile, n, hits[tile])


@pytest.fixture
def loopback_cluster(tmp_path):
    """A scheduler and two worker processes (with the tile log and gate), torn down after the test."""
    cluster = Cluster(tmp_path, n_workers=2, client_args=[])
    for name in ("scheduler", "worker-0", "worker-1"):
        cluster.start(name)
    wait_for_workers(cluster.address, 2, procs=cluster.procs.values())
    yield cluster
    cluster.close()


def _wait_done(store: Path, n: int, cluster: Cluster) -> None:
    """Until n tiles are done; fails at once if the scheduler or a live worker dies meanwhile."""
    wait_for_records(store, n, procs=cluster.live_servers())


def test_submit_returns_and_the_work_continues(tmp_path, cifar_format_root, loopback_cluster):
    store = tmp_path / "s.zarr"
    config = write_config(tmp_path / "s.yaml", data_root=cifar_format_root, store=store, train=60, test=20, tile=20)
    loopback_cluster.tiles.allow_starts(0)  # nothing may run before submit has returned
    submitted = cntk("submit", config, "--scheduler", loopback_cluster.address)
    assert submitted.returncode == 0, submitted.stdout
    assert "submitted 9 of 9 tiles" in submitted.stdout
    assert done_tiles(store) == set()
    loopback_cluster.tiles.allow_starts(float("inf"))
    _wait_done(store, 9, loopback_cluster)  # after the client exited
    status = cntk_json("status", store)
    assert (status["tiles_done"], status["tiles_total"]) == (9, 9)
    again = cntk("submit", config, "--scheduler", loopback_cluster.address)
    assert "submitted 0 of 9 tiles (9 already done" in again.stdout
    reference = tmp_path / "ref.zarr"
    ref = cntk("run", config, "--store", reference, "--workers", "1", "--threads", "1", "--no-progress")
    assert ref.returncode == 0, ref.stdout
    assert_bit_identical(gram_arrays(store), gram_arrays(reference))


def _scheduler_tasks(address: str) -> list[str]:
    """Keys of cntk tile tasks the scheduler still knows (queued, running or held in memory)."""
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        return client.run_on_scheduler(
            lambda dask_scheduler: [k for k in dask_scheduler.tasks if str(k).startswith("cntk-")])


def _busy_workers(address: str) -> int:
    """Worker threads running a task now (a cancelled task keeps its thread until it returns)."""
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        return sum(client.run(lambda dask_worker: len(dask_worker.active_threads)).values())


def test_cancel_stops_outstanding_tiles(tmp_path, cifar_format_root, loopback_cluster):
    store = tmp_path / "c.zarr"
    config = write_config(tmp_path / "c.yaml", data_root=cifar_format_root, store=store, train=160, test=40,
                          tile=20, depths=(3,))
    tiles, granted = loopback_cluster.tiles, 3
    tiles.allow_starts(granted)  # the run cannot get further than this before the cancel, at any speed
    assert cntk("submit", config, "--scheduler", loopback_cluster.address).returncode == 0
    _wait_done(store, granted, loopback_cluster)
    cancelled = cntk("cancel", store, "--scheduler", loopback_cluster.address)
    assert cancelled.returncode == 0, cancelled.stdout
    assert "queued tasks dropped" in cancelled.stdout
    # Only tasks that passed the cancel check before the flag was set may still run: at most one per
    # worker, waiting at the gate. Open it, then wait until nothing is queued or running any more.
    tiles.allow_starts(float("inf"))
    procs = loopback_cluster.live_servers()
    wait_until(lambda: not _scheduler_tasks(loopback_cluster.address), what="an empty task list", procs=procs)
    wait_until(lambda: _busy_workers(loopback_cluster.address) == 0, what="idle workers", procs=procs)
    assert not in_flight(tiles.events())
    after_cancel = done_tiles(store)
    assert granted <= len(after_cancel) <= granted + 2 < 52
    resumed = cntk("submit", config, "--scheduler", loopback_cluster.address)
    assert f"submitted {52 - len(after_cancel)} of 52 tiles" in resumed.stdout
    _wait_done(store, 52, loopback_cluster)
    starts = collections.Counter(t for e, t, _ in tiles.events() if e == "start")
    assert set(starts) == done_tiles(store) and all(n == 1 for n in starts.values()), starts


@pytest.mark.parametrize("command", ["submit", "run"])
def test_two_clients_on_one_store_do_not_corrupt_it(tmp_path, cifar_format_root, loopback_cluster, command):
    store = tmp_path / "two.zarr"
    config = write_config(tmp_path / "two.yaml", data_root=cifar_format_root, store=store, train=60, test=20,
                          tile=20, depths=(30,))
    args = [command, str(config), "--scheduler", loopback_cluster.address]
    if command == "run":
        args.append("--no-progress")
    clients = [subprocess.Popen(cntk_command(*args), env=proc_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [client.communicate()[0] for client in clients]
    assert [client.returncode for client in clients] == [0, 0], outputs
    _wait_done(store, 9, loopback_cluster)
    reference = tmp_path / "ref.zarr"
    assert cntk("run", config, "--store", reference, "--workers", "1", "--threads", "1",
                "--no-progress").returncode == 0
    assert_bit_identical(gram_arrays(store), gram_arrays(reference))
    verify = cntk("verify", store)
    assert verify.returncode == 0, verify.stdout
    if command == "submit":  # the scheduler merged the second submission: each tile ran once
        starts = collections.Counter(t for e, t, _ in read_tile_log(loopback_cluster.tile_log) if e == "start")
        assert sum(starts.values()) <= 9 + 2, starts


def test_worker_killed_mid_tile_leaves_nothing_counted_as_done(tmp_path, cifar_format_root, loopback_cluster):
    store = tmp_path / "k.zarr"
    config = write_config(tmp_path / "k.yaml", data_root=cifar_format_root, store=store, train=40, test=0,
                          tile=40, depths=(3,))  # one tile
    tiles = loopback_cluster.tiles
    tiles.hold.touch()  # the tile's chunks get written, then its worker waits before the record
    assert cntk("submit", config, "--scheduler", loopback_cluster.address).returncode == 0
    procs = loopback_cluster.live_servers()
    wait_until(lambda: any(e == "hold" for e, _, _ in tiles.events()), what="a tile held before its record",
               procs=procs)
    ((tile, pid),) = in_flight(tiles.events())
    victim = next(name for name, p in loopback_cluster.procs.items() if p and p.pid == pid)
    loopback_cluster.kill(victim)
    assert done_tiles(store) == set()  # the killed worker wrote its chunks but no record
    tiles.hold.unlink()
    _wait_done(store, 1, loopback_cluster)  # the scheduler gave the tile to the other worker
    ends = [end_pid for e, _, end_pid in tiles.events() if e == "end"]
    assert len(ends) == 1 and ends[0] != pid
    assert cntk("verify", store).returncode == 0
